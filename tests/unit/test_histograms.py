"""Tests of the exact, mergeable histograms and the distances (service.drift.histograms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from edge_agent.fixedpoint.linear import quantize_input, quantize_linear
from service.drift.checkpoint_format import CheckpointFormatError, add_header
from service.drift.histograms import (
    HistogramLayout,
    Histograms,
    accumulate,
    bincount_rows,
    conf_to_u8,
    hellinger_distance,
    js_distance,
    reading_columns,
)

F, C = 3, 4
LAYOUT = HistogramLayout(n_features=F, n_classes=C)
MU = np.array([0.5, -1.0, 2.0], dtype=np.float32)
INV = np.array([2.0, 0.5, 1.0 / 3.0], dtype=np.float32)


def readings(rng: np.random.Generator, n: int):
    x = rng.normal(size=(n, F)) * 2.0 + MU
    pred = rng.integers(0, C, n)
    conf = rng.integers(64, 256, n) / 256.0
    return x, pred, conf


# -- layout and binning ---------------------------------------------------------------------------


def test_layout_columns_and_width():
    assert LAYOUT.width == F * 32 + 16 + C
    assert LAYOUT.conf_offset == 96
    assert LAYOUT.class_offset == 112
    q = np.array([[-128, 127, 0], [-121, -120, 7]])
    cols = LAYOUT.columns(q, np.array([0, 255]), np.array([0, 3]))
    # q = -128..-121 is bin 0, -120 starts bin 1, 0..7 is bin 16, 127 the last bin (31)
    assert cols[0].tolist() == [0, 32 + 31, 64 + 16, 96, 112]
    assert cols[1].tolist() == [0, 32 + 1, 64 + 16, 96 + 15, 115]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_features": 0, "n_classes": 2}, "n_features"),
        ({"n_features": 2, "n_classes": 1}, "n_classes"),
        ({"n_features": 2, "n_classes": 2, "feature_bins": 24}, "feature_bins"),
        ({"n_features": 2, "n_classes": 2, "conf_bins": 512}, "conf_bins"),
    ],
)
def test_layout_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistogramLayout(**kwargs)


def test_unknown_class_and_bad_confidence_are_refused():
    q = np.zeros((1, F), dtype=np.int64)
    with pytest.raises(ValueError, match="classes"):
        LAYOUT.columns(q, np.array([10]), np.array([C]))
    with pytest.raises(ValueError, match="confidences"):
        conf_to_u8([1.5])
    with pytest.raises(ValueError, match="confidences"):
        conf_to_u8([math.nan])


def test_conf_to_u8_recovers_the_wire_byte():
    u8 = np.arange(256)
    assert conf_to_u8(u8 / 256.0).tolist() == u8.tolist()
    assert conf_to_u8([1.0]).tolist() == [255]


def test_feature_bins_use_the_devices_quantisation_exactly():
    """The histogram's q is the kernel's q: quantize_input with the model's float32 μ, 1/σ."""
    rng = np.random.default_rng(1)
    model = quantize_linear(
        mu=MU.astype(np.float64),
        sigma=1.0 / INV.astype(np.float64),
        weights=np.eye(C, F),
        bias=[0.0] * C,
    )
    x = rng.normal(size=(5000, F)) * 3.0 + MU
    q = model.quantize_input(x)
    np.testing.assert_array_equal(q, quantize_input(x, MU, INV))
    cols = reading_columns(
        LAYOUT, model.mu, model.inv_sigma, x, np.zeros(5000, np.int64), np.ones(5000) * 0.5
    )
    np.testing.assert_array_equal(cols[:, :F] % 32, (q + 128) // 8)


# -- accumulation ---------------------------------------------------------------------------------


def test_accumulate_matches_a_reading_by_reading_count():
    rng = np.random.default_rng(2)
    x, pred, conf = readings(rng, 2000)
    dev = rng.integers(0, 7, 2000)
    counts = accumulate(LAYOUT, MU, INV, x, pred, conf, device_index=dev, n_devices=7)
    expected = np.zeros((7, LAYOUT.width), dtype=np.int64)
    cols = reading_columns(LAYOUT, MU, INV, x, pred, conf)
    for d, row in zip(dev, cols, strict=True):
        for c in row:
            expected[d, c] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int64
    # every reading lands once in every signal
    h = Histograms(LAYOUT, counts.sum(axis=0))
    assert h.n == 2000
    assert h.features.sum(axis=1).tolist() == [2000] * F
    assert int(h.conf.sum()) == 2000
    np.testing.assert_array_equal(h.classes, np.bincount(pred, minlength=C))


def test_pooled_equals_sum_of_devices_and_batches_merge():
    rng = np.random.default_rng(3)
    x, pred, conf = readings(rng, 3000)
    dev = rng.integers(0, 5, 3000)
    whole = accumulate(LAYOUT, MU, INV, x, pred, conf, device_index=dev, n_devices=5)
    parts = sum(
        accumulate(LAYOUT, MU, INV, x[s], pred[s], conf[s], device_index=dev[s], n_devices=5)
        for s in (slice(0, 1000), slice(1000, 1700), slice(1700, 3000))
    )
    np.testing.assert_array_equal(whole, parts)
    pooled = accumulate(LAYOUT, MU, INV, x, pred, conf)
    np.testing.assert_array_equal(pooled[0], whole.sum(axis=0))


def test_bincount_rows_checks_row_indices():
    with pytest.raises(ValueError, match="row index"):
        bincount_rows(np.zeros((2, 1), np.int64), np.array([0, 3]), 2, 4)


count_rows = st.lists(st.integers(0, 10**9), min_size=LAYOUT.width, max_size=LAYOUT.width)


@settings(max_examples=50, deadline=None)
@given(count_rows, count_rows, count_rows)
def test_merge_is_associative_and_commutative(a, b, c):
    ha, hb, hc = (Histograms(LAYOUT, np.array(v, dtype=np.int64)) for v in (a, b, c))
    assert (ha + hb) + hc == ha + (hb + hc)
    assert ha + hb == hb + ha
    assert ha + Histograms.empty(LAYOUT) == ha


def test_merge_refuses_other_layouts():
    other = HistogramLayout(F, C, feature_bins=16)
    with pytest.raises(ValueError, match="layouts"):
        _ = Histograms.empty(LAYOUT) + Histograms.empty(other)


# -- serialisation --------------------------------------------------------------------------------


def test_bytes_round_trip_and_refusal():
    rng = np.random.default_rng(4)
    h = Histograms(LAYOUT, rng.integers(0, 1 << 40, LAYOUT.width))
    blob = h.to_bytes()
    assert Histograms.from_bytes(blob) == h
    assert len(blob) == 6 + 8 + 8 * LAYOUT.width
    with pytest.raises(CheckpointFormatError, match="version 2"):
        Histograms.from_bytes(add_header(b"TDHG", 2, blob[6:]))
    with pytest.raises(CheckpointFormatError, match="magic"):
        Histograms.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="length"):
        Histograms.from_bytes(blob[:-8])


