"""``tinydrift firmware create`` and ``tinydrift fleet-sim`` as real processes.

The console script runs against the session's Mosquitto (and against a port where nothing
listens); its JSON summary on stdout and its drift plan on stderr are checked.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.blob import load_public_key, load_signing_key
from edge_agent.device.firmware import Firmware
from edge_agent.device.fleet import plan_drift
from service.cli.app import app
from service.embedded_broker import free_port

pytestmark = pytest.mark.integration

DEVICES = 5
BATCH = 16  # fleet-sim's default readings per frame


def tinydrift(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tinydrift")
    assert exe, "the tinydrift console script is not on PATH: pip install -e ."
    return subprocess.run(
        [exe, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory given to ``tinydrift firmware create --out``."""
    out = tmp_path_factory.mktemp("fw") / "bundle"
    proc = tinydrift("firmware", "create", "--out", out, "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out


def test_firmware_create_writes_keys_and_a_signed_factory_model(bundle_dir: Path):
    fw_dir, keys = bundle_dir / "firmware", bundle_dir / "keys"
    for name in ("release", "deploy"):
        assert stat.S_IMODE((keys / f"{name}.key").stat().st_mode) == 0o600
        assert (
            load_public_key(fw_dir / f"{name}.pub") == load_signing_key(keys / f"{name}.key").public
        )
    fw = Firmware.load(fw_dir)  # verifies the factory blob under the release key
    assert len(fw.factory_blob) > 160
    release_id = load_signing_key(keys / "release.key").key_id
    assert list(fw.release_keys) == [release_id]


def test_firmware_create_refuses_a_directory_that_holds_keys(bundle_dir: Path):
    before = (bundle_dir / "keys" / "release.key").read_bytes()
    proc = tinydrift("firmware", "create", "--out", bundle_dir)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {bundle_dir} already holds keys; choose a new directory"
    ]
    assert (bundle_dir / "keys" / "release.key").read_bytes() == before


def test_fleet_sim_against_mosquitto_prints_plan_and_json_summary(mosquitto, bundle_dir: Path):
    proc = tinydrift(
        "fleet-sim",
        "--broker",
        f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "--devices",
        str(DEVICES),
        "--duration",
        "6",
        "--period",
        "0.3",
        "--drift",
        "gain",
        "--drift-fraction",
        "0.4",
        "--drift-after",
        "2",
        "--seed",
        "1",
        "--firmware",
        bundle_dir,
        "--json",
    )

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["devices"] == DEVICES
    assert summary["readings"] > 0
    assert summary["readings"] == BATCH * summary["frames"]
    assert summary["connected_at_end"] == DEVICES
    assert summary["reconnects"] == 0
    assert 6.0 <= summary["elapsed_s"] < 9.0

    expected = sorted(plan_drift(DEVICES, "gain", 0.4, 2.0, seed=1))
    assert sorted(summary["drift"]) == expected
    assert len(expected) == 2
    for spec in summary["drift"].values():
        assert spec["kind"] == "gain"
        assert spec["start_s"] == 2
        assert spec["ramp_s"] == 0

    plan_lines = [line for line in proc.stderr.splitlines() if line.startswith("drift plan: ")]
    assert len(plan_lines) == 2
    for dev, line in zip(expected, plan_lines, strict=True):
        assert re.fullmatch(
            rf"drift plan: {dev} gain magnitude \S+ from t=2s \(\d\d:\d\d:\d\d\), ramp 0s", line
        ), line
    assert re.search(rf"connected {DEVICES}/{DEVICES}, readings \d+", proc.stderr)


def test_fleet_sim_without_a_broker_says_so_and_exits_3(tmp_path: Path, bundle_dir: Path):
    port = free_port()  # nothing listens here
    broker = f"mqtt://127.0.0.1:{port}"

    proc = tinydrift(
        "fleet-sim",
        "--broker",
        broker,
        "--devices",
        "3",
        "--duration",
        "3",
        "--period",
        "0.3",
        "--firmware",
        bundle_dir / "firmware",
        "--state-dir",
        tmp_path / "state",
        "--json",
    )

    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)  # the summary is still printed
    assert summary["devices"] == 3
    assert summary["readings"] == summary["frames"] == 0
    assert summary["connected_at_end"] == 0

    lines = proc.stderr.splitlines()
    status = [line for line in lines if line.startswith("t=")]
    assert status, proc.stderr
    assert f"cannot reach broker 127.0.0.1:{port}" in status[0]
    assert f"is a broker running at {broker}?" in status[0]
    assert lines[-1].startswith(f"error: no device reached the broker {broker} in 3s (")
    assert "Connection refused" in lines[-1]
    assert f"mosquitto -p {port}" in lines[-1]


def test_fleet_sim_help_documents_exit_status_3():
    result = CliRunner().invoke(app, ["fleet-sim", "--help"])
    assert result.exit_code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "Exit status 0; 3 if no device ever connected to the broker during the run" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--codec", "xml"], "error: --codec must be bin or json"),
        (["--drift", "melt"], "error: unknown drift kind 'melt'"),
        (["--broker", "mqtt://127.0.0.1:0"], "the port must be a number 1-65535"),
    ],
    ids=["codec", "drift kind", "port 0"],
)
def test_fleet_sim_bad_options_fail_fast(args: list[str], needle: str, tmp_path: Path):
    base = {"--broker": "mqtt://127.0.0.1:1883", "--firmware": str(tmp_path / "none")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = CliRunner().invoke(app, ["fleet-sim", *(x for kv in base.items() for x in kv)])
    assert result.exit_code == 1
    assert needle in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_fleet_sim_names_a_missing_firmware_bundle(tmp_path: Path):
    result = CliRunner().invoke(
        app,
        ["fleet-sim", "--broker", "mqtt://127.0.0.1:1883", "--firmware", str(tmp_path / "none")],
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: firmware bundle {tmp_path / 'none'}")
    assert "tinydrift firmware create --out DIR" in result.stderr
