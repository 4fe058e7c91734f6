"""Run many simulated devices, each with its own MQTT connection, in one thread.

paho-mqtt's external-loop API (``socket()``, ``loop_read()``, ``loop_write()``,
``loop_misc()``) lets one ``selectors`` loop serve every client, instead of one network thread
per device. Connections that fail or drop are retried with exponential backoff (1 s doubling to
30 s, with jitter), so a broker restart is survived without a crash.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edge_agent.device.agent import EdgeAgent

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 0.5
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0


@dataclass
class _Conn:
    agent: EdgeAgent
    sock: socket.socket | None = None
    next_attempt: float = 0.0
    backoff: float = BACKOFF_MIN_S
    failures: int = 0


class DeviceLoop:
    """Drive ``agents``: connect, publish telemetry when due, service sockets, reconnect."""

    def __init__(self, agents: Sequence[EdgeAgent], *, clock: Callable[[], float] = time.time):
        self.agents = list(agents)
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._conns = {a.config.device_id: _Conn(a) for a in self.agents}
        self._last_misc = 0.0
        self.connect_failures = 0
        self.last_error: str | None = None

    # -- connection management -------------------------------------------------------------

    def _register(self, conn: _Conn) -> None:
        sock = conn.agent.client.socket()
        if sock is None:
            return
        conn.sock = sock  # type: ignore[assignment]
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _unregister(self, conn: _Conn) -> None:
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
            conn.sock = None

    def _connect(self, conn: _Conn, now: float) -> None:
        a = conn.agent
        try:
            if conn.failures == 0 and a.stats.connects == 0:
                a.client.connect(a.config.host, a.config.port, keepalive=a.config.keepalive)
            else:
                a.client.reconnect()
        except (OSError, ValueError) as exc:
            conn.failures += 1
            self.connect_failures += 1
            self.last_error = f"cannot reach broker {a.config.host}:{a.config.port}: {exc}"
            delay = conn.backoff * (0.5 + random.random() / 2)
            conn.next_attempt = now + delay
            conn.backoff = min(conn.backoff * 2, BACKOFF_MAX_S)
            log.debug("%s: %s; retry in %.1fs", a.config.device_id, exc, delay)
            return
        conn.failures = 0
        self._register(conn)

    def _drop(self, conn: _Conn, now: float) -> None:
        self._unregister(conn)
        conn.next_attempt = now + conn.backoff * (0.5 + random.random() / 2)
        conn.backoff = min(conn.backoff * 2, BACKOFF_MAX_S)

    # -- the loop ---------------------------------------------------------------------------

    def run_once(self, timeout: float = 0.05) -> None:
        """One round: connect what is due, publish what is due, then serve the sockets.

        Waits for socket input at most ``timeout`` seconds, and not past the next frame due.
        """
        now = self.clock()
        for conn in self._conns.values():
            if conn.sock is None and now >= conn.next_attempt:
                self._connect(conn, now)
        next_due = now + timeout
        for conn in self._conns.values():
            a = conn.agent
            if conn.sock is not None and a.connected:
                if a.due(now):
                    a.step(now)
                elif a.machine.state == "DOWNLOADING" or a.machine.state == "TRIAL":
                    a.idle()
                next_due = min(next_due, a.next_frame)
        wait = min(timeout, max(0.0, next_due - self.clock()))
        for key, _ in self._sel.select(wait):
            conn = key.data
            rc = conn.agent.client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._drop(conn, now)
        for conn in self._conns.values():
            if conn.sock is None:
                continue
            client = conn.agent.client
            if client.want_write() and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                self._drop(conn, now)
        if now - self._last_misc >= MISC_INTERVAL_S:
            self._last_misc = now
            for conn in self._conns.values():
                if conn.sock is not None and conn.agent.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(conn, now)
                elif conn.sock is not None and conn.agent.client.socket() is None:
                    self._drop(conn, now)  # paho closed the socket (keepalive timeout)
            for conn in self._conns.values():
                conn_ok = conn.sock is not None and conn.agent.connected
                if conn_ok:
                    conn.backoff = BACKOFF_MIN_S

    def run(self, stop: threading.Event, duration: float | None = None) -> None:
        """Loop until ``stop`` is set or ``duration`` seconds have passed, then disconnect."""
        end = None if duration is None else self.clock() + duration
        try:
            while not stop.is_set() and (end is None or self.clock() < end):
                self.run_once()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Publish offline status, flush, disconnect every client and close the selector."""
        for conn in self._conns.values():
            if conn.sock is not None:
                conn.agent.disconnect()
        deadline = self.clock() + 2.0
        while self.clock() < deadline and any(
            c.sock is not None and c.agent.client.want_write() for c in self._conns.values()
        ):
            for conn in self._conns.values():
                if conn.sock is not None and conn.agent.client.want_write():
                    conn.agent.client.loop_write()
            time.sleep(0.01)
        for conn in self._conns.values():
            self._unregister(conn)
        self._sel.close()

    @property
    def connected(self) -> int:
        """How many devices are connected now."""
        return sum(1 for a in self.agents if a.connected)
