"""``tinydrift firmware``, ``device``, ``fleet-sim``: simulated devices against a real broker."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer
from rich.console import Console

from edge_agent.blob import KeyFileError
from edge_agent.device.agent import AgentConfig, EdgeAgent
from edge_agent.device.device_loop import DeviceLoop
from edge_agent.device.firmware import RELEASE_PUB, Firmware, FirmwareBundleError
from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from edge_agent.device.simulator import DRIFT_KINDS, DriftKind, DriftSpec, SensorSimulator
from edge_agent.device.update_machine import UpdateMachine
from edge_agent.wire.errors import WireError
from edge_agent.wire.topics import validate_id
from service.cli.errors import fail

firmware_app = typer.Typer(help="Simulated device builds (keys, factory model).")
# soft_wrap: a status line stays one line in logs; no markup/highlighting of broker errors
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


@dataclass(frozen=True)
class BrokerAddress:
    """Host and port parsed from ``mqtt://HOST:PORT``."""

    host: str
    port: int


def parse_broker(url: str) -> BrokerAddress:
    """Parse ``mqtt://HOST[:PORT]`` (port 1883 by default); exit with a clear error otherwise."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme != "mqtt" or not parsed.hostname:
        fail(f"bad broker URL {url!r}: expected mqtt://HOST:PORT")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        fail(f"bad broker URL {url!r}: expected mqtt://HOST:PORT with nothing after the port")
    if parsed.username is not None or parsed.password is not None:
        fail(
            f"bad broker URL {url!r}: credentials in the URL are not used; "
            "the device id is the username, give the password with --password"
        )
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port is None:
        return BrokerAddress(parsed.hostname, 1883)
    if not 1 <= port <= 65535:
        fail(f"bad broker URL {url!r}: the port must be a number 1-65535")
    return BrokerAddress(parsed.hostname, port)


def _load_firmware(path: Path) -> Firmware:
    if not (path / RELEASE_PUB).exists() and (path / "firmware" / RELEASE_PUB).exists():
        path = path / "firmware"  # the directory given to `firmware create --out`
    try:
        return Firmware.load(path)
    except FirmwareBundleError as exc:
        fail(f"{exc} (create one with: tinydrift firmware create --out DIR)")


def _check_id(value: str, what: str) -> str:
    try:
        return validate_id(value)
    except WireError:
        fail(f"bad {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")


def _drift_kind(kind: str | None) -> DriftKind | None:
    if kind is None:
        return None
    if kind not in DRIFT_KINDS:
        fail(f"unknown drift kind {kind!r}: choose one of {', '.join(DRIFT_KINDS)}")
    return kind


@firmware_app.command("create")
def firmware_create(
    out: Annotated[Path, typer.Option("--out", help="Directory to create.")],
    seed: Annotated[int, typer.Option(help="Seed for the factory model's training data.")] = 0,
) -> None:
    """Generate release and deploy keys, train and sign the factory model, write the bundle."""
    from service.firmware_bundle import create_bundle

    if (out / "keys" / "release.key").exists():
        fail(f"{out} already holds keys; choose a new directory")
    try:
        with console.status("training the factory model and signing it"):
            b = create_bundle(out, seed=seed)
    except KeyFileError as exc:
        fail(f"{exc}; choose a new directory")
    except OSError as exc:
        fail(f"cannot write the bundle into {out}: {exc.strerror}")
    fw = b.firmware()
    typer.echo(f"firmware bundle {b.firmware_dir} (schema {fw.schema.schema_id_hex})")
    typer.echo(
        f"signing keys   {b.keys_dir} (release {b.release_key.key_id:#010x}, "
        f"deploy {b.deploy_key.key_id:#010x})"
    )


def _wait_for_signal(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def device(
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")],
    fleet: Annotated[str, typer.Option(help="Fleet id.")],
    id: Annotated[str, typer.Option("--id", help="Device id (= MQTT client id and username).")],
    firmware: Annotated[
        Path | None,
        typer.Option(help="Firmware bundle (default: create one under --state-dir once)."),
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Where slots and the state record live.")] = Path(
        ".tinydrift-device"
    ),
    password: Annotated[str | None, typer.Option(envvar="TINYDRIFT_DEVICE_PASSWORD")] = None,
    drift: Annotated[str | None, typer.Option(help=f"One of {', '.join(DRIFT_KINDS)}.")] = None,
    drift_after: Annotated[float, typer.Option(help="Seconds until the drift starts.")] = 60.0,
    drift_ramp: Annotated[float, typer.Option(help="Seconds of linear ramp (0: abrupt).")] = 0.0,
    drift_magnitude: Annotated[float | None, typer.Option(help="Default per kind.")] = None,
    batch: Annotated[int, typer.Option(min=1, max=4096)] = 16,
    period: Annotated[float, typer.Option(min=0.0, help="Seconds between frames.")] = 2.0,
    label_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    codec: Annotated[str, typer.Option(help="bin or json")] = "bin",
    seed: int = 0,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Run one simulated device until interrupted."""
    addr = parse_broker(broker)
    if firmware is None:
        firmware = state_dir / "bundle" / "firmware"
        if not firmware.exists():
            from service.firmware_bundle import create_bundle

            with console.status("no --firmware given: creating a bundle"):
                create_bundle(state_dir / "bundle", seed=seed)
        console.print(f"firmware bundle {firmware} (signing keys in {firmware.parent / 'keys'})")
    fw = _load_firmware(firmware)
    kind = _drift_kind(drift)
    spec = None
    if kind is not None:
        spec = DriftSpec(
            kind, drift_after, drift_ramp, math.nan if drift_magnitude is None else drift_magnitude
        )
    if codec not in ("bin", "json"):
        fail("--codec must be bin or json")
    cfg = AgentConfig(
        fleet=_check_id(fleet, "fleet id"),
        device_id=_check_id(id, "device id"),
        host=addr.host,
        port=addr.port,
        password=password,
        batch=batch,
        period_s=period,
        label_rate=label_rate,
        codec="json" if codec == "json" else "bin",
    )
    machine = UpdateMachine(fw, state_dir / id, fleet=cfg.fleet, device=cfg.device_id)
    agent = EdgeAgent(
        cfg, machine, SensorSimulator(seed, drift=spec), start_time=time.time(), seed=seed
    )
    loop = DeviceLoop([agent])
    stop = threading.Event()
    _wait_for_signal(stop)
    console.print(
        f"device {fleet}/{id} → {broker}; parameters v{machine.param_version}, "
        f"schema {fw.schema.schema_id_hex}; Ctrl-C to stop"
    )
    if spec is not None:
        console.print(
            f"drift: {spec.kind} from t={spec.start_s:.0f}s, ramp {spec.ramp_s:.0f}s, "
            f"magnitude {spec.magnitude}"
        )
    thread = threading.Thread(target=loop.run, args=(stop, duration), daemon=True)
    thread.start()
    last = 0.0
    while thread.is_alive():
        thread.join(1.0)
        now = time.time()
        if now - last >= 10:
            last = now
            acc = agent.stats.accuracy()
            console.print(
                f"{'connected' if agent.connected else 'offline (retrying)'}; "
                f"frames {agent.stats.frames}, v{machine.param_version} "
                f"{machine.state}, accuracy {acc if acc is None else round(acc, 3)}"
                + (f"; {loop.last_error}" if not agent.connected and loop.last_error else "")
            )


