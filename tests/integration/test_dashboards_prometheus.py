"""Every dashboard query runs against a real Prometheus scraping the running service.

A simulated fleet with drift feeds a real :class:`~service.serve.Service`; Prometheus scrapes
it every second. Each panel target and annotation query of ``dashboards/*.json`` is sent to
Prometheus' HTTP API with Grafana's variables substituted (``$fleet`` by the fleet's name,
``$__rate_interval`` by a short window): every query must parse, and every panel of the
dashboards in :data:`REQUIRE_DATA` must return finite data whose series carry the labels its
legend names; their annotations must mark an event over the fixture's lifetime (the gain drift
raises the cohort alarm), except those in :data:`ANNOTATIONS_WITHOUT_EVENTS`.

The updates dashboard only has data once a rollout has run (a candidate built, a canary gated,
manifests published, a rollback): ``test_update_panels_return_data`` checks that and is
skipped until the ``rig`` fixture runs a rollout (issue 5's reconciler).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from service.config import load_settings
from service.firmware_bundle import Bundle
from service.prometheus_server import PrometheusServer, start_prometheus
from service.registry.store import Registry
from service.serve import Service

from .polling import wait

pytestmark = pytest.mark.integration

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
FLEET = "dash"
REQUIRE_DATA = ("tinydrift-fleet", "tinydrift-ingest")
"""Dashboards every panel of which must return data from the fixture as it is."""
UPDATES = "tinydrift-updates"
ANNOTATIONS_WITHOUT_EVENTS = frozenset({"MQTT reconnect"})
"""Annotations of :data:`REQUIRE_DATA` dashboards whose event the fixture does not cause."""
UPDATE_PANELS_NOT_REQUIRED: frozenset[str] = frozenset()
"""Titles of updates panels a rollout in the fixture may leave empty (none so far)."""
SUBSTITUTIONS = {
    "__rate_interval": "1m",  # Prometheus scrapes every 1 s: 60 samples per window
    "__interval": "5s",
    "__range": "5m",
    "fleet": FLEET,
}
SETTLE_S = 120.0


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as :data:`SUBSTITUTIONS` says."""

    def one(m: re.Match[str]) -> str:
        return SUBSTITUTIONS[m.group(1) or m.group(2)]

    names = "|".join(sorted(map(re.escape, SUBSTITUTIONS), key=len, reverse=True))
    out = re.sub(rf"\$\{{({names})(?::\w+)?\}}|\$({names})\b", one, expr)
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


@dataclass(frozen=True)
class Query:
    """One PromQL query of a dashboard."""

    dashboard: str
    where: str
    expr: str
    legend: str = ""
    annotation: bool = False
    name: str = ""
    """The annotation's name (annotations only)."""


def load() -> dict[str, dict[str, Any]]:
    """Dashboards by uid."""
    dashes = (json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json")))
    return {d["uid"]: d for d in dashes}


def queries(dash: dict[str, Any]) -> list[Query]:
    """Every panel target and annotation query of ``dash``."""
    out = [
        Query(dash["uid"], f"{p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", ""))
        for p in dash["panels"]
        for t in p.get("targets", [])
    ]
    out += [
        Query(
            dash["uid"],
            f"annotation {a['name']!r}",
            a["target"]["expr"],
            annotation=True,
            name=a["name"],
        )
        for a in dash["annotations"]["list"]
    ]
    return out


DASHES = load()


@dataclass
class DashboardRig:
    """The running service, its simulated fleet and the Prometheus scraping it."""

    service: Service
    prometheus: PrometheusServer
    fleet: Fleet
    bundle: Bundle
    fleet_name: str = FLEET
    started: float = field(default_factory=time.time)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query of a dashboard expression (Grafana variables substituted)."""
        return self.prometheus.query(substitute(expr))

    def query_range(self, expr: str, step: str = "1s") -> list[dict[str, Any]]:
        """Range query over the rig's lifetime, as Grafana runs annotation queries."""
        params = {
            "query": substitute(expr),
            "start": f"{self.started:.3f}",
            "end": f"{time.time():.3f}",
            "step": step,
        }
        url = f"{self.prometheus.url}/api/v1/query_range?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        q = urllib.parse.urlencode({"match[]": match})
        url = f"{self.prometheus.url}/api/v1/label/{label}/values?{q}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        values: list[str] = body["data"]
        return values


