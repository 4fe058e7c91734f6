"""The devices the service knows: their births, schemas and telemetry sequence numbers.

Every telemetry and label batch carries ``(boot, seq)``; per device the directory keeps one
:class:`~service.ingest.sequence_check.SequenceState` for telemetry and one for labels, which
classify each batch as in order, lost frames before it, a duplicate, stale, or a far jump held
until following frames confirm it (see that module). A birth rebases both (a re-flashed device
restarts its boot counter).

>>> d = DeviceDirectory(SchemaCatalog(), unknown_devices="adopt")
>>> [d.check_sequence("f", "a", boot, seq) for boot, seq in
...  [(1, 0), (1, 1), (1, 1), (1, 4), (2, 0), (1, 5), (2, 0xFFFFFFFF), (2, 1)]]
['ok', 'ok', 'duplicate', 'ok', 'ok', 'stale', 'sequence_jump', 'ok']
>>> d.get("f", "a").lost_frames
2
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_agent.blob import ParameterSchema
from edge_agent.wire.messages import Status
from service.ingest.schema_catalog import SchemaCatalog
from service.ingest.sequence_check import SequenceState, SequenceVerdict
from service.ingest.sequence_positions import Position

__all__ = ["DeviceDirectory", "DeviceInfo", "SequenceVerdict"]


@dataclass
class DeviceInfo:
    """What the service knows about one device (mutable; owned by the directory)."""

    fleet: str
    device: str
    schema_id: str | None = None
    active_version: int | None = None
    previous_version: int | None = None
    update_state: str | None = None
    fw: str | None = None
    online: bool = False
    boot: int | None = None
    """Boot counter from the last birth."""
    last_deploy_seq: int | None = None
    epoch_floor: int | None = None
    caps: dict[str, Any] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0
    tel_seq: SequenceState = field(default_factory=SequenceState)
    """The telemetry frames' sequence."""
    lbl_seq: SequenceState = field(default_factory=SequenceState)
    """The label batches' sequence (labels have their own)."""
    lost_frames: int = 0
    """Telemetry frames lost between the device and the service (sequence gaps)."""
    lost_labels: int = 0
    """Label batches lost between the device and the service (gaps in their own sequence)."""
    frames: int = 0
    readings: int = 0
    adopted: bool = False
    """Registered from telemetry without a birth (``unknown_devices = adopt``)."""
    dirty: bool = True
    """Changed since the registry last saw it."""
    drift_state: str = "ok"
    """Signals still outside the fixed reference, comma-separated, or ``ok``."""
    written: float = 0.0
    """When the registry last got this device (service clock)."""

    @property
    def seq(self) -> int | None:
        """``seq`` of the last accepted telemetry frame."""
        return self.tel_seq.seq

    @property
    def key(self) -> tuple[str, str]:
        """``(fleet, device)``."""
        return (self.fleet, self.device)


class DeviceDirectory:
    """Births, Wills and sequence checks for every device (thread-safe)."""

    def __init__(
        self, catalog: SchemaCatalog, unknown_devices: Literal["reject", "adopt"] = "reject"
    ) -> None:
        self.catalog = catalog
        self.unknown_devices = unknown_devices
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], DeviceInfo] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def get(self, fleet: str, device: str) -> DeviceInfo | None:
        """The device, if known."""
        with self._lock:
            return self._devices.get((fleet, device))

    def all(self) -> list[DeviceInfo]:
        """A snapshot list of every known device."""
        with self._lock:
            return list(self._devices.values())

    def on_status(self, fleet: str, device: str, status: Status, now: float) -> DeviceInfo:
        """Record a birth (``online: true``) or a Will / clean disconnect (``online: false``)."""
        with self._lock:
            info = self._devices.get((fleet, device))
            if info is None:
                info = DeviceInfo(fleet, device, first_seen=now)
                self._devices[(fleet, device)] = info
            info.online = status.online
            info.last_seen = now
            info.dirty = True
            if status.online:
                info.schema_id = status.schema_id
                info.active_version = status.active_version
                info.previous_version = status.previous_version
                info.update_state = status.update_state
                info.fw = status.fw
                info.boot = status.boot
                if status.boot is not None:
                    info.tel_seq.rebase(status.boot)
                    info.lbl_seq.rebase(status.boot)
                info.last_deploy_seq = status.last_deploy_seq
                info.epoch_floor = status.epoch_floor
                info.caps = status.caps.model_dump() if status.caps is not None else {}
                info.adopted = False
            return info

    def adopt(self, fleet: str, device: str, now: float) -> DeviceInfo | None:
        """Register a device seen only through telemetry, if the policy allows it."""
        if self.unknown_devices != "adopt":
            return None
        with self._lock:
            info = self._devices.get((fleet, device))
            if info is None:
                info = DeviceInfo(fleet, device, first_seen=now, online=True, adopted=True)
                self._devices[(fleet, device)] = info
            return info

    def adopt_known(self, fleet: str, device: str, schema_id: str | None) -> DeviceInfo:
        """Register a device the registry already knows (at start-up, before its birth)."""
        with self._lock:
            info = self._devices.get((fleet, device))
            if info is None:
                info = DeviceInfo(fleet, device, schema_id=schema_id)
                self._devices[(fleet, device)] = info
            elif info.schema_id is None:
                info.schema_id = schema_id
            return info

    def schema_of(self, info: DeviceInfo) -> ParameterSchema | None:
        """The device's parameter schema, if the catalog knows it."""
        return self.catalog.schema(info.schema_id) if info.schema_id else None

    def check_sequence(self, fleet: str, device: str, boot: int, seq: int) -> SequenceVerdict:
        """Classify and (if accepted) record a frame's ``(boot, seq)``; counts lost frames."""
        with self._lock:
            info = self._devices.get((fleet, device))
            if info is None:
                info = DeviceInfo(fleet, device, adopted=True)
                self._devices[(fleet, device)] = info
            verdict, lost = info.tel_seq.advance(boot, seq)
            if verdict == "ok":
                info.lost_frames += lost
                info.frames += 1
            return verdict

    def check_label_sequence(self, fleet: str, device: str, boot: int, seq: int) -> SequenceVerdict:
        """Like :meth:`check_sequence` for label batches (their own sequence; QoS 1 may repeat);
        counts lost label batches."""
        with self._lock:
            info = self._devices.setdefault((fleet, device), DeviceInfo(fleet, device))
            verdict, lost = info.lbl_seq.advance(boot, seq)
            if verdict == "ok":
                info.lost_labels += lost
            return verdict

    def restore_sequence(
        self, fleet: str, device: str, boot: int, seq: int, *, labels: bool = False
    ) -> None:
        """Set the last accepted ``(boot, seq)`` of the device's telemetry (or ``labels``) from
        what a previous process saved (replays are then skipped, gaps counted from there)."""
        with self._lock:
            info = self._devices.setdefault((fleet, device), DeviceInfo(fleet, device))
            (info.lbl_seq if labels else info.tel_seq).restore(boot, seq)

    def positions(self) -> dict[str, dict[str, Position]]:
        """Every device's last accepted telemetry and label ``(boot, seq)``, by fleet (devices
        with neither are left out)."""
        out: dict[str, dict[str, Position]] = {}
        with self._lock:
            for (fleet, device), info in self._devices.items():
                t, lb = info.tel_seq, info.lbl_seq
                if t.seq is not None or lb.seq is not None:
                    out.setdefault(fleet, {})[device] = (t.boot, t.seq, lb.boot, lb.seq)
        return out
