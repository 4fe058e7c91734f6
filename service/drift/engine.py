"""The drift engine: owns every layer-A and layer-B monitor and routes records to them.

One :class:`~service.drift.device_monitor.DeviceMonitor` per device (created on the device's
first frame, from its schema) and one :class:`~service.drift.cohort_monitor.CohortMonitor` per
cohort ``(fleet, schema, model version)`` (created when the cohort's parameter set is known: the
cohort bins features on the model's own int8 grid). Frames of a drained batch go to layer A in
one vectorised call; cohorts accumulate exact histograms and are evaluated on a timer.

Layer A has two tiers. The strict tier's detections are device alarms and are returned. The
sensitive tier's *suspicions* are not: they go to the optional ``on_suspicions`` callback (for
a counter) and to one :class:`~service.drift.suspicion_cohort.SuspicionCohort` per cohort
``(fleet, schema, model version)``, with the readings each device's sensitive tier monitored.
A suspicion cohort's window is evaluated by the first batch (frames or labels) received after
it ends, on the service's clock (``recv_ts``); its alarm (``cohort_suspicions``) is returned
with that batch's detections. So everything returned is an alarm, to be recorded.

Each fleet's declared normal (``fleet_normal``: a period, the longest session) goes to the
monitors of that fleet's devices, as a floor on their blocks
(:mod:`service.drift.declared_normal`); a fleet without one is monitored as learnt from its
data alone. :meth:`DriftEngine.fleet_calibration` sums up, per fleet, what layer A learnt.

The engine is called from the batcher thread and from the service's timers; one lock serialises
them (monitors are not thread-safe).

Checkpoints: the state of every monitor changed since its last checkpoint (each layer encodes
its own, without pickle), with its format version and the last processed ``(boot, seq)`` of
the device, so a restart resumes instead of relearning and a replayed frame is recognised.
:meth:`DriftEngine.checkpoint` holds the lock only to copy a slice of devices' state at a time
and encodes outside it, so ingest waits for tens of milliseconds, not for the whole fleet. A
stored checkpoint this version cannot read is skipped, logged and counted: that device or
cohort learns afresh, the others resume.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from edge_agent.blob import ParameterSchema
from service.drift.cohort_monitor import STATE_VERSION as COHORT_STATE_FORMAT
from service.drift.cohort_monitor import CohortConfig, CohortMonitor, CohortReport
from service.drift.declared_normal import DeclaredNormal
from service.drift.detection import Detection
from service.drift.device_monitor import (
    STATE_FORMAT as DEVICE_STATE_FORMAT,
)
from service.drift.device_monitor import (
    CalibrationState,
    CalibrationStatus,
    CheckpointFormatError,
    DeviceMonitor,
    DeviceMonitorConfig,
    MonitorSnapshot,
    update_frames,
)
from service.drift.suspicion_cohort import STATE_FORMAT as SUSPICION_STATE_FORMAT
from service.drift.suspicion_cohort import (
    SuspicionCohort,
    SuspicionCohortConfig,
    SuspicionWindowReport,
)
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.ingest.schema_catalog import SchemaCatalog
from service.registry.records import CheckpointRecord

log = logging.getLogger(__name__)

KIND_DEVICE = "device_monitor"
KIND_COHORT = "cohort_monitor"
KIND_SUSPICION = "suspicion_cohort"


MAX_UNKNOWN_COHORTS: Final = 1024
"""Model versions without a parameter set that are listed and logged one by one."""
CHECKPOINT_SLICE: Final = 256
"""Devices whose state one checkpoint slice copies under the engine's lock (about 0.1 ms of
CPU each: tens of milliseconds held at a time, however many devices there are)."""


@dataclass
class LayerAStatus:
    """:meth:`DriftEngine.status`: per ``(fleet, device)``."""

    drifting: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    """Signals still outside their fixed reference (devices with none are absent)."""
    calibration: dict[tuple[str, str], CalibrationState] = field(default_factory=dict)
    """Where each device's monitor stands (reference, calibrating, monitoring)."""


