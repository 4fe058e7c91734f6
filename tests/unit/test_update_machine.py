"""The device update state machine (README §4, §5, §7), driven directly: no MQTT, a fake clock."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge_agent.blob import KnownAnswers, ParameterSchema, ParameterSet, build_blob, generate_key
from edge_agent.blob.signed_blob import VerifiedBlob
from edge_agent.device.firmware import Firmware
from edge_agent.device.state_record import RecordStore, chunk_count
from edge_agent.device.update_machine import TransferTuning
from edge_agent.wire.chunk_frame import ChunkStatus, decode_chunk, encode_chunk
from edge_agent.wire.manifest_signature import sign_manifest
from edge_agent.wire.messages import Manifest
from edge_agent.wire.topics import Leaf
from service.firmware_bundle import Bundle
from service.rollout.chunk_server import ChunkQuery, serve_chunks
from tests.integration.update_fixtures import (
    DEVICE,
    FLEET,
    candidate_blob,
    factory_params,
    manifest,
)
from tests.unit.update_harness import Chaos, Device

ERASED = b"\xff"


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fw(bundle: Bundle) -> Firmware:
    return bundle.firmware()


@pytest.fixture(scope="module")
def blobs(fw: Firmware, bundle: Bundle) -> SimpleNamespace:
    key = bundle.release_key
    return SimpleNamespace(
        v1=fw.factory_blob,
        v2=candidate_blob(fw, key, version=2),
        v3=candidate_blob(fw, key, version=3, mu_shift=0.02),
        v2e2=candidate_blob(fw, key, version=2, epoch=2, mu_shift=0.03),
        v3e1=candidate_blob(fw, key, version=3, epoch=1, mu_shift=0.04),
    )


@pytest.fixture
def dev(fw: Firmware, bundle: Bundle, blobs: SimpleNamespace, tmp_path: Path) -> Device:
    d = Device(fw, bundle.deploy_key, tmp_path / "device")
    for blob in vars(blobs).values():
        d.cache.add(blob)
    return d


def mf(dev: Device, seq: int, action: str, blob: bytes, version: int, **kw) -> Manifest:
    return manifest(seq, action, blob, dev.fw, version=version, **kw)


def with_param(m: Manifest, **changes) -> Manifest:
    return m.model_copy(update={"param": m.param.model_copy(update=changes)})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trial_acks(seq: int, version: int) -> list[tuple[int, str, str, int]]:
    return [
        (seq, "DOWNLOADING", "downloading", version),
        (seq, "VERIFYING", "verifying", version),
        (seq, "TRIAL", "trial", version),
    ]


def install_and_confirm(dev: Device, seq: int, blob: bytes, version: int, epoch: int = 0) -> None:
    assert dev.install(mf(dev, seq, "install", blob, version, epoch=epoch)) == trial_acks(
        seq, version
    )
    confirm = mf(dev, seq + 1, "confirm", blob, version, epoch=epoch)
    assert dev.send(confirm) == [(seq + 1, "CONFIRMED", "confirmed", version)]


def slot_state(dev: Device) -> tuple[str, dict[str, tuple[int, str | None, str]]]:
    rec = dev.machine.rec
    return rec.active_slot, {n: (s.version, s.sha256, s.status) for n, s in rec.slots.items()}


def assert_factory_running(dev: Device) -> None:
    m = dev.machine
    assert (m.param_version, m.state, m.rec.active_slot) == (1, "IDLE", "A")
    assert m.rec.slots["A"].status == "confirmed"
    assert m.active.sha256 == sha(dev.fw.factory_blob)
    assert dev.slot_bytes("A", len(dev.fw.factory_blob)) == dev.fw.factory_blob


def birth(dev: Device) -> dict[str, Any]:
    out = dev.machine.birth()
    assert (out.leaf, out.qos, out.retain) == (Leaf.STATUS, 1, True)
    status: dict[str, Any] = json.loads(out.payload)
    return status


def newest_copy(dev: Device) -> int:
    entry = RecordStore(dev.storage / "state").read_entry()
    assert entry is not None
    return entry.copy


# -- 1. factory boot ------------------------------------------------------------------------


def test_factory_boot_writes_slot_a_and_counts_boots(dev: Device, fw: Firmware) -> None:
    assert_factory_running(dev)
    assert slot_state(dev) == (
        "A",
        {"A": (1, sha(fw.factory_blob), "confirmed"), "B": (0, None, "empty")},
    )
    b = birth(dev)
    assert b["schema_id"] == fw.schema.schema_id_hex
    assert (b["active_version"], b["update_state"], b["boot"]) == (1, "IDLE", 1)
    assert (b["last_deploy_seq"], b["epoch_floor"], b["online"]) == (0, 0, True)
    assert "previous_version" not in b
    assert dev.machine.drain() == []
    for boot in (2, 3):
        dev.boot()
        assert birth(dev)["boot"] == boot
        assert_factory_running(dev)


# -- 2./3./4. install, trial, confirm, timeout ---------------------------------------------


def test_install_trial_then_server_confirm_raises_the_epoch_floor(dev: Device, blobs) -> None:
    blob = blobs.v2e2
    assert dev.send(mf(dev, 10, "install", blob, 2, epoch=2)) == trial_acks(10, 2)[:1]
    assert dev.acks[0]["progress"] == [0, chunk_count(len(blob), 256)]
    assert dev.machine.rec.epoch_floor == 0  # not on download
    assert dev.pump() == trial_acks(10, 2)[1:]
    assert (dev.machine.param_version, dev.machine.state) == (2, "TRIAL")
    assert slot_state(dev) == (
        "B",
        {"A": (1, sha(blobs.v1), "confirmed"), "B": (2, sha(blob), "trial")},
    )
    assert dev.slot_bytes("B", len(blob)) == blob
    assert dev.machine.rec.epoch_floor == 0  # not on trial
    assert dev.machine.count_inferences(10_000) == []  # server confirm: inferences do not
    assert birth(dev)["update_state"] == "TRIAL"

    assert dev.send(mf(dev, 11, "confirm", blob, 2, epoch=2)) == [(11, "CONFIRMED", "confirmed", 2)]
    assert slot_state(dev) == (
        "B",
        {"A": (1, sha(blobs.v1), "valid"), "B": (2, sha(blob), "confirmed")},
    )
    assert (dev.machine.param_version, dev.machine.state, dev.machine.rec.epoch_floor) == (
        2,
        "IDLE",
        2,
    )
    b = birth(dev)
    assert (b["active_version"], b["previous_version"], b["last_deploy_seq"]) == (2, 1, 11)
    assert (b["epoch_floor"], b["update_state"]) == (2, "IDLE")
    dev.boot()  # all of it is persisted
    assert (dev.machine.param_version, dev.machine.rec.epoch_floor) == (2, 2)


def test_local_confirm_after_min_inferences(dev: Device, blobs) -> None:
    m = mf(dev, 20, "install", blobs.v2, 2, confirm="local", min_inferences=50)
    assert dev.install(m) == trial_acks(20, 2)
    assert dev.machine.count_inferences(49) == []
    assert dev.machine.state == "TRIAL"
    assert dev.handle(dev.machine.count_inferences(1)) == [(20, "CONFIRMED", "confirmed", 2)]
    assert (dev.machine.param_version, dev.machine.state) == (2, "IDLE")
    assert dev.machine.rec.slots["B"].status == "confirmed"
    assert dev.machine.count_inferences(5) == []


def test_restart_keeps_the_inference_count_of_a_local_trial(dev: Device, blobs) -> None:
    m = mf(dev, 25, "install", blobs.v2, 2, confirm="local", min_inferences=600)
    assert dev.install(m) == trial_acks(25, 2)
    assert dev.machine.count_inferences(300) == []  # crosses 256: persisted
    assert dev.machine.count_inferences(10) == []  # not persisted (bounded flash wear)
    dev.boot()
    assert dev.machine.rec.trial is not None
    assert dev.machine.rec.trial.inferences == 300
    assert dev.machine.count_inferences(299) == []
    assert dev.handle(dev.machine.count_inferences(1)) == [(25, "CONFIRMED", "confirmed", 2)]


def test_trial_timeout_reverts_to_the_intact_old_slot(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 30, "install", blobs.v2, 2, timeout_s=100)) == trial_acks(30, 2)
    start = dev.clock.now
    dev.clock.now = start + 99.5
    assert dev.tick() == []
    assert dev.machine.state == "TRIAL"
    dev.clock.now = start + 100
    assert dev.tick() == [(30, "REVERTED", "trial_timeout", 2)]
    assert_factory_running(dev)
    assert dev.machine.rec.slots["B"].status == "valid"
    assert dev.tick() == []


# -- 5. revert and confirm commands ----------------------------------------------------------


def test_revert_and_confirm_commands(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 40, "install", blobs.v2, 2)) == trial_acks(40, 2)
    # neither touches the running trial of v2
    assert dev.send(mf(dev, 41, "revert", blobs.v3, 3)) == [(41, "REVERTED", "server_revert", 3)]
    assert dev.send(mf(dev, 42, "confirm", blobs.v3, 3)) == [(42, "REJECTED", "bad_manifest", 3)]
    assert (dev.machine.param_version, dev.machine.state) == (2, "TRIAL")

    assert dev.send(mf(dev, 43, "revert", blobs.v2, 2)) == [(43, "REVERTED", "server_revert", 2)]
    assert_factory_running(dev)
    assert dev.machine.rec.slots["B"].status == "valid"
    # v2 is no longer running: a second revert changes nothing, a confirm is refused
    assert dev.send(mf(dev, 44, "revert", blobs.v2, 2)) == [(44, "REVERTED", "server_revert", 2)]
    assert dev.send(mf(dev, 45, "confirm", blobs.v2, 2)) == [(45, "REJECTED", "bad_manifest", 2)]
    # the confirmed factory set cannot be "reverted"
    assert dev.send(mf(dev, 46, "revert", blobs.v1, 1)) == [(46, "REJECTED", "bad_manifest", 1)]
    assert_factory_running(dev)
    assert dev.machine.rec.last_deploy_seq == 46


# -- 6. known-answer tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_kat_blob(fw: Firmware, bundle: Bundle) -> bytes:
    p = factory_params(fw)
    logits = p.kats.logits.copy()
    logits[0, 0] += 1  # a signer whose reference kernel is off by one LSB
    bad = dataclasses.replace(p, kats=KnownAnswers(p.kats.inputs, logits, p.kats.preds))
    return build_blob(bad, param_version=2, security_epoch=0, key=bundle.release_key)


def test_kat_mismatch_enters_trial_then_reverts_and_marks_the_slot_bad(
    dev: Device, bad_kat_blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev.cache.add(bad_kat_blob)
    persisted: list[tuple[str, str]] = []
    write = dev.machine.records.write

    def spy(rec):
        persisted.append((rec.update_state, rec.active_slot))
        return write(rec)

    monkeypatch.setattr(dev.machine.records, "write", spy)
    acks = dev.install(mf(dev, 50, "install", bad_kat_blob, 2))
    assert acks == [*trial_acks(50, 2)[:2], (50, "REVERTED", "kat_mismatch", 2)]
    assert ("TRIAL", "B") in persisted  # the trial slot was activated before the KATs ran
    assert persisted[-1] == ("IDLE", "A")
    assert_factory_running(dev)
    assert slot_state(dev)[1]["B"] == (2, sha(bad_kat_blob), "bad")
    assert "previous_version" not in birth(dev)
    # a bad slot is never reused: offering the blob again downloads (and rejects) it again
    dev.requests.clear()
    acks = dev.install(mf(dev, 51, "install", bad_kat_blob, 2))
    assert acks == [*trial_acks(51, 2)[:2], (51, "REVERTED", "kat_mismatch", 2)]
    assert dev.requests


# -- 7. rejections ----------------------------------------------------------------------------


def assert_rejected_before_download(dev: Device, m: Manifest, reason: str) -> None:
    assert dev.send(m) == [(m.deploy_seq, "REJECTED", reason, m.param.version)]
    assert dev.requests == []
    assert dev.machine.rec.last_deploy_seq == m.deploy_seq


def assert_rejected_after_download(dev: Device, m: Manifest, reason: str, active: int) -> None:
    v, seq = m.param.version, m.deploy_seq
    assert dev.install(m) == [*trial_acks(seq, v)[:2], (seq, "REJECTED", reason, v)]
    assert dev.requests
    assert (dev.machine.param_version, dev.machine.state) == (active, "IDLE")
    inactive = dev.machine.rec.inactive_slot
    assert slot_state(dev)[1][inactive] == (0, None, "empty")
    assert dev.slot_bytes(inactive, 4096) == ERASED * 4096


def test_unknown_release_key_is_rejected_before_download(dev: Device, fw: Firmware) -> None:
    rogue = generate_key()
    blob = candidate_blob(fw, rogue, version=3)
    assert_rejected_before_download(
        dev, mf(dev, 60, "install", blob, 3, key_id=rogue.key_id), "unknown_key"
    )
    assert_factory_running(dev)


def test_forged_key_id_fails_the_signature(dev: Device, fw: Firmware) -> None:
    forged = bytearray(candidate_blob(fw, generate_key(), version=3))
    forged[64:68] = next(iter(fw.release_keys)).to_bytes(4, "little")
    dev.cache.add(bytes(forged))
    assert_rejected_after_download(
        dev, mf(dev, 61, "install", bytes(forged), 3), "bad_signature", 1
    )


def test_tampered_payload_is_a_hash_mismatch(dev: Device, blobs) -> None:
    tampered = bytearray(blobs.v3)
    tampered[-5] ^= 0x40
    dev.cache.add(bytes(tampered))
    assert_rejected_after_download(
        dev, mf(dev, 62, "install", bytes(tampered), 3), "hash_mismatch", 1
    )


def test_chunk_altered_in_flight_with_a_valid_crc_is_a_hash_mismatch(dev: Device, blobs) -> None:
    assert dev.send(mf(dev, 63, "install", blobs.v3, 3)) == trial_acks(63, 3)[:1]
    frames = dev.frames()
    f = decode_chunk(frames[1])
    data = bytes([f.data[0] ^ 1]) + f.data[1:]
    frames[1] = encode_chunk(
        c=f.c, deploy_seq=f.deploy_seq, index=f.index, total=f.total, data=data
    )
    acks = dev.deliver(frames) + dev.pump()
    assert acks == [(63, "VERIFYING", "verifying", 3), (63, "REJECTED", "hash_mismatch", 3)]
    assert_factory_running(dev)


def test_bytes_that_differ_from_the_manifest_hash_are_refused(dev: Device, blobs) -> None:
    # the service answers with another validly signed blob of the same length (v2 for v3)
    assert len(blobs.v2) == len(blobs.v3)
    assert dev.send(mf(dev, 64, "install", blobs.v3, 3)) == trial_acks(64, 3)[:1]
    swapped = [
        ChunkQuery(r.c, r.deploy_seq, sha(blobs.v2), r.index, r.count, r.chunk) for r in dev.queue
    ]
    frames = [f for q in swapped for f in serve_chunks(q, dev.cache)]
    assert dev.deliver(frames) == [
        (64, "VERIFYING", "verifying", 3),
        (64, "REJECTED", "hash_mismatch", 3),
    ]
    assert_factory_running(dev)


def test_schema_mismatch_in_the_manifest_is_rejected_before_download(dev: Device, blobs) -> None:
    m = with_param(mf(dev, 65, "install", blobs.v3, 3), schema_id="00" * 8)
    assert_rejected_before_download(dev, m, "schema_mismatch")
    assert_factory_running(dev)


def test_blob_for_another_schema_is_rejected_after_download(
    dev: Device, fw: Firmware, bundle: Bundle
) -> None:
    p = factory_params(fw)
    other = ParameterSchema(
        features=tuple(f"g{i}" for i in range(fw.schema.n_features)),
        classes=fw.schema.classes,
        rows=fw.schema.rows,
    )
    blob = build_blob(
        ParameterSet.create(other, p.model),
        param_version=3,
        security_epoch=0,
        key=bundle.release_key,
    )
    dev.cache.add(blob)
    # the manifest claims the firmware's schema: only the blob's signed header tells
    assert_rejected_after_download(dev, mf(dev, 65, "install", blob, 3), "schema_mismatch", 1)


def test_epoch_floor_refuses_older_epochs_before_and_after_download(dev: Device, blobs) -> None:
    install_and_confirm(dev, 66, blobs.v2e2, 2, epoch=2)
    assert dev.machine.rec.epoch_floor == 2
    dev.requests.clear()
    assert_rejected_before_download(
        dev, mf(dev, 68, "install", blobs.v3e1, 3, epoch=1), "epoch_below_floor"
    )
    # a manifest that lies about the epoch is caught by the blob's signed header
    lying = mf(dev, 69, "install", blobs.v3e1, 3, epoch=2)
    assert_rejected_after_download(dev, lying, "epoch_below_floor", 2)
    assert dev.machine.rec.epoch_floor == 2


def test_stale_version_before_and_after_download(dev: Device, blobs) -> None:
    install_and_confirm(dev, 70, blobs.v3, 3)
    dev.requests.clear()
    assert_rejected_before_download(dev, mf(dev, 72, "install", blobs.v2, 2), "stale_version")
    # the running version is not newer either
    assert_rejected_before_download(dev, mf(dev, 73, "install", blobs.v2, 3), "stale_version")
    # a manifest that claims v4 for the v2 blob: the signed header says 2 < 4
    assert_rejected_after_download(dev, mf(dev, 74, "install", blobs.v2, 4), "stale_version", 3)


def test_manifest_and_blob_disagreeing_on_the_version_is_a_bad_manifest(dev: Device, blobs):
    assert_rejected_after_download(dev, mf(dev, 75, "install", blobs.v2, 3), "bad_manifest", 1)


def test_too_large_and_truncated_blob_lengths(dev: Device, blobs) -> None:
    big = with_param(mf(dev, 76, "install", blobs.v2, 2), blob_len=dev.fw.slot_size + 1)
    assert_rejected_before_download(dev, big, "too_large")
    small = with_param(mf(dev, 77, "install", blobs.v2, 2), blob_len=159)
    assert_rejected_before_download(dev, small, "truncated")
    assert_factory_running(dev)


def test_stale_seq_is_rejected_and_changes_nothing(dev: Device, blobs) -> None:
    assert dev.send(mf(dev, 80, "none", blobs.v2, 2)) == []
    assert dev.send(mf(dev, 79, "install", blobs.v2, 2)) == [(79, "REJECTED", "stale_seq", None)]
    assert (dev.machine.rec.last_deploy_seq, dev.machine.counters.stale_manifest) == (80, 1)
    assert dev.requests == []
    assert_factory_running(dev)


def test_unsigned_wrongly_signed_and_garbage_manifests(dev: Device, blobs, bundle) -> None:
    assert dev.send(mf(dev, 5, "none", blobs.v2, 2)) == []
    m = mf(dev, 6, "install", blobs.v2, 2)
    tampered = with_param(sign_manifest(m, dev.deploy_key), version=3)
    assert dev.send_raw(m.to_json()) == [(6, "REJECTED", "bad_manifest", None)]
    assert dev.send(m, key=bundle.release_key) == [(6, "REJECTED", "bad_manifest", None)]
    assert dev.send_raw(tampered.to_json()) == [(6, "REJECTED", "bad_manifest", None)]
    assert dev.send_raw(b"\x00garbage{") == [(0, "REJECTED", "bad_manifest", None)]
    assert (dev.machine.rec.last_deploy_seq, dev.machine.counters.bad_manifest) == (5, 4)
    assert dev.requests == []
    assert dev.send_raw(b"") == []  # a cleared retained message
    assert_factory_running(dev)


def test_a_manifest_for_another_device_or_fleet_is_refused(dev: Device, blobs) -> None:
    """A captured, correctly signed manifest replayed to the same id in another fleet, or to
    another device, is REJECTED wrong_device before any download; nothing changes, not even the
    deploy_seq, so the device's own manifest under that seq still works."""
    assert (dev.machine.fleet, dev.machine.device) == (FLEET, DEVICE)
    for fleet, device in (("other-fleet", DEVICE), (FLEET, "dev-0001")):
        for action in ("install", "confirm", "revert"):
            foreign = mf(dev, 40, action, blobs.v2, 2, fleet=fleet, device=device)
            assert dev.send(foreign) == [(40, "REJECTED", "wrong_device", 2)]
            assert f"for {fleet}/{device}" in dev.acks[-1]["detail"]
    assert dev.requests == []
    assert (dev.machine.rec.last_deploy_seq, dev.machine.counters.wrong_device) == (0, 6)
    assert_factory_running(dev)
    install_and_confirm(dev, 40, blobs.v2, 2)  # its own manifest under the same deploy_seq
    foreign = mf(dev, 42, "install", blobs.v3, 3, fleet="other-fleet")
    assert dev.send(foreign) == [(42, "REJECTED", "wrong_device", 3)]
    assert (dev.machine.param_version, dev.machine.rec.last_deploy_seq) == (2, 41)


