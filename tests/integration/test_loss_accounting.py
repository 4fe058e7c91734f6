"""Losses are counted where they happen, once: a killed service restarts where it left off, and a
checkpoint counts as written only once the database has it.

Real Mosquitto, real ``tinydrift serve`` processes (one killed with SIGKILL), real SQLite and
PostgreSQL databases made unavailable the way ``test_registry_writer.py`` does it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import make_url

from edge_agent.wire.topics import Leaf, topic
from service.config import load_settings
from service.embedded_broker import EmbeddedBroker, free_port
from service.firmware_bundle import Bundle
from service.ingest.sequence_positions import POSITIONS_KIND, read_positions
from service.registry.store import Registry
from service.serve import Service
from tests.integration.polling import wait
from tests.integration.rollout_rig import seed_registry
from tests.integration.test_serve import _birth, frame, labels, metric, scrape

pytestmark = pytest.mark.integration

Popen = subprocess.Popen[bytes]


class Device:
    """One MQTT connection publishing as a device (QoS and retain chosen per message)."""

    def __init__(self, broker: EmbeddedBroker, fleet: str, device: str) -> None:
        self.fleet, self.device = fleet, device
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{fleet}-{device}"
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, leaf: Leaf, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic(self.fleet, self.device, leaf), payload, qos, retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def serve_process(broker: EmbeddedBroker, db: str, log: Path) -> Iterator[tuple[Popen, int]]:
    """``tinydrift serve`` as its own process (its client id, hence its persistent session,
    fixed); yields the process and its metrics port, stopped (if still alive) at exit."""
    exe = shutil.which("tinydrift")
    assert exe, "the tinydrift console script is not on PATH: pip install -e ."
    port = free_port()
    env = os.environ | {
        "TINYDRIFT_MQTT_CLIENT_ID": "loss-accounting-svc",
        "TINYDRIFT_CHECKPOINT_INTERVAL_S": "3600",  # no detector checkpoint but at shutdown
    }
    cmd = [exe, "serve", "--broker", broker.url, "--db", db, "--metrics-port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen([*cmd, "--api-port", "0"], stdout=out, stderr=out, env=env)
    try:

        def connected() -> bool:
            try:
                return metric(scrape(port), "tinydrift_mqtt_connected") == 1
            except OSError:
                assert proc.poll() is None, log.read_text()
                return False

        wait(connected, 60, "the service to connect")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def test_a_killed_service_counts_after_restart_only_what_it_never_received(
    mosquitto: EmbeddedBroker, bundle: Bundle, tmp_path: Path
):
    """Frames and labels the killed process had received are not counted as lost again; those
    published while no service ran are, exactly; a replay of a received frame is a duplicate."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    seed_registry(db, bundle)
    log = tmp_path / "serve.log"
    fleet = "killed"
    dev = Device(mosquitto, fleet, "k1")

    def received(port: int, tel: int, lbl: int) -> bool:
        """At least ``tel`` frames and ``lbl`` label batches (2 readings each) accepted."""
        text = scrape(port)
        return (
            metric(text, "tinydrift_readings_received_total", fleet=fleet) >= 2 * tel
            and metric(text, "tinydrift_labels_received_total", fleet=fleet) >= 2 * lbl
        )

    def saved() -> tuple[int | None, ...] | None:
        with Registry(db) as reg:
            rows = reg.load_checkpoints(kind=POSITIONS_KIND, fleet=fleet)
        return read_positions(rows[0]).get("k1") if rows else None

    try:
        # the first process stops cleanly: its detector checkpoint holds frame 9
        with serve_process(mosquitto, db, log) as (proc, port):
            dev.send(Leaf.STATUS, _birth(bundle, 1), qos=1, retain=True)
            for seq in range(10):
                dev.send(Leaf.TEL, frame(seq, 1))
            wait(lambda: received(port, 10, 0), 30, "frames 0-9")
        assert proc.returncode == 0, log.read_text()
        # the second receives frames 10-19 and labels 0-4, is killed after saving its position
        with serve_process(mosquitto, db, log) as (proc, port):
            for seq in range(10, 20):
                dev.send(Leaf.TEL, frame(seq, 1))
            for seq in range(5):
                dev.send(Leaf.LBL, labels(seq, 1), qos=1)
            wait(lambda: received(port, 10, 5), 30, "frames 10-19 and labels 0-4")
            wait(lambda: saved() == (1, 19, 1, 4), 30, "the position saved")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        # nobody receives these: QoS 0 is not queued for an absent subscriber
        for seq in range(20, 25):
            dev.send(Leaf.TEL, frame(seq, 1))
        for seq in (5, 6):
            dev.send(Leaf.LBL, labels(seq, 1), qos=0)
        with serve_process(mosquitto, db, log) as (proc, port):
            dev.send(Leaf.TEL, frame(19, 1))  # received before the kill: a duplicate
            for seq in range(25, 30):
                dev.send(Leaf.TEL, frame(seq, 1))
            for seq in (7, 8):
                dev.send(Leaf.LBL, labels(seq, 1), qos=1)
            wait(lambda: received(port, 5, 2), 30, "frames 25-29 and labels 7, 8")
            text = scrape(port)
            counts = {
                "readings": metric(text, "tinydrift_readings_received_total", fleet=fleet),
                "labels": metric(text, "tinydrift_labels_received_total", fleet=fleet),
                "duplicates": metric(text, "tinydrift_ingest_rejected_total", reason="duplicate"),
                **{
                    f"{s}_gaps": metric(
                        text, "tinydrift_ingest_sequence_gaps_total", fleet=fleet, stream=s
                    )
                    for s in ("telemetry", "labels")
                },
            }
            # frames 20-24 and label batches 5, 6 lost; not 10-19 again; 19 is a duplicate
            assert counts == {
                "readings": 10,
                "labels": 4,
                "duplicates": 1,
                "telemetry_gaps": 5,
                "labels_gaps": 2,
            }
    finally:
        dev.close()


