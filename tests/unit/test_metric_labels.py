"""The bounded ``fleet`` and ``model_version`` label values, and the cohort gauges over them."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.cohort_gauges import export_cohort_reports
from service.drift.accuracy_estimate import AccuracyEstimate
from service.drift.cohort_monitor import CohortReport
from service.metric_labels import UNKNOWN, FleetLabels, ModelVersionLabels, recalibration_base
from service.metrics import ServiceMetrics


def test_recalibrations_share_one_label_per_base_model_and_unknown_versions_one_more():
    v = ModelVersionLabels()
    v.register(1)
    v.register(20)  # a retrain: a base model of its own
    for version in range(2, 20):  # 18 devices recalibrated from v1
        v.register(version, recalibration_of=1)
    v.register(21, recalibration_of=5)  # a recalibration of a recalibration: still v1's
    v.register(22, recalibration_of=20)
    seen = {v.label(n) for n in range(0, 100_000)} | {v.label(None), v.label(2**32 - 1)}
    assert seen == {"1", "1-recalibrated", "20", "20-recalibrated", UNKNOWN}
    assert v.label(21) == "1-recalibrated"


def test_a_base_model_stays_one_and_a_lineage_cycle_ends():
    v = ModelVersionLabels()
    v.register(3)
    v.register(3, recalibration_of=1)  # the same number a recalibration in another schema
    assert v.label(3) == "3"
    v.register(5, recalibration_of=6)
    v.register(6, recalibration_of=5)
    assert v.label(5) == "5-recalibrated"
    assert v.label(6) == "6-recalibrated"


def test_recalibration_base_reads_only_a_recalibration_s_report():
    assert recalibration_base("recalibration", {"base_version": 4}) == 4
    assert recalibration_base("retrain", {"base_version": 4}) is None
    assert recalibration_base("recalibration", None) is None
    assert recalibration_base("recalibration", {"base_version": "4"}) is None
    assert recalibration_base("recalibration", {"base_version": True}) is None


def test_fleets_are_admitted_up_to_the_limit_and_never_as_unknown():
    admitted: list[str] = []
    f = FleetLabels(3, on_admit=admitted.append)
    assert not f.admit(UNKNOWN)
    assert [f.admit(f"f{i}") for i in range(5)] == [True, True, True, False, False]
    assert f.admit("f0")
    assert admitted == ["f0", "f1", "f2"]
    assert (f.label("f2"), f.label("f3")) == ("f2", UNKNOWN)


def test_configured_fleets_are_the_whole_set():
    f = FleetLabels(1, configured=["a", "b", "c"])
    assert len(f) == 3
    assert not f.admit("d")
    assert f.label("d") == UNKNOWN


def test_concurrent_admissions_respect_the_limit():
    f = FleetLabels(50)
    go = threading.Barrier(8)

    def admit(k: int) -> None:
        go.wait()
        for i in range(500):
            f.admit(f"t{k}-{i}")

    threads = [threading.Thread(target=admit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(f) == 50


def _series(m: ServiceMetrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(m.exposition().decode())
        for s in fam.samples
    }


def test_service_metrics_create_an_admitted_fleet_s_series_once_and_none_for_others():
    m = ServiceMetrics(max_fleets=1)
    empty = _series(m)
    assert m.fleets.admit("plant")
    one = _series(m)
    assert one > empty
    for i in range(1000):
        m.fleets.admit(f"flood-{i}")
        m.readings.labels(fleet=m.fleet(f"flood-{i}"))
    grown = _series(m) - one
    assert {name for name, _ in grown} <= {
        "tinydrift_readings_received_total",
        "tinydrift_readings_received_created",
    }
    assert {labels for _, labels in grown} == {(("fleet", UNKNOWN),)}


def _report(fleet: str, version: int, **kw: Any) -> CohortReport:
    fields: dict[str, Any] = dict(
        fleet=fleet, model_version=version, window_index=1, window_start_ms=0, window_end_ms=1,
        reference_complete=True, reference_windows_done=1, n_devices=1, n_devices_tested=1,
        n_devices_below_min=0, n_devices_in_reference=0, n_readings=100, n_tests=1,
        feature_js={}, feature_hellinger={}, conf_js=None, conf_hellinger=None, class_js=None,
        class_hellinger=None, class_ratios={}, mean_confidence=None, drifting_devices=(),
        cutoff=0.0, dispersion={}, cohort_alarm=False, cohort_bound=0, pca_error=None,
        pca_threshold=None, accuracy=None, labelled_accuracy=None, n_labels=0, detections=(),
    )  # fmt: skip
    fields.update(kw)
    return CohortReport(**fields)


def _acc(estimate: float, n: int) -> AccuracyEstimate:
    return AccuracyEstimate(estimate, estimate, estimate, n, False, 0)


def test_recalibrated_cohorts_merge_into_one_set_of_gauges():
    m = ServiceMetrics(fleets=["plant"])
    m.model_versions.register(1)
    for v in (2, 3):
        m.model_versions.register(v, recalibration_of=1)
    reports = [
        _report("plant", 1, feature_js={"x": 0.1}, class_ratios={"a": 0.5}),
        _report(
            "plant", 2, n_readings=100, feature_js={"x": 0.2}, class_ratios={"a": 1.0},
            cohort_alarm=True, labelled_accuracy=0.5, n_labels=10, accuracy=_acc(0.6, 100),
        ),
        _report(
            "plant", 3, n_readings=300, feature_js={"x": 0.4}, class_ratios={"a": 0.0},
            labelled_accuracy=1.0, n_labels=30, accuracy=_acc(1.0, 300),
        ),
        _report("ghost", 99, cohort_alarm=True),
    ]  # fmt: skip
    export_cohort_reports(m, reports)

    def gauge(g: Any, **labels: str) -> float:
        return float(g.labels(**labels)._value.get())

    recal = {"fleet": "plant", "model_version": "1-recalibrated"}
    assert gauge(m.alarm_active, signal="cohort", **recal) == 1
    assert gauge(m.alarm_active, fleet="plant", model_version="1", signal="cohort") == 0
    assert gauge(m.alarm_active, fleet=UNKNOWN, model_version=UNKNOWN, signal="cohort") == 1
    assert gauge(m.feature_drift, feature="x", **recal) == 0.4  # the worst cohort
    assert gauge(m.feature_drift, fleet="plant", model_version="1", feature="x") == 0.1
    assert gauge(m.class_ratio, **{"class": "a"}, **recal) == 0.25  # pooled over 400 readings
    assert gauge(m.labelled_accuracy, **recal) == (0.5 * 10 + 1.0 * 30) / 40
    assert gauge(m.estimated_accuracy, **recal) == (0.6 * 100 + 1.0 * 300) / 400
    assert values_of(m, "model_version") == {"1", "1-recalibrated", UNKNOWN}


def values_of(m: ServiceMetrics, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in _series(m) if label in dict(labels)}
