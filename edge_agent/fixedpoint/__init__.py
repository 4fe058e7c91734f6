"""Int8 fixed-point maths (TFLite spec) and the device's integer inference kernel."""

from edge_agent.fixedpoint.linear import (
    INPUT_SCALE,
    QuantizationReport,
    QuantizedLinear,
    confidence_u8,
    decide,
    quantization_report,
    quantize_input,
    quantize_linear,
)
from edge_agent.fixedpoint.rounding import (
    INT32_MAX,
    INT32_MIN,
    FixedPointOverflowError,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    round_half_away,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

__all__ = [
    "INPUT_SCALE",
    "INT32_MAX",
    "INT32_MIN",
    "FixedPointOverflowError",
    "QuantizationReport",
    "QuantizedLinear",
    "confidence_u8",
    "decide",
    "multiply_by_quantized_multiplier",
    "quantization_report",
    "quantize_input",
    "quantize_linear",
    "quantize_multiplier",
    "round_half_away",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
