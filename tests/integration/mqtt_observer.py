"""A test-side MQTT client: records what devices publish, signs and publishes manifests.

It plays the service's part of the device contract with the real service components
(:class:`BlobTransferService`, manifest signing) so the device side can be tested end to end
over a real broker before the rollout controller exists.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.blob import SigningKey
from edge_agent.wire.messages import Manifest
from edge_agent.wire.telemetry_codec import decode_telemetry
from edge_agent.wire.topics import Leaf, parse_topic, subscription, topic
from service.rollout.blob_transfer import BlobTransferService
from service.rollout.chunk_server import BlobCache
from service.rollout.desired_state import DesiredStatePublisher
from tests.integration.polling import wait


class Observer:
    """Collects tel / lbl / status / ack per device and serves blobs."""

    def __init__(self, host: str, port: int, client_id: str = "test-observer") -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
        )
        self.lock = threading.Lock()
        self.tel: dict[str, list[Any]] = defaultdict(list)
        self.lbl: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.status: dict[str, dict[str, Any]] = {}
        self.acks: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.cache = BlobCache()
        self.transfer = BlobTransferService(self.client, self.cache)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.transfer.start()
        self.client.connect(host, port)
        self.client.loop_start()
        self.wait(lambda: self.client.is_connected(), 10, "observer connected")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(
            [(subscription(leaf), 1) for leaf in (Leaf.TEL, Leaf.LBL, Leaf.STATUS, Leaf.ACK)]
            + self.transfer.subscriptions()
        )

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        t = parse_topic(msg.topic)
        with self.lock:
            if t.leaf == Leaf.TEL:
                self.tel[t.device].append(decode_telemetry(bytes(msg.payload)))
            elif t.leaf == Leaf.LBL:
                self.lbl[t.device].append(json.loads(msg.payload))
            elif t.leaf == Leaf.STATUS:
                self.status[t.device] = json.loads(msg.payload)
            elif t.leaf == Leaf.ACK:
                self.acks[t.device].append(json.loads(msg.payload))

    def publish_manifest(
        self, fleet: str, device: str, manifest: Manifest, key: SigningKey | None
    ) -> None:
        """Sign (unless ``key`` is None) and publish retained on the device's desired topic."""
        if key is not None:
            info = DesiredStatePublisher(self.client, key).publish(fleet, device, manifest)
        else:
            info = self.client.publish(
                topic(fleet, device, Leaf.DESIRED), manifest.to_json(), 1, True
            )
        info.wait_for_publish(5)

    def publish_raw(self, fleet: str, device: str, leaf: str, payload: bytes) -> None:
        """Publish arbitrary bytes (for tampering tests)."""
        info = self.client.publish(topic(fleet, device, leaf), payload, 1, retain=True)
        info.wait_for_publish(5)

    def states(self, device: str) -> list[tuple[int, str, str]]:
        """``(deploy_seq, state, reason)`` of every ack from ``device`` so far."""
        with self.lock:
            return [(a["deploy_seq"], a["state"], a["reason"]) for a in self.acks[device]]

    wait = staticmethod(wait)

    def close(self) -> None:
        """Disconnect and stop the blob worker."""
        self.transfer.stop()
        self.client.loop_stop()
        self.client.disconnect()
