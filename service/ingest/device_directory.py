"""The devices the service knows: their births, schemas and telemetry sequence numbers.

Every telemetry and label batch carries ``(boot, seq)``: ``seq`` counts frames and restarts at 0
when the device reboots, ``boot`` counts reboots. Per device the directory remembers the last
accepted pair and classifies each new frame:

- same boot, ``seq = last + 1``: in order;
- same boot, ``seq > last + 1``: accepted, and ``seq − last − 1`` frames count as lost
  (device → service loss);
- same boot, ``seq ≤ last``: a duplicate or a replay: rejected (``duplicate``), so re-processing
  a batch after a crash never double-counts;
- newer boot: accepted (a reboot is not a replay); the ``seq`` frames before it in the new boot
  count as lost;
- older boot: rejected (``stale``).

``seq`` is a u32 that would wrap after 2³² frames (136 years at one frame a second): not handled.

>>> d = DeviceDirectory(SchemaCatalog(), unknown_devices="adopt")
>>> [d.check_sequence("f", "a", boot, seq) for boot, seq in
...  [(1, 0), (1, 1), (1, 1), (1, 4), (2, 0), (1, 5)]]
['ok', 'ok', 'duplicate', 'ok', 'ok', 'stale']
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

SequenceVerdict = Literal["ok", "duplicate", "stale"]


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
    seq_boot: int | None = None
    """Boot of the last accepted telemetry frame."""
    seq: int | None = None
    """``seq`` of the last accepted telemetry frame."""
    lbl_boot: int | None = None
    lbl_seq: int | None = None
    """``(boot, seq)`` of the last accepted label batch (labels have their own sequence)."""
    lost_frames: int = 0
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
            return _advance(info, boot, seq)

    def check_label_sequence(self, fleet: str, device: str, boot: int, seq: int) -> SequenceVerdict:
        """Like :meth:`check_sequence` for label batches (their own sequence; QoS 1 may repeat)."""
        with self._lock:
            info = self._devices.setdefault((fleet, device), DeviceInfo(fleet, device))
            if info.lbl_boot is not None and info.lbl_seq is not None:
                if boot < info.lbl_boot:
                    return "stale"
                if boot == info.lbl_boot and seq <= info.lbl_seq:
                    return "duplicate"
            info.lbl_boot, info.lbl_seq = boot, seq
            return "ok"

    def restore_sequence(self, fleet: str, device: str, boot: int, seq: int) -> None:
        """Set the last accepted ``(boot, seq)`` from a checkpoint (replays are then skipped)."""
        with self._lock:
            info = self._devices.setdefault((fleet, device), DeviceInfo(fleet, device))
            info.seq_boot, info.seq = boot, seq


def _advance(info: DeviceInfo, boot: int, seq: int) -> SequenceVerdict:
    if info.seq_boot is None or info.seq is None:
        pass  # the first frame seen: nothing is known about what came before
    elif boot < info.seq_boot:
        return "stale"
    elif boot == info.seq_boot:
        if seq <= info.seq:
            return "duplicate"
        info.lost_frames += seq - info.seq - 1
    else:
        info.lost_frames += seq  # frames 0 … seq−1 of the new boot never arrived
    info.seq_boot, info.seq = boot, seq
    info.frames += 1
    return "ok"
