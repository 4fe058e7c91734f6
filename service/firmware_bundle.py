"""Create a simulated device build: signing keys, the factory model and a firmware bundle.

Layout written under ``OUT``::

    OUT/keys/release.key, release.pub   signs parameter blobs (keep offline; mode 0600)
    OUT/keys/deploy.key,  deploy.pub    signs desired-state manifests (the rollout service's)
    OUT/firmware/release.pub, deploy.pub, factory.blob   what a device is flashed with

The factory model is river ``StandardScaler | SoftmaxRegression`` trained on stationary
simulated data, quantised to int8 and signed as ``param_version`` 1, epoch 0.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_agent.blob import (
    ParameterSet,
    SigningKey,
    build_blob,
    generate_key,
    verify_blob,
    write_keypair,
)
from edge_agent.device.firmware import DEPLOY_PUB, FACTORY_BLOB, RELEASE_PUB, Firmware
from edge_agent.device.simulator import generate_dataset
from service.learn.factory_model import train_factory_model

FACTORY_VERSION = 1


@dataclass(frozen=True)
class Bundle:
    """Paths and keys of a created bundle."""

    root: Path
    release_key: SigningKey
    deploy_key: SigningKey

    @property
    def firmware_dir(self) -> Path:
        """The directory a device loads (``--firmware``)."""
        return self.root / "firmware"

    @property
    def keys_dir(self) -> Path:
        """Private and public signing keys."""
        return self.root / "keys"

    def firmware(self) -> Firmware:
        """Load the device view of the bundle."""
        return Firmware.load(self.firmware_dir)

    def factory_resigned(self, version: int) -> bytes:
        """The factory parameters signed again as ``version``: a legitimate, equally good
        update (what tests and benchmarks roll out when the subject is the update path)."""
        params = verify_blob(self.firmware().factory_blob, trusted=None, schema_id=None).params
        return build_blob(params, param_version=version, security_epoch=0, key=self.release_key)


def create_bundle(out: Path, seed: int = 0) -> Bundle:
    """Generate keys, train and sign the factory model, write the bundle under ``out``."""
    release, deploy = generate_key(), generate_key()
    keys = out / "keys"
    write_keypair(release, keys, "release")
    write_keypair(deploy, keys, "deploy")
    fm = train_factory_model(seed=seed)
    calibration, _ = generate_dataset(400, seed=seed + 1)
    params = ParameterSet.create(
        fm.parameter_schema(),
        fm.quantize(),
        calibration=calibration,
        provenance={"source": "factory", "model": "StandardScaler|SoftmaxRegression", "seed": seed},
    )
    blob = build_blob(params, param_version=FACTORY_VERSION, security_epoch=0, key=release)
    fw = out / "firmware"
    fw.mkdir(parents=True, exist_ok=True)
    shutil.copy(keys / "release.pub", fw / RELEASE_PUB)
    shutil.copy(keys / "deploy.pub", fw / DEPLOY_PUB)
    (fw / FACTORY_BLOB).write_bytes(blob)
    return Bundle(out, release, deploy)
