"""The rollout controller: pure logic from operator actions, acks, births and time to actions.

No MQTT, no threads, no clock: every method takes ``now_ms`` and returns the side effects as a
list of :data:`Action` values (publish a manifest, append an audit entry, record a transition
with its gate figures, mark a parameter set bad, emit a metric event) for the service's
reconciler to carry out. The whole state is :class:`RolloutState`, serialisable to JSON, so a
restarted service resumes where it stopped (:meth:`RolloutController.restore`).

States (fleet-update-anchors §8.10)::

    READY → AWAITING_APPROVAL → RUNNING ⇄ PAUSED → FINISHED | STOPPED → ROLLED_BACK

Groups go ``SCHEDULED → RUNNING → SOAKING → PASSED | FAILED``: the canary first, then the waves;
the control group is never touched. Devices run in server-confirm mode: a device in TRIAL is
confirmed only when its group's gates pass, and success counts only at CONFIRMED (code 200):
the rollout is FINISHED once every group passed and every updated device confirmed, or timed
out (its confirm not acked within the ack timeout).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from service.rollout.gates import (
    DeliveryFigures,
    GateFigures,
    HealthFigures,
    QualityFigures,
    Verdict,
    delivery_gate,
    health_gate,
    quality_gate,
)
from service.rollout.groups import (
    DeviceInfo,
    assign_groups,
    wave_for_new_device,
)
from service.rollout.plan import ParamRef, RolloutPlan

STATE_FORMAT: Final = 1

MAX_DEPLOY_SEQ: Final = 0xFFFFFFFF
"""``deploy_seq`` is a u32 that must grow with every intent: a device that reports this one
(or a birth claiming it) can take no further update."""

EXHAUSTED: Final = "deploy_seq_exhausted"
"""Reason of a device the rollout excluded because it can take no further ``deploy_seq``."""
"""Version of :meth:`RolloutState.to_json`'s layout."""

SYSTEM_ACTOR: Final = "rollout-controller"
CONTROL_GROUP: Final = "control"
"""Name of the group the control becomes when it is released (``plan.release_control``)."""

KAT_REASONS: Final = frozenset({"kat_mismatch", "self_test"})
FAULT_REASONS: Final = frozenset({"fault_reset"})


class RolloutStatus(StrEnum):
    """Rollout states."""

    READY = "READY"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"
    STOPPED = "STOPPED"
    ROLLED_BACK = "ROLLED_BACK"


class GroupStatus(StrEnum):
    """Group states."""

    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SOAKING = "SOAKING"
    PASSED = "PASSED"
    FAILED = "FAILED"


class DeviceStatus(StrEnum):
    """What the controller knows of a device's current update (ack states plus two of its own)."""

    PENDING = "PENDING"
    """Manifest issued, no ack yet."""
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    TRIAL = "TRIAL"
    CONFIRMED = "CONFIRMED"
    REJECTED = "REJECTED"
    REVERTED = "REVERTED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    """No result before the ack timeout (server-side, code 504)."""


IN_PROGRESS: Final = frozenset(
    {DeviceStatus.PENDING, DeviceStatus.DOWNLOADING, DeviceStatus.VERIFYING}
)
ERRORS: Final = frozenset(
    {DeviceStatus.REJECTED, DeviceStatus.REVERTED, DeviceStatus.FAILED, DeviceStatus.TIMED_OUT}
)
ACK_STATES: Final = frozenset(
    {"DOWNLOADING", "VERIFYING", "TRIAL", "CONFIRMED", "REJECTED", "REVERTED", "FAILED"}
)
ACK_CODES: Final = {
    "DOWNLOADING": 202,
    "VERIFYING": 202,
    "TRIAL": 202,
    "CONFIRMED": 200,
    "REJECTED": 400,
    "REVERTED": 409,
    "FAILED": 500,
    "TIMED_OUT": 504,
}

# allowed rollout transitions (anything else raises IllegalTransitionError)
_TRANSITIONS: Final[dict[RolloutStatus, frozenset[RolloutStatus]]] = {
    RolloutStatus.READY: frozenset({RolloutStatus.AWAITING_APPROVAL, RolloutStatus.RUNNING}),
    RolloutStatus.AWAITING_APPROVAL: frozenset({RolloutStatus.RUNNING, RolloutStatus.STOPPED}),
    RolloutStatus.RUNNING: frozenset(
        {RolloutStatus.PAUSED, RolloutStatus.FINISHED, RolloutStatus.STOPPED}
    ),
    RolloutStatus.PAUSED: frozenset({RolloutStatus.RUNNING, RolloutStatus.STOPPED}),
    RolloutStatus.FINISHED: frozenset({RolloutStatus.STOPPED}),
    RolloutStatus.STOPPED: frozenset({RolloutStatus.ROLLED_BACK}),
    RolloutStatus.ROLLED_BACK: frozenset(),
}


class IllegalTransitionError(ValueError):
    """An operator action or event is not allowed in the rollout's current state."""


