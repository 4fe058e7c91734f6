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
"""

from __future__ import annotations

import struct
from typing import Final

HEADER_SIZE: Final = 6
"""Bytes of the header: 4 magic + 2 version."""


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
