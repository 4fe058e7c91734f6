"""The service's Prometheus metrics: a bounded-cardinality set, never a per-device label.

Labels are limited to ``fleet`` (the fleets monitored, at most ``max_fleets``, else
``_unknown``), ``model_version`` (registered base models, ``{base}-recalibrated``, else
``_unknown``: :mod:`service.metric_labels`), ``kind``, ``reason``, ``signal``, ``detector``,
``scope``, ``feature`` (≤ the schema's features), ``class`` (≤ its classes), ``state``, ``source``
and ``stream`` (``telemetry`` or ``labels``), each from a fixed or registered set, never from a
message as it comes: 100k devices as a label made a 91 MiB, 10.8 s scrape in
``../shared/research/mqtt-observability-anchors.md`` §1.9. Device ids travel as exemplars on
the drift-detection counter (OpenMetrics, limit 128 characters). The set follows §8.5 there.

>>> m = ServiceMetrics()
>>> m.rejected.labels(reason="decode").inc()
>>> b"tinydrift_ingest_rejected_total" in m.exposition()
True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import service
from service.metric_labels import FleetLabels, ModelVersionLabels

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
CONF_BUCKETS = tuple(i / 20 for i in range(5, 21))


SEQUENCE_STREAMS: Final = ("telemetry", "labels")
"""The device streams whose sequence gaps are counted (label values of the gap counter)."""

CANDIDATE_KINDS: Final = ("recalibration", "retrain")
"""Kinds of candidate the service builds (label values of the candidate metrics)."""
FETCH_REFUSALS: Final = ("no_intent", "other_blob", "malformed")
"""Why a chunk request got no data (``reason`` of ``tinydrift_blob_requests_refused``)."""
VERSION_SOURCES: Final = ("birth", "ack")
"""Where a device reported its running version (``source`` of the unsanctioned counter)."""


class BulkHistogram(Collector):
    """A Prometheus histogram fed whole arrays at once (one ``np.searchsorted`` per call).

    ``prometheus_client.Histogram.observe`` costs a Python call per value; the ingest path
    observes every reading's confidence, so it counts a frame's readings in one vectorised step.
    ``le_format`` writes the bucket bounds (``floatToGoString``: as ``prometheus_client``).

    >>> h = BulkHistogram("x_conf", "Confidence.", ("fleet",), (0.5, 1.0))
    >>> h.observe_many(("f",), np.array([0.2, 0.7, 0.9]))
    >>> [s.value for s in next(iter(h.collect())).samples if s.name == "x_conf_bucket"]
    [1.0, 3.0, 3.0]
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        le_format: Callable[[float], str] = "{:g}".format,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._le = [le_format(float(b)) for b in buckets]
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], npt.NDArray[np.int64]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe_many(self, labels: tuple[str, ...], values: npt.NDArray[np.float64]) -> None:
        """Count every value of ``values`` under ``labels``."""
        idx = np.searchsorted(self.bounds, values, side="left")
        counts = np.bincount(idx, minlength=len(self.bounds) + 1).astype(np.int64)
        total = float(np.sum(values))
        with self._lock:
            if labels in self._counts:
                self._counts[labels] += counts
                self._sums[labels] += total
            else:
                self._counts[labels] = counts
                self._sums[labels] = total

    def collect(self) -> Iterator[Metric]:
        """The histogram family (cumulative buckets, ``+Inf``, sum)."""
        fam = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        with self._lock:
            items = [(k, v.copy(), self._sums[k]) for k, v in self._counts.items()]
        for labels, counts, total in items:
            cum = np.cumsum(counts)
            buckets = [(le, float(c)) for le, c in zip(self._le, cum[:-1], strict=True)]
            buckets.append(("+Inf", float(cum[-1])))
            fam.add_metric(list(labels), buckets, total)
        yield fam


DEFAULT_MAX_FLEETS: Final = 100
"""Fleets with their own series when every fleet is watched (``max_fleets``)."""


