"""Layer A: DeviceMonitor on simulated devices (the real simulator and integer model) + signals."""

from __future__ import annotations

import math
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest

from edge_agent.device.simulator import (
    CLASSES,
    FEATURES,
    DriftSpec,
    SensorSimulator,
    window_times,
)
from edge_agent.fixedpoint import QuantizedLinear, round_half_away
from service.drift.checkpoint_format import add_header, pack_state, unpack_state
from service.drift.declared_normal import DeclaredNormal
from service.drift.device_monitor import (
    ERROR_STREAM,
    STATE_FORMAT,
    STATE_MAGIC,
    CheckpointFormatError,
    DeviceMonitor,
    DeviceMonitorConfig,
    Outcome,
    update_frames,
)
from service.drift.signals import (
    SignalLayout,
    Stream,
    batch_frame_means,
    frame_means,
    reading_signals,
)
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.learn.factory_model import train_factory_model

FRAC_BITS = 11
K = 16
CHANGE = 8000
"""Reading index at which drift starts in the drift scenarios (after the reference and the
null learning: with :data:`FAST`'s horizon every stream of an independent device is monitored
after 6,144 readings, a few later)."""
HORIZON = 3000
"""Readings after the change within which a drift must be detected."""
FAST = DeviceMonitorConfig(null_horizon_readings=128, null_horizon_labels=4)
"""The detection tests check dependence over 8 frames and 4 labels before a stream starts
(production: the reference's 512 readings, 32 frames, and 32 labels; tested on their own
below), so that the simulated devices are calibrated by ``CHANGE``."""
STD_FEATURES = {"std_x", "std_y", "std_z"}


@pytest.fixture(scope="module")
def model() -> QuantizedLinear:
    return train_factory_model(seed=0).quantize()


@dataclass
class Device:
    """Readings of one simulated device exactly as it would send them (agent.step)."""

    name: str
    features: np.ndarray
    pred: np.ndarray
    conf: np.ndarray
    labels: np.ndarray
    label_rng: np.random.Generator

    def frames(self, k: int = K, version: int = 1, start: int = 0, stop: int | None = None):
        stop = self.features.shape[0] if stop is None else stop
        for lo in range(start, stop, k):
            sl = slice(lo, min(lo + k, stop))
            yield DeviceFrame(
                "fleet", self.name, 0, lo // k, 2000 * lo, 0.0, version,
                self.features[sl], self.pred[sl], self.conf[sl],
            )  # fmt: skip

    def label_batch(self, frame: DeviceFrame, rate: float = 0.1) -> DeviceLabels | None:
        lo = frame.seq * K  # frames of K readings from reading 0 (the last may be shorter)
        chosen = np.flatnonzero(self.label_rng.random(frame.k) < rate) + lo
        if chosen.size == 0:
            return None
        return DeviceLabels(
            "fleet", self.name, 0, frame.seq, frame.ts_ms, 0.0, frame.param_version,
            self.features[chosen], self.pred[chosen], self.labels[chosen],
        )  # fmt: skip


def simulate(model: QuantizedLinear, seed: int, n: int, drift: DriftSpec | None = None) -> Device:
    s = SensorSimulator(seed, drift=drift).sample(n, t=window_times(n))
    scale = float(1 << FRAC_BITS)
    held = np.clip(round_half_away(s.features * scale), -32768, 32767) / scale
    logits = model.logits(held)
    return Device(
        name=f"dev{seed}",
        features=held,
        pred=model.decide(logits),
        conf=model.confidence(logits).astype(np.float64) / 256.0,
        labels=s.labels,
        label_rng=np.random.default_rng(seed + 10_000),
    )


def run(dev: Device, mon: DeviceMonitor | None = None, labels: bool = True, **kw):
    mon = mon or DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    out = []
    for fr in dev.frames(**kw):
        out += mon.update(fr)
        if labels:
            lb = dev.label_batch(fr)
            if lb is not None:
                out += mon.update_labels(lb)
    return mon, out


def drift_at(kind: str, **kw) -> DriftSpec:
    return DriftSpec(kind, start_s=2.0 * CHANGE, **kw)  # readings are 2 s windows


# ------------------------------------------------------------------------------------------------
# stationary data
# ------------------------------------------------------------------------------------------------


def test_no_detections_on_stationary_device(model):
    """50k readings (3125 frames, ~5k labels): the budget allows 0.005 false alarms here."""
    dev = simulate(model, seed=101, n=50_000)
    mon, dets = run(dev)
    assert dets == []
    assert mon.readings == 50_000
    assert mon.drifting == ()
    thr = mon.thresholds
    assert thr is not None
    assert thr.frame_readings == K
    assert thr.n_detectors == 24
    assert 0 < mon.memory_bytes() <= 40 * 1024


def held_device(model: QuantizedLinear, name: str, x: np.ndarray, labels: np.ndarray) -> Device:
    """A device sending features ``x`` (held in Q4.11, classified by the integer model)."""
    scale = float(1 << FRAC_BITS)
    held = np.clip(round_half_away(x * scale), -32768, 32767) / scale
    logits = model.logits(held)
    return Device(
        name=name,
        features=held,
        pred=model.decide(logits),
        conf=model.confidence(logits).astype(np.float64) / 256.0,
        labels=labels,
        label_rng=np.random.default_rng(7),
    )


def in_sessions(model: QuantizedLinear, n: int, dwell: float, seed: int) -> Device:
    """Stationary, but the activity comes in sessions of ``dwell`` readings on average (a user
    walks for minutes, then sits): readings of the session's class, drawn from a pool."""
    pool = simulate(model, seed, 20_000)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(pool.labels == c) for c in range(len(CLASSES))]
    by_class = [ix for ix in by_class if ix.size]
    order = np.empty(n, dtype=np.int64)
    pos = 0
    while pos < n:
        length = int(rng.geometric(1.0 / dwell))
        ix = by_class[rng.integers(len(by_class))]
        take = min(length, n - pos)
        order[pos : pos + take] = rng.choice(ix, take)
        pos += take
    return held_device(model, f"sessions{seed}", pool.features[order], pool.labels[order])


