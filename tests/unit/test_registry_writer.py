"""``RegistryWriter`` policy against a scripted registry: batching, retries, errors, the queue.

The real databases are exercised in ``tests/integration/test_registry_writer.py``; here a fake
registry makes every failure mode deterministic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from service.registry.errors import (
    RegistryConflictError,
    RegistryOperationError,
    WriterBackpressureError,
    WriterClosedError,
)
from service.registry.records import CheckpointRecord, DeviceRecord
from service.registry.write_ops import AppendAudit, UpsertDevices
from service.registry.writer import RegistryWriter


class FakeTx:
    """Records what a transaction would write."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Any]] = []

    def upsert_devices(self, records: Any) -> int:
        self.rows += [("devices", r.device) for r in records]
        return len(records)

    def record_drift_events(self, events: Any) -> int:
        self.rows += [("drift_events", e.device) for e in events]
        return len(events)

    def add_labels(self, records: Any, per_device_cap: int) -> int:
        self.rows += [("labels", r.device) for r in records]
        return len(records)

    def save_checkpoints(self, records: Any) -> int:
        self.rows += [("checkpoints", r.device) for r in records]
        return len(records)

    def append_audit(self, actor: str, action: str, target: str, details: Any, ts: Any) -> None:
        self.rows.append(("audit", target))


