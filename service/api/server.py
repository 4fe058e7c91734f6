"""``ApiServer``: the API served by uvicorn in a daemon thread of ``tinydrift serve``.

The listening socket is bound in :meth:`ApiServer.start` (in the caller's thread), so a port in
use fails there with :class:`ApiServerError`, and port 0 resolves to the bound port before the
thread starts. uvicorn installs no signal handlers outside the main thread; the service's own
handlers stop it through :meth:`ApiServer.stop` (``should_exit``, then join).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Final

import uvicorn
from fastapi import FastAPI

START_TIMEOUT_S: Final = 10.0
GRACEFUL_SHUTDOWN_S: Final = 5


class ApiServerError(RuntimeError):
    """The API could not be served; the message is one line naming the fix."""


class ApiServer:
    """Serve ``app`` on ``host:port`` (0: any free port) in a background thread."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        """The bound port, once started."""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Bind, start serving, wait until uvicorn is up; returns the bound port."""
        self._socket = self._bind()
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="api-server",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiServerError(
                    f"the API server on {self.host}:{self.port} did not start within "
                    f"{timeout_s:g} s (see the log above)"
                )
            time.sleep(0.01)
        return self.port

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(
                self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _name, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ApiServerError(
                f"cannot serve the API on {self.host}:{self.requested_port}: {exc.strerror or exc}"
                " (check --api-host)"
            ) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self._config.backlog)
        except OSError as exc:
            sock.close()
            raise ApiServerError(
                f"cannot serve the API on {self.host}:{self.requested_port}: "
                f"{exc.strerror or exc} (choose another --api-port, or 0 for any free port)"
            ) from None
        sock.set_inheritable(True)
        return sock

    @property
    def running(self) -> bool:
        """Whether the server thread is serving."""
        return self._thread is not None and self._thread.is_alive() and self._server.started

    def stop(self, timeout_s: float = GRACEFUL_SHUTDOWN_S + 5.0) -> None:
        """Ask uvicorn to exit, wait for its thread, close the socket. Idempotent."""
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
