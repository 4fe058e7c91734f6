"""The rollout and candidate routes of the operator API: the HTTP layer over a real registry.

Reads come from rollouts stored with real controller states and transitions. Actions go to
:class:`RecordingOperations`, an in-test :class:`~service.api.state.RolloutOperations` that
records its calls and answers with real ``RolloutView``/``Proposal`` values (or raises what the
test sets): this checks auth, roles, validation, error mapping and that a refused call (401,
403, 422) neither reaches the operations nor changes the database. The service end to end is
tested with the real reconciler elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from service.api import create_app
from service.api.state import RolloutOperations
from service.registry.engine import create_registry_engine
from service.registry.models import Base
from service.registry.records import Role
from service.registry.rollout_store import RolloutEventRecord, RolloutRecord
from service.registry.store import Registry
from service.rollout.controller import (
    Action,
    IllegalTransitionError,
    PublishManifest,
    RecordTransition,
    RolloutController,
)
from service.rollout.groups import DeviceInfo
from service.rollout.plan import GatePolicy, ParamRef, QualityPolicy, RolloutPlan
from service.rollout.proposals import Proposal, ProposalError
from service.rollout.reconciler import (
    RolloutConflictError,
    RolloutReconciler,
    RolloutView,
    UnknownRolloutError,
)

with warnings.catch_warnings():  # starlette's TestClient warns about its httpx use on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

API = "/api/v1"
SCHEMA = "a1b2c3d4e5f60718"
NEW = ParamRef(5, SCHEMA, 1, 1480, "ab" * 32, 1)
OLD = ParamRef(4, SCHEMA, 1, 1480, "cd" * 32, 1)
MIN = 60_000
T0 = 1_762_000_000_000
GATES = GatePolicy(quality=QualityPolicy(min_soak_ms=10 * MIN, max_soak_ms=60 * MIN))
PLANT = "plant-recal-1"
LAB = "lab-retrain-1"
UPDATES_DISABLED = "updates are disabled: start the service with --release-key and --deploy-key"


# --------------------------------------------------------------------------------------------
# stored rollouts (real controller states) and the operations double


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def transitions(actions: list[Action]) -> list[RolloutEventRecord]:
    """The controller's transitions as the reconciler stores them."""
    return [
        RolloutEventRecord(
            a.rollout_id,
            _ts(a.at_ms),
            a.scope,
            a.name,
            a.from_state,
            a.to_state,
            a.actor,
            a.reason,
            a.figures,
        )
        for a in actions
        if isinstance(a, RecordTransition)
    ]


def record(ctl: RolloutController) -> RolloutRecord:
    """The controller's row, as the reconciler writes it."""
    p, st = ctl.plan, ctl.state
    return RolloutRecord(
        p.rollout_id, p.fleet, p.target.schema_id, p.previous.version, p.target.version, p.kind,
        st.status.value, _ts(st.created_ms), _ts(st.updated_ms), ctl.to_json(),
    )  # fmt: skip


def soaking_rollout() -> tuple[RolloutController, list[Action]]:
    """Fleet ``plant``: approved, the 4 canary devices in TRIAL, the canary soaking."""
    plan = RolloutPlan(
        PLANT, "plant", NEW, OLD, kind="recalibration", canary_size=4, control_size=3, gates=GATES
    )
    fleet = [DeviceInfo(f"d{i:02d}", last_active_ms=i) for i in range(20)]
    ctl, actions = RolloutController.create(plan, fleet, T0)
    actions += ctl.start(T0)
    approved = ctl.approve("alice", T0 + MIN)
    actions += approved
    for m in approved:
        if isinstance(m, PublishManifest):
            actions += ctl.on_ack(m.device, m.deploy_seq, "TRIAL", "trial", T0 + 2 * MIN)
    actions += ctl.tick(T0 + 3 * MIN)
    assert ctl.state.groups[0].status == "SOAKING"
    return ctl, actions


