"""Detector thresholds of layer A from an explicit false-alarm budget, by simulation.

Every threshold of :class:`~service.drift.device_monitor.DeviceMonitor` comes from one number,
``budget_per_device_reading`` (default ``1e-7``): the expected number of *false* drift alarms the
fleet may raise per device-reading on stationary data. Nothing uses a library default.

Budget split (Bonferroni)
-------------------------
A device with ``F`` features and ``C`` classes has ``S = 2 + C + 2F`` signal streams (22 for
F = 8, C = 4) plus two alarm detectors on the labelled error stream (ADWIN and the CUSUM of
:mod:`service.drift.error_cusum`; HDDM_A's drift share went to the CUSUM, see below), so
``D = S + 2`` detectors share the budget ``B`` evenly:

- a signal stream gets one ADWIN update per telemetry frame; a frame of ``k`` readings may spend
  ``B · k / D`` false alarms (per-frame budget), so that ``D`` streams together spend at most
  ``B`` per reading;
- an error detector gets one update per labelled reading. It may spend ``B / D`` per update, as if
  every reading were labelled; with fewer labels it spends less (conservative);
- HDDM_A's *warning* zone (``hddm_a_warning``, a prompt to start buffering data, not an alarm) has
  its own budget ``warning_budget_per_device_reading`` (default ``1e-5``), not split.

Bonferroni ignores the correlation between the streams (``c`` and ``c²``, ``z`` and ``z²``, the
class indicators sum to one), so the fleet-level rate comes out *below* ``B``.

Frame-level ADWIN: what it is fed
---------------------------------
For each frame of ``k`` readings and each stream the monitor forms the standardised frame mean
``x = (m − m_ref) · √k / s_ref`` (``m``: the frame's mean of the signal, ``m_ref``/``s_ref``: the
reference mean and per-reading standard deviation). Then ``u = WH(x, γ/√k)`` corrects the skew
(Wilson–Hilferty, :func:`service.drift.signals.skew_normalise`; ``γ`` is the stream's per-reading
skewness in the reference; only the long side is mapped). ADWIN (river
``ADWIN(delta=δ, clock=1)``) gets ``clip(u, ±6) · 4``, with ``min_window_length = 2`` frames,
``grace_period = 10`` frames and ``max_buckets = 5`` (:data:`FRAME_ADWIN`). Under no drift
``u`` is ≈ N(0, 1) whatever the signal's units and shape, so one δ-versus-false-alarm curve
serves every stream. Why each step,
measured on bootstrap-resampled simulator streams (22 streams, 4 devices, frames of 16, false
alarms per stream-frame against the Gaussian model at the same δ):

- *standardising*: ADWIN's cut threshold ``√(2 m σ²_W δ') + ⅔ δ' m`` is not scale-free; its
  range term assumes values in ``[0, 1]``. Unstandardised, a low-variance stream (the
  confidence) gets a far more conservative test than a ``z`` stream.
- *clipping z at ±4* (signals.py): without it, ``z²`` of heavy-tailed features (``mag_mean``,
  ``std_x``) raised up to 30× the Gaussian rate at δ = 0.01.
- *skew correction*: with river's defaults (no scale, ``min_window_length=5``) the skewed streams
  still raised 1.7–2.6× the Gaussian rate at δ = 0.001. With the faster settings below they
  raised 2.2–4.9× (``z²`` and rare classes), and 0.9–1.06× after a two-sided WH. But a two-sided
  WH stretches frame means below the gamma's lower bound (``z²`` frames of mostly still
  windows) into huge negative values: 10⁻³–10⁻² of such frames fell beyond 4.5σ on some devices,
  and 10⁸ device-readings raised 19 alarms instead of ≤ 9.6. Correcting only the long side
  brought those tails to ≤ 3.5·10⁻⁵ (14 alarms); the rest is covered by
  :data:`FRAME_MODEL_MARGIN`.
- *scale 4, min window 2 frames, clip ±6*: at the same false-alarm budget, the median delays
  on the simulator's offset, noise and prior drifts were about half those with river's defaults
  (e.g. prior 112 vs 208 readings; 16 devices each). The scale makes the range term small against
  the variance term. ``min_window_length = 1`` was a further frame faster but raised 1.3× the
  Gaussian rate on one heavy-tailed stream, so it was not taken.

Frame-level ADWIN: δ by simulation
----------------------------------
The model is ``u ~ N(0, 1)`` i.i.d., through the same clip and scale. For each δ on a grid
(``0.1 … 0.0001``) a stationary stream of ``2·10⁶–1.2·10⁸`` updates runs through the ADWIN above
(which resets after each alarm, as in service), and the alarms per update are counted. A weighted
least-squares fit on log scale ``FA(δ) ≈ a · δ^b`` (weights = alarm counts, the inverse Poisson
variance of ``log FA``) gives ``b ≈ 1.18``, and the fit is inverted for the per-frame budget.
Budgets below the smallest measured rate are reached by extrapolating from the fit at the
smallest simulated δ with the slope ``min(b, 1)``. This is conservative: ADWIN's false-alarm
probability per cut point is about ``exp(−δ') / √δ'`` with ``δ' = ln(2 ln W / δ)``, so the
local slope ``d ln FA / d ln δ = 1 + 1 / (2δ') + …`` stays above 1. The measured slopes fall
from 1.4 to 1.1 as δ falls, so a unit slope gives a δ at or below the one the budget allows. The
cost is small, because ADWIN's delay grows only with ``ln(1/δ)``.

The δ is set for the per-frame budget divided by :data:`FRAME_MODEL_MARGIN` (3): real streams,
even after the corrections above, run at about 1.5× the Gaussian model's rate. For F = 8, C = 4
and frames of 16 readings the per-frame budget is ``1e-7 · 16 / 24 ≈ 6.7e-8``, the model rate
``2.2e-8`` and δ ≈ 1.1e-5 (the smallest simulated point, δ = 1e-4, measured 2.3e-7). Frames of
1 reading get δ ≈ 6.8e-7, frames of 64 δ ≈ 4.3e-5. ``python -m service.drift.calibration``
prints the current values. ``tests/bench/bench_detection.py`` checks the rate on 10⁸ real
simulator readings.

Sensitive tier
--------------
Layer A's sensitive tier (suspicions for the cohort rule, not device alarms) is calibrated the
same way from its own budget (default :data:`DEFAULT_SENSITIVE_BUDGET` = 1e-4 per
device-reading, about river ``ADWIN()``'s measured rate), split over ``S + 1`` detectors (no
HDDM_A: ``tier="sensitive"``), with its own curve: :data:`SENSITIVE_FRAME_ADWIN` (a 1-frame
minimum window, values on a 2⁻⁸ grid) simulated on the same model over δ = 0.1 … 0.001, which
covers frames of 4 readings and more at the default budget (δ ≈ 3.7e-3 for frames of 16).
``Thresholds.null_rate_per_reading`` is what a tier may raise per device-reading under no
drift as calibrated (the curves at the δ in use, with :data:`FRAME_MODEL_MARGIN` on the frame
streams, as if every reading were labelled): the cohort rule's per-device null model. The
fleet budget ``B`` is split between the strict tier's device alarms (:data:`DEFAULT_STRICT_SHARE`
= ½) and the cohort rule on suspicions (the rest).

Error stream (labels)
---------------------
``ADWIN`` on the 0/1 error stream is calibrated the same way on Bernoulli(0.5) streams. 0.5 is
the worst case: at δ = 0.1, Bernoulli(p) raises 5.5e-6 (p = 0.02), 2.1e-5 (0.1), 3.2e-5 (0.3) and
3.9e-5 (0.5) false alarms per update. So the δ holds for every reference error rate, and the
stream is not standardised, since 0/1 data is exactly what the range term assumes. ``HDDM_A``
(river ``binary.HDDMA``, one-sided: error increases) is set from its own Hoeffding bound, not by
a fitted curve: for a fixed cut point the drift test fires with probability at most
``confidence / 2``, so ``drift_confidence = 2 · B / D`` and
``warning_confidence = 2 · warning budget``. Simulation (stored in the table as a check) shows
the realised rate is 10²–10³× below ``confidence / 2``. Its false alarms are also bursty (after
one, a reset at small ``n`` often fires again within tens of updates), so a fitted curve would be
unreliable, and the bound is the honest choice. HDDM_A is therefore slower than ADWIN on errors:
on simulated Bernoulli streams it was never first (rises of 3–36 points from 3.6 % and 11 %),
so its drift test is no longer an alarm and its share of the budget (``drift_confidence / 2``
per label, the same ``B / D``) is spent by the one-sided CUSUM on the error stream
(:mod:`service.drift.error_cusum`, whose threshold comes from that share, not from this
table). HDDM_A is kept for its warning zone.

``drifting`` status band
------------------------
``DeviceMonitor.drifting`` compares each stream's current ADWIN-window mean with the fixed
reference. Under no drift the difference, standardised by
``√(1/w + k/n_ref)`` (window of ``w`` frames, reference of ``n_ref`` readings), is ≈ N(0, 1), so
the band is the two-sided normal quantile at ``drifting_alpha / (S + 1)`` (Bonferroni over the
streams and the error stream): :func:`drifting_band`.

The table
---------
The simulations take about a minute on two cores, so their results are shipped as
``service/drift/calibration_table.json``, written by::

    python -m service.drift.calibration --write       # simulate and write the table
    python -m service.drift.calibration               # show the table and derived thresholds

and the service only evaluates the fitted curves at start-up (:func:`load_table`).
``--quick`` runs a 20× shorter simulation and prints the result without writing it.

>>> t = thresholds(n_streams=22, frame_readings=16)
>>> t.n_detectors, t.frame_budget
(24, 6.666666666666667e-08)
>>> all(1e-6 < d < 1e-3 for d in (t.frame_delta, t.error_delta))
True
>>> round(drifting_band(1e-3, 23), 2)
4.09
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Final, Literal

import numpy as np

TABLE_PATH: Final = Path(__file__).with_name("calibration_table.json")
"""The shipped calibration table."""

TABLE_FORMAT: Final = 2
"""Version of the table's JSON layout (2: with the sensitive tier's curve)."""

DEFAULT_BUDGET: Final = 1e-7
"""Fleet-level false alarms per device-reading (the issue's target)."""

DEFAULT_STRICT_SHARE: Final = 0.5
"""Share of the fleet budget spent by the strict tier's device alarms.

The rest, ``(1 − share) · B``, is spent by the cohort rule on the sensitive tier's suspicions
(:mod:`service.drift.suspicion_cohort`), so strict alarms plus cohort alarms stay within ``B``.
"""

DEFAULT_SENSITIVE_BUDGET: Final = 1e-4
"""Suspicions per device-reading of the sensitive tier (not alarms; they feed the cohort rule).

About river ``ADWIN()``'s measured device-level false-alarm rate at its defaults on the same
streams (106 per 10⁶ device-readings, ``tests/bench/bench_detection.py``): the sensitive tier
spends what ``ADWIN()`` spends, and its δ comes from the same calibration curves."""

DEFAULT_WARNING_BUDGET: Final = 1e-5
"""HDDM_A warning-zone entries per device-reading on stationary data."""

DEFAULT_DRIFTING_ALPHA: Final = 1e-3
"""Probability that a stationary device shows any stream in ``drifting`` at a given moment."""

FRAME_MODEL_MARGIN: Final = 3.0
"""The frame-level δ is set for ``budget / 3``: real streams exceed the Gaussian model's rate.

With the skew correction, 10⁸ bootstrap-resampled simulator device-readings (50 devices, frames
of 16) raised 14 alarms where a δ set for the full budget expects at most 9.6 (measured rates
≈ 1.5× the model's; 19 alarms, 2×, with the two-sided skew correction). The excess comes
mostly from a few heavy-tailed ``z²`` streams and from estimating each device's reference from
512 readings. A margin of 3 covers it; it costs ``ln 3`` in ADWIN's ``δ' ≈ 13``, under 10 % of
delay. ``tests/bench/bench_detection.py`` re-measures the rate."""

ERROR_DETECTORS: Final = 2
"""Alarm detectors on the error stream that share the budget: ADWIN and the CUSUM (HDDM_A's
``drift_confidence`` is the CUSUM's share: ``label_budget`` each)."""

SENSITIVE_ERROR_DETECTORS: Final = 1
"""The sensitive tier has one detector on the error stream: ADWIN (no HDDM_A)."""

Tier = Literal["strict", "sensitive"]
"""Layer A's two tiers: strict (device alarms) and sensitive (suspicions for the cohort rule)."""


@dataclass(frozen=True, slots=True)
class AdwinSettings:
    """How an ADWIN stream is fed and configured (besides δ; always ``clock=1``).

    Values are ``clip(u, ±u_clip) · u_scale`` for standardised ``u`` (``u_clip = inf``: no clip),
    rounded to multiples of ``u_grid`` when it is not 0.
    """

    min_window_length: int = 5
    grace_period: int = 10
    u_scale: float = 1.0
    u_clip: float = math.inf
    u_grid: float = 0.0
    """Grid of the values ADWIN gets (0: none). A power of two keeps ADWIN's bucket sums exact
    binary fractions, which compress (:mod:`service.drift.adwin_state`)."""

    def transform(self, u: Any) -> Any:
        """``clip(u, ±u_clip) · u_scale`` on the grid (numpy arrays or floats)."""
        if math.isfinite(self.u_clip):
            u = np.clip(u, -self.u_clip, self.u_clip)
        return self.quantise(u * self.u_scale if self.u_scale != 1.0 else u)

    def quantise(self, v: Any) -> Any:
        """``v`` (already clipped and scaled) rounded to the grid."""
        if self.u_grid > 0.0:
            return np.round(v / self.u_grid) * self.u_grid
        return v

    def to_json(self) -> dict[str, Any]:
        """JSON form (``u_clip`` as ``null`` when there is none)."""
        return {
            "clock": 1,
            "max_buckets": 5,
            "min_window_length": self.min_window_length,
            "grace_period": self.grace_period,
            "u_scale": self.u_scale,
            "u_clip": self.u_clip if math.isfinite(self.u_clip) else None,
            "u_grid": self.u_grid,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AdwinSettings:
        """Inverse of :meth:`to_json`."""
        clip = obj.get("u_clip")
        return cls(
            min_window_length=int(obj["min_window_length"]),
            grace_period=int(obj["grace_period"]),
            u_scale=float(obj.get("u_scale", 1.0)),
            u_clip=math.inf if clip is None else float(clip),
            u_grid=float(obj.get("u_grid", 0.0)),
        )


FRAME_ADWIN: AdwinSettings = AdwinSettings(
    min_window_length=2, grace_period=10, u_scale=4.0, u_clip=6.0
)
"""Settings of the frame-level ADWIN on standardised frame means (what the table simulates).

``u_scale = 4`` makes ADWIN's range term, which assumes values in ``[0, 1]``, small against the
variance term. ``min_window_length = 2`` frames (river: 5 values) and ``grace_period = 10``
frames. ``u_clip = 6``: a single extreme frame cannot dominate a sub-window mean. Chosen on
simulator streams (see the module docstring): at equal false-alarm budget the median delays were
about half those of river's defaults (u_scale 1, min_window_length 5), and the false-alarm rate
on real (Wilson–Hilferty-corrected) streams stayed within 1.1× of the Gaussian model.
"""

SENSITIVE_FRAME_ADWIN: AdwinSettings = AdwinSettings(
    min_window_length=1, grace_period=10, u_scale=4.0, u_clip=6.0, u_grid=2.0**-8
)
"""Settings of the sensitive tier's frame-level ADWIN: :data:`FRAME_ADWIN` with a 1-frame
minimum window, so a sub-window of ``n`` frames counts as ``n`` (river's ``m`` uses
``n − min_window_length + 1``) and a large change can fire after one frame. At river
``ADWIN()``'s rate it cut the median delay on the simulator's noise and prior drifts from 48
and 64 readings to 32 (20 devices each). It raised 1.3× the Gaussian model's rate on one
heavy-tailed stream, which is why the strict tier does not use it; the sensitive tier's rate is
covered by :data:`FRAME_MODEL_MARGIN` and re-measured by ``tests/bench/bench_detection.py``.

Its values are the strict tier's rounded to multiples of 2⁻⁸ (1/1024 of a frame mean's
standard deviation, far below anything ADWIN can resolve; the curve is simulated with the same
rounding). Sums of up to 2¹⁷ such values are exact in float64, so the bank's checkpointed
state compresses by about a third: it keeps a device with both tiers under 40 KiB."""

ERROR_ADWIN: Final = AdwinSettings()
"""Settings of ADWIN on the 0/1 error stream: river's defaults, raw 0/1 values."""

# (delta, updates) of the full simulation; --quick divides the updates by 20
_FRAME_GRID: Final = ((0.1, 2_000_000), (0.03, 4_000_000), (0.01, 10_000_000),
                      (0.003, 20_000_000), (0.001, 40_000_000), (0.0003, 80_000_000),
                      (0.0001, 120_000_000))  # fmt: skip
_SENSITIVE_GRID: Final = ((0.1, 2_000_000), (0.03, 4_000_000), (0.01, 10_000_000),
                          (0.003, 20_000_000), (0.001, 40_000_000))  # fmt: skip
_ERROR_GRID: Final = ((0.3, 2_000_000), (0.1, 6_000_000), (0.03, 20_000_000),
                      (0.01, 50_000_000))  # fmt: skip
_ERROR_P: Final = 0.5
_HDDM_GRID: Final = ((0.01, 4_000_000), (0.001, 4_000_000))
_CHUNK: Final = 10_000_000
"""Updates per simulation task (tasks run in parallel, each with its own seed)."""


# ------------------------------------------------------------------------------------------------
# Rate curves
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One simulated setting: ``alarms`` false alarms in ``updates`` stationary updates."""

    param: float
    updates: int
    alarms: int

    @property
    def rate(self) -> float:
        """False alarms per update."""
        return self.alarms / self.updates if self.updates else math.nan


@dataclass(frozen=True, slots=True)
class RateCurve:
    """Fitted ``FA(param) ≈ a · param^b`` with a conservative inverse (see module docstring)."""

    points: tuple[RatePoint, ...]
    a: float
    b: float

    @classmethod
    def fit(cls, points: Sequence[RatePoint]) -> RateCurve:
        """Weighted least squares of ``log rate`` on ``log param`` (weights: alarm counts).

        >>> c = RateCurve.fit([RatePoint(0.1, 10_000, 100), RatePoint(0.01, 100_000, 100)])
        >>> round(c.b, 6), round(c.rate(0.1), 6)
        (1.0, 0.01)
        """
        used = [p for p in points if p.alarms > 0 and p.updates > 0 and p.param > 0]
        if len(used) < 2:
            raise ValueError("need at least two simulated points with alarms to fit a curve")
        x = np.log([p.param for p in used])
        y = np.log([p.rate for p in used])
        w = np.array([float(p.alarms) for p in used])
        xm = float(np.average(x, weights=w))
        ym = float(np.average(y, weights=w))
        sxx = float(np.sum(w * (x - xm) ** 2))
        if sxx <= 0.0:
            raise ValueError("need points at two different parameter values")
        b = float(np.sum(w * (x - xm) * (y - ym))) / sxx
        if b <= 0.0:
            raise ValueError(f"false alarms must grow with the parameter (fitted slope {b:.3g})")
        a = math.exp(ym - b * xm)
        return cls(points=tuple(points), a=a, b=b)

    def rate(self, param: float) -> float:
        """Fitted false alarms per update at ``param``."""
        return float(self.a * param**self.b)

    @property
    def min_param(self) -> float:
        """Smallest simulated parameter with alarms (where extrapolation starts)."""
        return min(p.param for p in self.points if p.alarms > 0)

    def param_for_rate(self, rate: float) -> float:
        """The parameter whose false-alarm rate is ``rate`` (conservative below the data).

        >>> c = RateCurve(points=(RatePoint(0.01, 10**6, 10),), a=1.0, b=2.0)
        >>> c.param_for_rate(1e-4)  # inside the data: the fit
        0.01
        >>> f"{c.param_for_rate(1e-6):.3g}"  # below: slope min(b, 1) from the smallest point
        '0.0001'
        """
        if not rate > 0.0:
            raise ValueError("the budget must be positive")
        p0 = self.min_param
        r0 = self.rate(p0)
        if rate >= r0:
            return float(min((rate / self.a) ** (1.0 / self.b), 0.5))
        return float(p0 * (rate / r0) ** (1.0 / min(self.b, 1.0)))

    def rate_bound(self, param: float) -> float:
        """The rate :meth:`param_for_rate` assumes at ``param``: its inverse (where not capped).

        The fit above the smallest simulated parameter, the conservative ``min(b, 1)`` slope
        below it, so ``rate_bound(param_for_rate(r)) == r``.

        >>> c = RateCurve(points=(RatePoint(0.01, 10**6, 10),), a=1.0, b=2.0)
        >>> f"{c.rate_bound(c.param_for_rate(1e-6)):.3g}", f"{c.rate_bound(0.02):.3g}"
        ('1e-06', '0.0004')
        """
        if not param > 0.0:
            raise ValueError("the parameter must be positive")
        p0 = self.min_param
        if param >= p0:
            return self.rate(param)
        return float(self.rate(p0) * (param / p0) ** min(self.b, 1.0))

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "fit": {"a": self.a, "b": self.b},
            "points": [
                {"param": p.param, "updates": p.updates, "alarms": p.alarms, "rate": p.rate}
                for p in self.points
            ],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RateCurve:
        """Inverse of :meth:`to_json`."""
        pts = tuple(
            RatePoint(float(p["param"]), int(p["updates"]), int(p["alarms"])) for p in obj["points"]
        )
        return cls(points=pts, a=float(obj["fit"]["a"]), b=float(obj["fit"]["b"]))


@dataclass(frozen=True, slots=True)
class CalibrationTable:
    """The shipped simulation results (``calibration_table.json``)."""

    adwin_frame: RateCurve
    """ADWIN(δ, clock=1) on i.i.d. N(0, 1) standardised frame means: alarms per frame."""
    adwin_frame_sensitive: RateCurve
    """The same for the sensitive tier's settings (``sensitive_settings``)."""
    adwin_error: RateCurve
    """ADWIN(δ, clock=1) on Bernoulli(0.5) 0/1 errors: alarms per labelled reading."""
    hddm_a_check: tuple[RatePoint, ...]
    """HDDM_A drift alarms on Bernoulli(0.5) at a few confidences (evidence for the bound)."""
    river_version: str
    generated: str
    frame_settings: AdwinSettings = AdwinSettings()
    """The frame-level ADWIN the ``adwin_frame`` curve was simulated for; monitors use these."""
    sensitive_settings: AdwinSettings = SENSITIVE_FRAME_ADWIN
    """The same for ``adwin_frame_sensitive`` (the sensitive tier)."""

    def __post_init__(self) -> None:
        a, b = self.frame_settings, self.sensitive_settings
        if (a.u_scale, a.u_clip, a.u_grid) != (b.u_scale, b.u_clip, 0.0):
            raise ValueError(
                "both tiers' frame ADWINs must be fed the same values (scale, clip; only the "
                "sensitive tier may round them to a grid)"
            )

    def frame_curve(self, tier: Tier) -> tuple[RateCurve, AdwinSettings]:
        """The frame-level curve and ADWIN settings of ``tier``."""
        if tier == "sensitive":
            return self.adwin_frame_sensitive, self.sensitive_settings
        return self.adwin_frame, self.frame_settings

    def to_json(self) -> dict[str, Any]:
        """JSON form (``format`` first)."""
        return {
            "format": TABLE_FORMAT,
            "generated_by": "python -m service.drift.calibration --write",
            "generated": self.generated,
            "river_version": self.river_version,
            "adwin_frame": {
                "model": "i.i.d. N(0,1) standardised frame means",
                "detector": self.frame_settings.to_json(),
                "param": "delta",
                **self.adwin_frame.to_json(),
            },
            "adwin_frame_sensitive": {
                "model": "i.i.d. N(0,1) standardised frame means (sensitive tier)",
                "detector": self.sensitive_settings.to_json(),
                "param": "delta",
                **self.adwin_frame_sensitive.to_json(),
            },
            "adwin_error": {
                "model": f"i.i.d. Bernoulli({_ERROR_P}) errors (worst case over p)",
                "detector": ERROR_ADWIN.to_json(),
                "param": "delta",
                **self.adwin_error.to_json(),
            },
            "hddm_a_check": {
                "model": f"i.i.d. Bernoulli({_ERROR_P}) errors, one-sided HDDMA",
                "param": "drift_confidence",
                "points": [
                    {"param": p.param, "updates": p.updates, "alarms": p.alarms, "rate": p.rate}
                    for p in self.hddm_a_check
                ],
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CalibrationTable:
        """Parse; refuses another ``format``."""
        if obj.get("format") != TABLE_FORMAT:
            raise ValueError(
                f"calibration table format {obj.get('format')!r}, expected {TABLE_FORMAT}: "
                "regenerate it with `python -m service.drift.calibration --write`"
            )
        return cls(
            adwin_frame=RateCurve.from_json(obj["adwin_frame"]),
            adwin_frame_sensitive=RateCurve.from_json(obj["adwin_frame_sensitive"]),
            adwin_error=RateCurve.from_json(obj["adwin_error"]),
            hddm_a_check=tuple(
                RatePoint(float(p["param"]), int(p["updates"]), int(p["alarms"]))
                for p in obj["hddm_a_check"]["points"]
            ),
            river_version=str(obj["river_version"]),
            generated=str(obj["generated"]),
            frame_settings=AdwinSettings.from_json(obj["adwin_frame"]["detector"]),
            sensitive_settings=AdwinSettings.from_json(obj["adwin_frame_sensitive"]["detector"]),
        )


@functools.cache
def load_table(path: Path | None = None) -> CalibrationTable:
    """The calibration table (the shipped one by default); cached."""
    p = TABLE_PATH if path is None else path
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{p} is missing: generate it with `python -m service.drift.calibration --write`"
        ) from None
    return CalibrationTable.from_json(obj)


# ------------------------------------------------------------------------------------------------
# Budget → thresholds
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Every threshold of one device's layer-A detectors, with the budget shares behind them."""

    n_streams: int
    n_detectors: int
    frame_readings: int
    frame_budget: float
    """False alarms allowed per stream per frame (``B · k / D``)."""
    frame_delta: float
    """ADWIN δ on standardised frame means (for ``frame_budget / FRAME_MODEL_MARGIN``)."""
    label_budget: float
    """False alarms allowed per error detector per labelled reading (``B / D``)."""
    error_delta: float
    """ADWIN δ on the 0/1 error stream."""
    hddm_drift_confidence: float
    hddm_warning_confidence: float
    drifting_z: float
    """Band of the ``drifting`` status, in standard errors."""
    null_rate_per_reading: float = math.nan
    """False alarms per device-reading the detectors may raise under no drift, as calibrated:
    ``S · FRAME_MODEL_MARGIN · FA(δ_frame) / k`` (the curve at the δ in use, with the margin
    real streams need) plus, as if every reading were labelled, ``FA_error(δ_error)`` and, with
    HDDM_A's bound ``drift_confidence / 2`` (the share the CUSUM on the error stream now spends,
    :mod:`service.drift.error_cusum`). Equal to the budget unless a δ was capped."""


def thresholds_state(thr: Thresholds) -> dict[str, Any]:
    """A :class:`Thresholds` as numbers (checkpoints)."""
    return {name: getattr(thr, name) for name in Thresholds.__dataclass_fields__}


def thresholds_from_state(state: Mapping[str, Any]) -> Thresholds:
    """Inverse of :func:`thresholds_state`; ``ValueError`` on other names or non-numbers."""
    names = set(Thresholds.__dataclass_fields__)
    if set(state) != names:
        raise ValueError(f"thresholds with fields {sorted(state)}")
    ints = {"n_streams", "n_detectors", "frame_readings"}
    values: dict[str, Any] = {}
    for name in names:
        v = state[name]
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"threshold {name} is not a number")
        values[name] = int(v) if name in ints else float(v)
    return Thresholds(**values)


def drifting_band(alpha: float, n_streams: int) -> float:
    """Two-sided normal quantile at ``alpha / n_streams`` (Bonferroni).

    >>> round(drifting_band(0.05, 1), 3)
    1.96
    """
    if not 0.0 < alpha < 1.0 or n_streams < 1:
        raise ValueError("need 0 < alpha < 1 and n_streams >= 1")
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * n_streams))


