"""One unit of registry writes: every write the store and the writer perform, in one transaction.

:meth:`service.registry.store.Registry.transaction` opens one; the ``Registry`` write methods
each use a transaction of their own, and :class:`service.registry.writer.RegistryWriter` applies
a whole batch of queued writes in one. Upserts are single ``INSERT … ON CONFLICT`` statements
(SQLite and PostgreSQL both have them), so concurrent writers cannot interleave a read and a
write. Records with the same key in one call are merged first (the later one wins), because one
``INSERT … ON CONFLICT DO UPDATE`` may not touch a row twice.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Table, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.registry import rollout_store
from service.registry.errors import (
    RegistryConflictError,
    RegistryError,
    UnknownParameterSetError,
    UnknownTokenError,
)
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
    PARAMETER_STATUSES,
    ROLES,
    AuditRecord,
    CheckpointRecord,
    DetectionLike,
    DeviceRecord,
    DriftEventRecord,
    LabelRecord,
    ParameterSetRecord,
    ParameterStatus,
    Role,
    TokenRecord,
    role_rank,
    utc_now,
)
from service.registry.rollout_store import RolloutEventRecord, RolloutRecord

DEFAULT_LABEL_CAP = 2000
"""Labelled readings kept per device in the label buffer."""

_DEVICE_DEFAULTS: Mapping[str, Any] = {"online": False, "drift_state": "unknown"}


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


class RegistryTransaction:
    """Registry writes inside one open database transaction (see the module docstring)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name

    def _insert(self, model: type[Any]) -> Any:
        """A dialect ``INSERT`` with ``on_conflict_do_*`` for ``model``'s table."""
        table = _table(model)
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        if self._dialect == "sqlite":
            return sqlite.insert(table)
        raise RegistryError(f"unsupported database dialect {self._dialect}")

    # ---------------------------------------------------------------------------------------
    # fleets and devices

    def ensure_fleets(self, names: Iterable[str]) -> None:
        """Create the fleets that do not exist yet."""
        rows = [{"name": n, "created": utc_now()} for n in sorted(set(names))]
        if rows:
            stmt = self._insert(Fleet).on_conflict_do_nothing(index_elements=["name"])
            self._session.execute(stmt, rows)

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> int:
        """Insert or merge devices (``None`` fields keep the stored value); returns how many."""
        merged: dict[tuple[str, str], DeviceRecord] = {}
        for rec in records:
            key = (rec.fleet, rec.device)
            merged[key] = merged[key].merged_with(rec) if key in merged else rec
        if not merged:
            return 0
        self.ensure_fleets(fleet for fleet, _ in merged)
        by_shape: dict[tuple[str, ...], list[DeviceRecord]] = defaultdict(list)
        for rec in merged.values():
            by_shape[rec.given_fields()].append(rec)
        now = utc_now()
        for shape, recs in by_shape.items():
            rows = [_device_row(rec, now) for rec in recs]
            stmt = self._insert(Device)
            updates = {name: stmt.excluded[name] for name in shape if name != "first_seen"}
            if updates:
                stmt = stmt.on_conflict_do_update(
                    index_elements=["fleet", "device_id"], set_=updates
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=["fleet", "device_id"])
            self._session.execute(stmt, rows)
        return len(merged)

    # ---------------------------------------------------------------------------------------
    # drift events

    def record_drift_events(
        self, detections: Iterable[DetectionLike], ts: datetime | None = None
    ) -> int:
        """Store detections; ``ts`` (default now) is used for those that carry no time."""
        default_ts = ts or utc_now()
        rows = [_event_row(d, default_ts) for d in detections]
        if rows:
            self.ensure_fleets(row["fleet"] for row in rows)
            self._session.execute(insert(_table(DriftEvent)), rows)
        return len(rows)

    # ---------------------------------------------------------------------------------------
    # detector checkpoints

    def save_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
        """Insert or replace checkpoints by ``(fleet, device, kind)``; returns how many."""
        latest = {rec.key: rec for rec in records}
        if not latest:
            return 0
        self.ensure_fleets(fleet for fleet, _, _ in latest)
        now = utc_now()
        rows = [
            {
                "fleet": rec.fleet,
                "device": rec.device or "",
                "kind": rec.kind,
                "format_version": rec.format_version,
                "updated": rec.updated or now,
                "state": rec.state,
                "last_boot": rec.last_boot,
                "last_seq": rec.last_seq,
            }
            for rec in latest.values()
        ]
        stmt = self._insert(DetectorCheckpoint)
        stmt = stmt.on_conflict_do_update(
            index_elements=["fleet", "device", "kind"],
            set_={
                name: stmt.excluded[name]
                for name in ("format_version", "updated", "state", "last_boot", "last_seq")
            },
        )
        self._session.execute(stmt, rows)
        return len(rows)

    # ---------------------------------------------------------------------------------------
    # label buffer

    def add_labels(
        self, records: Sequence[LabelRecord], per_device_cap: int = DEFAULT_LABEL_CAP
    ) -> int:
        """Buffer labelled readings, then keep only the newest ``per_device_cap`` per device."""
        if per_device_cap < 1:
            raise ValueError(f"per_device_cap must be ≥ 1, got {per_device_cap}")
        if not records:
            return 0
        self.ensure_fleets(rec.fleet for rec in records)
        rows = [
            {
                "fleet": rec.fleet,
                "device": rec.device,
                "ts": rec.ts,
                "param_version": rec.param_version,
                "features": rec.features_blob(),
                "pred": rec.pred,
                "label": rec.label,
            }
            for rec in records
        ]
        self._session.execute(insert(_table(LabelBufferRow)), rows)
        devices: dict[str, set[str]] = defaultdict(set)
        for rec in records:
            devices[rec.fleet].add(rec.device)
        for fleet, names in devices.items():
            self._trim_labels(fleet, sorted(names), per_device_cap)
        return len(rows)

    def _trim_labels(self, fleet: str, devices: list[str], cap: int) -> None:
        over = self._session.execute(
            select(LabelBufferRow.device)
            .where(LabelBufferRow.fleet == fleet, LabelBufferRow.device.in_(devices))
            .group_by(LabelBufferRow.device)
            .having(func.count() > cap)
        ).scalars()
        for device in list(over):
            mine = and_(LabelBufferRow.fleet == fleet, LabelBufferRow.device == device)
            # The newest row to drop: everything at or before it (by ts, then id) goes.
            cut = self._session.execute(
                select(LabelBufferRow.ts, LabelBufferRow.id)
                .where(mine)
                .order_by(LabelBufferRow.ts.desc(), LabelBufferRow.id.desc())
                .offset(cap)
                .limit(1)
            ).one()
            self._session.execute(
                delete(LabelBufferRow).where(
                    mine,
                    or_(
                        LabelBufferRow.ts < cut.ts,
                        and_(LabelBufferRow.ts == cut.ts, LabelBufferRow.id <= cut.id),
                    ),
                )
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
        """Store a parameter blob; its ``sha256`` is computed here. Refuses duplicates."""
        _check_status(status)
        sha = hashlib.sha256(blob).hexdigest()
        clash = self._session.scalars(
            select(ParameterSet).where(
                or_(
                    and_(ParameterSet.schema_id == schema_id, ParameterSet.version == version),
                    ParameterSet.sha256 == sha,
                )
            )
        ).first()
        if clash is not None:
            what = (
                f"the same blob (sha256 {sha[:16]}…) is stored as version {clash.version}"
                if clash.sha256 == sha
                else f"schema {schema_id} version {version} is already stored"
            )
            raise RegistryConflictError(f"parameter set refused: {what}; use a new version")
        row = ParameterSet(
            schema_id=schema_id,
            version=version,
            security_epoch=security_epoch,
            sha256=sha,
            blob=blob,
            created=created or utc_now(),
            source=source,
            status=status,
            metrics=dict(metrics) if metrics is not None else None,
            notes=notes,
        )
        self._session.add(row)
        try:
            self._session.flush()
        except IntegrityError as exc:  # a concurrent insert won the race
            raise RegistryConflictError(
                f"parameter set schema {schema_id} version {version} was stored concurrently"
            ) from exc
        return parameter_set_record(row)

    def set_parameter_status(
        self,
        schema_id: str,
        version: int,
        status: ParameterStatus,
        actor: str | None = None,
        reason: str = "",
    ) -> ParameterSetRecord:
        """Change a parameter set's status; with ``actor``, audit the change in this transaction."""
        _check_status(status)
        row = self._session.scalars(
            select(ParameterSet)
            .where(ParameterSet.schema_id == schema_id, ParameterSet.version == version)
            .with_for_update()
        ).first()
        if row is None:
            raise UnknownParameterSetError(
                f"no parameter set for schema {schema_id} version {version}"
            )
        old = row.status
        row.status = status
        self._session.flush()
        if actor is not None:
            self.append_audit(
                actor,
                "parameter_set.status",
                f"parameter_set:{schema_id}:{version}",
                {"from": old, "to": status, "reason": reason},
            )
        return parameter_set_record(row)

    # ---------------------------------------------------------------------------------------
    # operator API tokens

    def create_token(self, name: str, role: Role, actor: str) -> tuple[TokenRecord, str]:
        """A new token ``name`` with ``role``; returns its record and its plaintext (shown once).

        Audited as ``token.create`` by ``actor`` in this transaction. A name already used (by a
        live or a revoked token) raises :class:`RegistryConflictError`.
        """
        check_token_name(name)
        role_rank(role)
        taken = self._session.scalars(select(ApiToken.id).where(ApiToken.name == name)).first()
        if taken is not None:
            raise RegistryConflictError(
                f"token name {name!r} is taken (revoked tokens keep their name): choose another"
            )
        plaintext = secrets.token_urlsafe(TOKEN_BYTES)
        row = ApiToken(
            name=name,
            role=role,
            token_hash=token_hash(plaintext),
            created=utc_now(),
            last_used=None,
            revoked=False,
        )
        self._session.add(row)
        try:
            self._session.flush()
        except IntegrityError as exc:  # a concurrent create won the race
            raise RegistryConflictError(f"token name {name!r} was created concurrently") from exc
        self.append_audit(actor, "token.create", f"token:{name}", {"role": role})
        return token_record(row), plaintext

    def revoke_token(self, name: str, actor: str) -> TokenRecord:
        """Revoke token ``name`` (audited as ``token.revoke`` by ``actor`` in this transaction).

        Raises :class:`UnknownTokenError` if there is none, :class:`RegistryConflictError` if it
        is revoked already.
        """
        row = self._session.scalars(
            select(ApiToken).where(ApiToken.name == name).with_for_update()
        ).first()
        if row is None:
            raise UnknownTokenError(f"no API token named {name!r}")
        if row.revoked:
            raise RegistryConflictError(f"API token {name!r} is already revoked")
        row.revoked = True
        self._session.flush()
        self.append_audit(actor, "token.revoke", f"token:{name}", {"role": row.role})
        return token_record(row)

    def touch_token(self, name: str, now: datetime, min_interval_s: float) -> bool:
        """Set ``last_used`` to ``now`` unless it was set less than ``min_interval_s`` before."""
        before = now - timedelta(seconds=min_interval_s)
        result = self._session.execute(
            update(ApiToken)
            .where(
                ApiToken.name == name,
                or_(ApiToken.last_used.is_(None), ApiToken.last_used < before),
            )
            .values(last_used=now)
        )
        return bool(getattr(result, "rowcount", 0))

    # ---------------------------------------------------------------------------------------
    # audit log

    def save_rollout(
        self, record: RolloutRecord, events: Iterable[RolloutEventRecord] = ()
    ) -> list[RolloutEventRecord]:
        """Insert or update a rollout and append its transitions, in this transaction."""
        self.ensure_fleets([record.fleet])
        return rollout_store.save_rollout(self._session, record, events)

    def append_audit(
        self,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> AuditRecord:
        """Append one audit entry (the log has no update or delete)."""
        entry = AuditEntry(
            ts=ts or utc_now(),
            actor=actor,
            action=action,
            target=target,
            details=dict(details) if details is not None else None,
        )
        self._session.add(entry)
        self._session.flush()
        return audit_record(entry)


# -------------------------------------------------------------------------------------------
# rows ↔ records


TOKEN_BYTES: Final = 32
"""Random bytes in an API token (urlsafe base64: 43 characters)."""

_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


def check_token_name(name: str) -> None:
    """Refuse a token name that is not 1–64 of ``A–Z a–z 0–9 . _ : @ -`` (first alphanumeric).

    >>> check_token_name("ci-bot")
    >>> check_token_name("no spaces")
    Traceback (most recent call last):
    ...
    ValueError: token name must be 1-64 characters of A-Z a-z 0-9 . _ : @ - starting with a \
letter or digit, got 'no spaces'
    """
    if not _TOKEN_NAME.fullmatch(name):
        raise ValueError(
            "token name must be 1-64 characters of A-Z a-z 0-9 . _ : @ - starting with a "
            f"letter or digit, got {name!r}"
        )


def token_hash(plaintext: str) -> str:
    """The stored form of a token: hex SHA-256 of its UTF-8 text (see ``models.ApiToken``)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _check_status(status: str) -> None:
    if status not in PARAMETER_STATUSES:
        raise ValueError(f"status must be one of {sorted(PARAMETER_STATUSES)}, got {status!r}")


def _status(stored: str) -> ParameterStatus:
    _check_status(stored)  # the table's CHECK constraint guarantees it
    return cast(ParameterStatus, stored)


def _device_row(rec: DeviceRecord, now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = {
        f.name: getattr(rec, f.name) for f in fields(rec) if f.name not in ("fleet", "device")
    }
    row["fleet"] = rec.fleet
    row["device_id"] = rec.device
    for name, default in _DEVICE_DEFAULTS.items():
        if row[name] is None:
            row[name] = default
    row["last_seen"] = rec.last_seen or now
    row["first_seen"] = rec.first_seen or row["last_seen"]
    if rec.caps is not None:
        row["caps"] = dict(rec.caps)
    return row


def _event_row(d: DetectionLike, default_ts: datetime) -> dict[str, Any]:
    ts, details = default_ts, None
    if isinstance(d, DriftEventRecord):
        ts, details = d.ts, (dict(d.details) if d.details is not None else None)
    return {
        "ts": ts,
        "fleet": d.fleet,
        "device": d.device,
        "scope": d.scope,
        "signal": d.signal,
        "feature": d.feature,
        "detector": d.detector,
        "score": float(d.score),
        "model_version": int(d.model_version),
        "ts_ms": int(d.ts_ms),
        "readings": int(d.readings),
        "details": details,
    }


def device_record(row: Device) -> DeviceRecord:
    """The record of a stored device."""
    return DeviceRecord(
        fleet=row.fleet,
        device=row.device_id,
        schema_id=row.schema_id,
        active_version=row.active_version,
        previous_version=row.previous_version,
        update_state=row.update_state,
        online=row.online,
        fw=row.fw,
        boot=row.boot,
        last_seq=row.last_seq,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        caps=row.caps,
        drift_state=row.drift_state,
        n_features=row.n_features,
        n_classes=row.n_classes,
    )


def drift_event_record(row: DriftEvent) -> DriftEventRecord:
    """The record of a stored drift event."""
    return DriftEventRecord(
        id=row.id,
        ts=row.ts,
        fleet=row.fleet,
        device=row.device,
        scope=row.scope,
        signal=row.signal,
        feature=row.feature,
        detector=row.detector,
        score=row.score,
        model_version=row.model_version,
        ts_ms=row.ts_ms,
        readings=row.readings,
        details=row.details,
    )


def checkpoint_record(row: DetectorCheckpoint) -> CheckpointRecord:
    """The record of a stored checkpoint (``device`` ``''`` → ``None``)."""
    return CheckpointRecord(
        fleet=row.fleet,
        device=row.device or None,
        kind=row.kind,
        format_version=row.format_version,
        state=row.state,
        last_boot=row.last_boot,
        last_seq=row.last_seq,
        updated=row.updated,
    )


def parameter_set_record(row: ParameterSet) -> ParameterSetRecord:
    """The record of a stored parameter set."""
    return ParameterSetRecord(
        schema_id=row.schema_id,
        version=row.version,
        security_epoch=row.security_epoch,
        sha256=row.sha256,
        blob=row.blob,
        created=row.created,
        source=row.source,
        status=_status(row.status),
        metrics=row.metrics,
        notes=row.notes,
    )


def token_record(row: ApiToken) -> TokenRecord:
    """The record of a stored API token (without its hash)."""
    return TokenRecord(
        name=row.name,
        role=ROLES[role_rank(row.role)],
        created=row.created,
        last_used=row.last_used,
        revoked=row.revoked,
    )


def audit_record(row: AuditEntry) -> AuditRecord:
    """The record of a stored audit entry."""
    return AuditRecord(
        id=row.id,
        ts=row.ts,
        actor=row.actor,
        action=row.action,
        target=row.target,
        details=row.details,
    )
