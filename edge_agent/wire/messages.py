"""Pydantic models of every JSON message and of a decoded telemetry batch (README §2, §4, §5).

All models are frozen and refuse unknown keys. Integers are non-negative and bounded by the
width of the matching binary field (``u32`` counters and versions, ``u64`` millisecond times).

The ``create``, ``from_obj`` and ``from_json`` classmethods raise only
:class:`~edge_agent.wire.errors.WireError`; the plain pydantic constructors (``Model(...)``,
``model_validate``) still raise pydantic's ``ValidationError`` and are not meant for untrusted
input.

>>> ack = UpdateAck.from_json(b'{"v":1,"deploy_seq":13,"state":"TRIAL","code":202,'
...                           b'"reason":"trial","ts_ms":1764028800000,"progress":[12,12]}')
>>> ack.progress
(12, 12)
>>> UpdateAck.from_json(b'{"v":2}').reason
Traceback (most recent call last):
...
edge_agent.wire.errors.WireError: bad_version: v must be 1, got 2
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal, Self, cast

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from edge_agent.wire._json import DEFAULT_MAX_BYTES, Payload, dumps, loads_object, wire_error_from
from edge_agent.wire.errors import WireError

__all__ = [
    "ACK_CODE_REASONS",
    "MANIFEST_VERSION",
    "MAX_FEATURES",
    "MAX_READINGS",
    "STATE_CODE",
    "U32_MAX",
    "U64_MAX",
    "WIRE_VERSION",
    "AckCode",
    "AckReason",
    "AckState",
    "Capabilities",
    "ChunkRequest",
    "LabelBatch",
    "Manifest",
    "ManifestParam",
    "ManifestSignature",
    "Status",
    "TelemetryBatch",
    "TransferSpec",
    "TrialSpec",
    "UpdateAck",
    "UpdateState",
]

WIRE_VERSION: Final = 1
"""The ``v`` of every JSON message but the manifest, and the binary telemetry frame version."""
MANIFEST_VERSION: Final = 2
"""The ``v`` of a desired-state manifest: 2 since it names its ``fleet`` and ``device`` (a
version-1 manifest, bound to no device, is refused as ``bad_version``)."""
U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1
MAX_READINGS: Final = 4096
"""Most readings (``k``) in one telemetry or label batch."""
MAX_FEATURES: Final = 255
"""Most features (``F``) per reading (a ``u8`` in the binary frame)."""

U32 = Annotated[StrictInt, Field(ge=0, le=U32_MAX)]
U64 = Annotated[StrictInt, Field(ge=0, le=U64_MAX)]
Hex16 = Annotated[StrictStr, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Hex64 = Annotated[StrictStr, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Id = Annotated[StrictStr, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
"""A fleet or device id (README §1)."""
ChunkSize = Annotated[StrictInt, Field(ge=64, le=65535)]

AckState = Literal[
    "DOWNLOADING", "VERIFYING", "TRIAL", "CONFIRMED", "REVERTED", "REJECTED", "FAILED"
]
"""The ``state`` of an update ack (README §2.5)."""
UpdateState = Literal[
    "IDLE", "DOWNLOADING", "VERIFYING", "TRIAL", "CONFIRMED", "REVERTED", "REJECTED", "FAILED"
]
"""The device's update state machine state as reported in its birth message (README §7)."""
AckCode = Literal[200, 202, 400, 409, 500]
AckReason = Literal[
    "downloading",
    "verifying",
    "trial",
    "confirmed",
    "bad_signature",
    "unknown_key",
    "hash_mismatch",
    "schema_mismatch",
    "epoch_below_floor",
    "stale_version",
    "stale_seq",
    "too_large",
    "unsupported_format",
    "truncated",
    "bad_manifest",
    "wrong_device",
    "kat_mismatch",
    "trial_timeout",
    "server_revert",
    "fault_reset",
    "transfer_timeout",
    "chunk_error",
    "internal",
]
"""Every ack ``reason`` of the README §2.5 table."""

STATE_CODE: Final[Mapping[str, int]] = {
    "DOWNLOADING": 202,
    "VERIFYING": 202,
    "TRIAL": 202,
    "CONFIRMED": 200,
    "REJECTED": 400,
    "REVERTED": 409,
    "FAILED": 500,
}
"""The ack ``code`` each ack ``state`` carries."""

