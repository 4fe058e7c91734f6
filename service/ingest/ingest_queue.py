"""The two lanes between paho's network thread and the batcher: control is never dropped,
telemetry may be shed.

**Telemetry** (the ``tel`` leaf at any QoS, and any message a device sent at QoS 0) goes to a
bounded lane (``queue_size``): when it is full the message is shed and counted
(``tinydrift_ingest_rejected_total{reason="queue_full"}``; a shed frame also shows as a sequence
gap). Telemetry is QoS 0 by design: the broker would drop it just as silently.

**Control** (births, Wills, update acks and labels received at QoS 1) goes to a lane that never
refuses a message, and the batcher takes it before any telemetry. What bounds it is the broker,
through paho's manual acknowledgement (``MqttConsumer``): a control message is acknowledged at
once while the lane holds less than ``ack_ahead_bytes`` (setting ``control_queue_bytes``,
default 16 MiB: payload, topic and :data:`ENTRY_OVERHEAD` per message); beyond that its PUBACK
is *deferred* until the batcher takes it. A broker sends a client at most its in-flight window
of unacknowledged QoS 1 messages (Mosquitto ``max_inflight_messages``; 100 in ``deploy/``) and
keeps the rest in the session's queue, so the lane holds at most ``ack_ahead_bytes`` plus that
window of messages (≤ 64 KiB each), however fast a device account floods labels. The flood
then waits in the broker's queue for the service's session (``max_queued_messages``), which is
what bounds it there.

Why not the alternatives:

- paho's automatic acknowledgement with an unbounded lane: one device account publishing labels
  faster than the batcher takes them grows the service's memory without limit;
- a bounded lane that drops, or leaves unacknowledged, what does not fit: Mosquitto (like MQTT
  3.1.1 §4.4 requires, and no more) redelivers an unacknowledged message only when the client
  reconnects, so either loses it until the next reconnection — the issue this lane answers
  (births of devices that connected during an overload lost, their telemetry then rejected as
  ``unknown_device``);
- acknowledging every control message only when taken (``control_queue_bytes = 0``): as safe,
  but it ties the control throughput to one broker window per batch cycle even when nothing is
  overloaded (and to amqtt's pace in the demo's fallback broker).

Order. The batcher takes control first, so a birth received before a device's frames is
processed before them. The broker does not keep that order under overload: its in-flight window
towards the service fills with QoS 1 messages the service has not yet read (behind a backlog of
telemetry), and QoS 0 telemetry, which that window does not hold back, overtakes the ones it
holds. A new device's first frames can so arrive before its birth and are rejected as
``unknown_device`` (counted); every frame after its birth is taken is accepted.

Acknowledgements of control messages leave in arrival order (MQTT-4.6.0-2): once one is deferred,
every later one waits behind it. A message is acknowledged when taken, not when processed: a
crash between the two loses what was taken, as it loses everything in memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

ENTRY_OVERHEAD: Final = 350
"""Bytes a queued control message takes beyond its payload and topic (337 measured with
``tracemalloc``: the tuples, the receipt, the float, the object headers)."""


class Incoming(NamedTuple):
    """One received message, stamped with the receive time (Unix seconds)."""

    topic: str
    payload: bytes
    recv_ts: float


class Receipt(NamedTuple):
    """What acknowledges a control message: its packet id on the connection it arrived on."""

    mid: int
    session: int
    """The consumer's connection count when it arrived (an id is only valid on that one)."""


class IngestQueue:
    """Two FIFO lanes under one lock: control (never refused) and telemetry (bounded)."""

    def __init__(self, telemetry_size: int, *, ack_ahead_bytes: int = 16 << 20) -> None:
        if telemetry_size < 1 or ack_ahead_bytes < 0:
            raise ValueError("telemetry_size must be ≥ 1 and ack_ahead_bytes ≥ 0")
        self.telemetry_size = telemetry_size
        self.ack_ahead_bytes = ack_ahead_bytes
        self.acknowledge: Callable[[list[Receipt]], None] | None = None
        """Sends the deferred acknowledgements of taken control messages (set by the consumer)."""
        self.deferred_total = 0
        """Control messages whose acknowledgement waited for the batcher (since start)."""
        self.control_high_water = 0
        """The most control messages that ever waited at once (with ``ack_ahead_bytes`` 0: at
        most the broker's in-flight window)."""
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._control: deque[tuple[Incoming, Receipt | None]] = deque()
        self._control_bytes = 0
        self._telemetry: deque[Incoming] = deque()
        self._deferred = 0
        """Deferred receipts not yet acknowledged (in the lane or being acknowledged)."""

    def __len__(self) -> int:
        return len(self._control) + len(self._telemetry)

    def qsize(self) -> int:
        """Messages waiting in both lanes."""
        return len(self)

    def empty(self) -> bool:
        """Nothing waits in either lane."""
        return len(self) == 0

    @property
    def control_depth(self) -> int:
        """Control messages waiting."""
        return len(self._control)

    def offer(self, item: Incoming) -> bool:
        """Queue a sheddable message; ``False`` (nothing queued) when its lane is full."""
        with self._lock:
            if len(self._telemetry) >= self.telemetry_size:
                return False
            self._telemetry.append(item)
            self._ready.notify()
        return True

    def put_control(self, item: Incoming, receipt: Receipt | None) -> bool:
        """Queue a control message; it is never refused. ``True``: acknowledge it now;
        ``False``: its receipt is kept and handed to :attr:`acknowledge` when it is taken."""
        size = len(item.payload) + len(item.topic) + ENTRY_OVERHEAD
        with self._lock:
            now = receipt is None or (
                self._deferred == 0 and self._control_bytes + size <= self.ack_ahead_bytes
            )
            self._control.append((item, None if now else receipt))
            self._control_bytes += size
            self.control_high_water = max(self.control_high_water, len(self._control))
            if not now:
                self._deferred += 1
                self.deferred_total += 1
            self._ready.notify()
        return now

    def take(self, batch: list[Incoming], limit: int, timeout: float = 0.0) -> int:
        """Move waiting messages into ``batch`` until it holds ``limit``, control first; wait
        up to ``timeout`` seconds if both lanes are empty. Returns the number moved."""
        receipts: list[Receipt] = []
        with self._lock:
            if timeout > 0 and not self._control and not self._telemetry:
                self._ready.wait(timeout)
            start = len(batch)
            control = self._control
            while control and len(batch) < limit:
                item, receipt = control.popleft()
                self._control_bytes -= len(item.payload) + len(item.topic) + ENTRY_OVERHEAD
                batch.append(item)
                if receipt is not None:
                    receipts.append(receipt)
            n = min(len(self._telemetry), limit - len(batch))
            if n > 0:
                pop = self._telemetry.popleft
                batch.extend([pop() for _ in range(n)])
            moved = len(batch) - start
        if receipts:
            try:
                if self.acknowledge is not None:
                    self.acknowledge(receipts)
            finally:
                with self._lock:  # later control messages were deferred until now (order)
                    self._deferred -= len(receipts)
        return moved
