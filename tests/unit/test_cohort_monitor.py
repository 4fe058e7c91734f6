"""Tests of layer B (service.drift.cohort_monitor) on the simulated fleet with the factory model.

The fleet: ``SensorSimulator`` devices, features held as Q4.11 like the device agent, predictions
and confidences from the factory model's integer kernel (``edge_agent/device/agent.py`` step()),
frames of 16 readings, one window = ``N`` readings per device.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import chi2_contingency

from edge_agent.device.simulator import (
    CLASSES,
    FEATURES,
    DriftSpec,
    SensorSimulator,
    window_times,
)
from edge_agent.fixedpoint.linear import QuantizedLinear
from service.drift.checkpoint_format import CheckpointFormatError, add_header
from service.drift.cohort_monitor import (
    STATE_MAGIC,
    STATE_VERSION,
    CohortConfig,
    CohortMonitor,
    CohortReport,
    NullTable,
    binomial_bound,
    g_statistic,
    group_cells,
    holm,
)
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.learn.factory_model import train_factory_model

FLEET = "hall-7"
N = 64  # readings per device per window
BATCH = 16
WINDOW_MS = 60_000
DRIFT_WINDOW = 25


@pytest.fixture(scope="module")
def model() -> QuantizedLinear:
    return train_factory_model(seed=0).quantize()


# -- a simulated fleet ----------------------------------------------------------------------------


def device_window(model, sim, device, w, n=N, repeat=1, label_rate=0.0, rng=None):
    """Frames (and labels) of one device in window ``w``, as the agent would publish them."""
    m = n // repeat
    sample = sim.sample(m, t=window_times(m, w * n * 2.0))
    held = np.round(sample.features * 2048) / 2048
    y = sample.labels
    if repeat > 1:  # each reading sent ``repeat`` times: strongly dependent readings
        held, y = np.repeat(held, repeat, axis=0), np.repeat(y, repeat)
    logits = model.logits(held)
    pred = model.decide(logits)
    conf = model.confidence(logits).astype(np.float64) / 256.0
    frames = [
        DeviceFrame(FLEET, device, 0, w * 100 + i, w * WINDOW_MS, 0.0, 1, held[s], pred[s], conf[s])
        for i in range(0, n, BATCH)
        for s in [slice(i, i + BATCH)]
    ]
    labels = []
    if rng is not None and label_rate > 0:
        chosen = np.flatnonzero(rng.random(n) < label_rate)
        labels.append(
            DeviceLabels(
                FLEET, device, 0, w, w * WINDOW_MS, 0.0, 1, held[chosen], pred[chosen], y[chosen]
            )
        )
    return frames, labels, int((pred == y).sum())


def run_fleet(
    model,
    *,
    devices=50,
    windows=40,
    drift=None,
    drifted=(),
    seed0=1000,
    label_rate=0.0,
    repeat=1,
    config=None,
    monitor=None,
    start=0,
    pvalues=None,
):
    """Feed ``windows`` windows; returns the monitor, the reports and the realised accuracies."""
    sims = [
        SensorSimulator(seed0 + d, drift=drift if d in drifted else None) for d in range(devices)
    ]
    mon = monitor or CohortMonitor(
        FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma, config, model=model
    )
    rng = np.random.default_rng(seed0)
    reports: list[CohortReport] = []
    realised: list[float] = []
    for w in range(start, start + windows):
        correct = 0
        for d, sim in enumerate(sims):
            frames, labels, ok = device_window(
                model, sim, f"dev-{d:03d}", w, repeat=repeat, label_rate=label_rate, rng=rng
            )
            correct += ok
            for fr in frames:
                mon.add(fr)
            for lb in labels:
                mon.add_labels(lb)
        reports.append(mon.evaluate(now_ms=(w + 1) * WINDOW_MS))
        if pvalues is not None:
            pvalues.append(mon.last_p_values)
        realised.append(correct / (devices * N))
    return mon, reports, realised


def at(kind: str, magnitude: float = float("nan")) -> DriftSpec:
    """A drift switched on at the start of window ``DRIFT_WINDOW``."""
    return DriftSpec(kind, start_s=DRIFT_WINDOW * N * 2.0, magnitude=magnitude)


def discovered(report: CohortReport) -> set[int]:
    return {int(d.device.split("-")[1]) for d in report.drifting_devices}


@pytest.fixture(scope="module")
def stationary(model):
    return run_fleet(model, label_rate=0.1)


@pytest.fixture(scope="module")
def gain_drift(model):
    return run_fleet(model, windows=34, drift=at("gain"), drifted=range(10))


# -- test machinery -------------------------------------------------------------------------------


def test_cells_have_enough_expected_count_and_are_contiguous():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 50, (300, 32)) * (rng.random((300, 32)) < 0.6)
    ref[:, 5] += 1
    n = rng.integers(10, 5000, 300)
    cells, slots = group_cells(ref, n, ordinal=True, min_expected=5, max_groups=10)
    assert slots == 10
    assert np.all(np.diff(cells, axis=1) >= 0)  # ordinal: adjacent bins, in order
    q = ref / ref.sum(axis=1, keepdims=True)
    for r in range(300):
        mass = np.bincount(cells[r], weights=q[r], minlength=slots)
        used = mass[mass > 0]
        assert np.all(used * n[r] >= 5 - 1e-9)
        assert used.size <= min(10, max(1, n[r] // 5))


def test_categorical_cells_pool_rare_classes():
    ref = np.array([[500, 300, 199, 1], [0, 900, 100, 0], [10, 10, 10, 970]])
    cells, slots = group_cells(
        ref, np.array([100, 100, 100]), ordinal=False, min_expected=5, max_groups=10
    )
    assert slots == 5
    assert cells[0].tolist() == [0, 1, 2, 2]  # the rare class joins the smallest kept class
    assert cells[1].tolist() == [2, 1, 2, 2]  # never-seen classes: no cell without expectation
    assert cells[2].tolist() == [3, 3, 3, 3]  # nothing left to test at this n
    g, k = g_statistic(np.array([[0, 50, 20, 30]] * 3), ref, cells, slots)
    assert np.all(np.isfinite(g))
    assert k.tolist() == [3, 2, 1]


def test_g_statistic_is_the_log_likelihood_test_of_homogeneity():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ref = rng.integers(1, 200, (1, 16))
        obs = rng.integers(0, 30, (1, 16))
        cells, slots = group_cells(ref, obs.sum(axis=1), ordinal=True, min_expected=5, max_groups=6)
        g, k = g_statistic(obs, ref, cells, slots)
        a = np.bincount(cells[0], weights=obs[0], minlength=slots)
        b = np.bincount(cells[0], weights=ref[0], minlength=slots)
        keep = b > 0
        expected, *_ = chi2_contingency(
            np.stack([a[keep], b[keep]]), correction=False, lambda_="log-likelihood"
        )
        assert g[0] == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert k[0] == keep.sum()


def test_null_table_p_values_are_calibrated_including_the_extrapolated_tail():
    k, n = 6, 90
    table = NullTable.simulate(k, n, draws=2000, tail_p=0.05, seed=0)
    # fresh null statistics, many more than the table has
    a = np.random.default_rng(9).multinomial(n, np.full(k, 1 / k), size=400_000)
    g = 2 * (a * np.log(np.where(a > 0, a, 1) / (n / k))).sum(axis=1)
    p = table.p_values(g)
    assert np.all((p > 0) & (p <= 1))
    for level in (0.05, 0.01, 1e-3):
        assert np.mean(p <= level) == pytest.approx(level, rel=0.3)
    assert np.mean(p <= 1e-4) == pytest.approx(1e-4, rel=0.5)
    # beyond the table: smaller than 1/2001, and monotone
    x = np.linspace(0, 60, 200)
    px = table.p_values(x)
    assert np.all(np.diff(px) <= 1e-15)
    assert table.p_values(np.array([40.0]))[0] < 1e-5
    assert table.critical(1e-6) == pytest.approx(table.scale * stats.chi2.isf(1e-6, k - 1))
    assert table.p_values(np.array([table.critical(1e-6)]))[0] == pytest.approx(1e-6)


def test_holm_against_the_adjusted_p_values():
    """Holm's adjusted p-values: ``max over i ≤ j of (n − i + 1)·p_(i)``; reject where ≤ α."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        p = np.concatenate([rng.random(40), rng.random(5) * 1e-3, rng.random(3) * 1e-5])
        disc, cut = holm(p, 0.05)
        order = np.argsort(p)
        n = p.size
        adjusted = np.empty(n)
        adjusted[order] = np.maximum.accumulate((n - np.arange(n)) * p[order])
        assert disc.tolist() == (adjusted <= 0.05).tolist()
        k = int(disc.sum())
        assert cut == (pytest.approx(0.05 / (n - k + 1)) if k else 0.0)
        assert np.all(p[disc] <= cut)
        assert np.all(p[~disc] > cut)
    assert holm(np.zeros(0), 0.05)[0].size == 0