def slow_sensor(model: QuantizedLinear, n: int, phi: float, seed: int) -> Device:
    """Stationary readings plus sensor noise autocorrelated from reading to reading (AR(1))."""
    from scipy.signal import lfilter

    dev = simulate(model, seed, n)
    rng = np.random.default_rng(seed)
    sd = 0.5 * dev.features.std(axis=0)
    e = rng.standard_normal(dev.features.shape) * np.sqrt(1.0 - phi * phi)
    noise = lfilter([1.0], [1.0, -phi], e, axis=0)
    return held_device(model, f"slow{seed}", dev.features + noise * sd, dev.labels)


@pytest.mark.parametrize(("kind", "readings"), [("sessions", 400_000), ("slow sensor", 300_000)])
def test_dependent_stationary_data_calibrates_longer_and_raises_no_alarm(model, kind, readings):
    """Readings that depend on each other (sessions of ~300 readings, a φ = 0.99 sensor): the
    monitor takes longer to learn its null, then stays quiet. Per-frame thresholds as if frames
    were independent raised thousands of alarms per 10⁶ readings on such data."""
    if kind == "sessions":
        dev = in_sessions(model, readings, dwell=300.0, seed=121)
    else:
        dev = slow_sensor(model, readings, phi=0.99, seed=122)
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES)
    alarms, half_from = [], None
    for fr in dev.frames():
        alarms += mon.update(fr)
        lb = dev.label_batch(fr)
        if lb is not None:
            alarms += mon.update_labels(lb)
        status = mon.calibration()
        if half_from is None and status.streams_ready >= status.streams // 2:
            half_from = mon.readings
    assert half_from is not None
    assert half_from > 24_576  # an independent device is monitored after 24,576
    assert status.block_readings_median >= 4 * K
    assert [a for a in alarms if a.detector != "hddm_a_warning"] == []
    # nor does it look drifted, so the update policy proposes no recalibration for a pattern
    assert mon.drifting == ()
    assert 0 < mon.memory_bytes() <= 40 * 1024


# ------------------------------------------------------------------------------------------------
# the sensitive tier
# ------------------------------------------------------------------------------------------------


def observe_all(dev: Device, mon: DeviceMonitor | None = None) -> tuple[DeviceMonitor, Outcome]:
    mon = mon or DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    out = Outcome([], [])
    for fr in dev.frames():
        res = mon.observe(fr)
        out.alarms.extend(res.alarms)
        out.suspicions.extend(res.suspicions)
        lb = dev.label_batch(fr)
        if lb is not None:
            res = mon.observe_labels(lb)
            out.alarms.extend(res.alarms)
            out.suspicions.extend(res.suspicions)
    return mon, out


def test_the_sensitive_tier_suspects_before_the_strict_tier_alarms(model):
    dev = simulate(model, 261, CHANGE + HORIZON, drift_at("offset", axis=2))
    mon, out = observe_all(dev)
    assert [d for d in out.suspicions if d.readings <= CHANGE] == []
    first_alarm = min(d.readings for d in out.alarms if d.readings > CHANGE)
    first_suspicion = min(d.readings for d in out.suspicions if d.readings > CHANGE)
    assert first_suspicion < first_alarm
    assert {d.detector for d in out.suspicions} == {"adwin_sensitive"}
    assert all(d.scope == "device" and d.score >= 1.0 for d in out.suspicions)
    assert "adwin_sensitive" not in {d.detector for d in out.alarms}
    # the same alarms as update() returns: suspicions are never alarms
    _, alarms = run(simulate(model, 261, CHANGE + HORIZON, drift_at("offset", axis=2)))
    assert alarms == out.alarms
    # its thresholds: its own budget, more detections allowed, ADWIN alone on errors
    s_thr, thr = mon.sensitive_thresholds, mon.thresholds
    assert s_thr is not None
    assert thr is not None
    assert s_thr.n_detectors == 23
    assert s_thr.frame_delta > 100 * thr.frame_delta
    assert mon.suspicion_rate == pytest.approx(1e-4, rel=1e-6)
    assert thr.null_rate_per_reading == pytest.approx(5e-8, rel=1e-6)  # half the fleet's 1e-7


def test_labels_feed_the_sensitive_error_detector(model):
    dev = simulate(model, 262, CHANGE + 2 * HORIZON, drift_at("concept"))
    _, out = observe_all(dev)
    errs = [d for d in out.suspicions if d.signal == "error"]
    assert errs
    assert min(d.readings for d in errs) > CHANGE
    first_alarm = min(d.readings for d in out.alarms if d.signal == "error")
    assert min(d.readings for d in errs) <= first_alarm


def test_batches_return_the_suspicions_separately(model):
    dev = simulate(model, 263, CHANGE + 2000, drift_at("offset", axis=1, magnitude=0.4))
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    single = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    frames = list(dev.frames())
    want = Outcome([], [])
    for fr in frames:
        res = single.observe(fr)
        want.alarms.extend(res.alarms)
        want.suspicions.extend(res.suspicions)
    got = update_frames({("fleet", dev.name): mon}, frames)
    assert got.suspicions
    assert got.detections
    assert got.suspicions == want.suspicions
    assert got.detections == want.alarms


