"""A telemetry flood in its own process, for overload tests: births, then frames without pause.

``python -m tests.integration.telemetry_flood HOST PORT FIRMWARE_DIR FLEET DEVICES``: publishes
every device's retained birth (QoS 1), prints ``born``, waits for a line on stdin, then publishes
binary frames of 16 readings (QoS 0, the frames of ``tests/bench/loadgen.py``) as fast as one
client can until stdin closes, and finally clears the retained births. One thread drives paho
(``loop`` between bursts), so unsent frames cannot pile up in memory.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.device.firmware import Firmware
from edge_agent.wire.topics import Leaf, topic
from tests.bench.loadgen import LoadGenerator

BURST = 256
"""Frames published between two passes of paho's loop."""


def main(host: str, port: int, firmware_dir: Path, fleet: str, devices: int) -> None:
    """Run the flood (see the module docstring)."""
    gen = LoadGenerator("", 0, Firmware.load(firmware_dir), devices=devices, k=16, fleet=fleet)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"flood-{fleet}",
        protocol=mqtt.MQTTv311,
    )
    client.max_queued_messages_set(0)
    client.connect(host, port)

    def publish_and_wait(items: list[tuple[str, bytes]]) -> None:
        infos = [client.publish(t, p, 1, True) for t, p in items]
        while not all(i.is_published() for i in infos):
            client.loop(0.1)

    publish_and_wait(gen.birth_messages())
    print("born", flush=True)
    sys.stdin.readline()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        for t, p in gen.take(BURST):
            client.publish(t, p, 0)
        client.loop(0)
    publish_and_wait([(topic(fleet, name, Leaf.STATUS), b"") for name in gen.names])
    client.disconnect()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
