"""The A/B parameter slots (README §7)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_agent.device.slot_store import ERASED_BYTE, SlotStore


def test_slots_are_preallocated_and_erased(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=128)
    for slot in ("A", "B"):
        assert store.path(slot).stat().st_size == 128
        assert store.read(slot, 128) == bytes([ERASED_BYTE]) * 128


def test_default_slot_size(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    assert store.slot_size == 65536
    assert store.path("A").stat().st_size == 65536


def test_random_access_writes_and_read(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=64)
    store.write_chunk("B", 32, b"world")
    store.write_chunk("B", 0, b"hello")
    assert store.read("B", 5) == b"hello"
    assert store.read("B", 5, offset=32) == b"world"
    assert store.read("B", 3, offset=5) == b"\xff\xff\xff"
    assert store.read("A", 64) == b"\xff" * 64  # the other slot is untouched


def test_write_is_persistent_across_instances(tmp_path: Path) -> None:
    SlotStore(tmp_path, slot_size=32).write_chunk("A", 8, b"keep", sync=True)
    again = SlotStore(tmp_path, slot_size=32)
    assert again.read("A", 4, offset=8) == b"keep"


def test_write_to_the_very_end(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=16, fsync_chunks=True)
    store.write_chunk("A", 12, b"tail")
    assert store.read("A", 16)[-4:] == b"tail"
    store.write_chunk("A", 16, b"")  # empty write at the end is in bounds


@pytest.mark.parametrize(
    ("offset", "data"),
    [(13, b"tail"), (-1, b"x"), (16, b"x"), (0, b"y" * 17)],
)
def test_write_out_of_bounds(tmp_path: Path, offset: int, data: bytes) -> None:
    store = SlotStore(tmp_path, slot_size=16)
    with pytest.raises(ValueError, match=r"outside the slot \(slot_size=16\)"):
        store.write_chunk("A", offset, data)
    assert store.read("A", 16) == b"\xff" * 16  # nothing written


@pytest.mark.parametrize(("length", "offset"), [(17, 0), (1, 16), (-1, 0), (4, -2)])
def test_read_out_of_bounds(tmp_path: Path, length: int, offset: int) -> None:
    store = SlotStore(tmp_path, slot_size=16)
    with pytest.raises(ValueError, match="outside the slot"):
        store.read("A", length, offset=offset)


def test_unknown_slot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=16)
    with pytest.raises(ValueError, match="unknown slot 'C'"):
        store.write_chunk("C", 0, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown slot"):
        store.read("a", 1)  # type: ignore[arg-type]


def test_erase(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=32)
    store.write_chunk("A", 0, b"\x00" * 32)
    store.write_chunk("B", 0, b"b")
    store.erase("A")
    assert store.read("A", 32) == b"\xff" * 32
    assert store.path("A").stat().st_size == 32
    assert store.read("B", 1) == b"b"


def test_sha256(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=64)
    blob = bytes(range(40))
    store.write_chunk("B", 0, blob)
    store.sync("B")
    assert store.sha256("B", 40) == hashlib.sha256(blob).hexdigest()
    assert store.sha256("B", 41) != hashlib.sha256(blob).hexdigest()
    with pytest.raises(ValueError, match="outside the slot"):
        store.sha256("B", 65)


def test_a_slot_file_of_the_wrong_size_is_restored_to_the_slot_geometry(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, slot_size=32)
    store.write_chunk("A", 0, b"abcd")
    grown = SlotStore(tmp_path, slot_size=64)  # file shorter than the slot: padded, erased
    assert grown.resized == ["A", "B"]
    assert grown.read("A", 64) == b"abcd" + b"\xff" * 60
    shrunk = SlotStore(tmp_path, slot_size=8)  # file longer: cut
    assert shrunk.read("A", 8) == b"abcd" + b"\xff" * 4
    assert shrunk.path("B").stat().st_size == 8
    assert SlotStore(tmp_path, slot_size=8).resized == []


def test_bad_slot_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        SlotStore(tmp_path, slot_size=0)