def test_holm_controls_the_family_wise_error_whatever_the_discoveries():
    """500 tests, 150 of them far from their null (p ≤ 1e-8): the 350 true nulls are uniform.
    Holm discovers a true null in ≤ α of the repetitions; BH at the same level, whose cut-off
    rises with the 150 discoveries, does so most of the time."""
    rng = np.random.default_rng(3)
    reps, alpha = 4000, 0.01
    p = rng.random((reps, 500))
    p[:, :150] *= 1e-8
    holm_false = bh_false = 0
    for row in p:
        disc, _ = holm(row, alpha)
        assert disc[:150].all()
        holm_false += bool(disc[150:].any())
        ranked = np.sort(row)
        below = np.flatnonzero(ranked <= alpha * np.arange(1, 501) / 500)
        bh_cut = alpha * (below[-1] + 1) / 500
        bh_false += bool((row[150:] <= bh_cut).any())
    assert holm_false / reps <= alpha + 3 * np.sqrt(alpha / reps)
    assert bh_false / reps > 0.5


@pytest.mark.parametrize("devices", [1, 20, 50, 1000, 10_000])
def test_binomial_bound_is_the_upper_quantile(devices):
    b = binomial_bound(devices, 0.01, 0.001)
    assert stats.binom.sf(b, devices, 0.01) <= 0.001
    if b > 0:
        assert stats.binom.sf(b - 1, devices, 0.01) > 0.001


