"""What a rollout deploys and under which policy: the immutable plan of one rollout.

A :class:`RolloutPlan` names the target parameter set and the previous one (the rollback
target), how groups are formed (canary, control, waves) and the thresholds of the gates. It is
plain data, serialisable to JSON, and stored inside
:class:`~service.rollout.controller.RolloutState`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Final

DEFAULT_WAVES: Final[tuple[float, ...]] = (5.0, 25.0, 100.0)
"""Cumulative percentages of the eligible devices reached by each wave (Memfault style)."""


@dataclass(frozen=True)
class ParamRef:
    """A signed parameter set as a manifest points at it (README §4 ``param``)."""

    version: int
    schema_id: str
    security_epoch: int
    blob_len: int
    blob_sha256: str
    key_id: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParamRef:
        """Build from :func:`dataclasses.asdict` output."""
        return cls(**data)


@dataclass(frozen=True)
class DeliveryPolicy:
    """Delivery gate: enough devices reached TRIAL and few failed (hawkBit/AWS thresholds)."""

    success_pct: float = 90.0
    """Minimum share of the group, in %, that reached TRIAL (or CONFIRMED)."""
    error_pct: float = 10.0
    """Failures (rejected, failed, reverted, timed out) in % of devices with a result: below."""
    min_executed: int = 3
    """Devices with a result before the error share can fail the gate (capped at group size)."""
    ack_timeout_ms: int = 15 * 60_000
    """A device that has not reached a result this long after its install is timed out."""


@dataclass(frozen=True)
class HealthPolicy:
    """Health gate: no KAT or fault reverts."""

    max_kat_reverts: int = 0
    max_fault_resets: int = 0


@dataclass(frozen=True)
class QualityPolicy:
    """Quality gate: canary (new parameters) vs control (old) over the same window.

    Non-inferiority: a metric *passes* when its one-sided bound rules out a loss larger than the
    margin, *fails* when the bound shows the loss exceeds the margin, and is *inconclusive*
    otherwise. ``z`` is the one-sided normal quantile (1.645 ≈ 95 %).
    """

    confidence_margin: float = 0.05
    """Largest tolerated drop of mean top-1 confidence (absolute)."""
    error_margin: float = 0.05
    """Largest tolerated rise of the labelled error rate (absolute)."""
    max_class_js: float = 0.1
    """Largest tolerated Jensen–Shannon divergence (base 2) of the class mix vs control."""
    min_devices: int = 3
    """Devices needed in each arm."""
    min_readings: int = 500
    """Readings needed in each arm."""
    min_labels: int = 50
    """Labelled readings needed in each arm for the error metric to count."""
    min_soak_ms: int = 30 * 60_000
    """The gate is not decided before the group has soaked this long."""
    max_soak_ms: int = 4 * 3600_000
    """Still inconclusive at this point: pause for the operator (never promote)."""
    z: float = 1.645
    metrics: tuple[str, ...] = ("confidence", "class_js", "error_rate")
    """Which checks apply. A recalibration judged against drifting devices held back uses only
    ``error_rate``: it is *meant* to change the confidence and the class mix of a drifted device."""
    groups: tuple[str, ...] = ("canary",)
    """Groups the quality gate applies to (the others pass it as not applicable)."""


@dataclass(frozen=True)
class GatePolicy:
    """The three per-group gates."""

    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    quality: QualityPolicy = field(default_factory=QualityPolicy)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatePolicy:
        """Build from :func:`dataclasses.asdict` output."""
        q = dict(data["quality"])
        q["groups"] = tuple(q["groups"])
        if "metrics" in q:
            q["metrics"] = tuple(q["metrics"])
        return cls(
            delivery=DeliveryPolicy(**data["delivery"]),
            health=HealthPolicy(**data["health"]),
            quality=QualityPolicy(**q),
        )


@dataclass(frozen=True)
class RolloutPlan:
    """Everything fixed when a rollout is created."""

    rollout_id: str
    fleet: str
    target: ParamRef
    previous: ParamRef
    """The parameter set devices run now; confirmed devices return to it on a rollback."""
    kind: str = "update"
    """Free label, e.g. ``recalibration`` or ``retrain``."""
    canary_devices: tuple[str, ...] = ()
    """Explicit canary; empty: the ``canary_size`` most recently active devices."""
    canary_size: int = 5
    control_devices: tuple[str, ...] = ()
    """Explicit control; empty: ``control_size`` devices picked by hash among the rest."""
    control_size: int = 5
    waves_pct: tuple[float, ...] = DEFAULT_WAVES
    require_approval: bool = True
    trial_timeout_s: int = 6 * 3600
    """Device-side trial timeout written into install manifests."""
    min_inferences: int = 200
    gates: GatePolicy = field(default_factory=GatePolicy)
    release_control: bool = False
    """After the last wave passes, update the control group too (its devices were held back
    from the same eligible population, e.g. drifting devices awaiting their recalibration)."""
    self_control: bool = False
    """No separate control group: each group is compared with its own devices *before* their
    update (their readings and labels on the previous version since the rollout was created).
    For a recalibration of too few drifting devices to hold some back."""
    device_targets: tuple[tuple[str, ParamRef], ...] = ()
    """Per-device targets (a recalibration gives each drifting device its own parameter set).

    When set, only these devices (and the control) take part: a device that joins the fleet
    mid-rollout is not routed into a wave, and ``target`` is the first of them."""

    def __post_init__(self) -> None:
        """Refuse inconsistent plans with a clear message."""
        for ref in (self.target, *(t for _, t in self.device_targets)):
            if ref.schema_id != self.previous.schema_id:
                raise ValueError("target and previous parameter sets have different schema_id")
            if ref.blob_sha256 == self.previous.blob_sha256:
                raise ValueError("target and previous are the same parameter set")
            if ref.security_epoch != self.previous.security_epoch:
                raise ValueError(
                    "the rollback target must share the target's security_epoch "
                    "(a device's epoch floor would refuse it)"
                )
        devices = [d for d, _ in self.device_targets]
        if len(set(devices)) != len(devices):
            raise ValueError("a device has two per-device targets")
        if set(self.control_devices) - set(devices) and devices and self.release_control:
            raise ValueError("a released control needs its own per-device targets")
        pcts = list(self.waves_pct)
        if not pcts or pcts != sorted(pcts) or pcts[-1] != 100.0 or pcts[0] <= 0:
            raise ValueError("waves_pct must increase and end at 100")
        if set(self.canary_devices) & set(self.control_devices):
            raise ValueError("a device cannot be both canary and control")

    @property
    def members_only(self) -> bool:
        """Whether only the listed devices take part (per-device targets)."""
        return bool(self.device_targets)

    @functools.cached_property
    def _target_map(self) -> dict[str, ParamRef]:
        return dict(self.device_targets)

    def target_for(self, device: str) -> ParamRef:
        """The parameter set ``device`` is moved to (its own, or the shared ``target``)."""
        return self._target_map.get(device, self.target)

    def targets(self) -> list[ParamRef]:
        """Every distinct target parameter set of the rollout."""
        out = [self.target]
        for _, ref in self.device_targets:
            if ref not in out:
                out.append(ref)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(
            rollout_id=data["rollout_id"],
            fleet=data["fleet"],
            target=ParamRef.from_dict(data["target"]),
            previous=ParamRef.from_dict(data["previous"]),
            kind=data["kind"],
            canary_devices=tuple(data["canary_devices"]),
            canary_size=data["canary_size"],
            control_devices=tuple(data["control_devices"]),
            control_size=data["control_size"],
            waves_pct=tuple(float(p) for p in data["waves_pct"]),
            require_approval=data["require_approval"],
            trial_timeout_s=data["trial_timeout_s"],
            min_inferences=data["min_inferences"],
            gates=GatePolicy.from_dict(data["gates"]),
            release_control=bool(data.get("release_control", False)),
            self_control=bool(data.get("self_control", False)),
            device_targets=tuple(
                (str(dev), ParamRef.from_dict(ref)) for dev, ref in data.get("device_targets", ())
            ),
        )
