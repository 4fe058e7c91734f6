"""Layer A: one streaming drift monitor per device (service/README.md, "Layer A").

Lifecycle per (device, model version)
-------------------------------------
1. **Reference.** The first ``reference_readings`` readings (default 512) of a model version are
   buffered (float32 features, so ≤ 16 KiB for F = 8) and give the fixed reference: ``μ_ref``,
   ``σ_ref`` of the raw features, then, with the features standardised and clipped
   (``z = clip((x − μ_ref)/σ_ref, ±4)``), the mean ``m_ref``, per-reading standard deviation
   ``s_ref`` and skewness ``γ`` of every signal (confidence, confidence², class indicators,
   ``z`` and, per frame, the within-frame variance of ``z``; :mod:`service.drift.signals`:
   per reading, its squared deviation from its frame's mean). The buffer is dropped once the
   reference is complete. A frame that straddles the end of the reference is split: the rest
   of it is monitored. Nothing is detected during the reference.
2. **Null learning (calibrating).** Each frame of ``k`` readings gives one value per stream:
   the standardised, skew-corrected frame mean ``u = WH((m − m_ref) · √k / s_ref, γ/√k)``
   (≈ N(0, 1) for independent readings; :func:`service.drift.signals.skew_normalise`). Real
   telemetry is not independent (slow sensors, activities in sessions, cycles), so successive
   ``u`` are correlated and a detector calibrated for independent values would cry wolf. From
   the reference frames on, every stream's ``u`` feeds dyadic batch means
   (:mod:`service.drift.long_run_variance`) until they show the block size ``b`` (frames)
   from which block means are nearly independent, the residual variance inflation
   ``κ ≤ 2`` and the stream's long-run centre, spread and block-mean skewness. The batch means
   are asked each time a level completes, and a stream starts only when two successive looks
   (the second on twice the data) both found a plateau, at the larger of their two blocks.
   Until then the stream is *calibrating*: nothing is detected on it
   (:attr:`DeviceMonitor.calibrating`,
   :meth:`DeviceMonitor.calibration`). Nothing starts before blocks of the **horizon**
   (``null_horizon_readings``, default the reference's 512 readings: 32 frames of 16) have been
   seen ``null_min_blocks`` times, so a weak slow component that short blocks cannot show is
   measured first: an independent stream is ready after ``48 · 32`` = 1,536 frames; a stream
   whose dependence lasts ``τ`` frames after about ``8 · 48 · τ`` if that is longer; a stream
   that never settles (a random walk, a cycle longer than the largest block) stays
   calibrating.
   A fleet's **declared normal** (``normal``:
   :class:`~service.drift.declared_normal.DeclaredNormal`, a period and/or the longest session,
   in seconds) puts a floor under every signal stream's block: at least one period and two
   sessions, converted to frames with the device's own frame interval (the median interval
   between frame timestamps, :class:`~service.drift.declared_normal.FrameClock`); no stream
   starts before that interval is known, and a floor above the largest block the batch means
   can choose is reported by :meth:`DeviceMonitor.calibration` (``declared_too_long``,
   ``reason``). The error stream is not floored: labels come at the labeller's pace, not the
   device's (one timestamp per label batch), so seconds do not convert to labels; it learns
   its blocks from the labels alone.
3. **Monitoring.** A calibrated stream adds ``u`` to its open block; each completed block's
   mean, centred, divided by the learnt block standard deviation and skew-corrected with the
   learnt block skewness (dependence keeps block means of skewed signals far from normal), is fed as
   ``clip(v, ±6) · 4`` to one river ``ADWIN(delta=δ, clock=1, min_window_length=2)`` per
   stream and tier (:data:`service.drift.calibration.FRAME_ADWIN`). δ comes from the
   false-alarm budget for ``b · k_nom`` readings per value (:mod:`service.drift.calibration`;
   ``k_nom`` is the median frame size during the reference unless
   ``DeviceMonitorConfig.frame_readings`` fixes it), tightened for the residual inflation
   (:func:`service.drift.long_run_variance.inflate_delta`). ADWIN compares sub-windows of
   its own window, so an error in the learnt centre does not raise false alarms.
4. **Labels.** ``update_labels`` turns labelled readings into the 0/1 error stream
   ``1[pred ≠ label]``, learnt the same way one step per label (at least
   ``reference_labels``, default 100; errors come in sessions too, so it has a horizon of its
   own, ``null_horizon_labels``, 32 labels: 1,536 labels at the soonest). Once it is calibrated,
   block means of ``b`` labels feed ``ADWIN`` (δ calibrated on Bernoulli errors for ``b``
   labels' budget, river's other defaults, tightened for ``κ``) and a one-sided CUSUM of the
   error rate against a reference that keeps growing while nothing changes
   (:mod:`service.drift.error_cusum`: the learnt block, dispersion and ``κ``, the error
   detector's share of the budget per label; ``detector="cusum"``). One-sided
   ``binary.HDDMA`` (confidence to the power ``κ``) runs for its warning zone, reported once
   per entry as ``hddm_a_warning``; its drift test is not an alarm (it was never first), its
   share of the budget is the CUSUM's. Labels for another model version than the current one
   are ignored (counted in ``labels_ignored``).
5. **Model-version change.** A frame with another ``param_version`` (an update, or a revert)
   starts a new reference; ``readings`` restarts at 0. The monitor of the version it leaves is
   kept (compressed, the last one only): when the device returns to that version, typically a
   rolled-back canary, its reference, detectors and windows resume where they were, so a drift
   present before the update is still measured against the reference from before the drift
   instead of being learnt as the new normal.

Two tiers
---------
Every stream feeds two banks of ADWINs (research drift-anchors §6, layer B item 3):

- the **strict** tier (the above: :data:`~service.drift.calibration.FRAME_ADWIN`, ADWIN and
  the CUSUM on errors) spends ``strict_share`` (½) of the fleet budget ``B`` (1e-7 false alarms per
  device-reading). Its detections are **device alarms** (:meth:`DeviceMonitor.update`,
  ``update_labels``, ``BatchResult.detections``): this device drifted.
- the **sensitive** tier (:data:`~service.drift.calibration.SENSITIVE_FRAME_ADWIN`: a 1-frame
  minimum window and the values on a 2⁻⁸ grid; ADWIN alone on errors) spends its own budget
  ``sensitive_budget_per_device_reading`` (1e-4, about river ``ADWIN()``'s rate), calibrated
  from its own simulated curve with the same margin. Its detections are **suspicions**
  (``detector="adwin_sensitive"``): at that rate a 10,000-device fleet raises about one per
  second under no drift, so they are never device alarms; they come out of
  :meth:`DeviceMonitor.observe`, :meth:`~DeviceMonitor.observe_labels` and
  ``BatchResult.suspicions``, and the engine counts them and hands them to the cohort rule
  (:mod:`service.drift.suspicion_cohort`), which alarms for the cohort with the rest of ``B``.
  :attr:`DeviceMonitor.suspicion_rate` is the calibrated rate that rule assumes.

Both banks see the same block values and share the score ring; the sensitive tier can be turned off
(``sensitive_budget_per_device_reading=None``: the strict tier then spends all of ``B``).

Detections and scores
---------------------
river's detectors reset themselves after an alarm; the fixed reference stays, and
:attr:`DeviceMonitor.drifting` lists the streams whose current ADWIN window mean is still outside
the calibrated band around the reference: "still drifted since the last update".

``Detection.score`` for ADWIN (either tier) is ADWIN's own statistic over its threshold,
``max |mean(W1) − mean(W0)| / ε_cut`` with river's cut formula, recomputed when it fires over
the splits whose recent part ``W1`` lies within the last 32 block values (a ring buffer per
stream, in int8 steps of 1/127 of the clip; 256 block means for the error stream). That
maximum is ≥ 1 whenever river's crossing split is among them, which is the case for abrupt
changes; a slow drift can cross at a longer ``W1``, and then the score is floored at 1.0. For
the error CUSUM it is its statistic over its threshold (≥ 1). For HDDM_A's warning the score
is 1.0: river does not expose its statistic.

``Detection.readings`` counts the readings of the current model version including the reference
(the frame that triggered the detection is counted).

Checkpoints
-----------
:meth:`DeviceMonitor.state_bytes` is ``b"TDDM"``, a big-endian u16 format version
(:mod:`service.drift.checkpoint_format`) and the monitor in an explicit format, no pickle:
its numbers and names as JSON and its arrays as raw bytes, zlib-compressed
(:func:`~service.drift.checkpoint_format.pack_state`), with every ADWIN in the exact compact
form of :mod:`service.drift.adwin_state` (and the count and sum since each frame ADWIN's reset
taken from the ADWIN itself, which holds them exactly), and while calibrating the batch means
(a few KiB, released once every stream is learnt). Each part states itself (``state()`` /
``from_state()``). It is taken in two steps: :meth:`DeviceMonitor.snapshot` copies the state
(cheap: about 0.1 ms, under the engine's lock), :meth:`MonitorSnapshot.encode` packs and
compresses the copies (the costly part, outside it). The size per device is measured by
``tests/bench/bench_detection.py``. :meth:`DeviceMonitor.from_state_bytes` refuses another
magic or version (an older, pickled checkpoint is never decoded), a corrupt body, or arrays of
another dtype or shape than the layout's, with :class:`CheckpointFormatError` (a
``ValueError``): a damaged or hostile registry can cost a device its learnt state, never run
code.

>>> import numpy as np
>>> from service.ingest.frames import DeviceFrame
>>> mon = DeviceMonitor("f", "d1", ["a", "b"], ["no", "yes"],
...                     DeviceMonitorConfig(reference_readings=32))
>>> rng = np.random.default_rng(0)
>>> def frame(seq, shift=0.0):
...     x = rng.standard_normal((16, 2)) + shift
...     pred = (x[:, 0] > 0).astype(np.int64)
...     return DeviceFrame("f", "d1", 0, seq, 1000 * seq, 0.0, 1, x, pred, np.full(16, 0.8))
>>> [d for s in range(1600) for d in mon.update(frame(s))]
[]
>>> mon.calibration().state, mon.calibration().block_readings_max
('monitoring', 16)
>>> hits = [d for s in range(1600, 1640) for d in mon.update(frame(s, shift=1.0))]
>>> sorted({(d.signal, d.feature) for d in hits})[:2]
[('class_mix', 'no'), ('class_mix', 'yes')]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from river import drift as _river_drift

from service.drift import calibration
from service.drift.adwin_state import (
    AdwinCapture,
    capture_adwins,
    pack_adwins,
    retune_delta,
    unpack_adwins,
)
from service.drift.calibration import (
    DEFAULT_BUDGET,
    DEFAULT_DRIFTING_ALPHA,
    DEFAULT_SENSITIVE_BUDGET,
    DEFAULT_STRICT_SHARE,
    DEFAULT_WARNING_BUDGET,
    ERROR_ADWIN,
    AdwinSettings,
    Thresholds,
    make_adwin,
)
from service.drift.checkpoint_format import (
    CheckpointFormatError,
    add_header,
    check_header,
    pack_state,
    pack_state_raw,
    unpack_state,
)
from service.drift.declared_normal import LARGEST_BLOCK, DeclaredNormal, FrameClock
from service.drift.detection import Detection, DetectorName, Signal
from service.drift.error_cusum import ErrorCusum
from service.drift.hddm_state import hddm_from_state, hddm_state
from service.drift.long_run_variance import (
    DEFAULT_MIN_BLOCKS,
    DyadicBatchMeans,
    confirm_blocks,
    horizon_level,
    inflate_delta,
    inflation_at,
    new_level_complete,
)
from service.drift.signals import (
    DEFAULT_Z_CLIP,
    MAX_FRAME_READINGS,
    SignalLayout,
    Stream,
    batch_frame_means_arrays,
    frame_means_arrays,
    reading_deviations,
    reading_signals,
    skew_normalise,
    standardised_means,
)
from service.ingest.frames import DeviceFrame, DeviceLabels

__all__ = [
    "ERROR_STREAM",
    "STATE_FORMAT",
    "STATE_MAGIC",
    "BatchResult",
    "CalibrationState",
    "CalibrationStatus",
    "CheckpointFormatError",
    "DeviceMonitor",
    "DeviceMonitorConfig",
    "MonitorSnapshot",
    "Outcome",
    "update_frames",
]

FloatArray = npt.NDArray[np.float64]

drift: Any = _river_drift
"""river's drift detectors (untyped: held as ``Any`` for mypy)."""

