"""The registry's records: small frozen dataclasses the rest of the service reads and writes.

No ORM object leaves the registry; these do. Timestamps are timezone-aware UTC ``datetime``\\ s.

For a :class:`DeviceRecord` given to :meth:`Registry.upsert_devices`, a field left ``None`` means
"keep what is stored" (a Will carries only ``online``, a frame only ``boot``, ``last_seq`` and
``last_seen``), so the upsert merges rather than overwrites.

>>> rec = DeviceRecord(fleet="f", device="d1", online=True)
>>> rec.given_fields()
('online',)
>>> import numpy as np
>>> LabelRecord("f", "d1", utc_now(), 3, np.array([1.5, -2.0]), pred=1, label=0).features_blob()
b'\\x00\\x00\\xc0?\\x00\\x00\\x00\\xc0'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from service.ingest.frames import DeviceLabels

ParameterStatus = Literal["good", "bad", "candidate"]
"""Lifecycle of a parameter set: a ``candidate`` becomes ``good`` (confirmed) or ``bad``."""

PARAMETER_STATUSES: Final[frozenset[str]] = frozenset(get_args(ParameterStatus))

FEATURE_DTYPE: Final = np.dtype("<f4")
"""How label-buffer features are stored: float32, little-endian, one row per reading."""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def utc_from_unix(seconds: float) -> datetime:
    """A Unix timestamp (seconds) as a timezone-aware UTC ``datetime``."""
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device of one fleet, as last reported (birth, frames, Will) and as the engine sees it.

    ``(fleet, device)`` is the key. On upsert, ``None`` fields keep the stored value;
    ``first_seen`` is set once, when the device is first stored.
    """

    fleet: str
    device: str
    schema_id: str | None = None
    active_version: int | None = None
    previous_version: int | None = None
    update_state: str | None = None
    online: bool | None = None
    fw: str | None = None
    boot: int | None = None
    last_seq: int | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    caps: Mapping[str, Any] | None = None
    drift_state: str | None = None
    n_features: int | None = None
    n_classes: int | None = None

    def given_fields(self) -> tuple[str, ...]:
        """Names of the non-key fields that are not ``None`` (what an upsert will set)."""
        return tuple(
            f.name
            for f in fields(self)
            if f.name not in ("fleet", "device") and getattr(self, f.name) is not None
        )

    def merged_with(self, newer: DeviceRecord) -> DeviceRecord:
        """This record updated by ``newer`` (same key): ``newer``'s non-``None`` fields win."""
        if (newer.fleet, newer.device) != (self.fleet, self.device):
            raise ValueError("only records of the same device merge")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in newer.given_fields():
            if name == "first_seen" and self.first_seen is not None:
                continue
            values[name] = getattr(newer, name)
        return DeviceRecord(**values)


