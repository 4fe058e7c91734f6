"""The river exporter reproduces river's own predictions for every supported model."""

from __future__ import annotations

import numpy as np
import pytest
from river import linear_model, multiclass, preprocessing

from service.learn.river_export import UnsupportedModelError, export_linear, model_classes

FEATURES = ["a", "b", "const"]


def _data(n: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)) * [2.0, 0.5] + [1.0, -3.0]
    y = (x[:, 0] + 2 * x[:, 1] > -4.5).astype(int) if classes == 2 else np.digitize(x[:, 0], [0, 2])
    rows = [{"a": float(r[0]), "b": float(r[1]), "const": 7.0} for r in x]
    return rows, y


def _float_predict(fm, rows):
    x = np.array([[r[f] for f in fm.features] for r in rows])
    z = (x - np.array(fm.mu)) / np.array(fm.sigma)
    logits = z @ np.array(fm.weights).T + np.array(fm.bias)
    return (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else np.argmax(logits, axis=1)


@pytest.mark.parametrize(
    ("make", "classes"),
    [
        (linear_model.LogisticRegression, 2),
        (linear_model.Perceptron, 2),
        (linear_model.PAClassifier, 2),
        (linear_model.ALMAClassifier, 2),
        (linear_model.SoftmaxRegression, 3),
        (lambda: multiclass.OneVsRestClassifier(linear_model.LogisticRegression()), 3),
    ],
)
def test_export_matches_river_predict_one(make, classes):
    rows, y = _data(600, classes, seed=classes)
    pipe = preprocessing.StandardScaler() | make()
    for r, label in zip(rows, y, strict=True):
        pipe.learn_one(r, bool(label) if classes == 2 else int(label))
    labels = model_classes(pipe)
    fm = export_linear(pipe, FEATURES, labels)
    # the constant feature is ignored exactly as river's scaler does, whatever its value
    assert fm.sigma[2] == 1.0
    assert all(w[2] == 0.0 for w in fm.weights)
    test_rows, _ = _data(300, classes, seed=99)
    test_rows = [{**r, "const": 123.0} for r in test_rows]
    river = [pipe.predict_one(r) for r in test_rows]
    ours = [labels[i] for i in _float_predict(fm, test_rows)]
    assert np.mean([a == b for a, b in zip(river, ours, strict=True)]) >= 0.999
    q = fm.quantize().predict(np.array([[r[f] for f in FEATURES] for r in test_rows]))
    assert np.mean([labels[i] == b for i, b in zip(q, river, strict=True)]) >= 0.97


def test_unsupported_models_are_named():
    from river import tree

    with pytest.raises(UnsupportedModelError, match="HoeffdingTreeClassifier"):
        export_linear(preprocessing.StandardScaler() | tree.HoeffdingTreeClassifier(), ["a"])
    with pytest.raises(UnsupportedModelError, match="StandardScaler"):
        export_linear(preprocessing.MinMaxScaler() | linear_model.LogisticRegression(), ["a"])