def test_the_sensitive_tier_can_be_turned_off(model):
    cfg = replace(FAST, sensitive_budget_per_device_reading=None)
    assert cfg.strict_budget == cfg.budget_per_device_reading  # the strict tier gets it all
    assert cfg.cohort_budget == 0.0
    dev = simulate(model, 264, CHANGE + 1000, drift_at("offset", axis=2))
    mon, out = observe_all(dev, DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, cfg))
    assert out.alarms
    assert out.suspicions == []
    assert mon.suspicion_rate is None
    assert mon.sensitive_thresholds is None
    thr = mon.thresholds
    assert thr is not None
    assert thr.null_rate_per_reading == pytest.approx(1e-7, rel=1e-6)
    back = DeviceMonitor.from_state_bytes(mon.state_bytes())
    assert back.suspicion_rate is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"strict_share": 0.0}, "strict_share"),
        ({"strict_share": 1.0}, "strict_share"),
        ({"budget_per_device_reading": 0.0}, "budget_per_device_reading"),
        ({"sensitive_budget_per_device_reading": 0.0}, "sensitive_budget"),
        ({"sensitive_budget_per_device_reading": 0.5}, "sensitive_budget"),
    ],
)
def test_tier_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        DeviceMonitorConfig(**kw)
    cfg = DeviceMonitorConfig()
    assert cfg.strict_budget + cfg.cohort_budget == pytest.approx(cfg.budget_per_device_reading)


# ------------------------------------------------------------------------------------------------
# each drift kind
# ------------------------------------------------------------------------------------------------


def _post(dets):
    after = [d for d in dets if d.readings > CHANGE]
    assert after, "drift not detected"
    assert [d for d in dets if d.readings <= CHANGE] == [], "false alarm before the change"
    first = min(d.readings for d in after)
    assert first - CHANGE <= HORIZON
    return after, first


@pytest.mark.parametrize("seed", [201, 202])
def test_offset_on_one_axis_flags_its_features(model, seed):
    dev = simulate(model, seed, CHANGE + HORIZON, drift_at("offset", axis=2))
    mon, dets = run(dev)
    after, first = _post(dets)
    assert first - CHANGE <= 400
    feats = {(d.signal, d.feature) for d in after if d.signal.startswith("feature")}
    assert ("feature", "mean_z") in feats
    assert {f for _, f in feats} <= {"mean_z", "mag_mean", "mag_zcr_hz"}  # what z's bias moves
    assert Stream("feature", "mean_z") in mon.drifting
    assert all(d.detector == "adwin" and d.score >= 1.0 for d in after if d.signal != "error")


@pytest.mark.parametrize("seed", [211, 212])
def test_gain_on_one_axis_flags_its_features(model, seed):
    dev = simulate(model, seed, CHANGE + HORIZON, drift_at("gain", axis=0, magnitude=0.3))
    _, dets = run(dev)
    after, first = _post(dets)
    assert first - CHANGE <= 1000
    feats = {(d.signal, d.feature) for d in after if d.signal.startswith("feature")}
    assert {f for _, f in feats} & {"mean_x", "std_x"}  # a gain on x scales both
    assert {f for _, f in feats} <= {"mean_x", "std_x", "mag_mean", "mag_zcr_hz"}


def test_gradual_gain_on_all_axes_is_caught_during_the_ramp(model):
    ramp = 2000  # readings
    dev = simulate(model, 221, CHANGE + HORIZON, drift_at("gain", ramp_s=2.0 * ramp))
    _, dets = run(dev)
    _, first = _post(dets)
    assert first - CHANGE <= ramp  # before the gain reaches its full 30 %
    sigs = {d.signal for d in dets}
    assert sigs & {"feature", "feature_var"}


@pytest.mark.parametrize("seed", [231, 232])
def test_sensor_noise_flags_the_std_features(model, seed):
    """More white noise is a variance change of the raw signal: the std features move."""
    dev = simulate(model, seed, CHANGE + HORIZON, drift_at("noise"))
    mon, dets = run(dev)
    after, first = _post(dets)
    assert first - CHANGE <= 400
    feats = {(d.signal, d.feature) for d in after if d.signal.startswith("feature")}
    assert any(f in STD_FEATURES for _, f in feats)
    drifting = set(mon.drifting)
    assert any(Stream("feature_var", f) in drifting for f in STD_FEATURES)
    assert any(Stream("feature", f) in drifting for f in STD_FEATURES)


def test_variance_only_change_is_caught_by_the_within_frame_variance():
    """A feature whose spread doubles with the same mean: only its within-frame variance
    shifts (research §3.2)."""
    rng = np.random.default_rng(7)
    mon = DeviceMonitor("fleet", "v", ["a", "b"], ["n", "p"])
    dets = []
    for seq in range(1900):
        x = rng.standard_normal((K, 2))
        if seq >= 1700:  # after the reference (32 frames) and the null learning (1,536+)
            x[:, 1] *= 2.0
        pred = (rng.random(K) < 0.3).astype(np.int64)
        fr = DeviceFrame("fleet", "v", 0, seq, seq, 0.0, 1, x, pred, rng.uniform(0.5, 1, K))
        dets += mon.update(fr)
    assert dets
    assert min(d.readings for d in dets) > 1700 * K
    first = min(d.readings for d in dets)
    assert first - 1700 * K <= 300
    assert {(d.signal, d.feature) for d in dets if d.readings == first} == {("feature_var", "b")}
    assert Stream("feature_var", "b") in mon.drifting
    assert Stream("feature", "b") not in mon.drifting


@pytest.mark.parametrize("seed", [241, 242])
def test_class_prior_shift_flags_the_class_mix(model, seed):
    dev = simulate(model, seed, CHANGE + HORIZON, drift_at("prior", target=2, magnitude=0.7))
    mon, dets = run(dev)
    after, first = _post(dets)
    assert first - CHANGE <= 600
    assert ("class_mix", "run") in {(d.signal, d.feature) for d in after}
    assert Stream("class_mix", "run") in mon.drifting


