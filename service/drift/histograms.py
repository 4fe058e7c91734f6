"""Exact, mergeable fixed-bin histograms over the quantised ranges a device works in.

Layer B (``cohort_monitor``) compares distributions per device and per cohort. Because a device's
classifier sees int8 inputs and reports a u8 confidence, every value it works with lies on a small
fixed grid, and a histogram over that grid is *exact*: integer counts that merge by addition
across readings, devices, windows and workers (no sketch error, research drift-anchors §1.8).

Three signals, laid out side by side in one flat ``int64`` row of :attr:`HistogramLayout.width`
columns (``F·feature_bins + conf_bins + C``):

* **features**: the device's own quantisation ``q = clamp(round((x − μ)·inv_σ·31.75), −128, 127)``
  with the cohort model's ``μ``/``inv_σ`` (computed by
  :func:`edge_agent.fixedpoint.linear.quantize_input`, the device's float32 stage, so the bins
  are exactly what the device's kernel saw); the 256 levels are grouped into ``feature_bins``
  equal bins (default 32: 8 levels = 0.25 σ each, ±4 σ overall);
* **confidence**: ``u8 = min(255, round(conf·256))`` (the wire's unit), grouped into
  ``conf_bins`` equal bins (default 16: 1/16 of probability each);
* **predicted class**: one bin per class.

:func:`accumulate` bins many readings of many devices in one ``np.bincount`` over combined
``device · width + column`` indices; the pooled histogram is the sum over devices.
:func:`js_distance` and :func:`hellinger_distance` compare two histograms (dashboards).

>>> layout = HistogramLayout(n_features=2, n_classes=3, feature_bins=4, conf_bins=4)
>>> mu = np.zeros(2, np.float32); inv = np.ones(2, np.float32)
>>> x = np.array([[0.0, -5.0], [1.0, 5.0], [-1.0, 0.0]])
>>> counts = accumulate(layout, mu, inv, x, np.array([0, 2, 2]), np.array([0.5, 1.0, 0.9]),
...                     device_index=np.array([0, 1, 1]), n_devices=2)
>>> counts.shape, int(counts.sum()), layout.width
((2, 15), 12, 15)
>>> h = Histograms(layout, counts[0]) + Histograms(layout, counts[1])
>>> h.n, h.classes.tolist(), h.feature(0).tolist(), h.conf.tolist()
(3, [1, 0, 2], [0, 1, 2, 0], [0, 0, 1, 2])
>>> Histograms.from_bytes(h.to_bytes()) == h
True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from edge_agent.fixedpoint.linear import quantize_input
from service.drift.checkpoint_format import add_header, check_header

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]

Q_LEVELS: Final = 256
"""int8 input levels, q ∈ [−128, 127]."""
CONF_LEVELS: Final = 256
"""u8 confidence levels, 0–255 (units of 1/256)."""
DEFAULT_PSEUDO_COUNT: Final = 0.5
"""Jeffreys pseudo-count added to every bin before a distance is computed (see
:func:`js_distance`)."""

_MAGIC: Final = b"TDHG"
_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class HistogramLayout:
    """Where each signal's bins sit in one flat histogram row.

    ``feature_bins`` and ``conf_bins`` must divide 256 (equal-width bins over the integer grid).
    Columns: ``[feature 0 bins | … | feature F−1 bins | confidence bins | class bins]``.
    """

    n_features: int
    n_classes: int
    feature_bins: int = 32
    conf_bins: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.n_features <= 255:
            raise ValueError("n_features must be in [1, 255]")
        if not 2 <= self.n_classes <= 255:
            raise ValueError("n_classes must be in [2, 255]")
        for name, bins in (("feature_bins", self.feature_bins), ("conf_bins", self.conf_bins)):
            if not (1 <= bins <= 256 and 256 % bins == 0):
                raise ValueError(f"{name} must divide 256 (got {bins})")

    @property
    def conf_offset(self) -> int:
        """First column of the confidence bins."""
        return self.n_features * self.feature_bins

    @property
    def class_offset(self) -> int:
        """First column of the class bins."""
        return self.conf_offset + self.conf_bins

    @property
    def width(self) -> int:
        """Columns of one histogram row."""
        return self.class_offset + self.n_classes

    @property
    def n_signals(self) -> int:
        """Histogrammed signals: every feature, the confidence, the class."""
        return self.n_features + 2

    def columns(self, q: IntArray, conf_u8: IntArray, pred: IntArray) -> IntArray:
        """Column index of every reading in every signal, ``[N, F + 2]``.

        ``q`` int8 values ``[N, F]``, ``conf_u8`` ``[N]`` in 0–255, ``pred`` ``[N]`` in
        ``[0, C)`` (``ValueError`` otherwise).
        """
        n = q.shape[0]
        if pred.shape != (n,) or conf_u8.shape != (n,) or q.shape != (n, self.n_features):
            raise ValueError("q [N, F], conf_u8 [N] and pred [N] must agree")
        if n and (pred.min() < 0 or pred.max() >= self.n_classes):
            raise ValueError(f"predicted classes must lie in [0, {self.n_classes})")
        out = np.empty((n, self.n_signals), dtype=np.int64)
        fb = self.feature_bins
        out[:, : self.n_features] = (q + 128) // (Q_LEVELS // fb) + fb * np.arange(
            self.n_features, dtype=np.int64
        )
        out[:, self.n_features] = self.conf_offset + conf_u8 // (CONF_LEVELS // self.conf_bins)
        out[:, self.n_features + 1] = self.class_offset + pred
        return out

    def bin_edges_q(self) -> IntArray:
        """Lowest int8 value of every feature bin (and 128 at the end), for plots."""
        return np.arange(-128, 129, Q_LEVELS // self.feature_bins, dtype=np.int64)


def conf_to_u8(conf: npt.ArrayLike) -> IntArray:
    """The device's confidence unit: ``min(255, round(conf · 256))``, half away from zero.

    Frames carry ``u8 / 256`` (binary) or the same value as a float (JSON), so this recovers the
    device's byte exactly. ``ValueError`` for values outside ``[0, 1]`` or not finite.

    >>> conf_to_u8([0.0, 0.5, 255 / 256, 1.0]).tolist()
    [0, 128, 255, 255]
    """
    c = np.asarray(conf, dtype=np.float64)
    if c.size and not (np.all(np.isfinite(c)) and c.min() >= 0.0 and c.max() <= 1.0):
        raise ValueError("confidences must be finite and in [0, 1]")
    return np.minimum(np.floor(c * 256.0 + 0.5), 255).astype(np.int64)


def reading_columns(
    layout: HistogramLayout,
    mu: F32Array,
    inv_sigma: F32Array,
    features: npt.ArrayLike,
    pred: npt.ArrayLike,
    conf: npt.ArrayLike,
) -> IntArray:
    """Quantise raw readings like the device and return their columns ``[N, F + 2]``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != layout.n_features:
        raise ValueError(f"features must be [N, {layout.n_features}], got {x.shape}")
    q = (
        quantize_input(x, mu, inv_sigma)
        if x.shape[0]
        else np.empty((0, layout.n_features), dtype=np.int64)
    )
    return layout.columns(q, conf_to_u8(conf), np.asarray(pred, dtype=np.int64))


