"""The deploy/ configuration, checked with the real tools (no Docker needed).

- ``promtool`` accepts ``deploy/prometheus/prometheus.yml`` and every rule file, and the rule unit
  tests (``deploy/prometheus/rules/tests``) pass: alerts fire on synthetic series and stay silent
  otherwise.
- Every ``tinydrift_*`` name the rules use is in the service's exposition.
- ``docker-compose.yml`` agrees with the service's command line and settings, the Prometheus
  targets, the Grafana provisioning and the Mosquitto paths.
- A real ``mosquitto`` runs a copy of ``deploy/mosquitto.conf`` (only the listener, the
  persistence directory and the file paths rewritten) with ``deploy/acl`` and a password file
  made by ``tinydrift credentials``, and confines each device to its own topics.
"""

from __future__ import annotations

import getpass
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest
import typer.main
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edge_agent.wire.topics import Leaf, topic
from service.cli.app import app
from service.cli.credentials import SERVICE_USERNAME, read_entries, verify_password
from service.config import ServiceSettings, load_settings
from service.embedded_broker import free_port, wait_for_port
from service.metrics import ServiceMetrics
from tests.integration.polling import wait

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "rules" / "tests").glob("*.yml"))
PROMTOOL_FIX = "apt-get install -y --no-install-recommends prometheus (it ships promtool)"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(f"promtool is not installed: {PROMTOOL_FIX}", pytrace=False)
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, check=False, cwd=DEPLOY
    )


