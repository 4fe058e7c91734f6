"""Group membership: canary, control and nested percentage waves by a deterministic hash.

``bucket(device, rollout)`` maps a device to 0–9999 (hundredths of a percent) with SHA-256 of
``"{rollout_id}\\0{device_id}"``; wave *i* holds the eligible devices whose bucket is below its
cumulative percentage and not in an earlier wave, so waves nest and a device's wave never changes
when the fleet grows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from service.rollout.plan import RolloutPlan

CANARY: Final = "canary"
CONTROL: Final = "control"


def wave_name(index: int) -> str:
    """Name of wave ``index`` (0-based): ``wave-1``, ``wave-2`` …"""
    return f"wave-{index + 1}"


@dataclass(frozen=True)
class DeviceInfo:
    """What the controller knows about a device when groups are formed or it is born."""

    device_id: str
    last_deploy_seq: int = 0
    """From the device's birth: every manifest for it must carry a larger ``deploy_seq``."""
    last_active_ms: int = 0
    """Last telemetry or birth time (used to sample the canary)."""
    active_version: int | None = None
    online: bool = True
    """Connected when the groups are formed: the canary is drawn from online devices first (an
    offline canary cannot report, and its ack timeout would fail the delivery gate)."""


def bucket(device_id: str, rollout_id: str) -> int:
    """Deterministic bucket in ``0..9999`` of a device for a rollout.

    >>> bucket("dev-1", "r1") == bucket("dev-1", "r1")
    True
    >>> 0 <= bucket("dev-1", "r1") < 10_000
    True
    """
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def control_salt(rollout_id: str) -> str:
    """The hash salt that picks a rollout's control group (independent of its waves).

    >>> control_salt("r1")
    'r1/control'
    """
    return f"{rollout_id}/control"


@dataclass(frozen=True)
class GroupAssignment:
    """One group's name and its members, in a stable order."""

    name: str
    devices: tuple[str, ...]


def assign_groups(
    plan: RolloutPlan, devices: list[DeviceInfo]
) -> tuple[GroupAssignment, tuple[str, ...], list[GroupAssignment]]:
    """Split ``devices`` into (canary, control, waves) for ``plan``.

    Explicit canary/control lists win (unknown ids are refused); otherwise the canary is the
    ``canary_size`` most recently active online devices (offline ones only if too few are
    online) and the control the ``control_size`` devices
    with the lowest bucket among the rest. Waves cover every other device.
    """
    known = {d.device_id for d in devices}
    for listed in (*plan.canary_devices, *plan.control_devices):
        if listed not in known:
            raise ValueError(f"device {listed!r} is not in fleet {plan.fleet!r}")
    if plan.canary_devices:
        canary = tuple(plan.canary_devices)
    else:
        recent = sorted(devices, key=lambda d: (not d.online, -d.last_active_ms, d.device_id))
        canary = tuple(d.device_id for d in recent if d.device_id not in plan.control_devices)[
            : plan.canary_size
        ]
    # the control is drawn with its own hash: drawn by the waves' hash it would come out of the
    # first wave's range and leave that wave short
    rest = sorted(
        (d.device_id for d in devices if d.device_id not in canary),
        key=lambda dev: (bucket(dev, control_salt(plan.rollout_id)), dev),
    )
    if plan.control_devices:
        control = tuple(plan.control_devices)
    else:
        control = tuple(rest[: plan.control_size])
    eligible = [dev for dev in rest if dev not in control]
    waves: list[GroupAssignment] = []
    taken: set[str] = set()
    for i, pct in enumerate(plan.waves_pct):
        limit = round(pct * 100)
        members = tuple(
            dev for dev in eligible if dev not in taken and bucket(dev, plan.rollout_id) < limit
        )
        taken.update(members)
        waves.append(GroupAssignment(wave_name(i), members))
    return GroupAssignment(CANARY, canary), control, waves


def wave_for_new_device(plan: RolloutPlan, device_id: str) -> int:
    """Index of the wave a device joining mid-rollout belongs to (same hash rule)."""
    b = bucket(device_id, plan.rollout_id)
    for i, pct in enumerate(plan.waves_pct):
        if b < round(pct * 100):
            return i
    return len(plan.waves_pct) - 1
