"""``tinydrift demo``: the whole device contract on an embedded broker, no set-up needed."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from service.demo import run_demo


def demo(
    devices: Annotated[int, typer.Option(min=2, max=2000, help="Simulated devices.")] = 20,
    seed: Annotated[int, typer.Option(help="Makes the run reproducible.")] = 0,
    duration: Annotated[float, typer.Option(min=20.0, help="Seconds to run.")] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Run a simulated fleet with injected drift and one signed update, then summarise."""
    console = Console(stderr=True)
    result = run_demo(devices=devices, seed=seed, duration=duration, console=console)
    s = result.summary
    if json_out:
        typer.echo(json.dumps(s, indent=2))
    else:
        acc = s["accuracy"]
        typer.echo(
            f"{s['devices']} devices sent {s['readings']} readings "
            f"({s['labels']} labelled) through {s['broker']}."
        )
        typer.echo(
            f"accuracy from labels: stable devices {acc['stable_devices']}, "
            f"devices with injected gain drift {acc['drifting_devices']}"
        )
        u = s["update"]
        typer.echo(f"signed update v{u['version']} to {u['device']}: {' → '.join(u['acks'])}")
    for p in result.problems:
        console.print(f"[red]problem:[/red] {p}")
    raise typer.Exit(0 if result.ok else 1)
