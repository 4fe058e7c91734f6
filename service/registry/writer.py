"""``RegistryWriter``: hot-path registry writes, queued and committed in batches by one thread.

The hot path calls :meth:`RegistryWriter.submit` (or a helper such as
:meth:`~RegistryWriter.record_drift_events`) and goes on; one thread drains the queue, merges
neighbouring ops of the same kind and commits up to ``max_batch`` ops per transaction, at the
latest ``flush_interval_s`` after the first op of a batch arrived (at once when someone calls
:meth:`~RegistryWriter.flush`).

Policy when the database is slow or gone:

- **Transient failures** (a locked SQLite database, a lost or refused PostgreSQL connection, a
  serialization failure; :func:`~service.registry.errors.is_transient`) are retried with
  exponential backoff (``backoff_initial_s`` doubling up to ``backoff_max_s``), for as long as it
  takes. The batch is kept and retried whole; each retry counts in ``retries``; one warning is
  logged when an outage starts and one line when writes resume.
- **Permanent failures** (a constraint violation, bad data): the batch is re-applied one op per
  transaction so the good ops still land; each failing op counts in ``errors`` and is logged.
- **A full queue** (the database cannot keep up): ops of the kinds in ``droppable`` are dropped at
  once and counted in ``dropped_writes`` (and ``dropped_by_kind``); no kind is droppable by
  default. Any other op waits up to ``put_timeout_s`` for room, then :meth:`submit` raises
  :class:`~service.registry.errors.WriterBackpressureError` (counted in ``rejected_writes``): the
  caller learns the write was not queued. Nothing queued is dropped silently.
- **Closing** flushes; if the database is still failing when the close timeout ends, the writer
  gives up, logs an error and counts the ops it could not commit in ``abandoned``.

A caller that must know whether its write reached the database passes ``on_settled`` to
:meth:`~RegistryWriter.submit`: the writer thread calls it once, with ``True`` after the op's
transaction committed, ``False`` when the op failed for good or was abandoned (never for an op
still being retried). Queueing is not committing: ``tinydrift_checkpoints_total{outcome="ok"}``
counts checkpoints this way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from service.registry.errors import WriterBackpressureError, WriterClosedError, is_transient
from service.registry.records import CheckpointRecord, DetectionLike, DeviceRecord, LabelRecord
from service.registry.transaction import DEFAULT_LABEL_CAP, RegistryTransaction
from service.registry.write_ops import (
    WRITE_KINDS,
    AddLabels,
    AppendAudit,
    RecordDriftEvents,
    SaveCheckpoints,
    UpsertDevices,
    WriteKind,
    WriteOp,
    merge_consecutive,
)

log = logging.getLogger(__name__)

_POLL_S = 0.02
"""How often a waiting batch checks for a flush request or a stop."""

Settled = Callable[[bool], None]
"""Told whether a submitted op committed (``True``) or failed for good (``False``)."""


class TransactionSource(Protocol):
    """What the writer needs from :class:`~service.registry.store.Registry`."""

    def transaction(self) -> AbstractContextManager[RegistryTransaction]:
        """One write transaction."""
        ...


class _AbandonedError(Exception):
    """Internal: the writer stopped retrying (closing with the database still failing)."""


class RegistryWriter:
    """Batches registry writes off the hot path (policy in the module docstring).

    Counters for metrics, read from any thread: ``committed`` (ops committed), ``batches``
    (transactions committed), ``retries``, ``errors``, ``dropped_writes``, ``rejected_writes``,
    ``abandoned``, and the properties ``queue_depth`` and ``pending``.
    """

    def __init__(
        self,
        registry: TransactionSource,
        max_batch: int = 500,
        flush_interval_s: float = 0.5,
        *,
        max_queue: int = 10_000,
        put_timeout_s: float = 1.0,
        droppable: Iterable[WriteKind] = (),
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        name: str = "registry-writer",
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be ≥ 1")
        self.droppable: frozenset[WriteKind] = frozenset(droppable)
        if unknown := self.droppable - WRITE_KINDS:
            raise ValueError(f"unknown write kinds {sorted(unknown)}; known: {sorted(WRITE_KINDS)}")
        self._registry = registry
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.put_timeout_s = put_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

        self.committed = 0
        self.batches = 0
        self.retries = 0
        self.errors = 0
        self.dropped_writes = 0
        self.dropped_by_kind: Counter[str] = Counter()
        self.rejected_writes = 0
        self.abandoned = 0

        self._queue: queue.Queue[WriteOp] = queue.Queue(maxsize=max_queue)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._flush_waiters = 0
        self._closed = False
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._outage_since: float | None = None
        self._outage_retries = 0
        self._on_settled: dict[int, Settled] = {}
        """Callbacks of queued ops, by ``id(op)`` (the op stays referenced by the queue)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------
    # the caller's side

    @property
    def queue_depth(self) -> int:
        """Ops waiting in the queue (not yet taken into a batch)."""
        return self._queue.qsize()

    @property
    def pending(self) -> int:
        """Ops submitted but not yet committed (or failed): queued plus in the current batch."""
        with self._cond:
            return max(0, self._submitted - self._done)

    def submit(self, op: WriteOp, on_settled: Settled | None = None) -> bool:
        """Queue ``op``; ``False`` if it was dropped (droppable kind, queue full).

        ``on_settled`` is called from the writer thread once the op committed (``True``) or
        failed for good (``False``); not at all when ``submit`` raises or drops the op.
        Raises :class:`WriterBackpressureError` when a non-droppable op found the queue full for
        ``put_timeout_s``, :class:`WriterClosedError` after :meth:`close`.
        """
        if self._closed:
            raise WriterClosedError("the registry writer is closed; this write was not queued")
        if on_settled is not None:
            with self._cond:
                self._on_settled[id(op)] = on_settled
        try:
            if op.kind in self.droppable:
                self._queue.put_nowait(op)
            else:
                self._queue.put(op, timeout=self.put_timeout_s)
        except queue.Full:
            with self._cond:
                self._on_settled.pop(id(op), None)
                if op.kind in self.droppable:
                    self.dropped_writes += 1
                    self.dropped_by_kind[op.kind] += 1
                    return False
                self.rejected_writes += 1
            raise WriterBackpressureError(
                f"registry writer queue full ({self._queue.maxsize} ops) for "
                f"{self.put_timeout_s:g} s: the database is not keeping up; "
                f"{op.kind} write not queued"
            ) from None
        with self._cond:
            self._submitted += 1
        return True

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> bool:
        """Queue device upserts (``None`` fields keep the stored value)."""
        return self.submit(UpsertDevices(tuple(records)))

    def record_drift_events(
        self, detections: Iterable[DetectionLike], ts: datetime | None = None
    ) -> bool:
        """Queue detections, timed ``ts`` (default: now, at submission)."""
        return self.submit(RecordDriftEvents.of(detections, ts))

    def add_labels(
        self, records: Sequence[LabelRecord], per_device_cap: int = DEFAULT_LABEL_CAP
    ) -> bool:
        """Queue labelled readings for the label buffer."""
        return self.submit(AddLabels(tuple(records), per_device_cap))

    def save_checkpoints(
        self, records: Iterable[CheckpointRecord], on_settled: Settled | None = None
    ) -> bool:
        """Queue detector checkpoints (upserted by key); ``on_settled`` as in :meth:`submit`."""
        return self.submit(SaveCheckpoints(tuple(records)), on_settled)

    def append_audit(
        self, actor: str, action: str, target: str, details: Mapping[str, Any] | None = None
    ) -> bool:
        """Queue an audit entry, timed now."""
        return self.submit(AppendAudit(actor, action, target, details))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything submitted before this call is committed (or failed for good).

        Returns ``False`` if ``timeout`` seconds passed first (e.g. the database is down).
        """
        with self._cond:
            target = self._submitted
            self._flush_waiters += 1
            try:
                return self._cond.wait_for(lambda: self._done >= target, timeout)
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float = 30.0) -> bool:
        """Stop accepting writes, flush, stop the thread. ``False`` if writes were abandoned."""
        if self._closed:
            return self.abandoned == 0
        self._closed = True
        flushed = self.flush(timeout)
        if not flushed:
            self._abandon.set()
        self._stopping.set()
        self._thread.join(timeout=max(1.0, timeout))
        if self._thread.is_alive():
            log.error("registry writer thread did not stop; %d writes pending", self.pending)
            return False
        return flushed and self.abandoned == 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    # the writer thread

    def _run(self) -> None:
        while True:
            try:
                batch = self._collect()
            except Exception:  # pragma: no cover - a bug; keep the thread alive
                log.exception("registry writer: collecting a batch failed")
                continue
            if batch is None:
                return
            if batch:
                try:
                    self._write(batch)
                except Exception:  # pragma: no cover - a bug; count and keep going
                    log.exception("registry writer: writing a batch of %d failed", len(batch))
                    self._finish(len(batch), errors=len(batch))
                    self._settle(batch, committed=False)

    def _collect(self) -> list[WriteOp] | None:
        """The next batch; ``[]`` when idle; ``None`` when stopping with nothing left."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return None if self._stopping.is_set() else []
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if self._flush_waiters > 0 or self._stopping.is_set():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(queue.Empty):
                batch.append(self._queue.get(timeout=min(remaining, _POLL_S)))
        return batch

    def _write(self, batch: list[WriteOp]) -> None:
        try:
            failure = self._apply_with_retry(merge_consecutive(batch))
            if failure is None:
                self._finish(len(batch), committed=len(batch), batches=1)
                self._settle(batch, committed=True)
                return
            # A permanent failure somewhere in the batch: one op per transaction.
            for op in batch:
                failure = self._apply_with_retry([op])
                if failure is None:
                    self._finish(1, committed=1, batches=1)
                else:
                    log.error(
                        "registry writer: %s write of %d refused: %s", op.kind, op.size, failure
                    )
                    self._finish(1, errors=1)
                self._settle([op], committed=failure is None)
        except _AbandonedError:
            left = self._submitted_not_done()
            self._finish(left, abandoned=left)
            self._settle(batch, committed=False)
            left += self._drain_abandoned()
            log.error(
                "registry writer: gave up at close with the database failing; "
                "%d queued writes not committed",
                left,
            )

    def _apply_with_retry(self, ops: list[WriteOp]) -> Exception | None:
        """Apply ``ops`` in one transaction, retrying transient failures; the permanent one."""
        backoff = self.backoff_initial_s
        while True:
            try:
                with self._registry.transaction() as tx:
                    for op in ops:
                        op.apply(tx)
            except Exception as exc:
                if not is_transient(exc):
                    return exc
                self._note_transient(exc)
                if self._abandon.wait(backoff):
                    raise _AbandonedError from exc
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            self._note_recovered()
            return None

    def _note_transient(self, exc: BaseException) -> None:
        with self._cond:
            self.retries += 1
            self._outage_retries += 1
            starting = self._outage_since is None
            if starting:
                self._outage_since = time.monotonic()
        if starting:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning(
                "registry writes failing (%s); retrying with backoff up to %g s, nothing dropped",
                reason,
                self.backoff_max_s,
            )

    def _note_recovered(self) -> None:
        with self._cond:
            since, retries = self._outage_since, self._outage_retries
            self._outage_since, self._outage_retries = None, 0
        if since is not None:
            log.warning(
                "registry writes resumed after %.1f s and %d retries",
                time.monotonic() - since,
                retries,
            )

    def _finish(
        self,
        n: int,
        *,
        committed: int = 0,
        batches: int = 0,
        errors: int = 0,
        abandoned: int = 0,
    ) -> None:
        with self._cond:
            self._done += n
            self.committed += committed
            self.batches += batches
            self.errors += errors
            self.abandoned += abandoned
            self._cond.notify_all()

    def _submitted_not_done(self) -> int:
        with self._cond:
            return max(0, self._submitted - self._done - self._queue.qsize())

    def _drain_abandoned(self) -> int:
        ops: list[WriteOp] = []
        while True:
            try:
                ops.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if ops:
            self._finish(len(ops), abandoned=len(ops))
            self._settle(ops, committed=False)
        return len(ops)

    def _settle(self, ops: Iterable[WriteOp], *, committed: bool) -> None:
        """Tell the callers of ``ops`` that asked (outside the lock; a failing callback is
        logged, the writer goes on)."""
        with self._cond:
            if not self._on_settled:
                return
            callbacks = [cb for op in ops if (cb := self._on_settled.pop(id(op), None))]
        for cb in callbacks:
            try:
                cb(committed)
            except Exception:
                log.exception("registry writer: an on_settled callback failed")
