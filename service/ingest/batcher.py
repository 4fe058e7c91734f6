"""Drain the ingest queue in batches: decode, validate, sequence-check, group, hand on.

One thread. It blocks for the first message, then takes whatever else is queued up to
``max_messages`` or ``max_wait_s`` (control messages first, then telemetry:
:mod:`service.ingest.ingest_queue`), and processes the batch: every message is decoded and
validated with the device contract (``edge_agent.wire``); telemetry is checked against the
device's schema and sequence; the accepted frames of the whole batch go to the sink in one
call, so detectors work on batches. Every rejection is counted by reason and never stops
ingest; an unexpected error in one message is logged, counted as ``internal`` and skipped.

Metric series follow validation: a fleet gets its series when the service admits it
(``ServiceMetrics.fleets``: a device registered in it, within ``max_fleets``), so a message on
a topic of any other fleet is counted under ``fleet="_unknown"`` and rejected (``unknown_device``;
``unknown_fleet`` for a birth or an adoption the service does not admit), never a new series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.wire.errors import REASONS, WireError
from edge_agent.wire.messages import LabelBatch, Status, TelemetryBatch, UpdateAck
from edge_agent.wire.telemetry_binary import HEADER_SIZE, BinaryHeader, record_dtype
from edge_agent.wire.telemetry_codec import decode_telemetry_header
from edge_agent.wire.topics import Leaf, Topic, parse_topic
from service.ingest.device_directory import DeviceDirectory, DeviceInfo
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.ingest.ingest_queue import Incoming, IngestQueue
from service.metric_labels import UNKNOWN
from service.metrics import BulkHistogram, ServiceMetrics

log = logging.getLogger(__name__)

SERVICE_REASONS = (
    "unknown_device",
    "unknown_fleet",
    "unknown_schema",
    "duplicate",
    "stale",
    "sequence_jump",
    "queue_full",
    "internal",
)
"""Rejection reasons of the service itself, beyond the wire's (``WireError.reason``)."""


class IngestSink(Protocol):
    """Where the batcher delivers what it accepted (implemented by the service)."""

    def on_frames(self, frames: list[DeviceFrame]) -> None:
        """Telemetry frames of one batch, in arrival order."""

    def on_labels(self, labels: list[DeviceLabels]) -> None:
        """Label batches of one batch."""

    def on_status(self, info: DeviceInfo) -> None:
        """A birth or a Will changed a device."""

    def on_ack(self, fleet: str, device: str, ack: UpdateAck, recv_ts: float) -> None:
        """An update ack from a device."""


@dataclass(frozen=True, slots=True, eq=False)
class _FleetMetrics:
    """An admitted fleet's metric children, looked up once (``labels()`` costs µs per call)."""

    messages: dict[Leaf, Any]
    readings: Any
    gaps: Any
    """Telemetry frames lost (``stream="telemetry"``)."""
    label_gaps: Any
    """Label batches lost (``stream="labels"``)."""
    lag: BulkHistogram
    lag_labels: tuple[str]
    labels: Any


_TOPIC_CACHE = 100_000
"""Topics whose parse the batcher keeps (4 per device: tel, lbl, ack, status)."""


