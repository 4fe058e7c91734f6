"""A service with signing keys, a registry and a simulated fleet: the rig of the rollout tests.

Each test gets its own fleet name and client id (the session broker keeps other tests' retained
births and manifests), its own registry database and its own devices' storage. A second fleet
(:func:`second_fleet`) may reuse the first one's device ids; :class:`DesiredLog` records every
manifest published on the fleets' ``desired`` topics.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.device.fleet import Fleet, FleetConfig
from edge_agent.device.simulator import DriftSpec
from edge_agent.wire.messages import Manifest
from edge_agent.wire.topics import Leaf, parse_topic, subscription
from service.config import ServiceSettings, load_settings
from service.demo import labelled_accuracy
from service.embedded_broker import EmbeddedBroker
from service.firmware_bundle import Bundle
from service.registry.store import Registry
from service.rollout.reconciler import RolloutView
from service.serve import Service
from tests.integration.polling import wait


def seed_registry(db_url: str, bundle: Bundle) -> str:
    """Store the factory parameter set (v1, good); returns the schema id."""
    reg = Registry(db_url)
    fw = bundle.firmware()
    schema = fw.schema.schema_id_hex
    if reg.get_parameter_set(schema, 1) is None:
        reg.add_parameter_set(schema, 1, 0, fw.factory_blob, source="factory", status="good")
    reg.close()
    return schema


def rig_settings(
    broker: EmbeddedBroker, db_url: str, bundle: Bundle, fleet: str, **overrides: Any
) -> ServiceSettings:
    """Fast settings for tests: short soak, small groups, one wave."""
    values: dict[str, Any] = {
        "broker": broker.url,
        "db": db_url,
        "metrics_port": 0,
        "api_port": 0,
        "fleets": [fleet],
        "mqtt_client_id": f"svc-{fleet}",
        "window_s": 3.0,
        "checkpoint_interval_s": 2.0,
        # layer A learns its null from 16 blocks a level instead of 48: calibrated within
        # 5-15 s at the rig's 320 readings/s (production: 48, noisier estimates here are
        # absorbed by stricter thresholds)
        "null_min_blocks": 16,
        "null_horizon_readings": 128,
        "null_horizon_labels": 8,
        "release_key": bundle.keys_dir / "release.key",
        "deploy_key": bundle.keys_dir / "deploy.key",
        "update_policy": "off",
        "policy_interval_s": 1.0,
        "policy_settle_s": 4.0,
        "rollout_tick_s": 0.5,
        "canary_size": 3,
        "gate_error_margin": 0.1,
        "control_size": 4,
        "waves_pct": [100.0],
        "min_soak_s": 3.0,
        "max_soak_s": 60.0,
        "gate_min_readings": 200,
        "gate_min_devices": 2,
        "ack_timeout_s": 60.0,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class Rig:
    """The running parts of one test."""

    service: Service
    fleet: Fleet
    db_url: str
    fleet_name: str
    started: float = field(default_factory=time.time)

    def view(self, rollout_id: str) -> RolloutView:
        """The live view of a rollout."""
        assert self.service.reconciler is not None
        return self.service.reconciler.view(rollout_id)

    def wait_status(self, rollout_id: str, states: set[str], timeout: float) -> RolloutView:
        """Wait until the rollout is in one of ``states``; returns its view."""
        try:
            wait(lambda: self.view(rollout_id).status in states, timeout, f"rollout {rollout_id}")
        except AssertionError:
            v = self.view(rollout_id)
            groups = [
                (g["name"], g["status"], (g["figures"] or {}).get("reason")) for g in v.groups
            ]
            raise AssertionError(
                f"rollout {rollout_id} not in {sorted(states)} after {timeout}s: {v.status} "
                f"({v.reason}); {v.summary}; groups {groups}"
            ) from None
        return self.view(rollout_id)

    def active_version(self, device: str, fleet: str | None = None) -> int | None:
        """The model version the device (of ``fleet``, default the rig's) last reported."""
        info = self.service.directory.get(fleet or self.fleet_name, device)
        return None if info is None else info.active_version

    def wait_references(
        self, devices: list[str], timeout: float = 30, fleet: str | None = None
    ) -> None:
        """Wait until layer A has a complete reference for every device (of ``fleet``)."""
        name = fleet or self.fleet_name

        def ready() -> bool:
            mons = self.service.engine.monitors
            return all((name, d) in mons and mons[(name, d)].reference_complete for d in devices)

        wait(ready, timeout, "layer-A references of every device")


def sim_fleet(
    broker: EmbeddedBroker,
    bundle: Bundle,
    fleet_name: str,
    state_dir: Path,
    *,
    devices: int = 12,
    plan: dict[str, DriftSpec] | None = None,
    seed: int = 3,
    label_rate: float = 0.1,
    client_id_prefix: str = "",
) -> Fleet:
    """A simulated fleet at the rig's pace: 16 readings a frame every 50 ms (320 readings/s)."""
    return Fleet(
        FleetConfig(
            fleet=fleet_name,
            devices=devices,
            host=broker.host,
            port=broker.port,
            seed=seed,
            batch=16,
            period_s=0.05,
            label_rate=label_rate,
            state_dir=state_dir,
            client_id_prefix=client_id_prefix,
        ),
        bundle.firmware(),
        plan or {},
    )


@contextmanager
def second_fleet(
    broker: EmbeddedBroker, bundle: Bundle, fleet_name: str, state_dir: Path, **kw: Any
) -> Iterator[Fleet]:
    """Run another fleet beside the rig's, with the same device ids (``dev-0000`` …): its MQTT
    client ids carry the fleet name so the two do not take each other's connections over."""
    fleet = sim_fleet(
        broker, bundle, fleet_name, state_dir, client_id_prefix=f"{fleet_name}.", **kw
    )
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


class DesiredLog:
    """Every manifest published on the ``desired`` topics of ``fleets``, by (fleet, device)."""

    def __init__(self, broker: EmbeddedBroker, fleets: list[str], client_id: str) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[Manifest]] = {}
        self._fleets = fleets
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id
        )
        self._client.on_connect = lambda c, *_: c.subscribe(
            [(subscription(Leaf.DESIRED, f), 1) for f in self._fleets]
        )
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        wait(self._client.is_connected, 10, "the desired-topic recorder connected")

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # a cleared retained manifest
        t = parse_topic(msg.topic)
        with self._lock:
            self._seen.setdefault((t.fleet, t.device), []).append(Manifest.from_json(msg.payload))

    def of(self, fleet: str) -> dict[str, list[Manifest]]:
        """Device → manifests received on its ``desired`` topic in ``fleet``."""
        with self._lock:
            return {d: list(ms) for (f, d), ms in self._seen.items() if f == fleet}

    def close(self) -> None:
        """Disconnect."""
        self._client.loop_stop()
        self._client.disconnect()