STATE_MAGIC: Final = b"TDDM"
STATE_FORMAT: Final = 4
"""Version of :meth:`DeviceMonitor.state_bytes`; bump it when the layout changes.

4: no pickle: JSON numbers and names plus raw arrays (:func:`service.drift.checkpoint_format.
pack_state`), every part in its own explicit form (ADWINs packed by
:mod:`service.drift.adwin_state`, HDDM_A by :mod:`service.drift.hddm_state`, batch means, frame
clock, CUSUM, thresholds and configuration by their own ``state()``). Older versions were
pickles: they are refused unread, and the device relearns.

3: dependence-aware monitoring (the batch-means learner, per-stream blocks, κ and δ, ADWINs
created per stream when it is calibrated).

2: the sensitive tier (a second ADWIN bank and error ADWIN), every ADWIN packed by
:mod:`service.drift.adwin_state`, the score rings as int8 steps and bits, the window counts and
sums taken from the ADWINs."""

ERROR_STREAM: Final = Stream("error", None)
"""The labelled error stream, as listed by :attr:`DeviceMonitor.drifting`."""

_SD_FLOOR: Final = 1e-3
"""Floor of a signal's reference standard deviation (in its own units; conf steps are 1/256)."""
_SIGMA_FLOOR_REL: Final = 1e-6
"""Floor of a feature's ``σ_ref`` relative to ``max(1, |μ_ref|)`` (a constant feature)."""


MAX_SENSITIVE_BUDGET: Final = 1e-2
"""Upper limit of the sensitive budget (frames of 16 reach δ ≈ 0.5, river's cap, near 0.1)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one frame or label batch gave: the strict tier's alarms and the sensitive tier's
    suspicions (``detector="adwin_sensitive"``: not device alarms; they feed the cohort rule)."""

    alarms: list[Detection]
    suspicions: list[Detection]


CalibrationState = Literal["unknown", "reference", "calibrating", "monitoring"]
"""Where a device's layer-A monitor stands: no frame yet; learning the fixed reference (the
first ``reference_readings`` readings); learning the null of its streams (some may already be
monitored); every stream monitored."""


@dataclass(frozen=True, slots=True)
class CalibrationStatus:
    """What a device's monitor learnt of its normal variation (registry, API, gauges)."""

    state: CalibrationState
    readings: int
    """Readings of the current model version."""
    streams_ready: int
    """Signal streams whose null is learnt (monitored)."""
    streams: int
    block_readings_max: int
    """Readings per monitored value of the slowest calibrated stream (1 frame if independent)."""
    block_readings_median: float
    kappa_max: float
    """Largest residual variance inflation absorbed by a stream's threshold (≥ 1)."""
    labels: int
    """Labels of the current model version."""
    error_ready: bool
    """Whether the labelled error stream is calibrated (monitored)."""
    error_block_labels: int
    """Labels per monitored value of the error stream (0 while calibrating)."""
    frame_interval_s: float | None = None
    """The device's interval between frames, from their timestamps (``None``: not known yet)."""
    block_seconds_max: float | None = None
    """:attr:`block_readings_max` in seconds (frames × :attr:`frame_interval_s`)."""
    block_seconds_median: float | None = None
    declared: DeclaredNormal | None = None
    """The fleet's declared normal time scales (``None``: nothing declared)."""
    declared_block_frames: int = 0
    """The smallest block (frames) the declaration allows a signal stream (0: none, or the
    frame interval is not known yet)."""
    declared_too_long: bool = False
    """The declaration needs blocks longer than the null learning can choose: the signal
    streams cannot be monitored on this device (see :attr:`reason`)."""
    reason: str | None = None
    """Why the declaration holds the signal streams back, in words (``None``: it does not)."""


@dataclass(frozen=True, slots=True)
class DeviceMonitorConfig:
    """Settings of one device's monitor; every detector threshold derives from the budgets."""

    reference_readings: int = 512
    """Readings of a model version that form the fixed reference."""
    reference_labels: int = 100
    """Labels of a model version that form the reference error rate."""
    budget_per_device_reading: float = DEFAULT_BUDGET
    """Fleet-level false alarms per device-reading ``B``. With the sensitive tier, the strict
    tier's device alarms spend ``strict_share · B`` (split over its detectors) and the cohort
    rule on suspicions the rest; without it, the strict tier spends all of ``B``."""
    strict_share: float = DEFAULT_STRICT_SHARE
    """Share of ``B`` the strict tier spends when the sensitive tier is on."""
    sensitive_budget_per_device_reading: float | None = DEFAULT_SENSITIVE_BUDGET
    """Suspicions per device-reading of the sensitive tier (split over its S + 1 ADWINs like
    the strict budget); ``None`` turns the tier off. Default ≈ river ``ADWIN()``'s own rate,
    10³ times the strict tier's (any value keeps the cohort rule's level: it uses the
    calibrated rate)."""
    warning_budget_per_device_reading: float = DEFAULT_WARNING_BUDGET
    """HDDM_A warning-zone entries per device-reading."""
    drifting_alpha: float = DEFAULT_DRIFTING_ALPHA
    """False-positive probability of the :attr:`DeviceMonitor.drifting` status per device."""
    frame_readings: int | None = None
    """Nominal readings per frame for δ; ``None``: the median frame size of the reference."""
    z_clip: float = DEFAULT_Z_CLIP
    """Standardised features are clipped to ``±z_clip``."""
    null_min_blocks: int = DEFAULT_MIN_BLOCKS
    """Blocks each batch-means level needs before a stream's null counts as learnt
    (:func:`service.drift.long_run_variance.choose_blocks`): an independent stream is
    monitored after ``8 · null_min_blocks`` frames (labels for the error stream) at the
    soonest, and no sooner than the horizon below allows."""
    null_horizon_readings: int | None = None
    """Shortest span of dependence (readings) every signal stream is checked for before it is
    monitored: blocks of at least this many readings must have been seen ``null_min_blocks``
    times (:func:`service.drift.long_run_variance.choose_blocks`' ``horizon``), so a slow
    component too weak to show in short blocks is still measured. ``None``: the reference's
    length (``reference_readings``)."""
    null_horizon_labels: int = 32
    """The same for the labelled error stream, in labels: errors come in sessions too (an
    activity the model gets wrong lasts minutes), and without a horizon an error stream in
    sessions of tens of labels started at blocks of one label with a third of its long-run
    variance in its threshold (stationary benchmark, ``sessions``). With the default it starts
    after ``48 · 32`` = 1,536 labels at the soonest."""
    calibration_table: calibration.CalibrationTable | None = None
    """``None``: the shipped table (``calibration_table.json``)."""

    def __post_init__(self) -> None:
        if self.reference_readings < 2:
            raise ValueError("reference_readings must be >= 2")
        if self.reference_labels < 1:
            raise ValueError("reference_labels must be >= 1")
        if self.frame_readings is not None and not 1 <= self.frame_readings <= MAX_FRAME_READINGS:
            raise ValueError(f"frame_readings must be in 1..{MAX_FRAME_READINGS}")
        if not self.z_clip > 0.0:
            raise ValueError("z_clip must be positive")
        if self.null_min_blocks < 2:
            raise ValueError("null_min_blocks must be >= 2")
        if self.null_horizon_readings is not None and self.null_horizon_readings < 1:
            raise ValueError("null_horizon_readings must be >= 1")
        if self.null_horizon_labels < 1:
            raise ValueError("null_horizon_labels must be >= 1")
        if not self.budget_per_device_reading > 0.0:
            raise ValueError("budget_per_device_reading must be positive")
        if not 0.0 < self.strict_share < 1.0:
            raise ValueError("strict_share must be in (0, 1)")
        sens = self.sensitive_budget_per_device_reading
        if sens is not None and not 0.0 < sens <= MAX_SENSITIVE_BUDGET:
            raise ValueError(
                f"sensitive_budget_per_device_reading must be in (0, {MAX_SENSITIVE_BUDGET:g}]"
            )

    @property
    def horizon_readings(self) -> int:
        """:attr:`null_horizon_readings`, or the reference's length."""
        h = self.null_horizon_readings
        return self.reference_readings if h is None else h

    @property
    def strict_budget(self) -> float:
        """False alarms per device-reading the strict tier's detectors share."""
        if self.sensitive_budget_per_device_reading is None:
            return self.budget_per_device_reading
        return self.budget_per_device_reading * self.strict_share

    @property
    def cohort_budget(self) -> float:
        """False alarms per device-reading left to the cohort rule on suspicions (0 without
        the sensitive tier)."""
        return self.budget_per_device_reading - self.strict_budget


