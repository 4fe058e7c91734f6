"""The consumer's read-ahead paho client against Mosquitto: every message, in order, whole
(small and large payloads, bursts that leave bytes read ahead), also after a reconnection."""

from __future__ import annotations

import contextlib
import queue
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from service.embedded_broker import free_port, start_mosquitto
from service.ingest.mqtt_consumer import Incoming, MqttConsumer, ReadAheadClient

pytestmark = pytest.mark.integration


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="pub")
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def payloads(n: int, start: int) -> list[bytes]:
    # sizes from 1 byte to beyond one read-ahead chunk, so packets straddle the chunks
    sizes = [1, 30, 300, 3_000, 70_000, ReadAheadClient.READ_BYTES + 5]
    return [
        (start + i).to_bytes(4, "big") + bytes([i % 251]) * sizes[i % len(sizes)] for i in range(n)
    ]


def receive(q: queue.Queue[Incoming], n: int, timeout: float = 30.0) -> list[bytes]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            out.append(q.get(timeout=0.5).payload)
    return out


def test_every_message_arrives_whole_and_in_order_across_a_reconnection():
    port = free_port()
    broker = start_mosquitto(port)
    q: queue.Queue[Incoming] = queue.Queue()
    consumer = MqttConsumer(
        host="127.0.0.1", port=port, client_id="svc-read-ahead", fleets=["f"], out=q
    )
    assert isinstance(consumer.client, ReadAheadClient)
    consumer.client.reconnect_delay_set(min_delay=1, max_delay=1)
    consumer.start()
    pub = None
    try:
        assert consumer.wait_connected(10)
        time.sleep(0.3)
        pub = publisher(port)
        sent = payloads(600, 0)
        infos = [pub.publish("td/v1/f/d1/tel", p, qos=1) for p in sent]
        for info in infos:
            info.wait_for_publish(10)
        assert receive(q, len(sent)) == sent
        # a reconnection: nothing read ahead from the old socket is served afterwards
        pub.loop_stop()
        pub.disconnect()
        broker.stop()
        time.sleep(1.0)
        broker = start_mosquitto(port)
        deadline = time.monotonic() + 20
        while consumer.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert consumer.connects >= 2
        time.sleep(0.3)
        pub = publisher(port)
        sent = payloads(300, 1000)
        infos = [pub.publish("td/v1/f/d2/tel", p, qos=1) for p in sent]
        for info in infos:
            info.wait_for_publish(10)
        assert receive(q, len(sent)) == sent
        assert q.empty()
    finally:
        if pub is not None:
            pub.loop_stop()
            pub.disconnect()
        consumer.stop()
        broker.stop()
