"""``update_frames`` (layer A on a drained batch, vectorised across devices) against the
per-frame paths: the same detections, scores, thresholds and checkpoint bytes.

Two references: the batch path as it was before it was vectorised across devices (reproduced
below from the monitors' per-frame methods: one ``reduceat`` per schema for the frame means,
then ``DeviceMonitor._monitor_means`` frame by frame), which must give identical bytes; and
``DeviceMonitor.observe`` one frame at a time, whose frame means are summed in another order
(they may differ in the last ulp), so its scores are compared to 9 digits.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pytest

from edge_agent.blob import ParameterSchema
from service.drift.checkpoint_format import pack_state_raw
from service.drift.declared_normal import DeclaredNormal
from service.drift.detection import Detection
from service.drift.device_monitor import (
    BatchResult,
    DeviceMonitor,
    DeviceMonitorConfig,
    update_frames,
)
from service.drift.engine import KIND_DEVICE, DriftEngine
from service.drift.signals import batch_frame_means_arrays
from service.ingest.frames import DeviceFrame
from service.ingest.schema_catalog import SchemaCatalog
from service.registry.records import CheckpointRecord

FEATURES = ("a", "b", "c")
CLASSES = ("x", "y", "z", "w")
CFG = DeviceMonitorConfig(reference_readings=64, null_horizon_readings=64, null_horizon_labels=4)


def reference_update_frames(
    monitors: Mapping[tuple[str, str], DeviceMonitor], frames: Sequence[DeviceFrame]
) -> BatchResult:
    """``update_frames`` before the vectorisation across devices (the reference bytes)."""
    rejected: list[tuple[DeviceFrame, str]] = []
    accepted: list[tuple[DeviceFrame, DeviceMonitor]] = []
    for fr in frames:
        mon = monitors.get(fr.key)
        if mon is None:
            rejected.append((fr, "no monitor"))
            continue
        try:
            mon._check_frame(fr)
        except ValueError as exc:
            rejected.append((fr, str(exc)))
            continue
        accepted.append((fr, mon))
    slow: set[tuple[str, str]] = set()
    fast: list[int] = []
    for i, (fr, mon) in enumerate(accepted):
        if fr.key in slow:
            continue
        if mon._fast_ok(fr):
            fast.append(i)
        else:
            slow.add(fr.key)
    means = {}
    groups: dict[tuple[int, int, float], list[int]] = {}
    for i in fast:
        lay = accepted[i][1].layout
        groups.setdefault((lay.n_features, lay.n_classes, accepted[i][1].config.z_clip), []).append(
            i
        )
    for (_, n_classes, z_clip), idx in groups.items():
        frs = [accepted[i][0] for i in idx]
        mons = [accepted[i][1] for i in idx]
        rows = batch_frame_means_arrays(
            np.concatenate([f.features for f in frs]).astype(np.float64),
            np.concatenate([f.pred for f in frs]).astype(np.int64),
            np.concatenate([f.conf for f in frs]).astype(np.float64),
            np.array([f.k for f in frs]),
            np.stack([m._mu for m in mons]),
            np.stack([m._sigma for m in mons]),
            n_classes,
            z_clip,
        )
        for j, i in enumerate(idx):
            means[i] = rows[j]
    out: list[Detection] = []
    sus: list[Detection] = []
    for i, (fr, mon) in enumerate(accepted):
        row = means.get(i)
        if row is None:
            res = mon.observe(fr)
        else:
            mon.last_frame = (fr.boot, fr.seq)
            mon._clock.note(fr.boot, fr.ts_ms)
            mon._readings += fr.k
            res = mon._monitor_means(row, fr.k, fr)
        out += res.alarms
        sus += res.suspicions
    return BatchResult(out, rejected, sus)


class Device:
    """A synthetic device: independent, slow (AR(1) features: blocks > 1 frame or not yet
    calibrated) or skewed (a rare class, within-frame variance far from normal); ``shift``
    moves feature ``a`` from frame ``at``."""

    def __init__(self, name: str, seed: int, kind: str, shift: float = 0.0, at: int = 0) -> None:
        self.name, self.kind, self.shift, self.at = name, kind, shift, at
        self.rng = np.random.default_rng(seed)
        self.state = np.zeros(len(FEATURES))
        self.seq = 0

    def frame(self, k: int = 16, version: int = 1) -> DeviceFrame:
        rng = self.rng
        if self.kind == "slow":
            x = np.empty((k, len(FEATURES)))
            for i in range(k):
                self.state = 0.98 * self.state + 0.2 * rng.standard_normal(len(FEATURES))
                x[i] = self.state
        elif self.kind == "skewed":
            x = rng.exponential(1.0, (k, len(FEATURES)))
        else:
            x = rng.standard_normal((k, len(FEATURES)))
        if self.shift and self.seq >= self.at:
            x[:, 0] += self.shift
        logits = np.hstack([x, -x[:, :1]]) + rng.standard_normal((k, len(CLASSES)))
        if self.kind == "skewed":
            logits[:, 3] -= 3.0
        pred = np.argmax(logits, axis=1).astype(np.int64)
        conf = np.round(rng.uniform(0.3, 1.0, k) * 256) / 256
        fr = DeviceFrame(
            "f", self.name, 1, self.seq, 1_000 * self.seq, float(self.seq), version, x, pred, conf
        )
        self.seq += 1
        return fr


def scenario(seed: int) -> list[DeviceFrame]:
    """Interleaved frames of six devices (drift, a model-version switch, odd frame sizes)."""
    devs = [
        Device("indep", seed, "indep"),
        Device("drift", seed + 1, "indep", shift=1.5, at=1700),
        Device("small-drift", seed + 2, "indep", shift=0.4, at=1500),
        Device("slow", seed + 3, "slow"),
        Device("skewed", seed + 4, "skewed", shift=0.8, at=1800),
        Device("switch", seed + 5, "indep"),
    ]
    rng = np.random.default_rng(seed + 99)
    frames = []
    for t in range(2200):
        for d in devs:
            if d.name == "indep" and t % 4 == 3:  # fewer frames: the devices go out of step
                continue
            k = int(rng.choice([16, 16, 16, 7, 33])) if d.name == "indep" else 16
            version = 2 if d.name == "switch" and 900 <= t < 1300 else 1
            frames.append(d.frame(k, version))
    return frames


def monitors(normal: DeclaredNormal | None = None) -> dict[tuple[str, str], DeviceMonitor]:
    names = ("indep", "drift", "small-drift", "slow", "skewed", "switch")
    return {
        ("f", n): DeviceMonitor(
            "f", n, FEATURES, CLASSES, CFG, normal=normal if n == "slow" else None
        )
        for n in names
    }


def batches(frames: list[DeviceFrame], seed: int) -> list[list[DeviceFrame]]:
    """Drained batches of random sizes (1 to 300 frames), with a bad frame and a stranger."""
    rng = np.random.default_rng(seed)
    out = []
    lo = 0
    while lo < len(frames):
        n = int(rng.integers(1, 300))
        out.append(list(frames[lo : lo + n]))
        lo += n
    bad = DeviceFrame("f", "indep", 1, 0, 0, 0.0, 1, np.zeros((4, 2)),
                      np.zeros(4, np.int64), np.zeros(4))  # fmt: skip
    bad_class = replace(frames[3], pred=np.full(frames[3].k, 7, dtype=np.int64))
    stranger = replace(frames[0], device="nobody")
    out[5] = [*out[5][:3], bad, stranger, *out[5][3:], bad_class]
    return out


def same_state(
    vec: dict[tuple[str, str], DeviceMonitor],
    ref: dict[tuple[str, str], DeviceMonitor],
    whole: bool,
) -> None:
    """Checkpoint bytes equal (``whole``), and attribute by attribute: a whole pickle also
    records which objects its arrays share (their ``dtype``), which a restore changes."""
    assert vec.keys() == ref.keys()
    for key, mon in vec.items():
        if whole:
            assert mon.state_bytes() == ref[key].state_bytes()
        assert parts(mon, keep_saved=True) == parts(ref[key], keep_saved=True)


def rounded(dets: list[Detection]) -> list[Detection]:
    return [replace(d, score=round(d.score, 9)) for d in dets]


@pytest.mark.parametrize(("seed", "normal"), [(0, None), (7, DeclaredNormal(session_s=2.0))])
def test_vectorised_batches_equal_the_per_frame_paths(seed, normal):
    frames = scenario(seed)
    vec, ref, one = monitors(normal), monitors(normal), monitors(normal)
    got_a, got_s, got_r = [], [], []
    want_a, want_s, want_r = [], [], []
    for i, batch in enumerate(batches(frames, seed)):
        if i == 17:  # monitors restored from their checkpoints (both sides) carry on
            for mons in (vec, ref):
                for key, mon in list(mons.items()):
                    mons[key] = DeviceMonitor.from_state_bytes(mon.state_bytes())
            gc.collect()
        res = update_frames(vec, batch)
        got_a += res.detections
        got_s += res.suspicions
        got_r += res.rejected
        res = reference_update_frames(ref, batch)
        want_a += res.detections
        want_s += res.suspicions
        want_r += res.rejected
        if i % 8 == 0:  # the whole state along the way
            same_state(vec, ref, whole=i < 17)
    assert got_a == want_a  # identical, scores included
    assert got_s == want_s
    assert [(id(f), r) for f, r in got_r] == [(id(f), r) for f, r in want_r]
    assert len(got_r) == 3
    same_state(vec, ref, whole=False)
    # every stage was exercised: monitoring streams with blocks of 1 and more, alarms,
    # suspicions, a model-version switch
    states = {k[1]: m.calibration() for k, m in vec.items()}
    assert states["indep"].state == "monitoring"
    if normal is None:  # the slow features cannot be calibrated from the reference yet
        assert states["slow"].state == "calibrating"
    else:  # declared sessions: blocks of several frames
        assert states["slow"].block_readings_max > 16
    assert {d.device for d in got_a} >= {"drift", "skewed"}
    assert got_s
    assert vec[("f", "switch")]._saved_version is not None
    # one frame at a time through DeviceMonitor.observe: the same detections (frame means
    # summed in another order: scores to 9 digits) and the same thresholds
    one_a, one_s = [], []
    for fr in frames:
        mon = one[fr.key]
        out = mon.observe(fr)
        one_a += out.alarms
        one_s += out.suspicions
    assert rounded(one_a) == rounded(got_a)
    assert rounded(one_s) == rounded(got_s)
    for key, mon in vec.items():
        assert mon.thresholds == one[key].thresholds
        assert mon.sensitive_thresholds == one[key].sensitive_thresholds
        mine, theirs = mon.calibration(), one[key].calibration()
        assert mine.kappa_max == pytest.approx(theirs.kappa_max, rel=1e-9)
        assert replace(mine, kappa_max=0.0) == replace(theirs, kappa_max=0.0)
        np.testing.assert_allclose(mon._delta, one[key]._delta, rtol=1e-9)
        np.testing.assert_array_equal(mon._block, one[key]._block)


def test_the_engine_restores_checkpoints_and_carries_on_identically():
    """A checkpoint written mid-way restores into an engine that then gives the same alarms
    and bytes as the engine that kept running."""
    schema = ParameterSchema(features=FEATURES, classes=CLASSES, rows=len(CLASSES))
    cat = SchemaCatalog()
    cat.add_schema(schema)

    def engine() -> DriftEngine:
        return DriftEngine(cat, lambda f, d: schema.schema_id_hex, device_config=CFG)

    frames = scenario(3)
    half = len(frames) // 2
    a = engine()
    for lo in range(0, half, 250):
        a.on_frames(frames[lo : min(lo + 250, half)])
    b = engine()
    saved: list[CheckpointRecord] = []
    a.checkpoint(saved.extend)
    records = [r for r in saved if r.kind == KIND_DEVICE]
    assert b.restore(records) == len(records)
    got_a, got_b = [], []
    for lo in range(half, len(frames), 250):
        batch = frames[lo : lo + 250]
        got_a += a.on_frames(batch)
        got_b += b.on_frames(batch)
    assert got_a == got_b
    # attribute by attribute, byte for byte, but the previous model version's monitor (held
    # as checkpoint bytes)
    for key, mon in a.monitors.items():
        assert parts(mon) == parts(b.monitors[key])
    assert got_a


def parts(mon: DeviceMonitor, keep_saved: bool = False) -> dict[str, object]:
    """The monitor's checkpoint state, part by part (each in the checkpoint's own format);
    the previous model version's monitor (held as checkpoint bytes) as its own parts, or left
    out."""
    snap = mon.snapshot()
    state = dict(snap.state)
    saved = state.pop("saved_version")
    out: dict[str, object] = {name: pack_state_raw({"v": v}) for name, v in state.items()}
    out["adwins"] = snap.adwins
    if keep_saved and saved is not None:
        back = DeviceMonitor.from_state_bytes(saved["state"])
        out["saved_version"] = (saved["version"], parts(back))
    return out