def bincount_rows(columns: IntArray, row: IntArray | None, n_rows: int, width: int) -> IntArray:
    """Histogram rows ``[n_rows, width]`` from column indices ``[N, S]`` and row indices ``[N]``.

    One ``np.bincount`` over ``row · width + column``: exact integer counts, vectorised over
    every reading and every signal at once.
    """
    if row is None:
        flat = columns.ravel()
    else:
        if row.shape != (columns.shape[0],):
            raise ValueError("one row index per reading")
        if row.size and (row.min() < 0 or row.max() >= n_rows):
            raise ValueError("row index out of range")
        flat = (columns + (row * width)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_rows * width)
    return counts.astype(np.int64, copy=False).reshape(n_rows, width)


def accumulate(
    layout: HistogramLayout,
    mu: F32Array,
    inv_sigma: F32Array,
    features: npt.ArrayLike,
    pred: npt.ArrayLike,
    conf: npt.ArrayLike,
    *,
    device_index: npt.ArrayLike | None = None,
    n_devices: int = 1,
) -> IntArray:
    """Per-device histogram rows ``[n_devices, width]`` of many readings at once.

    ``device_index`` ``[N]`` says which row each reading belongs to (``None``: all to row 0).
    The pooled histogram is ``accumulate(...).sum(axis=0)``.
    """
    cols = reading_columns(layout, mu, inv_sigma, features, pred, conf)
    rows = None if device_index is None else np.asarray(device_index, dtype=np.int64)
    return bincount_rows(cols, rows, n_devices, layout.width)


