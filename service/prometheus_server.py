"""A real Prometheus server on a free loopback port, for tests and local checks.

Debian's ``prometheus`` package (``apt-get install -y --no-install-recommends prometheus``)
starts no service by itself; this runs the binary with a generated scrape configuration and a
temporary TSDB, and queries it over its HTTP API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.embedded_broker import free_port, wait_for_port

CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: tinydrift
    static_configs:
      - targets: [{targets}]
"""


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or a query failed."""


@dataclass
class PrometheusServer:
    """A running Prometheus: ``url``, :meth:`query`, :meth:`stop`."""

    port: int
    proc: subprocess.Popen[bytes]
    tmp: tempfile.TemporaryDirectory[str]

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list (raises :class:`PrometheusError` on an error)."""
        q = urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"query {promql!r}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self) -> bool:
        """Whether every scrape target's last scrape succeeded."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        """Stop the server and delete its data."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.tmp.cleanup()


def start_prometheus(targets: list[str], interval: str = "1s") -> PrometheusServer:
    """Start Prometheus scraping ``targets`` (``host:port``) every ``interval``."""
    exe = shutil.which("prometheus")
    if exe is None:
        raise PrometheusError(
            "prometheus is not installed: apt-get install -y --no-install-recommends prometheus"
        )
    tmp = tempfile.TemporaryDirectory(prefix="tinydrift-prometheus-")
    cfg = Path(tmp.name) / "prometheus.yml"
    cfg.write_text(CONFIG.format(interval=interval, targets=", ".join(f"'{t}'" for t in targets)))
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={Path(tmp.name) / 'data'}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = PrometheusServer(port, proc, tmp)
    try:
        wait_for_port(port, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return server
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise PrometheusError("prometheus did not become ready in 30 s")
    except Exception:
        err = b""
        if proc.poll() is not None and proc.stderr is not None:
            err = proc.stderr.read()
        server.stop()
        raise PrometheusError(f"prometheus did not start: {err.decode(errors='replace')}") from None
