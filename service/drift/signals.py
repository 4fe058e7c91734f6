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
2+C+F … 1+C+2F        ``z_i²``                   ``("feature_sq", feature_names[i])``
====================  =========================  =============================================

``z = clip((x − μ_ref) / σ_ref, −z_clip, z_clip)`` standardises a feature with the device's fixed
reference. The clip (default ±4, :data:`DEFAULT_Z_CLIP`) is the device model's own input range
(its int8 input saturates at ±4σ) and it bounds the tails of ``z²``: without it a few extreme
windows (a sprint, a knock) give ``z²`` frame means with kurtosis in the hundreds and ADWIN false
alarms at up to 30× the Gaussian rate (measured on the simulator; see
``service/drift/calibration.py``).

ADWIN consumes one value per stream per frame: the frame's mean (:func:`frame_means`). The ingest
path drains batches, so :func:`batch_frame_means` computes the means of many frames of many
devices at once with one ``np.add.reduceat`` over the concatenated readings; every frame carries its
own device's reference.

>>> lay = SignalLayout.create(["a", "b"], ["no", "yes"])
>>> lay.n_streams, lay.streams[2], lay.streams[-1]
(8, Stream(signal='class_mix', feature='no'), Stream(signal='feature_sq', feature='b'))
>>> x = np.array([[1.0, 10.0], [3.0, 10.0]])
>>> m = frame_means_arrays(x, np.array([0, 1]), np.array([0.5, 1.0]), np.array([2.0, 10.0]),
...                        np.array([1.0, 1.0]), n_classes=2)
>>> m.tolist()
[0.75, 0.625, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0]
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
        streams += [Stream("feature_sq", f) for f in feats]
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
    def z2_slice(self) -> slice:
        """Columns of ``z²``."""
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
    """Means over one frame's readings of every stream, ``float64[S]`` (the fast single path)."""
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
    out[2 + n_classes : 2 + n_classes + f] = z.sum(axis=0) * inv_k
    out[2 + n_classes + f :] = np.einsum("ij,ij->j", z, z) * inv_k
    return out


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
    """Per-frame stream means ``[n_frames, S]`` of concatenated readings.

    ``ks`` are the frames' reading counts (each ≥ 1, summing to the number of readings);
    ``mu``/``sigma`` are ``[F]`` (one reference) or ``[n_frames, F]`` (each frame its device's).

    >>> x = np.array([[0.0], [2.0], [4.0]])
    >>> batch_frame_means_arrays(x, np.array([0, 1, 1]), np.array([1.0, 0.5, 0.5]),
    ...     np.array([2, 1]), np.array([[1.0], [4.0]]), np.ones((2, 1)), n_classes=2).tolist()
    [[0.75, 0.625, 0.5, 0.5, 0.0, 1.0], [0.5, 0.25, 0.0, 1.0, 0.0, 0.0]]
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
    sums /= k[:, None]
    return sums


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
