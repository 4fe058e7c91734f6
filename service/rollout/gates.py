"""The per-group gates (delivery, health, quality) and the figures they decide on.

Every gate returns a :class:`Verdict`; :class:`GateFigures` gathers the inputs and verdicts of
one evaluation and is stored with every rollout/group transition (audit and ``rollout_events``).
The quality gate compares figures the caller measured (canary on new parameters vs control on
old ones, same window); this module does no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from service.rollout.plan import DeliveryPolicy, HealthPolicy, QualityPolicy


class Verdict(StrEnum):
    """Outcome of one gate (or of all of them)."""

    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"
    """Not enough evidence yet, before the deadline."""
    INCONCLUSIVE = "inconclusive"
    """Not enough evidence at the deadline: pause for the operator."""
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class DeliveryFigures:
    """Device results of a group (success counted separately, only at CONFIRMED)."""

    size: int
    trial_reached: int
    confirmed: int
    errors: int
    pending: int
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def with_result(self) -> int:
        """Devices with a result: reached trial, or failed."""
        return self.trial_reached + self.errors


@dataclass(frozen=True)
class HealthFigures:
    """Reverts a device decided on its own (known-answer tests, fault resets)."""

    kat_reverts: int = 0
    fault_resets: int = 0


@dataclass(frozen=True)
class ArmFigures:
    """Measured figures of one arm (canary or control) over the comparison window.

    ``confidence_sd`` is the standard deviation of the *per-device* mean confidences (devices are
    the unit of resampling, because readings within a device are correlated).
    """

    devices: int
    readings: int
    mean_confidence: float
    confidence_sd: float = 0.0
    labelled: int = 0
    errors: int = 0
    error_sd: float = 0.0
    """Standard deviation of the per-device error rates (devices with labels)."""
    labelled_devices: int = 0
    """Devices with labels in the window."""

    @property
    def error_rate(self) -> float | None:
        """Labelled error rate, or ``None`` without labels."""
        return self.errors / self.labelled if self.labelled else None


@dataclass(frozen=True)
class QualityFigures:
    """Canary vs control over the same window, as supplied by the caller."""

    canary: ArmFigures
    control: ArmFigures
    class_js: float
    """Jensen–Shannon divergence (base 2) of the canary's predicted-class mix vs control's."""
    window_start_ms: int = 0
    window_end_ms: int = 0
    paired_devices: int = 0
    """Canary devices with enough labels both before (old parameters) and after their update."""
    paired_error_delta: float | None = None
    """Mean over those devices of (error after − error before): each device is its own control,
    so the devices' different users and accuracies cancel out."""
    paired_error_se: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityFigures:
        """Inverse of :func:`dataclasses.asdict`."""
        return cls(
            canary=ArmFigures(**data["canary"]),
            control=ArmFigures(**data["control"]),
            class_js=data["class_js"],
            window_start_ms=data["window_start_ms"],
            window_end_ms=data["window_end_ms"],
            paired_devices=data.get("paired_devices", 0),
            paired_error_delta=data.get("paired_error_delta"),
            paired_error_se=data.get("paired_error_se"),
        )


@dataclass(frozen=True)
class MetricCheck:
    """One quality metric: the difference new − old, its one-sided bound and its verdict."""

    metric: str
    delta: float
    bound: float
    margin: float
    verdict: Verdict


