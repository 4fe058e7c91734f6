"""Label-only concept changes at 10 % labelling: layer A's error stream vs river ADWIN.

Run as a script::

    python tests/bench/bench_concept.py [--runs 20] [--change 12000 50000]
        [--kinds sea agrawal walk_run] [--horizon-labels 20000] [--workers 2] [--quick]
    python tests/bench/bench_concept.py --null [--null-budget 2.4e-3] [--null-kinds iid ...]

Importing this module does nothing: the project and river are imported inside functions.

Kinds (:data:`KINDS`): a concept change the inputs do not show (the features, the model's
predictions and confidences keep their distribution; only the labels' relation to the inputs
changes), so only the labelled error stream can see it.

- ``sea``: river ``synth.ConceptDriftStream`` from ``synth.SEA(variant=0, noise=0.1)`` (label
  ``x0 + x1 > 8``, 10 % of the labels flipped) to ``SEA(variant=1, noise=0.1)`` (``> 9``):
  about 10.6 % → 16.5 % error;
- ``sea_small`` (not run by default): SEA variant 3 (``> 9.5``) → 1 (``> 9``): about
  11.9 % → 14.9 %;
- ``agrawal``: ``synth.Agrawal(classification_function=6)`` → function 8
  (``perturbation=0.05``): the "disposable income" rule gains ``− loan / 5 + 10,000``: about
  3.6 % → 7.2 % error;
- ``walk_run``: ``bench_detection``'s ``concept_small`` (its code, reused): the simulated
  accelerometer device, each walk or run reading labelled as the other with probability
  ``SMALL_SWAP`` = 0.15 from the change on: about 11.2 % → 17.1 %.

Models. For the river kinds the device model is ``preprocessing.StandardScaler |
linear_model.LogisticRegression`` (SGD, learning rate 0.01) trained online on
:data:`TRAIN_READINGS` readings of the kind's first concept (its own seed, 0), then frozen: it
is exported (``service.learn.river_export.export_linear``) and quantised to the device's int8
kernel (``FloatLinearModel.quantize``), and every prediction and confidence in the benchmark
comes from that integer kernel, as a deployed tinydrift device computes them. Why logistic
regression: it is what a tinydrift device runs (the v1 kernel covers river's linear
classifiers after ``StandardScaler``), and both concepts used here are linear rules
(``x0 + x1`` against a threshold; disposable income against 0), so the frozen model is good
before the change (a low p0) and the change costs it a few points. A Hoeffding tree would
have to be approximated by axis-aligned splits on SEA's diagonal boundary and has no device
kernel. ``walk_run`` uses ``bench_detection``'s quantised factory model.

Runs. Each run is one device: one ``DeviceMonitor`` at its defaults, frames of 16 readings
(``observe``), 10 % of the readings labelled (each frame's labels right after it,
``observe_labels``). The change comes after ``max(change, C)`` readings, where ``change`` is a
``--change`` value and ``C`` the first reading at which the monitor is fully calibrated
(``calibration().state == "monitoring"`` and ``error_ready``); a device not calibrated by then
runs on in steps of 1,024 readings (``bench_detection.EXTEND``), and one not calibrated by
``bench_detection.CHANGE_MAX`` is excluded (counted). The default placements are 12,000
readings (``bench_detection``'s, about 1,200 labels before the change) and 50,000 (about 5,000
labels: a device that has run 14 hours at one reading per second). For the river kinds the
pre-change readings are the first concept's dataset; at the change the run continues with
river's ``ConceptDriftStream(stream=<the first dataset, continued>, drift_stream=<the second
concept's dataset>, position=0, width=1)``, which draws the second concept with probability
``1 / (1 + exp(−4 (t − position) / width))`` at its ``t``-th sample: 0.982 for the first reading
after the change, then 1 to within 10⁻⁶. (A single ``ConceptDriftStream`` from the first reading
cannot be used: the change point depends on when the monitor is calibrated, and river's
``exp`` overflows more than 177 widths before the position.)

Detectors, all fed the same labelled errors ``1[pred ≠ label]``:

- **A strict**: the monitor's device alarms on the error stream (the first one after the
  change; its detector is recorded). Alarms on signal streams are false alarms here (nothing
  else changed) and are counted apart;
- **ADWIN()**: river ``ADWIN()`` at its defaults, one per run, fed every labelled reading's
  error from reading 512 on (``bench_detection``'s baselines' start);
- **ADWIN(δ_FA)**: river ADWIN at the δ that gives it the false-alarm rate the strict tier's
  error detectors may spend per labelled reading, ``ERROR_DETECTORS · B_strict / D``
  (``D = S + ERROR_DETECTORS``), chosen as ``bench_detection.choose_delta_fa`` does: ADWIN's
  rate per label measured at every δ of :data:`ERROR_DELTA_GRID` on i.i.d.
  Bernoulli(p0) errors (``--fa-labels`` per δ; p0 from :data:`P0_READINGS` readings of the
  kind's first concept), the largest δ whose rate (measured from ≥ 5 alarms, else read off the
  power-law fit through the measured points, as are :data:`FA_CANDIDATES` between the grid
  points and ``FIT_GRID`` below them) is at or under the target.

Delay: labelled readings after the change until the alarm (for ours, the labels up to the label
batch that alarmed), and readings (ours: at the end of the triggering frame). Missed: no alarm
within ``--horizon-labels`` labels (default 20,000: 200,000 readings) after the change. A run
stops early once all three detectors alarmed. Median and p90 count a miss as infinite (``∞``).
False alarms before the change: every strict alarm (any stream) from reading 512 to the change
for ours, every error-stream alarm of the baselines there, per 10⁶ readings.

Lorden's bound: ``ln(ARL) / KL(Ber(p1) ‖ Ber(p0))`` labels per run (its median is printed),
ARL = ``D / B_strict`` updates, the inverse of the strict tier's per-detector budget (each
error detector spends ``B_strict / D`` per label), as ``bench_detection`` computes it. It
bounds the worst-case mean delay of a detector that knows p0 exactly; the monitor learns p0
from the labels before the change, so with few of them no detector gets near it: a two-sample
comparison of ``n0`` labels before the change with any number after it cannot separate a shift
δ at false-alarm level α unless ``δ² n0 / (2 p0 (1 − p0))`` exceeds about ``ln(1/α)``.

``--null`` runs something else: the error detectors' own false alarms on stationary telemetry
(``tests/bench/stationary_streams`` kinds ``iid``, ``sessions``, ``real``; ``--null-devices``
× ``--null-readings``, 10 % labelled) at ``--null-budget`` per device-reading (default 2.4·10⁻³,
i.e. 5·10⁻⁵ per label for each error detector, where alarms can be counted): one frame (for
the model version), then the labels alone; alarms per detector once the error stream is
monitored, against the detector's share per label.

Printed: the calibration (block size and κ of the error stream at the change), per placement
and kind the error rates p0 → p1 (measured per run over the labelled readings: p0 from reading
512 to the change, p1 from the change over at least 20,000 readings), per detector missed /
runs, median / p90 delay in labels and readings, the pre-change false alarms, and the median
Lorden bound.
"""