def test_an_unbound_manifest_of_the_old_format_is_refused(dev: Device, blobs) -> None:
    signed = sign_manifest(mf(dev, 44, "install", blobs.v2, 2), dev.deploy_key)
    old = json.loads(signed.to_json())
    old.update(v=1)
    del old["fleet"], old["device"]
    assert dev.send_raw(json.dumps(old).encode()) == [(0, "REJECTED", "bad_manifest", None)]
    assert "bad_version" in dev.acks[-1]["detail"]
    assert dev.requests == []
    assert_factory_running(dev)


def test_a_download_stored_under_the_old_manifest_format_is_dropped_at_boot(
    dev: Device, blobs
) -> None:
    assert dev.send(mf(dev, 46, "install", blobs.v2, 2)) == trial_acks(46, 2)[:1]
    assert dev.machine.state == "DOWNLOADING"
    rec = dev.machine.rec
    rec.desired = {k: v for k, v in (rec.desired or {}).items() if k not in ("fleet", "device")}
    rec.desired["v"] = 1  # as a firmware before format 2 stored it
    dev.machine.records.write(rec)
    dev.boot()
    assert (dev.machine.state, dev.machine.rec.desired, dev.machine.rec.pending) == (
        "IDLE", None, None,
    )  # fmt: skip
    assert_factory_running(dev)
    assert dev.install(mf(dev, 47, "install", blobs.v2, 2)) == trial_acks(47, 2)


