"""Sequence checks under poisoned, jumping, replayed and re-flashed sequences."""

from __future__ import annotations

import pytest

from service.ingest.sequence_check import (
    CONFIRM_FRAMES,
    MAX_BOOT_STEP,
    MAX_SEQ_STEP,
    SequenceState,
)

U32 = 0xFFFFFFFF


def run(s: SequenceState, pairs: list[tuple[int, int]]) -> list[str]:
    return [s.advance(b, q)[0] for b, q in pairs]


@pytest.mark.parametrize("poison", [(3, U32), (U32, 0), (U32, U32), (3 + MAX_BOOT_STEP + 1, 0)])
def test_one_poisoned_frame_does_not_lock_the_device_out(poison):
    s = SequenceState()
    assert run(s, [(3, 0), (3, 1)]) == ["ok", "ok"]
    assert s.advance(*poison) == ("sequence_jump", 0)
    assert [s.advance(3, q) for q in range(2, 40)] == [("ok", 0)] * 38
    assert (s.boot, s.seq) == (3, 39)


def test_a_real_far_jump_is_taken_once_following_frames_confirm_it():
    s = SequenceState()
    run(s, [(1, 0), (1, 1)])
    far = 1 + MAX_SEQ_STEP + 500
    got = [s.advance(1, far + i) for i in range(CONFIRM_FRAMES + 2)]
    assert [v for v, _ in got] == ["sequence_jump"] * CONFIRM_FRAMES + ["ok", "ok"]
    # what one frame adds to the lost count is capped
    assert got[CONFIRM_FRAMES][1] == MAX_SEQ_STEP
    assert s.seq == far + CONFIRM_FRAMES + 1
    assert s.advance(1, 5) == ("duplicate", 0)  # the old sequence is now behind


def test_frames_that_do_not_continue_a_held_jump_restart_it():
    s = SequenceState()
    s.advance(1, 0)
    assert s.advance(1, U32 - 1000)[0] == "sequence_jump"
    assert s.advance(1, U32 - 1000 + CONFIRM_FRAMES * 100)[0] == "sequence_jump"  # too far
    assert s.advance(1, 1) == ("ok", 0)
    assert s.seq == 1


def test_gaps_and_reboots_within_bounds_are_counted_as_before():
    s = SequenceState()
    assert s.advance(2, 0) == ("ok", 0)
    assert s.advance(2, 5) == ("ok", 4)
    assert s.advance(2, 5) == ("duplicate", 0)
    assert s.advance(3, 7) == ("ok", 7)  # frames 0 … 6 of the new boot never came
    assert s.advance(2, 9) == ("stale", 0)


def test_a_reflashed_device_is_rebased_by_its_birth():
    s = SequenceState()
    run(s, [(57, 0), (57, 1)])
    assert s.advance(0, 0) == ("stale", 0)  # without its birth: an older boot
    s.rebase(0)
    assert run(s, [(0, 0), (0, 1)]) == ["ok", "ok"]
    assert s.advance(57, 2) == ("ok", 2)  # a newer boot is still a reboot
    s.rebase(57)  # a birth of the boot it runs: nothing changes
    assert s.advance(57, 3) == ("ok", 0)


def test_a_confirmed_forgery_is_undone_by_the_devices_next_birth():
    """An attacker with the device's credentials can confirm a jump; the real device's next
    birth (it reconnects) starts a new epoch and its frames are accepted again."""
    s = SequenceState()
    run(s, [(3, 0), (3, 1)])
    assert run(s, [(U32, i) for i in range(CONFIRM_FRAMES + 1)])[-1] == "ok"
    assert s.advance(3, 2)[0] == "stale"
    s.rebase(3)
    assert run(s, [(3, 2), (3, 3)]) == ["ok", "ok"]


def test_the_first_frame_of_an_epoch_is_bounded_by_the_birth():
    s = SequenceState()
    s.rebase(10)
    assert s.advance(9, 0)[0] == "stale"
    assert s.advance(10, U32)[0] == "sequence_jump"
    assert s.advance(10 + MAX_BOOT_STEP + 1, 0)[0] == "sequence_jump"
    assert s.advance(11, 4) == ("ok", 0)  # the first frame: nothing known of before


def test_restore_from_a_checkpoint_drops_a_held_jump():
    s = SequenceState()
    s.advance(1, 0)
    s.advance(1, U32)
    s.restore(1, 100)
    assert s.advance(1, U32 + 1)[0] == "sequence_jump"
    assert s.advance(1, 101) == ("ok", 0)
