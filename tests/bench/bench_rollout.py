"""Rollout benchmark: from approval to every device CONFIRMED, through a real Mosquitto.

One run: a fresh Mosquitto on a free port, a SQLite registry holding the factory parameter set
(v1) and the same parameters signed again as v2 (a legitimate update that changes nothing the
gate could object to), ``Service`` in this process with release and deploy keys, and N simulated
devices in a separate ``tinydrift fleet-sim`` process (one MQTT connection each, telemetry every
``--period`` seconds). Once every device is born and layer A holds its reference, a
``parameter_set`` rollout of v2 is proposed and approved at once; the clock starts at the
approval and stops at the last CONFIRMED ack of a non-control device.

The soak is shortened to ``--min-soak`` seconds (production: 30 min): the time measured is the
mechanism's (groups, manifests, chunked downloads, acks, gates, confirmations), not a soak.
The labelled-error margin is 0.1: v2 is the same model, so the true difference is 0 and the
margin only sets how many labels the canary gate waits for. Per-device latencies are given twice:
as the rollout worker stamped them (``DeviceProgress``) and as the messages crossed the broker
(the observer's arrival times); the difference is the service's backlog.

An observer client subscribed to ``desired``, ``blob/get``, ``blob/data`` and ``ack`` of the fleet
counts the bytes of every update message per device (each delivery once), and the MQTT 3.1.1
framing of each (fixed header, remaining length, topic, packet id, and the 4-byte PUBACK of
QoS 1) on the device's link. TCP/IP headers are not included.

Run: ``python tests/bench/bench_rollout.py [--devices 1000] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLEET = "bench"
LEAVES = ("desired", "blob/get", "blob/data", "ack")
PUBACK_BYTES = 4


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return "?"
    first = out.splitlines()[0] if out else "?"
    return first.removeprefix("mosquitto version ").strip()


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def publish_bytes(topic_len: int, payload_len: int, qos: int = 1) -> int:
    """Bytes of one MQTT 3.1.1 PUBLISH packet: fixed header, remaining length, topic, id, payload.

    >>> publish_bytes(10, 100), publish_bytes(10, 200)
    (116, 217)
    """
    remaining = 2 + topic_len + (2 if qos else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2**21 else 4
    return 1 + varint + remaining


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LeafCount:
    """Messages, payload bytes and estimated MQTT bytes of one leaf of one device."""

    messages: int = 0
    payload: int = 0
    wire: int = 0


@dataclass
class WireTap:
    """An MQTT client counting the update traffic of every device of the fleet."""

    host: str
    port: int
    counts: dict[str, dict[str, LeafCount]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(LeafCount))
    )
    ack_states: Counter[str] = field(default_factory=Counter)
    seen: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    """Device → first arrival at the observer of: ``install``/``confirm`` manifest, ack state."""
    retained_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: Any = None

    def start(self) -> None:
        """Connect and subscribe (QoS 1: no delivery is dropped for a slow observer)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        ready = threading.Event()
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-rollout-tap",
            protocol=mqtt.MQTTv311,
        )

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe([(f"td/v1/{FLEET}/+/{leaf}", 1) for leaf in LEAVES])

        def on_subscribe(*_: Any) -> None:
            ready.set()

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = self._on_message
        c.connect(self.host, self.port)
        c.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the observer could not subscribe")
        self.client = c

    def _on_message(self, _c: Any, _ud: Any, msg: Any) -> None:
        parts = msg.topic.split("/", 4)
        device, leaf = parts[3], parts[4]
        n = len(msg.payload)
        now = time.time()
        with self.lock:
            if msg.retain:  # a stored manifest replayed on subscription: not a delivery
                self.retained_seen += 1
                return
            c = self.counts[device][leaf]
            c.messages += 1
            c.payload += n
            c.wire += publish_bytes(len(msg.topic.encode()), n) + PUBACK_BYTES
            if leaf not in ("ack", "desired"):
                return
            try:
                what = str(json.loads(msg.payload)["state" if leaf == "ack" else "action"])
            except (ValueError, KeyError, TypeError):
                what = "?"
            if leaf == "ack":
                self.ack_states[what] += 1
            self.seen[device].setdefault(what, now)

    def stop(self) -> None:
        """Disconnect."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def wait_until(pred: Any, timeout: float, what: str, every: float = 0.5) -> None:
    """Poll ``pred`` until true; raise ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not reached after {timeout:.0f}s")


