"""Benchmark: N simulated devices (one MQTT connection each) from one process against Mosquitto.

Prints achieved readings/s, the CPU the fleet process and the broker used, the frames a separate
subscriber process received (end-to-end loss at QoS 0), and, as the same-run baseline, the
readings/s of the same devices doing the same work with publishing switched off (so the ratio
is the cost of MQTT, not of the machine's speed that day).

Run: ``python tests/bench/bench_fleet_sim.py [--devices 1000] [--seconds 20] [--batch 16]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any


def _subscriber(host: str, port: int, ready: Any, stop: Any, out: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    count = {"n": 0}
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub")
    c.on_connect = lambda cl, *_: cl.subscribe("td/v1/+/+/tel", 0)
    c.on_subscribe = lambda *_: ready.set()

    def on_message(*_: Any) -> None:
        count["n"] += 1

    c.on_message = on_message
    c.connect(host, port)
    c.loop_start()
    stop.wait()
    time.sleep(1.0)
    c.loop_stop()
    out.put(count["n"])


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def baseline(fleet: Any, seconds: float) -> float:
    """Readings/s of the same agents with ``publish`` made a no-op (no network)."""
    for a in fleet.agents:
        a.client.publish = lambda *args, **kw: None
        a.connected = True
    t0 = time.time()
    n = 0
    while time.time() - t0 < seconds:
        now = time.time()
        for a in fleet.agents:
            a.step(now)
            n += a.config.batch
    return n / (time.time() - t0)


def main() -> None:
    """Run the benchmark and print a table."""
    from edge_agent.device.fleet import Fleet, FleetConfig
    from service.embedded_broker import start_mosquitto
    from service.firmware_bundle import create_bundle

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--baseline-seconds", type=float, default=5.0)
    args = ap.parse_args()

    broker = start_mosquitto()
    assert broker._proc is not None
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    bundle = create_bundle(tmp / "bundle")
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    sub = ctx.Process(target=_subscriber, args=(broker.host, broker.port, ready, stop, out))
    sub.start()
    ready.wait(20)
    cfg = FleetConfig(
        fleet="bench",
        devices=args.devices,
        host=broker.host,
        port=broker.port,
        period_s=0.0,
        batch=args.batch,
        label_rate=0.0,
        state_dir=tmp / "dev",
    )
    t_build = time.time()
    fleet = Fleet(cfg, bundle.firmware(), {})
    build_s = time.time() - t_build
    fleet.start()
    t0 = time.time()
    while fleet.loop.connected < args.devices and time.time() - t0 < 120:
        time.sleep(0.1)
    connect_s = time.time() - t0
    r0, cpu0, bcpu0, t1 = (
        sum(a.stats.readings for a in fleet.agents),
        _cpu_self(),
        _proc_cpu(broker._proc.pid),
        time.time(),
    )
    f0 = sum(a.stats.frames for a in fleet.agents)
    time.sleep(args.seconds)
    r1, cpu1, bcpu1, t2 = (
        sum(a.stats.readings for a in fleet.agents),
        _cpu_self(),
        _proc_cpu(broker._proc.pid),
        time.time(),
    )
    fleet.stop()
    frames_sent = sum(a.stats.frames for a in fleet.agents)
    stop.set()
    received = out.get(timeout=30)
    sub.join(10)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = baseline(fleet, args.baseline_seconds)
    broker.stop()

    rate = (r1 - r0) / (t2 - t1)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    print(
        f"devices {args.devices}, batch {args.batch} readings/frame, measured {t2 - t1:.1f}s "
        f"(built in {build_s:.1f}s, all connected after {connect_s:.1f}s)"
    )
    print(f"{'figure':<44}{'value':>14}")
    rows = [
        ("readings/s published (fleet-sim + MQTT)", f"{rate:,.0f}"),
        ("frames/s published", f"{(f0 and (frames_sent - f0)) / (t2 - t1):,.0f}"),
        ("readings/s same work, no publish (baseline)", f"{base:,.0f}"),
        ("ratio with MQTT / baseline", f"{rate / base:.2f}"),
        ("fleet-sim CPU (cores)", f"{(cpu1 - cpu0) / (t2 - t1):.2f}"),
        ("mosquitto CPU (cores)", f"{(bcpu1 - bcpu0) / (t2 - t1):.2f}"),
        ("fleet-sim CPU µs per reading", f"{1e6 * (cpu1 - cpu0) / max(r1 - r0, 1):.1f}"),
        ("fleet-sim peak RSS (MiB)", f"{rss_mib:.0f}"),
        ("fleet-sim RSS per device (KiB)", f"{rss_mib * 1024 / args.devices:.0f}"),
        ("frames received by a subscriber / sent", f"{received:,} / {frames_sent:,}"),
        ("end-to-end loss (QoS 0)", f"{100 * (1 - received / max(frames_sent, 1)):.2f} %"),
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>14}")


if __name__ == "__main__":
    main()
