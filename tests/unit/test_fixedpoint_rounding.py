"""Requantization primitives against a plain-Python big-integer reference (gemmlowp / TFLite form).

The reference below is written the way gemmlowp ``fixedpoint.h`` and TFLite
``quantization_util.cc`` write the formulas (sign-dependent nudge plus C truncating division,
mask/remainder/threshold, ``frexp`` plus round-half-away) with Python ints and
:class:`fractions.Fraction`, no numpy. A second, purely mathematical oracle (exact rationals)
pins down what the formulas mean, so a shared mistake in both transcriptions would still show.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_agent.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    FixedPointOverflowError,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    round_half_away,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

# --------------------------------------------------------------------------------------------
# Plain-Python reference (no numpy)
# --------------------------------------------------------------------------------------------


def c_div(n: int, d: int) -> int:
    """C integer division: the quotient truncated toward zero."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d >= 0) else -q


def ref_round_half_away(v: Fraction | float) -> int:
    """``std::round`` on an exact rational: ties away from zero."""
    f = Fraction(v)
    mag = math.floor(abs(f) + Fraction(1, 2))
    return mag if f >= 0 else -mag


def ref_srdhm(a: int, b: int) -> int:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` for int32 ``a``, ``b``."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return c_div(ab + nudge, 1 << 31)


def ref_rdbp(x: int, exponent: int) -> int:
    """gemmlowp ``RoundingDivideByPOT`` (Python ``&``/``>>`` act as on two's complement)."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier`` (this project refuses ``shift > 30`` instead of saturating)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = ref_round_half_away(Fraction(q) * (1 << 31))
    assert m <= 1 << 31
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise FixedPointOverflowError("shift > 30")
    return m, shift


def ref_mbqm(x: int, m: int, shift: int) -> int:
    """TFLite ``MultiplyByQuantizedMultiplier``, double rounding; ``None``-free: asserts int32."""
    left = max(shift, 0)
    right = max(-shift, 0)
    shifted = x * (1 << left)
    assert INT32_MIN <= shifted <= INT32_MAX
    return ref_rdbp(ref_srdhm(shifted, m), right)


# Mathematical oracles (exact rationals): what the formulas are meant to compute.


def oracle_srdhm(a: int, b: int) -> int:
    """``floor(a·b / 2**31 + 1/2)``: round half *up*, saturated to int32."""
    return min(INT32_MAX, math.floor(Fraction(a * b, 1 << 31) + Fraction(1, 2)))


def oracle_rdbp(x: int, exponent: int) -> int:
    """``x / 2**exponent`` rounded half away from zero."""
    return ref_round_half_away(Fraction(x, 1 << exponent))


# --------------------------------------------------------------------------------------------
# Strategies biased to the edges
# --------------------------------------------------------------------------------------------

POWERS = [1 << k for k in range(31)]
INT32_EDGES = sorted(
    {INT32_MIN, INT32_MIN + 1, INT32_MAX, INT32_MAX - 1, 0, 1, -1, 2, -2}
    | {s * p + d for p in POWERS for s in (1, -1) for d in (-1, 0, 1)}
    | {INT32_MIN >> 1, INT32_MAX >> 1}
)
INT32_EDGES = [v for v in INT32_EDGES if INT32_MIN <= v <= INT32_MAX]

int32s = st.one_of(st.sampled_from(INT32_EDGES), st.integers(INT32_MIN, INT32_MAX))
exponents = st.integers(0, 31)
shifts = st.integers(-31, 30)
# Q31 multipliers as QuantizeMultiplier makes them: 0 or [2**30, 2**31).
q31_multipliers = st.one_of(
    st.sampled_from([0, 1 << 30, (1 << 30) + 1, INT32_MAX - 1, INT32_MAX]),
    st.integers(1 << 30, INT32_MAX),
)

SETTINGS = settings(max_examples=400, deadline=None)


def _as_int(a: np.ndarray) -> int:
    """A 0-d result as a Python int, checking the representation."""
    assert a.dtype == np.int64
    return int(a)


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(int32s, int32s)
def test_reference_srdhm_matches_its_mathematical_meaning(a: int, b: int) -> None:
    assert ref_srdhm(a, b) == oracle_srdhm(a, b)


@SETTINGS
@given(int32s, exponents)
def test_reference_rdbp_matches_its_mathematical_meaning(x: int, e: int) -> None:
    assert ref_rdbp(x, e) == oracle_rdbp(x, e)


# --------------------------------------------------------------------------------------------
# round_half_away
# --------------------------------------------------------------------------------------------


def test_round_half_away_ties_differ_from_np_round() -> None:
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5]
    ours = round_half_away(ties).tolist()
    assert ours == [1.0, 2.0, 3.0, -1.0, -2.0, -3.0, 127.0, -128.0]
    banker = np.round(ties).tolist()
    assert banker == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -128.0]
    differ = [t for t, a, b in zip(ties, ours, banker, strict=True) if a != b]
    assert differ == [0.5, 2.5, -0.5, -2.5, 126.5]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.49999999999999994, 0.0),  # floor(x + 0.5) gets 1: the addition rounds up
        (-0.49999999999999994, -0.0),
        (2.0**52 + 1, 2.0**52 + 1),  # x + 0.5 is a float tie that rounds to even
        (-(2.0**52 + 1), -(2.0**52 + 1)),
        (2.0**53 - 1, 2.0**53 - 1),
        (4503599627370495.5, 4503599627370496.0),
        (-4503599627370495.5, -4503599627370496.0),
        (1.4999999999999998, 1.0),
        (5e-324, 0.0),
    ],
)
def test_round_half_away_exact_at_float64_edges(value: float, expected: float) -> None:
    assert round_half_away(value).item() == expected
    assert round_half_away(value).item() == ref_round_half_away(value)


@SETTINGS
@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(10**6), 10**6).map(lambda k: k + 0.5),
        st.floats(-300.0, 300.0, width=32),
    )
)
def test_round_half_away_matches_exact_rational_rounding(value: float) -> None:
    assert round_half_away(value).item() == ref_round_half_away(value)


def test_round_half_away_keeps_non_finite() -> None:
    out = round_half_away([np.inf, -np.inf, np.nan])
    assert out[0] == np.inf
    assert out[1] == -np.inf
    assert np.isnan(out[2])


# --------------------------------------------------------------------------------------------
# saturating_rounding_doubling_high_mul
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (INT32_MIN, INT32_MIN, INT32_MAX),  # the one saturating case
        (INT32_MIN, INT32_MAX, INT32_MIN + 1),
        (INT32_MAX, INT32_MAX, INT32_MAX - 1),
        (INT32_MIN, 1 << 30, -(1 << 30)),
        (INT32_MAX, 1 << 30, 1 << 30),  # 2**30 − 0.5 rounds half up
        (1, 1 << 30, 1),  # +0.5 → 1
        (-1, 1 << 30, 0),  # −0.5 → 0 (half up, i.e. toward +inf)
        (3, 1 << 30, 2),
        (-3, 1 << 30, -1),
        (INT32_MIN, INT32_MIN + 1, INT32_MAX),  # 2**31 − 1 exactly
        (12345, INT32_MAX, 12345),  # multiplier 1 − 2**-31
        (-12345, INT32_MAX, -12345),
        (INT32_MIN, 1, -1),
        (INT32_MIN, -1, 1),
        (0, INT32_MIN, 0),
        (1 << 30, 1 << 30, 1 << 29),
    ],
)
def test_srdhm_examples(a: int, b: int, expected: int) -> None:
    assert ref_srdhm(a, b) == expected
    assert _as_int(saturating_rounding_doubling_high_mul(a, b)) == expected


@SETTINGS
@given(int32s, int32s)
@example(INT32_MIN, INT32_MIN)
@example(-(1 << 30), 1)
def test_srdhm_matches_reference(a: int, b: int) -> None:
    got = _as_int(saturating_rounding_doubling_high_mul(a, b))
    assert got == ref_srdhm(a, b)
    assert INT32_MIN <= got <= INT32_MAX


@SETTINGS
@given(int32s, int32s)
def test_srdhm_is_symmetric(a: int, b: int) -> None:
    assert _as_int(saturating_rounding_doubling_high_mul(a, b)) == _as_int(
        saturating_rounding_doubling_high_mul(b, a)
    )


# --------------------------------------------------------------------------------------------
# rounding_divide_by_pot
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("e", range(1, 32))
def test_rdbp_exact_ties_round_away_for_every_shift(e: int) -> None:
    half = 1 << (e - 1)
    cases = {half: 1, -half: -1}
    if 3 * half <= INT32_MAX:
        cases |= {3 * half: 2, -3 * half: -2}
    if 5 * half <= INT32_MAX:
        cases |= {5 * half: 3, -5 * half: -3}
    # Just off the tie: rounds to nearest.
    cases |= {half - 1: 0, -(half - 1): 0}
    if e >= 2:
        cases |= {half + 1: 1, -(half + 1): -1}
    for x, expected in cases.items():
        assert ref_rdbp(x, e) == expected, (x, e)
        assert _as_int(rounding_divide_by_pot(x, e)) == expected, (x, e)


@pytest.mark.parametrize("e", range(32))
@pytest.mark.parametrize("x", [INT32_MIN, INT32_MIN + 1, INT32_MAX, -1, 0, 1])
def test_rdbp_int32_extremes_for_every_exponent(x: int, e: int) -> None:
    assert _as_int(rounding_divide_by_pot(x, e)) == ref_rdbp(x, e) == oracle_rdbp(x, e)


def test_rdbp_specific_values() -> None:
    assert _as_int(rounding_divide_by_pot(INT32_MIN, 31)) == -1
    assert _as_int(rounding_divide_by_pot(INT32_MAX, 31)) == 1
    assert _as_int(rounding_divide_by_pot(INT32_MAX, 0)) == INT32_MAX
    assert _as_int(rounding_divide_by_pot(-(1 << 30), 31)) == -1  # −0.5 → −1
    assert _as_int(rounding_divide_by_pot((1 << 30) - 1, 31)) == 0


@pytest.mark.parametrize("e", [-1, 32, 40])
def test_rdbp_refuses_exponent_out_of_range(e: int) -> None:
    with pytest.raises(ValueError, match=r"exponent must lie in \[0, 31\]"):
        rounding_divide_by_pot(5, e)


@SETTINGS
@given(int32s, exponents)
def test_rdbp_matches_reference(x: int, e: int) -> None:
    assert _as_int(rounding_divide_by_pot(x, e)) == ref_rdbp(x, e)


# --------------------------------------------------------------------------------------------
# quantize_multiplier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", range(-31, 31))
def test_quantize_multiplier_powers_of_two_hit_every_shift(shift: int) -> None:
    real = math.ldexp(1.0, shift - 1)  # = 0.5 · 2**shift
    assert quantize_multiplier(real) == (1 << 30, shift)
    assert ref_quantize_multiplier(real) == (1 << 30, shift)


@pytest.mark.parametrize("shift", range(-32, 31))
def test_quantize_multiplier_round_up_to_2_31_carries_into_shift(shift: int) -> None:
    # frexp gives q = 1 − 2**-33 and this shift; q·2**31 = 2**31 − 1/4 rounds to 2**31, so m
    # halves and the shift grows by one (−32 becomes −31: the carry happens before the flush).
    real = math.ldexp(1.0 - 2.0**-33, shift)
    assert math.frexp(real) == (1.0 - 2.0**-33, shift)
    if shift == 30:
        with pytest.raises(FixedPointOverflowError, match="too large"):
            quantize_multiplier(real)
        return
    assert quantize_multiplier(real) == (1 << 30, shift + 1)
    assert ref_quantize_multiplier(real) == (1 << 30, shift + 1)


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (1.0 - 2.0**-32, (1 << 30, 1)),  # q·2**31 = 2**31 − 1/2 exactly: a tie, away → 2**31
        (1.0 - 2.0**-31, (INT32_MAX, 0)),  # q·2**31 = 2**31 − 1: no carry
        (0.5 + 2.0**-32, ((1 << 30) + 1, 0)),  # q·2**31 = 2**30 + 1/2: tie → away
        (0.5 + 2.0**-33, (1 << 30, 0)),  # 2**30 + 1/4 → down
        (1.0, (1 << 30, 1)),
        (0.75, (3 << 29, 0)),
        (0.25, (1 << 30, -1)),
        (2.0**-32, (1 << 30, -31)),  # smallest unflushed power of two
        (2.0**-33, (0, 0)),  # shift −32 < −31: flushed to zero
        (math.ldexp(1.0 - 2.0**-40, -32), (1 << 30, -31)),  # rounds up first, then not flushed
        (math.ldexp(0.75, -32), (0, 0)),
        (5e-324, (0, 0)),  # denormal
        (0.0, (0, 0)),
        (math.ldexp(1.0 - 2.0**-31, 30), (INT32_MAX, 30)),  # largest accepted
    ],
)
def test_quantize_multiplier_examples(real: float, expected: tuple[int, int]) -> None:
    assert quantize_multiplier(real) == expected
    assert ref_quantize_multiplier(real) == expected


@pytest.mark.parametrize("real", [2.0**30, 2.0**31, 1e300, math.ldexp(1.0 - 2.0**-40, 30)])
def test_quantize_multiplier_refuses_shift_above_30(real: float) -> None:
    with pytest.raises(FixedPointOverflowError, match="too large for a Q31 requantization"):
        quantize_multiplier(real)


@pytest.mark.parametrize("real", [-1e-9, -1.0, math.nan, math.inf, -math.inf])
def test_quantize_multiplier_refuses_negative_or_non_finite(real: float) -> None:
    with pytest.raises(ValueError, match="finite and non-negative"):
        quantize_multiplier(real)


reals = st.one_of(
    st.floats(min_value=0.0, max_value=2.0**30, exclude_max=True, allow_subnormal=True),
    st.integers(-40, 29).map(lambda k: math.ldexp(1.0, k)),
    st.tuples(st.integers(-40, 29), st.integers(30, 53)).map(
        lambda t: math.ldexp(1.0 - 2.0 ** -t[1], t[0])
    ),
    st.tuples(st.integers(-40, 29), st.integers(-(1 << 20), 1 << 20)).map(
        lambda t: math.ldexp(0.75 + t[1] * 2.0**-32, t[0])
    ),
)


@SETTINGS
@given(reals)
def test_quantize_multiplier_matches_reference(real: float) -> None:
    try:
        expected = ref_quantize_multiplier(real)
    except FixedPointOverflowError:
        with pytest.raises(FixedPointOverflowError):
            quantize_multiplier(real)
        return
    m, shift = quantize_multiplier(real)
    assert (m, shift) == expected
    assert isinstance(m, int)
    assert isinstance(shift, int)
    if m == 0:
        assert shift == 0
        assert real < 2.0**-32
    else:
        assert 1 << 30 <= m <= INT32_MAX
        assert -31 <= shift <= 30
        # Q31 rounding: within half a step of m·2**(shift − 31).
        err = abs(Fraction(m) * Fraction(2) ** (shift - 31) - Fraction(real))
        assert err <= Fraction(2) ** (shift - 32)


# --------------------------------------------------------------------------------------------
# multiply_by_quantized_multiplier
# --------------------------------------------------------------------------------------------


@st.composite
def mbqm_cases(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(x, m, shift)`` with ``x << max(shift, 0)`` inside int32."""
    shift = draw(shifts)
    m = draw(q31_multipliers)
    left = max(shift, 0)
    lo, hi = INT32_MIN >> left, INT32_MAX >> left
    x = draw(
        st.one_of(
            st.sampled_from([lo, hi, lo + 1, hi - 1, 0, 1, -1]),
            st.integers(lo, hi),
            st.sampled_from(INT32_EDGES).filter(lambda v: lo <= v <= hi),
        )
    )
    return x, m, shift


@SETTINGS
@given(mbqm_cases())
@example((INT32_MIN, INT32_MAX, 0))
@example((-(1 << 30), 1 << 30, 1))
def test_mbqm_matches_reference(case: tuple[int, int, int]) -> None:
    x, m, shift = case
    got = _as_int(multiply_by_quantized_multiplier(x, m, shift))
    assert got == ref_mbqm(x, m, shift)
    # Double rounding is within one step of the exact product.
    exact = Fraction(x * m) * Fraction(2) ** (shift - 31)
    assert abs(got - exact) <= 1


@pytest.mark.parametrize(
    ("x", "real", "expected"),
    [
        (100, 0.25, 25),
        (-100, 0.25, -25),
        (2, 0.25, 1),  # 0.5 → 1 (half away, in RoundingDivideByPOT)
        (-2, 0.25, -1),
        (6, 0.25, 2),  # 1.5 → 2
        (-6, 0.25, -2),
        (INT32_MAX, 1.0 - 2.0**-31, INT32_MAX - 1),
        (INT32_MIN, 1.0 - 2.0**-31, INT32_MIN + 1),
        (INT32_MIN, 2.0**-31, -1),
        (INT32_MAX, 2.0**-32, 1),  # 0.4999…: double rounding (half up, then half away) gives 1
        (INT32_MAX - (1 << 30), 2.0**-32, 0),
        ((1 << 30) - 1, 1.0, (1 << 30) - 1),
        (-(1 << 30), 1.0, -(1 << 30)),
        (123456789, 0.0, 0),
    ],
)
def test_mbqm_examples(x: int, real: float, expected: int) -> None:
    m, shift = quantize_multiplier(real)
    assert _as_int(multiply_by_quantized_multiplier(x, m, shift)) == expected
    assert ref_mbqm(x, m, shift) == expected


@pytest.mark.parametrize(
    ("x", "shift"),
    [
        (1 << 30, 1),  # 2**31: one past INT32_MAX
        (INT32_MIN, 1),
        (INT32_MAX, 1),
        (2, 30),
        (-3, 30),
        ((1 << 20), 11),
    ],
)
def test_mbqm_refuses_left_shift_overflow_instead_of_wrapping(x: int, shift: int) -> None:
    with pytest.raises(FixedPointOverflowError, match="left-shifted requantization input"):
        multiply_by_quantized_multiplier(x, 1 << 30, shift)


def test_mbqm_left_shift_boundary_is_exact() -> None:
    # −2**30 << 1 = INT32_MIN still fits; 2**30 << 1 does not.
    assert _as_int(multiply_by_quantized_multiplier(-(1 << 30), 1 << 30, 1)) == -(1 << 30)
    assert _as_int(multiply_by_quantized_multiplier((1 << 30) - 1, 1 << 30, 1)) == (1 << 30) - 1
    assert _as_int(multiply_by_quantized_multiplier(1, 1 << 30, 30)) == 1 << 29
    assert _as_int(multiply_by_quantized_multiplier(-2, 1 << 30, 30)) == -(1 << 30)


@pytest.mark.parametrize("x", [INT32_MAX + 1, INT32_MIN - 1, 1 << 40])
def test_mbqm_refuses_input_outside_int32(x: int) -> None:
    with pytest.raises(FixedPointOverflowError, match="requantization input leaves"):
        multiply_by_quantized_multiplier(x, 1 << 30, 0)


def test_mbqm_refuses_multiplier_outside_int32() -> None:
    with pytest.raises(FixedPointOverflowError, match="multiplier leaves"):
        multiply_by_quantized_multiplier(5, 1 << 31, 0)


@pytest.mark.parametrize("shift", [31, 33, 40, -32, -40])
def test_mbqm_refuses_shift_outside_range_without_wrapping(shift: int) -> None:
    # With shift 40, 2**24 << 40 = 2**64 wraps to 0 even in int64: it must raise, not return 0.
    with pytest.raises(ValueError, match=r"shift must lie in \[-31, 30\]"):
        multiply_by_quantized_multiplier(1 << 24, 1 << 30, shift)


# --------------------------------------------------------------------------------------------
# Vectorised == scalar
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(mbqm_cases(), min_size=1, max_size=40))
def test_vectorised_results_equal_scalar_results(cases: list[tuple[int, int, int]]) -> None:
    xs = np.array([c[0] for c in cases], dtype=np.int64)
    ms = np.array([c[1] for c in cases], dtype=np.int64)
    shs = np.array([c[2] for c in cases], dtype=np.int64)
    es = np.abs(shs) % 32

    vec = multiply_by_quantized_multiplier(xs, ms, shs)
    assert vec.shape == xs.shape
    assert vec.dtype == np.int64
    assert vec.tolist() == [
        _as_int(multiply_by_quantized_multiplier(x, m, s))
        for x, m, s in zip(xs.tolist(), ms.tolist(), shs.tolist(), strict=True)
    ]
    assert vec.tolist() == [
        ref_mbqm(x, m, s) for x, m, s in zip(xs.tolist(), ms.tolist(), shs.tolist(), strict=True)
    ]

    hm = saturating_rounding_doubling_high_mul(xs, ms)
    assert hm.tolist() == [ref_srdhm(x, m) for x, m in zip(xs.tolist(), ms.tolist(), strict=True)]
    rd = rounding_divide_by_pot(xs, es)
    assert rd.tolist() == [ref_rdbp(x, e) for x, e in zip(xs.tolist(), es.tolist(), strict=True)]


def test_broadcasting_rows_against_per_class_parameters() -> None:
    acc = np.array([[100, -100, 7], [INT32_MIN >> 1, 0, -7]], dtype=np.int64)
    pairs = [quantize_multiplier(r) for r in (0.5, 1.0 - 2.0**-31, 2.0**-3)]
    m = np.array([p[0] for p in pairs], dtype=np.int64)
    sh = np.array([p[1] for p in pairs], dtype=np.int64)
    out = multiply_by_quantized_multiplier(acc, m[None, :], sh[None, :])
    expected = [
        [ref_mbqm(int(acc[i, j]), int(m[j]), int(sh[j])) for j in range(3)] for i in range(2)
    ]
    assert out.tolist() == expected
    assert out.tolist() == [[50, -100, 1], [-(1 << 29), 0, -1]]