@pytest.mark.parametrize("seed", [251, 252])
def test_concept_change_is_caught_by_labels_only(model, seed):
    dev = simulate(model, seed, CHANGE + 2 * HORIZON, drift_at("concept"))
    mon, dets = run(dev)
    after, first = _post(dets)
    assert first - CHANGE <= 2 * HORIZON
    assert {d.signal for d in dets} == {"error"}  # the inputs are untouched
    assert {d.detector for d in after} >= {"adwin"}
    assert ERROR_STREAM in mon.drifting
    # without labels the same device shows nothing
    _, unlabelled = run(
        simulate(model, seed, CHANGE + 2 * HORIZON, drift_at("concept")), None, False
    )
    assert unlabelled == []


def _error_rise(seed: int, change: int, frames: int, old: DeviceMonitor | None = None):
    """Labels only (the inputs stay as they are): every reading labelled, the error rate goes
    from 10 % to 15 % at reading ``change``. Returns the monitor and its alarms."""
    rng = np.random.default_rng(seed)
    mon = old or DeviceMonitor("fleet", "c", ["a", "b"], ["n", "p"])
    alarms = []
    for seq in range(frames):  # frames of 16
        x = rng.standard_normal((K, 2))
        pred = (rng.random(K) < 0.3).astype(np.int64)
        fr = DeviceFrame("fleet", "c", 0, seq, seq, 0.0, 1, x, pred, rng.uniform(0.5, 1, K))
        alarms += mon.update(fr)
        rate = 0.10 if seq * K < change else 0.15
        wrong = rng.random(K) < rate
        label = np.where(wrong, 1 - pred, pred)
        alarms += mon.update_labels(DeviceLabels("fleet", "c", 0, seq, seq, 0.0, 1, x, pred, label))
    return mon, alarms


def test_a_rise_of_a_few_points_in_the_error_rate_is_alarmed():
    """The information limit at this budget (Lorden: ``ln(ARL) / KL``) is about 1,600 labels.
    ADWIN or the CUSUM alarms first (an ADWIN alarm re-bases the CUSUM on its excursion)."""
    change = 30_000
    mon, alarms = _error_rise(5, change, 4_000)
    assert mon.calibration().error_ready
    assert [a for a in alarms if a.readings <= change] == []
    first = {}
    for a in alarms:
        first.setdefault(a.detector, a.readings - change)  # labels after the change
    assert min(first.get("adwin", math.inf), first.get("cusum", math.inf)) <= 3_000
    assert all(a.signal == "error" for a in alarms)
    assert all(a.score >= 1.0 for a in alarms if a.detector != "hddm_a_warning")


def test_a_checkpoint_written_before_the_cusum_gets_one():
    """A monitor whose error stream has no CUSUM yet (``None`` in its checkpoint) restores, and
    its error stream gets a CUSUM from what its null learning found."""
    mon, alarms = _error_rise(6, 10**9, 1_000)  # 16,000 labels, no change
    assert alarms == []
    assert mon.calibration().error_ready
    cus = mon._err_cusum
    assert cus is not None
    mon._err_cusum = None
    old = DeviceMonitor.from_state_bytes(mon.state_bytes())
    assert old._err_cusum is None
    _, alarms = _error_rise(7, 10**9, 1_000, old)  # 16,000 more labels, no change
    assert alarms == []
    rebuilt = old._err_cusum
    assert rebuilt is not None
    assert (rebuilt.block, rebuilt.kappa_floor) == (cus.block, old._err_kappa)
    assert rebuilt.ref_n + rebuilt.exc_n > 16_000  # the learning stretch, then every label


def test_hddm_a_warning_is_reported_once_per_entry(model):
    """HDDM_A is kept for its warning zone; its drift test is not an alarm (that share of the
    budget is the CUSUM's), but the warning still comes before it."""
    dev = simulate(model, 254, CHANGE + 2 * HORIZON, drift_at("concept"))
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    dets, entries, in_zone, hddm_drift = [], 0, False, []
    for fr in dev.frames():
        dets += mon.update(fr)
        lb = dev.label_batch(fr)
        if lb is None:
            continue
        for i in range(lb.k):  # one label at a time, to watch HDDM_A's zone
            one = replace(lb, features=lb.features[i : i + 1], pred=lb.pred[i : i + 1],
                          label=lb.label[i : i + 1])  # fmt: skip
            got = mon.update_labels(one)
            dets += got
            hddm = mon._hddm
            now = hddm is not None and hddm.warning_detected and not hddm.drift_detected
            entries += now and not in_zone
            in_zone = now
            if hddm is not None and hddm.drift_detected:
                hddm_drift.append(mon.readings)
    warnings = [d for d in dets if d.detector == "hddm_a_warning"]
    assert len(warnings) == entries >= 1
    assert hddm_drift
    assert min(d.readings for d in warnings) <= hddm_drift[0]  # the warning comes first
    assert all(d.score == 1.0 and d.signal == "error" for d in warnings)
    assert "hddm_a" not in {d.detector for d in dets}


# ------------------------------------------------------------------------------------------------
# lifecycle: versions, frames, labels
# ------------------------------------------------------------------------------------------------


def test_model_version_change_resets_the_reference(model):
    dev = simulate(model, 301, CHANGE + 1000, drift_at("offset", magnitude=0.5))
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    frames = list(dev.frames())
    for fr in frames[:100]:
        assert mon.update(fr) == []
    assert mon.reference_complete
    assert mon.model_version == 1
    assert mon.readings == 1600
    ref_v1 = mon.reference
    # an update: version 2 starts a new reference, detects nothing before it is complete
    v2 = [replace_version(fr, 2) for fr in frames[100:]]
    assert mon.update(v2[0]) == []
    assert mon.model_version == 2
    assert mon.readings == K
    assert not mon.reference_complete
    assert mon.thresholds is None
    assert mon.drifting == ()
    assert mon.reference is None
    for fr in v2[1:32]:
        assert mon.update(fr) == []
    assert mon.reference_complete
    assert mon.readings == 512
    assert ref_v1 is not None
    assert mon.reference is not None
    assert not np.allclose(ref_v1[0], mon.reference[0])  # the drifted device's new normal
    # labels of the old version are ignored
    old = DeviceLabels("fleet", dev.name, 0, 0, 0, 0.0, 1, dev.features[:5], dev.pred[:5],
                       dev.labels[:5])  # fmt: skip
    assert mon.update_labels(old) == []
    assert mon.labels_ignored == 5
    # a revert to version 1 resumes version 1's monitor (its pre-update reference)
    mon.update(frames[0])
    assert mon.model_version == 1
    assert mon.readings == 1600 + K
    assert mon.reference is not None
    assert np.array_equal(mon.reference[0], ref_v1[0])


