"""In-process ingest CPU harness: the service's batcher and drift engine on prebuilt frames.

No broker and no threads: a real :class:`service.serve.Service` (SQLite registry with the factory
parameter set) is built but not started, every device's birth goes through
``Service.batcher.process``, then frames (``loadgen.LoadGenerator``, as ``bench_ingest.py``
sends them) in batches of ``--batch`` messages, as the batcher drains them under load: first
enough rounds that every device's 512-reading reference is complete (warm-up, not measured),
then ``--frames-per-device`` measured rounds. Prints CPU µs per frame and per reading of
``process`` (decode, validation, layer A and B), and of the timers' per-device passes
(``engine.status`` and the gauges, every 2 s in the service) per call.

Then ingest during a checkpoint (``--ckpt-batches`` batches per case, each of new frames): batch
latency (p50, p99, max) and the queue a steady offer at half the measured no-checkpoint
throughput would build, in three cases in the same run: no checkpoint; the previous release's
checkpoint (every monitor encoded with the engine's lock held throughout); this release's
(:meth:`DriftEngine.checkpoint`: slices copied under the lock, encoded outside it).

``--profile cprofile`` profiles the measured rounds with cProfile (top functions by own time);
to sample with py-spy instead, run the harness under ``py-spy record -- python ...`` with
``--warm-only-pause``.

Run: ``python tests/bench/bench_ingest_cpu.py [--devices 10000] [--k 16]``
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    """Build, warm up, measure."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2_000)
    ap.add_argument("--frames-per-device", type=int, default=6)
    ap.add_argument("--ckpt-batches", type=int, default=30)
    ap.add_argument("--profile", choices=["none", "cprofile"], default="none")
    args = ap.parse_args()
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]
    from loadgen import LoadGenerator

    from edge_agent.device.firmware import Firmware
    from service.config import ServiceSettings
    from service.firmware_bundle import create_bundle
    from service.ingest.ingest_queue import Incoming
    from service.registry.store import Registry
    from service.serve import Service

    with tempfile.TemporaryDirectory(prefix="bench-ingest-cpu-") as d:
        tmp = Path(d)
        create_bundle(tmp / "bundle")
        fw = Firmware.load(tmp / "bundle" / "firmware")
        db = f"sqlite:///{tmp / 'registry.db'}"
        reg = Registry(db)
        reg.add_parameter_set(
            fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
        )
        reg.close()
        svc = Service(ServiceSettings(db=db, metrics_port=0, api_port=0))
        gen = LoadGenerator(None, 0, fw, devices=args.devices, k=args.k, fleet="bench")

        def feed(n_frames: int) -> tuple[float, float]:
            msgs = [Incoming(t, p, time.time()) for t, p in gen.take(n_frames)]
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(0, len(msgs), args.batch):
                svc.batcher.process(msgs[i : i + args.batch])
            return time.process_time() - c0, time.perf_counter() - w0

        feed_births = [Incoming(t, p, time.time()) for t, p in gen.birth_messages()]
        svc.batcher.process(feed_births)
        rounds = math.ceil(512 / args.k)
        t0 = time.perf_counter()
        for _ in range(rounds):
            feed(args.devices)
        states = svc.engine.status().calibration
        print(
            f"warm-up: {rounds} frames per device in {time.perf_counter() - t0:.1f}s; "
            f"states {sorted(set(states.values()))}",
            flush=True,
        )
        n = args.frames_per_device * args.devices
        prof = None
        if args.profile == "cprofile":
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        cpu, wall = feed(n)
        if prof is not None:
            prof.disable()
        c0 = time.process_time()
        layer_a = svc.engine.status()
        svc._refresh_gauges(layer_a.drifting, layer_a.calibration)
        timers = time.process_time() - c0
        c0 = time.process_time()
        records: list[object] = []
        svc.engine.checkpoint(records.extend)
        ckpt = time.process_time() - c0
        print(
            f"measured: {n:,} frames of {args.k} ({args.devices:,} devices, batches of "
            f"{args.batch}): {cpu / n * 1e6:.1f} µs CPU per frame, "
            f"{cpu / n / args.k * 1e6:.2f} µs per reading, {n * args.k / wall:,.0f} readings/s "
            "(one thread, no broker)"
        )
        print(
            f"timers: engine.status + gauges over {args.devices:,} devices: {timers * 1e3:.0f} ms "
            f"CPU per call ({timers / 2.0 * 100:.1f} % of a core at one call per 2 s)"
        )
        print(
            f"checkpoint: engine.checkpoint() of {len(records):,} records: {ckpt:.2f} s CPU "
            f"({ckpt / 60 * 100:.1f} % of a core at one per 60 s)"
        )
        during_checkpoint(svc, gen, args, Incoming)
        if prof is not None:
            import pstats

            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            pstats.Stats(prof).sort_stats("cumtime").print_stats(40)
        svc.writer.close()
        svc.registry.close()


def during_checkpoint(svc: Any, gen: Any, args: argparse.Namespace, incoming: Any) -> None:
    """Batch latency and queue depth while a checkpoint runs: none, the old way, the new."""
    import threading

    import numpy as np

    engine = svc.engine

    def old_checkpoint() -> None:  # the previous release: every monitor under the lock
        with engine.lock:
            for mon in list(engine.monitors.values()):
                mon.state_bytes()

    def new_checkpoint() -> None:
        sink: list[object] = []
        engine._dirty.update(engine.monitors)  # every device due, as under full load
        engine.checkpoint(sink.extend)

    rate = None
    for name, job in (("none", None), ("old", old_checkpoint), ("new", new_checkpoint)):
        batches = [
            [incoming(t, p, time.time()) for t, p in gen.take(args.batch)]
            for _ in range(args.ckpt_batches)
        ]
        th = None if job is None else threading.Thread(target=job)
        lat, ends = [], []
        t0 = time.perf_counter()
        if th is not None:
            th.start()
        for b in batches:
            w0 = time.perf_counter()
            svc.batcher.process(b)
            now = time.perf_counter()
            lat.append(now - w0)
            ends.append(now - t0)
        if th is not None:
            th.join()
        total = time.perf_counter() - t0
        if rate is None:  # half the measured throughput, offered steadily
            rate = 0.5 * len(batches) * args.batch / ends[-1]
        done = np.arange(1, len(batches) + 1) * args.batch
        depth = np.maximum(0.0, rate * np.array(ends) - done)
        ms = np.array(lat) * 1e3
        print(
            f"ingest, checkpoint {name:>4}: batch of {args.batch} "
            f"p50 {np.percentile(ms, 50):.0f} ms p99 {np.percentile(ms, 99):.0f} ms "
            f"max {ms.max():.0f} ms; queue at "
            f"{rate:,.0f} frames/s offered: max {depth.max():,.0f} frames; {total:.1f} s wall"
        )


if __name__ == "__main__":
    main()
