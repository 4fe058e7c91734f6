"""End-to-end ingest benchmark: load generator → Mosquitto → ``tinydrift serve`` (detection on),
side by side with a bare paho subscriber that decodes the same frames.

For each fleet size the script first measures the **baseline**: a fresh Mosquitto and a separate
process holding one paho client subscribed to the telemetry topics, which decodes every frame
with ``edge_agent.wire`` (``decode_telemetry``) and counts its readings, nothing else. Then a
fresh Mosquitto and a fresh ``tinydrift serve`` (run as ``python -m service.cli.app`` with this
checkout on ``PYTHONPATH``, so the code measured is this tree's; SQLite registry with the factory
parameter set): every device's birth, a warm-up in rounds of one frame per device (each round
drained before the next, so nothing is lost) until every device's fixed reference is complete
(layer A is learning its null, not collecting), then the measured load. Both are offered the
same load from the same prebuilt frames (``loadgen.LoadGenerator``, one publishing client in
this process), at ``--rate`` readings/s, by default more than either can take, so both run
saturated; the ratio of their accepted readings/s is the figure of merit.

Figures, from the service's own ``/metrics`` and ``/proc``: readings accepted per second (over
the span from the start of the load to the last reading accepted), end-to-end loss (readings
sent − accepted − counted rejections), sequence gaps, CPU (cores, and µs per accepted reading)
of the service, the load generator, Mosquitto and the baseline subscriber, and the service's RSS
per device. All share the machine's cores: compare the ratio, measured in one run.

The service's checkpoint interval is ``--checkpoint-interval`` (default 3600 s, so that no
checkpoint falls in a run: one checkpoint of 10,000 monitors holds the engine's lock for
seconds, and whether it fell in the 15 s decided the figure; ``bench_ingest_cpu.py`` measures
its cost).

Run: ``python tests/bench/bench_ingest.py [--devices 10000] [--k 16] [--rate 2000000]
[--seconds 15]``
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The checkout whose code is measured (put first on the subprocesses' ``PYTHONPATH``)."""


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def total(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels`` (e.g. ``state="x"``)."""
    pat = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? ([0-9.e+\-]+)", re.M)
    return sum(float(v) for lab, v in pat.findall(text) if labels in lab)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def wait_drained(
    count: Callable[[], float], expected: float, timeout: float = 300.0, poll: float = 0.1
) -> tuple[float, float]:
    """Wait until ``count()`` reaches ``expected`` or stops moving for 3 s.

    Returns the last count and the wall time at which it was first seen (the end of the
    processing span, without the idle wait that shows the counter stopped)."""
    last, t_last = count(), time.time()
    deadline = time.monotonic() + timeout
    while last < expected and time.monotonic() < deadline:
        time.sleep(poll)
        n = count()
        if n != last:
            last, t_last = n, time.time()
        elif time.time() - t_last >= 3.0:
            break
    return last, t_last


class Progress:
    """Prints ``count()`` and its rate every ``every`` seconds while running (a thread)."""

    def __init__(self, label: str, count: Callable[[], float], every: float = 5.0) -> None:
        self.label, self.count, self.every = label, count, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        t0, n0 = time.time(), self.count()
        while not self._stop.wait(self.every):
            t, n = time.time(), self.count()
            print(
                f"    {self.label}: {n:,.0f} readings, {(n - n0) / (t - t0):,.0f}/s",
                flush=True,
            )
            t0, n0 = t, n


# -- the baseline: a bare paho subscriber decoding the frames ------------------------------


def subscriber_main(host: str, port: int, fleet: str, status: Path) -> None:
    """Subscribe to ``fleet``'s telemetry, decode every frame, count its readings.

    The count is written to ``status`` every 0.1 s (replaced atomically); runs until killed."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.wire.telemetry_codec import decode_telemetry
    from edge_agent.wire.topics import Leaf, subscription

    readings = 0
    frames = 0

    def on_connect(client: mqtt.Client, _ud: Any, _f: Any, reason: Any, _p: Any) -> None:
        client.subscribe([(subscription(Leaf.TEL, fleet), 1)])

    def on_message(_c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal readings, frames
        readings += decode_telemetry(msg.payload).k
        frames += 1

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-baseline",
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    client.max_inflight_messages_set(100)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port, keepalive=30)

    def report() -> None:
        tmp = status.with_suffix(".tmp")
        while True:
            tmp.write_text(f"{readings} {frames} {int(client.is_connected())}\n")
            os.replace(tmp, status)
            time.sleep(0.1)

    threading.Thread(target=report, daemon=True).start()
    client.loop_forever()


def read_status(status: Path) -> tuple[float, bool]:
    try:
        readings, _frames, connected = status.read_text().split()
    except (OSError, ValueError):
        return 0.0, False
    return float(readings), connected == "1"


def run_baseline(gen: Any, rate: float, seconds: float, tmp: Path) -> dict[str, float]:
    """The bare paho subscriber on a fresh Mosquitto, fed ``rate`` readings/s by ``gen``."""
    from service.embedded_broker import start_mosquitto

    broker = start_mosquitto()
    assert broker._proc is not None
    status = tmp / "baseline.status"
    sub = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--subscriber",
            broker.host,
            str(broker.port),
            gen.fleet,
            str(status),
        ],
        env=child_env(),
    )
    try:
        for _ in range(200):
            if read_status(status)[1]:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the baseline subscriber did not connect")
        time.sleep(0.5)  # its subscription is in place
        gen.reconnect(broker.host, broker.port)

        def count() -> float:
            return read_status(status)[0]

        cpu0, gcpu0, bcpu0 = proc_cpu(sub.pid), self_cpu(), proc_cpu(broker._proc.pid)
        t0 = time.time()
        with Progress("baseline", count):
            sent = gen.run(rate, seconds)
            received, t_end = wait_drained(count, sent.readings)
        t1 = time.time()
        cpu1, gcpu1, bcpu1 = proc_cpu(sub.pid), self_cpu(), proc_cpu(broker._proc.pid)
        span = max(t_end - t0, sent.seconds)
        return {
            "baseline_offered_readings_per_s": sent.readings_per_s,
            "baseline_accepted_readings_per_s": received / span,
            "baseline_lost_readings": sent.readings - received,
            "baseline_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
            "baseline_cpu_us_per_reading": (cpu1 - cpu0) / max(received, 1.0) * 1e6,
            "baseline_loadgen_cpu_cores": (gcpu1 - gcpu0) / (t1 - t0),
            "baseline_mosquitto_cpu_cores": (bcpu1 - bcpu0) / (t1 - t0),
        }
    finally:
        _stop(sub, 10.0)
        broker.stop()


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- the service ------------------------------------------------------------------------------