ACK_CODE_REASONS: Final[Mapping[int, frozenset[str]]] = {
    202: frozenset({"downloading", "verifying", "trial"}),
    200: frozenset({"confirmed"}),
    400: frozenset(
        {
            "bad_signature",
            "unknown_key",
            "hash_mismatch",
            "schema_mismatch",
            "epoch_below_floor",
            "stale_version",
            "stale_seq",
            "too_large",
            "unsupported_format",
            "truncated",
            "bad_manifest",
            "wrong_device",
        }
    ),
    409: frozenset({"kat_mismatch", "trial_timeout", "server_revert", "fault_reset"}),
    500: frozenset({"transfer_timeout", "chunk_error", "internal"}),
}
"""The ack ``reason`` values allowed with each ``code`` (README §2.5)."""

_WIRE_CONTEXT: Final = {"wire": True}


def _check_version(data: Any, info: ValidationInfo, expected: int = WIRE_VERSION) -> None:
    """``v`` must be the integer ``expected``; on the wire it must also be present."""
    if not isinstance(data, Mapping):
        return  # pydantic reports the wrong top-level type itself
    if "v" not in data:
        if info.context is not None and info.context.get("wire"):
            raise WireError("schema", "missing field 'v'")
        return
    v = data["v"]
    if type(v) is not int:
        raise WireError("schema", f"v must be an integer, got {type(v).__name__}")
    if v != expected:
        raise WireError("bad_version", f"v must be {expected}, got {v}")


class _Model(BaseModel):
    """Base of all wire models: frozen, no unknown keys, WireError-raising constructors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def create(cls, **fields: Any) -> Self:
        """Build and validate from keyword arguments; raises only ``WireError``."""
        return cls.from_obj(fields, wire=False)

    @classmethod
    def from_obj(cls, obj: Any, *, wire: bool = True) -> Self:
        """Validate an already-parsed JSON object; raises only ``WireError``.

        With ``wire`` (the default) the object is treated as a received payload: ``v`` must be
        present.
        """
        try:
            return cls.model_validate(obj, context=_WIRE_CONTEXT if wire else None)
        except ValidationError as exc:
            raise wire_error_from(exc) from None

    @classmethod
    def from_json(cls, data: Payload, max_bytes: int = DEFAULT_MAX_BYTES) -> Self:
        """Parse a JSON payload; raises ``WireError`` (``oversized``, ``decode``, ``schema``, …)."""
        return cls.from_obj(loads_object(data, max_bytes))

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON; fields that are ``None`` are left out."""
        return self.model_dump_json(exclude_none=True).encode("utf-8")


class _Message(_Model):
    """A top-level message: carries the protocol version ``v``."""

    v: Literal[1] = WIRE_VERSION

    @model_validator(mode="before")
    @classmethod
    def _version_first(cls, data: Any, info: ValidationInfo) -> Any:
        _check_version(data, info)
        return data


# --------------------------------------------------------------------------------------------
# Telemetry and label batches


def _bad_type(t: type, allowed: tuple[type, ...]) -> bool:
    return not issubclass(t, allowed) or issubclass(t, bool | np.bool_)


_REAL = (int, float, np.integer, np.floating)
_INT = (int, np.integer)


def _numeric_array(x: np.ndarray[Any, Any], name: str, ndim: int, kinds: str) -> None:
    if x.ndim != ndim or x.dtype.kind not in kinds:
        raise WireError(
            "schema", f"{name} must be a {ndim}-d numeric array, got {x.dtype}{list(x.shape)}"
        )


def _check_1d(x: Any, name: str, allowed: tuple[type, ...], kinds: str) -> Any:
    """Structure and element types of a 1-d field (``schema`` on failure)."""
    if isinstance(x, np.ndarray):
        _numeric_array(x, name, 1, kinds)
        return x
    if not isinstance(x, list | tuple):
        raise WireError("schema", f"{name} must be an array, got {type(x).__name__}")
    if any(_bad_type(t, allowed) for t in set(map(type, x))):
        kind = "numbers" if float in allowed else "integers"
        raise WireError("schema", f"{name} must hold only {kind}")
    return x


