"""``Registry`` round trips on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import text

from service.drift.detection import Detection
from service.ingest.frames import DeviceLabels
from service.registry.engine import create_registry_engine
from service.registry.errors import (
    RegistryConflictError,
    RegistryOperationError,
    UnknownParameterSetError,
)
from service.registry.records import (
    CheckpointRecord,
    DeviceRecord,
    DriftEventRecord,
    LabelRecord,
    label_records,
)
from service.registry.store import Registry

pytestmark = pytest.mark.integration

T0 = datetime(2025, 11, 25, 12, 0, 0, tzinfo=UTC)
SCHEMA = "a1b2c3d4e5f60718"


@pytest.fixture
def reg(db_url: str) -> Iterator[Registry]:
    with Registry(db_url) as registry:
        yield registry


def detection(device: str | None = "d1", **kw: object) -> Detection:
    base: dict[str, object] = dict(
        fleet="f1",
        device=device,
        scope="device" if device else "cohort",
        signal="feature",
        feature="mean_x",
        detector="adwin",
        score=1.25,
        model_version=3,
        ts_ms=1_764_000_000_123,
        readings=700,
    )
    base.update(kw)
    return Detection(**base)  # type: ignore[arg-type]


def labels(
    device: str, n: int, t0: datetime, version: int = 1, width: int = 3
) -> list[LabelRecord]:
    return [
        LabelRecord(
            fleet="f1",
            device=device,
            ts=t0 + timedelta(seconds=i),
            param_version=version,
            features=np.arange(width, dtype=np.float64) + i,
            pred=i % 4,
            label=(i + 1) % 4,
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# devices


def test_device_birth_frames_and_will_merge(reg: Registry):
    birth = DeviceRecord(
        fleet="f1",
        device="d1",
        schema_id=SCHEMA,
        active_version=3,
        previous_version=2,
        update_state="CONFIRMED",
        online=True,
        fw="1.2.0",
        boot=7,
        last_seq=0,
        last_seen=T0,
        caps={"max_chunk": 512, "telemetry": ["bin"], "labels": True},
        n_features=8,
        n_classes=4,
    )
    assert reg.upsert_devices([birth]) == 1
    got = reg.get_device("f1", "d1")
    assert got is not None
    assert got.first_seen == T0 == got.last_seen
    assert got.first_seen is not None
    assert got.first_seen.tzinfo is not None
    assert got.caps == {"max_chunk": 512, "telemetry": ["bin"], "labels": True}
    assert got.drift_state == "unknown"  # default until the engine says otherwise

    # A frame moves seq and last_seen; a Will only flips online; the engine sets drift_state.
    later = T0 + timedelta(minutes=5)
    reg.upsert_devices(
        [
            DeviceRecord("f1", "d1", boot=7, last_seq=41, last_seen=later),
            DeviceRecord("f1", "d1", last_seq=42),  # same call: merged, later wins
        ]
    )
    reg.upsert_devices([DeviceRecord("f1", "d1", online=False)])
    reg.upsert_devices([DeviceRecord("f1", "d1", drift_state="drifting")])
    got = reg.get_device("f1", "d1")
    assert got is not None
    assert (got.online, got.last_seq, got.boot, got.drift_state) == (False, 42, 7, "drifting")
    assert (got.first_seen, got.last_seen) == (T0, later)
    assert (got.schema_id, got.active_version, got.fw, got.n_features) == (SCHEMA, 3, "1.2.0", 8)


def test_list_devices_by_fleet_and_unknown_device(reg: Registry):
    reg.upsert_devices(
        [DeviceRecord("f2", "b", online=True), DeviceRecord("f1", "z"), DeviceRecord("f1", "a")]
    )
    assert [(d.fleet, d.device) for d in reg.list_devices()] == [
        ("f1", "a"),
        ("f1", "z"),
        ("f2", "b"),
    ]
    assert [d.device for d in reg.list_devices("f1")] == ["a", "z"]
    assert reg.list_fleets() == ["f1", "f2"]
    assert reg.get_device("f1", "nope") is None
    assert reg.get_device("f2", "b") is not None


def test_device_ids_are_unique_per_fleet_not_globally(reg: Registry):
    reg.upsert_devices([DeviceRecord("f1", "d1", fw="a"), DeviceRecord("f2", "d1", fw="b")])
    one, two = reg.get_device("f1", "d1"), reg.get_device("f2", "d1")
    assert one is not None
    assert two is not None
    assert (one.fw, two.fw) == ("a", "b")


# --------------------------------------------------------------------------------------------
# drift events


def test_drift_events_round_trip_and_filters(reg: Registry):
    reg.record_drift_events(
        [detection("d1"), detection("d2", signal="confidence", feature=None)], ts=T0
    )
    reg.record_drift_events(
        [detection(None, detector="cohort_binomial", score=3.5)], ts=T0 + timedelta(hours=1)
    )
    reg.record_drift_events(
        [DriftEventRecord.of(detection("d1", signal="error", detector="hddm_a", feature=None),
                             ts=T0 + timedelta(hours=2), details={"p": 0.001})]
    )  # fmt: skip

    events = reg.list_drift_events()
    assert len(events) == 4
    assert [e.ts for e in events] == sorted((e.ts for e in events), reverse=True)  # newest first
    newest = events[0]
    assert (newest.signal, newest.detector, newest.details) == ("error", "hddm_a", {"p": 0.001})
    cohort = events[1]
    assert (cohort.device, cohort.scope, cohort.score) == (None, "cohort", 3.5)
    oldest = events[-1]
    assert oldest.ts == T0
    assert oldest.ts_ms == 1_764_000_000_123
    assert oldest.readings == 700
    assert oldest.id is not None

    assert {e.device for e in reg.list_drift_events(device="d1")} == {"d1"}
    assert len(reg.list_drift_events(device="d1")) == 2
    assert len(reg.list_drift_events(fleet="f1", since=T0 + timedelta(minutes=30))) == 2
    assert reg.list_drift_events(fleet="other") == []
    assert len(reg.list_drift_events(limit=1)) == 1


def test_drift_events_default_to_now(reg: Registry):
    before = datetime.now(UTC)
    reg.record_drift_events([detection()])
    (event,) = reg.list_drift_events()
    assert before - timedelta(seconds=1) <= event.ts <= datetime.now(UTC) + timedelta(seconds=1)


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoints_upsert_by_key(reg: Registry):
    reg.save_checkpoints(
        [
            CheckpointRecord("f1", "d1", "device", 1, b"\x78\x9cv1", last_boot=7, last_seq=10),
            CheckpointRecord("f1", None, "cohort", 1, b"cohort-v1"),
        ]
    )
    reg.save_checkpoints(
        [
            CheckpointRecord("f1", "d1", "device", 2, b"\x78\x9cv2", last_boot=8, last_seq=3),
            CheckpointRecord("f1", "d2", "device", 2, b"d2", last_boot=1, last_seq=1),
            CheckpointRecord("f1", "d2", "device", 2, b"d2-newer", last_boot=1, last_seq=2),
        ]
    )
    stored = reg.load_checkpoints()
    assert [(c.fleet, c.device, c.kind) for c in stored] == [
        ("f1", None, "cohort"),
        ("f1", "d1", "device"),
        ("f1", "d2", "device"),
    ]
    by_device = {c.device: c for c in stored}
    assert (by_device["d1"].format_version, by_device["d1"].state) == (2, b"\x78\x9cv2")
    assert (by_device["d1"].last_boot, by_device["d1"].last_seq) == (8, 3)
    assert by_device["d2"].state == b"d2-newer"
    assert by_device[None].state == b"cohort-v1"
    assert all(c.updated is not None and c.updated.tzinfo is not None for c in stored)
    assert [c.device for c in reg.load_checkpoints(kind="cohort")] == [None]
    assert reg.load_checkpoints(fleet="f9") == []


# --------------------------------------------------------------------------------------------
# label buffer


def test_labels_round_trip_as_arrays(reg: Registry):
    reg.add_labels(labels("d1", 5, T0) + labels("d2", 3, T0 + timedelta(seconds=0.5)))
    got = reg.recent_labels("f1", device="d1")
    assert len(got) == 5
    assert got.features.shape == (5, 3)
    assert got.features.dtype == np.float64
    np.testing.assert_array_equal(got.features[:, 0], np.arange(5.0))  # oldest first
    np.testing.assert_array_equal(got.pred, np.arange(5) % 4)
    np.testing.assert_array_equal(got.label, (np.arange(5) + 1) % 4)
    assert got.ts[0] == T0.timestamp()
    assert set(got.device) == {"d1"}
    both = reg.recent_labels("f1")
    assert len(both) == 8
    assert np.all(np.diff(both.ts) >= 0)
    newest3 = reg.recent_labels("f1", limit=3)
    np.testing.assert_array_equal(newest3.ts, both.ts[-3:])


def test_label_features_are_float32(reg: Registry):
    x = np.array([0.1, 1e-8, -3.25], dtype=np.float64)
    reg.add_labels([LabelRecord("f1", "d1", T0, 1, x, pred=0, label=1)])
    got = reg.recent_labels("f1").features[0]
    np.testing.assert_array_equal(got, x.astype(np.float32).astype(np.float64))


def test_label_cap_keeps_the_newest_per_device(reg: Registry):
    reg.add_labels(labels("d1", 30, T0), per_device_cap=10)
    reg.add_labels(labels("d2", 4, T0), per_device_cap=10)
    reg.add_labels(labels("d1", 5, T0 + timedelta(minutes=1)), per_device_cap=10)
    d1 = reg.recent_labels("f1", device="d1", limit=1000)
    assert len(d1) == 10
    # The 5 new ones plus the 5 newest of the first 30.
    expected = sorted([(T0 + timedelta(seconds=i)).timestamp() for i in range(25, 30)]) + sorted(
        (T0 + timedelta(minutes=1, seconds=i)).timestamp() for i in range(5)
    )
    np.testing.assert_array_equal(d1.ts, expected)
    assert len(reg.recent_labels("f1", device="d2")) == 4


def test_label_cap_with_equal_timestamps(reg: Registry):
    same = [LabelRecord("f1", "d1", T0, 1, np.array([float(i)]), pred=0, label=0) for i in range(7)]
    reg.add_labels(same, per_device_cap=3)
    got = reg.recent_labels("f1", device="d1")
    np.testing.assert_array_equal(
        got.features[:, 0], [4.0, 5.0, 6.0]
    )  # insertion order breaks ties


def test_labels_by_param_version_and_mixed_widths(reg: Registry):
    reg.add_labels(
        labels("d1", 3, T0, version=1, width=3) + labels("d1", 2, T0, version=2, width=5)
    )
    assert reg.recent_labels("f1", param_version=2).features.shape == (2, 5)
    with pytest.raises(RegistryOperationError, match="filter by param_version"):
        reg.recent_labels("f1")
    empty = reg.recent_labels("nobody")
    assert len(empty) == 0
    assert empty.features.shape == (0, 0)


def test_label_records_from_an_ingest_batch(reg: Registry):
    batch = DeviceLabels(
        fleet="f1",
        device="d1",
        boot=1,
        seq=9,
        ts_ms=0,
        recv_ts=T0.timestamp(),
        param_version=4,
        features=np.array([[1.0, 2.0], [3.0, 4.0]]),
        pred=np.array([1, 0]),
        label=np.array([1, 1]),
    )
    reg.add_labels(label_records(batch))
    got = reg.recent_labels("f1", device="d1", param_version=4)
    np.testing.assert_array_equal(got.features, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(got.label, [1, 1])


# --------------------------------------------------------------------------------------------
# parameter sets


def test_parameter_sets(reg: Registry):
    blob = b"TDPS" + bytes(range(256)) * 4
    ps = reg.add_parameter_set(
        SCHEMA, 3, 1, blob, source="retrain", metrics={"accuracy": 0.93}, notes="from drift #1"
    )
    assert ps.sha256 == hashlib.sha256(blob).hexdigest()
    assert ps.status == "candidate"
    assert ps.created.tzinfo is not None
    assert reg.get_parameter_set(SCHEMA, 3) == ps
    assert reg.get_parameter_set_by_sha(ps.sha256.upper()) == ps
    assert reg.get_parameter_set(SCHEMA, 4) is None
    assert reg.get_parameter_set_by_sha("00" * 32) is None
    got = reg.get_parameter_set(SCHEMA, 3)
    assert got is not None
    assert got.blob == blob
    assert got.metrics == {"accuracy": 0.93}

    with pytest.raises(RegistryConflictError, match="already stored"):
        reg.add_parameter_set(SCHEMA, 3, 1, blob + b"x", source="retrain")
    with pytest.raises(RegistryConflictError, match="same blob"):
        reg.add_parameter_set(SCHEMA, 5, 1, blob, source="retrain")

    bad = reg.set_parameter_status(SCHEMA, 3, "bad", actor="rollout", reason="canary failed")
    assert bad.status == "bad"
    (entry,) = reg.list_audit(action="parameter_set.status")
    assert (entry.actor, entry.target) == ("rollout", f"parameter_set:{SCHEMA}:3")
    assert entry.details == {"from": "candidate", "to": "bad", "reason": "canary failed"}
    reg.set_parameter_status(SCHEMA, 3, "good")  # without an actor: not audited
    assert len(reg.list_audit()) == 1
    with pytest.raises(UnknownParameterSetError):
        reg.set_parameter_status(SCHEMA, 99, "good")
    with pytest.raises(ValueError, match="status must be one of"):
        reg.set_parameter_status(SCHEMA, 3, "great")  # type: ignore[arg-type]

    reg.add_parameter_set(SCHEMA, 4, 2, b"other", source="recalibration", status="good")
    assert [p.version for p in reg.list_parameter_sets(SCHEMA)] == [3, 4]
    assert [p.version for p in reg.list_parameter_sets(status="good")] == [3, 4]
    assert reg.list_parameter_sets(status="candidate") == []


# --------------------------------------------------------------------------------------------
# audit log


def test_audit_log_round_trip_and_filters(reg: Registry):
    a = reg.append_audit("alice", "rollout.approve", "rollout:7", {"wave": 1})
    b = reg.append_audit("bob", "device.revert", "device:f1/d1")
    assert a.id < b.id
    assert a.ts.tzinfo is not None
    assert [e.id for e in reg.list_audit()] == [b.id, a.id]
    assert reg.list_audit(actor="alice") == [a]
    assert reg.list_audit(target="device:f1/d1") == [b]
    assert reg.list_audit(since=b.ts) == [b]
    assert reg.list_audit(limit=1) == [b]


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"],
)
def test_audit_log_is_append_only_in_the_database(db_url: str, reg: Registry, statement: str):
    reg.append_audit("alice", "rollout.approve", "rollout:7")
    engine = create_registry_engine(db_url)
    try:
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
        if engine.dialect.name == "postgresql":
            with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
                conn.execute(text("TRUNCATE audit_log"))
    finally:
        engine.dispose()
    assert [e.actor for e in reg.list_audit()] == ["alice"]
    assert not hasattr(reg, "delete_audit")
    assert not hasattr(reg, "update_audit")


def test_naive_datetimes_are_refused(reg: Registry):
    with pytest.raises(Exception, match="naive datetime"):
        reg.record_drift_events([detection()], ts=datetime(2025, 1, 1))