def run_service(
    gen: Any,
    fw: Any,
    rate: float,
    seconds: float,
    tmp: Path,
    warm_rate: float,
    checkpoint_s: float,
) -> dict[str, float]:
    """``tinydrift serve`` on a fresh Mosquitto: births, warm-up, then ``rate`` readings/s."""
    from service.embedded_broker import free_port, start_mosquitto
    from service.registry.store import Registry

    devices, k = len(gen.names), gen.k
    broker = start_mosquitto()
    assert broker._proc is not None
    db = f"sqlite:///{tmp / f'registry-{devices}-{k}.db'}"
    reg = Registry(db)
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    port = free_port()
    svc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli.app",
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
        stderr=open(tmp / f"serve-{devices}-{k}.log", "wb"),  # noqa: SIM115
        env={**child_env(), "TINYDRIFT_CHECKPOINT_INTERVAL_S": str(checkpoint_s)},
    )

    def received() -> float:
        return total(scrape(port), "tinydrift_readings_received_total")

    try:
        for _ in range(150):
            try:
                scrape(port)
                break
            except OSError:
                time.sleep(0.2)
        rss0 = proc_rss_mib(svc.pid)
        gen.reconnect(broker.host, broker.port)
        gen.births()
        # warm-up: rounds of one frame per device, each drained before the next (no loss),
        # until every device's 512-reading reference is complete
        rounds = math.ceil(512 / k)
        print(f"    service: births sent; warm-up, {rounds} frames per device", flush=True)
        t_warm = time.time()
        with Progress("service warm-up", received):
            for r in range(rounds + 8):
                if r >= rounds:  # frames lost on the way (e.g. during a checkpoint): top up
                    time.sleep(5.5)  # the layer-A gauges refresh every 5 s
                    m = scrape(port)
                    if total(m, "tinydrift_layer_a_devices", 'state="reference"') == 0:
                        break
                before = received()
                sent_w = gen.run(warm_rate, 1e9, max_frames=devices)
                wait_drained(received, before + sent_w.readings, poll=0.05)
        m = scrape(port)
        in_ref = total(m, "tinydrift_layer_a_devices", 'state="reference"')
        print(
            f"    service: warm-up took {time.time() - t_warm:.0f}s; devices still collecting "
            f"their reference: {in_ref:.0f}",
            flush=True,
        )
        m0 = scrape(port)
        n0 = total(m0, "tinydrift_readings_received_total")
        cpu0, gcpu0, bcpu0 = proc_cpu(svc.pid), self_cpu(), proc_cpu(broker._proc.pid)
        threads0 = thread_cpu(svc.pid)
        t0 = time.time()
        with Progress("service", received):
            sent = gen.run(rate, seconds)
            _, t_end = wait_drained(received, n0 + sent.readings)
        t1 = time.time()
        m1 = scrape(port)
        cpu1, gcpu1, bcpu1 = proc_cpu(svc.pid), self_cpu(), proc_cpu(broker._proc.pid)
        threads1 = thread_cpu(svc.pid)
        busiest = sorted((threads1[t] - threads0.get(t, 0.0) for t in threads1), reverse=True)[:3]
        got = total(m1, "tinydrift_readings_received_total") - n0
        rejected = total(m1, "tinydrift_ingest_rejected_total") - total(
            m0, "tinydrift_ingest_rejected_total"
        )
        queue_full = total(m1, "tinydrift_ingest_rejected_total", 'reason="queue_full"') - total(
            m0, "tinydrift_ingest_rejected_total", 'reason="queue_full"'
        )
        gaps = total(m1, "tinydrift_ingest_sequence_gaps_total") - total(
            m0, "tinydrift_ingest_sequence_gaps_total"
        )
        rss = proc_rss_mib(svc.pid)
        span = max(t_end - t0, sent.seconds)
        return {
            "devices": devices,
            "offered_readings_per_s": sent.readings_per_s,
            "accepted_readings_per_s": got / span,
            "drain_after_load_s": max(t_end - t0 - sent.seconds, 0.0),
            "sent_readings": sent.readings,
            "accepted_readings": got,
            "lost_readings": sent.readings - got - rejected * k,
            "rejected_messages": rejected,
            "rejected_queue_full": queue_full,
            "sequence_gaps": gaps,
            "detections_stationary": total(m1, "tinydrift_drift_detections_total"),
            "checkpoints_during_load": total(m1, "tinydrift_checkpoints_total")
            - total(m0, "tinydrift_checkpoints_total"),
            "service_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
            "service_cpu_us_per_reading": (cpu1 - cpu0) / max(got, 1.0) * 1e6,
            "service_cpu_us_per_frame": (cpu1 - cpu0) / max(got / k, 1.0) * 1e6,
            # its busiest threads (the batcher, paho's network loop, then e.g. the timers)
            "service_thread1_cpu_cores": busiest[0] / (t1 - t0),
            "service_thread2_cpu_cores": busiest[1] / (t1 - t0) if len(busiest) > 1 else 0.0,
            "service_thread3_cpu_cores": busiest[2] / (t1 - t0) if len(busiest) > 2 else 0.0,
            "loadgen_cpu_cores": (gcpu1 - gcpu0) / (t1 - t0),
            "mosquitto_cpu_cores": (bcpu1 - bcpu0) / (t1 - t0),
            "service_rss_mib": rss,
            "service_rss_kib_per_device": (rss - rss0) * 1024 / devices,
        }
    finally:
        _stop(svc, 60.0)
        broker.stop()