_BANKS: Final = ("_adwins", "_s_adwins")
"""The frame-level ADWIN banks (strict, sensitive), packed in checkpoints."""
_BANK_WINS: Final = ("_win", "_s_win")
"""Their count, sum and sum of squares since each ADWIN's reset (for the score)."""
_SINGLE_ADWINS: Final = ("_err_adwin", "_s_err_adwin")
"""The error-stream ADWINs (strict, sensitive; ``None`` before the label reference)."""

SCORE_SPLITS: Final = 32
"""Most recent values kept per stream to recompute ADWIN's statistic when it fires."""
ERROR_SCORE_SPLITS: Final = 256
"""The same for the error stream (one value per label)."""


_KAPPA_STEP: Final = 1.05
"""A stream's thresholds tighten when its re-estimated ``κ`` grows by more than this factor."""

RELEARN_LEVELS: Final = 4
"""Levels (doublings) past a stream's block over which its κ keeps being checked."""


def _learnt(
    bm: DyadicBatchMeans, block: npt.NDArray[np.int64], min_blocks: int, horizon: int = 1
) -> bool:
    """Whether null learning is over: blocks ``2^RELEARN_LEVELS`` times the longest monitored
    block or the horizon (or the longest the batch means keep) have been seen ``min_blocks``
    times."""
    counting = np.flatnonzero(bm.count >= min_blocks)
    if counting.size == 0:
        return False
    top = int(counting[-1])
    longest = max(int(np.max(block)).bit_length() - 1, horizon_level(horizon))
    return top >= min(longest + RELEARN_LEVELS, bm.levels - 1)


def _adwin_score(
    recent: FloatArray,
    width: float,
    total: float,
    total_sq: float,
    delta: float,
    min_window: int,
) -> float:
    """ADWIN's ``max |mean(W1) − mean(W0)| / ε_cut`` over splits with ``W1`` the latest values.

    ``recent`` holds the latest values, newest first; ``width``, ``total``, ``total_sq`` are the
    count, sum and sum of squares of the whole window before the cut (the value that triggered
    it included). ``ε_cut`` is river's: ``√(2 m σ²_W δ') + ⅔ δ' m`` with
    ``m = 1/(n0 − mw + 1) + 1/(n1 − mw + 1)`` and ``δ' = ln(2 ln W / δ)``. river only tries
    bucket boundaries, so the maximum over every split is at least its crossing ratio (≥ 1) when
    the crossing split lies within ``recent``; else (a slow drift) it can fall below 1, and the
    score is floored at 1.0.
    """
    n_max = min(recent.shape[0], int(width) - min_window)
    if n_max < min_window or width < 2.0:
        return 1.0
    n1 = np.arange(min_window, n_max + 1, dtype=np.float64)
    s1 = np.cumsum(recent[:n_max], dtype=np.float64)[min_window - 1 :]
    n0 = width - n1
    shift = np.abs(s1 / n1 - (total - s1) / n0)
    var = max(total_sq / width - (total / width) ** 2, 0.0)
    d_prime = math.log(2.0 * math.log(width) / delta)
    m = 1.0 / (n0 - min_window + 1.0) + 1.0 / (n1 - min_window + 1.0)
    eps = np.sqrt(2.0 * m * var * d_prime) + 2.0 / 3.0 * d_prime * m
    return max(1.0, float(np.max(shift / eps)))


