"""Rollouts in the registry (SQLite): save, update, load, list, events; resume from the row."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from service.registry.rollout_store import RolloutEventRecord, RolloutRecord
from service.registry.store import Registry
from service.rollout.controller import RecordTransition, RolloutController
from service.rollout.groups import DeviceInfo
from service.rollout.plan import ParamRef, RolloutPlan

NEW = ParamRef(5, "a1b2c3d4e5f60718", 1, 1480, "ab" * 32, 1)
OLD = ParamRef(4, "a1b2c3d4e5f60718", 1, 1480, "cd" * 32, 1)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _record(ctl: RolloutController, now_ms: int) -> RolloutRecord:
    p = ctl.plan
    return RolloutRecord(
        p.rollout_id,
        p.fleet,
        p.target.schema_id,
        p.previous.version,
        p.target.version,
        p.kind,
        ctl.state.status.value,
        _ts(ctl.state.created_ms),
        _ts(now_ms),
        ctl.to_json(),
    )


def test_save_load_list_and_resume(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    devices = [DeviceInfo(f"d{i}", last_active_ms=i) for i in range(12)]
    plan = RolloutPlan("r1", "f", NEW, OLD, canary_size=2, control_size=2)
    ctl, _ = RolloutController.create(plan, devices, 1_000)
    actions = ctl.start(1_000) + ctl.approve("alice", 2_000)
    events = [
        RolloutEventRecord(
            a.rollout_id,
            _ts(a.at_ms),
            a.scope,
            a.name,
            a.from_state,
            a.to_state,
            a.actor,
            a.reason,
            a.figures,
        )
        for a in actions
        if isinstance(a, RecordTransition)
    ]
    with Registry(url) as reg:
        stored = reg.save_rollout(_record(ctl, 2_000), events)
        assert [e.to_state for e in stored] == ["AWAITING_APPROVAL", "RUNNING", "RUNNING"]
        assert all(e.id > 0 for e in stored)
        ctl.pause("bob", 3_000)
        reg.save_rollout(_record(ctl, 3_000))
    with Registry(url) as reg:
        row = reg.get_rollout("r1")
        assert row is not None
        assert row.state == "PAUSED"
        assert row.to_version == 5
        assert [r.id for r in reg.list_rollouts(fleet="f", state="PAUSED")] == ["r1"]
        assert reg.list_rollouts(state="RUNNING") == []
        assert len(reg.list_rollout_events("r1")) == 3
        again, _ = RolloutController.restore(row.state_json, 4_000)
        assert again.to_json() == ctl.to_json()
