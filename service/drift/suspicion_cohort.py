"""The cohort rule on layer A's suspicions: a fleet-level alarm when too many devices suspect.

Layer A's sensitive tier (:class:`~service.drift.device_monitor.DeviceMonitor`, about river
``ADWIN()``'s false-alarm rate) raises *suspicions*: a 10,000-device fleet at one reading per
second raises about one per second under no drift, so they are never device alarms. This rule
turns them into a fleet-level alarm that holds the false-alarm budget (research drift-anchors
§6, layer B item 3: "the cohort rule absorbs them").

Rule, per cohort ``(fleet, schema, model version)`` and tumbling window (default 5 minutes of
the service's clock, aligned to multiples of ``window_ms``):

- every device with readings monitored by the sensitive tier in the window has, under no drift,
  a known bound on its suspicion probability: ``q_i = min(1, r_i · n_i)`` with ``n_i`` its
  readings in the window and ``r_i`` its calibrated suspicion rate per reading
  (:attr:`DeviceMonitor.suspicion_rate`: the calibration curves at the δ in use, times
  :data:`~service.drift.calibration.FRAME_MODEL_MARGIN` on the frame streams, as if every
  reading were labelled). ``r_i · n_i`` bounds the expected number of suspicions, so it bounds
  the probability of at least one (Markov) however the suspicions cluster;
- ``X`` = devices with at least one suspicion in the window. Under no drift, with devices
  independent, ``X`` is stochastically below a Poisson-binomial with probabilities ``q_i``,
  and by Hoeffding (1956) that is more concentrated than ``Binom(N, q̄)`` (``q̄`` the mean
  ``q_i``, ``N`` the devices) above its mean: ``P(X ≥ c) ≤ P(Binom(N, q̄) ≥ c)`` for
  ``c ≥ N q̄ + 1``;
- the alarm fires when ``X`` exceeds ``bound = max(binomial_bound(N, q̄, α), ⌈N q̄⌉)``
  (:func:`~service.drift.cohort_monitor.binomial_bound`), so a window alarms falsely with
  probability at most ``α``;
- ``α = min(B_c · Σ n_i, max_window_alpha)``: the window spends the rule's budget ``B_c`` per
  device-reading (by default half the fleet budget, ``DeviceMonitorConfig.cohort_budget``;
  the strict tier's device alarms spend the other half), so the expected false cohort alarms
  per device-reading are at most ``B_c``. The cap (default 0.01) only lowers that: a large
  fleet would otherwise spend its budget as several false alarms a day.

For 50 devices with 300 readings each at the default rates (``r = 10⁻⁴``, ``B_c = 5·10⁻⁸``):
``q = 0.03``, ``α = 7.5·10⁻⁴`` and the alarm needs 7 suspicious devices; for 1,000 devices 44.

A window is evaluated when the first batch after its end arrives (:meth:`SuspicionCohort.advance`:
the engine calls it with the batch's receive time before adding the batch). A suspicion from a
device with no readings in the window (labels of readings from an earlier window) is not
counted (``ignored`` in the report): the null model covers only devices with readings.

Detection: ``scope="cohort"``, ``detector="cohort_suspicions"``, score ``X / (bound + 1)``,
signal and feature the most frequent among the window's counted suspicions, ``ts_ms`` the end
of the window, ``readings`` the cohort's monitored readings so far.

>>> from service.drift.detection import Detection
>>> cohort = SuspicionCohort("f", 1, SuspicionCohortConfig(window_ms=1000))
>>> cohort.advance(0) is None
True
>>> for d in range(50):
...     cohort.add_readings(f"d{d}", 300, 1e-4)
>>> for d in range(9):
...     cohort.add_suspicion(Detection("f", f"d{d}", "device", "feature", "mean_x",
...                                    "adwin_sensitive", 1.0, 1, 500, 3000))
>>> report = cohort.advance(1000)
>>> report.devices, report.suspicious_devices, report.bound, report.alarm
(50, 9, 6, True)
>>> report.detection.detector, report.detection.signal, report.detection.feature
('cohort_suspicions', 'feature', 'mean_x')
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, cast

from service.drift.calibration import DEFAULT_BUDGET, DEFAULT_STRICT_SHARE
from service.drift.checkpoint_format import CheckpointFormatError, add_header, check_header
from service.drift.cohort_monitor import binomial_bound
from service.drift.detection import SIGNALS, Detection, Signal

__all__ = [
    "STATE_FORMAT",
    "SuspicionCohort",
    "SuspicionCohortConfig",
    "SuspicionWindowReport",
    "suspicion_bound",
]

STATE_MAGIC: Final = b"TDSC"
STATE_FORMAT: Final = 1
"""Version of :meth:`SuspicionCohort.state_bytes`."""


@dataclass(frozen=True, slots=True)
class SuspicionCohortConfig:
    """Settings of the cohort rule on suspicions (see the module docstring)."""

    window_ms: int = 300_000
    """Length of the tumbling window (service clock)."""
    budget_per_device_reading: float = DEFAULT_BUDGET * (1.0 - DEFAULT_STRICT_SHARE)
    """False cohort alarms per device-reading this rule may raise (``B_c``)."""
    max_window_alpha: float = 0.01
    """Cap of a window's false-alarm probability."""

    def __post_init__(self) -> None:
        if self.window_ms < 1:
            raise ValueError("window_ms must be >= 1")
        if not self.budget_per_device_reading >= 0.0:
            raise ValueError("budget_per_device_reading must be >= 0")
        if not 0.0 < self.max_window_alpha < 0.5:
            raise ValueError("max_window_alpha must be in (0, 0.5)")


