"""The ``tinydrift`` command line: one Typer app with a sub-app per concern."""

from __future__ import annotations

import typer

from service.cli import api_token, blob, candidate, credentials, demo, device, keys, rollout, serve

app = typer.Typer(
    name="tinydrift",
    help="Model-drift monitoring and signed parameter-only updates for tinyML fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(blob.app, name="blob")
app.command("device")(device.device)
app.command("fleet-sim")(device.fleet_sim)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)
app.add_typer(serve.registry_app, name="registry")
app.add_typer(device.firmware_app, name="firmware")
app.add_typer(api_token.app, name="api-token")
app.add_typer(rollout.app, name="rollout")
app.add_typer(candidate.app, name="candidate")
app.add_typer(credentials.app, name="credentials")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # ``python -m service.cli.app`` (benchmarks run a worktree's code)
    main()