def _check_2d(x: Any, name: str) -> Any:
    """Structure and element types of a k × F field (``schema`` on failure, ragged allowed)."""
    if isinstance(x, np.ndarray):
        _numeric_array(x, name, 2, "iuf")
        return x
    if not isinstance(x, list | tuple) or not all(isinstance(r, list | tuple) for r in x):
        raise WireError("schema", f"{name} must be an array of arrays")
    if any(_bad_type(t, _REAL) for t in set(map(type, itertools.chain.from_iterable(x)))):
        raise WireError("schema", f"{name} must hold only numbers")
    return x


def _n_features(x: Any, name: str) -> int:
    """The common row length of a k × F field (``wrong_feature_count`` if ragged or 0/too many)."""
    widths = {x.shape[1]} if isinstance(x, np.ndarray) else {len(r) for r in x}
    if len(widths) != 1:
        raise WireError("wrong_feature_count", f"{name} rows have different lengths")
    (f,) = widths
    if not 1 <= f <= MAX_FEATURES:
        raise WireError("wrong_feature_count", f"{f} features per reading, need 1–{MAX_FEATURES}")
    return f


def _finite_float64(x: Any, name: str) -> NDArray[np.float64]:
    """A read-only float64 copy; ``non_finite`` for NaN, ±inf or ints beyond float range."""
    try:
        arr = np.array(x, dtype=np.float64)
    except OverflowError:
        raise WireError("non_finite", f"{name} holds a number beyond float64 range") from None
    if not np.isfinite(arr).all():
        raise WireError("non_finite", f"{name} holds NaN or infinity")
    arr.flags.writeable = False
    return arr