class FakeRegistry:
    """Commits to a list; can block (``gate``), fail transiently, or refuse poisoned rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Any]] = []
        self.commits = 0
        self.gate = threading.Event()
        self.gate.set()
        self.transient_failures = 0
        self.down = False
        self.poison = "poison"

    @contextmanager
    def transaction(self) -> Iterator[Any]:  # a RegistryTransaction look-alike
        self.gate.wait()
        if self.down:
            raise RegistryOperationError("connection refused", transient=True)
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise RegistryOperationError("database is locked", transient=True)
        tx = FakeTx()
        yield tx
        if any(value == self.poison for _, value in tx.rows):
            raise RegistryConflictError("NOT NULL constraint failed")
        self.rows += tx.rows
        self.commits += 1


def devices(*names: str) -> UpsertDevices:
    return UpsertDevices(tuple(DeviceRecord("f", n) for n in names))


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def test_ops_are_committed_in_batches_of_at_most_max_batch(fake: FakeRegistry):
    fake.gate.clear()  # the first batch waits until everything is queued
    with RegistryWriter(fake, max_batch=500, flush_interval_s=2.0) as w:
        for i in range(1200):
            w.submit(devices(f"d{i}"))
        fake.gate.set()
        assert w.flush(timeout=10)
        assert (w.committed, w.batches, fake.commits) == (1200, 3, 3)
        assert len(fake.rows) == 1200
        assert w.queue_depth == 0
        assert w.pending == 0


def test_flush_commits_at_once_instead_of_waiting_for_the_interval(fake: FakeRegistry):
    with RegistryWriter(fake, flush_interval_s=30.0) as w:
        t0 = time.monotonic()
        w.submit(devices("a"))
        w.submit(devices("b"))
        w.append_audit("op", "x", "t")
        assert w.flush(timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert fake.commits == 1  # one transaction for the whole batch
        assert fake.rows == [("devices", "a"), ("devices", "b"), ("audit", "t")]


def test_transient_failures_are_retried_and_logged_once(
    fake: FakeRegistry, caplog: pytest.LogCaptureFixture
):
    fake.transient_failures = 4
    caplog.set_level(logging.WARNING, logger="service.registry.writer")
    with RegistryWriter(fake, flush_interval_s=0.01, backoff_initial_s=0.01) as w:
        w.submit(devices("a", "b"))
        assert w.flush(timeout=10)
        assert (w.retries, w.errors, w.committed) == (4, 0, 1)
    assert fake.rows == [("devices", "a"), ("devices", "b")]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "failing (database is locked)" in messages[0]
    assert "resumed" in messages[1]
    assert "4 retries" in messages[1]


def test_a_permanent_failure_costs_only_the_failing_op(
    fake: FakeRegistry, caplog: pytest.LogCaptureFixture
):
    fake.gate.clear()
    with RegistryWriter(fake, flush_interval_s=1.0) as w:
        w.submit(devices("a"))
        w.submit(devices("poison"))
        w.save_checkpoints([CheckpointRecord("f", "c", "device", 1, b"s")])
        fake.gate.set()
        assert w.flush(timeout=10)
        assert (w.committed, w.errors, w.retries) == (2, 1, 0)
    assert fake.rows == [("devices", "a"), ("checkpoints", "c")]
    assert any("devices write of 1 refused" in r.getMessage() for r in caplog.records)


def test_full_queue_drops_only_droppable_kinds(fake: FakeRegistry):
    fake.gate.clear()
    w = RegistryWriter(
        fake, max_batch=1, flush_interval_s=0.0, max_queue=2, put_timeout_s=0.05,
        droppable=["drift_events"],
    )  # fmt: skip
    w.submit(devices("in-flight"))
    deadline = time.monotonic() + 5
    while w.queue_depth and time.monotonic() < deadline:  # the thread holds it, blocked
        time.sleep(0.01)
    assert w.submit(devices("q1"))
    assert w.submit(devices("q2"))
    t0 = time.monotonic()
    assert w.record_drift_events([]) is False  # droppable: dropped at once, counted
    assert time.monotonic() - t0 < 0.05
    assert (w.dropped_writes, w.dropped_by_kind["drift_events"]) == (1, 1)
    with pytest.raises(WriterBackpressureError, match="queue full"):
        w.submit(AppendAudit("op", "x", "t"))  # not droppable: waits put_timeout_s, then raises
    assert w.rejected_writes == 1
    fake.gate.set()
    assert w.close(timeout=10)
    assert [v for _, v in fake.rows] == ["in-flight", "q1", "q2"]


def test_by_default_nothing_is_droppable(fake: FakeRegistry):
    fake.gate.clear()
    w = RegistryWriter(fake, max_batch=1, max_queue=1, put_timeout_s=0.05)
    assert w.droppable == frozenset()
    w.submit(devices("in-flight"))
    while w.queue_depth:
        time.sleep(0.01)
    w.submit(devices("queued"))
    with pytest.raises(WriterBackpressureError):
        w.record_drift_events([])
    assert w.dropped_writes == 0
    fake.gate.set()
    assert w.close(timeout=10)


def test_unknown_droppable_kind_is_refused(fake: FakeRegistry):
    with pytest.raises(ValueError, match="unknown write kinds"):
        RegistryWriter(fake, droppable=["telemetry"])  # type: ignore[list-item]


def test_close_flushes_and_refuses_later_writes(fake: FakeRegistry):
    w = RegistryWriter(fake, flush_interval_s=10.0)
    w.submit(devices("a"))
    assert w.close(timeout=5)
    assert fake.rows == [("devices", "a")]
    with pytest.raises(WriterClosedError):
        w.submit(devices("b"))
    assert w.close() is True  # idempotent


def test_close_with_the_database_down_abandons_loudly(
    fake: FakeRegistry, caplog: pytest.LogCaptureFixture
):
    fake.down = True
    w = RegistryWriter(fake, max_batch=2, flush_interval_s=0.01, backoff_initial_s=0.01)
    for name in "abcde":
        w.submit(devices(name))
    assert w.close(timeout=0.5) is False
    assert w.abandoned == 5
    assert w.committed == 0
    assert w.retries >= 1
    assert any("not committed" in r.getMessage() for r in caplog.records)


def test_on_settled_says_committed_only_after_the_commit_and_failed_for_good(fake: FakeRegistry):
    """Queued is not committed: the callback waits for the transaction; a refused op and an op
    abandoned at close are told ``False``; an op still being retried is told nothing."""
    outcomes: list[tuple[str, bool]] = []

    def told(name: str) -> Any:
        return lambda committed: outcomes.append((name, committed))

    fake.down = True
    w = RegistryWriter(fake, max_batch=10, flush_interval_s=0.01, backoff_initial_s=0.01)
    w.save_checkpoints([CheckpointRecord("f", "c", "device", 1, b"s")], on_settled=told("ckpt"))
    w.submit(devices("a"))  # asks for nothing
    deadline = time.monotonic() + 10
    while w.retries < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.retries >= 3
    assert outcomes == []  # the database is down: nothing committed, nothing failed for good
    fake.down = False
    assert w.flush(timeout=10)
    assert outcomes == [("ckpt", True)]
    w.submit(devices("poison"), on_settled=told("poison"))
    assert w.flush(timeout=10)
    assert outcomes[-1] == ("poison", False)
    fake.down = True
    w.submit(devices("b"), on_settled=told("abandoned"))
    assert w.close(timeout=0.5) is False
    assert outcomes == [("ckpt", True), ("poison", False), ("abandoned", False)]