def run(args: argparse.Namespace, tmp: Path) -> int:
    """One rollout; prints the figures; returns the exit status."""
    import numpy as np
    import paho.mqtt

    from service.config import load_settings
    from service.embedded_broker import start_mosquitto
    from service.firmware_bundle import create_bundle
    from service.registry.store import Registry
    from service.serve import Service

    n = args.devices
    bundle = create_bundle(tmp / "bundle", seed=0)
    fw = bundle.firmware()
    schema = fw.schema.schema_id_hex
    v2 = bundle.factory_resigned(2)
    db = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(db)
    reg.add_parameter_set(schema, 1, 0, fw.factory_blob, source="factory", status="good")
    reg.add_parameter_set(schema, 2, 0, v2, source="operator", status="candidate")
    reg.close()

    system = f"{platform.system()} {platform.release()}"
    print(
        f"machine: {platform.machine()} {_cpu()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {system}; numpy {np.__version__}, paho-mqtt "
        f"{paho.mqtt.__version__}, Mosquitto {_mosquitto_version()}, SQLite "
        f"{sqlite3.sqlite_version}; load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    canary = min(args.canary, max(1, n // 10))
    control = min(args.control, max(0, n // 10))
    print(
        f"{n} devices (telemetry: {args.batch} readings every {args.period:g}s, labels "
        f"{args.label_rate:.0%}); canary {canary}, control {control}, waves 5/25/100 %; "
        f"min soak {args.min_soak:g}s per group (production default 1800s); gate tick 0.5s; "
        f"labelled-error margin {args.error_margin:g}; blob {len(v2)} bytes",
        flush=True,
    )

    broker = start_mosquitto()
    assert broker._proc is not None
    settings = load_settings(
        broker=broker.url,
        db=db,
        metrics_port=0,
        api_port=0,
        fleets=[FLEET],
        mqtt_client_id="bench-rollout-service",
        release_key=bundle.keys_dir / "release.key",
        deploy_key=bundle.keys_dir / "deploy.key",
        update_policy="off",
        rollout_tick_s=0.5,
        canary_size=canary,
        control_size=control,
        waves_pct=[5.0, 25.0, 100.0],
        min_soak_s=args.min_soak,
        max_soak_s=600.0,
        gate_min_readings=500,
        gate_min_devices=3,
        gate_error_margin=args.error_margin,
        ack_timeout_s=600.0,
    )
    svc = Service(settings)
    fleet_proc: subprocess.Popen[bytes] | None = None
    tap = WireTap(broker.host, broker.port)
    fleet_out = tmp / "fleet-sim.json"
    fleet_err = tmp / "fleet-sim.log"
    status = 1
    try:
        svc.start()
        if not svc.consumer.wait_connected(10):
            raise RuntimeError("the service did not connect to the broker")
        tap.start()
        exe = shutil.which("tinydrift")
        cmd = [exe] if exe else [sys.executable, "-c", "from service.cli.app import main; main()"]
        with fleet_out.open("wb") as out, fleet_err.open("wb") as err:
            fleet_proc = subprocess.Popen(
                [
                    *cmd, "fleet-sim", "--broker", broker.url, "--devices", str(n),
                    "--fleet", FLEET, "--firmware", str(bundle.firmware_dir), "--seed", "1",
                    "--batch", str(args.batch), "--period", str(args.period),
                    "--label-rate", str(args.label_rate), "--state-dir", str(tmp / "devices"),
                    "--json",
                ],
                stdout=out,
                stderr=err,
            )  # fmt: skip
        devices = [f"dev-{i:04d}" for i in range(n)]
        t_warm = time.time()

        def born() -> bool:
            if fleet_proc is not None and fleet_proc.poll() is not None:
                raise RuntimeError(f"fleet-sim exited early: {fleet_err.read_text()[-2000:]}")
            infos = [svc.directory.get(FLEET, d) for d in devices]
            return all(i is not None and i.online and i.active_version == 1 for i in infos)

        def references() -> bool:
            with svc.engine.lock:
                mons = svc.engine.monitors
                return all(
                    (FLEET, d) in mons and mons[(FLEET, d)].reference_complete for d in devices
                )

        wait_until(born, 300, f"births of {n} devices")
        t_born = time.time()
        wait_until(references, 600, "layer-A references of every device")
        t_ref = time.time()
        print(
            f"warm-up: {n} devices born in {t_born - t_warm:.1f}s, references complete after "
            f"{t_ref - t_warm:.1f}s; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

        assert svc.operations is not None
        assert svc.reconciler is not None
        r0 = svc.status().readings
        cpu0 = (_self_cpu(), _proc_cpu(fleet_proc.pid), _proc_cpu(broker._proc.pid))
        t_call = time.time()
        proposal = svc.operations.propose(
            FLEET, "parameter_set", "bench-operator", version=2, auto_approve=True
        )
        t_proposed = time.time()
        assert proposal.rollout is not None
        rid = proposal.rollout.rollout_id
        ctl = svc.reconciler.controllers[rid]
        members = [d for g in ctl.state.groups for d in g.devices]
        control_devs = list(ctl.state.control)
        view = svc.reconciler.view(rid)
        outcome = "timeout"
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            view = svc.reconciler.view(rid)
            s = view.summary
            if s.failed or view.status in ("PAUSED", "STOPPED", "ROLLED_BACK"):
                outcome = f"{view.status}: {view.reason or ''} ({s.failed} failed)"
                break
            if s.confirmed == len(members):
                outcome = "ok"
                break
            time.sleep(0.1)
        t_seen = time.time()
        r1 = svc.status().readings
        cpu1 = (_self_cpu(), _proc_cpu(fleet_proc.pid), _proc_cpu(broker._proc.pid))
        rejections = svc.status().rejections
        time.sleep(2.0)  # the last acks reach the observer; a tick stores the state
        svc.reconciler.flush()
        reg = Registry(db)
        try:
            rec = reg.get_rollout(rid)
            events = reg.list_rollout_events(rid)
        finally:
            reg.close()
        assert rec is not None
        state = json.loads(rec.state_json)
        members = [d for g in state["groups"] for d in g["devices"]]
        status = 0 if outcome == "ok" else 1
        _report(
            n=n,
            outcome=outcome,
            view=view,
            state=state,
            events=events,
            members=members,
            control=control_devs,
            tap=tap,
            blob_len=len(v2),
            times=(t_call, t_proposed, t_seen),
            readings=r1 - r0,
            rejections=rejections,
            cpu=(cpu0, cpu1),
        )
    finally:
        if fleet_proc is not None:
            fleet_proc.send_signal(signal.SIGINT)
            try:
                fleet_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fleet_proc.kill()
                fleet_proc.wait()
        tap.stop()
        svc.stop()
        broker.stop()
    try:
        fs = json.loads(fleet_out.read_text())
        print(
            f"fleet-sim (whole run, {fs['elapsed_s']:.0f}s): {fs['readings']:,} readings "
            f"({fs['readings_per_s']:,.0f}/s), {fs['labels']:,} labels, {fs['reconnects']} "
            f"reconnects, {fs['connected_at_end']} of {fs['devices']} connected at the end"
        )
    except (OSError, ValueError, KeyError):
        print(f"fleet-sim printed no summary; its log: {fleet_err.read_text()[-1000:]}")
        status = status or 1
    return status


def _report(
    *,
    n: int,
    outcome: str,
    view: Any,
    state: dict[str, Any],
    events: list[Any],
    members: list[str],
    control: list[str],
    tap: WireTap,
    blob_len: int,
    times: tuple[float, float, float],
    readings: int,
    rejections: dict[str, int],
    cpu: tuple[tuple[float, float, float], tuple[float, float, float]],
) -> None:
    t_call, t_proposed, t_seen = times
    ev = [(e.ts.timestamp(), e.scope, e.name, e.to_state, e.reason) for e in events]
    approved = next((t for t, sc, _, to, _r in ev if sc == "rollout" and to == "RUNNING"), t_call)
    finished = next((t for t, sc, _, to, _r in ev if sc == "rollout" and to == "FINISHED"), None)
    dev_state: dict[str, dict[str, Any]] = state["devices"]
    results = [dev_state[d]["result_ms"] for d in members if d in dev_state]
    done = [r for r in results if r is not None]
    last_ms = max(done) if done else int(t_seen * 1000)
    total = last_ms / 1000 - approved
    s = view.summary
    print(
        f"outcome: {outcome}; rollout {view.status}; {s.confirmed} of {len(members)} confirmed, "
        f"{s.failed} failed, {s.in_trial} in trial, {s.pending} pending; control "
        f"{s.untouched_control} of {len(control)} untouched"
    )
    print(
        f"propose + approve call: {t_proposed - t_call:.2f}s (forming groups of {n} devices, "
        f"storing the plan, publishing the canary's manifests)"
    )
    with tap.lock:
        seen = {d: dict(v) for d, v in tap.seen.items()}
    wire_last = max((seen[d]["CONFIRMED"] for d in members if "CONFIRMED" in seen.get(d, {})),
                    default=float("nan"))  # fmt: skip
    print(
        f"approval -> last device CONFIRMED: {total:.1f}s ({len(done) / total:.1f} devices/s "
        f"overall; the last CONFIRMED ack crossed the broker at {wire_last - approved:.1f}s); "
        f"approval -> rollout FINISHED: {(finished - approved) if finished else float('nan'):.1f}s"
    )
    print(f"{'group':<8}{'devices':>8}{'start':>8}{'all TRIAL':>10}{'soak':>8}{'passed':>8}"
          f"{'last OK':>9}{'installs/s':>11}")  # fmt: skip
    for g in state["groups"]:
        name = g["name"]
        at = {to: t for t, sc, nm, to, _r in ev if sc == "group" and nm == name}
        start = at.get("RUNNING")
        trial = at.get("SOAKING")
        passed = at.get("PASSED")
        res = [dev_state[d]["result_ms"] for d in g["devices"] if d in dev_state]
        last_ok = max((r for r in res if r is not None), default=None)

        def rel(t: float | None) -> str:
            return "-" if t is None else f"{t - approved:.1f}"

        rate = (
            f"{len(g['devices']) / (trial - start):.0f}"
            if trial is not None and start is not None and trial > start
            else "-"
        )
        soak = f"{passed - trial:.1f}" if passed is not None and trial is not None else "-"
        print(
            f"{name:<8}{len(g['devices']):>8}{rel(start):>8}{rel(trial):>10}{soak:>8}"
            f"{rel(passed):>8}{rel(last_ok / 1000 if last_ok else None):>9}{rate:>11}"
        )
    print("  (seconds after the approval; 'all TRIAL': every device of the group downloaded,")
    print("   verified and runs the new parameters on trial; 'last OK': last CONFIRMED ack)")
    print("per device, service's view: stamped when the rollout worker handles the ack")
    started = {g["name"]: g["started_ms"] for g in state["groups"]}
    to_trial, confirm_rt, to_ok = [], [], []
    for d in members:
        p = dev_state.get(d)
        if p is None or p["result_ms"] is None:
            continue
        g0 = started.get(p["group"])
        if g0 is not None and p["trial_since_ms"] is not None:
            to_trial.append((p["trial_since_ms"] - g0) / 1000)
        if g0 is not None:
            to_ok.append((p["result_ms"] - g0) / 1000)
        confirm_rt.append((p["result_ms"] - p["issued_ms"]) / 1000)
    for label, vals in (
        ("install manifest -> TRIAL ack (download, verify, KAT)", to_trial),
        ("confirm manifest -> CONFIRMED ack", confirm_rt),
        ("install manifest -> CONFIRMED ack (incl. gate wait)", to_ok),
    ):
        print(
            f"per device, service's view, {label}: p50 {1e3 * pct(vals, 0.5):.0f} ms, p95 "
            f"{1e3 * pct(vals, 0.95):.0f} ms, max {1e3 * max(vals, default=float('nan')):.0f} ms "
            f"(n={len(vals)})"
        )
    wire_trial = [
        seen[d]["TRIAL"] - seen[d]["install"]
        for d in members
        if "TRIAL" in seen.get(d, {}) and "install" in seen[d]
    ]
    wire_ok = [
        seen[d]["CONFIRMED"] - seen[d]["confirm"]
        for d in members
        if "CONFIRMED" in seen.get(d, {}) and "confirm" in seen[d]
    ]
    for label, vals in (
        ("install manifest -> TRIAL ack", wire_trial),
        ("confirm manifest -> CONFIRMED ack", wire_ok),
    ):
        print(
            f"on the wire (observer's arrival times), {label}: p50 {1e3 * pct(vals, 0.5):.0f} "
            f"ms, p95 {1e3 * pct(vals, 0.95):.0f} ms, max "
            f"{1e3 * max(vals, default=float('nan')):.0f} ms (n={len(vals)})"
        )
    secs = t_seen - t_call
    cpu0, cpu1 = cpu
    print(
        f"during the rollout: {readings:,} readings ingested ({readings / secs:,.0f}/s), "
        f"rejections {dict(rejections) or 0}; CPU cores: service+observer "
        f"{(cpu1[0] - cpu0[0]) / secs:.2f}, fleet-sim {(cpu1[1] - cpu0[1]) / secs:.2f}, "
        f"Mosquitto {(cpu1[2] - cpu0[2]) / secs:.2f}"
    )
    with tap.lock:
        counts = {d: dict(v) for d, v in tap.counts.items()}
        acks = dict(tap.ack_states)
    touched_control = [d for d in control if d in counts]
    print(
        f"wire, per updated device (mean of {len(members)}; control devices with update "
        f"traffic: {len(touched_control)}; retained replays ignored: {tap.retained_seen}):"
    )
    print(f"  {'leaf':<10}{'direction':>18}{'messages':>10}{'payload B':>11}{'MQTT B':>9}")
    direction = {
        "desired": "service -> device",
        "blob/get": "device -> service",
        "blob/data": "service -> device",
        "ack": "device -> service",
    }
    tot_msgs = tot_payload = tot_wire = 0.0
    for leaf in LEAVES:
        m = sum(counts.get(d, {}).get(leaf, LeafCount()).messages for d in members) / len(members)
        p = sum(counts.get(d, {}).get(leaf, LeafCount()).payload for d in members) / len(members)
        w = sum(counts.get(d, {}).get(leaf, LeafCount()).wire for d in members) / len(members)
        tot_msgs, tot_payload, tot_wire = tot_msgs + m, tot_payload + p, tot_wire + w
        print(f"  {leaf:<10}{direction[leaf]:>18}{m:>10.2f}{p:>11.0f}{w:>9.0f}")
    print(f"  {'total':<10}{'':>18}{tot_msgs:>10.2f}{tot_payload:>11.0f}{tot_wire:>9.0f}")
    per_dev = [sum(c.wire for c in counts[d].values()) for d in members if d in counts]
    print(
        f"  blob {blob_len} B; MQTT bytes per device min {min(per_dev, default=0)}, max "
        f"{max(per_dev, default=0)}; ack states seen {acks}"
    )
    print("  (MQTT B: PUBLISH fixed header + remaining length + topic + packet id + payload, plus")
    print("   the 4-byte PUBACK of QoS 1, on the device's link; TCP/IP headers not counted)")


def main() -> None:
    """Parse the options, run once in a temporary directory, exit 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="100 devices")
    ap.add_argument("--canary", type=int, default=20)
    ap.add_argument("--control", type=int, default=20)
    ap.add_argument("--min-soak", type=float, default=2.0, help="seconds per group")
    ap.add_argument("--error-margin", type=float, default=0.1)
    ap.add_argument("--period", type=float, default=2.0, help="seconds between frames")
    ap.add_argument("--batch", type=int, default=16, help="readings per frame")
    ap.add_argument("--label-rate", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the rollout")
    args = ap.parse_args()
    if args.quick:
        args.devices = 100
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as d:
        status = run(args, Path(d))
    print(f"benchmark wall time {time.time() - t0:.0f}s")
    sys.exit(status)


if __name__ == "__main__":
    main()
