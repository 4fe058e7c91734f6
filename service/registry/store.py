"""``Registry``: the registry's typed API over SQLite or PostgreSQL.

Opening a ``Registry`` connects (a bad URL or an unreachable database raises
:class:`~service.registry.errors.RegistryError` with a one-line message naming the fix) and
migrates the database to the packaged head revision. Every method is thread-safe and runs in a
transaction of its own; records, never ORM objects, go in and out
(:mod:`service.registry.records`). Hot-path writes go through
:class:`~service.registry.writer.RegistryWriter` instead of these methods.

Lists come newest first (drift events, audit) or in key order (devices, checkpoints); label
reads come oldest first, as arrays.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from service.registry import rollout_store
from service.registry.engine import (
    DEFAULT_BUSY_TIMEOUT_MS,
    WRITE_OPTION,
    check_connection,
    create_registry_engine,
    masked,
)
from service.registry.errors import (
    RegistryConflictError,
    RegistryOperationError,
    first_line,
    is_transient,
)
from service.registry.migrate import upgrade_engine
from service.registry.models import (
    ApiToken,
    AuditEntry,
    DetectorCheckpoint,
    Device,
    DriftEvent,
    Fleet,
    LabelBufferRow,
    ParameterSet,
)
from service.registry.records import (
    FEATURE_DTYPE,
    AuditRecord,
    CheckpointRecord,
    DetectionLike,
    DeviceRecord,
    DriftEventRecord,
    FleetSummary,
    LabelArrays,
    LabelRecord,
    ParameterSetRecord,
    ParameterSetSummary,
    ParameterStatus,
    Role,
    TokenRecord,
    utc_now,
)
from service.registry.rollout_store import RolloutEventRecord, RolloutRecord
from service.registry.transaction import (
    DEFAULT_LABEL_CAP,
    RegistryTransaction,
    audit_record,
    checkpoint_record,
    device_record,
    drift_event_record,
    parameter_set_record,
    token_hash,
    token_record,
)

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS: Final = 256
"""Longer bearer strings are refused without hashing (ours are 43 characters)."""

_NOT_DRIFTING: Final = ("ok", "unknown", "calibrating")


class Registry:
    """The registry database at ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://…``).

    ``sqlite_busy_timeout_ms`` is how long SQLite waits for a lock before reporting
    ``database is locked``; ``migrate=False`` skips the upgrade at open (the schema must then be
    at head already).
    """

    def __init__(
        self,
        url: str,
        *,
        sqlite_busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        migrate: bool = True,
    ) -> None:
        self._engine = create_registry_engine(url, sqlite_busy_timeout_ms=sqlite_busy_timeout_ms)
        try:
            check_connection(self._engine)
            if migrate:
                upgrade_engine(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self._write_engine = self._engine.execution_options(**{WRITE_OPTION: True})
        self.url = masked(self._engine.url)
        """The database URL with its password hidden."""
        self.dialect = self._engine.dialect.name
        """``"sqlite"`` or ``"postgresql"``."""
        log.info("registry open: %s", self.url)

    # ---------------------------------------------------------------------------------------
    # lifecycle and transactions

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[RegistryTransaction]:
        """One write transaction: committed when the block ends, rolled back on an exception.

        Database failures are raised as :class:`RegistryOperationError` (``transient`` tells a
        locked or lost database from a bad write) or :class:`RegistryConflictError`.
        """
        with (
            self._translated("write"),
            Session(self._write_engine) as session,
            session.begin(),
        ):
            yield RegistryTransaction(session)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._translated("read"), Session(self._engine) as session, session.begin():
            yield session

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            raise RegistryConflictError(f"{what} refused by {self.url}: {first_line(exc)}") from exc
        except DBAPIError as exc:
            raise RegistryOperationError(
                f"{what} failed on {self.url}: {first_line(exc)}", transient=is_transient(exc)
            ) from exc

    # ---------------------------------------------------------------------------------------
    # fleets and devices

    def list_fleets(self) -> list[str]:
        """Names of every fleet, sorted."""
        with self._read() as s:
            return list(s.scalars(select(Fleet.name).order_by(Fleet.name)))

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> int:
        """Insert or merge devices (``None`` fields keep what is stored); returns how many."""
        with self.transaction() as tx:
            return tx.upsert_devices(records)

    def get_device(self, fleet: str, device: str) -> DeviceRecord | None:
        """One device, or ``None``."""
        with self._read() as s:
            row = s.scalars(
                select(Device).where(Device.fleet == fleet, Device.device_id == device)
            ).first()
            return device_record(row) if row is not None else None

    def list_devices(
        self, fleet: str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[DeviceRecord]:
        """Every device (of ``fleet``), ordered by fleet and device id; a page with ``limit``."""
        query = select(Device).order_by(Device.fleet, Device.device_id)
        if fleet is not None:
            query = query.where(Device.fleet == fleet)
        if limit is not None or offset:
            query = query.limit(limit).offset(offset)
        with self._read() as s:
            return [device_record(row) for row in s.scalars(query)]

    def count_devices(self, fleet: str | None = None) -> int:
        """How many devices (of ``fleet``) are stored."""
        query = select(func.count()).select_from(Device)
        if fleet is not None:
            query = query.where(Device.fleet == fleet)
        with self._read() as s:
            return int(s.execute(query).scalar_one())

    def fleet_summaries(self) -> list[FleetSummary]:
        """Every fleet with its device, online and drifting counts, sorted by name."""
        drifting = case((Device.drift_state.not_in(_NOT_DRIFTING), 1), else_=0)
        online = case((Device.online, 1), else_=0)
        counts = (
            select(
                Device.fleet.label("fleet"),
                func.count().label("devices"),
                func.sum(online).label("online"),
                func.sum(drifting).label("drifting"),
            )
            .group_by(Device.fleet)
            .subquery()
        )
        query = (
            select(Fleet.name, Fleet.created, counts.c.devices, counts.c.online, counts.c.drifting)
            .outerjoin(counts, counts.c.fleet == Fleet.name)
            .order_by(Fleet.name)
        )
        with self._read() as s:
            return [
                FleetSummary(
                    name=r.name,
                    created=r.created,
                    devices=int(r.devices or 0),
                    online=int(r.online or 0),
                    drifting=int(r.drifting or 0),
                )
                for r in s.execute(query)
            ]

    # ---------------------------------------------------------------------------------------
    # drift events

    def record_drift_events(
        self, detections: Iterable[DetectionLike], ts: datetime | None = None
    ) -> int:
        """Store detections (``Detection`` or ``DriftEventRecord``) at ``ts`` (default now)."""
        with self.transaction() as tx:
            return tx.record_drift_events(detections, ts)

    def list_drift_events(
        self,
        fleet: str | None = None,
        device: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[DriftEventRecord]:
        """Drift events, newest first, filtered by fleet, device and ``ts >= since``."""
        query = select(DriftEvent).order_by(DriftEvent.ts.desc(), DriftEvent.id.desc())
        if fleet is not None:
            query = query.where(DriftEvent.fleet == fleet)
        if device is not None:
            query = query.where(DriftEvent.device == device)
        if since is not None:
            query = query.where(DriftEvent.ts >= since)
        with self._read() as s:
            return [drift_event_record(row) for row in s.scalars(query.limit(limit))]

    # ---------------------------------------------------------------------------------------
    # detector checkpoints

    def save_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
        """Insert or replace checkpoints by ``(fleet, device, kind)``; returns how many."""
        with self.transaction() as tx:
            return tx.save_checkpoints(records)

    def load_checkpoints(
        self, kind: str | None = None, fleet: str | None = None
    ) -> list[CheckpointRecord]:
        """Stored checkpoints (of ``kind``, of ``fleet``), ordered by key."""
        query = select(DetectorCheckpoint).order_by(
            DetectorCheckpoint.fleet, DetectorCheckpoint.device, DetectorCheckpoint.kind
        )
        if kind is not None:
            query = query.where(DetectorCheckpoint.kind == kind)
        if fleet is not None:
            query = query.where(DetectorCheckpoint.fleet == fleet)
        with self._read() as s:
            return [checkpoint_record(row) for row in s.scalars(query)]

    # ---------------------------------------------------------------------------------------
    # label buffer

    def add_labels(
        self, records: Sequence[LabelRecord], per_device_cap: int = DEFAULT_LABEL_CAP
    ) -> int:
        """Buffer labelled readings, keeping the newest ``per_device_cap`` per device."""
        with self.transaction() as tx:
            return tx.add_labels(records, per_device_cap)

    def recent_labels(
        self,
        fleet: str,
        device: str | None = None,
        param_version: int | None = None,
        limit: int = DEFAULT_LABEL_CAP,
    ) -> LabelArrays:
        """The newest ``limit`` labelled readings (of ``device``, of ``param_version``).

        Returned oldest first. Rows of different feature counts (different schemas) cannot share
        one array: filter by ``param_version`` then.
        """
        query = (
            select(
                LabelBufferRow.device,
                LabelBufferRow.ts,
                LabelBufferRow.param_version,
                LabelBufferRow.features,
                LabelBufferRow.pred,
                LabelBufferRow.label,
            )
            .where(LabelBufferRow.fleet == fleet)
            .order_by(LabelBufferRow.ts.desc(), LabelBufferRow.id.desc())
            .limit(limit)
        )
        if device is not None:
            query = query.where(LabelBufferRow.device == device)
        if param_version is not None:
            query = query.where(LabelBufferRow.param_version == param_version)
        with self._read() as s:
            rows = list(s.execute(query))[::-1]
        widths = {len(r.features) for r in rows}
        if len(widths) > 1:
            counts = sorted(w // FEATURE_DTYPE.itemsize for w in widths)
            raise RegistryOperationError(
                f"labels of {fleet} mix feature counts {counts}: filter by param_version",
                transient=False,
            )
        n = len(rows)
        width = widths.pop() // FEATURE_DTYPE.itemsize if widths else 0
        features = np.frombuffer(b"".join(r.features for r in rows), dtype=FEATURE_DTYPE)
        return LabelArrays(
            device=tuple(r.device for r in rows),
            ts=np.array([r.ts.timestamp() for r in rows], dtype=np.float64),
            param_version=np.array([r.param_version for r in rows], dtype=np.int64),
            features=features.reshape(n, width).astype(np.float64),
            pred=np.array([r.pred for r in rows], dtype=np.int64),
            label=np.array([r.label for r in rows], dtype=np.int64),
        )

    # ---------------------------------------------------------------------------------------
    # parameter sets

    def add_parameter_set(
        self,
        schema_id: str,
        version: int,
        security_epoch: int,
        blob: bytes,
        source: str,
        status: ParameterStatus = "candidate",
        metrics: Mapping[str, Any] | None = None,
        notes: str = "",
        created: datetime | None = None,
    ) -> ParameterSetRecord:
        """Store a parameter blob (``sha256`` computed here); a duplicate raises
        :class:`RegistryConflictError`."""
        with self.transaction() as tx:
            return tx.add_parameter_set(
                schema_id, version, security_epoch, blob, source, status, metrics, notes, created
            )

    def get_parameter_set(self, schema_id: str, version: int) -> ParameterSetRecord | None:
        """The parameter set ``(schema_id, version)``, or ``None``."""
        return self._one_parameter_set(
            select(ParameterSet).where(
                ParameterSet.schema_id == schema_id, ParameterSet.version == version
            )
        )

    def get_parameter_set_by_sha(self, sha256: str) -> ParameterSetRecord | None:
        """The parameter set whose blob has this hex SHA-256, or ``None``."""
        return self._one_parameter_set(
            select(ParameterSet).where(ParameterSet.sha256 == sha256.lower())
        )

    def _one_parameter_set(self, query: Any) -> ParameterSetRecord | None:
        with self._read() as s:
            row = s.scalars(query).first()
            return parameter_set_record(row) if row is not None else None

    def list_parameter_sets(
        self, schema_id: str | None = None, status: ParameterStatus | None = None
    ) -> list[ParameterSetRecord]:
        """Parameter sets (of a schema, of a status), ordered by schema and version."""
        query = select(ParameterSet).order_by(ParameterSet.schema_id, ParameterSet.version)
        if schema_id is not None:
            query = query.where(ParameterSet.schema_id == schema_id)
        if status is not None:
            query = query.where(ParameterSet.status == status)
        with self._read() as s:
            return [parameter_set_record(row) for row in s.scalars(query)]

    def list_parameter_set_summaries(
        self,
        schema_id: str | None = None,
        status: ParameterStatus | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ParameterSetSummary]:
        """Parameter sets' metadata without their blobs, ordered by schema and version."""
        query = self._summary_query().order_by(ParameterSet.schema_id, ParameterSet.version)
        if schema_id is not None:
            query = query.where(ParameterSet.schema_id == schema_id)
        if status is not None:
            query = query.where(ParameterSet.status == status)
        if limit is not None or offset:
            query = query.limit(limit).offset(offset)
        with self._read() as s:
            return [_summary(r) for r in s.execute(query)]

    def get_parameter_set_summary(self, schema_id: str, version: int) -> ParameterSetSummary | None:
        """The metadata (no blob) of parameter set ``(schema_id, version)``, or ``None``."""
        query = self._summary_query().where(
            ParameterSet.schema_id == schema_id, ParameterSet.version == version
        )
        with self._read() as s:
            row = s.execute(query).first()
            return _summary(row) if row is not None else None

    @staticmethod
    def _summary_query() -> Any:
        return select(
            ParameterSet.schema_id,
            ParameterSet.version,
            ParameterSet.security_epoch,
            ParameterSet.sha256,
            func.length(ParameterSet.blob).label("size"),
            ParameterSet.created,
            ParameterSet.source,
            ParameterSet.status,
            ParameterSet.metrics,
            ParameterSet.notes,
        )

    def set_parameter_status(
        self,
        schema_id: str,
        version: int,
        status: ParameterStatus,
        actor: str | None = None,
        reason: str = "",
    ) -> ParameterSetRecord:
        """Change a parameter set's status; with ``actor`` the change is audited atomically.

        Raises :class:`~service.registry.errors.UnknownParameterSetError` when there is none.
        """
        with self.transaction() as tx:
            return tx.set_parameter_status(schema_id, version, status, actor, reason)

    # ---------------------------------------------------------------------------------------
    # audit log

    def append_audit(
        self,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one audit entry and return it (with its id and time)."""
        with self.transaction() as tx:
            return tx.append_audit(actor, action, target, details)

    def list_audit(
        self,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Audit entries, newest first, filtered by actor, action, target and ``ts >= since``."""
        query = select(AuditEntry).order_by(AuditEntry.ts.desc(), AuditEntry.id.desc())
        if actor is not None:
            query = query.where(AuditEntry.actor == actor)
        if action is not None:
            query = query.where(AuditEntry.action == action)
        if target is not None:
            query = query.where(AuditEntry.target == target)
        if since is not None:
            query = query.where(AuditEntry.ts >= since)
        with self._read() as s:
            return [audit_record(row) for row in s.scalars(query.limit(limit))]

    # ---------------------------------------------------------------------------------------
    # rollouts

    def save_rollout(
        self, record: RolloutRecord, events: Iterable[RolloutEventRecord] = ()
    ) -> list[RolloutEventRecord]:
        """Insert or update a rollout (state, ``state_json``) and append its transitions atomically.

        Returns the stored events (with their ids). The fleet row is created on first use.
        """
        with self.transaction() as tx:
            return tx.save_rollout(record, events)

    def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        """One rollout, or ``None``."""
        with self._read() as s:
            return rollout_store.get_rollout(s, rollout_id)

    def list_rollouts(
        self, fleet: str | None = None, state: str | None = None
    ) -> list[RolloutRecord]:
        """Rollouts, newest first, filtered by fleet and state."""
        with self._read() as s:
            return rollout_store.list_rollouts(s, fleet, state)

    def list_rollout_events(self, rollout_id: str) -> list[RolloutEventRecord]:
        """A rollout's transitions with their gate figures, oldest first."""
        with self._read() as s:
            return rollout_store.list_rollout_events(s, rollout_id)

    # ---------------------------------------------------------------------------------------
    # operator API tokens

    def create_token(
        self, name: str, role: Role, *, actor: str = "registry"
    ) -> tuple[TokenRecord, str]:
        """A new API token; returns its record and the plaintext, which is stored nowhere.

        Only the token's SHA-256 is kept (see :class:`~service.registry.models.ApiToken`). The
        creation is audited (``token.create`` by ``actor``) in the same transaction. A taken name
        raises :class:`RegistryConflictError`; a bad name or role ``ValueError``.
        """
        with self.transaction() as tx:
            return tx.create_token(name, role, actor)

    def verify_token(self, plaintext: str) -> TokenRecord | None:
        """The live (not revoked) token whose secret is ``plaintext``, or ``None``. Read-only.

        The lookup is by the SHA-256 of the presented secret, and the stored hash is compared
        with ``hmac.compare_digest``; timing can at most reveal something about a hash of a
        256-bit random secret, which does not help to forge one.
        """
        if not plaintext or len(plaintext) > MAX_TOKEN_CHARS:
            return None
        digest = token_hash(plaintext)
        with self._read() as s:
            row = s.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
            if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked:
                return None
            return token_record(row)

    def revoke_token(self, name: str, *, actor: str = "registry") -> TokenRecord:
        """Revoke token ``name`` (audited as ``token.revoke`` by ``actor``, atomically).

        Raises :class:`~service.registry.errors.UnknownTokenError` if there is none and
        :class:`RegistryConflictError` if it is already revoked.
        """
        with self.transaction() as tx:
            return tx.revoke_token(name, actor)

    def get_token(self, name: str) -> TokenRecord | None:
        """Token ``name`` (live or revoked), or ``None``."""
        with self._read() as s:
            row = s.scalars(select(ApiToken).where(ApiToken.name == name)).first()
            return token_record(row) if row is not None else None

    def list_tokens(self, *, include_revoked: bool = True) -> list[TokenRecord]:
        """Every token (without secrets or hashes), by name."""
        query = select(ApiToken).order_by(ApiToken.name)
        if not include_revoked:
            query = query.where(ApiToken.revoked.is_(False))
        with self._read() as s:
            return [token_record(row) for row in s.scalars(query)]

    def touch_token(
        self, name: str, now: datetime | None = None, min_interval_s: float = 60.0
    ) -> bool:
        """Record a use of token ``name`` (``last_used``), at most once per ``min_interval_s``."""
        with self.transaction() as tx:
            return tx.touch_token(name, now or utc_now(), min_interval_s)


def _summary(row: Any) -> ParameterSetSummary:
    return ParameterSetSummary(
        schema_id=row.schema_id,
        version=row.version,
        security_epoch=row.security_epoch,
        sha256=row.sha256,
        size=int(row.size),
        created=row.created,
        source=row.source,
        status=row.status,
        metrics=row.metrics,
        notes=row.notes,
    )
