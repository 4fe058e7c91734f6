"""Export a river ``StandardScaler | linear classifier`` pipeline as float linear parameters.

Supported (``../shared/research/fixedpoint-anchors.md`` §0.2): ``LogisticRegression``,
``Perceptron``, ``PAClassifier``, ``ALMAClassifier`` (binary, one row: the logit of the positive
class; all predict ``logit > 0``), ``SoftmaxRegression`` (no intercept) and
``OneVsRestClassifier(LogisticRegression)`` (one row per class; river takes the argmax).
The scaler's running means and variances become ``mu`` and ``sigma``. river's scaler maps a
zero-variance feature to 0 whatever its value, so such a feature gets ``sigma = 1`` and a zero
weight column: the exported model then ignores it exactly as river does.

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
_BINARY_CLASSES: list[Any] = [False, True]


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


def model_classes(pipeline: Any) -> list[Any]:
    """The class values in row order, as the river model knows them.

    Binary models: ``[False, True]``. Softmax and one-vs-rest: the classes seen in training.
    """
    _, clf = _split(pipeline)
    if isinstance(clf, (*_BINARY, linear_model.ALMAClassifier)):
        return list(_BINARY_CLASSES)
    if isinstance(clf, linear_model.SoftmaxRegression):
        return list(clf.weights)
    if isinstance(clf, multiclass.OneVsRestClassifier):
        return list(clf.classifiers)
    raise UnsupportedModelError(f"{type(clf).__name__} has no integer kernel in v1")


def export_linear(
    pipeline: Any, features: Sequence[str], classes: Sequence[Any] | None = None
) -> FloatLinearModel:
    """Float parameters of ``pipeline`` with a fixed feature and class order.

    ``classes`` lists the class values as river sees them (default :func:`model_classes`); for
    binary models ``classes[1]`` is the positive class (``True`` for river's binary classifiers).
    """
    scaler, clf = _split(pipeline)
    classes = model_classes(pipeline) if classes is None else list(classes)
    mu = [float(scaler.means.get(f, 0.0)) for f in features]
    constant = [float(scaler.vars.get(f, 0.0)) <= 0 for f in features]
    sigma = [
        1.0 if c else math.sqrt(float(scaler.vars[f]))
        for f, c in zip(features, constant, strict=True)
    ]

    def row(weights: Any) -> list[float]:
        return [
            0.0 if c else float(weights.get(f, 0.0))
            for f, c in zip(features, constant, strict=True)
        ]

    if isinstance(clf, (*_BINARY, linear_model.ALMAClassifier)):
        if len(classes) != 2:
            raise UnsupportedModelError(f"{type(clf).__name__} is binary; give two classes")
        if isinstance(clf, linear_model.ALMAClassifier):
            weights, bias = [row(clf.w)], [0.0]  # ALMA has no intercept
        else:
            weights, bias = [row(clf.weights)], [_intercept(clf)]
    elif isinstance(clf, linear_model.SoftmaxRegression):
        weights = [
            row(clf.weights[c]) if c in clf.weights else [0.0] * len(features) for c in classes
        ]
        bias = [0.0] * len(classes)  # river's SoftmaxRegression has no intercept
    elif isinstance(clf, multiclass.OneVsRestClassifier):
        weights, bias = [], []
        for c in classes:
            sub = clf.classifiers.get(c)
            if sub is None:
                weights.append([0.0] * len(features))
                bias.append(-1e3)  # a class never seen is never predicted
                continue
            if not isinstance(sub, linear_model.LogisticRegression):
                raise UnsupportedModelError("OneVsRest must wrap LogisticRegression")
            weights.append(row(sub.weights))
            bias.append(_intercept(sub))
    else:
        raise UnsupportedModelError(f"{type(clf).__name__} has no integer kernel in v1")
    return FloatLinearModel(
        features=list(features),
        classes=[str(c) for c in classes],
        mu=mu,
        sigma=sigma,
        weights=weights,
        bias=bias,
    )