def replace_version(fr: DeviceFrame, version: int) -> DeviceFrame:
    return replace(fr, param_version=version)


def test_readings_count_the_model_version_including_the_reference(model):
    dev = simulate(model, 311, CHANGE + 3000, drift_at("offset", axis=2, magnitude=0.5))
    _, dets = run(dev, labels=False)
    assert dets
    assert all(d.readings % K == 0 and CHANGE < d.readings <= CHANGE + 3000 for d in dets)
    assert all(d.ts_ms == 2000 * (d.readings - K) for d in dets)  # the frame that triggered it


def test_frame_sizes_from_1_to_4096_and_a_straddling_reference(model):
    dev = simulate(model, 321, 9000)
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    sizes = [1, 7, 300, 4096, 1, 4096, 499]  # the 4th frame completes the reference mid-frame
    lo = 0
    for seq, k in enumerate(sizes):
        sl = slice(lo, lo + k)
        fr = DeviceFrame("fleet", dev.name, 0, seq, seq, 0.0, 1, dev.features[sl], dev.pred[sl],
                         dev.conf[sl])  # fmt: skip
        assert mon.update(fr) == []
        lo += k
    assert mon.readings == sum(sizes)
    assert mon.reference_complete
    thr = mon.thresholds
    assert thr is not None
    assert thr.frame_readings == 153  # median of 1, 7, 300, 4096 (floored)


def test_invalid_frames_are_refused(model):
    dev = simulate(model, 331, 64)
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    fr = next(dev.frames())
    bad_f = DeviceFrame("fleet", dev.name, 0, 0, 0, 0.0, 1, fr.features[:, :7], fr.pred, fr.conf)
    with pytest.raises(ValueError, match="8 features"):
        mon.update(bad_f)
    with pytest.raises(ValueError, match="readings"):
        mon.update(DeviceFrame("fleet", dev.name, 0, 0, 0, 0.0, 1, np.zeros((0, 8)),
                               np.zeros(0, np.int64), np.zeros(0)))  # fmt: skip
    big = np.zeros((4097, 8))
    with pytest.raises(ValueError, match="readings"):
        mon.update(DeviceFrame("fleet", dev.name, 0, 0, 0, 0.0, 1, big,
                               np.zeros(4097, np.int64), np.zeros(4097)))  # fmt: skip
    with pytest.raises(ValueError, match="class"):
        mon.update(DeviceFrame("fleet", dev.name, 0, 0, 0, 0.0, 1, fr.features, fr.pred + 4,
                               fr.conf))  # fmt: skip
    with pytest.raises(ValueError, match="monitor of"):
        mon.update(DeviceFrame("fleet", "other", 0, 0, 0, 0.0, 1, fr.features, fr.pred, fr.conf))
    assert mon.readings == 0  # nothing was taken in
    assert mon.model_version is None


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [10, 200, 250])  # in the reference, before and after the change
def test_state_round_trip_gives_the_same_detections(model, cut):
    def fresh():
        return simulate(model, 401, CHANGE + 2000, drift_at("offset", axis=1, magnitude=0.4))

    _, expected = run(fresh())
    assert expected
    dev = fresh()
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    got = []
    frames = list(dev.frames())
    for i, fr in enumerate(frames):
        if i == cut:
            blob = mon.state_bytes()
            assert blob[:4] == b"TDDM"
            assert mon.memory_bytes() == len(blob)
            mon = DeviceMonitor.from_state_bytes(blob)
        got += mon.update(fr)
        lb = dev.label_batch(fr)
        if lb is not None:
            got += mon.update_labels(lb)
    assert got == expected
    assert mon.drifting == DeviceMonitor.from_state_bytes(mon.state_bytes()).drifting


def test_state_round_trip_keeps_both_tiers_exactly(model):
    def fresh():
        return simulate(model, 402, CHANGE + 3000, drift_at("offset", axis=0, magnitude=0.4))

    _, expected = observe_all(fresh())
    assert expected.suspicions
    assert expected.alarms
    dev = fresh()
    mon = DeviceMonitor("fleet", dev.name, FEATURES, CLASSES, FAST)
    got = Outcome([], [])
    for i, fr in enumerate(dev.frames()):
        if i in (100, 180, 195, 300):  # during the reference, before, at and after the change
            mon = DeviceMonitor.from_state_bytes(mon.state_bytes())
        res = mon.observe(fr)
        got.alarms.extend(res.alarms)
        got.suspicions.extend(res.suspicions)
        lb = dev.label_batch(fr)
        if lb is not None:
            res = mon.observe_labels(lb)
            got.alarms.extend(res.alarms)
            got.suspicions.extend(res.suspicions)
    assert got == expected  # detections and their scores
    assert mon.band_scores() == DeviceMonitor.from_state_bytes(mon.state_bytes()).band_scores()


def test_a_format_1_checkpoint_is_refused_by_name(model):
    """Format 1 (one ADWIN bank, plain pickles) cannot be read: the engine names the fix."""
    mon = DeviceMonitor("fleet", "d", FEATURES, CLASSES)
    old = add_header(STATE_MAGIC, 1, zlib.compress(pickle.dumps({"layout": mon.layout})))
    with pytest.raises(CheckpointFormatError, match="format version 1; this code reads version"):
        DeviceMonitor.from_state_bytes(old)
    assert STATE_FORMAT >= 2