from __future__ import annotations

import argparse
import itertools
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
REFERENCE = 512
"""The baselines start at this reading (``bench_detection``'s reference)."""
TRAIN_READINGS = 20_000
"""Readings of the first concept the river kinds' model is trained on before it is frozen."""
P0_READINGS = 200_000
"""Readings of the first concept whose error rate sets the Bernoulli p0 for δ_FA."""
P1_READINGS = 20_000
"""Post-change readings generated at least (for p1), even when every detector alarmed before."""
CHUNK = 8192
"""Readings generated and fed at a time after the change."""
DEFAULT_CHANGES = (12_000, 50_000)
DEFAULT_RUNS = 20
DEFAULT_HORIZON_LABELS = 20_000
DEFAULT_FA_LABELS = 2_000_000
QUICK_RUNS = 4
QUICK_FA_LABELS = 200_000


@dataclass(frozen=True)
class Kind:
    """One label-only concept change."""

    name: str
    source: str
    """``sea``, ``agrawal`` or ``sim`` (``bench_detection``'s simulated device)."""
    before: int = 0
    """SEA variant or Agrawal function before the change."""
    after: int = 0
    noise: float = 0.0
    """SEA's label noise or Agrawal's perturbation."""
    description: str = ""


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("sea", "sea", 0, 1, 0.1, "SEA(noise 0.1) variant 0 → 1 (threshold 8 → 9)"),
        Kind("sea_small", "sea", 3, 1, 0.1, "SEA(noise 0.1) variant 3 → 1 (threshold 9.5 → 9)"),
        Kind("agrawal", "agrawal", 6, 8, 0.05, "Agrawal(perturbation 0.05) function 6 → 8"),
        Kind("walk_run", "sim", 0, 0, 0.0, "simulator, walk ↔ run labels swapped w.p. 0.15"),
    )
}
DEFAULT_KINDS = ("sea", "agrawal", "walk_run")
ERROR_DELTA_GRID = (0.5, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
"""δ of river ADWIN run on stationary Bernoulli(p0) errors for δ_FA (0/1 values, river's
default clock: alarms are rare below δ = 0.01, so the grid starts higher than
``bench_detection.DELTA_GRID``)."""
FA_CANDIDATES = tuple(10.0 ** (-k / 8.0) for k in range(16, 49))
"""Further δ (10⁻² … 10⁻⁶, 8 per decade) whose rate is only read off the fit, so that δ_FA is
not a whole grid step below the target."""
DETECTORS = ("A strict", "ADWIN()", "ADWIN(δ_FA)")

_MODELS: dict[str, Any] = {}


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.bench import bench_detection

    bench_detection._init_worker()


# ------------------------------------------------------------------------------------------------
# Streams and the frozen model
# ------------------------------------------------------------------------------------------------


def _dataset(kind: Kind, concept: int, seed: int) -> Any:
    from river.datasets import synth

    if kind.source == "sea":
        return synth.SEA(variant=concept, noise=kind.noise, seed=seed)
    return synth.Agrawal(classification_function=concept, perturbation=kind.noise, seed=seed)


def drift_stream(kind: Kind, seed: int, before: Any) -> Any:
    """river's ``ConceptDriftStream`` of run ``seed`` at its change: ``before`` (the first
    concept's iterator, continued) switches to the second concept at once (position 0,
    width 1)."""
    from river import datasets
    from river.datasets import synth

    first = _dataset(kind, kind.before, 2 * seed + 1)

    class Continued(datasets.base.SyntheticDataset):
        """The first concept's dataset from where the run left it."""

        def __init__(self) -> None:
            super().__init__(  # type: ignore[no-untyped-call]
                task=first.task,
                n_features=first.n_features,
                n_samples=first.n_samples,
                n_classes=first.n_classes,
                n_outputs=first.n_outputs,
            )

        def __iter__(self) -> Any:
            return before

    return synth.ConceptDriftStream(
        stream=Continued(),
        drift_stream=_dataset(kind, kind.after, 2 * seed + 2),
        position=0,
        width=1,
        seed=2 * seed + 3,
    )


def take(it: Any, n: int) -> tuple[Any, Any, list[str]]:
    """``n`` samples of a river iterator as ``(X [n, F], y [n], feature names)``."""
    import numpy as np

    xs: list[list[float]] = []
    ys: list[int] = []
    names: list[str] = []
    for x, y in itertools.islice(it, n):
        xs.append([float(v) for v in x.values()])
        ys.append(int(y))
        if not names:
            names = [_name(k) for k in x]
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.int64), names


