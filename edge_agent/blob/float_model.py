"""A float linear classifier as a user brings it (``PARAMS.json``), turned into a parameter set.

The JSON form is ``{"features": [names], "classes": [labels], "mu": [F], "sigma": [F],
"weights": [[F] per row], "bias": [rows]}``; the weights apply to ``(x − mu) / sigma``. A
binary model may give one row (the logit of ``classes[1]``) or two.

>>> fm = FloatLinearModel.model_validate({"features": ["a", "b"], "classes": ["n", "p"],
...     "mu": [0, 0], "sigma": [1, 1], "weights": [[1, -1]], "bias": [0]})
>>> fm.parameter_schema().rows, fm.quantize().predict([[2.0, 0.0]]).tolist()
(1, [1])
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.blob.schema import ParameterSchema
from edge_agent.fixedpoint import QuantizedLinear, quantize_linear


class FloatModelError(ValueError):
    """``PARAMS.json`` is missing, not JSON, or inconsistent; the message names the field."""


class FloatLinearModel(BaseModel):
    """The float parameters of a linear classifier on standardised features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: list[str] = Field(min_length=1, max_length=255)
    classes: list[str] = Field(min_length=2, max_length=255)
    mu: list[float]
    sigma: list[float]
    weights: list[list[float]]
    bias: list[float]

    @model_validator(mode="after")
    def _consistent(self) -> FloatLinearModel:
        f, c = len(self.features), len(self.classes)
        if len(self.mu) != f or len(self.sigma) != f:
            raise ValueError(f"mu and sigma need {f} entries (one per feature)")
        rows = len(self.weights)
        if rows != c and not (c == 2 and rows == 1):
            raise ValueError(f"weights need {c} rows (one per class), or 1 for a binary model")
        if any(len(r) != f for r in self.weights):
            raise ValueError(f"every weight row needs {f} entries")
        if len(self.bias) != rows:
            raise ValueError(f"bias needs {rows} entries (one per weight row)")
        for name, names in (("feature", self.features), ("class", self.classes)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{name} names must be unique; repeated: {', '.join(dupes)}")
        for name, values in (("mu", self.mu), ("sigma", self.sigma), ("bias", self.bias)):
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    raise ValueError(f"{name}[{i}] is {v}; all numbers must be finite")
        for i, row in enumerate(self.weights):
            for j, v in enumerate(row):
                if not math.isfinite(v):
                    raise ValueError(f"weights[{i}][{j}] is {v}; all numbers must be finite")
        for i, s in enumerate(self.sigma):
            if s <= 0:
                raise ValueError(f"sigma[{i}] is {s}; sigma must be positive")
        # the device's input stage holds mu and 1/sigma in float32
        with np.errstate(over="ignore"):
            inv_sigma = (1.0 / np.asarray(self.sigma)).astype(np.float32)
            mu32 = np.asarray(self.mu).astype(np.float32)
        for name, arr, src in (("sigma", inv_sigma, self.sigma), ("mu", mu32, self.mu)):
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                i = int(bad[0])
                what = "1/sigma" if name == "sigma" else "mu"
                raise ValueError(f"{name}[{i}] is {src[i]}; {what} must fit in float32")
        self.parameter_schema()  # ValueError for bad or too many names
        return self

    def parameter_schema(self) -> ParameterSchema:
        """The parameter schema this model fits."""
        return ParameterSchema(
            features=tuple(self.features), classes=tuple(self.classes), rows=len(self.weights)
        )

    def quantize(self) -> QuantizedLinear:
        """The int8 model (``edge_agent.fixedpoint.quantize_linear``)."""
        return quantize_linear(
            self.mu, self.sigma, self.weights, self.bias, n_classes=len(self.classes)
        )

    @classmethod
    def load(cls, path: Path) -> FloatLinearModel:
        """Read and validate ``PARAMS.json``; raises :class:`FloatModelError`."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise FloatModelError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise FloatModelError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}") from exc