def test_config_validation():
    with pytest.raises(ValueError, match="fwer_alpha"):
        CohortConfig(fwer_alpha=0.1)
    with pytest.raises(ValueError, match="confirm_windows"):
        CohortConfig(confirm_windows=0)
    with pytest.raises(ValueError, match="reference_windows"):
        CohortConfig(reference_windows=2)
    with pytest.raises(ValueError, match="divide 256"):
        CohortConfig(feature_bins=20)


# -- the simulated fleet --------------------------------------------------------------------------


def test_stationary_fleet_raises_no_cohort_alarm(stationary):
    _, reports, realised = stationary
    assert [r.reference_complete for r in reports] == [False] * 20 + [True] * 20
    tested = reports[20:]
    assert all(r.n_devices_tested == 50 for r in tested)
    assert all(r.n_tests == 500 for r in tested)
    assert not any(r.cohort_alarm for r in tested)
    assert not any(d.detector == "cohort_binomial" for r in tested for d in r.detections)
    # Holm at 0.01: a window has any discovery with probability <= 1 %; over 20 windows expect
    # <= 0.2 such windows, so 2 discovered device-signals is generous; an alarm needs two in a row
    assert sum(len(s.signals) for r in tested for s in r.drifting_devices) <= 2
    assert not any(d.alarm for r in tested for d in r.drifting_devices)
    assert not any(d.scope == "device" for r in tested for d in r.detections)
    assert all(v < 1.2 for v in tested[-1].dispersion.values())
    for r in tested:
        assert max(r.feature_js.values()) < 0.08
        assert r.class_js is not None
        assert r.class_js < 0.05
        assert sum(r.class_ratios.values()) == pytest.approx(1.0)
        assert r.pca_error is not None
        assert r.pca_threshold is not None
        assert r.accuracy is not None
        assert r.accuracy.kind == "estimate"
    est = np.array([r.accuracy.estimate for r in tested])
    assert np.abs(est - np.array(realised[20:])).mean() < 0.02


