"""Serve blob chunks to devices over MQTT, off the network thread.

Subscribes to ``td/v1/+/+/blob/get``. ``on_message`` only enqueues (a bounded queue: when full
the request is dropped and counted, and the device re-requests after its timeout) and
acknowledges the request at once (the service's client acknowledges by hand:
``service/ingest/mqtt_consumer.py``); a worker thread parses each request, builds the frames
with :func:`serve_chunks` and publishes them on the requesting device's ``blob/data`` topic, so
a device can only ever receive chunks it asked for. With ``may_fetch`` a device gets data only
for the blob its current install intent names; any other request is answered with one no-data
refusal frame and counted by reason.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.wire.errors import WireError
from edge_agent.wire.messages import ChunkRequest
from edge_agent.wire.topics import Leaf, parse_topic, subscription, topic
from service.rollout.chunk_server import BlobCache, refusal, serve_chunks
from service.rollout.intent_ledger import FetchVerdict

log = logging.getLogger(__name__)


class BlobTransferService:
    """Answers chunk requests from the blobs in ``cache``."""

    def __init__(
        self,
        client: mqtt.Client,
        cache: BlobCache,
        *,
        queue_size: int = 10_000,
        on_served: Callable[[str, int], None] | None = None,
        may_fetch: Callable[[str, str, str], FetchVerdict] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.cache = cache
        self.on_served = on_served
        """Called with ``(fleet, bytes)`` after each answered request (metrics)."""
        self.may_fetch = may_fetch
        """``(fleet, device, sha256) → verdict``: whether the requester may have the blob."""
        self.on_refused = on_refused
        """Called with the reason (``service.metrics.FETCH_REFUSALS``) of each refused request."""
        self.counters: Counter[str] = Counter()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._work, name="blob-transfer", daemon=True)
        self._filter = subscription(Leaf.BLOB_GET)

    def start(self) -> None:
        """Register the callback and start the worker (subscribe in your ``on_connect``)."""
        self.client.message_callback_add(self._filter, self._on_request)
        self._thread.start()

    def subscriptions(self) -> list[tuple[str, int]]:
        """What to subscribe to on every (re)connect."""
        return [(self._filter, 1)]

    def stop(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _on_request(self, client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.counters["queue_full"] += 1
        finally:
            client.ack(msg.mid, msg.qos)  # a no-op unless the client acknowledges by hand

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self.handle(*item)

    def handle(self, request_topic: str, payload: bytes) -> None:
        """Answer one request (public for tests and for a synchronous transport)."""
        try:
            t = parse_topic(request_topic)
            req = ChunkRequest.from_json(payload)
        except WireError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            self._refused("malformed")
            return
        out = topic(t.fleet, t.device, Leaf.BLOB_DATA)
        verdict = "ok" if self.may_fetch is None else self.may_fetch(t.fleet, t.device, req.sha256)
        if verdict != "ok":
            self.client.publish(out, refusal(req), qos=1)
            n = self._refused(verdict)
            if n == 1 or n % 1000 == 0:  # a flood of refusals must not flood the log
                log.warning(
                    "chunk request of %s/%s for blob %s… refused (%s: no current install intent "
                    "of this device names it; %d so refused)",
                    t.fleet,
                    t.device,
                    req.sha256[:12],
                    verdict,
                    n,
                )
            return
        frames = serve_chunks(req, self.cache)
        for frame in frames:
            self.client.publish(out, frame, qos=1)
        n = sum(len(f) for f in frames)
        self.counters["requests"] += 1
        self.counters["frames"] += len(frames)
        self.counters["bytes"] += n
        if self.on_served is not None:
            self.on_served(t.fleet, n)

    def _refused(self, reason: str) -> int:
        """Count a refused request; returns how many were refused for this reason."""
        self.counters[f"refused_{reason}"] += 1
        if self.on_refused is not None:
            self.on_refused(reason)
        return self.counters[f"refused_{reason}"]