class DeviceMonitor:
    """Layer-A drift monitor of one device (see the module docstring).

    ``feature_names`` and ``class_names`` come from the device's schema; frames must carry
    exactly ``len(feature_names)`` features and predictions in ``0..len(class_names) − 1``.
    """

    def __init__(
        self,
        fleet: str,
        device: str,
        feature_names: Sequence[str],
        class_names: Sequence[str],
        config: DeviceMonitorConfig | None = None,
        normal: DeclaredNormal | None = None,
    ) -> None:
        self.fleet = fleet
        self.device = device
        self.config = config if config is not None else DeviceMonitorConfig()
        self.normal = normal
        """The fleet's declared normal: a floor on every signal stream's block (the error
        stream learns its blocks from the labels alone; :mod:`service.drift.declared_normal`)."""
        self.layout = SignalLayout.create(feature_names, class_names)
        self.labels_ignored = 0
        """Labelled readings dropped because they were for another model version."""
        self.last_frame: tuple[int, int] | None = None
        """``(boot, seq)`` of the last frame processed (for replay checks by the caller)."""
        self.last_labels: tuple[int, int] | None = None
        """``(boot, seq)`` of the last label batch processed."""
        self._version: int | None = None
        self._saved_version: tuple[int, bytes] | None = None
        """The monitor of the previous model version, as :meth:`state_bytes` (one kept)."""
        self._reset_version(None)

    # -- lifecycle -----------------------------------------------------------------------------

    _KEPT_ACROSS_VERSIONS: Final = (
        "fleet", "device", "config", "layout", "labels_ignored", "last_frame", "last_labels",
        "normal",
    )  # fmt: skip

    def _switch_version(self, version: int) -> None:
        """Start monitoring ``version``: resume its saved monitor, or learn a new reference."""
        saved = getattr(self, "_saved_version", None)
        keep = None
        if self._version is not None and self._mu is not None:  # a complete reference
            self._saved_version = None
            keep = (self._version, self.state_bytes())
        if saved is not None and saved[0] == version:
            old = DeviceMonitor.from_state_bytes(saved[1]).__dict__
            for name in self._KEPT_ACROSS_VERSIONS:
                old[name] = self.__dict__[name]
            self.__dict__.update(old)
        else:
            self._reset_version(version)
        self._saved_version = keep

    def _reset_version(self, version: int | None) -> None:
        lay = self.layout
        cfg = self.config
        s = lay.n_streams
        self._version = version
        self._readings = 0
        # reference buffer (dropped when complete)
        self._ref_n = 0
        self._buf_x: npt.NDArray[np.float32] | None = np.empty(
            (cfg.reference_readings, lay.n_features), dtype=np.float32
        )
        self._buf_pred: npt.NDArray[np.int32] | None = np.empty(
            cfg.reference_readings, dtype=np.int32
        )
        self._buf_conf: npt.NDArray[np.float32] | None = np.empty(
            cfg.reference_readings, dtype=np.float32
        )
        self._ref_ks: list[int] | None = []  # full size of each reference frame
        self._ref_takes: list[int] | None = []  # its readings that went into the reference
        # fixed reference (set when complete)
        self._mu: FloatArray | None = None
        self._sigma: FloatArray | None = None
        self._ref_mean: FloatArray | None = None
        self._inv_sd: FloatArray | None = None
        self._skew: FloatArray | None = None  # per-reading skewness of each stream
        # whether feature_var is the within-frame variance (False: the mean of z², for devices
        # whose reference frames held one reading)
        self._var_within = True
        self._k_nom = 1
        self._horizon = 1  # frames of dependence checked before a stream starts
        self._settings = AdwinSettings()
        self._s_settings = AdwinSettings()
        self._thr: Thresholds | None = None  # strict tier
        self._s_thr: Thresholds | None = None  # sensitive tier
        # null learning (calibrating): batch means of every stream's u until each is ready
        self._bm: DyadicBatchMeans | None = None
        self._ready = np.zeros(s, dtype=np.bool_)
        self._block = np.zeros(s, dtype=np.int64)  # frames per monitored value
        self._kappa = np.ones(s, dtype=np.float64)
        self._center = np.zeros(s, dtype=np.float64)  # mean of u over the learning stretch
        self._bsd = np.ones(s, dtype=np.float64)  # sd of a block mean of u
        self._bskew = np.zeros(s, dtype=np.float64)  # skewness of a block mean of u
        self._candidate = np.zeros(s, dtype=np.int64)  # block chosen at the last look
        self._clock = FrameClock()  # the interval between frames (declared seconds → frames)
        self._alarmed = np.zeros(s, dtype=np.bool_)  # strict alarm since the stream started
        self._ref_var = np.zeros(s, dtype=np.float64)  # var of the centre, in block-sd units
        self._delta = np.zeros(s, dtype=np.float64)
        self._s_delta = np.zeros(s, dtype=np.float64)
        self._bsum = np.zeros(s, dtype=np.float64)  # the open block of each stream
        self._bn = np.zeros(s, dtype=np.int64)
        self._adwins: list[Any] = [None] * s
        self._s_adwins: list[Any] = [None] * s
        # count, sum, sum of squares since each ADWIN's last reset (strict, sensitive)
        self._win = np.zeros((3, s), dtype=np.float64)
        self._s_win = np.zeros((3, s), dtype=np.float64)
        # sum since each strict ADWIN's last reset of its block values before the skew
        # correction: the drifting band's mean (the correction is not mean-preserving)
        self._raw = np.zeros(s, dtype=np.float64)
        # ring of the latest values per stream, shared by both banks; only the score reads it,
        # so it is stored in int8 steps of clip·scale/127 (0.047 σ of a block mean for
        # FRAME_ADWIN), or float16 for unclipped settings
        self._recent: npt.NDArray[np.int8] | npt.NDArray[np.float16] = np.zeros(
            (SCORE_SPLITS, s), dtype=np.float16
        )
        self._recent_step: float | None = None
        self._recent_pos = np.zeros(s, dtype=np.int64)
        # labels: the error stream learns its null the same way, one step per label
        self._lbl_ref_n = 0
        self._lbl_bm: DyadicBatchMeans | None = DyadicBatchMeans(1)
        self._err_block = 0  # labels per monitored value (0: calibrating)
        self._err_kappa = 1.0
        self._err_p = math.nan  # reference error rate
        self._err_bsd = math.nan  # sd of a block mean of errors
        self._err_candidate = 0  # block chosen at the last look
        self._err_alarmed = False  # an alarm on the error stream since it started
        self._err_ref_var = 0.0  # var of the reference rate, in block-sd units
        self._err_bsum = 0.0
        self._err_bn = 0
        self._err_adwin: Any = None
        self._s_err_adwin: Any = None
        self._err_win = [0.0, 0.0, 0.0]
        self._s_err_win = [0.0, 0.0, 0.0]
        self._err_recent = np.zeros(ERROR_SCORE_SPLITS, dtype=np.uint8)  # block means · 255
        self._err_recent_pos = 0
        self._hddm: Any = None
        self._warning = False
        self._err_cusum: ErrorCusum | None = None  # built on the first block (_error_cusum)
        self._label_thr: Thresholds | None = None
        self._s_label_thr: Thresholds | None = None

    @property
    def model_version(self) -> int | None:
        """The model version being monitored (``None`` before the first frame)."""
        return self._version

    @property
    def readings(self) -> int:
        """Readings seen for the current model version (reference included)."""
        return self._readings

    @property
    def reference_complete(self) -> bool:
        """Whether the fixed reference of the current model version is complete."""
        return self._mu is not None

    @property
    def reference(self) -> tuple[FloatArray, FloatArray] | None:
        """``(μ_ref, σ_ref)`` of the raw features, once the reference is complete."""
        if self._mu is None or self._sigma is None:
            return None
        return self._mu.copy(), self._sigma.copy()

    @property
    def thresholds(self) -> Thresholds | None:
        """The strict tier's calibrated thresholds (``None`` during the reference)."""
        return self._thr

    @property
    def sensitive_thresholds(self) -> Thresholds | None:
        """The sensitive tier's thresholds (``None`` during the reference or when it is off)."""
        return self._s_thr

    @property
    def suspicion_rate(self) -> float | None:
        """Calibrated suspicions per reading under no drift (with the model margin, as if
        every reading were labelled): what the cohort rule assumes. ``None`` while the
        sensitive tier is not running (reference, or turned off)."""
        if self._s_thr is None or not np.count_nonzero(self._ready):  # any(), without its wrapper
            return None
        share = float(self._ready.mean())
        return self._s_thr.null_rate_per_reading * share

    @property
    def calibrating(self) -> bool:
        """Whether the monitor cannot yet tell drift from the device's normal variation.

        True during the reference and while any signal stream is still learning its null
        (its long-run variance and the block size at which it is nearly independent,
        :mod:`service.drift.long_run_variance`). Calibrated streams are already monitored.
        """
        return self._mu is None or not bool(self._ready.all())

    @property
    def calibration_state(self) -> CalibrationState:
        """:attr:`CalibrationStatus.state` of :meth:`calibration`, without the rest."""
        if self._version is None:
            return "unknown"
        if self._mu is None:
            return "reference"
        if not self._ready.all():
            return "calibrating"
        return "monitoring"

    def calibration(self) -> CalibrationStatus:
        """What the monitor learnt of this device's normal variation."""
        state = self.calibration_state
        ready = self._ready
        k = self._k_nom
        blocks = self._block[ready] * k
        interval = self._clock.interval_s
        secs = self._block[ready] * interval if interval is not None else None
        floor = self._declared_block() or 0
        too_long = floor > LARGEST_BLOCK
        return CalibrationStatus(
            state=state,
            readings=self._readings,
            streams_ready=int(ready.sum()),
            streams=self.layout.n_streams,
            block_readings_max=int(blocks.max()) if blocks.size else 0,
            block_readings_median=float(np.median(blocks)) if blocks.size else 0.0,
            kappa_max=float(self._kappa[ready].max()) if ready.any() else 1.0,
            labels=self._lbl_ref_n,
            error_ready=self._err_block > 0,
            error_block_labels=self._err_block,
            frame_interval_s=interval,
            block_seconds_max=float(secs.max()) if secs is not None and secs.size else None,
            block_seconds_median=float(np.median(secs)) if secs is not None and secs.size else None,
            declared=self.normal,
            declared_block_frames=floor,
            declared_too_long=too_long,
            reason=self._declared_reason(state, floor) if self.normal is not None else None,
        )

    def _declared_block(self) -> int | None:
        """Frames per block the declared normal needs (``None``: nothing declared; 0: the frame
        interval is not known yet)."""
        if self.normal is None:
            return None
        interval = self._clock.interval_s
        return 0 if interval is None else self.normal.block_frames(interval)

    def _declared_reason(self, state: CalibrationState, floor: int) -> str | None:
        normal, interval = self.normal, self._clock.interval_s
        assert normal is not None
        if floor > LARGEST_BLOCK and interval is not None:
            return (
                f"the declared {normal.describe()} needs blocks of {floor} frames at "
                f"{interval:g} s per frame, more than the {LARGEST_BLOCK} frames "
                f"({LARGEST_BLOCK * interval:g} s) the null learning can choose: the signal "
                "streams cannot be monitored; declare a shorter time scale for the fleet, or "
                "have its devices send fewer, larger frames"
            )
        if floor == 0 and state in ("reference", "calibrating"):
            return (
                f"measuring the interval between frames to turn the declared "
                f"{normal.describe()} into frames ({self._clock.missing} more frames with "
                "increasing timestamps needed)"
            )
        return None

    @property
    def streams(self) -> tuple[Stream, ...]:
        """The signal streams, in ADWIN order (the error stream is :data:`ERROR_STREAM`)."""
        return self.layout.streams

    # -- validation ----------------------------------------------------------------------------

    def _check_frame(self, frame: DeviceFrame) -> None:
        self._check_structure(frame)
        c = self.layout.n_classes
        if int(frame.pred.min()) < 0 or int(frame.pred.max()) >= c:
            raise ValueError(f"predicted class out of range 0..{c - 1}")

    def _check_structure(self, frame: DeviceFrame) -> None:
        """:meth:`_check_frame` but the class range (checked for many frames at once by
        :func:`update_frames`)."""
        if frame.fleet != self.fleet or frame.device != self.device:
            raise ValueError(
                f"frame of {frame.fleet}/{frame.device} given to the monitor of "
                f"{self.fleet}/{self.device}"
            )
        f = self.layout.n_features
        x = frame.features
        if x.ndim != 2 or x.shape[1] != f:
            raise ValueError(
                f"{self.fleet}/{self.device}: frame has features of shape {tuple(x.shape)}, "
                f"the schema has {f} features"
            )
        k = x.shape[0]
        if not 1 <= k <= MAX_FRAME_READINGS:
            raise ValueError(f"a frame must hold 1..{MAX_FRAME_READINGS} readings, got {k}")
        if frame.pred.shape != (k,) or frame.conf.shape != (k,):
            raise ValueError("pred and conf need one entry per reading")

    # -- frames --------------------------------------------------------------------------------

    def update(self, frame: DeviceFrame) -> list[Detection]:
        """Process one telemetry frame; returns the strict tier's alarms it triggered.

        The sensitive tier's suspicions are dropped: use :meth:`observe` to get them too.
        Raises ``ValueError`` for a frame of another device, with a feature count other than the
        schema's, with 0 or more than 4096 readings, or with a class index out of range.
        """
        return self.observe(frame).alarms

    def observe(self, frame: DeviceFrame) -> Outcome:
        """Process one telemetry frame; its alarms and suspicions (see :meth:`update`)."""
        self._check_frame(frame)
        if frame.param_version != self._version:
            self._switch_version(frame.param_version)
        self.last_frame = (frame.boot, frame.seq)
        self._clock.note(frame.boot, frame.ts_ms)
        k = frame.k
        self._readings += k
        if self._mu is not None:
            return self._monitor_means(
                self._means(frame.features, frame.pred, frame.conf), k, frame
            )
        taken = self._add_reference(frame)
        if self._mu is None or taken == k:
            return Outcome([], [])
        rest = slice(taken, k)
        means = self._means(frame.features[rest], frame.pred[rest], frame.conf[rest])
        return self._monitor_means(means, k - taken, frame)

    def _means(self, x: FloatArray, pred: npt.NDArray[np.int64], conf: FloatArray) -> FloatArray:
        assert self._mu is not None
        assert self._sigma is not None
        return frame_means_arrays(
            x, pred, conf, self._mu, self._sigma, self.layout.n_classes, self.config.z_clip
        )

    def _add_reference(self, frame: DeviceFrame) -> int:
        assert self._buf_x is not None
        assert self._buf_pred is not None
        assert self._buf_conf is not None
        assert self._ref_ks is not None
        n_ref = self.config.reference_readings
        take = min(frame.k, n_ref - self._ref_n)
        lo, hi = self._ref_n, self._ref_n + take
        self._buf_x[lo:hi] = frame.features[:take]
        self._buf_pred[lo:hi] = frame.pred[:take]
        self._buf_conf[lo:hi] = frame.conf[:take]
        self._ref_ks.append(frame.k)
        assert self._ref_takes is not None
        self._ref_takes.append(take)
        self._ref_n = hi
        if hi == n_ref:
            self._complete_reference()
        return take

    def _complete_reference(self) -> None:
        assert self._buf_x is not None
        assert self._buf_pred is not None
        assert self._buf_conf is not None
        assert self._ref_ks is not None
        cfg = self.config
        lay = self.layout
        x = self._buf_x.astype(np.float64)
        mu = x.mean(axis=0)
        sigma = x.std(axis=0)
        sigma = np.maximum(sigma, _SIGMA_FLOOR_REL * np.maximum(1.0, np.abs(mu)))
        values = reading_signals(
            x,
            self._buf_pred.astype(np.int64),
            self._buf_conf.astype(np.float64),
            mu,
            sigma,
            lay.n_classes,
            cfg.z_clip,
        )
        n = values.shape[0]
        assert self._ref_takes is not None
        takes = np.asarray(self._ref_takes, dtype=np.int64)
        # feature_var: the within-frame variance, described by the per-reading deviations from
        # their frame's mean, unless the reference frames held one reading each (then z²)
        within = float(np.median(takes)) >= 2.0
        if within:
            dev = reading_deviations(values[:, lay.z_slice], takes)
            values[:, lay.var_slice] = dev
        ref_mean = np.nanmean(values, axis=0)
        sd = np.maximum(np.nanstd(values, axis=0), _SD_FLOOR)
        # class indicators: a class never (or always) predicted in the reference still gets a
        # finite scale, from the Laplace-smoothed rate
        p = (values[:, lay.class_slice].sum(axis=0) + 0.5) / (n + 1.0)
        sd[lay.class_slice] = np.maximum(sd[lay.class_slice], np.sqrt(p * (1.0 - p)))
        skew = np.nanmean(((values - ref_mean) / sd) ** 3, axis=0)
        skew[lay.class_slice] = (1.0 - 2.0 * p) / np.sqrt(p * (1.0 - p))
        k_nom = cfg.frame_readings or max(1, int(np.median(self._ref_ks)))
        self._k_nom = k_nom
        self._horizon = -(-cfg.horizon_readings // k_nom)  # in frames
        table = cfg.calibration_table or calibration.load_table()
        self._settings = table.frame_settings
        self._s_settings = table.sensitive_settings  # fed the same values (checked by the table)
        clip = self._settings.u_clip
        if math.isfinite(clip):
            self._recent_step = clip * self._settings.u_scale / 127.0
            self._recent = np.zeros((SCORE_SPLITS, lay.n_streams), dtype=np.int8)
        thr = self._tier_thresholds(k_nom, sensitive=False)
        assert thr is not None
        self._thr = thr
        self._s_thr = self._tier_thresholds(k_nom, sensitive=True)
        self._mu, self._sigma = mu, sigma
        self._ref_mean = ref_mean
        self._inv_sd = 1.0 / sd
        self._skew = skew
        self._var_within = within
        self._win[:] = 0.0
        self._s_win[:] = 0.0
        # the reference frames are the first steps of the null-learning stretch
        ref_means = batch_frame_means_arrays(
            x,
            self._buf_pred.astype(np.int64),
            self._buf_conf.astype(np.float64),
            takes,
            mu,
            sigma,
            lay.n_classes,
            cfg.z_clip,
        )
        u = standardised_means(ref_means, takes, ref_mean, self._inv_sd, skew, lay, within)
        self._bm = DyadicBatchMeans(lay.n_streams)
        for row in u:
            self._bm.add(row)
        self._buf_x = self._buf_pred = self._buf_conf = None
        self._ref_ks = self._ref_takes = None

    def _start_streams(self) -> None:
        """Start monitoring every stream whose null the batch means have learnt."""
        bm = self._bm
        assert bm is not None
        assert self._thr is not None
        if self._ready.all():
            return
        floor = self._declared_block()
        if floor is not None and not 0 < floor <= LARGEST_BLOCK:
            return  # the declared scale is not convertible to frames yet, or too long
        choice, self._candidate = confirm_blocks(
            bm,
            self._candidate,
            min_blocks=self.config.null_min_blocks,
            horizon=self._horizon,
            min_block=None if floor is None else np.full(self.layout.n_streams, floor),
        )
        new = choice.ready & ~self._ready
        if not new.any():
            return
        steps = float(bm.steps)
        deltas: dict[int, tuple[float, float | None]] = {}
        for i in np.flatnonzero(new).tolist():
            b = int(choice.block[i])
            if b not in deltas:
                strict = self._tier_thresholds(b * self._k_nom, sensitive=False)
                sens = self._tier_thresholds(b * self._k_nom, sensitive=True)
                assert strict is not None
                deltas[b] = (strict.frame_delta, None if sens is None else sens.frame_delta)
            d, sd = deltas[b]
            kap = float(choice.kappa[i])
            self._block[i] = b
            self._kappa[i] = kap
            self._center[i] = choice.mean[i]
            self._bsd[i] = choice.sd[i]
            self._bskew[i] = choice.skew[i]
            # variance of the centre (a mean of ``steps`` frames), in units of a block mean's
            self._ref_var[i] = choice.lrv[i] / steps / (choice.sd[i] ** 2)
            self._delta[i] = inflate_delta(d, kap)
            self._adwins[i] = make_adwin(self._delta[i], self._settings)
            if sd is not None:
                self._s_delta[i] = inflate_delta(sd, kap)
                self._s_adwins[i] = make_adwin(self._s_delta[i], self._s_settings)
        self._ready |= new
        self._bsum[new] = 0.0
        self._bn[new] = 0
        self._raw[new] = 0.0

    def _retighten(self) -> None:
        """Check the monitored streams against the longer blocks completed since they started.

        A slow component of the noise shows only in long blocks, so a stream may have started
        with too small a ``κ``. Until its first strict alarm, a stream whose ``κ`` at its block
        has grown by more than 5 % gets the stricter δ, its ADWINs keep their windows
        (:func:`service.drift.adwin_state.retune_delta`): a drift under way is still contrasted
        with what came before it. Thresholds only ever tighten: following the estimate down as
        well let its noise loosen slow sensors' thresholds (φ = 0.99: both strict alarms of the
        stationary benchmark came after such a step down), and after the first alarm they stay
        (a drift must not be learnt as noise). Learning stops, and the batch means are
        released, once blocks :data:`RELEARN_LEVELS` doublings longer than the longest
        monitored block (or the horizon) have been seen.
        """
        bm = self._bm
        assert bm is not None
        live = self._ready & ~self._alarmed
        if not live.any():
            return
        block = np.where(live, self._block, 0)
        kap = inflation_at(bm, block, min_blocks=self.config.null_min_blocks)
        moved = live & (kap > _KAPPA_STEP * self._kappa)
        if not moved.any():
            return
        for i in np.flatnonzero(moved).tolist():
            b = int(self._block[i])
            strict = self._tier_thresholds(b * self._k_nom, sensitive=False)
            sens = self._tier_thresholds(b * self._k_nom, sensitive=True)
            assert strict is not None
            k = float(kap[i])
            self._ref_var[i] *= k / self._kappa[i]  # the centre's variance grows with κ too
            self._kappa[i] = k
            self._delta[i] = inflate_delta(strict.frame_delta, k)
            retune_delta(self._adwins[i], float(self._delta[i]))
            if sens is not None and self._s_adwins[i] is not None:
                self._s_delta[i] = inflate_delta(sens.frame_delta, k)
                retune_delta(self._s_adwins[i], float(self._s_delta[i]))

    def _tier_thresholds(
        self, frame_readings: int, *, sensitive: bool, budget_scale: int = 1
    ) -> Thresholds | None:
        """The strict or sensitive tier's thresholds (``None``: the sensitive tier is off).

        ``budget_scale``: per-update budgets of the error detectors for blocks of that many
        labels (the frame budgets scale with ``frame_readings``)."""
        cfg = self.config
        budget = cfg.sensitive_budget_per_device_reading if sensitive else cfg.strict_budget
        if budget is None:
            return None
        return calibration.thresholds(
            self.layout.n_streams,
            frame_readings,
            budget_per_device_reading=budget * budget_scale,
            warning_budget_per_device_reading=cfg.warning_budget_per_device_reading,
            drifting_alpha=cfg.drifting_alpha,
            table=cfg.calibration_table,
            tier="sensitive" if sensitive else "strict",
        )

    def _feed(
        self, u: FloatArray
    ) -> tuple[list[tuple[int, float]] | None, list[tuple[int, float]] | None]:
        """One frame's standardised means ``u`` of every stream.

        Calibrated streams add it to their open block; a completed block's mean, centred and
        scaled by the learnt block standard deviation, is one ADWIN update in each bank.
        Streams still calibrating feed the batch means. Returns ``(stream, score)`` of the
        streams that fired in the strict bank, and in the sensitive bank.
        """
        strict = sensitive = None
        ready = self._ready
        if np.count_nonzero(ready):  # any(): one C call, no Python wrapper (per frame)
            self._bsum += u
            self._bn += 1
            done = ready & (self._bn >= self._block)
            if np.count_nonzero(done):
                idx = np.flatnonzero(done)
                v = (self._bsum[idx] / self._bn[idx] - self._center[idx]) / self._bsd[idx]
                self._raw[idx] += v
                v = skew_normalise(v, self._bskew[idx])
                self._bsum[idx] = 0.0
                self._bn[idx] = 0
                strict, sensitive = self._feed_banks(idx, v)
        bm = self._bm
        if bm is not None:
            bm.add(u)
            if new_level_complete(bm.steps, self.config.null_min_blocks):
                self._start_streams()
                self._retighten()
                if self._ready.all() and _learnt(
                    bm, self._block, self.config.null_min_blocks, self._horizon
                ):
                    self._bm = None  # its memory is released
                    self._clock.stop()
        if strict:
            hit = [i for i, _ in strict]
            self._alarmed[hit] = True
            self._raw[hit] = 0.0  # the ADWIN starts afresh
        return strict, sensitive

    def _feed_banks(
        self, idx: npt.NDArray[np.intp], v: FloatArray
    ) -> tuple[list[tuple[int, float]] | None, list[tuple[int, float]] | None]:
        """One ADWIN update per bank for the streams ``idx`` with block values ``v``."""
        u = self._settings.transform(v)
        pos = self._recent_pos[idx]
        if self._recent_step is None:
            self._recent[pos, idx] = u
        else:
            self._recent[pos, idx] = np.rint(u / self._recent_step)
        self._recent_pos[idx] = (pos + 1) % SCORE_SPLITS
        strict = self._feed_bank(self._adwins, self._win, idx, u, self._delta, self._settings)
        sensitive = None
        if self._s_thr is not None:
            st = self._s_settings
            if st.u_grid > 0.0:  # the same values on the sensitive tier's grid
                u = st.quantise(u)
            sensitive = self._feed_bank(self._s_adwins, self._s_win, idx, u, self._s_delta, st)
        return strict, sensitive

    def _feed_bank(
        self,
        adwins: list[Any],
        win: FloatArray,
        idx: npt.NDArray[np.intp],
        u: FloatArray,
        deltas: FloatArray,
        settings: AdwinSettings,
    ) -> list[tuple[int, float]] | None:
        win[0, idx] += 1.0
        win[1, idx] += u
        win[2, idx] += u * u
        hits: list[int] | None = None
        for i, val in zip(idx.tolist(), u.tolist(), strict=True):
            det = adwins[i]
            det.update(val)
            if det.drift_detected:
                if hits is None:
                    hits = []
                hits.append(i)
        if hits is None:
            return None
        out = []
        mw = settings.min_window_length
        for i in hits:
            newest_first = (self._recent_pos[i] - 1 - np.arange(SCORE_SPLITS)) % SCORE_SPLITS
            recent = self._recent[newest_first, i].astype(np.float64)
            if self._recent_step is not None:
                recent *= self._recent_step
            score = _adwin_score(recent, win[0, i], win[1, i], win[2, i], float(deltas[i]), mw)
            out.append((i, score))
            win[:, i] = 0.0  # river's ADWIN starts afresh on its next update
        return out

    def _monitor_means(self, means: FloatArray, k: int, frame: DeviceFrame) -> Outcome:
        assert self._ref_mean is not None
        assert self._inv_sd is not None
        assert self._skew is not None
        u = standardised_means(
            means[None, :],
            np.array([k]),
            self._ref_mean,
            self._inv_sd,
            self._skew,
            self.layout,
            self._var_within,
        )
        return self._monitor_u(u[0], frame)

    def _monitor_u(self, u: FloatArray, frame: DeviceFrame) -> Outcome:
        """:meth:`_monitor_means` once the frame's standardised means ``u`` are known."""
        strict, sensitive = self._feed(u)
        out = Outcome([], [])
        if strict is None and sensitive is None:
            return out
        streams = self.layout.streams
        tiers: tuple[tuple[list[tuple[int, float]] | None, list[Detection], DetectorName], ...] = (
            (strict, out.alarms, "adwin"),
            (sensitive, out.suspicions, "adwin_sensitive"),
        )
        for hits, dest, name in tiers:
            for i, score in hits or ():
                st = streams[i]
                dest.append(self._detection(st.signal, st.feature, name, score, frame.ts_ms))
        return out

    def _detection(
        self,
        signal: Signal,
        feature: str | None,
        detector: DetectorName,
        score: float,
        ts_ms: int,
    ) -> Detection:
        assert self._version is not None
        return Detection(
            fleet=self.fleet,
            device=self.device,
            scope="device",
            signal=signal,
            feature=feature,
            detector=detector,
            score=float(score),
            model_version=self._version,
            ts_ms=ts_ms,
            readings=self._readings,
        )

    # -- labels --------------------------------------------------------------------------------

    def update_labels(self, labels: DeviceLabels) -> list[Detection]:
        """Process labelled readings (the 0/1 error stream); returns the strict tier's alarms.

        Labels for another model version than the current one are ignored. The sensitive
        tier's suspicions are dropped: use :meth:`observe_labels` to get them too.
        """
        return self.observe_labels(labels).alarms

    def observe_labels(self, labels: DeviceLabels) -> Outcome:
        """Process labelled readings; their alarms and suspicions (see :meth:`update_labels`)."""
        if labels.fleet != self.fleet or labels.device != self.device:
            raise ValueError(
                f"labels of {labels.fleet}/{labels.device} given to the monitor of "
                f"{self.fleet}/{self.device}"
            )
        k = labels.k
        if labels.pred.shape != (k,):
            raise ValueError("pred and label need one entry per labelled reading")
        if self._version is None or labels.param_version != self._version:
            self.labels_ignored += k
            return Outcome([], [])
        self.last_labels = (labels.boot, labels.seq)
        errors = (labels.pred != labels.label).astype(np.float64)
        return self._monitor_errors(errors.tolist(), labels.ts_ms)

    def _start_error_stream(self) -> None:
        """Start the error detectors once the error stream's null is learnt (as for frames,
        one step per label; at least ``reference_labels`` labels)."""
        bm = self._lbl_bm
        assert bm is not None
        choice, candidate = confirm_blocks(
            bm,
            np.array([self._err_candidate]),
            min_blocks=self.config.null_min_blocks,
            horizon=self.config.null_horizon_labels,
        )
        self._err_candidate = int(candidate[0])
        if not choice.ready[0]:
            return  # not yet, or not confirmed by a second look (as for frames)
        self._err_block = int(choice.block[0])
        self._err_p = float(choice.mean[0])
        self._err_bsd = float(choice.sd[0])
        kap = float(choice.kappa[0])
        self._err_kappa = kap
        self._err_ref_var = kap * self._err_block / bm.steps
        self._set_error_detectors(kap)

    def _retighten_errors(self) -> None:
        """The error stream's κ against the longer blocks completed since it started (as
        :meth:`_retighten` for frames): until its first alarm, a grown κ tightens it."""
        bm = self._lbl_bm
        assert bm is not None
        if self._err_block == 0 or self._err_alarmed:
            return
        kap = inflation_at(bm, np.array([self._err_block]), min_blocks=self.config.null_min_blocks)
        if kap[0] > _KAPPA_STEP * self._err_kappa:
            self._err_ref_var *= float(kap[0]) / self._err_kappa
            self._err_kappa = float(kap[0])
            self._set_error_detectors(self._err_kappa)

    def _set_error_detectors(self, kap: float) -> None:
        """Error detectors for blocks of ``_err_block`` labels and inflation ``kap``: new ones,
        or the running ones retuned with their windows kept (as in :meth:`_retighten`)."""
        b = self._err_block
        # a block of b labels may spend b labels' budget; residual dependence tightens it
        thr = self._tier_thresholds(self._k_nom, sensitive=False, budget_scale=b)
        assert thr is not None
        self._label_thr = thr
        self._s_label_thr = self._tier_thresholds(self._k_nom, sensitive=True, budget_scale=b)
        delta = inflate_delta(thr.error_delta, kap)
        s_thr = self._s_label_thr
        s_delta = None if s_thr is None else inflate_delta(s_thr.error_delta, kap)
        # HDDM_A's Hoeffding bound with n/κ effective values: confidence^κ
        drift_conf = thr.hddm_drift_confidence**kap
        warn_conf = thr.hddm_warning_confidence**kap
        if self._err_adwin is not None:
            retune_delta(self._err_adwin, delta)
            if self._s_err_adwin is not None and s_delta is not None:
                retune_delta(self._s_err_adwin, s_delta)
            self._hddm.drift_confidence = drift_conf
            self._hddm.warning_confidence = warn_conf
            if self._err_cusum is not None:
                self._err_cusum.set_kappa(kap)
            return
        self._err_adwin = make_adwin(delta, ERROR_ADWIN)
        self._err_win = [0.0, 0.0, 0.0]
        if s_delta is not None:
            self._s_err_adwin = make_adwin(s_delta, ERROR_ADWIN)
            self._s_err_win = [0.0, 0.0, 0.0]
        self._hddm = drift.binary.HDDMA(
            drift_confidence=drift_conf, warning_confidence=warn_conf, two_sided_test=False
        )

    def _monitor_errors(self, errors: list[float], ts_ms: int) -> Outcome:
        out = Outcome([], [])
        for e in errors:
            self._lbl_ref_n += 1
            if self._err_block:
                self._err_bsum += e
                self._err_bn += 1
                if self._err_bn >= self._err_block:
                    m = self._err_bsum / self._err_bn
                    self._err_bsum = 0.0
                    self._err_bn = 0
                    self._feed_error(m, ts_ms, out)
            bm = self._lbl_bm
            if bm is not None:
                bm.add(np.array([e]))
                n = bm.steps
                if n >= self.config.reference_labels and new_level_complete(
                    n, self.config.null_min_blocks
                ):
                    if self._err_block:
                        self._retighten_errors()
                    else:
                        self._start_error_stream()
                    block = np.array([self._err_block])
                    if self._err_block and _learnt(
                        bm, block, self.config.null_min_blocks, self.config.null_horizon_labels
                    ):
                        self._lbl_bm = None  # its memory is released
        return out

    def _feed_error(self, m: float, ts_ms: int, out: Outcome) -> None:
        """One block mean ``m`` of the error stream into its detectors."""
        adw, hddm, thr = self._err_adwin, self._hddm, self._label_thr
        assert adw is not None
        assert hddm is not None
        assert thr is not None
        s_adw = self._s_err_adwin
        win, s_win = self._err_win, self._s_err_win
        pos = self._err_recent_pos
        self._err_recent[pos] = round(m * 255.0)
        self._err_recent_pos = (pos + 1) % ERROR_SCORE_SPLITS
        mm = m * m
        win[0] += 1.0
        win[1] += m
        win[2] += mm
        adw.update(m)
        cus = self._error_cusum()
        cus_score = cus.update(m)
        if adw.drift_detected:
            self._err_alarmed = True
            score = self._error_score(win, adw.delta)
            out.alarms.append(self._detection("error", None, "adwin", score, ts_ms))
            if not cus_score:
                cus.restart()  # the change is announced: the CUSUM re-bases on its excursion
        if cus_score:
            self._err_alarmed = True
            out.alarms.append(self._detection("error", None, "cusum", cus_score, ts_ms))
        if s_adw is not None:
            s_win[0] += 1.0
            s_win[1] += m
            s_win[2] += mm
            s_adw.update(m)
            if s_adw.drift_detected:
                score = self._error_score(s_win, s_adw.delta)
                out.suspicions.append(
                    self._detection("error", None, "adwin_sensitive", score, ts_ms)
                )
        hddm.update(m)
        if hddm.drift_detected:  # not an alarm: its budget share is the CUSUM's
            self._warning = False
        elif hddm.warning_detected:
            if not self._warning:
                self._warning = True
                out.alarms.append(self._detection("error", None, "hddm_a_warning", 1.0, ts_ms))
        else:
            self._warning = False

    def _error_cusum(self) -> ErrorCusum:
        """The error stream's CUSUM (:mod:`service.drift.error_cusum`), built on the first block
        from what the null learning found: the reference is the learning stretch (its
        ``κ · b / _err_ref_var`` labels at the rate ``_err_p``), the dispersion ``φ`` that of a
        block mean against independent labels, and it spends the error detector's share of
        the strict budget per label (the share HDDM_A's drift alarm had; ``_label_thr`` is set
        for blocks of ``b`` labels, so its ``label_budget`` is ``b`` labels'). Its own batch
        means count from as many labels on as the learning stretch held (``checked_labels``).
        A checkpoint written before the CUSUM existed gets one the same way."""
        cus = self._err_cusum
        if cus is not None:
            return cus
        thr = self._label_thr
        assert thr is not None
        b = self._err_block
        p = self._err_p
        n = self._err_kappa * b / self._err_ref_var if self._err_ref_var > 0 else float(b)
        pq = p * (1.0 - p)
        phi = b * self._err_bsd**2 / pq if pq > 0 and math.isfinite(self._err_bsd) else 1.0
        cus = ErrorCusum(
            label_budget=thr.label_budget / b,
            block=b,
            kappa=self._err_kappa,
            dispersion=phi,
            reference_labels=n,
            reference_errors=min(max(p, 0.0), 1.0) * n,
            min_blocks=self.config.null_min_blocks,
            checked_labels=n,
        )
        self._err_cusum = cus
        return cus

    def _error_score(self, win: list[float], delta: float) -> float:
        """ADWIN's statistic on the error stream when it fired; resets ``win``."""
        pos = self._err_recent_pos
        newest_first = (pos - 1 - np.arange(ERROR_SCORE_SPLITS)) % ERROR_SCORE_SPLITS
        score = _adwin_score(
            self._err_recent[newest_first].astype(np.float64) / 255.0,
            win[0],
            win[1],
            win[2],
            delta,
            ERROR_ADWIN.min_window_length,
        )
        win[0] = win[1] = win[2] = 0.0
        return score

    # -- status --------------------------------------------------------------------------------

    def band_scores(self) -> dict[Stream, float]:
        """Per calibrated stream: |current ADWIN-window mean − reference| / (its standard error ·
        band).

        ≥ 1 means outside the calibrated band (see :attr:`drifting`). The window mean is of the
        centred block values before their skew correction, which does not keep the mean: on
        skewed ``z²`` streams of stationary devices the corrected values' mean sat 0.1 block sd
        below 0, outside the band once windows held ~10⁴ blocks. The standard error holds
        the window's (``κ / w`` in block units: the residual dependence) and the reference's
        (the long-run variance over the learning stretch). Streams still calibrating, and the
        error stream until it is calibrated, are absent.
        """
        thr = self._thr
        if thr is None:
            return {}
        out: dict[Stream, float] = {}
        for i in np.flatnonzero(self._ready).tolist():
            det = self._adwins[i]
            w = float(det.width)
            if w == 0:
                out[self.layout.streams[i]] = 0.0
                continue
            mean_u = float(self._raw[i]) / w
            se = math.sqrt(float(self._kappa[i]) / w + float(self._ref_var[i]))
            out[self.layout.streams[i]] = abs(mean_u) / se / thr.drifting_z
        adw = self._err_adwin
        if adw is not None:
            w = float(adw.width)
            if w == 0:
                out[ERROR_STREAM] = 0.0
            else:
                sd = max(self._err_bsd, 1e-3)
                se = sd * math.sqrt(self._err_kappa / w + self._err_ref_var)
                out[ERROR_STREAM] = abs(float(adw.total) / w - self._err_p) / se / thr.drifting_z
        return out

    @property
    def drifting(self) -> tuple[Stream, ...]:
        """Streams whose current window mean lies outside the reference's calibrated band.

        The band is ``drifting_z`` standard errors of (window mean − reference mean), where
        ``drifting_z`` is the two-sided normal quantile at ``drifting_alpha / (S + 1)``; under no
        drift a device shows any stream here with probability about ``drifting_alpha``. After a
        detection ADWIN restarts its window, so this says whether the device is *still* off its
        reference, not whether it ever was.
        """
        return tuple(st for st, s in self.band_scores().items() if s >= 1.0)

    # -- checkpoints ---------------------------------------------------------------------------

    def snapshot(self) -> MonitorSnapshot:
        """The monitor's state as copies (numbers, small arrays, river's ADWIN bytes): cheap
        to take (the engine takes it under its lock); :meth:`MonitorSnapshot.encode` does the
        costly packing and compression, anywhere."""
        cfg = self.config
        f32 = _copy_or_none
        state: dict[str, Any] = {
            "fleet": self.fleet,
            "device": self.device,
            "feature_names": list(self.layout.feature_names),
            "class_names": list(self.layout.class_names),
            "config": _config_state(cfg),
            "normal": None if self.normal is None else self.normal.state(),
            "labels_ignored": self.labels_ignored,
            "last_frame": _pair(self.last_frame),
            "last_labels": _pair(self.last_labels),
            "version": self._version,
            "saved_version": (
                None
                if self._saved_version is None
                else {"version": self._saved_version[0], "state": self._saved_version[1]}
            ),
            "readings": self._readings,
            "ref_n": self._ref_n,
            "buf_x": f32(self._buf_x),
            "buf_pred": f32(self._buf_pred),
            "buf_conf": f32(self._buf_conf),
            "ref_ks": None if self._ref_ks is None else list(self._ref_ks),
            "ref_takes": None if self._ref_takes is None else list(self._ref_takes),
            "var_within": self._var_within,
            "k_nom": self._k_nom,
            "horizon": self._horizon,
            "settings": self._settings.to_json(),
            "s_settings": self._s_settings.to_json(),
            "thr": _thr_state(self._thr),
            "s_thr": _thr_state(self._s_thr),
            "bm": None if self._bm is None else self._bm.state(),
            "clock": self._clock.state(),
            "win_sq": self._win[2].copy(),
            "s_win_sq": self._s_win[2].copy(),
            "recent": self._recent.copy(),
            "recent_step": self._recent_step,
            "lbl_ref_n": self._lbl_ref_n,
            "lbl_bm": None if self._lbl_bm is None else self._lbl_bm.state(),
            "err_win": list(self._err_win),
            "s_err_win": list(self._s_err_win),
            "err_recent": self._err_recent.copy(),
            "err_recent_pos": self._err_recent_pos,
            "hddm": None if self._hddm is None else hddm_state(self._hddm),
            "warning": self._warning,
            "err_cusum": None if self._err_cusum is None else self._err_cusum.state(),
            "label_thr": _thr_state(self._label_thr),
            "s_label_thr": _thr_state(self._s_label_thr),
        }
        for name in _REF_ARRAYS:
            state[name] = f32(getattr(self, "_" + name))
        for name in _STREAM_ARRAYS:
            state[name] = getattr(self, "_" + name).copy()
        for name in _ERROR_NUMBERS:
            state[name] = getattr(self, "_" + name)
        banks = [getattr(self, name) for name in _BANKS]
        singles = [getattr(self, name) for name in _SINGLE_ADWINS]
        state["adwins_present"] = [[d is not None for d in b] for b in banks]
        state["error_adwins_present"] = [d is not None for d in singles]
        dets = [d for b in banks for d in b if d is not None]
        dets += [d for d in singles if d is not None]
        return MonitorSnapshot(state, capture_adwins(dets))

    def state_bytes(self) -> bytes:
        """The whole monitor as a versioned, compressed checkpoint (see the module docstring)."""
        return self.snapshot().encode()

    @classmethod
    def from_state_bytes(cls, data: bytes) -> DeviceMonitor:
        """Restore a monitor from :meth:`state_bytes`; ``CheckpointFormatError`` if not one
        (another magic or format version, which is never decoded, or a damaged body)."""
        state = unpack_state(check_header(data, STATE_MAGIC, STATE_FORMAT))
        try:
            return cls._from_state(state)
        except CheckpointFormatError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, StopIteration) as exc:
            raise CheckpointFormatError(f"corrupt device monitor checkpoint: {exc!r}") from exc

    @classmethod
    def _from_state(cls, state: Mapping[str, Any]) -> DeviceMonitor:
        """Inverse of :meth:`snapshot` (after decoding); every array checked for its shape."""
        normal = state["normal"]
        mon = cls(
            str(state["fleet"]),
            str(state["device"]),
            [str(x) for x in state["feature_names"]],
            [str(x) for x in state["class_names"]],
            _config_from_state(state["config"]),
            None if normal is None else DeclaredNormal.from_state(normal),
        )
        lay = mon.layout
        s, f, n_ref = lay.n_streams, lay.n_features, mon.config.reference_readings
        mon.labels_ignored = int(state["labels_ignored"])
        mon.last_frame = _pair_from(state["last_frame"])
        mon.last_labels = _pair_from(state["last_labels"])
        version = state["version"]
        mon._version = None if version is None else int(version)
        saved = state["saved_version"]
        if saved is not None:
            blob = saved["state"]
            if not isinstance(blob, bytes):
                raise TypeError("saved version state must be bytes")
            mon._saved_version = (int(saved["version"]), blob)
        mon._readings = int(state["readings"])
        mon._ref_n = int(state["ref_n"])
        mon._buf_x = _array_or_none(state["buf_x"], np.float32, (n_ref, f))
        mon._buf_pred = _array_or_none(state["buf_pred"], np.int32, (n_ref,))
        mon._buf_conf = _array_or_none(state["buf_conf"], np.float32, (n_ref,))
        for name in ("ref_ks", "ref_takes"):
            v = state[name]
            setattr(mon, "_" + name, None if v is None else [int(x) for x in v])
        for name, size in _REF_ARRAYS.items():
            shape = (f,) if size == "F" else (s,)
            setattr(mon, "_" + name, _array_or_none(state[name], np.float64, shape))
        mon._var_within = bool(state["var_within"])
        mon._k_nom = int(state["k_nom"])
        mon._horizon = int(state["horizon"])
        mon._settings = AdwinSettings.from_json(state["settings"])
        mon._s_settings = AdwinSettings.from_json(state["s_settings"])
        mon._thr = _thr_from(state["thr"])
        mon._s_thr = _thr_from(state["s_thr"])
        bm = state["bm"]
        mon._bm = None if bm is None else _batch_means(bm, s)
        mon._clock = FrameClock.from_state(state["clock"])
        for name, dtype in _STREAM_ARRAYS.items():
            setattr(mon, "_" + name, _array(state[name], dtype, (s,)))
        recent = np.asarray(state["recent"])
        if recent.dtype not in (np.int8, np.float16) or recent.shape != (SCORE_SPLITS, s):
            raise ValueError("score ring of the wrong dtype or shape")
        mon._recent = recent
        step = state["recent_step"]
        mon._recent_step = None if step is None else float(step)
        mon._lbl_ref_n = int(state["lbl_ref_n"])
        lbl_bm = state["lbl_bm"]
        mon._lbl_bm = None if lbl_bm is None else _batch_means(lbl_bm, 1)
        for name, kind in _ERROR_NUMBERS.items():
            setattr(mon, "_" + name, kind(state[name]))
        for name in ("err_win", "s_err_win"):
            win = [float(x) for x in state[name]]
            if len(win) != 3:
                raise ValueError(f"{name} needs three sums")
            setattr(mon, "_" + name, win)
        mon._err_recent = _array(state["err_recent"], np.uint8, (ERROR_SCORE_SPLITS,))
        mon._err_recent_pos = int(state["err_recent_pos"]) % ERROR_SCORE_SPLITS
        hddm = state["hddm"]
        mon._hddm = None if hddm is None else hddm_from_state(hddm)
        mon._warning = bool(state["warning"])
        cus = state["err_cusum"]
        mon._err_cusum = None if cus is None else ErrorCusum.from_state(cus)
        mon._label_thr = _thr_from(state["label_thr"])
        mon._s_label_thr = _thr_from(state["s_label_thr"])
        dets = iter(unpack_adwins(state["adwins"]))
        present = state["adwins_present"]
        singles = state["error_adwins_present"]
        if len(present) != len(_BANKS) or len(singles) != len(_SINGLE_ADWINS):
            raise ValueError("ADWIN banks do not match the layout")
        for name, flags in zip(_BANKS, present, strict=True):
            if len(flags) != s:
                raise ValueError("ADWIN bank does not match the streams")
            setattr(mon, name, [next(dets) if f else None for f in flags])
        for name, flag in zip(_SINGLE_ADWINS, singles, strict=True):
            setattr(mon, name, next(dets) if flag else None)
        if next(dets, None) is not None:
            raise ValueError("ADWIN count does not match the layout")
        # count and sum since each frame ADWIN's reset are its own width and total, exactly
        for bank, name, key in zip(_BANKS, _BANK_WINS, ("win_sq", "s_win_sq"), strict=True):
            sums = np.zeros((3, s), dtype=np.float64)
            sums[2] = _array(state[key], np.float64, (s,))
            for i, det in enumerate(getattr(mon, bank)):
                if det is not None and not det.drift_detected:
                    sums[0, i] = det.width
                    sums[1, i] = det.total
            setattr(mon, name, sums)
        return mon

    def memory_bytes(self) -> int:
        """Estimated memory of this device's state: the size of its checkpoint."""
        return len(self.state_bytes())

    def raw_state_bytes(self) -> int:
        """Size of the state before compression (for comparison with research §3.1)."""
        return len(self.snapshot().encode(compress=False))

    # -- batches -------------------------------------------------------------------------------

    def _fast_ok(self, frame: DeviceFrame) -> bool:
        return self._mu is not None and frame.param_version == self._version