class DetectionLike(Protocol):
    """What :meth:`Registry.record_drift_events` reads from a detection.

    :class:`service.drift.detection.Detection` and :class:`DriftEventRecord` both fit.
    """

    @property
    def fleet(self) -> str: ...
    @property
    def device(self) -> str | None: ...
    @property
    def scope(self) -> str: ...
    @property
    def signal(self) -> str: ...
    @property
    def feature(self) -> str | None: ...
    @property
    def detector(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def model_version(self) -> int: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def readings(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DriftEventRecord:
    """A stored drift detection (a :class:`service.drift.detection.Detection` plus when and id).

    ``ts`` is the service's time of the detection; ``ts_ms`` is the device clock of the frame that
    triggered it (or the window end), as the detector reported it. ``id`` is ``None`` until stored.
    """

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
    ts: datetime = field(default_factory=utc_now)
    details: Mapping[str, Any] | None = None
    id: int | None = None

    @classmethod
    def of(
        cls,
        detection: DetectionLike,
        ts: datetime | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> DriftEventRecord:
        """The record of a detection made at ``ts`` (default now), not yet stored."""
        return cls(
            fleet=detection.fleet,
            device=detection.device,
            scope=detection.scope,
            signal=detection.signal,
            feature=detection.feature,
            detector=detection.detector,
            score=float(detection.score),
            model_version=int(detection.model_version),
            ts_ms=int(detection.ts_ms),
            readings=int(detection.readings),
            ts=ts or utc_now(),
            details=details,
        )


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """Detector state of one device or cohort: ``(fleet, device, kind)`` is the key.

    ``device`` is ``None`` for cohort-level state (stored as ``''``). ``state`` is the opaque,
    already zlib-compressed snapshot the drift layer produced, versioned by ``format_version``.
    ``last_boot`` / ``last_seq`` are the last processed reading, so a replay is not counted twice.
    ``updated`` is set by the registry when it is ``None``.
    """

    fleet: str
    device: str | None
    kind: str
    format_version: int
    state: bytes
    last_boot: int | None = None
    last_seq: int | None = None
    updated: datetime | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """The primary key as stored: ``(fleet, device or '', kind)``."""
        return (self.fleet, self.device or "", self.kind)


@dataclass(frozen=True, slots=True, eq=False)
class LabelRecord:
    """One labelled reading for the label buffer: features, the device's prediction, the label.

    ``ts`` is the service's receive time; ``param_version`` the parameters that predicted.
    """

    fleet: str
    device: str
    ts: datetime
    param_version: int
    features: npt.NDArray[np.floating[Any]]
    pred: int
    label: int

    def features_blob(self) -> bytes:
        """The features as stored: float32 little-endian bytes."""
        return np.ascontiguousarray(self.features, dtype=FEATURE_DTYPE).reshape(-1).tobytes()


def label_records(labels: DeviceLabels) -> list[LabelRecord]:
    """One :class:`LabelRecord` per reading of an ingest label batch."""
    ts = utc_from_unix(labels.recv_ts)
    return [
        LabelRecord(
            fleet=labels.fleet,
            device=labels.device,
            ts=ts,
            param_version=labels.param_version,
            features=labels.features[i],
            pred=int(labels.pred[i]),
            label=int(labels.label[i]),
        )
        for i in range(labels.k)
    ]


@dataclass(frozen=True, slots=True, eq=False)
class LabelArrays:
    """Labelled readings read back from the buffer, oldest first, as arrays of length ``n``.

    ``features`` is ``float64[n, F]``; ``ts`` Unix seconds; ``device`` the device of each row.
    """

    device: tuple[str, ...]
    ts: npt.NDArray[np.float64]
    param_version: npt.NDArray[np.int64]
    features: npt.NDArray[np.float64]
    pred: npt.NDArray[np.int64]
    label: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.device)


@dataclass(frozen=True, slots=True)
class ParameterSetRecord:
    """A complete signed parameter set (the blob) and its lifecycle status.

    ``(schema_id, version)`` is unique, and so is ``sha256`` (hex SHA-256 of ``blob``, the value a
    desired-state manifest carries as ``blob_sha256``).
    """

    schema_id: str
    version: int
    security_epoch: int
    sha256: str
    blob: bytes = field(repr=False)
    created: datetime
    source: str
    status: ParameterStatus
    metrics: Mapping[str, Any] | None = None
    notes: str = ""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit-log entry: who did what to which target, with details. Never changed."""

    id: int
    ts: datetime
    actor: str
    action: str
    target: str
    details: Mapping[str, Any] | None = None


Role = Literal["viewer", "operator", "admin"]
"""Operator API roles, each including the ones before it: viewer < operator < admin."""

ROLES: Final[tuple[Role, ...]] = get_args(Role)
"""The roles in increasing order of power."""


def role_rank(role: str) -> int:
    """A role's rank (viewer 0, operator 1, admin 2); ``ValueError`` for anything else.

    >>> role_rank("operator") > role_rank("viewer")
    True
    """
    try:
        return ROLES.index(role)
    except ValueError:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}") from None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An operator API bearer token, without its secret (only its SHA-256 is stored)."""

    name: str
    role: Role
    created: datetime
    last_used: datetime | None = None
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class ParameterSetSummary:
    """A parameter set's metadata without the blob (``size`` is the blob's length in bytes)."""

    schema_id: str
    version: int
    security_epoch: int
    sha256: str
    size: int
    created: datetime
    source: str
    status: ParameterStatus
    metrics: Mapping[str, Any] | None = None
    notes: str = ""


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """A fleet with its device counts (``drifting``: drift state neither ``ok`` nor ``unknown``)."""

    name: str
    created: datetime
    devices: int
    online: int
    drifting: int
