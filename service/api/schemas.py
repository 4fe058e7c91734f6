"""Request and response bodies of the API (pydantic), built from the registry's records."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

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
    utc_from_unix,
)
from service.registry.rollout_store import RolloutEventRecord, RolloutRecord
from service.rollout.controller import (
    GroupProgress,
    RolloutController,
    RolloutState,
    RolloutSummary,
)

TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
CONTROL_GROUP = "control"
"""The name under which a rollout view lists its control group (never a real group's name)."""


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
    drift_state: str = Field(
        description="ok, unknown, calibrating (layer A is still learning the device's normal "
        "variation: its reference, or the null of its signals), or the drifting signals, "
        "comma-separated."
    )
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
            "drifting": drift_state not in ("ok", "unknown", "calibrating"),
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


class DeclaredNormalOut(BaseModel):
    """What an operator declared normal for a fleet (settings ``fleet_normal``), in seconds."""

    period_s: float | None = Field(description="A cycle present in normal operation.")
    session_s: float | None = Field(description="The longest normal session or dwell.")


class CalibrationOut(BaseModel):
    """What layer A learnt of a device's normal variation (live, from the running service)."""

    state: str = Field(
        description="reference (learning its fixed reference), calibrating (learning the null "
        "of its signals: how much they vary and how long that variation lasts; not alarmed on "
        "yet) or monitoring."
    )
    readings: int = Field(description="Readings of the current model version.")
    streams_ready: int = Field(description="Signal streams whose null is learnt (monitored).")
    streams: int
    block_readings_max: int = Field(
        description="Readings per monitored value of the slowest signal: how long its readings "
        "stay dependent (one frame for independent readings)."
    )
    block_readings_median: float
    kappa_max: float = Field(description="Largest residual variance inflation absorbed (≥ 1).")
    labels: int = Field(description="Labels of the current model version.")
    error_ready: bool = Field(description="Whether the labelled error stream is monitored.")
    error_block_labels: int
    frame_interval_s: float | None = Field(
        None,
        description="The device's interval between frames, measured from their timestamps "
        "(null until known).",
    )
    block_seconds_max: float | None = Field(
        None, description="block_readings_max in seconds (null while the interval is unknown)."
    )
    block_seconds_median: float | None = None
    declared: DeclaredNormalOut | None = Field(
        None, description="The fleet's declared normal (null: nothing declared)."
    )
    declared_block_frames: int = Field(
        0,
        description="The smallest block, in frames, the declaration allows a signal stream: "
        "one period, two sessions (0: nothing declared, or the interval is not known yet).",
    )
    declared_too_long: bool = Field(
        False,
        description="The declaration needs longer blocks than layer A can learn at this "
        "device's frame interval: its signals cannot be monitored (see reason).",
    )
    reason: str | None = Field(
        None, description="Why the declaration holds the signals back, in words."
    )


class FleetCalibrationOut(BaseModel):
    """A fleet's declared normal and what layer A learnt of its devices (live)."""

    fleet: str
    declared: DeclaredNormalOut | None = Field(
        description="What the operator declared normal (null: nothing; learnt from data alone)."
    )
    devices: int = Field(description="Devices with a layer-A monitor.")
    states: dict[str, int] = Field(
        description="Devices per calibration state: reference, calibrating, monitoring."
    )
    declared_too_long: int = Field(
        description="Devices whose signals cannot be monitored: the declaration needs longer "
        "blocks than layer A can learn at their frame interval."
    )
    streams_ready: int = Field(description="Signal streams monitored, all devices.")
    streams: int
    frame_interval_s_median: float | None = Field(
        description="Median over devices of their measured interval between frames."
    )
    declared_block_frames_max: int = Field(
        description="The largest block floor, in frames, the declaration sets on a device."
    )
    block_readings_median: float | None = Field(
        description="Median over devices (with a monitored signal) of their median block, "
        "in readings."
    )
    block_readings_max: int
    block_seconds_median: float | None = Field(description="The same in seconds.")
    block_seconds_max: float | None
    kappa_max: float = Field(description="Largest residual variance inflation absorbed (≥ 1).")
    error_ready: int = Field(description="Devices whose labelled error stream is monitored.")


class DeviceDetail(DeviceOut):
    """A device with its sequence position, capabilities and most recent drift events."""

    boot: int | None
    last_seq: int | None
    caps: dict[str, Any] | None
    n_features: int | None
    n_classes: int | None
    recent_drift_events: list[DriftEventOut]
    calibration: CalibrationOut | None = Field(
        None, description="Layer A's calibration, when the API runs inside the service."
    )

    @classmethod
    def detail(
        cls,
        rec: DeviceRecord,
        events: list[DriftEventRecord],
        calibration: Mapping[str, Any] | None = None,
    ) -> DeviceDetail:
        """From a device record, its recent events and its live calibration."""
        return cls(
            calibration=None if calibration is None else CalibrationOut(**calibration),
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


# -------------------------------------------------------------------------------------------
# rollouts and candidates


def _utc_ms(ms: int | None) -> datetime | None:
    return utc_from_unix(ms / 1000) if ms is not None else None


class RolloutSummaryOut(BaseModel):
    """Device counts of a rollout (forward devices, except ``rolled_back``)."""

    confirmed: int = Field(description="Devices that acked CONFIRMED: the only ones updated.")
    in_trial: int
    failed: int = Field(description="Rejected, reverted, failed or timed out.")
    pending: int = Field(description="Manifest issued, downloading or verifying.")
    rolled_back: int = Field(description="Devices sent back to the previous parameters.")
    untouched_control: int = Field(description="Control devices the rollout never touched.")

    @classmethod
    def of(cls, summary: RolloutSummary) -> RolloutSummaryOut:
        """From the controller's summary."""
        return cls(
            confirmed=summary.confirmed,
            in_trial=summary.in_trial,
            failed=summary.failed,
            pending=summary.pending,
            rolled_back=summary.rolled_back,
            untouched_control=summary.untouched_control,
        )


class RolloutGroupOut(BaseModel):
    """One group of a rollout (canary or wave) with its last gate figures."""

    name: str
    status: str = Field(description="SCHEDULED, RUNNING, SOAKING, PASSED or FAILED.")
    devices: int = Field(description="Devices in the group.")
    started: datetime | None = None
    soak_started: datetime | None = None
    deadline: datetime | None = Field(
        None, description="Soak deadline: still inconclusive then, the rollout pauses."
    )
    figures: dict[str, Any] | None = Field(
        None,
        description="The last gate evaluation: delivery, health and quality figures, each "
        "gate's verdict, the overall verdict and its reason.",
    )

    @classmethod
    def of(cls, group: GroupProgress) -> RolloutGroupOut:
        """From the stored controller state."""
        return cls(
            name=group.name,
            status=group.status.value,
            devices=len(group.devices),
            started=_utc_ms(group.started_ms),
            soak_started=_utc_ms(group.soak_started_ms),
            deadline=_utc_ms(group.deadline_ms),
            figures=_plain(group.figures),
        )


class RolloutOut(BaseModel):
    """A rollout as the registry stores it, with its device counts."""

    id: str
    fleet: str
    kind: str = Field(description="recalibration, retrain, parameter_set, ...")
    state: str = Field(
        description="READY, AWAITING_APPROVAL, RUNNING, PAUSED, FINISHED, STOPPED or ROLLED_BACK."
    )
    schema_id: str
    from_version: int = Field(description="The parameter version devices ran (rollback target).")
    to_version: int = Field(description="The parameter version rolled out.")
    created: datetime
    updated: datetime
    summary: RolloutSummaryOut | None = Field(
        description="Device counts (null if the stored state is unreadable)."
    )

    @classmethod
    def fields_of(cls, rec: RolloutRecord, summary: RolloutSummary | None) -> dict[str, Any]:
        """The record's fields, with the summary of its parsed state."""
        return {
            "id": rec.id,
            "fleet": rec.fleet,
            "kind": rec.kind,
            "state": rec.state,
            "schema_id": rec.schema_id,
            "from_version": rec.from_version,
            "to_version": rec.to_version,
            "created": rec.created,
            "updated": rec.updated,
            "summary": RolloutSummaryOut.of(summary) if summary is not None else None,
        }

    @classmethod
    def of(cls, rec: RolloutRecord, summary: RolloutSummary | None) -> RolloutOut:
        """From a rollout record and its summary."""
        return cls(**cls.fields_of(rec, summary))


class RolloutList(BaseModel):
    """Rollouts, newest first."""

    items: list[RolloutOut]


class RolloutEventOut(BaseModel):
    """One stored transition of a rollout or of one of its groups, with its gate figures."""

    id: int
    ts: datetime
    scope: str = Field(description="rollout or group.")
    name: str = Field(description="rollout, or the group's name.")
    from_state: str
    to_state: str
    actor: str
    reason: str
    figures: dict[str, Any] | None

    @classmethod
    def of(cls, rec: RolloutEventRecord) -> RolloutEventOut:
        """From a rollout-event record."""
        return cls(
            id=rec.id,
            ts=rec.ts,
            scope=rec.scope,
            name=rec.name,
            from_state=rec.from_state,
            to_state=rec.to_state,
            actor=rec.actor,
            reason=rec.reason,
            figures=_plain(rec.figures),
        )


class RolloutDetail(RolloutOut):
    """A rollout with its groups, control group and transitions."""

    reason: str = Field(description="Why it is paused, stopped or rolled back.")
    require_approval: bool | None
    current_group: str | None = Field(description="The group in progress (null when done).")
    groups: list[RolloutGroupOut]
    control: int | None = Field(description="Devices held back on the old parameters.")
    transitions: list[RolloutEventOut] = Field(description="Oldest first.")

    @classmethod
    def detail(
        cls, rec: RolloutRecord, state: RolloutState | None, events: list[RolloutEventRecord]
    ) -> RolloutDetail:
        """From the record, its parsed state (``None``: unreadable) and its transitions."""
        summary = RolloutController(state).summary() if state is not None else None
        current = None
        if state is not None and state.current < len(state.groups):
            current = state.groups[state.current].name
        return cls(
            **RolloutOut.fields_of(rec, summary),
            reason=state.reason if state is not None else "",
            require_approval=state.plan.require_approval if state is not None else None,
            current_group=current,
            groups=[RolloutGroupOut.of(g) for g in state.groups] if state is not None else [],
            control=len(state.control) if state is not None else None,
            transitions=[RolloutEventOut.of(e) for e in events],
        )


class RolloutViewOut(BaseModel):
    """A rollout's live state after an action (from the service's reconciler)."""

    id: str
    fleet: str
    kind: str
    state: str
    reason: str
    summary: RolloutSummaryOut
    groups: list[RolloutGroupOut]
    control: int = Field(description="Devices held back on the old parameters.")

    @classmethod
    def of(cls, view: Any) -> RolloutViewOut:
        """From a :class:`~service.rollout.reconciler.RolloutView` (its groups are dicts; the
        control group is listed among them as ``control``)."""
        groups = []
        control = 0
        for g in view.groups:
            if g["name"] == CONTROL_GROUP:
                control = int(g["devices"])
                continue
            groups.append(
                RolloutGroupOut(
                    name=g["name"],
                    status=g["status"],
                    devices=int(g["devices"]),
                    figures=_plain(g.get("figures")),
                )
            )
        return cls(
            id=view.rollout_id,
            fleet=view.fleet,
            kind=view.kind,
            state=str(view.status),
            reason=view.reason,
            summary=RolloutSummaryOut.of(view.summary),
            groups=groups,
            control=control,
        )


class RolloutActionReason(BaseModel):
    """Why an operator pauses or rolls back (recorded with the transition and in the audit)."""

    model_config = {"extra": "forbid"}

    reason: str | None = Field(None, min_length=1, max_length=500)


ProposalKindIn = Literal["recalibration", "retrain", "parameter_set"]
DeviceId = Annotated[str, Field(min_length=1, max_length=64)]


class CandidateProposal(BaseModel):
    """What to propose for a fleet.

    ``recalibration``: a parameter set per drifting device (all of them, or ``devices``);
    ``retrain``: one shared set learned on the fleet's labels; ``parameter_set``: roll out the
    registered ``version``.
    """

    model_config = {"extra": "forbid"}

    fleet: str = Field(min_length=1, max_length=64)
    kind: ProposalKindIn
    devices: list[DeviceId] | None = Field(
        None,
        min_length=1,
        max_length=10_000,
        description="recalibration only: these devices instead of every drifting one.",
    )
    version: int | None = Field(
        None, ge=0, le=2**32 - 1, description="parameter_set only (required): the version."
    )
    auto_approve: bool = Field(
        False, description="Start the rollout at once instead of waiting for approval."
    )


class ProposalOut(BaseModel):
    """What a proposal produced: the rollout (null if no candidate was accepted) and each
    candidate's decision."""

    kind: str
    fleet: str
    rollout: RolloutViewOut | None
    accepted: dict[str, int] = Field(
        description="Device (or * for a shared set) → parameter version accepted."
    )
    refused: dict[str, str] = Field(description="Device (or *) → why no candidate was accepted.")
    seconds: float

    @classmethod
    def of(cls, proposal: Any) -> ProposalOut:
        """From a :class:`~service.rollout.proposals.Proposal`."""
        return cls(
            kind=proposal.kind,
            fleet=proposal.fleet,
            rollout=RolloutViewOut.of(proposal.rollout) if proposal.rollout is not None else None,
            accepted=dict(proposal.accepted),
            refused=dict(proposal.refused),
            seconds=float(proposal.seconds),
        )
