"""Label-free accuracy *estimate* from calibrated confidences (CBPE-style).

Confidence-based performance estimation (NannyML's CBPE) predicts a window's accuracy as the mean
of ``P(correct | confidence)`` over its readings, with the calibration ``P(correct | conf)``
learned where labels exist (here: the labels that arrive during the cohort's reference windows).

Calibration: readings are grouped by their u8 confidence into ``bins`` equal bins (default 16,
the histogram's confidence bins). Per bin, the labelled share correct is shrunk towards the raw
confidence of the bin's readings with a pseudo-count ``prior_strength`` (default 10 labels): a bin
with few labels stays close to the model's own confidence, and with no labels at all the estimate
*is* the mean raw confidence (the fallback). The shrunk values are then made non-decreasing in
the confidence by pool-adjacent-violators (isotonic regression, weighted by labels + prior), so
sampling noise cannot make a more confident bin look less accurate.

Interval: ``estimate ± z · sqrt(V)`` (default ``z = 1.96``), with ``V`` the sum of the
Poisson-binomial variance of the realised share correct, ``Σ_k n_k p_k(1 − p_k) / n²``, and the
calibration's own uncertainty, ``Σ_k (n_k / n)² · p_k(1 − p_k) / (labels_k + prior + 1)``. It
covers the realised accuracy *only while the calibration holds*.

What it cannot see — this is an **estimate**, and the report says so:

* **concept shift** (the labels change for the same inputs): the confidences do not move, so the
  estimate does not either (research drift-anchors §1.7: estimated 0.78 while the truth was
  0.72–0.73). Only labels (layer A's error-stream detectors, the labelled accuracy) show it;
* **covariate shift that moves inputs out of the reference support**: the model stays confident
  where it is wrong. On the simulated fleet, calibrated on the devices' own reference labels,
  mild sensor drift is tracked within 0.02 (gain −10 % to +5 %, offset ±0.05 g; the tests in
  ``tests/unit/test_accuracy_estimate.py`` allow 0.03), but at the simulator's default
  magnitudes (gain +30 % or offset +0.25 g on all axes) the estimate stays near 0.87 while the
  realised accuracy falls to about 0.72. The histogram tests see those drifts at once; the
  estimate is not a detector.

>>> cal = ConfidenceCalibration(bins=4, prior_strength=0.0)
>>> u8 = np.array([200, 210, 220, 230, 100, 110])
>>> cal.add(u8, np.array([True, True, True, False, False, True]))
>>> est = estimate_accuracy(np.bincount(u8, minlength=256), cal)
>>> round(est.estimate, 3), est.calibrated, est.kind
(0.667, True, 'estimate')
>>> estimate_accuracy(np.bincount([128, 192], minlength=256), None).estimate  # raw confidence
0.625
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

CONF_LEVELS: Final = 256
DEFAULT_PRIOR_STRENGTH: Final = 10.0
DEFAULT_Z: Final = 1.96


def pool_adjacent_violators(values: npt.ArrayLike, weights: npt.ArrayLike) -> FloatArray:
    """Weighted least-squares non-decreasing fit (isotonic regression) by PAV.

    >>> pool_adjacent_violators([1.0, 3.0, 2.0, 4.0], [1, 1, 1, 1]).tolist()
    [1.0, 2.5, 2.5, 4.0]
    >>> pool_adjacent_violators([3.0, 1.0], [3, 1]).tolist()
    [2.5, 2.5]
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.shape != w.shape or v.ndim != 1:
        raise ValueError("values and weights must be 1-D of the same length")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    means: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for x, wx in zip(v.tolist(), w.tolist(), strict=True):
        means.append(x)
        wts.append(wx)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, s2 = means.pop(), wts.pop(), sizes.pop()
            m1, w1 = means[-1], wts[-1]
            tot = w1 + w2
            means[-1] = (m1 * w1 + m2 * w2) / tot if tot > 0 else 0.5 * (m1 + m2)
            wts[-1] = tot
            sizes[-1] += s2
    return np.repeat(np.array(means), np.array(sizes, dtype=np.int64))


