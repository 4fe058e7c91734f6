"""The binary telemetry frame ``"TF"`` v1 (README §2.1).

A 28-byte little-endian header, then ``k`` records of ``int16 features[F], u8 pred, u8 conf``.
Features travel as ``int16 / 2**frac_bits`` and confidence as ``u8 / 256``. Encoding and decoding
are vectorised through a numpy structured dtype.

>>> from edge_agent.wire.messages import TelemetryBatch
>>> b = TelemetryBatch.create(seq=7, boot=2, ts_ms=1764028800000, param_version=3,
...                           features=[[0.5, -1.25, 3.0]], pred=[1], conf=[0.75])
>>> frame = encode_binary(b, frac_bits=8)
>>> len(frame) == HEADER_SIZE + record_size(3)
True
>>> decode_binary(frame) == b
True
>>> decode_binary(frame[:-1])
Traceback (most recent call last):
...
edge_agent.wire.errors.WireError: truncated: frame needs 36 bytes, got 35
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edge_agent.fixedpoint.rounding import round_half_away
from edge_agent.wire._json import DEFAULT_MAX_BYTES, Payload, check_size
from edge_agent.wire.errors import WireError
from edge_agent.wire.messages import (
    MAX_FEATURES,
    MAX_READINGS,
    U32_MAX,
    U64_MAX,
    WIRE_VERSION,
    TelemetryBatch,
)

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAC_BITS",
    "BinaryHeader",
    "decode_binary",
    "decode_binary_header",
    "encode_binary",
    "encode_binary_raw",
    "quantise_conf",
    "quantise_features",
    "record_dtype",
    "record_size",
    "round_half_away",
]

MAGIC: Final = b"TF"
"""First two bytes of every binary telemetry frame."""
MAX_FRAC_BITS: Final = 15
"""Largest allowed ``frac_bits``."""

# magic, version, frac_bits, seq, boot, ts_ms, param_version, k, F, reserved
_HEADER: Final = struct.Struct("<2sBBIIQIHBB")
HEADER_SIZE: Final = _HEADER.size
"""Bytes before the first record: 28."""
assert HEADER_SIZE == 28


@lru_cache(maxsize=MAX_FEATURES + 1)
def record_dtype(n_features: int) -> np.dtype[np.void]:
    """The packed little-endian numpy dtype of one record with ``n_features`` features.

    >>> record_dtype(8).itemsize
    18
    """
    return np.dtype([("features", "<i2", (n_features,)), ("pred", "u1"), ("conf", "u1")])


def record_size(n_features: int) -> int:
    """Bytes per reading, ``2F + 2``."""
    return 2 * n_features + 2


def quantise_features(features: ArrayLike, frac_bits: int) -> NDArray[np.int16]:
    """``int16`` fixed-point features: ``round_half_away(x · 2**frac_bits)``, saturated.

    >>> quantise_features([1.0, -0.001953125, 1e9, -1e9], frac_bits=8).tolist()
    [256, -1, 32767, -32768]
    """
    _check_frac_bits(frac_bits)
    # clip first: |x| ≥ 2**16 saturates at any frac_bits, and ldexp cannot overflow
    x = np.clip(np.asarray(features, dtype=np.float64), -(2.0**16), 2.0**16)
    q = round_half_away(np.ldexp(x, frac_bits))
    return np.clip(q, -32768, 32767).astype(np.int16)


def quantise_conf(conf: ArrayLike) -> NDArray[np.uint8]:
    """``u8`` confidence: ``min(255, round_half_away(256 · conf))`` (README §3.5).

    >>> quantise_conf([0.0, 0.5, 0.998, 1.0]).tolist()
    [0, 128, 255, 255]
    """
    q = round_half_away(256.0 * np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0))
    return np.minimum(q, 255).astype(np.uint8)


def _check_frac_bits(frac_bits: int) -> None:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int | np.integer):
        raise WireError("schema", f"frac_bits must be an integer, got {type(frac_bits).__name__}")
    if not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise WireError("schema", f"frac_bits={frac_bits} outside 0–{MAX_FRAC_BITS}")


def _int_array(x: ArrayLike, name: str, ndim: int, lo: int, hi: int, reason: Any) -> NDArray[Any]:
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise WireError("schema", f"{name} must be a {ndim}-d integer array, got {a.dtype}")
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise WireError(reason, f"{name} outside {lo}–{hi}")
    return a


def encode_binary_raw(
    features_q: ArrayLike,
    pred: ArrayLike,
    conf_q: ArrayLike,
    *,
    seq: int,
    boot: int,
    ts_ms: int,
    param_version: int,
    frac_bits: int,
) -> bytes:
    """Encode already-quantised readings, as a device holds them, into one frame.

    ``features_q`` is ``int16[k, F]`` (any integer dtype with values in range), ``pred`` class
    indices 0–255, ``conf_q`` confidences in 1/256 units, 0–255. Out-of-range input raises
    ``WireError`` (``schema``, ``wrong_feature_count``, ``bad_class``, ``bad_confidence``).

    >>> frame = encode_binary_raw([[256, -512]], [1], [192], seq=0, boot=1, ts_ms=2,
    ...                           param_version=3, frac_bits=8)
    >>> frame[:HEADER_SIZE].hex(" ", -4)  # "TF", v1, frac 8, seq, boot, ts_ms, pv, k=1, F=2, 0
    '54460108 00000000 01000000 02000000 00000000 03000000 01000200'
    >>> frame[HEADER_SIZE:].hex(" ")  # 1.0, -2.0, pred 1, conf 0.75
    '00 01 00 fe 01 c0'
    """
    _check_frac_bits(frac_bits)
    for name, value, maximum in (
        ("seq", seq, U32_MAX),
        ("boot", boot, U32_MAX),
        ("ts_ms", ts_ms, U64_MAX),
        ("param_version", param_version, U32_MAX),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise WireError("schema", f"{name} must be an integer")
        if not 0 <= value <= maximum:
            raise WireError("schema", f"{name}={value} outside 0–{maximum}")
    f = _int_array(features_q, "features_q", 2, -32768, 32767, "schema")
    p = _int_array(pred, "pred", 1, 0, 255, "bad_class")
    c = _int_array(conf_q, "conf_q", 1, 0, 255, "bad_confidence")
    k, n_features = f.shape
    if not 1 <= k <= MAX_READINGS:
        raise WireError("schema", f"{k} readings, need 1–{MAX_READINGS}")
    if not 1 <= n_features <= MAX_FEATURES:
        raise WireError("wrong_feature_count", f"{n_features} features, need 1–{MAX_FEATURES}")
    if p.shape != (k,) or c.shape != (k,):
        raise WireError("schema", f"pred and conf_q need {k} entries")
    records = np.empty(k, dtype=record_dtype(n_features))
    records["features"] = f
    records["pred"] = p
    records["conf"] = c
    header = _HEADER.pack(
        MAGIC, WIRE_VERSION, frac_bits, seq, boot, ts_ms, param_version, k, n_features, 0
    )
    return header + records.tobytes()


def encode_binary(batch: TelemetryBatch, frac_bits: int) -> bytes:
    """Quantise and encode a batch (features to ``int16 / 2**frac_bits``, conf to ``u8 / 256``).

    Rounding is half away from zero and saturating; ``pred`` must be ≤ 255 (else ``bad_class``).
    """
    return encode_binary_raw(
        quantise_features(batch.features, frac_bits),
        batch.pred,
        quantise_conf(batch.conf),
        seq=batch.seq,
        boot=batch.boot,
        ts_ms=batch.ts_ms,
        param_version=batch.param_version,
        frac_bits=frac_bits,
    )


class BinaryHeader(NamedTuple):
    """The header fields of a binary frame whose header and length are valid
    (:func:`decode_binary_header`)."""

    frac_bits: int
    seq: int
    boot: int
    ts_ms: int
    param_version: int
    k: int
    n_features: int


def decode_binary_header(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> BinaryHeader:
    """Every check of :func:`decode_binary` (same order, same ``WireError``), without decoding
    the records: for decoders that decode the records of many frames at once.

    >>> from edge_agent.wire.messages import TelemetryBatch
    >>> b = TelemetryBatch.create(seq=7, boot=2, ts_ms=5, param_version=3,
    ...                           features=[[0.5, -1.25, 3.0]], pred=[1], conf=[0.75])
    >>> decode_binary_header(encode_binary(b, frac_bits=8))
    BinaryHeader(frac_bits=8, seq=7, boot=2, ts_ms=5, param_version=3, k=1, n_features=3)
    """
    check_size(data, max_bytes)
    n = len(data)
    if not MAGIC.startswith(data[:2]):
        raise WireError("decode", f"bad magic {data[:2]!r}")
    if n >= 3 and data[2] != WIRE_VERSION:
        raise WireError("bad_version", f"frame version {data[2]}, expected {WIRE_VERSION}")
    if n < HEADER_SIZE:
        raise WireError("truncated", f"header needs {HEADER_SIZE} bytes, got {n}")
    fields = _HEADER.unpack_from(data)
    _, _, frac_bits, seq, boot, ts_ms, param_version, k, n_features, reserved = fields
    if frac_bits > MAX_FRAC_BITS:
        raise WireError("schema", f"frac_bits={frac_bits} > {MAX_FRAC_BITS}")
    if not 1 <= k <= MAX_READINGS:
        raise WireError("schema", f"k={k}, need 1–{MAX_READINGS}")
    if n_features == 0:
        raise WireError("schema", "F=0")
    if reserved != 0:
        raise WireError("schema", f"reserved byte is {reserved}, must be 0")
    expected = HEADER_SIZE + k * record_size(n_features)
    if n < expected:
        raise WireError("truncated", f"frame needs {expected} bytes, got {n}")
    if n > expected:
        raise WireError("trailing_bytes", f"frame needs {expected} bytes, got {n}")
    return BinaryHeader(frac_bits, seq, boot, ts_ms, param_version, k, n_features)


def decode_binary(data: Payload, max_bytes: int = DEFAULT_MAX_BYTES) -> TelemetryBatch:
    """Decode one binary frame; raises only ``WireError``.

    Checks, in order: ``oversized`` (before anything is parsed), magic (``decode``), version
    (``bad_version``), header shorter than 28 bytes (``truncated``), header fields
    (``schema``: ``frac_bits`` > 15, ``k`` not 1–4096, ``F`` = 0, reserved ≠ 0), then the exact
    length ``28 + k(2F + 2)`` (``truncated`` / ``trailing_bytes``).
    """
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise WireError("decode", f"payload must be bytes, not {type(data).__name__}")
        data = bytes(data)
    frac_bits, seq, boot, ts_ms, param_version, k, n_features = decode_binary_header(
        data, max_bytes
    )
    records = np.frombuffer(data, dtype=record_dtype(n_features), count=k, offset=HEADER_SIZE)
    return TelemetryBatch._trusted(
        v=WIRE_VERSION,
        seq=seq,
        boot=boot,
        ts_ms=ts_ms,
        param_version=param_version,
        features=np.ldexp(records["features"].astype(np.float64), -frac_bits),
        pred=records["pred"].astype(np.int64),
        conf=records["conf"].astype(np.float64) * (1.0 / 256.0),
    )