@dataclass(frozen=True, slots=True)
class MonitorSnapshot:
    """A device monitor's state as copies (:meth:`DeviceMonitor.snapshot`)."""

    state: dict[str, Any]
    """Numbers, strings and array copies (:mod:`service.drift.checkpoint_format`)."""
    adwins: list[AdwinCapture]
    """river's ADWIN states, copied, packed by :meth:`encode`."""

    @property
    def last_frame(self) -> tuple[int, int] | None:
        """``(boot, seq)`` of the last frame in this state."""
        return _pair_from(self.state["last_frame"])

    def encode(self, *, compress: bool = True) -> bytes:
        """The checkpoint (``TDDM`` v4): ADWINs packed, the tree stored without pickle."""
        tree = dict(self.state)
        tree["adwins"] = pack_adwins(self.adwins)
        if not compress:
            return pack_state_raw(tree)
        return add_header(STATE_MAGIC, STATE_FORMAT, pack_state(tree))


_REF_ARRAYS: Final = {"mu": "F", "sigma": "F", "ref_mean": "S", "inv_sd": "S", "skew": "S"}
"""The fixed reference (``None`` until it is complete), sized by features or streams."""
_STREAM_ARRAYS: Final = {
    "ready": np.bool_, "block": np.int64, "kappa": np.float64, "center": np.float64,
    "bsd": np.float64, "bskew": np.float64, "candidate": np.int64, "alarmed": np.bool_,
    "ref_var": np.float64, "delta": np.float64, "s_delta": np.float64, "bsum": np.float64,
    "bn": np.int64, "raw": np.float64, "recent_pos": np.int64,
}  # fmt: skip
"""One value per stream."""
_ERROR_NUMBERS: Final[dict[str, Callable[[Any], Any]]] = {
    "err_block": int, "err_kappa": float, "err_p": float, "err_bsd": float,
    "err_candidate": int, "err_alarmed": bool, "err_ref_var": float, "err_bsum": float,
    "err_bn": int,
}  # fmt: skip
"""The error stream's numbers."""


