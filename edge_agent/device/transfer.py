"""Device-side bookkeeping of the chunked, device-paced blob download (README §5).

``ChunkAssembler`` is pure logic plus slot writes: it decides which chunk ranges to request,
accepts decoded ``ChunkFrame``s, writes good chunks into the (inactive) slot and keeps the
bitmap of received chunks. Publishing requests and receiving frames over MQTT is the caller's
job, as is persisting ``checkpoint()``'s bitmap in the state record.

Bitmap layout (also in the state record): one bit per chunk, chunk ``i`` is byte ``i // 8``,
bit ``i % 8`` (LSB first), ``ceil(total / 8)`` bytes, padding bits 0.

>>> import hashlib, tempfile, zlib
>>> from pathlib import Path
>>> from edge_agent.wire.chunk_frame import ChunkFrame, ChunkStatus
>>> blob = bytes(range(10))
>>> with tempfile.TemporaryDirectory() as d:
...     asm = ChunkAssembler(deploy_seq=5, sha256=hashlib.sha256(blob).hexdigest(),
...                          blob_len=10, chunk=4, slot_store=SlotStore(Path(d), 64), slot="B")
...     print(asm.next_requests(0.0), asm.next_requests(0.0))
...     for i in (0, 1, 2):
...         part = blob[4 * i: 4 * i + 4]
...         _ = asm.accept(ChunkFrame(ChunkStatus.OK, 0, 5, i, 3, zlib.crc32(part), part), 0.1)
...     print(asm.progress, asm.complete, asm.verify_hash())
[(0, 1), (1, 1)] []
(3, 3) True True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.device.slot_store import SlotStore
from edge_agent.device.state_record import PendingDownload, SlotName, chunk_count
from edge_agent.wire.chunk_frame import MAX_CHUNK_DATA, ChunkFrame, ChunkStatus

__all__ = ["DEFAULT_TIMEOUT_S", "ChunkAssembler", "TransferStats"]

DEFAULT_TIMEOUT_S = 5.0
"""Default time after which an unanswered request is re-issued."""


@dataclass
class TransferStats:
    """Counters of one download (for acks, logs and the simulator)."""

    requests: int = 0
    """Requests issued by ``next_requests``."""
    timeouts: int = 0
    """Requests that expired with chunks still missing."""
    accepted: int = 0
    """New chunks written to the slot."""
    duplicates: int = 0
    """Good frames for chunks already held."""
    crc_errors: int = 0
    """Frames whose data failed the CRC."""
    bad_length: int = 0
    """Frames whose data length is wrong for their index."""
    foreign: int = 0
    """Frames for another ``deploy_seq``, or with a wrong total / index out of range."""
    status_errors: int = 0
    """Frames with a non-zero status (unknown blob, bad request)."""


@dataclass
class _Inflight:
    index: int
    count: int
    deadline: float
    waiting: set[int] = field(default_factory=set)


class ChunkAssembler:
    """Reassemble one blob of ``blob_len`` bytes, sent in chunks of ``chunk``, into ``slot``.

    With ``bitmap=None`` this is a fresh download and the slot is **erased** first; with a
    bitmap (from ``PendingDownload.bitmap`` after a restart) the slot contents are kept and only
    the holes are requested. Bad arguments raise ``ValueError``.
    """

    def __init__(
        self,
        *,
        deploy_seq: int,
        sha256: str,
        blob_len: int,
        chunk: int,
        slot_store: SlotStore,
        slot: SlotName,
        bitmap: bytes | None = None,
    ) -> None:
        """Start (``bitmap=None``) or resume a download; see the class docstring."""
        if not 1 <= chunk <= MAX_CHUNK_DATA:
            raise ValueError(f"chunk={chunk} must be in 1..{MAX_CHUNK_DATA}")
        if not 1 <= blob_len <= slot_store.slot_size:
            raise ValueError(f"blob_len={blob_len} must be in 1..{slot_store.slot_size} (slot)")
        slot_store.path(slot)  # validates the slot name
        self.deploy_seq = deploy_seq
        self.sha256 = sha256.lower()
        self.blob_len = blob_len
        self.chunk = chunk
        self.slot_store = slot_store
        self.slot: SlotName = slot
        self.total = chunk_count(blob_len, chunk)
        self.stats = TransferStats()
        self._inflight: list[_Inflight] = []
        nbytes = (self.total + 7) // 8
        if bitmap is None:
            slot_store.erase(slot)
            self._bitmap = bytearray(nbytes)
        else:
            if len(bitmap) != nbytes:
                raise ValueError(
                    f"bitmap is {len(bitmap)} bytes, {nbytes} expected for {self.total} chunks"
                )
            if self.total % 8 and bitmap[-1] >> (self.total % 8):
                raise ValueError("bitmap has bits set beyond the last chunk")
            self._bitmap = bytearray(bitmap)
        self._got = sum(b.bit_count() for b in self._bitmap)
        self._first_hole = 0
        self._advance_first_hole()

    @classmethod
    def resume(
        cls, pending: PendingDownload, slot_store: SlotStore, slot: SlotName
    ) -> ChunkAssembler:
        """Resume the partial download recorded in the state record's ``pending``."""
        return cls(
            deploy_seq=pending.deploy_seq,
            sha256=pending.sha256,
            blob_len=pending.blob_len,
            chunk=pending.chunk,
            slot_store=slot_store,
            slot=slot,
            bitmap=pending.bitmap,
        )

    # -- bitmap -----------------------------------------------------------------------------

    def has(self, index: int) -> bool:
        """True iff chunk ``index`` has been received and written."""
        return bool(self._bitmap[index >> 3] >> (index & 7) & 1)

    def _advance_first_hole(self) -> None:
        while self._first_hole < self.total and self.has(self._first_hole):
            self._first_hole += 1

    @property
    def bitmap(self) -> bytes:
        """The received-chunks bitmap (a copy), as stored in ``PendingDownload.bitmap``."""
        return bytes(self._bitmap)

    @property
    def progress(self) -> tuple[int, int]:
        """``(chunks received, total chunks)``, as in the ack's ``progress``."""
        return self._got, self.total

    @property
    def complete(self) -> bool:
        """True once every chunk is held."""
        return self._got == self.total

    def holes(self) -> list[int]:
        """Indices of the chunks not yet received, ascending."""
        return [i for i in range(self._first_hole, self.total) if not self.has(i)]

    def chunk_len(self, index: int) -> int:
        """Exact data length of chunk ``index`` (the last one may be shorter)."""
        return min(self.chunk, self.blob_len - index * self.chunk)

    def pending_download(self) -> PendingDownload:
        """The state-record ``pending`` entry describing this download right now."""
        return PendingDownload(
            deploy_seq=self.deploy_seq,
            sha256=self.sha256,
            blob_len=self.blob_len,
            chunk=self.chunk,
            bitmap=self.bitmap,
        )

    def checkpoint(self) -> PendingDownload:
        """fsync the slot, then return ``pending_download()`` for the caller to persist.

        Persist the bitmap only through this method (or after ``SlotStore.sync``), so the
        stored bitmap never claims chunks that are not yet on stable storage.
        """
        self.slot_store.sync(self.slot)
        return self.pending_download()

    def verify_hash(self) -> bool:
        """True iff the slot's first ``blob_len`` bytes hash to ``sha256`` (only when complete)."""
        return self.complete and self.slot_store.sha256(self.slot, self.blob_len) == self.sha256

    # -- requests ---------------------------------------------------------------------------

    def _pending_set(self) -> set[int]:
        out: set[int] = set()
        for req in self._inflight:
            out |= req.waiting
        return out

    def next_requests(
        self,
        now: float,
        *,
        max_inflight: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_count: int = 1,
    ) -> list[tuple[int, int]]:
        """New ``(index, count)`` requests to publish now; may be empty.

        Expired requests (``now >= issued + timeout_s``) are dropped first, so their missing
        chunks are requested again. A request stays outstanding until all its chunks arrived
        or it expires; chunks that failed the CRC or length check are immediately eligible
        again. At most ``max_inflight`` requests are outstanding; each covers up to
        ``max_count`` consecutive holes that no outstanding request is waiting for.
        """
        if max_inflight < 1 or max_count < 1 or timeout_s <= 0:
            raise ValueError("max_inflight, max_count and timeout_s must be positive")
        live = [r for r in self._inflight if r.waiting and now < r.deadline]
        self.stats.timeouts += sum(1 for r in self._inflight if r.waiting and now >= r.deadline)
        self._inflight = live
        pending = self._pending_set()
        new: list[tuple[int, int]] = []
        i = self._first_hole
        while len(self._inflight) < max_inflight and i < self.total:
            if self.has(i) or i in pending:
                i += 1
                continue
            start = i
            waiting: set[int] = set()
            while (
                i < self.total and len(waiting) < max_count and not self.has(i) and i not in pending
            ):
                waiting.add(i)
                i += 1
            count = i - start
            self._inflight.append(_Inflight(start, count, now + timeout_s, waiting))
            new.append((start, count))
            self.stats.requests += 1
        return new

    @property
    def inflight(self) -> list[tuple[int, int]]:
        """The outstanding ``(index, count)`` requests."""
        return [(r.index, r.count) for r in self._inflight if r.waiting]

    def _release(self, index: int) -> None:
        """Stop waiting for chunk ``index`` (received, or to be re-requested)."""
        for req in self._inflight:
            req.waiting.discard(index)
        self._inflight = [r for r in self._inflight if r.waiting]

    # -- frames -----------------------------------------------------------------------------

    def accept(self, frame: ChunkFrame, now: float) -> bool:
        """Take one decoded frame; return True iff its chunk is now held (new or duplicate).

        Returns False, changing nothing but counters, for a non-zero status, another
        ``deploy_seq``, a total that is not this blob's, an index out of range. A frame for
        this download with a bad CRC or a wrong data length for its index is also refused and
        its chunk becomes eligible for ``next_requests`` at once. A duplicate of a chunk already
        held is not written again. ``now`` is accepted for symmetry with ``next_requests``.
        """
        del now  # frames are accepted whenever they arrive; only requests time out
        if frame.status != ChunkStatus.OK:
            self.stats.status_errors += 1
            return False
        if (
            frame.deploy_seq != self.deploy_seq
            or frame.total != self.total
            or not 0 <= frame.index < self.total
        ):
            self.stats.foreign += 1
            return False
        index = frame.index
        if not frame.crc_ok:
            self.stats.crc_errors += 1
            if not self.has(index):
                self._release(index)
            return False
        if len(frame.data) != self.chunk_len(index):
            self.stats.bad_length += 1
            if not self.has(index):
                self._release(index)
            return False
        if self.has(index):
            self.stats.duplicates += 1
            return True
        self.slot_store.write_chunk(self.slot, index * self.chunk, frame.data)
        self._bitmap[index >> 3] |= 1 << (index & 7)
        self._got += 1
        self.stats.accepted += 1
        self._release(index)
        self._advance_first_hole()
        return True
