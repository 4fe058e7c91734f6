"""Dyadic batch means and the block choice of layer A's null learning (long_run_variance.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import lfilter

from service.drift.long_run_variance import (
    DEFAULT_LOOKAHEAD,
    DEFAULT_MIN_BLOCKS,
    DyadicBatchMeans,
    choose_blocks,
    confirm_blocks,
    horizon_level,
    inflate_delta,
    inflation_at,
    new_level_complete,
)

IID_READY = DEFAULT_MIN_BLOCKS << DEFAULT_LOOKAHEAD
"""Steps after which an independent series can first be ready (192)."""


def feed(values: np.ndarray, bm: DyadicBatchMeans | None = None) -> DyadicBatchMeans:
    bm = bm or DyadicBatchMeans(values.shape[1])
    for row in values:
        bm.add(row)
    return bm


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    e = rng.standard_normal(n) * math.sqrt(1.0 - phi * phi)
    return lfilter([1.0], [1.0, -phi], e)


def ready_after(series: np.ndarray) -> tuple[int | None, DyadicBatchMeans]:
    """Steps until ready, looking when a level completes (as the device monitor does)."""
    bm = DyadicBatchMeans(1)
    for i, v in enumerate(series, start=1):
        bm.add(np.array([v]))
        if new_level_complete(i) and choose_blocks(bm).ready[0]:
            return i, bm
    return None, bm


def test_streaming_batch_means_equal_the_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0]
    bm = feed(x)
    v = bm.variances()
    for j in range(bm.levels):
        b = 1 << j
        n = x.shape[0] // b
        assert bm.count[j] == n
        if n < 2:
            assert np.isnan(v[j]).all()
            continue
        means = x[: n * b].reshape(n, b, 3).mean(axis=1)
        np.testing.assert_allclose(v[j], b * means.var(axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(bm.mean(), x.mean(axis=0), rtol=1e-12)


def test_independent_values_are_ready_after_192_steps_with_blocks_of_one():
    rng = np.random.default_rng(1)
    when, bm = ready_after(rng.standard_normal(5000))
    assert when == IID_READY
    ch = choose_blocks(bm)
    assert ch.block[0] == 1
    assert 1.0 <= ch.kappa[0] <= 2.0
    assert ch.sd[0] == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_autocorrelated_values_wait_for_blocks_past_their_correlation_time(seed):
    phi = 0.8  # long-run variance (1 + φ) / (1 − φ) = 9: about 9 steps make one independent
    rng = np.random.default_rng(seed)
    when, bm = ready_after(ar1(rng, 60_000, phi))
    assert when is not None
    assert when > 4 * IID_READY
    ch = choose_blocks(bm)
    assert ch.block[0] >= 4
    assert 0.5 <= ch.lrv[0] / ((1 + phi) / (1 - phi)) <= 2.5  # from 48 blocks: ±25 %
    # what is left between the block means and the long run, κ covers (on fresh data)
    x = ar1(np.random.default_rng(seed + 100), 400_000, phi)
    b = int(ch.block[0])
    means = x[: x.size // b * b].reshape(-1, b).mean(axis=1)
    assert ch.kappa[0] * b * means.var() >= 0.7 * (1 + phi) / (1 - phi)


def test_a_cycle_is_averaged_out_by_blocks_of_its_period():
    rng = np.random.default_rng(5)
    t = np.arange(40_000)
    x = 2.0 * np.sin(2 * np.pi * t / 64) + rng.standard_normal(t.size)
    when, bm = ready_after(x)
    assert when is not None
    assert choose_blocks(bm).block[0] >= 32


def test_confirmed_blocks_respect_a_floor_per_series():
    """A floor of 8 steps on the first of two independent series (a declared time scale): both
    looks choose at least 8 for it; the other series keeps its block of one."""
    rng = np.random.default_rng(9)
    floor = np.array([8, 0])
    bm = feed(rng.standard_normal((1536, 2)))  # level 5 (blocks of 32) complete: 8 · 4
    first, previous = confirm_blocks(bm, np.zeros(2, dtype=np.int64), min_block=floor)
    assert not first.ready.any()  # nothing confirmed at a first look
    assert previous[0] >= 8
    second, _ = confirm_blocks(feed(rng.standard_normal((1536, 2)), bm), previous, min_block=floor)
    assert second.ready.all()
    assert second.block[0] >= 8
    assert second.block[1] == 1


def test_a_random_walk_is_never_ready():
    rng = np.random.default_rng(6)
    when, bm = ready_after(np.cumsum(rng.standard_normal(30_000)))
    assert when is None
    assert not choose_blocks(bm).ready[0]


def test_a_constant_is_ready_with_blocks_of_one():
    when, bm = ready_after(np.full(2000, 0.8))
    assert when == IID_READY
    ch = choose_blocks(bm)
    assert ch.block[0] == 1
    assert ch.kappa[0] == 1.0


def test_nothing_is_ready_before_enough_blocks():
    rng = np.random.default_rng(7)
    bm = feed(rng.standard_normal((IID_READY - 1, 2)))
    assert not choose_blocks(bm).ready.any()
    with pytest.raises(ValueError, match="min_blocks"):
        choose_blocks(bm, min_blocks=1)


def test_inflated_delta_is_smaller_and_identity_at_kappa_one():
    assert inflate_delta(1e-5, 1.0) == pytest.approx(1e-5)
    assert inflate_delta(1e-5, 2.0) < inflate_delta(1e-5, 1.5) < 1e-5
    with pytest.raises(ValueError, match="kappa"):
        inflate_delta(1e-5, 0.5)


def confirmed_start(series: np.ndarray, horizon: int) -> tuple[int, int, float, float] | None:
    """(steps, block, κ, implied long-run variance κ·b·sd²) when confirm_blocks first starts
    the series, looking when a level completes (as the device monitor does)."""
    bm = DyadicBatchMeans(1)
    prev = np.zeros(1, dtype=np.int64)
    for i, v in enumerate(series, start=1):
        bm.add(np.array([v]))
        if new_level_complete(i):
            ch, prev = confirm_blocks(bm, prev, horizon=horizon)
            if ch.ready[0]:
                b, kap, sd = int(ch.block[0]), float(ch.kappa[0]), float(ch.sd[0])
                return i, b, kap, kap * b * sd * sd
    return None


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
def test_a_weak_slow_component_is_measured_when_the_horizon_covers_it(seed):
    """Independent noise plus a weak AR(0.9) component (correlation time ~19 steps) whose
    long-run variance is twice the noise's: short blocks hardly show it. Looking only as far as
    the lookahead, the series starts at block 1-2 with about half the true long-run variance
    (3.0) in its threshold; checking blocks up to 64 steps first, it starts past the component
    with most of it."""
    rng = np.random.default_rng(seed)
    n = 20_000
    slow = 0.32 * ar1(rng, n, 0.9)
    x = rng.standard_normal(n) + slow
    true_lrv = 1.0 + 0.32**2 * (1.9 / 0.1)
    early = confirmed_start(x, horizon=1)
    late = confirmed_start(x, horizon=64)
    assert early is not None
    assert late is not None
    assert early[0] == 384
    assert early[1] <= 2
    assert early[3] < 0.6 * true_lrv
    assert late[0] >= DEFAULT_MIN_BLOCKS * 64
    assert late[1] >= 8
    assert late[3] >= 0.75 * true_lrv


def test_nothing_starts_before_blocks_of_the_horizon_count():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4000, 2))
    bm = feed(x)
    assert choose_blocks(bm).ready.all()
    assert not choose_blocks(bm, horizon=128).ready.any()  # 4000 < 48 * 128
    assert choose_blocks(bm, horizon=64).ready.all()  # 3072 <= 4000
    assert horizon_level(64) == 6
    with pytest.raises(ValueError, match="horizon"):
        choose_blocks(bm, horizon=0)


def test_kappa_of_independent_values_comes_down_as_the_levels_fill():
    """The threshold's κ on independent values: the upper bound of one well-counted level, not
    the largest of every level's bound, so it is near 1 and shrinks with more data."""
    rng = np.random.default_rng(7)
    kaps = []
    bm = DyadicBatchMeans(50)
    for n in (3072, 3072 * 7):
        bm = feed(rng.standard_normal((n, 50)), bm)
        kaps.append(float(np.median(inflation_at(bm, np.ones(50, dtype=np.int64)))))
    assert 1.0 < kaps[1] < kaps[0] < 1.35
