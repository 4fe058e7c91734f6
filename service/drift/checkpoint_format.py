"""The header every detector checkpoint starts with: a 4-byte magic and a format version.

Layer A (``DeviceMonitor``) and layer B (``CohortMonitor``) both prefix their ``state_bytes()``
with :func:`add_header` and check it with :func:`check_header` in ``from_state_bytes()``. A blob
of another kind (wrong magic) or of a format version this code does not read is refused with
:class:`CheckpointFormatError`, never half-restored: a restart then rebuilds the detector from a
fresh reference instead of resuming from state it would misread.

Header: ``magic`` (4 bytes) ``|`` version (uint16, big-endian) ``|`` payload.

>>> blob = add_header(b"TDCM", 1, b"payload")
>>> blob[:6]
b'TDCM\\x00\\x01'
>>> check_header(blob, b"TDCM", 1)
b'payload'
>>> try:
...     check_header(blob, b"TDCM", 2)
... except CheckpointFormatError as exc:
...     print(exc)
TDCM checkpoint format version 1; this code reads version 2 only

The payload of a layer-A checkpoint is :func:`pack_state`: a tree of JSON values (numbers,
strings, lists, dicts) whose leaves may also be numpy arrays of plain numbers or ``bytes``,
stored as JSON plus the arrays' raw little-endian bytes, zlib-compressed. Nothing in it names
a class or a function: :func:`unpack_state` gives back numbers, strings, lists, dicts and
arrays (of the dtypes in :data:`ARRAY_DTYPES` only), and each detector rebuilds itself from
them (``from_state``). A compromised database can therefore make a monitor misbehave, never
run code.

>>> tree = {"n": 3, "name": "d1", "x": np.arange(3, dtype=np.int8), "raw": b"ab"}
>>> back = unpack_state(pack_state(tree))
>>> back["n"], back["name"], back["x"].tolist(), back["raw"]
(3, 'd1', [0, 1, 2], b'ab')
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

HEADER_SIZE: Final = 6
"""Bytes of the header: 4 magic + 2 version."""


ARRAY_DTYPES: Final = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)
"""The only array dtypes :func:`unpack_state` builds (no objects, no structured records)."""

MAX_STATE_BYTES: Final = 64 << 20
"""Largest uncompressed state :func:`unpack_state` inflates (a zlib bomb is refused)."""

_ARRAY: Final = "$nd"
_BYTES: Final = "$b"
_LEN: Final = struct.Struct(">I")


class CheckpointFormatError(ValueError):
    """A checkpoint blob has the wrong magic, an unsupported version, or is truncated."""


def add_header(magic: bytes, version: int, payload: bytes) -> bytes:
    """``magic | version (u16 BE) | payload``; ``magic`` must be 4 bytes."""
    _check_magic(magic)
    if not 0 <= version <= 0xFFFF:
        raise ValueError("version must fit in 16 bits")
    return magic + struct.pack(">H", version) + payload


def check_header(data: bytes, magic: bytes, version: int) -> bytes:
    """The payload of ``data`` if it starts with ``magic`` and ``version``; else refuse.

    Raises :class:`CheckpointFormatError` naming what was found and what is supported.
    """
    _check_magic(magic)
    if len(data) < HEADER_SIZE:
        raise CheckpointFormatError(f"checkpoint too short ({len(data)} bytes) for a header")
    found_magic = bytes(data[:4])
    if found_magic != magic:
        raise CheckpointFormatError(
            f"not a {magic.decode(errors='replace')} checkpoint (magic {found_magic!r})"
        )
    (found,) = struct.unpack(">H", data[4:HEADER_SIZE])
    if found != version:
        raise CheckpointFormatError(
            f"{magic.decode(errors='replace')} checkpoint format version {found}; "
            f"this code reads version {version} only"
        )
    return bytes(data[HEADER_SIZE:])


def _check_magic(magic: bytes) -> None:
    if len(magic) != 4:
        raise ValueError("magic must be exactly 4 bytes")


def pack_state(tree: Mapping[str, Any], level: int = 6) -> bytes:
    """``tree`` (JSON values, numpy arrays of plain numbers, ``bytes``) as zlib-compressed
    ``u32 BE length | JSON | array bytes`` (see the module docstring)."""
    return zlib.compress(pack_state_raw(tree), level)


def pack_state_raw(tree: Mapping[str, Any]) -> bytes:
    """:func:`pack_state` before compression (its size is the state's raw size)."""
    blobs: list[bytes] = []
    specs: list[tuple[str, list[int]]] = []

    def walk(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<"))
            if a.dtype.str not in ARRAY_DTYPES:
                raise TypeError(f"array of dtype {a.dtype} cannot be checkpointed")
            specs.append((a.dtype.str, list(a.shape)))
            blobs.append(a.tobytes())
            return {_ARRAY: len(specs) - 1}
        if isinstance(v, bytes):
            specs.append(("|u1", [len(v)]))
            blobs.append(v)
            return {_BYTES: len(specs) - 1}
        if isinstance(v, Mapping):
            return {str(k): walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        if v is None or isinstance(v, bool | int | float | str):
            return v
        raise TypeError(f"{type(v).__name__} cannot be checkpointed")

    doc = json.dumps({"tree": walk(tree), "arrays": specs}, separators=(",", ":")).encode()
    return _LEN.pack(len(doc)) + doc + b"".join(blobs)


def unpack_state(payload: bytes, max_bytes: int = MAX_STATE_BYTES) -> dict[str, Any]:
    """Inverse of :func:`pack_state`; ``CheckpointFormatError`` on anything else."""
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(payload, max_bytes)
        if inflate.unconsumed_tail:
            raise CheckpointFormatError(f"state larger than {max_bytes} bytes")
        if not inflate.eof:
            raise CheckpointFormatError("state truncated")
        (n,) = _LEN.unpack_from(raw, 0)
        doc = json.loads(raw[_LEN.size : _LEN.size + n].decode())
        arrays = _arrays(doc["arrays"], memoryview(raw)[_LEN.size + n :])
        tree = _rebuild(doc["tree"], arrays)
    except CheckpointFormatError:
        raise
    except (zlib.error, struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointFormatError(f"corrupt checkpoint state: {exc}") from exc
    if not isinstance(tree, dict):
        raise CheckpointFormatError("corrupt checkpoint state: not a mapping")
    return tree


def _arrays(specs: Any, data: memoryview) -> list[npt.NDArray[Any] | bytes]:
    if not isinstance(specs, list):
        raise TypeError("array list expected")
    out: list[npt.NDArray[Any] | bytes] = []
    pos = 0
    for dtype_str, shape in specs:
        if dtype_str not in ARRAY_DTYPES:
            raise CheckpointFormatError(f"array dtype {dtype_str!r} is not allowed")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointFormatError(f"bad array shape {shape!r}")
        dtype = np.dtype(dtype_str)
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if pos + size > len(data):
            raise CheckpointFormatError("array data truncated")
        out.append(np.frombuffer(data[pos : pos + size], dtype).reshape(shape).copy())
        pos += size
    if pos != len(data):
        raise CheckpointFormatError("trailing bytes after the arrays")
    return out


def _rebuild(v: Any, arrays: list[npt.NDArray[Any] | bytes]) -> Any:
    if isinstance(v, dict):
        if len(v) == 1 and (_ARRAY in v or _BYTES in v):
            ((key, i),) = v.items()
            if not isinstance(i, int) or not 0 <= i < len(arrays):
                raise CheckpointFormatError("bad array reference")
            a = arrays[i]
            assert isinstance(a, np.ndarray)
            if key == _BYTES:
                if a.dtype != np.uint8 or a.ndim != 1:
                    raise CheckpointFormatError("bad bytes reference")
                return a.tobytes()
            return a
        return {k: _rebuild(x, arrays) for k, x in v.items()}
    if isinstance(v, list):
        return [_rebuild(x, arrays) for x in v]
    return v
