"""Readings → the monitored signal streams of layer A, as per-frame means (vectorised).

For a schema with ``F`` features and ``C`` classes every reading gives ``S = 2 + C + 2F`` values,
in this fixed stream order (:class:`SignalLayout`):

====================  =========================  =============================================
stream                value per reading          ``Stream``
====================  =========================  =============================================
0                     confidence ``c``           ``("confidence", None)``
1                     ``c²``                     ``("confidence_sq", None)``
2 … 1+C               ``1[pred = j]``            ``("class_mix", class_names[j])``
2+C … 1+C+F           ``z_i``                    ``("feature", feature_names[i])``
2+C+F … 1+C+2F        ``(z_i − z̄_i)²·k/(k−1)``  ``("feature_var", feature_names[i])``
====================  =========================  =============================================

``z = clip((x − μ_ref) / σ_ref, −z_clip, z_clip)`` standardises a feature with the device's fixed
reference. The clip (default ±4, :data:`DEFAULT_Z_CLIP`) is the device model's own input range
(its int8 input saturates at ±4σ) and it bounds the tails of squared deviations: without it a
few extreme windows (a sprint, a knock) give ``z²`` frame means with kurtosis in the hundreds
and ADWIN false alarms at up to 30× the Gaussian rate (measured on the simulator; see
``service/drift/calibration.py``).

ADWIN consumes one value per stream per frame: the frame's mean (:func:`frame_means`), except
for ``feature_var``, whose frame value is the unbiased **within-frame variance** of ``z``,
``Σ(z − z̄)² / (k − 1)``: the mean over the frame of the per-reading values of
:func:`reading_deviations`. Unlike the mean of ``z²`` (which it replaces) it does not contain
``z̄²``, the square of the frame's own mean: on a slow sensor (AR(1), φ = 0.99) ``z̄`` wanders
for thousands of readings, and its square gives frame and block means of ``z²`` a
chi-square-like upper tail that no block size removes (skewness 0.5–0.6 after the
Wilson–Hilferty map at every block size, against ≈ 0.1 for independent readings), the cause of
every strict false alarm on such sensors (README, "Detection"). The level is the ``feature``
stream's job; the within-frame variance keeps the noise level, the spread a gain or a noisier
sensor changes and a stuck one loses, and its block means are nearly normal and nearly
independent. It is the classical rational-subgroup split of Shewhart charts: ``x̄`` for the
level, ``s²`` within subgroups for the spread (Montgomery, *Introduction to Statistical Quality
Control*, ch. 6). A frame of one reading has no within-frame variance: the value is ``NaN``
(the monitor reads it as no evidence).

The ingest path drains batches, so :func:`batch_frame_means` computes the means of many frames of
many devices at once with one ``np.add.reduceat`` over the concatenated readings; every frame
carries its own device's reference.

>>> lay = SignalLayout.create(["a", "b"], ["no", "yes"])
>>> lay.n_streams, lay.streams[2], lay.streams[-1]
(8, Stream(signal='class_mix', feature='no'), Stream(signal='feature_var', feature='b'))
>>> x = np.array([[1.0, 10.0], [3.0, 10.0]])
>>> m = frame_means_arrays(x, np.array([0, 1]), np.array([0.5, 1.0]), np.array([2.0, 10.0]),
...                        np.array([1.0, 1.0]), n_classes=2)
>>> m.tolist()  # z of a: -1 and 1 (mean 0, within variance 2); b is constant
[0.75, 0.625, 0.5, 0.5, 0.0, 0.0, 2.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from service.drift.detection import Signal
from service.ingest.frames import DeviceFrame

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_Z_CLIP: Final = 4.0
"""Standardised features are clipped to ±4 before ``z`` and ``z²`` are formed."""

MAX_FRAME_READINGS: Final = 4096
"""Largest frame layer A accepts (readings per telemetry frame)."""


class Stream(NamedTuple):
    """One monitored stream: its signal and the feature or class it belongs to (or ``None``)."""

    signal: Signal
    feature: str | None


@dataclass(frozen=True, slots=True)
class SignalLayout:
    """The streams of one schema, in the order of every signal vector."""

    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    streams: tuple[Stream, ...]

    @classmethod
    def create(cls, feature_names: Sequence[str], class_names: Sequence[str]) -> SignalLayout:
        """Layout for ``F = len(feature_names)`` features and ``C = len(class_names)`` classes."""
        feats = tuple(str(f) for f in feature_names)
        classes = tuple(str(c) for c in class_names)
        if not feats:
            raise ValueError("need at least one feature")
        if len(classes) < 2:
            raise ValueError("need at least two classes")
        if len(set(feats)) != len(feats) or len(set(classes)) != len(classes):
            raise ValueError("feature and class names must be unique")
        streams: list[Stream] = [Stream("confidence", None), Stream("confidence_sq", None)]
        streams += [Stream("class_mix", c) for c in classes]
        streams += [Stream("feature", f) for f in feats]
        streams += [Stream("feature_var", f) for f in feats]
        return cls(feats, classes, tuple(streams))

    @property
    def n_features(self) -> int:
        """``F``."""
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        """``C``."""
        return len(self.class_names)

    @property
    def n_streams(self) -> int:
        """``S = 2 + C + 2F``."""
        return len(self.streams)

    @property
    def class_slice(self) -> slice:
        """Columns of the class indicators."""
        return slice(2, 2 + self.n_classes)

    @property
    def z_slice(self) -> slice:
        """Columns of ``z``."""
        start = 2 + self.n_classes
        return slice(start, start + self.n_features)

    @property
    def var_slice(self) -> slice:
        """Columns of ``z²`` per reading, of the within-frame variance of ``z`` per frame."""
        start = 2 + self.n_classes + self.n_features
        return slice(start, start + self.n_features)


def _check_readings(
    features: FloatArray, pred: IntArray, conf: FloatArray, n_features: int, n_classes: int
) -> None:
    if features.ndim != 2 or features.shape[1] != n_features:
        raise ValueError(
            f"expected {n_features} features per reading, got shape {tuple(features.shape)}"
        )
    n = features.shape[0]
    if pred.shape != (n,) or conf.shape != (n,):
        raise ValueError("features, pred and conf must have one row per reading")
    if n and (int(pred.min()) < 0 or int(pred.max()) >= n_classes):
        raise ValueError(f"predicted class out of range 0..{n_classes - 1}")


def reading_signals(
    features: FloatArray,
    pred: IntArray,
    conf: FloatArray,
    mu: FloatArray,
    sigma: FloatArray,
    n_classes: int,
    z_clip: float = DEFAULT_Z_CLIP,
) -> FloatArray:
    """The ``[n, S]`` matrix of per-reading signal values (``mu``/``sigma``: ``[F]`` or ``[n, F]``).

    The ``feature_var`` columns hold ``z²``, from which the frame functions form the within-frame
    variance (:func:`reading_deviations` gives per-reading values whose frame mean it is).

    >>> reading_signals(np.array([[0.0], [9.0]]), np.array([1, 0]), np.array([0.5, 0.25]),
    ...                 np.zeros(1), np.ones(1), n_classes=2, z_clip=4.0).tolist()
    [[0.5, 0.25, 0.0, 1.0, 0.0, 0.0], [0.25, 0.0625, 1.0, 0.0, 4.0, 16.0]]
    """
    x = np.asarray(features, dtype=np.float64)
    p = np.asarray(pred, dtype=np.int64)
    c = np.asarray(conf, dtype=np.float64)
    _check_readings(x, p, c, x.shape[1] if x.ndim == 2 else -1, n_classes)
    n, f = x.shape
    out = np.empty((n, 2 + n_classes + 2 * f), dtype=np.float64)
    out[:, 0] = c
    out[:, 1] = c * c
    out[:, 2 : 2 + n_classes] = p[:, None] == np.arange(n_classes)[None, :]
    z = out[:, 2 + n_classes : 2 + n_classes + f]
    np.subtract(x, mu, out=z)
    np.divide(z, sigma, out=z)
    np.clip(z, -z_clip, z_clip, out=z)
    np.multiply(z, z, out=out[:, 2 + n_classes + f :])
    return out


def frame_means_arrays(
    features: FloatArray,
    pred: IntArray,
    conf: FloatArray,
    mu: FloatArray,
    sigma: FloatArray,
    n_classes: int,
    z_clip: float = DEFAULT_Z_CLIP,
) -> FloatArray:
    """Means over one frame's readings of every stream, ``float64[S]`` (the fast single path);
    the within-frame variance for ``feature_var``."""
    x = np.asarray(features, dtype=np.float64)
    p = np.asarray(pred, dtype=np.int64)
    c = np.asarray(conf, dtype=np.float64)
    f = int(mu.shape[0])
    _check_readings(x, p, c, f, n_classes)
    k = x.shape[0]
    if k == 0:
        raise ValueError("a frame needs at least one reading")
    z = np.clip((x - mu) / sigma, -z_clip, z_clip)
    out = np.empty(2 + n_classes + 2 * f, dtype=np.float64)
    inv_k = 1.0 / k
    out[0] = c.sum() * inv_k
    out[1] = np.dot(c, c) * inv_k
    out[2 : 2 + n_classes] = np.bincount(p, minlength=n_classes) * inv_k
    s1 = z.sum(axis=0)
    out[2 + n_classes : 2 + n_classes + f] = s1 * inv_k
    out[2 + n_classes + f :] = _within_variance(s1, np.einsum("ij,ij->j", z, z), k, inv_k)
    return out


def _within_variance(
    s1: FloatArray, s2: FloatArray, k: int | IntArray, inv_k: float | FloatArray
) -> FloatArray:
    """Unbiased variance from the sum ``s1`` and the sum of squares ``s2`` of ``k`` values
    (``NaN`` where ``k = 1``; never below 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        var: FloatArray = np.maximum(s2 - s1 * s1 * inv_k, 0.0) / (np.asarray(k) - 1.0)
    return np.where(np.asarray(k) > 1, var, np.nan)


def frame_means(
    frame: DeviceFrame,
    mu: FloatArray,
    sigma: FloatArray,
    n_classes: int,
    z_clip: float = DEFAULT_Z_CLIP,
) -> FloatArray:
    """Means of every stream over ``frame``'s readings against the reference ``mu``/``sigma``."""
    return frame_means_arrays(
        frame.features, frame.pred, frame.conf, mu, sigma, n_classes, z_clip=z_clip
    )


def concat_frames(
    frames: Sequence[DeviceFrame],
) -> tuple[FloatArray, IntArray, FloatArray, IntArray]:
    """Concatenated ``features``, ``pred``, ``conf`` of ``frames`` and each frame's ``k``."""
    if not frames:
        raise ValueError("no frames")
    ks = np.fromiter((fr.k for fr in frames), dtype=np.int64, count=len(frames))
    feats = np.concatenate([fr.features for fr in frames], axis=0).astype(np.float64, copy=False)
    pred = np.concatenate([fr.pred for fr in frames]).astype(np.int64, copy=False)
    conf = np.concatenate([fr.conf for fr in frames]).astype(np.float64, copy=False)
    return feats, pred, conf, ks


def batch_frame_means_arrays(
    features: FloatArray,
    pred: IntArray,
    conf: FloatArray,
    ks: IntArray,
    mu: FloatArray,
    sigma: FloatArray,
    n_classes: int,
    z_clip: float = DEFAULT_Z_CLIP,
) -> FloatArray:
    """Per-frame stream means ``[n_frames, S]`` of concatenated readings (the within-frame
    variance for ``feature_var``, ``NaN`` for a frame of one reading).

    ``ks`` are the frames' reading counts (each ≥ 1, summing to the number of readings);
    ``mu``/``sigma`` are ``[F]`` (one reference) or ``[n_frames, F]`` (each frame its device's).

    >>> x = np.array([[0.0], [2.0], [4.0]])
    >>> batch_frame_means_arrays(x, np.array([0, 1, 1]), np.array([1.0, 0.5, 0.5]),
    ...     np.array([2, 1]), np.array([[1.0], [4.0]]), np.ones((2, 1)), n_classes=2).tolist()
    [[0.75, 0.625, 0.5, 0.5, 0.0, 2.0], [0.5, 0.25, 0.0, 1.0, 0.0, nan]]
    """
    k = np.asarray(ks, dtype=np.int64)
    if k.ndim != 1 or k.size == 0 or int(k.min()) < 1:
        raise ValueError("every frame needs at least one reading")
    n = int(k.sum())
    if features.shape[0] != n:
        raise ValueError(f"the frames' sizes sum to {n}, but {features.shape[0]} readings given")
    mu_a = np.asarray(mu, dtype=np.float64)
    sigma_a = np.asarray(sigma, dtype=np.float64)
    if mu_a.ndim == 2:
        if mu_a.shape[0] != k.size or sigma_a.shape != mu_a.shape:
            raise ValueError("per-frame mu and sigma need one row per frame")
        mu_a = np.repeat(mu_a, k, axis=0)
        sigma_a = np.repeat(sigma_a, k, axis=0)
    values = reading_signals(features, pred, conf, mu_a, sigma_a, n_classes, z_clip=z_clip)
    starts = np.zeros(k.size, dtype=np.int64)
    np.cumsum(k[:-1], out=starts[1:])
    sums: FloatArray = np.add.reduceat(values, starts, axis=0)
    inv_k = 1.0 / k[:, None]
    zc = slice(2 + n_classes, 2 + n_classes + features.shape[1])
    vc = slice(zc.stop, None)
    var = _within_variance(sums[:, zc], sums[:, vc], k[:, None], inv_k)
    sums *= inv_k
    sums[:, vc] = var
    return sums


def reading_deviations(z: FloatArray, ks: IntArray) -> FloatArray:
    """Per reading, ``(z − z̄)² · k / (k − 1)`` with ``z̄`` and ``k`` of its own frame (``z``:
    ``[n, F]``, ``ks``: the frames' sizes); ``NaN`` in frames of one reading.

    Their mean over a frame is the frame's within-frame variance (the ``feature_var`` value):
    the reference's per-reading scale and skewness of that stream come from them.

    >>> reading_deviations(np.array([[1.0], [3.0], [5.0]]), np.array([2, 1])).tolist()
    [[2.0], [2.0], [nan]]
    """
    k = np.asarray(ks, dtype=np.int64)
    starts = np.zeros(k.size, dtype=np.int64)
    np.cumsum(k[:-1], out=starts[1:])
    zbar = np.add.reduceat(z, starts, axis=0) / k[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(k > 1, k / (k - 1.0), np.nan)
    dev: FloatArray = (z - np.repeat(zbar, k, axis=0)) ** 2 * np.repeat(scale, k)[:, None]
    return dev


MAX_FRAME_SKEW: Final = 3.0
"""Largest frame-mean skewness :func:`skew_normalise` corrects for (beyond, it is capped)."""


def skew_normalise(x: FloatArray, skew: FloatArray) -> FloatArray:
    """Map standardised values ``x`` with skewness ``skew`` closer to N(0, 1) on the long side.

    Wilson–Hilferty: a standardised gamma variable with skewness ``g > 0`` becomes nearly normal
    under ``WH(x) = (∛(1 + g·x/2) − 1 + g²/36) · 6/g``. Only the long (skewed) side is mapped:
    ``u = WH(x) − WH(0)`` for ``x > 0`` and ``u = x`` below (mirrored for ``g < 0``). The
    short side is left alone on purpose. Real frame means of a non-negative signal (``z²``)
    reach below the gamma's lower bound ``−2/g``, where the full map would stretch them into
    huge negative values: on simulator devices that raised 10⁻³–10⁻² of frames beyond 4.5σ.
    The short side of a skewed variable has lighter tails than the normal, so leaving it as is
    only makes ADWIN more conservative there. The map is continuous with slope 1 at 0,
    increasing, and the identity for ``g = 0``. ``|g|`` is capped at :data:`MAX_FRAME_SKEW`.

    Layer A applies it to every standardised frame mean with ``g = γ / √k``, where ``γ`` is the
    stream's per-reading skewness in the reference. Skewed streams (``z²``, rare classes) then
    give ADWIN the near-normal upper tail its δ was calibrated for (calibration.py docstring).

    >>> x = np.array([-1.0, 0.0, 2.0, 8.0])
    >>> skew_normalise(x, np.zeros(4)).tolist()
    [-1.0, 0.0, 2.0, 8.0]
    >>> [round(v, 2) for v in skew_normalise(x, np.full(4, 1.0)).tolist()]  # long side shrinks
    [-1.0, 0.0, 1.56, 4.26]
    >>> [round(v, 2) for v in skew_normalise(-x + 0.0, np.full(4, -1.0)).tolist()]  # mirror
    [1.0, 0.0, -1.56, -4.26]
    """
    g = np.clip(np.asarray(skew, dtype=np.float64), -MAX_FRAME_SKEW, MAX_FRAME_SKEW)
    x = np.asarray(x, dtype=np.float64)
    sign = np.where(g < 0.0, -1.0, 1.0)
    ga = np.maximum(np.abs(g), 1e-6)
    y = x * sign  # the long side is y > 0
    long_side = (np.cbrt(1.0 + 0.5 * ga * np.maximum(y, 0.0)) - 1.0) * (6.0 / ga)
    out: FloatArray = np.where((y > 0.0) & (np.abs(g) >= 1e-6), long_side * sign, x)
    return out


def standardised_means(
    rows: FloatArray,
    ks: IntArray,
    ref_mean: FloatArray,
    inv_sd: FloatArray,
    skew: FloatArray,
    layout: SignalLayout,
    within: bool | npt.NDArray[np.bool_] = True,
) -> FloatArray:
    """Frame means ``[n, S]`` of frames of ``ks`` readings → the monitored values ``u``.

    ``u = WH((m − m_ref) · √k / s_ref, γ/√k)`` (:func:`skew_normalise`) with the reference's
    per-reading mean, ``1/s_ref`` and skewness (``[S]`` or ``[n, S]``). ``within`` (per row or for
    all): whether the device's reference describes the within-frame variance of ``feature_var``;
    where it does not (a monitor checkpointed before that stream existed, or a device whose
    reference frames held one reading each) the frame's mean of ``z²`` is rebuilt from it,
    ``s²·(k − 1)/k + z̄²``. A ``feature_var`` value of a frame of one reading is ``NaN``: its
    ``u`` is 0, no evidence either way.

    >>> lay = SignalLayout.create(["a"], ["no", "yes"])
    >>> rows = np.array([[0.5, 0.25, 0.5, 0.5, 0.0, 1.0], [0.5, 0.25, 0.5, 0.5, 0.0, np.nan]])
    >>> u = standardised_means(rows, np.array([4, 1]), rows[0], np.ones(6), np.zeros(6), lay)
    >>> u.tolist()
    [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    k = np.asarray(ks, dtype=np.float64)[:, None]
    vc = layout.var_slice
    legacy = ~np.asarray(within, dtype=np.bool_)
    if legacy.any():
        rows = rows.copy()
        zbar = rows[:, layout.z_slice]
        var = rows[:, vc]
        z2 = np.where(k > 1.0, var * (k - 1.0) / k, 0.0) + zbar * zbar
        rows[:, vc] = np.where(legacy[:, None] if legacy.ndim else legacy, z2, var)
    root_k = np.sqrt(k)
    u = skew_normalise((rows - ref_mean) * (root_k * inv_sd), skew / root_k)
    tail = u[:, vc]
    np.copyto(tail, 0.0, where=np.isnan(tail))
    return u


def batch_frame_means(
    frames: Sequence[DeviceFrame],
    mu: FloatArray,
    sigma: FloatArray,
    n_classes: int,
    z_clip: float = DEFAULT_Z_CLIP,
) -> FloatArray:
    """:func:`batch_frame_means_arrays` for a sequence of frames (one schema, any devices)."""
    feats, pred, conf, ks = concat_frames(frames)
    return batch_frame_means_arrays(feats, pred, conf, ks, mu, sigma, n_classes, z_clip=z_clip)