# -- distances ------------------------------------------------------------------------------------


def test_known_values():
    assert js_distance([5, 5], [5, 5], 0) == 0.0
    assert js_distance([1, 0], [0, 1], 0) == pytest.approx(1.0)
    assert hellinger_distance([1, 0], [0, 1], 0) == pytest.approx(1.0)
    # JSD((½,½) ‖ (1,0)) = 1.5 − ¾·log2(3); Hellinger² = 1 − sqrt(½)
    assert js_distance([1, 1], [1, 0], 0) == pytest.approx(math.sqrt(1.5 - 0.75 * math.log2(3)))
    assert hellinger_distance([1, 1], [1, 0], 0) == pytest.approx(math.sqrt(1 - math.sqrt(0.5)))
    # counts are normalised: scale does not matter
    assert js_distance([2, 6, 2], [10, 10, 0], 0) == pytest.approx(
        js_distance([1, 3, 1], [1, 1, 0], 0)
    )


def test_distances_agree_with_scipy_and_are_symmetric_and_bounded():
    rng = np.random.default_rng(5)
    for _ in range(50):
        p = rng.integers(0, 20, 12)
        q = rng.integers(0, 20, 12)
        p[0] += 1
        q[0] += 1
        expected = jensenshannon(p / p.sum(), q / q.sum(), base=2)
        assert js_distance(p, q, 0) == pytest.approx(expected, abs=1e-12)
        assert js_distance(p, q, 0) == pytest.approx(js_distance(q, p, 0))
        assert 0 <= hellinger_distance(p, q) <= 1
        assert hellinger_distance(p, q, 0) == pytest.approx(hellinger_distance(q, p, 0))


def test_distances_vectorise_over_leading_axes():
    rng = np.random.default_rng(6)
    p = rng.integers(0, 50, (4, 8))
    q = rng.integers(0, 50, (4, 8))
    js = js_distance(p, q)
    hel = hellinger_distance(p, q)
    assert isinstance(js, np.ndarray)
    assert js.shape == (4,)
    for i in range(4):
        assert js[i] == pytest.approx(js_distance(p[i], q[i]))
        assert hel[i] == pytest.approx(hellinger_distance(p[i], q[i]))


def test_smoothing_of_empty_bins():
    """Pseudo-counts: an empty window is comparable; large histograms are barely affected."""
    assert math.isnan(js_distance([0, 0, 0], [1, 2, 3], 0))
    assert math.isfinite(js_distance([0, 0, 0], [1, 2, 3]))
    big_p = np.array([50_000, 30_000, 0, 20_000])
    big_q = np.array([45_000, 35_000, 0, 20_000])
    assert js_distance(big_p, big_q) == pytest.approx(js_distance(big_p, big_q, 0), rel=1e-3)
    # a window of few readings with an empty bin reads as less extreme than raw frequencies say
    assert js_distance([3, 0], [50, 50]) < js_distance([3, 0], [50, 50], 0)
    with pytest.raises(ValueError, match="pseudo_count"):
        js_distance([1], [1], -1.0)
