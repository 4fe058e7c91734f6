"""Known-answer tests: inputs with the integer logits and classes the reference kernel gives.

The builder stores them in every blob; a device runs them through its own kernel after loading
the trial slot and reverts on any difference (catching schema, quantization, rounding-mode and
endianness bugs on the device itself).

>>> import numpy as np
>>> from edge_agent.fixedpoint import quantize_linear
>>> m = quantize_linear([0.0, 0.0], [1.0, 1.0], [[1.0, -1.0], [0.2, 0.3], [-1, 0.5]], [0, 0, 0])
>>> k = make_known_answers(m)
>>> k.inputs.shape, k.logits.shape
((8, 2), (8, 3))
>>> check_known_answers(m, k)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.blob.errors import BlobRejectedError
from edge_agent.fixedpoint import QuantizedLinear
from edge_agent.fixedpoint.rounding import IntArray

DEFAULT_KATS = 8


@dataclass(frozen=True, eq=False)
class KnownAnswers:
    """``n`` float32 inputs with their expected int32 logits and predicted classes."""

    inputs: npt.NDArray[np.float32]
    logits: IntArray
    preds: IntArray

    @property
    def n(self) -> int:
        """Number of known-answer vectors."""
        return int(self.inputs.shape[0])


def make_known_answers(
    model: QuantizedLinear,
    x: npt.ArrayLike | None = None,
    n: int = DEFAULT_KATS,
    seed: int = 0,
) -> KnownAnswers:
    """Pick ``n`` inputs that exercise the kernel and record the reference answers.

    Inputs come from ``x`` (real readings) when given, else from ``mu ± k·sigma``; the last two
    are pushed beyond ±4σ so the clipping path is tested too.
    """
    rng = np.random.default_rng(seed)
    sigma = 1.0 / model.inv_sigma.astype(np.float64)
    mu = model.mu.astype(np.float64)
    if x is not None:
        data = np.atleast_2d(np.asarray(x, dtype=np.float64))
        rows = data[rng.choice(len(data), size=min(n, len(data)), replace=False)]
    else:
        rows = mu + sigma * rng.uniform(-3.0, 3.0, size=(n, model.n_features))
    rows = np.array(rows, dtype=np.float64)
    if len(rows) >= 2:
        rows[-1] = mu + 6.0 * sigma
        rows[-2] = mu - 6.0 * sigma
    inputs = rows.astype(np.float32)
    logits = model.logits(inputs)
    return KnownAnswers(inputs=inputs, logits=logits, preds=model.decide(logits))


def check_known_answers(model: QuantizedLinear, kats: KnownAnswers) -> None:
    """Run the KATs through ``model``; any difference raises ``kat_mismatch``."""
    if kats.inputs.shape[1] != model.n_features or kats.logits.shape[1] != model.n_rows:
        raise BlobRejectedError("kat_mismatch", "known-answer vectors have the wrong shape")
    logits = model.logits(kats.inputs)
    bad = np.flatnonzero(
        np.any(logits != kats.logits, axis=1) | (model.decide(logits) != kats.preds)
    )
    if bad.size:
        raise BlobRejectedError(
            "kat_mismatch",
            f"{bad.size} of {kats.n} known-answer vectors differ (first: #{int(bad[0])})",
        )
