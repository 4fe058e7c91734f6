"""An MQTT broker on a free loopback port, owned by this process (demo and tests).

Mosquitto is used when ``mosquitto`` is on ``PATH`` (a real broker, started as a child process
with a generated config); otherwise amqtt runs in-process on its own asyncio thread. amqtt
speaks MQTT 3.1.1 only and handles a few thousand messages per second, enough for the demo
(DESIGN.md §8).

The Mosquitto config raises ``max_queued_messages`` from its default of 1000, which silently
dropped 468 of 2,000 QoS 1 messages to a slow subscriber in
``../shared/research/mqtt-observability-anchors.md`` §1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 100
max_packet_size 1048576
log_dest stderr
log_type error
log_type warning
"""


class BrokerStartError(RuntimeError):
    """The broker could not be started; the message says why and what to install."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise BrokerStartError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class EmbeddedBroker:
    """A running broker: ``host``, ``port``, which ``kind`` it is, and :meth:`stop`."""

    host: str
    port: int
    kind: Literal["mosquitto", "amqtt"]
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _broker: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop the broker and remove its files; safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._loop is not None and self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(port: int | None = None, extra_conf: str = "") -> EmbeddedBroker:
    """Start ``mosquitto`` on 127.0.0.1 (a free port unless given)."""
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if exe is None:
        raise BrokerStartError("mosquitto is not installed (apt-get install -y mosquitto)")
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="tinydrift-mosquitto-")
    conf = Path(tmp.name) / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port) + extra_conf)
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    broker = EmbeddedBroker("127.0.0.1", port, "mosquitto", _proc=proc, _tmp=tmp)
    try:
        wait_for_port(port)
    except BrokerStartError:
        err = b""
        if proc.poll() is not None and proc.stderr is not None:
            err = proc.stderr.read()
        broker.stop()
        raise BrokerStartError(
            f"mosquitto did not start on port {port}: {err.decode(errors='replace').strip()}"
        ) from None
    return broker


def start_amqtt(port: int | None = None) -> EmbeddedBroker:
    """Start amqtt in-process, on its own event-loop thread."""
    from amqtt.broker import Broker

    # amqtt logs every probe connection and client hang-up as an error; keep the console clean
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    port = port or free_port()
    loop = asyncio.new_event_loop()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    holder: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            holder["broker"] = Broker(config, loop=loop)
            await holder["broker"].start()

        try:
            loop.run_until_complete(boot())
        except Exception as exc:  # reported to the caller below
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
    thread.start()
    ready.wait(15)
    if "error" in holder or "broker" not in holder:
        raise BrokerStartError(f"amqtt did not start on port {port}: {holder.get('error')}")
    broker = EmbeddedBroker(
        "127.0.0.1", port, "amqtt", _loop=loop, _thread=thread, _broker=holder["broker"]
    )
    wait_for_port(port)
    return broker


def start_embedded_broker(prefer: Literal["auto", "mosquitto", "amqtt"] = "auto") -> EmbeddedBroker:
    """Mosquitto when installed (or asked for), else amqtt."""
    if prefer == "amqtt":
        return start_amqtt()
    if prefer == "mosquitto" or shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        return start_mosquitto()
    return start_amqtt()
