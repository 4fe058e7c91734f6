"""The binary chunk response frame on ``blob/data`` (README §5).

Layout (little-endian), a 28-byte header followed by the data:

=====  =========  ===============================================
 off   type       field
=====  =========  ===============================================
   0   char[2]    magic ``"TC"``
   2   u8         version 1
   3   u8         status: 0 ok, 1 unknown blob, 2 bad request
   4   u32        ``c``, echoed client token
   8   u32        ``deploy_seq``, echoed
  12   u32        chunk index
  16   u32        total chunks
  20   u32        CRC-32 (``zlib.crc32``) of the data
  24   u16        data length
  26   u16        reserved, 0
  28   bytes      data
=====  =========  ===============================================

The decoder checks the *layout* only; whether a frame belongs to the running download (echoed
``deploy_seq``, index range, expected data length, CRC) is the receiver's business
(``edge_agent.device.transfer.ChunkAssembler``). A frame whose CRC does not match is still
decoded -- ``ChunkFrame.crc_ok`` tells -- because a corrupted chunk is re-requested, not a
malformed message.

>>> raw = encode_chunk(c=7, deploy_seq=13, index=0, total=1, data=b"abc")
>>> len(raw), raw[:4]
(31, b'TC\\x01\\x00')
>>> frame = decode_chunk(raw)
>>> frame.index, frame.total, frame.data, frame.crc_ok
(0, 1, b'abc', True)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from edge_agent.wire.errors import WireError

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_HEADER_LEN",
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "MAX_CHUNK_DATA",
    "ChunkFrame",
    "ChunkStatus",
    "decode_chunk",
    "encode_chunk",
]

CHUNK_MAGIC: Final = b"TC"
"""The two magic bytes every chunk frame starts with."""

CHUNK_VERSION: Final = 1
"""The only frame version this module reads and writes."""

CHUNK_HEADER: Final = struct.Struct("<2sBBIIIIIHH")
"""``struct`` layout of the 28-byte header (magic, version, status, c, deploy_seq, index,
total, crc32, data length, reserved)."""

CHUNK_HEADER_LEN: Final = CHUNK_HEADER.size
"""28: the header length; the data starts at this offset."""

MAX_CHUNK_DATA: Final = 0xFFFF
"""The largest data length a frame can carry (``u16``)."""

_U32_MAX = 0xFFFF_FFFF

assert CHUNK_HEADER_LEN == 28


class ChunkStatus(IntEnum):
    """Frame status byte (offset 3)."""

    OK = 0
    UNKNOWN_BLOB = 1
    BAD_REQUEST = 2


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """One decoded chunk response (immutable; compares by value).

    ``crc32`` is the value carried in the header; compare with ``crc_ok``.

    >>> ChunkFrame(ChunkStatus.OK, 1, 2, 0, 1, 0, b"").crc_ok
    True
    """

    status: ChunkStatus
    c: int
    deploy_seq: int
    index: int
    total: int
    crc32: int
    data: bytes

    @property
    def crc_ok(self) -> bool:
        """True iff the header's CRC-32 equals ``zlib.crc32(data)``."""
        return zlib.crc32(self.data) == self.crc32

    def encode(self) -> bytes:
        """Encode this frame, keeping its ``crc32`` field as it is (even when wrong).

        >>> f = decode_chunk(encode_chunk(c=1, deploy_seq=2, index=3, total=4, data=b"x"))
        >>> decode_chunk(f.encode()) == f
        True
        """
        return encode_chunk(
            status=self.status,
            c=self.c,
            deploy_seq=self.deploy_seq,
            index=self.index,
            total=self.total,
            data=self.data,
            crc32=self.crc32,
        )


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name}={value} does not fit in a u32")


