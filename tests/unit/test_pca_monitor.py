"""Tests of the PCA reconstruction-error monitor (service.drift.pca_monitor)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from service.drift.pca_monitor import (
    MomentSums,
    PcaModel,
    PcaMonitor,
    ReservoirSample,
    prediction_bound,
)

F = 5
BASE = np.eye(F)
BASE[0, 1] = BASE[1, 0] = 0.85  # x0 and x1 move together
BASE[2, 3] = BASE[3, 2] = -0.6
FLIP = BASE.copy()
FLIP[0, 1] = FLIP[1, 0] = -0.85  # same marginals, correlation reversed


def draw(rng, cov, n=2000, loc=0.0, scale=1.0):
    return loc + scale * rng.multivariate_normal(np.zeros(F), cov, n)


def fitted(rng, windows=20, **kw):
    mon = PcaMonitor(F, **kw)
    for _ in range(windows):
        z = draw(rng, BASE, loc=3.0, scale=2.0)  # location and scale are standardised away
        mon.add_reference(MomentSums.of(z), z)
    mon.fit()
    return mon


def test_moment_sums_merge_exactly():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, F))
    parts = MomentSums.of(z[:300]) + MomentSums.of(z[300:])
    whole = MomentSums.of(z)
    assert parts.n == whole.n == 1000
    np.testing.assert_allclose(parts.s1, whole.s1)
    np.testing.assert_allclose(parts.s2, whole.s2)
    mean, cov = whole.covariance()
    np.testing.assert_allclose(mean, z.mean(axis=0))
    np.testing.assert_allclose(cov, np.cov(z.T, bias=True), atol=1e-12)


def test_fit_matches_a_direct_pca_of_the_standardised_data():
    rng = np.random.default_rng(1)
    z = draw(rng, BASE, n=20_000, loc=1.0, scale=3.0)
    model = PcaModel.fit(MomentSums.of(z), variance=0.9)
    u = (z - z.mean(axis=0)) / z.std(axis=0)
    _, sv, vt = np.linalg.svd(u, full_matrices=False)
    explained = sv**2 / (sv**2).sum()
    np.testing.assert_allclose(model.explained, explained, atol=1e-9)
    k = model.n_components
    assert explained[: k - 1].sum() < 0.9 <= explained[:k].sum()
    # same subspace: projectors agree
    np.testing.assert_allclose(model.components @ model.components.T, vt[:k].T @ vt[:k], atol=1e-8)
    # per-reading error = distance to the subspace
    err = model.reconstruction_error(z[:5])
    r = u[:5] - u[:5] @ vt[:k].T @ vt[:k]
    np.testing.assert_allclose(err, np.linalg.norm(r, axis=1), atol=1e-8)


def test_always_leaves_a_residual_space():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5000, F))  # isotropic: 90 % needs all components
    assert PcaModel.fit(MomentSums.of(z), 0.9).n_components == F - 1
    assert PcaModel.fit(MomentSums.of(z), 1.0).n_components == F - 1


def test_detects_a_correlation_change_with_unchanged_marginals():
    rng = np.random.default_rng(3)
    mon = fitted(rng)
    before = draw(rng, BASE, loc=3.0, scale=2.0)
    after = draw(rng, FLIP, loc=3.0, scale=2.0)
    # the marginals are the same distribution: a univariate test sees nothing
    for j in range(F):
        assert stats.ks_2samp(before[:, j], after[:, j]).pvalue > 1e-3
    ok = mon.evaluate(before)
    bad = mon.evaluate(after)
    assert ok is not None
    assert bad is not None
    assert not ok.alarm
    assert bad.alarm
    assert bad.score > 1.5


def test_few_false_alarms_on_stationary_windows():
    rng = np.random.default_rng(4)
    mon = fitted(rng)
    alarms = sum(bool(mon.evaluate(draw(rng, BASE, loc=3.0, scale=2.0)).alarm) for _ in range(200))
    assert alarms <= 3  # nominal 0.135 % per window


def test_prediction_bound_and_too_few_windows():
    v = np.array([1.0, 2.0, 3.0])
    t = stats.t.ppf(0.95, 2)
    assert prediction_bound(v, 0.05) == pytest.approx(2.0 + t * 1.0 * np.sqrt(4 / 3))
    assert prediction_bound(np.array([2.0, 2.0]), 0.01) > 2.0
    mon = PcaMonitor(F)
    z = np.random.default_rng(5).normal(size=(10, F))
    mon.add_reference(MomentSums.of(z), z)
    with pytest.raises(ValueError, match="at least 3"):
        mon.fit()
    assert mon.evaluate(z) is None


def test_reservoir_sample_is_uniform():
    rng = np.random.default_rng(6)
    hits = np.zeros(100)
    for _ in range(400):
        rs = ReservoirSample(10, 1, rng)
        for start in range(0, 100, 7):  # uneven batches
            rs.add(np.arange(start, min(start + 7, 100), dtype=np.float64)[:, None])
        assert rs.seen == 100
        assert rs.rows.shape == (10, 1)
        assert len(set(rs.rows[:, 0].tolist())) == 10
        hits[rs.rows[:, 0].astype(int)] += 1
    assert stats.chisquare(hits).pvalue > 1e-3


def test_state_round_trip():
    rng = np.random.default_rng(7)
    mon = PcaMonitor(F)
    for _ in range(5):
        z = draw(rng, BASE, n=200)
        mon.add_reference(MomentSums.of(z), z)
    half = PcaMonitor.from_state(F, mon.variance, mon.alpha, mon.state())
    assert half.n_reference == 5
    assert not half.fitted
    mon.fit()
    again = PcaMonitor.from_state(F, mon.variance, mon.alpha, mon.state())
    z = draw(rng, FLIP, n=300)
    assert again.evaluate(z) == mon.evaluate(z)
    assert half.fit().n_components == mon.model.n_components
