"""Chunked blob transfer (README §5): the frame codec, the device assembler, the server."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.device.slot_store import SlotStore
from edge_agent.device.state_record import RecordStore, StateRecord
from edge_agent.device.transfer import ChunkAssembler
from edge_agent.wire.chunk_frame import (
    CHUNK_HEADER_LEN,
    ChunkFrame,
    ChunkStatus,
    decode_chunk,
    encode_chunk,
)
from edge_agent.wire.errors import WireError
from service.rollout.chunk_server import BlobCache, ChunkQuery, serve_chunks

# -- frame codec ---------------------------------------------------------------------------


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    return info.value.reason


def test_frame_bytes_exactly() -> None:
    raw = encode_chunk(c=0x11223344, deploy_seq=13, index=5, total=7, data=b"hello")
    crc = zlib.crc32(b"hello")
    expected = (
        b"TC"
        + bytes([1, 0])
        + (0x11223344).to_bytes(4, "little")
        + (13).to_bytes(4, "little")
        + (5).to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + crc.to_bytes(4, "little")
        + (5).to_bytes(2, "little")
        + b"\x00\x00"
        + b"hello"
    )
    assert raw == expected
    assert CHUNK_HEADER_LEN == 28
    frame = decode_chunk(raw)
    assert frame == ChunkFrame(ChunkStatus.OK, 0x11223344, 13, 5, 7, crc, b"hello")
    assert frame.crc_ok


@given(
    status=st.sampled_from(list(ChunkStatus)),
    c=st.integers(0, 2**32 - 1),
    deploy_seq=st.integers(0, 2**32 - 1),
    index=st.integers(0, 2**32 - 1),
    total=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=600),
)
def test_frame_round_trip(
    status: ChunkStatus, c: int, deploy_seq: int, index: int, total: int, data: bytes
) -> None:
    raw = encode_chunk(
        status=status, c=c, deploy_seq=deploy_seq, index=index, total=total, data=data
    )
    assert len(raw) == 28 + len(data)
    frame = decode_chunk(raw)
    assert frame == ChunkFrame(status, c, deploy_seq, index, total, zlib.crc32(data), data)
    assert frame.crc_ok
    assert frame.encode() == raw
    assert decode_chunk(bytearray(raw)) == frame
    assert decode_chunk(memoryview(raw)) == frame


def test_max_data_length() -> None:
    data = b"\xab" * 0xFFFF
    frame = decode_chunk(encode_chunk(c=0, deploy_seq=0, index=0, total=1, data=data))
    assert frame.data == data
    with pytest.raises(ValueError, match="at most 65535"):
        encode_chunk(c=0, deploy_seq=0, index=0, total=1, data=data + b"!")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"c": -1},
        {"deploy_seq": 2**32},
        {"index": -1},
        {"total": 2**32},
        {"status": 3},
        {"crc32": 2**32},
    ],
)
def test_encode_refuses_out_of_range(kwargs: dict[str, int]) -> None:
    args: dict[str, int] = {"c": 0, "deploy_seq": 0, "index": 0, "total": 1} | kwargs
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by field
        encode_chunk(**args)  # type: ignore[arg-type]


def test_crc_mismatch_is_decoded_not_rejected() -> None:
    raw = bytearray(encode_chunk(c=1, deploy_seq=2, index=0, total=1, data=b"payload"))
    raw[-1] ^= 0x01
    frame = decode_chunk(bytes(raw))
    assert not frame.crc_ok
    forged = decode_chunk(encode_chunk(c=1, deploy_seq=2, index=0, total=1, data=b"x", crc32=0))
    assert not forged.crc_ok


def test_truncated_at_every_offset() -> None:
    raw = encode_chunk(c=1, deploy_seq=2, index=3, total=4, data=b"0123456789")
    for cut in range(len(raw)):
        assert reason_of(lambda cut=cut: decode_chunk(raw[:cut])) == "truncated", cut  # type: ignore[misc]


def test_trailing_bytes() -> None:
    raw = encode_chunk(c=1, deploy_seq=2, index=3, total=4, data=b"abc")
    assert reason_of(lambda: decode_chunk(raw + b"\x00")) == "trailing_bytes"


def test_bad_magic_version_status_reserved() -> None:
    raw = encode_chunk(c=1, deploy_seq=2, index=3, total=4, data=b"abc")
    assert reason_of(lambda: decode_chunk(b"TF" + raw[2:])) == "decode"
    assert reason_of(lambda: decode_chunk(b"X")) == "decode"
    assert reason_of(lambda: decode_chunk(raw[:2] + b"\x02" + raw[3:])) == "bad_version"
    assert reason_of(lambda: decode_chunk(raw[:2] + b"\x00")) == "bad_version"
    assert reason_of(lambda: decode_chunk(raw[:3] + b"\x03" + raw[4:])) == "decode"
    assert reason_of(lambda: decode_chunk(raw[:26] + b"\x01\x00" + raw[28:])) == "decode"
    assert reason_of(lambda: decode_chunk("TC not bytes")) == "decode"  # type: ignore[arg-type]
    assert reason_of(lambda: decode_chunk(None)) == "decode"  # type: ignore[arg-type]


def test_length_field_longer_than_message_is_truncated() -> None:
    raw = bytearray(encode_chunk(c=1, deploy_seq=2, index=3, total=4, data=b"abc"))
    struct.pack_into("<H", raw, 24, 4)
    assert reason_of(lambda: decode_chunk(bytes(raw))) == "truncated"
    struct.pack_into("<H", raw, 24, 2)
    assert reason_of(lambda: decode_chunk(bytes(raw))) == "trailing_bytes"


@given(st.binary(max_size=80))
def test_decoder_raises_only_wire_error(raw: bytes) -> None:
    for candidate in (raw, b"TC\x01" + raw):
        reason = "ok"
        try:
            frame = decode_chunk(candidate)
        except WireError as exc:
            reason = exc.reason
        if reason == "ok":
            assert len(candidate) == 28 + len(frame.data)
        assert reason in {"ok", "decode", "truncated", "trailing_bytes", "bad_version"}


# -- device assembler ----------------------------------------------------------------------

BLOB = bytes(random.Random(1).randrange(256) for _ in range(1000))
SHA = hashlib.sha256(BLOB).hexdigest()
CHUNK = 128  # 8 chunks, the last one 104 bytes
TOTAL = 8


def frame_for(
    index: int,
    *,
    deploy_seq: int = 13,
    blob: bytes = BLOB,
    chunk: int = CHUNK,
    total: int | None = None,
    data: bytes | None = None,
    crc32: int | None = None,
) -> ChunkFrame:
    payload = blob[index * chunk : (index + 1) * chunk] if data is None else data
    n = -(-len(blob) // chunk) if total is None else total
    raw = encode_chunk(c=0, deploy_seq=deploy_seq, index=index, total=n, data=payload, crc32=crc32)
    return decode_chunk(raw)


@pytest.fixture
def slots(tmp_path: Path) -> SlotStore:
    return SlotStore(tmp_path / "slots", slot_size=4096)


def new_assembler(slots: SlotStore, bitmap: bytes | None = None) -> ChunkAssembler:
    return ChunkAssembler(
        deploy_seq=13,
        sha256=SHA,
        blob_len=len(BLOB),
        chunk=CHUNK,
        slot_store=slots,
        slot="B",
        bitmap=bitmap,
    )


def test_in_order_download(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert asm.total == TOTAL
    assert asm.progress == (0, TOTAL)
    assert asm.chunk_len(0) == 128
    assert asm.chunk_len(7) == 1000 - 7 * 128
    now = 0.0
    while not asm.complete:
        for index, count in asm.next_requests(now):
            for i in range(index, index + count):
                assert asm.accept(frame_for(i), now)
        now += 0.1
    assert asm.progress == (TOTAL, TOTAL)
    assert asm.bitmap == b"\xff"
    assert asm.verify_hash()
    assert slots.read("B", len(BLOB)) == BLOB
    assert slots.read("A", 16) == b"\xff" * 16  # the active slot is untouched
    assert asm.stats.accepted == TOTAL
    assert asm.stats.requests == TOTAL


def test_max_inflight_and_count(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert asm.next_requests(0.0) == [(0, 1), (1, 1)]
    assert asm.next_requests(0.5) == []  # two outstanding already
    assert asm.inflight == [(0, 1), (1, 1)]
    assert asm.accept(frame_for(1), 0.6)
    assert asm.next_requests(0.7, max_count=4) == [(2, 4)]
    assert asm.next_requests(0.7, max_inflight=3, max_count=4) == [(6, 2)]
    assert asm.next_requests(0.8, max_inflight=10, max_count=4) == []  # nothing left to ask


def test_dropped_chunk_is_re_requested_after_timeout(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert asm.next_requests(0.0, timeout_s=2.0, max_count=3) == [(0, 3), (3, 3)]
    for i in (0, 2, 3, 4, 5):  # chunk 1 is lost
        assert asm.accept(frame_for(i), 0.1)
    assert asm.next_requests(1.0, timeout_s=2.0) == [(6, 1)]  # (0, 3) still waits for 1
    assert asm.next_requests(1.99, timeout_s=2.0) == []
    assert asm.next_requests(2.0, timeout_s=2.0) == [(1, 1)]  # expired: ask again
    assert asm.stats.timeouts == 1
    assert asm.holes() == [1, 6, 7]


def test_duplicates_are_idempotent(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    asm.next_requests(0.0)
    assert asm.accept(frame_for(0), 0.0)
    slots.write_chunk("B", 0, b"\x00")  # would be overwritten if the duplicate were written
    assert asm.accept(frame_for(0), 0.1)
    assert slots.read("B", 1) == b"\x00"
    assert asm.progress == (1, TOTAL)
    assert asm.stats.duplicates == 1


def test_reordered_and_unsolicited_chunks(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    for i in reversed(range(TOTAL)):
        assert asm.accept(frame_for(i), 0.0)
    assert asm.complete
    assert asm.verify_hash()
    assert asm.next_requests(1.0) == []


def test_crc_failure_is_re_requested_at_once(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert asm.next_requests(0.0, max_count=2) == [(0, 2), (2, 2)]
    bad = frame_for(1, crc32=zlib.crc32(BLOB[128:256]) ^ 1)
    assert not bad.crc_ok
    assert not asm.accept(bad, 0.1)
    assert asm.accept(frame_for(0), 0.1)  # request (0, 2) is done: 0 arrived, 1 must be re-asked
    assert asm.next_requests(0.2, max_count=2) == [(1, 1)]
    assert asm.stats.crc_errors == 1
    assert not asm.has(1)
    assert slots.read("B", 1, offset=128) == b"\xff"  # nothing written


def test_crc_failure_of_held_chunk_changes_nothing(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert asm.accept(frame_for(0), 0.0)
    assert not asm.accept(frame_for(0, data=b"\x00" * 128, crc32=zlib.crc32(BLOB[:128])), 0.0)
    assert asm.has(0)
    assert slots.read("B", 128) == BLOB[:128]


def test_wrong_deploy_seq_total_or_index(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert not asm.accept(frame_for(0, deploy_seq=12), 0.0)
    assert not asm.accept(frame_for(0, total=9), 0.0)
    assert not asm.accept(frame_for(8, total=8, data=b"x"), 0.0)
    assert asm.progress == (0, TOTAL)
    assert asm.stats.foreign == 3
    assert slots.read("B", 128) == b"\xff" * 128


def test_wrong_data_length(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    assert not asm.accept(frame_for(0, data=BLOB[:127]), 0.0)
    assert not asm.accept(frame_for(7, data=BLOB[7 * 128 :] + b"\x00"), 0.0)
    assert not asm.accept(frame_for(7, data=BLOB[7 * 128 : -1]), 0.0)
    assert asm.accept(frame_for(7), 0.0)  # the short last chunk
    assert asm.stats.bad_length == 3
    assert asm.progress == (1, TOTAL)


def test_error_status_frames(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    for status in (ChunkStatus.UNKNOWN_BLOB, ChunkStatus.BAD_REQUEST):
        frame = decode_chunk(encode_chunk(status=status, c=0, deploy_seq=13, index=0, total=0))
        assert not asm.accept(frame, 0.0)
    assert asm.stats.status_errors == 2
    assert asm.progress == (0, TOTAL)


def test_fresh_download_erases_the_slot(slots: SlotStore) -> None:
    slots.write_chunk("B", 0, b"stale bytes")
    new_assembler(slots)
    assert slots.read("B", 11) == b"\xff" * 11


def test_resume_after_reboot_requests_only_holes(tmp_path: Path, slots: SlotStore) -> None:
    records = RecordStore(tmp_path / "state")
    asm = new_assembler(slots)
    for i in (0, 1, 2, 5):
        assert asm.accept(frame_for(i), 0.0)
    records.write(StateRecord(update_state="DOWNLOADING", pending=asm.checkpoint()))
    assert asm.accept(frame_for(6), 0.0)  # received after the last checkpoint: lost on reboot
    del asm

    # --- reboot ---
    slots2 = SlotStore(tmp_path / "slots", slot_size=4096)
    record = RecordStore(tmp_path / "state").read()
    assert record is not None
    assert record.pending is not None
    assert record.pending.bitmap == bytes([0b0010_0111])
    resumed = ChunkAssembler.resume(record.pending, slots2, record.inactive_slot)
    assert resumed.progress == (4, TOTAL)
    assert resumed.holes() == [3, 4, 6, 7]
    asked: list[int] = []
    now = 0.0
    while not resumed.complete:
        for index, count in resumed.next_requests(now, max_inflight=2, max_count=8):
            asked.extend(range(index, index + count))
            for i in range(index, index + count):
                resumed.accept(frame_for(i), now)
        now += 1.0
    assert asked == [3, 4, 6, 7]
    assert resumed.verify_hash()
    assert slots2.read("B", len(BLOB)) == BLOB


def test_pending_download_round_trips_through_record(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    asm.accept(frame_for(3), 0.0)
    pending = asm.pending_download()
    assert (pending.deploy_seq, pending.sha256, pending.blob_len, pending.chunk) == (
        13,
        SHA,
        1000,
        128,
    )
    assert pending.bitmap == b"\x08"
    back = StateRecord.model_validate_json(StateRecord(pending=pending).to_json()).pending
    assert back == pending


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk": 0}, "chunk=0"),
        ({"chunk": 65536}, "chunk=65536"),
        ({"blob_len": 0}, "blob_len=0"),
        ({"blob_len": 4097}, "blob_len=4097"),
        ({"bitmap": b""}, "bitmap is 0 bytes"),
        ({"bitmap": b"\x00\x00"}, "bitmap is 2 bytes"),
        ({"blob_len": 800, "bitmap": b"\x80"}, "beyond the last chunk"),
        ({"slot": "C"}, "unknown slot"),
    ],
)
def test_assembler_argument_checks(slots: SlotStore, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "deploy_seq": 13,
        "sha256": SHA,
        "blob_len": 1000,
        "chunk": 128,
        "slot_store": slots,
        "slot": "B",
    } | kwargs
    with pytest.raises(ValueError, match=match):
        ChunkAssembler(**args)  # type: ignore[arg-type]


def test_next_requests_argument_checks(slots: SlotStore) -> None:
    asm = new_assembler(slots)
    with pytest.raises(ValueError, match="positive"):
        asm.next_requests(0.0, max_inflight=0)
    with pytest.raises(ValueError, match="positive"):
        asm.next_requests(0.0, timeout_s=0)


def test_verify_hash_detects_wrong_bytes(slots: SlotStore) -> None:
    other = bytes(len(BLOB))
    asm = new_assembler(slots)
    for i in range(TOTAL):
        assert asm.accept(frame_for(i, blob=other), 0.0)
    assert asm.complete
    assert not asm.verify_hash()


# -- service side --------------------------------------------------------------------------


def query(**kwargs: object) -> ChunkQuery:
    base: dict[str, object] = {
        "c": 17,
        "deploy_seq": 13,
        "sha256": SHA,
        "index": 0,
        "count": 1,
        "chunk": CHUNK,
    }
    return ChunkQuery(**(base | kwargs))  # type: ignore[arg-type]


@pytest.fixture
def cache() -> BlobCache:
    c = BlobCache()
    assert c.add(BLOB, SHA) == SHA
    return c


def test_blob_cache(cache: BlobCache) -> None:
    assert SHA in cache
    assert SHA.upper() in cache
    assert cache.get(SHA) == BLOB
    assert len(cache) == 1
    with pytest.raises(ValueError, match="hashes to"):
        cache.add(b"other", SHA)
    cache.discard(SHA)
    assert cache.get(SHA) is None
    assert 5 not in cache


def test_serve_range(cache: BlobCache) -> None:
    frames = [decode_chunk(f) for f in serve_chunks(query(index=5, count=3), cache)]
    assert [f.index for f in frames] == [5, 6, 7]
    assert all(f.status == ChunkStatus.OK and f.crc_ok for f in frames)
    assert all((f.c, f.deploy_seq, f.total) == (17, 13, TOTAL) for f in frames)
    assert b"".join(f.data for f in frames) == BLOB[5 * CHUNK :]


def test_serve_cuts_at_end_and_at_max_count(cache: BlobCache) -> None:
    assert len(serve_chunks(query(index=6, count=10), cache)) == 2
    assert len(serve_chunks(query(index=0, count=100, chunk=16), cache)) == 16
    assert len(serve_chunks(query(index=0, count=100, chunk=16), cache, max_count=4)) == 4


def test_serve_unknown_blob(cache: BlobCache) -> None:
    (raw,) = serve_chunks(query(sha256="0" * 64, index=3), cache)
    f = decode_chunk(raw)
    assert (f.status, f.c, f.deploy_seq, f.index, f.total, f.data) == (
        ChunkStatus.UNKNOWN_BLOB,
        17,
        13,
        3,
        0,
        b"",
    )


@pytest.mark.parametrize(
    ("kwargs", "total"),
    [
        ({"index": TOTAL}, TOTAL),
        ({"index": -1}, TOTAL),
        ({"count": 0}, TOTAL),
        ({"chunk": 0}, 0),
        ({"chunk": 70000}, 0),
    ],
)
def test_serve_bad_request(cache: BlobCache, kwargs: dict[str, int], total: int) -> None:
    (raw,) = serve_chunks(query(**kwargs), cache)
    f = decode_chunk(raw)
    assert (f.status, f.total, f.data) == (ChunkStatus.BAD_REQUEST, total, b"")
    assert f.index == max(kwargs.get("index", 0), 0)


def test_serve_respects_max_chunk(cache: BlobCache) -> None:
    (raw,) = serve_chunks(query(chunk=512), cache, max_chunk=256)
    assert decode_chunk(raw).status == ChunkStatus.BAD_REQUEST
    with pytest.raises(ValueError, match="max_count"):
        serve_chunks(query(), cache, max_count=0)


def test_serve_chunk_larger_than_blob(cache: BlobCache) -> None:
    (raw,) = serve_chunks(query(chunk=65535), cache)
    f = decode_chunk(raw)
    assert (f.total, f.data) == (1, BLOB)


def test_serve_accepts_the_wire_request_model(cache: BlobCache) -> None:
    from edge_agent.wire.messages import ChunkRequest

    req = ChunkRequest.create(c=17, deploy_seq=13, sha256=SHA, index=2, count=2, chunk=CHUNK)
    frames = [decode_chunk(f) for f in serve_chunks(req, cache)]
    assert [(f.c, f.deploy_seq, f.index) for f in frames] == [(17, 13, 2), (17, 13, 3)]
    assert b"".join(f.data for f in frames) == BLOB[2 * CHUNK : 4 * CHUNK]


# -- end to end, no MQTT -------------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    blob=st.binary(min_size=1, max_size=3000),
    chunk=st.integers(1, 700),
    max_inflight=st.integers(1, 4),
    max_count=st.integers(1, 6),
    p_drop=st.floats(0.0, 0.5),
    p_dup=st.floats(0.0, 0.5),
    p_corrupt=st.floats(0.0, 0.3),
    reboot_at=st.integers(0, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_network_reassembles_exact_blob(
    tmp_path_factory: pytest.TempPathFactory,
    blob: bytes,
    chunk: int,
    max_inflight: int,
    max_count: int,
    p_drop: float,
    p_dup: float,
    p_corrupt: float,
    reboot_at: int,
    seed: int,
) -> None:
    rnd = random.Random(seed)  # network behaviour; st.randoms() would make huge examples
    chunk = min(chunk, len(blob)) if rnd.random() < 0.2 else chunk
    root = tmp_path_factory.mktemp("e2e")
    cache = BlobCache()
    sha = cache.add(blob)
    cache.add(b"some other blob")
    slots = SlotStore(root, slot_size=4096)
    asm = ChunkAssembler(
        deploy_seq=9, sha256=sha, blob_len=len(blob), chunk=chunk, slot_store=slots, slot="A"
    )
    saved = asm.checkpoint()
    network: list[bytes] = []
    now = 0.0
    c = 0
    for step in range(5000):
        if asm.complete:
            break
        if step == reboot_at:  # power cut: unsaved progress and in-flight frames are lost
            network.clear()
            asm = ChunkAssembler.resume(saved, SlotStore(root, slot_size=4096), "A")
        for index, count in asm.next_requests(
            now, max_inflight=max_inflight, timeout_s=3.0, max_count=max_count
        ):
            c += 1
            req = ChunkQuery(c=c, deploy_seq=9, sha256=sha, index=index, count=count, chunk=chunk)
            for raw in serve_chunks(req, cache):
                if rnd.random() < p_drop:
                    continue
                if rnd.random() < p_corrupt:
                    bad = bytearray(raw)
                    bad[rnd.randrange(28, len(bad))] ^= 1 << rnd.randrange(8)
                    raw = bytes(bad)
                network.append(raw)
                if rnd.random() < p_dup:
                    network.append(raw)
        if rnd.random() < 0.1:  # a stale frame of an older deployment
            network.append(encode_chunk(c=0, deploy_seq=8, index=0, total=1, data=b"\x00"))
        rnd.shuffle(network)
        k = rnd.randint(0, len(network))  # the rest arrives in a later round (reordering)
        deliver, network = network[:k], network[k:]
        for raw in deliver:
            asm.accept(decode_chunk(raw), now)
        if step % 3 == 0:
            saved = asm.checkpoint()
        now += 1.0
    assert asm.complete, asm.progress
    assert asm.verify_hash()
    assert slots.read("A", len(blob)) == blob
