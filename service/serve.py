"""``tinydrift serve``: ingest, drift detection, registry and ``/metrics``, wired together.

Threads: paho's network thread (enqueue only) → the batcher (decode, validate, layer A,
layer-B accumulation) → the registry writer (batched commits). A timer thread closes cohort
windows, refreshes the device gauges, writes changed devices and checkpoints detector state.
Shutdown (SIGINT/SIGTERM or :meth:`Service.stop`) drains the queue, evaluates nothing new,
checkpoints every monitor and flushes the registry, so a restart resumes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import start_http_server

from edge_agent.blob import BlobRejectedError, verify_blob
from edge_agent.wire.messages import UpdateAck
from service.api import create_app
from service.api.server import ApiServer
from service.config import ServiceSettings
from service.drift.cohort_monitor import CohortReport
from service.drift.detection import Detection
from service.drift.device_monitor import DeviceMonitorConfig
from service.drift.engine import DriftEngine
from service.ingest.batcher import Batcher
from service.ingest.device_directory import DeviceDirectory, DeviceInfo
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.ingest.mqtt_consumer import Incoming, MqttConsumer
from service.ingest.schema_catalog import SchemaCatalog
from service.metrics import ServiceMetrics
from service.registry.errors import RegistryError, WriterBackpressureError
from service.registry.records import DeviceRecord, label_records, utc_from_unix
from service.registry.store import Registry
from service.registry.writer import RegistryWriter

log = logging.getLogger(__name__)

GAUGE_INTERVAL_S = 5.0
DEVICE_FLUSH_INTERVAL_S = 2.0
DEVICE_REFRESH_S = 30.0
"""A device heard from is rewritten (last seen, sequence) at least this often."""


@dataclass
class ServiceStatus:
    """A snapshot for logs and tests."""

    connected: bool
    devices: int
    readings: int
    rejections: dict[str, int]
    detections: int
    queue_depth: int


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
        self.metrics = ServiceMetrics()
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
            ),
        )
        if discard_checkpoints:
            log.warning("discarding stored detector checkpoints: references are relearned")
        else:
            self._restore_checkpoints()
        self.queue: queue.Queue[Incoming] = queue.Queue(settings.queue_size)
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
                self.catalog.add_blob(verify_blob(rec.blob, trusted=None, schema_id=None))
            except BlobRejectedError as exc:
                log.error(
                    "stored parameter set %s v%d is unreadable: %s", rec.schema_id, rec.version, exc
                )

    def _load_devices(self) -> None:
        for rec in self.registry.list_devices():
            info = self.directory.adopt_known(rec.fleet, rec.device, rec.schema_id)
            info.active_version = rec.active_version
            info.online = False
            info.dirty = False

    def _restore_checkpoints(self) -> None:
        records = self.registry.load_checkpoints()
        n = self.engine.restore(records)
        for rec in records:
            if rec.device is not None and rec.last_boot is not None and rec.last_seq is not None:
                self.directory.restore_sequence(rec.fleet, rec.device, rec.last_boot, rec.last_seq)
        if n:
            log.info("restored %d detector checkpoints", n)

    def start(self) -> None:
        """Serve the API and ``/metrics``, connect to the broker, start processing.

        Raises :class:`~service.api.server.ApiServerError` when the API cannot be served and
        ``OSError`` when ``/metrics`` cannot (the API is stopped again then).
        """
        s = self.settings
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
        app = create_app(self.registry, self.status)
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
        self._flush_devices()
        self.checkpoint()
        self.writer.close()
        self.registry.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    # -- IngestSink -----------------------------------------------------------------------

    def on_frames(self, frames: list[DeviceFrame]) -> None:
        """Layer A and B on a batch; detections to the registry and the metrics."""
        groups: dict[tuple[str, str], list[DeviceFrame]] = {}
        for fr in frames:
            groups.setdefault((fr.fleet, str(fr.param_version)), []).append(fr)
        for labels, group in groups.items():
            self.metrics.confidence.observe_many(labels, np.concatenate([f.conf for f in group]))
        dets = self.engine.on_frames(frames)
        if dets:
            self._record(dets)

    def on_labels(self, labels: list[DeviceLabels]) -> None:
        """Error-stream detectors, label buffer."""
        dets = self.engine.on_labels(labels)
        if dets:
            self._record(dets)
        if self.settings.label_cap_per_device > 0:
            recs = [r for lb in labels for r in label_records(lb)]
            self._submit(lambda: self.writer.add_labels(recs, self.settings.label_cap_per_device))

    def on_status(self, info: DeviceInfo) -> None:
        """Births and Wills are written with the next device flush."""
        info.dirty = True

    def on_ack(self, fleet: str, device: str, ack: UpdateAck, recv_ts: float) -> None:
        """Update acks: the device's update state (the rollout controller listens here later)."""
        info = self.directory.get(fleet, device)
        if info is not None:
            info.update_state = ack.state
            info.dirty = True

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
                fleet=d.fleet, scope=d.scope, signal=d.signal, detector=d.detector
            )
            exemplar = {"device_id": d.device[:100]} if d.device else None
            counter.inc(1, exemplar=exemplar)
        self._submit(lambda: self.writer.record_drift_events(dets))

    def _on_queue_full(self) -> None:
        self.metrics.rejected.labels(reason="queue_full").inc()
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
        while not self._stop.wait(0.2):
            now = time.monotonic()
            try:
                if now >= next_window:
                    next_window = now + self.settings.window_s
                    self.evaluate()
                gauges_due, devices_due = now >= next_gauges, now >= next_devices
                # one pass over the monitors (under the engine lock) serves both tasks
                drifting = self.engine.drifting() if gauges_due or devices_due else {}
                if gauges_due:
                    next_gauges = now + GAUGE_INTERVAL_S
                    self._refresh_gauges(drifting)
                if devices_due:
                    next_devices = now + DEVICE_FLUSH_INTERVAL_S
                    self._flush_devices(drifting)
                if now >= next_ckpt:
                    next_ckpt = now + self.settings.checkpoint_interval_s
                    self.checkpoint()
            except Exception:  # a timer must not die
                log.exception("service timer task failed")

    def evaluate(self) -> list[CohortReport]:
        """Close every cohort window now; export the reports as metrics and events."""
        reports = self.engine.evaluate(int(time.time() * 1000))
        self.last_reports = reports
        m = self.metrics
        for r in reports:
            mv = str(r.model_version)
            for feat, js in r.feature_js.items():
                m.feature_drift.labels(fleet=r.fleet, model_version=mv, feature=feat).set(js)
            for cls, ratio in r.class_ratios.items():
                m.class_ratio.labels(fleet=r.fleet, model_version=mv, **{"class": cls}).set(ratio)
            if r.labelled_accuracy is not None:
                m.labelled_accuracy.labels(fleet=r.fleet, model_version=mv).set(r.labelled_accuracy)
            if r.accuracy is not None:
                m.estimated_accuracy.labels(fleet=r.fleet, model_version=mv).set(
                    r.accuracy.estimate
                )
            m.alarm_active.labels(fleet=r.fleet, model_version=mv, signal="cohort").set(
                1 if r.cohort_alarm else 0
            )
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

    def _refresh_gauges(self, drifting: dict[tuple[str, str], tuple[str, ...]]) -> None:
        m = self.metrics
        m.queue_depth.set(self.queue.qsize())
        m.registry_queue.set(self.writer.queue_depth)
        m.registry_retries.set(self.writer.retries)
        states: Counter[tuple[str, str]] = Counter()
        models: Counter[tuple[str, str]] = Counter()
        now = time.time()
        per_signal: Counter[tuple[str, str]] = Counter()
        for (fleet, _dev), signals in drifting.items():
            for sig in signals:
                per_signal[(fleet, sig)] += 1
        for info in self.directory.all():
            states[(info.fleet, "online" if info.online else "offline")] += 1
            if info.key in drifting:
                states[(info.fleet, "drifting")] += 1
            if info.active_version is not None:
                models[(info.fleet, str(info.active_version))] += 1
            if info.last_seen:
                m.last_seen_age.labels(fleet=info.fleet).observe(max(0.0, now - info.last_seen))
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
        self, drifting: dict[tuple[str, str], tuple[str, ...]] | None = None
    ) -> None:
        if drifting is None:
            drifting = self.engine.drifting()
        recs = []
        now = time.time()
        for info in self.directory.all():
            state = (",".join(drifting.get(info.key, ())) or "ok")[:255]
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

    def checkpoint(self) -> int:
        """Write every monitor's state to the registry; returns how many records."""
        try:
            records = self.engine.checkpoint()
        except Exception:
            self.metrics.checkpoints.labels(outcome="error").inc()
            log.exception("checkpoint failed")
            return 0
        try:
            self.writer.save_checkpoints(records)
        except (WriterBackpressureError, RegistryError) as exc:
            self.metrics.checkpoints.labels(outcome="error").inc()
            log.error("checkpoint not written: %s", exc)
            return 0
        self.metrics.checkpoints.labels(outcome="ok").inc()
        return len(records)

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