def suspicion_bound(q: Sequence[float], alpha: float) -> int:
    """Suspicious devices tolerated: ``X > bound`` has probability ≤ ``alpha`` when device ``i``
    suspects independently with probability ≤ ``q[i]`` (Hoeffding's binomial domination).

    ``alpha = 0`` (no budget) tolerates every device: the rule never fires.

    >>> suspicion_bound([0.03] * 50, 7.5e-4), suspicion_bound([0.03] * 1000, 0.01)
    (6, 43)
    >>> suspicion_bound([0.5, 0.0], 0.01), suspicion_bound([], 0.01)
    (2, 0)
    """
    n = len(q)
    if n == 0:
        return 0
    if alpha <= 0.0:
        return n
    q_mean = min(1.0, max(0.0, math.fsum(q) / n))
    return max(binomial_bound(n, q_mean, alpha), math.ceil(n * q_mean - 1e-12))


@dataclass(frozen=True, slots=True)
class SuspicionWindowReport:
    """One evaluated window of one cohort."""

    fleet: str
    model_version: int
    window_start_ms: int
    window_end_ms: int
    devices: int
    """Devices with monitored readings in the window (``N``)."""
    readings: int
    """Their readings in the window (``Σ n_i``)."""
    suspicions: int
    """Suspicions counted (from those devices)."""
    ignored: int
    """Suspicions of devices without readings in the window (not counted)."""
    suspicious_devices: int
    """``X``: devices with at least one counted suspicion."""
    mean_q: float
    """``q̄``: the mean per-device suspicion probability bound under no drift."""
    alpha: float
    """The window's false-alarm probability (its share of the budget)."""
    bound: int
    alarm: bool
    detection: Detection | None


_RENAMED: Final = {"feature_sq": "feature_var"}
"""Signals of older checkpoints under their current name (the same stream of each feature)."""


def _signal(name: object) -> Signal:
    name = _RENAMED.get(str(name), name)
    if name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}")
    return cast(Signal, name)


