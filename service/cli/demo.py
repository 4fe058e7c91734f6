"""``tinydrift demo``: the closed loop (drift → detection → signed update → recovery) on an
embedded broker, nothing to set up. The scenario and its settings: :mod:`service.demo`."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from service.demo import run_demo


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0f}" if x.is_integer() and abs(x) >= 1 else f"{x:.3f}"
    return str(x)


def summary_tables(s: dict[str, Any]) -> list[Table]:
    """The human-readable summary: drift, accuracy, rollouts, checks."""
    d = s["drift"]
    drift = Table(title="Drift", title_justify="left", show_header=True)
    for col in ("kind", "injected", "detected", "median delay (readings)"):
        drift.add_column(col, justify="right" if col != "kind" else "left")
    for kind in ("gain", "concept"):
        k = d[kind]
        drift.add_row(
            kind, str(k["injected"]), str(k["detected"]), _fmt(k["median_delay_readings"])
        )
    drift.add_row(
        "all",
        str(len(d["injected_devices"])),
        str(len(d["detected_devices"])),
        _fmt(d["median_delay_readings"]),
    )
    drift.caption = (
        f"false-alarm devices: {len(d['false_alarm_devices'])} "
        f"{', '.join(d['false_alarm_devices'])}; missed: {', '.join(d['missed_devices']) or 'none'}"
    )
    a = s["accuracy"]
    acc = Table(title="Accuracy of the recalibrated devices (from labels)", title_justify="left")
    for col in ("before drift", "during drift (v1)", "after update"):
        acc.add_column(col, justify="right")
    if "before_drift" in a:
        n = a["labels"]
        acc.add_row(
            f"{_fmt(a['before_drift'])} ({n['before_drift']})",
            f"{_fmt(a['during_drift'])} ({n['during_drift']})",
            f"{_fmt(a['after_update'])} ({n['after_update']})",
        )
        c = a["concept_devices"]
        acc.caption = (
            f"(in brackets: labels) concept-drift devices {_fmt(c['before_drift'])} → "
            f"{_fmt(c['during_drift'])} (not answered by a recalibration); stable devices "
            f"{_fmt(a['stable_devices'])}"
        )
    ro = Table(title="Rollouts", title_justify="left")
    for col in ("candidate", "kind", "outcome", "devices", "canary gate (canary vs control)"):
        ro.add_column(col)
    for r in s["rollouts"]:
        gate = next((g for g in r["gates"] if g["group"] == "canary"), None)
        figures = "-"
        if gate is not None:
            err = next((c for c in gate["checks"] if c["metric"] == "error_rate"), None)
            figures = gate["verdict"]
            if "canary" in gate:
                figures = (
                    f"error {_fmt(gate['canary']['error_rate'])} vs "
                    f"{_fmt(gate['control']['error_rate'])} → {gate['verdict']}"
                )
            if err is not None:
                figures += f" (Δ {err['delta']:+.3f}, margin {err['margin']:g})"
        ro.add_row(
            r["candidate"],
            r["kind"],
            r["outcome"],
            f"{r['confirmed']} confirmed"
            + (f", {r['rolled_back']} reverted" if r["rolled_back"] else ""),
            figures,
        )
    checks = Table(title="Checks", title_justify="left")
    checks.add_column("check")
    checks.add_column("")
    checks.add_column("detail")
    for c in s["checks"]:
        checks.add_row(
            c["check"], "[green]ok[/green]" if c["ok"] else "[red]FAILED[/red]", c["detail"]
        )
    return [drift, acc, ro, checks]


def demo(
    devices: Annotated[int, typer.Option(min=10, max=2000, help="Simulated devices.")] = 50,
    seed: Annotated[int, typer.Option(help="Same seed: same drifting devices, same data.")] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Summary as JSON on stdout (progress on stderr).")
    ] = False,
    log_level: Annotated[str, typer.Option(help="Service log level shown.")] = "warning",
) -> None:
    """Drift on a simulated fleet → detection → a recalibration promoted and a bad candidate
    rolled back through the operator API → accuracy recovers. Exits 1 if the loop did not close."""
    console = Console(stderr=True)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    result = run_demo(devices=devices, seed=seed, console=console)
    s = result.summary
    if json_out:
        typer.echo(json.dumps(s, indent=2))
    else:
        out = Console()
        out.print(
            f"\n{s['devices']} devices sent {s['readings']:,} readings ({s['labels']:,} labelled) "
            f"through {s['broker']} in {s['wall_s']} s; rejected messages: "
            f"{s['rejected_messages'] or 'none'}"
        )
        for table in summary_tables(s):
            out.print(table)
    for p in result.problems:
        console.print(f"[red]problem:[/red] {p}")
    raise typer.Exit(0 if result.ok else 1)
