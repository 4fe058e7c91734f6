"""A device's ``(boot, seq)`` sequence: in order, lost, replayed, stale, or a jump to confirm.

Every telemetry and label batch carries ``(boot, seq)``: ``seq`` counts batches and restarts at
0 when the device reboots, ``boot`` counts reboots. :class:`SequenceState` remembers the last
accepted pair and :meth:`SequenceState.advance` classifies the next one:

- same boot, ``seq = last + 1``: in order (``ok``);
- same boot, ``last + 1 < seq ≤ last + MAX_SEQ_STEP``: ``ok``, the frames between count as lost;
- same boot, ``seq ≤ last``: a duplicate or a replay (``duplicate``): QoS 1 redelivery and a
  batch re-processed after a crash are never counted twice;
- newer boot, ``boot ≤ last_boot + MAX_BOOT_STEP`` and ``seq ≤ MAX_SEQ_STEP``: a reboot
  (``ok``); the ``seq`` frames before it in the new boot count as lost;
- older boot: ``stale``;
- anything further ahead (``seq = 0xFFFFFFFF``, ``boot = 0xFFFFFFFF``): a **jump**, held
  (``sequence_jump``) until :data:`CONFIRM_FRAMES` more frames continue it in order. One forged
  or corrupt frame therefore cannot move the sequence where every real frame after it would
  be a ``duplicate`` or ``stale`` (a lockout that a checkpoint would even persist); a device
  that really skipped far ahead loses the first few frames after the skip, counted as
  ``sequence_jump``.

What one accepted frame adds to the lost count is capped at :data:`MAX_SEQ_STEP`.

A **birth** (``status`` with ``online: true``) is the device's own word on its boot counter: a
birth whose boot is older than the last accepted frame's starts a new epoch
(:meth:`SequenceState.rebase`), so a re-flashed device whose boot counter restarts at 0 is not
locked out either; the first frame of an epoch must not be older than its birth.

>>> s = SequenceState()
>>> [s.advance(boot, seq)[0] for boot, seq in
...  [(1, 0), (1, 1), (1, 1), (1, 4), (2, 0), (1, 5)]]
['ok', 'ok', 'duplicate', 'ok', 'ok', 'stale']
>>> s.advance(2, 0xFFFFFFFF)[0], s.advance(2, 1)  # a forged far jump, then the real next frame
('sequence_jump', ('ok', 0))
>>> s.rebase(0); s.advance(0, 0)  # re-flashed: its birth says boot 0
('ok', 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["CONFIRM_FRAMES", "MAX_BOOT_STEP", "MAX_SEQ_STEP", "SequenceState", "SequenceVerdict"]

SequenceVerdict = Literal["ok", "duplicate", "stale", "sequence_jump"]

MAX_SEQ_STEP: Final = 1 << 16
"""Largest step forward in ``seq`` taken at once (65,536 frames: 18 h at one frame a second);
also the most one frame adds to the lost count."""

MAX_BOOT_STEP: Final = 1 << 10
"""Largest step forward in ``boot`` taken at once (1,024 reboots between two frames)."""

CONFIRM_FRAMES: Final = 2
"""Frames that must follow a jump, in order, before the sequence moves there."""

CONFIRM_STEP: Final = 64
"""How far ahead of the previous one a frame may be and still continue a held jump."""


@dataclass(slots=True)
class SequenceState:
    """The last accepted ``(boot, seq)`` of one stream of one device, and a held jump."""

    boot: int | None = None
    seq: int | None = None
    floor_boot: int = 0
    """The boot of the device's last birth: the oldest boot the first frame of an epoch may
    have."""
    _held: tuple[int, int, int, int] | None = None
    """A jump being confirmed: ``(boot, first seq, last seq, frames seen)``."""

    def advance(self, boot: int, seq: int) -> tuple[SequenceVerdict, int]:
        """Classify ``(boot, seq)`` and, when accepted, record it; returns the verdict and the
        frames counted as lost by this one (≤ :data:`MAX_SEQ_STEP`)."""
        if self.boot is None or self.seq is None:
            # the first frame of this epoch: nothing is known of the frames before it, but a
            # frame far beyond the birth's boot or the start of a boot is still a jump
            if boot < self.floor_boot:
                return "stale", 0
            if boot - self.floor_boot <= MAX_BOOT_STEP and seq <= MAX_SEQ_STEP:
                return self._accept(boot, seq, 0)
            return self._hold(boot, seq, 0)
        if boot < self.boot:
            return "stale", 0
        if boot == self.boot:
            if seq <= self.seq:
                return "duplicate", 0
            gap = seq - self.seq - 1
            if gap < MAX_SEQ_STEP:
                return self._accept(boot, seq, gap)
            return self._hold(boot, seq, gap)
        if boot - self.boot <= MAX_BOOT_STEP and seq <= MAX_SEQ_STEP:
            return self._accept(boot, seq, seq)  # frames 0 … seq−1 of the new boot never came
        return self._hold(boot, seq, seq)

    def rebase(self, birth_boot: int) -> None:
        """A birth with boot ``birth_boot``: older than the last accepted frame's, it starts a
        new epoch (a re-flashed device)."""
        if self.boot is not None and birth_boot < self.boot:
            self.boot = self.seq = None
            self._held = None
        self.floor_boot = birth_boot

    def restore(self, boot: int, seq: int) -> None:
        """Set the last accepted pair from a checkpoint."""
        self.boot, self.seq = boot, seq
        self._held = None

    def _accept(self, boot: int, seq: int, lost: int) -> tuple[SequenceVerdict, int]:
        self.boot, self.seq = boot, seq
        return "ok", min(lost, MAX_SEQ_STEP)

    def _hold(self, boot: int, seq: int, lost: int) -> tuple[SequenceVerdict, int]:
        held = self._held
        if held is not None and held[0] == boot and 0 < seq - held[2] <= CONFIRM_STEP:
            if held[3] >= CONFIRM_FRAMES:
                self._held = None
                # lost: the frames before the jump's first (its own were counted as rejections)
                first = held[1]
                before = first if self.boot is None or boot != self.boot else lost - (seq - first)
                return self._accept(boot, seq, max(before, 0))
            self._held = (boot, held[1], seq, held[3] + 1)
            return "sequence_jump", 0
        self._held = (boot, seq, seq, 1)
        return "sequence_jump", 0
