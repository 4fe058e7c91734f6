"""Simulated devices over a real Mosquitto: birth, telemetry, labels, Will and every update path."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.blob import generate_key
from edge_agent.device.fleet import Fleet, FleetConfig
from edge_agent.wire.topics import Leaf
from service.firmware_bundle import Bundle
from tests.integration.mqtt_observer import Observer
from tests.integration.update_fixtures import candidate_blob, manifest

pytestmark = pytest.mark.integration
FLEET = "it"


@pytest.fixture(scope="module")
def observer(mosquitto) -> Iterator[Observer]:
    obs = Observer(mosquitto.host, mosquitto.port)
    yield obs
    obs.close()


@pytest.fixture(scope="module")
def fleet(mosquitto, bundle: Bundle, observer: Observer) -> Iterator[Fleet]:
    cfg = FleetConfig(
        fleet=FLEET,
        devices=6,
        host=mosquitto.host,
        port=mosquitto.port,
        period_s=0.2,
        batch=8,
        label_rate=0.5,
        seed=3,
    )
    f = Fleet(cfg, bundle.firmware(), plan={})
    f.start()
    observer.wait(lambda: len(observer.status) >= 6, 20, "six births")
    yield f
    f.stop()


def _version(fleet: Fleet, device: str) -> int:
    return fleet.agent(device).machine.param_version


def test_birth_telemetry_and_labels(fleet: Fleet, observer: Observer, bundle: Bundle):
    fw = bundle.firmware()
    observer.wait(
        lambda: all(len(observer.tel[a.config.device_id]) >= 3 for a in fleet.agents),
        20,
        "three frames per device",
    )
    for a in fleet.agents:
        dev = a.config.device_id
        st = observer.status[dev]
        assert st["online"] is True
        assert st["schema_id"] == fw.schema.schema_id_hex
        assert st["active_version"] == 1
        frames = list(observer.tel[dev])
        assert all(b.n_features == 8 and b.k == 8 for b in frames)
        seqs = [b.seq for b in frames]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert all(b.param_version == 1 for b in frames)
        assert np.all(frames[0].conf >= 0.25)  # 4 classes: the top one has p ≥ 1/4
    observer.wait(lambda: sum(len(v) for v in observer.lbl.values()) >= 3, 10, "labels")
    lbl = next(v for v in observer.lbl.values() if v)[0]
    assert len(lbl["features"]) == len(lbl["label"]) >= 1


def test_install_trial_confirm_changes_the_running_parameters(fleet, observer, bundle):
    fw, dev = bundle.firmware(), "dev-0000"
    blob = candidate_blob(fw, bundle.release_key, version=2)
    observer.cache.add(blob)
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(10, "install", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )
    observer.wait(lambda: (10, "TRIAL", "trial") in observer.states(dev), 20, "trial")
    assert [s for q, s, _ in observer.states(dev) if q == 10] == [
        "DOWNLOADING",
        "VERIFYING",
        "TRIAL",
    ]
    assert _version(fleet, dev) == 2
    observer.wait(lambda: any(b.param_version == 2 for b in observer.tel[dev]), 10, "v2 telemetry")
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(11, "confirm", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )
    observer.wait(lambda: (11, "CONFIRMED", "confirmed") in observer.states(dev), 10, "confirm")
    rec = fleet.agent(dev).machine.rec
    assert rec.update_state == "IDLE"
    assert rec.slots[rec.active_slot].status == "confirmed"
    assert observer.transfer.counters["frames"] >= len(blob) // 256


def test_bad_blobs_are_rejected_and_nothing_changes(fleet, observer, bundle):
    fw, dev = bundle.firmware(), "dev-0001"
    # signed by a key the device does not trust
    rogue = generate_key()
    blob = candidate_blob(fw, rogue, version=3)
    observer.cache.add(blob)
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(20, "install", blob, fw, fleet=FLEET, device=dev, version=3, key_id=rogue.key_id),
        bundle.deploy_key,
    )
    observer.wait(lambda: (20, "REJECTED", "unknown_key") in observer.states(dev), 10, "unknown")
    # a trusted key_id but a signature from the rogue key
    forged = bytearray(candidate_blob(fw, rogue, version=3))
    forged[64:68] = next(iter(fw.release_keys)).to_bytes(4, "little")
    observer.cache.add(bytes(forged))
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(21, "install", bytes(forged), fw, fleet=FLEET, device=dev, version=3),
        bundle.deploy_key,
    )
    observer.wait(lambda: (21, "REJECTED", "bad_signature") in observer.states(dev), 20, "sig")
    # a payload byte changed after signing (the manifest carries the tampered hash)
    tampered = bytearray(candidate_blob(fw, bundle.release_key, version=3))
    tampered[-5] ^= 0x40
    observer.cache.add(bytes(tampered))
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(22, "install", bytes(tampered), fw, fleet=FLEET, device=dev, version=3),
        bundle.deploy_key,
    )
    observer.wait(lambda: (22, "REJECTED", "hash_mismatch") in observer.states(dev), 20, "hash")
    assert _version(fleet, dev) == 1
    assert fleet.agent(dev).machine.rec.update_state == "IDLE"


def test_unsigned_replayed_and_wrongly_signed_manifests(fleet, observer, bundle):
    fw, dev = bundle.firmware(), "dev-0002"
    blob = candidate_blob(fw, bundle.release_key, version=2)
    observer.cache.add(blob)
    observer.publish_manifest(
        FLEET, dev, manifest(30, "install", blob, fw, fleet=FLEET, device=dev, version=2), None
    )
    observer.wait(lambda: (30, "REJECTED", "bad_manifest") in observer.states(dev), 10, "unsigned")
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(31, "install", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.release_key,
    )  # the release key may not sign manifests
    observer.wait(lambda: (31, "REJECTED", "bad_manifest") in observer.states(dev), 10, "role")
    observer.publish_raw(FLEET, dev, Leaf.DESIRED, b"\x00garbage{")
    observer.wait(lambda: (0, "REJECTED", "bad_manifest") in observer.states(dev), 10, "garbage")
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(32, "none", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(31, "install", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )  # a replay of an older seq
    observer.wait(lambda: (31, "REJECTED", "stale_seq") in observer.states(dev), 10, "replay")
    assert _version(fleet, dev) == 1
    assert fleet.agent(dev).machine.rec.last_deploy_seq == 32


def test_revert_command_and_trial_timeout(fleet, observer, bundle):
    fw = bundle.firmware()
    blob = candidate_blob(fw, bundle.release_key, version=2)
    observer.cache.add(blob)
    dev = "dev-0003"
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(40, "install", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )
    observer.wait(lambda: (40, "TRIAL", "trial") in observer.states(dev), 20, "trial")
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(41, "revert", blob, fw, fleet=FLEET, device=dev, version=2),
        bundle.deploy_key,
    )
    observer.wait(lambda: (41, "REVERTED", "server_revert") in observer.states(dev), 10, "revert")
    assert _version(fleet, dev) == 1
    dev = "dev-0004"
    observer.publish_manifest(
        FLEET,
        dev,
        manifest(50, "install", blob, fw, fleet=FLEET, device=dev, version=2, timeout_s=1),
        bundle.deploy_key,
    )
    observer.wait(lambda: (50, "REVERTED", "trial_timeout") in observer.states(dev), 20, "timeout")
    assert _version(fleet, dev) == 1


def test_will_marks_a_vanished_device_offline(fleet, observer):
    dev = "dev-0005"
    agent = fleet.agent(dev)
    sock = agent.client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # the device vanishes without a DISCONNECT
    observer.wait(lambda: observer.status[dev]["online"] is False, 15, "the Will")
    observer.wait(lambda: observer.status[dev]["online"] is True, 20, "reconnect and rebirth")
