"""One-sided CUSUM on the labelled error stream against a growing reference (layer A).

Why a CUSUM besides ADWIN
-------------------------
A concept change that only the labels show (the inputs, predictions and confidences keep their
distribution) moves the error rate by a few points. At 10 % labelling a device sees few labels,
and the strict tier's budget allows about one false alarm per 5·10⁸ labels per detector, so
the question is how many labels a detector needs. Two limits matter:

- with ``p0`` known, no detector at false-alarm rate ``α`` per label is faster (in the worst
  case, on average) than Lorden's ``ln(1/α) / KL(p1 ‖ p0)`` labels, and a CUSUM of the
  log-likelihood ratio attains it;
- ``p0`` is not known: it is learnt from the ``n0`` labels before the change. Comparing them
  with any number of labels after it, a shift ``δ`` can only be told from noise at level ``α``
  when ``δ² n0 / (2 σ²) ≳ ln(1/α)`` (``σ² = p0 (1 − p0)``): with 1,200 labels before a change
  from 11 % to 17 % that is about 20 nats, which is what the budget needs, so no detector
  catches it reliably; with 5,000 labels it is caught within about 1.2 times Lorden's limit.

ADWIN compares every split of its window; it handles the second limit, but its cut threshold
(Hoeffding's variance term plus a range term for values in ``[0, 1]``, two-sided, on bucket
boundaries) needs more labels than the likelihood ratio. This CUSUM is the likelihood-ratio
test, one-sided (only a rise of the error rate matters), with the estimation error of the
reference priced in explicitly.

The detector
------------
Values are block means ``m`` of ``b`` labels (the error stream's learnt block). The reference
is every label seen before the current *excursion*: while the statistic is above 0 the labels
are held apart (the candidate change started when it last left 0), and when it returns to 0
they join the reference, so the reference grows as long as nothing changes and never takes in
a change under way. From its ``n`` labels with mean ``p̂`` (``(sum + ½) / (n + 1)``):

- per-label variance ``σ² = φ p̂ (1 − p̂)`` with the learnt dispersion ``φ ≥ 1`` of block
  means (``b · sd_b² / (p (1 − p))``: 1 for independent errors, more for errors in sessions),
  residual inflation ``κ`` between blocks (as for the other streams), and the variance of the
  reference's mean ``v = κ σ² / n``;
- design shift ``d = A · √(2 h κ σ² / min(n, N))`` with :data:`DESIGN_A` = 1.5 and
  :data:`DESIGN_LABELS` ``N`` = 8,192: about 1.5 times the smallest shift a reference of
  ``min(n, N)`` labels can separate at this threshold (a shift below about ``d / 2`` is never
  caught). Past ``N`` labels the design stays put, so that the CUSUM stays tuned to changes it
  can find within a few thousand labels (larger ones are found faster; ADWIN is faster still
  on large ones). On simulated Bernoulli streams (a reference of 5,000 labels, κ 1.3–2, rises
  from 3.6 % to 6.8 % and from 11 % to 15 % or 17 %; 300 runs each), ``N`` = 8,192 missed
  0–10 % of the runs within 20,000 labels where 2,048 missed 5–52 %, at medians within
  about 15 % of each other where both caught most;
- null and alternative ``c0 = p̂ + h v / d`` and ``p1 = c0 + d``. The margin ``h v / d``
  prices the reference's error: the false-alarm rate of a CUSUM whose null is off by ``η`` is
  about ``exp(2 h η / d)`` times its nominal rate, and averaged over ``η ~ N(−margin, v)`` that
  factor is ≤ 1 exactly when the margin is ≥ ``h v / d``;
- statistic ``S ← max(0, S + λ b [m ln(p1 / c0) + (1 − m) ln((1 − p1) / (1 − c0))])`` with
  ``λ = 1 / (κ φ)``: the binomial log-likelihood ratio of the block, tempered for dispersion
  and residual dependence (a quasi-likelihood: exact for independent labels, right to second
  order for dependent ones);
- alarm when ``S ≥ h`` with ``h = ln(λ KL(c0 ‖ p1) / α)``, ``α`` the detector's false alarms
  per label (``b α`` per block) divided by :data:`MODEL_MARGIN` (below). For a CUSUM of
  log-likelihood ratios the mean time to a false alarm is about ``e^h`` divided by the drift of
  the statistic under the null (renewal theory, Siegmund 1985 ch. II; ``e^h`` alone is
  Lorden's bound, 4–7 nats more conservative here). The Markov-chain ARL of the Bernoulli
  CUSUM (``p0`` 0.02–0.35, ``d`` 0.01–0.08, ``h`` 8–16) matches ``ln ARL = h − ln KL(c0 ‖ p1)``
  to ±0.4 nats. The whole detector (growing reference, margin, design, κ checks; without the
  model margin) on Bernoulli streams of rate 0.03, 0.11 and 0.3 started from a 384-label
  reference raised 0.42–0.53 of ``α`` at ``α`` = 10⁻⁴ and 0.25–0.50 at 10⁻⁵ per label (a
  simpler version without the reference margin: 1.6–2 times ``α``). ``h`` and the design
  depend on each other; three fixed-point steps settle them.

Dependence keeps being checked. The null learning sees a few hundred labels before the stream
starts, and errors in sessions can depend on each other over far longer stretches (on
``tests/bench/stationary_streams``' ``sessions`` devices the batch-means variance of the
errors keeps growing up to blocks of 500–2,000 labels, to 2–6 times the learnt κ). A CUSUM adds
up small deviations over long excursions, so it is the detector such a slow component fools
first. So the CUSUM keeps dyadic batch means of its own block means
(:class:`service.drift.long_run_variance.DyadicBatchMeans`, about 0.5 KB) and, each time a
level completes (once the excursion under way, if any, has ended, so that a change in progress
does not inflate it), sets ``κ`` to the larger of the stream's learnt κ and the inflation the
longer blocks show (:func:`service.drift.long_run_variance.inflation_at`, the null learning's
rule); and its threshold is set for its share of the budget divided by :data:`MODEL_MARGIN`
(3, as the frame streams' margin; about 7 % of delay). Its own batch means count only once
they span ``checked_labels`` (the labels the stream's κ was learnt on): before, their longest
blocks are no longer than those already checked, and the upper bound of a level of 48 blocks
(1.34 times its estimate) only added noise (κ 1.08 → 1.46 on independent errors). A κ the
stream raises (:meth:`ErrorCusum.set_kappa`) while an excursion is under way is taken when it
ends, as its own looks are: the stream's batch means see a change in progress too.

An excursion that ends (the statistic back at 0) joins the reference unless its labels, or
everything the reference took in since it started running together with them, show a rate
above the reference's (one-sided two-sample ``z ≥`` :data:`HOLD_Z` = 3, variance ``κ φ``
inflated): a rise too small for the design (below about ``margin + d / 2``) otherwise ends
excursion after excursion and drags the reference to the new rate, so that it is never
alarmed (Bernoulli 3.3 % → 6.3 % after a reference of 2,600 labels at κ 1.45: 9 of 30 runs
missed within 20,000 labels; testing single excursions 5; as here 0). Under no change an
excursion that returns to 0 has a mean below the point where the drift changes sign, so alone
it passes only when about 0.4 times as long as the reference; on Bernoulli streams (reference
2,600 labels, 6·10⁶ labels at 2·10⁻⁹ and 10⁻⁶ per label) 1–2 runs of 60 kept labels out, and
the alarms stayed at 0 and 1 (``α n`` = 0.012 and 6).

Measured with ``tests/bench/bench_concept.py --null`` (8 devices × 2·10⁶ readings per kind,
10 % labelled, at budgets where alarms can be counted; the error stream's horizon of 32 labels
on): at 5·10⁻⁵ per label the CUSUM raised 0.22 times its share on the ``sessions`` devices
(16 alarms in 1.43·10⁶ labels; ADWIN 0.11), 0.04 on independent errors (ADWIN 0.10) and
0.01 on the real recordings (ADWIN 0); at 5·10⁻⁷ per label no error detector raised any
(95 % upper bounds 3.8–4.2 times the share). (A version before the horizon, given ``b``
labels' budget per label, raised 1.3 and 3.2 times its share on ``sessions``.)

After an alarm (its own, or another strict detector's on the error stream) the labels of the
current excursion become the new reference, its batch means start afresh with κ back at the
stream's, and the CUSUM waits until the reference holds at least :data:`MIN_REFERENCE_BLOCKS`
blocks before it runs again.

The state is a dozen floats and the batch means (the instance ``__dict__``, pickled in the
device checkpoint).

References: E. S. Page (1954), "Continuous inspection schemes", Biometrika 41. G. Lorden
(1971), "Procedures for reacting to a change in distribution", Ann. Math. Statist. 42(6).
D. Siegmund (1985), *Sequential Analysis: Tests and Confidence Intervals*, Springer (ch. II,
the ARL approximation of the CUSUM).

>>> import random
>>> cus = ErrorCusum(label_budget=2e-9, block=1, kappa=1.0, dispersion=1.0,
...                  reference_labels=5000, reference_errors=500)
>>> rng = random.Random(1)
>>> [t for t in range(20_000) if cus.update(float(rng.random() < 0.10))]
[]
>>> hits = [t for t in range(20_000) if cus.update(float(rng.random() < 0.16))]
>>> 0 < hits[0] < 3000
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from service.drift.long_run_variance import (
    DEFAULT_MIN_BLOCKS,
    DyadicBatchMeans,
    inflation_at,
    new_level_complete,
)

__all__ = [
    "DESIGN_A",
    "DESIGN_LABELS",
    "HOLD_Z",
    "MIN_REFERENCE_BLOCKS",
    "MODEL_MARGIN",
    "ErrorCusum",
]

DESIGN_A: Final = 1.5
"""Design shift in multiples of the smallest shift the reference can separate (see above)."""
DESIGN_LABELS: Final = 8192
"""Reference labels past which the design shift no longer shrinks."""
MODEL_MARGIN: Final = 3.0
"""The CUSUM is set for its share of the budget divided by this (as the frame streams'
``FRAME_MODEL_MARGIN``): errors in sessions exceed the dependence model (see above)."""
MIN_REFERENCE_BLOCKS: Final = 48
"""Blocks a reference needs after an alarm before the CUSUM runs again (a batch-means level's
``min_blocks``)."""
HOLD_Z: Final = 3.0
"""An excursion whose own mean lies this many standard errors above the reference's does not
join the reference when it ends (see :meth:`ErrorCusum._elevated`)."""
_P_MAX: Final = 1.0 - 1e-6


def _kl(p: float, q: float) -> float:
    """KL(Ber(p) ‖ Ber(q)) in nats (0 < p, q < 1)."""
    return p * math.log(p / q) + (1.0 - p) * math.log((1.0 - p) / (1.0 - q))


_STATE_NUMBERS: Final = (
    "label_budget", "alpha", "block", "kappa_floor", "kappa", "min_blocks", "checked_labels",
    "dispersion", "ref_n", "ref_sum", "exc_n", "exc_sum", "dropped_n", "base_n", "base_sum",
    "s", "c0", "p1", "h", "w_err", "w_ok",
)  # fmt: skip
"""The numbers of an :class:`ErrorCusum`'s state (all ``float`` but those in ``_INTS``)."""
_INTS: Final = {"block": int, "min_blocks": int}


