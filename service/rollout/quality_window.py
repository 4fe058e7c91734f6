"""Canary-vs-control figures from live telemetry: :class:`QualityWindow`.

The quality gate (:mod:`service.rollout.gates`) decides on :class:`QualityFigures` that the
caller measures. This module measures them: for every device it watches, keyed by (fleet,
device) since fleets may reuse device ids, it accumulates, per
model version, the readings, the sum of reported confidences, the predicted-class counts and,
from labels, the labelled readings and errors, since the window was last reset for that device.

Arms are formed when the gate asks: the *canary* arm is the group's devices counted on their new
(target) version, the *control* arm the control devices counted on the previous version, both
over the same window (the group's soak). Devices are the unit of the confidence spread
(``confidence_sd`` of per-device means), because readings within one device are correlated.

Thread use: ``add_frames`` / ``add_labels`` run on the ingest thread, ``figures`` and ``reset``
on the rollout worker; one lock guards the accumulators (a few dict lookups per frame).

>>> import numpy as np
>>> w = QualityWindow()
>>> w.watch("f", ["c1", "k1"], now_ms=0)
>>> w.add("f", "c1", 2, np.array([0, 1, 1]), np.array([0.9, 0.8, 0.7]))
>>> w.add("f", "k1", 1, np.array([0, 0]), np.array([0.6, 0.6]))
>>> w.add("g", "c1", 2, np.array([1]), np.array([0.1]))  # another fleet's c1: not watched
>>> q = w.figures("f", {"c1": 2}, {"k1": 1}, now_ms=1000)
>>> q.canary.readings, round(q.canary.mean_confidence, 2), q.control.readings
(3, 0.8, 2)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.rollout.gates import ArmFigures, QualityFigures

__all__ = ["MIN_DEVICE_LABELS", "QualityWindow", "js_divergence"]

MIN_DEVICE_LABELS = 20
"""Labels a device needs in the window for its error rate to count in the between-device spread."""


class FrameLike(Protocol):
    """What :meth:`QualityWindow.add_frames` reads of a frame (``DeviceFrame`` has it)."""

    @property
    def fleet(self) -> str:
        """Fleet id."""

    @property
    def device(self) -> str:
        """Device id."""

    @property
    def param_version(self) -> int:
        """Model version that produced the predictions."""

    @property
    def pred(self) -> npt.NDArray[np.int64]:
        """Predicted classes."""

    @property
    def conf(self) -> npt.NDArray[np.float64]:
        """Reported confidences."""


class LabelsLike(Protocol):
    """What :meth:`QualityWindow.add_label_batches` reads (``DeviceLabels`` has it)."""

    @property
    def fleet(self) -> str:
        """Fleet id."""

    @property
    def device(self) -> str:
        """Device id."""

    @property
    def param_version(self) -> int:
        """Model version that made the predictions."""

    @property
    def pred(self) -> npt.NDArray[np.int64]:
        """Predicted classes."""

    @property
    def label(self) -> npt.NDArray[np.int64]:
        """The true classes."""


@dataclass
class _Acc:
    readings: int = 0
    conf_sum: float = 0.0
    classes: dict[int, int] = field(default_factory=dict)
    labelled: int = 0
    errors: int = 0


def js_divergence(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen–Shannon divergence in bits (0 … 1) of two count or probability vectors.

    >>> js_divergence([1, 0], [0, 1]), js_divergence([2, 2], [5, 5])
    (1.0, 0.0)
    """
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, 0.5 * kl(a) + 0.5 * kl(b))


