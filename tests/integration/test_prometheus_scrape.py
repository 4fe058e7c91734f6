"""A real Prometheus scrapes the running service fed by a simulated fleet with drift."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from service.config import load_settings
from service.prometheus_server import PrometheusServer, start_prometheus
from service.registry.store import Registry
from service.serve import Service

pytestmark = pytest.mark.integration

SERIES = [
    "tinydrift_build_info",
    "tinydrift_mqtt_messages_received_total",
    "tinydrift_readings_received_total",
    "tinydrift_ingest_rejected_total",
    "tinydrift_ingest_sequence_gaps_total",
    "tinydrift_ingest_lag_seconds_bucket",
    "tinydrift_ingest_batch_size_bucket",
    "tinydrift_ingest_queue_depth",
    "tinydrift_mqtt_connected",
    "tinydrift_devices",
    "tinydrift_devices_by_model",
    "tinydrift_drift_detections_total",
    "tinydrift_drifting_devices",
    "tinydrift_drift_alarm_active",
    "tinydrift_fleet_feature_drift_score",
    "tinydrift_prediction_class_ratio",
    "tinydrift_prediction_confidence_bucket",
    "tinydrift_labelled_accuracy_ratio",
    "tinydrift_estimated_accuracy_ratio",
    "tinydrift_checkpoints_total",
]


@pytest.fixture(scope="module")
def running(mosquitto, bundle, tmp_path_factory) -> Iterator[tuple[Service, PrometheusServer]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('prom') / 'r.db'}"
    fw = bundle.firmware()
    reg = Registry(url)
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    svc = Service(
        load_settings(
            broker=mosquitto.url,
            db=url,
            metrics_port=0,
            window_s=1.0,
            checkpoint_interval_s=2.0,
            # its own persistent session, on its own fleet: a session left subscribed to every
            # fleet would queue the later tests' messages for whoever reuses the client id
            mqtt_client_id="prometheus-scrape-svc",
            fleets=["prom"],
            null_min_blocks=16,  # calibrated within 5-15 s (production: 48); drift at 20 s
            null_horizon_readings=128,  # dependence over 8 frames (production: 512 readings)
            null_horizon_labels=8,  # and 8 labels (production: 32)
        )
    )
    svc.start()
    plan = plan_drift(10, "gain", 0.3, after_s=20.0, seed=2)
    fleet = Fleet(
        FleetConfig(
            fleet="prom",
            devices=10,
            host=mosquitto.host,
            port=mosquitto.port,
            seed=2,
            batch=16,
            period_s=0.05,
            label_rate=0.1,
        ),
        fw,
        plan,
    )
    fleet.start()
    prom = start_prometheus([f"127.0.0.1:{svc.metrics_port}"])
    yield svc, prom
    prom.stop()
    fleet.stop()
    svc.stop()


def test_prometheus_scrapes_every_series(running):
    _svc, prom = running
    deadline = time.monotonic() + 90
    missing = list(SERIES)
    while time.monotonic() < deadline and missing:
        missing = [s for s in missing if not prom.query(s)]
        time.sleep(1)
    assert prom.targets_up()
    assert not missing, f"series never scraped: {missing}"
    # drift shows up as detections with bounded labels, the device id only as an exemplar
    det = prom.query("sum by (signal) (tinydrift_drift_detections_total)")
    assert det
    assert all(set(r["metric"]) <= {"signal"} for r in det)
    labels = {k for r in prom.query('{__name__=~"tinydrift_.*"}') for k in r["metric"]}
    assert "device" not in labels
    assert "device_id" not in labels
    rate = prom.query("sum(rate(tinydrift_readings_received_total[10s]))")
    assert float(rate[0]["value"][1]) > 1000