# --------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_check_config_finds_every_rule_file():
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    done = _promtool("check", "config", str(PROMETHEUS_YML))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in done.stdout + done.stderr


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(rules: Path):
    done = _promtool("check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests_pass():
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/rules/tests"
    done = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def _alerts() -> dict[str, dict[str, Any]]:
    return {
        r["alert"]: r
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def _records() -> set[str]:
    return {
        r["record"]
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }


def test_rule_unit_tests_cover_the_required_alerts_both_ways():
    fired: set[str] = set()
    silent: set[str] = set()
    for f in RULE_TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t.get("exp_alerts") else silent).add(t["alertname"])
    required = {
        "TinydriftRolloutRolledBack",
        "TinydriftDriftAlarm",
        "TinydriftIngestRejectionsRising",
        "TinydriftIngestDropping",
        "TinydriftServiceDown",
        "TinydriftBrokerDisconnected",
        "TinydriftSequenceGaps",
    }
    assert required <= set(_alerts())
    assert required <= fired, required - fired
    assert required - {"TinydriftIngestLagHigh"} <= silent, required - silent
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


def _exposed_names() -> set[str]:
    """Every series name ``/metrics`` can carry: TYPE lines plus their sample suffixes."""
    m = ServiceMetrics()
    m.fleets.admit("f")
    names: set[str] = set()
    for line in m.exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert match is not None
            names.add(match.group(0))
    return names


def test_rule_files_use_only_metrics_the_service_exposes():
    exposed = _exposed_names()
    records = _records()
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {j["job_name"] for j in scrape["scrape_configs"]}
    unknown: dict[str, set[str]] = {}
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                name = r.get("alert") or r["record"]
                text = " ".join([r["expr"], *r.get("annotations", {}).values()])
                used = set(re.findall(r"tinydrift_[a-z0-9_]+", text))
                recorded = set(re.findall(r"tinydrift:[a-z0-9_:]+", r["expr"]))
                bad = (used - exposed) | (recorded - records)
                if bad:
                    unknown[name] = bad
                for job in re.findall(r'job="([^"]+)"', r["expr"]):
                    assert job in jobs, f"{name}: job {job!r} is not scraped"
    assert not unknown, f"names not in ServiceMetrics().exposition(): {unknown}"
    # the recording rules cover what the dashboards draw
    assert {
        "tinydrift:readings:rate5m",
        "tinydrift:ingest_rejected:rate5m",
        "tinydrift:ingest_lag_seconds:p50_5m",
        "tinydrift:ingest_lag_seconds:p95_5m",
        "tinydrift:ingest_lag_seconds:p99_5m",
    } <= records


# --------------------------------------------------------------------------------------------
# docker-compose.yml against the service, Prometheus, Grafana and Mosquitto configs


def _compose() -> dict[str, Any]:
    # ${VAR:?message} is filled from deploy/.env by compose; any value will do here
    text = re.sub(r"\$\{[^}]*\}", "secret", (DEPLOY / "docker-compose.yml").read_text())
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _mosquitto_conf(text: str) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf.setdefault(key, value.strip())
    return conf


def _arg(cmd: list[str], flag: str) -> str:
    return str(cmd[cmd.index(flag) + 1])


def test_compose_agrees_with_the_service_and_the_configs():
    services = _compose()["services"]
    assert {"mosquitto", "postgres", "tinydrift", "prometheus", "grafana"} <= set(services)
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert re.fullmatch(r"postgres:1[56](\.\d+)*", services["postgres"]["image"])

    # the service: real flags, valid settings, the broker and database by their service names
    td = services["tinydrift"]
    assert (DEPLOY / td["build"]["context"] / td["build"]["dockerfile"]).is_file()
    cmd = [str(a) for a in td["command"]]
    assert cmd[0] == "serve"
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    flags = {o for p in serve.params for o in p.opts}
    assert {a for a in cmd if a.startswith("--")} <= flags
    settings = load_settings(
        broker=_arg(cmd, "--broker"),
        db=_arg(cmd, "--db"),
        metrics_port=int(_arg(cmd, "--metrics-port")),
        api_port=int(_arg(cmd, "--api-port")),
        api_host=_arg(cmd, "--api-host"),
    )
    assert settings.broker_host == "mosquitto"
    assert settings.broker_port == 1883
    assert settings.db.startswith("postgresql+psycopg://")
    assert urlparse(settings.db).hostname == "postgres"
    env = td["environment"]
    for key in env:
        assert key.startswith("TINYDRIFT_"), key
        assert key.removeprefix("TINYDRIFT_").lower() in ServiceSettings.model_fields, key
    assert env["TINYDRIFT_MQTT_USERNAME"] == SERVICE_USERNAME
    assert env["TINYDRIFT_METRICS_HOST"] == "0.0.0.0"  # Prometheus scrapes from its container
    assert env["TINYDRIFT_DB"] == settings.db

    # Prometheus scrapes the service where it listens
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "tinydrift"]
    assert job["static_configs"][0]["targets"] == [f"tinydrift:{settings.metrics_port}"]
    prom_mounts = services["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in prom_mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    # every bind-mounted file or directory exists, except the password file operators create
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, dict):
                assert vol["bind"]["create_host_path"] is False, (name, vol)
                assert vol["source"] == "./passwd", (name, vol)
                continue
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, vol)

    # Mosquitto: the files land where mosquitto.conf reads them
    conf = _mosquitto_conf((DEPLOY / "mosquitto.conf").read_text())
    script = " ".join(services["mosquitto"]["command"])
    for key, staged in (("acl_file", "acl"), ("password_file", "passwd")):
        assert f"/tinydrift-broker/{staged} {conf[key]};" in script, key
    assert "mosquitto -c /tinydrift-broker/mosquitto.conf" in script
    assert (
        "./mosquitto.conf:/tinydrift-broker/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    )
    assert "./acl:/tinydrift-broker/acl:ro" in services["mosquitto"]["volumes"]

    # Grafana: the provisioned data source and the mounted dashboards
    grafana = services["grafana"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == "tinydrift-prometheus"
    assert source["type"] == "prometheus"
    assert urlparse(source["url"]).hostname == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "tinydrift.yml").read_text())
    (provider,) = providers["providers"]
    assert f"../dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


# --------------------------------------------------------------------------------------------
# Mosquitto with the deploy config, the ACL and credentials from ``tinydrift credentials``