class _RejectedError(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Batcher:
    """Turns queued MQTT messages into validated, sequence-checked device records."""

    def __init__(
        self,
        source: IngestQueue,
        directory: DeviceDirectory,
        sink: IngestSink,
        metrics: ServiceMetrics,
        *,
        max_messages: int = 2_000,
        max_wait_s: float = 0.05,
        max_payload_bytes: int = 65_536,
    ) -> None:
        self.source = source
        self.directory = directory
        self.sink = sink
        self.metrics = metrics
        self.max_messages = max_messages
        self.max_wait_s = max_wait_s
        self.max_payload_bytes = max_payload_bytes
        self.rejections: Counter[str] = Counter()
        self.processed = 0
        self._stop = threading.Event()
        self._idle = threading.Event()
        metrics.init_reasons(sorted(REASONS | set(SERVICE_REASONS)))
        self._fleets: dict[str, _FleetMetrics] = {}
        """Admitted fleets' children (at most ``max_fleets`` or the configured fleets)."""
        self._refused_fleet = False
        """Whether a fleet was refused yet (logged the first time)."""
        self._unknown_messages = {
            leaf: metrics.messages.labels(fleet=UNKNOWN, kind=leaf.value) for leaf in Leaf
        }
        self._topics: dict[str, Topic] = {}
        """Parsed topics (``parse_topic`` is pure; at most :data:`_TOPIC_CACHE`)."""
        self._thread = threading.Thread(target=self._run, name="ingest-batcher", daemon=True)

    # -- thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batcher thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Process what is queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until the queue is empty and the last batch is processed (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.source.empty() and self._idle.is_set():
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        while True:
            batch: list[Incoming] = []
            if not self.source.take(batch, self.max_messages, timeout=0.2):
                self._idle.set()
                if self._stop.is_set():
                    return
                continue
            self._idle.clear()
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_messages:
                if not self.source.take(batch, self.max_messages):
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.001)
            self.metrics.queue_depth.set(self.source.qsize())
            try:
                self.process(batch)
            except Exception:  # a bug must not stop ingest; the batch's messages are counted
                log.exception("ingest batch of %d messages failed", len(batch))
                self._reject("internal", len(batch))
            if self.source.empty():
                self._idle.set()

    # -- processing -----------------------------------------------------------------------

    def _reject(self, reason: str, n: int = 1) -> None:
        self.rejections[reason] += n
        self.metrics.rejected.labels(reason=reason).inc(n)

    def process(self, batch: list[Incoming]) -> None:
        """Decode, validate and deliver one batch (public for tests and benchmarks).

        Two passes. The first parses every topic and checks every telemetry frame's header
        (:func:`~edge_agent.wire.telemetry_codec.decode_telemetry_header`: every check of the
        decoder); the records of the binary frames are then decoded together, one
        ``np.frombuffer`` per feature count and ``frac_bits`` (the same values as
        ``decode_telemetry``). The second takes the messages in arrival order against the
        device directory, as one message at a time would. Counters and the lag histogram are added
        once per batch.
        """
        t0 = time.perf_counter()
        frames: list[DeviceFrame] = []
        labels: list[DeviceLabels] = []
        tally = _Tally()
        parsed: list[_Parsed | None] = []
        binary: dict[tuple[int, int], list[_Parsed]] = {}
        for msg in batch:
            parsed.append(self._first_pass(msg, tally, binary))
        for (n_features, frac_bits), group in binary.items():
            _decode_records(group, n_features, frac_bits)
        for item in parsed:
            if item is None:
                continue
            try:
                self._one(item, frames, labels, tally)
            except WireError as exc:
                self._reject(exc.reason)
            except _RejectedError as exc:
                self._reject(exc.reason)
            except Exception:
                log.exception("unexpected error on %s", item.msg.topic)
                self._reject("internal")
        tally.flush(self._messages_of)
        self.processed += len(batch)
        self.metrics.batch_size.observe(len(batch))
        if frames:
            self.sink.on_frames(frames)
        if labels:
            self.sink.on_labels(labels)
        self.metrics.process_seconds.observe(time.perf_counter() - t0)

    def _first_pass(
        self,
        msg: Incoming,
        tally: _Tally,
        binary: dict[tuple[int, int], list[_Parsed]],
    ) -> _Parsed | None:
        """Topic, message counter, size; a telemetry frame's header. ``None``: rejected."""
        try:
            t = self._topics.get(msg.topic)
            if t is None:
                t = parse_topic(msg.topic)
                if len(self._topics) >= _TOPIC_CACHE:
                    self._topics.clear()
                self._topics[msg.topic] = t
            tally.messages[(t.fleet, t.leaf)] += 1
            if len(msg.payload) > self.max_payload_bytes:
                raise WireError("oversized", f"{len(msg.payload)} bytes")
            item = _Parsed(msg, t)
            if t.leaf == Leaf.TEL:
                head = decode_telemetry_header(msg.payload, self.max_payload_bytes)
                if isinstance(head, BinaryHeader):
                    item.header = head
                    binary.setdefault((head.n_features, head.frac_bits), []).append(item)
                else:
                    item.batch = head
            return item
        except WireError as exc:
            self._reject(exc.reason)
        except Exception:
            log.exception("unexpected error on %s", msg.topic)
            self._reject("internal")
        return None

    def _admitted(self, fleet: str, *, registers: bool, reason: str) -> _FleetMetrics:
        """The children of an admitted fleet. ``registers``: the message registers a device in
        it, which admits the fleet if there is room; else (or no room) rejected as ``reason``."""
        fm = self._fleets.get(fleet)
        if fm is not None:
            return fm
        fleets = self.metrics.fleets
        if not (fleets.admit(fleet) if registers else fleet in fleets):
            if registers and not self._refused_fleet:
                self._refused_fleet = True
                log.warning(
                    "a device registers in fleet %r, which the service does not monitor "
                    "(max_fleets %d reached, or not among fleets): rejected as unknown_fleet, "
                    "as are later ones (logged once)",
                    fleet[:64],
                    fleets.max_fleets,
                )
            raise _RejectedError(reason)
        return self._fleet_metrics(fleet)

    def _messages_of(self, fleet: str) -> dict[Leaf, Any]:
        """The message counters of ``fleet`` (``_unknown``'s if it is not admitted)."""
        fm = self._fleets.get(fleet)
        if fm is None and fleet in self.metrics.fleets:
            fm = self._fleet_metrics(fleet)
        return self._unknown_messages if fm is None else fm.messages

    def _fleet_metrics(self, fleet: str) -> _FleetMetrics:
        """Look up an admitted fleet's children (once)."""
        fm = self._fleets.get(fleet)
        if fm is None:
            m = self.metrics
            fm = self._fleets[fleet] = _FleetMetrics(
                messages={leaf: m.messages.labels(fleet=fleet, kind=leaf.value) for leaf in Leaf},
                readings=m.readings.labels(fleet=fleet),
                gaps=m.sequence_gaps.labels(fleet=fleet, stream="telemetry"),
                label_gaps=m.sequence_gaps.labels(fleet=fleet, stream="labels"),
                lag=m.lag,
                lag_labels=(fleet,),
                labels=m.labels.labels(fleet=fleet),
            )
            m.lag.observe_many(fm.lag_labels, np.empty(0))  # the fleet's series, at 0
        return fm

    def _known(self, fleet: str, device: str, recv_ts: float) -> tuple[DeviceInfo, _FleetMetrics]:
        """A device whose telemetry or labels are taken (adopted if the policy says so), and
        its fleet's children."""
        info = self.directory.get(fleet, device)
        if info is None or (info.schema_id is None and not info.adopted):
            if self.directory.unknown_devices != "adopt":
                raise _RejectedError("unknown_device")
            fm = self._admitted(fleet, registers=True, reason="unknown_fleet")
            info = self.directory.adopt(fleet, device, recv_ts)
            if info is None:
                raise _RejectedError("unknown_device")
        else:
            fm = self._admitted(fleet, registers=True, reason="unknown_fleet")
        info.last_seen = recv_ts
        return info, fm

    def _check_shape(self, info: DeviceInfo, batch: TelemetryBatch | LabelBatch) -> None:
        schema = self.directory.schema_of(info)
        if schema is not None:
            batch.check_shape(schema.n_features, schema.n_classes)
        elif not info.adopted:
            raise _RejectedError("unknown_schema")

    def _check_binary(self, info: DeviceInfo, item: _Parsed) -> None:
        """:meth:`_check_shape` of a binary frame decoded by :func:`_decode_records` (the
        errors of ``TelemetryBatch.check_shape``)."""
        schema = self.directory.schema_of(info)
        head = item.header
        assert head is not None
        if schema is not None:
            if head.n_features != schema.n_features:
                raise WireError(
                    "wrong_feature_count",
                    f"{head.n_features} features, schema has {schema.n_features}",
                )
            if item.pred_max >= schema.n_classes:
                raise WireError("bad_class", f"pred {item.pred_max} ≥ {schema.n_classes} classes")
        elif not info.adopted:
            raise _RejectedError("unknown_schema")

    def _one(
        self,
        item: _Parsed,
        frames: list[DeviceFrame],
        labels: list[DeviceLabels],
        tally: _Tally,
    ) -> None:
        msg, t = item.msg, item.topic
        if t.leaf == Leaf.TEL:
            info, fm = self._known(t.fleet, t.device, msg.recv_ts)
            head = item.header
            if head is None:
                batch = item.batch
                assert batch is not None
                self._check_shape(info, batch)
                head = BinaryHeader(
                    0, batch.seq, batch.boot, batch.ts_ms, batch.param_version, batch.k, 0
                )
                features = np.asarray(batch.features)
                pred = np.asarray(batch.pred)
                conf = np.asarray(batch.conf)
            else:
                self._check_binary(info, item)
                assert item.features is not None
                assert item.pred is not None
                assert item.conf is not None
                features, pred, conf = item.features, item.pred, item.conf
            lost_before = info.lost_frames
            verdict = self.directory.check_sequence(t.fleet, t.device, head.boot, head.seq)
            if verdict != "ok":
                raise _RejectedError(verdict)
            if info.lost_frames > lost_before:
                tally.gaps[fm.gaps] += info.lost_frames - lost_before
            info.readings += head.k
            if head.param_version != info.active_version:
                # an update (or a revert) shows in the telemetry before the next birth
                info.previous_version, info.active_version = (
                    info.active_version,
                    head.param_version,
                )
                info.dirty = True
            tally.readings[fm] += head.k
            tally.lags[fm].append(msg.recv_ts - head.ts_ms / 1000.0)
            frames.append(
                DeviceFrame(
                    fleet=t.fleet,
                    device=t.device,
                    boot=head.boot,
                    seq=head.seq,
                    ts_ms=head.ts_ms,
                    recv_ts=msg.recv_ts,
                    param_version=head.param_version,
                    features=features,
                    pred=pred,
                    conf=conf,
                )
            )
        elif t.leaf == Leaf.LBL:
            lb = LabelBatch.from_json(msg.payload, self.max_payload_bytes)
            info, fm = self._known(t.fleet, t.device, msg.recv_ts)
            self._check_shape(info, lb)
            lost_before = info.lost_labels
            verdict = self.directory.check_label_sequence(t.fleet, t.device, lb.boot, lb.seq)
            if verdict != "ok":
                raise _RejectedError(verdict)
            if info.lost_labels > lost_before:
                tally.gaps[fm.label_gaps] += info.lost_labels - lost_before
            fm.labels.inc(lb.k)
            labels.append(
                DeviceLabels(
                    fleet=t.fleet,
                    device=t.device,
                    boot=lb.boot,
                    seq=lb.seq,
                    ts_ms=lb.ts_ms,
                    recv_ts=msg.recv_ts,
                    param_version=lb.param_version,
                    features=np.asarray(lb.features),
                    pred=np.asarray(lb.pred),
                    label=np.asarray(lb.label),
                )
            )
        elif t.leaf == Leaf.STATUS:
            if not msg.payload:
                return  # a cleared retained status
            status = Status.from_json(msg.payload, self.max_payload_bytes)
            self._admitted(t.fleet, registers=True, reason="unknown_fleet")
            self.sink.on_status(self.directory.on_status(t.fleet, t.device, status, msg.recv_ts))
        elif t.leaf == Leaf.ACK:
            ack = UpdateAck.from_json(msg.payload, self.max_payload_bytes)
            self._admitted(t.fleet, registers=False, reason="unknown_device")
            self.sink.on_ack(t.fleet, t.device, ack, msg.recv_ts)