@dataclass(frozen=True, slots=True)
class FleetCalibration:
    """:meth:`DriftEngine.fleet_calibration`: what layer A learnt of one fleet's devices."""

    fleet: str
    declared: DeclaredNormal | None
    """The fleet's declared normal (``None``: nothing declared)."""
    devices: int
    """Devices with a layer-A monitor."""
    states: dict[str, int]
    """Devices per calibration state (unknown, reference, calibrating, monitoring)."""
    declared_too_long: int
    """Devices whose signal streams cannot be monitored: the declaration needs blocks longer
    than the null learning can choose at their frame interval."""
    streams_ready: int
    """Signal streams monitored, all devices."""
    streams: int
    frame_interval_s_median: float | None
    """Median over devices of their measured frame interval."""
    declared_block_frames_max: int
    """The largest block floor (frames) the declaration sets on a device (0: none)."""
    block_readings_median: float | None
    """Median over devices of each device's median block (readings), devices with a
    monitored stream only; ``None`` if there is none."""
    block_readings_max: int
    block_seconds_median: float | None
    """The same in seconds (devices whose frame interval is known)."""
    block_seconds_max: float | None
    kappa_max: float
    """Largest residual variance inflation absorbed by a monitored stream (1 if none)."""
    error_ready: int
    """Devices whose labelled error stream is monitored."""


def summarise(
    fleet: str, declared: DeclaredNormal | None, statuses: Sequence[CalibrationStatus]
) -> FleetCalibration:
    """One fleet's :class:`FleetCalibration` from its devices' :class:`CalibrationStatus`."""
    learnt = [c for c in statuses if c.streams_ready > 0]
    timed = [c for c in learnt if c.block_seconds_median is not None]
    intervals = [c.frame_interval_s for c in statuses if c.frame_interval_s is not None]
    return FleetCalibration(
        fleet=fleet,
        declared=declared,
        devices=len(statuses),
        states=dict(Counter(c.state for c in statuses)),
        declared_too_long=sum(c.declared_too_long for c in statuses),
        streams_ready=sum(c.streams_ready for c in statuses),
        streams=sum(c.streams for c in statuses),
        frame_interval_s_median=statistics.median(intervals) if intervals else None,
        declared_block_frames_max=max((c.declared_block_frames for c in statuses), default=0),
        block_readings_median=(
            statistics.median(c.block_readings_median for c in learnt) if learnt else None
        ),
        block_readings_max=max((c.block_readings_max for c in learnt), default=0),
        block_seconds_median=(
            statistics.median(c.block_seconds_median or 0.0 for c in timed) if timed else None
        ),
        block_seconds_max=max((c.block_seconds_max or 0.0 for c in timed), default=None),
        kappa_max=max((c.kappa_max for c in learnt), default=1.0),
        error_ready=sum(c.error_ready for c in statuses),
    )


@dataclass
class EngineStats:
    """Counters the service exposes."""

    frames: int = 0
    frames_without_schema: int = 0
    frames_refused: Counter[str] = field(default_factory=Counter)
    label_batches: int = 0
    cohorts_without_parameters: set[tuple[str, str, int]] = field(default_factory=set)
    """(fleet, schema, version) seen without a registered parameter set, each logged once; at
    most :data:`MAX_UNKNOWN_COHORTS` (a device can name any version: one log line and one entry
    per version would grow without bound)."""
    unknown_cohorts_unlisted: int = 0
    """Frame batches of a version without parameters that found the list above full."""
    suspicions: int = 0
    """Sensitive-tier suspicions (layer A), all devices."""
    suspicion_windows: int = 0
    """Suspicion-cohort windows evaluated."""
    suspicion_alarms: int = 0
    """Cohort alarms on suspicions (``cohort_suspicions``)."""
    checkpoints_refused: Counter[str] = field(default_factory=Counter)
    """Stored checkpoints :meth:`DriftEngine.restore` could not read, by kind (device_monitor,
    cohort_monitor, suspicion_cohort): each one's device or cohort learnt afresh."""
    checkpoint_slices: int = 0
    """Slices of devices :meth:`DriftEngine.checkpoint` took under the lock."""
    checkpointed_devices: int = 0
    """Device monitors checkpointed (changed since their previous checkpoint)."""


