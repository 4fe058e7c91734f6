"""The batcher's policies without a broker: unknown devices, schemas, sequences, internal errors."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from edge_agent.blob import ParameterSchema
from edge_agent.wire.messages import Status, TelemetryBatch
from edge_agent.wire.telemetry_binary import encode_binary
from edge_agent.wire.topics import Leaf, topic
from service.ingest.batcher import Batcher
from service.ingest.device_directory import DeviceDirectory
from service.ingest.mqtt_consumer import Incoming
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
    return Batcher(queue.Queue(), d, sink, ServiceMetrics()), sink, d


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
    b.source.put(msg("d6", Leaf.TEL, frame(1)))  # ... counts it as "internal" and continues
    b.start()
    assert b.wait_idle(5)
    sink.fail = False
    b.source.put(msg("d6", Leaf.TEL, frame(2)))
    assert b.wait_idle(5)
    time.sleep(0.1)
    b.stop()
    assert b.rejections["internal"] == 1
    assert len(sink.frames) == 1