@pytest.fixture(scope="module")
def rig(mosquitto, bundle, tmp_path_factory) -> Iterator[DashboardRig]:
    """Service + simulated fleet (gain drift on 3 of 10 devices after 4 s) + Prometheus (1 s).

    Updates are on but the policy is off, so the fleet dashboard sees the drift first;
    :func:`test_update_panels_return_data` then lets the policy recalibrate the gain-drift
    devices, rolls back a bad candidate and proposes a retrain.
    """
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboards') / 'r.db'}"
    fw = bundle.firmware()
    reg = Registry(url)
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    started = time.time()
    svc = Service(
        load_settings(
            broker=mosquitto.url,
            db=url,
            metrics_port=0,
            window_s=1.0,
            checkpoint_interval_s=2.0,
            fleets=[FLEET],
            mqtt_client_id="tinydrift-dashboards-test",
            null_min_blocks=16,  # calibrated within 5-15 s (production: 48); drift at 20 s
            null_horizon_readings=128,  # dependence over 8 frames (production: 512 readings)
            null_horizon_labels=8,  # and 8 labels (production: 32)
            # updates on: the updates dashboard needs candidates, gates, pushes and a rollback
            release_key=bundle.keys_dir / "release.key",
            deploy_key=bundle.keys_dir / "deploy.key",
            update_policy="off",  # switched to auto by test_update_panels_return_data
            policy_interval_s=1.0,
            policy_settle_s=3.0,
            rollout_tick_s=0.5,
            canary_size=1,
            control_size=2,
            waves_pct=[100.0],
            min_soak_s=3.0,
            max_soak_s=60.0,
            gate_min_readings=200,
            gate_min_devices=1,
            gate_error_margin=0.1,
        )
    )
    svc.start()
    sim = Fleet(
        FleetConfig(
            fleet=FLEET,
            devices=10,
            host=mosquitto.host,
            port=mosquitto.port,
            seed=3,
            batch=16,
            period_s=0.05,
            label_rate=0.1,
        ),
        fw,
        plan_drift(10, "gain", 0.3, after_s=20.0, seed=3),
    )
    sim.start()
    prom = start_prometheus([f"127.0.0.1:{svc.metrics_port}"], interval="1s")
    try:
        yield DashboardRig(svc, prom, sim, bundle, started=started)
    finally:
        prom.stop()
        sim.stop()
        svc.stop()


def finite(result: list[dict[str, Any]]) -> bool:
    """Whether an instant or range result holds at least one finite sample."""
    values = [r["value"] for r in result if "value" in r]
    values += [v for r in result for v in r.get("values", [])]
    return any(math.isfinite(float(v[1])) for v in values)


def legend_problems(q: Query, result: list[dict[str, Any]]) -> list[str]:
    """Labels the legend names that a returned series lacks."""
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend))
    return sorted(
        {
            f"{q.where}: legend {{{{{label}}}}} not in {sorted(r['metric'])}"
            for r in result
            for label in wanted - set(r["metric"])
        }
    )


def missing_data(rig: DashboardRig, qs: list[Query]) -> list[str]:
    """What is wrong with ``qs`` now: no finite data, or legend labels the series lack."""
    problems = []
    for q in qs:
        result = rig.query_range(q.expr) if q.annotation else rig.query(q.expr)
        if not finite(result):
            problems.append(f"{q.where}: no data")
        else:
            problems += legend_problems(q, result)
    return problems


