"""The 96-byte signed header of a ``TDPB`` parameter blob (``edge_agent/README.md`` §6.1).

>>> h = BlobHeader(schema_id=bytes(8), param_version=3, security_epoch=1,
...                payload_len=10, payload_sha256=bytes(32), key_id=7, created=0)
>>> len(h.pack()), BlobHeader.unpack(h.pack()) == h
(96, True)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edge_agent.blob.errors import BlobRejectedError

MAGIC = b"TDPB"
FORMAT_VERSION = 1
SIG_ALG_ED25519 = 1
HEADER_LEN = 96
SIGNATURE_LEN = 64
PAYLOAD_OFFSET = HEADER_LEN + SIGNATURE_LEN

_HEADER = struct.Struct("<4sBBHI8sIII32sIIQ16s")
assert _HEADER.size == HEADER_LEN


@dataclass(frozen=True)
class BlobHeader:
    """The fields of the blob header; the signature covers exactly its packed bytes."""

    schema_id: bytes
    param_version: int
    security_epoch: int
    payload_len: int
    payload_sha256: bytes
    key_id: int
    created: int

    def pack(self) -> bytes:
        """The 96 header bytes."""
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            SIG_ALG_ED25519,
            HEADER_LEN,
            0,
            self.schema_id,
            self.param_version,
            self.security_epoch,
            self.payload_len,
            self.payload_sha256,
            self.key_id,
            0,
            self.created,
            bytes(16),
        )

    @classmethod
    def unpack(cls, data: bytes) -> BlobHeader:
        """Parse and check the fixed fields; raises :class:`BlobRejectedError`."""
        if len(data) < HEADER_LEN:
            raise BlobRejectedError("truncated", f"{len(data)} bytes is shorter than the header")
        (
            magic,
            version,
            sig_alg,
            header_len,
            flags,
            schema_id,
            param_version,
            epoch,
            payload_len,
            digest,
            key_id,
            reserved,
            created,
            reserved16,
        ) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BlobRejectedError("unsupported_format", "not a TDPB blob (bad magic)")
        if version != FORMAT_VERSION:
            raise BlobRejectedError("unsupported_format", f"blob format version {version}")
        if sig_alg != SIG_ALG_ED25519:
            raise BlobRejectedError("unsupported_format", f"signature algorithm {sig_alg}")
        if header_len != HEADER_LEN:
            raise BlobRejectedError("unsupported_format", f"header length {header_len}")
        if flags != 0 or reserved != 0 or any(reserved16):
            raise BlobRejectedError("unsupported_format", "non-zero flags or reserved bytes")
        return cls(
            schema_id=schema_id,
            param_version=param_version,
            security_epoch=epoch,
            payload_len=payload_len,
            payload_sha256=digest,
            key_id=key_id,
            created=created,
        )