def encode_chunk(
    *,
    c: int,
    deploy_seq: int,
    index: int,
    total: int,
    data: bytes = b"",
    status: int = ChunkStatus.OK,
    crc32: int | None = None,
) -> bytes:
    """Encode one chunk response frame (README §5).

    ``crc32`` defaults to ``zlib.crc32(data)``; pass a value only to build a deliberately
    corrupted frame in tests. Out-of-range fields raise ``ValueError`` (an encoder bug, not a
    wire error).

    >>> raw = encode_chunk(status=ChunkStatus.UNKNOWN_BLOB, c=1, deploy_seq=2, index=0, total=0)
    >>> raw.hex(" ", 4)
    '54430101 01000000 02000000 00000000 00000000 00000000 00000000'
    """
    if status not in tuple(ChunkStatus):
        raise ValueError(f"status={status} is not one of {[int(s) for s in ChunkStatus]}")
    for name, value in (("c", c), ("deploy_seq", deploy_seq), ("index", index), ("total", total)):
        _check_u32(name, value)
    data = bytes(data)
    if len(data) > MAX_CHUNK_DATA:
        raise ValueError(f"chunk data is {len(data)} bytes, at most {MAX_CHUNK_DATA} fit a frame")
    crc = zlib.crc32(data) if crc32 is None else crc32
    _check_u32("crc32", crc)
    header = CHUNK_HEADER.pack(
        CHUNK_MAGIC, CHUNK_VERSION, int(status), c, deploy_seq, index, total, crc, len(data), 0
    )
    return header + data


def decode_chunk(data: bytes | bytearray | memoryview) -> ChunkFrame:
    """Decode a chunk response frame; raise ``WireError`` and nothing else on bad input.

    Reasons, checked in this order: ``decode`` (not bytes, or the magic does not match),
    ``bad_version`` (version byte is not 1), ``truncated`` (fewer than 28 bytes, or fewer data
    bytes than the header's data length), ``decode`` (unknown status, reserved field not 0),
    ``trailing_bytes`` (more bytes than ``28 + data length``). The CRC is *not* a decode error:
    see ``ChunkFrame.crc_ok``.

    >>> def reason(raw: bytes) -> str:
    ...     try:
    ...         decode_chunk(raw)
    ...     except WireError as exc:
    ...         return exc.reason
    ...     return "ok"
    >>> reason(b"TC"), reason(b"XX" + bytes(26)), reason(b"TC\x02")
    ('truncated', 'decode', 'bad_version')
    >>> reason(encode_chunk(c=0, deploy_seq=0, index=0, total=1, data=b"ab") + b"!")
    'trailing_bytes'
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("decode", f"chunk frame must be bytes, got {type(data).__name__}")
    try:
        raw = bytes(data)
    except (TypeError, ValueError, BufferError):  # pragma: no cover - exotic memoryviews
        raise WireError("decode", "unreadable buffer") from None
    if raw[: len(CHUNK_MAGIC)] != CHUNK_MAGIC[: len(raw)]:
        raise WireError("decode", f"bad magic {raw[:2]!r}, expected {CHUNK_MAGIC!r}")
    if len(raw) > 2 and raw[2] != CHUNK_VERSION:
        raise WireError("bad_version", f"chunk frame version {raw[2]}, expected {CHUNK_VERSION}")
    if len(raw) < CHUNK_HEADER_LEN:
        raise WireError("truncated", f"{len(raw)} bytes, the header alone is {CHUNK_HEADER_LEN}")
    _magic, _version, status, c, deploy_seq, index, total, crc, length, reserved = (
        CHUNK_HEADER.unpack_from(raw)
    )
    if status not in tuple(ChunkStatus):
        raise WireError("decode", f"unknown chunk status {status}")
    if reserved != 0:
        raise WireError("decode", f"reserved field is {reserved}, must be 0")
    end = CHUNK_HEADER_LEN + length
    if len(raw) < end:
        raise WireError("truncated", f"{len(raw)} bytes, the header announces {end}")
    if len(raw) > end:
        raise WireError("trailing_bytes", f"{len(raw)} bytes, the header announces {end}")
    return ChunkFrame(
        ChunkStatus(status), c, deploy_seq, index, total, crc, raw[CHUNK_HEADER_LEN:end]
    )
