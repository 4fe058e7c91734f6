"""Long-run variance of dependent streams by dyadic batch means, and the block size to monitor.

Layer A's detectors are calibrated for independent values. Real telemetry is not independent:
slow sensors are autocorrelated, activities come in sessions, cycles last thousands of
readings. The change-point literature keeps such detectors honest by replacing the variance
with the **long-run variance** ``σ²_LR = Σ_h γ(h)`` of the monitored series (Horváth, Rice &
Miller 2019; Dehling, Fried, Garcia & Wendler 2013) and by monitoring values that are close
to independent.

:class:`DyadicBatchMeans` learns that from a stationary stretch, in constant memory: it keeps
the non-overlapping **batch means** (Carlstein 1986; Flegal & Jones 2010) of every stream at
block sizes ``1, 2, 4, …, 2^(L−1)`` steps. At block size ``b`` the estimate is
``V_b = b · Var(block means)``; it grows with ``b`` while blocks are shorter than the
correlation time and levels off (its plateau is ``σ²_LR``) once they are longer.
:func:`choose_blocks` then picks, per stream, the smallest block size ``b`` from which ``V``
stops growing (every larger level with enough blocks within ``kappa_max · V_b``, on an upper
confidence bound), so that the
means of ``b`` consecutive values are nearly independent, and reports:

- ``block``: ``b`` (steps per monitored value);
- ``kappa``: ``max(1, L / V_b)``, the variance inflation left between the block means and the
  long run, with ``L`` the larger of the longest counting level's ``V`` and the upper bound of
  the longest level holding twice ``min_blocks`` blocks (the detector's threshold absorbs it,
  :func:`inflate_delta`; the plateau test that picks ``b`` uses the largest of every longer
  level's bound, ``≤ kappa_max``);
- ``sd``: the standard deviation of a block mean, ``√(V_b / b)``;
- ``mean``: the stream's mean over everything seen.

A stream is *ready* only when the levels ``b``, ``2b`` … ``2^lookahead·b`` each hold at least
``min_blocks`` blocks: the reference then holds at least ``min_blocks`` (nearly) independent
blocks at a block size shown to be past the correlation time. Independent data is ready after
``min_blocks · 2^lookahead`` steps with ``b = 1``; a slow sensor, a session pattern or a cycle
needs proportionally longer, and until then the stream is *calibrating* (nothing is alarmed on
it). A cycle is averaged out once ``b`` reaches its period (the block means no longer vary),
a random walk is never ready.

>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> iid = rng.standard_normal((600, 1))
>>> slow = np.repeat(rng.standard_normal((75, 1)), 8, axis=0) + 0.3 * rng.standard_normal((600, 1))
>>> bm = DyadicBatchMeans(2)
>>> for row in np.hstack([iid, slow]):
...     bm.add(row)
>>> ch = choose_blocks(bm)
>>> ch.ready.tolist(), ch.block.tolist()
([True, False], [1, 0])
>>> for row in np.hstack([rng.standard_normal((9000, 1)),
...                       np.repeat(rng.standard_normal((1125, 1)), 8, axis=0)]):
...     bm.add(row)
>>> ch = choose_blocks(bm)
>>> ch.ready.tolist(), ch.block.tolist()
([True, True], [1, 8])

References: E. Carlstein (1986), "The use of subseries values for estimating the variance of a
general statistic from a stationary sequence", Ann. Statist. 14(3). J. M. Flegal & G. L. Jones
(2010), "Batch means and spectral variance estimators in Markov chain Monte Carlo", Ann.
Statist. 38(2). L. Horváth, G. Rice & K. Miller (2019), R package CPAT (kernel long-run
variance for CUSUM tests under dependence). H. Dehling, R. Fried, I. Garcia & M. Wendler
(2013), "Change-point detection under dependence based on two-sample U-statistics".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_KAPPA_MAX",
    "DEFAULT_LEVELS",
    "DEFAULT_LOOKAHEAD",
    "DEFAULT_MIN_BLOCKS",
    "DEFAULT_Z",
    "BlockChoice",
    "DyadicBatchMeans",
    "choose_blocks",
    "confirm_blocks",
    "horizon_level",
    "inflate_delta",
    "inflation_at",
    "new_level_complete",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_LEVELS: Final = 12
"""Block sizes ``1 … 2¹¹`` steps (frames): a cycle or session of up to ~500 frames is seen."""
DEFAULT_MIN_BLOCKS: Final = 48
"""Blocks a level needs before its variance counts (relative standard error ≈ √(2/47) = 21 %)."""
DEFAULT_LOOKAHEAD: Final = 2
"""Levels above the chosen block size that must be seen (``b`` … ``4b``)."""
DEFAULT_KAPPA_MAX: Final = 2.0
"""Largest variance inflation ``κ`` left to the threshold; more, and a longer block is taken."""
DEFAULT_Z: Final = 1.64
"""One-sided 95 % normal quantile for the upper bound of a level's variance."""


