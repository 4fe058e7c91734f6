"""The cohort rule on layer A's suspicions: its bound, its windows, its checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service.drift.checkpoint_format import CheckpointFormatError
from service.drift.detection import Detection, Signal
from service.drift.suspicion_cohort import (
    STATE_FORMAT,
    SuspicionCohort,
    SuspicionCohortConfig,
    suspicion_bound,
)

W = 300_000  # 5-minute windows
RATE = 1e-4  # the sensitive tier's default calibrated rate per reading


def suspicion(device: str, signal: Signal = "feature", feature: str | None = "mean_x") -> Detection:
    return Detection("f", device, "device", signal, feature, "adwin_sensitive", 1.0, 1, 0, 0)


def window(cohort: SuspicionCohort, n_devices: int, suspicious: list[int], readings: int = 300):
    for d in range(n_devices):
        cohort.add_readings(f"d{d}", readings, RATE)
    for d in suspicious:
        cohort.add_suspicion(suspicion(f"d{d}"))


def test_bound_holds_its_level_against_the_exact_binomial():
    for n, q, alpha in ((50, 0.03, 7.5e-4), (1000, 0.03, 0.01), (20, 0.1, 1e-3), (5, 0.5, 0.05)):
        b = suspicion_bound([q] * n, alpha)
        assert stats.binom.sf(b, n, q) <= alpha  # P(X > bound) ≤ α
        assert stats.binom.sf(b - 1, n, q) > alpha or b == math.ceil(n * q)  # the smallest
    # unequal probabilities: the binomial at their mean dominates (Hoeffding 1956)
    q = [0.001] * 40 + [0.1] * 10
    b = suspicion_bound(q, 1e-3)
    rng = np.random.default_rng(0)
    x = (rng.random((200_000, len(q))) < np.array(q)).sum(axis=1)
    assert (x > b).mean() <= 1e-3
    assert suspicion_bound([], 0.01) == 0
    assert suspicion_bound([0.1] * 10, 0.0) == 10  # no budget: never alarms


def test_enough_suspicious_devices_raise_one_cohort_alarm():
    cohort = SuspicionCohort("f", 3, SuspicionCohortConfig(window_ms=W))
    assert cohort.advance(10 * W + 5) is None  # opens the window holding that time
    assert cohort.window_start_ms == 10 * W
    window(cohort, 50, list(range(6)))
    rep = cohort.advance(11 * W)
    assert rep is not None
    assert (rep.devices, rep.readings, rep.suspicious_devices) == (50, 15_000, 6)
    assert rep.mean_q == pytest.approx(0.03)
    assert rep.alpha == pytest.approx(5e-8 * 15_000)
    assert rep.bound == 6
    assert not rep.alarm
    assert rep.detection is None
    window(cohort, 50, list(range(7)))
    rep = cohort.advance(12 * W + 1)
    assert rep is not None
    assert rep.alarm
    d = rep.detection
    assert d is not None
    assert (d.scope, d.device, d.detector, d.model_version) == (
        "cohort",
        None,
        "cohort_suspicions",
        3,
    )
    assert d.score == pytest.approx(7 / 7)
    assert d.ts_ms == 12 * W
    assert d.readings == cohort.total_readings == 30_000


def test_a_device_counts_once_and_the_signal_is_the_most_frequent():
    cohort = SuspicionCohort("f", 1, SuspicionCohortConfig(window_ms=W))
    cohort.advance(0)
    window(cohort, 50, [])
    for d in range(9):
        cohort.add_suspicion(suspicion(f"d{d}", "class_mix", "run"))
        cohort.add_suspicion(suspicion(f"d{d}", "class_mix", "run"))
    cohort.add_suspicion(suspicion("d0", "error", None))
    rep = cohort.advance(W)
    assert rep is not None
    assert (rep.suspicious_devices, rep.suspicions) == (9, 19)
    assert rep.detection is not None
    assert (rep.detection.signal, rep.detection.feature) == ("class_mix", "run")


def test_windows_reset_and_empty_ones_are_skipped():
    cohort = SuspicionCohort("f", 1, SuspicionCohortConfig(window_ms=W))
    cohort.advance(0)
    window(cohort, 50, list(range(20)))
    assert cohort.advance(W - 1) is None  # still open
    rep = cohort.advance(5 * W + 7)  # closes [0, W); the windows in between had no data
    assert rep is not None
    assert rep.alarm
    assert rep.window_end_ms == W
    assert cohort.window_start_ms == 5 * W
    window(cohort, 50, [])
    rep = cohort.advance(6 * W)
    assert rep is not None
    assert (rep.suspicious_devices, rep.alarm) == (0, False)  # nothing carried over


def test_suspicions_of_devices_without_readings_are_not_counted():
    cohort = SuspicionCohort("f", 1, SuspicionCohortConfig(window_ms=W))
    cohort.advance(0)
    window(cohort, 10, [1])
    cohort.add_suspicion(suspicion("stranger"))
    rep = cohort.advance(W)
    assert rep is not None
    assert (rep.devices, rep.suspicious_devices, rep.ignored) == (10, 1, 1)


def test_no_alarm_on_a_stationary_fleet():
    """200 devices, 2,000 windows; each suspects with probability 0.01 per window (the
    measured sensitive tier runs at about a third of its calibrated rate): no alarm, and the
    bound sits well above the suspicious devices seen."""
    rng = np.random.default_rng(1)
    cohort = SuspicionCohort("f", 1, SuspicionCohortConfig(window_ms=W))
    cohort.advance(0)
    alarms = 0
    worst = -(10**9)
    for w in range(1, 2001):
        window(cohort, 200, np.flatnonzero(rng.random(200) < 0.01).tolist())
        rep = cohort.advance(w * W)
        assert rep is not None
        alarms += rep.alarm
        worst = max(worst, rep.suspicious_devices - rep.bound)
    assert alarms == 0
    assert worst < -3


def test_at_the_calibrated_rate_false_alarms_stay_within_the_window_level():
    """Every device at exactly its calibrated probability: alarms ≤ α per window."""
    rng = np.random.default_rng(2)
    cfg = SuspicionCohortConfig(window_ms=W, budget_per_device_reading=1e-6)
    cohort = SuspicionCohort("f", 1, cfg)
    cohort.advance(0)
    alarms = 0
    windows = 4000
    for w in range(1, windows + 1):
        window(cohort, 50, np.flatnonzero(rng.random(50) < 0.03).tolist())
        rep = cohort.advance(w * W)
        assert rep is not None
        alarms += rep.alarm
    alpha = 1e-6 * 50 * 300
    assert alarms <= stats.poisson.ppf(0.999, alpha * windows)


def test_checkpoint_round_trip_and_refusals():
    cohort = SuspicionCohort("f", 2, SuspicionCohortConfig(window_ms=W))
    cohort.advance(3 * W)
    window(cohort, 50, list(range(8)))
    cohort.add_suspicion(suspicion("d0", "error", None))
    blob = cohort.state_bytes()
    assert blob[:4] == b"TDSC"
    assert blob[4:6] == STATE_FORMAT.to_bytes(2, "big")
    back = SuspicionCohort.from_state_bytes(blob)
    assert back.window_start_ms == 3 * W
    assert back.total_readings == cohort.total_readings
    a, b = cohort.advance(4 * W), back.advance(4 * W)
    assert a == b
    assert a is not None
    assert a.alarm
    other = SuspicionCohort.from_state_bytes(blob, config=SuspicionCohortConfig(window_ms=60_000))
    assert other.config.window_ms == 60_000
    with pytest.raises(CheckpointFormatError, match="format version"):
        SuspicionCohort.from_state_bytes(blob[:4] + b"\x00\x09" + blob[6:])
    with pytest.raises(CheckpointFormatError, match="damaged"):
        SuspicionCohort.from_state_bytes(blob[:6] + b"{}")
    with pytest.raises(CheckpointFormatError, match="damaged"):
        SuspicionCohort.from_state_bytes(blob.replace(b'"error"', b'"nonsense"'))


def test_a_checkpoint_written_before_feature_var_restores_its_suspicions_under_the_new_name():
    cohort = SuspicionCohort("f", 2, SuspicionCohortConfig(window_ms=W))
    cohort.add_readings("d0", 300, RATE)
    cohort.add_suspicion(suspicion("d0", "feature_var", "std_x"))
    old = cohort.state_bytes().replace(b'"feature_var"', b'"feature_sq"')
    assert b'"feature_sq"' in old
    back = SuspicionCohort.from_state_bytes(old)
    assert back.state_bytes() == cohort.state_bytes()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"window_ms": 0}, "window_ms"),
        ({"budget_per_device_reading": -1.0}, "budget"),
        ({"max_window_alpha": 0.5}, "max_window_alpha"),
    ],
)
def test_config_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        SuspicionCohortConfig(**kw)
    cohort = SuspicionCohort("f", 1)
    with pytest.raises(ValueError, match="readings"):
        cohort.add_readings("d", -1, RATE)
    with pytest.raises(ValueError, match="names its device"):
        cohort.add_suspicion(
            Detection("f", None, "cohort", "feature", None, "adwin_sensitive", 1.0, 1, 0, 0)
        )
