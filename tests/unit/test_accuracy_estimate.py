"""Tests of the CBPE-style accuracy estimate (service.drift.accuracy_estimate)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from edge_agent.device.simulator import DriftSpec, SensorSimulator
from edge_agent.fixedpoint.linear import QuantizedLinear
from service.drift.accuracy_estimate import (
    ConfidenceCalibration,
    estimate_accuracy,
    pool_adjacent_violators,
)
from service.learn.factory_model import train_factory_model

FRAC = 2048.0  # telemetry features are Q4.11


@pytest.fixture(scope="module")
def model() -> QuantizedLinear:
    return train_factory_model(seed=0).quantize()


def infer(model: QuantizedLinear, sample):
    """u8 confidences, and whether the device's prediction matches the label and the activity."""
    x = np.round(sample.features * FRAC) / FRAC  # what the device holds
    logits = model.logits(x)
    pred = model.decide(logits)
    return model.confidence(logits).astype(np.int64), pred == sample.labels, pred == sample.activity


def calibrated_then_drifted(model, drift, seeds=range(4000, 4040), n=300):
    """As the cohort monitor works: calibrate on the devices' own reference readings (labelled),
    then estimate a later window of the same devices, in which ``drift`` is active."""
    cal = ConfidenceCalibration()
    u8s, oks, acts = [], [], []
    for s in seeds:
        sim = SensorSimulator(s, drift=drift)
        u8, ok, _ = infer(model, sim.sample(n, t=0.0))  # reference: before the drift starts
        cal.add(u8, ok)
        u8, ok, act = infer(model, sim.sample(n, t=1e6))
        u8s.append(u8)
        oks.append(ok)
        acts.append(act)
    est = estimate_accuracy(np.bincount(np.concatenate(u8s), minlength=256), cal)
    assert est is not None
    return est, float(np.concatenate(oks).mean()), float(np.concatenate(acts).mean())


# -- building blocks ------------------------------------------------------------------------------


def test_pav_matches_sklearn_isotonic_regression():
    rng = np.random.default_rng(0)
    for _ in range(30):
        v = rng.random(12)
        w = rng.integers(0, 5, 12).astype(float) + rng.random(12)
        expected = (
            IsotonicRegression().fit(np.arange(12), v, sample_weight=w).predict(np.arange(12))
        )
        np.testing.assert_allclose(pool_adjacent_violators(v, w), expected, atol=1e-12)


def test_calibration_is_monotone_and_shrinks_sparse_bins():
    cal = ConfidenceCalibration(bins=4, prior_strength=10.0)
    # bin 2 looks worse than bin 1 on very few labels; bin 3 has many labels
    cal.add_counts(np.array([0, 30, 0, 900]), np.array([0, 50, 2, 1000]))
    prior = cal.bin_midpoints()
    p = cal.probabilities(prior)
    assert np.all(np.diff(p) >= -1e-12)
    assert p[0] == pytest.approx(prior[0])  # no labels: the raw confidence
    assert p[3] == pytest.approx((900 + 10 * prior[3]) / 1010, abs=1e-9)
    with pytest.raises(ValueError, match="correct <= total"):
        cal.add_counts(np.array([2, 0, 0, 0]), np.array([1, 0, 0, 0]))


def test_fallback_is_the_mean_raw_confidence():
    u8 = np.array([100, 150, 200, 255, 255])
    counts = np.bincount(u8, minlength=256)
    est = estimate_accuracy(counts, None)
    assert est is not None
    assert est.estimate == pytest.approx(u8.mean() / 256)
    assert not est.calibrated
    assert est.kind == "estimate"
    assert "blind to concept shift" in str(est)
    assert est.low <= est.estimate <= est.high
    assert estimate_accuracy(np.zeros(256), None) is None


def test_interval_narrows_with_labels_and_readings():
    u8 = np.full(1000, 220)
    few = ConfidenceCalibration()
    few.add(u8[:20], np.ones(20, bool))
    many = ConfidenceCalibration()
    many.add(u8, np.arange(1000) % 10 != 0)
    counts = np.bincount(u8, minlength=256)
    e_few = estimate_accuracy(counts, few)
    e_many = estimate_accuracy(counts, many)
    assert e_few is not None
    assert e_many is not None
    assert e_many.high - e_many.low < e_few.high - e_few.low
    assert e_many.estimate == pytest.approx(0.9, abs=0.01)


# -- on the simulated fleet with the factory model ------------------------------------------------


@pytest.fixture(scope="module")
def stationary(model):
    return calibrated_then_drifted(model, None)


def later(kind: str, magnitude: float = float("nan")) -> DriftSpec:
    return DriftSpec(kind, start_s=1000.0, magnitude=magnitude)


def test_stationary_estimate_matches_realised_accuracy(stationary):
    est, realised, _ = stationary
    assert abs(est.estimate - realised) < 0.02
    assert est.calibrated
    assert est.low <= realised <= est.high


def test_blind_to_concept_shift(model, stationary):
    """Labels change, inputs do not: the estimate stays while the realised accuracy drops."""
    est, realised, against_activity = calibrated_then_drifted(model, later("concept"))
    assert est.estimate == pytest.approx(stationary[0].estimate, abs=1e-9)  # same inputs
    assert realised < est.estimate - 0.25
    assert not est.low <= realised <= est.high
    # the model is as good as before at the physical activity: only the labels moved
    assert abs(against_activity - est.estimate) < 0.03


@pytest.mark.parametrize(
    ("kind", "magnitude"),
    [("offset", 0.05), ("offset", -0.05), ("gain", -0.1), ("gain", 0.05)],
    ids=["offset+0.05g", "offset-0.05g", "gain-10%", "gain+5%"],
)
def test_tracks_mild_covariate_drift(model, stationary, kind, magnitude):
    """Sensor drift within the reference support: the estimate follows the realised accuracy."""
    est, realised, _ = calibrated_then_drifted(model, later(kind, magnitude))
    assert realised < stationary[1]  # the drift costs accuracy ...
    assert abs(est.estimate - realised) < 0.03  # ... and the estimate stays close


def test_overestimates_large_out_of_support_drift(model):
    """The documented limitation: a +30 % gain makes the model confidently wrong."""
    est, realised, _ = calibrated_then_drifted(model, later("gain"))
    assert realised < 0.8
    assert est.estimate - realised > 0.08