def run_one(
    devices: int,
    rate: float,
    k: int,
    seconds: float,
    warm_rate: float,
    checkpoint_s: float,
    tmp: Path,
) -> dict[str, float]:
    """One fleet size: the baseline, then the service, from the same prebuilt frames."""
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]
    from loadgen import LoadGenerator

    from edge_agent.device.firmware import Firmware
    from service.embedded_broker import start_mosquitto
    from service.firmware_bundle import create_bundle

    bundle_dir = tmp / "bundle"
    if not (bundle_dir / "firmware").exists():
        create_bundle(bundle_dir)
    fw = Firmware.load(bundle_dir / "firmware")
    print(f"  {devices} devices, frames of {k}: building frames", flush=True)
    first = start_mosquitto()  # the generator connects on construction
    try:
        gen = LoadGenerator(first.host, first.port, fw, devices=devices, k=k, fleet="bench")
    finally:
        first.stop()
    try:
        print("  baseline: paho subscriber decoding with edge_agent.wire", flush=True)
        base = run_baseline(gen, rate, seconds, tmp)
        print(
            f"    baseline: {base['baseline_accepted_readings_per_s']:,.0f} readings/s",
            flush=True,
        )
        print("  service: tinydrift serve", flush=True)
        row = run_service(gen, fw, rate, seconds, tmp, warm_rate, checkpoint_s)
        print(f"    service: {row['accepted_readings_per_s']:,.0f} readings/s", flush=True)
    finally:
        gen.close()
    row.update(base)
    row["ratio_service_to_baseline"] = row["accepted_readings_per_s"] / max(
        base["baseline_accepted_readings_per_s"], 1.0
    )
    return row


