"""The rollout controller as pure logic: canary, waves, gates, rollback, persistence."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from service.rollout.controller import (
    Action,
    AuditAction,
    DeviceStatus,
    GroupStatus,
    IllegalTransitionError,
    MarkParameterSetBad,
    PublishManifest,
    RecordTransition,
    RolloutController,
    RolloutStatus,
)
from service.rollout.gates import ArmFigures, QualityFigures
from service.rollout.groups import DeviceInfo, assign_groups, bucket
from service.rollout.plan import GatePolicy, ParamRef, QualityPolicy, RolloutPlan

MIN = 60_000
NEW = ParamRef(5, "a1b2c3d4e5f60718", 1, 1480, "ab" * 32, 1)
OLD = ParamRef(4, "a1b2c3d4e5f60718", 1, 1480, "cd" * 32, 1)
GATES = GatePolicy(quality=QualityPolicy(min_soak_ms=10 * MIN, max_soak_ms=60 * MIN))


def fleet(n: int = 40) -> list[DeviceInfo]:
    return [DeviceInfo(f"d{i:02d}", last_deploy_seq=i % 7, last_active_ms=i) for i in range(n)]


def plan(**kw: object) -> RolloutPlan:
    base = RolloutPlan("r1", "f", NEW, OLD, canary_size=4, control_size=4, gates=GATES)
    return replace(base, **kw)  # type: ignore[arg-type]


GOOD = QualityFigures(
    ArmFigures(4, 2000, 0.90, 0.02, 400, 40), ArmFigures(4, 2000, 0.89, 0.02, 400, 42), 0.01
)
WORSE = QualityFigures(
    ArmFigures(4, 2000, 0.60, 0.02, 400, 200), ArmFigures(4, 2000, 0.89, 0.02, 400, 42), 0.3
)
THIN = QualityFigures(ArmFigures(1, 10, 0.9), ArmFigures(1, 10, 0.9), 0.0)


def publishes(actions: list[Action]) -> list[PublishManifest]:
    return [a for a in actions if isinstance(a, PublishManifest)]


class Sim:
    """Tracks every manifest per device; acks as a device would."""

    def __init__(self, ctl: RolloutController) -> None:
        self.ctl = ctl
        self.sent: dict[str, list[PublishManifest]] = {}

    def take(self, actions: list[Action]) -> list[Action]:
        for m in publishes(actions):
            self.sent.setdefault(m.device, []).append(m)
        return actions

    def ack_all(self, state: str, reason: str, now: int, devices: list[str] | None = None) -> None:
        for dev, ms in list(self.sent.items()):
            if devices is None or dev in devices:
                self.take(self.ctl.on_ack(dev, ms[-1].deploy_seq, state, reason, now))

    def confirm_pending(self, now: int) -> None:
        for dev, ms in list(self.sent.items()):
            if ms[-1].action == "confirm":
                self.take(self.ctl.on_ack(dev, ms[-1].deploy_seq, "CONFIRMED", "confirmed", now))


def started(p: RolloutPlan | None = None) -> tuple[Sim, list[Action]]:
    ctl, _ = RolloutController.create(p or plan(), fleet(), 0)
    sim = Sim(ctl)
    sim.take(ctl.start(0))
    return sim, sim.take(ctl.approve("alice", 0))


def test_groups_are_deterministic_nested_and_disjoint() -> None:
    canary, control, waves = assign_groups(plan(), fleet())
    assert canary.devices == ("d39", "d38", "d37", "d36")  # most recently active
    assert len(control) == 4
    assert not set(control) & set(canary.devices)
    members = [d for w in waves for d in w.devices]
    assert len(members) == len(set(members)) == 40 - 8
    assert [w.name for w in waves] == ["wave-1", "wave-2", "wave-3"]
    assert all(bucket(d, "r1") < 500 for d in waves[0].devices)
    assert assign_groups(plan(), list(reversed(fleet())))[2] == waves


def test_the_canary_is_drawn_from_online_devices_first() -> None:
    """The device that just went offline is the most recently active (its Will stamps it), but
    it could not report: the canary is the most recently active online devices."""
    devices = fleet()
    devices = [replace(d, online=False) if d.device_id == "d39" else d for d in devices]
    canary, _, waves = assign_groups(plan(), devices)
    assert canary.devices == ("d38", "d37", "d36", "d35")
    assert "d39" in {d for w in waves for d in w.devices}
    # with too few online devices, offline ones fill the canary
    few = [replace(d, online=d.device_id in ("d00", "d01")) for d in fleet()]
    assert assign_groups(plan(), few)[0].devices == ("d01", "d00", "d39", "d38")


def test_happy_path_canary_waves_finished_counting_only_confirmed() -> None:
    sim, actions = started()
    ctl = sim.ctl
    canary = ctl.state.groups[0].devices
    assert {m.device for m in publishes(actions)} == set(canary)
    assert all(m.action == "install" and m.trial_confirm == "server" for m in publishes(actions))
    t = 0
    while ctl.state.status is RolloutStatus.RUNNING:
        t += MIN
        sim.ack_all("DOWNLOADING", "downloading", t)
        sim.ack_all("TRIAL", "trial", t)
        assert ctl.summary().confirmed <= sum(m[-1].action == "confirm" for m in sim.sent.values())
        sim.take(ctl.tick(t, {"canary": GOOD}))
        sim.confirm_pending(t)
        assert t < 1000 * MIN
    assert ctl.state.status is RolloutStatus.FINISHED
    assert all(g.status is GroupStatus.PASSED for g in ctl.state.groups)
    summary = ctl.summary()
    assert summary.confirmed == 36
    assert summary.untouched_control == 4
    assert not set(sim.sent) & set(ctl.state.control)
    assert all(m.param == NEW for ms in sim.sent.values() for m in ms)


def test_success_counts_only_at_confirmed() -> None:
    sim, _ = started()
    sim.ack_all("TRIAL", "trial", MIN)
    assert sim.ctl.summary().confirmed == 0
    assert sim.ctl.summary().in_trial == 4


def test_worse_canary_rolls_back_and_marks_the_set_bad() -> None:
    sim, _ = started()
    ctl = sim.ctl
    canary = ctl.state.groups[0].devices
    sim.ack_all("TRIAL", "trial", MIN)
    # one canary device got confirmed somehow (e.g. an earlier look); it must get a rollback
    first = canary[0]
    ctl.state.devices[first].status = DeviceStatus.CONFIRMED
    sim.take(ctl.tick(2 * MIN))  # → SOAKING
    assert ctl.state.groups[0].status is GroupStatus.SOAKING
    actions = sim.take(ctl.tick(15 * MIN, {"canary": WORSE}))
    assert ctl.state.status is RolloutStatus.ROLLED_BACK
    assert ctl.state.groups[0].status is GroupStatus.FAILED
    bad = [a for a in actions if isinstance(a, MarkParameterSetBad)]
    assert bad == [MarkParameterSetBad(NEW.schema_id, NEW.version, bad[0].reason)]
    last = {d: ms[-1] for d, ms in sim.sent.items()}
    assert last[first].action == "install"
    assert last[first].rollback
    assert last[first].param == OLD
    assert all(last[d].action == "revert" for d in canary[1:])
    assert not set(sim.sent) & set(ctl.state.control)
    states = [(a.from_state, a.to_state) for a in actions if isinstance(a, RecordTransition)]
    assert ("RUNNING", "STOPPED") in states
    assert ("STOPPED", "ROLLED_BACK") in states
    fig = next(a.figures for a in actions if isinstance(a, RecordTransition) and a.figures)
    assert fig["quality_verdict"] == "fail"
    # the rollback install reaches TRIAL → the controller confirms the previous set
    seq = last[first].deploy_seq
    follow = publishes(ctl.on_ack(first, seq, "TRIAL", "trial", 16 * MIN))
    assert follow[0].action == "confirm"
    assert follow[0].param == OLD
    assert follow[0].deploy_seq > seq


def test_kat_revert_fails_the_health_gate() -> None:
    sim, _ = started()
    canary = sim.ctl.state.groups[0].devices
    sim.ack_all("TRIAL", "trial", MIN, devices=list(canary[1:]))
    sim.ack_all("REVERTED", "kat_mismatch", MIN, devices=[canary[0]])
    sim.take(sim.ctl.tick(2 * MIN))
    assert sim.ctl.state.status is RolloutStatus.ROLLED_BACK
    fig = sim.ctl.state.groups[0].figures
    assert fig is not None
    assert fig["health_verdict"] == "fail"
    assert fig["health"]["kat_reverts"] == 1


def test_inconclusive_at_the_deadline_pauses_then_resume_extends() -> None:
    sim, _ = started()
    ctl = sim.ctl
    sim.ack_all("TRIAL", "trial", MIN)
    sim.take(ctl.tick(2 * MIN))
    sim.take(ctl.tick(20 * MIN, {"canary": THIN}))
    assert ctl.state.status is RolloutStatus.RUNNING
    actions = sim.take(ctl.tick(63 * MIN, {"canary": THIN}))
    assert ctl.state.status is RolloutStatus.PAUSED
    assert ctl.state.paused_for_inconclusive
    assert not any(m.action == "confirm" for m in publishes(actions))
    ctl.resume("bob", 64 * MIN)
    assert ctl.state.status is RolloutStatus.RUNNING
    sim.take(ctl.tick(65 * MIN, {"canary": GOOD}))
    assert ctl.state.groups[0].status is GroupStatus.PASSED


def test_operator_pause_resume_rollback_and_illegal_transitions() -> None:
    ctl, _ = RolloutController.create(plan(), fleet(), 0)
    with pytest.raises(IllegalTransitionError):
        ctl.approve("alice", 0)  # READY: not submitted yet
    with pytest.raises(IllegalTransitionError):
        ctl.pause("alice", 0)
    ctl.start(0)
    with pytest.raises(IllegalTransitionError):
        ctl.resume("alice", 0)
    ctl.approve("alice", 0)
    ctl.pause("alice", MIN)
    assert ctl.tick(2 * MIN, {"canary": GOOD}) == []  # paused: no decisions
    with pytest.raises(IllegalTransitionError):
        ctl.pause("alice", MIN)
    ctl.resume("alice", 3 * MIN)
    actions = ctl.rollback("alice", 4 * MIN, "operator says no")
    assert ctl.state.status is RolloutStatus.ROLLED_BACK
    assert {m.action for m in publishes(actions)} == {"revert"}
    for op in (ctl.resume, ctl.approve, ctl.rollback):
        with pytest.raises(IllegalTransitionError):
            op("alice", 5 * MIN)


def test_json_round_trip_and_resume_reverts_an_expired_trial() -> None:
    sim, _ = started(plan(trial_timeout_s=3600))
    ctl = sim.ctl
    sim.ack_all("TRIAL", "trial", MIN)
    text = ctl.to_json()
    again, actions = RolloutController.restore(text, 2 * MIN)
    assert again.to_json() == text
    assert actions == []
    again, actions = RolloutController.restore(text, 62 * MIN)
    reverted = publishes(actions)
    assert {m.device for m in reverted} == set(ctl.state.groups[0].devices)
    assert all(m.action == "revert" for m in reverted)
    for m in reverted:
        assert m.deploy_seq > sim.sent[m.device][-1].deploy_seq


def test_deploy_seq_strictly_increases_above_the_birth_seq() -> None:
    sim, _ = started()
    ctl = sim.ctl
    dev = ctl.state.groups[0].devices[0]
    ctl.on_birth(DeviceInfo(dev, last_deploy_seq=100), MIN)
    sim.take(ctl.on_birth(DeviceInfo(dev, last_deploy_seq=100), MIN))
    sim.ack_all("TRIAL", "trial", MIN)
    sim.take(ctl.tick(2 * MIN))
    sim.take(ctl.tick(15 * MIN, {"canary": WORSE}))
    seqs = [m.deploy_seq for m in sim.sent[dev]]
    assert seqs[-1] > 100
    for ms in sim.sent.values():
        s = [m.deploy_seq for m in ms]
        assert all(b >= a for a, b in itertools.pairwise(s))
        assert len(set(s)) == len({(m.deploy_seq, m.action) for m in ms})


def test_desired_for_is_the_final_intent_and_stale_acks_are_ignored() -> None:
    sim, _ = started()
    ctl = sim.ctl
    dev = ctl.state.groups[0].devices[0]
    first = sim.sent[dev][-1].deploy_seq
    assert ctl.on_ack(dev, first - 1, "FAILED", "internal", MIN) == []
    sim.ack_all("TRIAL", "trial", MIN)
    sim.take(ctl.tick(2 * MIN))
    sim.take(ctl.tick(15 * MIN, {"canary": GOOD}))
    want = ctl.desired_for(dev)
    assert want is not None
    assert want.action == "confirm"
    assert want.param == NEW
    assert want.deploy_seq == sim.sent[dev][-1].deploy_seq
    assert ctl.desired_for(ctl.state.control[0]) is None


def test_a_device_that_can_take_no_larger_deploy_seq_is_excluded_not_blocking() -> None:
    """A birth claiming ``last_deploy_seq = 0xFFFFFFFF`` (issue 11: the rollout persisted as
    RUNNING with no manifest): the device is excluded, audited and counted; its group goes on."""
    devices = fleet()
    stuck = "d39"  # the most recently active: in the canary
    devices = [
        replace(d, last_deploy_seq=0xFFFFFFFF) if d.device_id == stuck else d for d in devices
    ]
    ctl, _ = RolloutController.create(plan(), devices, 0)
    sim = Sim(ctl)
    sim.take(ctl.start(0))
    actions = sim.take(ctl.approve("alice", 0))
    assert stuck in ctl.state.groups[0].devices
    assert stuck not in sim.sent
    assert all(m.deploy_seq <= 0xFFFFFFFF for m in publishes(actions))
    audits = [a for a in actions if isinstance(a, AuditAction)]
    assert [a.details["device"] for a in audits if a.action == "rollout.device_excluded"] == [stuck]
    assert ctl.state.devices[stuck].reason == "deploy_seq_exhausted"
    # a birth of the excluded device publishes nothing and reports nothing twice
    assert ctl.on_birth(DeviceInfo(stuck, 0xFFFFFFFF, 1), MIN) == []
    # the canary passes on the other three, and the rollout finishes
    t = 0
    while ctl.state.status is RolloutStatus.RUNNING:
        t += MIN
        sim.ack_all("TRIAL", "trial", t)
        sim.take(ctl.tick(t, {"canary": GOOD}))
        sim.confirm_pending(t)
        assert t < 1000 * MIN
    assert ctl.state.status is RolloutStatus.FINISHED
    assert ctl.state.groups[0].status is GroupStatus.PASSED
    assert ctl.summary().confirmed == 35
    # and the exclusion survives a restart
    back, _ = RolloutController.restore(ctl.state.to_json(), t)
    assert back.state.devices[stuck].reason == "deploy_seq_exhausted"


def test_a_restart_restarts_the_soak_of_the_soaking_group() -> None:
    """The canary-vs-control evidence lives in memory: after a restart the group must soak its
    minimum time again on new evidence, not pass on seconds of data (issue 11 item 8)."""
    sim, _ = started()
    ctl = sim.ctl
    sim.ack_all("TRIAL", "trial", MIN)
    sim.take(ctl.tick(MIN, {}))
    canary = ctl.state.groups[0]
    assert canary.status is GroupStatus.SOAKING
    assert canary.soak_started_ms == MIN
    restart = 9 * MIN  # 8 of the 10 minutes of soak served before the restart
    again, actions = RolloutController.restore(ctl.to_json(), restart)
    group = again.state.groups[0]
    assert (group.soak_started_ms, group.deadline_ms) == (restart, restart + 60 * MIN)
    assert [a.action for a in actions if isinstance(a, AuditAction)] == ["rollout.soak_restarted"]
    again.tick(restart + 5 * MIN, {"canary": GOOD})  # new evidence, but only 5 minutes of it
    assert group.status is GroupStatus.SOAKING
    again.tick(restart + 10 * MIN, {"canary": GOOD})
    assert group.status is GroupStatus.PASSED


def test_finished_only_once_every_device_confirmed_or_timed_out() -> None:
    """FINISHED means what the README says: every updated device confirmed (issue 11 item 11);
    a device that never acks its confirm ends as TIMED_OUT after the ack timeout."""
    sim, _ = started()
    ctl = sim.ctl
    silent = None
    t = 0
    while ctl._group() is not None:
        t += MIN
        sim.ack_all("TRIAL", "trial", t)
        sim.take(ctl.tick(t, {"canary": GOOD}))
        if silent is None and ctl.state.groups[0].status is GroupStatus.PASSED:
            silent = ctl.state.groups[0].devices[0]  # its confirm is never acked
        for dev, ms in list(sim.sent.items()):  # the devices confirm, but for the silent one
            if ms[-1].action == "confirm" and dev != silent:
                sim.take(ctl.on_ack(dev, ms[-1].deploy_seq, "CONFIRMED", "confirmed", t))
        assert t < 1000 * MIN
    assert silent is not None
    assert ctl.state.status is RolloutStatus.RUNNING  # all groups passed, one confirm missing
    assert ctl.state.devices[silent].status is DeviceStatus.TRIAL
    timeout = ctl.plan.gates.delivery.ack_timeout_ms
    issued = ctl.state.devices[silent].issued_ms
    sim.take(ctl.tick(issued + timeout - 1, {}))
    assert ctl.state.status is RolloutStatus.RUNNING
    sim.take(ctl.tick(issued + timeout, {}))
    assert ctl.state.status is RolloutStatus.FINISHED
    p = ctl.state.devices[silent]
    assert (p.status, p.reason) == (DeviceStatus.TIMED_OUT, "confirm_timeout")
    # its late CONFIRMED still counts
    ctl.on_ack(silent, p.deploy_seq, "CONFIRMED", "confirmed", issued + timeout + MIN)
    assert ctl.state.devices[silent].status is DeviceStatus.CONFIRMED
    assert ctl.summary().confirmed == 36