def test_stationary_p_values_are_uniform(model):
    collected: list[np.ndarray] = []
    run_fleet(model, devices=40, windows=30, seed0=7000, pvalues=collected)
    p = np.concatenate(collected[20:]).ravel()
    p = p[np.isfinite(p)]
    assert p.size == 40 * 10 * 10
    # valid and close to exact: slightly conservative (φ ≥ 1, the +1 correction, ties)
    for level in (0.2, 0.1, 0.05, 0.01):
        assert 0.6 * level <= np.mean(p <= level) <= 1.3 * level


def test_gain_drift_on_a_fifth_of_the_fleet_is_found(gain_drift):
    _, reports, _ = gain_drift
    drifted = set(range(10))
    before = reports[20:DRIFT_WINDOW]
    after = reports[DRIFT_WINDOW:]
    assert not any(r.cohort_alarm for r in before)
    assert all(r.cohort_alarm for r in after)
    recall = np.mean([len(discovered(r) & drifted) / 10 for r in after])
    assert recall >= 0.9
    false = sum(len(discovered(r) - drifted) for r in after)
    assert false <= 0.05 * sum(len(discovered(r)) for r in after) + 2
    last = after[-1]
    assert last.devices_discovered == len(last.drifting_devices)
    assert last.devices_discovered > last.cohort_bound
    signals = {(s.signal, s.feature) for d in last.drifting_devices for s in d.signals}
    assert ("feature", "mag_mean") in signals  # a gain scales |a|
    for dev in last.drifting_devices:
        for s in dev.signals:
            assert s.score >= 1.0
            assert s.p_value <= last.cutoff
    # a device alarm needs a discovery in two consecutive windows: none in the drift's first
    first = after[0]
    assert first.devices_discovered >= 5
    assert first.devices_alarmed == 0
    assert not any(d.scope == "device" for d in first.detections)
    assert all(d.consecutive_windows == 1 and not d.alarm for d in first.drifting_devices)
    dets = last.detections
    device_dets = [d for d in dets if d.scope == "device"]
    assert {d.detector for d in device_dets} == {"chi2"}
    alarmed = [d for d in last.drifting_devices if d.alarm]
    assert last.devices_alarmed == len(alarmed) >= 9
    assert all(d.consecutive_windows >= 2 for d in alarmed)
    assert len(device_dets) == sum(len(d.signals) for d in alarmed)
    assert {d.device for d in device_dets} == {d.device for d in alarmed}
    assert all(d.readings >= (DRIFT_WINDOW + 1) * N for d in device_dets)
    cohort = [d for d in dets if d.detector == "cohort_binomial"]
    assert len(cohort) == 1
    assert cohort[0].device is None
    assert cohort[0].score > 1.0
    assert cohort[0].ts_ms == last.window_end_ms
    # the pooled dashboard distances move too
    assert max(last.feature_js.values()) > max(reports[21].feature_js.values())


