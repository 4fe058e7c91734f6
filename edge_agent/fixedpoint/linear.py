"""Int8 linear classifier: quantization from float parameters and the device's integer kernel.

A float model ``logit_c = Σ_j W[c, j] · (x_j − mu_j) / sigma_j + b_c`` (river's linear models
after a ``StandardScaler``) becomes, following the TFLite int8 spec:

- inputs standardised in float32 and quantised to int8 at the fixed scale ``s_x = 4/127``
  (±4σ clip, zero point 0), so an update changes ``mu`` and ``inv_sigma`` but never the scale;
- int8 symmetric weights with one scale per row, int32 bias at ``s_x · s_w[c]``;
- int32 accumulation (overflow refused at export), per-row requantization to a common logit scale
  with ``QuantizeMultiplier`` and double rounding; argmax, first maximum wins.

Binary models may carry one row (the logit of class 1): the decision is then ``logit > 0``.

References
----------
- ``edge_agent/README.md`` §3 (the normative description).
- ``../shared/research/fixedpoint-anchors.md`` §1.4 and Appendix A.

Examples
--------
>>> import numpy as np
>>> W = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 1.0]])
>>> model = quantize_linear(mu=[0.0, 1.0], sigma=[1.0, 2.0], weights=W, bias=[0.0, 0.1, -0.1])
>>> model.predict(np.array([[1.0, 1.0], [-1.0, 5.0]])).tolist()
[0, 2]
>>> model.weight_bytes, model.float_weight_bytes
(18, 36)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.fixedpoint.rounding import (
    FixedPointOverflowError,
    IntArray,
    check_int32,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    round_half_away,
)

INPUT_SCALE = 4.0 / 127.0
"""``s_x``: int8 input step in standard deviations; ±127 is ±4σ."""

INV_INPUT_SCALE = np.float32(127.0 / 4.0)
"""``1 / s_x`` as the float32 constant the device multiplies by (exactly 31.75)."""

ACC_LIMIT = 1 << 31

FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """The integer parameters of one linear classifier, exactly as the device holds them.

    Attributes: ``mu`` and ``inv_sigma`` (float32, per feature); ``weights`` (int8 values,
    ``R × F``); ``bias``, ``multiplier`` and ``shift`` (int32 values, per row); ``s_out`` (the
    real value of one logit step); ``n_classes`` (``R``, or 2 for a one-row binary model).
    """

    mu: F32Array
    inv_sigma: F32Array
    weights: IntArray
    bias: IntArray
    multiplier: IntArray
    shift: IntArray
    s_out: float
    n_classes: int

    def __post_init__(self) -> None:
        rows, features = self.weights.shape
        if self.mu.shape != (features,) or self.inv_sigma.shape != (features,):
            raise ValueError("mu and inv_sigma must have one entry per feature")
        for name in ("bias", "multiplier", "shift"):
            if getattr(self, name).shape != (rows,):
                raise ValueError(f"{name} must have one entry per weight row")
        if rows == 1 and self.n_classes != 2:
            raise ValueError("a one-row model must be binary (n_classes = 2)")
        if rows > 1 and rows != self.n_classes:
            raise ValueError("a multi-row model needs one row per class")
        if np.abs(self.weights).max(initial=0) > 127:
            raise ValueError("weights must lie in [-127, 127]")
        check_int32(self.bias, "bias")
        if np.any(self.shift < -31) or np.any(self.shift > 30):
            raise ValueError("requantization shifts must lie in [-31, 30]")
        worst = np.abs(self.bias) + 128 * np.abs(self.weights).sum(axis=1)
        if np.any(worst >= ACC_LIMIT):
            raise FixedPointOverflowError("the int32 accumulator could overflow for this model")
        # MultiplyByQuantizedMultiplier computes acc << max(shift, 0) in int32 first; the row with
        # the largest scale always has multiplier 1.0 = (2**30, shift 1), so its bound is 2**30.
        if np.any(worst << np.maximum(self.shift, 0) >= ACC_LIMIT):
            raise FixedPointOverflowError(
                "the int32 accumulator could overflow in the requantization left shift"
            )

    @property
    def n_features(self) -> int:
        """Number of input features ``F``."""
        return int(self.weights.shape[1])

    @property
    def n_rows(self) -> int:
        """Number of weight rows ``R``."""
        return int(self.weights.shape[0])

    @property
    def weight_bytes(self) -> int:
        """Bytes of int8 weights plus int32 bias (the research note's size measure)."""
        return self.weights.size + 4 * self.bias.size

    @property
    def float_weight_bytes(self) -> int:
        """Bytes the same weights and bias take in float32."""
        return 4 * (self.weights.size + self.bias.size)

    def quantize_input(self, x: npt.ArrayLike) -> IntArray:
        """Standardise and quantise raw features to int8 (float32 stage, fixed order)."""
        return quantize_input(x, self.mu, self.inv_sigma)

    def logits_q(self, q: npt.ArrayLike) -> IntArray:
        """Integer logits ``[n, R]`` from int8 inputs ``[n, F]``."""
        q64 = np.atleast_2d(np.asarray(q, dtype=np.int64))
        if q64.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {q64.shape[1]}")
        if q64.size and (q64.min() < -128 or q64.max() > 127):
            raise ValueError("quantised inputs must lie in [-128, 127]")
        acc = check_int32(q64 @ self.weights.T + self.bias[None, :], "accumulator")
        return multiply_by_quantized_multiplier(acc, self.multiplier[None, :], self.shift[None, :])

    def logits(self, x: npt.ArrayLike) -> IntArray:
        """Integer logits ``[n, R]`` from raw features ``[n, F]``."""
        return self.logits_q(self.quantize_input(x))

    def decide(self, logits: IntArray) -> IntArray:
        """Class index per row of logits: argmax, first maximum wins; one row: ``logit > 0``."""
        return decide(logits)

    def predict(self, x: npt.ArrayLike) -> IntArray:
        """Predicted class indices for raw features ``[n, F]``, exactly as the device computes."""
        return self.decide(self.logits(x))

    def confidence(self, logits: IntArray) -> npt.NDArray[np.uint8]:
        """Reported confidence of the predicted class, in units of 1/256 (README §3.5)."""
        return confidence_u8(logits, self.s_out)

    def dequantized(self) -> tuple[FloatArray, FloatArray]:
        """The float weights and bias the integer model represents (for error reports)."""
        s_w = _row_scales_from_requant(self)
        w = self.weights.astype(np.float64) * s_w[:, None]
        b = self.bias.astype(np.float64) * INPUT_SCALE * s_w
        return w, b


def _row_scales_from_requant(model: QuantizedLinear) -> FloatArray:
    real = model.multiplier.astype(np.float64) * np.exp2(model.shift.astype(np.float64) - 31)
    return np.asarray(real * model.s_out / INPUT_SCALE, dtype=np.float64)


def quantize_input(x: npt.ArrayLike, mu: F32Array, inv_sigma: F32Array) -> IntArray:
    """The device's float32 input stage: ``clamp(round((x − mu) · inv_sigma · 31.75))``.

    >>> mu = np.zeros(2, np.float32); inv = np.ones(2, np.float32)
    >>> quantize_input([[1.0, -5.0]], mu, inv).tolist()
    [[32, -128]]
    """
    x32 = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if x32.ndim != 2 or x32.shape[1] != mu.shape[0]:
        # Without this, a one-column x would broadcast against mu and be silently accepted.
        raise ValueError(f"expected {mu.shape[0]} features, got shape {x32.shape}")
    if not np.all(np.isfinite(x32)):
        raise ValueError("inputs must be finite")
    t = (x32 - mu) * inv_sigma  # float32 ops, one rounding each, in this order
    t = t * INV_INPUT_SCALE
    return np.clip(round_half_away(t), -128, 127).astype(np.int64)


def decide(logits: IntArray) -> IntArray:
    """Argmax with the first maximum winning; a one-row (binary) model predicts ``logit > 0``.

    >>> decide(np.array([[3, 5, 5], [-1, -1, -2]])).tolist()
    [1, 0]
    >>> decide(np.array([[0], [1], [-4]])).tolist()
    [0, 1, 0]
    """
    if logits.shape[1] == 1:
        return np.asarray(logits[:, 0] > 0, dtype=np.int64)
    return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)


