"""The update policy's settle timer on a fake clock, and where rollouts' ends come from.

The policy is driven pass by pass (``apply()`` at chosen instants of a fake clock) with an
in-test proposer and rollout registry. The settle time counts from the later of the drift set's
first sighting and the end of the fleet's last rollout (FINISHED, STOPPED, ROLLED_BACK). The last
test checks that the real :class:`RolloutReconciler` reports those ends on its own clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from service.firmware_bundle import Bundle
from service.metrics import ServiceMetrics
from service.registry.store import Registry
from service.rollout.controller import RolloutStatus, RolloutSummary
from service.rollout.groups import DeviceInfo
from service.rollout.plan import RolloutPlan
from service.rollout.proposals import FleetDevice, Proposal, ProposalKind, param_ref
from service.rollout.reconciler import RolloutReconciler, RolloutView
from service.rollout.update_policy import UpdatePolicy

SETTLE_S = 120.0
FLEET = "plant"


class FakeClock:
    """Seconds, set by the test."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRollouts:
    """Active rollouts per fleet and when each fleet's last one ended (as the reconciler does)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.active: set[str] = set()
        self.ended_at: dict[str, float] = {}

    def start(self, fleet: str) -> None:
        self.active.add(fleet)

    def end(self, fleet: str) -> None:
        """FINISHED, STOPPED or ROLLED_BACK (also of a rollout already FINISHED)."""
        self.active.discard(fleet)
        self.ended_at[fleet] = self.clock()

    def active_fleets(self) -> set[str]:
        return set(self.active)

    def rollouts_ended_ago(self) -> dict[str, float]:
        return {fleet: self.clock() - t for fleet, t in self.ended_at.items()}


class FakeProposer:
    """Drift sets set by the test; every proposal succeeds and starts a rollout."""

    def __init__(self, rollouts: FakeRollouts, clock: FakeClock) -> None:
        self.rollouts = rollouts
        self.clock = clock
        self.feature_drifting: set[str] = set()
        self.error_drifting: set[str] = set()
        self.fleet_size = 10
        self.proposals: list[tuple[float, str, tuple[str, ...]]] = []
        self.devices_of: Callable[[str], list[FleetDevice]] = self._devices

    def _devices(self, fleet: str) -> list[FleetDevice]:
        return [
            FleetDevice(
                f"d{i}",
                1,
                "schema",
                0,
                0.0,
                True,
                ("error",) if f"d{i}" in self.error_drifting else (),
            )
            for i in range(self.fleet_size)
        ]

    def drifting_devices(self, fleet: str) -> list[str]:
        return sorted(self.feature_drifting)

    def _propose(self, fleet: str, kind: ProposalKind, devices: tuple[str, ...]) -> Proposal:
        self.proposals.append((self.clock(), kind, devices))
        self.rollouts.start(fleet)
        rid = f"{fleet}-{kind}-{len(self.proposals)}"
        summary = RolloutSummary(RolloutStatus.AWAITING_APPROVAL, 0, 0, 0, len(devices), 0, 0)
        view = RolloutView(rid, fleet, kind, "AWAITING_APPROVAL", "", summary, [])
        return Proposal(kind, fleet, view, dict.fromkeys(devices, 2), {}, 0.0)

    def propose_recalibration(
        self,
        fleet: str,
        actor: str,
        devices: Sequence[str] | None = None,
        *,
        auto_approve: bool = False,
    ) -> Proposal:
        return self._propose(fleet, "recalibration", tuple(sorted(self.feature_drifting)))

    def propose_retrain(self, fleet: str, actor: str, *, auto_approve: bool = False) -> Proposal:
        return self._propose(fleet, "retrain", tuple(sorted(self.error_drifting)))


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.rollouts = FakeRollouts(self.clock)
        self.proposer = FakeProposer(self.rollouts, self.clock)
        self.policy = UpdatePolicy(
            "propose",
            self.proposer,
            self.rollouts,
            lambda: {FLEET},
            settle_s=SETTLE_S,
            clock=self.clock,
        )

    def pass_at(self, t: float) -> list[str]:
        """One policy pass at ``t`` seconds; the ids of the rollouts it proposed."""
        assert t >= self.clock.t
        self.clock.t = t
        return self.policy.apply()

    def at(self, t: float) -> None:
        """Move the clock to ``t`` (for what happens between passes)."""
        assert t >= self.clock.t
        self.clock.t = t


def test_drift_set_must_stay_the_same_for_the_settle_time() -> None:
    rig = Rig()
    rig.proposer.feature_drifting = {"d1"}
    assert rig.pass_at(0) == []
    rig.proposer.feature_drifting = {"d1", "d2"}  # a later alarm restarts the timer
    assert rig.pass_at(30) == []
    assert rig.pass_at(30 + SETTLE_S - 1) == []
    assert rig.pass_at(30 + SETTLE_S) == ["plant-recalibration-1"]
    assert rig.proposer.proposals == [(30 + SETTLE_S, "recalibration", ("d1", "d2"))]


def test_operator_rollout_restarts_the_settle_timer_of_a_watched_set() -> None:
    """A set watched since before a 500 s rollout is not proposed on the first pass after it."""
    rig = Rig()
    rig.proposer.feature_drifting = {"d1", "d2"}
    assert rig.pass_at(0) == []  # the policy starts watching the set
    rig.at(60)
    rig.rollouts.start(FLEET)  # an operator's rollout
    for t in range(90, 560, 30):
        assert rig.pass_at(t) == []  # busy
    rig.at(560)
    rig.rollouts.end(FLEET)  # rolled back after 500 s: the same devices still drift
    assert rig.pass_at(570) == []  # before the fix: proposed here (570 s since first seen)
    assert rig.pass_at(560 + SETTLE_S - 1) == []
    assert rig.pass_at(560 + SETTLE_S) == ["plant-recalibration-1"]
    assert rig.proposer.proposals == [(560 + SETTLE_S, "recalibration", ("d1", "d2"))]


def test_policy_rollout_restarts_the_settle_timer_of_the_other_kind() -> None:
    """The policy's own recalibration ends; the retrain set it saw before is not settled then."""
    rig = Rig()
    rig.proposer.error_drifting = {"d5", "d6"}
    assert rig.pass_at(0) == []  # retrain set first seen
    rig.proposer.feature_drifting = {"d1"}
    assert rig.pass_at(30) == []  # recalibration first (its set first seen now)
    assert rig.pass_at(30 + SETTLE_S) == ["plant-recalibration-1"]
    for t in range(180, 650, 30):
        assert rig.pass_at(t) == []  # busy
    rig.at(650)
    rig.proposer.feature_drifting = set()  # d1 recalibrated
    rig.rollouts.end(FLEET)  # FINISHED
    assert rig.pass_at(660) == []  # before the fix: the retrain was proposed here
    assert rig.pass_at(650 + SETTLE_S - 1) == []
    assert rig.pass_at(650 + SETTLE_S) == ["plant-retrain-2"]
    assert [(t, k) for t, k, _ in rig.proposer.proposals] == [
        (30 + SETTLE_S, "recalibration"),
        (650 + SETTLE_S, "retrain"),
    ]