def test_stationary_devices_stay_undiscovered_while_half_the_fleet_drifts(model):
    """25 of 50 devices gain drift, 20 windows tested after it: Holm (FWER 0.01 per window)
    discovers a stationary device in at most about 1 % of the windows, never in two in a row,
    however many drifted devices it discovers. Benjamini–Hochberg at the same level, on the same
    p-values, whose cut-off rises with the discoveries, finds stationary devices in many."""
    drifted = set(range(25))
    pvals: list[np.ndarray] = []
    mon, reports, _ = run_fleet(
        model, windows=DRIFT_WINDOW + 20, drift=at("gain"), drifted=drifted, seed0=4000,
        pvalues=pvals,
    )  # fmt: skip
    after = reports[DRIFT_WINDOW:]
    assert np.mean([len(discovered(r) & drifted) / 25 for r in after]) >= 0.9
    assert all(r.cohort_alarm for r in after)
    false_windows = [r.window_index for r in after if discovered(r) - drifted]
    assert len(false_windows) <= 1
    stationary_alarms = [
        d.device for r in reports for d in r.drifting_devices
        if d.alarm and int(d.device.split("-")[1]) not in drifted
    ]  # fmt: skip
    assert stationary_alarms == []
    rows_stationary = np.array([int(d.split("-")[1]) not in drifted for d in mon.last_tested])
    bh_false_windows = 0
    for p in pvals[DRIFT_WINDOW:]:
        flat = np.sort(p[np.isfinite(p)])
        below = np.flatnonzero(flat <= 0.01 * np.arange(1, flat.size + 1) / flat.size)
        cut = 0.01 * (below[-1] + 1) / flat.size if below.size else 0.0
        bh_false_windows += bool(np.any(p[rows_stationary] <= cut))
    assert bh_false_windows >= 2


def test_concept_drift_is_invisible_to_inputs_but_not_to_labels(model):
    """Labels flip walk/run everywhere: no input test fires, the estimate stays, the labelled
    accuracy drops."""
    _, reports, realised = run_fleet(
        model, devices=30, windows=30, drift=at("concept"), drifted=range(30), label_rate=0.2
    )
    before, after = reports[20:DRIFT_WINDOW], reports[DRIFT_WINDOW:]
    assert not any(r.cohort_alarm for r in after)
    est_before = np.mean([r.accuracy.estimate for r in before])
    est_after = np.mean([r.accuracy.estimate for r in after])
    assert abs(est_after - est_before) < 0.02
    lab_after = np.mean([r.labelled_accuracy for r in after])
    assert lab_after < est_after - 0.2
    assert np.mean(realised[DRIFT_WINDOW:]) < est_after - 0.2
    assert after[0].accuracy.calibrated


def test_devices_below_minimum_and_late_joiners_are_counted(model):
    cfg = CohortConfig(reference_windows=4, min_device_readings=48)
    mon = CohortMonitor(FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma, cfg)
    sims = {f"d{i}": SensorSimulator(100 + i) for i in range(6)}
    for w in range(10):
        for name, sim in sims.items():
            if name == "d5" and w < 5:
                continue  # joins late
            n = 32 if (name == "d4" and w >= 6) else N
            frames, _, _ = device_window(model, sim, name, w, n=n)
            for fr in frames:
                mon.add(fr)
        r = mon.evaluate(now_ms=w)
        if w == 7:
            assert r.n_devices == 6
            assert r.n_devices_below_min == 1  # d4 sends too little
            assert r.n_devices_in_reference == 1  # d5 builds its own reference
            assert r.n_devices_tested == 4
        if w == 9:
            assert r.n_devices_tested == 5  # d5's reference is complete


def test_pca_flags_a_correlation_change_the_marginal_tests_miss():
    """Synthetic cohort: x0, x1 correlated; from window 24 the correlation reverses."""
    rng = np.random.default_rng(3)
    f = 4
    cov = np.eye(f)
    cov[0, 1] = cov[1, 0] = 0.9
    flip = cov * np.where(np.add.outer(range(f), range(f)) == 1, -1, 1)
    mon = CohortMonitor(
        "syn", 2, [f"x{i}" for i in range(f)], ["neg", "pos"], np.zeros(f), np.ones(f)
    )
    reports = []
    for w in range(28):
        for d in range(20):
            x = rng.multivariate_normal(np.zeros(f), flip if w >= 24 else cov, N)
            pred = (x[:, 2] > 0).astype(np.int64)
            conf = np.clip(0.5 + np.abs(x[:, 2]) / 8, 0.5, 1.0)
            mon.add(DeviceFrame("syn", f"s{d}", 0, w, w, 0.0, 2, x, pred, conf))
        reports.append(mon.evaluate(now_ms=w))
    assert not any(r.pca_error > r.pca_threshold for r in reports[20:24])
    for r in reports[24:]:
        assert r.pca_error > 2 * r.pca_threshold
        assert [d.detector for d in r.detections if d.scope == "cohort"] == ["pca"]
        assert r.detections[-1].signal == "multivariate"
        assert r.devices_discovered <= 1  # the marginals did not move