class QualityWindow:
    """Per-(fleet, device), per-version accumulators of the devices in active rollouts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acc: dict[tuple[str, str], dict[int, _Acc]] = {}
        self._since: dict[tuple[str, str], int] = {}

    def watched(self, fleet: str) -> frozenset[str]:
        """Devices of ``fleet`` currently accumulated."""
        with self._lock:
            return frozenset(dev for f, dev in self._acc if f == fleet)

    def watch(self, fleet: str, devices: Iterable[str], now_ms: int) -> None:
        """Start (or restart) the window of ``fleet``'s ``devices`` at ``now_ms``."""
        with self._lock:
            for dev in devices:
                self._acc[(fleet, dev)] = {}
                self._since[(fleet, dev)] = now_ms

    def unwatch(self, fleet: str, devices: Iterable[str]) -> None:
        """Stop accumulating ``fleet``'s ``devices``."""
        with self._lock:
            for dev in devices:
                self._acc.pop((fleet, dev), None)
                self._since.pop((fleet, dev), None)

    def add(
        self,
        fleet: str,
        device: str,
        version: int,
        pred: npt.NDArray[np.int64],
        conf: npt.NDArray[np.float64],
    ) -> None:
        """Count one telemetry frame of ``device`` on model ``version`` (ignored if unwatched)."""
        with self._lock:
            self._add((fleet, device), version, pred, conf)

    def add_frames(self, frames: Iterable[FrameLike]) -> None:
        """Count a drained batch of frames (one lock; unwatched devices cost a dict lookup)."""
        if not self._acc:
            return
        with self._lock:
            for fr in frames:
                self._add((fr.fleet, fr.device), fr.param_version, fr.pred, fr.conf)

    def _add(
        self,
        device: tuple[str, str],
        version: int,
        pred: npt.NDArray[np.int64],
        conf: npt.NDArray[np.float64],
    ) -> None:
        per = self._acc.get(device)
        if per is None:
            return
        acc = per.setdefault(version, _Acc())
        acc.readings += int(pred.shape[0])
        acc.conf_sum += float(conf.sum())
        counts = np.bincount(pred)
        for cls in np.flatnonzero(counts).tolist():
            acc.classes[cls] = acc.classes.get(cls, 0) + int(counts[cls])

    def seed_labels(
        self, fleet: str, device: str, version: int, labelled: int, errors: int
    ) -> None:
        """Count labels of ``device`` on ``version`` from before the window (the label buffer),
        so a device's error *before* its update is known when the rollout starts at once."""
        with self._lock:
            per = self._acc.get((fleet, device))
            if per is None:
                return
            acc = per.setdefault(version, _Acc())
            acc.labelled += labelled
            acc.errors += errors

    def add_labels(
        self,
        fleet: str,
        device: str,
        version: int,
        pred: npt.NDArray[np.int64],
        label: npt.NDArray[np.int64],
    ) -> None:
        """Count labelled readings of ``device`` on ``version`` (ignored if unwatched)."""
        with self._lock:
            self._add_labels((fleet, device), version, pred, label)

    def add_label_batches(self, batches: Iterable[LabelsLike]) -> None:
        """Count a drained list of label batches (one lock, like :meth:`add_frames`)."""
        if not self._acc:
            return
        with self._lock:
            for lb in batches:
                self._add_labels((lb.fleet, lb.device), lb.param_version, lb.pred, lb.label)

    def _add_labels(
        self,
        device: tuple[str, str],
        version: int,
        pred: npt.NDArray[np.int64],
        label: npt.NDArray[np.int64],
    ) -> None:
        per = self._acc.get(device)
        if per is None:
            return
        acc = per.setdefault(version, _Acc())
        acc.labelled += int(label.shape[0])
        acc.errors += int(np.count_nonzero(pred != label))

    def _arm(
        self, fleet: str, members: Mapping[str, int]
    ) -> tuple[ArmFigures, dict[int, int], int]:
        means: list[float] = []
        err_rates: list[float] = []
        readings = labelled = errors = 0
        conf_sum = 0.0
        classes: dict[int, int] = {}
        start = 0
        for dev, version in members.items():
            acc = self._acc.get((fleet, dev), {}).get(version)
            start = max(start, self._since.get((fleet, dev), 0))
            if acc is None or acc.readings == 0:
                continue
            if acc.labelled >= MIN_DEVICE_LABELS:
                err_rates.append(acc.errors / acc.labelled)
            means.append(acc.conf_sum / acc.readings)
            readings += acc.readings
            conf_sum += acc.conf_sum
            labelled += acc.labelled
            errors += acc.errors
            for cls, n in acc.classes.items():
                classes[cls] = classes.get(cls, 0) + n
        sd = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
        arm = ArmFigures(
            devices=len(means),
            readings=readings,
            mean_confidence=conf_sum / readings if readings else 0.0,
            confidence_sd=sd,
            labelled=labelled,
            errors=errors,
            error_sd=float(np.std(err_rates, ddof=1)) if len(err_rates) > 1 else 0.0,
            labelled_devices=len(err_rates),
        )
        return arm, classes, start

    def _paired(
        self, fleet: str, canary: Mapping[str, int], before: Mapping[str, int]
    ) -> tuple[int, float | None, float | None]:
        diffs: list[float] = []
        variances: list[float] = []
        for dev, new_version in canary.items():
            per = self._acc.get((fleet, dev), {})
            new, old = per.get(new_version), per.get(before.get(dev, -1))
            if new is None or old is None:
                continue
            if min(new.labelled, old.labelled) < MIN_DEVICE_LABELS:
                continue
            p1, p0 = new.errors / new.labelled, old.errors / old.labelled
            diffs.append(p1 - p0)
            variances.append(p1 * (1 - p1) / new.labelled + p0 * (1 - p0) / old.labelled)
        n = len(diffs)
        if n == 0:
            return 0, None, None
        spread = float(np.var(diffs, ddof=1)) if n > 1 else 0.0
        # the larger of the between-device and the within-device (binomial) variance
        se = math.sqrt(max(spread, float(np.mean(variances))) / n)
        return n, float(np.mean(diffs)), se

    def figures(
        self,
        fleet: str,
        canary: Mapping[str, int],
        control: Mapping[str, int],
        now_ms: int,
        before: Mapping[str, int] | None = None,
    ) -> QualityFigures:
        """Figures of ``fleet``'s ``canary`` (device → new version) vs ``control`` (device → old
        version).

        ``before`` (canary device → its version before the update) adds the paired, before/after
        error comparison of the canary devices (:attr:`QualityFigures.paired_error_delta`).
        """
        with self._lock:
            can, can_cls, s1 = self._arm(fleet, canary)
            ctl, ctl_cls, s2 = self._arm(fleet, control)
            paired = self._paired(fleet, canary, before) if before else (0, None, None)
        keys = sorted(set(can_cls) | set(ctl_cls))
        js = js_divergence([can_cls.get(k, 0) for k in keys], [ctl_cls.get(k, 0) for k in keys])
        return QualityFigures(
            canary=can,
            control=ctl,
            class_js=js,
            window_start_ms=max(s1, s2),
            window_end_ms=now_ms,
            paired_devices=paired[0],
            paired_error_delta=paired[1],
            paired_error_se=paired[2],
        )
