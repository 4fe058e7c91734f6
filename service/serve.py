"""``tinydrift serve``: ingest, drift detection, registry and ``/metrics``, wired together.

Threads: paho's network thread (enqueue only: control messages never dropped, telemetry shed
and counted when its lane is full) → the batcher (decode, validate, layer A,
layer-B accumulation) → the registry writer (batched commits). A timer thread closes cohort
windows, refreshes the device gauges, writes changed devices, checkpoints detector state and
freezes the long-lived heap for the cyclic garbage collector (:func:`_freeze_heap`).
Shutdown (SIGINT/SIGTERM or :meth:`Service.stop`) drains the queue, evaluates nothing new,
checkpoints every monitor and flushes the registry, so a restart resumes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import start_http_server

from edge_agent.blob import (
    BlobRejectedError,
    KeyFileError,
    SigningKey,
    load_signing_key,
    verify_blob,
)
from edge_agent.wire.messages import UpdateAck
from service.api import create_app
from service.api.server import ApiServer
from service.cohort_gauges import export_cohort_reports
from service.config import ServiceSettings
from service.drift.cohort_monitor import CohortReport
from service.drift.declared_normal import DeclaredNormal
from service.drift.detection import Detection
from service.drift.device_monitor import CalibrationState, DeviceMonitorConfig
from service.drift.engine import DriftEngine, LayerAStatus
from service.ingest.batcher import Batcher
from service.ingest.device_directory import DeviceDirectory, DeviceInfo
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.ingest.ingest_queue import IngestQueue
from service.ingest.mqtt_consumer import MqttConsumer
from service.ingest.schema_catalog import SchemaCatalog
from service.ingest.sequence_positions import (
    POSITIONS_KIND,
    PositionSaver,
    PositionsFormatError,
    read_positions,
)
from service.learn.recent_readings import RecentReadings
from service.metric_labels import recalibration_base
from service.metrics import ServiceMetrics
from service.registry.errors import RegistryError, WriterBackpressureError
from service.registry.records import (
    CheckpointRecord,
    DeviceRecord,
    ParameterSetRecord,
    label_records,
    utc_from_unix,
)
from service.registry.settlement import Settlement
from service.registry.store import Registry
from service.registry.writer import RegistryWriter
from service.rollout.operations import UpdateOperations
from service.rollout.plan import DeliveryPolicy, GatePolicy, QualityPolicy
from service.rollout.proposals import (
    CandidateProposer,
    FleetDevice,
    ProposalSettings,
)
from service.rollout.reconciler import RolloutReconciler
from service.rollout.update_policy import UpdatePolicy

log = logging.getLogger(__name__)

GAUGE_INTERVAL_S = 5.0
DEVICE_FLUSH_INTERVAL_S = 2.0
DEVICE_REFRESH_S = 30.0
"""A device heard from is rewritten (last seen, sequence) at least this often."""
GC_FREEZE_INTERVAL_S = 60.0
"""How often the timers move every live object out of the cyclic collector's reach."""
GC_FULL_INTERVAL_S = 600.0
"""How often they first take it all back and collect everything (frozen cycles are freed)."""


def _freeze_heap(full: bool) -> None:
    """Move every object alive now to the collector's permanent generation (``gc.freeze``).

    The monitors of thousands of devices are hundreds of thousands of long-lived objects; the
    automatic full collections, which the ingest path's short-lived objects set off every few
    seconds, traversed them all each time. Frozen, they are skipped; the automatic collections
    scan what was allocated since the last freeze. Objects still die by reference counting
    when frozen; only cyclic garbage waits for the next ``full`` pass (unfreeze, collect).
    """
    if full:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


@dataclass
class ServiceStatus:
    """A snapshot for logs and tests."""

    connected: bool
    devices: int
    readings: int
    rejections: dict[str, int]
    detections: int
    queue_depth: int


class ServiceKeyError(RuntimeError):
    """A configured signing key cannot be loaded (one-line message naming the file)."""


def _load_key(path: Path, what: str) -> SigningKey:
    try:
        return load_signing_key(path)
    except (OSError, KeyFileError) as exc:
        raise ServiceKeyError(
            f"cannot load the {what} key {path}: {exc} (create one with `tinydrift keys generate`)"
        ) from None


