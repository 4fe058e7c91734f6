"""Issue 11 item 3: manifests and blobs are bound to their device (real Mosquitto, real devices).

A signed install + confirm pair captured from a real rollout in fleet A is replayed, retained, to
the same device id in fleet B, where a simulated device runs: the device refuses both
(``REJECTED wrong_device``) and keeps its parameters; the chunk server gives that device no byte
of the blob; a device reporting a version no rollout gave it is audited, counted and given its
sanctioned version back.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.blob import verify_blob
from edge_agent.device.fleet import Fleet, FleetConfig
from edge_agent.wire.chunk_frame import ChunkStatus, decode_chunk
from edge_agent.wire.manifest_signature import verify_manifest
from edge_agent.wire.messages import ChunkRequest, Manifest, Status, UpdateAck
from edge_agent.wire.topics import Leaf, topic
from service.embedded_broker import EmbeddedBroker
from service.firmware_bundle import Bundle
from service.registry.store import Registry
from service.serve import Service
from tests.integration.polling import wait
from tests.integration.rollout_rig import rig_settings, seed_registry
from tests.integration.test_rollout_e2e import metric, register, scrape

pytestmark = pytest.mark.integration


class Recorder:
    """A plain MQTT client (the attacker's view of the broker): records what it subscribed to."""

    def __init__(self, broker: EmbeddedBroker, client_id: str, filters: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id)  # fmt: skip
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        for f in filters:
            self.client.subscribe(f, 1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def on(self, topic_: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic_ and p]

    def publish(self, topic_: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic_, payload, 1, retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fleet_of(
    broker: EmbeddedBroker, bundle: Bundle, name: str, n: int, root: Path, period_s: float = 0.05
) -> Fleet:
    return Fleet(
        FleetConfig(fleet=name, devices=n, host=broker.host, port=broker.port, seed=5, batch=16,
                    period_s=period_s, label_rate=0.1, state_dir=root / name),
        bundle.firmware(),
        {},
    )  # fmt: skip


@pytest.fixture
def two_fleets(
    mosquitto: EmbeddedBroker, bundle: Bundle, db_url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Service, Fleet, Fleet, str, str]]:
    """One service for fleets A (8 devices) and B (the same 8 ids, slower), v2 registered."""
    tag = "pg" if "postgres" in request.node.name else "sq"
    a, b = f"bind-a-{tag}", f"bind-b-{tag}"
    seed_registry(db_url, bundle)
    register(db_url, bundle, bundle.factory_resigned(2), 2, "test")
    svc = Service(rig_settings(mosquitto, db_url, bundle, a, fleets=[a, b]))
    svc.start()
    with tempfile.TemporaryDirectory(prefix="bind-") as tmp:
        fa = fleet_of(mosquitto, bundle, a, 8, Path(tmp))
        fb = fleet_of(mosquitto, bundle, b, 8, Path(tmp), period_s=0.5)
        try:
            assert svc.consumer.wait_connected(10)
            fa.start()
            fb.start()
            yield svc, fa, fb, a, b
        finally:
            fa.stop()
            fb.stop()
            svc.stop()


def test_a_manifest_replayed_to_another_fleet_is_refused_and_its_blob_not_served(
    mosquitto: EmbeddedBroker,
    bundle: Bundle,
    db_url: str,
    two_fleets: tuple[Service, Fleet, Fleet, str, str],
) -> None:
    svc, _fa, fb, a, b = two_fleets
    assert svc.operations is not None
    assert svc.reconciler is not None
    spy = Recorder(mosquitto, f"spy-{a}", [f"td/v1/{a}/+/desired", f"td/v1/{b}/+/ack",
                                           f"td/v1/{b}/+/blob/data"])  # fmt: skip
    try:
        devices = [f"dev-{i:04d}" for i in range(8)]
        wait(lambda: all(svc.directory.get(a, d) is not None for d in devices), 30, "A's births")
        wait(lambda: svc.directory.get(b, "dev-0000") is not None, 30, "B's births")

        def references() -> bool:  # the proposer takes devices whose layer-A reference is done
            mons = svc.engine.monitors
            return all((a, d) in mons and mons[(a, d)].reference_complete for d in devices)

        wait(references, 60, "layer-A references of fleet A")

        # 1. a real rollout of v2 in fleet A; the attacker captures install and confirm
        p = svc.operations.propose(a, "parameter_set", "test-operator", version=2,
                                   auto_approve=True)  # fmt: skip
        assert p.rollout is not None

        # the canary's devices get the install, then (gates passed) the confirm: capture a
        # pair of a device whose id also runs in fleet B
        def captured(dev: str, action: str) -> list[bytes]:
            got = spy.on(topic(a, dev, Leaf.DESIRED))
            return [x for x in got if json.loads(x)["action"] == action]

        def pair() -> str | None:
            ids = [ag.config.device_id for ag in fb.agents]
            return next((d for d in ids if captured(d, "install") and captured(d, "confirm")), None)

        try:
            wait(lambda: pair() is not None, 120, "an install and a confirm captured in A")
        except AssertionError:
            view = svc.reconciler.view(p.rollout.rollout_id)
            raise AssertionError(f"rollout {view.status} {view.reason} {view.groups}") from None
        dev = pair()
        assert dev is not None
        victim = next(ag for ag in fb.agents if ag.config.device_id == dev)
        install, confirm = captured(dev, "install")[0], captured(dev, "confirm")[0]
        assert json.loads(install)["param"]["version"] == 2
        seq_before = victim.machine.rec.last_deploy_seq

        # 2. replayed, retained, to the same id in fleet B: refused before any download
        def acks(reason: str) -> list[UpdateAck]:
            got = [UpdateAck.from_json(x) for x in spy.on(topic(b, dev, Leaf.ACK))]
            return [x for x in got if x.reason == reason]

        spy.publish(topic(b, dev, Leaf.DESIRED), install, retain=True)
        wait(lambda: len(acks("wrong_device")) >= 1, 30, f"{b}/{dev} refusing the replayed install")
        spy.publish(topic(b, dev, Leaf.DESIRED), confirm, retain=True)
        wait(lambda: len(acks("wrong_device")) >= 2, 30, f"{b}/{dev} refusing the replayed confirm")
        assert all(x.state == "REJECTED" and x.code == 400 for x in acks("wrong_device"))
        assert not [
            x for x in map(UpdateAck.from_json, spy.on(topic(b, dev, Leaf.ACK)))
            if x.state in ("DOWNLOADING", "TRIAL", "CONFIRMED")
        ], "the device in B started nothing"  # fmt: skip
        assert victim.machine.param_version == 1
        assert victim.machine.rec.last_deploy_seq == seq_before
        assert victim.machine.counters.wrong_device >= 1
        spy.publish(topic(b, dev, Leaf.DESIRED), b"", retain=True)
        bound = Manifest.from_json(install)  # what made it refuse: the signed binding
        assert (bound.fleet, bound.device, bound.v) == (a, dev, 2)

        # 3. the chunk server gives B's device no byte of the blob it has no intent for
        sha = verify_blob(bundle.factory_resigned(2), trusted=None, schema_id=None).sha256
        req = ChunkRequest.create(c=777_777, deploy_seq=1, sha256=sha, index=0, count=4)
        spy.publish(topic(b, dev, Leaf.BLOB_GET), req.to_json())

        def answers() -> list[bytes]:
            return [
                f for f in spy.on(topic(b, dev, Leaf.BLOB_DATA)) if decode_chunk(f).c == 777_777
            ]

        wait(lambda: bool(answers()), 30, "the chunk server's answer")
        frames = [decode_chunk(f) for f in answers()]
        assert [(f.status, f.data, f.total) for f in frames] == [(ChunkStatus.UNKNOWN_BLOB, b"", 0)]
        text = scrape(svc.metrics_port)
        assert metric(text, "tinydrift_blob_requests_refused_total", reason="no_intent") >= 1
    finally:
        spy.close()


def test_a_version_no_rollout_gave_is_audited_alarmed_and_given_back(
    mosquitto: EmbeddedBroker,
    bundle: Bundle,
    db_url: str,
    two_fleets: tuple[Service, Fleet, Fleet, str, str],
) -> None:
    svc, _fa, fb, _a, b = two_fleets
    rogue = "dev-rogue"
    spy = Recorder(mosquitto, f"spy2-{b}", [topic(b, rogue, Leaf.DESIRED)])
    fw = bundle.firmware()

    def birth(version: int) -> bytes:
        return Status.create(
            online=True, schema_id=fw.schema.schema_id_hex, active_version=version,
            update_state="IDLE", last_deploy_seq=0, epoch_floor=0, boot=1,
            ts_ms=int(time.time() * 1000),
            caps={"max_chunk": 1024, "telemetry": ["bin"], "labels": True},
        ).to_json()  # fmt: skip

    def version_of(device: str) -> int | None:
        info = svc.directory.get(b, device)
        return None if info is None else info.active_version

    try:
        # provisioned with v1 (first sight), then it reports v2 which no rollout gave it
        spy.publish(topic(b, rogue, Leaf.STATUS), birth(1))
        wait(lambda: version_of(rogue) == 1, 30, "the rogue's first birth")
        spy.publish(topic(b, rogue, Leaf.STATUS), birth(2))
        # a real device of B (seen running v1) acks CONFIRMED for a version it was never given
        dev = fb.agents[1].config.device_id
        reconciler = svc.reconciler
        assert reconciler is not None
        wait(lambda: reconciler.versions.last_sanctioned(b, dev) == 1, 30, f"{b}/{dev}'s birth")
        ack = UpdateAck.create(deploy_seq=99, state="CONFIRMED", code=200, reason="confirmed",
                               param_version=2, ts_ms=int(time.time() * 1000))  # fmt: skip
        spy.publish(topic(b, dev, Leaf.ACK), ack.to_json())

        def entries() -> list[dict[str, object]]:
            reg = Registry(db_url)
            try:
                found = reg.list_audit(action="device.unsanctioned_version")
            finally:
                reg.close()
            return [dict(e.details) for e in found if e.details and e.details.get("fleet") == b]

        def audited() -> dict[str, dict[str, object]]:
            return {str(e["device"]): e for e in entries()}

        wait(lambda: {rogue, dev} <= set(audited()), 30, "both unsanctioned versions audited")
        entry = audited()[rogue]
        assert (entry["fleet"], entry["version"], entry["source"]) == (b, 2, "birth")
        assert entry["sanctioned_version"] == 1
        assert audited()[dev]["source"] == "ack"
        text = scrape(svc.metrics_port)
        assert metric(text, "tinydrift_unsanctioned_versions_total", fleet=b, source="birth") == 1
        assert metric(text, "tinydrift_unsanctioned_versions_total", fleet=b, source="ack") == 1

        # the service gives the rogue its sanctioned v1 back: a signed install bound to it
        wait(lambda: bool(spy.on(topic(b, rogue, Leaf.DESIRED))), 30, "the re-issued install")
        m = Manifest.from_json(spy.on(topic(b, rogue, Leaf.DESIRED))[-1])
        verify_manifest(m, fw.deploy_keys)
        assert (m.fleet, m.device, m.action, m.rollback, m.param.version) == (
            b, rogue, "install", True, 1,
        )  # fmt: skip
        assert m.deploy_seq == entry["deploy_seq"]
        # reported again: not audited twice (a later birth from the same client marks the
        # point up to which the broker has delivered, in order)
        spy.publish(topic(b, rogue, Leaf.STATUS), birth(2))
        spy.publish(topic(b, "dev-marker", Leaf.STATUS), birth(1))
        wait(lambda: reconciler.versions.last_sanctioned(b, "dev-marker") == 1, 30, "the marker")
        assert metric(scrape(svc.metrics_port), "tinydrift_unsanctioned_versions_total",
                      fleet=b, source="birth") == 1  # fmt: skip
        assert len([e for e in entries() if e["device"] == rogue]) == 1
    finally:
        spy.publish(topic(b, rogue, Leaf.DESIRED), b"", retain=True)
        spy.close()