def thresholds(
    n_streams: int,
    frame_readings: int,
    budget_per_device_reading: float = DEFAULT_BUDGET,
    warning_budget_per_device_reading: float = DEFAULT_WARNING_BUDGET,
    drifting_alpha: float = DEFAULT_DRIFTING_ALPHA,
    table: CalibrationTable | None = None,
    tier: Tier = "strict",
) -> Thresholds:
    """Thresholds for a device with ``n_streams`` signal streams and frames of ``frame_readings``.

    ``tier``: ``"strict"`` (ADWIN and the CUSUM on the error stream, :data:`FRAME_ADWIN`) or
    ``"sensitive"`` (ADWIN alone on the error stream, :data:`SENSITIVE_FRAME_ADWIN` and its
    curve). See the module docstring for the split of the budget and the inversion of the
    curves.
    """
    if n_streams < 1 or frame_readings < 1:
        raise ValueError("need n_streams >= 1 and frame_readings >= 1")
    if not (budget_per_device_reading > 0.0 and warning_budget_per_device_reading > 0.0):
        raise ValueError("budgets must be positive")
    if tier not in ("strict", "sensitive"):
        raise ValueError(f"unknown tier {tier!r}")
    error_detectors = SENSITIVE_ERROR_DETECTORS if tier == "sensitive" else ERROR_DETECTORS
    tab = load_table() if table is None else table
    frame_curve, _ = tab.frame_curve(tier)
    d = n_streams + error_detectors
    frame_budget = budget_per_device_reading * frame_readings / d
    label_budget = budget_per_device_reading / d
    drift_conf = min(2.0 * label_budget, 0.5)
    warn_conf = min(max(2.0 * warning_budget_per_device_reading, drift_conf), 0.5)
    frame_delta = frame_curve.param_for_rate(frame_budget / FRAME_MODEL_MARGIN)
    error_delta = tab.adwin_error.param_for_rate(label_budget)
    null_rate = (
        n_streams * FRAME_MODEL_MARGIN * frame_curve.rate_bound(frame_delta) / frame_readings
        + tab.adwin_error.rate_bound(error_delta)
        + (drift_conf / 2.0 if error_detectors == ERROR_DETECTORS else 0.0)
    )
    return Thresholds(
        n_streams=n_streams,
        n_detectors=d,
        frame_readings=frame_readings,
        frame_budget=frame_budget,
        frame_delta=frame_delta,
        label_budget=label_budget,
        error_delta=error_delta,
        hddm_drift_confidence=drift_conf,
        hddm_warning_confidence=warn_conf,
        drifting_z=drifting_band(drifting_alpha, n_streams + 1),
        null_rate_per_reading=null_rate,
    )