class DriftEngine:
    """Layer A and layer B for every device and cohort the service sees."""

    def __init__(
        self,
        catalog: SchemaCatalog,
        schema_of: Callable[[str, str], str | None],
        *,
        device_config: DeviceMonitorConfig | None = None,
        cohort_config: CohortConfig | None = None,
        suspicion_config: SuspicionCohortConfig | None = None,
        on_suspicions: Callable[[list[Detection]], None] | None = None,
        fleet_normal: Mapping[str, DeclaredNormal] | None = None,
    ) -> None:
        self.catalog = catalog
        self.schema_of = schema_of
        """``(fleet, device) → schema_id`` (the device directory's knowledge)."""
        self.device_config = device_config or DeviceMonitorConfig()
        self.cohort_config = cohort_config or CohortConfig()
        self.suspicion_config = suspicion_config or SuspicionCohortConfig(
            budget_per_device_reading=self.device_config.cohort_budget
        )
        """Default: the share of the fleet budget the strict tier leaves to the rule."""
        self.on_suspicions = on_suspicions
        """Called (under the engine's lock) with each batch's suspicions, e.g. to count them."""
        self.fleet_normal: dict[str, DeclaredNormal] = dict(fleet_normal or {})
        """Declared normal per fleet (fleets absent: nothing declared)."""
        self.monitors: dict[tuple[str, str], DeviceMonitor] = {}
        self.cohorts: dict[tuple[str, str, int], CohortMonitor] = {}
        self.suspicion_cohorts: dict[tuple[str, str, int], SuspicionCohort] = {}
        self.last_suspicion_reports: list[SuspicionWindowReport] = []
        """The reports of the suspicion-cohort windows closed by the last batch that closed any."""
        self.stats = EngineStats()
        self.lock = threading.RLock()
        self.checkpoint_slice = CHECKPOINT_SLICE
        """Devices per slice of :meth:`checkpoint` (copied under the lock at one go)."""
        self._dirty: set[tuple[str, str]] = set()
        """``(fleet, device)`` of the monitors changed since their last checkpoint (under
        ``lock``)."""

    # -- routing --------------------------------------------------------------------------

    def _schema(self, fleet: str, device: str) -> tuple[str, ParameterSchema] | None:
        schema_id = self.schema_of(fleet, device)
        if schema_id is None:
            return None
        schema = self.catalog.schema(schema_id)
        return None if schema is None else (schema_id, schema)

    def _monitor(self, fleet: str, device: str, schema: ParameterSchema) -> DeviceMonitor:
        mon = self.monitors.get((fleet, device))
        if mon is None:
            mon = DeviceMonitor(
                fleet,
                device,
                schema.features,
                schema.classes,
                self.device_config,
                normal=self.fleet_normal.get(fleet),
            )
            self.monitors[(fleet, device)] = mon
        return mon

    def _cohort(self, fleet: str, schema_id: str, version: int) -> CohortMonitor | None:
        key = (fleet, schema_id, version)
        cohort = self.cohorts.get(key)
        if cohort is not None:
            return cohort
        params = self.catalog.parameter_set(schema_id, version)
        if params is None:
            unknown = self.stats.cohorts_without_parameters
            if key in unknown:
                return None
            if len(unknown) >= MAX_UNKNOWN_COHORTS:
                self.stats.unknown_cohorts_unlisted += 1
                if self.stats.unknown_cohorts_unlisted == 1:
                    log.warning(
                        "more than %d model versions without a registered parameter set; "
                        "further ones are not logged (a device naming versions nobody "
                        "registered?)",
                        MAX_UNKNOWN_COHORTS,
                    )
            else:
                unknown.add(key)
                log.warning(
                    "fleet %s model v%d (schema %s): parameter set unknown, so no cohort "
                    "(layer B) monitoring; register its blob (tinydrift registry import-blob)",
                    fleet,
                    version,
                    schema_id,
                )
            return None
        m = params.model
        cohort = CohortMonitor(
            fleet,
            version,
            params.schema.features,
            params.schema.classes,
            m.mu,
            m.inv_sigma,
            self.cohort_config,
            model=m,
        )
        self.cohorts[key] = cohort
        return cohort

    def _suspicion_cohort(
        self, fleet: str, schema_id: str, version: int, now_ms: int
    ) -> SuspicionCohort:
        key = (fleet, schema_id, version)
        cohort = self.suspicion_cohorts.get(key)
        if cohort is None:
            cohort = SuspicionCohort(fleet, version, self.suspicion_config)
            cohort.advance(now_ms)  # opens its first window
            self.suspicion_cohorts[key] = cohort
        return cohort

    def _advance_suspicions(self, now_ms: int) -> list[Detection]:
        """Close the suspicion-cohort windows that ended before ``now_ms``; their alarms."""
        out: list[Detection] = []
        reports = []
        for cohort in self.suspicion_cohorts.values():
            report = cohort.advance(now_ms)
            if report is None:
                continue
            reports.append(report)
            if report.detection is not None:
                out.append(report.detection)
        if reports:
            self.last_suspicion_reports = reports
            self.stats.suspicion_windows += len(reports)
            self.stats.suspicion_alarms += len(out)
        return out

    def _add_suspicions(
        self, suspicions: Sequence[Detection], schema_ids: dict[tuple[str, str], str], now_ms: int
    ) -> None:
        if not suspicions:
            return
        self.stats.suspicions += len(suspicions)
        for d in suspicions:
            assert d.device is not None
            schema_id = schema_ids[(d.fleet, d.device)]
            self._suspicion_cohort(d.fleet, schema_id, d.model_version, now_ms).add_suspicion(d)
        if self.on_suspicions is not None:
            self.on_suspicions(list(suspicions))

    def on_frames(self, frames: list[DeviceFrame]) -> list[Detection]:
        """Layer A on the batch (vectorised), layer-B accumulation, the suspicion cohorts;
        returns the alarms: strict device alarms and cohort alarms on suspicions."""
        with self.lock:
            routed: list[DeviceFrame] = []
            schema_ids: dict[tuple[str, str], str] = {}
            known: dict[tuple[str, str], tuple[str, ParameterSchema] | None] = {}
            to_cohorts: dict[int, tuple[CohortMonitor, list[DeviceFrame]]] = {}
            cohorts = self.cohorts
            for fr in frames:
                key = (fr.fleet, fr.device)
                if key in known:
                    found = known[key]
                else:
                    found = known[key] = self._schema(fr.fleet, fr.device)
                    if found is not None:
                        self._monitor(fr.fleet, fr.device, found[1])
                        schema_ids[key] = found[0]
                if found is None:
                    self.stats.frames_without_schema += 1
                    continue
                routed.append(fr)
                cohort = cohorts.get((fr.fleet, found[0], fr.param_version))
                if cohort is None:
                    cohort = self._cohort(fr.fleet, found[0], fr.param_version)
                if cohort is not None:
                    entry = to_cohorts.get(id(cohort))
                    if entry is None:
                        to_cohorts[id(cohort)] = (cohort, [fr])
                    else:
                        entry[1].append(fr)
            for cohort, group in to_cohorts.values():
                cohort.add_frames(group)
            self.stats.frames += len(routed)
            self._dirty.update(schema_ids)
            result = update_frames(self.monitors, routed)
            for _, reason in result.rejected:
                self.stats.frames_refused[reason] += 1
            out = list(result.detections)
            if not routed:
                return out
            now_ms = int(max(fr.recv_ts for fr in routed) * 1000)
            out += self._advance_suspicions(now_ms)
            refused = {id(fr) for fr, _ in result.rejected}
            rates: dict[tuple[str, str], float | None] = {}
            for fr in routed:
                key = (fr.fleet, fr.device)
                if key in rates:
                    rate = rates[key]
                else:
                    rate = rates[key] = self.monitors[key].suspicion_rate
                if rate is None or id(fr) in refused:
                    continue
                cohort_s = self._suspicion_cohort(
                    fr.fleet, schema_ids[key], fr.param_version, now_ms
                )
                cohort_s.add_readings(fr.device, fr.k, rate)
            self._add_suspicions(result.suspicions, schema_ids, now_ms)
            return out

    def on_labels(self, batches: list[DeviceLabels]) -> list[Detection]:
        """Error-stream detectors of layer A, and the cohorts' labelled accuracy; returns the
        alarms (as :meth:`on_frames`)."""
        out: list[Detection] = []
        with self.lock:
            if not batches:
                return out
            now_ms = int(max(lb.recv_ts for lb in batches) * 1000)
            out += self._advance_suspicions(now_ms)
            suspicions: list[Detection] = []
            schema_ids: dict[tuple[str, str], str] = {}
            for lb in batches:
                known = self._schema(lb.fleet, lb.device)
                if known is None:
                    continue
                schema_id, schema = known
                schema_ids[(lb.fleet, lb.device)] = schema_id
                self._dirty.add((lb.fleet, lb.device))
                res = self._monitor(lb.fleet, lb.device, schema).observe_labels(lb)
                out += res.alarms
                suspicions += res.suspicions
                cohort = self._cohort(lb.fleet, schema_id, lb.param_version)
                if cohort is not None:
                    cohort.add_labels(lb)
                self.stats.label_batches += 1
            self._add_suspicions(suspicions, schema_ids, now_ms)
        return out

    def evaluate(self, now_ms: int) -> list[CohortReport]:
        """Close every cohort's window and return the reports."""
        with self.lock:
            return [c.evaluate(now_ms) for c in self.cohorts.values()]

    def drifting(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """``(fleet, device) → signals`` still outside their fixed reference (layer A)."""
        return self.status().drifting

    def status(self) -> LayerAStatus:
        """One pass over the layer-A monitors: drifting signals and calibration states."""
        with self.lock:
            out = LayerAStatus()
            for key, mon in self.monitors.items():
                streams = mon.drifting
                if streams:
                    out.drifting[key] = tuple(sorted({s.signal for s in streams}))
                out.calibration[key] = mon.calibration_state
            return out

    def calibration(self, fleet: str, device: str) -> CalibrationStatus | None:
        """What layer A learnt of one device's normal variation (``None``: no monitor)."""
        with self.lock:
            mon = self.monitors.get((fleet, device))
            return None if mon is None else mon.calibration()

    def fleet_calibration(self, fleet: str) -> FleetCalibration:
        """What layer A learnt of one fleet's devices, with the fleet's declaration."""
        with self.lock:
            statuses = [m.calibration() for (f, _), m in self.monitors.items() if f == fleet]
        return summarise(fleet, self.fleet_normal.get(fleet), statuses)

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint(
        self,
        save: Callable[[list[CheckpointRecord]], object],
        *,
        slice_devices: int | None = None,
    ) -> int:
        """Checkpoint the devices changed since the last checkpoint, and every cohort.

        Ingest is held up for one slice of ``slice_devices`` (default
        :attr:`checkpoint_slice`) devices at a time, and only to
        copy their state (:meth:`DeviceMonitor.snapshot`); the slice is encoded and handed to
        ``save`` (the registry writer's queue) with the lock released. A device is written as
        it was at one instant, with its ``(boot, seq)`` of that instant; one that changes after
        its slice was taken is dirty again and goes into the next checkpoint. If ``save`` (or
        encoding) fails, the devices not yet handed over are marked dirty again and the error
        propagates. Returns the number of records handed to ``save``.
        """
        if slice_devices is None:
            slice_devices = self.checkpoint_slice
        if slice_devices < 1:
            raise ValueError("slice_devices must be >= 1")
        with self.lock:
            keys = list(self._dirty)
            self._dirty.clear()
            cohorts = self._cohort_records()
        done = 0
        try:
            for lo in range(0, len(keys), slice_devices):
                part = keys[lo : lo + slice_devices]
                with self.lock:
                    snaps = [(k, m.snapshot()) for k in part if (m := self.monitors.get(k))]
                self.stats.checkpoint_slices += 1
                records = [_device_record(key, snap) for key, snap in snaps]
                save(records)
                done += len(part)
                self.stats.checkpointed_devices += len(part)
            save(cohorts)
        except BaseException:
            with self.lock:
                self._dirty.update(keys[done:])
            raise
        return len(keys) + len(cohorts)

    def _cohort_records(self) -> list[CheckpointRecord]:
        """Every cohort's and suspicion cohort's record (under the lock: a few per fleet)."""
        records = []
        for (fleet, schema_id, version), cohort in self.cohorts.items():
            records.append(
                CheckpointRecord(
                    fleet=fleet,
                    device=None,
                    kind=f"{KIND_COHORT}:{schema_id}:{version}",
                    format_version=COHORT_STATE_FORMAT,
                    state=cohort.state_bytes(),
                )
            )
        for (fleet, schema_id, version), s_cohort in self.suspicion_cohorts.items():
            records.append(
                CheckpointRecord(
                    fleet=fleet,
                    device=None,
                    kind=f"{KIND_SUSPICION}:{schema_id}:{version}",
                    format_version=SUSPICION_STATE_FORMAT,
                    state=s_cohort.state_bytes(),
                )
            )
        return records

    def mark_dirty(self, keys: Iterable[tuple[str, str]]) -> None:
        """Make these (fleet, device) monitors due again (their checkpoint was not stored)."""
        with self.lock:
            self._dirty.update(k for k in keys if k in self.monitors)

    @property
    def dirty_devices(self) -> int:
        """Devices changed since they were last checkpointed."""
        with self.lock:
            return len(self._dirty)

    def restore(self, records: Iterable[CheckpointRecord]) -> int:
        """Load monitors from checkpoints; returns the number restored.

        A record this version cannot read (another format, such as the pickled layer-A
        checkpoints of format 3 and older, which are never decoded; a damaged one; one stored
        under another device's key) is skipped: its device or cohort starts afresh (a new
        reference), and it is logged and counted in ``stats.checkpoints_refused`` by kind.
        Restored monitors are clean (their stored state is current)."""
        n = 0
        refused: list[str] = []
        with self.lock:
            for rec in records:
                try:
                    state = rec.state
                    if rec.kind == KIND_DEVICE and rec.device is not None:
                        mon = DeviceMonitor.from_state_bytes(state)
                        if (mon.fleet, mon.device) != (rec.fleet, rec.device):
                            raise CheckpointFormatError(
                                f"it holds the monitor of {mon.fleet}/{mon.device}"
                            )
                        # today's declaration: streams still calibrating take it; monitored
                        # ones keep their blocks until the next model version's reference
                        mon.normal = self.fleet_normal.get(rec.fleet)
                        self.monitors[(rec.fleet, rec.device)] = mon
                        self._dirty.discard((rec.fleet, rec.device))
                        kind = KIND_DEVICE
                    elif rec.kind.startswith(KIND_COHORT + ":"):
                        kind = KIND_COHORT
                        _, schema_id, version = rec.kind.split(":")
                        params = self.catalog.parameter_set(schema_id, int(version))
                        self.cohorts[(rec.fleet, schema_id, int(version))] = (
                            CohortMonitor.from_state_bytes(
                                state, model=params.model if params is not None else None
                            )
                        )
                    elif rec.kind.startswith(KIND_SUSPICION + ":"):
                        kind = KIND_SUSPICION
                        _, schema_id, version = rec.kind.split(":")
                        self.suspicion_cohorts[(rec.fleet, schema_id, int(version))] = (
                            SuspicionCohort.from_state_bytes(state, config=self.suspicion_config)
                        )
                    else:
                        continue
                except (CheckpointFormatError, ValueError) as exc:
                    kind = rec.kind.split(":")[0]
                    kind = kind if kind in (KIND_COHORT, KIND_SUSPICION) else KIND_DEVICE
                    self.stats.checkpoints_refused[kind] += 1
                    refused.append(
                        f"{rec.fleet}/{rec.device or '-'} ({rec.kind}, format "
                        f"{rec.format_version}): {exc}"
                    )
                    continue
                n += 1
        if refused:
            log.warning(
                "%d detector checkpoints cannot be read and were skipped (their devices and "
                "cohorts learn a new reference): %s%s",
                len(refused),
                "; ".join(refused[:3]),
                f"; and {len(refused) - 3} more" if len(refused) > 3 else "",
            )
        return n


def _device_record(key: tuple[str, str], snap: MonitorSnapshot) -> CheckpointRecord:
    """One device's record from its snapshot (encoded here, outside the engine's lock)."""
    boot, seq = snap.last_frame or (None, None)
    return CheckpointRecord(
        fleet=key[0],
        device=key[1],
        kind=KIND_DEVICE,
        format_version=DEVICE_STATE_FORMAT,
        state=snap.encode(),
        last_boot=boot,
        last_seq=seq,
    )
