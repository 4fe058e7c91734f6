"""The Grafana dashboards in ``dashboards/`` are well formed and use only real metric names.

The checks follow mqtt-observability-anchors §8.6: every file loads, has a fixed uid, references
only the provisioned data source, and every PromQL metric name exists in the service's registry.
Whether the queries parse and return data is checked against a real Prometheus in
``tests/integration/test_dashboards_prometheus.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "tinydrift-prometheus"}
UIDS = {"tinydrift-fleet", "tinydrift-updates", "tinydrift-ingest"}
FLEET_QUERY = "label_values(tinydrift_readings_received_total, fleet)"
METRIC = re.compile(r"\btinydrift_[a-z0-9_]+")
# a metric name, then its optional label matchers
SELECTOR = re.compile(r"\b(tinydrift_[a-z0-9_]+)\s*(\{[^}]*\})?")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation query."""
    for p in panels(dash):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]
    for a in dash["annotations"]["list"]:
        yield f"annotation {a['name']!r}", a["target"]["expr"]


def exposed_series() -> set[str]:
    """Series names the service exposes (``_total`` for counters, ``_bucket``... for histograms)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(ServiceMetrics().exposition().decode()):
        if fam.name.endswith("_created"):
            continue
        names.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
    return names


def fleet_labelled_series() -> set[str]:
    """Series names of the metrics that carry a ``fleet`` label."""
    out: set[str] = set()
    for m in vars(ServiceMetrics()).values():
        # prometheus_client keeps label names in ``_labelnames``; BulkHistogram in ``labelnames``
        labelnames: tuple[str, ...] = getattr(m, "_labelnames", ()) or getattr(m, "labelnames", ())
        name: str | None = getattr(m, "_name", None) or getattr(m, "name", None)
        if name and "fleet" in labelnames:
            out.update(name + s for s in ("", "_total", "_bucket", "_sum", "_count"))
    return out


DASHES = load_dashboards()


def test_three_dashboards_with_fixed_unique_uids() -> None:
    uids = [d["uid"] for d in DASHES.values()]
    assert sorted(uids) == sorted(UIDS)
    assert len(set(uids)) == len(uids)
    titles = [d["title"] for d in DASHES.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("name", sorted(DASHES))
def test_structure(name: str) -> None:
    d = DASHES[name]
    assert d.get("id") is None, "provisioned dashboards carry no numeric id"
    assert isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    cells: dict[tuple[int, int], int] = {}
    for p in panels(d):
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"}, p["title"]
        assert min(g["w"], g["h"]) > 0, p["title"]
        assert min(g["x"], g["y"]) >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), p["id"])
                assert other == p["id"], f"panels {other} and {p['id']} overlap in {name}"


@pytest.mark.parametrize("name", sorted(DASHES))
def test_every_query_uses_the_provisioned_datasource(name: str) -> None:
    d = DASHES[name]
    for p in panels(d):
        if p["type"] == "row":
            assert not p.get("targets"), f"row {p['title']!r} has queries"
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"duplicate refId in {p['title']!r}"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            assert t["expr"].strip(), p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
    for a in d["annotations"]["list"]:
        assert a["datasource"] == DATASOURCE, a["name"]
    for v in d["templating"]["list"]:
        assert v["datasource"] == DATASOURCE, v["name"]


@pytest.mark.parametrize("name", sorted(DASHES))
def test_fleet_variable(name: str) -> None:
    variables = {v["name"]: v for v in DASHES[name]["templating"]["list"]}
    fleet = variables["fleet"]
    assert fleet["type"] == "query"
    assert fleet["definition"] == FLEET_QUERY
    assert fleet["query"]["query"] == FLEET_QUERY


@pytest.mark.parametrize("name", sorted(DASHES))
def test_metric_names_exist_in_the_service(name: str) -> None:
    exposed = exposed_series()
    unknown = {
        (where, m)
        for where, expr in exprs(DASHES[name])
        for m in METRIC.findall(expr)
        if m not in exposed
    }
    assert not unknown, f"metric names the service does not expose: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(DASHES))
def test_fleet_labelled_metrics_are_filtered_by_the_fleet_variable(name: str) -> None:
    fleet_labelled = fleet_labelled_series()
    assert "tinydrift_readings_received_total" in fleet_labelled
    assert "tinydrift_ingest_rejected_total" not in fleet_labelled
    selectors = [(where, *s) for where, expr in exprs(DASHES[name]) for s in SELECTOR.findall(expr)]
    unfiltered = [
        (where, m)
        for where, m, matchers in selectors
        if m in fleet_labelled and 'fleet=~"$fleet"' not in matchers
    ]
    assert not unfiltered, f'selectors without fleet=~"$fleet": {unfiltered}'
    # a fleet matcher on a metric without the label would silently match nothing
    no_label = [
        (where, m)
        for where, m, matchers in selectors
        if m not in fleet_labelled and re.search(r"\bfleet\s*=", matchers)
    ]
    assert not no_label, f"fleet matcher on a metric without a fleet label: {no_label}"


@pytest.mark.parametrize("name", sorted(DASHES))
def test_rate_windows_use_rate_interval(name: str) -> None:
    """Range selectors use Grafana's variables so tests can substitute a short window."""
    fixed = [
        (where, w)
        for where, expr in exprs(DASHES[name])
        if not where.startswith("annotation")
        for w in re.findall(r"\[([^\]]+)\]", expr)
        if w not in ("$__rate_interval", "$__range")
    ]
    assert not fixed, f"fixed range windows in panel queries: {fixed}"


def test_accuracy_estimate_is_titled_as_blind_to_concept_shift() -> None:
    fleet = next(d for d in DASHES.values() if d["uid"] == "tinydrift-fleet")
    (panel,) = [
        p
        for p in panels(fleet)
        if any("tinydrift_estimated_accuracy_ratio" in t["expr"] for t in p.get("targets", []))
    ]
    assert any("tinydrift_labelled_accuracy_ratio" in t["expr"] for t in panel["targets"])
    assert "estimate" in panel["title"].lower()
    assert "concept shift" in panel["title"].lower()


def test_updates_dashboard_annotates_pushes() -> None:
    updates = next(d for d in DASHES.values() if d["uid"] == "tinydrift-updates")
    assert any(
        "tinydrift_manifests_published_total" in a["target"]["expr"]
        for a in updates["annotations"]["list"]
    )