ManifestAction = Literal["install", "confirm", "revert", "none"]


# -------------------------------------------------------------------------------------------
# actions (side effects for the caller)


@dataclass(frozen=True)
class PublishManifest:
    """Sign and publish (retained) this desired manifest for ``device``."""

    device: str
    deploy_seq: int
    action: ManifestAction
    param: ParamRef
    rollback: bool
    trial_confirm: Literal["server", "local"]
    trial_timeout_s: int
    min_inferences: int


@dataclass(frozen=True)
class AuditAction:
    """Append an entry to the audit log."""

    actor: str
    action: str
    target: str
    details: dict[str, Any]


@dataclass(frozen=True)
class RecordTransition:
    """Append a rollout or group transition, with its gate figures, to ``rollout_events``."""

    rollout_id: str
    scope: Literal["rollout", "group"]
    name: str
    from_state: str
    to_state: str
    at_ms: int
    actor: str
    reason: str
    figures: dict[str, Any] | None


@dataclass(frozen=True)
class MarkParameterSetBad:
    """Set the parameter set's registry status to ``bad`` (never proposed again)."""

    schema_id: str
    version: int
    reason: str


@dataclass(frozen=True)
class MetricEvent:
    """A metric observation: counter increment (``kind="inc"``) or gauge value (``"set"``)."""

    name: str
    labels: dict[str, str]
    value: float
    kind: Literal["inc", "set"] = "inc"


Action = PublishManifest | AuditAction | RecordTransition | MarkParameterSetBad | MetricEvent


# -------------------------------------------------------------------------------------------
# state


@dataclass
class DeviceProgress:
    """One device's part in the rollout: its current intent and what it reported."""

    device: str
    group: str
    phase: Literal["forward", "rollback"] = "forward"
    status: DeviceStatus = DeviceStatus.PENDING
    reason: str = ""
    intent: ManifestAction = "install"
    param: Literal["target", "previous"] = "target"
    rollback: bool = False
    deploy_seq: int = 0
    """Latest ``deploy_seq`` issued to the device (the retained desired's)."""
    first_seq: int = 0
    """First ``deploy_seq`` this rollout issued to the device: older acks are ignored."""
    issued_ms: int = 0
    trial_since_ms: int | None = None
    result_ms: int | None = None


@dataclass
class GroupProgress:
    """One group (canary or wave)."""

    name: str
    devices: list[str]
    status: GroupStatus = GroupStatus.SCHEDULED
    started_ms: int | None = None
    soak_started_ms: int | None = None
    deadline_ms: int | None = None
    """Soak deadline: still inconclusive then → pause for the operator."""
    figures: dict[str, Any] | None = None
    """Last :class:`GateFigures` (as a dict)."""


