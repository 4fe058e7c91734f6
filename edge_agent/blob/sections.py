"""Payload sections: ``u16 tag, u16 flags, u32 length``, the bytes, zero padding to 4.

>>> raw = pack_sections([Section(1, b"abc"), Section(40, b"x", critical=False)])
>>> len(raw) % 4, [(s.tag, s.data) for s in iter_sections(raw)]
(0, [(1, b'abc'), (40, b'x')])
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from edge_agent.blob.errors import BlobRejectedError

FLAG_CRITICAL = 0x0001
_SECTION = struct.Struct("<HHI")


class Tag(IntEnum):
    """Section tags of format version 1 (README §6.2)."""

    INPUT_NORM = 1
    WEIGHTS = 2
    BIAS = 3
    REQUANT = 4
    THRESHOLDS = 5
    LABELS = 6
    KAT = 7
    PROVENANCE = 8
    SCHEMA = 9


CRITICAL_TAGS = frozenset({Tag.INPUT_NORM, Tag.WEIGHTS, Tag.BIAS, Tag.REQUANT, Tag.LABELS, Tag.KAT})


@dataclass(frozen=True)
class Section:
    """One section: its tag, bytes and whether a reader must understand it."""

    tag: int
    data: bytes
    critical: bool = True


def _pad(n: int) -> int:
    return (-n) % 4


def pack_sections(sections: Iterable[Section]) -> bytes:
    """Serialise sections, each 4-byte aligned."""
    out = bytearray()
    for s in sections:
        out += _SECTION.pack(s.tag, FLAG_CRITICAL if s.critical else 0, len(s.data))
        out += s.data
        out += bytes(_pad(len(s.data)))
    return bytes(out)


def iter_sections(payload: bytes) -> Iterator[Section]:
    """Walk the sections of a payload; raises :class:`BlobRejectedError` if malformed."""
    pos = 0
    while pos < len(payload):
        if len(payload) - pos < _SECTION.size:
            raise BlobRejectedError("unsupported_format", "payload ends inside a section header")
        tag, flags, length = _SECTION.unpack_from(payload, pos)
        start = pos + _SECTION.size
        end = start + length
        padded = end + _pad(length)
        if padded > len(payload):
            raise BlobRejectedError("unsupported_format", f"section {tag} overruns the payload")
        if any(payload[end:padded]):
            raise BlobRejectedError("unsupported_format", f"section {tag} has non-zero padding")
        if flags & ~FLAG_CRITICAL:
            raise BlobRejectedError("unsupported_format", f"section {tag} has unknown flags")
        yield Section(tag, payload[start:end], critical=bool(flags & FLAG_CRITICAL))
        pos = padded