def settle(rig: DashboardRig, qs: list[Query], timeout: float = SETTLE_S) -> list[str]:
    """Poll until every query has data (or ``timeout``); the remaining problems."""
    deadline = time.monotonic() + timeout
    problems = missing_data(rig, qs)
    while problems and time.monotonic() < deadline:
        time.sleep(1.0)
        problems = missing_data(rig, qs)
    return problems


def test_dashboards_under_test() -> None:
    assert set(DASHES) == {*REQUIRE_DATA, UPDATES}


def test_prometheus_scrapes_the_service(rig: DashboardRig) -> None:
    wait(rig.prometheus.targets_up, 30, "Prometheus to scrape the service")


def test_fleet_variable_lists_the_fleet(rig: DashboardRig) -> None:
    for d in DASHES.values():
        (fleet,) = [v for v in d["templating"]["list"] if v["name"] == "fleet"]
        assert fleet["definition"] == "label_values(tinydrift_readings_received_total, fleet)"

    def listed() -> bool:
        return rig.fleet_name in rig.label_values("fleet", "tinydrift_readings_received_total")

    wait(listed, 60, "the fleet variable to list the fleet")


def test_every_query_parses(rig: DashboardRig, record_property) -> None:
    """Prometheus accepts every query (a syntax error raises ``PrometheusError``)."""
    empty = []
    for d in DASHES.values():
        for q in queries(d):
            result = rig.query_range(q.expr) if q.annotation else rig.query(q.expr)
            if d["uid"] == UPDATES and not result:
                empty.append(q.where)
    # not a failure: the updates panels wait for a rollout (test_update_panels_return_data)
    record_property("updates_queries_without_data", empty)
    print(f"updates queries without data yet: {empty}")


@pytest.mark.parametrize("uid", REQUIRE_DATA)
def test_required_panels_return_data(rig: DashboardRig, uid: str) -> None:
    qs = [q for q in queries(DASHES[uid]) if q.name not in ANNOTATIONS_WITHOUT_EVENTS]
    problems = settle(rig, qs)
    assert not problems, f"{uid}: " + "; ".join(problems)


def test_update_panels_return_data(rig: DashboardRig) -> None:
    from tests.integration.test_rollout_e2e import shuffled_label_blob

    svc = rig.service
    assert svc.operations is not None
    assert svc.reconciler is not None
    assert svc.policy is not None
    reconciler = svc.reconciler
    svc.policy.mode = "auto"
    # a recalibration of the gain-drift devices by the policy (auto): candidates, gates, pushes
    wait(
        lambda: any(v.status == "FINISHED" for v in reconciler.views()),
        120,
        "the policy's recalibration rollout finished",
    )
    # a deliberately bad candidate: the canary gate fails and rolls it back
    schema = rig.bundle.firmware().schema.schema_id_hex
    blob = shuffled_label_blob(rig.bundle, 900)
    svc.registry.add_parameter_set(schema, 900, 0, blob, source="bad", status="candidate")
    bad = svc.operations.propose(FLEET, "parameter_set", "dashboards-test", version=900,
                                 auto_approve=True)  # fmt: skip
    assert bad.rollout is not None
    rid = bad.rollout.rollout_id
    wait(lambda: reconciler.view(rid).status == "ROLLED_BACK", 90, "the bad candidate rolled back")
    # a retrain on the buffered labels: candidate vs deployed scores
    svc.operations.propose(FLEET, "retrain", "dashboards-test")
    dash = DASHES[UPDATES]
    not_required = {
        t["expr"]
        for p in dash["panels"]
        if p["title"] in UPDATE_PANELS_NOT_REQUIRED
        for t in p.get("targets", [])
    }
    qs = [q for q in queries(dash) if q.expr not in not_required]
    problems = settle(rig, qs)
    assert not problems, f"{UPDATES}: " + "; ".join(problems)
