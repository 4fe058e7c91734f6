"""Layer B's window reports as gauges, one set per (fleet, ``model_version`` label).

Cohorts are keyed by model version, and a recalibrated device runs its own version: a cohort
of one. Their labels collapse (``1-recalibrated``, :mod:`service.metric_labels`), so the
reports of one label are merged: the alarm is on if any cohort's is, a feature's drift score
is the largest, class shares and accuracies are pooled (weighted by readings, labelled
accuracy by labels). One report per label is exported as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from service.drift.cohort_monitor import CohortReport
from service.metrics import ServiceMetrics


def _pooled(pairs: Sequence[tuple[float, int]]) -> float:
    """Mean of the values weighted by their counts (plain mean when every count is 0)."""
    total = sum(n for _, n in pairs)
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * n for v, n in pairs) / total


def export_cohort_reports(metrics: ServiceMetrics, reports: Sequence[CohortReport]) -> None:
    """Set the cohort gauges from one evaluation's reports."""
    groups: defaultdict[tuple[str, str], list[CohortReport]] = defaultdict(list)
    for r in reports:
        key = (metrics.fleet(r.fleet), metrics.model_versions.label(r.model_version))
        groups[key].append(r)
    m = metrics
    for (fleet, mv), group in groups.items():
        js: dict[str, float] = {}
        ratios: defaultdict[str, list[tuple[float, int]]] = defaultdict(list)
        for r in group:
            for feat, value in r.feature_js.items():
                js[feat] = max(value, js.get(feat, value))
            for cls, ratio in r.class_ratios.items():
                ratios[cls].append((ratio, r.n_readings))
        for feat, value in js.items():
            m.feature_drift.labels(fleet=fleet, model_version=mv, feature=feat).set(value)
        for cls, pairs in ratios.items():
            m.class_ratio.labels(fleet=fleet, model_version=mv, **{"class": cls}).set(
                _pooled(pairs)
            )
        labelled = [
            (r.labelled_accuracy, r.n_labels) for r in group if r.labelled_accuracy is not None
        ]
        if labelled:
            m.labelled_accuracy.labels(fleet=fleet, model_version=mv).set(_pooled(labelled))
        estimated = [(r.accuracy.estimate, r.n_readings) for r in group if r.accuracy is not None]
        if estimated:
            m.estimated_accuracy.labels(fleet=fleet, model_version=mv).set(_pooled(estimated))
        m.alarm_active.labels(fleet=fleet, model_version=mv, signal="cohort").set(
            1 if any(r.cohort_alarm for r in group) else 0
        )