def test_duplicate_delivery_of_a_manifest_produces_nothing(dev: Device, blobs) -> None:
    payload = sign_manifest(mf(dev, 90, "install", blobs.v2, 2), dev.deploy_key).to_json()
    assert dev.send_raw(payload) == trial_acks(90, 2)[:1]
    sent = len(dev.requests)
    assert dev.machine.on_manifest(payload) == []  # while downloading
    assert len(dev.requests) == sent
    assert dev.pump() == trial_acks(90, 2)[1:]
    assert dev.machine.on_manifest(payload) == []  # while in trial
    assert (dev.machine.state, dev.machine.param_version) == ("TRIAL", 2)


# -- 8. rollback -------------------------------------------------------------------------------


def test_rollback_reuses_the_other_slot_without_downloading(dev: Device, blobs) -> None:
    install_and_confirm(dev, 100, blobs.v2, 2)
    assert dev.send(mf(dev, 102, "install", blobs.v1, 1)) == [(102, "REJECTED", "stale_version", 1)]
    dev.requests.clear()
    acks = dev.send(mf(dev, 103, "install", blobs.v1, 1, rollback=True))
    assert acks == [(103, "VERIFYING", "verifying", 1), (103, "TRIAL", "trial", 1)]
    assert dev.requests == []
    assert slot_state(dev) == (
        "A",
        {"A": (1, sha(blobs.v1), "trial"), "B": (2, sha(blobs.v2), "confirmed")},
    )
    assert dev.send(mf(dev, 104, "confirm", blobs.v1, 1)) == [(104, "CONFIRMED", "confirmed", 1)]
    assert_factory_running(dev)
    assert dev.machine.rec.slots["B"].status == "valid"
    assert dev.requests == []


