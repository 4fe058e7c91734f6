"""Canary-vs-control figures from live telemetry, and the paired before/after error check."""

from __future__ import annotations

import numpy as np

from service.rollout.gates import Verdict, quality_checks
from service.rollout.plan import QualityPolicy
from service.rollout.quality_window import QualityWindow, js_divergence

POLICY = QualityPolicy(min_devices=2, min_readings=10, min_labels=50, metrics=("error_rate",))


def _labels(
    w: QualityWindow, dev: str, version: int, n: int, errors: int, fleet: str = "f"
) -> None:
    pred = np.zeros(n, dtype=np.int64)
    label = np.zeros(n, dtype=np.int64)
    label[:errors] = 1
    w.add(fleet, dev, version, pred, np.full(n, 0.8))  # the telemetry the labels came with
    w.add_labels(fleet, dev, version, pred, label)


def test_unwatched_devices_are_not_counted() -> None:
    w = QualityWindow()
    w.add("f", "d1", 1, np.array([0, 1]), np.array([0.5, 0.5]))
    q = w.figures("f", {"d1": 1}, {}, now_ms=0)
    assert q.canary.readings == 0


def test_arms_count_only_their_version() -> None:
    w = QualityWindow()
    w.watch("f", ["c", "k"], now_ms=0)
    w.add("f", "c", 1, np.array([0, 0]), np.array([0.4, 0.4]))  # before the update
    w.add("f", "c", 2, np.array([1, 1, 1]), np.array([0.9, 0.9, 0.9]))
    w.add("f", "k", 1, np.array([0]), np.array([0.5]))
    q = w.figures("f", {"c": 2}, {"k": 1}, now_ms=5)
    assert (q.canary.readings, q.control.readings) == (3, 1)
    assert q.class_js == 1.0  # all class 1 vs all class 0


def test_paired_comparison_cancels_device_differences() -> None:
    """Two canary devices of very different accuracy, each better after its update."""
    w = QualityWindow()
    w.watch("f", ["good", "poor"], now_ms=0)
    w.seed_labels("f", "good", 1, 200, 20)  # 10 % errors before (from the label buffer)
    w.seed_labels("f", "poor", 1, 200, 80)  # 40 % before
    _labels(w, "good", 2, 200, 16)  # 8 % after
    _labels(w, "poor", 3, 200, 70)  # 35 % after
    q = w.figures("f", {"good": 2, "poor": 3}, {}, now_ms=1, before={"good": 1, "poor": 1})
    assert q.paired_devices == 2
    assert q.paired_error_delta is not None
    assert round(q.paired_error_delta, 3) == -0.035
    checks = quality_checks(q, POLICY)
    assert [c.verdict for c in checks if c.metric == "error_rate"] == [Verdict.PASS]


def test_paired_comparison_fails_a_worse_update() -> None:
    w = QualityWindow()
    w.watch("f", ["a", "b"], now_ms=0)
    for dev in ("a", "b"):
        w.seed_labels("f", dev, 1, 200, 20)
        _labels(w, dev, 2, 200, 120)  # 60 % errors after
    q = w.figures("f", {"a": 2, "b": 2}, {}, now_ms=1, before={"a": 1, "b": 1})
    checks = quality_checks(q, POLICY)
    assert [c.verdict for c in checks if c.metric == "error_rate"] == [Verdict.FAIL]


def test_too_few_labels_fall_back_to_the_unpaired_comparison() -> None:
    w = QualityWindow()
    w.watch("f", ["a"], now_ms=0)
    w.seed_labels("f", "a", 1, 5, 1)
    _labels(w, "a", 2, 100, 10)
    q = w.figures("f", {"a": 2}, {}, now_ms=1, before={"a": 1})
    assert q.paired_devices == 0
    assert q.paired_error_delta is None


def test_fleets_sharing_device_ids_are_counted_apart() -> None:
    """Two fleets whose devices are both called ``dev-0000``: each fleet's canary is measured on
    its own frames and labels, and an unwatched fleet's frames count for no one."""
    w = QualityWindow()
    w.watch("m", ["dev-0000", "dev-0001"], now_ms=0)
    w.watch("n", ["dev-0000"], now_ms=0)
    for dev in ("dev-0000", "dev-0001"):
        w.seed_labels("m", dev, 1, 200, 20)
        _labels(w, dev, 2, 200, 120, fleet="m")  # fleet m's update is much worse
    w.seed_labels("n", "dev-0000", 1, 200, 60)
    _labels(w, "dev-0000", 2, 200, 10, fleet="n")  # fleet n's is better
    _labels(w, "dev-0000", 2, 500, 0, fleet="o")  # a third fleet, not watched
    assert w.watched("m") == {"dev-0000", "dev-0001"}
    assert w.watched("n") == {"dev-0000"}
    m = w.figures("m", {"dev-0000": 2, "dev-0001": 2}, {}, 1, {"dev-0000": 1, "dev-0001": 1})
    n = w.figures("n", {"dev-0000": 2}, {}, 1, before={"dev-0000": 1})
    assert (m.canary.readings, m.canary.errors) == (400, 240)
    assert (n.canary.readings, n.canary.errors) == (200, 10)
    assert m.paired_error_delta is not None
    assert n.paired_error_delta is not None
    assert round(m.paired_error_delta, 3) == 0.5
    assert round(n.paired_error_delta, 3) == -0.25
    w.unwatch("m", ["dev-0000"])  # fleet m's group ends: fleet n's device is still watched
    assert w.watched("n") == {"dev-0000"}
    assert w.watched("m") == {"dev-0001"}


def test_js_divergence_bounds() -> None:
    assert js_divergence([1, 1], [1, 1]) == 0.0
    assert js_divergence([0, 0], [1, 1]) == 0.0  # no data: no divergence claimed
    assert 0.0 < js_divergence([3, 1], [1, 3]) < 1.0
