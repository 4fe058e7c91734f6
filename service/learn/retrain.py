"""Retrain with labels: river incremental learning continuing from the deployed model.

:func:`pipeline_from_float` is the inverse of :func:`service.learn.river_export.export_linear` for
the fleet's family ``StandardScaler | SoftmaxRegression`` (:func:`factory_model.make_pipeline`):
the scaler gets the deployed ``mu`` and ``sigma²`` as its running means and variances (with a
configurable prior count, so recent data moves them only as much as ``prior_count`` readings
allow), the classifier the deployed weights (one row per class, no intercept).

:func:`retrain` then splits the buffered labelled readings (oldest first) into a training window
and a held-out tail. Over the training window it runs **test-then-train** (prequential): each
reading is first predicted by the candidate as it stands, then learnt with ``learn_one``; the
deployed model's integer predictions on the same readings give the paired comparison. The
held-out tail is never learnt from: :mod:`service.learn.candidate` judges the candidate on it.

river's ``learn_many`` needs pandas, which is not a dependency: learning is ``learn_one`` per
reading (about 10 µs of work each for F = 8, C = 4).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from river import compose, linear_model, optim, preprocessing

from edge_agent.blob import ParameterSet
from edge_agent.blob.float_model import FloatLinearModel
from edge_agent.fixedpoint import quantize_linear
from service.learn.comparison import PairedComparison, compare_paired
from service.learn.deployed import DeployedModel
from service.learn.river_export import UnsupportedModelError, export_linear

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

MIN_LABELS = 100
"""Fewest labelled readings a retrain accepts (training window plus held-out tail)."""
BIAS_TOLERANCE = 1e-6
"""SoftmaxRegression has no intercept: a deployed bias beyond this cannot be continued from."""


class RetrainError(ValueError):
    """The labelled data cannot support a retrain; the message says why."""


@dataclass(frozen=True)
class RetrainConfig:
    """Learning settings (defaults: the factory model's, :func:`factory_model.make_pipeline`)."""

    learning_rate: float = 0.05
    l2: float = 1e-4
    prior_count: int = 1000
    """Weight of the deployed scaler statistics, in readings."""
    epochs: int = 1
    """Passes over the training window (the prequential score is taken on the first)."""
    holdout_fraction: float = 0.25
    """Share of the newest labelled readings held out for the decision."""
    min_labels: int = MIN_LABELS


@dataclass(frozen=True, eq=False)
class RetrainCandidate:
    """The retrained model (float and quantised) and the data split it came from."""

    params: ParameterSet
    float_model: FloatLinearModel
    prequential: PairedComparison
    """Test-then-train candidate vs deployed predictions, same training window and labels."""
    train_n: int
    holdout_x: FloatArray
    holdout_y: IntArray
    pipeline: Any
    """The river pipeline after learning (to continue learning from)."""


def pipeline_from_float(
    model: FloatLinearModel,
    *,
    prior_count: int = 1000,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
) -> compose.Pipeline:
    """A river ``StandardScaler | SoftmaxRegression`` holding ``model``'s parameters.

    Raises :class:`UnsupportedModelError` for a one-row (binary) model or a non-zero bias.
    """
    if len(model.weights) != len(model.classes):
        raise UnsupportedModelError("SoftmaxRegression needs one weight row per class")
    if max(abs(b) for b in model.bias) > BIAS_TOLERANCE:
        raise UnsupportedModelError("SoftmaxRegression has no intercept; the bias must be 0")
    if prior_count < 1:
        raise ValueError("prior_count must be >= 1")
    scaler = preprocessing.StandardScaler()
    for f, m, s in zip(model.features, model.mu, model.sigma, strict=True):
        scaler.counts[f] = prior_count
        scaler.means[f] = m
        scaler.vars[f] = s * s
    clf = linear_model.SoftmaxRegression(optimizer=optim.SGD(learning_rate), l2=l2)
    for c, row in zip(model.classes, model.weights, strict=True):
        clf.weights[c] = collections.defaultdict(float, dict(zip(model.features, row, strict=True)))
    pipe = scaler | clf
    assert isinstance(pipe, compose.Pipeline)
    return pipe


def _check_labelled(
    x: npt.ArrayLike, y: npt.ArrayLike, n_features: int, n_classes: int, min_labels: int
) -> tuple[FloatArray, IntArray]:
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y)
    if xa.ndim != 2 or xa.shape[1] != n_features:
        raise RetrainError(f"features must have shape (n, {n_features}), got {xa.shape}")
    if ya.shape != (xa.shape[0],):
        raise RetrainError(f"need one label per reading: {ya.shape[0]} labels, {xa.shape[0]} rows")
    if xa.shape[0] < min_labels:
        raise RetrainError(f"{xa.shape[0]} labelled readings; retraining needs {min_labels}")
    bad = np.flatnonzero(~np.isfinite(xa).all(axis=1))
    if bad.size:
        raise RetrainError(f"labelled reading {int(bad[0])} is not finite (NaN or inf)")
    if not np.issubdtype(ya.dtype, np.integer) or ya.min() < 0 or ya.max() >= n_classes:
        raise RetrainError(f"labels must be class indices in 0..{n_classes - 1}")
    return xa, ya.astype(np.int64)