def _copy_or_none(a: npt.NDArray[Any] | None) -> npt.NDArray[Any] | None:
    return None if a is None else a.copy()


def _pair(p: tuple[int, int] | None) -> list[int] | None:
    return None if p is None else [int(p[0]), int(p[1])]


def _pair_from(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    a, b = v
    return int(a), int(b)


def _array(v: Any, dtype: Any, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """``v`` as an array of ``dtype`` and ``shape`` (``ValueError`` otherwise)."""
    if not isinstance(v, np.ndarray) or v.dtype != np.dtype(dtype) or v.shape != shape:
        raise ValueError(f"array of {getattr(v, 'dtype', type(v))} {getattr(v, 'shape', '')}, "
                         f"expected {np.dtype(dtype)} {shape}")  # fmt: skip
    return v


def _array_or_none(v: Any, dtype: Any, shape: tuple[int, ...]) -> npt.NDArray[Any] | None:
    return None if v is None else _array(v, dtype, shape)


def _batch_means(state: Mapping[str, Any], n_streams: int) -> DyadicBatchMeans:
    bm = DyadicBatchMeans.from_state(state)
    if bm.n_streams != n_streams:
        raise ValueError("batch means of another stream count")
    return bm


def _thr_state(thr: Thresholds | None) -> dict[str, Any] | None:
    return None if thr is None else calibration.thresholds_state(thr)


def _thr_from(state: Any) -> Thresholds | None:
    return None if state is None else calibration.thresholds_from_state(state)


def _config_state(cfg: DeviceMonitorConfig) -> dict[str, Any]:
    """A :class:`DeviceMonitorConfig` as JSON values (its calibration table as its JSON)."""
    out: dict[str, Any] = {}
    for name in DeviceMonitorConfig.__dataclass_fields__:
        v = getattr(cfg, name)
        out[name] = v.to_json() if isinstance(v, calibration.CalibrationTable) else v
    return out


def _config_from_state(state: Mapping[str, Any]) -> DeviceMonitorConfig:
    """Inverse of :func:`_config_state` (validated as any configuration)."""
    values = dict(state)
    if set(values) != set(DeviceMonitorConfig.__dataclass_fields__):
        raise ValueError(f"monitor configuration with fields {sorted(values)}")
    table = values.pop("calibration_table")
    for name, v in values.items():
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise ValueError(f"configuration {name} is not a number")
    return DeviceMonitorConfig(
        **values,
        calibration_table=None if table is None else calibration.CalibrationTable.from_json(table),
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What :func:`update_frames` returns."""

    detections: list[Detection]
    """The strict tier's alarms."""
    rejected: list[tuple[DeviceFrame, str]]
    """Frames that were refused, with the reason (nothing of them was processed)."""
    suspicions: list[Detection] = field(default_factory=list)
    """The sensitive tier's suspicions (not alarms: for the cohort rule)."""


def _validate(
    pairs: Sequence[tuple[DeviceFrame, DeviceMonitor]],
) -> list[str | None]:
    """Per frame: why :meth:`DeviceMonitor._check_frame` refuses it (``None``: valid).

    The structure is checked frame by frame; the class range of every structurally valid frame
    at once (one ``reduceat`` each for the minimum and the maximum), and a frame out of range is
    checked again on its own for the exact message."""
    reasons: list[str | None] = [None] * len(pairs)
    ok: list[int] = []
    for i, (fr, mon) in enumerate(pairs):
        try:
            mon._check_structure(fr)
        except ValueError as exc:
            reasons[i] = str(exc)
            continue
        ok.append(i)
    if not ok:
        return reasons
    preds = [pairs[i][0].pred for i in ok]
    ks = np.fromiter((p.shape[0] for p in preds), dtype=np.int64, count=len(ok))
    starts = np.zeros(len(ok), dtype=np.int64)
    np.cumsum(ks[:-1], out=starts[1:])
    every = np.concatenate(preds)
    lo = np.minimum.reduceat(every, starts)
    hi = np.maximum.reduceat(every, starts)
    c = np.fromiter((pairs[i][1].layout.n_classes for i in ok), dtype=np.int64, count=len(ok))
    for j in np.flatnonzero((lo < 0) | (hi >= c)).tolist():
        fr, mon = pairs[ok[j]]
        try:
            mon._check_frame(fr)
        except ValueError as exc:
            reasons[ok[j]] = str(exc)
    return reasons


def _rows(vectors: list[FloatArray]) -> FloatArray:
    """``np.stack`` of equally long vectors, as one ``concatenate`` (no view per vector)."""
    out: FloatArray = np.concatenate(vectors).reshape(len(vectors), -1)
    return out


def update_frames(
    monitors: Mapping[tuple[str, str], DeviceMonitor], frames: Sequence[DeviceFrame]
) -> BatchResult:
    """Process a drained batch of frames of many devices, in order per device.

    Frames of devices whose reference is complete (and whose model version does not change)
    are processed together as far as arrays allow: their stream means with one
    ``np.add.reduceat`` per schema (:func:`service.drift.signals.batch_frame_means_arrays`),
    then their standardised, skew-corrected means ``u`` as ``[frames, S]`` array operations
    (element by element the same operations as :meth:`DeviceMonitor.observe`, so the same
    values); each device's monitor then takes its ``u`` (block accumulation, null learning,
    detectors). The others take :meth:`DeviceMonitor.observe`. A frame with no monitor under
    ``frame.key`` or failing validation is returned in ``rejected`` and skipped.
    """
    found: list[tuple[DeviceFrame, DeviceMonitor]] = []
    reasons: list[str | None] = []
    for fr in frames:
        mon = monitors.get((fr.fleet, fr.device))
        if mon is None:
            reasons.append("no monitor")
            continue
        reasons.append(None)
        found.append((fr, mon))
    checked = iter(_validate(found))
    rejected: list[tuple[DeviceFrame, str]] = []
    accepted: list[tuple[DeviceFrame, DeviceMonitor]] = []
    pairs = iter(found)
    for fr, reason in zip(frames, reasons, strict=True):
        if reason is not None:
            rejected.append((fr, reason))
            continue
        pair = next(pairs)
        bad = next(checked)
        if bad is not None:
            rejected.append((fr, bad))
        else:
            accepted.append(pair)
    # the fast prefix of each device (reference complete, same model version), grouped by shape
    slow_devices: set[tuple[str, str]] = set()
    groups: dict[tuple[int, int, float], list[int]] = {}
    for i, (fr, mon) in enumerate(accepted):
        key = (fr.fleet, fr.device)
        if key in slow_devices:
            continue
        if mon._fast_ok(fr):
            lay = mon.layout
            groups.setdefault((lay.n_features, lay.n_classes, mon.config.z_clip), []).append(i)
        else:
            slow_devices.add(key)
    us: list[FloatArray | None] = [None] * len(accepted)
    for (_, n_classes, z_clip), idx in groups.items():
        frs = [accepted[i][0] for i in idx]
        mons = [accepted[i][1] for i in idx]
        ks = np.fromiter((f.pred.shape[0] for f in frs), dtype=np.int64, count=len(frs))
        mu = _rows([m._mu for m in mons if m._mu is not None])
        sigma = _rows([m._sigma for m in mons if m._sigma is not None])
        rows = batch_frame_means_arrays(
            np.concatenate([f.features for f in frs]).astype(np.float64, copy=False),
            np.concatenate([f.pred for f in frs]).astype(np.int64, copy=False),
            np.concatenate([f.conf for f in frs]).astype(np.float64, copy=False),
            ks,
            mu,
            sigma,
            n_classes,
            z_clip,
        )
        # DeviceMonitor._monitor_means, every frame of the group at once
        ref_mean = _rows([m._ref_mean for m in mons if m._ref_mean is not None])
        inv_sd = _rows([m._inv_sd for m in mons if m._inv_sd is not None])
        skew = _rows([m._skew for m in mons if m._skew is not None])
        within = np.fromiter((m._var_within for m in mons), dtype=np.bool_, count=len(mons))
        u = standardised_means(rows, ks, ref_mean, inv_sd, skew, mons[0].layout, within)
        for j, i in enumerate(idx):
            us[i] = u[j]
    out: list[Detection] = []
    suspicions: list[Detection] = []
    for (fr, mon), row in zip(accepted, us, strict=True):
        if row is None:
            res = mon.observe(fr)
        else:
            mon.last_frame = (fr.boot, fr.seq)
            mon._clock.note(fr.boot, fr.ts_ms)
            mon._readings += fr.pred.shape[0]
            res = mon._monitor_u(row, fr)
        out += res.alarms
        suspicions += res.suspicions
    return BatchResult(out, rejected, suspicions)
