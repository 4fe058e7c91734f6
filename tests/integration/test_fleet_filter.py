"""A persistent session remembers old subscriptions: a narrowed ``--fleet`` must still narrow."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.wire.messages import Status
from edge_agent.wire.topics import Leaf, topic
from service.config import load_settings
from service.serve import Service
from tests.integration.polling import wait

pytestmark = pytest.mark.integration


def test_narrowing_the_fleets_drops_the_old_all_fleet_subscription(mosquitto, bundle, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    common = {
        "broker": mosquitto.url,
        "db": url,
        "metrics_port": 0,
        "mqtt_client_id": "fleet-filter-svc",
    }
    first = Service(load_settings(**common))  # all fleets, persistent session
    first.start()
    assert first.consumer.wait_connected(10)
    first.stop()
    birth = Status.create(
        online=True,
        schema_id=bundle.firmware().schema.schema_id_hex,
        active_version=1,
        update_state="IDLE",
        last_deploy_seq=0,
        epoch_floor=0,
        boot=1,
        ts_ms=0,
        caps={"max_chunk": 512, "telemetry": ["bin"], "labels": True},
    ).to_json()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ff-pub")
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    for fleet in ("mine", "theirs"):  # queued for the offline session (QoS 1)
        c.publish(topic(fleet, "d1", Leaf.STATUS), birth, qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    second = Service(load_settings(**common, fleets=["mine"]))
    second.start()
    try:
        wait(lambda: second.directory.get("mine", "d1") is not None, 10, "our fleet's birth")
        time.sleep(0.5)
        assert second.directory.get("theirs", "d1") is None
    finally:
        second.stop()