def awaiting_rollout() -> tuple[RolloutController, list[Action]]:
    """Fleet ``lab``: a retrain rollout awaiting approval, created after the plant one."""
    plan = RolloutPlan(LAB, "lab", NEW, OLD, kind="retrain", canary_size=2, control_size=1)
    fleet = [DeviceInfo(f"l{i}", last_active_ms=i) for i in range(6)]
    ctl, actions = RolloutController.create(plan, fleet, T0 + 10 * MIN)
    return ctl, actions + ctl.start(T0 + 10 * MIN)


def store(reg: Registry, ctl: RolloutController, actions: list[Action]) -> None:
    """Save the rollout and its transitions."""
    reg.save_rollout(record(ctl), transitions(actions))


def view_of(ctl: RolloutController) -> RolloutView:
    """The reconciler's own view of a controller (its ``_view`` uses only the controller)."""
    return RolloutReconciler._view(None, ctl)  # type: ignore[arg-type]


def proposal_of(view: RolloutView) -> Proposal:
    """A recalibration proposal of ``view``: one device accepted, one refused."""
    return Proposal("recalibration", view.fleet, view, {"d01": 7}, {"d02": "x"}, 0.5)


class RecordingOperations:
    """A :class:`RolloutOperations` that records its calls and answers with fixed values."""

    def __init__(self, view: RolloutView) -> None:
        self.answer = view
        """The view every rollout action answers with."""
        self.calls: list[tuple[Any, ...]] = []
        self.error: BaseException | None = None
        """Raised by the next calls instead of answering."""
        self.proposal = proposal_of(view)

    def _answer(self, call: tuple[Any, ...], answer: Any) -> Any:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        return answer

    def propose(
        self,
        fleet: str,
        kind: str,
        actor: str,
        *,
        devices: list[str] | None = None,
        version: int | None = None,
        auto_approve: bool = False,
    ) -> Proposal:
        call = ("propose", fleet, kind, actor, devices, version, auto_approve)
        return self._answer(call, self.proposal)  # type: ignore[no-any-return]

    def approve(self, rollout_id: str, actor: str) -> RolloutView:
        return self._answer(("approve", rollout_id, actor), self.answer)  # type: ignore[no-any-return]

    def pause(self, rollout_id: str, actor: str, reason: str) -> RolloutView:
        return self._answer(("pause", rollout_id, actor, reason), self.answer)  # type: ignore[no-any-return]

    def resume(self, rollout_id: str, actor: str) -> RolloutView:
        return self._answer(("resume", rollout_id, actor), self.answer)  # type: ignore[no-any-return]

    def rollback(self, rollout_id: str, actor: str, reason: str) -> RolloutView:
        call = ("rollback", rollout_id, actor, reason)
        return self._answer(call, self.answer)  # type: ignore[no-any-return]

    def view(self, rollout_id: str) -> RolloutView:
        return self._answer(("view", rollout_id), self.answer)  # type: ignore[no-any-return]


def seed(reg: Registry) -> dict[str, str]:
    """Two stored rollouts, two parameter sets (one candidate), a token per role."""
    store(reg, *soaking_rollout())
    store(reg, *awaiting_rollout())
    blob = bytes(range(256)) * 2
    reg.add_parameter_set(SCHEMA, 4, 1, blob, source="factory", status="good")
    reg.add_parameter_set(SCHEMA, 5, 1, blob[::-1], source="recalibration", status="candidate")
    roles: tuple[Role, ...] = ("viewer", "operator", "admin")
    return {role: reg.create_token(f"{role}-1", role, actor="test")[1] for role in roles}


