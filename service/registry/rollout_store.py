"""Registry persistence of rollouts: records and the session-level operations behind
:meth:`Registry.save_rollout <service.registry.store.Registry.save_rollout>` and friends.

A rollout row holds the controller's whole state as JSON (``state_json``) plus the columns the
API filters on; ``rollout_events`` is append-only (transitions with their gate figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.registry.models import Rollout, RolloutEventRow


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """One rollout as stored."""

    id: str
    fleet: str
    schema_id: str
    from_version: int
    to_version: int
    kind: str
    state: str
    created: datetime
    updated: datetime
    state_json: str


@dataclass(frozen=True, slots=True)
class RolloutEventRecord:
    """One rollout or group transition (``id`` is 0 before it is stored)."""

    rollout_id: str
    ts: datetime
    scope: str
    name: str
    from_state: str
    to_state: str
    actor: str
    reason: str
    figures: Mapping[str, Any] | None = None
    id: int = 0


def rollout_record(row: Rollout) -> RolloutRecord:
    """ORM row → record."""
    return RolloutRecord(
        row.id,
        row.fleet,
        row.schema_id,
        row.from_version,
        row.to_version,
        row.kind,
        row.state,
        row.created,
        row.updated,
        row.state_json,
    )


def event_record(row: RolloutEventRow) -> RolloutEventRecord:
    """ORM row → record."""
    return RolloutEventRecord(
        row.rollout_id,
        row.ts,
        row.scope,
        row.name,
        row.from_state,
        row.to_state,
        row.actor,
        row.reason,
        row.figures,
        row.id,
    )


def save_rollout(
    session: Session, record: RolloutRecord, events: Iterable[RolloutEventRecord]
) -> list[RolloutEventRecord]:
    """Insert or update the rollout row and append ``events``, in the caller's transaction."""
    row = session.get(Rollout, record.id, with_for_update=True)
    if row is None:
        session.add(
            Rollout(
                id=record.id,
                fleet=record.fleet,
                schema_id=record.schema_id,
                from_version=record.from_version,
                to_version=record.to_version,
                kind=record.kind,
                state=record.state,
                created=record.created,
                updated=record.updated,
                state_json=record.state_json,
            )
        )
    else:
        row.state = record.state
        row.updated = record.updated
        row.state_json = record.state_json
    session.flush()
    rows = [
        RolloutEventRow(
            rollout_id=record.id,
            ts=e.ts,
            scope=e.scope,
            name=e.name,
            from_state=e.from_state,
            to_state=e.to_state,
            actor=e.actor,
            reason=e.reason,
            figures=dict(e.figures) if e.figures is not None else None,
        )
        for e in events
    ]
    session.add_all(rows)
    session.flush()
    return [event_record(r) for r in rows]


def get_rollout(session: Session, rollout_id: str) -> RolloutRecord | None:
    """The rollout, or ``None``."""
    row = session.get(Rollout, rollout_id)
    return rollout_record(row) if row is not None else None


def list_rollouts(
    session: Session, fleet: str | None = None, state: str | None = None
) -> list[RolloutRecord]:
    """Rollouts, newest first, filtered by fleet and state."""
    query = select(Rollout).order_by(Rollout.created.desc(), Rollout.id)
    if fleet is not None:
        query = query.where(Rollout.fleet == fleet)
    if state is not None:
        query = query.where(Rollout.state == state)
    return [rollout_record(r) for r in session.scalars(query)]


def list_rollout_events(session: Session, rollout_id: str) -> list[RolloutEventRecord]:
    """A rollout's transitions, oldest first."""
    query = (
        select(RolloutEventRow)
        .where(RolloutEventRow.rollout_id == rollout_id)
        .order_by(RolloutEventRow.id)
    )
    return [event_record(r) for r in session.scalars(query)]