# ------------------------------------------------------------------------------------------------
# Simulation
# ------------------------------------------------------------------------------------------------


def make_adwin(delta: float, settings: AdwinSettings) -> Any:
    """river ``ADWIN(delta, clock=1)`` with ``settings``' window parameters."""
    from river import drift as river_drift

    drift: Any = river_drift
    return drift.ADWIN(
        delta=delta,
        clock=1,
        min_window_length=settings.min_window_length,
        grace_period=settings.grace_period,
    )


def simulate_adwin(
    delta: float,
    updates: int,
    seed: int,
    bernoulli_p: float | None = None,
    settings: AdwinSettings | None = None,
) -> RatePoint:
    """False alarms of ``ADWIN(delta, clock=1)`` on ``updates`` stationary values.

    ``settings.transform`` of N(0, 1) values (default :data:`FRAME_ADWIN`), or raw 0/1 values
    with ``P(1) = bernoulli_p`` (:data:`ERROR_ADWIN`). ADWIN resets itself after an alarm.
    """
    st = settings or (FRAME_ADWIN if bernoulli_p is None else ERROR_ADWIN)
    rng = np.random.default_rng(seed)
    det = make_adwin(delta, st)
    update = det.update
    alarms = 0
    done = 0
    while done < updates:
        n = min(1_000_000, updates - done)
        if bernoulli_p is None:
            values = st.transform(rng.standard_normal(n)).tolist()
        else:
            values = (rng.random(n) < bernoulli_p).astype(np.float64).tolist()
        for v in values:
            update(v)
            if det.drift_detected:
                alarms += 1
        done += n
    return RatePoint(delta, updates, alarms)