def snapshot(engine: Engine) -> dict[str, Any]:
    """Row counts of every table and the full token rows (``last_used`` included)."""
    with engine.connect() as conn:
        counts = {
            name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for name, table in Base.metadata.tables.items()
        }
        tokens = conn.execute(text("SELECT * FROM api_tokens ORDER BY id")).all()
        rollouts = conn.execute(text("SELECT id, state, state_json FROM rollouts")).all()
    return {"counts": counts, "tokens": [tuple(r) for r in tokens], "rollouts": set(rollouts)}


@dataclass
class Api:
    """A client over the seeded registry, with the recording operations."""

    client: TestClient
    registry: Registry
    engine: Engine
    tokens: dict[str, str]
    ops: RecordingOperations

    def call(
        self, method: str, path: str, *, role: str | None = "operator", **kw: Any
    ) -> httpx.Response:
        headers = {} if role is None else {"Authorization": f"Bearer {self.tokens.get(role, role)}"}
        response: httpx.Response = self.client.request(method, API + path, headers=headers, **kw)
        return response

    def get(self, path: str, *, role: str | None = "viewer", **kw: Any) -> httpx.Response:
        return self.call("GET", path, role=role, **kw)

    def post(self, path: str, *, role: str | None = "operator", **kw: Any) -> httpx.Response:
        return self.call("POST", path, role=role, **kw)

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.engine)


@pytest.fixture
def api(sqlite_url: str) -> Iterator[Api]:
    reg = Registry(sqlite_url)
    tokens = seed(reg)
    ctl, _ = soaking_rollout()
    ops = RecordingOperations(view_of(ctl))
    operations: RolloutOperations = ops
    engine = create_registry_engine(sqlite_url)
    with TestClient(create_app(reg, operations=operations)) as client:
        yield Api(client, reg, engine, tokens, ops)
    engine.dispose()
    reg.close()


# --------------------------------------------------------------------------------------------
# reads


def test_list_rollouts_newest_first_with_counts(api: Api):
    r = api.get("/rollouts")
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["id"] for i in items] == [LAB, PLANT]
    plant = items[1]
    assert {k: plant[k] for k in ("fleet", "kind", "state", "from_version", "to_version")} == {
        "fleet": "plant",
        "kind": "recalibration",
        "state": "RUNNING",
        "from_version": 4,
        "to_version": 5,
    }
    assert datetime.fromisoformat(plant["created"]) == _ts(T0)
    assert datetime.fromisoformat(plant["updated"]) == _ts(T0 + 3 * MIN)
    assert plant["summary"] == {
        "confirmed": 0,
        "in_trial": 4,
        "failed": 0,
        "pending": 0,
        "rolled_back": 0,
        "untouched_control": 3,
    }
    assert items[0]["state"] == "AWAITING_APPROVAL"
    assert items[0]["summary"]["in_trial"] == 0


@pytest.mark.parametrize(
    ("params", "ids"),
    [
        ({"fleet": "plant"}, [PLANT]),
        ({"state": "AWAITING_APPROVAL"}, [LAB]),
        ({"fleet": "plant", "state": "PAUSED"}, []),
        ({"fleet": "nowhere"}, []),
        ({"limit": 1}, [LAB]),
        ({"limit": 1, "offset": 1}, [PLANT]),
    ],
)
def test_list_rollouts_filtered(api: Api, params: dict[str, Any], ids: list[str]):
    r = api.get("/rollouts", params=params)
    assert r.status_code == 200, r.text
    assert [i["id"] for i in r.json()["items"]] == ids