def _name(key: Any) -> str:
    return f"x{key}" if isinstance(key, int) else str(key)


def frozen_model(kind: Kind) -> Any:
    """The kind's device model: trained online on the first concept, exported, quantised
    (cached per process)."""
    if kind.name in _MODELS:
        return _MODELS[kind.name]
    from river import linear_model, optim, preprocessing

    from service.learn.river_export import export_linear

    pipe: Any = preprocessing.StandardScaler() | linear_model.LogisticRegression(
        optimizer=optim.SGD(0.01)
    )
    names: list[str] = []
    for x, y in itertools.islice(iter(_dataset(kind, kind.before, 0)), TRAIN_READINGS):
        xs = {_name(k): float(v) for k, v in x.items()}
        names = list(xs)
        pipe.learn_one(xs, bool(y))
    model = export_linear(pipe, names, [False, True]).quantize()
    _MODELS[kind.name] = (model, names)
    return model, names


def readings(kind: Kind, x: Any, y: Any) -> Any:
    """The device's view of river samples: the frozen integer model's pred and conf."""
    from tests.bench.bench_detection import Readings

    model, _ = frozen_model(kind)
    logits = model.logits(x)
    return Readings(
        x=x,
        pred=model.decide(logits).astype("int64"),
        conf=model.confidence(logits).astype("float64") / 256.0,
        labels=y,
    )


