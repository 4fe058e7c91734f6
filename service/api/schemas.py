"""Request and response bodies of the API (pydantic), built from the registry's records."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.registry.records import (
    AuditRecord,
    DeviceRecord,
    DriftEventRecord,
    FleetSummary,
    ParameterSetSummary,
    ParameterStatus,
    Role,
    TokenRecord,
)

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"


def _plain(mapping: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(mapping) if mapping is not None else None


class FleetOut(BaseModel):
    """A fleet with its device counts."""

    name: str
    created: datetime
    devices: int
    online: int
    drifting: int = Field(description="Devices whose drift state is neither ok nor unknown.")

    @classmethod
    def of(cls, rec: FleetSummary) -> FleetOut:
        """From the registry's summary."""
        return cls(
            name=rec.name,
            created=rec.created,
            devices=rec.devices,
            online=rec.online,
            drifting=rec.drifting,
        )


class FleetList(BaseModel):
    """Every fleet."""

    items: list[FleetOut]


class DeviceOut(BaseModel):
    """A device as the registry last stored it."""

    fleet: str
    device: str
    schema_id: str | None
    model_version: int | None = Field(description="The parameter version the device runs.")
    previous_version: int | None
    update_state: str | None = Field(description="The device's update state from its last ack.")
    drift_state: str = Field(description="ok, unknown, or the drifting signals, comma-separated.")
    drifting: bool
    online: bool
    fw: str | None
    first_seen: datetime
    last_seen: datetime

    @classmethod
    def fields_of(cls, rec: DeviceRecord) -> dict[str, Any]:
        """The fields of a device record, as this model names them."""
        drift_state = rec.drift_state or "unknown"
        return {
            "fleet": rec.fleet,
            "device": rec.device,
            "schema_id": rec.schema_id,
            "model_version": rec.active_version,
            "previous_version": rec.previous_version,
            "update_state": rec.update_state,
            "drift_state": drift_state,
            "drifting": drift_state not in ("ok", "unknown"),
            "online": bool(rec.online),
            "fw": rec.fw,
            "first_seen": rec.first_seen,
            "last_seen": rec.last_seen,
        }

    @classmethod
    def of(cls, rec: DeviceRecord) -> DeviceOut:
        """From a device record."""
        return cls(**cls.fields_of(rec))


class DevicePage(BaseModel):
    """One page of a fleet's devices, by device id."""

    items: list[DeviceOut]
    total: int
    limit: int
    offset: int


class DriftEventOut(BaseModel):
    """A stored drift detection."""

    id: int | None
    ts: datetime
    fleet: str
    device: str | None
    scope: str
    signal: str
    feature: str | None
    detector: str
    score: float
    model_version: int
    ts_ms: int
    readings: int
    details: dict[str, Any] | None

    @classmethod
    def of(cls, rec: DriftEventRecord) -> DriftEventOut:
        """From a drift-event record."""
        return cls(
            id=rec.id,
            ts=rec.ts,
            fleet=rec.fleet,
            device=rec.device,
            scope=rec.scope,
            signal=rec.signal,
            feature=rec.feature,
            detector=rec.detector,
            score=rec.score,
            model_version=rec.model_version,
            ts_ms=rec.ts_ms,
            readings=rec.readings,
            details=_plain(rec.details),
        )


class DriftEventList(BaseModel):
    """Drift events, newest first."""

    items: list[DriftEventOut]


class DeviceDetail(DeviceOut):
    """A device with its sequence position, capabilities and most recent drift events."""

    boot: int | None
    last_seq: int | None
    caps: dict[str, Any] | None
    n_features: int | None
    n_classes: int | None
    recent_drift_events: list[DriftEventOut]

    @classmethod
    def detail(cls, rec: DeviceRecord, events: list[DriftEventRecord]) -> DeviceDetail:
        """From a device record and its recent events."""
        return cls(
            **DeviceOut.fields_of(rec),
            boot=rec.boot,
            last_seq=rec.last_seq,
            caps=_plain(rec.caps),
            n_features=rec.n_features,
            n_classes=rec.n_classes,
            recent_drift_events=[DriftEventOut.of(e) for e in events],
        )


class ParameterSetOut(BaseModel):
    """A parameter set's metadata (never the blob bytes)."""

    schema_id: str
    version: int
    security_epoch: int
    sha256: str = Field(description="Hex SHA-256 of the signed blob (a manifest's blob_sha256).")
    size: int = Field(description="Blob length in bytes.")
    created: datetime
    source: str
    status: ParameterStatus

    @classmethod
    def fields_of(cls, rec: ParameterSetSummary) -> dict[str, Any]:
        """The summary's fields this model has."""
        return {
            "schema_id": rec.schema_id,
            "version": rec.version,
            "security_epoch": rec.security_epoch,
            "sha256": rec.sha256,
            "size": rec.size,
            "created": rec.created,
            "source": rec.source,
            "status": rec.status,
        }

    @classmethod
    def of(cls, rec: ParameterSetSummary) -> ParameterSetOut:
        """From a parameter-set summary."""
        return cls(**cls.fields_of(rec))


class ParameterSetList(BaseModel):
    """Parameter sets by schema and version."""

    items: list[ParameterSetOut]


class ParameterSetDetail(ParameterSetOut):
    """A parameter set's metadata with its metrics and notes."""

    metrics: dict[str, Any] | None
    notes: str

    @classmethod
    def detail(cls, rec: ParameterSetSummary) -> ParameterSetDetail:
        """From a parameter-set summary."""
        return cls(**ParameterSetOut.fields_of(rec), metrics=_plain(rec.metrics), notes=rec.notes)


class AuditOut(BaseModel):
    """One audit-log entry."""

    id: int
    ts: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any] | None

    @classmethod
    def of(cls, rec: AuditRecord) -> AuditOut:
        """From an audit record."""
        return cls(
            id=rec.id,
            ts=rec.ts,
            actor=rec.actor,
            action=rec.action,
            target=rec.target,
            details=_plain(rec.details),
        )


class AuditList(BaseModel):
    """Audit entries, newest first."""

    items: list[AuditOut]


class TokenCreate(BaseModel):
    """A token to create."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=TOKEN_NAME_PATTERN, description="Unique; the audit log's actor.")
    role: Role


class TokenOut(BaseModel):
    """A token without its secret."""

    name: str
    role: Role
    created: datetime
    last_used: datetime | None
    revoked: bool

    @classmethod
    def fields_of(cls, rec: TokenRecord) -> dict[str, Any]:
        """The record's fields."""
        return {
            "name": rec.name,
            "role": rec.role,
            "created": rec.created,
            "last_used": rec.last_used,
            "revoked": rec.revoked,
        }

    @classmethod
    def of(cls, rec: TokenRecord) -> TokenOut:
        """From a token record."""
        return cls(**cls.fields_of(rec))


class TokenCreated(TokenOut):
    """A new token, with its secret: shown this once, stored only as a hash."""

    token: str

    @classmethod
    def of_new(cls, rec: TokenRecord, plaintext: str) -> TokenCreated:
        """From the new record and its plaintext."""
        return cls(**TokenOut.fields_of(rec), token=plaintext)


class TokenList(BaseModel):
    """Every token (revoked ones too), by name."""

    items: list[TokenOut]


class ServiceStateOut(BaseModel):
    """Live figures of the service hosting the API."""

    connected: bool
    devices: int
    readings: int
    rejections: dict[str, int]
    detections: int
    queue_depth: int


class StatusOut(BaseModel):
    """The API's status: registry backend and, when hosted by a service, its live figures."""

    api_version: str
    registry: str
    service: ServiceStateOut | None