def _class_indices(x: Any, name: str) -> NDArray[np.int64]:
    """A read-only int64 copy; ``bad_class`` for negative or out-of-range indices."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "u" and x.size and x.max() > 2**63 - 1:
        raise WireError("bad_class", f"{name} holds an index beyond int64")
    try:
        arr = np.array(x, dtype=np.int64)
    except OverflowError:
        raise WireError("bad_class", f"{name} holds an index beyond int64") from None
    if arr.size and arr.min() < 0:
        raise WireError("bad_class", f"{name} holds a negative class index")
    arr.flags.writeable = False
    return arr


def _uint(data: Mapping[str, Any], name: str, maximum: int) -> int:
    x = data[name]
    if not isinstance(x, _INT) or isinstance(x, bool | np.bool_):
        raise WireError("schema", f"{name} must be an integer, got {type(x).__name__}")
    if not 0 <= int(x) <= maximum:
        raise WireError("schema", f"{name}={int(x)} outside 0–{maximum}")
    return int(x)


_HEADER: Final = {"seq": U32_MAX, "boot": U32_MAX, "ts_ms": U64_MAX, "param_version": U32_MAX}


def _validate_batch(data: Any, info: ValidationInfo, third: str) -> dict[str, Any]:
    """Validate a batch in the documented order of reasons (README §2.2).

    ``bad_version``, then ``schema`` (keys, header integers, structure, element types, lengths),
    ``wrong_feature_count``, ``non_finite``, ``bad_confidence``, ``bad_class``.
    """
    if not isinstance(data, Mapping):
        raise WireError("schema", f"batch must be an object, not {type(data).__name__}")
    _check_version(data, info)
    keys = {"v", *_HEADER, "features", "pred", third}
    if missing := keys - set(data) - {"v"}:
        raise WireError("schema", f"missing fields {sorted(missing)}")
    if extra := set(data) - keys:
        raise WireError("schema", f"unknown fields {sorted(map(str, extra))[:8]}")
    out: dict[str, Any] = {"v": WIRE_VERSION}
    out.update((name, _uint(data, name, maximum)) for name, maximum in _HEADER.items())

    features = _check_2d(data["features"], "features")
    pred = _check_1d(data["pred"], "pred", _INT, "iu")
    is_conf = third == "conf"
    extra_col = (
        _check_1d(data[third], third, _REAL, "iuf")
        if is_conf
        else _check_1d(data[third], third, _INT, "iu")
    )
    k = len(features)
    if not 1 <= k <= MAX_READINGS:
        raise WireError("schema", f"{k} readings, need 1–{MAX_READINGS}")
    for name, col in (("pred", pred), (third, extra_col)):
        if len(col) != k:
            raise WireError("schema", f"{name} has {len(col)} entries for {k} readings")

    _n_features(features, "features")

    out["features"] = _finite_float64(features, "features")
    if is_conf:
        conf = _finite_float64(extra_col, "conf")
        if not ((conf >= 0.0) & (conf <= 1.0)).all():
            raise WireError("bad_confidence", "conf outside [0, 1]")
        out["conf"] = conf
    out["pred"] = _class_indices(pred, "pred")
    if not is_conf:
        out[third] = _class_indices(extra_col, third)
    return out


def _array_eq(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


class _Batch(_Model):
    """Header and arrays shared by telemetry and label batches."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    _third: ClassVar[str]

    v: Literal[1] = WIRE_VERSION
    seq: U32
    """Per-device batch counter, +1 per batch, restarts at 0 on boot."""
    boot: U32
    """Boot counter; ``(boot, seq)`` orders batches across reboots."""
    ts_ms: U64
    """Unix time of the first reading, milliseconds."""
    param_version: U32
    """The parameter set the predictions came from."""
    features: NDArray[np.float64]
    """``float64[k, F]``, finite, read-only."""
    pred: NDArray[np.int64]
    """``int64[k]`` predicted class indices, ≥ 0, read-only."""

    @model_validator(mode="before")
    @classmethod
    def _validate(cls, data: Any, info: ValidationInfo) -> Any:
        return _validate_batch(data, info, cls._third)

    @field_serializer("features", "pred")
    def _ser_array(self, x: NDArray[Any]) -> list[Any]:
        return x.tolist()  # type: ignore[no-any-return]

    @classmethod
    def _trusted(cls, **fields: Any) -> Self:
        """Build without validation from values a decoder has already proven valid."""
        for x in fields.values():
            if isinstance(x, np.ndarray):
                x.flags.writeable = False
        # the pydantic mypy plugin types model_construct as returning the declaring class
        return cast(Self, cls.model_construct(**fields))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _array_eq(getattr(self, name), getattr(other, name)) for name in type(self).model_fields
        )

    @property
    def k(self) -> int:
        """Number of readings in the batch."""
        return int(self.features.shape[0])

    @property
    def n_features(self) -> int:
        """Features per reading, ``F``."""
        return int(self.features.shape[1])

    def _check_classes(self, name: str, x: NDArray[np.int64], n_classes: int) -> None:
        if x.size and int(x.max()) >= n_classes:
            raise WireError("bad_class", f"{name} {int(x.max())} ≥ {n_classes} classes")

    def check_shape(self, n_features: int, n_classes: int) -> None:
        """Check the batch against the device schema (README §2.2).

        Raises ``WireError("wrong_feature_count")`` if ``F != n_features`` and
        ``WireError("bad_class")`` if a class index is ``≥ n_classes``.
        """
        if self.n_features != n_features:
            raise WireError(
                "wrong_feature_count", f"{self.n_features} features, schema has {n_features}"
            )
        self._check_classes("pred", self.pred, n_classes)

    def _header_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "seq": self.seq,
            "boot": self.boot,
            "ts_ms": self.ts_ms,
            "param_version": self.param_version,
            "features": self.features.tolist(),
            "pred": self.pred.tolist(),
        }


class TelemetryBatch(_Batch):
    """``k`` readings of one device: features, predicted class and confidence (README §2.2).

    >>> b = TelemetryBatch.create(seq=7, boot=2, ts_ms=1764028800000, param_version=3,
    ...                           features=[[0.5, -1.0]], pred=[2], conf=[0.75])
    >>> b.k, b.n_features, b.features.dtype.name
    (1, 2, 'float64')
    >>> b.to_json()
    b'{"v":1,"seq":7,"boot":2,"ts_ms":1764028800000,"param_version":3,"features":[[0.5,-1.0]],"pred":[2],"conf":[0.75]}'
    >>> TelemetryBatch.from_json(b.to_json()) == b
    True
    >>> b.check_shape(n_features=2, n_classes=2)
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: bad_class: pred 2 ≥ 2 classes
    """

    _third: ClassVar[str] = "conf"

    conf: NDArray[np.float64]
    """``float64[k]`` confidence of the prediction, in ``[0, 1]``, read-only."""

    @field_serializer("conf")
    def _ser_conf(self, x: NDArray[Any]) -> list[Any]:
        return x.tolist()  # type: ignore[no-any-return]

    def to_json(self) -> bytes:
        """The JSON telemetry payload of README §2.2 (compact)."""
        d = self._header_dict()
        d["conf"] = self.conf.tolist()
        return dumps(d)