class Source:
    """Readings of one run, chunk by chunk: before the change, then after it."""

    def __init__(self, kind: Kind, seed: int) -> None:
        self.kind = kind
        self.seed = seed
        self.count = 0
        if kind.source == "sim":
            from edge_agent.device.simulator import SensorSimulator

            self.sim = SensorSimulator(1000 + seed)
            self.swap_rng: Any = None
        else:
            self.it = iter(_dataset(kind, kind.before, 2 * seed + 1))
        self.features: list[str] = []

    def next(self, n: int) -> Any:
        from tests.bench import bench_detection as bd

        if self.kind.source == "sim":
            from edge_agent.device.simulator import window_times

            s = self.sim.sample(n, t=window_times(n, 2.0 * self.count))  # 2 s windows
            r = bd.classify(s.features, s.labels)
            if self.swap_rng is not None:
                r = bd.Readings(r.x, r.pred, r.conf, bd.swap_labels(r.labels, bd.SMALL_SWAP,
                                                                     self.swap_rng))  # fmt: skip
        else:
            x, y, names = take(self.it, n)
            self.features = names
            r = readings(self.kind, x, y)
        self.count += n
        return r

    def switch(self, change: int) -> None:
        """From reading ``change`` on (``count == change``), the second concept."""
        import numpy as np

        assert self.count == change
        if self.kind.source == "sim":
            self.swap_rng = np.random.default_rng([1000 + self.seed, 13])
            return
        self.it = iter(drift_stream(self.kind, self.seed, self.it))


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    kind: str
    change_at: int
    """The ``--change`` placement of the run."""
    seed: int
    change: int = 0
    """Readings before the change (``max(change_at, calibrated)``)."""
    excluded: bool = False
    p0: float = math.nan
    p1: float = math.nan
    labels_before: int = 0
    """Labels from the first reading to the change."""
    error_block: int = 0
    error_kappa: float = math.nan
    delay_labels: dict[str, float] = field(default_factory=dict)
    """Per detector (inf: missed)."""
    delay_readings: dict[str, float] = field(default_factory=dict)
    first_detector: str = ""
    """Which of the strict tier's error detectors alarmed first."""
    per_error_detector: dict[str, float] = field(default_factory=dict)
    """Labels after the change to the first alarm of each strict error detector seen."""
    pre_alarms: dict[str, int] = field(default_factory=dict)
    pre_readings: int = 0
    post_signal_alarms: int = 0
    """Strict alarms on signal streams after the change (false: only labels changed)."""
    streams: int = 0
    seconds: float = 0.0


class Baseline:
    """river ADWIN(δ) on the labelled errors (river's default clock)."""

    def __init__(self, delta: float) -> None:
        from river import drift as river_drift

        drift: Any = river_drift  # river is untyped
        self.det = drift.ADWIN(delta=delta)
        self.alarms = 0

    def feed(self, errors: list[float]) -> int | None:
        """The 1-based index within ``errors`` of the first alarm, if any (all are fed)."""
        first = None
        det = self.det
        for i, e in enumerate(errors):
            det.update(e)
            if det.drift_detected:
                self.alarms += 1
                if first is None:
                    first = i + 1
        return first


def _feed_monitor(
    mon: Any, r: Any, labelled: Any, count0: int, want_cal: bool
) -> tuple[list[tuple[Any, int]], int | None]:
    """Frames of ``K`` of ``r`` (readings ``count0 + 1 …``), each frame's labels after it.

    Returns (every strict alarm, ``hddm_a_warning`` excepted (warnings are not alarms), with
    the number of labels of ``r`` fed up to it, the reading count at which the monitor became
    fully calibrated if it did here and ``want_cal``).
    """
    import numpy as np

    from service.ingest.frames import DeviceFrame, DeviceLabels

    out: list[tuple[Any, int]] = []
    cal: int | None = None
    labels_fed = 0
    name = mon.device
    n = r.x.shape[0]
    for lo in range(0, n, K):
        hi = min(lo + K, n)
        sl = slice(lo, hi)
        seq = (count0 + lo) // K
        ts = 1000 * (count0 + lo)
        fr = DeviceFrame("bench", name, 0, seq, ts, 0.0, 1, r.x[sl], r.pred[sl], r.conf[sl])
        out += [(d, labels_fed) for d in mon.observe(fr).alarms]
        idx = np.flatnonzero(labelled[sl]) + lo
        if idx.size:
            labels_fed += int(idx.size)
            lb = DeviceLabels(
                "bench", name, 0, seq, ts, 0.0, 1, r.x[idx], r.pred[idx], r.labels[idx]
            )
            alarms = mon.observe_labels(lb).alarms
            out += [(d, labels_fed) for d in alarms if d.detector != "hddm_a_warning"]
        if want_cal and cal is None:
            st = mon.calibration()
            if st.state == "monitoring" and st.error_ready:
                cal = count0 + hi
    return out, cal


