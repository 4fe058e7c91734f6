"""``tinydrift demo`` closes the loop at a small size: the command, its exit code and its JSON.

The demo starts its own broker (Mosquitto when installed, else amqtt), service, registry and
fleet; this test only runs the command as a user would and checks what it reports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.demo import RECOVERY_MARGIN, RECOVERY_TOLERANCE, plan_scenario

pytestmark = pytest.mark.integration

DEVICES = 24
SEED = 1


@pytest.mark.timeout(600)
def test_demo_closes_the_loop_and_reports_it_as_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from service.cli.app import main; main()", "demo",
         "--devices", str(DEVICES), "--seed", str(SEED), "--json"],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    # its duration (about two minutes, most of it layer A calibrating) is measured in the
    # README, not asserted: a loaded machine only makes it slower
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    s = json.loads(proc.stdout)  # stdout holds only the JSON; progress went to stderr
    assert s["ok"] is True
    assert s["devices"] == DEVICES
    assert s["readings"] > 0
    assert 0 < s["readings_ingested"] <= s["readings"]
    assert isinstance(s["rejected_messages"], dict)
    assert s["urls"]["metrics"].startswith("http://127.0.0.1:")
    assert [p["phase"] for p in s["phases"]] == [1, 2, 3, 4, 5, 6]

    # the drift plan is the seed's, and detection covers it
    plan = plan_scenario(DEVICES, SEED)
    d = s["drift"]
    injected = set(d["injected_devices"])
    assert injected == set(plan.injected)
    assert set(d["gain"]["devices"]) == set(plan.gain)
    detected = set(d["detected_devices"])
    assert detected <= injected
    assert set(plan.gain) <= detected, "every gain device is flagged"
    assert len(detected) >= 0.8 * len(injected)
    assert set(d["missed_devices"]) == injected - detected
    assert d["false_alarm_devices"] == [], d["false_alarm_events"]
    assert d["median_delay_readings"] is not None
    assert 0 <= d["median_delay_readings"] < 5000
    assert set(d["delay_readings"]) == detected

    # a bad candidate rolled back by the canary gate, the recalibration promoted
    outcomes = {r["outcome"] for r in s["rollouts"]}
    assert outcomes <= {"promoted", "rolled_back"}
    bad = [r for r in s["rollouts"] if r["kind"] == "parameter_set"]
    assert len(bad) == 1
    assert bad[0]["outcome"] == "rolled_back"
    assert bad[0]["confirmed"] == 0
    canary = next(g for g in bad[0]["gates"] if g["group"] == "canary")
    assert canary["verdict"] == "fail"
    failed = {c["metric"] for c in canary["checks"] if c["verdict"] == "fail"}
    assert "error_rate" in failed
    assert canary["canary"]["error_rate"] > canary["control"]["error_rate"]
    good = [r for r in s["rollouts"] if r["kind"] == "recalibration"]
    assert good
    assert all(r["outcome"] == "promoted" for r in good)
    assert sum(r["confirmed"] for r in good) >= len(plan.gain)
    assert all(r["confirmed"] == r["devices"] for r in good), "all of its devices confirmed"

    # accuracy from labels: it dropped with the drift and came back with the update
    a = s["accuracy"]
    for key in ("before_drift", "during_drift", "after_update"):
        assert 0.0 <= a[key] <= 1.0
        assert a["labels"][key] >= 100
    assert a["during_drift"] < a["before_drift"]
    assert a["after_update"] >= a["during_drift"] + RECOVERY_MARGIN
    assert a["after_update"] >= a["before_drift"] - RECOVERY_TOLERANCE
    assert all(c["ok"] for c in s["checks"])
    assert {c["check"] for c in s["checks"]} == {
        "drift detected",
        "no false-alarm device",
        "good candidate promoted",
        "bad candidate rolled back",
        "accuracy recovered",
    }
