"""The registry's tables as SQLAlchemy 2 typed ORM models (the schema Alembic migrates to).

Design decisions:

- Fleets and devices use natural string keys (ids are ≤ 64 characters, as on the wire).
  Every table with a ``fleet`` column references ``fleets.name``; the store creates a fleet row
  on first use. History tables (``drift_events``, ``label_buffer``, ``detector_checkpoints``) do
  not reference ``devices``: hot-path writes do not depend on the order of device upserts, and
  history outlives a device row.
- Timestamps are ``UtcDateTime``: timezone-aware UTC in and out on every backend (SQLite stores
  naive UTC text, which sorts correctly).
- Integers from the wire (versions, epochs, boot counters, seq) are unsigned 32-bit, so they are
  ``BIGINT``; surrogate ids are ``BIGINT`` on PostgreSQL and SQLite's ``INTEGER`` rowid alias.
- JSON is ``JSONB`` on PostgreSQL, SQLite's JSON elsewhere.
- ``audit_log`` is append-only: the store has no update or delete for it, and the migration
  installs triggers that refuse ``UPDATE`` and ``DELETE`` (and ``TRUNCATE`` on PostgreSQL).
- ``api_tokens`` stores only the SHA-256 of each bearer token (see :class:`ApiToken`); a revoked
  token keeps its row (and so its name) for the audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

ID_LEN: Final = 64
"""Longest fleet or device id (the wire allows 64)."""

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC ``datetime`` on every backend; naive values are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; SQLite gets naive UTC (it has no time zones)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give a timezone-aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as timezone-aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json() -> TypeEngine[Any]:
    return JSON().with_variant(JSONB(), "postgresql")


def _surrogate_id() -> TypeEngine[int]:
    return BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of the registry's models, with a constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: UtcDateTime(),
        bytes: LargeBinary(),
        dict[str, Any]: _json(),
    }


class Fleet(Base):
    """A fleet: a named group of devices sharing a broker namespace."""

    __tablename__ = "fleets"

    name: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    created: Mapped[datetime]


class Device(Base):
    """A device of a fleet: its birth announcement, sequence position and drift state."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("fleet", "device_id"),)

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("fleets.name"))
    device_id: Mapped[str] = mapped_column(String(ID_LEN))
    schema_id: Mapped[str | None] = mapped_column(String(64))
    active_version: Mapped[int | None] = mapped_column(BigInteger)
    previous_version: Mapped[int | None] = mapped_column(BigInteger)
    update_state: Mapped[str | None] = mapped_column(String(16))
    online: Mapped[bool]
    fw: Mapped[str | None] = mapped_column(String(128))
    boot: Mapped[int | None] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    caps: Mapped[dict[str, Any] | None]
    drift_state: Mapped[str] = mapped_column(String(255))
    n_features: Mapped[int | None] = mapped_column(Integer)
    n_classes: Mapped[int | None] = mapped_column(Integer)


class ParameterSet(Base):
    """A signed parameter blob for one schema and version, with its lifecycle status."""

    __tablename__ = "parameter_sets"
    __table_args__ = (
        UniqueConstraint("schema_id", "version"),
        UniqueConstraint("sha256"),
        CheckConstraint("status IN ('good', 'bad', 'candidate')", name="status"),
    )

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    schema_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    security_epoch: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes]
    created: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, Any] | None]
    notes: Mapped[str] = mapped_column(Text)


class DriftEvent(Base):
    """One detection from layer A (device) or layer B (cohort)."""

    __tablename__ = "drift_events"
    __table_args__ = (
        CheckConstraint("scope IN ('device', 'cohort')", name="scope"),
        Index("ix_drift_events_fleet_ts", "fleet", "ts"),
        Index("ix_drift_events_fleet_device_ts", "fleet", "device", "ts"),
        Index("ix_drift_events_ts", "ts"),
    )

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    ts: Mapped[datetime]
    fleet: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("fleets.name"))
    device: Mapped[str | None] = mapped_column(String(ID_LEN))
    scope: Mapped[str] = mapped_column(String(8))
    signal: Mapped[str] = mapped_column(String(32))
    feature: Mapped[str | None] = mapped_column(String(128))
    detector: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    model_version: Mapped[int] = mapped_column(BigInteger)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    readings: Mapped[int] = mapped_column(BigInteger)
    details: Mapped[dict[str, Any] | None]


class DetectorCheckpoint(Base):
    """Detector state of a device (or of a cohort, ``device = ''``) for one kind of monitor."""

    __tablename__ = "detector_checkpoints"

    fleet: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("fleets.name"), primary_key=True)
    device: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    format_version: Mapped[int] = mapped_column(Integer)
    updated: Mapped[datetime]
    state: Mapped[bytes]
    last_boot: Mapped[int | None] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)


class LabelBufferRow(Base):
    """One labelled reading kept for retraining (newest ``per_device_cap`` per device)."""

    __tablename__ = "label_buffer"
    __table_args__ = (Index("ix_label_buffer_fleet_device_ts", "fleet", "device", "ts"),)

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("fleets.name"))
    device: Mapped[str] = mapped_column(String(ID_LEN))
    ts: Mapped[datetime]
    param_version: Mapped[int] = mapped_column(BigInteger)
    features: Mapped[bytes]
    pred: Mapped[int] = mapped_column(Integer)
    label: Mapped[int] = mapped_column(Integer)


class AuditEntry(Base):
    """An append-only audit-log entry."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_ts", "ts"),
        Index("ix_audit_log_target_ts", "target", "ts"),
    )

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    ts: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any] | None]


class ApiToken(Base):
    """A bearer token of the operator API: its name, role and the SHA-256 of its secret.

    The secret is 32 random bytes (``secrets.token_urlsafe(32)``), so a fast unsalted hash is
    the right choice: there is nothing to brute-force (a salted slow hash protects *low-entropy*
    passwords) and verifying a request costs one SHA-256 plus an indexed lookup. The plaintext is
    shown once at creation and never stored.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("name"),
        UniqueConstraint("token_hash"),
        CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="role"),
    )

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(ID_LEN))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime]
    last_used: Mapped[datetime | None]
    revoked: Mapped[bool]


class Rollout(Base):
    """A rollout of a parameter set to a fleet; ``state_json`` is the controller's whole state.

    The other columns duplicate what the API lists and filters on (fleet, versions, state).
    """

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_fleet_state", "fleet", "state"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("fleets.name"))
    schema_id: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int] = mapped_column(BigInteger)
    to_version: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    created: Mapped[datetime]
    updated: Mapped[datetime]
    state_json: Mapped[str] = mapped_column(Text)


class RolloutEventRow(Base):
    """An append-only rollout or group transition with the gate figures it was decided on."""

    __tablename__ = "rollout_events"
    __table_args__ = (
        CheckConstraint("scope IN ('rollout', 'group')", name="scope"),
        Index("ix_rollout_events_rollout_id_id", "rollout_id", "id"),
    )

    id: Mapped[int] = mapped_column(_surrogate_id(), primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(ID_LEN), ForeignKey("rollouts.id"))
    ts: Mapped[datetime]
    scope: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    figures: Mapped[dict[str, Any] | None]