@dataclass
class RolloutState:
    """Everything the controller needs to resume; JSON-serialisable."""

    plan: RolloutPlan
    status: RolloutStatus
    created_ms: int
    updated_ms: int
    groups: list[GroupProgress]
    control: list[str]
    devices: dict[str, DeviceProgress] = field(default_factory=dict)
    known_seq: dict[str, int] = field(default_factory=dict)
    """Highest ``deploy_seq`` each fleet device is known to have seen (birth or issued)."""
    current: int = 0
    """Index of the group in progress (``len(groups)`` when all passed)."""
    reason: str = ""
    """Why the rollout is paused, stopped or rolled back."""
    paused_for_inconclusive: bool = False
    marked_bad: bool = False
    control_released: bool = False
    """The control group was appended as the last group (``plan.release_control``)."""

    def to_json(self) -> str:
        """Serialise (canonical: sorted keys)."""
        data = {
            "format": STATE_FORMAT,
            "plan": self.plan.to_dict(),
            "status": self.status.value,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "groups": [asdict(g) for g in self.groups],
            "control": self.control,
            "devices": {k: asdict(v) for k, v in self.devices.items()},
            "known_seq": self.known_seq,
            "current": self.current,
            "reason": self.reason,
            "paused_for_inconclusive": self.paused_for_inconclusive,
            "marked_bad": self.marked_bad,
            "control_released": self.control_released,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        """Inverse of :meth:`to_json`; refuses an unknown format."""
        data = json.loads(text)
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown rollout state format {data.get('format')!r}")
        groups = []
        for g in data["groups"]:
            g = dict(g)
            g["status"] = GroupStatus(g["status"])
            groups.append(GroupProgress(**g))
        devices = {}
        for k, d in data["devices"].items():
            d = dict(d)
            d["status"] = DeviceStatus(d["status"])
            devices[k] = DeviceProgress(**d)
        return cls(
            plan=RolloutPlan.from_dict(data["plan"]),
            status=RolloutStatus(data["status"]),
            created_ms=data["created_ms"],
            updated_ms=data["updated_ms"],
            groups=groups,
            control=list(data["control"]),
            devices=devices,
            known_seq={k: int(v) for k, v in data["known_seq"].items()},
            current=data["current"],
            reason=data["reason"],
            paused_for_inconclusive=data["paused_for_inconclusive"],
            marked_bad=data["marked_bad"],
            control_released=bool(data.get("control_released", False)),
        )


@dataclass(frozen=True)
class DesiredManifest:
    """The manifest fields to publish retained for a device (the controller's current intent)."""

    device: str
    deploy_seq: int
    action: ManifestAction
    param: ParamRef
    rollback: bool
    trial_confirm: Literal["server", "local"]


@dataclass(frozen=True)
class RolloutSummary:
    """Counts for the API and metrics; ``confirmed`` counts only devices that acked CONFIRMED."""

    status: RolloutStatus
    confirmed: int
    in_trial: int
    failed: int
    pending: int
    rolled_back: int
    untouched_control: int


# -------------------------------------------------------------------------------------------
# controller


class RolloutController:
    """Drives one rollout; see the module docstring. Mutates its :attr:`state` in place."""

    def __init__(self, state: RolloutState) -> None:
        self.state = state

    # -- creation and persistence ------------------------------------------------------------

    @classmethod
    def create(
        cls, plan: RolloutPlan, devices: list[DeviceInfo], now_ms: int, actor: str = SYSTEM_ACTOR
    ) -> tuple[RolloutController, list[Action]]:
        """A READY rollout with its groups formed from the fleet's ``devices``."""
        canary, control, waves = assign_groups(plan, devices)
        groups = [GroupProgress(g.name, list(g.devices)) for g in (canary, *waves)]
        state = RolloutState(
            plan=plan,
            status=RolloutStatus.READY,
            created_ms=now_ms,
            updated_ms=now_ms,
            groups=groups,
            control=list(control),
            known_seq={d.device_id: d.last_deploy_seq for d in devices},
        )
        ctl = cls(state)
        details = {
            "target_version": plan.target.version,
            "previous_version": plan.previous.version,
            "groups": {g.name: len(g.devices) for g in groups},
            "control": len(control),
        }
        actions: list[Action] = [AuditAction(actor, "rollout.create", ctl.target, details)]
        actions += ctl._metric_state()
        return ctl, actions

    @classmethod
    def restore(cls, state_json: str, now_ms: int) -> tuple[RolloutController, list[Action]]:
        """Resume a rollout after a restart: devices in TRIAL past their deadline are reverted,
        and a group that was soaking soaks again from ``now_ms``: its canary-vs-control evidence
        is measured in memory and went with the old process, so the minimum soak must be
        served again on new evidence (a canary passed on 6 s of data after a restart)."""
        ctl = cls(RolloutState.from_json(state_json))
        actions = ctl._expire_trials(now_ms)
        group = ctl._group()
        if (
            group is not None
            and group.status is GroupStatus.SOAKING
            and ctl.state.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)
        ):
            was = group.soak_started_ms
            group.soak_started_ms = now_ms
            group.deadline_ms = now_ms + ctl.plan.gates.quality.max_soak_ms
            actions.append(
                ctl._audit(
                    SYSTEM_ACTOR,
                    "rollout.soak_restarted",
                    {"group": group.name, "soak_started_ms": was, "restarted_ms": now_ms},
                )
            )
        return ctl, actions

    def resync(self, now_ms: int) -> list[Action]:
        """After a restart: re-issue every unsettled device's intent under a newer ``deploy_seq``.

        Acks received after the last stored state are lost with the old process, and a device
        ignores a manifest whose ``deploy_seq`` it has acted on; under a new one it re-acks where
        it really is (README §7.1: an install of the parameters in trial re-acks ``TRIAL``, of
        the active ones ``CONFIRMED``).
        """
        actions: list[Action] = []
        for p in list(self.state.devices.values()):
            if p.status in IN_PROGRESS or p.status is DeviceStatus.TRIAL:
                actions += self._issue(
                    p.device, p.group, p.intent, p.param, p.rollback, now_ms, phase=p.phase
                )
        return actions

    def to_json(self) -> str:
        """The state, for the registry's ``rollouts.state_json``."""
        return self.state.to_json()

    @property
    def plan(self) -> RolloutPlan:
        """The rollout's plan."""
        return self.state.plan

    @property
    def target(self) -> str:
        """Audit target name of this rollout."""
        return f"rollout:{self.plan.rollout_id}"

    # -- operator actions --------------------------------------------------------------------

    def start(self, now_ms: int, actor: str = SYSTEM_ACTOR) -> list[Action]:
        """READY → AWAITING_APPROVAL (or straight to RUNNING when no approval is required)."""
        if not self.plan.require_approval:
            self._require(RolloutStatus.RUNNING)
            actions = self._transition(RolloutStatus.RUNNING, now_ms, actor, "auto-approved")
            return actions + self._start_group(now_ms)
        return self._transition(RolloutStatus.AWAITING_APPROVAL, now_ms, actor, "submitted")

    def approve(self, actor: str, now_ms: int) -> list[Action]:
        """AWAITING_APPROVAL → RUNNING: the canary starts."""
        if self.state.status is not RolloutStatus.AWAITING_APPROVAL:
            raise IllegalTransitionError(
                f"cannot approve rollout {self.plan.rollout_id} in state {self.state.status}"
            )
        actions: list[Action] = [self._audit(actor, "rollout.approve", {})]
        actions += self._transition(RolloutStatus.RUNNING, now_ms, actor, "approved")
        return actions + self._start_group(now_ms)

    def pause(self, actor: str, now_ms: int, reason: str = "operator") -> list[Action]:
        """RUNNING → PAUSED: no gate decisions and no new groups until resumed."""
        self._require(RolloutStatus.PAUSED)
        actions: list[Action] = [self._audit(actor, "rollout.pause", {"reason": reason})]
        self.state.reason = reason
        return actions + self._transition(RolloutStatus.PAUSED, now_ms, actor, reason)

    def resume(self, actor: str, now_ms: int) -> list[Action]:
        """PAUSED → RUNNING; after an inconclusive pause the soak deadline is extended once more."""
        self._require(RolloutStatus.RUNNING)
        if self.state.status is not RolloutStatus.PAUSED:
            raise IllegalTransitionError(f"cannot resume a rollout in state {self.state.status}")
        group = self._group()
        if self.state.paused_for_inconclusive and group is not None:
            group.deadline_ms = now_ms + self.plan.gates.quality.max_soak_ms
        self.state.paused_for_inconclusive = False
        self.state.reason = ""
        actions: list[Action] = [self._audit(actor, "rollout.resume", {})]
        return actions + self._transition(RolloutStatus.RUNNING, now_ms, actor, "resumed")

    def rollback(
        self, actor: str, now_ms: int, reason: str = "operator", mark_bad: bool = True
    ) -> list[Action]:
        """Operator rollback (from RUNNING, PAUSED or FINISHED): STOPPED → ROLLED_BACK."""
        if self.state.status not in (
            RolloutStatus.RUNNING,
            RolloutStatus.PAUSED,
            RolloutStatus.FINISHED,
        ):
            raise IllegalTransitionError(
                f"cannot roll back rollout {self.plan.rollout_id} in state {self.state.status}"
            )
        actions: list[Action] = [self._audit(actor, "rollout.rollback", {"reason": reason})]
        return actions + self._roll_back(now_ms, actor, reason, None, mark_bad)

    # -- device events -----------------------------------------------------------------------

    def on_birth(self, info: DeviceInfo, now_ms: int) -> list[Action]:
        """A device (re)connected: learn its ``last_deploy_seq``; route newcomers into a wave.

        Returns the current desired manifest for the device when it has one (re-publish if the
        retained copy is missing; publishing it again is harmless: same ``deploy_seq``).
        """
        dev = info.device_id
        self.state.known_seq[dev] = max(self.state.known_seq.get(dev, 0), info.last_deploy_seq)
        if (
            not self._member(dev)
            and not self.plan.members_only
            and self.state.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)
        ):
            index = wave_for_new_device(self.plan, dev)
            self.state.groups[index + 1].devices.append(dev)
            group = self.state.groups[index + 1]
            if group.status in (GroupStatus.PASSED, GroupStatus.RUNNING, GroupStatus.SOAKING):
                return self._issue(dev, group.name, "install", "target", False, now_ms)
            return []
        progress = self.state.devices.get(dev)
        if progress is None or progress.reason == EXHAUSTED:
            return []
        if info.last_deploy_seq > progress.deploy_seq:
            # the device saw a manifest newer than ours (another rollout, or a lost state): reissue
            return self._issue(
                dev, progress.group, progress.intent, progress.param, progress.rollback, now_ms
            )
        return [self._publish(progress)]

    def on_ack(
        self, device: str, deploy_seq: int, state: str, reason: str, now_ms: int
    ) -> list[Action]:
        """Record an ack (README §2.5); acks for another rollout or an older intent are ignored."""
        if state not in ACK_STATES:
            raise ValueError(f"unknown ack state {state!r}")
        progress = self.state.devices.get(device)
        if progress is None or not progress.first_seq <= deploy_seq <= progress.deploy_seq:
            return []
        self.state.known_seq[device] = max(self.state.known_seq.get(device, 0), deploy_seq)
        old = progress.status
        new = DeviceStatus(state)
        if old is new and progress.reason == reason:
            return []
        actions: list[Action] = []
        if (
            progress.intent in ("confirm", "revert")
            and deploy_seq < progress.deploy_seq
            and new is not DeviceStatus.REVERTED
        ):
            return []  # a late ack of the install after we moved on: only a revert counts
        progress.status = new
        progress.reason = reason
        if new is DeviceStatus.TRIAL:
            progress.trial_since_ms = progress.trial_since_ms or now_ms
        if new in ERRORS or new is DeviceStatus.CONFIRMED:
            progress.result_ms = now_ms
            actions.append(
                MetricEvent(
                    "update_results",
                    {"code": str(ACK_CODES[state]), "reason": reason, "phase": progress.phase},
                    1,
                )
            )
        if new is DeviceStatus.TRIAL and progress.intent == "install":
            actions += self._confirm_if_cleared(progress, now_ms)
        if self._group() is None:
            actions += self._finish_if_settled(now_ms)
        return actions

    # -- time ----------------------------------------------------------------------------------

    def tick(
        self, now_ms: int, quality: Mapping[str, QualityFigures] | None = None
    ) -> list[Action]:
        """Apply timers and decide the current group's gates.

        ``quality`` maps a group name to its canary-vs-control figures over the window since the
        group started soaking (the caller measures them; the controller decides).
        """
        actions = self._expire_trials(now_ms)
        if self.state.status is not RolloutStatus.RUNNING:
            return actions
        group = self._group()
        if group is None:  # every group passed: the last confirmations
            actions += self._timeouts(list(self.state.devices), now_ms, confirms=True)
            return actions + self._finish_if_settled(now_ms)
        actions += self._timeouts(group.devices, now_ms)
        figures = self._evaluate(group, now_ms, (quality or {}).get(group.name))
        group.figures = figures.to_dict()
        if figures.verdict is Verdict.FAIL:
            group_fail = self._group_transition(group, GroupStatus.FAILED, now_ms, figures)
            return (
                actions
                + group_fail
                + self._roll_back(
                    now_ms, SYSTEM_ACTOR, f"gate failed in {group.name}: {figures.reason}", figures
                )
            )
        if group.status is GroupStatus.RUNNING and figures.delivery_verdict is Verdict.PASS:
            actions += self._group_transition(group, GroupStatus.SOAKING, now_ms, figures)
            group.soak_started_ms = now_ms
            group.deadline_ms = now_ms + self.plan.gates.quality.max_soak_ms
            return actions
        if group.status is not GroupStatus.SOAKING:
            return actions
        if figures.verdict is Verdict.PASS:
            actions += self._group_transition(group, GroupStatus.PASSED, now_ms, figures)
            for dev in group.devices:
                p = self.state.devices.get(dev)
                if p is not None and p.status is DeviceStatus.TRIAL and p.intent == "install":
                    actions += self._issue(dev, group.name, "confirm", "target", False, now_ms)
            self.state.current += 1
            return actions + self._start_group(now_ms)
        if figures.verdict is Verdict.INCONCLUSIVE:
            self.state.paused_for_inconclusive = True
            self.state.reason = f"inconclusive at the soak deadline of {group.name}"
            actions.append(
                self._audit(SYSTEM_ACTOR, "rollout.inconclusive", {"figures": figures.to_dict()})
            )
            actions += self._transition(
                RolloutStatus.PAUSED, now_ms, SYSTEM_ACTOR, self.state.reason, figures
            )
        return actions

    # -- queries -------------------------------------------------------------------------------

    def desired_for(self, device: str) -> DesiredManifest | None:
        """The manifest to keep retained for ``device`` (``None``: clear it / leave it alone)."""
        p = self.state.devices.get(device)
        if p is None:
            return None
        m = self._publish(p)
        return DesiredManifest(device, m.deploy_seq, m.action, m.param, m.rollback, m.trial_confirm)

    def summary(self) -> RolloutSummary:
        """Counts by device state; only CONFIRMED (200) forward devices count as updated."""
        fwd = [p for p in self.state.devices.values() if p.phase == "forward"]
        back = [p for p in self.state.devices.values() if p.phase == "rollback"]
        return RolloutSummary(
            status=self.state.status,
            confirmed=sum(p.status is DeviceStatus.CONFIRMED for p in fwd),
            in_trial=sum(p.status is DeviceStatus.TRIAL for p in fwd),
            failed=sum(p.status in ERRORS for p in fwd),
            pending=sum(p.status in IN_PROGRESS for p in fwd),
            rolled_back=len(back),
            untouched_control=sum(d not in self.state.devices for d in self.state.control),
        )

    # -- internals -----------------------------------------------------------------------------

    def is_member(self, device: str) -> bool:
        """Whether ``device`` is in one of the rollout's groups or its control."""
        return self._member(device)

    def _member(self, device: str) -> bool:
        return device in self.state.control or any(device in g.devices for g in self.state.groups)

    def _group(self) -> GroupProgress | None:
        if self.state.current < len(self.state.groups):
            return self.state.groups[self.state.current]
        return None

    def _require(self, to: RolloutStatus) -> None:
        if to not in _TRANSITIONS[self.state.status]:
            raise IllegalTransitionError(
                f"rollout {self.plan.rollout_id}: {self.state.status} → {to} is not allowed"
            )

    def _audit(self, actor: str, action: str, details: dict[str, Any]) -> AuditAction:
        return AuditAction(actor, action, self.target, details)

    def _metric_state(self) -> list[Action]:
        return [
            MetricEvent(
                "rollout_state",
                {"rollout": self.plan.rollout_id, "state": s.value},
                1.0 if s is self.state.status else 0.0,
                "set",
            )
            for s in RolloutStatus
        ]

    def _transition(
        self,
        to: RolloutStatus,
        now_ms: int,
        actor: str,
        reason: str,
        figures: GateFigures | None = None,
    ) -> list[Action]:
        self._require(to)
        old = self.state.status
        self.state.status = to
        self.state.updated_ms = now_ms
        fig = figures.to_dict() if figures is not None else None
        actions: list[Action] = [
            RecordTransition(
                self.plan.rollout_id, "rollout", "rollout", old, to, now_ms, actor, reason, fig
            ),
            AuditAction(
                actor,
                "rollout.transition",
                self.target,
                {"from": old.value, "to": to.value, "reason": reason, "figures": fig},
            ),
        ]
        return actions + self._metric_state()

    def _group_transition(
        self, group: GroupProgress, to: GroupStatus, now_ms: int, figures: GateFigures | None
    ) -> list[Action]:
        old = group.status
        group.status = to
        self.state.updated_ms = now_ms
        fig = figures.to_dict() if figures is not None else None
        reason = figures.reason if figures is not None else ""
        return [
            RecordTransition(
                self.plan.rollout_id,
                "group",
                group.name,
                old,
                to,
                now_ms,
                SYSTEM_ACTOR,
                reason,
                fig,
            ),
            AuditAction(
                SYSTEM_ACTOR,
                "rollout.group_transition",
                self.target,
                {"group": group.name, "from": old.value, "to": to.value, "figures": fig},
            ),
        ]

    def _start_group(self, now_ms: int) -> list[Action]:
        """Start the current group, skipping empty waves; FINISHED after the last one."""
        actions: list[Action] = []
        while (group := self._group()) is not None and not group.devices:
            actions += self._group_transition(group, GroupStatus.PASSED, now_ms, None)
            self.state.current += 1
        if group is None and self.plan.release_control and not self.state.control_released:
            # every group passed against the held-back control: now the control gets it too
            self.state.control_released = True
            if self.state.control:
                group = GroupProgress(CONTROL_GROUP, list(self.state.control))
                self.state.groups.append(group)
        if group is None:
            return actions + self._finish_if_settled(now_ms)
        actions += self._group_transition(group, GroupStatus.RUNNING, now_ms, None)
        group.started_ms = now_ms
        for dev in group.devices:
            actions += self._issue(dev, group.name, "install", "target", False, now_ms)
        return actions

    def _settled(self) -> bool:
        """Every device the rollout updated has its result: confirmed, or an error."""
        return not any(
            p.phase == "forward" and (p.status in IN_PROGRESS or p.status is DeviceStatus.TRIAL)
            for p in self.state.devices.values()
        )

    def _finish_if_settled(self, now_ms: int) -> list[Action]:
        """Every group passed: FINISHED once the last devices confirmed (success counts only
        at CONFIRMED; a device that never confirms ends by its trial or ack timeout)."""
        if self.state.status is not RolloutStatus.RUNNING or not self._settled():
            return []
        return self._transition(
            RolloutStatus.FINISHED, now_ms, SYSTEM_ACTOR, "all groups passed, every device settled"
        )

    def _next_seq(self, device: str) -> int:
        p = self.state.devices.get(device)
        issued = p.deploy_seq if p is not None else 0
        return max(self.state.known_seq.get(device, 0), issued) + 1

    def _issue(
        self,
        device: str,
        group: str,
        intent: ManifestAction,
        param: Literal["target", "previous"],
        rollback: bool,
        now_ms: int,
        phase: Literal["forward", "rollback"] | None = None,
    ) -> list[Action]:
        """Give ``device`` a new intent under a strictly larger ``deploy_seq`` (none left: the
        device is excluded and reported, :meth:`_exclude`)."""
        seq = self._next_seq(device)
        if seq > MAX_DEPLOY_SEQ:
            return self._exclude(device, group, now_ms)
        p = self.state.devices.get(device)
        if p is None:
            p = DeviceProgress(device, group, first_seq=seq)
            self.state.devices[device] = p
        if phase is not None:
            p.phase = phase
        p.intent = intent
        p.param = param
        p.rollback = rollback
        p.deploy_seq = seq
        p.issued_ms = now_ms
        if intent == "install":
            p.status = DeviceStatus.PENDING
            p.reason = ""
            p.trial_since_ms = None
            p.result_ms = None
        self.state.known_seq[device] = seq
        return [self._publish(p)]

    def _exclude(self, device: str, group: str, now_ms: int) -> list[Action]:
        """``device`` can take no larger ``deploy_seq``: it leaves the rollout's figures (its
        group goes on without it), audited and counted once."""
        if self._excluded(device):
            return []
        p = self.state.devices.get(device)
        if p is None:
            p = DeviceProgress(device, group)
            self.state.devices[device] = p
        p.status = DeviceStatus.FAILED
        p.reason = EXHAUSTED
        p.intent = "none"
        p.result_ms = now_ms
        known = self.state.known_seq.get(device, 0)
        return [
            self._audit(
                SYSTEM_ACTOR,
                "rollout.device_excluded",
                {"device": device, "reason": EXHAUSTED, "last_deploy_seq": known},
            ),
            MetricEvent(
                "update_results", {"code": "409", "reason": EXHAUSTED, "phase": p.phase}, 1
            ),
        ]

    def _excluded(self, device: str) -> bool:
        p = self.state.devices.get(device)
        return p is not None and p.reason == EXHAUSTED

    def _publish(self, p: DeviceProgress) -> PublishManifest:
        ref = self.plan.target_for(p.device) if p.param == "target" else self.plan.previous
        return PublishManifest(
            device=p.device,
            deploy_seq=p.deploy_seq,
            action=p.intent,
            param=ref,
            rollback=p.rollback,
            trial_confirm="server",
            trial_timeout_s=self.plan.trial_timeout_s,
            min_inferences=self.plan.min_inferences,
        )

    def _confirm_if_cleared(self, p: DeviceProgress, now_ms: int) -> list[Action]:
        """A device reached TRIAL: confirm at once if its group passed (late device) or if this
        is a rollback install of the previous (known-good) parameters."""
        if p.phase == "rollback":
            return self._issue(p.device, p.group, "confirm", "previous", True, now_ms)
        group = next((g for g in self.state.groups if g.name == p.group), None)
        if (
            group is not None
            and group.status is GroupStatus.PASSED
            and self.state.status in (RolloutStatus.RUNNING, RolloutStatus.FINISHED)
        ):
            return self._issue(p.device, p.group, "confirm", "target", False, now_ms)
        return []

    def _timeouts(
        self, devices: Iterable[str], now_ms: int, *, confirms: bool = False
    ) -> list[Action]:
        """Devices with no result within the ack timeout of their intent: ``TIMED_OUT``; with
        ``confirms``, also a device in TRIAL that never acked its confirm (it is not counted
        as a success; a later CONFIRMED ack still counts)."""
        timeout = self.plan.gates.delivery.ack_timeout_ms
        actions: list[Action] = []
        for dev in devices:
            p = self.state.devices.get(dev)
            if p is None or now_ms - p.issued_ms < timeout:
                continue
            if p.status in IN_PROGRESS:
                reason = "in_progress_timeout"
            elif confirms and p.status is DeviceStatus.TRIAL and p.intent == "confirm":
                reason = "confirm_timeout"
            else:
                continue
            p.status = DeviceStatus.TIMED_OUT
            p.reason = reason
            p.result_ms = now_ms
            actions.append(
                MetricEvent(
                    "update_results", {"code": "504", "reason": reason, "phase": p.phase}, 1
                )
            )
        return actions

    def _expire_trials(self, now_ms: int) -> list[Action]:
        """Revert forward devices in TRIAL past their trial deadline (none stays in trial)."""
        limit = self.plan.trial_timeout_s * 1000
        actions: list[Action] = []
        for p in list(self.state.devices.values()):
            if (
                p.status is DeviceStatus.TRIAL
                and p.intent == "install"
                and p.phase == "forward"
                and p.trial_since_ms is not None
                and now_ms - p.trial_since_ms >= limit
            ):
                actions += self._issue(p.device, p.group, "revert", "target", False, now_ms)
                actions.append(
                    AuditAction(
                        SYSTEM_ACTOR,
                        "rollout.trial_expired",
                        self.target,
                        {"device": p.device, "deploy_seq": p.deploy_seq},
                    )
                )
        return actions

    def _figures(self, group: GroupProgress) -> tuple[DeliveryFigures, HealthFigures]:
        trial = confirmed = errors = pending = kat = fault = 0
        by_reason: dict[str, int] = {}
        members = [dev for dev in group.devices if not self._excluded(dev)]
        for dev in members:
            p = self.state.devices.get(dev)
            if p is None or p.status in IN_PROGRESS:
                pending += 1
                continue
            if p.status in (DeviceStatus.TRIAL, DeviceStatus.CONFIRMED):
                trial += 1
                confirmed += p.status is DeviceStatus.CONFIRMED
            else:
                errors += 1
                by_reason[p.reason] = by_reason.get(p.reason, 0) + 1
            if p.status is DeviceStatus.REVERTED:
                kat += p.reason in KAT_REASONS
                fault += p.reason in FAULT_REASONS
        return (
            DeliveryFigures(len(members), trial, confirmed, errors, pending, by_reason),
            HealthFigures(kat, fault),
        )

    def _evaluate(
        self, group: GroupProgress, now_ms: int, quality: QualityFigures | None
    ) -> GateFigures:
        gates = self.plan.gates
        delivery, health = self._figures(group)
        d_verdict = delivery_gate(delivery, gates.delivery, delivery.pending == 0)
        h_verdict = health_gate(health, gates.health)
        soaking = group.status is GroupStatus.SOAKING and group.soak_started_ms is not None
        soaked = now_ms - group.soak_started_ms if soaking and group.soak_started_ms else 0
        applicable = group.name in gates.quality.groups
        if soaking:
            q_verdict, checks, q_reason = quality_gate(
                quality,
                gates.quality,
                soaked,
                applicable,
                len(group.devices),
                self_control=self.plan.self_control,
            )
            if q_verdict is Verdict.NOT_APPLICABLE and soaked < gates.quality.min_soak_ms:
                q_verdict, q_reason = Verdict.WAIT, "minimum soak time not reached"
        else:
            q_verdict, checks, q_reason = Verdict.WAIT, (), "not soaking yet"
        verdicts = (d_verdict, h_verdict, q_verdict)
        reason = ""
        if Verdict.FAIL in verdicts:
            overall = Verdict.FAIL
            reason = "; ".join(
                r
                for r, v in (
                    (f"delivery {delivery}", d_verdict),
                    (f"health {health}", h_verdict),
                    (q_reason, q_verdict),
                )
                if v is Verdict.FAIL
            )
        elif all(v in (Verdict.PASS, Verdict.NOT_APPLICABLE) for v in verdicts):
            overall = Verdict.PASS
        elif (
            soaking
            and group.deadline_ms is not None
            and now_ms >= group.deadline_ms
            and d_verdict is Verdict.PASS
        ):
            overall = Verdict.INCONCLUSIVE
            q_verdict = Verdict.INCONCLUSIVE if q_verdict is Verdict.WAIT else q_verdict
            reason = q_reason or "inconclusive"
        else:
            overall = Verdict.WAIT
            reason = q_reason
        return GateFigures(
            group=group.name,
            at_ms=now_ms,
            soaked_ms=soaked,
            delivery=delivery,
            health=health,
            quality=quality,
            checks=checks,
            delivery_verdict=d_verdict,
            health_verdict=h_verdict,
            quality_verdict=q_verdict,
            verdict=overall,
            reason=reason,
        )

    def _roll_back(
        self,
        now_ms: int,
        actor: str,
        reason: str,
        figures: GateFigures | None,
        mark_bad: bool = True,
    ) -> list[Action]:
        """STOPPED → ROLLED_BACK: revert unconfirmed devices, re-install the previous set on
        confirmed ones under a newer seq, mark the set bad, audit and alert."""
        self.state.reason = reason
        self.state.paused_for_inconclusive = False
        actions = self._transition(RolloutStatus.STOPPED, now_ms, actor, reason, figures)
        for group in self.state.groups:
            if group.status in (GroupStatus.RUNNING, GroupStatus.SOAKING):
                actions += self._group_transition(group, GroupStatus.FAILED, now_ms, figures)
        for p in list(self.state.devices.values()):
            if p.phase != "forward":
                continue
            if p.status is DeviceStatus.CONFIRMED:
                actions += self._issue(
                    p.device, p.group, "install", "previous", True, now_ms, phase="rollback"
                )
            elif (
                p.status in (DeviceStatus.TRIAL, DeviceStatus.TIMED_OUT) or p.status in IN_PROGRESS
            ):
                # revert leaves a trial; on a device still downloading the newer seq cancels it
                actions += self._issue(
                    p.device, p.group, "revert", "target", False, now_ms, phase="rollback"
                )
        if mark_bad and not self.state.marked_bad:
            self.state.marked_bad = True
            for ref in self.plan.targets():
                actions.append(MarkParameterSetBad(ref.schema_id, ref.version, reason))
        actions.append(
            MetricEvent(
                "rollout_rollbacks",
                {"rollout": self.plan.rollout_id, "fleet": self.plan.fleet},
                1,
            )
        )
        if figures is not None:
            for check in figures.checks:
                actions.append(
                    MetricEvent("canary_gate_delta", {"metric": check.metric}, check.delta, "set")
                )
        return actions + self._transition(RolloutStatus.ROLLED_BACK, now_ms, actor, reason, figures)
