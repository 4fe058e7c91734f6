"""The two A/B parameter slots, simulated as two preallocated files (README §7).

Each slot is a file ``slot_A.bin`` / ``slot_B.bin`` of exactly ``slot_size`` bytes. A fresh or
erased slot is filled with ``0xFF`` (the erased state of NOR flash). Chunks are written at random
offsets (``write_chunk``), so a partial download lives in the inactive slot while the active one
is untouched.

Durability: ``write_chunk`` flushes Python's buffer but does **not** fsync unless
``fsync_chunks=True`` (or ``sync=True`` per call), because one fsync per chunk is slow. The
caller must therefore call ``sync(slot)`` *before* it persists a state record whose download
bitmap claims the chunks written since the last sync; otherwise a power cut can leave the bitmap
claiming chunks whose bytes never reached storage (which only shows up as a hash mismatch at the
end). ``ChunkAssembler.checkpoint()`` does exactly that. ``erase`` always syncs.

>>> import tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as d:
...     slots = SlotStore(Path(d), slot_size=16)
...     slots.write_chunk("B", 4, b"abcd")
...     slots.read("B", 10)
b'\\xff\\xff\\xff\\xffabcd\\xff\\xff'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final, get_args

from edge_agent.device.state_record import SlotName

__all__ = ["DEFAULT_SLOT_SIZE", "ERASED_BYTE", "SlotStore"]

DEFAULT_SLOT_SIZE: Final = 65536
"""Default slot capacity in bytes."""

ERASED_BYTE: Final = 0xFF
"""Value of every byte of an erased slot."""

_SLOT_NAMES: Final[tuple[str, ...]] = get_args(SlotName)


class SlotStore:
    """Two fixed-size parameter slots ``"A"`` and ``"B"`` backed by files in ``directory``.

    Missing slot files are created erased. An existing slot file of another size is refused
    (``ValueError``): the slot size is a firmware constant.
    """

    def __init__(
        self,
        directory: Path,
        slot_size: int = DEFAULT_SLOT_SIZE,
        *,
        fsync_chunks: bool = False,
    ) -> None:
        """Open (creating if needed) both slot files of ``slot_size`` bytes in ``directory``."""
        if slot_size <= 0:
            raise ValueError(f"slot_size must be positive, got {slot_size}")
        self.directory = Path(directory)
        self.slot_size = slot_size
        self.fsync_chunks = fsync_chunks
        self.directory.mkdir(parents=True, exist_ok=True)
        self.resized: list[str] = []
        """Slots whose file had the wrong size at open (padded or cut to ``slot_size``)."""
        for slot in _SLOT_NAMES:
            path = self.path(slot)
            if not path.exists():
                self._fill(path)
            elif (size := path.stat().st_size) != slot_size:
                # flash cannot change size: treat it as corruption, restore the geometry and let
                # the boot-time verification of the slot's contents decide what survives
                self._resize(path, size)
                self.resized.append(slot)

    def path(self, slot: str) -> Path:
        """File backing ``slot`` (``"A"`` or ``"B"``; anything else is a ``ValueError``)."""
        if slot not in _SLOT_NAMES:
            raise ValueError(f"unknown slot {slot!r}, expected one of {list(_SLOT_NAMES)}")
        return self.directory / f"slot_{slot}.bin"

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.slot_size:
            raise ValueError(
                f"{what} of {length} bytes at offset {offset} is outside the slot "
                f"(slot_size={self.slot_size})"
            )

    def _resize(self, path: Path, size: int) -> None:
        with open(path, "r+b") as fh:
            if size > self.slot_size:
                fh.truncate(self.slot_size)
            else:
                fh.seek(size)
                fh.write(bytes([ERASED_BYTE]) * (self.slot_size - size))
            fh.flush()
            os.fsync(fh.fileno())

    def _fill(self, path: Path) -> None:
        with open(path, "wb") as fh:
            fh.write(bytes([ERASED_BYTE]) * self.slot_size)
            fh.flush()
            os.fsync(fh.fileno())

    def write_chunk(
        self, slot: SlotName, offset: int, data: bytes, *, sync: bool | None = None
    ) -> None:
        """Write ``data`` at ``offset`` of ``slot``; fsync iff ``sync`` (default ``fsync_chunks``).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     SlotStore(Path(d), slot_size=8).write_chunk("A", 6, b"xyz")
        Traceback (most recent call last):
        ...
        ValueError: write of 3 bytes at offset 6 is outside the slot (slot_size=8)
        """
        path = self.path(slot)
        self._check_range("write", offset, len(data))
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)
            fh.flush()
            if self.fsync_chunks if sync is None else sync:
                os.fsync(fh.fileno())

    def read(self, slot: SlotName, length: int, offset: int = 0) -> bytes:
        """The ``length`` bytes of ``slot`` starting at ``offset``."""
        path = self.path(slot)
        self._check_range("read", offset, length)
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def erase(self, slot: SlotName) -> None:
        """Fill ``slot`` with ``0xFF`` and fsync it."""
        self._fill(self.path(slot))

    def sync(self, slot: SlotName) -> None:
        """Flush ``slot``'s file to stable storage (call before persisting a download bitmap)."""
        fd = os.open(self.path(slot), os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sha256(self, slot: SlotName, length: int) -> str:
        """Lowercase hex SHA-256 of the first ``length`` bytes of ``slot``.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     SlotStore(Path(d), slot_size=4).sha256("A", 0)[:16]
        'e3b0c44298fc1c14'
        """
        return hashlib.sha256(self.read(slot, length)).hexdigest()
