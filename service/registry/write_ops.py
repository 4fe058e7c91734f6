"""The writes :class:`~service.registry.writer.RegistryWriter` queues: one small frozen op each.

An op knows its ``kind`` (the unit of the writer's drop policy and of its metrics), how many
records it carries, how to apply itself inside a
:class:`~service.registry.transaction.RegistryTransaction`, and whether it can be merged with the
next op of a batch (so 500 one-event ops become one multi-row ``INSERT``).

>>> from service.registry.records import CheckpointRecord
>>> a = SaveCheckpoints((CheckpointRecord("f", "d1", "device", 1, b"x"),))
>>> b = SaveCheckpoints((CheckpointRecord("f", "d2", "device", 1, b"y"),))
>>> a.kind, a.merge(b).size
('checkpoints', 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Final, Literal, Protocol, get_args

from service.registry.records import (
    CheckpointRecord,
    DetectionLike,
    DeviceRecord,
    DriftEventRecord,
    LabelRecord,
    utc_now,
)
from service.registry.transaction import DEFAULT_LABEL_CAP, RegistryTransaction

WriteKind = Literal["devices", "drift_events", "labels", "checkpoints", "audit"]
"""What a queued write stores: a bounded set, usable as a Prometheus label."""

WRITE_KINDS: Final[frozenset[str]] = frozenset(get_args(WriteKind))


class WriteOp(Protocol):
    """A queued registry write."""

    kind: ClassVar[WriteKind]

    @property
    def size(self) -> int:
        """Records carried (rows written, before merging duplicates)."""
        ...

    def apply(self, tx: RegistryTransaction) -> None:
        """Perform the write inside ``tx``."""
        ...

    def merge(self, other: WriteOp) -> WriteOp | None:
        """One op doing ``self`` then ``other``, or ``None`` when they do not combine."""
        ...


@dataclass(frozen=True, slots=True)
class UpsertDevices:
    """Insert or merge device records (see :meth:`Registry.upsert_devices`)."""

    records: tuple[DeviceRecord, ...]
    kind: ClassVar[WriteKind] = "devices"

    @property
    def size(self) -> int:
        """Records carried."""
        return len(self.records)

    def apply(self, tx: RegistryTransaction) -> None:
        """Upsert the devices."""
        tx.upsert_devices(self.records)

    def merge(self, other: WriteOp) -> WriteOp | None:
        """Concatenate with another device upsert (later records win per device)."""
        if isinstance(other, UpsertDevices):
            return UpsertDevices(self.records + other.records)
        return None


@dataclass(frozen=True, slots=True)
class RecordDriftEvents:
    """Store drift events; each carries the time it was submitted, not committed."""

    events: tuple[DriftEventRecord, ...]
    kind: ClassVar[WriteKind] = "drift_events"

    @classmethod
    def of(
        cls, detections: Iterable[DetectionLike], ts: datetime | None = None
    ) -> RecordDriftEvents:
        """The op for detections made at ``ts`` (default now); records keep their own time."""
        when = ts or utc_now()
        return cls(
            tuple(
                d if isinstance(d, DriftEventRecord) else DriftEventRecord.of(d, when)
                for d in detections
            )
        )

    @property
    def size(self) -> int:
        """Records carried."""
        return len(self.events)

    def apply(self, tx: RegistryTransaction) -> None:
        """Insert the events."""
        tx.record_drift_events(self.events)

    def merge(self, other: WriteOp) -> WriteOp | None:
        """Concatenate with another event op."""
        if isinstance(other, RecordDriftEvents):
            return RecordDriftEvents(self.events + other.events)
        return None


@dataclass(frozen=True, slots=True)
class AddLabels:
    """Buffer labelled readings, keeping the newest ``per_device_cap`` per device."""

    records: tuple[LabelRecord, ...]
    per_device_cap: int = DEFAULT_LABEL_CAP
    kind: ClassVar[WriteKind] = "labels"

    @property
    def size(self) -> int:
        """Records carried."""
        return len(self.records)

    def apply(self, tx: RegistryTransaction) -> None:
        """Insert, then trim each device's buffer to the cap."""
        tx.add_labels(self.records, self.per_device_cap)

    def merge(self, other: WriteOp) -> WriteOp | None:
        """Concatenate with another label op of the same cap."""
        if isinstance(other, AddLabels) and other.per_device_cap == self.per_device_cap:
            return AddLabels(self.records + other.records, self.per_device_cap)
        return None


@dataclass(frozen=True, slots=True)
class SaveCheckpoints:
    """Insert or replace detector checkpoints by key."""

    records: tuple[CheckpointRecord, ...]
    kind: ClassVar[WriteKind] = "checkpoints"

    @property
    def size(self) -> int:
        """Records carried."""
        return len(self.records)

    def apply(self, tx: RegistryTransaction) -> None:
        """Upsert the checkpoints (the last one per key wins)."""
        tx.save_checkpoints(self.records)

    def merge(self, other: WriteOp) -> WriteOp | None:
        """Concatenate with another checkpoint op."""
        if isinstance(other, SaveCheckpoints):
            return SaveCheckpoints(self.records + other.records)
        return None


@dataclass(frozen=True, slots=True)
class AppendAudit:
    """Append one audit entry, timed when it was submitted."""

    actor: str
    action: str
    target: str
    details: Mapping[str, Any] | None = None
    ts: datetime = field(default_factory=utc_now)
    kind: ClassVar[WriteKind] = "audit"

    @property
    def size(self) -> int:
        """One entry."""
        return 1

    def apply(self, tx: RegistryTransaction) -> None:
        """Append the entry."""
        tx.append_audit(self.actor, self.action, self.target, self.details, self.ts)

    def merge(self, other: WriteOp) -> WriteOp | None:
        """Audit entries are written one by one (they are few)."""
        return None


def merge_consecutive(ops: Sequence[WriteOp]) -> list[WriteOp]:
    """``ops`` with runs of mergeable neighbours combined; the order of writes is kept.

    >>> from service.registry.records import DeviceRecord as D
    >>> ops = [UpsertDevices((D("f", "a"),)), UpsertDevices((D("f", "b"),))]
    >>> ops.append(AppendAudit("u", "x", "t"))
    >>> [(op.kind, op.size) for op in merge_consecutive(ops)]
    [('devices', 2), ('audit', 1)]
    """
    out: list[WriteOp] = []
    for op in ops:
        combined = out[-1].merge(op) if out else None
        if combined is None:
            out.append(op)
        else:
            out[-1] = combined
    return out
