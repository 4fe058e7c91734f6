"""The broker goes away mid-stream: the service counts it, keeps its detectors and resumes."""

from __future__ import annotations

import time

import pytest

from edge_agent.device.fleet import Fleet, FleetConfig
from service.config import load_settings
from service.embedded_broker import free_port, start_mosquitto
from service.ingest.ingest_queue import IngestQueue
from service.ingest.mqtt_consumer import MqttConsumer
from service.registry.store import Registry
from service.serve import Service
from tests.integration.polling import wait

pytestmark = pytest.mark.integration


def test_service_survives_a_broker_restart(bundle, tmp_path, caplog):
    port = free_port()
    broker = start_mosquitto(port)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    fw = bundle.firmware()
    reg = Registry(url)
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    svc = Service(load_settings(broker=broker.url, db=url, metrics_port=0))
    svc.start()
    fleet = Fleet(
        FleetConfig(
            fleet="out", devices=4, host="127.0.0.1", port=port, seed=9, batch=16, period_s=0.05
        ),
        fw,
        {},
    )
    fleet.start()
    try:
        wait(
            lambda: (
                len(svc.engine.monitors) == 4
                and all(m.reference_complete for m in svc.engine.monitors.values())
            ),
            30,
            "references",
        )
        monitors = dict(svc.engine.monitors)
        broker.stop()
        wait(lambda: not svc.consumer.connected.is_set(), 15, "the service to notice")
        assert svc.consumer.last_error is not None
        assert "reconnecting" in svc.consumer.last_error or "retrying" in svc.consumer.last_error
        # the failed reconnections say why (paho itself logs nothing at error level)
        wait(lambda: "refused" in (svc.consumer.last_error or ""), 15, "the reason logged")
        assert "cannot connect to the broker" in (svc.consumer.last_error or "")
        time.sleep(2.0)  # the service keeps running while the broker is down
        assert svc.batcher._thread.is_alive()
        broker = start_mosquitto(port)
        wait(lambda: svc.consumer.connected.is_set(), 40, "reconnection")
        n = svc.status().readings
        wait(lambda: svc.status().readings > n + 500, 40, "telemetry after the outage")
        assert svc.metrics.mqtt_reconnects._value.get() >= 1
        assert svc.metrics.mqtt_connected._value.get() == 1
        refused = [r for r in caplog.records if "cannot connect to the broker" in r.getMessage()]
        assert refused
        assert all(r.levelname == "ERROR" for r in refused)
        assert len(refused) < 5  # once per reason, not once per retry
        # the very same detector objects carry on: nothing was relearned
        assert all(svc.engine.monitors[k] is m for k, m in monitors.items())
    finally:
        fleet.stop()
        svc.stop()
        broker.stop()


def test_two_clients_with_one_client_id_are_named_as_a_takeover(mosquitto, caplog):
    """Two service instances with the same client id knock each other off; each says so, with
    the id, instead of logging an endless series of anonymous reconnections."""
    consumers = [
        MqttConsumer(
            host=mosquitto.host,
            port=mosquitto.port,
            client_id="takeover-probe",
            fleets=["takeover"],
            out=IngestQueue(10),
        )
        for _ in range(2)
    ]
    for c in consumers:
        c.start()
    try:
        wait(
            lambda: any("takeover-probe" in (c.last_error or "") for c in consumers),
            60,
            "a takeover named",
        )
    finally:
        for c in consumers:
            c.stop()
    named = [r for r in caplog.records if "another client probably uses" in r.getMessage()]
    assert named
    assert all(r.levelname == "ERROR" for r in named)