class ConfidenceCalibration:
    """Labelled counts per confidence bin: ``P(correct | conf)`` after shrinkage and PAV."""

    def __init__(self, bins: int = 16, prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> None:
        if not (1 <= bins <= CONF_LEVELS and CONF_LEVELS % bins == 0):
            raise ValueError("bins must divide 256")
        if prior_strength < 0 or not np.isfinite(prior_strength):
            raise ValueError("prior_strength must be finite and >= 0")
        self.bins = bins
        self.prior_strength = float(prior_strength)
        self.correct = np.zeros(bins, dtype=np.int64)
        self.total = np.zeros(bins, dtype=np.int64)

    @property
    def n_labels(self) -> int:
        """Labelled readings seen."""
        return int(self.total.sum())

    def bin_of(self, conf_u8: IntArray) -> IntArray:
        """Calibration bin of u8 confidences."""
        out: IntArray = np.asarray(conf_u8, dtype=np.int64) // (CONF_LEVELS // self.bins)
        return out

    def add(self, conf_u8: npt.ArrayLike, correct: npt.ArrayLike) -> None:
        """Add labelled readings: their u8 confidence and whether the prediction was right."""
        u8 = np.asarray(conf_u8, dtype=np.int64)
        ok = np.asarray(correct, dtype=bool)
        if u8.shape != ok.shape or u8.ndim != 1:
            raise ValueError("conf_u8 and correct must be 1-D of the same length")
        if u8.size and (u8.min() < 0 or u8.max() >= CONF_LEVELS):
            raise ValueError("conf_u8 must lie in 0..255")
        b = self.bin_of(u8)
        self.total += np.bincount(b, minlength=self.bins)
        self.correct += np.bincount(b[ok], minlength=self.bins)

    def add_counts(self, correct: IntArray, total: IntArray) -> None:
        """Merge another calibration's counts (same bins)."""
        if correct.shape != (self.bins,) or total.shape != (self.bins,):
            raise ValueError("counts must have one entry per bin")
        if np.any(correct < 0) or np.any(correct > total):
            raise ValueError("need 0 <= correct <= total")
        self.correct += correct
        self.total += total

    def probabilities(self, prior_mean: FloatArray) -> FloatArray:
        """Calibrated ``P(correct)`` per bin, shrunk towards ``prior_mean`` and made monotone."""
        if prior_mean.shape != (self.bins,):
            raise ValueError("one prior mean per bin")
        k = self.prior_strength
        weight = self.total + k
        shrunk = np.where(
            weight > 0,
            (self.correct + k * prior_mean) / np.where(weight > 0, weight, 1),
            prior_mean,
        )
        # bins without labels or prior weight take no part in the pooling but keep their value
        fitted = shrunk.copy()
        live = weight > 0
        if live.any():
            fitted[live] = pool_adjacent_violators(shrunk[live], weight[live])
        out: FloatArray = np.clip(fitted, 0.0, 1.0)
        return out

    def bin_midpoints(self) -> FloatArray:
        """Confidence at the centre of every bin."""
        width = CONF_LEVELS // self.bins
        out: FloatArray = (np.arange(self.bins) * width + 0.5 * width) / CONF_LEVELS
        return out


@dataclass(frozen=True, slots=True)
class AccuracyEstimate:
    """A window's estimated accuracy: an **estimate**, blind to concept shift."""

    estimate: float
    low: float
    high: float
    n_readings: int
    calibrated: bool
    """Whether labels calibrated it (``False``: raw confidence, the fallback)."""
    n_calibration_labels: int
    kind: Literal["estimate"] = "estimate"
    method: Literal["cbpe"] = "cbpe"

    def __str__(self) -> str:
        basis = (
            f"calibrated on {self.n_calibration_labels} labels"
            if self.calibrated
            else "raw confidence, no labels"
        )
        return (
            f"estimated accuracy {self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] "
            f"(CBPE, {basis}; an estimate, blind to concept shift)"
        )


def estimate_accuracy(
    conf_u8_counts: npt.ArrayLike,
    calibration: ConfidenceCalibration | None,
    z: float = DEFAULT_Z,
) -> AccuracyEstimate | None:
    """CBPE estimate for a window from its u8 confidence counts ``[256]``; ``None`` if empty.

    Without a calibration (or with one that has no labels) the estimate is the mean raw
    confidence.
    """
    counts = np.asarray(conf_u8_counts, dtype=np.float64)
    if counts.shape != (CONF_LEVELS,):
        raise ValueError("conf_u8_counts must have 256 entries")
    n = float(counts.sum())
    if n <= 0:
        return None
    cal = calibration if calibration is not None else ConfidenceCalibration()
    width = CONF_LEVELS // cal.bins
    per_bin = counts.reshape(cal.bins, width)
    n_k = per_bin.sum(axis=1)
    levels = np.arange(CONF_LEVELS, dtype=np.float64).reshape(cal.bins, width) / CONF_LEVELS
    raw = np.where(n_k > 0, (per_bin * levels).sum(axis=1) / np.where(n_k > 0, n_k, 1), 0.0)
    raw = np.where(n_k > 0, raw, cal.bin_midpoints())
    calibrated = cal.n_labels > 0
    p = cal.probabilities(raw) if calibrated else raw
    est = float((n_k * p).sum() / n)
    var_realised = float((n_k * p * (1.0 - p)).sum()) / n**2
    var_cal = float((((n_k / n) ** 2) * p * (1.0 - p) / (cal.total + cal.prior_strength + 1)).sum())
    half = z * float(np.sqrt(var_realised + var_cal))
    return AccuracyEstimate(
        estimate=est,
        low=max(0.0, est - half),
        high=min(1.0, est + half),
        n_readings=int(n),
        calibrated=calibrated,
        n_calibration_labels=cal.n_labels,
    )
