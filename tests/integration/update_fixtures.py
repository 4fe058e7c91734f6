"""Build signed candidate blobs and manifests for the device-update tests."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from edge_agent.blob import ParameterSet, SigningKey, build_blob, verify_blob
from edge_agent.device.firmware import Firmware
from edge_agent.fixedpoint import QuantizedLinear
from edge_agent.wire.messages import Manifest

FLEET = "test-fleet"
"""The fleet a manifest is bound to unless a test names another."""
DEVICE = "dev-0000"
"""The device a manifest is bound to unless a test names another."""


def factory_params(fw: Firmware) -> ParameterSet:
    """The parameter set in the factory blob."""
    return verify_blob(fw.factory_blob, trusted=fw.release_keys, schema_id=None).params


def candidate_blob(
    fw: Firmware, key: SigningKey, version: int, epoch: int = 0, mu_shift: float = 0.01
) -> bytes:
    """The factory parameters with a slightly moved input normalisation, signed."""
    p = factory_params(fw)
    m = p.model
    moved = QuantizedLinear(
        mu=(m.mu + np.float32(mu_shift)).astype(np.float32),
        inv_sigma=m.inv_sigma,
        weights=m.weights,
        bias=m.bias,
        multiplier=m.multiplier,
        shift=m.shift,
        s_out=m.s_out,
        n_classes=m.n_classes,
    )
    ps = ParameterSet.create(p.schema, moved, provenance={"test": "candidate", "v": version})
    return build_blob(ps, param_version=version, security_epoch=epoch, key=key)


def manifest(
    seq: int,
    action: str,
    blob: bytes,
    fw: Firmware,
    *,
    version: int,
    epoch: int = 0,
    key_id: int | None = None,
    timeout_s: int = 600,
    confirm: str = "server",
    min_inferences: int = 0,
    chunk: int = 256,
    rollback: bool = False,
    fleet: str = FLEET,
    device: str = DEVICE,
) -> Manifest:
    """An unsigned manifest for ``fleet/device`` pointing at ``blob``."""
    return Manifest.create(
        fleet=fleet,
        device=device,
        deploy_seq=seq,
        action=action,
        rollback=rollback,
        param={
            "version": version,
            "schema_id": fw.schema.schema_id_hex,
            "security_epoch": epoch,
            "blob_len": len(blob),
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
            "key_id": key_id if key_id is not None else next(iter(fw.release_keys)),
        },
        transfer={"chunk": chunk},
        trial={"confirm": confirm, "timeout_s": timeout_s, "min_inferences": min_inferences},
        issued_ms=int(time.time() * 1000),
    )