# -- checkpoints while the database is down ----------------------------------------------------


@contextmanager
def database_down(url: str, svc: Service) -> Iterator[Callable[[], None]]:
    """Make the service's registry refuse writes until exit, the way test_registry_writer does:
    another connection holds SQLite's write lock, or PostgreSQL's checkpoint table is locked and
    the writer's blocked backend terminated (a lost connection, retried). Yields a wait for the
    writer to have tried a write and failed."""
    retries = svc.writer.retries
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        locker = sqlite3.connect(path, isolation_level=None, timeout=30)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield lambda: wait(lambda: svc.writer.retries > retries, 60, "a failed write")
        finally:
            locker.execute("COMMIT")
            locker.close()
        return
    libpq = make_url(url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(libpq) as locker, psycopg.connect(libpq, autocommit=True) as admin:
        locker.execute("LOCK TABLE detector_checkpoints IN ACCESS EXCLUSIVE MODE")

        def blocked() -> int | None:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).fetchone()
            return None if row is None else int(row[0])

        def refused() -> None:
            wait(lambda: blocked() is not None, 60, "the registry writer blocked")
            admin.execute("SELECT pg_terminate_backend(%s)", (blocked(),))
            wait(lambda: svc.writer.retries > retries, 60, "a failed write")

        try:
            yield refused
        finally:
            locker.commit()


def test_a_checkpoint_counts_as_ok_only_once_committed(
    mosquitto: EmbeddedBroker, bundle: Bundle, db_url: str
):
    seed_registry(db_url, bundle)
    s = load_settings(
        broker=mosquitto.url,
        db=db_url,
        metrics_port=0,
        checkpoint_interval_s=3600.0,  # checkpoints only when the test asks
        mqtt_client_id=f"ckpt-outage-{db_url[:5]}",
    )
    svc = Service(s)
    svc.start()
    dev = Device(mosquitto, "ckpt", "c1")
    try:
        assert svc.consumer.wait_connected(10)
        dev.send(Leaf.STATUS, _birth(bundle, 1), qos=1)
        wait(lambda: svc.directory.get("ckpt", "c1") is not None, 20, "the birth")
        dev.send(Leaf.TEL, frame(0, 1), qos=1)
        wait(lambda: ("ckpt", "c1") in svc.engine.monitors, 20, "the device's monitor")

        def checkpoints() -> dict[str, float]:
            text = scrape(svc.metrics_port or 0)
            return {
                o: metric(text, "tinydrift_checkpoints_total", outcome=o) for o in ("ok", "error")
            }

        assert svc.writer.flush(30)
        before = checkpoints()
        with database_down(db_url, svc) as refused:
            assert svc.checkpoint() >= 1  # queued: the device and its cohort
            refused()
            assert checkpoints() == before  # not committed: neither ok nor error yet
        wait(lambda: checkpoints()["ok"] == before["ok"] + 1, 60, "the checkpoint committed")
        assert checkpoints()["error"] == before["error"]
        with Registry(db_url) as reg:
            assert [c.device for c in reg.load_checkpoints(kind="device_monitor")] == ["c1"]
    finally:
        dev.close()
        svc.stop()
