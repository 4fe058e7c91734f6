"""Publish signed desired-state manifests, retained, on each device's ``desired`` topic."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from edge_agent.blob import SigningKey
from edge_agent.wire.manifest_signature import sign_manifest
from edge_agent.wire.messages import Manifest
from edge_agent.wire.topics import Leaf, topic


class DesiredStatePublisher:
    """Signs with the deploy key and publishes QoS 1, retained (the device pulls from it)."""

    def __init__(self, client: mqtt.Client, deploy_key: SigningKey) -> None:
        self.client = client
        self.deploy_key = deploy_key

    def publish(self, fleet: str, device: str, manifest: Manifest) -> mqtt.MQTTMessageInfo:
        """Sign ``manifest`` and publish it retained for ``fleet/device``."""
        signed = sign_manifest(manifest, self.deploy_key)
        return self.client.publish(topic(fleet, device, Leaf.DESIRED), signed.to_json(), 1, True)

    def clear(self, fleet: str, device: str) -> mqtt.MQTTMessageInfo:
        """Delete the retained manifest (a zero-byte retained publish)."""
        return self.client.publish(topic(fleet, device, Leaf.DESIRED), b"", 1, True)
