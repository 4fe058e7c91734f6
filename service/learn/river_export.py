"""Export a river ``StandardScaler | linear classifier`` pipeline as float linear parameters.

Supported (``../shared/research/fixedpoint-anchors.md`` §0.2): ``LogisticRegression``,
``Perceptron``, ``PAClassifier`` (binary, one row: the logit of the positive class),
``SoftmaxRegression`` and ``OneVsRestClassifier(LogisticRegression)`` (one row per class).
The scaler's running means and variances become ``mu`` and ``sigma``; a zero-variance feature
gets ``sigma = 1`` (river's scaler maps it to 0, and so does ``(x − mu) / 1`` at ``x = mu``).

>>> from river import linear_model, preprocessing
>>> pipe = preprocessing.StandardScaler() | linear_model.LogisticRegression()
>>> for i in range(50):
...     pipe.learn_one({"a": float(i % 7), "b": float(i % 3)}, i % 7 > 3)
>>> fm = export_linear(pipe, features=["a", "b"], classes=[False, True])
>>> fm.classes, len(fm.weights)
(['False', 'True'], 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from river import compose, linear_model, multiclass, preprocessing

from edge_agent.blob.float_model import FloatLinearModel

_BINARY = (linear_model.LogisticRegression, linear_model.Perceptron, linear_model.PAClassifier)


class UnsupportedModelError(TypeError):
    """The pipeline is not ``StandardScaler | <supported linear classifier>``."""


def _split(pipeline: Any) -> tuple[preprocessing.StandardScaler, Any]:
    if not isinstance(pipeline, compose.Pipeline) or len(pipeline.steps) != 2:
        raise UnsupportedModelError("expected a two-step pipeline StandardScaler | classifier")
    scaler, clf = list(pipeline.steps.values())
    if not isinstance(scaler, preprocessing.StandardScaler):
        raise UnsupportedModelError("the first step must be river's StandardScaler")
    return scaler, clf


def _intercept(clf: Any) -> float:
    value = getattr(clf, "intercept", 0.0)
    return float(value) if value is not None else 0.0


def export_linear(
    pipeline: Any, features: Sequence[str], classes: Sequence[Any]
) -> FloatLinearModel:
    """Float parameters of ``pipeline`` with a fixed feature and class order.

    ``classes`` lists the class values as river sees them; for binary models
    ``classes[1]`` is the positive class (``True`` for river's binary classifiers).
    """
    scaler, clf = _split(pipeline)
    mu = [float(scaler.means.get(f, 0.0)) for f in features]
    sigma = []
    for f in features:
        var = float(scaler.vars.get(f, 0.0))
        sigma.append(math.sqrt(var) if var > 0 else 1.0)
    names = [str(c) for c in classes]
    if isinstance(clf, _BINARY):
        if len(classes) != 2:
            raise UnsupportedModelError(f"{type(clf).__name__} is binary; give two classes")
        weights = [[float(clf.weights.get(f, 0.0)) for f in features]]
        bias = [_intercept(clf)]
    elif isinstance(clf, linear_model.SoftmaxRegression):
        weights = [[float(clf.weights[c].get(f, 0.0)) for f in features] for c in classes]
        bias = [0.0] * len(classes)  # river's SoftmaxRegression has no intercept
    elif isinstance(clf, multiclass.OneVsRestClassifier):
        rows, bias = [], []
        for c in classes:
            sub = clf.classifiers.get(c)
            if sub is None:
                rows.append([0.0] * len(features))
                bias.append(-1e3)  # a class never seen is never predicted
                continue
            if not isinstance(sub, linear_model.LogisticRegression):
                raise UnsupportedModelError("OneVsRest must wrap LogisticRegression")
            rows.append([float(sub.weights.get(f, 0.0)) for f in features])
            bias.append(_intercept(sub))
        weights = rows
    else:
        raise UnsupportedModelError(f"{type(clf).__name__} has no integer kernel in v1")
    return FloatLinearModel(
        features=list(features), classes=names, mu=mu, sigma=sigma, weights=weights, bias=bias
    )