class SuspicionCohort:
    """The rule for one cohort (not thread-safe: the engine's lock serialises calls)."""

    def __init__(
        self, fleet: str, model_version: int, config: SuspicionCohortConfig | None = None
    ) -> None:
        self.fleet = fleet
        self.model_version = model_version
        self.config = config if config is not None else SuspicionCohortConfig()
        self._start: int | None = None
        self._readings: dict[str, list[float]] = {}  # device → [readings, rate]
        self._suspicions: dict[str, list[tuple[Signal, str | None]]] = {}  # device → signals
        self.total_readings = 0
        """Monitored readings of the cohort so far (all windows)."""

    @property
    def window_start_ms(self) -> int | None:
        """Start of the open window (``None`` before the first :meth:`advance`)."""
        return self._start

    def advance(self, now_ms: int) -> SuspicionWindowReport | None:
        """Move the clock to ``now_ms``: closes and evaluates the open window if it has ended.

        The first call opens the window that contains ``now_ms``. Empty windows in between
        are skipped. Returns the closed window's report, else ``None``.
        """
        w = self.config.window_ms
        now = int(now_ms)
        if self._start is None:
            self._start = now - now % w
            return None
        if now < self._start + w:
            return None
        report = self._evaluate(self._start + w)
        self._start = now - now % w
        self._readings = {}
        self._suspicions = {}
        return report

    def add_readings(self, device: str, readings: int, rate: float) -> None:
        """``readings`` of ``device`` monitored by its sensitive tier (``rate``: its
        :attr:`~service.drift.device_monitor.DeviceMonitor.suspicion_rate`)."""
        if readings < 0 or not rate >= 0.0:
            raise ValueError("need readings >= 0 and rate >= 0")
        slot = self._readings.get(device)
        if slot is None:
            self._readings[device] = [float(readings), float(rate)]
        else:
            slot[0] += readings
            slot[1] = max(slot[1], float(rate))
        self.total_readings += readings

    def add_suspicion(self, detection: Detection) -> None:
        """One suspicion of a device of this cohort."""
        if detection.device is None:
            raise ValueError("a suspicion names its device")
        self._suspicions.setdefault(detection.device, []).append(
            (detection.signal, detection.feature)
        )

    def _evaluate(self, end_ms: int) -> SuspicionWindowReport:
        assert self._start is not None
        cfg = self.config
        q = [min(1.0, n * r) for n, r in self._readings.values()]
        readings = int(sum(n for n, _ in self._readings.values()))
        alpha = min(cfg.budget_per_device_reading * readings, cfg.max_window_alpha)
        bound = suspicion_bound(q, alpha)
        counted: Counter[tuple[Signal, str | None]] = Counter()
        suspicious = 0
        n_counted = n_ignored = 0
        for device, signals in self._suspicions.items():
            if device in self._readings:
                suspicious += 1
                n_counted += len(signals)
                counted.update(signals)
            else:
                n_ignored += len(signals)
        alarm = bool(q) and suspicious > bound
        detection = None
        if alarm:
            (signal, feature), _ = counted.most_common(1)[0]
            detection = Detection(
                fleet=self.fleet,
                device=None,
                scope="cohort",
                signal=signal,
                feature=feature,
                detector="cohort_suspicions",
                score=suspicious / (bound + 1),
                model_version=self.model_version,
                ts_ms=end_ms,
                readings=self.total_readings,
            )
        return SuspicionWindowReport(
            fleet=self.fleet,
            model_version=self.model_version,
            window_start_ms=self._start,
            window_end_ms=end_ms,
            devices=len(q),
            readings=readings,
            suspicions=n_counted,
            ignored=n_ignored,
            suspicious_devices=suspicious,
            mean_q=math.fsum(q) / len(q) if q else 0.0,
            alpha=alpha,
            bound=bound,
            alarm=alarm,
            detection=detection,
        )

    # -- checkpoint ----------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """``b"TDSC"`` + u16 format version + JSON of the open window (no pickle)."""
        body: dict[str, Any] = {
            "fleet": self.fleet,
            "model_version": self.model_version,
            "config": asdict(self.config),
            "start": self._start,
            "readings": self._readings,
            "suspicions": self._suspicions,
            "total_readings": self.total_readings,
        }
        return add_header(STATE_MAGIC, STATE_FORMAT, json.dumps(body).encode())

    @classmethod
    def from_state_bytes(
        cls, data: bytes, *, config: SuspicionCohortConfig | None = None
    ) -> SuspicionCohort:
        """Restore from :meth:`state_bytes`; ``CheckpointFormatError`` if not one.

        ``config`` replaces the stored settings (the service's current ones)."""
        payload = check_header(data, STATE_MAGIC, STATE_FORMAT)
        try:
            body = json.loads(payload.decode())
            obj = cls(
                str(body["fleet"]),
                int(body["model_version"]),
                config if config is not None else SuspicionCohortConfig(**body["config"]),
            )
            start = body["start"]
            obj._start = None if start is None else int(start)
            obj._readings = {
                str(d): [float(v[0]), float(v[1])] for d, v in body["readings"].items()
            }
            obj._suspicions = {
                str(d): [(_signal(s), None if f is None else str(f)) for s, f in v]
                for d, v in body["suspicions"].items()
            }
            obj.total_readings = int(body["total_readings"])
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(f"damaged suspicion cohort checkpoint: {exc}") from exc
        return obj