FLEET = "f1"
TLS_KEYS = {"cafile", "capath", "certfile", "keyfile", "require_certificate", "tls_version"}
TLS_KEYS |= {"use_identity_as_username", "use_subject_as_username", "ciphers", "crlfile"}


def derive_test_conf(production: str, *, port: int, passwd: Path, acl: Path, data: Path) -> str:
    """``deploy/mosquitto.conf`` with its first (plain) listener on ``127.0.0.1:port``, the
    persistence directory and the password and ACL files in the test's directory, and no
    privilege drop (the test's user reads the files). Further listeners (TLS) are left out."""
    out: list[str] = []
    listeners = 0
    for line in production.splitlines():
        key = "" if line.lstrip().startswith("#") else line.strip().partition(" ")[0]
        if key == "listener":
            listeners += 1
            if listeners > 1:
                continue
            line = f"listener {port} 127.0.0.1"
        elif listeners > 1 and key in TLS_KEYS:
            continue
        elif key == "password_file":
            line = f"password_file {passwd}"
        elif key == "acl_file":
            line = f"acl_file {acl}"
        elif key == "persistence_location":
            line = f"persistence_location {data}/"
        elif key == "user":
            continue
        out.append(line)
    out.append(f"user {getpass.getuser()}")
    left = [
        ln for ln in out if not ln.lstrip().startswith("#") and "/mosquitto/" in ln.split("#")[0]
    ]
    assert not left, f"production paths the test does not map yet: {left}"
    return "\n".join(out) + "\n"


