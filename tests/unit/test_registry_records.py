"""Registry records: merge semantics of device upserts, label conversion, detection records."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from service.drift.detection import Detection
from service.ingest.frames import DeviceLabels
from service.registry.records import (
    FEATURE_DTYPE,
    CheckpointRecord,
    DeviceRecord,
    DriftEventRecord,
    label_records,
)
from service.registry.write_ops import (
    AddLabels,
    AppendAudit,
    RecordDriftEvents,
    SaveCheckpoints,
    UpsertDevices,
    WriteOp,
    merge_consecutive,
)

T0 = datetime(2025, 11, 25, tzinfo=UTC)


def test_device_merge_keeps_given_fields_and_the_first_first_seen():
    birth = DeviceRecord("f", "d", schema_id="ab" * 8, online=True, boot=3, first_seen=T0)
    frame = DeviceRecord("f", "d", boot=3, last_seq=9, first_seen=datetime(2030, 1, 1, tzinfo=UTC))
    will = DeviceRecord("f", "d", online=False)
    merged = birth.merged_with(frame).merged_with(will)
    assert (merged.schema_id, merged.online, merged.boot, merged.last_seq) == (
        "ab" * 8,
        False,
        3,
        9,
    )
    assert merged.first_seen == T0
    assert merged.given_fields() == ("schema_id", "online", "boot", "last_seq", "first_seen")
    with pytest.raises(ValueError, match="same device"):
        birth.merged_with(DeviceRecord("f", "other"))


def test_label_records_split_a_batch_into_float32_rows():
    batch = DeviceLabels(
        fleet="f", device="d", boot=1, seq=2, ts_ms=0, recv_ts=T0.timestamp(), param_version=5,
        features=np.array([[0.5, -1.0], [2.0, 3.0]]), pred=np.array([1, 2]),
        label=np.array([1, 0]),
    )  # fmt: skip
    recs = label_records(batch)
    assert [(r.pred, r.label, r.param_version, r.ts) for r in recs] == [
        (1, 1, 5, T0),
        (2, 0, 5, T0),
    ]
    blob = recs[0].features_blob()
    assert len(blob) == 2 * FEATURE_DTYPE.itemsize
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), [0.5, -1.0])


def test_a_detection_becomes_a_drift_event_record():
    d = Detection(
        fleet="f", device=None, scope="cohort", signal="class_mix", feature="2",
        detector="chi2", score=2.5, model_version=4, ts_ms=99, readings=10_000,
    )  # fmt: skip
    rec = DriftEventRecord.of(d, ts=T0, details={"p": 1e-6})
    assert (rec.fleet, rec.device, rec.scope, rec.detector, rec.feature) == (
        "f", None, "cohort", "chi2", "2",
    )  # fmt: skip
    assert (rec.ts, rec.ts_ms, rec.readings, rec.details, rec.id) == (
        T0,
        99,
        10_000,
        {"p": 1e-6},
        None,
    )
    op = RecordDriftEvents.of([d, rec], ts=T0)
    assert op.size == 2
    assert op.events[1] is rec  # a record keeps its own time and details


def test_checkpoint_key_stores_cohort_state_under_an_empty_device():
    assert CheckpointRecord("f", None, "cohort", 1, b"").key == ("f", "", "cohort")
    assert CheckpointRecord("f", "d", "device", 1, b"").key == ("f", "d", "device")


def test_ops_merge_only_with_their_own_kind_and_keep_order():
    dev = UpsertDevices((DeviceRecord("f", "a"),))
    ck = SaveCheckpoints((CheckpointRecord("f", "a", "device", 1, b""),))
    lab5 = AddLabels((), per_device_cap=5)
    lab9 = AddLabels((), per_device_cap=9)
    audit = AppendAudit("u", "a", "t")
    ops: list[WriteOp] = [dev, dev, ck, ck, lab5, lab5, lab9, audit, audit, dev]
    merged = merge_consecutive(ops)
    assert [(op.kind, op.size) for op in merged] == [
        ("devices", 2), ("checkpoints", 2), ("labels", 0), ("labels", 0), ("audit", 1),
        ("audit", 1), ("devices", 1),
    ]  # fmt: skip
