"""The drift engine's wiring of layer A's two tiers (alarms out, suspicions to the cohort rule),
and its checkpoints (dirty devices, in slices, off the ingest lock; unreadable ones skipped)."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from edge_agent.blob import ParameterSchema
from service.drift.declared_normal import DeclaredNormal
from service.drift.device_monitor import STATE_MAGIC, DeviceMonitor, DeviceMonitorConfig
from service.drift.engine import KIND_DEVICE, MAX_UNKNOWN_COHORTS, DriftEngine
from service.drift.suspicion_cohort import SuspicionCohortConfig
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.ingest.schema_catalog import SchemaCatalog
from service.registry.records import CheckpointRecord

SCHEMA = ParameterSchema(features=("a", "b", "c"), classes=("x", "y", "z"), rows=3)
K = 16
WINDOW_S = 60  # one frame per device per second: 960 readings per device per window
LEARN = 27 * WINDOW_S
"""Frames until every device's monitor is past its reference and null learning (looks at 192,
384, 768 and 1536 frames after the 8-frame reference)."""


def make_engine(devices: int, **kw) -> tuple[DriftEngine, list]:
    cat = SchemaCatalog()
    cat.add_schema(SCHEMA)
    seen: list = []
    engine = DriftEngine(
        cat,
        lambda fleet, device: SCHEMA.schema_id_hex,
        device_config=DeviceMonitorConfig(reference_readings=128, null_horizon_labels=4),
        suspicion_config=SuspicionCohortConfig(
            window_ms=WINDOW_S * 1000, budget_per_device_reading=5e-8
        ),
        on_suspicions=seen.extend,
        **kw,
    )
    return engine, seen


class Fleet:
    """``devices`` synthetic devices; ``shifted`` of them move feature ``a`` by 3σ from ``t0``."""

    def __init__(self, devices: int, seed: int = 0) -> None:
        self.devices = devices
        self.rng = np.random.default_rng(seed)
        self.seq = 0

    def batch(self, t: int, shifted: int = 0) -> list[DeviceFrame]:
        out = []
        for d in range(self.devices):
            x = self.rng.standard_normal((K, 3))
            if d < shifted:
                x[:, 0] += 3.0
            pred = np.argmax(x + self.rng.standard_normal((K, 3)), axis=1).astype(np.int64)
            conf = self.rng.uniform(0.4, 1.0, K)
            out.append(DeviceFrame("f", f"d{d}", 0, self.seq, 1000 * t, float(t), 1, x, pred, conf))
        self.seq += 1
        return out


def run(engine: DriftEngine, fleet: Fleet, t0: int, t1: int, shifted: int = 0) -> list:
    out = []
    for t in range(t0, t1):
        out += engine.on_frames(fleet.batch(t, shifted))
    return out


def test_alarms_are_returned_and_suspicions_go_to_the_cohort_rule():
    engine, seen = make_engine(20)
    fleet = Fleet(20)
    quiet = run(engine, fleet, 0, LEARN + 3 * WINDOW_S)
    assert quiet == []
    assert not any(m.calibrating for m in engine.monitors.values())
    assert engine.stats.suspicion_windows >= 2
    assert all(not r.alarm for r in engine.last_suspicion_reports)
    rep = engine.last_suspicion_reports[0]
    assert rep.devices == 20
    assert rep.readings == 20 * WINDOW_S * K
    assert rep.mean_q == pytest.approx(1e-4 * WINDOW_S * K)
    # 12 of 20 devices shift: each suspects within a frame or two, the strict tier alarms too
    dets = run(engine, fleet, LEARN + 3 * WINDOW_S, LEARN + 5 * WINDOW_S, shifted=12)
    assert "adwin_sensitive" not in {d.detector for d in dets}
    device_alarms = {d.device for d in dets if d.scope == "device"}
    assert device_alarms <= {f"d{i}" for i in range(12)}
    cohort = [d for d in dets if d.detector == "cohort_suspicions"]
    assert len(cohort) >= 1
    assert cohort[0].scope == "cohort"
    assert cohort[0].device is None
    # the end of the window the shift began in
    assert cohort[0].ts_ms == LEARN * 1000 + 4 * WINDOW_S * 1000
    assert engine.stats.suspicion_alarms == len(cohort)
    assert seen
    assert {d.detector for d in seen} == {"adwin_sensitive"}
    assert {d.device for d in seen if d.ts_ms >= (LEARN + 3 * WINDOW_S) * 1000} >= {
        f"d{i}" for i in range(12)
    }
    assert engine.stats.suspicions == len(seen)


def test_label_suspicions_are_not_returned():
    engine, seen = make_engine(1)
    fleet = Fleet(1, seed=3)
    run(engine, fleet, 0, 20)
    rng = np.random.default_rng(4)
    out = []
    for t in range(20, 100):
        wrong = t >= 60  # the error rate goes from 0 to 1 (after 640 labels: learnt at 192-384)
        x = rng.standard_normal((K, 3))
        pred = np.zeros(K, np.int64)
        label = np.full(K, 1 if wrong else 0, np.int64)
        out += engine.on_labels(
            [DeviceLabels("f", "d0", 0, t, 1000 * t, float(t), 1, x, pred, label)]
        )
    assert any(d.signal == "error" for d in seen)
    assert "adwin_sensitive" not in {d.detector for d in out}
    assert any(d.signal == "error" and d.detector == "adwin" for d in out)


def test_checkpoints_carry_the_suspicion_cohorts():
    engine, _ = make_engine(5)
    fleet = Fleet(5)
    run(engine, fleet, 0, LEARN + WINDOW_S + 10)
    records: list[CheckpointRecord] = []
    engine.checkpoint(records.extend)
    kinds = {r.kind for r in records}
    assert f"suspicion_cohort:{SCHEMA.schema_id_hex}:1" in kinds
    again, _ = make_engine(5)
    assert again.restore(records) == len(records)
    key = ("f", SCHEMA.schema_id_hex, 1)
    a, b = engine.suspicion_cohorts[key], again.suspicion_cohorts[key]
    assert a.state_bytes() == b.state_bytes()
    assert a.advance(10 * WINDOW_S * 1000) == b.advance(10 * WINDOW_S * 1000)


def test_an_unreadable_device_checkpoint_is_skipped_counted_and_relearnt():
    """An old-format (pickled) or foreign record costs its own device its learnt state, and
    nothing else: the other devices resume, the refusal is counted by kind."""
    engine, _ = make_engine(2)
    run(engine, Fleet(2), 0, 20)
    records: list[CheckpointRecord] = []
    engine.checkpoint(records.extend)
    good = next(r for r in records if r.device == "d1")
    old = CheckpointRecord("f", "d0", KIND_DEVICE, 3, STATE_MAGIC + b"\x00\x03" + b"x")
    elsewhere = replace(good, device="d7")  # d1's monitor stored under another device's key
    again, _ = make_engine(2)
    assert again.restore([old, good, elsewhere]) == 1
    assert again.stats.checkpoints_refused == {KIND_DEVICE: 2}
    assert set(again.monitors) == {("f", "d1")}
    assert again.monitors[("f", "d1")].state_bytes() == engine.monitors[("f", "d1")].state_bytes()
    run(again, Fleet(2, seed=5), 20, 21)
    assert again.monitors[("f", "d0")].readings == K  # a fresh reference
    assert again.monitors[("f", "d1")].readings == 21 * K


def _device_records(records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    return [r for r in records if r.kind == KIND_DEVICE]


def test_a_checkpoint_takes_the_lock_one_slice_at_a_time_and_ingest_runs_between():
    """10 devices in slices of 3: four slices, each handed over with the lock free; a batch
    ingested from another thread while a slice is saved lands, and its device is written
    again by the next checkpoint (only it: the others have not changed)."""
    engine, _ = make_engine(10)
    fleet = Fleet(10)
    run(engine, fleet, 0, 12)
    assert engine.dirty_devices == 10
    slices: list[list[CheckpointRecord]] = []
    late = Fleet(1, seed=9)
    late.seq = 100

    def save(records: list[CheckpointRecord]) -> None:
        slices.append(records)
        done = threading.Event()

        def other() -> None:  # the batcher's side
            if engine.lock.acquire(timeout=60):
                engine.lock.release()
                if len(slices) == 1:
                    engine.on_frames(late.batch(100))
                done.set()

        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=60)
        assert done.is_set(), "the engine's lock was held while a slice was saved"

    assert engine.checkpoint(save, slice_devices=3) == 10  # no cohort yet
    sizes = [len(_device_records(s)) for s in slices]
    assert sizes == [3, 3, 3, 1, 0]  # then the cohorts' records (none)
    assert engine.stats.checkpoint_slices == 4
    assert {r.device for s in slices for r in s if r.device} == {f"d{i}" for i in range(10)}
    again: list[CheckpointRecord] = []
    engine.checkpoint(again.extend)
    assert [(r.device, r.last_seq) for r in _device_records(again)] == [("d0", 100)]
    engine.checkpoint(again.extend)
    assert len(_device_records(again)) == 1  # nothing changed since


def test_devices_fed_during_a_checkpoint_end_up_stored_as_they_are():
    """An ingest thread feeds every device while checkpoints run (slices of one device). Each
    record is one consistent instant of its device (its ``(boot, seq)`` is its state's); after
    ingest stops, one more checkpoint makes the store (last record per device wins, as the
    registry's upsert) equal to the monitors, byte for byte."""
    engine, _ = make_engine(6)
    fleet = Fleet(6)
    run(engine, fleet, 0, 10)
    stored: dict[str, CheckpointRecord] = {}
    written: list[CheckpointRecord] = []

    def save(records: list[CheckpointRecord]) -> None:
        written.extend(records)
        for r in _device_records(records):
            stored[r.device or ""] = r

    stop = threading.Event()
    fed = [0]

    def ingest() -> None:
        t = 10
        while not stop.is_set() and t < 400:
            engine.on_frames(fleet.batch(t))
            fed[0] += 1
            t += 1

    th = threading.Thread(target=ingest)
    th.start()
    try:
        rounds = 0
        while th.is_alive() and (rounds < 3 or fed[0] < 5):
            engine.checkpoint(save, slice_devices=1)
            rounds += 1
    finally:
        stop.set()
        th.join(timeout=120)
    assert fed[0] > 0
    engine.checkpoint(save, slice_devices=1)
    for r in _device_records(written):
        mon = DeviceMonitor.from_state_bytes(r.state)
        assert mon.last_frame == (r.last_boot, r.last_seq)
        assert mon.readings == (r.last_seq + 1) * K  # the state of that frame, no other
    assert set(stored) == {f"d{i}" for i in range(6)}
    for name, r in stored.items():
        assert r.state == engine.monitors[("f", name)].state_bytes()
    assert engine.dirty_devices == 0


def test_devices_whose_slice_was_not_saved_stay_due():
    engine, _ = make_engine(5)
    run(engine, Fleet(5), 0, 12)
    calls = [0]

    def failing(records: list[CheckpointRecord]) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("queue full")

    with pytest.raises(RuntimeError, match="queue full"):
        engine.checkpoint(failing, slice_devices=2)
    assert engine.dirty_devices == 3  # the first slice was handed over, the rest stay due
    records: list[CheckpointRecord] = []
    engine.checkpoint(records.extend, slice_devices=2)
    assert len(_device_records(records)) == 3


def test_devices_whose_stored_slice_failed_are_due_again():
    engine, _ = make_engine(5)
    run(engine, Fleet(5), 0, 12)
    records: list[CheckpointRecord] = []
    engine.checkpoint(records.extend, slice_devices=2)
    assert engine.dirty_devices == 0
    lost = [(r.fleet, r.device) for r in _device_records(records)[:2]]
    engine.mark_dirty([*lost, ("other-fleet", "dev-0000")])  # a key with no monitor is ignored
    assert engine.dirty_devices == 2
    again: list[CheckpointRecord] = []
    engine.checkpoint(again.extend)
    assert sorted((r.fleet, r.device) for r in _device_records(again)) == sorted(lost)


def test_a_fleets_declared_normal_reaches_its_devices_only():
    """Fleet ``a`` declares sessions of up to 2 s (a frame a second: blocks of ≥ 4 frames), fleet
    ``b`` nothing. ``a``'s devices learn at the larger blocks; ``b``'s learn exactly what they
    learn in an engine with no declaration at all."""
    declared = {"a": DeclaredNormal(session_s=2.0)}
    engines = []
    for fleet_normal in (declared, None):
        cat = SchemaCatalog()
        cat.add_schema(SCHEMA)
        engine = DriftEngine(
            cat,
            lambda fleet, device: SCHEMA.schema_id_hex,
            device_config=DeviceMonitorConfig(reference_readings=128, null_horizon_labels=4),
            fleet_normal=fleet_normal,
        )
        rng = np.random.default_rng(11)
        for t in range(1540):  # floored streams: a candidate at 768 frames, confirmed at 1536
            batch = []
            for fleet in ("a", "b"):
                for d in range(2):
                    x = rng.standard_normal((K, 3))
                    pred = np.argmax(x, axis=1).astype(np.int64)
                    conf = rng.uniform(0.4, 1.0, K)
                    batch.append(
                        DeviceFrame(fleet, f"d{d}", 0, t, 1000 * t, float(t), 1, x, pred, conf)
                    )
            assert engine.on_frames(batch) == []
        engines.append(engine)
    with_decl, without = engines
    a = with_decl.fleet_calibration("a")
    assert a.declared == DeclaredNormal(session_s=2.0)
    assert (a.devices, a.states, a.declared_too_long) == (2, {"monitoring": 2}, 0)
    assert (a.frame_interval_s_median, a.declared_block_frames_max) == (1.0, 4)
    assert a.block_readings_median is not None
    assert a.block_readings_median >= 4 * K
    assert a.block_seconds_median is not None
    assert a.block_seconds_median >= 4.0
    for d in ("d0", "d1"):
        mon = with_decl.monitors[("a", d)]
        assert int(mon._block.min()) >= 4  # every signal stream of the declared fleet
        assert int(without.monitors[("a", d)]._block.max()) < 4  # as learnt from data alone
    b = with_decl.fleet_calibration("b")
    assert b == without.fleet_calibration("b")  # undisturbed
    assert (b.declared, b.declared_block_frames_max, b.states) == (None, 0, {"monitoring": 2})
    assert b.block_readings_max < 4 * K
    for d in ("d0", "d1"):
        assert with_decl.calibration("b", d) == without.calibration("b", d)
    # a restart takes today's declaration for every restored monitor
    records: list[CheckpointRecord] = []
    with_decl.checkpoint(records.extend)
    again = DriftEngine(SchemaCatalog(), lambda f, d: None, fleet_normal={"b": declared["a"]})
    again.restore(records)
    assert again.monitors[("a", "d0")].normal is None
    assert again.monitors[("b", "d0")].normal == declared["a"]
    assert again.fleet_calibration("nowhere").devices == 0


def test_model_versions_nobody_registered_are_listed_up_to_a_bound():
    engine, _ = make_engine(1)
    fleet = Fleet(1)
    versions = MAX_UNKNOWN_COHORTS + 200
    for v in range(1, versions + 1):  # one device naming a new version in every frame
        engine.on_frames([replace(f, param_version=v) for f in fleet.batch(v)])
    assert len(engine.stats.cohorts_without_parameters) == MAX_UNKNOWN_COHORTS
    assert engine.stats.unknown_cohorts_unlisted == 200