def test_install_of_the_confirmed_set_during_a_trial_reverts_without_downloading(
    dev: Device, blobs
) -> None:
    assert dev.install(mf(dev, 105, "install", blobs.v2, 2)) == trial_acks(105, 2)
    dev.requests.clear()
    acks = dev.send(mf(dev, 106, "install", blobs.v1, 1, rollback=True))
    assert acks == [
        (105, "REVERTED", "server_revert", 2),
        (106, "CONFIRMED", "confirmed", 1),
    ]
    assert dev.requests == []
    assert_factory_running(dev)


# -- 9. restarts -------------------------------------------------------------------------------


def test_restart_mid_trial_keeps_the_trial_and_its_clock(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 110, "install", blobs.v2, 2, timeout_s=100)) == trial_acks(110, 2)
    start = dev.clock.now
    dev.clock.advance(60)
    dev.boot()
    assert dev.machine.drain() == []
    assert (dev.machine.param_version, dev.machine.state, dev.machine.rec.active_slot) == (
        2,
        "TRIAL",
        "B",
    )
    dev.clock.now = start + 99.5
    assert dev.tick() == []
    dev.clock.now = start + 100
    assert dev.tick() == [(110, "REVERTED", "trial_timeout", 2)]
    assert_factory_running(dev)


def test_fault_reset_mid_trial_reverts(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 111, "install", blobs.v2, 2)) == trial_acks(111, 2)
    dev.boot(fault_reset=True)
    assert dev.handle(dev.machine.drain()) == [(111, "REVERTED", "fault_reset", 2)]
    assert dev.machine.drain() == []
    assert_factory_running(dev)
    assert dev.machine.rec.slots["B"].status == "valid"
    assert birth(dev)["update_state"] == "IDLE"


