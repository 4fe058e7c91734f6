"""The newest raw readings of the devices a recalibration may be needed for.

A label-free recalibration (:mod:`service.learn.recalibration`) needs a device's raw features
*after* its drift. Keeping every device's recent readings would cost ``capacity × F × 4`` bytes
per device (8 KiB at 256 × 8) across the whole fleet, so readings are buffered only for the
devices that are *tracked*: the service tracks a device when layer A raises a drift alarm on it
and stops when it has an update (or the operator discards it). The buffer is per model version:
a frame of another version empties it (readings of the old model say nothing about the new one).

Thread use: ``add`` runs on the ingest thread, the rest on the service's worker threads; one lock.

>>> import numpy as np
>>> from service.ingest.frames import DeviceFrame
>>> buf = RecentReadings(capacity=4)
>>> buf.track(("f", "d1"))
>>> fr = DeviceFrame("f", "d1", 0, 1, 0, 0.0, 7, np.arange(12.0).reshape(6, 2),
...                  np.zeros(6, dtype=np.int64), np.ones(6))
>>> buf.add([fr])
>>> buf.get(("f", "d1"))[0].tolist(), buf.get(("f", "d1"))[1]
([[4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]], 7)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.ingest.frames import DeviceFrame

__all__ = ["RecentReadings"]

Key = tuple[str, str]


@dataclass
class _Ring:
    data: npt.NDArray[np.float32]
    version: int
    pos: int = 0
    count: int = 0


class RecentReadings:
    """Ring buffers of raw features for tracked ``(fleet, device)`` keys."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tracked: set[Key] = set()
        self._rings: dict[Key, _Ring] = {}

    def track(self, key: Key) -> None:
        """Start buffering ``key``'s readings (no-op if already tracked)."""
        with self._lock:
            self._tracked.add(key)

    def untrack(self, keys: Iterable[Key]) -> None:
        """Stop buffering and drop what was buffered."""
        with self._lock:
            for key in keys:
                self._tracked.discard(key)
                self._rings.pop(key, None)

    @property
    def tracked(self) -> frozenset[Key]:
        """Keys being buffered."""
        with self._lock:
            return frozenset(self._tracked)

    def add(self, frames: Sequence[DeviceFrame]) -> None:
        """Buffer the frames of tracked devices (others are skipped at a set lookup each)."""
        if not self._tracked:
            return
        with self._lock:
            for fr in frames:
                key = (fr.fleet, fr.device)
                if key not in self._tracked:
                    continue
                ring = self._rings.get(key)
                x = fr.features
                if (
                    ring is None
                    or ring.version != fr.param_version
                    or ring.data.shape[1] != x.shape[1]
                ):
                    ring = _Ring(
                        np.empty((self.capacity, x.shape[1]), dtype=np.float32), fr.param_version
                    )
                    self._rings[key] = ring
                x = x[-self.capacity :]
                n = x.shape[0]
                end = ring.pos + n
                if end <= self.capacity:
                    ring.data[ring.pos : end] = x
                else:
                    first = self.capacity - ring.pos
                    ring.data[ring.pos :] = x[:first]
                    ring.data[: n - first] = x[first:]
                ring.pos = end % self.capacity
                ring.count = min(self.capacity, ring.count + n)

    def count(self, key: Key) -> int:
        """Readings buffered for ``key``."""
        with self._lock:
            ring = self._rings.get(key)
            return 0 if ring is None else ring.count

    def get(self, key: Key) -> tuple[npt.NDArray[np.float64], int | None]:
        """``(readings oldest first [n, F], model version)``; ``n = 0`` when nothing is buffered."""
        with self._lock:
            ring = self._rings.get(key)
            if ring is None or ring.count == 0:
                return np.empty((0, 0)), None
            idx = (ring.pos - ring.count + np.arange(ring.count)) % self.capacity
            return ring.data[idx].astype(np.float64), ring.version
