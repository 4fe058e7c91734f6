"""Layer B benchmark: evaluation time, add() throughput, false cohort alarms, detection power.

Run as a script: ``python tests/bench/bench_cohort.py [--quick]`` (about 3 minutes on 2 vCPUs;
``--quick`` shrinks every part). Importing this module does nothing.

Data: the simulated fleet (``SensorSimulator``) with the factory model's integer kernel, as the
device agent computes it — features held as Q4.11, predictions and u8 confidences from
``QuantizedLinear``; 8 features, 4 classes; frames of 16 readings; 64 readings per device per
window (the default ``CohortConfig``).

1. **Timing** (1,000 and 10,000 devices): each device draws its readings, per window, from a pool
   of 1,024 simulated readings of one of 256 simulated devices (simulating 10,000 devices
   afresh every window would take longer than the benchmark budget; the monitor's cost does
   not depend on where the values came from). Frames are built before the clock starts.
   Reported: ``add()`` throughput in readings/s (including the vectorised accumulation it
   triggers and the one at ``evaluate``), ``evaluate()`` per window during the reference and
   on tested windows (median and max; the first tested window also simulates the null
   tables), checkpoint size.
2. **False alarms**: 200 freshly simulated stationary devices over 20 reference and
   ``--null-windows`` (150) tested windows: cohort alarms, windows with any device discovery
   (Holm: ≤ 1 % expected), device alarms (a discovery in two consecutive windows), PCA alarms,
   and the per-test rate of p ≤ 0.01 / 0.001.
3. **Power**: 1,000 devices; after the 20 reference windows (simulated once, the monitor then
   checkpointed and restored for each case, the simulators copied), 10 % of the devices get a
   drift switched on (abrupt) and 4 windows are tested. For each drift kind at the simulator's
   default magnitude and at two weaker ones: recall (share of drifted devices discovered per
   window), falsely discovered devices per window, alarm recall (share of drifted devices in
   device alarm per window, from the second tested window on: an alarm needs two windows),
   falsely alarmed devices, cohort alarm rate, PCA alarm rate, the accuracy estimate against
   the realised accuracy.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

N_PER_WINDOW = 64
BATCH = 16
WINDOW_MS = 300_000


@dataclass
class Fleet:
    """Simulators, the model and how to turn a window into frames."""

    model: object
    sims: list

    def window(self, w: int, rng: np.random.Generator, label_rate: float = 0.0):
        """Frames and labels of every device for window ``w``; also the realised accuracy."""
        from edge_agent.device.simulator import window_times
        from service.ingest.frames import DeviceFrame, DeviceLabels

        model = self.model
        frames, labels = [], []
        correct = 0
        for d, sim in enumerate(self.sims):
            s = sim.sample(N_PER_WINDOW, t=window_times(N_PER_WINDOW, w * N_PER_WINDOW * 2.0))
            held = np.round(s.features * 2048) / 2048
            logits = model.logits(held)
            pred = model.decide(logits)
            conf = model.confidence(logits).astype(np.float64) / 256.0
            correct += int((pred == s.labels).sum())
            name = f"dev-{d:05d}"
            for i in range(0, N_PER_WINDOW, BATCH):
                sl = slice(i, i + BATCH)
                frames.append(
                    DeviceFrame(
                        "bench",
                        name,
                        0,
                        w * 8 + i,
                        w * WINDOW_MS,
                        0.0,
                        1,
                        held[sl],
                        pred[sl],
                        conf[sl],
                    )
                )
            if label_rate:
                ch = np.flatnonzero(rng.random(N_PER_WINDOW) < label_rate)
                labels.append(
                    DeviceLabels(
                        "bench", name, 0, w, w * WINDOW_MS, 0.0, 1, held[ch], pred[ch], s.labels[ch]
                    )
                )
        return frames, labels, correct / (len(self.sims) * N_PER_WINDOW)


def factory_model():
    from service.learn.factory_model import train_factory_model

    return train_factory_model(seed=0).quantize()


def new_monitor(model):
    from edge_agent.device.simulator import CLASSES, FEATURES
    from service.drift.cohort_monitor import CohortConfig, CohortMonitor

    return CohortMonitor(
        "bench", 1, FEATURES, CLASSES, model.mu, model.inv_sigma, CohortConfig(), model=model
    )


def feed(mon, frames, labels=()) -> float:
    t0 = time.perf_counter()
    for fr in frames:
        mon.add(fr)
    for lb in labels:
        mon.add_labels(lb)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# 1. timing
# ------------------------------------------------------------------------------------------------


def timing(model, devices: int, test_windows: int, pool_devices: int = 256) -> None:
    from edge_agent.device.simulator import SensorSimulator, window_times
    from service.drift.cohort_monitor import CohortMonitor
    from service.ingest.frames import DeviceFrame

    pool = []
    for d in range(pool_devices):
        s = SensorSimulator(50_000 + d).sample(1024, t=window_times(1024))
        held = np.round(s.features * 2048) / 2048
        logits = model.logits(held)
        pool.append((held, model.decide(logits), model.confidence(logits) / 256.0))
    rng = np.random.default_rng(0)
    mon = new_monitor(model)
    ref_eval, test_eval, add_rates = [], [], []
    first_test = None
    windows = 20 + test_windows
    for w in range(windows):
        frames = []
        for d in range(devices):
            held, pred, conf = pool[d % pool_devices]
            idx = rng.integers(0, held.shape[0], N_PER_WINDOW)
            for i in range(0, N_PER_WINDOW, BATCH):
                j = idx[i : i + BATCH]
                frames.append(
                    DeviceFrame(
                        "bench",
                        f"dev-{d:05d}",
                        0,
                        w,
                        w * WINDOW_MS,
                        0.0,
                        1,
                        held[j],
                        pred[j],
                        conf[j],
                    )
                )
        t_add = feed(mon, frames)
        t0 = time.perf_counter()
        mon._flush()  # the accumulation add() defers belongs to add()'s cost
        t_add += time.perf_counter() - t0
        add_rates.append(devices * N_PER_WINDOW / t_add)
        t0 = time.perf_counter()
        report = mon.evaluate(now_ms=(w + 1) * WINDOW_MS)
        dt = time.perf_counter() - t0
        if w < 20:
            ref_eval.append(dt)
        elif first_test is None:
            first_test = dt
        else:
            test_eval.append(dt)
    t0 = time.perf_counter()
    blob = mon.state_bytes()
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    CohortMonitor.from_state_bytes(blob, model=model)
    t_load = time.perf_counter() - t0
    print(
        f"  {devices:>6,} devices | add() {statistics.median(add_rates) / 1e6:5.2f} M readings/s "
        f"| evaluate: reference window {statistics.median(ref_eval) * 1e3:6.1f} ms, "
        f"tested window median {statistics.median(test_eval) * 1e3:6.1f} ms "
        f"(max {max(test_eval) * 1e3:6.1f} ms; first, with null tables, "
        f"{first_test * 1e3:6.1f} ms) | {report.n_tests:,} tests/window | checkpoint "
        f"{len(blob) / 2**20:5.2f} MiB ({len(blob) / devices / 1024:4.2f} KiB/device), "
        f"save {t_save * 1e3:.0f} ms, load {t_load * 1e3:.0f} ms"
    )


# ------------------------------------------------------------------------------------------------
# 2. false alarms
# ------------------------------------------------------------------------------------------------


def false_alarms(model, devices: int, windows: int) -> None:
    from edge_agent.device.simulator import SensorSimulator

    fleet = Fleet(model, [SensorSimulator(70_000 + d) for d in range(devices)])
    mon = new_monitor(model)
    rng = np.random.default_rng(1)
    alarms = any_disc = disc_pairs = dev_alarms = pca = 0
    pvals = []
    for w in range(20 + windows):
        frames, labels, _ = fleet.window(w, rng, label_rate=0.1)
        feed(mon, frames, labels)
        r = mon.evaluate(now_ms=(w + 1) * WINDOW_MS)
        if not r.reference_complete:
            continue
        alarms += r.cohort_alarm
        any_disc += bool(r.drifting_devices)
        disc_pairs += sum(len(d.signals) for d in r.drifting_devices)
        dev_alarms += r.devices_alarmed
        pca += bool(r.pca_error is not None and r.pca_error > r.pca_threshold)
        pvals.append(mon.last_p_values[np.isfinite(mon.last_p_values)])
    p = np.concatenate(pvals)
    print(
        f"  {devices} stationary devices, {windows} tested windows ({p.size:,} tests): "
        f"cohort alarms {alarms}/{windows}; windows with any device discovery "
        f"{any_disc}/{windows} (Holm bound ≤ {0.01 * windows:.1f} expected); discovered "
        f"device-signals {disc_pairs}; device alarms {dev_alarms}; PCA alarms {pca}/{windows} "
        f"(nominal "
        f"{0.00135 * windows:.2f}); P(p ≤ 0.01) = {np.mean(p <= 0.01):.4f}, "
        f"P(p ≤ 0.001) = {np.mean(p <= 0.001):.5f}; dispersion φ "
        f"{min(r.dispersion.values()):.2f}–{max(r.dispersion.values()):.2f}"
    )


# ------------------------------------------------------------------------------------------------
# 3. power
# ------------------------------------------------------------------------------------------------


def power(model, devices: int, test_windows: int) -> None:
    from edge_agent.device.simulator import DEFAULT_MAGNITUDE, DriftSpec, SensorSimulator
    from service.drift.cohort_monitor import CohortMonitor

    sims = [SensorSimulator(90_000 + d) for d in range(devices)]
    fleet = Fleet(model, sims)
    mon = new_monitor(model)
    rng = np.random.default_rng(2)
    for w in range(20):
        frames, labels, _ = fleet.window(w, rng, label_rate=0.1)
        feed(mon, frames, labels)
        mon.evaluate(now_ms=(w + 1) * WINDOW_MS)
    saved = mon.state_bytes()
    n_drift = devices // 10
    drifted = set(range(n_drift))
    cases = [
        ("none", 0.0),
        ("gain", DEFAULT_MAGNITUDE["gain"]),
        ("gain", 0.1),
        ("gain", 0.03),
        ("offset", DEFAULT_MAGNITUDE["offset"]),
        ("offset", 0.05),
        ("offset", 0.02),
        ("noise", DEFAULT_MAGNITUDE["noise"]),
        ("noise", 0.03),
        ("noise", 0.01),
        ("prior", DEFAULT_MAGNITUDE["prior"]),
        ("prior", 0.45),
    ]
    print(
        f"  {devices} devices, {n_drift} drifted (abrupt, after the 20 reference windows), "
        f"{test_windows} tested windows each:"
    )
    print(
        "    drift            recall  false dev/win  alarm recall  false alarms  cohort alarm  "
        "PCA alarm  estimate / realised acc.  top signal"
    )
    for kind, mag in cases:
        case_sims = copy.deepcopy(sims)
        for d in drifted:
            if kind != "none":
                case_sims[d].drift = DriftSpec(kind, start_s=0.0, magnitude=mag)
        case = Fleet(model, case_sims)
        m = CohortMonitor.from_state_bytes(saved, model=model)
        crng = np.random.default_rng(3)
        rec, false, alarm, pca, est, real = [], [], 0, 0, [], []
        rec_alarm, false_alarm = [], 0
        signals: dict[str, int] = {}
        for w in range(20, 20 + test_windows):
            frames, labels, acc = case.window(w, crng, label_rate=0.1)
            feed(m, frames, labels)
            r = m.evaluate(now_ms=(w + 1) * WINDOW_MS)
            found = {int(d.device.split("-")[1]) for d in r.drifting_devices}
            rec.append(len(found & drifted) / n_drift)
            false.append(len(found - drifted))
            in_alarm = {int(d.device.split("-")[1]) for d in r.drifting_devices if d.alarm}
            if w > 20:
                rec_alarm.append(len(in_alarm & drifted) / n_drift)
            false_alarm += len(in_alarm - drifted)
            alarm += r.cohort_alarm
            pca += bool(r.pca_error > r.pca_threshold)
            est.append(r.accuracy.estimate)
            real.append(acc)
            for dd in r.drifting_devices:
                for s in dd.signals:
                    key = s.feature or s.signal
                    signals[key] = signals.get(key, 0) + 1
        top = max(signals, key=lambda k: signals[k]) if signals else "-"
        label = "none" if kind == "none" else f"{kind} {mag:g}"
        recall = "   -  " if kind == "none" else f"{np.mean(rec):6.2f}"
        a_recall = "     -" if kind == "none" or not rec_alarm else f"{np.mean(rec_alarm):6.2f}"
        print(
            f"    {label:<15} {recall}  {np.mean(false):13.2f}  {a_recall:>12}  {false_alarm:>12}"
            f"  {alarm:>6}/{test_windows:<5}"
            f"  {pca:>4}/{test_windows:<4}  {np.mean(est):.3f} / {np.mean(real):.3f}"
            f"            {top}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller fleets and fewer windows")
    ap.add_argument("--null-windows", type=int, default=150)
    args = ap.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print("CohortConfig() defaults; 8 features, 4 classes, 64 readings/device/window, frames of 16")
    model = factory_model()
    print("\n1. timing")
    for devices in (1_000, 10_000):
        timing(model, devices if not quick else devices // 10, test_windows=4 if quick else 8)
    print("\n2. false alarms on a stationary fleet")
    false_alarms(model, 60 if quick else 200, 20 if quick else args.null_windows)
    print("\n3. detection power, drift on 10 % of the devices")
    power(model, 200 if quick else 1_000, 2 if quick else 4)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
