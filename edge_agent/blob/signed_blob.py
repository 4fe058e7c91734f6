"""Build and verify signed ``TDPB`` blobs: header, Ed25519 signature, payload (README §6).

>>> import numpy as np
>>> from edge_agent.fixedpoint import quantize_linear
>>> from edge_agent.blob.keys import generate_key, trusted_keys
>>> from edge_agent.blob.parameter_set import ParameterSet
>>> from edge_agent.blob.schema import ParameterSchema
>>> schema = ParameterSchema(features=("a", "b"), classes=("no", "yes"), rows=1)
>>> ps = ParameterSet.create(schema, quantize_linear([0, 0], [1, 1], [[1.0, -1.0]], [0.2]))
>>> key = generate_key()
>>> blob = build_blob(ps, param_version=2, security_epoch=1, key=key)
>>> v = verify_blob(blob, trusted=trusted_keys([key.public]), schema_id=schema.schema_id)
>>> v.header.param_version, v.params.schema == schema
(2, True)
>>> verify_blob(blob, trusted=trusted_keys([key.public]), schema_id=schema.schema_id,
...             min_version=3)
Traceback (most recent call last):
...
edge_agent.blob.errors.BlobRejectedError: stale_version: param_version 2 is older than 3
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.blob.errors import BlobRejectedError
from edge_agent.blob.header import HEADER_LEN, PAYLOAD_OFFSET, BlobHeader
from edge_agent.blob.kat import check_known_answers
from edge_agent.blob.keys import SigningKey, verify_signature
from edge_agent.blob.parameter_set import ParameterSet

DEFAULT_MAX_BLOB = 64 * 1024
U32_MAX = (1 << 32) - 1


@dataclass(frozen=True, eq=False)
class VerifiedBlob:
    """A blob whose signature, hash and policy checks passed, with its parsed parameters."""

    header: BlobHeader
    params: ParameterSet
    sha256: str
    """SHA-256 of the whole blob (hex): what manifests and slots refer to."""
    size: int

    def run_known_answers(self) -> None:
        """Run the embedded KATs; raises ``BlobRejectedError("kat_mismatch")``."""
        check_known_answers(self.params.model, self.params.kats)


def build_blob(
    params: ParameterSet,
    *,
    param_version: int,
    security_epoch: int,
    key: SigningKey,
    created: int | None = None,
) -> bytes:
    """Serialise and sign ``params``; the result is ``header | signature | payload``."""
    for name, value in (("param_version", param_version), ("security_epoch", security_epoch)):
        if not 0 <= value <= U32_MAX:
            raise ValueError(f"{name} must fit in a u32")
    payload = params.to_payload()
    header = BlobHeader(
        schema_id=params.schema.schema_id,
        param_version=param_version,
        security_epoch=security_epoch,
        payload_len=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
        key_id=key.key_id,
        created=int(time.time()) if created is None else created,
    ).pack()
    return header + key.sign(header) + payload


def inspect_header(data: bytes) -> BlobHeader:
    """Parse the header only, verifying nothing but its format (for tools)."""
    return BlobHeader.unpack(data)


def verify_blob(
    data: bytes,
    *,
    trusted: Mapping[int, Ed25519PublicKey] | None,
    schema_id: bytes | None,
    epoch_floor: int = 0,
    min_version: int = 0,
    max_len: int = DEFAULT_MAX_BLOB,
) -> VerifiedBlob:
    """Check a blob in the device's order and parse it; raises :class:`BlobRejectedError`.

    Order: format, key, signature over the header, length, payload hash, ``schema_id``
    (skipped when ``None``), epoch floor, ``min_version``, sections. ``trusted=None`` skips the
    key and signature checks: only for inspection tools, never on a device.
    KATs are not run here: the device runs them after loading the trial slot
    (:meth:`VerifiedBlob.run_known_answers`).
    """
    if len(data) < PAYLOAD_OFFSET:
        raise BlobRejectedError("truncated", f"{len(data)} bytes is shorter than header+signature")
    header = BlobHeader.unpack(data)
    if trusted is not None:
        public = trusted.get(header.key_id)
        if public is None:
            raise BlobRejectedError("unknown_key", f"key_id {header.key_id:#010x} is not trusted")
        if not verify_signature(public, data[HEADER_LEN:PAYLOAD_OFFSET], data[:HEADER_LEN]):
            raise BlobRejectedError(
                "bad_signature", f"signature does not verify under key {header.key_id:#010x}"
            )
    expected_len = PAYLOAD_OFFSET + header.payload_len
    if expected_len > max_len:
        raise BlobRejectedError(
            "too_large", f"{expected_len} bytes exceeds the {max_len}-byte slot"
        )
    if len(data) < expected_len:
        raise BlobRejectedError("truncated", f"{len(data)} of {expected_len} bytes")
    if len(data) > expected_len:
        raise BlobRejectedError("unsupported_format", f"{len(data) - expected_len} trailing bytes")
    payload = data[PAYLOAD_OFFSET:]
    if hashlib.sha256(payload).digest() != header.payload_sha256:
        raise BlobRejectedError("hash_mismatch", "payload SHA-256 differs from the signed header")
    if schema_id is not None and header.schema_id != schema_id:
        raise BlobRejectedError(
            "schema_mismatch",
            f"blob schema {header.schema_id.hex()} but firmware expects {schema_id.hex()}",
        )
    if header.security_epoch < epoch_floor:
        raise BlobRejectedError(
            "epoch_below_floor", f"epoch {header.security_epoch} is below the floor {epoch_floor}"
        )
    if header.param_version < min_version:
        raise BlobRejectedError(
            "stale_version", f"param_version {header.param_version} is older than {min_version}"
        )
    params = ParameterSet.from_payload(payload)
    if params.schema.schema_id != header.schema_id:
        raise BlobRejectedError(
            "schema_mismatch", "the embedded schema does not hash to the header's schema_id"
        )
    return VerifiedBlob(
        header=header, params=params, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