@dataclass(frozen=True, slots=True, eq=False)
class Histograms:
    """One set of histograms (a device's or a cohort's), merged by ``+``.

    ``counts`` is one flat ``int64`` row in ``layout``'s column order.
    """

    layout: HistogramLayout
    counts: IntArray

    def __post_init__(self) -> None:
        c = np.asarray(self.counts)
        if c.shape != (self.layout.width,) or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"counts must be an integer row of {self.layout.width} columns")
        if c.size and c.min() < 0:
            raise ValueError("counts must be non-negative")
        object.__setattr__(self, "counts", c.astype(np.int64, copy=True))

    @classmethod
    def empty(cls, layout: HistogramLayout) -> Histograms:
        """All-zero histograms."""
        return cls(layout, np.zeros(layout.width, dtype=np.int64))

    @property
    def n(self) -> int:
        """Readings counted (every reading adds one to the class bins)."""
        return int(self.classes.sum())

    def feature(self, f: int) -> IntArray:
        """Counts of feature ``f`` (``feature_bins``)."""
        b = self.layout.feature_bins
        out: IntArray = self.counts[f * b : (f + 1) * b]
        return out

    @property
    def features(self) -> IntArray:
        """Feature counts ``[F, feature_bins]``."""
        out: IntArray = self.counts[: self.layout.conf_offset].reshape(
            self.layout.n_features, self.layout.feature_bins
        )
        return out

    @property
    def conf(self) -> IntArray:
        """Confidence counts (``conf_bins``)."""
        out: IntArray = self.counts[self.layout.conf_offset : self.layout.class_offset]
        return out

    @property
    def classes(self) -> IntArray:
        """Predicted-class counts (``C``)."""
        out: IntArray = self.counts[self.layout.class_offset :]
        return out

    def __add__(self, other: Histograms) -> Histograms:
        if not isinstance(other, Histograms):
            return NotImplemented
        if other.layout != self.layout:
            raise ValueError("cannot merge histograms of different layouts")
        return Histograms(self.layout, self.counts + other.counts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histograms):
            return NotImplemented
        return self.layout == other.layout and bool(np.array_equal(self.counts, other.counts))

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """``TDHG`` header, the layout (4 × u16), then the counts (int64 little-endian)."""
        lay = self.layout
        head = struct.pack("<4H", lay.n_features, lay.n_classes, lay.feature_bins, lay.conf_bins)
        return add_header(_MAGIC, _VERSION, head + self.counts.astype("<i8").tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Histograms:
        """Inverse of :meth:`to_bytes`; ``CheckpointFormatError`` for another format."""
        payload = check_header(data, _MAGIC, _VERSION)
        if len(payload) < 8:
            raise ValueError("histogram blob truncated")
        f, c, fb, cb = struct.unpack("<4H", payload[:8])
        layout = HistogramLayout(f, c, fb, cb)
        body = payload[8:]
        if len(body) != 8 * layout.width:
            raise ValueError("histogram blob has the wrong length for its layout")
        return cls(layout, np.frombuffer(body, dtype="<i8").astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Distances
# ------------------------------------------------------------------------------------------------


def _probabilities(counts: npt.ArrayLike, pseudo_count: float) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim == 0:
        raise ValueError("a histogram needs at least one bin")
    if pseudo_count < 0 or not np.isfinite(pseudo_count):
        raise ValueError("pseudo_count must be finite and >= 0")
    c = c + pseudo_count
    total = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = c / total  # an empty histogram without smoothing gives NaN
    return out


def js_distance(
    p: npt.ArrayLike, q: npt.ArrayLike, pseudo_count: float = DEFAULT_PSEUDO_COUNT
) -> float | FloatArray:
    """Jensen–Shannon *distance* (square root of the JS divergence, base 2), in ``[0, 1]``.

    ``p``, ``q`` are counts over the same bins (last axis; leading axes broadcast, giving an
    array of distances). ``0 · log 0 = 0``, so empty bins need no smoothing to stay finite;
    the smoothing is there for *small* histograms: ``pseudo_count`` (default 0.5, the
    Jeffreys prior) is added to every bin of both histograms before normalising, so a bin that
    happens to be empty in a window of a few readings is not read as "probability zero". Its
    weight is ``pseudo_count · bins / (n + pseudo_count · bins)``, negligible for pooled cohort
    windows (n ≫ bins). Use ``pseudo_count=0`` for the exact empirical distance. An empty
    histogram with ``pseudo_count=0`` gives NaN.

    These distances are for dashboards: their null distribution shrinks like ``1/n``, so a fixed
    threshold means different things at different window sizes (research drift-anchors §3.6);
    alerts come from the calibrated tests in ``cohort_monitor``.

    >>> js_distance([5, 5], [5, 5], 0), js_distance([1, 0], [0, 1], 0)
    (0.0, 1.0)
    >>> round(js_distance([1, 1], [1, 0], 0), 4)  # sqrt(JSD) with JSD = 1.5 − 0.75·log2(3)
    0.5579
    """
    pp = _probabilities(p, pseudo_count)
    qq = _probabilities(q, pseudo_count)
    m = 0.5 * (pp + qq)
    with np.errstate(invalid="ignore", divide="ignore"):
        tp = np.where(pp > 0, pp * np.log2(np.where(pp > 0, pp, 1.0) / np.where(m > 0, m, 1.0)), 0)
        tq = np.where(qq > 0, qq * np.log2(np.where(qq > 0, qq, 1.0) / np.where(m > 0, m, 1.0)), 0)
    div = 0.5 * (tp.sum(axis=-1) + tq.sum(axis=-1))
    nan = np.isnan(pp).any(axis=-1) | np.isnan(qq).any(axis=-1)
    out = np.where(nan, np.nan, np.sqrt(np.clip(div, 0.0, 1.0)))
    return float(out) if out.ndim == 0 else np.asarray(out, dtype=np.float64)


def hellinger_distance(
    p: npt.ArrayLike, q: npt.ArrayLike, pseudo_count: float = DEFAULT_PSEUDO_COUNT
) -> float | FloatArray:
    """Hellinger distance ``sqrt(1 − Σ sqrt(p_i q_i))``, in ``[0, 1]``.

    Same inputs and smoothing as :func:`js_distance`.

    >>> hellinger_distance([3, 1], [3, 1], 0), hellinger_distance([1, 0], [0, 1], 0)
    (0.0, 1.0)
    >>> round(hellinger_distance([1, 1], [1, 0], 0), 4)  # sqrt(1 − sqrt(½))
    0.5412
    """
    pp = _probabilities(p, pseudo_count)
    qq = _probabilities(q, pseudo_count)
    bc = np.sqrt(pp * qq).sum(axis=-1)
    out = np.sqrt(np.clip(1.0 - bc, 0.0, 1.0))
    return float(out) if out.ndim == 0 else np.asarray(out, dtype=np.float64)
