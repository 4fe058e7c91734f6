"""Under a telemetry overload the service sheds telemetry, counted, and never a control message.

A flood process publishes telemetry faster than the service takes it (its telemetry lane holds
100 messages here), and the service sheds (``queue_full``). While it does, 20 devices that were
never seen connect and publish their birth, telemetry, labels and update acks, as the devices of
issue 11 item 4 did. Every control message must arrive: every device is known afterwards, all
its labels and acks are counted, and none of its frames is rejected as ``unknown_device`` after
the overload.
Nothing here depends on timing: the overload is confirmed by the shed counter rising before the
first birth and again after the last control message.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.wire.messages import LabelBatch, UpdateAck
from edge_agent.wire.topics import Leaf, topic
from service.config import load_settings
from service.embedded_broker import MOSQUITTO_CONF
from service.firmware_bundle import Bundle
from service.serve import Service
from tests.integration.device_messages import birth, frame
from tests.integration.polling import wait
from tests.integration.rollout_rig import seed_registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLOOD = "overload-flood"
NEWCOMERS = "overload-new"
FLOOD_DEVICES = 50
NEW = 20
FRAMES, LABELS, ACKS = 5, 5, 3
"""Per new device during the overload: telemetry frames, label batches, update acks."""
LABELS_PER_BATCH = 4
DEADLINE_S = 120.0
"""Generous: every wait polls for a condition (the machine may be loaded by other work)."""


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.partition(" # ")[0].rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(params=[16 << 20, 0], ids=["ack-ahead", "ack-when-taken"])
def service(
    request: pytest.FixtureRequest, mosquitto, bundle: Bundle, sqlite_url: str
) -> Iterator[Service]:
    """The service; with ``control_queue_bytes`` 0 every control message is acknowledged only
    when the batcher takes it (the broker's in-flight window then bounds what waits)."""
    seed_registry(sqlite_url, bundle)
    svc = Service(
        load_settings(
            broker=mosquitto.url,
            db=sqlite_url,
            metrics_port=0,
            mqtt_client_id="overload-test-svc",
            fleets=[FLOOD, NEWCOMERS],
            queue_size=100,  # the smallest allowed: an overload is reached at once
            control_queue_bytes=request.param,
        )
    )
    svc.start()
    assert svc.consumer.wait_connected(30)
    yield svc
    svc.stop()


@pytest.fixture
def flood(mosquitto, bundle: Bundle) -> Iterator[subprocess.Popen[bytes]]:
    """The flood process, its births published; it floods after a line on stdin."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.telemetry_flood", mosquitto.host,
         str(mosquitto.port), str(bundle.firmware_dir), FLOOD, str(FLOOD_DEVICES)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"born", "the flood process failed to start"
        yield proc
    finally:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()  # stops the flood; it then clears its retained births
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _labels(seq: int) -> bytes:
    return LabelBatch.create(
        seq=seq,
        boot=1,
        ts_ms=int(time.time() * 1000),
        param_version=1,
        features=np.zeros((LABELS_PER_BATCH, 8)),
        pred=[0] * LABELS_PER_BATCH,
        label=[1] * LABELS_PER_BATCH,
    ).to_json()


def _ack(i: int) -> bytes:
    return UpdateAck.create(
        deploy_seq=i + 1, state="DOWNLOADING", code=202, reason="downloading", ts_ms=0
    ).to_json()


class NewDevice:
    """A device's own MQTT connection, publishing what a device does."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.name = name
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{NEWCOMERS}-{name}"
        )
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, leaf: Leaf, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(
            topic(NEWCOMERS, self.name, leaf), payload, leaf.qos, leaf.retained
        )

    def close(self) -> None:
        self.publish(Leaf.STATUS, b"").wait_for_publish(DEADLINE_S)  # clear the retained birth
        self.client.disconnect()
        self.client.loop_stop()