def test_rollout_detail_with_groups_figures_and_transitions(api: Api):
    r = api.get(f"/rollouts/{PLANT}")
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["id"], d["state"], d["reason"], d["control"]) == (PLANT, "RUNNING", "", 3)
    assert (d["current_group"], d["require_approval"], d["schema_id"]) == ("canary", True, SCHEMA)
    assert d["summary"]["in_trial"] == 4
    canary = d["groups"][0]
    assert (canary["name"], canary["status"], canary["devices"]) == ("canary", "SOAKING", 4)
    assert datetime.fromisoformat(canary["soak_started"]) == _ts(T0 + 3 * MIN)
    assert datetime.fromisoformat(canary["deadline"]) == _ts(T0 + 63 * MIN)
    assert canary["figures"]["delivery"]["trial_reached"] == 4
    assert canary["figures"]["delivery_verdict"] == "pass"
    assert [g["status"] for g in d["groups"][1:]] == ["SCHEDULED"] * (len(d["groups"]) - 1)
    assert all(g["figures"] is None for g in d["groups"][1:])
    steps = [(t["scope"], t["name"], t["from_state"], t["to_state"]) for t in d["transitions"]]
    assert steps == [
        ("rollout", "rollout", "READY", "AWAITING_APPROVAL"),
        ("rollout", "rollout", "AWAITING_APPROVAL", "RUNNING"),
        ("group", "canary", "SCHEDULED", "RUNNING"),
        ("group", "canary", "RUNNING", "SOAKING"),
    ]
    assert d["transitions"][1]["actor"] == "alice"
    assert d["transitions"][3]["figures"]["delivery"]["size"] == 4
    assert all(t["id"] > 0 for t in d["transitions"])


def test_unknown_rollout_is_404(api: Api):
    r = api.get("/rollouts/nope")
    assert r.status_code == 404
    assert r.json()["detail"] == "no rollout 'nope'"


def test_unreadable_stored_state_is_shown_without_counts(api: Api):
    broken = RolloutRecord(
        "broken", "plant", SCHEMA, 4, 5, "retrain", "PAUSED", _ts(T0), _ts(T0), "{}"
    )
    api.registry.save_rollout(broken)
    listed = api.get("/rollouts", params={"state": "PAUSED"}).json()["items"]
    assert [(i["id"], i["summary"]) for i in listed] == [("broken", None)]
    d = api.get("/rollouts/broken").json()
    assert (d["summary"], d["groups"], d["control"], d["current_group"]) == (None, [], None, None)


def test_candidates_lists_candidate_parameter_sets(api: Api):
    r = api.get("/candidates")
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [(i["version"], i["status"], i["source"]) for i in items] == [
        (5, "candidate", "recalibration")
    ]
    assert "blob" not in items[0]
    assert api.get("/candidates", params={"schema_id": "ff" * 8}).json()["items"] == []


def test_openapi_lists_the_rollout_routes(api: Api):
    paths = api.client.get("/openapi.json").json()["paths"]
    for path, methods in [
        ("/rollouts", {"get"}),
        ("/rollouts/{rollout_id}", {"get"}),
        ("/rollouts/{rollout_id}/approve", {"post"}),
        ("/rollouts/{rollout_id}/pause", {"post"}),
        ("/rollouts/{rollout_id}/resume", {"post"}),
        ("/rollouts/{rollout_id}/rollback", {"post"}),
        ("/candidates", {"get", "post"}),
    ]:
        assert set(paths[API + path]) == methods, path


# --------------------------------------------------------------------------------------------
# actions

ACTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", f"/rollouts/{PLANT}/approve", {}),
    ("POST", f"/rollouts/{PLANT}/pause", {"json": {"reason": "r"}}),
    ("POST", f"/rollouts/{PLANT}/resume", {}),
    ("POST", f"/rollouts/{PLANT}/rollback", {"json": {"reason": "r"}}),
    ("POST", "/candidates", {"json": {"fleet": "plant", "kind": "retrain"}}),
    ("POST", "/candidates", {"json": {"kind": "nonsense"}}),  # auth before validation
]
READS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/rollouts", {}),
    ("GET", f"/rollouts/{PLANT}", {}),
    ("GET", "/candidates", {}),
]


