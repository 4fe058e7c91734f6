"""``tinydrift keys``: create Ed25519 key pairs for blobs (release) and manifests (deploy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent.blob import KeyFileError, generate_key, write_keypair
from service.cli.errors import fail

app = typer.Typer(help="Signing keys.", no_args_is_help=True)


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for NAME.key and NAME.pub.")],
    name: Annotated[str, typer.Option(help="File stem; 'release' signs blobs.")] = "release",
) -> None:
    """Write a new private key (mode 0600) and its public key beside it."""
    key = generate_key()
    try:
        private, public = write_keypair(key, out, name)
    except KeyFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write keys into {out}: {exc.strerror}")
    typer.echo(
        f"private key {private} (0600)\npublic key  {public}\nkey_id      {key.key_id:#010x}"
    )