def test_checkpoint_of_another_format_is_refused(model):
    mon = DeviceMonitor("fleet", "d", FEATURES, CLASSES)
    blob = mon.state_bytes()
    assert struct.unpack(">H", blob[4:6]) == (STATE_FORMAT,)
    other = blob[:4] + struct.pack(">H", STATE_FORMAT + 1) + blob[6:]
    with pytest.raises(CheckpointFormatError, match=f"format version {STATE_FORMAT + 1}"):
        DeviceMonitor.from_state_bytes(other)
    with pytest.raises(CheckpointFormatError, match="magic"):
        DeviceMonitor.from_state_bytes(b"XXXX" + blob[4:])
    with pytest.raises(CheckpointFormatError, match="too short"):
        DeviceMonitor.from_state_bytes(blob[:5])
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        DeviceMonitor.from_state_bytes(blob[:6] + b"garbage")
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        DeviceMonitor.from_state_bytes(blob[:6] + zlib.compress(pickle.dumps([1, 2])))
    assert issubclass(CheckpointFormatError, ValueError)


# ------------------------------------------------------------------------------------------------
# batches and signals
# ------------------------------------------------------------------------------------------------


def test_update_frames_equals_per_frame_updates(model):
    devs = [
        simulate(model, 501, CHANGE + 1000, drift_at("offset", magnitude=0.5)),
        simulate(model, 502, CHANGE + 1000),
    ]
    seq_mons = {
        ("fleet", d.name): DeviceMonitor("fleet", d.name, FEATURES, CLASSES, FAST) for d in devs
    }
    bat_mons = {
        ("fleet", d.name): DeviceMonitor("fleet", d.name, FEATURES, CLASSES, FAST) for d in devs
    }
    per_dev = [list(d.frames()) for d in devs]
    # device 1 switches to version 2 in the middle
    per_dev[1] = per_dev[1][:120] + [replace_version(f, 2) for f in per_dev[1][120:]]
    interleaved = [f for pair in zip(*per_dev, strict=True) for f in pair]
    expected = []
    for fr in interleaved:
        expected += seq_mons[fr.key].update(fr)
    bad = DeviceFrame("fleet", devs[0].name, 0, 0, 0, 0.0, 1, np.zeros((4, 3)),
                      np.zeros(4, np.int64), np.zeros(4))  # fmt: skip
    stranger = replace(interleaved[0], device="nobody")
    got = []
    rejected = []
    for lo in range(0, len(interleaved), 37):
        batch = interleaved[lo : lo + 37]
        if lo == 37 * 5:
            batch = [*batch[:3], bad, *batch[3:]]
        res = update_frames(bat_mons, batch)
        got += res.detections
        rejected += res.rejected
    assert expected

    def rounded(dets):  # the batch path's means may differ from the single path's in the last ulp
        return [replace(d, score=round(d.score, 9)) for d in dets]

    assert rounded(got) == rounded(expected)
    assert [r[0] for r in rejected] == [bad]
    assert "features" in rejected[0][1]
    res = update_frames({}, [stranger])
    assert res.rejected == [(stranger, "no monitor")]


def test_signal_layout_and_means():
    lay = SignalLayout.create(FEATURES, CLASSES)
    assert lay.n_streams == 22
    assert lay.streams[:2] == (Stream("confidence", None), Stream("confidence_sq", None))
    assert [s.feature for s in lay.streams[lay.class_slice]] == list(CLASSES)
    assert {s.signal for s in lay.streams[lay.z_slice]} == {"feature"}
    assert [s.feature for s in lay.streams[lay.var_slice]] == list(FEATURES)
    rng = np.random.default_rng(3)
    frames, mus, sigmas = [], [], []
    for d in range(3):
        mu, sigma = rng.normal(size=8), rng.uniform(0.5, 2, 8)
        for s in range(4):
            k = int(rng.integers(1, 40))
            frames.append(DeviceFrame("f", f"d{d}", 0, s, 0, 0.0, 1, rng.normal(size=(k, 8)) * 3,
                                      rng.integers(0, 4, k), rng.random(k)))  # fmt: skip
            mus.append(mu)
            sigmas.append(sigma)
    batch = batch_frame_means(frames, np.stack(mus), np.stack(sigmas), n_classes=4)
    single = np.stack(
        [frame_means(f, m, s, 4) for f, m, s in zip(frames, mus, sigmas, strict=True)]
    )
    np.testing.assert_allclose(batch, single, rtol=1e-12, atol=1e-12)
    # direct definition, with the ±4 clip
    fr, mu, sigma = frames[0], mus[0], sigmas[0]
    z = np.clip((fr.features - mu) / sigma, -4, 4)
    want = np.concatenate([[fr.conf.mean(), (fr.conf**2).mean()],
                           np.bincount(fr.pred, minlength=4) / fr.k,
                           z.mean(0),
                           z.var(0, ddof=1) if fr.k > 1 else np.full(8, np.nan)])  # fmt: skip
    np.testing.assert_allclose(single[0], want, rtol=1e-12)
    # a frame of one reading has no within-frame variance
    ones = [i for i, f in enumerate(frames) if f.k == 1]
    assert all(np.isnan(batch[i, lay.var_slice]).all() for i in ones)
    assert not np.isnan(np.delete(batch, ones, axis=0)).any()
    vals = reading_signals(fr.features, fr.pred, fr.conf, mu, sigma, 4)
    assert vals.shape == (fr.k, 22)
    assert vals[:, lay.z_slice].max() <= 4.0
    with pytest.raises(ValueError, match="class"):
        reading_signals(fr.features, fr.pred + 4, fr.conf, mu, sigma, 4)