class PowerCut(BaseException):
    """The device loses power at this point."""


@pytest.mark.parametrize("kat_ok", [True, False])
def test_power_cut_before_the_kats_ran_reruns_them_at_boot(
    dev: Device, blobs, bad_kat_blob: bytes, monkeypatch: pytest.MonkeyPatch, kat_ok: bool
) -> None:
    blob = blobs.v2 if kat_ok else bad_kat_blob
    dev.cache.add(blob)

    def cut(self):
        raise PowerCut

    with monkeypatch.context() as mp:
        mp.setattr(VerifiedBlob, "run_known_answers", cut)
        dev.send(mf(dev, 112, "install", blob, 2))
        with pytest.raises(PowerCut):
            dev.pump()
    dev.boot()
    if kat_ok:
        assert dev.handle(dev.machine.drain()) == []
        assert (dev.machine.param_version, dev.machine.state) == (2, "TRIAL")
    else:
        assert dev.handle(dev.machine.drain()) == [(112, "REVERTED", "kat_mismatch", 2)]
        assert_factory_running(dev)
        assert dev.machine.rec.slots["B"].status == "bad"


def test_restart_mid_download_requests_only_the_holes(fw, bundle, blobs, tmp_path) -> None:
    dev = Device(fw, bundle.deploy_key, tmp_path, tuning=TransferTuning(checkpoint_every=4))
    dev.cache.add(blobs.v2)
    total = chunk_count(len(blobs.v2), 64)
    assert dev.send(mf(dev, 120, "install", blobs.v2, 2, chunk=64)) == trial_acks(120, 2)[:1]
    assert [(r.index, r.count) for r in dev.queue] == [(0, 4), (4, 4)]
    frames = dev.frames()
    dev.deliver(frames[:6])  # chunks 0-3 are checkpointed, 4 and 5 are not
    assert dev.machine.rec.pending is not None
    assert dev.machine.rec.pending.bitmap[0] == 0x0F
    dev.machine.simulate_power_loss()
    dev.boot()
    assert dev.machine.drain() == []
    assert dev.machine.state == "DOWNLOADING"
    dev.requests.clear()
    assert dev.pump() == trial_acks(120, 2)[1:]
    requested = [i for r in dev.requests for i in range(r.index, r.index + r.count)]
    assert sorted(requested) == list(range(4, total))
    assert dev.slot_bytes("B", len(blobs.v2)) == blobs.v2