def test_dependent_readings_are_absorbed_by_the_dispersion_factor(model):
    """Every reading sent twice: counts double, so does the statistic. The reference windows
    measure it (φ ≈ 2) and the tests stay quiet; without the correction they would not."""
    on = run_fleet(model, devices=30, windows=26, repeat=2, seed0=3000)
    off = run_fleet(
        model,
        devices=30,
        windows=26,
        repeat=2,
        seed0=3000,
        config=CohortConfig(dispersion=False),
    )
    phi = on[1][-1].dispersion
    assert all(1.6 < v < 2.5 for k, v in phi.items() if k != "mag_zcr_hz")
    assert sum(r.devices_discovered for r in on[1][20:]) <= 1
    assert sum(r.devices_discovered for r in off[1][20:]) >= 5


# -- ingest edge cases ----------------------------------------------------------------------------


def test_frames_of_another_cohort_are_refused(model):
    mon = CohortMonitor(FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma)
    x = np.zeros((2, len(FEATURES)))
    with pytest.raises(ValueError, match="monitor of"):
        mon.add(DeviceFrame(FLEET, "d", 0, 0, 0, 0.0, 2, x, np.zeros(2, np.int64), np.ones(2)))
    with pytest.raises(ValueError, match="monitor of"):
        mon.add(DeviceFrame("other", "d", 0, 0, 0, 0.0, 1, x, np.zeros(2, np.int64), np.ones(2)))


def test_bad_frames_are_dropped_and_counted_without_losing_the_good_ones(model):
    mon = CohortMonitor(FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma)
    good = np.full((4, len(FEATURES)), 0.5)
    bad = good.copy()
    bad[1, 2] = np.nan
    z = np.zeros(4, np.int64)
    mon.add(DeviceFrame(FLEET, "a", 0, 0, 0, 0.0, 1, good, z, np.full(4, 0.5)))
    mon.add(DeviceFrame(FLEET, "b", 0, 0, 0, 0.0, 1, bad, z, np.full(4, 0.5)))
    mon.add(DeviceFrame(FLEET, "c", 0, 0, 0, 0.0, 1, good, z + 7, np.full(4, 0.5)))  # class 7
    mon.add(DeviceFrame(FLEET, "d", 0, 0, 0, 0.0, 1, good, z, np.full(4, 1.5)))
    mon.add(DeviceFrame(FLEET, "e", 0, 0, 0, 0.0, 1, good[:3], z, np.full(4, 0.5)))  # shape
    mon.add(DeviceFrame(FLEET, "f", 0, 0, 0, 0.0, 1, good, z, np.full(4, 0.5)))
    r = mon.evaluate(now_ms=1)
    assert r.n_readings == 8
    assert r.n_devices == 2
    assert r.rejected_frames == 4
    assert mon.rejected_frames == 4
    assert mon.total_readings == 8


# -- checkpoints ----------------------------------------------------------------------------------


def strip(report: CohortReport) -> dict:
    return dataclasses.asdict(report)