def test_a_revert_resumes_the_previous_versions_reference() -> None:
    """A rolled-back device keeps its pre-drift reference instead of learning the drift."""
    import numpy as np

    from service.drift.device_monitor import DeviceMonitor, DeviceMonitorConfig
    from service.ingest.frames import DeviceFrame

    rng = np.random.default_rng(1)

    def frame(seq: int, version: int, shift: float) -> DeviceFrame:
        x = rng.standard_normal((16, 2)) + shift
        pred = (x[:, 0] > 0).astype(np.int64)
        return DeviceFrame("f", "d", 0, seq, seq, 0.0, version, x, pred, np.full(16, 0.8))

    cfg = DeviceMonitorConfig(64, null_min_blocks=8)  # learnt after 128-1024 frames
    mon = DeviceMonitor("f", "d", ["a", "b"], ["no", "yes"], cfg)
    for s in range(1100):
        mon.update(frame(s, 1, 0.0))
    ref = mon.reference
    assert ref is not None
    assert not mon.calibrating
    for s in range(1100, 1140):  # the sensor drifts on v1
        mon.update(frame(s, 1, 1.5))
    assert any(st.signal == "feature" for st in mon.drifting)
    for s in range(1140, 1150):  # a canary update to v2 ...
        mon.update(frame(s, 2, 1.5))
    assert mon.model_version == 2
    assert not mon.reference_complete or mon.reference is not None
    for s in range(1150, 1155):  # ... rolled back: v1 again, still drifted
        mon.update(frame(s, 1, 1.5))
    assert mon.model_version == 1
    back = mon.reference
    assert back is not None
    assert np.array_equal(back[0], ref[0]), "the pre-drift reference is back"
    assert any(st.signal == "feature" for st in mon.drifting), "the drift is still measured"
    restored = DeviceMonitor.from_state_bytes(mon.state_bytes())
    assert restored.model_version == 1
    assert restored.drifting == mon.drifting


# ------------------------------------------------------------------------------------------------
# a fleet's declared normal
# ------------------------------------------------------------------------------------------------


def small_monitor(normal: DeclaredNormal | None) -> DeviceMonitor:
    """Two features, two classes (8 streams), a 32-reading reference, levels of 16 blocks, no
    horizon (one frame): an independent stream starts after 128 frames, one floored at ``b``
    frames after 64·b-128·b."""
    cfg = DeviceMonitorConfig(reference_readings=32, null_min_blocks=16, null_horizon_readings=4)
    return DeviceMonitor("f", "d", ["a", "b"], ["no", "yes"], cfg, normal=normal)


def small_frames(n: int, *, dt_ms: Callable[[int], int] = lambda s: 1000, seed: int = 0,
                 shift_from: int | None = None, version: int = 1) -> list[DeviceFrame]:  # fmt: skip
    """Independent frames of 4 readings, ``dt_ms(seq)`` apart on the device's clock."""
    rng = np.random.default_rng(seed)
    out, ts = [], 0
    for s in range(n):
        x = rng.standard_normal((4, 2))
        if shift_from is not None and s >= shift_from:
            x[:, 0] += 1.5
        pred = (x[:, 0] > 0).astype(np.int64)
        out.append(DeviceFrame("f", "d", 0, s, ts, 0.0, version, x, pred, np.full(4, 0.8)))
        ts += dt_ms(s)
    return out


def label_batch_of(fr: DeviceFrame, rng: np.random.Generator) -> DeviceLabels:
    label = np.where(rng.random(fr.k) < 0.2, 1 - fr.pred, fr.pred)  # 20 % errors, independent
    return DeviceLabels("f", "d", 0, fr.seq, fr.ts_ms, 0.0, 1, fr.features, fr.pred, label)


def test_a_declared_session_floors_every_signal_block_but_not_the_error_stream():
    """Sessions of up to 4 s at a frame a second: blocks of at least 2 × 4 = 8 frames (first
    candidates after 64 · 8 = 512 frames, confirmed from 1024 on). The same independent frames
    and labels, undeclared, are monitored at 1-2 frames; the error stream's blocks come from
    the labels alone either way."""
    frames = small_frames(2100)
    declared, plain = small_monitor(DeclaredNormal(session_s=4.0)), small_monitor(None)
    for mon in (declared, plain):
        rng = np.random.default_rng(5)
        for fr in frames:
            mon.update(fr)
            mon.update_labels(label_batch_of(fr, rng))
    got, base = declared.calibration(), plain.calibration()
    assert (got.state, base.state) == ("monitoring", "monitoring")
    assert got.frame_interval_s == base.frame_interval_s == 1.0
    assert got.declared == DeclaredNormal(session_s=4.0)
    assert (got.declared_block_frames, got.declared_too_long, got.reason) == (8, False, None)
    assert int(declared._block.min()) >= 8  # every signal stream, in frames
    assert int(plain._block.max()) < 8
    assert got.streams_ready == base.streams_ready == 8
    assert got.block_readings_median >= 8 * 4
    assert got.block_seconds_max == got.block_readings_max / 4 * 1.0
    assert got.block_seconds_median is not None
    assert got.block_seconds_median >= 8.0
    assert (base.declared, base.declared_block_frames, base.reason) == (None, 0, None)
    assert got.error_ready
    assert base.error_ready
    assert got.error_block_labels == base.error_block_labels  # labels are not floored


def test_a_declared_scale_too_long_for_the_batch_means_is_said_plainly():
    """Sessions of 10 minutes at a frame a second need blocks of 2048 frames; the null
    learning chooses at most 512: the monitor says so as soon as it knows the interval."""
    mon = small_monitor(DeclaredNormal(session_s=600.0))
    frames = small_frames(1200)
    for fr in frames[:20]:  # the reference (8 frames) and 12 more: the interval is known
        mon.update(fr)
    early = mon.calibration()
    assert early.state == "calibrating"
    assert (early.declared_block_frames, early.declared_too_long) == (2048, True)
    assert early.reason is not None
    assert "2048 frames" in early.reason
    assert "512 frames" in early.reason
    assert "cannot be monitored" in early.reason
    for fr in frames[20:]:  # far past when an undeclared device is monitored
        mon.update(fr)
    late = mon.calibration()
    assert (late.state, late.streams_ready, late.declared_too_long) == ("calibrating", 0, True)