class LabelBatch(_Batch):
    """``k`` labelled readings: features, the device's prediction and the true label (§2.3).

    >>> b = LabelBatch.create(seq=3, boot=2, ts_ms=0, param_version=3,
    ...                       features=[[1, 2], [3, 4]], pred=[1, 0], label=[1, 1])
    >>> b.label.tolist()
    [1, 1]
    >>> LabelBatch.from_json(b.to_json()) == b
    True
    """

    _third: ClassVar[str] = "label"

    label: NDArray[np.int64]
    """``int64[k]`` true class indices, ≥ 0, read-only."""

    @field_serializer("label")
    def _ser_label(self, x: NDArray[Any]) -> list[Any]:
        return x.tolist()  # type: ignore[no-any-return]

    def check_shape(self, n_features: int, n_classes: int) -> None:
        """Like :meth:`TelemetryBatch.check_shape`, also checking ``label``."""
        super().check_shape(n_features, n_classes)
        self._check_classes("label", self.label, n_classes)

    def to_json(self) -> bytes:
        """The JSON label payload of README §2.3 (compact)."""
        d = self._header_dict()
        d["label"] = self.label.tolist()
        return dumps(d)


# --------------------------------------------------------------------------------------------
# Status (birth and Will)


class Capabilities(_Model):
    """What a device supports, announced in its birth message."""

    max_chunk: ChunkSize
    """Largest blob chunk the device accepts, bytes."""
    telemetry: tuple[Literal["bin", "json"], ...] = Field(min_length=1)
    """Telemetry encodings the device can send."""
    labels: StrictBool
    """Whether the device publishes label batches."""


_BIRTH_REQUIRED: Final = (
    "schema_id",
    "active_version",
    "update_state",
    "last_deploy_seq",
    "epoch_floor",
    "boot",
    "ts_ms",
    "caps",
)


class Status(_Message):
    """Birth (``online: true``) or Will (``online: false``) on the retained ``status`` leaf (§2.4).

    A birth must carry every field except ``fw`` and ``previous_version``; a Will carries only
    ``v`` and ``online``.

    >>> Status.will().to_json()
    b'{"v":1,"online":false}'
    >>> Status.from_json(b'{"v":1,"online":false,"boot":3}')
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: schema: a Will carries only v and online, got ['boot']
    """

    online: StrictBool
    fw: StrictStr | None = None
    schema_id: Hex16 | None = None
    active_version: U32 | None = None
    previous_version: U32 | None = None
    update_state: UpdateState | None = None
    last_deploy_seq: U32 | None = None
    epoch_floor: U32 | None = None
    boot: U32 | None = None
    ts_ms: U64 | None = None
    caps: Capabilities | None = None

    @model_validator(mode="after")
    def _birth_or_will(self) -> Self:
        if self.online:
            if missing := [name for name in _BIRTH_REQUIRED if getattr(self, name) is None]:
                raise WireError("schema", f"a birth status needs {missing}")
        else:
            present = [name for name in type(self).model_fields if name not in ("v", "online")]
            if present := [name for name in present if getattr(self, name) is not None]:
                raise WireError("schema", f"a Will carries only v and online, got {present}")
        return self

    @classmethod
    def will(cls) -> Self:
        """The MQTT Will / clean-disconnect payload ``{"v": 1, "online": false}``."""
        return cls(online=False)


# --------------------------------------------------------------------------------------------
# Update acks


