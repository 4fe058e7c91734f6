"""Checkpoint form of river's ``HDDM_A`` (layer A's warning zone on the error stream).

river's ``binary.HDDMA`` is plain Python: its settings, two flags and three running means
(``stats.Mean``: a weight and a mean each). :func:`hddm_state` lists them as numbers and
:func:`hddm_from_state` builds a detector that goes on identically (no pickle).

>>> from river import drift
>>> a = drift.binary.HDDMA(drift_confidence=1e-4, warning_confidence=1e-3)
>>> for i in range(500):
...     a.update(float(i % 3 == 0 or i > 400))
>>> b = hddm_from_state(hddm_state(a))
>>> flags = []
>>> for i in range(300):
...     a.update(1.0); b.update(1.0)
...     flags.append(hddm_state(a) == hddm_state(b))
>>> all(flags), hddm_state(a) == hddm_state(b)
(True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["hddm_from_state", "hddm_state"]

_MEANS: Final = ("_x_min", "_x_max", "_z")


def hddm_state(det: Any) -> dict[str, Any]:
    """A river ``HDDMA`` as numbers."""
    return {
        "drift_confidence": float(det.drift_confidence),
        "warning_confidence": float(det.warning_confidence),
        "two_sided_test": bool(det.two_sided_test),
        "drift_detected": bool(det._drift_detected),
        "warning_detected": bool(det._warning_detected),
        "means": [[float(getattr(det, m).n), float(getattr(det, m)._mean)] for m in _MEANS],
    }


def hddm_from_state(state: Mapping[str, Any]) -> Any:
    """Inverse of :func:`hddm_state`."""
    from river import drift, stats

    river_drift: Any = drift
    det = river_drift.binary.HDDMA(
        drift_confidence=float(state["drift_confidence"]),
        warning_confidence=float(state["warning_confidence"]),
        two_sided_test=bool(state["two_sided_test"]),
    )
    det._drift_detected = bool(state["drift_detected"])
    det._warning_detected = bool(state["warning_detected"])
    means = state["means"]
    if len(means) != len(_MEANS):
        raise ValueError("HDDM_A state needs three means")
    for name, (n, mean) in zip(_MEANS, means, strict=True):
        m: Any = stats.Mean()
        m.n = float(n)
        m._mean = float(mean)
        setattr(det, name, m)
    return det
