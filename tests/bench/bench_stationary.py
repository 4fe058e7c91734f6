"""False alarms of layer A on stationary telemetry of several kinds (no drift anywhere).

Run as a script::

    python tests/bench/bench_stationary.py [--devices 20] [--readings-per-device 200000]
        [--kinds iid ar1_0.99 ...] [--workers 2] [--quick]

Streams: :mod:`tests.bench.stationary_streams` (``iid``, ``ar1_0.9``, ``ar1_0.99``,
``periodic``, ``sessions``, ``heavy_tailed``, ``real``), one independent device per seed
``0 .. devices - 1`` of each kind.

Protocol (``bench_detection``'s stationary protocol, per kind): every device has a
``DeviceMonitor`` at its defaults (``DeviceMonitorConfig()``); its readings go in frames of 16
through ``update_frames`` (one batch per step holding the next frame of each device of the
task), 10 % of the readings are labelled, and each frame's labels go to ``observe_labels`` right
after that frame.

Counted per kind:

- **monitored device-readings**: the readings of frames that arrive once the device can alarm
  at all, i.e. once any of its streams (or its error stream) is calibrated
  (``mon.calibration()``; a device is *calibrating* until every stream is, but its calibrated
  streams already alarm, and an operator sees those alarms, so they count), else
  ``mon.reference_complete`` (checked before each frame and each label batch);
- **strict device alarms**: every Detection of ``BatchResult.detections`` and
  ``observe_labels(...).alarms`` except ``hddm_a_warning`` (warnings counted apart), while
  monitoring; per 10⁶ monitored device-readings with the exact 95 % Poisson upper bound;
- **cohort alarms**: the kind's devices as one cohort (``SuspicionCohort``, via
  ``bench_detection.run_cohort``): windows of 300 readings per device (one reading per second,
  5 minutes), each suspicion (sensitive tier) placed at the monitored reading where it fired
  (a label batch's at its frame's last reading), over the windows every device has fully
  monitored; per 10⁶ device-readings of those windows, with the 95 % upper bound.

- **what the update policy would see**: every :data:`POLICY_EVERY` frames while monitoring,
  whether ``mon.drifting`` lists a feature stream (``feature``/``feature_var``): the update
  policy proposes a recalibration for such a device (``CandidateProposer.drifting_devices``),
  which a seasonal or session pattern must not get.

Budgets: ``DeviceMonitorConfig().strict_budget`` for the strict alarms and ``cohort_budget`` for
the cohort rule (5e-8 each per device-reading: 0.05 per 10⁶). A kind PASSes when both measured
rates are within 2× their budgets. At the default size (4·10⁶ device-readings per kind) a single
alarm already exceeds 2× (0.25 per 10⁶): the run is sized to tell rates of the order of the
budget from rates far above it; "(sig.)" marks a FAIL whose 95 % Poisson lower bound is above
2× the budget too, "NO DATA" a kind none of whose devices finished calibrating (counted as a
failure in the exit code).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make ``tests.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

K = 16
LABEL_RATE = 0.1
WINDOW = 300
"""Readings per device in a cohort window (bench_detection.WINDOW)."""
BUDGET_FACTOR = 2.0
"""A kind passes when its rates are within this factor of the budgets."""
POLICY_EVERY = 256
"""Frames between looks at what the update policy reads of a device (``mon.drifting``)."""
DEFAULT_DEVICES = 20
DEFAULT_READINGS = 200_000
QUICK_DEVICES = 4
QUICK_READINGS = 20_000


def _init_worker() -> None:
    from tests.bench import bench_detection

    bench_detection._init_worker()


def is_monitoring(mon: Any) -> bool:
    """Whether the monitor can alarm: any stream (or the error stream) calibrated.

    Uses ``mon.calibration()`` when the monitor has it, else ``mon.reference_complete``.
    """
    calibration = getattr(mon, "calibration", None)
    if calibration is None:
        return bool(mon.reference_complete)
    status = calibration()
    return bool(status.streams_ready > 0 or status.error_ready)


@dataclass
class DeviceResult:
    """One device of one kind."""

    kind: str
    seed: int
    readings: int = 0
    monitored: int = 0
    """Readings of frames that arrived while monitoring."""
    start: int | None = None
    """Readings sent before the first monitored frame (None: never monitored)."""
    calibrating_at_end: bool = True
    alarms: list[str] = field(default_factory=list)
    """Strict alarms while monitoring, as ``signal:feature:detector@readings``."""
    alarms_calibrating: int = 0
    """Strict alarms (and suspicions) raised while not monitoring: not counted above."""
    warnings: int = 0
    suspicions_at: list[int] = field(default_factory=list)
    """0-based monitored-reading index of each suspicion (the cohort's clock)."""
    suspicion_rate: float = math.nan
    """The calibrated suspicion rate the cohort rule assumes for this device."""
    policy_checks: int = 0
    """Looks at ``mon.drifting`` while monitoring (every :data:`POLICY_EVERY` frames)."""
    policy_hits: int = 0
    """Of them, those at which a feature stream was listed: the update policy would see the
    device drifting on its features and propose a recalibration for it."""


@dataclass
class TaskResult:
    kind: str
    devices: list[DeviceResult]
    pool_s: float
    """Simulating the devices' pools (once per device and worker process)."""
    gen_s: float
    """Making the streams from the pools."""
    mon_s: float
    """Monitoring (frames, labels, bookkeeping)."""


def run_task(args: tuple[str, tuple[int, ...], int]) -> TaskResult:
    """Devices ``seeds`` of ``kind``, ``n`` readings each, monitored side by side."""
    import numpy as np

    from edge_agent.device.simulator import CLASSES, FEATURES
    from service.drift.device_monitor import DeviceMonitor, update_frames
    from service.ingest.frames import DeviceFrame, DeviceLabels
    from tests.bench.stationary_streams import device_pool, stationary

    kind, seeds, n = args
    t0 = time.perf_counter()
    if kind != "real":
        for s in seeds:
            device_pool(s)  # the simulator's pool (cached per process): timed apart
    pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = [stationary(kind, s, n) for s in seeds]
    lab_idx = [
        np.flatnonzero(np.random.default_rng([s, 0x1ABE1]).random(n) < LABEL_RATE) for s in seeds
    ]
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = [f"{kind}-{s}" for s in seeds]
    mons = [DeviceMonitor("bench", name, FEATURES, CLASSES) for name in names]
    by_key = {("bench", name): m for name, m in zip(names, mons, strict=True)}
    index = {name: j for j, name in enumerate(names)}
    res = [DeviceResult(kind, s, readings=n) for s in seeds]
    bounds = [np.searchsorted(li, np.arange(0, n + K, K)) for li in lab_idx]

    def record(j: int, dets: list[Any], suspicions: list[Any], monitoring: bool) -> None:
        r = res[j]
        if not monitoring:
            r.alarms_calibrating += len(dets) + len(suspicions)
            return
        for d in dets:
            if d.detector == "hddm_a_warning":
                r.warnings += 1
            else:
                r.alarms.append(f"{d.signal}:{d.feature}:{d.detector}@{d.readings}")
        r.suspicions_at += [r.monitored - 1] * len(suspicions)

    for f, lo in enumerate(range(0, n, K)):
        hi = min(lo + K, n)
        states = [is_monitoring(m) for m in mons]
        frames = [
            DeviceFrame(
                "bench", name, 0, f, 1000 * lo, 0.0, 1, d.x[lo:hi], d.pred[lo:hi], d.conf[lo:hi]
            )
            for name, d in zip(names, data, strict=True)
        ]
        batch = update_frames(by_key, frames)
        if batch.rejected:
            raise RuntimeError(f"frames rejected: {batch.rejected[0][1]}")
        for j, st in enumerate(states):
            if st:
                if res[j].start is None:
                    res[j].start = lo
                res[j].monitored += hi - lo
        per_dev: dict[int, tuple[list[Any], list[Any]]] = {}
        for det in batch.detections:
            per_dev.setdefault(index[str(det.device)], ([], []))[0].append(det)
        for det in batch.suspicions:
            per_dev.setdefault(index[str(det.device)], ([], []))[1].append(det)
        for j, (dets, sus) in per_dev.items():
            record(j, dets, sus, states[j])
        if f % POLICY_EVERY == POLICY_EVERY - 1:
            for j, st in enumerate(states):
                if st:
                    res[j].policy_checks += 1
                    feats = {x.signal for x in mons[j].drifting} & {"feature", "feature_var"}
                    res[j].policy_hits += bool(feats)
        for j, d in enumerate(data):
            idx = lab_idx[j][bounds[j][f] : bounds[j][f + 1]]
            if idx.size == 0:
                continue
            st = is_monitoring(mons[j])
            out = mons[j].observe_labels(
                DeviceLabels(
                    "bench", names[j], 0, f, 1000 * lo, 0.0, 1, d.x[idx], d.pred[idx], d.labels[idx]
                )
            )
            if out.alarms or out.suspicions:
                record(j, out.alarms, out.suspicions, st)
    for r, m in zip(res, mons, strict=True):
        r.calibrating_at_end = bool(getattr(m, "calibrating", not is_monitoring(m)))
        rate = m.suspicion_rate
        r.suspicion_rate = math.nan if rate is None else float(rate)
    return TaskResult(kind, res, pool_s, gen_s, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass
class KindSummary:
    kind: str
    devices: int
    monitored: int
    strict: int
    cohort_readings: int
    cohort_windows: int
    cohort: int
    warnings: int
    suspicions: int
    while_calibrating: int
    calibrating_at_end: int
    median_start: float
    top_alarms: list[tuple[str, int]]
    gen_us: float
    mon_us: float
    policy_checks: int = 0
    policy_hits: int = 0
    policy_devices: int = 0
    passed: bool = False


def _poisson_lower(k: int, conf: float = 0.95) -> float:
    from scipy.stats import chi2

    return 0.0 if k == 0 else float(chi2.ppf(1.0 - conf, 2 * k) / 2.0)


def summarise(kind: str, tasks: list[TaskResult], cohort_budget: float) -> KindSummary:
    import numpy as np

    from tests.bench.bench_detection import run_cohort

    devs = sorted((d for t in tasks for d in t.devices), key=lambda d: d.seed)
    cohort_devs = [d for d in devs if d.monitored >= WINDOW and math.isfinite(d.suspicion_rate)]
    n_windows = min((d.monitored for d in cohort_devs), default=0) // WINDOW
    cohort = 0
    if n_windows:
        reports = run_cohort(
            [(d.suspicion_rate, d.suspicions_at) for d in cohort_devs], n_windows, cohort_budget
        )
        cohort = sum(1 for rep in reports if rep.alarm)
    starts = [d.start for d in devs if d.start is not None]
    alarms = Counter(a.split("@")[0] for d in devs for a in d.alarms)
    readings = sum(d.readings for d in devs)
    return KindSummary(
        kind=kind,
        devices=len(devs),
        monitored=sum(d.monitored for d in devs),
        strict=sum(len(d.alarms) for d in devs),
        cohort_readings=n_windows * WINDOW * len(cohort_devs),
        cohort_windows=n_windows,
        cohort=cohort,
        warnings=sum(d.warnings for d in devs),
        suspicions=sum(len(d.suspicions_at) for d in devs),
        while_calibrating=sum(d.alarms_calibrating for d in devs),
        calibrating_at_end=sum(1 for d in devs if d.calibrating_at_end),
        median_start=float(np.median(starts)) if starts else math.nan,
        top_alarms=alarms.most_common(3),
        gen_us=sum(t.gen_s for t in tasks) / max(readings, 1) * 1e6,
        mon_us=sum(t.mon_s for t in tasks) / max(readings, 1) * 1e6,
        policy_checks=sum(d.policy_checks for d in devs),
        policy_hits=sum(d.policy_hits for d in devs),
        policy_devices=sum(1 for d in devs if d.policy_hits),
    )


def _per_1e6(k: int, n: int) -> float:
    return k / n * 1e6 if n else math.nan


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report; exit code 1 if a kind fails."""
    from tests.bench.stationary_streams import KINDS

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=None, help=f"per kind ({DEFAULT_DEVICES})")
    ap.add_argument(
        "--readings-per-device", type=int, default=None, help=f"default {DEFAULT_READINGS:,}"
    )
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--group", type=int, default=None, help="devices per task (default: devices / 4, ≥ 1)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_DEVICES} devices × {QUICK_READINGS:,} readings per kind",
    )
    args = ap.parse_args(argv)
    devices = args.devices or (QUICK_DEVICES if args.quick else DEFAULT_DEVICES)
    n = args.readings_per_device or (QUICK_READINGS if args.quick else DEFAULT_READINGS)
    group = args.group or max(1, math.ceil(devices / 4))

    import numpy as np

    from service.drift.device_monitor import DeviceMonitorConfig
    from tests.bench.bench_detection import _poisson_upper

    t_start = time.perf_counter()
    cfg = DeviceMonitorConfig()
    print("tinydrift layer-A false alarms on stationary telemetry")
    print(
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}, numpy {np.__version__}; {args.workers} workers"
    )
    print(
        f"{devices} devices × {n:,} readings per kind{' (--quick)' if args.quick else ''}; "
        f"kinds {', '.join(args.kinds)}; frames of {K} via update_frames, {LABEL_RATE:.0%} "
        f"labelled (each frame's labels right after it); cohort windows of {WINDOW} readings"
    )
    print(
        f"budgets: strict device alarms {cfg.strict_budget:g} per device-reading "
        f"({cfg.strict_budget * 1e6:g} per 1e6), cohort rule {cfg.cohort_budget:g} "
        f"({cfg.cohort_budget * 1e6:g} per 1e6); PASS = both within {BUDGET_FACTOR:g}× the budget"
    )
    if "real" in args.kinds:
        from tests.bench.stationary_streams import real_summary

        rs = real_summary()
        print(
            f"real: {rs['source']}; {rs['recordings']} recordings of {rs['subjects']} subjects, "
            f"{rs['minutes']:.1f} min, {rs['readings']:,} readings (2 s windows, hop "
            f"{rs['hop_s']:g} s); devices loop over their subject's recordings; true class = "
            f"exercise → model majority {rs['exercise_class']} (error rate "
            f"{rs['error_rate']:.1%})"
        )
    sys.stdout.flush()

    jobs = [
        (kind, tuple(range(lo, min(lo + group, devices))), n)
        for lo in range(0, devices, group)
        for kind in args.kinds
    ]
    by_kind: dict[str, list[TaskResult]] = {k: [] for k in args.kinds}
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        futures = {pool.submit(run_task, j): j for j in jobs}
        for done, fut in enumerate(as_completed(futures), 1):
            tr = fut.result()
            by_kind[tr.kind].append(tr)
            seeds = futures[fut][1]
            strict = sum(len(d.alarms) for d in tr.devices)
            sus = sum(len(d.suspicions_at) for d in tr.devices)
            print(
                f"  [{done}/{len(jobs)}] {tr.kind:<12} devices {seeds[0]}-{seeds[-1]}: "
                f"{strict} strict alarms, {sus} suspicions; pools {tr.pool_s:.1f} s, "
                f"generation {tr.gen_s:.1f} s, "
                f"monitor {tr.mon_s:.1f} s ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )

    summaries = [summarise(k, by_kind[k], cfg.cohort_budget) for k in args.kinds]
    print()
    print(
        f"{'kind':<13}{'monitored':>12}{'strict':>8}{'/1e6':>9}{'95%up':>9}"
        f"{'cohort dev-r':>14}{'cohort':>7}{'/1e6':>9}{'95%up':>9}  verdict"
    )
    ok = True
    for s in summaries:
        s_rate = _per_1e6(s.strict, s.monitored)
        s_up = _per_1e6(1, s.monitored) * _poisson_upper(s.strict)
        c_rate = _per_1e6(s.cohort, s.cohort_readings)
        c_up = _per_1e6(1, s.cohort_readings) * _poisson_upper(s.cohort)
        s_lim = BUDGET_FACTOR * cfg.strict_budget * 1e6
        c_lim = BUDGET_FACTOR * cfg.cohort_budget * 1e6
        s.passed = s_rate <= s_lim and c_rate <= c_lim
        sig = (_per_1e6(1, s.monitored) * _poisson_lower(s.strict) > s_lim) or (
            _per_1e6(1, s.cohort_readings) * _poisson_lower(s.cohort) > c_lim
        )
        verdict = "PASS" if s.passed else ("FAIL (sig.)" if sig else "FAIL")
        if s.monitored == 0:
            verdict = "NO DATA (never monitored)"
        ok &= s.passed
        print(
            f"{s.kind:<13}{s.monitored:>12,}{s.strict:>8,}{s_rate:>9.3g}{s_up:>9.3g}"
            f"{s.cohort_readings:>14,}{s.cohort:>7,}{c_rate:>9.3g}{c_up:>9.3g}  {verdict}"
        )
    print()
    print(
        f"{'kind':<13}{'calib. at end':>14}{'median start':>13}{'in calib.':>10}{'warnings':>9}"
        f"{'susp./1e6':>10}{'gen µs/r':>9}{'mon µs/r':>9}  top strict alarms"
    )
    for s in summaries:
        top = ", ".join(f"{a} ({c})" for a, c in s.top_alarms) or "-"
        print(
            f"{s.kind:<13}{s.calibrating_at_end:>14}{s.median_start:>13,.0f}"
            f"{s.while_calibrating:>10,}{s.warnings:>9,}"
            f"{_per_1e6(s.suspicions, s.monitored):>10.4g}{s.gen_us:>9.2f}{s.mon_us:>9.2f}  {top}"
        )
    print(
        "  (calib. at end: devices with a stream still calibrating after their last reading; "
        "median start: readings until the first stream was monitored; in calib.: detections "
        "and suspicions before that (none can fire: a check), not counted; "
        "warnings: hddm_a_warning, not alarms; susp.: suspicions per "
        "1e6 monitored readings; µs per reading of data generation (pools apart) and of the "
        "monitor, per worker)"
    )
    print()
    print("what the update policy would see (a feature stream in mon.drifting: a recalibration")
    print(f"proposal for the device), looked at every {POLICY_EVERY} frames while monitoring:")
    for s in summaries:
        print(
            f"  {s.kind:<13}{s.policy_hits:>6,} of {s.policy_checks:>7,} looks "
            f"({_per_1e6(s.policy_hits, s.policy_checks) / 1e4:.3g} %), "
            f"{s.policy_devices} of {s.devices} devices"
        )
    print(f"total {time.perf_counter() - t_start:.0f} s wall")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