def run_task(args: tuple[str, int, int, int, dict[str, float]]) -> RunResult:
    """One device of ``kind``: to its change, then the change until every detector alarmed or
    the horizon."""
    import numpy as np

    from service.drift.device_monitor import DeviceMonitor
    from tests.bench import bench_detection as bd

    kind_name, change_at, seed, horizon_labels, deltas = args
    t0 = time.perf_counter()
    kind = KINDS[kind_name]
    res = RunResult(kind_name, change_at, seed)
    src = Source(kind, seed)
    lab_rng = np.random.default_rng([seed, 0x1ABE1, change_at])
    first = src.next(change_at)
    features = src.features or list(_features(kind))
    classes = ["still", "walk", "run", "cycle"] if kind.source == "sim" else ["no", "yes"]
    mon = DeviceMonitor("bench", f"{kind_name}-{seed}", features, classes)
    res.streams = mon.layout.n_streams
    lab = lab_rng.random(change_at) < LABEL_RATE
    pre_alarms, cal = _feed_monitor(mon, first, lab, 0, True)
    pre = [first]
    pre_lab = [lab]
    change = change_at
    while cal is None and change < bd.CHANGE_MAX:
        more = src.next(bd.EXTEND)
        more_lab = lab_rng.random(bd.EXTEND) < LABEL_RATE
        dets, cal = _feed_monitor(mon, more, more_lab, change, True)
        pre_alarms += dets
        pre.append(more)
        pre_lab.append(more_lab)
        change += bd.EXTEND
    res.change = change
    if cal is None:
        res.excluded = True
        res.seconds = time.perf_counter() - t0
        return res
    st = mon.calibration()
    res.error_block = st.error_block_labels
    res.error_kappa = float(getattr(mon, "_err_kappa", math.nan))
    res.pre_alarms["A strict"] = len(pre_alarms)
    res.pre_readings = change - REFERENCE
    errors = np.concatenate([(p.pred != p.labels) for p in pre]).astype(np.float64)
    labelled = np.concatenate(pre_lab)
    res.labels_before = int(labelled.sum())
    base_err = errors[REFERENCE:][labelled[REFERENCE:]]
    res.p0 = float(base_err.mean())
    baselines = {name: Baseline(deltas[name]) for name in ("ADWIN()", "ADWIN(δ_FA)")}
    for name, b in baselines.items():
        b.feed(base_err.tolist())
        res.pre_alarms[name] = b.alarms
    # the change
    src.switch(change)
    fed = 0
    labels_after = 0
    post_err: list[Any] = []
    found: dict[str, tuple[int, int]] = {}
    while labels_after < horizon_labels:
        r = src.next(CHUNK)
        lab = lab_rng.random(CHUNK) < LABEL_RATE
        err = (r.pred != r.labels).astype(np.float64)
        post_err.append(err[lab])
        dets, _ = _feed_monitor(mon, r, lab, change + fed, False)
        for d, n_lab in dets:
            if d.signal != "error":
                res.post_signal_alarms += 1
                continue
            res.per_error_detector.setdefault(d.detector, float(labels_after + n_lab))
            if "A strict" not in found:
                found["A strict"] = (labels_after + n_lab, d.readings - change)
                res.first_detector = d.detector
        lab_pos = np.flatnonzero(lab)
        for name, b in baselines.items():
            if name in found:
                continue
            i = b.feed(err[lab].tolist())
            if i is not None:
                found[name] = (labels_after + i, fed + int(lab_pos[i - 1]) + 1)
        fed += CHUNK
        labels_after += int(lab.sum())
        if len(found) == len(DETECTORS) and fed >= P1_READINGS:
            break
    for name in DETECTORS:
        lab_n, read_n = found.get(name, (math.inf, math.inf))
        if lab_n > horizon_labels:
            lab_n = read_n = math.inf
        res.delay_labels[name] = float(lab_n)
        res.delay_readings[name] = float(read_n)
    res.p1 = float(np.concatenate(post_err).mean())
    res.seconds = time.perf_counter() - t0
    return res


def _features(kind: Kind) -> list[str]:
    from edge_agent.device.simulator import FEATURES

    return list(FEATURES)


# ------------------------------------------------------------------------------------------------
# δ_FA
# ------------------------------------------------------------------------------------------------


def kind_p0(kind_name: str) -> float:
    """The frozen model's error rate on :data:`P0_READINGS` readings of the first concept (its
    own seed); ``walk_run``: on the simulator's stationary devices' pools."""
    import numpy as np

    kind = KINDS[kind_name]
    if kind.source == "sim":
        from tests.bench.bench_detection import POOL, simulate

        n = P0_READINGS // POOL
        errs = [np.mean(r.pred != r.labels) for r in (simulate(5000 + s, POOL) for s in range(n))]
        return float(np.mean(errs))
    x, y, _ = take(iter(_dataset(kind, kind.before, 10**6)), P0_READINGS)
    r = readings(kind, x, y)
    return float(np.mean(r.pred != r.labels))


