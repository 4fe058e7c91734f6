"""``/metrics`` keeps a bounded set of series whatever fleet names and model versions arrive.

A running service (every fleet watched, ``max_fleets = 2``) on its own Mosquitto, with a real
fleet of 20 devices: one on the factory model v1, 18 on their own recalibrations (v2-v19,
stored as the service stores them) and one sending telemetry under ever new model versions.
An attacker then floods thousands of messages on new fleet segments of the topic (telemetry,
labels, acks, births). The set of series is the same before and after, every flood message is
a counted rejection, and the real fleet's frames go on being accepted.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.wire.messages import LabelBatch, UpdateAck
from edge_agent.wire.topics import Leaf, topic
from service.config import load_settings
from service.embedded_broker import EmbeddedBroker, start_mosquitto
from service.firmware_bundle import Bundle
from service.registry.store import Registry
from service.serve import Service
from tests.integration.device_messages import birth, frame
from tests.integration.polling import wait

pytestmark = pytest.mark.integration

FLEET = "plant"
INTRUDER = "intruder-0"
"""A fleet an attacker's birth registers before the flood: it takes the second of two places."""
RECALIBRATED = range(2, 20)
"""Eighteen recalibrations of v1, one device each."""
FLOOD_FLEETS = 1500
FLOOD_REGISTERING = 500
"""Flood fleets that also get a birth, a label batch and an ack."""
ODD_VERSIONS = 1000
"""Frames of the real fleet's ``odd`` device, each under a new, unregistered model version."""


Series = frozenset[tuple[str, tuple[tuple[str, str], ...]]]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def series(text: str) -> Series:
    """Every sample's name and labels."""
    return frozenset(
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    )


def values(s: Series, label: str) -> set[str]:
    return {v for _, labels in s for k, v in labels if k == label}


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def labels(seq: int) -> bytes:
    return LabelBatch.create(
        seq=seq, boot=1, ts_ms=0, param_version=1, features=np.zeros((1, 8)), pred=[0], label=[0]
    ).to_json()


ACK = UpdateAck.create(deploy_seq=1, state="TRIAL", code=202, reason="trial", ts_ms=0).to_json()


def publish(broker: EmbeddedBroker, items: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="card-pub")
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        sent = [c.publish(t, payload, qos=1) for t, payload in items]
        for info in sent:
            info.wait_for_publish(60)
    finally:
        c.loop_stop()
        c.disconnect()


@dataclass
class Rig:
    broker: EmbeddedBroker
    service: Service
    db: str
    devices: dict[str, int]
    """Device → the model version it runs."""