class _Parsed:
    """A message past the first pass: its topic, a telemetry frame's header (binary; its
    records once decoded) or decoded batch (JSON)."""

    __slots__ = ("batch", "conf", "features", "header", "msg", "pred", "pred_max", "topic")

    def __init__(self, msg: Incoming, topic: Topic) -> None:
        self.msg = msg
        self.topic = topic
        self.header: BinaryHeader | None = None
        self.batch: TelemetryBatch | None = None
        self.features: npt.NDArray[np.float64] | None = None
        self.pred: npt.NDArray[np.int64] | None = None
        self.conf: npt.NDArray[np.float64] | None = None
        self.pred_max = 0


def _decode_records(group: list[_Parsed], n_features: int, frac_bits: int) -> None:
    """Decode the records of binary frames with the same ``F`` and ``frac_bits`` at once: the
    values ``decode_binary`` gives (read-only), as slices of one array per field."""
    ks = np.fromiter(
        (item.header.k for item in group if item.header is not None),
        dtype=np.int64,
        count=len(group),
    )
    records = np.frombuffer(
        b"".join([item.msg.payload[HEADER_SIZE:] for item in group]),
        dtype=record_dtype(n_features),
    )
    features = np.ldexp(records["features"].astype(np.float64), -frac_bits)
    pred = records["pred"].astype(np.int64)
    conf = records["conf"].astype(np.float64) * (1.0 / 256.0)
    for x in (features, pred, conf):
        x.flags.writeable = False
    ends = np.cumsum(ks)
    starts = ends - ks
    pred_max = np.maximum.reduceat(pred, starts).tolist()
    for item, lo, hi, top in zip(group, starts.tolist(), ends.tolist(), pred_max, strict=True):
        item.features = features[lo:hi]
        item.pred = pred[lo:hi]
        item.conf = conf[lo:hi]
        item.pred_max = top


class _Tally:
    """Counter increments and lag observations of one batch, added once at its end."""

    def __init__(self) -> None:
        self.messages: Counter[tuple[str, Leaf]] = Counter()
        """Messages by topic fleet (admitted or not: resolved at :meth:`flush`) and leaf."""
        self.readings: Counter[_FleetMetrics] = Counter()
        self.gaps: Counter[Any] = Counter()
        """Lost messages per gap counter child (a fleet's telemetry or label stream)."""
        self.lags: defaultdict[_FleetMetrics, list[float]] = defaultdict(list)
        """Receive time minus device timestamp of each accepted frame (negative: not yet
        clipped to 0)."""

    def flush(self, messages_of: Callable[[str], dict[Leaf, Any]]) -> None:
        """Add the batch's counts; ``messages_of`` gives a topic fleet's message counters."""
        for fm, lags in self.lags.items():
            fm.lag.observe_many(fm.lag_labels, np.maximum(np.asarray(lags), 0.0))
        for (fleet, leaf), n in self.messages.items():
            messages_of(fleet)[leaf].inc(n)
        for fm, n in self.readings.items():
            fm.readings.inc(n)
        for child, n in self.gaps.items():
            child.inc(n)