def new_level_complete(steps: int, min_blocks: int = DEFAULT_MIN_BLOCKS) -> bool:
    """Whether ``steps`` just gave some level its ``min_blocks``-th block (``min_blocks · 2^j``).

    The moments to ask :func:`choose_blocks`: each look brings a new level, and asking only
    then (about log₂ of the stream's length looks in all, not one every few steps) keeps the
    chance that noise passes for a plateau at some look small.

    >>> [s for s in range(1, 400) if new_level_complete(s)]
    [48, 96, 192, 384]
    """
    if steps < min_blocks or steps % min_blocks:
        return False
    q = steps // min_blocks
    return q & (q - 1) == 0


_STATE_ARRAYS: Final = (
    ("count", "count"),
    ("total", "total"),
    ("total_sq", "total_sq"),
    ("total_cu", "total_cu"),
    ("pending", "_pending"),
)
"""The arrays of a :class:`DyadicBatchMeans` state and the attributes they restore."""


class DyadicBatchMeans:
    """Streaming non-overlapping batch means of ``n_streams`` series at dyadic block sizes.

    Memory is ``O(levels · n_streams)`` whatever the length of the stream. Each :meth:`add` is
    one step (a frame, or one label); a completed block of size ``2^j`` merges with its
    completed twin into one of size ``2^(j+1)`` (a binary counter), so a step costs O(1)
    vector operations amortised.
    """

    def __init__(self, n_streams: int, levels: int = DEFAULT_LEVELS) -> None:
        if n_streams < 1 or levels < 1:
            raise ValueError("need n_streams >= 1 and levels >= 1")
        self.levels = levels
        self.steps = 0
        self.count: IntArray = np.zeros(levels, dtype=np.int64)
        """Completed blocks per level."""
        self.total: FloatArray = np.zeros((levels, n_streams), dtype=np.float64)
        """Sum of the completed block means per level."""
        self.total_sq: FloatArray = np.zeros((levels, n_streams), dtype=np.float64)
        """Sum of their squares."""
        self.total_cu: FloatArray = np.zeros((levels, n_streams), dtype=np.float64)
        """Sum of their cubes (for the skewness of block means)."""
        self._pending: FloatArray = np.zeros((levels, n_streams), dtype=np.float64)
        """A completed block mean per level waiting for its twin (valid where ``steps`` says)."""

    @property
    def n_streams(self) -> int:
        """Number of series."""
        return int(self.total.shape[1])

    def state(self) -> dict[str, Any]:
        """Numbers and array copies that :meth:`from_state` restores (checkpoints)."""
        return {
            "levels": self.levels,
            "steps": self.steps,
            "count": self.count.copy(),
            "total": self.total.copy(),
            "total_sq": self.total_sq.copy(),
            "total_cu": self.total_cu.copy(),
            "pending": self._pending.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DyadicBatchMeans:
        """Inverse of :meth:`state`; ``ValueError`` if the arrays do not fit together."""
        total = np.asarray(state["total"], dtype=np.float64)
        if total.ndim != 2:
            raise ValueError("batch means: total must be levels x streams")
        bm = cls(int(total.shape[1]), int(state["levels"]))
        bm.steps = int(state["steps"])
        for name, attr in _STATE_ARRAYS:
            a = np.asarray(state[name], dtype=getattr(bm, attr).dtype)
            if a.shape != getattr(bm, attr).shape:
                raise ValueError(f"batch means: {name} has shape {a.shape}")
            setattr(bm, attr, a)
        return bm

    def add(self, row: FloatArray) -> None:
        """One step: the value of every series.

        The step reaches level 0 and, while it completes a twin, the next level up: the block
        means of those levels are formed first, then every sum is updated once for all of them
        (the same values as level by level)."""
        mean = np.asarray(row, dtype=np.float64)
        steps = self.steps
        self.steps = steps + 1
        levels = self.levels
        n = 1  # the levels this step reaches
        while n < levels and (steps >> (n - 1)) & 1:
            n += 1
        if n == 1:
            self.count[0] += 1
            sq = mean * mean
            self.total[0] += mean
            self.total_sq[0] += sq
            self.total_cu[0] += sq * mean
            if not steps & 1:  # the first of a pair: it waits for its twin
                self._pending[0] = mean
            return
        means = np.empty((n, mean.shape[0]), dtype=np.float64)
        means[0] = mean
        pending = self._pending
        for j in range(n - 1):
            means[j + 1] = (pending[j] + means[j]) * 0.5
        self.count[:n] += 1
        sq = means * means
        self.total[:n] += means
        self.total_sq[:n] += sq
        self.total_cu[:n] += sq * means
        if not (steps >> (n - 1)) & 1:
            pending[n - 1] = means[n - 1]

    def mean(self) -> FloatArray:
        """Mean of every series over the completed steps (NaN before the first)."""
        n = int(self.count[0])
        if n == 0:
            return np.full(self.n_streams, math.nan)
        return np.asarray(self.total[0] / n, dtype=np.float64)

    def skewness(self) -> FloatArray:
        """Skewness of the block means per level and series (0 below 3 blocks or no spread)."""
        n = self.count.astype(np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.total / n
            var = self.total_sq / n - m * m
            third = self.total_cu / n - 3.0 * m * self.total_sq / n + 2.0 * m**3
            g = third / np.power(np.maximum(var, 0.0), 1.5)
        out: FloatArray = np.where((n >= 3.0) & (var > 1e-12) & np.isfinite(g), g, 0.0)
        return out

    def variances(self) -> FloatArray:
        """``V_b = b · Var(block means)`` per level and series (NaN below 2 blocks)."""
        n = self.count.astype(np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.total_sq - self.total * self.total / n) / (n - 1.0)
        var = np.where(n >= 2.0, np.maximum(var, 0.0), math.nan)
        sizes = (2.0 ** np.arange(self.levels))[:, None]
        out: FloatArray = var * sizes
        return out


@dataclass(frozen=True, slots=True)
class BlockChoice:
    """What :func:`choose_blocks` found, per series (see the module docstring)."""

    ready: BoolArray
    block: IntArray
    """Steps per monitored value (0 where not ready)."""
    kappa: FloatArray
    """Variance inflation between the block means and the long run (≥ 1; NaN if not ready)."""
    sd: FloatArray
    """Standard deviation of one block mean (NaN if not ready)."""
    mean: FloatArray
    """Mean of the series over the whole learning stretch."""
    lrv: FloatArray
    """Long-run variance per step: the largest ``V_b'`` at ``b' ≥ b`` (NaN if not ready)."""
    skew: FloatArray
    """Skewness of a block mean at the chosen size (0 if not ready): dependence keeps block
    means of a skewed signal (``z²`` of a slow sensor) far from normal."""


def choose_blocks(
    bm: DyadicBatchMeans,
    *,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    lookahead: int = DEFAULT_LOOKAHEAD,
    kappa_max: float = DEFAULT_KAPPA_MAX,
    z: float = DEFAULT_Z,
    var_floor: float = 1e-6,
    min_block: IntArray | None = None,
    horizon: int = 1,
) -> BlockChoice:
    """The smallest block size per series past which the batch-means variance stops growing.

    A level counts once it holds ``min_blocks`` blocks. For level ``j`` the inflation is
    ``κ_j = max(1, max V̄ / V_j)`` over the counting levels ``j < j' ≤ j + lookahead + 1``
    (further up, the few long blocks are mostly noise), where ``V̄`` is the upper confidence
    bound ``V · (1 + z √(2 / (n − 1)))`` of a batch-means variance from ``n`` blocks (so that
    noise does not pass for a plateau), and over the Richardson extrapolations
    ``2 V_{j'+1} − V_{j'}`` (``j ≤ j'``), which remove the ``1/b`` bias of batch means under
    short-range dependence (Song & Schmeiser 1995: the bias is ``−c/b``). Series ``s`` is
    ready at the smallest ``j`` whose levels ``j … j + lookahead`` all count and whose
    ``κ_j ≤ kappa_max``. A series with (near) zero variance at every counting level is ready
    at ``b = 1`` with the ``var_floor`` variance (a constant signal: any move is a change).
    ``var_floor`` is in the series' units; layer A's are standardised (variance ≈ 1 for an
    independent stream), so 1e-6 is a constant up to rounding. ``min_block`` (per series)
    rules out smaller blocks. ``horizon`` (steps) is the shortest span of dependence every series
    is checked for: nothing is ready before blocks of at least ``horizon`` steps count, however
    small its block (a slow component of small amplitude adds little variance to short blocks
    and shows only in long ones; :func:`horizon_level`).
    """
    if min_blocks < 2 or lookahead < 1 or not kappa_max >= 1.0 or horizon < 1:
        raise ValueError("need min_blocks >= 2, lookahead >= 1, kappa_max >= 1 and horizon >= 1")
    levels = _Levels(bm, min_blocks, z)
    s = bm.n_streams
    ready = np.zeros(s, dtype=np.bool_)
    block = np.zeros(s, dtype=np.int64)
    kappa = np.full(s, math.nan)
    sd = np.full(s, math.nan)
    lrv = np.full(s, math.nan)
    skew = np.zeros(s)
    g = bm.skewness()
    floor = np.zeros(s, dtype=np.int64) if min_block is None else np.asarray(min_block)
    if levels.top < horizon_level(horizon):
        return BlockChoice(
            ready=ready, block=block, kappa=kappa, sd=sd, mean=bm.mean(), lrv=lrv, skew=skew
        )
    for j in range(0, levels.top - lookahead + 1):
        vj, vmax = levels.v[j], levels.above(j)
        flat = vmax <= var_floor
        safe_vj = np.maximum(vj, var_floor)
        kap = np.maximum(1.0, vmax / safe_vj)
        ok = ~ready & ((kap <= kappa_max) | flat) & ((1 << j) >= floor)
        if not ok.any():
            continue
        kap = np.maximum(1.0, levels.for_threshold(j) / safe_vj)
        size = 1 << j
        ready |= ok
        block[ok] = size
        kappa[ok] = np.where(flat[ok], 1.0, kap[ok])
        sd[ok] = np.sqrt(safe_vj[ok] / size)
        lrv[ok] = np.maximum(vmax[ok], safe_vj[ok])
        skew[ok] = np.where(flat[ok], 0.0, g[j][ok])
        if ready.all():
            break
    return BlockChoice(
        ready=ready, block=block, kappa=kappa, sd=sd, mean=bm.mean(), lrv=lrv, skew=skew
    )


def confirm_blocks(
    bm: DyadicBatchMeans,
    previous: IntArray,
    *,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    horizon: int = 1,
    min_block: IntArray | None = None,
) -> tuple[BlockChoice, IntArray]:
    """:func:`choose_blocks` confirmed by the previous look: a series is ready only when this
    look and the previous one (``previous``: its block then, 0 if none) both found a plateau,
    at the larger of their two blocks, so that one look's noise passing for a plateau starts
    nothing, and only once blocks of ``horizon`` steps count (:func:`choose_blocks`; the earlier
    look need not reach it). Returns the confirmed choice and the blocks to pass as
    ``previous`` next time. ``min_block`` (per series, as for :func:`choose_blocks`) rules out
    smaller blocks at this look (a declared time scale; the confirmed block is at least this
    look's).
    """
    looked = choose_blocks(bm, min_blocks=min_blocks, min_block=min_block)
    candidate = np.where(looked.ready, looked.block, 0)
    confirmed = looked.ready & (previous > 0)
    if not confirmed.any():
        return dataclasses.replace(looked, ready=confirmed), candidate
    choice = choose_blocks(
        bm, min_blocks=min_blocks, min_block=np.maximum(previous, looked.block), horizon=horizon
    )
    return dataclasses.replace(choice, ready=choice.ready & confirmed), candidate


def horizon_level(horizon: int) -> int:
    """The batch-means level of the shortest block of at least ``horizon`` steps.

    >>> horizon_level(1), horizon_level(32), horizon_level(33)
    (0, 5, 6)
    """
    if horizon < 1:
        raise ValueError("horizon must be >= 1")
    return (horizon - 1).bit_length()


def inflation_at(
    bm: DyadicBatchMeans,
    block: IntArray,
    *,
    min_blocks: int = DEFAULT_MIN_BLOCKS,
    z: float = DEFAULT_Z,
    var_floor: float = 1e-6,
) -> FloatArray:
    """``κ`` of each series at its given block size (a power of two) on everything seen so far,
    as :func:`choose_blocks` reports it (unbounded; 1 where no counting level lies above the
    block).

    A series monitored since an earlier look can be checked against the longer blocks that have
    completed since: a slow component only shows in long blocks.
    """
    levels = _Levels(bm, min_blocks, z)
    out = np.ones(bm.n_streams)
    for j in np.unique(np.asarray(block)).tolist():
        if j < 1:
            continue
        lv = int(j).bit_length() - 1
        if lv >= levels.top:
            continue
        mask = np.asarray(block) == j
        vmax = levels.above(lv)[mask]
        vj = np.maximum(levels.v[lv][mask], var_floor)
        kap = np.maximum(1.0, levels.for_threshold(lv)[mask] / vj)
        out[mask] = np.where(vmax <= var_floor, 1.0, kap)
    return out


class _Levels:
    """The batch-means variances of every counting level, and what bounds them from above."""

    def __init__(self, bm: DyadicBatchMeans, min_blocks: int, z: float) -> None:
        self.v = bm.variances()
        counting = bm.count >= min_blocks
        self.top = int(np.flatnonzero(counting)[-1]) if counting.any() else -1
        self.firm = (bm.count >= 2 * min_blocks).tolist()
        n = np.maximum(bm.count.astype(np.float64), 2.0)[:, None]
        # upper confidence bound of each level (relative standard error √(2 / (n − 1)))
        self.v_up = self.v * (1.0 + z * np.sqrt(2.0 / (n - 1.0)))
        # first-order bias removed: V_b ≈ L (1 − a / b) for short-range dependence, so
        # 2 V_2b − V_b estimates L (Richardson extrapolation)
        fill = np.full((1, bm.n_streams), -np.inf)
        self.rich = np.vstack([2.0 * self.v[1:] - self.v[:-1], fill])

    def for_threshold(self, j: int) -> FloatArray:
        """The long-run variance a threshold at level ``j`` absorbs (the plateau from ``j`` on
        shown by :meth:`above`): the larger of the longest counting level's estimate and the
        upper bound of the longest level holding ``2 · min_blocks`` blocks.

        :meth:`above` takes the largest of several noisy bounds, which is the right test of a
        plateau, but as the variance itself it is biased upwards (on independent data by
        a third to a half), and every unit of ``κ`` multiplies ADWIN's ``ln(1/δ)``. One bound
        from the longest well-counted level keeps the margin against sampling error without
        the selection bias, and the longest level's point estimate keeps any growth seen.
        """
        top = self.top
        firm = [jj for jj in range(j + 1, top + 1) if self.firm[jj]]
        if not firm:
            out: FloatArray = np.maximum(self.v[top], self.v_up[top])
            return out
        return np.asarray(np.maximum(self.v[top], self.v_up[firm[-1]]), dtype=np.float64)

    def above(self, j: int) -> FloatArray:
        """The largest bound on the long-run variance from the counting levels above ``j``."""
        top = self.top
        out: FloatArray = np.maximum(
            np.max(self.v_up[j + 1 : top + 1], axis=0), np.max(self.rich[j:top], axis=0)
        )
        return out


def inflate_delta(delta: float, kappa: float, log_width: float = math.log(1000.0)) -> float:
    """ADWIN's δ for values whose window means vary ``kappa`` times more than independent ones.

    ADWIN (Bifet & Gavaldà 2007) cuts when two sub-window means differ by more than
    ``√(2 m σ²_W δ') + ⅔ m δ'`` with ``δ' = ln(2 ln W / δ)`` and ``σ²_W`` the values' own
    variance. If the means vary ``κ`` times more (residual dependence, Bagshaw & Johnson
    1975), the same false-alarm probability per cut needs ``δ'`` multiplied by ``κ``:
    ``δ_κ = c · (δ / c)^κ`` with ``c = 2 ln W`` (taken at ``W = 1000`` values; the range term
    grows too, which only makes the test more conservative).

    >>> inflate_delta(1e-5, 1.0) == 1e-5
    True
    >>> f"{inflate_delta(1e-5, 1.5):.2g}"
    '8.5e-09'
    """
    if not kappa >= 1.0:
        raise ValueError("kappa must be >= 1")
    c = 2.0 * log_width
    return float(c * (delta / c) ** kappa)
