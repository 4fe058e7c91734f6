"""Layer B: windowed drift tests for one cohort, ``(fleet, model version)``.

:class:`CohortMonitor` accumulates exact fixed-bin histograms (``histograms``) per device and
window; :meth:`CohortMonitor.evaluate` closes the window and returns a :class:`CohortReport`.

Reference
---------
* **Cohort reference**: the cohort's first ``reference_windows`` windows with readings (default
  20, research drift-anchors §3.7: fewer reference chunks make mean ± 3σ thresholds fragile).
  Their pooled histograms are the baseline of the dashboard distances, their moment sums fit the
  PCA and its threshold (``pca_monitor``), their labels calibrate the accuracy estimate
  (``accuracy_estimate``).
* **Device reference**: each device's own counts over *its* first ``reference_windows`` windows
  with readings (the same windows for devices present from the start). Devices are tested
  against their own reference, not the cohort's: devices differ persistently (the simulated
  fleet's pocket roll, mount tilt, calibration and activity mix; real fleets the same), and a
  test against the pooled cohort distribution rejects for healthy devices: on 50 stationary
  simulated devices, 32 % of the device × signal tests had p < 0.01 against the pooled
  reference at 64 readings per window (62 % at 300) and Benjamini–Hochberg (the multiplicity
  step then used) discovered all 50 devices; against
  their own references, 0.8 % (0.4 %) and none. The pooled baseline answers "is this device
  unlike the fleet?", which is not drift.

Per-device test (every device × signal: each feature, the confidence, the class mix)
------------------------------------------------------------------------------------
1. **Cells.** A window of ``n`` readings is compared with the device reference (``m``
   readings) on cells made from the fixed bins: for the ordinal signals (features,
   confidence), adjacent bins are grouped into at most ``max_groups`` (10) groups of roughly
   equal reference probability (cut on the reference CDF), and any group whose expected count
   ``n · p`` is below ``min_expected`` (5, Cochran's rule) is merged into its neighbour; for the
   class mix, classes below ``min_expected`` are pooled into one cell. The cells depend only
   on the reference, never on the window being tested.
2. **Statistic.** The likelihood-ratio chi-square (G) statistic of homogeneity between the
   window and the reference over those ``K`` cells. It accounts for the reference's own sampling
   noise, and its upper tail follows χ² far better than Pearson's X² when some expected counts
   are small (Pearson's tail is Poisson-skewed: with an expected count of 5, an observed 20 has
   probability 3·10⁻⁷ but X² = 45 reads as 2·10⁻¹¹; G = 25.5 reads as 4·10⁻⁷).
3. **Null distribution, simulated for the window size.** After the grouping, the null of the
   statistic depends on the signal only through ``K`` and on the window only through ``n``, so
   one table per ``(K, n-bucket)`` serves every device and signal: ``null_draws`` (2,000)
   multinomial draws of ``n_b`` readings over ``K`` equally likely cells, ``n_b`` the geometric
   centre of the bucket (buckets are half-octaves of ``n``). Tables are generated on first use
   from a seed derived from ``(seed, K, bucket)`` and cached. p-value: the Monte-Carlo
   ``(1 + #{null ≥ x}) / (1 + draws)`` up to the simulated ``1 − tail_p`` quantile (95 %);
   beyond it, the χ²_{K−1} tail of ``x / scale`` with ``scale`` = simulated mean / (K − 1), the
   simulated counterpart of Williams' small-sample correction (on 1,000,000 fresh null draws
   over eight (K, n) pairs, this tail was unbiased at 10⁻³–10⁻⁵ with an rms error of a factor
   1.3; anchoring the tail at the simulated 95 % point instead was biased and noisier). The
   extrapolation is needed: 2,000 draws cannot give a p-value below 1/2001 = 5·10⁻⁴, while
   Holm's step-down over 50 devices × 10 signals needs 2·10⁻⁵ for its first discovery and
   over 10,000 devices 10⁻⁷.
4. **Readings within a device are not independent** (activities last minutes, a device sits
   in one place), which inflates the statistic relative to the i.i.d. null and would turn every
   long activity into a "drift". Each device's own reference windows measure that inflation:
   from its ``dispersion_min_window``-th (5th) reference window on, a window is tested against
   the device's reference so far; ``φ`` per signal is the median over devices and windows of
   ``statistic / null median`` (a histogram of its logarithm is kept, 0.05 wide), floored at
   1, and every later statistic is divided by it (a first-order, quasi-likelihood correction:
   it assumes the inflation scales the statistic; it is measured at the reference's window
   sizes). On the simulator, whose readings are independent, ``φ`` ≈ 1.
5. **Multiplicity: Holm's step-down** across all tested device × signal pairs of the window at
   family-wise error rate ``fwer_alpha`` (α, default 0.01): whatever the other devices do and
   however the tests depend on each other, the chance that the window discovers *any* device ×
   signal that did not drift is at most α. Benjamini–Hochberg, used before, controls the false
   discovery *rate*: its cut-off ``q·k/m`` rises with the ``k`` discoveries, so while many
   devices drift stationary ones are discovered too (2–6 false devices per run of
   ``tinydrift demo`` over five runs, 15 of 50 devices drifting). Holm's bar rises only from
   ``α/m`` to ``α/(m − k + 1)``. The property the rest relies on: a true null is discovered only
   if the smallest true-null p-value is ≤ ``α/m₀`` (``m₀`` true nulls; when the step-down
   reaches the first of them, at most ``m − m₀`` tests came before it), so a stationary device
   with ``S`` tested signals is discovered with probability ≤ ``S·α/m₀`` (≈ ``α/D₀`` with ``D₀``
   stationary devices of ``S`` signals), through an event that involves its own readings and
   reference only.
6. **Device alarm: a discovery in ``confirm_windows`` (2) consecutive windows.** α per window
   adds up over windows: a cohort of stationary devices would still show a false device about
   once per 100 windows (up to 14 a day with 1-minute windows; up to 0.25–0.5 per run of the
   demo, whose 5-second windows give a run 25–50 tested windows). A device's discoveries become
   device alarms only when the device was also discovered in the cohort's previous window (a
   window in which it is not tested breaks the run). Null probability: given its reference, a
   stationary device's two windows are independent readings, so by 5. it is discovered in both
   with probability ≤ ``c·(S·α/m₀)²``; ``c`` ≥ 1 because both windows are tested against the
   same reference, whose sampling noise (one window against 20) makes the two tails co-vary:
   conditional on the reference the window statistic is a scaled non-central χ², and at tail
   probabilities 10⁻⁵–10⁻⁶ this gives ``c`` = 1.1–1.2 for 10 cells, 1.5–1.8 for 2. Over the
   devices, the expected number of false device alarms per window is ≤ ``c·α²·S/m₀`` ≈
   ``2α²/D₀``: 4·10⁻⁶ for 50 stationary devices at α = 0.01, 0.006 a day with 1-minute windows,
   fewer with more devices. What it does not cover: a stationary device whose readings leave
   their usual range for longer than a window without drifting (a device left somewhere unusual
   for minutes) has dependent consecutive windows, and only the per-window bound α is left; the
   dispersion correction (4.) accounts for dependence within a window, not across windows. The
   cost is one window of delay: a device alarm comes with the second discovery. The cohort alarm
   counts every discovery, confirmed or not.

Cohort alarm
------------
``X`` = devices with at least one discovery in the window (confirmed or not) among the ``D``
tested. The alarm fires when ``X`` exceeds the upper ``1 − alpha_cohort`` quantile of
``Binom(D, α_device)`` with ``α_device = fwer_alpha`` and ``alpha_cohort`` = 0.001. Why: by 5.,
a stationary device is discovered only through an event of its own (one of its p-values ≤
``α/m₀``) of probability ≤ ``S·α/m₀`` ≤ α, and devices are tested independently of each other
(each against its own reference), so the number of falsely discovered devices is at most a sum
of independent Bernoulli variables of probability ≤ α: ``Binom(D, α)`` bounds it, a proof for
calibrated p-values and independent devices (under Benjamini–Hochberg, whose cut-off depends on
every device's tests, the binomial was only a model). The bound is loose on purpose: the
probabilities in fact sum to ≤ α over the cohort, and the slack is robustness to per-device
miscalibration (a few devices whose tests run hot): the cohort alarm means "more devices drift
than per-device errors explain", e.g. ≥ 5 of 50 devices, ≥ 22 of 1,000, ≥ 133 of 10,000. When
nothing drifts, it needs more discoveries in one window than the bound (measured: 0 alarms in
150 stationary windows of 200 devices, ``tests/bench/bench_cohort.py``). Devices with fewer than
``min_device_readings`` (32) readings in the window, or whose reference is not complete, are not
tested (and are counted in the report).

Detections in the report: one ``scope="device"``, ``detector="chi2"`` :class:`Detection` per
discovered device × signal of a device in alarm (score = statistic / the statistic at the Holm
cut-off), one ``scope="cohort"``, ``detector="cohort_binomial"`` when the cohort alarm fires
(score = ``X / (bound + 1)``; signal = the signal with most discovered devices), one
``scope="cohort"``, ``detector="pca"`` when the PCA reconstruction error exceeds its threshold.
``drifting_devices`` lists every discovered device, each with its run of consecutive windows and
whether it is in alarm. A device still drifting is reported again in every window (these are
window tests, not change points).

>>> from service.ingest.frames import DeviceFrame
>>> mon = CohortMonitor("f", 1, ["a", "b"], ["n", "p"], np.zeros(2, np.float32),
...                     np.ones(2, np.float32), CohortConfig(reference_windows=3))
>>> rng = np.random.default_rng(0)
>>> for w in range(4):
...     for d in range(3):
...         x = rng.normal(size=(64, 2))
...         mon.add(DeviceFrame("f", f"d{d}", 0, w, w, 0.0, 1, x, (x[:, 0] > 0).astype(np.int64),
...                             np.full(64, 0.75)))
...     report = mon.evaluate(now_ms=1000 * (w + 1))
>>> report.reference_complete, report.n_devices_tested, report.cohort_alarm
(True, 3, False)
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from edge_agent.fixedpoint.linear import QuantizedLinear, quantize_input
from service.drift.accuracy_estimate import (
    AccuracyEstimate,
    ConfidenceCalibration,
    estimate_accuracy,
)
from service.drift.checkpoint_format import CheckpointFormatError, add_header, check_header
from service.drift.detection import Detection, Signal
from service.drift.histograms import (
    CONF_LEVELS,
    HistogramLayout,
    bincount_rows,
    conf_to_u8,
    hellinger_distance,
    js_distance,
)
from service.drift.pca_monitor import MomentSums, PcaMonitor, ReservoirSample
from service.ingest.frames import DeviceFrame, DeviceLabels

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

STATE_MAGIC: Final = b"TDCM"
STATE_VERSION: Final = 2
"""Format 2 added the per-device run of windows with a discovery and renamed the config's
``fdr_q`` (Benjamini–Hochberg) to ``fwer_alpha`` (Holm); format 1 is still read."""
_READABLE_VERSIONS: Final = (1, STATE_VERSION)

_LOG_RATIO_LO: Final = -6.0
_LOG_RATIO_STEP: Final = 0.05
_LOG_RATIO_BINS: Final = 240  # log(statistic / null median) over [-6, 6)
_KEY: Final = 4096  # null-table key: cells * _KEY + n-bucket


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CohortConfig:
    """Layer B settings; the module docstring justifies each default."""

    reference_windows: int = 20
    """Windows in the cohort's (and each device's) reference; ≥ 20 recommended (≥ 3 needed)."""
    feature_bins: int = 32
    """Bins over the int8 feature range (divides 256): 0.25 σ each."""
    conf_bins: int = 16
    """Bins over the u8 confidence (divides 256); also the calibration bins of the estimate."""
    min_device_readings: int = 32
    """Readings a device needs in a window to be tested (two 16-reading frames; 6 cells of 5)."""
    min_expected: float = 5.0
    """Smallest expected count of a test cell (Cochran)."""
    max_groups: int = 10
    """Most cells an ordinal signal is grouped into."""
    null_draws: int = 2000
    """Simulated null statistics per (cells, n-bucket) table."""
    tail_p: float = 0.05
    """Beyond this simulated tail probability, p-values come from the scaled χ² tail."""
    fwer_alpha: float = 0.01
    """Family-wise error rate of Holm's step-down across a window's device × signal tests."""
    confirm_windows: int = 2
    """Consecutive windows with a discovery a device needs before it raises a device alarm
    (``chi2`` detections); 1 alarms on every discovery."""
    alpha_cohort: float = 0.001
    """Level of the binomial bound on the number of discovered devices."""
    dispersion: bool = True
    """Correct the statistics for within-device dependence measured on the reference."""
    dispersion_min_window: int = 5
    """A device's reference window index from which its windows measure the dispersion (at
    most ``reference_windows − 1``)."""
    dispersion_min_samples: int = 30
    """Measurements a signal needs before its dispersion factor is used."""
    pca_variance: float = 0.90
    """Share of the reference variance the PCA components keep."""
    pca_alpha: float = 0.00135
    """One-sided level of the PCA threshold (3σ-equivalent)."""
    pca_sample: int = 4096
    """Readings per window (uniform sample) whose mean reconstruction error is the window's."""
    accuracy_prior_strength: float = 10.0
    """Pseudo-labels shrinking each calibration bin towards the raw confidence."""
    accuracy_z: float = 1.96
    """Normal quantile of the accuracy estimate's interval (95 %)."""
    distance_pseudo_count: float = 0.5
    """Smoothing of the dashboard distances (Jeffreys)."""
    flush_readings: int = 65536
    """Buffered readings that trigger a vectorised accumulation."""
    seed: int = 0
    """Seed of the simulated null tables."""

    def __post_init__(self) -> None:
        checks = [
            (self.reference_windows >= 3, "reference_windows must be >= 3"),
            (self.min_expected >= 1.0, "min_expected must be >= 1"),
            (self.max_groups >= 2, "max_groups must be >= 2"),
            (
                self.min_device_readings >= 2 * self.min_expected,
                "min_device_readings must allow two cells (>= 2 * min_expected)",
            ),
            (self.null_draws >= 200, "null_draws must be >= 200"),
            (0.0 < self.fwer_alpha < self.tail_p < 0.5, "need 0 < fwer_alpha < tail_p < 0.5"),
            (self.confirm_windows >= 1, "confirm_windows must be >= 1"),
            (0.0 < self.alpha_cohort < 0.5, "alpha_cohort must be in (0, 0.5)"),
            (self.dispersion_min_window >= 1, "dispersion_min_window must be >= 1"),
            (self.dispersion_min_samples >= 1, "dispersion_min_samples must be >= 1"),
            (0.0 < self.pca_variance <= 1.0, "pca_variance must be in (0, 1]"),
            (0.0 < self.pca_alpha < 0.5, "pca_alpha must be in (0, 0.5)"),
            (self.pca_sample >= 16, "pca_sample must be >= 16"),
            (self.accuracy_prior_strength >= 0.0, "accuracy_prior_strength must be >= 0"),
            (self.accuracy_z > 0.0, "accuracy_z must be > 0"),
            (self.distance_pseudo_count >= 0.0, "distance_pseudo_count must be >= 0"),
            (self.flush_readings >= 1, "flush_readings must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        HistogramLayout(1, 2, self.feature_bins, self.conf_bins)  # bins must divide 256


# ------------------------------------------------------------------------------------------------
# The test machinery (module-level so it can be tested and benchmarked on its own)
# ------------------------------------------------------------------------------------------------


def group_cells(
    ref: IntArray,
    n: IntArray,
    *,
    ordinal: bool,
    min_expected: float,
    max_groups: int,
) -> tuple[IntArray, int]:
    """Cell of every bin, ``[N, B]``, from the reference counts ``ref`` ``[N, B]``.

    ``n`` ``[N]`` is each row's window size. Ordinal rows: up to ``max_groups`` groups of about
    equal reference probability (cut on the reference CDF before each bin), groups with
    expected count ``n · p < min_expected`` merged into the previous kept group (the first
    ones into the first kept group). Categorical rows: one cell per bin with
    ``n · p ≥ min_expected``, the rest pooled into cell ``B``, which joins the smallest kept
    cell if its own expected count is too small. Returns ``(cells, n_slots)``; every
    non-empty cell has expected count ≥ ``min_expected`` when ``n ≥ min_expected``. Rows with
    an empty reference put every bin in cell 0.
    """
    rows, bins = ref.shape
    m = ref.sum(axis=1)
    q = ref / np.where(m > 0, m, 1)[:, None]
    nn = n.astype(np.float64)[:, None]
    r_idx = np.arange(rows)[:, None]
    if ordinal:
        slots = max_groups
        target = np.clip(np.floor(n / min_expected), 1, max_groups).astype(np.int64)
        f_excl = np.cumsum(q, axis=1) - q
        gid = np.minimum(np.floor(f_excl * target[:, None] + 1e-9), target[:, None] - 1)
        gid = gid.astype(np.int64)
        mass = np.bincount(
            (gid + slots * r_idx).ravel(), weights=q.ravel(), minlength=rows * slots
        ).reshape(rows, slots)
        keep = mass * nn >= min_expected
        ar = np.broadcast_to(np.arange(slots), (rows, slots))
        ff = np.maximum.accumulate(np.where(keep, ar, -1), axis=1)
        first = np.argmax(keep, axis=1)
        ff = np.where(ff < 0, first[:, None], ff)
        cells = np.take_along_axis(ff, gid, axis=1)
    else:
        slots = bins + 1
        keep = q * nn >= min_expected
        rest_mass = np.where(keep, 0.0, q).sum(axis=1)
        rest_ok = rest_mass * n >= min_expected
        smallest = np.argmin(np.where(keep, q, np.inf), axis=1)
        ar = np.broadcast_to(np.arange(bins), (rows, bins))
        cells = np.where(keep, ar, bins)
        cells = np.where(~keep & ~rest_ok[:, None], smallest[:, None], cells)
    cells = np.where((m > 0)[:, None], cells, 0)
    return cells.astype(np.int64), slots


def g_statistic(
    obs: IntArray, ref: IntArray, cells: IntArray, n_slots: int
) -> tuple[FloatArray, IntArray]:
    """Likelihood-ratio (G) statistic of homogeneity between ``obs`` and ``ref`` rows.

    Bins are summed into ``cells`` (from :func:`group_cells`); returns the statistic and the
    number of cells with reference mass ``K`` per row (degrees of freedom ``K − 1``).

    >>> obs = np.array([[10, 10, 0, 0]]); ref = np.array([[100, 100, 100, 100]])
    >>> cells, slots = group_cells(ref, np.array([20]), ordinal=True, min_expected=5,
    ...                            max_groups=4)
    >>> g, k = g_statistic(obs, ref, cells, slots)
    >>> int(k[0]), round(float(g[0]), 2)
    (4, 26.77)
    """
    rows = obs.shape[0]
    idx = (cells + n_slots * np.arange(rows)[:, None]).ravel()
    a = np.bincount(idx, weights=obs.ravel().astype(np.float64), minlength=rows * n_slots)
    b = np.bincount(idx, weights=ref.ravel().astype(np.float64), minlength=rows * n_slots)
    a = a.reshape(rows, n_slots)
    b = b.reshape(rows, n_slots)
    n = a.sum(axis=1, keepdims=True)
    m = b.sum(axis=1, keepdims=True)
    tot = np.where(n + m > 0, n + m, 1.0)
    ea = n * (a + b) / tot
    eb = m * (a + b) / tot
    g = 2.0 * (
        special.xlogy(a, a / np.where(ea > 0, ea, 1.0)).sum(axis=1)
        + special.xlogy(b, b / np.where(eb > 0, eb, 1.0)).sum(axis=1)
    )
    k = (b > 0).sum(axis=1).astype(np.int64)
    return np.maximum(g, 0.0), k


def n_bucket(n: IntArray) -> IntArray:
    """Half-octave bucket of window sizes: ``floor(2 · log2(n))``."""
    out: IntArray = np.floor(2.0 * np.log2(np.maximum(n, 1))).astype(np.int64)
    return out


def bucket_size(bucket: int) -> int:
    """The window size a bucket's null is simulated at: its geometric centre."""
    centre: float = 2.0 ** ((bucket + 0.5) / 2.0)
    return max(1, round(centre))


@dataclass(frozen=True, slots=True, eq=False)
class NullTable:
    """Simulated null of the G statistic for ``k`` equally likely cells and ``n`` readings."""

    k: int
    n: int
    draws: FloatArray
    """Sorted simulated statistics."""
    x_switch: float
    """Simulated ``1 − tail_p`` quantile: beyond it, the scaled χ² tail."""
    p_switch: float
    scale: float
    """Simulated mean over ``k − 1``: the tail beyond the switch is ``χ²_{k−1}`` of
    ``x / scale`` (the simulated counterpart of Williams' correction)."""
    median: float

    @classmethod
    def simulate(cls, k: int, n: int, draws: int, tail_p: float, seed: int) -> NullTable:
        """Draw ``draws`` multinomial windows of ``n`` readings over ``k`` cells (``k ≥ 2``)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, k, n]))
        a = rng.multinomial(n, np.full(k, 1.0 / k), size=draws).astype(np.float64)
        e = n / k
        g = np.sort(2.0 * special.xlogy(a, a / e).sum(axis=1))
        idx = min(draws - 1, math.ceil((1.0 - tail_p) * draws) - 1)
        x_sw = float(g[idx])
        p_sw = float((1 + draws - np.searchsorted(g, x_sw, side="left")) / (draws + 1))
        mean = float(g.mean())
        scale = mean / (k - 1) if mean > 0 else 1.0
        return cls(k, n, g, x_sw, p_sw, scale, float(np.median(g)))

    def p_values(self, x: FloatArray) -> FloatArray:
        """Monte-Carlo p-values (with the +1 correction) up to the switch, scaled χ² beyond."""
        d = self.draws.shape[0]
        emp = (1.0 + d - np.searchsorted(self.draws, x, side="left")) / (d + 1.0)
        tail = stats.chi2.sf(x / self.scale, self.k - 1)
        out: FloatArray = np.where(x > self.x_switch, np.minimum(tail, self.p_switch), emp)
        return out

    def critical(self, p: float) -> float:
        """The statistic whose p-value is ``p`` (for ``p < p_switch``: in the scaled tail)."""
        if p >= self.p_switch:
            d = self.draws.shape[0]
            idx = min(d - 1, max(0, math.ceil(d + 1 - p * (d + 1)) - 1))
            return float(self.draws[idx])
        return float(self.scale * stats.chi2.isf(p, self.k - 1))


def holm(p: FloatArray, alpha: float) -> tuple[BoolArray, float]:
    """Holm's step-down at family-wise error rate ``alpha``: which p-values are discoveries,
    and the p-value cut-off.

    The sorted p-values are compared with ``alpha / n``, ``alpha / (n − 1)``, …, ``alpha``; the
    discoveries are those before the first that exceeds its bar. With ``k`` discoveries they are
    exactly the p-values ``≤ alpha / (n − k + 1)`` (the cut-off; 0 without discoveries). The
    chance of any discovery among the true nulls is at most ``alpha`` under any dependence.

    >>> d, cut = holm(np.array([0.001, 0.02, 0.03, 0.5]), 0.1)
    >>> d.tolist(), round(cut, 6)
    ([True, True, True, False], 0.05)
    >>> holm(np.array([0.001, 0.02, 0.03, 0.5]), 0.05)[0].tolist()
    [True, False, False, False]
    """
    n = p.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool), 0.0
    order = np.sort(p)
    above = np.flatnonzero(order > alpha / (n - np.arange(n)))
    k = int(above[0]) if above.size else n
    if k == 0:
        return np.zeros(n, dtype=bool), 0.0
    cut = alpha / (n - k + 1)
    return p <= cut, float(cut)


def binomial_bound(n_devices: int, alpha_device: float, alpha_cohort: float) -> int:
    """Smallest ``k`` with ``P(Binom(n_devices, alpha_device) > k) ≤ alpha_cohort``.

    >>> binomial_bound(50, 0.01, 0.001), binomial_bound(1000, 0.01, 0.001)
    (4, 21)
    """
    if n_devices <= 0:
        return 0
    k: float = float(stats.binom.ppf(1.0 - alpha_cohort, n_devices, alpha_device))
    return int(k)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalDrift:
    """One discovery of a device (Holm, in this window)."""

    signal: Signal
    feature: str | None
    statistic: float
    """G statistic after the dispersion correction."""
    cells: int
    p_value: float
    score: float
    """Statistic over the statistic at the window's Holm cut-off (≥ 1)."""


@dataclass(frozen=True, slots=True)
class DeviceDrift:
    """A device with at least one discovery in the window."""

    device: str
    readings: int
    """Readings of the device in the window."""
    signals: tuple[SignalDrift, ...]
    """The window's discoveries."""
    consecutive_windows: int = 1
    """Windows in a row, this one included, in which the device had a discovery."""
    alarm: bool = False
    """``consecutive_windows ≥ confirm_windows``: the discoveries are device alarms (``chi2``
    detections); before that they count towards the cohort alarm only."""


@dataclass(frozen=True, slots=True)
class CohortReport:
    """What one window of one cohort showed. Distances are ``None`` until the reference is
    complete; the accuracy is an **estimate** (``accuracy.kind == "estimate"``)."""

    fleet: str
    model_version: int
    window_index: int
    window_start_ms: int
    window_end_ms: int
    reference_complete: bool
    """Whether the cohort reference was complete when this window was evaluated (a window that
    completes the reference is still a reference window)."""
    reference_windows_done: int
    n_devices: int
    """Devices with readings in the window."""
    n_devices_tested: int
    n_devices_below_min: int
    """Devices with a complete reference but fewer than ``min_device_readings`` readings."""
    n_devices_in_reference: int
    """Devices whose own reference this window was part of."""
    n_readings: int
    n_tests: int
    feature_js: dict[str, float]
    feature_hellinger: dict[str, float]
    conf_js: float | None
    conf_hellinger: float | None
    class_js: float | None
    class_hellinger: float | None
    class_ratios: dict[str, float]
    mean_confidence: float | None
    drifting_devices: tuple[DeviceDrift, ...]
    cutoff: float
    """p-value cut-off of the window's Holm step-down (0 without discoveries): every
    discovery's p-value is at or below it, every other test's above."""
    dispersion: dict[str, float]
    """Dispersion factor ``φ`` per signal (``feature`` names, ``confidence``, ``class_mix``)."""
    cohort_alarm: bool
    cohort_bound: int
    """Discovered devices tolerated: the alarm needs more than this."""
    pca_error: float | None
    pca_threshold: float | None
    accuracy: AccuracyEstimate | None
    labelled_accuracy: float | None
    """Share correct among the labels that arrived in this window (realised, not estimated)."""
    n_labels: int
    detections: tuple[Detection, ...]
    rejected_frames: int = 0
    """Frames refused in this window (values out of range)."""
    devices_discovered: int = 0
    """Devices with at least one discovery (``len(drifting_devices)``)."""
    devices_alarmed: int = 0
    """Discovered devices whose discovery is confirmed (``alarm``): those with detections."""


# ------------------------------------------------------------------------------------------------
# The monitor
# ------------------------------------------------------------------------------------------------


class CohortMonitor:
    """Layer B for one cohort. Not thread-safe: one owner calls ``add``/``evaluate``.

    ``mu``/``inv_sigma`` are the model's input normalisation (float32, as in the parameter
    set): features are binned on the device's own int8 grid. ``model`` (optional, keyword) is the
    cohort's integer model; with it, labelled readings get their confidence back by re-running
    the device's exact inference on the features they carry, which is what the accuracy
    calibration needs (label batches carry no confidence). Without it, labels still give the
    labelled accuracy, and the estimate falls back to the raw confidence.
    """

    def __init__(
        self,
        fleet: str,
        model_version: int,
        feature_names: Sequence[str],
        class_names: Sequence[str],
        mu: npt.ArrayLike,
        inv_sigma: npt.ArrayLike,
        config: CohortConfig | None = None,
        *,
        model: QuantizedLinear | None = None,
    ) -> None:
        self.config = config if config is not None else CohortConfig()
        cfg = self.config
        self.fleet = fleet
        self.model_version = int(model_version)
        self.feature_names = tuple(feature_names)
        self.class_names = tuple(class_names)
        self.layout = HistogramLayout(
            len(self.feature_names), len(self.class_names), cfg.feature_bins, cfg.conf_bins
        )
        f = self.layout.n_features
        self.mu: F32Array = np.asarray(mu, dtype=np.float32).copy()
        self.inv_sigma: F32Array = np.asarray(inv_sigma, dtype=np.float32).copy()
        if self.mu.shape != (f,) or self.inv_sigma.shape != (f,):
            raise ValueError(f"mu and inv_sigma need {f} entries")
        if not (np.all(np.isfinite(self.mu)) and np.all(np.isfinite(self.inv_sigma))):
            raise ValueError("mu and inv_sigma must be finite")
        if model is not None and (
            model.n_features != f or model.n_classes != self.layout.n_classes
        ):
            raise ValueError("model does not match the cohort's features and classes")
        self.model = model
        w = self.layout.width
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._cur = np.zeros((0, w), dtype=np.int64)
        self._ref = np.zeros((0, w), dtype=np.int64)
        self._ref_windows = np.zeros(0, dtype=np.int64)
        self._readings = np.zeros(0, dtype=np.int64)
        self._disc_run = np.zeros(0, dtype=np.int64)
        """Per device: consecutive windows, up to the last evaluated, with a discovery."""
        self._pending: list[tuple[int, DeviceFrame]] = []
        self._pending_n = 0
        self._win_conf_u8 = np.zeros(CONF_LEVELS, dtype=np.int64)
        self._win_moments = MomentSums.zeros(f)
        self._rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
        self._win_sample = ReservoirSample(cfg.pca_sample, f, self._rng)
        self._win_lbl_correct = np.zeros(cfg.conf_bins, dtype=np.int64)
        self._win_lbl_total = np.zeros(cfg.conf_bins, dtype=np.int64)
        self._win_lbl_n = 0
        self._win_lbl_ok = 0
        self._win_rejected = 0
        self._win_first_ts: int | None = None
        self._ref_pooled = np.zeros(w, dtype=np.int64)
        self._ref_count = 0
        self._complete = False
        self._pca = PcaMonitor(f, cfg.pca_variance, cfg.pca_alpha)
        self._calibration = ConfidenceCalibration(cfg.conf_bins, cfg.accuracy_prior_strength)
        self._disp = np.zeros((self.layout.n_signals, _LOG_RATIO_BINS), dtype=np.int64)
        self._nulls: dict[tuple[int, int], NullTable] = {}
        self._window_index = 0
        self._window_start_ms: int | None = None
        self._total_readings = 0
        self.rejected_frames = 0
        """Frames refused since creation (shape or value errors)."""
        self.label_pred_mismatches = 0
        """Labelled readings whose re-run prediction differs from the one they carry."""
        self.rejected_label_batches = 0
        """Label batches dropped (unknown classes, shapes, non-finite features)."""
        self.last_p_values: FloatArray = np.zeros((0, self.layout.n_signals))
        """p-values of the last evaluated window, ``[tested devices, signals]`` (NaN: untestable
        signal), for diagnostics and calibration checks."""
        self.last_tested: list[str] = []
        """Devices of :attr:`last_p_values`' rows."""

    # -- properties ------------------------------------------------------------------------------

    @property
    def reference_complete(self) -> bool:
        """Whether the cohort reference windows are all seen."""
        return self._complete

    @property
    def n_devices(self) -> int:
        """Devices ever seen in this cohort."""
        return len(self._ids)

    @property
    def total_readings(self) -> int:
        """Readings accumulated since creation (flushed or pending)."""
        return self._total_readings

    def signal_names(self) -> list[tuple[Signal, str | None]]:
        """``(signal, feature)`` of each histogram signal, in layout order."""
        out: list[tuple[Signal, str | None]] = [("feature", name) for name in self.feature_names]
        out.append(("confidence", None))
        out.append(("class_mix", None))
        return out

    def _signal_label(self, s: int) -> str:
        sig, feat = self.signal_names()[s]
        return feat if feat is not None else sig

    # -- ingest ------------------------------------------------------------------------------------

    def _row(self, device: str) -> int:
        i = self._index.get(device)
        if i is not None:
            return i
        i = len(self._ids)
        self._ids.append(device)
        self._index[device] = i
        if i >= self._cur.shape[0]:
            cap = max(64, 2 * self._cur.shape[0])
            w = self.layout.width
            self._cur = _grow(self._cur, (cap, w))
            self._ref = _grow(self._ref, (cap, w))
            self._ref_windows = _grow(self._ref_windows, (cap,))
            self._readings = _grow(self._readings, (cap,))
            self._disc_run = _grow(self._disc_run, (cap,))
        return i

    def add(self, frame: DeviceFrame) -> None:
        """Buffer one telemetry frame of this cohort (``ValueError`` for another cohort).

        Frames are accumulated in vectorised batches of ``flush_readings`` readings (and at
        :meth:`evaluate`); a frame whose shapes are wrong is refused here, one whose values are
        out of range (non-finite features, confidence outside [0, 1], unknown class) is
        dropped at accumulation and counted in ``rejected_frames``.
        """
        self.add_frames((frame,))

    def add_frames(self, frames: Sequence[DeviceFrame]) -> None:
        """:meth:`add` for each frame, in order (the same buffering and flushes)."""
        n_features = self.layout.n_features
        flush_at = self.config.flush_readings
        fleet, version, index = self.fleet, self.model_version, self._index
        for frame in frames:
            if frame.fleet != fleet or frame.param_version != version:
                raise ValueError(
                    f"frame of ({frame.fleet}, v{frame.param_version}) given to the monitor of "
                    f"({self.fleet}, v{self.model_version})"
                )
            k = frame.pred.shape[0]
            if frame.features.shape != (k, n_features) or frame.conf.shape != (k,):
                self.rejected_frames += 1
                self._win_rejected += 1
                continue
            if k == 0:
                continue
            row = index.get(frame.device)
            if row is None:
                row = self._row(frame.device)
            self._pending.append((row, frame))
            self._pending_n += k
            self._total_readings += k
            if self._win_first_ts is None:
                self._win_first_ts = frame.ts_ms
            if self._pending_n >= flush_at:
                self._flush()

    def add_labels(self, labels: DeviceLabels) -> None:
        """Count one label batch in the window (and, during the reference, the calibration).

        ``ValueError`` for a batch of another cohort; a batch with unknown classes, mismatched
        shapes or non-finite features is dropped and counted in ``rejected_label_batches``.
        """
        if labels.fleet != self.fleet or labels.param_version != self.model_version:
            raise ValueError(
                f"label batch of ({labels.fleet}, v{labels.param_version}) given to the monitor "
                f"of ({self.fleet}, v{self.model_version})"
            )
        k = labels.k
        if k == 0:
            return
        label = np.asarray(labels.label, dtype=np.int64)
        pred = np.asarray(labels.pred, dtype=np.int64)
        x = np.asarray(labels.features, dtype=np.float64)
        c = self.layout.n_classes
        if (
            pred.shape != (k,)
            or x.shape != (k, self.layout.n_features)
            or min(label.min(), pred.min()) < 0
            or max(label.max(), pred.max()) >= c
            or not np.all(np.isfinite(x))
        ):
            self.rejected_label_batches += 1
            return
        correct = pred == label
        self._win_lbl_n += k
        self._win_lbl_ok += int(correct.sum())
        if self.model is not None:
            logits = self.model.logits(x)
            self.label_pred_mismatches += int(np.sum(self.model.decide(logits) != pred))
            u8 = self.model.confidence(logits).astype(np.int64)
            b = u8 // (CONF_LEVELS // self.config.conf_bins)
            self._win_lbl_total += np.bincount(b, minlength=self.config.conf_bins)
            self._win_lbl_correct += np.bincount(b[correct], minlength=self.config.conf_bins)

    def _flush(self) -> None:
        """Accumulate the buffered frames in one vectorised pass."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        self._pending_n = 0
        try:
            self._accumulate(pending)
        except ValueError:
            for item in pending:  # isolate the bad frames; keep the good ones
                try:
                    self._accumulate([item])
                except ValueError:
                    k = item[1].k
                    self.rejected_frames += 1
                    self._win_rejected += 1
                    self._total_readings -= k

    def _accumulate(self, items: list[tuple[int, DeviceFrame]]) -> None:
        lay = self.layout
        dev = np.repeat(
            np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items)),
            np.fromiter((fr.pred.shape[0] for _, fr in items), dtype=np.int64, count=len(items)),
        )
        x = np.concatenate([fr.features for _, fr in items]).astype(np.float64, copy=False)
        pred = np.concatenate([fr.pred for _, fr in items]).astype(np.int64, copy=False)
        conf = np.concatenate([fr.conf for _, fr in items])
        q = quantize_input(x, self.mu, self.inv_sigma)  # ValueError: non-finite
        u8 = conf_to_u8(conf)  # ValueError: outside [0, 1]
        cols = lay.columns(q, u8, pred)  # ValueError: unknown class
        uniq, inv = np.unique(dev, return_inverse=True)
        block = bincount_rows(cols, inv.astype(np.int64), uniq.shape[0], lay.width)
        self._cur[uniq] += block
        self._readings[uniq] += block[:, lay.class_offset :].sum(axis=1)
        self._win_conf_u8 += np.bincount(u8, minlength=CONF_LEVELS)
        z = (x - self.mu.astype(np.float64)) * self.inv_sigma.astype(np.float64)
        self._win_moments = self._win_moments + MomentSums.of(z)
        self._win_sample.add(z)

    # -- evaluation --------------------------------------------------------------------------------

    def _null(self, k: int, bucket: int) -> NullTable:
        key = (k, bucket)
        table = self._nulls.get(key)
        if table is None:
            cfg = self.config
            table = NullTable.simulate(k, bucket_size(bucket), cfg.null_draws, cfg.tail_p, cfg.seed)
            self._nulls[key] = table
        return table

    def _statistics(
        self, rows: IntArray, ref: IntArray, n: IntArray
    ) -> tuple[FloatArray, IntArray]:
        """G statistic and cells ``[len(rows), S]`` of the current window against ``ref``."""
        lay = self.layout
        cfg = self.config
        cur = self._cur[rows]
        nr = rows.shape[0]
        f, fb = lay.n_features, lay.feature_bins
        g = np.zeros((nr, lay.n_signals))
        k = np.zeros((nr, lay.n_signals), dtype=np.int64)
        parts = [
            (slice(0, f), f, fb, slice(0, lay.conf_offset), True),
            (slice(f, f + 1), 1, lay.conf_bins, slice(lay.conf_offset, lay.class_offset), True),
            (slice(f + 1, f + 2), 1, lay.n_classes, slice(lay.class_offset, lay.width), False),
        ]
        for sig, n_sig, bins, cols, ordinal in parts:
            obs = cur[:, cols].reshape(nr * n_sig, bins)
            rf = ref[:, cols].reshape(nr * n_sig, bins)
            nn = np.repeat(n, n_sig)
            cells, slots = group_cells(
                rf, nn, ordinal=ordinal, min_expected=cfg.min_expected, max_groups=cfg.max_groups
            )
            gs, ks = g_statistic(obs, rf, cells, slots)
            g[:, sig] = gs.reshape(nr, n_sig)
            k[:, sig] = ks.reshape(nr, n_sig)
        return g, k

    def dispersion_factors(self) -> FloatArray:
        """Current ``φ`` per signal (1 where too few measurements or dispersion is off)."""
        out = np.ones(self.layout.n_signals)
        if not self.config.dispersion:
            return out
        totals = self._disp.sum(axis=1)
        for s in range(self.layout.n_signals):
            if totals[s] < self.config.dispersion_min_samples:
                continue
            cum = np.cumsum(self._disp[s])
            half = 0.5 * float(totals[s])
            b = int(np.searchsorted(cum, half))
            before = float(cum[b - 1]) if b > 0 else 0.0
            frac = (half - before) / float(self._disp[s, b])  # linear within the bin
            log_med = _LOG_RATIO_LO + (b + frac) * _LOG_RATIO_STEP
            out[s] = max(1.0, math.exp(log_med))
        return out

    def _measure_dispersion(self, rows: IntArray, n: IntArray) -> None:
        """Add ``log(statistic / null median)`` of reference windows to the dispersion counts."""
        g, k = self._statistics(rows, self._ref[rows], n)
        bkt = np.broadcast_to(n_bucket(n)[:, None], k.shape)
        valid = k >= 2
        med = np.ones_like(g)
        keys = np.where(valid, k * _KEY + bkt, -1)
        for key in np.unique(keys[valid]).tolist():
            med[keys == key] = self._null(key // _KEY, key % _KEY).median
        with np.errstate(divide="ignore"):
            lr = np.log(g / np.where(med > 0, med, 1.0))
        b = np.clip(np.floor((lr - _LOG_RATIO_LO) / _LOG_RATIO_STEP), 0, _LOG_RATIO_BINS - 1)
        sig = np.broadcast_to(np.arange(self.layout.n_signals)[None, :], k.shape)
        flat = (sig * _LOG_RATIO_BINS + b.astype(np.int64))[valid]
        self._disp += np.bincount(flat, minlength=self._disp.size).reshape(self._disp.shape)

    def evaluate(self, now_ms: int) -> CohortReport:
        """Close the current window at ``now_ms``, test it, and start the next one."""
        self._flush()
        cfg = self.config
        lay = self.layout
        nd = len(self._ids)
        cur = self._cur[:nd]
        n_dev = cur[:, lay.class_offset :].sum(axis=1)
        reporting = n_dev > 0
        n_readings = int(n_dev.sum())
        pooled = cur.sum(axis=0)
        was_complete = self._complete
        start = self._window_start_ms
        if start is None:
            start = self._win_first_ts if self._win_first_ts is not None else now_ms

        # -- cohort level ------------------------------------------------------------------
        feature_js: dict[str, float] = {}
        feature_hel: dict[str, float] = {}
        conf_js = conf_hel = class_js = class_hel = None
        pca_error: float | None = None
        pca_alarm = False
        pca_score = 0.0
        accuracy: AccuracyEstimate | None = None
        if n_readings > 0 and not was_complete:
            self._ref_pooled += pooled
            self._pca.add_reference(self._win_moments, self._win_sample.rows)
            self._calibration.add_counts(self._win_lbl_correct, self._win_lbl_total)
            self._ref_count += 1
            if self._ref_count >= cfg.reference_windows:
                self._pca.fit()
                self._complete = True
        elif n_readings > 0:
            pc = cfg.distance_pseudo_count
            ref_h = self._ref_pooled
            fb, f = lay.feature_bins, lay.n_features
            cur_f = pooled[: lay.conf_offset].reshape(f, fb)
            ref_f = ref_h[: lay.conf_offset].reshape(f, fb)
            js_f = np.atleast_1d(js_distance(cur_f, ref_f, pc))
            hel_f = np.atleast_1d(hellinger_distance(cur_f, ref_f, pc))
            feature_js = {nm: float(v) for nm, v in zip(self.feature_names, js_f, strict=True)}
            feature_hel = {nm: float(v) for nm, v in zip(self.feature_names, hel_f, strict=True)}
            cs = slice(lay.conf_offset, lay.class_offset)
            ks = slice(lay.class_offset, lay.width)
            conf_js = float(js_distance(pooled[cs], ref_h[cs], pc))
            conf_hel = float(hellinger_distance(pooled[cs], ref_h[cs], pc))
            class_js = float(js_distance(pooled[ks], ref_h[ks], pc))
            class_hel = float(hellinger_distance(pooled[ks], ref_h[ks], pc))
            res = self._pca.evaluate(self._win_sample.rows)
            if res is not None:
                pca_error, pca_alarm, pca_score = res.error, res.alarm, res.score
            accuracy = estimate_accuracy(self._win_conf_u8, self._calibration, cfg.accuracy_z)
        class_ratios: dict[str, float] = {}
        mean_conf: float | None = None
        if n_readings > 0:
            cls_counts = pooled[lay.class_offset :]
            class_ratios = {
                nm: float(c) / n_readings
                for nm, c in zip(self.class_names, cls_counts.tolist(), strict=True)
            }
            mean_conf = float(
                (self._win_conf_u8 * np.arange(CONF_LEVELS)).sum() / (CONF_LEVELS * n_readings)
            )

        # -- device level ------------------------------------------------------------------
        ref_win = self._ref_windows[:nd]
        complete_dev = reporting & (ref_win >= cfg.reference_windows)
        tested = complete_dev & (n_dev >= cfg.min_device_readings)
        below_min = complete_dev & ~tested
        in_ref = reporting & ~complete_dev
        if cfg.dispersion:
            first = min(cfg.dispersion_min_window, cfg.reference_windows - 1)
            measure = in_ref & (ref_win >= first)
            measure &= n_dev >= cfg.min_device_readings
            rows_m = np.flatnonzero(measure)
            if rows_m.size:
                self._measure_dispersion(rows_m, n_dev[rows_m])
        phi = self.dispersion_factors()
        rows_t = np.flatnonzero(tested)
        drifting: list[DeviceDrift] = []
        detections: list[Detection] = []
        n_tests = 0
        cut = 0.0
        bound = binomial_bound(int(rows_t.size), cfg.fwer_alpha, cfg.alpha_cohort)
        n_disc_dev = 0
        n_alarm_dev = 0
        cohort_alarm = False
        run = np.zeros(nd, dtype=np.int64)  # consecutive windows with a discovery, this one incl.
        self.last_p_values = np.zeros((0, lay.n_signals))
        self.last_tested = []
        if rows_t.size:
            n_t = n_dev[rows_t]
            g, k = self._statistics(rows_t, self._ref[rows_t], n_t)
            x = g / phi[None, :]
            valid = k >= 2
            p = np.ones_like(x)
            bkt = np.broadcast_to(n_bucket(n_t)[:, None], k.shape)
            keys = np.where(valid, k * _KEY + bkt, -1)
            for key in np.unique(keys[valid]).tolist():
                sel = keys == key
                p[sel] = self._null(key // _KEY, key % _KEY).p_values(x[sel])
            n_tests = int(valid.sum())
            self.last_p_values = np.where(valid, p, np.nan)
            self.last_tested = [self._ids[i] for i in rows_t.tolist()]
            disc_flat, cut = holm(p[valid], cfg.fwer_alpha)
            disc = np.zeros_like(valid)
            disc[valid] = disc_flat
            disc_rows = rows_t[disc.any(axis=1)]
            run[disc_rows] = self._disc_run[disc_rows] + 1
            names = self.signal_names()
            sig_counter: Counter[tuple[Signal, str | None]] = Counter()
            for r in np.flatnonzero(disc.any(axis=1)).tolist():
                d_row = int(rows_t[r])
                device = self._ids[d_row]
                alarm = bool(run[d_row] >= cfg.confirm_windows)
                n_alarm_dev += alarm
                found: list[SignalDrift] = []
                for s in np.flatnonzero(disc[r]).tolist():
                    table = self._null(int(k[r, s]), int(bkt[r, s]))
                    crit = table.critical(cut)
                    score = float(x[r, s] / crit) if crit > 0 else float("inf")
                    sig, feat = names[s]
                    found.append(
                        SignalDrift(sig, feat, float(x[r, s]), int(k[r, s]), float(p[r, s]), score)
                    )
                    sig_counter[(sig, feat)] += 1
                    if not alarm:
                        continue
                    detections.append(
                        Detection(
                            fleet=self.fleet,
                            device=device,
                            scope="device",
                            signal=sig,
                            feature=feat,
                            detector="chi2",
                            score=score,
                            model_version=self.model_version,
                            ts_ms=int(now_ms),
                            readings=int(self._readings[d_row]),
                        )
                    )
                drifting.append(
                    DeviceDrift(device, int(n_dev[d_row]), tuple(found), int(run[d_row]), alarm)
                )
            n_disc_dev = len(drifting)
            cohort_alarm = n_disc_dev > bound
            if cohort_alarm:
                (sig, feat), _ = sig_counter.most_common(1)[0]
                detections.append(
                    Detection(
                        fleet=self.fleet,
                        device=None,
                        scope="cohort",
                        signal=sig,
                        feature=feat,
                        detector="cohort_binomial",
                        score=n_disc_dev / (bound + 1),
                        model_version=self.model_version,
                        ts_ms=int(now_ms),
                        readings=self._total_readings,
                    )
                )
        if pca_alarm:
            detections.append(
                Detection(
                    fleet=self.fleet,
                    device=None,
                    scope="cohort",
                    signal="multivariate",
                    feature=None,
                    detector="pca",
                    score=pca_score,
                    model_version=self.model_version,
                    ts_ms=int(now_ms),
                    readings=self._total_readings,
                )
            )
        self._disc_run[:nd] = run  # a device not discovered in this window starts again
        # device references advance after the tests (a reference window is never tested)
        rows_r = np.flatnonzero(in_ref)
        self._ref[rows_r] += cur[rows_r]
        self._ref_windows[rows_r] += 1

        report = CohortReport(
            fleet=self.fleet,
            model_version=self.model_version,
            window_index=self._window_index,
            window_start_ms=int(start),
            window_end_ms=int(now_ms),
            reference_complete=was_complete,
            reference_windows_done=self._ref_count,
            n_devices=int(reporting.sum()),
            n_devices_tested=int(rows_t.size),
            n_devices_below_min=int(below_min.sum()),
            n_devices_in_reference=int(in_ref.sum()),
            n_readings=n_readings,
            n_tests=n_tests,
            feature_js=feature_js,
            feature_hellinger=feature_hel,
            conf_js=conf_js,
            conf_hellinger=conf_hel,
            class_js=class_js,
            class_hellinger=class_hel,
            class_ratios=class_ratios,
            mean_confidence=mean_conf,
            drifting_devices=tuple(drifting),
            cutoff=cut,
            dispersion={self._signal_label(s): float(v) for s, v in enumerate(phi)},
            cohort_alarm=cohort_alarm,
            cohort_bound=bound,
            pca_error=pca_error,
            pca_threshold=self._pca.threshold if was_complete else None,
            accuracy=accuracy,
            labelled_accuracy=(self._win_lbl_ok / self._win_lbl_n) if self._win_lbl_n else None,
            n_labels=self._win_lbl_n,
            detections=tuple(detections),
            rejected_frames=self._win_rejected,
            devices_discovered=n_disc_dev,
            devices_alarmed=n_alarm_dev,
        )
        self._reset_window(now_ms)
        return report

    def _reset_window(self, now_ms: int) -> None:
        self._cur[:] = 0
        self._win_conf_u8[:] = 0
        self._win_moments = MomentSums.zeros(self.layout.n_features)
        self._win_sample.clear()
        self._win_lbl_correct[:] = 0
        self._win_lbl_total[:] = 0
        self._win_lbl_n = 0
        self._win_lbl_ok = 0
        self._win_rejected = 0
        self._win_first_ts = None
        self._window_index += 1
        self._window_start_ms = int(now_ms)

    # -- checkpoint ------------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """A versioned snapshot (``TDCM`` v2): buffered frames are accumulated first.

        numpy ``.npz`` (no pickle) of the counts and sums, with the identity, configuration
        and device ids as JSON. Simulated null tables are not stored (regenerated from the
        seed), nor the model (give it again to :meth:`from_state_bytes`).
        """
        self._flush()
        nd = len(self._ids)
        pca = self._pca.state()
        samples: list[FloatArray] = pca["samples"]
        f = self.layout.n_features
        meta = {
            "fleet": self.fleet,
            "model_version": self.model_version,
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "config": asdict(self.config),
            "devices": self._ids,
            "ref_count": self._ref_count,
            "complete": self._complete,
            "window_index": self._window_index,
            "window_start_ms": self._window_start_ms,
            "win_first_ts": self._win_first_ts,
            "total_readings": self._total_readings,
            "rejected_frames": self.rejected_frames,
            "label_pred_mismatches": self.label_pred_mismatches,
            "rejected_label_batches": self.rejected_label_batches,
            "win_lbl_n": self._win_lbl_n,
            "win_lbl_ok": self._win_lbl_ok,
            "win_rejected": self._win_rejected,
            "win_n": self._win_moments.n,
            "win_sample_seen": self._win_sample.seen,
            "rng": self._rng.bit_generator.state,
            "pca_n": pca["n"],
            "pca_fitted": pca["fitted"],
        }
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "mu": self.mu,
            "inv_sigma": self.inv_sigma,
            "cur": self._cur[:nd],
            "ref": self._ref[:nd],
            "ref_windows": self._ref_windows[:nd],
            "readings": self._readings[:nd],
            "disc_run": self._disc_run[:nd],
            "ref_pooled": self._ref_pooled,
            "win_conf_u8": self._win_conf_u8,
            "win_s1": self._win_moments.s1,
            "win_s2": self._win_moments.s2,
            "win_lbl_correct": self._win_lbl_correct,
            "win_lbl_total": self._win_lbl_total,
            "cal_correct": self._calibration.correct,
            "cal_total": self._calibration.total,
            "disp": self._disp,
            "win_sample_rows": self._win_sample.rows,
            "win_sample_keys": self._win_sample.keys,
            "pca_s1": pca["s1"],
            "pca_s2": pca["s2"],
            "pca_samples": np.concatenate(samples) if samples else np.zeros((0, f)),
            "pca_sample_sizes": np.array([x.shape[0] for x in samples], dtype=np.int64),
            "pca_errors": pca["reference_errors"],
        }
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return add_header(STATE_MAGIC, STATE_VERSION, buf.getvalue())

    @classmethod
    def from_state_bytes(
        cls, data: bytes, *, model: QuantizedLinear | None = None
    ) -> CohortMonitor:
        """Restore a monitor from :meth:`state_bytes` (format 2, or 1 of the previous release).

        ``CheckpointFormatError`` for another kind or version of blob, or a damaged one.
        """
        found = data[4:6]
        version = next(
            (v for v in _READABLE_VERSIONS if found == v.to_bytes(2, "big")), STATE_VERSION
        )
        payload = check_header(data, STATE_MAGIC, version)
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                arr = {k: z[k] for k in z.files}
            meta = json.loads(arr["meta"].tobytes().decode())
            conf = dict(meta["config"])
            if "fdr_q" in conf:  # format 1: the level of the (then) BH step is Holm's now
                conf["fwer_alpha"] = conf.pop("fdr_q")
            config = CohortConfig(**conf)
            mon = cls(
                meta["fleet"],
                meta["model_version"],
                meta["feature_names"],
                meta["class_names"],
                arr["mu"],
                arr["inv_sigma"],
                config,
                model=model,
            )
            ids: list[str] = list(meta["devices"])
            nd = len(ids)
            for d in ids:
                mon._row(d)
            w = mon.layout.width
            f = mon.layout.n_features
            for name, target in (("cur", mon._cur), ("ref", mon._ref)):
                if arr[name].shape != (nd, w):
                    raise ValueError(f"{name} has the wrong shape")
                target[:nd] = arr[name]
            mon._ref_windows[:nd] = arr["ref_windows"]
            mon._readings[:nd] = arr["readings"]
            if "disc_run" in arr:  # format 1 had none: confirmations start again
                mon._disc_run[:nd] = arr["disc_run"]
            mon._ref_pooled[:] = arr["ref_pooled"]
            mon._win_conf_u8[:] = arr["win_conf_u8"]
            mon._win_moments = MomentSums(
                int(meta["win_n"]),
                arr["win_s1"].astype(np.float64),
                arr["win_s2"].astype(np.float64),
            )
            mon._win_lbl_correct[:] = arr["win_lbl_correct"]
            mon._win_lbl_total[:] = arr["win_lbl_total"]
            mon._calibration.correct[:] = arr["cal_correct"]
            mon._calibration.total[:] = arr["cal_total"]
            mon._disp[:] = arr["disp"]
            cuts = np.cumsum(arr["pca_sample_sizes"])[:-1]
            samples = np.split(arr["pca_samples"], cuts) if arr["pca_sample_sizes"].size else []
            mon._pca = PcaMonitor.from_state(
                f,
                config.pca_variance,
                config.pca_alpha,
                {
                    "n": int(meta["pca_n"]),
                    "s1": arr["pca_s1"],
                    "s2": arr["pca_s2"],
                    "samples": samples,
                    "reference_errors": arr["pca_errors"],
                    "fitted": bool(meta["pca_fitted"]),
                },
            )
            mon._rng.bit_generator.state = meta["rng"]
            mon._win_sample.rows = arr["win_sample_rows"].astype(np.float64).reshape(-1, f)
            mon._win_sample.keys = arr["win_sample_keys"].astype(np.float64)
            mon._win_sample.seen = int(meta["win_sample_seen"])
            mon._ref_count = int(meta["ref_count"])
            mon._complete = bool(meta["complete"])
            mon._window_index = int(meta["window_index"])
            mon._window_start_ms = meta["window_start_ms"]
            mon._win_first_ts = meta["win_first_ts"]
            mon._total_readings = int(meta["total_readings"])
            mon.rejected_frames = int(meta["rejected_frames"])
            mon.label_pred_mismatches = int(meta["label_pred_mismatches"])
            mon.rejected_label_batches = int(meta["rejected_label_batches"])
            mon._win_lbl_n = int(meta["win_lbl_n"])
            mon._win_lbl_ok = int(meta["win_lbl_ok"])
            mon._win_rejected = int(meta["win_rejected"])
        except CheckpointFormatError:
            raise
        except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointFormatError(f"damaged cohort checkpoint: {exc}") from exc
        return mon


def _grow(a: npt.NDArray[np.int64], shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    out = np.zeros(shape, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