def retrain(
    deployed: DeployedModel,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    config: RetrainConfig | None = None,
    holdout: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    device: str | None = None,
) -> RetrainCandidate:
    """Continue learning ``deployed`` on labelled readings ``x`` ``[n, F]``, ``y`` ``[n]``.

    Readings must be oldest first (``Registry.recent_labels`` order). Without ``holdout`` the
    newest ``holdout_fraction`` is held out; with it, all of ``x`` trains and ``holdout`` (e.g.
    labels from other devices or a later window) is the evaluation set. Raises
    :class:`RetrainError` for too few, non-finite or out-of-range data.
    """
    cfg = config or RetrainConfig()
    schema = deployed.params.schema
    xa, ya = _check_labelled(x, y, schema.n_features, schema.n_classes, cfg.min_labels)
    if holdout is None:
        n_hold = round(cfg.holdout_fraction * xa.shape[0])
        if n_hold < 1 or n_hold >= xa.shape[0]:
            raise RetrainError("holdout_fraction leaves no training or no held-out readings")
        x_tr, y_tr, x_ho, y_ho = xa[:-n_hold], ya[:-n_hold], xa[-n_hold:], ya[-n_hold:]
    else:
        x_tr, y_tr = xa, ya
        x_ho, y_ho = _check_labelled(holdout[0], holdout[1], schema.n_features, schema.n_classes, 1)
    base = deployed.float_model()
    pipe: Any = pipeline_from_float(
        base, prior_count=cfg.prior_count, learning_rate=cfg.learning_rate, l2=cfg.l2
    )
    features, classes = list(schema.features), list(schema.classes)
    index = {c: i for i, c in enumerate(classes)}
    rows = [dict(zip(features, map(float, r), strict=True)) for r in x_tr]
    preq = np.empty(len(rows), dtype=np.int64)
    for epoch in range(max(1, cfg.epochs)):
        for i, (row, label) in enumerate(zip(rows, y_tr, strict=True)):
            if epoch == 0:
                preq[i] = index[pipe.predict_one(row)]
            pipe.learn_one(row, classes[int(label)])
    prequential = compare_paired(y_tr, deployed.predict(x_tr), preq)

    fm = export_linear(pipe, features, classes)
    model = quantize_linear(fm.mu, fm.sigma, fm.weights, fm.bias, n_classes=len(classes))
    params = ParameterSet.create(
        schema,
        model,
        calibration=x_ho,
        min_confidence=deployed.params.min_confidence,
        provenance={
            "source": "retrain",
            "model": "StandardScaler|SoftmaxRegression",
            "base_version": deployed.param_version,
            "device": device,
            "labels": int(x_tr.shape[0]),
            "epochs": cfg.epochs,
        },
    )
    return RetrainCandidate(
        params=params,
        float_model=fm,
        prequential=prequential,
        train_n=int(x_tr.shape[0]),
        holdout_x=x_ho,
        holdout_y=y_ho,
        pipeline=pipe,
    )