def main() -> None:
    """Run every fleet size and print a table."""
    if len(sys.argv) == 6 and sys.argv[1] == "--subscriber":
        subscriber_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, nargs="+", default=[10_000])
    ap.add_argument(
        "--rate", type=float, default=2_000_000, help="offered readings/s (both saturate)"
    )
    ap.add_argument("--warm-rate", type=float, default=400_000, help="warm-up readings/s")
    ap.add_argument("--k", type=int, default=16, help="readings per frame")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument(
        "--checkpoint-interval",
        type=float,
        default=3600.0,
        help="the service's checkpoint interval (s); a checkpoint of every monitor holds the "
        "engine's lock for seconds at 10,000 devices, so by default none falls in the run "
        "(the service's default is 60 s)",
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}; code: {ROOT}"
    )
    print(
        f"offered {args.rate:,.0f} readings/s in frames of {args.k}, {args.seconds:.0f}s, to a "
        "bare paho+decode subscriber and to the service (after every reference is complete)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        for n in args.devices:
            rows.append(
                run_one(
                    n,
                    args.rate,
                    args.k,
                    args.seconds,
                    args.warm_rate,
                    args.checkpoint_interval,
                    Path(d),
                )
            )
    names = list(rows[0])
    print(f"{'figure':<34}" + "".join(f"{int(r['devices']):>16,}" for r in rows))
    for name in names[1:]:
        print(f"{name:<34}" + "".join(f"{r[name]:>16,.2f}" for r in rows))
    for r in rows:
        print(
            f"k={args.k}, {int(r['devices']):,} devices: service "
            f"{r['accepted_readings_per_s']:,.0f} readings/s, baseline "
            f"{r['baseline_accepted_readings_per_s']:,.0f} readings/s, "
            f"ratio {r['ratio_service_to_baseline']:.3f}"
        )


if __name__ == "__main__":
    main()