@pytest.mark.parametrize("torn", ["newest", "older"])
def test_torn_state_record_copy_boots_from_the_other(dev: Device, blobs, torn: str) -> None:
    assert dev.install(mf(dev, 130, "install", blobs.v2, 2)) == trial_acks(130, 2)
    newest = newest_copy(dev)
    victim = newest if torn == "newest" else 1 - newest
    path = dev.storage / "state" / f"state.{victim}"
    path.write_bytes(path.read_bytes()[:-7])
    dev.boot()
    # the copy before the newest one was written on entering VERIFYING: boot re-verifies
    expected = trial_acks(130, 2)[1:] if torn == "newest" else []
    assert dev.handle(dev.machine.drain()) == expected
    assert (dev.machine.param_version, dev.machine.state) == (2, "TRIAL")
    assert dev.machine.rec.last_deploy_seq == 130
    dev.boot()
    assert dev.machine.drain() == []
    assert birth(dev)["boot"] == 3


@pytest.mark.parametrize("where", ["magic", "signature", "payload", "erased", "zeros"])
def test_corrupt_active_slot_falls_back_to_the_other_slot(dev: Device, blobs, where: str):
    install_and_confirm(dev, 140, blobs.v2, 2)
    corrupt_slot(dev, "B", where)
    dev.boot()
    assert dev.machine.counters.boots_with_corrupt_slot == 1
    assert (dev.machine.param_version, dev.machine.rec.active_slot) == (1, "A")
    assert dev.machine.rec.slots["B"].status == "bad"
    assert dev.machine.rec.last_deploy_seq == 141
    dev.boot()
    assert dev.machine.counters.boots_with_corrupt_slot == 0
    assert dev.machine.param_version == 1


