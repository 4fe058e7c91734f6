"""Paired comparison of a candidate with the deployed model on the same labelled readings.

Both models predict the same readings, so the comparison is paired: only the *discordant*
readings (one model right, the other wrong) carry information. With ``b`` readings the candidate
alone gets right and ``c`` the deployed model alone gets right, the exact one-sided sign test
(McNemar's exact test) gives ``p_worse = P(X ≥ c)`` for ``X ~ Binomial(b + c, 1/2)``: the chance
of the deployed model winning at least ``c`` of the discordant readings if the two were equally
good. A small ``p_worse`` means the candidate is worse beyond noise.

>>> import numpy as np
>>> y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
>>> cmp = compare_paired(y, deployed=np.array([0, 1, 2, 0, 1, 2, 0, 0]),
...                      candidate=np.array([0, 1, 2, 0, 1, 2, 0, 1]))
>>> cmp.deployed_accuracy, cmp.candidate_accuracy, cmp.candidate_only, cmp.deployed_only
(0.875, 1.0, 1, 0)
>>> round(cmp.p_worse, 3), cmp.delta_pp
(1.0, 12.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import binom

from edge_agent.blob.float_model import FloatLinearModel

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PairedComparison:
    """Accuracies of both models on the same ``n`` labelled readings and the sign test."""

    n: int
    deployed_accuracy: float
    candidate_accuracy: float
    candidate_only: int
    """Readings the candidate gets right and the deployed model wrong (``b``)."""
    deployed_only: int
    """Readings the deployed model gets right and the candidate wrong (``c``)."""
    p_worse: float
    """One-sided exact sign-test p-value for "the candidate is worse" (1.0 with no discordance)."""

    @property
    def delta_pp(self) -> float:
        """Candidate minus deployed accuracy, in percentage points."""
        return 100.0 * (self.candidate_accuracy - self.deployed_accuracy)


def compare_paired(
    labels: npt.ArrayLike, deployed: npt.ArrayLike, candidate: npt.ArrayLike
) -> PairedComparison:
    """Compare two prediction vectors against the same labels; raises ``ValueError`` if empty."""
    y = np.asarray(labels, dtype=np.int64)
    d = np.asarray(deployed, dtype=np.int64)
    c = np.asarray(candidate, dtype=np.int64)
    if y.ndim != 1 or d.shape != y.shape or c.shape != y.shape:
        raise ValueError("labels and both predictions must be 1-D of the same length")
    if y.size == 0:
        raise ValueError("no labelled readings to compare on")
    d_ok, c_ok = d == y, c == y
    b_n = int(np.sum(c_ok & ~d_ok))
    c_n = int(np.sum(d_ok & ~c_ok))
    # P(X >= c_n) = sf(c_n - 1); with no discordant readings there is no evidence: p = 1
    p = float(binom.sf(c_n - 1, b_n + c_n, 0.5)) if b_n + c_n else 1.0
    return PairedComparison(
        n=int(y.size),
        deployed_accuracy=float(d_ok.mean()),
        candidate_accuracy=float(c_ok.mean()),
        candidate_only=b_n,
        deployed_only=c_n,
        p_worse=p,
    )


def float_predict(model: FloatLinearModel, x: npt.ArrayLike) -> IntArray:
    """Class indices of the float model: argmax of the logits (one row: ``logit > 0``)."""
    xa = np.atleast_2d(np.asarray(x, dtype=np.float64))
    z = (xa - np.asarray(model.mu)) / np.asarray(model.sigma)
    logits = z @ np.asarray(model.weights).T + np.asarray(model.bias)
    if logits.shape[1] == 1:
        return np.asarray(logits[:, 0] > 0, dtype=np.int64)
    return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)