class UpdateAck(_Message):
    """Update progress or result on the ``ack`` leaf, echoing the manifest's ``deploy_seq`` (§2.5).

    ``code`` must match ``state`` and ``reason`` must be one the table allows for ``code``.

    >>> UpdateAck.create(deploy_seq=1, state="CONFIRMED", code=202, reason="trial", ts_ms=0)
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: schema: state CONFIRMED needs code 200, got 202
    """

    deploy_seq: U32
    state: AckState
    code: AckCode
    reason: AckReason
    param_version: U32 | None = None
    detail: StrictStr = ""
    ts_ms: U64
    progress: tuple[U32, U32] | None = None
    """``(chunks received, chunks total)`` while downloading."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if STATE_CODE[self.state] != self.code:
            raise WireError(
                "schema", f"state {self.state} needs code {STATE_CODE[self.state]}, got {self.code}"
            )
        if self.reason not in ACK_CODE_REASONS[self.code]:
            raise WireError("schema", f"reason {self.reason!r} is not allowed with {self.code}")
        if self.progress is not None and self.progress[0] > self.progress[1]:
            raise WireError("schema", f"progress {self.progress} has more done than total")
        return self


# --------------------------------------------------------------------------------------------
# Desired-state manifest


class ManifestParam(_Model):
    """The parameter blob a manifest points at."""

    version: U32
    schema_id: Hex16
    security_epoch: U32
    blob_len: U32
    blob_sha256: Hex64
    key_id: U32
    """Release key that signed the blob."""


class TransferSpec(_Model):
    """How the device should fetch the blob."""

    chunk: ChunkSize = 512
    """Chunk size in bytes, 64–65535."""


class TrialSpec(_Model):
    """How a trial of new parameters is confirmed."""

    confirm: Literal["server", "local"]
    timeout_s: Annotated[StrictInt, Field(ge=1, le=U32_MAX)]
    min_inferences: U32


class ManifestSignature(_Model):
    """Deploy-key signature of :meth:`Manifest.signing_bytes`."""

    key_id: U32
    value: StrictStr
    """Standard base64 (with padding) of the Ed25519 signature."""

    @field_validator("value")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("value is not standard base64") from None
        return value


class Manifest(_Model):
    """Signed desired-state manifest on the retained ``desired`` leaf (README §4).

    ``v`` is 2 (:data:`MANIFEST_VERSION`): the manifest names the ``fleet`` and ``device`` it is
    for, inside the signed bytes, so a captured manifest cannot be replayed to another device.

    >>> m = Manifest.create(
    ...     fleet="f1", device="dev-0000", deploy_seq=13, action="install",
    ...     param=dict(version=4, schema_id="a1b2c3d4e5f60718", security_epoch=1, blob_len=1480,
    ...                blob_sha256="ab" * 32, key_id=1),
    ...     trial=dict(confirm="server", timeout_s=600, min_inferences=200),
    ...     issued_ms=1764028800000, sig=dict(key_id=2, value="AAAA"))
    >>> m.signing_bytes()[:69]
    b'{"action":"install","deploy_seq":13,"device":"dev-0000","fleet":"f1",'
    >>> b'sig' in m.signing_bytes(), b'"rollback":false' in m.signing_bytes()
    (False, True)
    >>> Manifest.from_json(m.to_json().replace(b'"v":2', b'"v":1')).deploy_seq
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: bad_version: v must be 2, got 1
    """

    v: Literal[2] = MANIFEST_VERSION
    fleet: Id
    """The fleet of the one device this manifest is for."""
    device: Id
    """The device (its MQTT client id) this manifest is for."""
    deploy_seq: U32
    action: Literal["install", "confirm", "revert", "none"]
    rollback: StrictBool = False
    param: ManifestParam
    transfer: TransferSpec = TransferSpec()
    trial: TrialSpec
    issued_ms: U64
    sig: ManifestSignature | None = None

    @model_validator(mode="before")
    @classmethod
    def _version_first(cls, data: Any, info: ValidationInfo) -> Any:
        _check_version(data, info, MANIFEST_VERSION)
        return data

    def signing_bytes(self) -> bytes:
        """The bytes the deploy key signs: canonical JSON of the manifest without ``sig``.

        Every field is present (defaults filled in), keys are sorted, separators are ``,`` and
        ``:`` with no spaces, and the text is UTF-8.
        """
        return dumps(self.model_dump(mode="json", exclude={"sig"}), canonical=True)


# --------------------------------------------------------------------------------------------
# Chunk request


class ChunkRequest(_Message):
    """A device's request for blob chunks ``index … index+count−1`` on ``blob/get`` (README §5).

    >>> ChunkRequest.create(c=17, deploy_seq=13, sha256="00" * 32, index=5, count=2).chunk
    512
    """

    c: U32
    """Client token, echoed in every response frame."""
    deploy_seq: U32
    sha256: Hex64
    index: U32
    count: Annotated[StrictInt, Field(ge=1, le=16)]
    chunk: ChunkSize = 512

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        if self.index + self.count - 1 > U32_MAX:
            raise WireError("schema", "index + count − 1 exceeds u32")
        return self