def test_a_declaration_waits_for_the_frame_interval_and_says_so():
    """Frames whose timestamps never increase give no interval: nothing starts, and the
    monitor says what it waits for (an undeclared one starts regardless)."""
    frames = small_frames(600, dt_ms=lambda s: 0)
    mon, plain = small_monitor(DeclaredNormal(period_s=60.0)), small_monitor(None)
    for fr in frames:
        mon.update(fr)
        plain.update(fr)
    got = mon.calibration()
    assert (got.state, got.streams_ready, got.frame_interval_s) == ("calibrating", 0, None)
    assert got.reason is not None
    assert "measuring the interval between frames" in got.reason
    base = plain.calibration()
    assert base.state == "monitoring"
    assert (base.frame_interval_s, base.block_seconds_max) == (None, None)


def test_the_floor_follows_a_device_that_starts_sending_faster():
    """1 s between frames, then 0.5 s from frame 40 (before any stream starts): a declared
    4-s session is 16 frames at the new pace, not 8 (first candidates after 1024 frames)."""
    mon = small_monitor(DeclaredNormal(session_s=4.0))
    for fr in small_frames(4200, dt_ms=lambda s: 1000 if s < 40 else 500, seed=1):
        mon.update(fr)
    got = mon.calibration()
    assert got.frame_interval_s == 0.5
    assert got.declared_block_frames == 16
    assert got.streams_ready == 8
    assert int(mon._block.min()) >= 16


def test_a_one_frame_floor_changes_nothing():
    """A declaration that one frame already spans gives the same blocks, κ and detections as
    no declaration (the floor is the only thing a declaration changes)."""
    frames = small_frames(900, shift_from=700)
    mons = [small_monitor(None), small_monitor(DeclaredNormal(session_s=0.25))]
    dets = [[d for fr in frames for d in m.update(fr)] for m in mons]
    assert dets[0]
    assert dets[0] == dets[1]
    assert np.array_equal(mons[0]._block, mons[1]._block)
    assert np.array_equal(mons[0]._kappa, mons[1]._kappa)
    assert mons[1].calibration().declared_block_frames == 1


def test_the_declaration_and_the_clock_survive_checkpoints_and_version_changes():
    normal = DeclaredNormal(period_s=8.0)
    mon = small_monitor(normal)
    frames = small_frames(300)
    for fr in frames[:200]:
        mon.update(fr)
    back = DeviceMonitor.from_state_bytes(mon.state_bytes())
    assert back.normal == normal
    assert back.calibration() == mon.calibration()
    update = small_frames(3, version=2)
    mon.update(replace(update[0], seq=200, ts_ms=frames[200].ts_ms))
    assert mon.calibration().declared == normal  # a new model version keeps the fleet's
    assert mon.calibration().frame_interval_s is None  # ... and measures its interval anew


class _Planted:
    """A pickle payload that creates ``path`` when unpickled (what a hostile registry would
    plant in place of a checkpoint)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("version", [3, STATE_FORMAT])
def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, version):
    """Format 3 was zlib(pickle): such a blob, old or under today's header, is refused with
    ``CheckpointFormatError`` and never unpickled (the planted file is not created)."""
    planted = tmp_path / "planted"
    body = zlib.compress(pickle.dumps({"layout": _Planted(str(planted))}))
    with pytest.raises(CheckpointFormatError):
        DeviceMonitor.from_state_bytes(add_header(STATE_MAGIC, version, body))
    assert not planted.exists()


def test_a_state_with_arrays_of_another_shape_or_kind_is_refused():
    mon = small_monitor(None)
    for fr in small_frames(200):
        mon.update(fr)
    blob = mon.state_bytes()
    for name, bad in (("mu", np.zeros(3)), ("ready", np.zeros(5, np.int8)), ("version", "x")):
        tree = unpack_state(blob[6:])
        tree[name] = bad
        with pytest.raises(CheckpointFormatError, match="corrupt"):
            DeviceMonitor.from_state_bytes(blob[:6] + pack_state(tree))


def test_a_restored_monitor_goes_on_byte_identically():
    """N frames and labels, checkpoint, restore; M more to both: the same alarms and
    suspicions, and the same checkpoint bytes at every step (reference, learning, monitored
    with the error detectors running, a change)."""
    frames = small_frames(1800)
    rng = np.random.default_rng(3)
    alarms = 0
    for cut in (20, 300, 1500):
        a = small_monitor(None)
        for fr in frames[:cut]:
            a.update(fr)
            _feed_labels(a, fr, rng)
        b = DeviceMonitor.from_state_bytes(a.state_bytes())
        assert b.state_bytes() == a.state_bytes()
        for i, fr in enumerate(frames[cut:]):
            if i > 200:
                fr = replace(fr, features=fr.features + 1.5)  # a change
            out = []
            for mon in (a, b):
                got = mon.observe(fr)
                lb = _labels_of(fr, np.random.default_rng(i))
                res = mon.observe_labels(lb)
                out.append((got, res))
            assert out[0] == out[1]
            alarms += len(out[0][0].alarms)
        assert a.state_bytes() == b.state_bytes()
        assert a.calibration().error_ready
    assert alarms > 0


def _labels_of(fr: DeviceFrame, rng: np.random.Generator) -> DeviceLabels:
    pred = fr.pred[:4]
    label = np.where(rng.random(4) < 0.8, pred, 1 - pred)  # two classes
    return DeviceLabels(
        fr.fleet, fr.device, fr.boot, fr.seq, fr.ts_ms, 0.0, fr.param_version,
        fr.features[:4], pred, label,
    )  # fmt: skip


def _feed_labels(mon: DeviceMonitor, fr: DeviceFrame, rng: np.random.Generator) -> None:
    mon.observe_labels(_labels_of(fr, rng))