def adwin_rate_task(args: tuple[float, float, int, int]) -> tuple[float, int]:
    """Alarms of river ADWIN(δ) (default clock) on ``n`` i.i.d. Bernoulli(p) errors."""
    import numpy as np
    from river import drift as river_drift

    drift: Any = river_drift  # river is untyped
    p, delta, n, seed = args
    rng = np.random.default_rng(seed)
    det = drift.ADWIN(delta=delta)
    alarms = 0
    for lo in range(0, n, 1_000_000):
        for v in (rng.random(min(1_000_000, n - lo)) < p).astype(np.float64).tolist():
            det.update(v)
            if det.drift_detected:
                alarms += 1
    return delta, alarms


# ------------------------------------------------------------------------------------------------
# The error detectors' false alarms at a measurable budget
# ------------------------------------------------------------------------------------------------


def null_task(args: tuple[str, int, int, float]) -> dict[str, Any]:
    """Device ``seed`` of ``tests.bench.stationary_streams`` kind ``kind``: ``n`` readings,
    10 % labelled, the labels alone through a monitor at budget ``budget`` (one frame first,
    for the model version; the error stream sees nothing but labels). Error-stream alarms per
    detector, counted once the error stream is monitored."""
    import numpy as np

    from edge_agent.device.simulator import CLASSES, FEATURES
    from service.drift.device_monitor import DeviceMonitor, DeviceMonitorConfig
    from service.ingest.frames import DeviceFrame, DeviceLabels
    from tests.bench.stationary_streams import stationary

    kind, seed, n, budget = args
    r = stationary(kind, seed, n)
    idx = np.flatnonzero(np.random.default_rng([seed, 0x1ABE1]).random(n) < LABEL_RATE)
    mon = DeviceMonitor("bench", f"{kind}-{seed}", FEATURES, CLASSES,
                        DeviceMonitorConfig(budget_per_device_reading=budget))  # fmt: skip
    mon.observe(DeviceFrame("bench", mon.device, 0, 0, 0, 0.0, 1, r.x[:K], r.pred[:K], r.conf[:K]))
    alarms: Counter[str] = Counter()
    monitored = 0
    step = 64
    for lo in range(0, idx.size, step):
        j = idx[lo : lo + step]
        ready = mon.calibration().error_ready
        out = mon.observe_labels(
            DeviceLabels("bench", mon.device, 0, 1 + lo // step, 0, 0.0, 1, r.x[j], r.pred[j],
                         r.labels[j])
        )  # fmt: skip
        if ready:
            monitored += int(j.size)
            alarms.update(d.detector for d in out.alarms if d.signal == "error")
    st = mon.calibration()
    thr = mon._label_thr  # the error detectors' thresholds (none without a started stream)
    return {
        "kind": kind,
        "seed": seed,
        "labels": monitored,
        "alarms": dict(alarms),
        # the error thresholds are set for blocks of b labels: b labels' budget
        "label_budget": math.nan if thr is None else thr.label_budget / st.error_block_labels,
        "block": st.error_block_labels,
        "kappa": float(getattr(mon, "_err_kappa", math.nan)),
        "p": float(np.mean(r.pred[idx] != r.labels[idx])),
    }


