"""Integer requantization primitives of the TFLite/LiteRT int8 spec (gemmlowp, CMSIS-NN).

Everything here works on ``numpy.int64`` arrays holding int32 values and is bit-exact with
gemmlowp's ``SaturatingRoundingDoublingHighMul`` / ``RoundingDivideByPOT`` and with CMSIS-NN's
``arm_nn_requantize`` ("double rounding", the TFLM default). Rounding is half away from zero,
as C's ``round``; ``np.round`` (half to even) is never used.

References
----------
- TensorFlow Lite 8-bit quantization specification.
- gemmlowp ``fixedpoint/fixedpoint.h``; tflite-micro ``quantization_util.cc``, ``common.cc``.
- ``../shared/research/fixedpoint-anchors.md`` §1.2 and Appendix A.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1

IntArray = npt.NDArray[np.int64]


class FixedPointOverflowError(ArithmeticError):
    """An int32 quantity would leave its range: the model is refused rather than wrapped."""


def round_half_away(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Round to the nearest integer, ties away from zero (C ``round``, ``std::round``).

    Exact for every double, including ``0.49999999999999994`` where ``floor(|x| + 0.5)``
    would wrongly give 1.

    >>> round_half_away([0.5, 1.5, 2.5, -0.5, -2.5, 2.4999, 0.49999999999999994]).tolist()
    [1.0, 2.0, 3.0, -1.0, -3.0, 2.0, 0.0]
    """
    a = np.asarray(x, dtype=np.float64)
    t = np.trunc(a)
    # a - t is exact in binary floating point, so the tie test is exact too; ±inf - ±inf is
    # NaN, which fails the test and leaves ±inf (and NaN) as they are, without a warning
    with np.errstate(invalid="ignore"):
        frac = np.abs(a - t)
    return np.asarray(t + np.where(frac >= 0.5, np.sign(a), 0.0), dtype=np.float64)


def check_int32(x: npt.ArrayLike, what: str) -> IntArray:
    """Return ``x`` as int64, raising :class:`FixedPointOverflowError` if any value leaves int32.

    >>> check_int32([1, -2], "acc").tolist()
    [1, -2]
    >>> check_int32([2**31], "acc")
    Traceback (most recent call last):
    ...
    edge_agent.fixedpoint.rounding.FixedPointOverflowError: acc leaves the int32 range
    """
    a = np.asarray(x, dtype=np.int64)
    if a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX):
        raise FixedPointOverflowError(f"{what} leaves the int32 range")
    return a


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ≈ m · 2**(shift − 31)`` with ``m`` a Q31 int32.

    ``m`` lies in ``[2**30, 2**31)`` (or is 0), ``shift`` in ``[-31, 30]``.

    >>> quantize_multiplier(0.5)
    (1073741824, 0)
    >>> quantize_multiplier(1.0)
    (1073741824, 1)
    >>> quantize_multiplier(0.0)
    (0, 0)
    """
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"multiplier must be finite and non-negative, got {real!r}")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = int(round_half_away(q * (1 << 31)))
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise FixedPointOverflowError(f"multiplier {real!r} too large for a Q31 requantization")
    return m, shift


def saturating_rounding_doubling_high_mul(a: npt.ArrayLike, b: npt.ArrayLike) -> IntArray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` (ARM ``VQRDMULH``) on int32 inputs.

    Returns ``round((a · b) / 2**31)``; the one overflowing case ``INT32_MIN · INT32_MIN``
    saturates to ``INT32_MAX``.

    >>> saturating_rounding_doubling_high_mul([1 << 30, -(1 << 31)], [1 << 30, -(1 << 31)]).tolist()
    [536870912, 2147483647]
    """
    a64 = np.asarray(a, dtype=np.int64)
    b64 = np.asarray(b, dtype=np.int64)
    overflow = (a64 == b64) & (a64 == INT32_MIN)
    # |a·b| ≤ 2**62 except the saturating case, so int64 is exact; the nudge-and-truncate form
    # equals CMSIS-NN's floor form ((ab + 2**30) >> 31) for all inputs.
    ab = np.where(overflow, 0, a64 * b64)
    nudged = ab + np.int64(1 << 30)
    return np.where(overflow, np.int64(INT32_MAX), nudged >> 31).astype(np.int64)


def rounding_divide_by_pot(x: npt.ArrayLike, exponent: npt.ArrayLike) -> IntArray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero.

    >>> rounding_divide_by_pot([5, -5, 6, -6, 7], 1).tolist()
    [3, -3, 3, -3, 4]
    """
    x64 = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    if e.size and (e.min() < 0 or e.max() > 31):
        raise ValueError("exponent must lie in [0, 31]")
    mask = (np.int64(1) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return ((x64 >> e) + (remainder > threshold)).astype(np.int64)


def multiply_by_quantized_multiplier(
    x: npt.ArrayLike, multiplier: npt.ArrayLike, shift: npt.ArrayLike
) -> IntArray:
    """TFLite ``MultiplyByQuantizedMultiplier`` (double rounding) on int32 ``x``.

    Raises :class:`FixedPointOverflowError` if ``x``, ``multiplier`` or ``x << max(shift, 0)``
    leaves int32, where a C implementation would silently wrap, and ``ValueError`` for a shift
    outside ``[-31, 30]`` (the range :func:`quantize_multiplier` produces).

    >>> m, s = quantize_multiplier(0.25)
    >>> multiply_by_quantized_multiplier([100, -100, 2, -2], m, s).tolist()
    [25, -25, 1, -1]
    """
    x64 = check_int32(x, "requantization input")
    m = check_int32(multiplier, "requantization multiplier")
    sh = np.asarray(shift, dtype=np.int64)
    if sh.size and (sh.min() < -31 or sh.max() > 30):
        # Checked before shifting: x << 33 and more would wrap even in int64.
        raise ValueError("requantization shift must lie in [-31, 30]")
    left = np.maximum(sh, 0)
    right = np.maximum(-sh, 0)
    shifted = check_int32(x64 * (np.int64(1) << left), "left-shifted requantization input")
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m), right)
