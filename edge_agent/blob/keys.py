"""Ed25519 keys: generation, key files, ``key_id`` and raw signatures.

A ``key_id`` is derived from the public key (first 4 bytes of SHA-256 of its 32 raw bytes,
little-endian), so a device's list of trusted keys needs no separate numbering.

>>> key = generate_key()
>>> sig = key.sign(b"header")
>>> verify_signature(key.public, sig, b"header")
True
>>> verify_signature(key.public, sig, b"headex")
False
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNATURE_BYTES = 64


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def key_id_of(public: Ed25519PublicKey) -> int:
    """The u32 key id of a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return int.from_bytes(hashlib.sha256(raw).digest()[:4], "little")


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its derived ``key_id``."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        """The matching public key."""
        return self.private.public_key()

    @property
    def key_id(self) -> int:
        """The u32 id devices use to pick the public key."""
        return key_id_of(self.public)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``message``."""
        return self.private.sign(message)


def generate_key() -> SigningKey:
    """A fresh random signing key."""
    return SigningKey(Ed25519PrivateKey.generate())


def verify_signature(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def write_keypair(key: SigningKey, directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (PKCS#8 PEM, mode 0600) and ``name.pub`` (PEM) into ``directory``.

    Refuses to overwrite an existing private key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if private_path.exists():
        raise KeyFileError(f"{private_path} exists; refusing to overwrite a private key")
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(
        key.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_signing_key(path: Path) -> SigningKey:
    """Read a PEM private key written by :func:`write_keypair`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return SigningKey(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM public key (``.pub``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> Mapping[int, Ed25519PublicKey]:
    """Map ``key_id → public key``, the trust list a firmware carries."""
    return {key_id_of(k): k for k in keys}
