"""Deploy-key signatures on desired-state manifests (README §4).

The release key signs parameter blobs; the deploy key signs manifests, which only choose among
blobs the release key signed (Uptane's split, ``../shared/research/fleet-update-anchors.md`` §6).

>>> from edge_agent.blob.keys import generate_key, trusted_keys
>>> key = generate_key()
>>> m = Manifest.create(fleet="f1", device="d1", deploy_seq=1, action="none",
...     param=dict(version=1, schema_id="00" * 8, security_epoch=0, blob_len=200,
...                blob_sha256="00" * 32, key_id=0),
...     trial=dict(confirm="server", timeout_s=60, min_inferences=0), issued_ms=0)
>>> signed = sign_manifest(m, key)
>>> verify_manifest(signed, trusted_keys([key.public]))
>>> verify_manifest(m, trusted_keys([key.public]))
Traceback (most recent call last):
...
edge_agent.wire.manifest_signature.ManifestSignatureError: manifest is not signed
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.blob.keys import SigningKey, verify_signature
from edge_agent.wire.messages import Manifest, ManifestSignature


class ManifestSignatureError(ValueError):
    """A manifest is unsigned, signed by an untrusted key, or its signature does not verify.

    A device answers it with an ``ack`` of state ``REJECTED``, reason ``bad_manifest``.
    """


def sign_manifest(manifest: Manifest, key: SigningKey) -> Manifest:
    """A copy of ``manifest`` carrying the deploy key's signature over its canonical bytes."""
    value = base64.b64encode(key.sign(manifest.signing_bytes())).decode("ascii")
    return manifest.model_copy(update={"sig": ManifestSignature(key_id=key.key_id, value=value)})


def verify_manifest(manifest: Manifest, trusted: Mapping[int, Ed25519PublicKey]) -> None:
    """Raise :class:`ManifestSignatureError` unless a trusted deploy key signed ``manifest``."""
    if manifest.sig is None:
        raise ManifestSignatureError("manifest is not signed")
    public = trusted.get(manifest.sig.key_id)
    if public is None:
        raise ManifestSignatureError(f"deploy key {manifest.sig.key_id:#010x} is not trusted")
    try:
        signature = base64.b64decode(manifest.sig.value, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestSignatureError("signature is not base64") from None
    if not verify_signature(public, signature, manifest.signing_bytes()):
        raise ManifestSignatureError("manifest signature does not verify")