@dataclass(frozen=True)
class GateFigures:
    """One evaluation of a group's gates: inputs, per-gate verdicts and the overall verdict."""

    group: str
    at_ms: int
    soaked_ms: int
    delivery: DeliveryFigures
    health: HealthFigures
    quality: QualityFigures | None
    checks: tuple[MetricCheck, ...]
    delivery_verdict: Verdict
    health_verdict: Verdict
    quality_verdict: Verdict
    verdict: Verdict
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (stored with transitions)."""
        return asdict(self)


def delivery_gate(fig: DeliveryFigures, policy: DeliveryPolicy, all_resolved: bool) -> Verdict:
    """Delivery: enough devices in trial, errors below the threshold among those with a result.

    Fails as soon as at least ``min_executed`` devices have a result and the error share reaches
    the threshold; passes once every device has a result (or timed out) and the trial share is
    high enough.
    """
    if fig.size == 0:
        return Verdict.PASS
    needed = min(policy.min_executed, fig.size)
    if fig.with_result >= needed and fig.errors * 100.0 >= policy.error_pct * fig.with_result:
        return Verdict.FAIL
    if not all_resolved:
        return Verdict.WAIT
    if fig.trial_reached * 100.0 >= policy.success_pct * fig.size:
        return Verdict.PASS
    return Verdict.FAIL


def health_gate(fig: HealthFigures, policy: HealthPolicy) -> Verdict:
    """Health: KAT reverts and fault resets within their (default zero) allowance."""
    if fig.kat_reverts > policy.max_kat_reverts or fig.fault_resets > policy.max_fault_resets:
        return Verdict.FAIL
    return Verdict.PASS


def _non_inferior(delta_worse: float, se: float, margin: float, z: float) -> tuple[float, Verdict]:
    """Decide on a loss ``delta_worse`` (positive = the new parameters are worse).

    Returns the upper bound of the loss and PASS (loss bound ≤ margin), FAIL (lower bound of the
    loss > margin: worse beyond the margin with confidence) or INCONCLUSIVE.
    """
    upper = delta_worse + z * se
    lower = delta_worse - z * se
    if upper <= margin:
        return upper, Verdict.PASS
    if lower > margin:
        return upper, Verdict.FAIL
    return upper, Verdict.INCONCLUSIVE


def quality_checks(q: QualityFigures, policy: QualityPolicy) -> tuple[MetricCheck, ...]:
    """The per-metric non-inferiority checks (confidence, class mix, labelled error)."""
    c, k = q.canary, q.control
    checks: list[MetricCheck] = []
    if "confidence" in policy.metrics:
        se_conf = math.sqrt(
            c.confidence_sd**2 / max(c.devices, 1) + k.confidence_sd**2 / max(k.devices, 1)
        )
        loss = k.mean_confidence - c.mean_confidence
        bound, verdict = _non_inferior(loss, se_conf, policy.confidence_margin, policy.z)
        checks.append(MetricCheck("confidence", -loss, -bound, policy.confidence_margin, verdict))
    if "class_js" in policy.metrics:
        js_verdict = Verdict.PASS if q.class_js <= policy.max_class_js else Verdict.FAIL
        checks.append(
            MetricCheck("class_js", q.class_js, q.class_js, policy.max_class_js, js_verdict)
        )
    pc, pk = c.error_rate, k.error_rate
    paired_need = min(policy.min_devices, max(c.labelled_devices, 1))
    if (
        "error_rate" in policy.metrics
        and q.paired_error_delta is not None
        and q.paired_error_se is not None
        and q.paired_devices >= paired_need
        and c.labelled >= policy.min_labels
    ):
        # before/after on the same devices: the efficient comparison when it is available
        bound, verdict = _non_inferior(
            q.paired_error_delta, q.paired_error_se, policy.error_margin, policy.z
        )
        checks.append(
            MetricCheck("error_rate", q.paired_error_delta, bound, policy.error_margin, verdict)
        )
    elif (
        "error_rate" in policy.metrics
        and pc is not None
        and pk is not None
        and min(c.labelled, k.labelled) >= policy.min_labels
    ):
        # readings within a device are correlated and devices differ: the larger of the
        # binomial and the between-device standard error
        se_bin = math.sqrt(pc * (1 - pc) / c.labelled + pk * (1 - pk) / k.labelled)
        se_dev = math.sqrt(
            c.error_sd**2 / max(c.labelled_devices, 1) + k.error_sd**2 / max(k.labelled_devices, 1)
        )
        se_err = max(se_bin, se_dev)
        bound, verdict = _non_inferior(pc - pk, se_err, policy.error_margin, policy.z)
        checks.append(MetricCheck("error_rate", pc - pk, bound, policy.error_margin, verdict))
    return tuple(checks)


def quality_gate(
    q: QualityFigures | None,
    policy: QualityPolicy,
    soaked_ms: int,
    applicable: bool,
    group_size: int | None = None,
    self_control: bool = False,
) -> tuple[Verdict, tuple[MetricCheck, ...], str]:
    """Quality: every metric non-inferior, with minimum devices, readings and soak time.

    ``group_size``: devices in the group being judged; a group smaller than ``min_devices``
    needs every one of its devices reporting (instead of waiting for devices it does not have).
    ``self_control``: the control arm is the same devices before their update, so it is held to
    the same device minimum as the canary arm.
    Returns WAIT before the minimum soak or while evidence is short; the caller turns WAIT at the
    soak deadline into INCONCLUSIVE. A metric that *fails* fails the gate at once (after the
    minimum soak), even if others are inconclusive.
    """
    if not applicable:
        return Verdict.NOT_APPLICABLE, (), ""
    if soaked_ms < policy.min_soak_ms:
        return Verdict.WAIT, (), "minimum soak time not reached"
    if q is None:
        return Verdict.WAIT, (), "no quality figures yet"
    # a group smaller than min_devices (a rollout to few devices) needs all of its devices
    canary_need = min(policy.min_devices, group_size or policy.min_devices)
    need = {
        "canary": canary_need,
        "control": canary_need if self_control else policy.min_devices,
    }
    short = [
        f"{name}: {arm.devices} devices / {arm.readings} readings"
        for name, arm in (("canary", q.canary), ("control", q.control))
        if arm.devices < need[name] or arm.readings < policy.min_readings
    ]
    if "error_rate" in policy.metrics and (q.canary.labelled or q.control.labelled):
        # labels are arriving: wait for enough of them (a label-free fleet skips the check)
        short += [
            f"{name}: {arm.labelled} labels"
            for name, arm in (("canary", q.canary), ("control", q.control))
            if arm.labelled < policy.min_labels
        ]
    if short:
        return Verdict.WAIT, (), "not enough evidence (" + "; ".join(short) + ")"
    checks = quality_checks(q, policy)
    failed = [ch.metric for ch in checks if ch.verdict is Verdict.FAIL]
    if failed:
        return Verdict.FAIL, checks, "worse than control: " + ", ".join(failed)
    open_ = [ch.metric for ch in checks if ch.verdict is not Verdict.PASS]
    if open_:
        return Verdict.WAIT, checks, "inconclusive: " + ", ".join(open_)
    return Verdict.PASS, checks, ""
