"""``tinydrift rollout …`` and ``tinydrift candidate …`` against the API served over real HTTP.

The API (``ApiServer`` on a free port, a real SQLite registry with stored rollouts) hosts the
recording operations of :mod:`tests.unit.test_api_rollouts`: the CLI's requests, its tables, its
``--json`` output, and its one-line errors (exit code 1) for every refusal are checked.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from service.api import create_app
from service.api.deps import ApiContext
from service.api.server import ApiServer
from service.cli.app import app as cli_app
from service.config import SettingsError
from service.registry.store import Registry
from service.rollout.controller import IllegalTransitionError
from service.rollout.proposals import Proposal
from service.rollout.reconciler import UnknownRolloutError
from tests.unit.test_api_rollouts import (
    LAB,
    PLANT,
    UPDATES_DISABLED,
    RecordingOperations,
    proposal_of,
    seed,
    soaking_rollout,
    view_of,
)

CREATE_TOKEN = "`tinydrift api-token create --name NAME --role operator`"


@dataclass
class Served:
    """The API on a free port over a seeded registry; ``run`` invokes the CLI against it."""

    url: str
    tokens: dict[str, str]
    ops: RecordingOperations
    ctx: ApiContext

    def run(self, *args: str, role: str | None = "operator", **env: str) -> Result:
        token = [] if role is None else ["--token", self.tokens.get(role, role)]
        return CliRunner().invoke(
            cli_app, [*args, "--api", self.url, *token], env={"COLUMNS": "200", **env}
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-rollout') / 'registry.db'}"
    reg = Registry(url)
    tokens = seed(reg)
    ops = RecordingOperations(view_of(soaking_rollout()[0]))
    app = create_app(reg, operations=ops)
    api = ApiServer(app, "127.0.0.1", 0)
    port = api.start()
    try:
        yield Served(f"http://127.0.0.1:{port}", tokens, ops, app.state.ctx)
    finally:
        api.stop()
        reg.close()


@pytest.fixture
def served(server: Served) -> Iterator[Served]:
    """The module's server with fresh recordings and its operations in place."""
    ops = server.ops
    ops.calls.clear()
    ops.error = None
    ops.proposal = proposal_of(ops.answer)
    server.ctx.operations = ops
    yield server
    server.ctx.operations = ops


