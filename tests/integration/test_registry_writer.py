"""``RegistryWriter`` against real databases: batching, every kind of write, and outages.

The outages are real: another connection holds SQLite's write lock (``BEGIN EXCLUSIVE``) for
two seconds, or PostgreSQL terminates the writer's backend in the middle of a transaction. The
writer must retry, count the retries and lose nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from sqlalchemy.engine import make_url

from service.drift.detection import Detection
from service.registry.records import CheckpointRecord, DeviceRecord, LabelRecord
from service.registry.store import Registry
from service.registry.writer import RegistryWriter

pytestmark = pytest.mark.integration

T0 = datetime(2025, 11, 25, 12, 0, 0, tzinfo=UTC)


def detection(i: int) -> Detection:
    return Detection(
        fleet="f1",
        device=f"d{i % 20}",
        scope="device",
        signal="confidence",
        feature=None,
        detector="adwin",
        score=1.0 + i / 1000,
        model_version=1,
        ts_ms=i,
        readings=512 + i,
    )


def label(device: str, i: int) -> LabelRecord:
    return LabelRecord(
        "f1", device, T0 + timedelta(milliseconds=i), 1, np.array([i, -i], float), i % 3, 0
    )


def submit_everything(w: RegistryWriter, n_events: int = 1000) -> None:
    """Devices, events (one op each), labels, checkpoints and audit entries, interleaved."""
    w.upsert_devices(DeviceRecord("f1", f"d{i}", online=True, n_features=2) for i in range(20))
    for i in range(n_events):
        w.record_drift_events([detection(i)])
        if i % 100 == 0:
            device = f"d{(i // 100) % 20}"
            w.add_labels([label(device, i + k) for k in range(30)], per_device_cap=50)
            w.save_checkpoints([CheckpointRecord("f1", device, "device", 1, bytes([i % 256]))])
            w.append_audit("engine", "drift.detected", f"device:f1/{device}", {"i": i})
    w.upsert_devices(DeviceRecord("f1", f"d{i}", drift_state="drifting") for i in range(20))


def check_everything_landed(reg: Registry, n_events: int = 1000) -> None:
    assert len(reg.list_drift_events(limit=10 * n_events)) == n_events
    devices = reg.list_devices("f1")
    assert len(devices) == 20
    assert {(d.online, d.n_features, d.drift_state) for d in devices} == {(True, 2, "drifting")}
    n_label_ops = len(range(0, n_events, 100))
    assert len(reg.recent_labels("f1", limit=100_000)) == 30 * n_label_ops
    assert len(reg.load_checkpoints(kind="device")) == min(20, n_label_ops)
    assert len(reg.list_audit(limit=1000)) == n_label_ops


@pytest.fixture
def reg(db_url: str) -> Iterator[Registry]:
    with Registry(db_url) as registry:
        yield registry


def test_every_kind_of_write_lands_in_batches(reg: Registry):
    with RegistryWriter(reg, max_batch=500, flush_interval_s=0.5) as w:
        t0 = time.monotonic()
        submit_everything(w, n_events=2000)
        submitting = time.monotonic() - t0
        assert w.flush(timeout=60)
        assert (w.errors, w.dropped_writes, w.rejected_writes) == (0, 0, 0)
        ops = w.committed
        assert ops == 2 + 2000 + 3 * 20
        assert 1 + ops // 500 <= w.batches < ops // 20  # batched, not one transaction per op
    check_everything_landed(reg, n_events=2000)
    assert submitting < 1.0  # the caller never waited for the database


def test_a_bad_write_does_not_sink_its_batch(reg: Registry):
    with RegistryWriter(reg, flush_interval_s=0.2) as w:
        w.record_drift_events([detection(1)])
        w.save_checkpoints([CheckpointRecord("f1", "d1", "device", 1, None)])  # type: ignore[arg-type]
        w.record_drift_events([detection(2)])
        assert w.flush(timeout=30)
        assert (w.committed, w.errors) == (2, 1)
    assert len(reg.list_drift_events()) == 2
    assert reg.load_checkpoints() == []


def test_a_locked_sqlite_database_is_retried_and_nothing_is_lost(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="service.registry.writer")
    # A short busy timeout, so that the 2 s lock surfaces as "database is locked" errors; with the
    # default 5000 ms SQLite's busy handler would simply wait it out.
    reg = Registry(sqlite_url, sqlite_busy_timeout_ms=100)
    w = RegistryWriter(reg, max_batch=200, flush_interval_s=0.05, backoff_max_s=0.4)
    path = make_url(sqlite_url).database
    assert path is not None
    locker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        submit_everything(w)
        assert time.monotonic() - t0 < 1.0  # submitting did not wait for the lock
        time.sleep(2.0)
        assert w.committed == 0
        assert w.retries >= 3
        assert reg.list_drift_events() == []  # WAL: readers are not blocked meanwhile
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert w.flush(timeout=30)
    assert (w.errors, w.dropped_writes, w.abandoned) == (0, 0, 0)
    check_everything_landed(reg)
    assert w.close(timeout=10)
    reg.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one when the outage starts, one when it ends
    assert "database is locked" in warnings[0]
    assert "resumed" in warnings[1]


def test_a_lost_postgresql_connection_is_retried(postgres_url: str):
    """Terminate the writer's backend while its insert waits on a lock: retried, not lost."""
    reg = Registry(postgres_url)
    w = RegistryWriter(reg, flush_interval_s=0.05, backoff_initial_s=0.05)
    w.record_drift_events([detection(0)])
    assert w.flush(timeout=30)
    libpq = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(libpq) as locker, psycopg.connect(libpq, autocommit=True) as admin:
        locker.execute("LOCK TABLE drift_events IN ACCESS EXCLUSIVE MODE")
        w.record_drift_events([detection(i) for i in range(1, 51)])
        pid = None
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).fetchone()
            pid = row[0] if row else None
            time.sleep(0.02)
        assert pid is not None, "the writer never waited on the lock"
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while w.retries == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w.retries >= 1
        assert w.committed == 1
        locker.commit()  # release the lock
    assert w.flush(timeout=30)
    assert (w.committed, w.errors) == (2, 0)
    assert len(reg.list_drift_events()) == 51
    assert w.close(timeout=10)
    reg.close()
