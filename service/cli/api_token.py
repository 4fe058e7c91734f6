"""``tinydrift api-token create|list|revoke``: operator API tokens, straight in the registry.

This is how a fresh deployment gets its first admin token (the API itself needs one to create
more). The secret is printed once, alone on stdout (``TOKEN=$(tinydrift api-token create …)``);
only its SHA-256 is stored. Creating and revoking are audited with actor ``cli:<OS user>``.
"""

from __future__ import annotations

import getpass
from typing import Annotated

import typer

from service.cli.errors import fail
from service.registry.errors import RegistryError
from service.registry.records import ROLES, Role
from service.registry.store import Registry

app = typer.Typer(help="Operator API bearer tokens.", no_args_is_help=True)

DbOption = Annotated[
    str,
    typer.Option(
        envvar="TINYDRIFT_DB", help="Registry URL (sqlite:///… or postgresql+psycopg://…)."
    ),
]
NameOption = Annotated[str, typer.Option(help="Token name (the audit log's actor).")]


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _open(db: str) -> Registry:
    try:
        return Registry(db)
    except RegistryError as exc:
        fail(str(exc))


@app.command("create")
def create(
    name: NameOption,
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    db: DbOption = "sqlite:///tinydrift.db",
) -> None:
    """Create a token and print it once (stdout); only its hash is stored."""
    if role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    checked: Role = ROLES[ROLES.index(role)]
    with _open(db) as reg:
        try:
            record, plaintext = reg.create_token(name, checked, actor=_actor())
        except (RegistryError, ValueError) as exc:
            fail(str(exc))
    typer.echo(
        f"created API token {record.name!r} ({record.role}); it is shown only now:", err=True
    )
    typer.echo(plaintext)


@app.command("list")
def list_tokens(db: DbOption = "sqlite:///tinydrift.db") -> None:
    """List tokens: name, role, created, last used, revoked (never secrets)."""
    with _open(db) as reg:
        try:
            tokens = reg.list_tokens()
        except RegistryError as exc:
            fail(str(exc))
    if not tokens:
        typer.echo("no API tokens (create one: tinydrift api-token create --name … --role admin)")
        return
    for t in tokens:
        used = t.last_used.isoformat(timespec="seconds") if t.last_used else "never"
        state = "revoked" if t.revoked else "active"
        typer.echo(
            f"{t.name}\t{t.role}\t{state}\tcreated {t.created.isoformat(timespec='seconds')}"
            f"\tlast used {used}"
        )


@app.command("revoke")
def revoke(name: NameOption, db: DbOption = "sqlite:///tinydrift.db") -> None:
    """Revoke a token: refused by the API from now on (its name stays taken)."""
    with _open(db) as reg:
        try:
            record = reg.revoke_token(name, actor=_actor())
        except RegistryError as exc:
            fail(str(exc))
    typer.echo(f"revoked API token {record.name!r} ({record.role})")