def proposal_settings(s: ServiceSettings) -> ProposalSettings:
    """The rollout policy the settings describe."""
    return ProposalSettings(
        canary_size=s.canary_size,
        control_size=s.control_size,
        waves_pct=tuple(s.waves_pct),
        gates=GatePolicy(
            delivery=DeliveryPolicy(ack_timeout_ms=int(s.ack_timeout_s * 1000)),
            quality=QualityPolicy(
                min_soak_ms=int(s.min_soak_s * 1000),
                max_soak_ms=int(s.max_soak_s * 1000),
                min_readings=s.gate_min_readings,
                min_devices=s.gate_min_devices,
                confidence_margin=s.gate_confidence_margin,
                error_margin=s.gate_error_margin,
                max_class_js=s.gate_max_class_js,
            ),
        ),
        min_recent_readings=s.min_recent_readings,
    )


class Service:
    """One tinydrift service instance."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        discard_checkpoints: bool = False,
        device_config: DeviceMonitorConfig | None = None,
    ) -> None:
        self.settings = settings
        keys = None  # loaded first: a bad key file must not leave a registry behind
        if settings.release_key is not None and settings.deploy_key is not None:
            keys = (
                _load_key(settings.release_key, "release"),
                _load_key(settings.deploy_key, "deploy"),
            )
        elif settings.release_key is not None or settings.deploy_key is not None:
            raise ServiceKeyError(
                "updates need both --release-key and --deploy-key (or neither: monitor only)"
            )
        self.metrics = ServiceMetrics(
            max_fleets=settings.max_fleets,
            fleets=None if "+" in settings.fleets else settings.fleets,
        )
        self._queue_full_counter = self.metrics.rejected.labels(reason="queue_full")
        self.registry = Registry(settings.db)
        self.writer = RegistryWriter(self.registry, max_queue=100_000, put_timeout_s=0.05)
        self.catalog = SchemaCatalog()
        self._load_parameter_sets()
        self.directory = DeviceDirectory(self.catalog, settings.unknown_devices)
        self._load_devices()

        def schema_of(fleet: str, device: str) -> str | None:
            info = self.directory.get(fleet, device)
            return None if info is None else info.schema_id

        self.engine = DriftEngine(
            self.catalog,
            schema_of,
            device_config=device_config
            or DeviceMonitorConfig(
                reference_readings=settings.reference_readings,
                budget_per_device_reading=settings.false_alarm_budget,
                null_min_blocks=settings.null_min_blocks,
                null_horizon_readings=settings.null_horizon_readings,
                null_horizon_labels=settings.null_horizon_labels,
            ),
            on_suspicions=self._count_suspicions,
            fleet_normal={
                fleet: DeclaredNormal(period_s=n.period_s, session_s=n.session_s)
                for fleet, n in settings.fleet_normal.items()
            },
        )
        for fleet, normal in self.engine.fleet_normal.items():
            log.info("fleet %s declares its normal: %s", fleet, normal.describe())
        if discard_checkpoints:
            log.warning("discarding stored detector checkpoints: references are relearned")
            self._restore_positions(self.registry.load_checkpoints(kind=POSITIONS_KIND))
        else:
            self._restore_checkpoints()
        self.positions = PositionSaver(
            lambda rec, settled: self.writer.save_checkpoints([rec], on_settled=settled)
        )
        self.queue = IngestQueue(settings.queue_size, ack_ahead_bytes=settings.control_queue_bytes)
        self.consumer = MqttConsumer(
            host=settings.broker_host,
            port=settings.broker_port,
            client_id=settings.mqtt_client_id,
            fleets=settings.fleets,
            out=self.queue,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            on_drop=self._on_queue_full,
            on_connection_change=self._on_connection_change,
        )
        self._drifting: dict[tuple[str, str], tuple[str, ...]] | None = None
        self.recent = RecentReadings()
        self.reconciler: RolloutReconciler | None = None
        self.proposer: CandidateProposer | None = None
        self.operations: UpdateOperations | None = None
        self.policy: UpdatePolicy | None = None
        if keys is not None:
            release, deploy = keys
            self.reconciler = RolloutReconciler(
                self.registry, self.consumer.client, deploy, self.metrics
            )
            self.consumer.extra_subscriptions = self.reconciler.subscriptions
            for info in self.directory.all():  # versions stored before this start: sanctioned
                if info.active_version is not None:
                    self.reconciler.seed_version(info.fleet, info.device, info.active_version)
            self.proposer = CandidateProposer(
                self.registry,
                self.reconciler,
                release,
                self.metrics,
                self.fleet_devices,
                self._reference_of,
                self.recent,
                proposal_settings(settings),
                on_registered=self._add_parameter_set,
            )
            self.operations = UpdateOperations(self.proposer, self.reconciler)
            self.policy = UpdatePolicy(
                settings.update_policy,
                self.proposer,
                self.reconciler,
                lambda: {i.fleet for i in self.directory.all()},
                settle_s=settings.policy_settle_s,
            )
        self.batcher = Batcher(
            self.queue,
            self.directory,
            self,
            self.metrics,
            max_messages=settings.batch_max_messages,
            max_wait_s=settings.batch_max_wait_s,
            max_payload_bytes=settings.max_payload_bytes,
        )
        self.detections = 0
        self.detections_by_signal: Counter[tuple[str, str]] = Counter()
        self.last_reports: list[CohortReport] = []
        self.registry_dropped = 0
        self._last_window_detections: set[tuple[object, ...]] = set()
        self._window_detections: set[tuple[object, ...]] = set()
        self._stop = threading.Event()
        self._stopped = False
        self._timer = threading.Thread(target=self._timers, name="service-timers", daemon=True)
        self._http: WSGIServer | None = None
        self.metrics_port: int | None = None
        self._api: ApiServer | None = None
        self.api_port: int | None = None
        """The operator API's bound port, once started."""

    # -- start-up --------------------------------------------------------------------------

    def _load_parameter_sets(self) -> None:
        for rec in self.registry.list_parameter_sets():
            try:
                self._add_parameter_set(rec)
            except BlobRejectedError as exc:
                log.error(
                    "stored parameter set %s v%d is unreadable: %s", rec.schema_id, rec.version, exc
                )

    def _load_devices(self) -> None:
        """The registry's devices; their fleets are admitted most recently heard first."""
        records = self.registry.list_devices()
        latest: dict[str, float] = {}
        for rec in records:
            info = self.directory.adopt_known(rec.fleet, rec.device, rec.schema_id)
            info.active_version = rec.active_version
            info.online = False
            info.dirty = False
            seen = rec.last_seen.timestamp() if rec.last_seen is not None else 0.0
            latest[rec.fleet] = max(latest.get(rec.fleet, 0.0), seen)
        admit = self.metrics.fleets.admit
        refused = [f for f in sorted(latest, key=lambda f: (-latest[f], f)) if not admit(f)]
        if refused:
            log.warning(
                "%d fleets in the registry are not monitored (max_fleets %d, or not among "
                "fleets): their messages are rejected as unknown_fleet; e.g. %s",
                len(refused),
                self.metrics.fleets.max_fleets,
                ", ".join(refused[:5]),
            )

    def _restore_checkpoints(self) -> None:
        records = self.registry.load_checkpoints()
        n = self.engine.restore(records)
        for kind, refused in self.engine.stats.checkpoints_refused.items():
            self.metrics.checkpoints_refused.labels(kind=kind).inc(refused)
        self._restore_positions(records)
        if n:
            log.info("restored %d detector checkpoints", n)

    def _restore_positions(self, records: list[CheckpointRecord]) -> None:
        """Each device's sequences where the previous process left them: its saved positions
        (:mod:`service.ingest.sequence_positions`), else its detector checkpoint's last frame."""
        saved: set[tuple[str, str]] = set()
        for rec in records:
            if rec.kind != POSITIONS_KIND:
                continue
            try:
                positions = read_positions(rec)
            except PositionsFormatError as exc:
                log.error(
                    "saved sequence positions of fleet %s unreadable (%s): its devices' "
                    "sequences start over from their checkpoints or their next message",
                    rec.fleet,
                    exc,
                )
                continue
            for device, (t_boot, t_seq, l_boot, l_seq) in positions.items():
                saved.add((rec.fleet, device))
                if t_boot is not None and t_seq is not None:
                    self.directory.restore_sequence(rec.fleet, device, t_boot, t_seq)
                if l_boot is not None and l_seq is not None:
                    self.directory.restore_sequence(rec.fleet, device, l_boot, l_seq, labels=True)
        for rec in records:
            if (
                rec.device is not None
                and (rec.fleet, rec.device) not in saved
                and rec.last_boot is not None
                and rec.last_seq is not None
            ):
                self.directory.restore_sequence(rec.fleet, rec.device, rec.last_boot, rec.last_seq)

    def start(self) -> None:
        """Serve the API and ``/metrics``, connect to the broker, start processing.

        Raises :class:`~service.api.server.ApiServerError` when the API cannot be served and
        ``OSError`` when ``/metrics`` cannot (the API is stopped again then).
        """
        s = self.settings
        if self.reconciler is not None:
            self.reconciler.start()
        self._start_api()
        try:
            server, _thread = start_http_server(
                s.metrics_port, s.metrics_host, self.metrics.registry
            )
        except OSError:
            self._stop_api()
            raise
        self._http = server
        self.metrics_port = int(server.server_port)
        self.batcher.start()
        self.consumer.start()
        self._timer.start()
        log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_port)

    def _start_api(self) -> None:
        """Serve the operator API (``service/api``) over this service's registry."""
        app = create_app(
            self.registry,
            self.status,
            operations=self.operations,
            calibration=self._calibration_of,
            fleet_calibration=self._fleet_calibration_of,
        )
        self._api = ApiServer(app, self.settings.api_host, self.settings.api_port)
        self.api_port = self._api.start()
        log.info("operator API on http://%s:%d/docs", self.settings.api_host, self.api_port)

    def _stop_api(self) -> None:
        if self._api is not None:
            self._api.stop()
            self._api = None

    def stop(self) -> None:
        """Stop the API and ingest, checkpoint every monitor, flush the registry (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_api()
        self._stop.set()
        self.consumer.stop()
        self.batcher.stop()
        self._timer.join(timeout=10)
        if self.reconciler is not None:
            self.reconciler.stop()
        self._flush_devices()
        self.checkpoint()
        self.writer.close()
        self.registry.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        gc.unfreeze()  # what this service froze is collectable again

    # -- IngestSink -----------------------------------------------------------------------

    def on_frames(self, frames: list[DeviceFrame]) -> None:
        """Layer A and B on a batch; detections to the registry and the metrics."""
        groups: dict[tuple[str, str], list[DeviceFrame]] = {}
        fleet, version = self.metrics.fleet, self.metrics.model_versions.label
        for fr in frames:
            groups.setdefault((fleet(fr.fleet), version(fr.param_version)), []).append(fr)
        for labels, group in groups.items():
            self.metrics.confidence.observe_many(labels, np.concatenate([f.conf for f in group]))
        dets = self.engine.on_frames(frames)
        if dets:
            self._record(dets)
        if self.reconciler is not None:
            self.recent.add(frames)
            self.reconciler.on_frames(frames)

    def on_labels(self, labels: list[DeviceLabels]) -> None:
        """Error-stream detectors, label buffer."""
        dets = self.engine.on_labels(labels)
        if dets:
            self._record(dets)
        if self.reconciler is not None:
            self.reconciler.on_labels(labels)
        if self.settings.label_cap_per_device > 0:
            recs = [r for lb in labels for r in label_records(lb)]
            self._submit(lambda: self.writer.add_labels(recs, self.settings.label_cap_per_device))

    def on_status(self, info: DeviceInfo) -> None:
        """Births and Wills are written with the next device flush; births go to rollouts."""
        info.dirty = True
        if self.reconciler is not None and info.online:
            if info.active_version is not None:
                self.reconciler.on_version(
                    info.fleet,
                    info.device,
                    info.active_version,
                    "birth",
                    info.schema_id,
                    info.last_deploy_seq or 0,
                )
            self.reconciler.on_birth(
                info.fleet,
                info.device,
                info.last_deploy_seq or 0,
                info.active_version,
                info.schema_id,
            )

    def on_ack(self, fleet: str, device: str, ack: UpdateAck, recv_ts: float) -> None:
        """Update acks: the device's update state, and the rollout that issued the update."""
        info = self.directory.get(fleet, device)
        if info is not None:
            info.update_state = ack.state
            info.last_deploy_seq = max(info.last_deploy_seq or 0, ack.deploy_seq)
            info.dirty = True
        self.metrics.update_acks.labels(
            fleet=self.metrics.fleet(fleet), state=ack.state, reason=ack.reason
        ).inc()
        if self.reconciler is not None:
            if ack.state in ("TRIAL", "CONFIRMED") and ack.param_version is not None:
                # the device now runs param_version (other acks name the manifest's version)
                self.reconciler.on_version(
                    fleet,
                    device,
                    ack.param_version,
                    "ack",
                    None if info is None else info.schema_id,
                    max(ack.deploy_seq, 0 if info is None else info.last_deploy_seq or 0),
                )
            self.reconciler.on_ack(fleet, device, ack)

    # -- helpers ---------------------------------------------------------------------------

    def _submit(self, write: Callable[[], object]) -> None:
        """Queue a registry write; if the writer is saturated, count and log instead of blocking."""
        try:
            write()
        except WriterBackpressureError as exc:
            self.registry_dropped += 1
            if self.registry_dropped == 1 or self.registry_dropped % 1000 == 0:
                log.error("%s (%d writes dropped so far)", exc, self.registry_dropped)

    def _record(self, dets: list[Detection]) -> None:
        self.detections += len(dets)
        for d in dets:
            self.detections_by_signal[(d.signal, d.detector)] += 1
            counter = self.metrics.detections.labels(
                fleet=self.metrics.fleet(d.fleet),
                scope=d.scope,
                signal=d.signal,
                detector=d.detector,
            )
            exemplar = {"device_id": d.device[:100]} if d.device else None
            counter.inc(1, exemplar=exemplar)
            if (
                self.reconciler is not None
                and d.scope == "device"
                and d.device
                and d.signal in ("feature", "feature_var")
            ):
                self.recent.track((d.fleet, d.device))  # a recalibration will need its readings
        self._submit(lambda: self.writer.record_drift_events(dets))

    def _count_suspicions(self, dets: list[Detection]) -> None:
        """Layer A's sensitive tier: counted, never stored one by one (the cohort rule alarms)."""
        for d in dets:
            self.metrics.suspicions.labels(fleet=self.metrics.fleet(d.fleet), signal=d.signal).inc()

    def _on_queue_full(self) -> None:
        # paho's thread, once per dropped message: the child is looked up once
        self._queue_full_counter.inc()
        self.batcher.rejections["queue_full"] += 1

    def _on_connection_change(self, connected: bool, reconnect: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if reconnect:
            self.metrics.mqtt_reconnects.inc()

    # -- timers ----------------------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        next_window = now + self.settings.window_s
        next_ckpt = now + self.settings.checkpoint_interval_s
        next_gauges = now + 1.0
        next_devices = now + DEVICE_FLUSH_INTERVAL_S
        next_rollout = now + self.settings.rollout_tick_s
        next_policy = now + self.settings.policy_interval_s
        next_freeze, next_full_gc = now, now + GC_FULL_INTERVAL_S
        while not self._stop.wait(0.2):
            now = time.monotonic()
            try:
                if now >= next_freeze:
                    next_freeze = now + GC_FREEZE_INTERVAL_S
                    full = now >= next_full_gc
                    if full:
                        next_full_gc = now + GC_FULL_INTERVAL_S
                    _freeze_heap(full)
                if self.reconciler is not None and now >= next_rollout:
                    next_rollout = now + self.settings.rollout_tick_s
                    self.reconciler.tick()
                if now >= next_policy:
                    next_policy = now + self.settings.policy_interval_s
                    self.apply_policy()
                if now >= next_window:
                    next_window = now + self.settings.window_s
                    self.evaluate()
                gauges_due, devices_due = now >= next_gauges, now >= next_devices
                # one pass over the monitors (under the engine lock) serves both tasks
                layer_a = self.engine.status() if gauges_due or devices_due else LayerAStatus()
                drifting = layer_a.drifting
                if gauges_due or devices_due:
                    self._drifting = drifting  # the update policy reads this snapshot
                if gauges_due:
                    next_gauges = now + GAUGE_INTERVAL_S
                    self._refresh_gauges(drifting, layer_a.calibration)
                if devices_due:
                    next_devices = now + DEVICE_FLUSH_INTERVAL_S
                    self._flush_devices(drifting, layer_a.calibration)
                if now >= next_ckpt:
                    next_ckpt = now + self.settings.checkpoint_interval_s
                    self.checkpoint()
            except Exception:  # a timer must not die
                log.exception("service timer task failed")

    # -- updates ---------------------------------------------------------------------------

    def fleet_devices(self, fleet: str) -> list[FleetDevice]:
        """The devices of ``fleet`` as the candidate proposer sees them.

        Their drift status is the timers' last snapshot (at most ``DEVICE_FLUSH_INTERVAL_S``
        old; taken now when there is none yet), not a fresh pass over every monitor per call.
        """
        drifting = self._drifting if self._drifting is not None else self.engine.drifting()
        return [
            FleetDevice(
                device=i.device,
                active_version=i.active_version,
                schema_id=i.schema_id,
                last_deploy_seq=i.last_deploy_seq or 0,
                last_seen=i.last_seen,
                online=i.online,
                drifting=drifting.get(i.key, ()),
            )
            for i in self.directory.all()
            if i.fleet == fleet
        ]

    def _add_parameter_set(self, rec: ParameterSetRecord) -> None:
        """A stored parameter set (at start, or a candidate registered while running): cohorts
        can bin its model, and its version gets its ``model_version`` label."""
        self.catalog.add_blob(verify_blob(rec.blob, trusted=None, schema_id=None))
        self.metrics.model_versions.register(
            rec.version, recalibration_base(rec.source, rec.metrics)
        )

    def _reference_of(self, fleet: str, device: str) -> tuple[Any, Any, int | None] | None:
        with self.engine.lock:
            mon = self.engine.monitors.get((fleet, device))
            if mon is None or mon.reference is None:
                return None
            mu, sigma = mon.reference
            return mu, sigma, mon.model_version

    def apply_policy(self) -> list[str]:
        """One pass of the update policy (:mod:`service.rollout.update_policy`)."""
        return [] if self.policy is None else self.policy.apply()

    def evaluate(self) -> list[CohortReport]:
        """Close every cohort window now; export the reports as metrics and events."""
        reports = self.engine.evaluate(int(time.time() * 1000))
        self.last_reports = reports
        export_cohort_reports(self.metrics, reports)
        for r in reports:
            fresh = []
            now_set = set()
            for d in r.detections:
                key = (d.fleet, d.model_version, d.device, d.signal, d.feature, d.detector)
                now_set.add(key)
                if key not in self._last_window_detections:
                    fresh.append(d)
            self._window_detections |= now_set
            if fresh:  # a device that stays discovered is recorded once, not every window
                self._record(fresh)
        self._last_window_detections, self._window_detections = self._window_detections, set()
        return reports

    def _refresh_gauges(
        self,
        drifting: dict[tuple[str, str], tuple[str, ...]],
        calibration: Mapping[tuple[str, str], CalibrationState] | None = None,
    ) -> None:
        m = self.metrics
        fleet_of, version_of = m.fleet, m.model_versions.label
        by_calibration: Counter[tuple[str, str]] = Counter(
            (fleet_of(fleet), state) for (fleet, _dev), state in (calibration or {}).items()
        )
        m.layer_a_devices.clear()
        for (fleet, state), n in by_calibration.items():
            m.layer_a_devices.labels(fleet=fleet, state=state).set(n)
        m.queue_depth.set(self.queue.qsize())
        m.registry_queue.set(self.writer.queue_depth)
        m.registry_retries.set(self.writer.retries)
        states: Counter[tuple[str, str]] = Counter()
        models: Counter[tuple[str, str]] = Counter()
        now = time.time()
        per_signal: Counter[tuple[str, str]] = Counter()
        for (fleet, _dev), signals in drifting.items():
            for sig in signals:
                per_signal[(fleet_of(fleet), sig)] += 1
        for info in self.directory.all():
            fleet = fleet_of(info.fleet)
            states[(fleet, "online" if info.online else "offline")] += 1
            if info.key in drifting:
                states[(fleet, "drifting")] += 1
            if info.active_version is not None:
                models[(fleet, version_of(info.active_version))] += 1
            if info.last_seen:
                m.last_seen_age.labels(fleet=fleet).observe(max(0.0, now - info.last_seen))
        m.devices.clear()
        for (fleet, state), n in states.items():
            m.devices.labels(fleet=fleet, state=state).set(n)
        m.devices_by_model.clear()
        for (fleet, mv), n in models.items():
            m.devices_by_model.labels(fleet=fleet, model_version=mv).set(n)
        m.drifting_devices.clear()
        for (fleet, sig), n in per_signal.items():
            m.drifting_devices.labels(fleet=fleet, signal=sig).set(n)

    def _flush_devices(
        self,
        drifting: dict[tuple[str, str], tuple[str, ...]] | None = None,
        calibration: Mapping[tuple[str, str], CalibrationState] | None = None,
    ) -> None:
        if drifting is None or calibration is None:
            layer_a = self.engine.status()
            drifting, calibration = layer_a.drifting, layer_a.calibration
        recs = []
        now = time.time()
        for info in self.directory.all():
            # drifting signals win; a device still learning its null is "calibrating"
            learning = calibration.get(info.key) in ("reference", "calibrating")
            state = (",".join(drifting.get(info.key, ())) or ("calibrating" if learning else "ok"))[
                :255
            ]
            seen_since = info.last_seen > info.written
            stale = seen_since and now - info.written >= DEVICE_REFRESH_S
            if not (info.dirty or state != info.drift_state or stale):
                continue
            info.dirty = False
            info.drift_state = state
            info.written = now
            schema = self.directory.schema_of(info)
            recs.append(
                DeviceRecord(
                    fleet=info.fleet,
                    device=info.device,
                    schema_id=info.schema_id,
                    active_version=info.active_version,
                    previous_version=info.previous_version,
                    update_state=info.update_state,
                    online=info.online,
                    fw=info.fw,
                    boot=info.boot,
                    last_seq=info.seq,
                    first_seen=utc_from_unix(info.first_seen) if info.first_seen else None,
                    last_seen=utc_from_unix(info.last_seen) if info.last_seen else None,
                    caps=info.caps or None,
                    drift_state=state,
                    n_features=schema.n_features if schema else None,
                    n_classes=schema.n_classes if schema else None,
                )
            )
        if recs:
            self._submit(lambda: self.writer.upsert_devices(recs))
        self._submit(lambda: self.positions.save(self.directory.positions(), wait=self._stopped))

    def checkpoint(self) -> int:
        """Hand the state of every monitor changed since its last checkpoint, and of every
        cohort, to the registry writer, slice by slice (ingest waits only while a slice is
        copied: :meth:`DriftEngine.checkpoint`); returns how many records.

        The checkpoint counts once, as ``outcome="ok"`` when every slice committed, ``"error"``
        when one did not or the hand-over failed; the devices of a slice that failed for good
        are due again at the next checkpoint."""
        settlement = Settlement(self._checkpoint_settled)

        def save(records: list[CheckpointRecord]) -> None:
            settled = settlement.part()
            keys = [(r.fleet, r.device) for r in records if r.device is not None]

            def on_settled(committed: bool) -> None:
                if not committed:
                    self.engine.mark_dirty(keys)
                settled(committed)

            try:
                self.writer.save_checkpoints(records, on_settled=on_settled)
            except BaseException:
                settled(False)  # the writer calls no on_settled for an op it did not queue
                raise

        try:
            n = self.engine.checkpoint(save)
        except (WriterBackpressureError, RegistryError) as exc:
            settlement.seal(complete=False)
            log.error("checkpoint not written: %s (its devices stay due)", exc)
            return 0
        except Exception:
            settlement.seal(complete=False)
            log.exception("checkpoint failed (its devices stay due)")
            return 0
        settlement.seal(complete=True)
        return n

    def _checkpoint_settled(self, committed: bool) -> None:
        """A checkpoint's slices all committed (``ok``), or one failed for good (``error``)."""
        self.metrics.checkpoints.labels(outcome="ok" if committed else "error").inc()

    def _calibration_of(self, fleet: str, device: str) -> dict[str, Any] | None:
        """Layer A's calibration of one device, for the API (``None``: no monitor)."""
        status = self.engine.calibration(fleet, device)
        return None if status is None else dataclasses.asdict(status)

    def _fleet_calibration_of(self, fleet: str) -> dict[str, Any]:
        """What layer A learnt of one fleet, with its declaration, for the API."""
        return dataclasses.asdict(self.engine.fleet_calibration(fleet))

    def status(self) -> ServiceStatus:
        """A snapshot of the main figures."""
        return ServiceStatus(
            connected=self.consumer.connected.is_set(),
            devices=len(self.directory),
            readings=sum(i.readings for i in self.directory.all()),
            rejections=dict(self.batcher.rejections),
            detections=self.detections,
            queue_depth=self.queue.qsize(),
        )