@contextmanager
def running_rig(
    broker: EmbeddedBroker,
    db_url: str,
    bundle: Bundle,
    fleet_name: str,
    *,
    devices: int = 12,
    plan: dict[str, DriftSpec] | None = None,
    seed: int = 3,
    state_dir: Path | None = None,
    **overrides: Any,
) -> Iterator[Rig]:
    """Start the service (keys from ``bundle``), then the fleet; stop both at the end."""
    seed_registry(db_url, bundle)
    svc = Service(rig_settings(broker, db_url, bundle, fleet_name, **overrides))
    svc.start()
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rig-")
        state_dir = Path(tmp.name)
    fleet = sim_fleet(broker, bundle, fleet_name, state_dir, devices=devices, plan=plan, seed=seed)
    try:
        assert svc.consumer.wait_connected(10)
        fleet.start()
        yield Rig(svc, fleet, db_url, fleet_name)
    finally:
        fleet.stop()
        svc.stop()
        if tmp is not None:
            tmp.cleanup()


def accuracy(
    db_url: str,
    fleet: str,
    devices: set[str],
    *,
    since: float = 0.0,
    until: float = 1e18,
    versions: set[int] | None = None,
    exclude_versions: set[int] | None = None,
) -> tuple[float, int]:
    """Labelled accuracy of ``devices`` over a time range and model versions: (accuracy, n)."""
    reg = Registry(db_url)
    try:
        lab = reg.recent_labels(fleet, limit=1_000_000)
    finally:
        reg.close()
    return labelled_accuracy(
        lab,
        devices,
        since=since,
        until=until,
        versions=versions,
        exclude_versions=exclude_versions,
    )
