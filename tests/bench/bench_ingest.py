"""End-to-end ingest benchmark: load generator → Mosquitto → ``tinydrift serve`` (detection on).

For each fleet size the script starts a fresh Mosquitto and a fresh ``tinydrift serve``
(subprocess, SQLite registry with the factory parameter set), publishes every device's birth,
warms up until every device's fixed reference is complete (so layer A is detecting, not
collecting), then offers a paced load and measures, from the service's own ``/metrics``:
readings accepted per second, end-to-end loss (readings sent − accepted − counted rejections),
sequence gaps, the service's CPU (cores) and RSS per device. The load generator runs in this
process; its CPU is reported too, because all three share the machine's 2 cores.

Run: ``python tests/bench/bench_ingest.py [--devices 1000 10000] [--rate 200000] [--k 64]``
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def total(text: str, name: str) -> float:
    pat = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+\-]+)", re.M)
    return sum(float(v) for v in pat.findall(text))


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_drained(port: int, expected: int, timeout: float = 300.0) -> None:
    """Wait until the service has accepted ``expected`` readings or its counter stops moving."""
    last, still = -1.0, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = total(scrape(port), "tinydrift_readings_received_total")
        if n >= expected:
            return
        still = still + 1 if n == last else 0
        if still >= 6:
            return
        last = n
        time.sleep(0.5)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(devices: int, rate: float, k: int, seconds: float, tmp: Path) -> dict[str, float]:
    """One fleet size; returns the figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loadgen import LoadGenerator

    from edge_agent.device.firmware import Firmware
    from service.embedded_broker import free_port, start_mosquitto
    from service.firmware_bundle import create_bundle
    from service.registry.store import Registry

    broker = start_mosquitto()
    assert broker._proc is not None
    bundle_dir = tmp / f"bundle-{devices}"
    if not (bundle_dir / "firmware").exists():
        create_bundle(bundle_dir)
    fw = Firmware.load(bundle_dir / "firmware")
    db = f"sqlite:///{tmp / f'registry-{devices}.db'}"
    reg = Registry(db)
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    port = free_port()
    svc = subprocess.Popen(
        [
            "tinydrift",
            "serve",
            "--broker",
            broker.url,
            "--db",
            db,
            "--metrics-port",
            str(port),
            "--log-level",
            "warning",
            "--window",
            "30",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"serve-{devices}.log", "wb"),  # noqa: SIM115
    )
    try:
        for _ in range(100):
            try:
                scrape(port)
                break
            except OSError:
                time.sleep(0.2)
        rss0 = proc_rss_mib(svc.pid)
        gen = LoadGenerator(broker.host, broker.port, fw, devices=devices, k=k, fleet="bench")
        gen.births()
        # warm-up: every device completes its 512-reading reference
        warm = max(3.0, 1.2 * 512 * devices / rate)
        print(f"  {devices} devices: births sent; warming up {warm:.0f}s", flush=True)
        warm_sent = gen.run(rate, warm)
        wait_drained(port, warm_sent.readings)
        m0 = scrape(port)
        cpu0, gcpu0, bcpu0 = proc_cpu(svc.pid), self_cpu(), proc_cpu(broker._proc.pid)
        t0 = time.time()
        sent = gen.run(rate, seconds)
        t_sent = time.time()
        wait_drained(port, warm_sent.readings + sent.readings)
        drain_s = time.time() - t_sent
        t1 = time.time()
        m1 = scrape(port)
        cpu1, gcpu1, bcpu1 = proc_cpu(svc.pid), self_cpu(), proc_cpu(broker._proc.pid)
        received = total(m1, "tinydrift_readings_received_total") - total(
            m0, "tinydrift_readings_received_total"
        )
        rejected = total(m1, "tinydrift_ingest_rejected_total") - total(
            m0, "tinydrift_ingest_rejected_total"
        )
        gaps = total(m1, "tinydrift_ingest_sequence_gaps_total") - total(
            m0, "tinydrift_ingest_sequence_gaps_total"
        )
        detections = total(m1, "tinydrift_drift_detections_total")
        rss = proc_rss_mib(svc.pid)
        gen.close()
        return {
            "devices": devices,
            "offered_readings_per_s": sent.readings_per_s,
            "accepted_readings_per_s": received / (sent.seconds + drain_s),
            "drain_after_load_s": drain_s,
            "sent_readings": sent.readings,
            "accepted_readings": received,
            "lost_readings": sent.readings - received - rejected * k,
            "rejected_messages": rejected,
            "sequence_gaps": gaps,
            "detections_stationary": detections,
            "service_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
            "loadgen_cpu_cores": (gcpu1 - gcpu0) / (t1 - t0),
            "mosquitto_cpu_cores": (bcpu1 - bcpu0) / (t1 - t0),
            "service_rss_mib": rss,
            "service_rss_kib_per_device": (rss - rss0) * 1024 / devices,
        }
    finally:
        svc.terminate()
        try:
            svc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            svc.kill()
        broker.stop()


def main() -> None:
    """Run every fleet size and print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rate", type=float, default=200_000, help="offered readings/s")
    ap.add_argument("--k", type=int, default=64, help="readings per frame")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}"
    )
    print(
        f"offered {args.rate:,.0f} readings/s in frames of {args.k}, {args.seconds:.0f}s "
        "measured after every reference is complete"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        for n in args.devices:
            rows.append(run_one(n, args.rate, args.k, args.seconds, Path(d)))
    names = list(rows[0])
    print(f"{'figure':<32}" + "".join(f"{int(r['devices']):>16,}" for r in rows))
    for name in names[1:]:
        print(f"{name:<32}" + "".join(f"{r[name]:>16,.2f}" for r in rows))


if __name__ == "__main__":
    main()
