"""The int8 linear classifier: export checks, decision semantics and bit-exactness with README §3.

The bit-exactness test re-implements ``edge_agent/README.md`` §3 independently: loops over
Python ints (and :class:`fractions.Fraction` for rounding), with the float32 input stage emulated
by numpy float32 *scalar* operations in the normative order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.fixedpoint import (
    INPUT_SCALE,
    INT32_MAX,
    INT32_MIN,
    FixedPointOverflowError,
    QuantizedLinear,
    decide,
    quantization_report,
    quantize_linear,
)

# --------------------------------------------------------------------------------------------
# Independent plain-Python reference of README §3
# --------------------------------------------------------------------------------------------

S_X = 4.0 / 127.0
INV_S_X_F32 = np.float32(31.75)


def rha(v: float | Fraction) -> int:
    """Round half away from zero on the exact value."""
    f = Fraction(v)
    mag = math.floor(abs(f) + Fraction(1, 2))
    return mag if f >= 0 else -mag


def clamp(v: int, lo: int, hi: int) -> int:
    """Clamp an int into ``[lo, hi]``."""
    return max(lo, min(hi, v))


def ref_quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier`` (frexp, round half away, carry, flush)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = rha(Fraction(q) * (1 << 31))
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    assert shift <= 30
    return m, shift


def ref_mbqm(x: int, m: int, shift: int) -> int:
    """Double-rounding ``MultiplyByQuantizedMultiplier`` in the gemmlowp form, Python ints."""
    left, right = max(shift, 0), max(-shift, 0)
    a = x * (1 << left)
    assert INT32_MIN <= a <= INT32_MAX, "left shift would wrap"
    if a == m == INT32_MIN:
        hi = INT32_MAX
    else:
        ab = a * m
        s = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
        hi = abs(s) // (1 << 31) * (1 if s >= 0 else -1)  # C truncating division
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (1 if hi < 0 else 0)
    return (hi >> right) + (1 if (hi & mask) > threshold else 0)


class RefModel:
    """README §3.2–3.3 offline derivation, one row at a time with Python floats and ints."""

    def __init__(
        self, mu: list[float], sigma: list[float], w: list[list[float]], b: list[float]
    ) -> None:
        self.mu32 = [np.float32(m) for m in mu]
        self.inv32 = [np.float32(1.0 / s) for s in sigma]
        self.s_w: list[float] = []
        self.wq: list[list[int]] = []
        self.bq: list[int] = []
        for row, bc in zip(w, b, strict=True):
            row_max = max(abs(v) for v in row)
            sw = row_max / 127.0 if row_max > 0 else 1.0
            self.s_w.append(sw)
            self.wq.append([clamp(rha(v / sw), -127, 127) for v in row])
            self.bq.append(rha(bc / (S_X * sw)))
        self.s_out = 2 * max(S_X * sw for sw in self.s_w)
        self.req = [ref_quantize_multiplier(S_X * sw / self.s_out) for sw in self.s_w]

    def quantize_input(self, x: list[float]) -> list[int]:
        """README §3.1 with numpy float32 scalars, one rounding per operation."""
        out = []
        for xj, mj, ij in zip(x, self.mu32, self.inv32, strict=True):
            t = np.float32(np.float32(xj) - mj)
            t = np.float32(t * ij)
            t = np.float32(t * INV_S_X_F32)
            assert isinstance(t, np.float32)
            out.append(clamp(rha(float(t)), -128, 127))
        return out

    def logits(self, x: list[float]) -> list[int]:
        """README §3.3 accumulate (int32-checked) and requantize."""
        q = self.quantize_input(x)
        out = []
        for wrow, bc, (m, sh) in zip(self.wq, self.bq, self.req, strict=True):
            acc = bc
            for wj, qj in zip(wrow, q, strict=True):
                acc += wj * qj
            assert INT32_MIN <= acc <= INT32_MAX
            out.append(ref_mbqm(acc, m, sh))
        return out

    def predict(self, x: list[float]) -> int:
        """README §3.4: ``logit > 0`` for one row, else the first maximum."""
        lg = self.logits(x)
        if len(lg) == 1:
            return int(lg[0] > 0)
        best = 0
        for c in range(1, len(lg)):
            if lg[c] > lg[best]:
                best = c
        return best


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def float_predict(
    x: npt.NDArray[np.float64],
    mu: npt.NDArray[np.float64],
    sigma: npt.NDArray[np.float64],
    w: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """The float model the integer one approximates."""
    z = (x - mu) / sigma
    lg = z @ w.T + b
    if w.shape[0] == 1:
        return np.asarray(lg[:, 0] > 0, dtype=np.int64)
    return np.asarray(np.argmax(lg, axis=1), dtype=np.int64)


def random_problem(
    rng: np.random.Generator, rows: int, features: int
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """A well-conditioned random linear classifier: ``mu, sigma, W, b``."""
    mu = rng.normal(0.0, 5.0, features)
    sigma = np.exp(rng.uniform(-2.0, 2.0, features))
    w = rng.normal(0.0, 1.0, (rows, features))
    b = rng.normal(0.0, 0.5, rows)
    return mu, sigma, w, b


ONE = ([0.0], [1.0])  # mu, sigma of a single standardised feature


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mu", "sigma", "weights", "bias", "match"),
    [
        ([0.0, 0.0, 0.0], [1.0, 1.0], [[1.0, 2.0]], [0.0], "mu and sigma need 2 entries"),
        ([0.0], [1.0, 1.0], [[1.0, 2.0]], [0.0], "mu and sigma need 2 entries"),
        ([0.0, 0.0], [1.0], [[1.0, 2.0]], [0.0], "mu and sigma need 2 entries"),
        ([[0.0, 0.0]], [1.0, 1.0], [[1.0, 2.0]], [0.0], "mu and sigma need 2 entries"),
        ([0.0, 0.0], [1.0, 1.0], [[1.0, 2.0]], [0.0, 1.0], "bias needs 1 entries"),
        ([0.0, 0.0], [1.0, 1.0], [[1.0, 2.0], [3.0, 4.0]], [0.0], "bias needs 2 entries"),
        ([0.0, 0.0], [1.0, 1.0], [[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0]], "bias needs 2 entries"),
    ],
)
def test_quantize_linear_rejects_bad_shapes(
    mu: list[float], sigma: list[float], weights: list[list[float]], bias: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_linear(mu, sigma, weights, bias)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["mu", "sigma", "weights", "bias"])
def test_quantize_linear_rejects_non_finite(name: str, bad: float) -> None:
    mu, sigma, bias = [0.0, 1.0], [1.0, 2.0], [0.5]
    weights = [[1.0, -1.0]]
    {"mu": mu, "sigma": sigma, "bias": bias, "weights": weights[0]}[name][-1] = bad
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        quantize_linear(mu, sigma, weights, bias)


@pytest.mark.parametrize("sigma", [0.0, -0.0, -1.0, -1e-300])
def test_quantize_linear_rejects_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be positive"):
        quantize_linear([0.0, 0.0], [1.0, sigma], [[1.0, 1.0]], [0.0])


@pytest.mark.parametrize(("mu", "sigma"), [(0.0, 1e-40), (0.0, 2.0e-39), (1e39, 1.0), (-4e38, 1.0)])
def test_quantize_linear_rejects_values_the_float32_input_stage_cannot_hold(
    mu: float, sigma: float
) -> None:
    # 1/sigma or mu overflows float32: the device would compute inf·0 = NaN for x = mu.
    with pytest.raises(ValueError, match="finite in float32"):
        quantize_linear([mu], [sigma], [[1.0]], [0.0])


# --------------------------------------------------------------------------------------------
# Overflow refusal
# --------------------------------------------------------------------------------------------


def test_refuses_bias_that_does_not_fit_int32() -> None:
    # bq = b / (s_x · s_w) = 1e6 · 127 · 127 / 4 ≈ 4.0e9 ≥ 2**31.
    with pytest.raises(FixedPointOverflowError, match="bias too large for int32"):
        quantize_linear(*ONE, [[1.0]], [1e6])


def test_refuses_when_bias_plus_worst_case_dot_product_reaches_2_31() -> None:
    # A weak row (max|W| = 1e-3) next to a strong one: its shift is ≤ 0, so the bound is 2**31.
    # bq[1] ≈ 2**31 − 5000 fits int32, but + 128 · 127 does not.
    s_w1 = 1e-3 / 127.0
    b1 = (2**31 - 5000) * INPUT_SCALE * s_w1
    w = [[1.0, 0.0], [1e-3, 0.0]]
    with pytest.raises(FixedPointOverflowError, match="int32 accumulator could overflow for"):
        quantize_linear([0.0, 0.0], [1.0, 1.0], w, [0.0, b1])
    # The same row with room for the dot product is accepted and runs at the extremes.
    model = quantize_linear([0.0, 0.0], [1.0, 1.0], w, [0.0, b1 * 0.999])
    assert int(model.shift[1]) <= 0
    assert 2**30 < int(model.bias[1]) < 2**31 - 128 * 127
    lg = model.logits([[-1e3, 0.0], [1e3, 0.0]])
    assert np.all(np.abs(lg) <= INT32_MAX)


def test_exporter_never_left_shifts_so_the_full_int32_headroom_is_usable() -> None:
    # s_out is twice the largest row scale: that row requantizes by 0.5 = (2**30, shift 0), so
    # a bias of ≈ 1.5 · 2**30 (which a left shift by 1 would overflow) is accepted and safe.
    b = 1.5 * 2**30 * INPUT_SCALE * (1.0 / 127.0)
    model = quantize_linear(*ONE, [[1.0]], [b])
    assert model.multiplier.tolist() == [1 << 30]
    assert model.shift.tolist() == [0]
    bq = int(model.bias[0])
    assert 2**30 < bq + 128 * 127 < 2**31
    # Requantizing by exactly 0.5 halves the accumulator, rounding half away from zero.
    lg = model.logits([[-1e6], [0.0], [1e6]])
    expected = [
        -((-(bq - 128 * 127) + 1) // 2) if bq - 128 * 127 < 0 else (bq - 128 * 127 + 1) // 2,
        (bq + 1) // 2,
        (bq + 127 * 127 + 1) // 2,
    ]
    assert lg[:, 0].tolist() == expected
    # Past 2**31 the exporter refuses rather than wrap.
    with pytest.raises(FixedPointOverflowError):
        quantize_linear(*ONE, [[1.0]], [2.0 * 2**31 * INPUT_SCALE / 127.0])


@pytest.mark.parametrize(("shift", "limit"), [(0, 2**31), (-5, 2**31), (1, 2**30)])
def test_quantized_linear_overflow_bound_is_exact(shift: int, limit: int) -> None:
    def build(bias: int) -> QuantizedLinear:
        return QuantizedLinear(
            mu=np.zeros(2, np.float32),
            inv_sigma=np.ones(2, np.float32),
            weights=np.array([[127, -127]], dtype=np.int64),
            bias=np.array([bias], dtype=np.int64),
            multiplier=np.array([1 << 30], dtype=np.int64),
            shift=np.array([shift], dtype=np.int64),
            s_out=1.0,
            n_classes=2,
        )

    largest = limit - 1 - 128 * 254
    model = build(-largest)
    # The worst input for a negative bias: q = [-128, 127] gives bias − 128·127 − 127·127.
    lg = model.logits_q([[-128, 127], [127, -128]])
    assert lg.shape == (2, 1)
    with pytest.raises(FixedPointOverflowError, match="could overflow"):
        build(-(largest + 1))
    with pytest.raises(FixedPointOverflowError, match="could overflow"):
        build(largest + 1)


# --------------------------------------------------------------------------------------------
# Decision semantics
# --------------------------------------------------------------------------------------------


def test_binary_one_row_predicts_logit_greater_than_zero() -> None:
    model = quantize_linear(*ONE, [[2.0]], [0.0])
    assert model.n_classes == 2
    assert model.n_rows == 1
    step = 1.0 / 31.75  # one int8 input step
    x = [[0.0], [step], [-step], [10.0], [-10.0]]
    lg = model.logits(x)
    assert lg.shape == (5, 1)
    assert lg[:, 0].tolist()[0] == 0  # exact tie at zero ...
    assert model.predict(x).tolist() == [0, 1, 0, 1, 0]  # ... goes to class 0
    assert model.predict(x).tolist() == (lg[:, 0] > 0).astype(int).tolist()


def test_binary_one_row_bias_moves_the_threshold() -> None:
    # logit = 2 z − 1: positive iff z > 0.5; z = 0.5 exactly quantises to q = 16 (15.875 → 16)
    model = quantize_linear(*ONE, [[2.0]], [-1.0])
    q = np.arange(-128, 128).reshape(-1, 1)
    lg = model.logits_q(q)[:, 0]
    pred = model.decide(model.logits_q(q))
    assert pred.tolist() == (lg > 0).astype(int).tolist()
    # Float threshold z = 0.5 ⇔ q = 15.875: q ≤ 15 is class 0, q ≥ 16 class 1.
    assert pred[q[:, 0] <= 15].max() == 0
    assert pred[q[:, 0] >= 16].min() == 1


def test_first_maximum_wins_on_ties() -> None:
    w = [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    model = quantize_linear([0.0, 0.0], [1.0, 1.0], w, [0.0, 0.0, 0.0])
    x = [[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]
    lg = model.logits(x)
    assert lg[0, 1] == lg[0, 2] > lg[0, 0]
    assert lg[1, 0] > lg[1, 1] == lg[1, 2]
    assert lg[2].tolist() == [0, 0, 0]
    assert model.predict(x).tolist() == [1, 0, 0]
    assert decide(np.array([[7, 7, 7], [1, 9, 9], [-3, -3, -4], [0, 0, 5]])).tolist() == [
        0,
        1,
        0,
        2,
    ]


def test_two_row_binary_uses_argmax() -> None:
    model = quantize_linear([0.0], [1.0], [[1.0], [1.0]], [0.0, 0.0])
    assert model.n_classes == 2
    assert model.predict([[3.0], [-3.0], [0.0]]).tolist() == [0, 0, 0]


def test_logits_are_int32_values() -> None:
    rng = np.random.default_rng(5)
    mu, sigma, w, b = random_problem(rng, 4, 10)
    model = quantize_linear(mu, sigma, w, b)
    x = mu + sigma * rng.normal(0.0, 6.0, (200, 10))
    lg = model.logits(x)
    assert lg.dtype == np.int64
    assert lg.shape == (200, 4)
    assert np.array_equal(lg.astype(np.int32).astype(np.int64), lg)
    assert model.weights.dtype == np.int64
    assert model.weights.min() >= -127
    assert model.weights.max() <= 127
    assert np.array_equal(model.bias.astype(np.int32).astype(np.int64), model.bias)


# --------------------------------------------------------------------------------------------
# Input stage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "q"),
    [
        (4.0, 127),
        (4.01, 127),  # 127.3 → 127
        (4.02, 127),  # 127.6 → 128 → clipped
        (10.0, 127),
        (1e30, 127),
        (-4.0, -127),
        (-4.02, -128),  # −127.6 → −128, still representable
        (-4.1, -128),
        (-1e30, -128),
        (0.0, 0),
    ],
)
def test_input_clipping_at_four_sigma(z: float, q: int) -> None:
    model = quantize_linear(*ONE, [[1.0]], [0.0])
    assert model.quantize_input([[z]]).tolist() == [[q]]
    # Same with a non-trivial standardiser.
    mu, sigma = 3.25, 0.5
    model2 = quantize_linear([mu], [sigma], [[1.0]], [0.0])
    assert model2.quantize_input([[mu + z * sigma]]).tolist() == [[q]]


def test_input_ties_round_away_from_zero() -> None:
    model = quantize_linear(*ONE, [[1.0]], [0.0])
    ks = list(range(-128, 128))
    x = np.array([[np.float32((k + 0.5) / 31.75)] for k in ks], dtype=np.float32)
    # Every one of these lands exactly on k + 0.5 after the float32 multiply by 31.75.
    t = (x * np.float32(31.75)).astype(np.float64)[:, 0]
    assert t.tolist() == [k + 0.5 for k in ks]
    got = model.quantize_input(x)[:, 0].tolist()
    expected = [clamp(k + 1 if k >= 0 else k, -128, 127) for k in ks]
    assert got == expected
    banker = np.clip(np.round(t), -128, 127).astype(int).tolist()
    assert sum(g != bk for g, bk in zip(got, banker, strict=True)) == 128


def test_input_stage_rejects_non_finite_and_wrong_width() -> None:
    model = quantize_linear([0.0, 0.0], [1.0, 1.0], [[1.0, 1.0]], [0.0])
    with pytest.raises(ValueError, match="inputs must be finite"):
        model.logits([[np.nan, 0.0]])
    with pytest.raises(ValueError, match=r"expected 2 features, got shape \(1, 3\)"):
        model.logits([[0.0, 0.0, 0.0]])
    # One column must not broadcast against mu/inv_sigma.
    with pytest.raises(ValueError, match=r"expected 2 features, got shape \(1, 1\)"):
        model.predict([[0.5]])
    with pytest.raises(ValueError, match="expected 2 features, got 3"):
        model.logits_q([[0, 0, 0]])
    with pytest.raises(ValueError, match=r"quantised inputs must lie in \[-128, 127\]"):
        model.logits_q([[128, 0]])


# --------------------------------------------------------------------------------------------
# Weights and agreement
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 40))
def test_dequantized_weights_within_half_a_step(seed: int, rows: int, features: int) -> None:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-6.0, 6.0, rows))
    w = rng.normal(0.0, 1.0, (rows, features)) * scales[:, None]
    b = rng.normal(0.0, 1.0, rows) * scales
    model = quantize_linear(np.zeros(features), np.ones(features), w, b)
    s_w = np.abs(w).max(axis=1) / 127.0
    wd, bd = model.dequantized()
    tol = 1.0 + 1e-6  # s_w is recovered from the Q31 multiplier (relative error ≤ 2**-31)
    assert np.all(np.abs(w - wd).max(axis=1) <= s_w / 2 * tol)
    assert np.all(np.abs(b - bd) <= INPUT_SCALE * s_w / 2 * tol)
    # The largest weight of each row maps to ±127 exactly.
    assert np.abs(model.weights).max(axis=1).tolist() == [127] * rows


def test_all_zero_row_uses_unit_scale() -> None:
    model = quantize_linear([0.0, 0.0], [1.0, 1.0], [[0.0, 0.0], [0.5, -0.25]], [0.1, 0.0])
    assert model.weights.tolist() == [[0, 0], [127, -64]]  # −63.5 rounds away to −64
    assert model.bias.tolist() == [rha(0.1 / INPUT_SCALE), 0]  # s_w = 1.0
    assert model.bias.tolist()[0] == 3


def centroid_problem(
    rng: np.random.Generator, classes: int, features: int, n: int
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """A well-conditioned problem: Gaussian classes and their nearest-centroid linear rule.

    Returns ``mu, sigma, W, b, x``; a binary problem comes as one row (class 1 minus class 0).
    """
    mu = rng.normal(0.0, 5.0, features)
    sigma = np.exp(rng.uniform(-2.0, 2.0, features))
    centres = rng.normal(0.0, 1.0, (classes, features))
    centres *= 2.0 * features**-0.25  # centre distances ≈ 2.8·F**0.25 noise sd
    y = rng.integers(0, classes, n)
    z = centres[y] + rng.normal(0.0, 1.0, (n, features))
    w = centres.copy()
    b = -0.5 * (centres**2).sum(axis=1)
    if classes == 2:
        w, b = w[1:] - w[:1], b[1:] - b[:1]
    return mu, sigma, w, b, mu + sigma * z


def test_weight_and_bias_ties_round_away_from_zero() -> None:
    # s_w = 1.0 for the first row: W / s_w hits .5 exactly.
    w = [[127.0, -62.5, 0.5, 2.5], [1.0, 0.0, 0.0, 0.0]]
    scale = INPUT_SCALE * (1.0 / 127.0)  # bias step s_x · s_w of the second row, as computed
    ks = [0, 2, -2, 1000]
    for k in ks:
        b1 = (k + 0.5) * scale
        assert b1 / scale == k + 0.5  # the tie survives the float division
        model = quantize_linear(np.zeros(4), np.ones(4), w, [0.0, b1])
        assert model.weights[0].tolist() == [127, -63, 1, 3]  # np.round: [127, -62, 0, 2]
        assert int(model.bias[1]) == (k + 1 if k >= 0 else k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("classes", "features"), [(2, 9), (2, 30), (3, 13), (10, 64), (7, 18)])
def test_agreement_with_float_predictions(seed: int, classes: int, features: int) -> None:
    rng = np.random.default_rng(1000 * seed + 10 * classes + features)
    mu, sigma, w, b, x = centroid_problem(rng, classes, features, 4000)
    model = quantize_linear(mu, sigma, w, b)
    agreement = float(np.mean(model.predict(x) == float_predict(x, mu, sigma, w, b)))
    assert agreement >= 0.99
    report = quantization_report(model, w, b, mu, sigma, x)
    assert report.agreement == pytest.approx(agreement, abs=0.0)


# --------------------------------------------------------------------------------------------
# quantization_report
# --------------------------------------------------------------------------------------------


def test_quantization_report_without_data() -> None:
    rng = np.random.default_rng(11)
    mu, sigma, w, b = random_problem(rng, 3, 8)
    model = quantize_linear(mu, sigma, w, b)
    rep = quantization_report(model, w, b)
    wd, bd = model.dequantized()
    assert rep.max_weight_error == float(np.abs(w - wd).max())
    assert rep.max_bias_error == float(np.abs(b - bd).max())
    s_w = np.abs(w).max(axis=1) / 127.0
    assert 0.0 < rep.max_weight_error <= s_w.max() / 2 * (1 + 1e-6)
    assert rep.max_bias_error <= INPUT_SCALE * s_w.max() / 2 * (1 + 1e-6)
    assert rep.weight_saturations == 0
    assert rep.input_saturation_rate is None
    assert rep.agreement is None


def test_quantization_report_with_data() -> None:
    w, b = np.array([[1.0, 0.0]]), np.array([0.0])
    mu, sigma = np.zeros(2), np.ones(2)
    model = quantize_linear(mu, sigma, w, b)
    # z = 0.001 is class 1 in float but quantises to q = 0 → logit 0 → class 0.
    x = np.array([[0.001, 0.0], [1.0, 0.0], [-1.0, 0.0], [5.0, 0.0]])
    assert model.quantize_input(x).tolist() == [[0, 0], [32, 0], [-32, 0], [127, 0]]
    rep = quantization_report(model, w, b, mu, sigma, x)
    assert rep.input_saturation_rate == 1 / 8
    assert rep.agreement == 0.75
    assert rep.weight_saturations == 0
    assert rep.max_weight_error == pytest.approx(0.0, abs=1e-9)
    # Data without mu/sigma: no data-dependent fields.
    rep2 = quantization_report(model, w, b, x=x)
    assert rep2.agreement is None
    assert rep2.input_saturation_rate is None


# --------------------------------------------------------------------------------------------
# Bit-exactness against the plain-Python README §3 reference
# --------------------------------------------------------------------------------------------


def _random_case(
    seed: int,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    rng = np.random.default_rng(seed)
    rows = int(rng.choice([1, 2, 3, 5]))
    features = int(rng.integers(1, 13))
    sigma = np.exp(rng.uniform(-4.0, 4.0, features))
    # Some features sit far from zero relative to their spread (e.g. pressure in Pa), where the
    # float32 operation order of the input stage decides the int8 value.
    mu_scale = 10.0 ** rng.uniform(0.0, 6.0, features) * sigma
    mu = rng.normal(0.0, 1.0, features) * mu_scale * (rng.random(features) < 0.8)
    row_scale = np.exp(rng.uniform(-5.0, 5.0, rows))
    w = rng.normal(0.0, 1.0, (rows, features)) * row_scale[:, None]
    w[rng.random((rows, features)) < 0.15] = 0.0
    if rows > 1 and rng.random() < 0.3:
        w[int(rng.integers(rows))] = 0.0  # an all-zero row (s_w = 1.0)
    b = rng.normal(0.0, 1.0, rows) * row_scale
    n = 40
    x = mu + sigma * rng.normal(0.0, 3.0, (n, features))  # ~18 % beyond ±4σ
    x[: n // 4] = mu  # exactly at the mean
    x[n // 4 : n // 2] = np.round(x[n // 4 : n // 2] * 64) / 64  # dyadic, like int16 / 2**f
    return mu, sigma, w, b, x


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_kernel_is_bit_exact_with_plain_python_reference(seed: int) -> None:
    mu, sigma, w, b, x = _random_case(seed)
    try:
        model = quantize_linear(mu, sigma, w, b)
    except FixedPointOverflowError:
        return  # rare: tiny row scale with a large bias; refusal is tested elsewhere
    ref = RefModel(mu.tolist(), sigma.tolist(), w.tolist(), b.tolist())

    assert model.weights.tolist() == ref.wq
    assert model.bias.tolist() == ref.bq
    assert list(zip(model.multiplier.tolist(), model.shift.tolist(), strict=True)) == ref.req
    assert model.s_out == ref.s_out
    assert model.mu.tolist() == [float(m) for m in ref.mu32]
    assert model.inv_sigma.tolist() == [float(i) for i in ref.inv32]

    q = model.quantize_input(x)
    lg = model.logits(x)
    pred = model.predict(x)
    for i, row in enumerate(x.tolist()):
        assert q[i].tolist() == ref.quantize_input(row)
        assert lg[i].tolist() == ref.logits(row)
        assert int(pred[i]) == ref.predict(row)


def test_kernel_bit_exact_on_float32_ties_and_clipping() -> None:
    mu = [0.0, 1.5, -2.0]
    sigma = [1.0, 0.25, 3.0]
    w = [[0.3, -1.2, 0.05], [-0.7, 0.4, 2.0], [0.0, 0.0, 0.0]]
    b = [0.01, -0.2, 0.05]
    model = quantize_linear(mu, sigma, w, b)
    ref = RefModel(mu, sigma, w, b)
    rows = []
    for k in (-129, -128, -64, -3, -1, 0, 1, 2, 63, 126, 127, 200):
        z = np.float32((k + 0.5) / 31.75)
        rows.append([float(z), 1.5 + float(z) * 0.25, -2.0 + float(z) * 3.0])
    for row in rows:
        assert model.quantize_input([row])[0].tolist() == ref.quantize_input(row)
        assert model.logits([row])[0].tolist() == ref.logits(row)
        assert int(model.predict([row])[0]) == ref.predict(row)


def test_input_stage_operation_order_is_normative() -> None:
    # mu = 1e6, sigma = 3: (x − mu)·inv is exact-ish, x·inv − mu·inv cancels catastrophically.
    mu, sigma = 1.0e6, 3.0
    model = quantize_linear([mu], [sigma], [[1.0]], [0.0])
    ref = RefModel([mu], [sigma], [[1.0]], [0.0])
    x = mu + np.arange(-200, 200) * 0.0625  # the float32 grid around 1e6
    q = model.quantize_input(x[:, None])[:, 0].tolist()
    assert q == [ref.quantize_input([v])[0] for v in x.tolist()]
    x32, mu32, inv32 = x.astype(np.float32), np.float32(mu), np.float32(1.0 / sigma)
    other = np.clip(np.round((x32 * inv32 - mu32 * inv32) * np.float32(31.75)), -128, 127)
    assert sum(a != b for a, b in zip(q, other.astype(int).tolist(), strict=True)) > 50
    assert q[200] == 0  # x == mu
    assert q[0] == -128  # x = mu − 12.5: −12.5 / 3 · 31.75 = −132.3, clipped
