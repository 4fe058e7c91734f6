"""Benchmark: time from a drift decision to a signed candidate blob.

(a) label-free recalibration of one device from its reference and 1,024 recent readings;
(b) a retrain (river ``learn_one``, test-then-train) on 10,000 labelled readings plus a
2,500-reading held-out tail. Both include the gate (evaluation, quantization) and Ed25519
signing; the factory bundle is created before the clock starts. Run:
``python tests/bench/bench_candidates.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from edge_agent.device.simulator import DriftSpec, SensorSimulator, window_times
from service.firmware_bundle import create_bundle
from service.learn.candidate import build_candidate
from service.learn.deployed import DeployedModel
from service.learn.recalibration import recalibrate
from service.learn.retrain import retrain


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _time(fn: object, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    """Print the two timings and the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = create_bundle(Path(tmp), seed=0)
        deployed = DeployedModel.from_blob((bundle.firmware_dir / "factory.blob").read_bytes())
    key = bundle.release_key

    s = SensorSimulator(seed=11, drift=DriftSpec("gain", start_s=2048.0))
    x = s.sample(2048, t=window_times(2048)).features
    reference = (x[:512].mean(axis=0), x[:512].std(axis=0))
    recent = x[1024:]

    def recal() -> None:
        cand = recalibrate(deployed, reference, recent)
        res = build_candidate(deployed, cand, key=key, param_version=2, recent=recent)
        assert res.blob is not None, res.report.reason

    n_train, n_hold = 10_000, 2_500
    c = SensorSimulator(seed=21, drift=DriftSpec("concept", start_s=0.0))
    sample = c.sample(n_train + n_hold, t=window_times(n_train + n_hold))
    xl, yl = sample.features, sample.labels
    reports = []

    def retr() -> None:
        cand = retrain(deployed, xl[:n_train], yl[:n_train], holdout=(xl[n_train:], yl[n_train:]))
        res = build_candidate(deployed, cand, key=key, param_version=2)
        assert res.blob is not None, res.report.reason
        reports.append(res.report)

    t_recal = _time(recal, 20)
    t_retrain = _time(retr, 5)
    r = reports[-1]
    system = f"{platform.system()} {platform.release()}"
    print(
        f"machine: {platform.machine()} {_cpu()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {system}"
    )
    med, best = 1e3 * statistics.median(t_recal), 1e3 * min(t_recal)
    print(
        "(a) recalibration, 1024 recent readings -> signed blob: "
        f"median {med:.1f} ms (min {best:.1f}, n=20)"
    )
    print(f"(b) retrain on {n_train} labelled readings (+{n_hold} held out) -> signed blob: median "
          f"{statistics.median(t_retrain):.2f} s (min {min(t_retrain):.2f}, n=5)")  # fmt: skip
    print(f"    retrain scores: deployed {r.deployed_accuracy:.3f}, candidate fixed "
          f"{r.candidate_fixed_accuracy:.3f}, float {r.candidate_float_accuracy:.3f}, "
          f"agreement {r.agreement:.3f}, prequential {r.prequential_candidate_accuracy:.3f} vs "
          f"{r.prequential_deployed_accuracy:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
