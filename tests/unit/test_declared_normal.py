"""A fleet's declared normal: seconds to a block floor in frames, and the device's frame clock."""

from __future__ import annotations

import math

import pytest

from service.drift.declared_normal import (
    LARGEST_BLOCK,
    MIN_INTERVALS,
    DeclaredNormal,
    FrameClock,
)
from service.drift.long_run_variance import DEFAULT_LEVELS, DEFAULT_LOOKAHEAD


@pytest.mark.parametrize(
    ("normal", "interval_s", "frames"),
    [
        (DeclaredNormal(period_s=60.0), 1.0, 64),  # one period: 60 frames → 64
        (DeclaredNormal(period_s=64.0), 1.0, 64),  # exactly a power of two stays
        (DeclaredNormal(period_s=64.0), 0.1, 1024),  # 640 frames
        (DeclaredNormal(session_s=30.0), 1.0, 64),  # two sessions: 60 frames → 64
        (DeclaredNormal(session_s=32.0), 2.0, 32),  # 64 s at 2 s per frame
        (DeclaredNormal(period_s=100.0, session_s=30.0), 1.0, 128),  # the longer of the two
        (DeclaredNormal(period_s=100.0, session_s=60.0), 1.0, 128),  # 120 s
        (DeclaredNormal(session_s=0.1), 5.0, 1),  # a frame already spans it
        (DeclaredNormal(period_s=86_400.0), 600.0, 256),  # daily cycle, a frame every 10 min
        (DeclaredNormal(period_s=0.3), 0.1, 4),  # 0.3 / 0.1 = 2.9999999999999996 frames → 4
    ],
)
def test_seconds_become_a_power_of_two_block_spanning_a_period_and_two_sessions(
    normal, interval_s, frames
):
    assert normal.block_frames(interval_s) == frames


def test_the_largest_block_is_what_choose_blocks_can_choose():
    # levels 1 … 2^11 frames, and a block needs `lookahead` levels above it
    assert LARGEST_BLOCK == 2 ** (DEFAULT_LEVELS - 1 - DEFAULT_LOOKAHEAD) == 512


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "declare period_s and/or session_s"),
        ({"period_s": 0.0}, "period_s must be a positive, finite"),
        ({"session_s": -3.0}, "session_s must be a positive, finite"),
        ({"period_s": math.inf}, "period_s must be"),
        ({"session_s": math.nan}, "session_s must be"),
    ],
)
def test_a_declaration_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        DeclaredNormal(**kw)


def test_a_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        DeclaredNormal(period_s=1.0).block_frames(0.0)


def clock_of(stamps: list[int], boot: int = 0) -> FrameClock:
    clock = FrameClock()
    for ts in stamps:
        clock.note(boot, ts)
    return clock


def test_the_interval_is_the_median_once_enough_intervals_are_in():
    clock = clock_of([500 * i for i in range(MIN_INTERVALS)])  # 7 intervals
    assert clock.interval_s is None
    assert clock.missing == 1
    clock.note(0, 500 * MIN_INTERVALS)
    assert clock.interval_s == 0.5
    assert clock.missing == 0


def test_equal_and_backward_timestamps_are_skipped_and_a_jump_is_outvoted():
    stamps = [0, 1000, 1000, 1000, 2000, 1500, 2500, 3_600_000, 3_601_000]
    stamps += [3_601_000 + 1000 * i for i in range(1, 6)]
    clock = clock_of(stamps)
    assert clock.interval_s == 1.0


def test_a_reboot_does_not_count_the_interval_across_it():
    clock = FrameClock()
    for i in range(5):
        clock.note(0, 10_000_000 + 2000 * i)
    for i in range(5):  # the new boot's clock restarts near 0
        clock.note(1, 2000 * i)
    assert clock.interval_s == 2.0  # 4 + 4 intervals, none negative or across boots


def test_a_device_sending_faster_gets_the_shorter_interval_and_slower_keeps_it():
    clock = clock_of([1000 * i for i in range(9)])
    assert clock.interval_s == 1.0
    t = 8000
    for _ in range(24):  # now every 250 ms: the median of the latest 32 follows
        t += 250
        clock.note(0, t)
    assert clock.interval_s == 0.25
    for _ in range(64):  # then every 4 s: blocks in frames would span longer, the floor stays
        t += 4000
        clock.note(0, t)
    assert clock.interval_s == 0.25


def test_stop_releases_the_ring_once_the_interval_is_known():
    clock = clock_of([0, 1000, 2000])
    clock.stop()
    assert clock._ring is not None  # not known yet: measuring on
    for i in range(3, 20):
        clock.note(0, 1000 * i)
    assert clock.interval_s == 1.0
    assert clock._ring is None
    clock.note(0, 10**9)  # ignored from now on
    assert clock.interval_s == 1.0