class ErrorCusum:
    """The one-sided error-rate CUSUM of one device (see the module docstring): Page's (1954)
    CUSUM of the tempered binomial log-likelihood ratio, threshold from Siegmund's (1985)
    renewal approximation of its ARL, delay measured against Lorden's (1971) bound.

    ``label_budget``: false alarms allowed per label; ``block``: labels per update;
    ``kappa``: residual variance inflation between blocks; ``dispersion``: ``φ``, the variance
    of a block mean relative to independent labels; the reference starts with
    ``reference_labels`` labels holding ``reference_errors`` errors; ``checked_labels``: the
    labels ``kappa`` was learnt on (its own batch means only count from as many on, below).
    """

    def __init__(
        self,
        label_budget: float,
        block: int,
        kappa: float,
        dispersion: float,
        reference_labels: float,
        reference_errors: float,
        min_blocks: int = DEFAULT_MIN_BLOCKS,
        checked_labels: float = 0.0,
    ) -> None:
        if not label_budget > 0.0 or block < 1 or not kappa >= 1.0:
            raise ValueError("need label_budget > 0, block >= 1 and kappa >= 1")
        if not 0.0 <= reference_errors <= reference_labels:
            raise ValueError("need 0 <= reference_errors <= reference_labels")
        self.label_budget = float(label_budget)
        self.alpha = self.label_budget / MODEL_MARGIN  # what the threshold is set for
        self.block = int(block)
        self.kappa_floor = float(kappa)  # the stream's learnt κ
        self.kappa = float(kappa)  # in use: ≥ the floor, from the blocks seen since (below)
        self.min_blocks = int(min_blocks)
        self.checked_labels = float(checked_labels)
        self.floor_pending: float | None = None  # a floor from set_kappa, taken when S is 0
        self.bm = DyadicBatchMeans(1)  # the block means seen since the start (or last alarm)
        self.look_pending = False
        self.dispersion = max(1.0, float(dispersion))
        self.ref_n = float(reference_labels)
        self.ref_sum = float(reference_errors)
        self.exc_n = 0.0  # labels of the current excursion (held out of the reference)
        self.exc_sum = 0.0
        self.dropped_n = 0.0  # labels of elevated excursions kept out of the reference
        self.base_n = self.base_sum = 0.0  # the reference when it started running
        self.s = 0.0
        self.c0 = self.p1 = self.h = math.nan
        self.w_err = self.w_ok = 0.0  # λ ln(p1/c0), λ ln((1 − p1)/(1 − c0)) per label
        self._fit()
        self._set_base()

    def state(self) -> dict[str, Any]:
        """Its numbers and batch means (checkpoints; :meth:`from_state` restores them)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _STATE_NUMBERS}
        out["floor_pending"] = self.floor_pending
        out["look_pending"] = self.look_pending
        out["bm"] = self.bm.state()
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ErrorCusum:
        """Inverse of :meth:`state`: the same numbers, nothing recomputed."""
        cus = cls.__new__(cls)
        for name in _STATE_NUMBERS:
            setattr(cus, name, _INTS.get(name, float)(state[name]))
        pending = state["floor_pending"]
        cus.floor_pending = None if pending is None else float(pending)
        cus.look_pending = bool(state["look_pending"])
        cus.bm = DyadicBatchMeans.from_state(state["bm"])
        return cus

    @property
    def running(self) -> bool:
        """Whether the reference is long enough to test against (else it is being rebuilt)."""
        return self.ref_n >= MIN_REFERENCE_BLOCKS * self.block

    @property
    def reference_rate(self) -> float:
        """The reference error rate ``p̂``."""
        return (self.ref_sum + 0.5) / (self.ref_n + 1.0)

    def _fit(self) -> None:
        """``c0``, ``p1`` and ``h`` for the current reference, ``κ`` and ``φ``."""
        if not self.running:
            self.c0 = self.p1 = self.h = math.nan
            self.w_err = self.w_ok = 0.0
            return
        p = self.reference_rate
        lam = 1.0 / (self.kappa * self.dispersion)
        var1 = self.kappa * self.dispersion * p * (1.0 - p)  # κ σ² per label
        v = var1 / self.ref_n
        n_design = min(self.ref_n, float(DESIGN_LABELS))
        h = math.log(1.0 / self.alpha)
        c0 = p1 = p
        for _ in range(3):
            d = DESIGN_A * math.sqrt(2.0 * max(h, 1.0) * var1 / n_design)
            c0 = min(p + h * v / d, _P_MAX - 1e-6)
            p1 = min(c0 + d, _P_MAX)
            h = max(math.log(lam * _kl(c0, p1) / self.alpha), 1.0)
        self.c0, self.p1, self.h = c0, p1, h
        self.w_err = lam * math.log(p1 / c0)
        self.w_ok = lam * math.log((1.0 - p1) / (1.0 - c0))

    def set_kappa(self, kappa: float) -> None:
        """The stream's learnt κ changed: the new floor, taken now or, with an excursion under
        way, when it ends (as this CUSUM's own looks: the stream's batch means see the labels
        of a change in progress too, and a shift inflates their variance, so taking it at once
        would tune the CUSUM away from the change it is adding up)."""
        if not kappa >= 1.0:
            raise ValueError("kappa must be >= 1")
        self.floor_pending = float(kappa)
        if self.s <= 0.0:
            self._take_floor()
            self._fit()

    def _take_floor(self) -> None:
        """The floor :meth:`set_kappa` last gave, if any."""
        floor = self.floor_pending
        if floor is not None:
            self.floor_pending = None
            self.kappa_floor = floor
            self.kappa = max(self.kappa, floor)

    def _look(self) -> None:
        """κ from the block means seen since the start: the stream's learnt κ or, if larger,
        the inflation the longer blocks completed since show (the null learning's own rule,
        :func:`service.drift.long_run_variance.inflation_at`, at this CUSUM's block), once
        they span ``checked_labels``: before, their longest counting blocks are no longer than
        those the stream's κ was learnt on, from fewer of them, and their upper bound (at 48
        blocks, 1.34 times the estimate) would only add noise to a κ already checked there."""
        self.look_pending = False
        if self.bm.steps * self.block < self.checked_labels:
            return
        seen = float(inflation_at(self.bm, np.array([1]), min_blocks=self.min_blocks)[0])
        kappa = max(self.kappa_floor, seen)
        if kappa != self.kappa:
            self.kappa = kappa
            self._fit()

    def update(self, m: float) -> float:
        """One block mean ``m`` of ``block`` labels; ``S / h`` (≥ 1) when the CUSUM alarms,
        else 0."""
        b = float(self.block)
        bm = self.bm
        bm.add(np.array([m]))
        if new_level_complete(bm.steps, self.min_blocks):
            self.look_pending = True  # taken when no excursion is under way
        if not self.running:
            self.ref_n += b
            self.ref_sum += m * b
            if self.running:
                self._fit()
                self._set_base()
            if self.look_pending:
                self._look()
            return 0.0
        s = self.s + b * (m * self.w_err + (1.0 - m) * self.w_ok)
        self.exc_n += b
        self.exc_sum += m * b
        if s <= 0.0:
            self.s = 0.0
            if self._elevated():
                self.dropped_n += self.exc_n  # a change too small to add up: kept out
            else:
                self.ref_n += self.exc_n
                self.ref_sum += self.exc_sum
            self.exc_n = self.exc_sum = 0.0
            self._take_floor()
            if self.look_pending:
                self._look()
            self._fit()
            return 0.0
        self.s = s
        if s < self.h:
            return 0.0
        score = s / self.h
        self.restart()
        return score

    def _elevated(self) -> bool:
        """Whether the excursion just ended shows an error rate above the reference's: its own
        labels against the reference, or everything the reference took in since it started
        running plus the excursion against what it held then (a small rise can end several
        excursions in turn, each short of the test alone); one-sided two-sample z ≥
        :data:`HOLD_Z` with ``κ φ`` inflated variance. An excursion that returns to 0 has a
        mean below the point where the statistic's drift changes sign (about
        ``p̂ + margin + d / 2``), so alone it passes only if about 0.4 times as long as the
        reference; under no change that is about as rare as coming close to the threshold."""
        n_e = self.exc_n
        if n_e <= 0.0:
            return False
        var_k = self.kappa * self.dispersion
        p = self.reference_rate
        se = math.sqrt(var_k * p * (1.0 - p) * (1.0 / n_e + 1.0 / self.ref_n))
        if self.exc_sum / n_e - p >= HOLD_Z * se:
            return True
        n0, sum0 = self.base_n, self.base_sum
        n_a = self.ref_n - n0 + n_e
        if n0 <= 0.0 or n_a <= n_e:
            return False
        p0 = (sum0 + 0.5) / (n0 + 1.0)
        se = math.sqrt(var_k * p0 * (1.0 - p0) * (1.0 / n_a + 1.0 / n0))
        return (self.ref_sum - sum0 + self.exc_sum) / n_a - p0 >= HOLD_Z * se

    def _set_base(self) -> None:
        """The reference as it starts running: what :meth:`_elevated` compares the labels
        taken in since with (none while it is being rebuilt)."""
        if self.running:
            self.base_n, self.base_sum = self.ref_n, self.ref_sum
        else:
            self.base_n = self.base_sum = 0.0

    def restart(self) -> None:
        """After an alarm on the error stream: the current excursion becomes the reference."""
        self.ref_n, self.ref_sum = self.exc_n, self.exc_sum
        self.exc_n = self.exc_sum = 0.0
        self.s = 0.0
        self.bm = DyadicBatchMeans(1)  # the dependence is learnt again from here
        self.look_pending = False
        self._take_floor()
        self.kappa = self.kappa_floor
        self._fit()
        self._set_base()
