"""The service's MQTT connection: subscribe, and hand every message to the ingest queue.

paho-mqtt 2.x with a **persistent session** (MQTT 3.1.1 ``clean_session = false`` and a fixed
client id), so the broker keeps the subscriptions and queues QoS 1 messages (labels, acks,
births) while the service restarts. ``on_message`` runs on paho's network thread and only
queues (:mod:`service.ingest.ingest_queue`): control messages (births, Wills, acks, labels at
QoS 1) into a lane that never drops them, everything else into a bounded lane that sheds and
counts ``queue_full`` when full, visibly, instead of letting the broker drop silently
(mqtt-observability §1.4). paho reconnects by itself with exponential backoff (1 s to 30 s);
each reconnection is counted and the subscriptions are renewed.

paho runs with **manual acknowledgement** (``manual_ack=True``: paho 2.x then sends no PUBACK
itself, ``Client.ack(mid, qos)`` sends it): every QoS 1 message is acknowledged on receipt,
except a control message the queue defers, which is acknowledged when the batcher takes it.
Every other QoS 1 message on this client (chunk requests: ``BlobTransferService``) must be
acknowledged by its own callback, or it holds a slot of the broker's in-flight window until the
connection ends.

Broker settings the service needs are in ``deploy/mosquitto.conf``: a deep per-client queue
(``max_queued_messages``; the default 1000 dropped 468 of 2,000 QoS 1 messages to a slow
subscriber) and ``persistent_client_expiration`` long enough to cover a restart.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.wire.topics import Leaf, subscription
from service.ingest.ingest_queue import Incoming, IngestQueue, Receipt

log = logging.getLogger(__name__)

SUBSCRIBED_LEAVES = (Leaf.STATUS, Leaf.TEL, Leaf.LBL, Leaf.ACK)
"""Births first, so a retained birth arrives before the device's telemetry."""

SHORT_CONNECTION_S = 10.0
"""A connection the broker drops sooner than this counts towards a takeover warning."""

CONTROL_LEAVES = (Leaf.STATUS, Leaf.LBL, Leaf.ACK)
"""Leaves whose QoS 1 messages are control: never shed (:mod:`service.ingest.ingest_queue`)."""

_CONTROL_SUFFIXES = tuple(f"/{leaf.value}" for leaf in CONTROL_LEAVES)

TAKEOVER_DROPS = 3
"""Short connections in a row that name a takeover: MQTT 3.1.1 gives no reason when the broker
drops a client because another connected with the same client id."""


class MqttConsumer:
    """Owns the paho client; fills ``out`` and acknowledges what it defers; exposes connection
    state and counters."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        fleets: list[str],
        out: IngestQueue,
        username: str | None = None,
        password: str | None = None,
        on_drop: Callable[[], None] | None = None,
        on_connection_change: Callable[[bool, bool], None] | None = None,
        extra_subscriptions: Callable[[], list[tuple[str, int]]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.fleets = fleets
        self._fleet_set = None if "+" in fleets else frozenset(fleets)
        self.out = out
        out.acknowledge = self._acknowledge
        self.on_drop = on_drop
        self.on_connection_change = on_connection_change
        self.extra_subscriptions = extra_subscriptions
        self.connected = threading.Event()
        self.connects = 0
        """Successful connections so far; a packet id is valid only on the one it came on."""
        self.dropped = 0
        self.client_id = client_id
        self._connected_at = 0.0
        self._short_drops = 0
        self.last_error: str | None = None
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(10_000)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message

    def subscriptions(self) -> list[tuple[str, int]]:
        """Every (topic filter, QoS) the service subscribes to."""
        subs = [
            (subscription(leaf, fleet), 1) for fleet in self.fleets for leaf in SUBSCRIBED_LEAVES
        ]
        if self.extra_subscriptions is not None:
            subs += self.extra_subscriptions()
        return subs

    def start(self) -> None:
        """Connect asynchronously and start paho's network thread (retries until stopped)."""
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` seconds passed (False)."""
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.connected.clear()  # a deliberate stop is not a lost broker (no warning)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def _on_connect(self, client: mqtt.Client, _ud: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.last_error = (
                f"broker {self.host}:{self.port} refused the service: {reason} "
                "(check --mqtt-username/--mqtt-password and the broker ACL)"
            )
            log.error("%s", self.last_error)
            return
        reconnect = self.connects > 0
        self.connects += 1
        self.last_error = None
        self._connected_at = time.monotonic()
        if "+" not in self.fleets:
            # a persistent session keeps the filters of an earlier run (e.g. all fleets): drop
            # the all-fleet ones, so a narrowed --fleet really narrows what arrives
            client.unsubscribe([subscription(leaf) for leaf in SUBSCRIBED_LEAVES])
        client.subscribe(self.subscriptions())
        self.connected.set()
        session = getattr(flags, "session_present", False)
        log.info("connected to %s:%d (session present: %s)", self.host, self.port, session)
        if self.on_connection_change is not None:
            self.on_connection_change(True, reconnect)

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            short = time.monotonic() - self._connected_at < SHORT_CONNECTION_S
            self._short_drops = self._short_drops + 1 if short else 0
            if self._short_drops >= TAKEOVER_DROPS:
                self.last_error = (
                    f"the broker {self.host}:{self.port} dropped this connection "
                    f"{self._short_drops} times in a row right after it was made ({reason}): "
                    f"another client probably uses the client id {self.client_id!r} (a second "
                    "tinydrift serve with the same --mqtt-client-id or broker account? give "
                    "each instance its own); reconnecting"
                )
                log.error("%s", self.last_error)
            else:
                self.last_error = (
                    f"lost the broker {self.host}:{self.port} ({reason}); reconnecting"
                )
                log.warning("%s", self.last_error)
        if self.on_connection_change is not None:
            self.on_connection_change(False, False)

    def _on_connect_fail(self, _c: mqtt.Client, _ud: Any) -> None:
        # paho calls this from inside its ``except OSError`` and logs nothing else at error
        # level: the exception being handled is the reason. Logged when it changes (paho
        # retries every 1–30 s).
        exc = sys.exc_info()[1]
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "no reason given"
        error = (
            f"cannot connect to the broker {self.host}:{self.port} ({reason}); retrying "
            "(check --broker, that the broker runs and this host may reach it, TLS settings)"
        )
        if error != self.last_error:
            log.error("%s", error)
        self.last_error = error

    def _on_message(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        deferred = False
        try:
            if self._fleet_set is not None:
                parts = msg.topic.split("/", 3)
                if len(parts) < 3 or parts[2] not in self._fleet_set:
                    return  # queued for an earlier subscription of this persistent session
            item = Incoming(msg.topic, bytes(msg.payload), time.time())
            if msg.qos > 0 and msg.topic.endswith(_CONTROL_SUFFIXES):
                deferred = not self.out.put_control(item, Receipt(msg.mid, self.connects))
            elif not self.out.offer(item):
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop()
        finally:
            if msg.qos > 0 and not deferred:
                client.ack(msg.mid, msg.qos)

    def _acknowledge(self, receipts: list[Receipt]) -> None:
        """Send the deferred PUBACKs of control messages the batcher took (its thread).

        A packet id from an earlier connection is not acknowledged on this one: the broker
        redelivers that message (QoS 1: at least once; a repeated label is counted as
        ``duplicate``)."""
        session = self.connects
        for r in receipts:
            if r.session == session:
                self.client.ack(r.mid, 1)
