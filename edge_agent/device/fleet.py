"""A simulated fleet: N devices with their own storage, MQTT connections and drift plans.

The drift plan is decided up front from the seed and printed, so a detector can be scored
against it: which devices drift, what kind, from when (simulated seconds since start).

>>> plan = plan_drift(devices=10, kind="gain", fraction=0.3, after_s=60.0, seed=1)
>>> sorted(plan)[:1], plan[sorted(plan)[0]].kind
(['dev-0003'], 'gain')
>>> len(plan)
3
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.device.agent import AgentConfig, EdgeAgent
from edge_agent.device.device_loop import DeviceLoop
from edge_agent.device.firmware import Firmware
from edge_agent.device.simulator import DriftKind, DriftSpec, SensorSimulator
from edge_agent.device.update_machine import UpdateMachine


def device_name(i: int) -> str:
    """The id of the ``i``-th simulated device: ``dev-0000``, ``dev-0001``, …"""
    return f"dev-{i:04d}"


def plan_drift(
    devices: int,
    kind: DriftKind | None,
    fraction: float,
    after_s: float,
    seed: int,
    ramp_s: float = 0.0,
    magnitude: float = float("nan"),
) -> dict[str, DriftSpec]:
    """Choose ``round(fraction · devices)`` devices (by seed) and give each the same drift."""
    if kind is None or kind == "none" or fraction <= 0:
        return {}
    n = max(1, round(fraction * devices)) if fraction > 0 else 0
    chosen = np.random.default_rng(seed).choice(devices, size=min(n, devices), replace=False)
    spec = DriftSpec(kind, start_s=after_s, ramp_s=ramp_s, magnitude=magnitude)
    return {device_name(int(i)): spec for i in sorted(chosen)}


@dataclass(frozen=True)
class FleetConfig:
    """What ``tinydrift fleet-sim`` runs."""

    fleet: str
    devices: int
    host: str
    port: int
    seed: int = 0
    batch: int = 16
    period_s: float = 2.0
    time_scale: float = 1.0
    label_rate: float = 0.1
    codec: str = "bin"
    state_dir: Path | None = None
    first_index: int = 0
    client_id_prefix: str = ""
    """Prepended to each device's MQTT client id (see :attr:`AgentConfig.client_id`)."""


class Fleet:
    """Builds the agents and runs them in one :class:`DeviceLoop` thread."""

    def __init__(
        self,
        config: FleetConfig,
        firmware: Firmware,
        plan: dict[str, DriftSpec],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.plan = plan
        self._tmp = None
        if config.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tinydrift-fleet-")
            root = Path(self._tmp.name)
        else:
            root = config.state_dir
        start = clock()
        self.agents: list[EdgeAgent] = []
        for i in range(config.first_index, config.first_index + config.devices):
            name = device_name(i)
            acfg = AgentConfig(
                fleet=config.fleet,
                device_id=name,
                host=config.host,
                port=config.port,
                batch=config.batch,
                period_s=config.period_s,
                time_scale=config.time_scale,
                label_rate=config.label_rate,
                codec="json" if config.codec == "json" else "bin",
                client_id=config.client_id_prefix + name if config.client_id_prefix else None,
            )
            machine = UpdateMachine(
                firmware, root / name, fleet=config.fleet, device=name, clock=clock, fsync=False
            )
            sensor = SensorSimulator(seed=config.seed * 100_003 + i, drift=plan.get(name))
            agent = EdgeAgent(acfg, machine, sensor, start_time=start, seed=config.seed + i)
            # spread the first frames over one period so the fleet does not publish in lockstep
            agent.delay_first_frame(config.period_s * (i % 97) / 97)
            self.agents.append(agent)
        self.loop = DeviceLoop(self.agents, clock=clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the device loop on a background thread."""
        self._thread = threading.Thread(
            target=self.loop.run, args=(self._stop,), name="fleet-sim", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop, disconnect cleanly and remove temporary storage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def agent(self, device_id: str) -> EdgeAgent:
        """The agent with this id."""
        for a in self.agents:
            if a.config.device_id == device_id:
                return a
        raise KeyError(device_id)