def simulate_hddm_a(confidence: float, updates: int, seed: int, p: float = _ERROR_P) -> RatePoint:
    """Drift alarms of one-sided ``HDDMA(drift_confidence=confidence)`` on Bernoulli(p) errors."""
    from river import drift as river_drift

    drift: Any = river_drift
    rng = np.random.default_rng(seed)
    det = drift.binary.HDDMA(drift_confidence=confidence, warning_confidence=confidence)
    update = det.update
    alarms = 0
    done = 0
    while done < updates:
        n = min(1_000_000, updates - done)
        for v in (rng.random(n) < p).astype(np.int64).tolist():
            update(v)
            if det.drift_detected:
                alarms += 1
        done += n
    return RatePoint(confidence, updates, alarms)


def _task(args: tuple[str, float, int, int, AdwinSettings]) -> tuple[str, RatePoint]:
    kind, param, updates, seed, settings = args
    if kind in ("frame", "sensitive"):
        return kind, simulate_adwin(param, updates, seed, settings=settings)
    if kind == "error":
        return kind, simulate_adwin(param, updates, seed, bernoulli_p=_ERROR_P)
    return kind, simulate_hddm_a(param, updates, seed)


def _tasks(
    scale: float, settings: AdwinSettings, sensitive: AdwinSettings
) -> list[tuple[str, float, int, int, AdwinSettings]]:
    grids: list[tuple[str, tuple[tuple[float, int], ...]]] = [
        ("frame", _FRAME_GRID),
        ("error", _ERROR_GRID),
        ("hddm", _HDDM_GRID),
        ("sensitive", _SENSITIVE_GRID),  # last: the others keep their seeds
    ]
    out: list[tuple[str, float, int, int, AdwinSettings]] = []
    for g, (kind, grid) in enumerate(grids):
        for i, (param, updates) in enumerate(grid):
            total = max(int(updates * scale), 10_000)
            chunks = max(1, math.ceil(total / _CHUNK))
            for c in range(chunks):
                seed = int(np.random.SeedSequence([20240601, g, i, c]).generate_state(1)[0])
                st = sensitive if kind == "sensitive" else settings
                out.append((kind, param, total // chunks, seed, st))
    out.sort(key=lambda t: -t[2])  # longest first: better load balance
    return out


def build_table(
    scale: float = 1.0,
    workers: int = 2,
    settings: AdwinSettings | None = None,
    sensitive_settings: AdwinSettings | None = None,
) -> CalibrationTable:
    """Run every simulation (``scale`` multiplies the number of updates) and fit the curves.

    ``settings``: the frame-level ADWIN to calibrate (default :data:`FRAME_ADWIN`);
    ``sensitive_settings``: the sensitive tier's (default :data:`SENSITIVE_FRAME_ADWIN`).
    """
    from importlib.metadata import version

    st = FRAME_ADWIN if settings is None else settings
    sens = SENSITIVE_FRAME_ADWIN if sensitive_settings is None else sensitive_settings
    merged: dict[tuple[str, float], list[int]] = {}
    tasks = _tasks(scale, st, sens)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_task, tasks))
    else:
        results = [_task(t) for t in tasks]
    for kind, pt in results:
        acc = merged.setdefault((kind, pt.param), [0, 0])
        acc[0] += pt.updates
        acc[1] += pt.alarms

    def points(kind: str) -> list[RatePoint]:
        return sorted(
            (RatePoint(p, u, a) for (k, p), (u, a) in merged.items() if k == kind),
            key=lambda r: -r.param,
        )

    return CalibrationTable(
        adwin_frame=RateCurve.fit(points("frame")),
        adwin_frame_sensitive=RateCurve.fit(points("sensitive")),
        adwin_error=RateCurve.fit(points("error")),
        hddm_a_check=tuple(points("hddm")),
        river_version=version("river"),
        generated=time.strftime("%Y-%m-%d", time.gmtime()),
        frame_settings=st,
        sensitive_settings=sens,
    )


