"""``tinydrift candidate propose|list``: candidate parameter sets through the operator API.

``propose`` asks a running service to build and judge candidates for a fleet and to propose a
rollout of the accepted ones (``--api``/``--token`` as for ``tinydrift rollout``; an operator
token). ``list`` shows the registered parameter sets whose status is ``candidate``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from service.cli.rollout import (
    DEFAULT_API_URL,
    ApiClient,
    ApiOption,
    JsonOption,
    TokenOption,
    console,
    print_json,
    print_view,
)

app = typer.Typer(
    help="Candidate parameter sets of a running service (through its operator API).",
    no_args_is_help=True,
)


class Kind(StrEnum):
    """What to propose."""

    recalibration = "recalibration"
    retrain = "retrain"
    parameter_set = "parameter_set"


@app.command("propose")
def propose(
    fleet: Annotated[str, typer.Option(help="The fleet to propose a rollout for.")],
    kind: Annotated[
        Kind,
        typer.Option(
            help="recalibration (a set per drifting device), retrain (one set learned on the "
            "fleet's labels) or parameter_set (a registered set: --version)."
        ),
    ],
    device: Annotated[
        list[str] | None,
        typer.Option(help="recalibration: this device instead of every drifting one (repeat)."),
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="parameter_set: the registered version to roll out.")
    ] = None,
    auto_approve: Annotated[
        bool, typer.Option("--auto-approve", help="Start the rollout without waiting.")
    ] = False,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build and judge candidates for a fleet and propose a rollout of the accepted ones."""
    client = ApiClient(api, token)
    body: dict[str, object] = {
        "fleet": fleet,
        "kind": kind.value,
        "auto_approve": auto_approve,
    }
    if device:
        body["devices"] = list(device)
    if version is not None:
        body["version"] = version
    proposal = client.post("/candidates", body)
    if as_json:
        print_json(proposal)
        return
    out = console()
    accepted, refused = proposal["accepted"], proposal["refused"]
    out.print(
        f"{proposal['kind']} for fleet {proposal['fleet']}: {len(accepted)} accepted, "
        f"{len(refused)} refused ({proposal['seconds']:.1f} s)",
        markup=False,
    )
    if accepted or refused:
        table = Table()
        table.add_column("device", overflow="fold")
        table.add_column("decision", overflow="fold")
        for dev, ver in sorted(accepted.items()):
            table.add_row(dev, f"accepted: v{ver}")
        for dev, why in sorted(refused.items()):
            table.add_row(dev, f"refused: {why}")
        out.print(table)
    rollout = proposal.get("rollout")
    if rollout is None:
        out.print("no rollout proposed: no candidate was accepted", markup=False)
        return
    print_view(rollout, "proposed")
    if rollout["state"] == "AWAITING_APPROVAL":
        out.print(f"approve it with: tinydrift rollout approve {rollout['id']}", markup=False)


@app.command("list")
def list_candidates(
    schema_id: Annotated[str | None, typer.Option(help="Only this schema (hex id).")] = None,
    api: ApiOption = DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Registered parameter sets with status ``candidate``."""
    body = ApiClient(api, token).get("/candidates", {"schema_id": schema_id, "limit": 1000})
    if as_json:
        print_json(body)
        return
    if not body["items"]:
        typer.echo("no candidate parameter sets")
        return
    table = Table()
    for name in ("schema", "version", "created", "source", "size", "sha256"):
        table.add_column(name, overflow="fold")
    for p in body["items"]:
        table.add_row(
            p["schema_id"],
            str(p["version"]),
            p["created"][:19].replace("T", " "),
            p["source"],
            str(p["size"]),
            p["sha256"][:16] + "…",
        )
    console().print(table)
