"""The ``feature_var`` stream: the within-frame variance of ``z`` (service/drift/signals.py),
its legacy form (the frame's mean of ``z²``) for one-reading frames."""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.signal import lfilter

from service.drift.device_monitor import DeviceMonitor
from service.drift.signals import (
    SignalLayout,
    batch_frame_means_arrays,
    reading_deviations,
    skew_normalise,
    standardised_means,
)
from service.ingest.frames import DeviceFrame

FEATURES = ["a", "b"]
CLASSES = ["n", "p"]
LAY = SignalLayout.create(FEATURES, CLASSES)


def frame_rows(x: np.ndarray, k: int) -> np.ndarray:
    n = x.shape[0] // k
    ks = np.full(n, k)
    m = n * k
    return batch_frame_means_arrays(
        x[:m], np.zeros(m, np.int64), np.full(m, 0.5), ks, np.zeros(2), np.ones(2), 2
    )


def slow_sensor(n: int, phi: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, 2)) * np.sqrt(1 - phi * phi)
    return lfilter([1.0], [1.0, -phi], e, axis=0)


def test_block_means_of_a_slow_sensor_are_far_less_skewed_than_those_of_z2():
    """The reason for the stream: on AR(1) φ = 0.99 block means of the frame mean of ``z²``
    keep a chi-square-like tail (the slow ``z̄²``), those of the within-frame variance do not."""
    k, b = 16, 32
    rows = frame_rows(slow_sensor(400_000, 0.99, 1), k)
    var = rows[:, LAY.var_slice][:, 0]
    zbar = rows[:, LAY.z_slice][:, 0]
    z2 = var * (k - 1) / k + zbar * zbar
    m = len(var) // b
    skew_var = stats.skew(var[: m * b].reshape(m, b).mean(axis=1))
    skew_z2 = stats.skew(z2[: m * b].reshape(m, b).mean(axis=1))
    assert skew_z2 > 2.5 * skew_var


def test_reading_deviations_average_to_the_within_frame_variance():
    rng = np.random.default_rng(2)
    ks = np.array([16, 1, 5, 16])
    z = rng.standard_normal((int(ks.sum()), 2))
    dev = reading_deviations(z, ks)
    starts = np.concatenate([[0], np.cumsum(ks)[:-1]])
    for s, k in zip(starts, ks, strict=True):
        part = dev[s : s + k]
        if k == 1:
            assert np.isnan(part).all()
        else:
            np.testing.assert_allclose(part.mean(axis=0), z[s : s + k].var(axis=0, ddof=1))


def test_legacy_rows_are_standardised_as_the_mean_of_z2():
    """``within=False`` (old checkpoints, one-reading references): the value monitored is the
    frame's mean of ``z²``, rebuilt exactly from ``z̄`` and the within-frame variance."""
    rng = np.random.default_rng(3)
    ks = np.array([16, 7, 1, 16])
    x = rng.standard_normal((int(ks.sum()), 2)) * 1.3
    rows = batch_frame_means_arrays(
        x, np.zeros(len(x), np.int64), np.full(len(x), 0.5), ks, np.zeros(2), np.ones(2), 2
    )
    ref_mean = rng.uniform(0.2, 1.2, LAY.n_streams)
    inv_sd = rng.uniform(0.5, 2.0, LAY.n_streams)
    skew = rng.uniform(0.0, 1.5, LAY.n_streams)
    got = standardised_means(rows, ks, ref_mean, inv_sd, skew, LAY, within=False)
    z = np.clip(x, -4, 4)
    starts = np.concatenate([[0], np.cumsum(ks)[:-1]])
    z2 = np.stack([(z[s : s + k] ** 2).mean(axis=0) for s, k in zip(starts, ks, strict=True)])
    old = rows.copy()
    old[:, LAY.var_slice] = z2
    root_k = np.sqrt(ks)[:, None]
    want = skew_normalise((old - ref_mean) * root_k * inv_sd, skew / root_k)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # per row: only the flagged rows are legacy; a one-reading frame on a within row gives 0
    mixed = standardised_means(
        rows, ks, ref_mean, inv_sd, skew, LAY, within=np.array([True, False, True, False])
    )
    np.testing.assert_allclose(mixed[[1, 3]], want[[1, 3]], rtol=1e-12)
    within = standardised_means(rows, ks, ref_mean, inv_sd, skew, LAY, within=True)
    np.testing.assert_array_equal(mixed[[0, 2]], within[[0, 2]])
    assert (within[2, LAY.var_slice] == 0.0).all()
    assert not np.isnan(within).any()


def frames_of(k: int, n: int, seed: int) -> list[DeviceFrame]:
    rng = np.random.default_rng(seed)
    out = []
    for seq in range(n):
        x = rng.standard_normal((k, 2))
        pred = (rng.random(k) < 0.3).astype(np.int64)
        out.append(DeviceFrame("f", "d", 0, seq, seq, 0.0, 1, x, pred, rng.uniform(0.5, 1, k)))
    return out


def test_a_device_sending_single_readings_keeps_the_mean_of_z2():
    mon = DeviceMonitor("f", "d", FEATURES, CLASSES)
    for fr in frames_of(1, 600, 4):
        mon.update(fr)
    assert mon._var_within is False
    assert mon._ref_mean is not None
    # the reference of the legacy stream is that of z² of standard normal readings
    assert np.all(np.abs(mon._ref_mean[LAY.var_slice] - 1.0) < 0.25)
    grouped = DeviceMonitor("f", "d", FEATURES, CLASSES)
    for fr in frames_of(16, 40, 4):
        grouped.update(fr)
    assert grouped._var_within is True