def describe(table: CalibrationTable) -> str:
    """Human-readable table and the thresholds for a few typical devices."""
    lines = [f"calibration table (river {table.river_version}, generated {table.generated})"]
    for name, curve in (
        ("adwin_frame", table.adwin_frame),
        ("adwin_frame_sensitive", table.adwin_frame_sensitive),
        ("adwin_error", table.adwin_error),
    ):
        lines.append(f"{name}: FA/update ≈ {curve.a:.4g} · δ^{curve.b:.3f}")
        for p in curve.points:
            lines.append(
                f"  δ={p.param:<7g} {p.alarms:>5} alarms / {p.updates:>11,} updates "
                f"= {p.rate:.3g}  (fit {curve.rate(p.param):.3g})"
            )
    lines.append("hddm_a_check (drift alarms on Bernoulli(0.5); bound: confidence/2 per check):")
    for p in table.hddm_a_check:
        lines.append(
            f"  conf={p.param:<7g} {p.alarms:>5} alarms / {p.updates:>11,} updates "
            f"= {p.rate:.3g}  (bound {p.param / 2:.3g})"
        )
    strict_b = DEFAULT_BUDGET * DEFAULT_STRICT_SHARE
    lines.append(f"strict tier at budget {strict_b:g} per device-reading (the fleet's 1e-7 × "
                 f"{DEFAULT_STRICT_SHARE:g}):")  # fmt: skip
    for f, c, k in ((8, 4, 1), (8, 4, 16), (8, 4, 64), (16, 10, 16)):
        s = 2 + c + 2 * f
        t = thresholds(s, k, budget_per_device_reading=strict_b, table=table)
        lines.append(
            f"  F={f:<2} C={c:<2} S={s:<2} k={k:<3} frame budget {t.frame_budget:.3g} (÷3) → "
            f"δ_frame={t.frame_delta:.3g}; label budget {t.label_budget:.3g} → "
            f"δ_error={t.error_delta:.3g}, HDDM_A drift {t.hddm_drift_confidence:.3g} "
            f"warning {t.hddm_warning_confidence:.3g}; drifting band {t.drifting_z:.2f}σ"
        )
    lines.append(f"sensitive tier at {DEFAULT_SENSITIVE_BUDGET:g} suspicions per device-reading:")
    for f, c, k in ((8, 4, 1), (8, 4, 16), (8, 4, 64), (16, 10, 16)):
        s = 2 + c + 2 * f
        t = thresholds(
            s, k, budget_per_device_reading=DEFAULT_SENSITIVE_BUDGET, table=table, tier="sensitive"
        )
        lines.append(
            f"  F={f:<2} C={c:<2} S={s:<2} k={k:<3} frame budget {t.frame_budget:.3g} (÷3) → "
            f"δ_frame={t.frame_delta:.3g}; label budget {t.label_budget:.3g} → "
            f"δ_error={t.error_delta:.3g}; null rate {t.null_rate_per_reading:.3g}/reading"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.drift.calibration [--write | --quick] [--workers N]``."""
    ap = argparse.ArgumentParser(prog="python -m service.drift.calibration", description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"simulate and write {TABLE_PATH.name}")
    ap.add_argument("--quick", action="store_true", help="20x shorter simulation, print only")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=TABLE_PATH, help="where --write writes")
    args = ap.parse_args(argv)
    if args.write and args.quick:
        ap.error("--quick results are too noisy to ship; use --write alone")
    if args.write or args.quick:
        t0 = time.perf_counter()
        table = build_table(scale=0.05 if args.quick else 1.0, workers=args.workers)
        print(f"simulated in {time.perf_counter() - t0:.1f} s")
        if args.write:
            args.out.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
            print(f"wrote {args.out}")
    else:
        table = load_table()
    print(describe(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
