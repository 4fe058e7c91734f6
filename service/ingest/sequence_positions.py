"""Where every device's telemetry and label sequences stood, saved so a restart resumes there.

The gap a device's first frame after a restart shows is measured from the position restored at
start. Restored from the detector checkpoints alone (written every ``checkpoint_interval_s``,
60 s by default), that position was up to a minute old after a crash, and every frame the
previous process had received since its last checkpoint was counted as lost (+149 frames in one
run). The positions are therefore saved on their own, small and often: one registry row per
fleet (``detector_checkpoints``, kind :data:`POSITIONS_KIND`, device ``''``), whose state is
zlib-compressed JSON ``{device: [tel_boot, tel_seq, lbl_boot, lbl_seq]}`` (``null`` where a
stream has no position yet). :class:`PositionSaver` writes a fleet's row when its positions
moved, with at most one write per fleet waiting for the database.

>>> rec = positions_record("f", {"d1": (3, 41, 3, 7), "d2": (1, 0, None, None)})
>>> read_positions(rec)
{'d1': (3, 41, 3, 7), 'd2': (1, 0, None, None)}
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Final

from service.registry.records import CheckpointRecord

__all__ = [
    "POSITIONS_FORMAT",
    "POSITIONS_KIND",
    "Position",
    "PositionSaver",
    "positions_record",
    "read_positions",
]

POSITIONS_KIND: Final = "sequence_positions"
POSITIONS_FORMAT: Final = 1

Position = tuple[int | None, int | None, int | None, int | None]
"""``(tel_boot, tel_seq, lbl_boot, lbl_seq)``: the last accepted telemetry frame and label
batch of one device."""


class PositionsFormatError(ValueError):
    """A stored positions row this version cannot read."""


def positions_record(fleet: str, positions: Mapping[str, Position]) -> CheckpointRecord:
    """One fleet's positions as a registry row."""
    body = json.dumps({d: list(p) for d, p in sorted(positions.items())}, separators=(",", ":"))
    return CheckpointRecord(
        fleet=fleet,
        device=None,
        kind=POSITIONS_KIND,
        format_version=POSITIONS_FORMAT,
        state=zlib.compress(body.encode(), 1),
    )


def read_positions(rec: CheckpointRecord) -> dict[str, Position]:
    """The positions a row holds; :class:`PositionsFormatError` if it is not such a row."""
    if rec.kind != POSITIONS_KIND or rec.format_version != POSITIONS_FORMAT:
        raise PositionsFormatError(f"{rec.kind} format {rec.format_version} is not a positions row")
    try:
        raw = json.loads(zlib.decompress(rec.state))
        out: dict[str, Position] = {}
        for device, p in raw.items():
            if len(p) != 4 or not all(v is None or isinstance(v, int) for v in p):
                raise PositionsFormatError(f"device {device!r}: {p!r} is not a position")
            out[str(device)] = (p[0], p[1], p[2], p[3])
        return out
    except (zlib.error, ValueError, AttributeError, TypeError) as exc:
        raise PositionsFormatError(str(exc)) from exc


Submit = Callable[[CheckpointRecord, Callable[[bool], None]], object]
"""Queue a row for the registry; the callback is told whether it committed."""


class PositionSaver:
    """Writes each fleet's positions when they moved; one write per fleet in flight."""

    def __init__(self, submit: Submit) -> None:
        self._submit = submit
        self._lock = threading.Lock()
        self._saved: dict[str, dict[str, Position]] = {}
        """What was last queued per fleet."""
        self._in_flight: set[str] = set()

    def save(self, positions: Mapping[str, dict[str, Position]], *, wait: bool = False) -> int:
        """Queue the fleets whose positions moved since their last write; ``wait``: also those
        whose previous write has not settled (at shutdown). Returns how many were queued."""
        n = 0
        for fleet, now in positions.items():
            with self._lock:
                if self._saved.get(fleet) == now or (fleet in self._in_flight and not wait):
                    continue
                self._in_flight.add(fleet)
                self._saved[fleet] = now
            try:
                self._submit(positions_record(fleet, now), self._settled_for(fleet))
            except Exception:
                with self._lock:  # not queued: the next pass tries again
                    self._in_flight.discard(fleet)
                    self._saved.pop(fleet, None)
                raise
            n += 1
        return n

    def _settled_for(self, fleet: str) -> Callable[[bool], None]:
        def settled(committed: bool) -> None:
            with self._lock:
                self._in_flight.discard(fleet)
                if not committed:
                    self._saved.pop(fleet, None)  # written again with the next pass

        return settled