def fleet_summary(f: Fleet, elapsed: float, connected: int | None = None) -> dict[str, Any]:
    """Figures of a finished fleet run (for ``--json`` and the benchmark).

    ``connected`` is the number of devices connected when the run ended, counted before
    :meth:`Fleet.stop` disconnects them (default: connected now).
    """
    agents = f.agents
    readings = sum(a.stats.readings for a in agents)
    return {
        "devices": len(agents),
        "elapsed_s": round(elapsed, 2),
        "frames": sum(a.stats.frames for a in agents),
        "readings": readings,
        "readings_per_s": round(readings / elapsed, 1) if elapsed > 0 else 0.0,
        "labels": sum(a.stats.labels for a in agents),
        "connected_at_end": f.loop.connected if connected is None else connected,
        "reconnects": sum(max(0, a.stats.connects - 1) for a in agents),
        "drift": {
            dev: {
                "kind": s.kind,
                "start_s": s.start_s,
                "ramp_s": s.ramp_s,
                "magnitude": s.magnitude,
            }
            for dev, s in f.plan.items()
        },
    }


def fleet_sim(
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")],
    devices: Annotated[int, typer.Option(min=1, max=100_000)] = 10,
    fleet: Annotated[str, typer.Option(help="Fleet id.")] = "sim",
    firmware: Annotated[
        Path | None, typer.Option(help="Firmware bundle (default: create a temporary one).")
    ] = None,
    drift: Annotated[str | None, typer.Option(help=f"One of {', '.join(DRIFT_KINDS)}.")] = None,
    drift_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    drift_after: Annotated[float, typer.Option(help="Seconds until drift starts.")] = 60.0,
    drift_ramp: Annotated[float, typer.Option(min=0.0)] = 0.0,
    drift_magnitude: Annotated[float | None, typer.Option()] = None,
    seed: int = 0,
    batch: Annotated[int, typer.Option(min=1, max=4096)] = 16,
    period: Annotated[
        float, typer.Option(min=0.0, help="Seconds between a device's frames.")
    ] = 2.0,
    label_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    codec: Annotated[str, typer.Option(help="bin or json")] = "bin",
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Default: a temporary directory.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Run N simulated devices, each with its own MQTT connection, in this process.

    Broker outages are retried with backoff. Exit status 0; 3 if no device ever connected to
    the broker during the run (the summary is printed all the same).
    """
    import tempfile

    addr = parse_broker(broker)
    kind = _drift_kind(drift)
    if codec not in ("bin", "json"):
        fail("--codec must be bin or json")
    tmp = None
    if firmware is None:
        from service.firmware_bundle import create_bundle

        tmp = tempfile.TemporaryDirectory(prefix="tinydrift-fw-")
        with console.status("no --firmware given: creating a temporary bundle"):
            firmware = create_bundle(Path(tmp.name), seed=seed).firmware_dir
        console.print(f"firmware bundle {firmware} (signing keys in {firmware.parent / 'keys'})")
    fw = _load_firmware(firmware)
    plan = plan_drift(
        devices,
        kind,
        drift_fraction,
        drift_after,
        seed,
        drift_ramp,
        math.nan if drift_magnitude is None else drift_magnitude,
    )
    start = time.time()
    for dev, spec in plan.items():
        when = time.strftime("%H:%M:%S", time.localtime(start + spec.start_s))
        console.print(
            f"drift plan: {dev} {spec.kind} magnitude {spec.magnitude:g} from "
            f"t={spec.start_s:g}s ({when}), ramp {spec.ramp_s:g}s"
        )
    cfg = FleetConfig(
        fleet=_check_id(fleet, "fleet id"),
        devices=devices,
        host=addr.host,
        port=addr.port,
        seed=seed,
        batch=batch,
        period_s=period,
        label_rate=label_rate,
        codec=codec,
        state_dir=state_dir,
    )
    f = Fleet(cfg, fw, plan)
    stop = threading.Event()
    _wait_for_signal(stop)
    f.start()
    t0 = time.time()
    last_print = 0.0
    try:
        while not stop.is_set() and (duration is None or time.time() - t0 < duration):
            time.sleep(0.5)
            now = time.time()
            if now - last_print >= 5:
                last_print = now
                readings = sum(a.stats.readings for a in f.agents)
                msg = (
                    f"t={now - t0:5.0f}s connected {f.loop.connected}/{devices}, "
                    f"readings {readings} ({readings / max(now - t0, 1e-9):.0f}/s)"
                )
                problem = _connection_problem(f)
                if f.loop.connected < devices and problem:
                    msg += f"; {problem}"
                    if f.loop.connected == 0:
                        msg += f" (is a broker running at {broker}?)"
                console.print(msg)
    finally:
        elapsed = time.time() - t0
        connected = f.loop.connected
        f.stop()
        if tmp is not None:
            tmp.cleanup()
    summary = fleet_summary(f, elapsed, connected)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        console.print(
            f"done: {summary['readings']} readings from {devices} devices in "
            f"{elapsed:.1f}s ({summary['readings_per_s']:.0f}/s)"
        )
    if not any(a.stats.connects for a in f.agents):
        fail(
            f"no device reached the broker {broker} in {elapsed:.0f}s "
            f"({_connection_problem(f) or 'no connection was acknowledged'}); start a broker "
            f"there (e.g. mosquitto -p {addr.port}) or point --broker at a running one",
            code=3,
        )


def _connection_problem(f: Fleet) -> str | None:
    """Why devices are not connected: a socket error, else a refusal by the broker."""
    if f.loop.last_error:
        return f.loop.last_error
    return next((a.last_error for a in f.agents if a.last_error), None)
