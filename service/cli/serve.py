"""``tinydrift serve`` and ``tinydrift registry``: run the service, manage its registry."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edge_agent.blob import (
    BlobRejectedError,
    KeyFileError,
    load_public_key,
    load_signing_key,
    trusted_keys,
    verify_blob,
)
from service.cli.errors import fail
from service.config import ServiceSettings, SettingsError, load_settings
from service.registry.errors import RegistryConflictError, RegistryError
from service.registry.store import Registry

console = Console(stderr=True)
registry_app = typer.Typer(help="The service's registry database.", no_args_is_help=True)


def serve(
    broker: Annotated[str | None, typer.Option(help="mqtt://HOST:PORT")] = None,
    db: Annotated[
        str | None, typer.Option(help="Registry URL (sqlite:///… or postgresql+psycopg://…)")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Port of /metrics (0: any).")] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address of /metrics (default 127.0.0.1).")
    ] = None,
    mqtt_username: Annotated[
        str | None,
        typer.Option(help="Broker username of the service."),
    ] = None,
    mqtt_password: Annotated[
        str | None,
        typer.Option(help="Broker password (prefer env TINYDRIFT_MQTT_PASSWORD: not in ps)."),
    ] = None,
    api_port: Annotated[
        int | None, typer.Option(help="Port of the operator API (default 8080; 0: any).")
    ] = None,
    api_host: Annotated[
        str | None, typer.Option(help="Address of the operator API (default 127.0.0.1).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with any of these settings.")
    ] = None,
    fleet: Annotated[
        list[str] | None, typer.Option(help="Fleet to watch (repeatable; default all).")
    ] = None,
    unknown_devices: Annotated[str | None, typer.Option(help="reject or adopt")] = None,
    window: Annotated[float | None, typer.Option(help="Cohort window, seconds.")] = None,
    discard_checkpoints: Annotated[
        bool, typer.Option(help="Ignore stored detector state and relearn references.")
    ] = False,
    release_key: Annotated[
        Path | None,
        typer.Option(
            help="Private release key: signs candidate parameter sets (with --deploy-key: "
            "updates on; without both: monitor only)."
        ),
    ] = None,
    deploy_key: Annotated[
        Path | None, typer.Option(help="Private deploy key: signs the desired-state manifests.")
    ] = None,
    update_policy: Annotated[
        str | None,
        typer.Option(
            help="On drift: off (operator only), propose (wait for approval; default) or auto."
        ),
    ] = None,
    canary_size: Annotated[
        int | None, typer.Option(help="Devices in a rollout's canary (default 5).")
    ] = None,
    control_size: Annotated[
        int | None, typer.Option(help="Devices held back as control (default 5).")
    ] = None,
    min_soak_s: Annotated[
        float | None, typer.Option(help="Canary soak before its gate is decided (default 1800).")
    ] = None,
    max_soak_s: Annotated[
        float | None,
        typer.Option(help="Soak after which an inconclusive canary pauses (default 14400)."),
    ] = None,
    rollout_tick_s: Annotated[
        float | None, typer.Option(help="How often rollout gates and timers run (default 1).")
    ] = None,
    policy_interval_s: Annotated[
        float | None, typer.Option(help="How often the update policy looks (default 30).")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Ingest telemetry, detect drift, keep the registry, serve /metrics and the operator API."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings: ServiceSettings = load_settings(
            config,
            broker=broker,
            db=db,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            mqtt_username=mqtt_username,
            mqtt_password=mqtt_password,
            api_port=api_port,
            api_host=api_host,
            fleets=fleet,
            unknown_devices=unknown_devices,
            window_s=window,
            release_key=release_key,
            deploy_key=deploy_key,
            update_policy=update_policy,
            canary_size=canary_size,
            control_size=control_size,
            min_soak_s=min_soak_s,
            max_soak_s=max_soak_s,
            rollout_tick_s=rollout_tick_s,
            policy_interval_s=policy_interval_s,
        )
    except SettingsError as exc:
        fail(str(exc))
    from service.api.server import ApiServerError
    from service.serve import Service, ServiceKeyError

    try:
        svc = Service(settings, discard_checkpoints=discard_checkpoints)
    except (RegistryError, ServiceKeyError) as exc:
        fail(str(exc))
    try:
        svc.start()
    except ApiServerError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(
            f"cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port}: "
            f"{exc.strerror} (choose another --metrics-port)"
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(
        f"tinydrift serve: broker {settings.broker}, registry {svc.registry.url}, "
        f"metrics http://{settings.metrics_host}:{svc.metrics_port}/metrics, "
        f"API http://{settings.api_host}:{svc.api_port}/docs, "
        + (
            f"updates on (policy {settings.update_policy})"
            if svc.operations is not None
            else "updates off (no --release-key/--deploy-key)"
        )
    )
    t0 = time.monotonic()
    last = 0.0
    try:
        while not stop.wait(1.0):
            if duration is not None and time.monotonic() - t0 >= duration:
                break
            now = time.monotonic()
            if now - last >= 30:
                last = now
                st = svc.status()
                msg = (
                    f"{'connected' if st.connected else 'NOT connected'}; devices "
                    f"{st.devices}, readings {st.readings}, detections {st.detections}, "
                    f"rejected {sum(st.rejections.values())}, queue {st.queue_depth}"
                )
                if not st.connected and svc.consumer.last_error:
                    msg += f"; {svc.consumer.last_error}"
                console.print(msg)
    finally:
        console.print("stopping: draining, checkpointing detectors, flushing the registry")
        svc.stop()


@registry_app.command("import-blob")
def import_blob(
    files: Annotated[list[Path], typer.Argument(help="Signed blob files.")],
    db: Annotated[str, typer.Option(help="Registry URL.")] = "sqlite:///tinydrift.db",
    pubkey: Annotated[Path | None, typer.Option(help="Release public key to verify with.")] = None,
    release_key: Annotated[
        Path | None,
        typer.Option(
            envvar="TINYDRIFT_RELEASE_KEY",
            help="The service's private release key: without --pubkey, its public half is "
            "the key the blobs must be signed with.",
        ),
    ] = None,
    status: Annotated[str, typer.Option(help="good, candidate or bad")] = "good",
) -> None:
    """Register parameter sets (e.g. a factory blob) so the service knows their schema.

    Every blob must verify against the release key (``--pubkey``, else the public half of
    ``--release-key``): a set signed by another key would be refused by every device and
    spend a canary."""
    if status not in ("good", "candidate", "bad"):
        fail("--status must be good, candidate or bad")
    try:
        if pubkey is not None:
            key = load_public_key(pubkey)
        elif release_key is not None:
            key = load_signing_key(release_key).public
        else:
            fail(
                "no key to verify the blobs with: give --pubkey (the release public key, e.g. "
                "build/firmware/release.pub) or --release-key / TINYDRIFT_RELEASE_KEY"
            )
        trusted = trusted_keys([key])
        reg = Registry(db)
    except (KeyFileError, RegistryError) as exc:
        fail(str(exc))
    for f in files:
        try:
            data = f.read_bytes()
            v = verify_blob(data, trusted=trusted, schema_id=None)
        except OSError as exc:
            fail(f"cannot read {f}: {exc.strerror}")
        except BlobRejectedError as exc:
            fail(f"{f}: blob rejected: {exc}")
        try:
            reg.add_parameter_set(
                v.params.schema.schema_id_hex,
                v.header.param_version,
                v.header.security_epoch,
                data,
                source=f"import:{f.name}",
                status=status,  # type: ignore[arg-type]
            )
        except RegistryConflictError:
            typer.echo(
                f"{f}: already registered (schema {v.params.schema.schema_id_hex} "
                f"v{v.header.param_version})"
            )
            continue
        typer.echo(
            f"registered {f}: schema {v.params.schema.schema_id_hex} "
            f"v{v.header.param_version} ({status})"
        )
    reg.close()