@pytest.fixture(scope="module")
def rig(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    broker = start_mosquitto()  # its own: no other test's retained births or fleets
    db = f"sqlite:///{Path(tmp_path_factory.mktemp('cardinality')) / 'r.db'}"
    schema = bundle.firmware().schema.schema_id_hex
    reg = Registry(db)
    reg.add_parameter_set(
        schema, 1, 0, bundle.firmware().factory_blob, source="factory", status="good"
    )
    for v in RECALIBRATED:  # as CandidateProposer stores them (source, report with its base)
        reg.add_parameter_set(
            schema,
            v,
            0,
            bundle.factory_resigned(v),
            source="recalibration",
            status="good",
            metrics={"kind": "recalibration", "base_version": 1},
        )
    reg.close()
    svc = Service(
        load_settings(
            broker=broker.url,
            db=db,
            metrics_port=0,
            mqtt_client_id="cardinality-svc",
            max_fleets=2,
            window_s=3600.0,  # cohort windows closed by the test (evaluate), not a timer
            checkpoint_interval_s=3600.0,
            reference_readings=100_000,  # layer A stays in its reference: no state changes
        )
    )
    svc.start()
    devices = {"good": 1, "odd": 1} | {f"recal-{v}": v for v in RECALIBRATED}
    try:
        assert svc.consumer.wait_connected(10)
        yield Rig(broker, svc, db, devices)
    finally:
        svc.stop()
        broker.stop()


def settled(svc: Service) -> Series:
    """The series once the gauges were refreshed after everything sent so far was processed
    (two refreshes: each observes every device's last-seen age once)."""
    assert svc.batcher.wait_idle(60)
    svc.evaluate()
    n = len(svc.directory.all())
    name = "tinydrift_device_last_seen_age_seconds_count"
    seen = value(scrape(svc.metrics_port), name)
    wait(lambda: value(scrape(svc.metrics_port), name) >= seen + 2 * n, 60, "two gauge refreshes")
    return series(scrape(svc.metrics_port))


def test_a_flood_of_new_fleets_and_model_versions_adds_no_series(rig: Rig, bundle: Bundle) -> None:
    schema = bundle.firmware().schema.schema_id_hex
    svc = rig.service
    warm = [
        (
            topic(FLEET, d, Leaf.STATUS),
            birth(schema, active_version=v),
        )
        for d, v in rig.devices.items()
    ]
    warm += [(topic(FLEET, d, Leaf.TEL), frame(0, version=v)) for d, v in rig.devices.items()]
    warm += [(topic(FLEET, "odd", Leaf.TEL), frame(1, version=5_000))]
    warm += [
        (
            topic(INTRUDER, "dev-0", Leaf.STATUS),
            birth(schema, active_version=1),
        )
    ]
    publish(rig.broker, warm)
    wait(
        lambda: all(
            (i := svc.directory.get(FLEET, d)) is not None and i.frames >= 1 for d in rig.devices
        ),
        30,
        "the real fleet's first frames",
    )
    wait(lambda: svc.directory.get(INTRUDER, "dev-0") is not None, 30, "the intruder's birth")
    before = settled(svc)
    text = scrape(svc.metrics_port)
    rejected = {
        r: value(text, "tinydrift_ingest_rejected_total", reason=r)
        for r in ("unknown_device", "unknown_fleet")
    }
    readings = value(text, "tinydrift_readings_received_total", fleet=FLEET)
    processed = svc.batcher.processed

    flood: list[tuple[str, bytes]] = []
    for i in range(FLOOD_FLEETS):
        fleet, dev = f"flood-{i}", f"dev-{i}"
        flood.append((topic(fleet, dev, Leaf.TEL), frame(0, version=1)))
        if i < FLOOD_REGISTERING:
            flood.append(
                (
                    topic(fleet, dev, Leaf.STATUS),
                    birth(schema, active_version=1),
                )
            )
            flood.append((topic(fleet, dev, Leaf.LBL), labels(0)))
            flood.append((topic(fleet, dev, Leaf.ACK), ACK))
    for i in range(ODD_VERSIONS):  # the real device under a new model version each frame
        flood.insert(i * 4, (topic(FLEET, "odd", Leaf.TEL), frame(2 + i, version=10_000 + i)))
    good = [(topic(FLEET, "good", Leaf.TEL), frame(seq, version=1)) for seq in range(1, 41)]
    for j, item in enumerate(good):  # the good device keeps sending through the flood
        flood.insert(j * 100, item)
    publish(rig.broker, flood)
    wait(lambda: svc.batcher.processed >= processed + len(flood), 120, "the flood processed")
    after = settled(svc)

    # no fleet segment or model version of the flood became a label value
    assert values(after, "fleet") <= {FLEET, INTRUDER, "_unknown"}, sorted(values(after, "fleet"))
    assert values(after, "model_version") <= {"1", "1-recalibrated", "_unknown"}, sorted(
        values(after, "model_version")
    )[:30]
    # and not one series more or less
    assert after == before, (len(before), len(after), sorted(after ^ before)[:10])
    # every flood message is a counted rejection; no fleet of the flood got a device
    text = scrape(svc.metrics_port)
    registering = FLOOD_FLEETS + 2 * FLOOD_REGISTERING  # telemetry, labels, acks
    assert value(text, "tinydrift_ingest_rejected_total", reason="unknown_device") == (
        rejected["unknown_device"] + registering
    )
    assert value(text, "tinydrift_ingest_rejected_total", reason="unknown_fleet") == (
        rejected["unknown_fleet"] + FLOOD_REGISTERING
    )
    assert not [i for i in svc.directory.all() if i.fleet.startswith("flood-")]
    assert value(text, "tinydrift_mqtt_messages_received_total", fleet="_unknown") >= len(flood) - (
        ODD_VERSIONS + len(good)
    )
    # the real fleet was served all along: every frame of good and odd accepted, in sequence
    g, o = svc.directory.get(FLEET, "good"), svc.directory.get(FLEET, "odd")
    assert g is not None
    assert o is not None
    assert (g.seq, g.frames, g.lost_frames) == (40, 41, 0)
    assert (o.seq, o.frames, o.lost_frames) == (ODD_VERSIONS + 1, ODD_VERSIONS + 2, 0)
    assert value(text, "tinydrift_readings_received_total", fleet=FLEET) == readings + 2 * (
        len(good) + ODD_VERSIONS
    )
    by_model = {
        v: value(text, "tinydrift_devices_by_model", fleet=FLEET, model_version=v)
        for v in ("1", "1-recalibrated", "_unknown")
    }
    assert by_model == {"1": 1, "1-recalibrated": len(RECALIBRATED), "_unknown": 1}


def test_a_restart_admits_the_registry_s_fleets_most_recently_heard_first(
    rig: Rig, tmp_path: Path
) -> None:
    """With room for one fleet, the real fleet (heard last) keeps its series; the intruder's
    device, stored in the registry, is not monitored and its fleet gets no series."""
    rig.service.stop()
    svc = Service(
        load_settings(
            broker=rig.broker.url, db=rig.db, metrics_port=0, mqtt_client_id="cardinality-svc",
            max_fleets=1,
        )
    )  # fmt: skip
    try:
        assert FLEET in svc.metrics.fleets
        assert INTRUDER not in svc.metrics.fleets
        assert values(series(svc.metrics.exposition().decode()), "fleet") <= {FLEET, "_unknown"}
    finally:
        svc.writer.close()
        svc.registry.close()