def run_null(args: Any, t_start: float) -> int:
    """``--null``: the error detectors' alarms per label on stationary telemetry at a budget
    high enough to count them, against each detector's share."""
    from tests.bench import bench_detection as bd

    kinds = tuple(args.null_kinds)
    jobs = [(k, s, args.null_readings, args.null_budget) for k in kinds
            for s in range(args.null_devices)]  # fmt: skip
    res: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        futures = [pool.submit(null_task, j) for j in jobs]
        for done, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            res.append(r)
            print(
                f"  [{done}/{len(jobs)}] {r['kind']:<9} device {r['seed']}: error rate "
                f"{r['p']:.3f}, block {r['block']}, κ {r['kappa']:.2f}, {r['labels']:,} labels "
                f"monitored, alarms {r['alarms']} ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
    print()
    budget = res[0]["label_budget"]
    print(
        f"Error-stream false alarms at budget {args.null_budget:g} per device-reading (each "
        f"error detector's share {budget:.3g} per label), {args.null_devices} devices × "
        f"{args.null_readings:,} readings per kind, 10 % labelled"
    )
    print(f"{'kind':<10}{'labels':>12}{'detector':>10}{'alarms':>8}{'per label':>12}"
          f"{'÷ share':>9}{'95% up ÷':>10}")  # fmt: skip
    for kind in kinds:
        rs = [r for r in res if r["kind"] == kind]
        n = sum(r["labels"] for r in rs)
        for det in ("adwin", "cusum", "hddm_a"):
            a = sum(r["alarms"].get(det, 0) for r in rs)
            print(
                f"{kind:<10}{n:>12,}{det:>10}{a:>8}{a / max(n, 1):>12.3g}"
                f"{a / max(n, 1) / budget:>9.2f}{bd._poisson_upper(a) / max(n, 1) / budget:>10.2f}"
            )
    print(f"total {time.perf_counter() - t_start:.0f} s wall")
    return 0


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    from tests.bench.bench_detection import _fmt as fmt

    return fmt(v)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help=f"devices per kind ({DEFAULT_RUNS})")
    ap.add_argument("--change", type=int, nargs="+", default=list(DEFAULT_CHANGES))
    ap.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(DEFAULT_KINDS))
    ap.add_argument("--horizon-labels", type=int, default=DEFAULT_HORIZON_LABELS)
    ap.add_argument("--fa-labels", type=int, default=None, help="labels per δ for δ_FA")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs per kind")
    ap.add_argument(
        "--null",
        action="store_true",
        help="instead: the error detectors' false alarms on stationary telemetry (iid, sessions, "
        "real) at --null-budget",
    )
    ap.add_argument("--null-budget", type=float, default=2.4e-3)
    ap.add_argument("--null-devices", type=int, default=8)
    ap.add_argument("--null-readings", type=int, default=2_000_000)
    ap.add_argument("--null-kinds", nargs="+", default=["iid", "sessions", "real"])
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    fa_labels = args.fa_labels or (QUICK_FA_LABELS if args.quick else DEFAULT_FA_LABELS)

    import numpy as np
    import river

    from service.drift import calibration
    from service.drift.device_monitor import DeviceMonitorConfig
    from tests.bench import bench_detection as bd

    t_start = time.perf_counter()
    cfg = DeviceMonitorConfig()
    print("tinydrift label-only concept changes: layer A's error stream vs river ADWIN")
    river_version = getattr(river, "__version__", "?")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, river {river_version}, "
        f"{bd._cpu_model()}, {os.cpu_count()} CPUs, {platform.machine()}; {args.workers} "
        f"workers; {runs} runs per kind and placement; frames of {K}, {LABEL_RATE:.0%} labelled; "
        f"horizon {args.horizon_labels:,} labels"
    )
    sys.stdout.flush()
    if args.null:
        return run_null(args, t_start)
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        # p0 per kind, then δ_FA per kind
        p0s = dict(zip(args.kinds, pool.map(kind_p0, args.kinds), strict=True))
        deltas: dict[str, dict[str, float]] = {}
        budgets: dict[str, tuple[int, float, float]] = {}
        for kind_name in args.kinds:
            n_feat = 8 if KINDS[kind_name].source == "sim" else len(frozen_model(
                KINDS[kind_name])[1])  # fmt: skip
            n_cls = 4 if KINDS[kind_name].source == "sim" else 2
            s = 2 + n_cls + 2 * n_feat
            thr = calibration.thresholds(s, K, budget_per_device_reading=cfg.strict_budget)
            target = calibration.ERROR_DETECTORS * thr.label_budget
            arl = thr.n_detectors / cfg.strict_budget
            budgets[kind_name] = (s, target, arl)
            seeds = [int(np.random.SeedSequence([7, i]).generate_state(1)[0]) for i in range(99)]
            jobs = [
                (p0s[kind_name], d, fa_labels, seeds[i]) for i, d in enumerate(ERROR_DELTA_GRID)
            ]
            grid = dict(pool.map(adwin_rate_task, jobs))
            cands = {**{d: 0 for d in FA_CANDIDATES}, **grid}  # 0 alarms: read off the fit
            delta_fa, _, _, est = bd.choose_delta_fa(cands, fa_labels, 0, 1, target)
            deltas[kind_name] = {"ADWIN()": bd.ADWIN_DEFAULT_DELTA, "ADWIN(δ_FA)": delta_fa}
            print(
                f"{kind_name}: {KINDS[kind_name].description}; S = {s} streams, error detectors' "
                f"budget {target:.3g} per label; frozen model's p0 = {p0s[kind_name]:.4f}; "
                f"ADWIN alarms per δ on {fa_labels:,} Bernoulli(p0) labels "
                + ", ".join(f"{d:g}: {a}" for d, a in grid.items())
                + f"; δ_FA = {delta_fa:.3g} (rate {est[delta_fa][0]:.3g} per label, "
                f"{est[delta_fa][1]})",
                flush=True,
            )
        jobs2 = [
            (k, c, seed, args.horizon_labels, deltas[k])
            for c in args.change
            for seed in range(runs)
            for k in args.kinds
        ]
        results: list[RunResult] = []
        futures = {pool.submit(run_task, j): j for j in jobs2}
        for done, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            results.append(r)
            cells = ", ".join(f"{n} {_fmt(r.delay_labels.get(n, math.nan))}" for n in DETECTORS)
            print(
                f"  [{done}/{len(jobs2)}] {r.kind:<9} change {r.change:>6,} seed {r.seed:<3} "
                + (
                    "excluded (not calibrated)"
                    if r.excluded
                    else f"p0 {r.p0:.3f} → p1 {r.p1:.3f}; labels to alarm: {cells} "
                    f"(first strict: {r.first_detector or '-'}); b {r.error_block} κ "
                    f"{r.error_kappa:.2f}"
                )
                + f"; {r.seconds:.0f} s ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )

    print()
    print(
        "Delays after the change (labels; readings = labels ÷ 0.1 in expectation), median / p90 "
        "with a miss as ∞; FA: false alarms before the change per 10⁶ readings (ours: any "
        "stream)"
    )
    head = (
        f"{'placement':<10}{'kind':<11}{'p0 → p1':<15}{'detector':<13}{'missed':>8}"
        f"{'labels med/p90':>17}{'readings med/p90':>19}{'FA/1e6':>8}{'Lorden lab.':>12}"
    )
    print(head)
    for c in args.change:
        for kind_name in args.kinds:
            rs = [r for r in results if r.kind == kind_name and r.change_at == c]
            inc = [r for r in rs if not r.excluded]
            if not inc:
                print(f"{c:<10,}{kind_name:<11}no calibrated run")
                continue
            p0 = bd._pct([r.p0 for r in inc], 50)
            p1 = bd._pct([r.p1 for r in inc], 50)
            s, _, arl = budgets[kind_name]
            lorden = [math.log(arl) / bd._bernoulli_kl(r.p1, r.p0) for r in inc]
            for j, name in enumerate(DETECTORS):
                dl = [r.delay_labels[name] for r in inc]
                dr = [r.delay_readings[name] for r in inc]
                pre = sum(r.pre_alarms[name] for r in inc)
                pre_n = sum(r.pre_readings for r in inc)
                print(
                    (f"{c:<10,}{kind_name:<11}{f'{p0:.3f} → {p1:.3f}':<15}" if j == 0 else " " * 36)
                    + f"{name:<13}{sum(math.isinf(d) for d in dl):>4}/{len(inc):<3}"
                    + f"{_fmt(bd._pct(dl, 50)):>8} /{_fmt(bd._pct(dl, 90)):>7}"
                    + f"{_fmt(bd._pct(dr, 50)):>10} /{_fmt(bd._pct(dr, 90)):>7}"
                    + f"{pre / max(pre_n, 1) * 1e6:>8.3g}"
                    + (f"{_fmt(bd._pct(lorden, 50)):>12}" if j == 0 else "")
                )
            firsts = Counter(r.first_detector or "none" for r in inc)
            per = {
                d: bd._pct([r.per_error_detector.get(d, math.inf) for r in inc], 50)
                for d in sorted({d for r in inc for d in r.per_error_detector})
            }
            blocks = Counter(r.error_block for r in inc)
            kap = [r.error_kappa for r in inc]
            print(
                " " * 36 + f"p0 {min(r.p0 for r in inc):.3f}–{max(r.p0 for r in inc):.3f}, p1 "
                f"{min(r.p1 for r in inc):.3f}–{max(r.p1 for r in inc):.3f}; labels before the "
                f"change {_fmt(bd._pct([float(r.labels_before) for r in inc], 50))} (median), "
                f"changes at {_fmt(min(r.change for r in inc))}–{_fmt(max(r.change for r in inc))}"
                f"; excluded {len(rs) - len(inc)}"
            )
            print(
                " " * 36
                + f"A strict first by {dict(firsts)}; per error detector median labels "
                + (", ".join(f"{d} {_fmt(v)}" for d, v in per.items()) or "-")
                + f"; error block {dict(sorted(blocks.items()))} labels, κ "
                f"{min(kap):.2f}–{max(kap):.2f} (median {bd._pct(kap, 50):.2f}); strict alarms "
                f"on signal streams after the change {sum(r.post_signal_alarms for r in inc)}"
            )
    print(
        f"  (Lorden: ln(ARL)/KL(Ber p1 ‖ Ber p0) labels, ARL = D / {cfg.strict_budget:g} updates "
        f"with D = S + {calibration.ERROR_DETECTORS}: "
        + ", ".join(f"{k} {budgets[k][2]:.3g}" for k in args.kinds)
        + ")"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