@pytest.mark.parametrize("where", ["magic", "payload", "erased"])
def test_corrupt_factory_slot_restores_the_factory_set(dev: Device, where: str) -> None:
    dev.send(mf(dev, 7, "none", dev.fw.factory_blob, 1))
    corrupt_slot(dev, "A", where)
    dev.boot()
    assert dev.machine.counters.boots_with_corrupt_slot == 1
    assert_factory_running(dev)
    assert (dev.machine.rec.last_deploy_seq, birth(dev)["boot"]) == (7, 2)


def test_corrupt_trial_slot_ends_the_trial_on_the_old_slot(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 145, "install", blobs.v2, 2)) == trial_acks(145, 2)
    corrupt_slot(dev, "B", "payload")
    dev.boot()
    assert dev.machine.counters.boots_with_corrupt_slot == 1
    assert_factory_running(dev)
    assert dev.tick() == []


def test_slot_file_of_the_wrong_size_does_not_crash_the_boot(dev: Device) -> None:
    path = dev.storage / "slots" / "slot_A.bin"
    path.write_bytes(path.read_bytes()[:100])
    dev.boot()
    assert dev.machine.counters.boots_with_corrupt_slot == 1
    assert_factory_running(dev)


def corrupt_slot(dev: Device, slot: str, where: str) -> None:
    path = dev.storage / "slots" / f"slot_{slot}.bin"
    data = bytearray(path.read_bytes())
    if where == "erased":
        data[:] = ERASED * len(data)
    elif where == "zeros":
        data[:] = bytes(len(data))
    else:
        pos = {"magic": 0, "signature": 100, "payload": 400}[where]
        data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