def test_control_messages_are_never_shed_under_a_telemetry_overload(
    service: Service, flood: subprocess.Popen[bytes], mosquitto, bundle: Bundle
) -> None:
    svc = service
    schema_id = bundle.firmware().schema.schema_id_hex

    def shed() -> float:
        return metric(
            scrape(svc.metrics_port), "tinydrift_ingest_rejected_total", reason="queue_full"
        )

    def known(fleet: str, name: str) -> bool:
        info = svc.directory.get(fleet, name)
        return info is not None and info.schema_id == schema_id

    wait(
        lambda: all(known(FLOOD, f"dev-{i:05d}") for i in range(FLOOD_DEVICES)),
        DEADLINE_S,
        "the flood devices' births",
    )
    assert flood.stdin is not None
    flood.stdin.write(b"go\n")
    flood.stdin.flush()
    wait(lambda: shed() > 0, DEADLINE_S, "the flood to overload the service")

    devices = [NewDevice(mosquitto.host, mosquitto.port, f"new-{i:02d}") for i in range(NEW)]
    try:
        # each: its birth, then telemetry, labels and acks (QoS 1: until the broker acked them)
        for d in devices:
            d.publish(Leaf.STATUS, birth(schema_id)).wait_for_publish(DEADLINE_S)
            sent = [d.publish(Leaf.TEL, frame(s)) for s in range(FRAMES)]
            sent += [d.publish(Leaf.LBL, _labels(s)) for s in range(LABELS)]
            sent += [d.publish(Leaf.ACK, _ack(s)) for s in range(ACKS)]
            for info in sent:
                info.wait_for_publish(DEADLINE_S)
        after_last = shed()
        wait(
            lambda: shed() > after_last, DEADLINE_S, "the overload to outlast the control messages"
        )
        flood.stdin.close()  # the overload ends: the flood clears its births and exits
        assert flood.wait(DEADLINE_S) == 0

        def counted() -> tuple[float, float, float, float]:
            text = scrape(svc.metrics_port)
            return (
                metric(
                    text, "tinydrift_mqtt_messages_received_total", fleet=NEWCOMERS, kind="status"
                ),
                metric(text, "tinydrift_mqtt_messages_received_total", fleet=NEWCOMERS, kind="lbl"),
                metric(text, "tinydrift_labels_received_total", fleet=NEWCOMERS),
                metric(text, "tinydrift_update_acks_total", fleet=NEWCOMERS),
            )

        expected = (NEW, NEW * LABELS, NEW * LABELS * LABELS_PER_BATCH, NEW * ACKS)
        with contextlib.suppress(AssertionError):  # the assertion below shows the figures
            wait(lambda: counted() == expected, DEADLINE_S, "every control message")
        assert counted() == expected, "(births, label batches, labels, acks) received"
        unknown = [d.name for d in devices if not known(NEWCOMERS, d.name)]
        assert not unknown, f"{len(unknown)} of {NEW} new devices unknown: {unknown}"

        # the flood's last frames came before its births' clearing: once those are counted
        # and the queue is empty, nothing of the overload is left
        wait(
            lambda: (
                metric(
                    scrape(svc.metrics_port),
                    "tinydrift_mqtt_messages_received_total",
                    fleet=FLOOD,
                    kind="status",
                )
                == 2 * FLOOD_DEVICES
            ),
            DEADLINE_S,
            "the flood's births cleared",
        )
        assert svc.batcher.wait_idle(DEADLINE_S)
        unknown_during = svc.batcher.rejections.get("unknown_device", 0)
        # after the overload, every new device's telemetry is accepted (it was never forgotten)
        before = {d.name: svc.directory.get(NEWCOMERS, d.name).frames for d in devices}  # type: ignore[union-attr]
        for d in devices:
            d.client.publish(topic(NEWCOMERS, d.name, Leaf.TEL), frame(FRAMES), 1).wait_for_publish(
                DEADLINE_S
            )
        wait(
            lambda: all(
                svc.directory.get(NEWCOMERS, d.name).frames > before[d.name]  # type: ignore[union-attr]
                for d in devices
            ),
            DEADLINE_S,
            "a frame of every new device after the overload",
        )
    finally:
        for d in devices:
            d.close()
    assert svc.batcher.rejections.get("unknown_device", 0) == unknown_during  # none after
    assert svc.batcher.rejections["queue_full"] > 0  # telemetry was shed, and counted
    # a new device's first frames may overtake its birth in the broker (QoS 0 passes the QoS 1
    # messages its in-flight window to the service holds back): rejected, counted, and only
    # those frames sent during the overload
    assert unknown_during <= NEW * FRAMES
    q = svc.queue
    if q.ack_ahead_bytes > 0:
        assert q.deferred_total == 0  # every control message was acknowledged on receipt
    else:
        # every control message was acknowledged when taken; the broker held the rest, so what
        # waited in the service never exceeded its in-flight window
        window = int(re.search(r"max_inflight_messages (\d+)", MOSQUITTO_CONF).group(1))  # type: ignore[union-attr]
        assert q.deferred_total >= NEW * (1 + LABELS + ACKS)
        assert q.control_high_water <= window