def test_actions_call_the_operations_as_the_token_and_return_the_view(api: Api):
    actions: list[tuple[str, dict[str, Any]]] = [
        ("approve", {}),
        ("pause", {"json": {"reason": "flaky sensor"}}),
        ("pause", {}),
        ("resume", {}),
        ("rollback", {"json": {"reason": "bad canary"}}),
        ("rollback", {"json": {}}),
    ]
    for path, kw in actions:
        r = api.post(f"/rollouts/{PLANT}/{path}", **kw)
        assert r.status_code == 200, (path, r.text)
    r = api.post(f"/rollouts/{LAB}/approve", role="admin")  # admins include operators
    assert r.status_code == 200, r.text
    assert api.ops.calls == [
        ("approve", PLANT, "operator-1"),
        ("pause", PLANT, "operator-1", "flaky sensor"),
        ("pause", PLANT, "operator-1", "operator"),
        ("resume", PLANT, "operator-1"),
        ("rollback", PLANT, "operator-1", "bad canary"),
        ("rollback", PLANT, "operator-1", "operator"),
        ("approve", LAB, "admin-1"),
    ]
    view = r.json()
    assert (view["id"], view["fleet"], view["kind"], view["state"]) == (
        PLANT,
        "plant",
        "recalibration",
        "RUNNING",
    )
    assert view["control"] == 3
    assert view["summary"]["in_trial"] == 4
    assert [g["name"] for g in view["groups"]] == ["canary", "wave-1", "wave-2", "wave-3"]
    assert view["groups"][0]["figures"]["delivery_verdict"] == "pass"