# -- 10. download robustness -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_lossy_link_still_delivers_the_exact_blob(dev: Device, blobs, seed: int) -> None:
    chaos = Chaos(seed=seed, drop=0.3, duplicate=0.2, corrupt=0.15, reorder=True)
    assert dev.install(mf(dev, 150, "install", blobs.v3, 3, chunk=64), chaos) == trial_acks(150, 3)
    assert dev.slot_bytes("B", len(blobs.v3)) == blobs.v3
    assert dev.machine.param_version == 3
    chunks = chunk_count(len(blobs.v3), 64)
    assert len(dev.requests) > -(-chunks // 4)  # losses were re-requested


def test_unknown_blob_fails_the_download_and_a_retry_succeeds(dev: Device, blobs) -> None:
    dev.cache.discard(sha(blobs.v2))
    assert dev.install(mf(dev, 160, "install", blobs.v2, 2)) == [
        (160, "DOWNLOADING", "downloading", 2),
        (160, "FAILED", "chunk_error", 2),
    ]
    assert_factory_running(dev)
    assert slot_state(dev)[1]["B"] == (0, None, "empty")
    dev.cache.add(blobs.v2)
    assert dev.install(mf(dev, 161, "install", blobs.v2, 2)) == trial_acks(161, 2)


def test_stall_fails_with_transfer_timeout(dev: Device, blobs) -> None:
    dev.send(mf(dev, 170, "install", blobs.v2, 2, chunk=64))
    t0 = dev.clock.now
    dev.clock.now = t0 + 200
    dev.deliver(dev.frames()[:1])  # progress restarts the stall timer
    for t in (300, 499.5):  # the original deadline passes; only re-requests go out
        dev.queue.clear()
        dev.clock.now = t0 + t
        assert dev.tick() == []
        assert dev.queue
        assert dev.machine.state == "DOWNLOADING"
    dev.clock.now = t0 + 500
    assert dev.tick() == [(170, "FAILED", "transfer_timeout", 2)]
    assert_factory_running(dev)
    assert dev.machine.rec.pending is None


def test_new_install_mid_download_discards_the_partial_download(dev: Device, blobs) -> None:
    dev.send(mf(dev, 180, "install", blobs.v2, 2, chunk=64))
    old = dev.frames()
    dev.deliver(old[:3])
    assert dev.send(mf(dev, 181, "install", blobs.v3, 3, chunk=64)) == [
        (181, "DOWNLOADING", "downloading", 3)
    ]
    assert dev.acks[-1]["progress"] == [0, chunk_count(len(blobs.v3), 64)]
    stray = dev.machine.counters.stray_chunks
    assert dev.deliver(old[3:]) == []
    assert dev.machine.counters.stray_chunks == stray + len(old) - 3
    assert all(r.deploy_seq == 181 for r in dev.queue)
    assert dev.pump() == trial_acks(181, 3)[1:]
    assert dev.slot_bytes("B", len(blobs.v3)) == blobs.v3


def test_new_install_during_trial_reverts_it_first(dev: Device, blobs) -> None:
    assert dev.install(mf(dev, 190, "install", blobs.v2, 2)) == trial_acks(190, 2)
    assert dev.send(mf(dev, 191, "install", blobs.v3, 3)) == [
        (190, "REVERTED", "server_revert", 2),
        (191, "DOWNLOADING", "downloading", 3),
    ]
    assert (dev.machine.param_version, dev.machine.rec.active_slot) == (1, "A")
    assert dev.pump() == trial_acks(191, 3)[1:]
    assert slot_state(dev) == (
        "B",
        {"A": (1, sha(blobs.v1), "confirmed"), "B": (3, sha(blobs.v3), "trial")},
    )


@pytest.mark.parametrize("action", ["revert", "none", "confirm"])
def test_any_newer_manifest_discards_a_partial_download(dev: Device, blobs, action) -> None:
    dev.send(mf(dev, 200, "install", blobs.v2, 2))
    old = dev.frames()
    dev.send(mf(dev, 201, action, blobs.v2, 2))
    assert dev.machine.state == "IDLE"
    assert dev.deliver(old) == []
    assert dev.pump() == []
    assert_factory_running(dev)


def test_reinstalling_the_running_set_cancels_a_download(dev: Device, blobs) -> None:
    dev.send(mf(dev, 205, "install", blobs.v2, 2))
    old = dev.frames()
    assert dev.send(mf(dev, 206, "install", blobs.v1, 1)) == [(206, "CONFIRMED", "confirmed", 1)]
    assert dev.deliver(old) == []
    assert_factory_running(dev)


def test_rejected_install_mid_download_discards_it(dev: Device, blobs) -> None:
    dev.send(mf(dev, 207, "install", blobs.v3, 3))
    old = dev.frames()
    untrusted = 1
    assert untrusted not in dev.fw.release_keys
    assert dev.send(mf(dev, 208, "install", blobs.v2, 2, key_id=untrusted)) == [
        (208, "REJECTED", "unknown_key", 2)
    ]
    assert dev.deliver(old) == []
    assert_factory_running(dev)


# -- 11. stray and garbage frames ----------------------------------------------------------


def test_stray_and_garbage_chunk_frames(dev: Device, blobs) -> None:
    stray = encode_chunk(c=1, deploy_seq=1, index=0, total=1, data=b"x")
    assert dev.machine.on_chunk(stray) == []
    assert dev.machine.on_chunk(b"garbage") == []
    assert dev.machine.counters.stray_chunks == 2
    assert_factory_running(dev)

    dev.send(mf(dev, 210, "install", blobs.v2, 2))
    assert dev.machine.on_chunk(b"garbage") == []
    assert dev.machine.on_chunk(b"TC\x01") == []
    assert dev.machine.counters.bad_chunks == 2
    other = encode_chunk(c=1, deploy_seq=209, index=0, total=5, data=b"y" * 256)
    assert dev.machine.on_chunk(other) == []
    assert dev.machine.counters.stray_chunks == 3
    assert dev.pump() == trial_acks(210, 2)[1:]
    assert dev.slot_bytes("B", len(blobs.v2)) == blobs.v2


def test_a_refused_chunk_request_fails_the_download_retryably(dev: Device, blobs) -> None:
    dev.send(mf(dev, 211, "install", blobs.v2, 2))
    bad_request = encode_chunk(
        status=ChunkStatus.BAD_REQUEST, c=1, deploy_seq=211, index=0, total=0
    )
    assert dev.handle(dev.machine.on_chunk(bad_request)) == [(211, "FAILED", "chunk_error", 2)]
    assert dev.machine.state == "IDLE"
    assert_factory_running(dev)


def test_a_manifest_with_the_wrong_blob_length_is_rejected_not_retried(dev: Device, blobs) -> None:
    m = mf(dev, 212, "install", blobs.v2, 2).model_copy(deep=True)
    wrong = m.model_copy(
        update={"param": m.param.model_copy(update={"blob_len": len(blobs.v2) + 600})}
    )
    dev.send(wrong)
    acks = dev.pump()
    assert acks[-1] == (212, "REJECTED", "bad_manifest", 2)
    assert dev.machine.state == "IDLE"
    assert_factory_running(dev)
