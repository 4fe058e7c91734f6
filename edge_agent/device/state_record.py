"""The power-fail-safe device state record (README §7).

The record is a small JSON document (``StateRecord``) stored as **two copy files**,
``state.0`` and ``state.1`` in the store's directory. Each copy is::

    off  type     field
      0  char[4]  magic "TDSR"
      4  u32      seq          write counter, +1 per write (mod 2**32)
      8  u32      payload_len  bytes of JSON that follow
     12  u32      crc          CRC-32 (zlib.crc32) of bytes [0, 12) followed by the payload
     16  bytes    payload      canonical JSON: sorted keys, no spaces, UTF-8

All integers are little-endian. The CRC covers the magic, ``seq`` and ``payload_len`` as well as
the payload, so a flipped bit in ``seq`` cannot make a stale copy look newest. A copy is *valid*
iff its length is exactly ``16 + payload_len``, the magic and CRC match and the payload parses and
validates as a ``StateRecord``.

``RecordStore.write`` always writes the copy that does **not** hold the newest valid record, with
``seq = newest + 1``, so a torn or interrupted write can destroy at most the copy being written
and the other copy still holds the previous record. "Newest" uses serial-number arithmetic
(RFC 1982) on the u32 ``seq``: ``a`` is newer than ``b`` iff ``(a - b) mod 2**32`` is in
``[1, 2**31)``. Because the two copies' seqs never differ by more than one write, the wrap from
``0xFFFFFFFF`` to ``0`` is handled transparently. On a tie (only possible if a copy was edited by
hand) copy 0 wins.

>>> import tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as d:
...     store = RecordStore(Path(d))
...     print(store.read())
...     store.write(StateRecord(boot=1)), store.write(StateRecord(boot=2))
...     store.read().boot
None
(1, 2)
2
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Annotated, Final, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    ValidationError,
    model_validator,
)

__all__ = [
    "MAX_PAYLOAD_LEN",
    "RECORD_FORMAT",
    "RECORD_HEADER",
    "RECORD_HEADER_LEN",
    "RECORD_MAGIC",
    "PendingDownload",
    "RecordEntry",
    "RecordStore",
    "SlotInfo",
    "SlotName",
    "SlotStatus",
    "StateRecord",
    "TrialInfo",
    "UpdateState",
    "chunk_count",
    "decode_copy",
    "encode_copy",
    "other_slot",
    "seq_newer",
]

RECORD_MAGIC: Final = b"TDSR"
"""Magic of a state-record copy file."""

RECORD_FORMAT: Final = 1
"""Version of the JSON payload (field ``v``)."""

RECORD_HEADER: Final = struct.Struct("<4sIII")
"""Copy header: magic, seq, payload_len, crc."""

RECORD_HEADER_LEN: Final = RECORD_HEADER.size

MAX_PAYLOAD_LEN: Final = 1 << 20
"""A header claiming a longer payload is invalid (guards against reading garbage)."""

_U32 = 1 << 32
_U32_MAX = _U32 - 1

SlotName = Literal["A", "B"]
SlotStatus = Literal["empty", "valid", "trial", "confirmed", "bad"]
UpdateState = Literal["IDLE", "DOWNLOADING", "VERIFYING", "TRIAL"]

U32 = Annotated[int, Field(ge=0, le=_U32_MAX)]
NonNegInt = Annotated[int, Field(ge=0)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _bytes_from_hex(value: object) -> object:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise ValueError(f"bitmap is not valid hex: {exc}") from None
    return value


HexBytes = Annotated[
    bytes,
    BeforeValidator(_bytes_from_hex),
    PlainSerializer(lambda b: b.hex(), return_type=str, when_used="json"),
]
"""``bytes`` in Python, a lowercase hex string in JSON."""


def other_slot(slot: SlotName) -> SlotName:
    """The other slot of the A/B pair.

    >>> other_slot("A"), other_slot("B")
    ('B', 'A')
    """
    return "B" if slot == "A" else "A"


def chunk_count(blob_len: int, chunk: int) -> int:
    """Number of chunks of ``chunk`` bytes needed for ``blob_len`` bytes (the last may be short).

    >>> chunk_count(1480, 512), chunk_count(1024, 512), chunk_count(1, 512)
    (3, 2, 1)
    """
    return -(-blob_len // chunk)


def seq_newer(a: int, b: int) -> bool:
    """True iff u32 sequence number ``a`` is newer than ``b`` (RFC 1982 serial arithmetic).

    >>> seq_newer(2, 1), seq_newer(1, 2), seq_newer(0, 0xFFFFFFFF), seq_newer(5, 5)
    (True, False, True, False)
    """
    return 0 < (a - b) % _U32 < (1 << 31)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=True)


class SlotInfo(_Model):
    """What the device knows about one parameter slot.

    ``sha256`` is the lowercase hex SHA-256 of the complete blob held in the slot, ``None`` when
    the slot holds nothing trustworthy.
    """

    version: U32 = 0
    sha256: Sha256Hex | None = None
    status: SlotStatus = "empty"


class TrialInfo(_Model):
    """A running trial: which deployment, when it started (device clock, ms), inferences run.

    ``confirm``, ``timeout_s`` and ``min_inferences`` copy the manifest's ``trial`` section
    (README §4), so a restart keeps the same rules and the clock keeps running from
    ``started_ms``.
    """

    deploy_seq: U32
    started_ms: NonNegInt
    inferences: NonNegInt = 0
    confirm: Literal["server", "local"]
    timeout_s: Annotated[int, Field(ge=1, le=_U32_MAX)]
    min_inferences: U32


class PendingDownload(_Model):
    """A partial download into the inactive slot, resumable after a restart.

    ``bitmap`` has one bit per chunk, chunk ``i`` at byte ``i // 8``, bit ``i % 8`` (LSB first);
    it is exactly ``ceil(total / 8)`` bytes and its padding bits are 0. In JSON it is hex.

    >>> p = PendingDownload(deploy_seq=3, sha256="0" * 64, blob_len=1480, chunk=512,
    ...                     bitmap=b"\\x05")
    >>> p.total, p.model_dump(mode="json")["bitmap"]
    (3, '05')
    """

    deploy_seq: U32
    sha256: Sha256Hex
    blob_len: Annotated[int, Field(ge=1, le=_U32_MAX)]
    chunk: Annotated[int, Field(ge=1, le=0xFFFF)]
    bitmap: HexBytes

    @property
    def total(self) -> int:
        """Number of chunks of the blob."""
        return chunk_count(self.blob_len, self.chunk)

    @model_validator(mode="after")
    def _check_bitmap(self) -> Self:
        total = self.total
        if len(self.bitmap) != (total + 7) // 8:
            raise ValueError(
                f"bitmap is {len(self.bitmap)} bytes, {(total + 7) // 8} expected for "
                f"{total} chunks"
            )
        if total % 8 and self.bitmap[-1] >> (total % 8):
            raise ValueError("bitmap has bits set beyond the last chunk")
        return self


def _default_slots() -> dict[SlotName, SlotInfo]:
    return {"A": SlotInfo(), "B": SlotInfo()}


class StateRecord(_Model):
    """The device's persistent update state (README §7). The default is the factory state.

    >>> r = StateRecord()
    >>> r.active_slot, r.slots["B"].status, r.update_state, r.inactive_slot
    ('A', 'empty', 'IDLE', 'B')
    >>> StateRecord.model_validate_json(r.to_json()) == r
    True
    """

    v: Literal[1] = RECORD_FORMAT
    active_slot: SlotName = "A"
    slots: dict[SlotName, SlotInfo] = Field(default_factory=_default_slots)
    update_state: UpdateState = "IDLE"
    trial: TrialInfo | None = None
    last_deploy_seq: U32 = 0
    epoch_floor: U32 = 0
    boot: U32 = 0
    pending: PendingDownload | None = None
    desired: dict[str, JsonValue] | None = None
    """The manifest being acted on (its JSON), kept so a restart can resume or finish it."""
    last_ack: dict[str, JsonValue] | None = None

    @model_validator(mode="after")
    def _check_slots(self) -> Self:
        if set(self.slots) != {"A", "B"}:
            raise ValueError(f"slots must hold exactly A and B, got {sorted(self.slots)}")
        return self

    @property
    def inactive_slot(self) -> SlotName:
        """The slot that is not active (where downloads go)."""
        return other_slot(self.active_slot)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces, UTF-8): the payload of a copy file."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")


class RecordEntry(NamedTuple):
    """A valid copy as read back: which file (0 or 1), its ``seq`` and the record."""

    copy: int
    seq: int
    record: StateRecord


def encode_copy(record: StateRecord, seq: int) -> bytes:
    """The bytes of one copy file holding ``record`` under sequence number ``seq``.

    >>> raw = encode_copy(StateRecord(), 1)
    >>> raw[:8].hex(" ", 4), len(raw) == 16 + int.from_bytes(raw[8:12], "little")
    ('54445352 01000000', True)
    >>> decode_copy(raw) == (1, StateRecord())
    True
    """
    if not 0 <= seq <= _U32_MAX:
        raise ValueError(f"seq={seq} does not fit in a u32")
    payload = record.to_json()
    if len(payload) > MAX_PAYLOAD_LEN:
        raise ValueError(f"state record is {len(payload)} bytes, limit {MAX_PAYLOAD_LEN}")
    head = RECORD_HEADER.pack(RECORD_MAGIC, seq, len(payload), 0)[:12]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def decode_copy(raw: bytes) -> tuple[int, StateRecord] | None:
    """``(seq, record)`` from the bytes of one copy file, or ``None`` if it is not valid.

    >>> decode_copy(b""), decode_copy(encode_copy(StateRecord(), 7)[:-1])
    (None, None)
    """
    if len(raw) < RECORD_HEADER_LEN:
        return None
    magic, seq, length, crc = RECORD_HEADER.unpack_from(raw)
    if magic != RECORD_MAGIC or length > MAX_PAYLOAD_LEN:
        return None
    if len(raw) != RECORD_HEADER_LEN + length:
        return None
    payload = raw[RECORD_HEADER_LEN:]
    if zlib.crc32(payload, zlib.crc32(raw[:12])) != crc:
        return None
    try:
        record = StateRecord.model_validate_json(payload)
    except ValidationError:
        return None
    return seq, record


class RecordStore:
    """Two-copy, power-fail-safe storage of the ``StateRecord`` in ``directory``.

    ``fsync`` (default on) flushes each copy file and the directory to stable storage before
    ``write`` returns; turn it off only in simulations that do not model power loss.
    """

    COPY_NAMES = ("state.0", "state.1")

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        """Use (and create if needed) ``directory`` for the two copy files."""
        self.directory = Path(directory)
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)

    def copy_path(self, copy: int) -> Path:
        """Path of copy file 0 or 1."""
        return self.directory / self.COPY_NAMES[copy]

    def read_copy(self, copy: int) -> RecordEntry | None:
        """The valid record in copy file ``copy``, or ``None`` (missing, torn or corrupt)."""
        try:
            raw = self.copy_path(copy).read_bytes()
        except FileNotFoundError:
            return None
        decoded = decode_copy(raw)
        if decoded is None:
            return None
        return RecordEntry(copy, decoded[0], decoded[1])

    def read_entry(self) -> RecordEntry | None:
        """The newest valid copy with its file number and ``seq``, or ``None`` if neither is."""
        entries = [e for e in (self.read_copy(0), self.read_copy(1)) if e is not None]
        if not entries:
            return None
        if len(entries) == 2 and seq_newer(entries[1].seq, entries[0].seq):
            return entries[1]
        return entries[0]

    def read(self) -> StateRecord | None:
        """The newest valid record, or ``None`` if neither copy is valid (factory state)."""
        entry = self.read_entry()
        return None if entry is None else entry.record

    def write(self, record: StateRecord) -> int:
        """Persist ``record`` into the copy not holding the newest valid record; return its seq.

        The new copy is written to a temporary file, flushed, and renamed over the copy file
        (``os.replace``), then the directory is flushed. The first write of a store goes to copy
        0 with seq 1.
        """
        newest = self.read_entry()
        if newest is None:
            copy, seq = 0, 1
        else:
            copy, seq = 1 - newest.copy, (newest.seq + 1) % _U32
        self._write_file(self.copy_path(copy), encode_copy(record, seq))
        return seq

    def _write_file(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(self.directory)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry (POSIX); a no-op where directories cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
