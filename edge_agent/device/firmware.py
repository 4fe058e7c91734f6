"""What is compiled into a device: schema, trust anchors, factory parameters; and its files.

A *firmware bundle* directory holds what a simulated device is flashed with:
``release.pub`` (keys that may sign parameter blobs), ``deploy.pub`` (keys that may sign
manifests) and ``factory.blob`` (the parameter set in slot A on first boot). The schema is read
from the factory blob, which the release key must have signed. Private keys never go into a
bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.blob import (
    BlobRejectedError,
    KeyFileError,
    ParameterSchema,
    load_public_key,
    trusted_keys,
    verify_blob,
)

RELEASE_PUB = "release.pub"
DEPLOY_PUB = "deploy.pub"
FACTORY_BLOB = "factory.blob"


class FirmwareBundleError(ValueError):
    """A firmware bundle directory is incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Firmware:
    """The compiled-in facts of a device build."""

    schema: ParameterSchema
    release_keys: Mapping[int, Ed25519PublicKey]
    """Keys that may sign parameter blobs (``key_id → key``)."""
    deploy_keys: Mapping[int, Ed25519PublicKey]
    """Keys that may sign desired-state manifests."""
    factory_blob: bytes
    """The parameter set flashed at the factory (slot A on first boot)."""
    name: str = "tinydrift-sim/0.1.0"
    slot_size: int = 64 * 1024
    max_chunk: int = 1024

    @classmethod
    def load(cls, directory: Path) -> Firmware:
        """Read a bundle; raises :class:`FirmwareBundleError` naming what is wrong."""
        try:
            release = trusted_keys([load_public_key(directory / RELEASE_PUB)])
            deploy = trusted_keys([load_public_key(directory / DEPLOY_PUB)])
        except KeyFileError as exc:
            raise FirmwareBundleError(f"firmware bundle {directory}: {exc}") from exc
        try:
            blob = (directory / FACTORY_BLOB).read_bytes()
        except OSError as exc:
            raise FirmwareBundleError(
                f"firmware bundle {directory}: cannot read {FACTORY_BLOB}: {exc.strerror}"
            ) from exc
        try:
            verified = verify_blob(blob, trusted=release, schema_id=None)
        except BlobRejectedError as exc:
            raise FirmwareBundleError(f"{directory / FACTORY_BLOB}: {exc}") from exc
        return cls(
            schema=verified.params.schema,
            release_keys=release,
            deploy_keys=deploy,
            factory_blob=blob,
        )