@pytest.mark.parametrize("split", [8, 22])
def test_state_round_trip_resumes_exactly(model, split):
    """Checkpoint mid-window (buffered frames) during or after the reference; both copies then
    see the same data and must report the same."""
    cfg = CohortConfig(flush_readings=1000)
    a, _, _ = run_fleet(model, devices=12, windows=split, seed0=500, label_rate=0.2, config=cfg)
    sims = [SensorSimulator(900 + d) for d in range(12)]
    for d, sim in enumerate(sims[:5]):  # half a window, partly still buffered
        for fr in device_window(model, sim, f"dev-{d:03d}", split)[0]:
            a.add(fr)
    blob = a.state_bytes()
    b = CohortMonitor.from_state_bytes(blob, model=model)
    assert b.state_bytes() == blob
    _, ra, _ = run_fleet(
        model, devices=12, windows=6, seed0=77, monitor=a, start=split, label_rate=0.2
    )
    _, rb, _ = run_fleet(
        model, devices=12, windows=6, seed0=77, monitor=b, start=split, label_rate=0.2
    )
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    assert ra[-1].reference_complete == (split + 6 > 20)


def test_state_of_another_format_is_refused(model):
    mon = CohortMonitor(FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma)
    blob = mon.state_bytes()
    assert blob[:4] == STATE_MAGIC
    with pytest.raises(CheckpointFormatError, match="version 3"):
        CohortMonitor.from_state_bytes(add_header(STATE_MAGIC, 3, blob[6:]))
    with pytest.raises(CheckpointFormatError, match="magic"):
        CohortMonitor.from_state_bytes(b"TDDM" + blob[4:])
    with pytest.raises(CheckpointFormatError, match="damaged"):
        CohortMonitor.from_state_bytes(blob[:-40])
    with pytest.raises(CheckpointFormatError, match="short"):
        CohortMonitor.from_state_bytes(b"TD")


def test_state_of_format_1_is_still_read(gain_drift, model):
    """Format 1 (the BH release): ``fdr_q`` in the config, no run of discovered windows. It is
    read as format 2 with ``fwer_alpha`` = the old ``fdr_q`` and every run started again."""
    mon = gain_drift[0]
    blob = mon.state_bytes()
    assert blob[4:6] == STATE_VERSION.to_bytes(2, "big")
    with np.load(io.BytesIO(blob[6:]), allow_pickle=False) as z:
        arr = {k: z[k] for k in z.files if k != "disc_run"}
    meta = json.loads(arr["meta"].tobytes().decode())
    cfg = meta["config"]
    cfg["fdr_q"] = cfg.pop("fwer_alpha")
    del cfg["confirm_windows"]
    arr["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arr)
    old = CohortMonitor.from_state_bytes(add_header(STATE_MAGIC, 1, buf.getvalue()), model=model)
    assert old.config == mon.config
    assert old.n_devices == mon.n_devices
    fresh = CohortMonitor.from_state_bytes(blob, model=model)
    assert fresh.state_bytes() == blob
    assert old.state_bytes() != blob  # the runs of discovered windows start again


def test_label_batches_are_checked_and_counted(model):
    mon = CohortMonitor(FLEET, 1, FEATURES, CLASSES, model.mu, model.inv_sigma, model=model)
    x = np.full((3, len(FEATURES)), 0.5)
    pred = model.predict(x)
    mon.add_labels(DeviceLabels(FLEET, "a", 0, 0, 0, 0.0, 1, x, pred, pred))
    mon.add_labels(DeviceLabels(FLEET, "a", 0, 1, 0, 0.0, 1, x, pred, pred + 9))  # class 9
    bad = x.copy()
    bad[0, 0] = np.inf
    mon.add_labels(DeviceLabels(FLEET, "a", 0, 2, 0, 0.0, 1, bad, pred, pred))
    mon.add_labels(DeviceLabels(FLEET, "a", 0, 3, 0, 0.0, 1, x, (pred + 1) % 4, pred))
    with pytest.raises(ValueError, match="monitor of"):
        mon.add_labels(DeviceLabels(FLEET, "a", 0, 4, 0, 0.0, 2, x, pred, pred))
    assert mon.rejected_label_batches == 2
    assert mon.label_pred_mismatches == 3  # the last batch claims other predictions
    r = mon.evaluate(now_ms=1)
    assert r.n_labels == 6
    assert r.labelled_accuracy == pytest.approx(0.5)