def test_propose_passes_the_body_and_returns_the_proposal(api: Api):
    r = api.post(
        "/candidates",
        json={"fleet": "plant", "kind": "recalibration", "devices": ["d01", "d02"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["kind"], body["fleet"], body["accepted"], body["refused"]) == (
        "recalibration",
        "plant",
        {"d01": 7},
        {"d02": "x"},
    )
    assert body["rollout"]["id"] == PLANT
    assert body["seconds"] == 0.5
    api.post("/candidates", json={"fleet": "plant", "kind": "retrain", "auto_approve": True})
    api.post("/candidates", json={"fleet": "lab", "kind": "parameter_set", "version": 9})
    assert api.ops.calls == [
        ("propose", "plant", "recalibration", "operator-1", ["d01", "d02"], None, False),
        ("propose", "plant", "retrain", "operator-1", None, None, True),
        ("propose", "lab", "parameter_set", "operator-1", None, 9, False),
    ]


def test_a_proposal_without_rollout_is_null(api: Api):
    api.ops.proposal = Proposal("retrain", "plant", None, {}, {"*": "worse than deployed"}, 1.0)
    r = api.post("/candidates", json={"fleet": "plant", "kind": "retrain"})
    assert r.status_code == 200, r.text
    assert r.json()["rollout"] is None
    assert r.json()["refused"] == {"*": "worse than deployed"}


@pytest.mark.parametrize(
    ("error", "code", "detail"),
    [
        (UnknownRolloutError("no rollout 'x'"), 404, "no rollout 'x'"),
        (KeyError("x"), 404, "x"),
        (IllegalTransitionError("cannot approve rollout x in state RUNNING"), 409,
         "cannot approve rollout x in state RUNNING"),
        (RolloutConflictError("fleet plant already has rollout y"), 409,
         "fleet plant already has rollout y"),
        (ProposalError("no device of fleet 'plant' is drifting"), 409,
         "no device of fleet 'plant' is drifting"),
        (concurrent.futures.TimeoutError(), 503,
         "the rollout worker is busy and did not answer in time; try again"),
    ],
)  # fmt: skip
def test_operation_errors_map_to_statuses(api: Api, error: BaseException, code: int, detail: str):
    api.ops.error = error
    for method, path, kw in ACTIONS[:-1]:
        r = api.call(method, path, **kw)
        assert (r.status_code, r.json()) == (code, {"detail": detail}), path


def test_actions_without_operations_are_503(api: Api):
    api.client.app.state.ctx.operations = None  # type: ignore[attr-defined]
    for method, path, kw in ACTIONS[:-1]:
        r = api.call(method, path, **kw)
        assert (r.status_code, r.json()) == (503, {"detail": UPDATES_DISABLED}), path
    assert api.get("/rollouts").status_code == 200  # reads need no operations
    assert api.get(f"/rollouts/{PLANT}").status_code == 200


# --------------------------------------------------------------------------------------------
# validation: 422 naming the field, nothing called


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"kind": "retrain"}, ["body", "fleet"]),
        ({"fleet": "", "kind": "retrain"}, ["body", "fleet"]),
        ({"fleet": "plant", "kind": "finetune"}, ["body", "kind"]),
        ({"fleet": "plant", "kind": "parameter_set"}, ["body", "version"]),
        ({"fleet": "plant", "kind": "parameter_set", "version": -1}, ["body", "version"]),
        ({"fleet": "plant", "kind": "retrain", "version": 3}, ["body", "version"]),
        ({"fleet": "plant", "kind": "retrain", "devices": ["d1"]}, ["body", "devices"]),
        ({"fleet": "plant", "kind": "recalibration", "devices": []}, ["body", "devices"]),
        ({"fleet": "plant", "kind": "recalibration", "devices": [""]}, ["body", "devices", 0]),
        ({"fleet": "plant", "kind": "retrain", "auto_approve": "maybe"}, ["body", "auto_approve"]),
        ({"fleet": "plant", "kind": "retrain", "force": True}, ["body", "force"]),
    ],
)
def test_invalid_proposal_is_422_naming_the_field(api: Api, body: dict[str, Any], loc: list[Any]):
    api.get("/rollouts", role="operator")  # the token's last_used is written now (once a minute)
    before = api.snapshot()
    r = api.post("/candidates", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [loc]
    assert api.ops.calls == []
    assert api.snapshot() == before


def test_invalid_action_input_is_422(api: Api):
    api.get("/rollouts", role="operator")
    api.get("/rollouts", role="viewer")
    before = api.snapshot()
    r = api.post(f"/rollouts/{PLANT}/pause", json={"reason": ""})
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "reason"]]
    r = api.post(f"/rollouts/{PLANT}/rollback", json={"reason": "x", "mark_bad": False})
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "mark_bad"]]
    r = api.post(f"/rollouts/{'x' * 200}/approve")
    assert [e["loc"] for e in r.json()["detail"]] == [["path", "rollout_id"]]
    r = api.get("/rollouts", role="viewer", params={"state": "DONE"})
    assert [e["loc"] for e in r.json()["detail"]] == [["query", "state"]]
    assert api.ops.calls == []
    assert api.snapshot() == before


# --------------------------------------------------------------------------------------------
# authentication and roles: refused calls reach nothing and change nothing


@pytest.mark.parametrize("token", [None, "not-a-token", "x" * 5000])
def test_missing_or_bad_token_is_401_and_changes_nothing(api: Api, token: str | None):
    before = api.snapshot()
    for method, path, kw in ACTIONS + READS:
        r = api.call(method, path, role=token, **kw)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.ops.calls == []
    assert api.snapshot() == before


def test_revoked_operator_token_is_401(api: Api):
    api.registry.revoke_token("operator-1", actor="test")
    before = api.snapshot()
    for method, path, kw in ACTIONS:
        assert api.call(method, path, **kw).status_code == 401, path
    assert api.ops.calls == []
    assert api.snapshot() == before


def test_viewer_is_403_on_actions_and_changes_nothing(api: Api):
    assert api.get("/rollouts").status_code == 200  # last_used written now, not by the refusals
    before = api.snapshot()
    for method, path, kw in ACTIONS:
        r = api.call(method, path, role="viewer", **kw)
        assert r.status_code == 403, (path, r.text)
        assert "role viewer" in r.json()["detail"]
    assert api.ops.calls == []
    assert api.snapshot() == before