def one_error_line(result: Result) -> str:
    """The failure's stderr: exactly one line ``error: …``; exit code 1, nothing on stdout."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------------------------
# reads


def test_list_shows_rollouts_with_counts(served: Served):
    result = served.run("rollout", "list", role="viewer")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    lab = next(line for line in lines if LAB in line)
    plant = next(line for line in lines if PLANT in line)
    assert lines.index(lab) < lines.index(plant)  # newest first
    assert "AWAITING_APPROVAL" in lab
    assert "RUNNING" in plant
    assert "v4 → v5" in plant
    assert "0/4/0/0" in plant  # confirmed / trial / failed / pending
    assert "0/0/0/0" in lab


def test_list_filters_and_json(served: Served):
    result = served.run("rollout", "list", "--fleet", "plant", "--json", role="viewer")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [i["id"] for i in body["items"]] == [PLANT]
    assert body["items"][0]["summary"]["in_trial"] == 4
    result = served.run("rollout", "list", "--state", "awaiting_approval", "--json")
    assert [i["id"] for i in json.loads(result.stdout)["items"]] == [LAB]
    empty = served.run("rollout", "list", "--fleet", "nowhere")
    assert (empty.exit_code, empty.stdout) == (0, "no rollouts of fleet nowhere\n")
    bad = served.run("rollout", "list", "--state", "done")
    assert one_error_line(bad).startswith("the API refused the request: state: Input should be")


def test_show_gives_groups_gate_figures_and_transitions(served: Served):
    result = served.run("rollout", "show", PLANT, role="viewer")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"rollout {PLANT} (plant, recalibration): RUNNING" in out
    assert "v4 → v5" in out
    assert "devices: 0 confirmed, 4 in trial, 0 failed, 0 pending, 0 rolled back; control 3" in out
    canary = next(line for line in out.splitlines() if "canary" in line and "SOAKING" in line)
    assert "delivery pass (4/4 in trial, 0 errors, 0 pending)" in canary
    assert "AWAITING_APPROVAL → RUNNING" in out
    assert "alice" in out
    as_json = json.loads(served.run("rollout", "show", PLANT, "--json").stdout)
    assert as_json["transitions"][-1]["to_state"] == "SOAKING"
    missing = served.run("rollout", "show", "nope")
    assert one_error_line(missing) == "no rollout 'nope'"


def test_candidate_list(served: Served):
    result = served.run("candidate", "list", role="viewer")
    assert result.exit_code == 0, result.output
    assert "recalibration" in result.stdout
    assert json.loads(served.run("candidate", "list", "--json").stdout)["items"][0]["version"] == 5


# --------------------------------------------------------------------------------------------
# actions


def test_actions_reach_the_operations_and_print_the_view(served: Served):
    for args in [
        ("approve", PLANT),
        ("pause", PLANT, "--reason", "flaky sensor"),
        ("resume", PLANT),
        ("rollback", PLANT),
    ]:
        result = served.run("rollout", *args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout.startswith(f"{args[0]}: rollout {PLANT} (plant, recalibration)")
        assert "control 3 (3 untouched)" in result.stdout
    assert served.ops.calls == [
        ("approve", PLANT, "operator-1"),
        ("pause", PLANT, "operator-1", "flaky sensor"),
        ("resume", PLANT, "operator-1"),
        ("rollback", PLANT, "operator-1", "operator"),
    ]
    as_json = served.run("rollout", "rollback", LAB, "--reason", "wrong set", "--json")
    assert json.loads(as_json.stdout)["state"] == "RUNNING"
    assert served.ops.calls[-1] == ("rollback", LAB, "operator-1", "wrong set")


def test_propose_sends_the_options_and_shows_the_decisions(served: Served):
    result = served.run(
        "candidate", "propose", "--fleet", "plant", "--kind", "recalibration",
        "--device", "d01", "--device", "d02",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("recalibration for fleet plant: 1 accepted, 1 refused")
    assert "accepted: v7" in out
    assert "refused: x" in out
    assert f"proposed: rollout {PLANT}" in out
    served.run("candidate", "propose", "--fleet", "lab", "--kind", "parameter_set",
               "--version", "9", "--auto-approve")  # fmt: skip
    assert served.ops.calls == [
        ("propose", "plant", "recalibration", "operator-1", ["d01", "d02"], None, False),
        ("propose", "lab", "parameter_set", "operator-1", None, 9, True),
    ]


def test_propose_without_a_rollout_and_json(served: Served):
    served.ops.proposal = Proposal("retrain", "plant", None, {}, {"*": "worse than deployed"}, 2)
    result = served.run("candidate", "propose", "--fleet", "plant", "--kind", "retrain")
    assert result.exit_code == 0, result.output
    assert "refused: worse than deployed" in result.stdout
    assert "no rollout proposed" in result.stdout
    result = served.run("candidate", "propose", "--fleet", "plant", "--kind", "retrain", "--json")
    assert json.loads(result.stdout)["rollout"] is None


def test_environment_gives_url_and_token(served: Served):
    result = CliRunner().invoke(
        cli_app,
        ["rollout", "approve", LAB],
        env={"TINYDRIFT_API_URL": served.url, "TINYDRIFT_API_TOKEN": served.tokens["operator"]},
    )
    assert result.exit_code == 0, result.output
    assert served.ops.calls == [("approve", LAB, "operator-1")]


# --------------------------------------------------------------------------------------------
# failures: one line naming the fix, exit code 1


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (IllegalTransitionError("cannot approve rollout x in state RUNNING"),
         "cannot approve rollout x in state RUNNING"),
        (UnknownRolloutError("no rollout 'x'"), "no rollout 'x'"),
        (TimeoutError(), "the rollout worker is busy and did not answer in time; try again"),
    ],
)  # fmt: skip
def test_operation_errors_are_the_servers_detail(served: Served, error: Exception, message: str):
    served.ops.error = error
    assert one_error_line(served.run("rollout", "approve", "x")) == message
    propose = served.run("candidate", "propose", "--fleet", "plant", "--kind", "retrain")
    assert one_error_line(propose) == message


def test_updates_disabled(served: Served):
    served.ctx.operations = None
    assert one_error_line(served.run("rollout", "approve", PLANT)) == UPDATES_DISABLED


def test_refused_token(served: Served):
    before = list(served.ops.calls)
    for role in ("not-a-token", "x" * 300):
        line = one_error_line(served.run("rollout", "approve", PLANT, role=role))
        assert line == f"the API refused the token: create one with {CREATE_TOKEN}"
        assert one_error_line(served.run("rollout", "list", role=role)) == line
    viewer = one_error_line(served.run("rollout", "pause", PLANT, role="viewer"))
    assert viewer.startswith("token 'viewer-1' has role viewer; this needs operator or above")
    assert CREATE_TOKEN in viewer
    assert served.ops.calls == before


def test_missing_token(served: Served, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TINYDRIFT_API_TOKEN", raising=False)
    line = one_error_line(served.run("rollout", "list", role=None))
    assert line.startswith("no API token: pass --token or set TINYDRIFT_API_TOKEN")


def test_validation_errors_name_the_field(served: Served):
    result = served.run("candidate", "propose", "--fleet", "plant", "--kind", "parameter_set")
    assert one_error_line(result) == (
        "the API refused the request: version: a parameter_set proposal needs the version"
    )
    assert served.ops.calls == []
    usage = served.run("candidate", "propose", "--fleet", "plant", "--kind", "finetune")
    assert usage.exit_code == 2  # Typer's own usage error, before any request


def test_no_server_at_the_url(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    url = f"http://127.0.0.1:{port}"
    for args in (["rollout", "list"], ["rollout", "approve", "r"],
                 ["candidate", "propose", "--fleet", "f", "--kind", "retrain"]):  # fmt: skip
        result = CliRunner().invoke(cli_app, [*args, "--api", url, "--token", "t"])
        assert one_error_line(result) == (
            f"no tinydrift API at {url}: is `tinydrift serve` running with --api-port?"
        )
    bad = CliRunner().invoke(cli_app, ["rollout", "list", "--api", "host:8080", "--token", "t"])
    assert one_error_line(bad) == "--api must be http://HOST:PORT (or https://…), got 'host:8080'"


# --------------------------------------------------------------------------------------------
# tinydrift serve: the update flags


def _serve(*args: str, db: str) -> Any:
    return CliRunner().invoke(
        cli_app,
        ["serve", "--db", db, "--api-port", "0", "--metrics-port", "0", "--duration", "0", *args],
    )


def test_serve_refuses_a_missing_key_file_in_one_line(tmp_path: Path, sqlite_url: str):
    missing = tmp_path / "release.key"
    result = _serve("--release-key", str(missing), "--deploy-key", str(missing), db=sqlite_url)
    line = one_error_line(result)
    assert line.startswith(f"cannot load the release key {missing}: ")
    assert line.endswith("(create one with `tinydrift keys generate`)")
    half = _serve("--release-key", str(missing), db=sqlite_url)
    assert one_error_line(half) == (
        "updates need both --release-key and --deploy-key (or neither: monitor only)"
    )


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--update-policy", "sometimes"], "update_policy"),
        (["--canary-size", "0"], "canary_size"),
        (["--control-size", "-1"], "control_size"),
        (["--min-soak-s", "-5"], "min_soak_s"),
        (["--max-soak-s", "0"], "max_soak_s"),
        (["--rollout-tick-s", "0"], "rollout_tick_s"),
        (["--policy-interval-s", "0"], "policy_interval_s"),
    ],
)
def test_serve_update_flags_are_validated_as_settings(
    args: list[str], setting: str, sqlite_url: str
):
    assert one_error_line(_serve(*args, db=sqlite_url)).startswith(f"setting {setting}: ")


def test_serve_update_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from service.cli import serve as serve_cli

    seen: dict[str, Any] = {}

    def load(config: Path | None, **flags: Any) -> Any:
        seen.update(flags)
        raise SettingsError("stop here")

    monkeypatch.setattr(serve_cli, "load_settings", load)
    key = tmp_path / "k"
    result = CliRunner().invoke(
        cli_app,
        ["serve", "--release-key", str(key), "--deploy-key", str(key), "--update-policy", "auto",
         "--canary-size", "3", "--control-size", "2", "--min-soak-s", "60", "--max-soak-s",
         "600", "--rollout-tick-s", "0.5", "--policy-interval-s", "10"],
    )  # fmt: skip
    assert one_error_line(result) == "stop here"
    assert {k: seen[k] for k in (
        "release_key", "deploy_key", "update_policy", "canary_size", "control_size",
        "min_soak_s", "max_soak_s", "rollout_tick_s", "policy_interval_s",
    )} == {
        "release_key": key, "deploy_key": key, "update_policy": "auto", "canary_size": 3,
        "control_size": 2, "min_soak_s": 60.0, "max_soak_s": 600.0, "rollout_tick_s": 0.5,
        "policy_interval_s": 10.0,
    }  # fmt: skip
