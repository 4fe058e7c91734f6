"""The batcher's policies without a broker: unknown devices, schemas, sequences, internal errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_agent.blob import ParameterSchema
from edge_agent.wire.messages import Status, TelemetryBatch
from edge_agent.wire.telemetry_binary import encode_binary
from edge_agent.wire.topics import Leaf, topic
from service.ingest.batcher import Batcher
from service.ingest.device_directory import DeviceDirectory
from service.ingest.ingest_queue import Incoming, IngestQueue
from service.ingest.schema_catalog import SchemaCatalog
from service.metrics import ServiceMetrics

SCHEMA = ParameterSchema(features=tuple(f"f{i}" for i in range(3)), classes=("a", "b", "c"), rows=3)


class Sink:
    def __init__(self) -> None:
        self.frames: list = []
        self.statuses: list = []
        self.fail = False

    def on_frames(self, frames):
        if self.fail:
            raise RuntimeError("a bug downstream")
        self.frames += frames

    def on_labels(self, labels):
        pass

    def on_status(self, info):
        self.statuses.append(info)

    def on_ack(self, *args):
        pass


def frame(seq: int, boot: int = 1, f: int = 3) -> bytes:
    b = TelemetryBatch.create(
        seq=seq,
        boot=boot,
        ts_ms=int(time.time() * 1000),
        param_version=1,
        features=np.ones((4, f)),
        pred=[0, 1, 2, 0],
        conf=[0.5] * 4,
    )
    return encode_binary(b, frac_bits=8)


def birth(schema_id: str) -> bytes:
    return Status.create(
        online=True,
        schema_id=schema_id,
        active_version=1,
        update_state="IDLE",
        last_deploy_seq=0,
        epoch_floor=0,
        boot=1,
        ts_ms=0,
        caps={"max_chunk": 512, "telemetry": ["bin"], "labels": True},
    ).to_json()


def make(policy: str = "reject") -> tuple[Batcher, Sink, DeviceDirectory]:
    cat = SchemaCatalog()
    cat.add_schema(SCHEMA)
    d = DeviceDirectory(cat, unknown_devices=policy)  # type: ignore[arg-type]
    sink = Sink()
    return Batcher(IngestQueue(1_000), d, sink, ServiceMetrics()), sink, d


def msg(device: str, leaf: Leaf, payload: bytes) -> Incoming:
    return Incoming(topic("f", device, leaf), payload, time.time())


def test_unknown_devices_are_rejected_by_default_and_accepted_once_born():
    b, sink, _ = make()
    b.process([msg("d1", Leaf.TEL, frame(0))])
    assert b.rejections == {"unknown_device": 1}
    b.process([msg("d1", Leaf.STATUS, birth(SCHEMA.schema_id_hex)), msg("d1", Leaf.TEL, frame(1))])
    assert len(sink.frames) == 1
    assert sink.frames[0].features.shape == (4, 3)


def test_adopt_policy_registers_a_device_from_its_telemetry():
    b, sink, d = make("adopt")
    b.process([msg("d2", Leaf.TEL, frame(0))])
    assert b.rejections == {}
    assert len(sink.frames) == 1
    assert d.get("f", "d2").adopted


def test_a_birth_with_an_unknown_schema_blocks_its_telemetry_with_a_reason():
    b, sink, _ = make()
    b.process([msg("d3", Leaf.STATUS, birth("ab" * 8)), msg("d3", Leaf.TEL, frame(0))])
    assert b.rejections == {"unknown_schema": 1}
    assert sink.frames == []


def test_schema_checks_feature_count_and_class_range():
    b, _sink, _ = make()
    bad_class = TelemetryBatch.create(
        seq=2, boot=1, ts_ms=0, param_version=1, features=np.ones((1, 3)), pred=[7], conf=[0.5]
    )
    b.process(
        [
            msg("d4", Leaf.STATUS, birth(SCHEMA.schema_id_hex)),
            msg("d4", Leaf.TEL, frame(0, f=4)),
            msg("d4", Leaf.TEL, encode_binary(bad_class, frac_bits=8)),
        ]
    )
    assert b.rejections == {"wrong_feature_count": 1, "bad_class": 1}


def test_sequence_gaps_duplicates_reboots_and_stale_boots():
    b, sink, d = make()
    b.process(
        [msg("d5", Leaf.STATUS, birth(SCHEMA.schema_id_hex))]
        + [
            msg("d5", Leaf.TEL, frame(s, boot))
            for boot, s in [(1, 0), (1, 1), (1, 5), (1, 5), (2, 2), (1, 9)]
        ]
    )
    assert len(sink.frames) == 4
    assert b.rejections == {"duplicate": 1, "stale": 1}
    assert d.get("f", "d5").lost_frames == 3 + 2  # 2, 3, 4 of boot 1; 0, 1 of boot 2


def test_a_downstream_bug_is_counted_and_ingest_goes_on():
    b, sink, _ = make()
    b.process([msg("d6", Leaf.STATUS, birth(SCHEMA.schema_id_hex))])
    sink.fail = True
    with pytest.raises(RuntimeError):
        b.process([msg("d6", Leaf.TEL, frame(0))])  # process() itself propagates; the thread
    b.source.offer(msg("d6", Leaf.TEL, frame(1)))  # ... counts it as "internal" and continues
    b.start()
    assert b.wait_idle(5)
    sink.fail = False
    b.source.offer(msg("d6", Leaf.TEL, frame(2)))
    assert b.wait_idle(5)
    time.sleep(0.1)
    b.stop()
    assert b.rejections["internal"] == 1
    assert len(sink.frames) == 1


def test_one_batch_equals_one_message_at_a_time_and_the_decoder():
    """The two-pass batch (binary records decoded together) gives the frames, values and
    rejections of the same messages processed one per batch, and ``decode_telemetry``'s values."""
    from edge_agent.wire.errors import WireError
    from edge_agent.wire.telemetry_codec import decode_telemetry

    rng = np.random.default_rng(3)
    msgs = [msg(f"e{i}", Leaf.STATUS, birth(SCHEMA.schema_id_hex)) for i in range(4)]
    for s in range(40):
        dev = f"e{s % 4}"
        k = int(rng.integers(1, 9))
        b = TelemetryBatch.create(
            seq=s // 4,
            boot=1,
            ts_ms=1000 * s,
            param_version=1 + (s > 30),
            features=rng.normal(0, 3, (k, 3)),
            pred=rng.integers(0, 3, k),
            conf=rng.integers(0, 256, k) / 256,
        )
        fb = int(rng.choice([4, 8, 11]))
        payload = encode_binary(b, frac_bits=fb) if s % 7 else b.to_json()
        msgs.append(msg(dev, Leaf.TEL, payload))
    # rejections of every kind, amid the good frames
    bad_class = TelemetryBatch.create(
        seq=99,
        boot=1,
        ts_ms=0,
        param_version=1,
        features=np.ones((2, 3)),
        pred=[0, 7],
        conf=[0.5] * 2,
    )
    msgs[10:10] = [
        msg("e1", Leaf.TEL, frame(50, f=4)),
        msg("e1", Leaf.TEL, encode_binary(bad_class, frac_bits=8)),
        msg("e2", Leaf.TEL, frame(0)),  # duplicate
        msg("e0", Leaf.TEL, b"TF\x01"),  # truncated
        msg("e0", Leaf.TEL, frame(60)[:-1]),
        msg("e0", Leaf.TEL, b"<xml/>"),
        msg("nobody", Leaf.TEL, frame(0)),
        Incoming("not/a/topic", b"", time.time()),
        msg("e3", Leaf.TEL, b""),
    ]
    msgs.append(msg("e0", Leaf.TEL, frame(0, boot=0)))  # stale
    one, one_sink, one_dir = make()
    for m in msgs:
        one.process([m])
    many, many_sink, many_dir = make()
    many.process(msgs)
    assert many.rejections == one.rejections
    assert sum(many.rejections.values()) == 10
    assert len(many_sink.frames) == len(one_sink.frames) == 40
    for a, b in zip(many_sink.frames, one_sink.frames, strict=True):
        assert (a.fleet, a.device, a.boot, a.seq, a.ts_ms, a.param_version) == (
            b.fleet, b.device, b.boot, b.seq, b.ts_ms, b.param_version
        )  # fmt: skip
        for name in ("features", "pred", "conf"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype
            assert x.tobytes() == y.tobytes()
            assert not x.flags.writeable
    decoded = []
    for m in msgs:
        try:
            if m.topic.endswith("/tel"):
                decoded.append(decode_telemetry(m.payload))
        except WireError:
            pass
    by_seq = {(fr.device, fr.boot, fr.seq): fr for fr in many_sink.frames}
    for m in msgs:
        if not m.topic.endswith("/tel"):
            continue
        try:
            tb = decode_telemetry(m.payload)
        except WireError:
            continue
        fr = by_seq.get((m.topic.split("/")[3], tb.boot, tb.seq))
        if fr is None or fr.pred.shape[0] != tb.k:
            continue
        assert fr.features.tobytes() == tb.features.tobytes()
        assert fr.pred.tobytes() == tb.pred.tobytes()
        assert fr.conf.tobytes() == tb.conf.tobytes()
    assert [(i.readings, i.lost_frames, i.active_version) for i in many_dir.all()] == [
        (i.readings, i.lost_frames, i.active_version) for i in one_dir.all()
    ]
    assert decoded


def test_the_thread_drains_the_queue_in_batches_control_first():
    """The birth queued after the telemetry is still taken first: its control lane is drained
    before the telemetry lane, so no frame is rejected as ``unknown_device``."""
    b, sink, _ = make()
    b.max_messages = 7
    for s in range(40):
        assert b.source.offer(msg("d9", Leaf.TEL, frame(s)))
    assert b.source.put_control(msg("d9", Leaf.STATUS, birth(SCHEMA.schema_id_hex)), None)
    b.start()
    try:
        assert b.wait_idle(10.0)
    finally:
        b.stop()
    assert b.processed == 41
    assert [fr.seq for fr in sink.frames] == list(range(40))
    assert b.rejections == {}
    assert b.source.empty()


def test_a_message_of_a_fleet_not_monitored_adds_no_series_and_is_rejected():
    cat = SchemaCatalog()
    cat.add_schema(SCHEMA)
    m = ServiceMetrics(max_fleets=1)
    b = Batcher(IngestQueue(1_000), DeviceDirectory(cat), Sink(), m)
    b.process([msg("d1", Leaf.STATUS, birth(SCHEMA.schema_id_hex)), msg("d1", Leaf.TEL, frame(0))])
    before = m.exposition().count(b"\n")
    flood = [
        Incoming(topic(f"x{i}", "d", leaf), payload, time.time())
        for i in range(500)
        for leaf, payload in [(Leaf.TEL, frame(0)), (Leaf.STATUS, birth(SCHEMA.schema_id_hex))]
    ]
    b.process(flood)
    assert b.rejections == {"unknown_device": 500, "unknown_fleet": 500}
    assert m.exposition().count(b"\n") == before
    assert b'tinydrift_mqtt_messages_received_total{fleet="_unknown",kind="tel"} 500.0' in (
        m.exposition()
    )
    b.process([msg("d1", Leaf.TEL, frame(1))])  # the monitored fleet goes on
    assert b.rejections == {"unknown_device": 500, "unknown_fleet": 500}


def test_an_adopted_device_of_a_fleet_beyond_the_limit_is_rejected():
    cat = SchemaCatalog()
    cat.add_schema(SCHEMA)
    sink = Sink()
    m = ServiceMetrics(fleets=["f"])
    b = Batcher(IngestQueue(1_000), DeviceDirectory(cat, unknown_devices="adopt"), sink, m)
    b.process([msg("d1", Leaf.TEL, frame(0)), Incoming(topic("g", "d1", Leaf.TEL), frame(0), 0.0)])
    assert len(sink.frames) == 1
    assert b.rejections == {"unknown_fleet": 1}
    assert b.directory.get("g", "d1") is None
