"""What an operator declares normal for a fleet, turned into a floor on layer A's block sizes.

Layer A learns each signal stream's dependence from the data
(:mod:`service.drift.long_run_variance`): the smallest block of frames past which block means are
nearly independent. A pattern slower than what the learning stretch shows, or one it happens not
to show, can pass for a plateau at too small a block. An operator who knows the fleet's time
scales declares them (``ServiceSettings.fleet_normal``, :class:`DeclaredNormal`):

- ``period_s``: a cycle present in normal operation (a daily temperature, a machine's duty
  cycle). A block of ``T`` seconds keeps ``sinc²(T/P)`` of a cycle's variance in its means
  (``sinc x = sin πx / πx``), at most 4.7 % for any ``T`` in ``[P, 2P)``: the floor is the
  smallest power-of-two block of at least **one period**.
- ``session_s``: the longest normal session or dwell (a user walks for minutes). For sessions of
  length ``S`` back to back (the worst case: a triangular autocorrelation over ``S``) the
  batch-means variance at block ``b ≥ S`` is ``σ²_LR (1 − S / 3b)``: at ``b = S`` the residual
  inflation is κ = 1.5, at ``b = 2S`` 1.2. The floor is the smallest power-of-two block of at
  least **two sessions**, which leaves most of ``κ_max = 2`` to the estimate's own noise.

The floor is in frames (batch means count frames), so seconds are converted with the device's
own frame interval, measured from the frames' timestamps (:class:`FrameClock`). Above the floor
the data still decides: a stream starts at the smallest block ≥ the floor whose next levels
show a plateau (``choose_blocks(min_block=…)``).

The batch means keep blocks up to ``2^(levels − 1)`` frames and choose a block only with
``lookahead`` levels above it, so the largest block a stream can start with is
:data:`LARGEST_BLOCK` (512 frames). A declaration that needs more cannot be calibrated on that
device: its monitor says so (``CalibrationStatus.declared_too_long`` and ``reason``) instead of
waiting for ever.

>>> DeclaredNormal(session_s=30.0).block_frames(1.0)  # 2 × 30 s at 1 s per frame → 64
64
>>> DeclaredNormal(period_s=600.0, session_s=30.0).block_frames(2.0)  # 300 frames → 512
512
>>> clock = FrameClock()
>>> for ts in [0, 1000, 2000, 2000, 1500, 2500, 3500, 90_000, 91_000, 92_000, 93_000]:
...     clock.note(0, ts)
>>> clock.interval_s  # equal and backward timestamps are skipped, the jump is outvoted
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from service.drift.long_run_variance import DEFAULT_LEVELS, DEFAULT_LOOKAHEAD

__all__ = [
    "LARGEST_BLOCK",
    "PERIODS_PER_BLOCK",
    "SESSIONS_PER_BLOCK",
    "DeclaredNormal",
    "FrameClock",
]

LARGEST_BLOCK: Final = 1 << (DEFAULT_LEVELS - 1 - DEFAULT_LOOKAHEAD)
"""The largest block (frames) :func:`~service.drift.long_run_variance.choose_blocks` can choose
from :class:`~service.drift.long_run_variance.DyadicBatchMeans` of the default depth."""
PERIODS_PER_BLOCK: Final = 1.0
"""A block spans at least one declared period (≤ 4.7 % of the cycle's variance is left)."""
SESSIONS_PER_BLOCK: Final = 2.0
"""A block spans at least two declared sessions (residual κ ≤ 1.2 from back-to-back sessions)."""

RING: Final = 32
"""Latest frame intervals a :class:`FrameClock` keeps."""
MIN_INTERVALS: Final = 8
"""Intervals a :class:`FrameClock` needs before it trusts their median."""


@dataclass(frozen=True, slots=True)
class DeclaredNormal:
    """A fleet's declared normal time scales, in seconds (``None``: not declared)."""

    period_s: float | None = None
    """A cycle present in normal operation."""
    session_s: float | None = None
    """The longest normal session or dwell."""

    def __post_init__(self) -> None:
        for name in ("period_s", "session_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0.0):
                raise ValueError(f"{name} must be a positive, finite number of seconds, got {v}")
        if self.period_s is None and self.session_s is None:
            raise ValueError("declare period_s and/or session_s")

    @property
    def span_s(self) -> float:
        """The time a block must span: one period, two sessions, whichever is longer."""
        return max(
            PERIODS_PER_BLOCK * (self.period_s or 0.0), SESSIONS_PER_BLOCK * (self.session_s or 0.0)
        )

    def block_frames(self, interval_s: float) -> int:
        """The smallest power-of-two block of frames ``interval_s`` apart spanning
        :attr:`span_s` (1 if a frame already does)."""
        if not (math.isfinite(interval_s) and interval_s > 0.0):
            raise ValueError("interval_s must be positive and finite")
        # a hair under the exact ratio: 64.0000001 frames is a block of 64, not 128
        frames = max(1, math.ceil(self.span_s / interval_s * (1.0 - 1e-9)))
        return 1 << (frames - 1).bit_length()

    def state(self) -> dict[str, Any]:
        """Its two numbers (checkpoints)."""
        return {"period_s": self.period_s, "session_s": self.session_s}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DeclaredNormal:
        """Inverse of :meth:`state` (validated as when declared)."""
        p, s = state["period_s"], state["session_s"]
        return cls(None if p is None else float(p), None if s is None else float(s))

    def describe(self) -> str:
        """``period 86400 s, session 600 s`` (what was declared)."""
        parts = []
        if self.period_s is not None:
            parts.append(f"period {self.period_s:g} s")
        if self.session_s is not None:
            parts.append(f"session {self.session_s:g} s")
        return ", ".join(parts)


def _median(values: list[int]) -> float:
    """``float(np.median(values))`` of a few integer intervals, without numpy's overhead (the
    same value: the middle one, or the mean of the middle two, exact below 2⁵³).

    >>> _median([5, 1, 3]), _median([4, 1, 3, 2]), float(np.median([4, 1, 3, 2]))
    (3.0, 2.5, 2.5)
    """
    v = sorted(values)
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2


class FrameClock:
    """A device's interval between frames, from the frames' timestamps (its own clock).

    Each frame gives the interval since the previous one of the same boot (a reboot may restart
    the clock). Intervals ≤ 0 (the same timestamp twice, a clock set back) are skipped; a clock
    jump forward is one long interval, outvoted by the median of the latest :data:`RING`. The
    interval is that median once :data:`MIN_INTERVALS` are in, updated every
    :data:`MIN_INTERVALS` intervals and only ever shortened: a device that starts sending
    faster gets more frames per declared second (a larger floor); one that slows down keeps
    the floor it had, which only makes its blocks span longer. :meth:`stop` ends the
    measurement (when layer A's learning is over) and releases the ring.
    """

    def __init__(self) -> None:
        self._ring: npt.NDArray[np.int64] | None = np.zeros(RING, dtype=np.int64)
        self._n = 0
        """Intervals taken."""
        self._last: tuple[int, int] | None = None
        """``(boot, ts_ms)`` of the last frame."""
        self._stop = False
        self.interval_ms: float | None = None
        """The shortest median interval so far (``None``: not known yet)."""

    def state(self) -> dict[str, Any]:
        """Numbers and a copy of the ring that :meth:`from_state` restores (checkpoints)."""
        return {
            "ring": None if self._ring is None else self._ring.copy(),
            "n": self._n,
            "last": None if self._last is None else list(self._last),
            "stop": self._stop,
            "interval_ms": self.interval_ms,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FrameClock:
        """Inverse of :meth:`state`; ``ValueError`` on a ring of another size."""
        clock = cls()
        ring = state["ring"]
        if ring is not None:
            ring = np.asarray(ring, dtype=np.int64)
            if ring.shape != (RING,):
                raise ValueError(f"frame clock ring of shape {ring.shape}")
        clock._ring = ring
        clock._n = int(state["n"])
        last = state["last"]
        clock._last = None if last is None else (int(last[0]), int(last[1]))
        clock._stop = bool(state["stop"])
        interval = state["interval_ms"]
        clock.interval_ms = None if interval is None else float(interval)
        return clock

    def note(self, boot: int, ts_ms: int) -> None:
        """One frame's boot and timestamp (milliseconds of the device's clock)."""
        ring = self._ring
        if ring is None:
            return
        last = self._last
        self._last = (boot, ts_ms)
        if last is None or last[0] != boot:
            return
        dt = ts_ms - last[1]
        if dt <= 0:
            return
        n = self._n
        ring[n % RING] = dt
        n += 1
        self._n = n
        if n >= MIN_INTERVALS and n % MIN_INTERVALS == 0:
            med = _median(ring[: min(n, RING)].tolist())
            if self.interval_ms is None or med < self.interval_ms:
                self.interval_ms = med
            if self._stop:
                self._ring = None

    @property
    def interval_s(self) -> float | None:
        """The frame interval in seconds (``None`` until :data:`MIN_INTERVALS` are in)."""
        return None if self.interval_ms is None else self.interval_ms / 1000.0

    @property
    def missing(self) -> int:
        """Intervals still needed before the interval is known (0 once it is)."""
        return 0 if self.interval_ms is not None else MIN_INTERVALS - self._n

    def stop(self) -> None:
        """Stop measuring: now if the interval is known, else as soon as it is."""
        self._stop = True
        if self.interval_ms is not None:
            self._ring = None
