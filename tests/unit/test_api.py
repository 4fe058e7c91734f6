"""The operator API over a real registry (SQLite file and PostgreSQL): reads, auth, tokens, CLI.

FastAPI's TestClient drives the app in-process; the last test serves it from ``Service`` over
real HTTP against the session's Mosquitto. Every refused call (401, 403) must leave the database
exactly as it was, including the tokens' ``last_used``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text
from typer.testing import CliRunner

from service.api import create_app
from service.cli.app import app as cli_app
from service.registry.engine import create_registry_engine
from service.registry.models import Base
from service.registry.records import DeviceRecord, DriftEventRecord
from service.registry.store import Registry

with warnings.catch_warnings():  # starlette's TestClient warns about its httpx use on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

API = "/api/v1"
T0 = datetime(2025, 11, 1, 12, 0, tzinfo=UTC)
BLOB = bytes(range(256)) * 3


@dataclass
class FakeState:
    """What ``Service.status`` returns, for the status endpoint."""

    connected: bool = True
    devices: int = 3
    readings: int = 1234
    rejections: dict[str, int] = field(default_factory=lambda: {"bad_seq": 2})
    detections: int = 5
    queue_depth: int = 0


CALIBRATION = {
    "state": "calibrating",
    "readings": 3200,
    "streams_ready": 20,
    "streams": 22,
    "block_readings_max": 64,
    "block_readings_median": 16.0,
    "kappa_max": 1.7,
    "labels": 320,
    "error_ready": False,
    "error_block_labels": 0,
    "frame_interval_s": 2.0,
    "block_seconds_max": 8.0,
    "block_seconds_median": 2.0,
    "declared": {"period_s": None, "session_s": 600.0},
    "declared_block_frames": 2048,
    "declared_too_long": True,
    "reason": "the declared session 600 s needs blocks of 2048 frames at 2 s per frame, ...",
}


def fake_calibration(fleet: str, device: str) -> dict[str, Any] | None:
    """What ``Service._calibration_of`` gives: the drift engine knows ``plant/dev-2`` only."""
    return CALIBRATION if (fleet, device) == ("plant", "dev-2") else None


FLEET_CALIBRATION = {
    "fleet": "plant",
    "declared": {"period_s": 86400.0, "session_s": None},
    "devices": 3,
    "states": {"monitoring": 2, "calibrating": 1},
    "declared_too_long": 0,
    "streams_ready": 64,
    "streams": 66,
    "frame_interval_s_median": 600.0,
    "declared_block_frames_max": 256,
    "block_readings_median": 4096.0,
    "block_readings_max": 8192,
    "block_seconds_median": 153600.0,
    "block_seconds_max": 307200.0,
    "kappa_max": 1.4,
    "error_ready": 2,
}


def fake_fleet_calibration(fleet: str) -> dict[str, Any]:
    """What ``Service._fleet_calibration_of`` gives: ``plant`` declared a daily cycle."""
    if fleet == "plant":
        return FLEET_CALIBRATION
    return {**FLEET_CALIBRATION, "fleet": fleet, "declared": None, "devices": 0, "states": {},
            "streams_ready": 0, "streams": 0, "frame_interval_s_median": None,
            "declared_block_frames_max": 0, "block_readings_median": None,
            "block_readings_max": 0, "block_seconds_median": None, "block_seconds_max": None,
            "kappa_max": 1.0, "error_ready": 0}  # fmt: skip


@dataclass
class Api:
    """A client over a seeded registry, with one token per role."""

    client: TestClient
    registry: Registry
    engine: Engine
    tokens: dict[str, str]

    def get(self, path: str, role: str | None = "viewer", **kw: Any) -> httpx.Response:
        return self.client.get(API + path, headers=self._auth(role), **kw)

    def post(self, path: str, role: str | None = "admin", **kw: Any) -> httpx.Response:
        return self.client.post(API + path, headers=self._auth(role), **kw)

    def delete(self, path: str, role: str | None = "admin", **kw: Any) -> httpx.Response:
        return self.client.delete(API + path, headers=self._auth(role), **kw)

    def _auth(self, role: str | None) -> dict[str, str]:
        if role is None:
            return {}
        return {"Authorization": f"Bearer {self.tokens.get(role, role)}"}

    def snapshot(self) -> dict[str, Any]:
        """Row counts of every table, plus the full token rows (``last_used`` included)."""
        with self.engine.connect() as conn:
            counts = {
                name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for name, table in Base.metadata.tables.items()
            }
            tokens = conn.execute(text("SELECT * FROM api_tokens ORDER BY id")).all()
        return {"counts": counts, "tokens": [tuple(r) for r in tokens]}


def seed(reg: Registry) -> None:
    """Fleet ``plant`` (3 devices, one drifting, one offline and calibrating) and ``lab``
    (none), events, a set."""
    reg.upsert_devices(
        [
            DeviceRecord(
                fleet="plant",
                device=f"dev-{i}",
                schema_id="ab" * 8,
                active_version=2,
                previous_version=1,
                update_state="confirmed",
                online=i != 2,
                fw="1.0.0",
                boot=1,
                last_seq=100 + i,
                first_seen=T0,
                last_seen=T0 + timedelta(minutes=i),
                caps={"max_blob": 4096},
                drift_state={1: "feature,confidence", 2: "calibrating"}.get(i, "ok"),
                n_features=8,
                n_classes=4,
            )
            for i in range(3)
        ]
    )
    with reg.transaction() as tx:
        tx.ensure_fleets(["lab"])
    events = [
        DriftEventRecord(
            fleet="plant",
            device=dev,
            scope="device",
            signal="feature",
            feature="mag_mean",
            detector="adwin",
            score=1.5 + k,
            model_version=2,
            ts_ms=1000 * k,
            readings=600 + k,
            ts=T0 + timedelta(hours=k),
        )
        for k, dev in enumerate(["dev-1", "dev-1", "dev-0"])
    ]
    reg.record_drift_events(events)
    reg.add_parameter_set(
        "ab" * 8, 2, 0, BLOB, source="factory", status="good", metrics={"acc": 0.93}, notes="v2"
    )


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    reg = Registry(db_url)
    seed(reg)
    tokens = {role: reg.create_token(f"{role}-1", role, actor="test")[1] for role in
              ("viewer", "operator", "admin")}  # fmt: skip
    engine = create_registry_engine(db_url)
    app = create_app(
        reg, FakeState, calibration=fake_calibration, fleet_calibration=fake_fleet_calibration
    )
    with TestClient(app) as client:
        yield Api(client, reg, engine, tokens)
    engine.dispose()
    reg.close()


# --------------------------------------------------------------------------------------------
# reads


def test_fleets_with_device_counts(api: Api):
    r = api.get("/fleets")
    assert r.status_code == 200, r.text
    fleets = {f["name"]: f for f in r.json()["items"]}
    assert list(fleets) == ["lab", "plant"]
    assert {k: fleets["plant"][k] for k in ("devices", "online", "drifting")} == {
        "devices": 3,
        "online": 2,
        "drifting": 1,
    }
    assert fleets["lab"]["devices"] == 0


def test_fleet_devices_paginated(api: Api):
    r = api.get("/fleets/plant/devices", params={"limit": 2})
    assert r.status_code == 200, r.text
    page = r.json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [d["device"] for d in page["items"]] == ["dev-0", "dev-1"]
    dev1 = page["items"][1]
    assert dev1["model_version"] == 2
    assert dev1["update_state"] == "confirmed"
    assert dev1["drift_state"] == "feature,confidence"
    assert dev1["drifting"] is True
    assert dev1["online"] is True
    assert datetime.fromisoformat(dev1["last_seen"]) == T0 + timedelta(minutes=1)
    rest = api.get("/fleets/plant/devices", params={"limit": 2, "offset": 2}).json()
    assert [d["device"] for d in rest["items"]] == ["dev-2"]
    assert rest["items"][0]["online"] is False
    assert api.get("/fleets/nowhere/devices").status_code == 404


def test_device_detail_with_recent_events(api: Api):
    r = api.get("/devices/plant/dev-1")
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["device"], d["boot"], d["last_seq"], d["caps"]) == (
        "dev-1",
        1,
        101,
        {"max_blob": 4096},
    )
    assert [e["score"] for e in d["recent_drift_events"]] == [2.5, 1.5]  # newest first
    assert api.get("/devices/plant/dev-9").status_code == 404


def test_a_calibrating_device_is_not_drifting_and_shows_what_layer_a_learnt(api: Api):
    d = api.get("/devices/plant/dev-2").json()
    assert (d["drift_state"], d["drifting"]) == ("calibrating", False)
    assert d["calibration"] == CALIBRATION
    assert api.get("/devices/plant/dev-1").json()["calibration"] is None  # no live monitor


def test_a_fleets_declared_normal_and_what_layer_a_learnt(api: Api):
    r = api.get("/fleets/plant/calibration")
    assert r.status_code == 200, r.text
    assert r.json() == FLEET_CALIBRATION
    lab = api.get("/fleets/lab/calibration").json()
    assert (lab["declared"], lab["devices"], lab["block_seconds_max"]) == (None, 0, None)
    assert api.get("/fleets/nowhere/calibration").status_code == 404
    assert api.get("/fleets/plant/calibration", role=None).status_code == 401
    no_service = TestClient(create_app(api.registry))
    r = no_service.get(API + "/fleets/plant/calibration", headers=api._auth("viewer"))
    assert r.status_code == 503
    assert "running service" in r.json()["detail"]


def test_drift_events_filtered(api: Api):
    every = api.get("/drift-events").json()["items"]
    assert [e["device"] for e in every] == ["dev-0", "dev-1", "dev-1"]
    assert len(api.get("/drift-events", params={"device": "dev-1"}).json()["items"]) == 2
    since = (T0 + timedelta(minutes=30)).isoformat()
    later = api.get("/drift-events", params={"fleet": "plant", "since": since}).json()["items"]
    assert [e["score"] for e in later] == [3.5, 2.5]
    assert len(api.get("/drift-events", params={"limit": 1}).json()["items"]) == 1
    assert api.get("/drift-events", params={"fleet": "lab"}).json()["items"] == []


def test_parameter_sets_without_blob_bytes(api: Api):
    items = api.get("/parameter-sets").json()["items"]
    assert len(items) == 1
    assert "blob" not in items[0]
    assert items[0]["size"] == len(BLOB)
    assert api.get("/parameter-sets", params={"status": "bad"}).json()["items"] == []
    r = api.get(f"/parameter-sets/{'ab' * 8}/2")
    assert r.status_code == 200, r.text
    detail = r.json()
    stored = api.registry.get_parameter_set("ab" * 8, 2)
    assert stored is not None
    assert detail["sha256"] == stored.sha256
    assert (detail["metrics"], detail["notes"], detail["status"]) == ({"acc": 0.93}, "v2", "good")
    assert "blob" not in detail
    assert api.get(f"/parameter-sets/{'ab' * 8}/3").status_code == 404


def test_status_shows_the_service_state(api: Api):
    body = api.get("/status").json()
    assert body["registry"] == api.registry.dialect
    assert body["service"]["readings"] == 1234


def test_audit_for_admins(api: Api):
    r = api.get("/audit", role="admin", params={"action": "token.create"})
    assert r.status_code == 200, r.text
    assert {e["target"] for e in r.json()["items"]} == {
        "token:viewer-1",
        "token:operator-1",
        "token:admin-1",
    }


def test_openapi_document_and_docs(api: Api):
    doc = api.client.get("/openapi.json").json()
    for path in ("/fleets", "/fleets/{fleet}/devices", "/fleets/{fleet}/calibration",
                 "/devices/{fleet}/{device}", "/drift-events", "/parameter-sets",
                 "/parameter-sets/{schema_id}/{version}", "/audit", "/tokens",
                 "/tokens/{name}"):  # fmt: skip
        assert API + path in doc["paths"], path
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert api.client.get("/docs").status_code == 200


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/fleets/plant/devices", {"limit": -1}, "limit"),
        ("/fleets/plant/devices", {"limit": 100_000}, "limit"),
        ("/fleets/plant/devices", {"offset": -1}, "offset"),
        ("/fleets/plant/devices", {"offset": 2**63}, "offset"),  # was a 500 from the driver
        ("/drift-events", {"since": "0001-01-01T00:00:00+23:59"}, "since"),  # before year 1 UTC
        ("/drift-events", {"limit": "many"}, "limit"),
        ("/drift-events", {"since": "2025-11-01T12:00:00"}, "since"),  # no time zone
        ("/parameter-sets", {"status": "great"}, "status"),
    ],
)
def test_invalid_query_is_422_naming_the_field(api: Api, path: str, params: dict, field: str):
    r = api.get(path, params=params)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", field]]


def test_invalid_token_body_is_422_naming_the_field(api: Api):
    api.get("/tokens", role="admin")  # the token's last_used is written now (once a minute)
    before = api.snapshot()
    r = api.post("/tokens", json={"name": "ci", "role": "superuser"})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "role"]]
    r = api.post("/tokens", json={"name": "has space", "role": "viewer"})
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "name"]]
    assert api.snapshot() == before


# --------------------------------------------------------------------------------------------
# authentication and roles: refused calls change nothing


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, "Bearer"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": "Bearer not-a-token"}, 'Bearer error="invalid_token"'),
        ({"Authorization": "Bearer " + "x" * 5000}, 'Bearer error="invalid_token"'),
    ],
)
def test_missing_or_bad_token_is_401_and_changes_nothing(api: Api, headers: dict, challenge: str):
    before = api.snapshot()
    for method, path, kw in [
        ("GET", "/fleets", {}),
        ("GET", "/fleets/plant/devices", {"params": {"limit": -1}}),  # auth before validation
        ("POST", "/tokens", {"json": {"name": "intruder", "role": "admin"}}),
        ("DELETE", "/tokens/admin-1", {}),
    ]:
        r = api.client.request(method, API + path, headers=headers, **kw)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["WWW-Authenticate"] == challenge
    assert api.snapshot() == before


def test_revoked_token_is_401(api: Api):
    assert api.get("/fleets").status_code == 200
    r = api.delete("/tokens/viewer-1")
    assert r.status_code == 200, r.text
    assert r.json()["revoked"] is True
    before = api.snapshot()
    r = api.get("/fleets")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.snapshot() == before


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_non_admin_is_403_on_admin_endpoints_and_changes_nothing(api: Api, role: str):
    api.get("/fleets", role=role)  # the token's last_used is written now, not by the refusals
    before = api.snapshot()
    for r in [
        api.get("/audit", role=role),
        api.get("/tokens", role=role),
        api.post("/tokens", role=role, json={"name": "escalate", "role": "admin"}),
        api.delete("/tokens/admin-1", role=role),
    ]:
        assert r.status_code == 403, r.text
        assert role in r.json()["detail"]
    assert api.snapshot() == before


# --------------------------------------------------------------------------------------------
# tokens


def test_token_creation_is_audited_and_the_token_works(api: Api):
    r = api.post("/tokens", json={"name": "ci-bot", "role": "operator"})
    assert r.status_code == 201, r.text
    body = r.json()
    secret = body["token"]
    assert len(secret) == 43  # 32 random bytes, urlsafe base64
    assert (body["name"], body["role"], body["revoked"]) == ("ci-bot", "operator", False)
    entry = api.registry.list_audit(target="token:ci-bot")
    assert [(a.actor, a.action, a.details) for a in entry] == [
        ("admin-1", "token.create", {"role": "operator"})
    ]
    assert api.get("/fleets", role=secret).status_code == 200
    assert api.get("/audit", role=secret).status_code == 403
    with api.engine.connect() as conn:  # only the hash is stored
        stored = conn.execute(text("SELECT token_hash FROM api_tokens WHERE name = 'ci-bot'"))
        assert secret not in stored.scalar_one()
    listed = api.get("/tokens", role="admin").json()["items"]
    assert {t["name"] for t in listed} == {"viewer-1", "operator-1", "admin-1", "ci-bot"}
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert api.post("/tokens", json={"name": "ci-bot", "role": "viewer"}).status_code == 409


def test_revocation_is_audited_and_unknown_or_repeated_is_refused(api: Api):
    assert api.delete("/tokens/operator-1").status_code == 200
    assert [(a.actor, a.action) for a in api.registry.list_audit(target="token:operator-1")] == [
        ("admin-1", "token.revoke"),
        ("test", "token.create"),
    ]
    assert api.delete("/tokens/operator-1").status_code == 409
    assert api.delete("/tokens/nobody").status_code == 404
    assert api.delete("/tokens/bad%20name").status_code == 422


def test_last_used_is_recorded(api: Api):
    assert api.registry.get_token("viewer-1").last_used is None  # type: ignore[union-attr]
    api.get("/fleets")
    used = api.registry.get_token("viewer-1")
    assert used is not None
    assert used.last_used is not None


# --------------------------------------------------------------------------------------------
# bootstrap from the command line


def test_cli_bootstraps_the_first_admin_token(db_url: str):
    runner = CliRunner()
    created = runner.invoke(
        cli_app, ["api-token", "create", "--db", db_url, "--name", "root", "--role", "admin"]
    )
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert len(secret) == 43
    assert "shown only now" in created.stderr
    listed = runner.invoke(cli_app, ["api-token", "list", "--db", db_url])
    assert listed.exit_code == 0
    assert listed.stdout.startswith("root\tadmin\tactive")
    assert secret not in listed.stdout
    with Registry(db_url) as reg, TestClient(create_app(reg)) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.get(API + "/tokens", headers=headers).status_code == 200
        assert reg.list_audit(target="token:root")[0].actor.startswith("cli")
    bad = runner.invoke(
        cli_app, ["api-token", "create", "--db", db_url, "--name", "x", "--role", "superuser"]
    )
    assert bad.exit_code == 1
    assert bad.stderr.startswith("error: --role must be one of viewer, operator, admin")
    taken = runner.invoke(cli_app, ["api-token", "create", "--db", db_url, "--name", "root"])
    assert (taken.exit_code, taken.stderr.count("\n")) == (1, 1)
    assert "taken" in taken.stderr
    revoked = runner.invoke(cli_app, ["api-token", "revoke", "--db", db_url, "--name", "root"])
    assert revoked.exit_code == 0, revoked.output
    with Registry(db_url) as reg:
        assert reg.verify_token(secret) is None


# --------------------------------------------------------------------------------------------
# hosted by the service


@pytest.mark.integration
def test_service_serves_the_api_over_http(mosquitto, sqlite_url: str):
    from service.config import load_settings
    from service.serve import Service

    # its own fleet: the session broker holds other tests' retained births
    settings = load_settings(
        broker=mosquitto.url,
        db=sqlite_url,
        metrics_port=0,
        api_port=0,
        fleets=["api-only"],
        mqtt_client_id="api-test-service",
        fleet_normal={"api-only": {"period_s": 3600, "session_s": 120}},
    )
    svc = Service(settings)
    svc.start()
    try:
        assert svc.api_port not in (None, 0, 8080)
        _, secret = svc.registry.create_token("ops", "viewer", actor="test")
        base = f"http://127.0.0.1:{svc.api_port}"
        r = httpx.get(f"{base}{API}/fleets", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        assert r.json() == {"items": []}
        assert httpx.get(f"{base}{API}/fleets").status_code == 401
        status = httpx.get(f"{base}{API}/status", headers={"Authorization": f"Bearer {secret}"})
        assert status.json()["service"]["devices"] == 0
        with svc.registry.transaction() as tx:
            tx.ensure_fleets(["api-only"])
        cal = httpx.get(
            f"{base}{API}/fleets/api-only/calibration",
            headers={"Authorization": f"Bearer {secret}"},
        ).json()
        assert cal["declared"] == {"period_s": 3600.0, "session_s": 120.0}  # from the settings
        assert (cal["devices"], cal["states"], cal["block_readings_median"]) == (0, {}, None)
    finally:
        svc.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}{API}/fleets", timeout=2)


def test_api_server_reports_a_taken_port_in_one_line():
    import socket

    from fastapi import FastAPI

    from service.api.server import ApiServer, ApiServerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ApiServerError, match=f"127.0.0.1:{port}: .*choose another --api-port"):
            ApiServer(FastAPI(), "127.0.0.1", port).start()