class ServiceMetrics:
    """Every metric of one service instance, in its own registry (tests run several).

    ``fleets`` (the configured fleets, ``None`` for all) and ``max_fleets`` bound the ``fleet``
    label values (:attr:`fleets`); :attr:`model_versions` bounds ``model_version``. Callers pass
    every fleet through :meth:`fleet` and every version through ``model_versions.label``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_fleets: int = DEFAULT_MAX_FLEETS,
        fleets: Iterable[str] | None = None,
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.build = Info("tinydrift_build", "tinydrift build information.", registry=r)
        # the service's own CPU, memory and open files (process_* series, Linux /proc)
        ProcessCollector(registry=r)
        self.build.info({"version": service.__version__})
        self.model_info = Gauge(
            "tinydrift_model_info",
            "Live model versions (value 1).",
            ["fleet", "model_version", "schema_id"],
            registry=r,
        )
        # ingest
        self.messages = Counter(
            "tinydrift_mqtt_messages_received",
            "MQTT messages received.",
            ["fleet", "kind"],
            registry=r,
        )
        self.readings = Counter(
            "tinydrift_readings_received", "Telemetry readings accepted.", ["fleet"], registry=r
        )
        self.rejected = Counter(
            "tinydrift_ingest_rejected", "Messages rejected, by reason.", ["reason"], registry=r
        )
        self.sequence_gaps = Counter(
            "tinydrift_ingest_sequence_gaps",
            "Messages lost between device and service (sequence gaps), by stream: telemetry "
            "frames or label batches.",
            ["fleet", "stream"],
            registry=r,
        )
        # observed once per batch (one value per telemetry frame), bounds written as before
        self.lag = BulkHistogram(
            "tinydrift_ingest_lag_seconds",
            "Service receive time minus device timestamp.",
            ("fleet",),
            LAG_BUCKETS,
            le_format=floatToGoString,
        )
        r.register(self.lag)
        self.batch_size = Histogram(
            "tinydrift_ingest_batch_size",
            "Messages per batch drained from the queue.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tinydrift_ingest_queue_depth",
            "Messages waiting between MQTT and the batcher.",
            registry=r,
        )
        self.process_seconds = Histogram(
            "tinydrift_ingest_batch_processing_seconds",
            "Time to decode and detect one batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "tinydrift_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.mqtt_reconnects = Counter(
            "tinydrift_mqtt_reconnects", "Reconnections to the broker.", registry=r
        )
        # devices
        self.devices = Gauge(
            "tinydrift_devices", "Devices by state.", ["fleet", "state"], registry=r
        )
        self.devices_by_model = Gauge(
            "tinydrift_devices_by_model",
            "Devices by active model version.",
            ["fleet", "model_version"],
            registry=r,
        )
        self.last_seen_age = Histogram(
            "tinydrift_device_last_seen_age_seconds",
            "Seconds since each device was last heard.",
            ["fleet"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 21600, 86400),
            registry=r,
        )
        # drift
        self.detections = Counter(
            "tinydrift_drift_detections",
            "Drift detections (device id as exemplar).",
            ["fleet", "scope", "signal", "detector"],
            registry=r,
        )
        self.suspicions = Counter(
            "tinydrift_drift_suspicions",
            "Layer-A sensitive-tier suspicions (not alarms: the cohort rule alarms on them).",
            ["fleet", "signal"],
            registry=r,
        )
        self.layer_a_devices = Gauge(
            "tinydrift_layer_a_devices",
            "Devices by layer-A calibration state: reference, calibrating (learning the "
            "null of its signals; not alarmed on yet) or monitoring.",
            ["fleet", "state"],
            registry=r,
        )
        self.drifting_devices = Gauge(
            "tinydrift_drifting_devices",
            "Devices whose signals are outside their reference.",
            ["fleet", "signal"],
            registry=r,
        )
        self.alarm_active = Gauge(
            "tinydrift_drift_alarm_active",
            "1 while a cohort-level drift alarm is active.",
            ["fleet", "model_version", "signal"],
            registry=r,
        )
        self.feature_drift = Gauge(
            "tinydrift_fleet_feature_drift_score",
            "Jensen-Shannon distance of the cohort's feature histogram to its reference.",
            ["fleet", "model_version", "feature"],
            registry=r,
        )
        self.class_ratio = Gauge(
            "tinydrift_prediction_class_ratio",
            "Share of predictions per class in the last window.",
            ["fleet", "model_version", "class"],
            registry=r,
        )
        self.confidence = BulkHistogram(
            "tinydrift_prediction_confidence",
            "Reported confidence of each reading.",
            ("fleet", "model_version"),
            CONF_BUCKETS,
        )
        r.register(self.confidence)
        self.labelled_accuracy = Gauge(
            "tinydrift_labelled_accuracy_ratio",
            "Accuracy on labelled readings, last window.",
            ["fleet", "model_version"],
            registry=r,
        )
        self.estimated_accuracy = Gauge(
            "tinydrift_estimated_accuracy_ratio",
            "Label-free accuracy estimate (CBPE-style; blind to concept shift).",
            ["fleet", "model_version"],
            registry=r,
        )
        self.labels = Counter(
            "tinydrift_labels_received", "Labelled readings received.", ["fleet"], registry=r
        )
        # registry and checkpoints
        self.registry_queue = Gauge(
            "tinydrift_registry_queue_depth", "Writes waiting for the registry.", registry=r
        )
        self.registry_retries = Gauge(
            "tinydrift_registry_write_retries",
            "Registry write retries (locked or lost DB).",
            registry=r,
        )
        self.checkpoints = Counter(
            "tinydrift_checkpoints",
            "Detector checkpoints: committed to the database (ok) or never (error).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("ok", "error"):  # at 0: the first failure shows in increase()
            self.checkpoints.labels(outcome=outcome)
        self.checkpoints_refused = Counter(
            "tinydrift_checkpoints_refused",
            "Stored detector checkpoints unreadable at start (another format, damaged): "
            "their device or cohort learns afresh. kind: device_monitor, cohort_monitor, "
            "suspicion_cohort.",
            ["kind"],
            registry=r,
        )
        # candidates (service/learn)
        self.candidate_runs = Counter(
            "tinydrift_candidate_runs",
            "Candidate builds (recalibration or retrain), by outcome (built or refused).",
            ["fleet", "kind", "outcome"],
            registry=r,
        )
        self.candidate_seconds = Histogram(
            "tinydrift_candidate_build_seconds",
            "Time from request to signed blob (or refusal).",
            ["kind"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.candidate_score = Gauge(
            "tinydrift_candidate_score",
            "Prequential accuracy of the last candidate and of the deployed model, same window.",
            ["fleet", "kind", "model"],
            registry=r,
        )
        self.quantization_error = Gauge(
            "tinydrift_candidate_quantization_loss",
            "Float minus fixed-point accuracy of the last candidate (held-out data).",
            ["fleet", "kind"],
            registry=r,
        )
        self.quantization_agreement = Gauge(
            "tinydrift_candidate_quantization_agreement_ratio",
            "Share of held-out readings where the fixed-point candidate agrees with its float.",
            ["fleet", "kind"],
            registry=r,
        )
        # rollouts (service/rollout)
        self.update_acks = Counter(
            "tinydrift_update_acks",
            "Update acks received from devices, by state and reason (any rollout or none).",
            ["fleet", "state", "reason"],
            registry=r,
        )
        self.update_results = Counter(
            "tinydrift_update_results",
            "Device update results at their end (code 200 confirmed, else the error), by reason.",
            ["fleet", "code", "reason", "phase"],
            registry=r,
        )
        self.devices_by_update_state = Gauge(
            "tinydrift_devices_by_update_state",
            "Devices in active rollouts by update state (PENDING, TRIAL, CONFIRMED, ...).",
            ["fleet", "state"],
            registry=r,
        )
        self.rollouts = Gauge(
            "tinydrift_rollouts", "Rollouts by state.", ["fleet", "state"], registry=r
        )
        self.rollout_transitions = Counter(
            "tinydrift_rollout_transitions",
            "Rollout state transitions, by the state entered.",
            ["fleet", "to_state"],
            registry=r,
        )
        self.rollbacks = Counter(
            "tinydrift_rollbacks",
            "Rollouts rolled back, by cause (gate or operator).",
            ["fleet", "cause"],
            registry=r,
        )
        self.gate_delta = Gauge(
            "tinydrift_canary_gate_delta",
            "Canary minus control figure of the current group (worse direction positive).",
            ["fleet", "metric"],
            registry=r,
        )
        self.gate_margin = Gauge(
            "tinydrift_canary_gate_margin",
            "Non-inferiority margin the canary delta is held to.",
            ["fleet", "metric"],
            registry=r,
        )
        self.manifests_published = Counter(
            "tinydrift_manifests_published",
            "Signed desired-state manifests published, by action.",
            ["fleet", "action"],
            registry=r,
        )
        self.blob_bytes = Counter(
            "tinydrift_blob_bytes_served",
            "Parameter blob bytes served to devices in chunks.",
            ["fleet"],
            registry=r,
        )
        self.blob_requests_refused = Counter(
            "tinydrift_blob_requests_refused",
            "Chunk requests answered with no data: no current install intent of the requesting "
            "device names the blob (no_intent, other_blob), or a malformed request.",
            ["reason"],
            registry=r,
        )
        for reason in FETCH_REFUSALS:
            self.blob_requests_refused.labels(reason=reason)
        self.unsanctioned_versions = Counter(
            "tinydrift_unsanctioned_versions",
            "Devices that reported (in a birth or an ack) a parameter version no rollout of the "
            "service gave them; once per device and version. Audited, with the device id.",
            ["fleet", "source"],
            registry=r,
        )
        for kind in CANDIDATE_KINDS:  # at 0: the first build shows in increase()
            self.candidate_seconds.labels(kind=kind)
        self.model_versions = ModelVersionLabels()
        self.fleets = FleetLabels(max_fleets, fleets, on_admit=self._fleet_series)

    def init_reasons(self, reasons: Sequence[str]) -> None:
        """Create every rejection series at 0, so rates and alerts see them before any occurs."""
        for reason in reasons:
            self.rejected.labels(reason=reason)

    def fleet(self, fleet: str) -> str:
        """The ``fleet`` label value of ``fleet``: itself if admitted, else ``_unknown``."""
        return self.fleets.label(fleet)

    def _fleet_series(self, fleet: str) -> None:
        """Create an admitted fleet's counters at 0."""
        self.readings.labels(fleet=fleet)
        for stream in SEQUENCE_STREAMS:
            self.sequence_gaps.labels(fleet=fleet, stream=stream)
        self.labels.labels(fleet=fleet)
        # update counters exist at 0, so increase() and alerts see the first rollback or push
        for cause in ("gate", "operator"):
            self.rollbacks.labels(fleet=fleet, cause=cause)
        for action in ("install", "confirm", "revert"):
            self.manifests_published.labels(fleet=fleet, action=action)
        for kind in CANDIDATE_KINDS:
            for outcome in ("accepted", "refused"):
                self.candidate_runs.labels(fleet=fleet, kind=kind, outcome=outcome)
        self.blob_bytes.labels(fleet=fleet)
        for source in VERSION_SOURCES:
            self.unsanctioned_versions.labels(fleet=fleet, source=source)

    def exposition(self) -> bytes:
        """The text exposition (what ``/metrics`` serves)."""
        return generate_latest(self.registry)
