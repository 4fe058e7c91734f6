"""A drift detection: what layer A (per device) and layer B (per cohort) report.

>>> d = Detection(fleet="f", device="d1", scope="device", signal="feature", feature="mean_x",
...               detector="adwin", score=1.0, model_version=1, ts_ms=0, readings=700)
>>> d.signal in SIGNALS
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

Signal = Literal[
    "confidence",
    "confidence_sq",
    "class_mix",
    "feature",
    "feature_var",
    "error",
    "multivariate",
    "accuracy_estimate",
]
"""The monitored signals: a bounded set, usable as a Prometheus label."""

SIGNALS: Final[frozenset[str]] = frozenset(get_args(Signal))

DetectorName = Literal[
    "adwin",
    "adwin_sensitive",
    "hddm_a",
    "hddm_a_warning",
    "cusum",
    "chi2",
    "pca",
    "cohort_binomial",
    "cohort_suspicions",
    "reference",
]
"""Which detector fired: also a bounded Prometheus label.

``adwin_sensitive`` is layer A's sensitive tier: a *suspicion*, not a device alarm (counted and
fed to the cohort rule, never stored one by one); ``cohort_suspicions`` is the cohort alarm
on too many suspicious devices (:mod:`service.drift.suspicion_cohort`)."""

SUSPICION_DETECTORS: Final[frozenset[str]] = frozenset({"adwin_sensitive"})
"""Detectors whose detections are suspicions, not alarms."""

DETECTORS: Final[frozenset[str]] = frozenset(get_args(DetectorName))

Scope = Literal["device", "cohort"]


@dataclass(frozen=True, slots=True)
class Detection:
    """One detection. ``device`` is ``None`` for a cohort-level detection.

    ``feature`` names the feature (``feature``/``feature_var``) or the class (``class_mix``), else
    ``None``. ``score`` is the statistic divided by its threshold (≥ 1 is over the line).
    ``readings`` counts the readings the device (or cohort) had sent for this model version when
    the detection fired, so delays can be measured in readings.
    """

    fleet: str
    device: str | None
    scope: Scope
    signal: Signal
    feature: str | None
    detector: DetectorName
    score: float
    model_version: int
    ts_ms: int
    readings: int

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown signal {self.signal!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}")
        if (self.scope == "device") != (self.device is not None):
            raise ValueError("a device detection names its device; a cohort one does not")
