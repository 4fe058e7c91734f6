"""The two-copy, power-fail-safe state record (README §7)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.device.state_record import (
    RECORD_HEADER_LEN,
    PendingDownload,
    RecordStore,
    SlotInfo,
    StateRecord,
    TrialInfo,
    decode_copy,
    encode_copy,
    seq_newer,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def rich_record(boot: int = 3) -> StateRecord:
    return StateRecord(
        active_slot="B",
        slots={
            "A": SlotInfo(version=3, sha256=SHA_A, status="confirmed"),
            "B": SlotInfo(version=4, sha256=SHA_B, status="trial"),
        },
        update_state="TRIAL",
        trial=TrialInfo(
            deploy_seq=13,
            started_ms=1_764_028_800_000,
            inferences=57,
            confirm="local",
            timeout_s=600,
            min_inferences=200,
        ),
        desired={"v": 1, "deploy_seq": 13, "action": "install", "param": {"version": 4}},
        last_deploy_seq=13,
        epoch_floor=1,
        boot=boot,
        pending=PendingDownload(
            deploy_seq=14, sha256=SHA_A, blob_len=1480, chunk=512, bitmap=b"\x05"
        ),
        last_ack={"state": "TRIAL", "code": 202, "progress": [3, 3]},
    )


# -- the model ---------------------------------------------------------------------------------


def test_factory_defaults() -> None:
    r = StateRecord()
    assert r.active_slot == "A"
    assert r.slots == {"A": SlotInfo(), "B": SlotInfo()}
    assert r.slots["A"].status == "empty"
    assert r.slots["A"].sha256 is None
    assert (r.update_state, r.trial, r.pending, r.desired, r.last_ack) == (
        "IDLE",
        None,
        None,
        None,
        None,
    )
    assert (r.last_deploy_seq, r.epoch_floor, r.boot) == (0, 0, 0)


def test_json_round_trip_is_canonical() -> None:
    r = rich_record()
    payload = r.to_json()
    assert StateRecord.model_validate_json(payload) == r
    doc = json.loads(payload)
    assert payload == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["pending"]["bitmap"] == "05"
    assert doc["v"] == 1
    assert doc["slots"]["B"] == {"sha256": SHA_B, "status": "trial", "version": 4}


@pytest.mark.parametrize(
    "bad",
    [
        {"active_slot": "C"},
        {"slots": {"A": {}}},
        {"update_state": "CONFIRMED"},
        {"epoch_floor": -1},
        {"boot": 2**32},
        {"slots": {"A": {"sha256": "XYZ"}, "B": {}}},
        {"slots": {"A": {"status": "weird"}, "B": {}}},
        {"v": 2},
        {"trial": {"deploy_seq": 1, "started_ms": 0}},
        {
            "trial": {
                "deploy_seq": 1,
                "started_ms": 0,
                "confirm": "x",
                "timeout_s": 1,
                "min_inferences": 0,
            }
        },
        {
            "trial": {
                "deploy_seq": 1,
                "started_ms": 0,
                "confirm": "server",
                "timeout_s": 0,
                "min_inferences": 0,
            }
        },
    ],
)
def test_invalid_records_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StateRecord.model_validate(bad)


def test_validate_assignment() -> None:
    r = StateRecord()
    r.update_state = "DOWNLOADING"
    with pytest.raises(ValidationError):
        r.update_state = "NOPE"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("blob_len", "chunk", "bitmap"),
    [
        (1480, 512, b""),  # too short
        (1480, 512, b"\x00\x00"),  # too long
        (1480, 512, b"\x08"),  # bit for chunk 3 of 3
        (4096, 512, b"\x00\x01"),  # 8 chunks: one byte
    ],
)
def test_pending_bitmap_shape(blob_len: int, chunk: int, bitmap: bytes) -> None:
    with pytest.raises(ValidationError):
        PendingDownload(deploy_seq=1, sha256=SHA_A, blob_len=blob_len, chunk=chunk, bitmap=bitmap)


def test_pending_bitmap_accepts_hex_and_bytes() -> None:
    a = PendingDownload(deploy_seq=1, sha256=SHA_A, blob_len=4096, chunk=512, bitmap="ff")
    b = PendingDownload(deploy_seq=1, sha256=SHA_A, blob_len=4096, chunk=512, bitmap=b"\xff")
    assert a == b
    assert a.total == 8
    with pytest.raises(ValidationError):
        PendingDownload(deploy_seq=1, sha256=SHA_A, blob_len=4096, chunk=512, bitmap="zz")


def test_unknown_fields_are_ignored() -> None:
    doc = json.loads(StateRecord(boot=4).to_json())
    doc["future_field"] = {"x": 1}
    assert StateRecord.model_validate(doc).boot == 4


# -- the copy format -----------------------------------------------------------------------


def test_copy_bytes_layout() -> None:
    r = StateRecord(boot=9)
    raw = encode_copy(r, 0x01020304)
    payload = r.to_json()
    magic, seq, length, crc = struct.unpack_from("<4sIII", raw)
    assert (magic, seq, length) == (b"TDSR", 0x01020304, len(payload))
    assert raw[RECORD_HEADER_LEN:] == payload
    assert crc == zlib.crc32(raw[:12] + payload)
    assert decode_copy(raw) == (0x01020304, r)


def test_encode_copy_rejects_bad_seq() -> None:
    with pytest.raises(ValueError, match="u32"):
        encode_copy(StateRecord(), 2**32)


def test_crc_protects_seq() -> None:
    raw = bytearray(encode_copy(StateRecord(), 5))
    raw[4] = 6  # a stale copy must not be able to pose as a newer one
    assert decode_copy(bytes(raw)) is None


def test_valid_crc_but_bad_json_is_invalid() -> None:
    payload = b'{"active_slot":"Z"}'
    head = struct.pack("<4sII", b"TDSR", 1, len(payload))
    raw = head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload
    assert decode_copy(raw) is None
    payload = b"not json"
    head = struct.pack("<4sII", b"TDSR", 1, len(payload))
    raw = head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload
    assert decode_copy(raw) is None


def test_seq_newer_wraps() -> None:
    assert seq_newer(0, 0xFFFF_FFFF)
    assert not seq_newer(0xFFFF_FFFF, 0)
    assert seq_newer(0x8000_0000 - 1, 0)
    assert not seq_newer(0, 0)


# -- the store -----------------------------------------------------------------------------


def test_empty_store_is_factory_state(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "nested" / "dir")
    assert store.read() is None
    assert store.read_entry() is None


def test_writes_alternate_copies(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    for n in range(1, 8):
        seq = store.write(StateRecord(boot=n))
        assert seq == n
        entry = store.read_entry()
        assert entry is not None
        assert entry.copy == (n - 1) % 2
        assert entry.seq == n
        assert entry.record.boot == n
        # the other copy still holds the previous record
        if n > 1:
            other = store.read_copy(1 - entry.copy)
            assert other is not None
            assert (other.seq, other.record.boot) == (n - 1, n - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.0", "state.1"]


def test_rich_record_survives_store(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.write(rich_record())
    assert store.read() == rich_record()
    assert RecordStore(tmp_path).read() == rich_record()  # a "reboot"


def _two_records(tmp_path: Path) -> tuple[RecordStore, bytes, bytes]:
    store = RecordStore(tmp_path, fsync=False)
    store.write(rich_record(boot=1))  # copy 0, seq 1
    store.write(rich_record(boot=2))  # copy 1, seq 2
    return store, store.copy_path(0).read_bytes(), store.copy_path(1).read_bytes()


def test_torn_newest_copy_falls_back_at_every_offset(tmp_path: Path) -> None:
    store, _, newest = _two_records(tmp_path)
    path = store.copy_path(1)
    for cut in range(len(newest)):
        path.write_bytes(newest[:cut])
        got = store.read()
        assert got is not None, cut
        assert got.boot == 1, cut


def test_torn_older_copy_keeps_newest_at_every_offset(tmp_path: Path) -> None:
    store, older, _ = _two_records(tmp_path)
    path = store.copy_path(0)
    for cut in range(len(older)):
        path.write_bytes(older[:cut])
        got = store.read()
        assert got is not None, cut
        assert got.boot == 2, cut


@pytest.mark.parametrize("copy", [0, 1])
def test_flipped_byte_anywhere_is_detected(tmp_path: Path, copy: int) -> None:
    store, *raws = _two_records(tmp_path)
    raw = raws[copy]
    survivor_boot = 2 - copy  # corrupting copy 1 (boot 2) leaves boot 1, and vice versa
    path = store.copy_path(copy)
    for off in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(raw)
            bad[off] ^= mask
            path.write_bytes(bytes(bad))
            got = store.read()
            assert got is not None
            assert got.boot == survivor_boot, (off, mask)


def test_trailing_garbage_invalidates_copy(tmp_path: Path) -> None:
    store, _, newest = _two_records(tmp_path)
    store.copy_path(1).write_bytes(newest + b"\xff" * 7)
    got = store.read()
    assert got is not None
    assert got.boot == 1


def test_write_after_torn_copy_rewrites_that_copy(tmp_path: Path) -> None:
    store, _, newest = _two_records(tmp_path)
    store.copy_path(1).write_bytes(newest[:10])  # power cut while writing seq 2
    seq = store.write(rich_record(boot=3))
    assert seq == 2  # newest valid is seq 1 in copy 0, so seq 2 goes to copy 1 again
    entry = store.read_entry()
    assert entry is not None
    assert (entry.copy, entry.seq, entry.record.boot) == (1, 2, 3)
    old = store.read_copy(0)
    assert old is not None
    assert old.record.boot == 1


def test_interrupted_replace_keeps_both_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, older, newest = _two_records(tmp_path)

    def boom(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="power cut"):
        store.write(rich_record(boot=3))
    monkeypatch.undo()
    assert store.copy_path(0).read_bytes() == older
    assert store.copy_path(1).read_bytes() == newest
    got = store.read()
    assert got is not None
    assert got.boot == 2
    # the leftover temp file is harmless and overwritten by the next write
    assert store.write(rich_record(boot=3)) == 3
    got = store.read()
    assert got is not None
    assert got.boot == 3


def test_both_copies_corrupt_is_factory_state(tmp_path: Path) -> None:
    store, older, newest = _two_records(tmp_path)
    store.copy_path(0).write_bytes(older[:-1])
    store.copy_path(1).write_bytes(b"\x00" * len(newest))
    assert store.read() is None
    # the next write starts over in copy 0
    assert store.write(StateRecord(boot=7)) == 1
    entry = store.read_entry()
    assert entry is not None
    assert (entry.copy, entry.record.boot) == (0, 7)


def test_seq_wraps_around_u32(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.copy_path(0).write_bytes(encode_copy(StateRecord(boot=1), 0xFFFF_FFFE))
    assert store.write(StateRecord(boot=2)) == 0xFFFF_FFFF  # goes to copy 1
    assert store.write(StateRecord(boot=3)) == 0  # wraps, goes to copy 0
    entry = store.read_entry()
    assert entry is not None
    assert (entry.copy, entry.seq, entry.record.boot) == (0, 0, 3)
    assert store.write(StateRecord(boot=4)) == 1
    got = store.read()
    assert got is not None
    assert got.boot == 4


def test_equal_seq_tie_prefers_copy_0(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.copy_path(0).write_bytes(encode_copy(StateRecord(boot=10), 5))
    store.copy_path(1).write_bytes(encode_copy(StateRecord(boot=11), 5))
    got = store.read()
    assert got is not None
    assert got.boot == 10


@settings(max_examples=40, deadline=None)
@given(
    boots=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=6),
    cut=st.integers(0, 10_000),
    victim_is_newest=st.booleans(),
)
def test_any_single_torn_copy_loses_at_most_the_write_in_progress(
    tmp_path_factory: pytest.TempPathFactory,
    boots: list[int],
    cut: int,
    victim_is_newest: bool,
) -> None:
    store = RecordStore(tmp_path_factory.mktemp("rec"), fsync=False)
    for b in boots:
        store.write(StateRecord(boot=b))
    newest = store.read_entry()
    assert newest is not None
    victim = newest.copy if victim_is_newest else 1 - newest.copy
    raw = store.copy_path(victim).read_bytes()
    store.copy_path(victim).write_bytes(raw[: cut % len(raw)])
    got = store.read()
    assert got is not None
    assert got.boot == (boots[-2] if victim_is_newest else boots[-1])