@dataclass
class DeployBroker:
    port: int
    proc: subprocess.Popen[bytes]
    passwd: Path
    log: Path
    passwords: dict[str, str]

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password file and ACL (as deploy/README.md says)."""
        self.proc.send_signal(signal.SIGHUP)


def _credentials(args: list[str], *, stdin: str | None = None, path: str | None = None) -> str:
    """Run ``tinydrift credentials ARGS``; its stdout (the generated password, if any)."""
    env = None if path is None else {"PATH": path}
    result = CliRunner().invoke(app, ["credentials", *args], input=stdin, env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture(scope="module")
def deploy_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployBroker]:
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if exe is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto", pytrace=False)
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd is missing: apt-get install -y mosquitto", pytrace=False)
    tmp = tmp_path_factory.mktemp("deploy-mosquitto")
    passwd = tmp / "passwd"
    pf = ["--password-file", str(passwd)]
    passwords = {
        # generated, hashed by mosquitto_passwd (on PATH)
        SERVICE_USERNAME: _credentials(["service", *pf]),
        "dev-a": _credentials(["add", "dev-a", "--fleet", FLEET, *pf]),
        # given on stdin, hashed in Python (mosquitto_passwd not on PATH)
        "dev-b": "b-secret-on-stdin",
    }
    _credentials(
        ["add", "dev-b", "--fleet", FLEET, "--password-stdin", *pf],
        stdin="b-secret-on-stdin\n",
        path="/nonexistent",
    )
    assert set(read_entries(passwd)) == set(passwords)
    for user, password in passwords.items():
        assert verify_password(read_entries(passwd)[user], password), user
    _credentials(["acl", "--acl-file", str(DEPLOY / "acl")])

    port = free_port()
    (tmp / "data").mkdir()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        derive_test_conf(
            (DEPLOY / "mosquitto.conf").read_text(),
            port=port,
            passwd=passwd,
            acl=DEPLOY / "acl",
            data=tmp / "data",
        )
    )
    log = tmp / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    broker = DeployBroker(port, proc, passwd, log, passwords)
    try:
        wait_for_port(port, timeout=10)
    except Exception:
        proc.kill()
        proc.wait()
        pytest.fail(f"mosquitto did not start with the deploy config:\n{log.read_text()}")
    yield broker
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Client:
    """A paho 2.x client (MQTT 3.1.1) that records its CONNACK, SUBACKs and messages."""

    port: int
    username: str | None
    password: str | None
    client_id: str
    connack: Any = None
    disconnects: int = 0
    subacks: dict[int, list[Any]] = field(default_factory=dict)
    received: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,  # a refused client stays refused
        )
        if self.username is not None:
            self.c.username_pw_set(self.username, self.password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        wait(lambda: self.connack is not None, 10, f"CONNACK for {self.client_id}")

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if self.connack is None:
            self.connack = reason

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.disconnects += 1

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        self.subacks[mid] = reasons

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    @property
    def refused(self) -> bool:
        return bool(self.connack.is_failure)

    def subscribe(self, *filters: str) -> list[Any]:
        """Subscribe at QoS 1; the SUBACK reason codes."""
        _rc, mid = self.c.subscribe([(f, 1) for f in filters])
        wait(lambda: mid in self.subacks, 10, f"SUBACK for {self.client_id}")
        return self.subacks[mid]

    def publish(self, topic_name: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic_name, payload, qos=1, retain=retain).wait_for_publish(10)

    def topics(self, retained: bool | None = None) -> list[str]:
        """Topics received (only retained or only live ones if ``retained`` is given)."""
        with self.lock:
            return [t for t, _p, r in self.received if retained is None or r == retained]

    def got(self, topic_name: str, payload: bytes) -> bool:
        with self.lock:
            return any(t == topic_name and p == payload for t, p, _r in self.received)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Clients:
    """The service's and two devices' connections, plus any a test opens; all closed after."""

    def __init__(self, broker: DeployBroker) -> None:
        self.broker = broker
        self.opened: list[Client] = []
        self.svc = self.connect(SERVICE_USERNAME, broker.passwords[SERVICE_USERNAME], "td-svc")
        self.a = self.connect("dev-a", broker.passwords["dev-a"])
        self.b = self.connect("dev-b", broker.passwords["dev-b"])

    def connect(self, user: str | None, password: str | None, client_id: str = "") -> Client:
        c = Client(self.broker.port, user, password, client_id or f"{user}-{len(self.opened)}")
        self.opened.append(c)
        return c

    def close(self) -> None:
        for c in self.opened:
            c.close()


@pytest.fixture
def clients(deploy_broker: DeployBroker) -> Iterator[Clients]:
    made = Clients(deploy_broker)
    yield made
    made.close()


def test_credentials_from_the_cli_are_accepted(clients):
    for c in (clients.svc, clients.a, clients.b):
        assert not c.refused, (c.client_id, c.connack, clients.broker.log.read_text())


def test_a_device_publishes_only_under_its_own_id(clients):
    svc, a = clients.svc, clients.a
    assert not any(rc.is_failure for rc in svc.subscribe("td/v1/#"))
    own = {leaf: topic(FLEET, "dev-a", leaf) for leaf in Leaf}
    forged = [
        topic(FLEET, "dev-b", Leaf.TEL),  # another device's telemetry
        topic(FLEET, "dev-b", Leaf.STATUS),  # another device's birth
        topic(FLEET, "dev-b", Leaf.ACK),
        own[Leaf.DESIRED],  # only the service writes desired state
        own[Leaf.BLOB_DATA],  # ... and blob chunks
        "td/v1/f1/dev-b/x",
        "elsewhere/dev-a",
    ]
    for t in forged:
        a.publish(t, b"forged")
    allowed = [Leaf.TEL, Leaf.LBL, Leaf.STATUS, Leaf.ACK, Leaf.BLOB_GET]
    for leaf in allowed:
        a.publish(own[leaf], b"own")
    # one publisher's QoS 1 messages arrive in order: once the last own one is in, the
    # forged ones (sent before) would have been too
    wait(lambda: svc.got(own[Leaf.BLOB_GET], b"own"), 10, "dev-a's own publishes")
    assert sorted(svc.topics(retained=False)) == sorted(own[leaf] for leaf in allowed)


def test_a_device_reads_only_its_own_desired_state(clients):
    svc, a, b = clients.svc, clients.a, clients.b
    desired_a = topic(FLEET, "dev-a", Leaf.DESIRED)
    desired_b = topic(FLEET, "dev-b", Leaf.DESIRED)
    svc.publish(desired_a, b"manifest-a", retain=True)
    svc.publish(desired_b, b"manifest-b", retain=True)
    # dev-a asks for its own and dev-b's desired state, and for everyone's telemetry
    a.subscribe(desired_a, desired_b, "td/v1/+/+/tel", "td/v1/#")
    wait(lambda: a.got(desired_a, b"manifest-a"), 10, "dev-a's own retained manifest")
    # dev-b's telemetry reaches the service (so the broker has routed it) but not dev-a
    assert not any(rc.is_failure for rc in svc.subscribe("td/v1/+/+/tel"))
    b.publish(topic(FLEET, "dev-b", Leaf.TEL), b"b-tel")
    wait(lambda: svc.got(topic(FLEET, "dev-b", Leaf.TEL), b"b-tel"), 10, "dev-b's telemetry")
    svc.publish(desired_b, b"manifest-b2")
    blob_a = topic(FLEET, "dev-a", Leaf.BLOB_DATA)
    svc.publish(blob_a, b"chunk")  # after the manifest for dev-b, from the same publisher
    wait(lambda: a.got(blob_a, b"chunk"), 10, "dev-a's blob chunk")
    assert sorted(set(a.topics())) == sorted([desired_a, blob_a])
    # dev-b still gets its own retained manifest
    b.subscribe(desired_b)
    wait(lambda: b.got(desired_b, b"manifest-b"), 10, "dev-b's own retained manifest")


def test_another_devices_client_id_does_not_take_its_connection_over(clients):
    """With dev-a's credentials and dev-b's client id, the broker names the connection dev-a:
    dev-b stays connected and keeps receiving (issue 11: takeovers every second)."""
    b = clients.b
    assert b.subscribe(topic(FLEET, "dev-b", Leaf.DESIRED)) is not None
    for _ in range(3):
        intruder = clients.connect("dev-a", clients.broker.passwords["dev-a"], b.client_id)
        assert not intruder.refused
    clients.svc.publish(topic(FLEET, "dev-b", Leaf.DESIRED), b"still-mine")
    wait(lambda: b.got(topic(FLEET, "dev-b", Leaf.DESIRED), b"still-mine"), 10, "dev-b's manifest")
    assert b.disconnects == 0
    assert b.c.is_connected()


def test_wrong_unknown_and_anonymous_logins_are_refused(clients, deploy_broker):
    connect = clients.connect
    assert connect("dev-a", "not-the-password", "dev-a-wrong").refused
    assert connect("dev-a", deploy_broker.passwords["dev-b"], "dev-a-other").refused
    assert connect("dev-unknown", "whatever").refused
    assert connect(None, None, "anonymous").refused
    assert connect(SERVICE_USERNAME, "guess", "svc-guess").refused


def test_added_and_removed_accounts_take_effect_on_reload(deploy_broker, clients):
    connect = clients.connect
    pf = ["--password-file", str(deploy_broker.passwd)]
    password = _credentials(["add", "dev-c", "--fleet", FLEET, *pf])
    assert connect("dev-c", password, "dev-c-before").refused  # not loaded yet
    deploy_broker.reload()

    def accepted() -> bool:
        return not connect("dev-c", password).refused

    wait(accepted, 10, "dev-c accepted after SIGHUP")
    online = connect("dev-c", password)
    _credentials(["remove", "dev-c", *pf])
    deploy_broker.reload()
    wait(lambda: not accepted(), 10, "dev-c refused after removal and SIGHUP")
    # the reload also drops the revoked device's open connection, and only that one
    wait(lambda: not online.c.is_connected(), 10, "dev-c's connection closed by the reload")
    assert clients.a.c.is_connected()
    assert clients.svc.c.is_connected()
