"""A one-device rollout judged against itself (``self_control``) can be decided.

Its control arm is the same device before the update, so it must not wait for
``min_devices`` control devices it can never have (it used to pause as inconclusive).
"""

from __future__ import annotations

from service.rollout.gates import ArmFigures, QualityFigures, Verdict, quality_gate
from service.rollout.plan import QualityPolicy

POLICY = QualityPolicy(min_devices=2, min_readings=200, min_labels=50, min_soak_ms=0,
                       metrics=("error_rate",))  # fmt: skip


def figures() -> QualityFigures:
    before = ArmFigures(devices=1, readings=800, mean_confidence=0.6, labelled=160, errors=60,
                        labelled_devices=1)  # fmt: skip
    after = ArmFigures(devices=1, readings=800, mean_confidence=0.8, labelled=160, errors=15,
                       labelled_devices=1)  # fmt: skip
    return QualityFigures(canary=after, control=before, class_js=0.01)


def test_self_control_of_one_device_is_decided() -> None:
    verdict, checks, reason = quality_gate(figures(), POLICY, 10_000, True, 1, self_control=True)
    assert verdict is Verdict.PASS, reason
    assert [c.metric for c in checks] == ["error_rate"]


def test_a_separate_control_still_needs_min_devices() -> None:
    verdict, _, reason = quality_gate(figures(), POLICY, 10_000, True, 1)
    assert verdict is Verdict.WAIT
    assert "control: 1 devices" in reason