def test_rollback_of_a_finished_rollout_restarts_the_settle_timer() -> None:
    """Rolled back after it FINISHED: the fleet is never busy at a pass, the end still counts."""
    rig = Rig()
    rig.at(0)
    rig.rollouts.start(FLEET)
    rig.at(40)
    rig.rollouts.end(FLEET)  # FINISHED, before any pass saw it
    rig.proposer.feature_drifting = {"d3"}
    assert rig.pass_at(50) == []  # first seen at 50, after the end
    rig.at(100)
    rig.rollouts.end(FLEET)  # the operator rolls the finished rollout back
    assert rig.pass_at(50 + SETTLE_S) == []  # settled since first sight, not since the rollback
    assert rig.pass_at(100 + SETTLE_S - 1) == []
    assert rig.pass_at(100 + SETTLE_S) == ["plant-recalibration-1"]


def test_drift_seen_after_the_rollout_ended_counts_from_its_first_sighting() -> None:
    rig = Rig()
    rig.at(0)
    rig.rollouts.start(FLEET)
    rig.at(500)
    rig.rollouts.end(FLEET)
    assert rig.pass_at(510) == []  # nothing drifts
    rig.proposer.feature_drifting = {"d4"}
    assert rig.pass_at(700) == []
    assert rig.pass_at(700 + SETTLE_S - 1) == []
    assert rig.pass_at(700 + SETTLE_S) == ["plant-recalibration-1"]


def test_retrain_needs_enough_error_drifting_devices() -> None:
    rig = Rig()
    rig.proposer.error_drifting = {"d5"}  # fewer than max(2, 10 % of 10)
    assert rig.pass_at(0) == []
    assert rig.pass_at(10 * SETTLE_S) == []
    assert rig.proposer.proposals == []


# --------------------------------------------------------------------------------------------
# where the ends come from: the real reconciler, on a fake clock


def test_reconciler_reports_each_fleets_last_rollout_end(bundle: Bundle, sqlite_url: str) -> None:
    reg = Registry(sqlite_url)
    schema = bundle.firmware().schema.schema_id_hex
    old = reg.add_parameter_set(
        schema, 1, 0, bundle.firmware().factory_blob, source="factory", status="good"
    )
    new = reg.add_parameter_set(
        schema, 2, 0, bundle.factory_resigned(2), source="resigned", status="candidate"
    )
    clock = FakeClock()
    clock.t = 1_000.0
    # never connected: the manifests it publishes go nowhere
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    reconciler = RolloutReconciler(reg, client, bundle.deploy_key, ServiceMetrics(), clock=clock)
    reconciler.start()
    try:
        plan = RolloutPlan(
            "r1", FLEET, param_ref(new), param_ref(old), canary_size=2, control_size=1
        )
        devices = [DeviceInfo(f"d{i}", last_active_ms=i) for i in range(6)]
        reconciler.create(plan, devices, "alice")
        assert reconciler.active_fleets() == {FLEET}
        assert reconciler.rollouts_ended_ago() == {}
        clock.t = 1_100.0
        reconciler.approve("r1", "alice")
        assert reconciler.rollouts_ended_ago() == {}  # RUNNING: still active
        clock.t = 1_600.0
        reconciler.rollback("r1", "alice", "test")  # STOPPED → ROLLED_BACK
        assert reconciler.view("r1").status == "ROLLED_BACK"
        assert reconciler.active_fleets() == set()
        clock.t = 1_645.0
        assert reconciler.rollouts_ended_ago() == {FLEET: 45.0}
        assert reconciler.counters["persist_failed"] == 0
    finally:
        reconciler.stop()
        reg.close()
