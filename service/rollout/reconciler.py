"""The rollout reconciler: runs every :class:`RolloutController` inside the service.

The controllers are pure; this class feeds them and carries out what they return:

- **events in**: births and update acks (from the ingest batcher), a timer tick (gates,
  timeouts; with the canary-vs-control figures measured by :class:`QualityWindow` from live
  telemetry and labels), operator actions (from the API, blocking until done);
- **actions out**: the rollout state, its transitions with their gate figures, audit entries and
  "mark bad" are written in **one registry transaction**; then manifests are signed with the
  deploy key and published retained on each device's ``desired`` topic; metrics are updated.
  Blobs are served to devices in chunks from a :class:`BlobCache` filled from the registry.

Everything runs on one worker thread (``rollout-worker``), in arrival order, so the controllers
need no locks and the MQTT network thread and the ingest thread never wait on the database.
Persisting before publishing means a crash can lose at most publications, never decisions: on
start-up every non-terminal rollout is restored from the registry (devices in TRIAL past their
deadline are reverted) and every device's current manifest is published again (same
``deploy_seq``: harmless for a device that already has it). A device that was offline simply finds
its retained manifest when it reconnects and converges in one step; its birth also re-publishes
it, or re-issues under a newer ``deploy_seq`` if the device saw a newer one.

Every manifest names its fleet and device (the device refuses any other) and is recorded in an
:class:`IntentLedger` before it is published: the chunk server serves a blob only to a device
whose current install intent names it, and a version a device reports (birth, ack) that no
rollout gave it and it did not run when first seen is audited, counted, logged, and the device
is given its last sanctioned version back (unless a rollout owns it): :meth:`on_version`.

A registry write that fails (database locked or gone) is retried on the next event or tick: the
state row is the controller's whole state, and transitions and audit entries are kept until
written. Manifests are only published once the decision that produced them is stored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import paho.mqtt.client as mqtt

from edge_agent.blob import BlobRejectedError, SigningKey, verify_blob
from edge_agent.wire.messages import Manifest, UpdateAck
from service.ingest.frames import DeviceFrame, DeviceLabels
from service.metrics import ServiceMetrics
from service.registry.errors import RegistryError
from service.registry.records import utc_from_unix
from service.registry.rollout_store import RolloutEventRecord, RolloutRecord
from service.registry.store import Registry
from service.rollout.blob_transfer import BlobTransferService
from service.rollout.chunk_server import BlobCache
from service.rollout.controller import (
    IN_PROGRESS,
    MAX_DEPLOY_SEQ,
    SYSTEM_ACTOR,
    Action,
    AuditAction,
    DeviceStatus,
    GroupStatus,
    IllegalTransitionError,
    MarkParameterSetBad,
    MetricEvent,
    PublishManifest,
    RecordTransition,
    RolloutController,
    RolloutStatus,
    RolloutSummary,
)
from service.rollout.desired_state import DesiredStatePublisher
from service.rollout.gates import QualityFigures
from service.rollout.groups import DeviceInfo
from service.rollout.intent_ledger import IntentLedger
from service.rollout.plan import ParamRef, RolloutPlan
from service.rollout.quality_window import QualityWindow
from service.rollout.version_watch import VersionWatch

log = logging.getLogger(__name__)

__all__ = ["ACTIVE_STATES", "RolloutReconciler", "RolloutView", "UnknownRolloutError"]

ACTIVE_STATES: Final = frozenset(
    {
        RolloutStatus.READY,
        RolloutStatus.AWAITING_APPROVAL,
        RolloutStatus.RUNNING,
        RolloutStatus.PAUSED,
    }
)
"""States in which a rollout still owns its fleet (one active rollout per fleet)."""

SEED_LABELS_PER_DEVICE: Final = 200
"""Labels per member read from the label buffer when a rollout starts (its "before" errors)."""

RESTORE_TRIAL_TIMEOUT_S: Final = 6 * 3600
"""Trial timeout of the install that gives a device its sanctioned version back."""
RESTORE_MIN_INFERENCES: Final = 200
"""Inferences after which the device confirms that install itself (local confirmation)."""

OPERATION_TIMEOUT_S: Final = 30.0
"""How long an operator action waits for the worker before it reports a timeout."""

T = TypeVar("T")


class UnknownRolloutError(KeyError):
    """No rollout with this id (API: 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown rollout"


class ServiceStoppingError(RuntimeError):
    """The service is shutting down: no operator action now (API: 503)."""


class RolloutConflictError(ValueError):
    """The fleet already has an active rollout, or a device belongs to one (API: 409)."""


@dataclass(frozen=True)
class RolloutView:
    """What the API shows of a rollout: its summary and current group figures."""

    rollout_id: str
    fleet: str
    kind: str
    status: str
    reason: str
    summary: RolloutSummary
    groups: list[dict[str, Any]]


def _takes_newcomers(ctl: RolloutController) -> bool:
    """Whether a device born in the rollout's fleet mid-rollout joins it (a wave by its id)."""
    return not ctl.plan.members_only and ctl.state.status in (
        RolloutStatus.RUNNING,
        RolloutStatus.PAUSED,
    )


def _settled(ctl: RolloutController) -> bool:
    """No device of the rollout is still moving (downloading, verifying or in trial)."""
    return all(
        p.status not in IN_PROGRESS and p.status is not DeviceStatus.TRIAL
        for p in ctl.state.devices.values()
    )


class RolloutReconciler:
    """Hosts the rollouts of one service; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        client: mqtt.Client,
        deploy_key: SigningKey,
        metrics: ServiceMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.quality = QualityWindow()
        self.cache = BlobCache()
        self.intents = IntentLedger()
        self.versions = VersionWatch()
        """Judged on the worker only; seed it (:meth:`seed_version`) before :meth:`start`."""
        self.publisher = DesiredStatePublisher(client, deploy_key)
        self.transfer = BlobTransferService(
            client,
            self.cache,
            on_served=lambda fleet, n: metrics.blob_bytes.labels(fleet=metrics.fleet(fleet)).inc(n),
            may_fetch=self.intents.may_fetch,
            on_refused=lambda reason: metrics.blob_requests_refused.labels(reason=reason).inc(),
        )
        self.controllers: dict[str, RolloutController] = {}
        self._open_fleets: frozenset[str] = frozenset()
        """Fleets with a running rollout that takes newcomers (worker-written, read by ingest)."""
        self._by_device: dict[tuple[str, str], set[str]] = {}
        self._known_seq: dict[tuple[str, str], int] = {}
        """Highest ``deploy_seq`` issued to or acked by each device, over every rollout."""
        self._pending_events: dict[str, list[RolloutEventRecord]] = {}
        self._pending_audit: list[AuditAction] = []
        self._pending_bad: list[MarkParameterSetBad] = []
        self._dirty: set[str] = set()
        self._unpublished: dict[str, list[PublishManifest]] = {}
        self._ended_at: dict[str, float] = {}
        """Per fleet: when (``clock``, s) its last rollout left the active states or rolled back."""
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="rollout-worker")
        self._started = False
        self._stopped = False
        self.counters: Counter[str] = Counter()

    # -- life cycle ----------------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters the service's MQTT client must subscribe to (chunk requests)."""
        return self.transfer.subscriptions()

    def start(self) -> None:
        """Start chunk serving and restore the stored rollouts (on the worker)."""
        if self._started:
            return
        self._started = True
        self.transfer.start()
        self._submit(self._restore).result(timeout=OPERATION_TIMEOUT_S * 4)

    def stop(self) -> None:
        """Persist what is pending and stop the worker and chunk serving (idempotent)."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        try:
            self._exec.submit(self._persist).result(timeout=OPERATION_TIMEOUT_S)
        except Exception:
            log.exception("rollout state not persisted at shutdown")
        self._exec.shutdown(wait=True)
        self.transfer.stop()

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        return self._exec.submit(self._guard(fn))

    def _guard(self, fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            try:
                return fn()
            except (IllegalTransitionError, UnknownRolloutError, RolloutConflictError, ValueError):
                raise
            except Exception:
                log.exception("rollout worker task failed")
                raise

        return run

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it (operator actions)."""
        if self._stopped:
            raise ServiceStoppingError("the service is stopping; retry when it is back")
        return self._submit(fn).result(timeout=OPERATION_TIMEOUT_S)

    # -- restore -------------------------------------------------------------------------------

    def _restore(self) -> None:
        now = self._now_ms()
        current: set[tuple[str, str]] = set()
        for rec in self.registry.list_rollouts():  # newest first
            status = RolloutStatus(rec.state)
            try:
                ctl, actions = RolloutController.restore(rec.state_json, now)
            except (ValueError, KeyError) as exc:
                log.error("rollout %s cannot be restored: %s", rec.id, exc)
                continue
            for dev, seq in ctl.state.known_seq.items():
                self._note_seq(ctl.plan.fleet, dev, seq)
            self._remember_intents(ctl, current)
            if status not in ACTIVE_STATES and _settled(ctl):
                continue
            self._adopt(ctl)
            self._load_blobs(ctl.plan)
            self.counters["restored"] += 1
            log.info("rollout %s restored in state %s", rec.id, status)
            # acks and publications after the last stored state are lost: every unsettled device
            # gets its intent again under a newer deploy_seq and re-acks where it really is
            self._run(ctl, actions + ctl.resync(now))
        self._refresh_gauges()

    def _remember_intents(self, ctl: RolloutController, current: set[tuple[str, str]]) -> None:
        """The versions a stored rollout gave, and (unless a newer rollout issued the device
        one) each device's retained intent, into the ledger."""
        plan = ctl.plan
        for dev, p in ctl.state.devices.items():
            self.intents.give(plan.fleet, dev, plan.target_for(dev).version)
            if p.phase == "rollback" or p.param == "previous":
                self.intents.give(plan.fleet, dev, plan.previous.version)
            desired = ctl.desired_for(dev)
            if (plan.fleet, dev) not in current and desired is not None:
                current.add((plan.fleet, dev))
                ref = desired.param
                self.intents.record(plan.fleet, dev, desired.action, ref.blob_sha256, ref.version)

    def _adopt(self, ctl: RolloutController) -> None:
        rid = ctl.plan.rollout_id
        self.controllers[rid] = ctl
        fleet = ctl.plan.fleet
        members = set(ctl.state.control)
        for g in ctl.state.groups:
            members.update(g.devices)
        for dev in members:
            self._by_device.setdefault((fleet, dev), set()).add(rid)
        if ctl.state.status in ACTIVE_STATES:
            # every member and the control from now on; the members' labels on the previous
            # version from the label buffer, so each canary device is also its own control
            self.quality.watch(fleet, sorted(members - self.quality.watched(fleet)), self._now_ms())
            self._seed_before(ctl, members)

    def _seed_before(self, ctl: RolloutController, members: set[str]) -> None:
        plan = ctl.plan
        try:
            labels = self.registry.recent_labels(
                plan.fleet,
                param_version=plan.previous.version,
                limit=min(SEED_LABELS_PER_DEVICE * max(len(members), 1), 200_000),
            )
        except RegistryError as exc:
            log.warning("rollout %s: no label history for the quality gate: %s",
                        plan.rollout_id, exc)  # fmt: skip
            return
        counts: dict[str, list[int]] = {}
        for dev, pred, label in zip(labels.device, labels.pred, labels.label, strict=True):
            if dev in members:
                c = counts.setdefault(dev, [0, 0])
                c[0] += 1
                c[1] += int(pred != label)
        for dev, (n, errors) in counts.items():
            self.quality.seed_labels(plan.fleet, dev, plan.previous.version, n, errors)

    def _load_blobs(self, plan: RolloutPlan) -> None:
        for ref in [*plan.targets(), plan.previous]:
            self._cache_blob(ref)

    def _cache_blob(self, ref: ParamRef) -> None:
        if ref.blob_sha256 in self.cache:
            return
        rec = self.registry.get_parameter_set(ref.schema_id, ref.version)
        if rec is None or rec.sha256 != ref.blob_sha256:
            log.error(
                "parameter set %s v%d (sha %s…) is not in the registry: devices cannot fetch it",
                ref.schema_id,
                ref.version,
                ref.blob_sha256[:12],
            )
            return
        self.cache.add(rec.blob)

    # -- events from ingest (never block) ------------------------------------------------------

    def on_ack(self, fleet: str, device: str, ack: UpdateAck) -> None:
        """An update ack (ingest thread): handed to the worker."""
        if self._stopped or (fleet, device) not in self._by_device:
            return
        self._submit(lambda: self._ack(fleet, device, ack))

    def on_birth(
        self,
        fleet: str,
        device: str,
        last_deploy_seq: int,
        active_version: int | None,
        schema_id: str | None = None,
    ) -> None:
        """A device birth (ingest thread): to its rollouts, or, for a device no rollout knows,
        to its fleet's running rollouts that take newcomers (a device provisioned mid-rollout
        joins the wave its id hashes to, if it runs the rollout's parameter schema)."""
        if self._stopped:
            return
        if (fleet, device) not in self._by_device and fleet not in self._open_fleets:
            return
        info = DeviceInfo(device, last_deploy_seq, int(self.clock() * 1000), active_version)
        self._submit(lambda: self._birth(fleet, info, schema_id))

    def seed_version(self, fleet: str, device: str, version: int) -> None:
        """A device's version stored before this start (sanctioned); call before :meth:`start`."""
        self.versions.seed(fleet, device, version)

    def on_version(
        self,
        fleet: str,
        device: str,
        version: int,
        source: str,
        schema_id: str | None,
        last_deploy_seq: int,
    ) -> None:
        """A device reports running ``version`` (ingest thread; ``source``: birth or ack)."""
        if self._stopped:
            return
        self._submit(
            lambda: self._version(fleet, device, version, source, schema_id, last_deploy_seq)
        )

    def on_frames(self, frames: Sequence[DeviceFrame]) -> None:
        """Telemetry (ingest thread): counted for the canary-vs-control figures."""
        self.quality.add_frames(frames)

    def on_labels(self, labels: Sequence[DeviceLabels]) -> None:
        """Labelled readings (ingest thread): counted for the labelled-error figures."""
        self.quality.add_label_batches(labels)

    def tick(self) -> None:
        """Timers and gates (service timer thread): handed to the worker."""
        if not self._stopped and self._started:
            self._submit(self._tick)

    # -- worker --------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _note_seq(self, fleet: str, device: str, seq: int) -> None:
        key = (fleet, device)
        if seq > self._known_seq.get(key, 0):
            self._known_seq[key] = seq

    def _ack(self, fleet: str, device: str, ack: UpdateAck) -> None:
        now = self._now_ms()
        self._note_seq(fleet, device, ack.deploy_seq)
        for rid in sorted(self._by_device.get((fleet, device), ())):
            ctl = self.controllers[rid]
            try:
                actions = ctl.on_ack(device, ack.deploy_seq, ack.state, ack.reason, now)
            except ValueError as exc:
                self.counters["ack_refused"] += 1
                log.warning("ack of %s/%s refused: %s", fleet, device, exc)
                continue
            if actions:
                self._run(ctl, actions)
            else:
                self._dirty.add(rid)  # progress changed: stored with the next tick

    def _version(
        self,
        fleet: str,
        device: str,
        version: int,
        source: str,
        schema_id: str | None,
        last_deploy_seq: int,
    ) -> None:
        """Judge a reported version; an unsanctioned one is audited, counted, logged, and the
        device is given its last sanctioned version back (README, reliability)."""
        approved = self.versions.last_sanctioned(fleet, device)
        given = self.intents.given(fleet, device)
        verdict = self.versions.report(fleet, device, version, given, birth=source == "birth")
        if verdict != "unsanctioned":
            return
        owned = any(
            self.controllers[rid].state.status in ACTIVE_STATES
            for rid in self._by_device.get((fleet, device), ())
        )
        remedy, outcome = self._remedy(fleet, device, approved, schema_id, last_deploy_seq, owned)
        self.counters["unsanctioned_versions"] += 1
        self.metrics.unsanctioned_versions.labels(
            fleet=self.metrics.fleet(fleet), source=source
        ).inc()
        log.warning(
            "%s/%s reports parameter version %d (%s), which no rollout gave it; its sanctioned "
            "version is %s: %s",
            fleet,
            device,
            version,
            source,
            approved,
            outcome,
        )
        self._pending_audit.append(
            AuditAction(
                SYSTEM_ACTOR,
                "device.unsanctioned_version",
                f"device:{fleet}/{device}",
                {
                    "fleet": fleet,
                    "device": device,
                    "version": version,
                    "source": source,
                    "sanctioned_version": approved,
                    "remedy": outcome,
                    "deploy_seq": remedy.deploy_seq if remedy is not None else None,
                },
            )
        )
        if not self._persist():
            self.versions.forget_flag(fleet, device, version)  # judged again on the next report
            return
        if remedy is not None:
            self._sign_and_publish(fleet, remedy)

    def _remedy(
        self,
        fleet: str,
        device: str,
        approved: int | None,
        schema_id: str | None,
        last_deploy_seq: int,
        owned: bool,
    ) -> tuple[PublishManifest | None, str]:
        """The install giving the device its sanctioned version back, or why there is none."""
        if owned:
            return None, "left to the device's active rollout, whose intent stays retained"
        if approved is None or schema_id is None:
            return None, "no sanctioned version known to give back"
        rec = self.registry.get_parameter_set(schema_id, approved)
        if rec is None:
            return None, f"sanctioned v{approved} is not in the registry"
        try:
            header = verify_blob(rec.blob, trusted=None, schema_id=None).header
        except BlobRejectedError as exc:
            return None, f"sanctioned v{approved} is unreadable: {exc}"
        seq = max(self._known_seq.get((fleet, device), 0), last_deploy_seq) + 1
        if seq > MAX_DEPLOY_SEQ:
            return None, "the device can take no larger deploy_seq"
        ref = ParamRef(
            version=approved,
            schema_id=schema_id,
            security_epoch=rec.security_epoch,
            blob_len=len(rec.blob),
            blob_sha256=rec.sha256,
            key_id=header.key_id,
        )
        remedy = PublishManifest(
            device=device,
            deploy_seq=seq,
            action="install",
            param=ref,
            rollback=True,
            trial_confirm="local",
            trial_timeout_s=RESTORE_TRIAL_TIMEOUT_S,
            min_inferences=RESTORE_MIN_INFERENCES,
        )
        return remedy, f"v{approved} re-issued (install, rollback) under deploy_seq {seq}"

    def _birth(self, fleet: str, info: DeviceInfo, schema_id: str | None) -> None:
        now = self._now_ms()
        key = (fleet, info.device_id)
        self._note_seq(fleet, info.device_id, info.last_deploy_seq)
        known = self._by_device.get(key, set())
        newcomer_to = [
            rid
            for rid, ctl in self.controllers.items()
            if rid not in known
            and ctl.plan.fleet == fleet
            and ctl.plan.target.schema_id == schema_id
            and _takes_newcomers(ctl)
        ]
        for rid in sorted(known) + sorted(newcomer_to):
            ctl = self.controllers[rid]
            actions = ctl.on_birth(info, now)
            if rid not in known and ctl.is_member(info.device_id):
                # joined a wave: its acks, frames and labels are this rollout's from now on
                self._by_device.setdefault(key, set()).add(rid)
                self.quality.watch(fleet, [info.device_id], now)
            if actions:
                self._run(ctl, actions)
            else:
                self._dirty.add(rid)

    def _tick(self) -> None:
        now = self._now_ms()
        for rid, ctl in list(self.controllers.items()):
            quality = self._quality_for(ctl, now)
            actions = ctl.tick(now, quality)
            if actions:
                self._run(ctl, actions)
            elif rid in self._dirty:
                self._persist()
        self._persist()
        self._refresh_gauges()

    def _quality_for(self, ctl: RolloutController, now: int) -> dict[str, QualityFigures]:
        group = ctl._group()
        if group is None or group.status is not GroupStatus.SOAKING:
            return {}
        plan = ctl.plan
        canary = {d: plan.target_for(d).version for d in group.devices}
        before = {d: plan.previous.version for d in group.devices}
        if plan.self_control:  # the same devices before their update
            control = before
        else:
            control = {d: plan.previous.version for d in ctl.state.control}
        return {group.name: self.quality.figures(plan.fleet, canary, control, now, before)}

    def _run(self, ctl: RolloutController, actions: Iterable[Action]) -> None:
        """Carry out ``actions`` of ``ctl``: persist first, then publish, then metrics."""
        rid = ctl.plan.rollout_id
        actions = list(actions)
        if all(isinstance(a, MetricEvent) for a in actions):
            # only counters moved (e.g. a CONFIRMED ack): store with the next tick, not now. A
            # crash before it loses nothing a restart's resync would not recover.
            self._dirty.add(rid)
            for ev in actions:
                assert isinstance(ev, MetricEvent)
                self._metric(ctl, ev)
            return
        publish: list[PublishManifest] = []
        metric_events: list[MetricEvent] = []
        for a in actions:
            if isinstance(a, PublishManifest):
                publish.append(a)
            elif isinstance(a, AuditAction):
                self._pending_audit.append(a)
                if a.action == "rollout.device_excluded":
                    log.warning(
                        "rollout %s: %s/%s excluded: it reported deploy_seq %s, the largest "
                        "there is, and can take no further update (re-provision its update "
                        "state to update it again)",
                        rid,
                        ctl.plan.fleet,
                        a.details.get("device"),
                        a.details.get("last_deploy_seq"),
                    )
            elif isinstance(a, RecordTransition):
                self._pending_events.setdefault(rid, []).append(
                    RolloutEventRecord(
                        rollout_id=a.rollout_id,
                        ts=utc_from_unix(a.at_ms / 1000),
                        scope=a.scope,
                        name=a.name,
                        from_state=str(a.from_state),
                        to_state=str(a.to_state),
                        actor=a.actor,
                        reason=a.reason,
                        figures=a.figures,
                    )
                )
                self._on_transition(ctl, a)
            elif isinstance(a, MarkParameterSetBad):
                self._pending_bad.append(a)
            else:
                metric_events.append(a)
        self._dirty.add(rid)
        stored = self._persist()
        if stored:
            for m in publish:
                self._publish(ctl, m)
        else:
            # not stored: publish nothing now; the intents stay in the state and are published
            # again by the next successful persist (the state row is re-written whole)
            self._unpublished.setdefault(rid, []).extend(publish)
        for ev in metric_events:
            self._metric(ctl, ev)

    def _on_transition(self, ctl: RolloutController, a: RecordTransition) -> None:
        fleet = ctl.plan.fleet
        if a.scope == "rollout":
            self.metrics.rollout_transitions.labels(
                fleet=self.metrics.fleet(fleet), to_state=str(a.to_state)
            ).inc()
            log.info("rollout %s: %s → %s (%s)", a.rollout_id, a.from_state, a.to_state, a.reason)
            if a.to_state not in ACTIVE_STATES:  # FINISHED, STOPPED, ROLLED_BACK
                self._ended_at[fleet] = a.at_ms / 1000
                self.quality.unwatch(
                    fleet, [*ctl.state.control, *(d for g in ctl.state.groups for d in g.devices)]
                )
            return
        log.info("rollout %s group %s: %s → %s", a.rollout_id, a.name, a.from_state, a.to_state)
        if a.to_state in (GroupStatus.PASSED, GroupStatus.FAILED):
            group = next(g for g in ctl.state.groups if g.name == a.name)
            self.quality.unwatch(fleet, group.devices)

    def _persist(self) -> bool:
        """Write dirty rollouts, pending transitions, audit entries, bad marks: one transaction."""
        if not (self._dirty or self._pending_audit or self._pending_bad):
            return True
        try:
            with self.registry.transaction() as tx:
                for rid in sorted(self._dirty):
                    ctl = self.controllers[rid]
                    tx.save_rollout(self._record(ctl), self._pending_events.get(rid, ()))
                for a in self._pending_audit:
                    tx.append_audit(a.actor, a.action, a.target, a.details)
                for b in self._pending_bad:
                    tx.set_parameter_status(
                        b.schema_id, b.version, "bad", "rollout-controller", b.reason
                    )
        except RegistryError as exc:
            self.counters["persist_failed"] += 1
            log.error("rollout state not stored yet (will retry): %s", exc)
            return False
        self._dirty.clear()
        self._pending_events.clear()
        self._pending_audit.clear()
        self._pending_bad.clear()
        if self._unpublished:
            held, self._unpublished = self._unpublished, {}
            for rid, items in held.items():
                for m in items:
                    self._publish(self.controllers[rid], m)
        return True

    def _record(self, ctl: RolloutController) -> RolloutRecord:
        st = ctl.state
        plan = ctl.plan
        return RolloutRecord(
            id=plan.rollout_id,
            fleet=plan.fleet,
            schema_id=plan.target.schema_id,
            from_version=plan.previous.version,
            to_version=plan.target.version,
            kind=plan.kind,
            state=st.status.value,
            created=utc_from_unix(st.created_ms / 1000),
            updated=utc_from_unix(st.updated_ms / 1000),
            state_json=ctl.to_json(),
        )

    def _publish(self, ctl: RolloutController, m: PublishManifest) -> None:
        self._sign_and_publish(ctl.plan.fleet, m)

    def _sign_and_publish(self, fleet: str, m: PublishManifest) -> None:
        """Record the intent, then sign (bound to ``fleet/m.device``) and publish it retained."""
        ref = m.param
        manifest = Manifest.create(
            fleet=fleet,
            device=m.device,
            deploy_seq=m.deploy_seq,
            action=m.action,
            rollback=m.rollback,
            param={
                "version": ref.version,
                "schema_id": ref.schema_id,
                "security_epoch": ref.security_epoch,
                "blob_len": ref.blob_len,
                "blob_sha256": ref.blob_sha256,
                "key_id": ref.key_id,
            },
            trial={
                "confirm": m.trial_confirm,
                "timeout_s": m.trial_timeout_s,
                "min_inferences": m.min_inferences,
            },
            issued_ms=self._now_ms(),
        )
        self._cache_blob(ref)
        self._note_seq(fleet, m.device, m.deploy_seq)
        # recorded before it is published: the device cannot ask for the blob, or report the
        # version, before the ledger knows it was given
        self.intents.record(fleet, m.device, m.action, ref.blob_sha256, ref.version)
        self.publisher.publish(fleet, m.device, manifest)
        self.metrics.manifests_published.labels(
            fleet=self.metrics.fleet(fleet), action=m.action
        ).inc()

    def _metric(self, ctl: RolloutController, ev: MetricEvent) -> None:
        m = self.metrics
        fleet = m.fleet(ctl.plan.fleet)
        if ev.name == "update_results":
            m.update_results.labels(
                fleet=fleet,
                code=ev.labels.get("code", ""),
                reason=ev.labels.get("reason", ""),
                phase=ev.labels.get("phase", ""),
            ).inc(ev.value)
        elif ev.name == "rollout_rollbacks":
            cause = "gate" if ctl.state.reason.startswith("gate failed") else "operator"
            m.rollbacks.labels(fleet=fleet, cause=cause).inc(ev.value)
        elif ev.name == "canary_gate_delta":
            m.gate_delta.labels(fleet=fleet, metric=ev.labels.get("metric", "")).set(ev.value)
        # "rollout_state" (per rollout id) is summarised by _refresh_gauges instead

    def _refresh_gauges(self) -> None:
        self._open_fleets = frozenset(
            c.plan.fleet for c in self.controllers.values() if _takes_newcomers(c)
        )
        m = self.metrics
        states: Counter[tuple[str, str]] = Counter()
        devices: Counter[tuple[str, str]] = Counter()
        for ctl in self.controllers.values():
            fleet = m.fleet(ctl.plan.fleet)
            states[(fleet, ctl.state.status.value)] += 1
            for p in ctl.state.devices.values():
                devices[(fleet, p.status.value)] += 1
            group = ctl._group()
            figures = group.figures if group is not None else None
            for check in (figures or {}).get("checks", ()):
                m.gate_delta.labels(fleet=fleet, metric=check["metric"]).set(check["delta"])
                m.gate_margin.labels(fleet=fleet, metric=check["metric"]).set(check["margin"])
        m.rollouts.clear()
        for (fleet, state), n in states.items():
            m.rollouts.labels(fleet=fleet, state=state).set(n)
        m.devices_by_update_state.clear()
        for (fleet, state), n in devices.items():
            m.devices_by_update_state.labels(fleet=fleet, state=state).set(n)

    # -- operator operations (API thread; block until the worker is done) ----------------------

    def create(
        self, plan: RolloutPlan, devices: list[DeviceInfo], actor: str, *, start: bool = True
    ) -> RolloutView:
        """Create a rollout (READY) and submit it: AWAITING_APPROVAL, or RUNNING if auto."""

        def run() -> RolloutView:
            for other in self.controllers.values():
                if other.plan.fleet == plan.fleet and other.state.status in ACTIVE_STATES:
                    raise RolloutConflictError(
                        f"fleet {plan.fleet} already has rollout {other.plan.rollout_id} in "
                        f"state {other.state.status}; finish, roll back or stop it first"
                    )
            if plan.rollout_id in self.controllers or self.registry.get_rollout(plan.rollout_id):
                raise RolloutConflictError(f"rollout {plan.rollout_id} exists already")
            now = self._now_ms()
            # a device has seen the manifests of earlier rollouts: continue above them
            devices_ = [
                replace(
                    d,
                    last_deploy_seq=max(
                        d.last_deploy_seq, self._known_seq.get((plan.fleet, d.device_id), 0)
                    ),
                )
                for d in devices
            ]
            ctl, actions = RolloutController.create(plan, devices_, now, actor)
            self._adopt(ctl)
            self._load_blobs(plan)
            if start:
                actions += ctl.start(now, actor)
            self._run(ctl, actions)
            self._refresh_gauges()
            return self._view(ctl)

        return self._call(run)

    def _get(self, rollout_id: str) -> RolloutController:
        ctl = self.controllers.get(rollout_id)
        if ctl is not None:
            return ctl
        rec = self.registry.get_rollout(rollout_id)
        if rec is None:
            raise UnknownRolloutError(f"no rollout {rollout_id!r}")
        ctl, actions = RolloutController.restore(rec.state_json, self._now_ms())
        self._adopt(ctl)
        self._load_blobs(ctl.plan)
        if actions:
            self._run(ctl, actions)
        return ctl

    def _operate(
        self, rollout_id: str, op: Callable[[RolloutController, int], list[Action]]
    ) -> RolloutView:
        def run() -> RolloutView:
            ctl = self._get(rollout_id)
            actions = op(ctl, self._now_ms())
            self._run(ctl, actions)
            self._refresh_gauges()
            return self._view(ctl)

        return self._call(run)

    def approve(self, rollout_id: str, actor: str) -> RolloutView:
        """AWAITING_APPROVAL → RUNNING."""
        return self._operate(rollout_id, lambda c, now: c.approve(actor, now))

    def pause(self, rollout_id: str, actor: str, reason: str = "operator") -> RolloutView:
        """RUNNING → PAUSED."""
        return self._operate(rollout_id, lambda c, now: c.pause(actor, now, reason))

    def resume(self, rollout_id: str, actor: str) -> RolloutView:
        """PAUSED → RUNNING."""
        return self._operate(rollout_id, lambda c, now: c.resume(actor, now))

    def rollback(self, rollout_id: str, actor: str, reason: str = "operator") -> RolloutView:
        """Roll back (RUNNING, PAUSED or FINISHED): previous parameters everywhere, set bad."""
        return self._operate(rollout_id, lambda c, now: c.rollback(actor, now, reason))

    def view(self, rollout_id: str) -> RolloutView:
        """The live view of one rollout."""
        return self._call(lambda: self._view(self._get(rollout_id)))

    def views(self) -> list[RolloutView]:
        """Live views of the rollouts the worker holds."""
        return self._call(lambda: [self._view(c) for c in self.controllers.values()])

    def active_fleets(self) -> set[str]:
        """Fleets with an active rollout (worker state; for the candidate policy)."""
        return self._call(
            lambda: {
                c.plan.fleet for c in self.controllers.values() if c.state.status in ACTIVE_STATES
            }
        )

    def rollouts_ended_ago(self) -> dict[str, float]:
        """Per fleet, seconds since its last rollout ended: FINISHED, STOPPED or ROLLED_BACK.

        Every such transition counts (a FINISHED rollout rolled back later ends again). Only
        transitions this reconciler carried out are known (none from before a restart). Ages,
        not times, so that the caller may keep its own clock (the update policy's settle timer).
        """

        def run() -> dict[str, float]:
            now = self.clock()
            return {fleet: max(0.0, now - t) for fleet, t in self._ended_at.items()}

        return self._call(run)

    def _view(self, ctl: RolloutController) -> RolloutView:
        st = ctl.state
        groups = [
            {
                "name": g.name,
                "status": g.status.value,
                "devices": len(g.devices),
                "figures": g.figures,
            }
            for g in st.groups
        ]
        groups.append(
            {"name": "control", "status": "held", "devices": len(st.control), "figures": None}
        )
        return RolloutView(
            rollout_id=ctl.plan.rollout_id,
            fleet=ctl.plan.fleet,
            kind=ctl.plan.kind,
            status=st.status.value,
            reason=st.reason,
            summary=ctl.summary(),
            groups=groups,
        )

    def flush(self) -> None:
        """Wait until every event submitted so far is processed (tests, shutdown)."""
        self._call(lambda: None)