def confidence_u8(logits: IntArray, s_out: float) -> npt.NDArray[np.uint8]:
    """Softmax probability of the predicted class as ``min(255, round(256 · p))``.

    >>> confidence_u8(np.array([[0, 0], [0, 1000]]), 0.01).tolist()
    [128, 255]
    >>> confidence_u8(np.array([[0], [-300]]), 0.01).tolist()
    [128, 244]
    """
    z = logits.astype(np.float64) * s_out
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    p = 1.0 / np.exp(z).sum(axis=1)  # the max entry is exp(0) = 1
    return np.minimum(255, round_half_away(256.0 * p)).astype(np.uint8)


def quantize_linear(
    mu: npt.ArrayLike,
    sigma: npt.ArrayLike,
    weights: npt.ArrayLike,
    bias: npt.ArrayLike,
    n_classes: int | None = None,
) -> QuantizedLinear:
    """Quantise a float linear classifier on standardised features to the int8 kernel.

    ``weights`` is ``[R, F]`` applied to ``(x − mu) / sigma``; ``R`` is the number of classes,
    or 1 for a binary model given as the logit of class 1. Raises ``ValueError`` for bad shapes,
    non-finite values or ``sigma ≤ 0``, and :class:`FixedPointOverflowError` when the int32
    accumulator could overflow.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    b = np.atleast_1d(np.asarray(bias, dtype=np.float64))
    mu64 = np.asarray(mu, dtype=np.float64)
    sigma64 = np.asarray(sigma, dtype=np.float64)
    rows, features = w.shape
    if mu64.shape != (features,) or sigma64.shape != (features,):
        raise ValueError(f"mu and sigma need {features} entries, one per weight column")
    if b.shape != (rows,):
        raise ValueError(f"bias needs {rows} entries, one per weight row")
    for name, arr in (("mu", mu64), ("sigma", sigma64), ("weights", w), ("bias", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
    if np.any(sigma64 <= 0):
        raise ValueError("sigma must be positive (use 1.0 for a constant feature)")
    classes = n_classes if n_classes is not None else (2 if rows == 1 else rows)

    row_max = np.abs(w).max(axis=1)
    s_w = np.where(row_max > 0, row_max / 127.0, 1.0)
    wq = np.clip(round_half_away(w / s_w[:, None]), -127, 127).astype(np.int64)
    bias_real = b / (INPUT_SCALE * s_w)
    if np.any(np.abs(bias_real) >= ACC_LIMIT):
        raise FixedPointOverflowError("bias too large for int32 at this weight scale")
    bq = round_half_away(bias_real).astype(np.int64)
    # twice the largest row scale: every real multiplier is then ≤ 0.5, so every shift is ≤ 0
    # and requantization never left-shifts the accumulator (full int32 headroom)
    s_out = 2.0 * float((INPUT_SCALE * s_w).max())
    pairs = [quantize_multiplier(INPUT_SCALE * sw / s_out) for sw in s_w]
    multiplier = np.array([m for m, _ in pairs], dtype=np.int64)
    shift = np.array([s for _, s in pairs], dtype=np.int64)
    with np.errstate(over="ignore"):
        inv_sigma = (1.0 / sigma64).astype(np.float32)
        mu32 = mu64.astype(np.float32)
    if not (np.all(np.isfinite(inv_sigma)) and np.all(np.isfinite(mu32))):
        raise ValueError("mu and 1/sigma must be finite in float32 (the device's input stage)")
    return QuantizedLinear(
        mu=mu32,
        inv_sigma=inv_sigma,
        weights=wq,
        bias=bq,
        multiplier=multiplier,
        shift=shift,
        s_out=s_out,
        n_classes=classes,
    )


@dataclass(frozen=True)
class QuantizationReport:
    """How far the integer model is from the float one it came from."""

    max_weight_error: float
    """Largest ``|W − Wq·s_w|`` over all weights, in float-weight units."""
    max_bias_error: float
    weight_saturations: int
    """Weights clipped at ±127 (0 with per-row max scaling unless rows are degenerate)."""
    input_saturation_rate: float | None
    """Share of input values clipped at ±4σ on the calibration data, if given."""
    agreement: float | None
    """Share of calibration rows where the integer and float predictions agree, if given."""


def quantization_report(
    model: QuantizedLinear,
    weights: npt.ArrayLike,
    bias: npt.ArrayLike,
    mu: npt.ArrayLike | None = None,
    sigma: npt.ArrayLike | None = None,
    x: npt.ArrayLike | None = None,
) -> QuantizationReport:
    """Compare ``model`` with the float parameters it was built from (and on data ``x``)."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    b = np.atleast_1d(np.asarray(bias, dtype=np.float64))
    wd, bd = model.dequantized()
    s_w = _row_scales_from_requant(model)
    saturations = int(np.sum(np.abs(w / s_w[:, None]) > 127.5))
    sat_rate: float | None = None
    agreement: float | None = None
    if x is not None and mu is not None and sigma is not None:
        xa = np.atleast_2d(np.asarray(x, dtype=np.float64))
        q = model.quantize_input(xa)
        sat_rate = float(np.mean((q == 127) | (q == -128)))
        z = (xa - np.asarray(mu, dtype=np.float64)) / np.asarray(sigma, dtype=np.float64)
        float_logits = z @ w.T + b
        float_pred = (
            (float_logits[:, 0] > 0).astype(np.int64)
            if w.shape[0] == 1
            else np.argmax(float_logits, axis=1)
        )
        agreement = float(np.mean(model.decide(model.logits_q(q)) == float_pred))
    return QuantizationReport(
        max_weight_error=float(np.abs(w - wd).max(initial=0.0)),
        max_bias_error=float(np.abs(b - bd).max(initial=0.0)),
        weight_saturations=saturations,
        input_saturation_rate=sat_rate,
        agreement=agreement,
    )
