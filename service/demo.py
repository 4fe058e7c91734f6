"""``tinydrift demo`` (device-contract stage): an embedded broker, a simulated fleet with injected
drift, and one signed parameter update pushed through the real device update path.

What runs is the real code: the devices are :class:`~edge_agent.device.agent.EdgeAgent` s over
MQTT, the update is a release-key-signed blob offered by a deploy-key-signed retained manifest,
fetched chunk by chunk from :class:`~service.rollout.blob_transfer.BlobTransferService`, verified,
trialled (KATs first) and confirmed. Drift detection and model adaptation are not part of this
stage; the summary reports the accuracy the injected drift costs, measured from labels.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from edge_agent.blob import ParameterSet, build_blob, verify_blob
from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from edge_agent.wire.messages import Manifest
from edge_agent.wire.topics import Leaf, parse_topic, subscription
from service.embedded_broker import start_embedded_broker
from service.firmware_bundle import create_bundle
from service.rollout.blob_transfer import BlobTransferService
from service.rollout.chunk_server import BlobCache
from service.rollout.desired_state import DesiredStatePublisher

FLEET = "demo"


@dataclass
class DemoResult:
    """What the demo measured."""

    summary: dict[str, Any]
    ok: bool
    problems: list[str] = field(default_factory=list)


class _AckCollector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: list[tuple[str, dict[str, Any]]] = []

    def on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        dev = parse_topic(msg.topic).device
        with self.lock:
            self.acks.append((dev, json.loads(msg.payload)))

    def states(self, device: str, seq: int) -> list[str]:
        with self.lock:
            return [a["state"] for d, a in self.acks if d == device and a["deploy_seq"] == seq]


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def run_demo(
    devices: int = 20,
    seed: int = 0,
    drift_after: float = 10.0,
    duration: float = 30.0,
    console: Console | None = None,
) -> DemoResult:
    """Run the scenario and return its figures; ``ok`` only if every step really happened."""
    out = console or Console(stderr=True)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tinydrift-demo-") as tmp:
        with out.status("starting the embedded broker"):
            broker = start_embedded_broker()
        out.print(f"[1/5] broker: {broker.kind} on {broker.url}")
        try:
            with out.status("training the factory model (river) and signing it"):
                bundle = create_bundle(Path(tmp) / "bundle", seed=seed)
            fw = bundle.firmware()
            out.print(f"[2/5] factory model v1 signed; schema {fw.schema.schema_id_hex}")
            plan = plan_drift(devices, "gain", 0.3, drift_after, seed)
            cfg = FleetConfig(
                fleet=FLEET,
                devices=devices,
                host=broker.host,
                port=broker.port,
                seed=seed,
                batch=16,
                period_s=0.5,
                label_rate=0.2,
                state_dir=Path(tmp) / "devices",
            )
            fleet = Fleet(cfg, fw, plan)
            svc = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id="tinydrift-demo-service",
                protocol=mqtt.MQTTv311,
            )
            cache = BlobCache()
            transfer = BlobTransferService(svc, cache)
            acks = _AckCollector()
            svc.message_callback_add(subscription(Leaf.ACK), acks.on_message)
            svc.on_connect = lambda c, *_: c.subscribe(
                [(subscription(Leaf.ACK), 1), *transfer.subscriptions()]
            )
            transfer.start()
            svc.connect(broker.host, broker.port)
            svc.loop_start()
            fleet.start()
            _wait(lambda: fleet.loop.connected == devices, 20)
            out.print(
                f"[3/5] {fleet.loop.connected}/{devices} devices online; gain drift "
                f"planned on {len(plan)} of them from t={drift_after:g}s"
            )
            _wait(lambda: False, drift_after + 5)
            # one signed parameter update through the real path: the factory weights re-issued
            # as v2 (the recalibration / retrain candidates arrive with the learning stage)
            canary = next(a for a in fleet.agents if a.config.device_id not in plan)
            params: ParameterSet = verify_blob(
                fw.factory_blob, trusted=fw.release_keys, schema_id=None
            ).params
            blob = build_blob(params, param_version=2, security_epoch=0, key=bundle.release_key)
            sha = cache.add(blob)
            m = Manifest.create(
                deploy_seq=1,
                action="install",
                param={
                    "version": 2,
                    "schema_id": fw.schema.schema_id_hex,
                    "security_epoch": 0,
                    "blob_len": len(blob),
                    "blob_sha256": sha,
                    "key_id": bundle.release_key.key_id,
                },
                transfer={"chunk": 256},
                trial={"confirm": "server", "timeout_s": 120, "min_inferences": 0},
                issued_ms=int(time.time() * 1000),
            )
            desired = DesiredStatePublisher(svc, bundle.deploy_key)
            dev = canary.config.device_id
            desired.publish(FLEET, dev, m)
            trial = _wait(lambda: "TRIAL" in acks.states(dev, 1), 30)
            out.print(f"[4/5] update v2 → {dev}: " + " → ".join(acks.states(dev, 1)))
            confirmed = False
            if trial:
                desired.publish(
                    FLEET, dev, m.model_copy(update={"deploy_seq": 2, "action": "confirm"})
                )
                confirmed = _wait(lambda: "CONFIRMED" in acks.states(dev, 2), 30)
            if not confirmed:
                problems.append(f"the update to {dev} was not confirmed")
            remaining = duration - (drift_after + 5)
            _wait(lambda: False, max(0.0, remaining))
            fleet.stop()
            svc.loop_stop()
            svc.disconnect()
            transfer.stop()
        finally:
            broker.stop()
    drifted = [a for a in fleet.agents if a.config.device_id in plan]
    stable = [a for a in fleet.agents if a.config.device_id not in plan]

    def acc(agents: list[Any]) -> float | None:
        c = sum(s[0] for a in agents for s in a.stats.correct_by_version.values())
        t = sum(s[1] for a in agents for s in a.stats.correct_by_version.values())
        return round(c / t, 4) if t else None

    summary = {
        "devices": devices,
        "broker": broker.kind,
        "readings": sum(a.stats.readings for a in fleet.agents),
        "labels": sum(a.stats.labels for a in fleet.agents),
        "drift": {"kind": "gain", "injected_devices": sorted(plan), "start_s": drift_after},
        "accuracy": {"stable_devices": acc(stable), "drifting_devices": acc(drifted)},
        "update": {
            "device": dev,
            "version": 2,
            "acks": acks.states(dev, 1) + acks.states(dev, 2),
            "confirmed": confirmed,
        },
        "blob_transfer": dict(transfer.counters),
    }
    if summary["readings"] == 0:
        problems.append("no telemetry was produced")
    out.print("[5/5] done")
    return DemoResult(summary=summary, ok=not problems, problems=problems)
