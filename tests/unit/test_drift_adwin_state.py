"""The compact checkpoint form of river ADWINs: exact, smaller, no pickle, and refusing what it
does not know (an unknown layout when packing, foreign attributes when unpacking)."""

from __future__ import annotations

import pickle
import zlib

import numpy as np
import pytest
from river import drift

from service.drift.adwin_state import capture_adwins, pack_adwins, unpack_adwins
from service.drift.checkpoint_format import pack_state, unpack_state


def _round_trip(dets: list[drift.ADWIN]) -> list[drift.ADWIN]:
    """Through the checkpoint's explicit format (no pickle)."""
    return unpack_adwins(unpack_state(pack_state(pack_adwins(capture_adwins(dets)))))


def _fed(delta: float, values: list[float], **kw: int) -> drift.ADWIN:
    det = drift.ADWIN(delta=delta, **kw)
    for v in values:
        det.update(v)
    return det


def test_packing_is_exact_and_the_detectors_go_on_identically():
    rng = np.random.default_rng(0)
    calm = (rng.standard_normal(20_000) * 4).tolist()
    shift = (rng.standard_normal(200) * 4 + 12).tolist()
    fired = _fed(1e-2, calm, clock=1, min_window_length=1)
    for v in shift:  # stop right after the alarm: a cut window, reset on the next update
        fired.update(v)
        if fired.drift_detected:
            break
    assert fired.drift_detected
    dets = [
        _fed(1e-3, calm, clock=1, min_window_length=2),
        fired,
        _fed(0.002, (rng.random(5000) < 0.2).astype(float).tolist()),  # river's defaults
        drift.ADWIN(),  # empty
    ]
    back = _round_trip(dets)
    for a, b in zip(dets, back, strict=True):
        assert b._helper.__getstate__() == a._helper.__getstate__()
        assert vars(b).keys() == vars(a).keys()
        assert b.drift_detected == a.drift_detected
    more = (rng.standard_normal(3000) * 4 + 3).tolist()
    for a, b in zip(dets, back, strict=True):
        for v in more:
            a.update(v)
            b.update(v)
            assert a.drift_detected == b.drift_detected
        assert (a.width, a.total, a.variance) == (b.width, b.total, b.variance)


def test_packing_is_smaller_than_rivers_pickle():
    rng = np.random.default_rng(1)
    dets = [
        _fed(1e-4, (rng.standard_normal(50_000) * 4).tolist(), clock=1, min_window_length=2)
        for _ in range(4)
    ]
    packed = len(pack_state(pack_adwins(capture_adwins(dets))))
    plain = len(zlib.compress(pickle.dumps(dets, protocol=5), 6))
    assert packed < 0.93 * plain


class _NotRust:
    """A detector whose helper state is not river's layout."""

    def __init__(self) -> None:
        self.delta = 0.1
        self._helper = self
        self.width = 7

    def __getstate__(self) -> bytes:
        return b"not river's layout"


def test_an_unknown_layout_cannot_be_checkpointed():
    dets = [drift.ADWIN(delta=0.01), _NotRust()]
    with pytest.raises(ValueError, match="unknown layout"):
        pack_adwins(capture_adwins(dets))


def test_foreign_attributes_are_refused_when_unpacking():
    state = pack_adwins(capture_adwins([drift.ADWIN(delta=0.01)]))
    renamed = dict(state, keys=["update", *state["keys"][1:]])
    with pytest.raises(ValueError, match="attributes"):
        unpack_adwins(renamed)
    not_numbers = dict(state, attrs=[["os.system", *state["attrs"][0][1:]]])
    with pytest.raises(TypeError, match="numbers"):
        unpack_adwins(not_numbers)
