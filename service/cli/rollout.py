"""``tinydrift rollout list|show|approve|pause|resume|rollback``: rollouts through the API.

These commands talk to a running ``tinydrift serve`` over its operator API (``--api``, default
``http://127.0.0.1:8080``, or ``TINYDRIFT_API_URL``) with a bearer token (``--token`` or
``TINYDRIFT_API_TOKEN``; reads need a viewer token, actions an operator token). Output is Rich
tables, or the API's JSON with ``--json``. Every failure is one line on stderr naming the fix,
with exit code 1.

:class:`ApiClient` (also used by ``tinydrift candidate``) makes the requests and turns HTTP and
connection errors into those lines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Final, NoReturn
from urllib.parse import quote, urlparse

import httpx
import typer
from rich.console import Console
from rich.table import Table

from service.cli.errors import fail

app = typer.Typer(
    help="Rollouts of a running service (through its operator API).", no_args_is_help=True
)

DEFAULT_API_URL: Final = "http://127.0.0.1:8080"
API_PREFIX: Final = "/api/v1"
TIMEOUT_S: Final = 120.0
"""How long a request may take (a proposal builds and judges candidates first)."""
CREATE_TOKEN: Final = "`tinydrift api-token create --name NAME --role operator`"

ApiOption = Annotated[
    str,
    typer.Option(
        "--api",
        envvar="TINYDRIFT_API_URL",
        help="Base URL of the service's operator API.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="TINYDRIFT_API_TOKEN",
        help="API bearer token (viewer for reads, operator for actions).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
RolloutId = Annotated[str, typer.Argument(help="Rollout id (see `tinydrift rollout list`).")]
ReasonOption = Annotated[
    str | None, typer.Option(help="Why (recorded with the transition and in the audit log).")
]


class ApiClient:
    """Requests to the operator API; every failure ends the command with one line (exit 1)."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = TIMEOUT_S) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            fail(f"--api must be http://HOST:PORT (or https://…), got {url!r}")
        if not token:
            fail(
                "no API token: pass --token or set TINYDRIFT_API_TOKEN "
                f"(create one with {CREATE_TOKEN})"
            )
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """``GET`` an API path (under ``/api/v1``); the decoded JSON answer."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """``POST`` to an API path with a JSON body; the decoded JSON answer."""
        return self.request("POST", path, body=body)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """One request; HTTP errors and unreachable servers end the command (see the module)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = httpx.request(
                method,
                f"{self.url}{API_PREFIX}{path}",
                params=query,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=self.timeout_s,
            )
        except httpx.ConnectError:
            fail(f"no tinydrift API at {self.url}: is `tinydrift serve` running with --api-port?")
        except httpx.TimeoutException:
            fail(f"the API at {self.url} did not answer within {self.timeout_s:g} s")
        except httpx.HTTPError as exc:
            fail(f"cannot talk to the API at {self.url}: {exc}")
        if response.status_code >= 400:
            self._refused(response)
        try:
            return response.json()
        except ValueError:
            fail(f"unexpected answer from {self.url}: HTTP {response.status_code}, not JSON")

    def _refused(self, response: httpx.Response) -> NoReturn:
        code = response.status_code
        detail = _detail(response)
        if code == 401:
            fail(f"the API refused the token: create one with {CREATE_TOKEN}")
        if code == 403:
            fail(f"{detail} (create an operator token with {CREATE_TOKEN})")
        if code == 422:
            fail(f"the API refused the request: {detail}")
        if code in (404, 409, 503):
            fail(detail)
        fail(f"the API failed (HTTP {code}): {detail}")


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` in one line (validation errors name their fields)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip().splitlines()[0] if response.text.strip() else "no detail"
    if isinstance(detail, list):  # FastAPI's validation errors
        parts = []
        for err in detail:
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
        return "; ".join(parts)
    return str(detail) if detail is not None else f"HTTP {response.status_code}"


# -------------------------------------------------------------------------------------------
# rendering


def console() -> Console:
    """A console on the current stdout (created per command, so redirections are honoured)."""
    return Console(highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    """The API's answer as indented JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _summary_line(summary: Mapping[str, Any] | None, control: int | None = None) -> str:
    if summary is None:
        return "devices: unknown (stored state unreadable)"
    line = (
        f"devices: {summary['confirmed']} confirmed, {summary['in_trial']} in trial, "
        f"{summary['failed']} failed, {summary['pending']} pending, "
        f"{summary['rolled_back']} rolled back"
    )
    if control is not None:
        line += f"; control {control} ({summary['untouched_control']} untouched)"
    return line


def _gates(figures: Mapping[str, Any] | None) -> str:
    """A group's last gate figures in a cell: verdicts, delivery counts, quality checks."""
    if not figures:
        return "-"
    d = figures.get("delivery") or {}
    parts = [
        f"{figures.get('verdict', '?')}: delivery {figures.get('delivery_verdict', '?')} "
        f"({d.get('trial_reached', 0)}/{d.get('size', 0)} in trial, {d.get('errors', 0)} errors, "
        f"{d.get('pending', 0)} pending), health {figures.get('health_verdict', '?')}, "
        f"quality {figures.get('quality_verdict', '?')}"
    ]
    for check in figures.get("checks") or ():
        parts.append(
            f"{check['metric']} Δ {check['delta']:+.4f} (bound {check['bound']:+.4f}, "
            f"margin {check['margin']:g}): {check['verdict']}"
        )
    if figures.get("reason"):
        parts.append(str(figures["reason"]))
    return "\n".join(parts)


def groups_table(groups: Sequence[Mapping[str, Any]]) -> Table:
    """Groups with their status, size and last gate figures."""
    table = Table(title="groups", title_justify="left")
    table.add_column("group")
    table.add_column("status")
    table.add_column("devices", justify="right")
    table.add_column("soak started")
    table.add_column("gates (last evaluation)", overflow="fold")
    for g in groups:
        table.add_row(
            g["name"],
            g["status"],
            str(g["devices"]),
            _time(g.get("soak_started")),
            _gates(g.get("figures")),
        )
    return table


def transitions_table(events: Sequence[Mapping[str, Any]]) -> Table:
    """Stored transitions, oldest first, with the verdict they were decided on."""
    table = Table(title="transitions", title_justify="left")
    table.add_column("time")
    table.add_column("transition", overflow="fold")
    table.add_column("actor", overflow="fold")
    table.add_column("reason", overflow="fold")
    table.add_column("verdict")
    for e in events:
        figures = e.get("figures") or {}
        what = e["name"] if e["scope"] == "group" else "rollout"
        table.add_row(
            _time(e["ts"]),
            f"{what}: {e['from_state']} → {e['to_state']}",
            e["actor"],
            e["reason"] or "-",
            str(figures.get("verdict", "-")),
        )
    return table


def print_view(view: Mapping[str, Any], action: str | None = None) -> None:
    """A rollout's live view (the answer to an action)."""
    out = console()
    head = f"rollout {view['id']} ({view['fleet']}, {view['kind']}): {view['state']}"
    if action:
        head = f"{action}: {head}"
    if view.get("reason"):
        head += f" — {view['reason']}"
    out.print(head, markup=False)
    out.print(_summary_line(view.get("summary"), view.get("control")), markup=False)
    out.print(groups_table(view.get("groups") or []))


# -------------------------------------------------------------------------------------------
# commands


@app.command("list")
def list_rollouts(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet's rollouts.")] = None,
    state: Annotated[
        str | None, typer.Option(help="Only rollouts in this state (e.g. RUNNING).")
    ] = None,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rollouts, newest first, with their device counts."""
    client = ApiClient(api, token)
    body = client.get(
        "/rollouts", {"fleet": fleet, "state": state.upper() if state else None, "limit": 1000}
    )
    if as_json:
        print_json(body)
        return
    items = body["items"]
    if not items:
        typer.echo("no rollouts" + (f" of fleet {fleet}" if fleet else ""))
        return
    table = Table()
    table.add_column("id", overflow="fold")
    table.add_column("fleet", overflow="fold")
    table.add_column("kind", overflow="fold")
    table.add_column("state", overflow="fold")
    table.add_column("version")
    table.add_column("confirmed / trial / failed / pending", justify="right")
    table.add_column("updated")
    for r in items:
        s = r.get("summary")
        counts = (
            "/".join(str(s[k]) for k in ("confirmed", "in_trial", "failed", "pending"))
            if s is not None
            else "?"
        )
        table.add_row(
            r["id"],
            r["fleet"],
            r["kind"],
            r["state"],
            f"v{r['from_version']} → v{r['to_version']}",
            counts,
            _time(r["updated"]),
        )
    console().print(table)


@app.command("show")
def show(
    rollout_id: RolloutId,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One rollout: device counts, groups with their gate figures, transitions."""
    body = ApiClient(api, token).get(f"/rollouts/{quote(rollout_id, safe='')}")
    if as_json:
        print_json(body)
        return
    out = console()
    head = f"rollout {body['id']} ({body['fleet']}, {body['kind']}): {body['state']}"
    if body.get("reason"):
        head += f" — {body['reason']}"
    out.print(head, markup=False)
    out.print(
        f"v{body['from_version']} → v{body['to_version']} (schema {body['schema_id']}); "
        f"created {_time(body['created'])}, updated {_time(body['updated'])}"
        + (f"; current group {body['current_group']}" if body.get("current_group") else ""),
        markup=False,
    )
    out.print(_summary_line(body.get("summary"), body.get("control")), markup=False)
    out.print(groups_table(body["groups"]))
    out.print(transitions_table(body["transitions"]))


def _act(
    action: str, rollout_id: str, api: str, token: str | None, as_json: bool, reason: str | None
) -> None:
    client = ApiClient(api, token)
    body = {"reason": reason} if reason else None
    view = client.post(f"/rollouts/{quote(rollout_id, safe='')}/{action}", body)
    if as_json:
        print_json(view)
    else:
        print_view(view, action)


@app.command("approve")
def approve(
    rollout_id: RolloutId,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a rollout awaiting approval: the canary starts."""
    _act("approve", rollout_id, api, token, as_json, None)


@app.command("pause")
def pause(
    rollout_id: RolloutId,
    reason: ReasonOption = None,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pause a running rollout: no gate decisions, no new groups until resumed."""
    _act("pause", rollout_id, api, token, as_json, reason)


@app.command("resume")
def resume(
    rollout_id: RolloutId,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a paused rollout."""
    _act("resume", rollout_id, api, token, as_json, None)


@app.command("rollback")
def rollback(
    rollout_id: RolloutId,
    reason: ReasonOption = None,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Roll a rollout back: devices return to the previous parameters; the new set is bad."""
    _act("rollback", rollout_id, api, token, as_json, reason)
