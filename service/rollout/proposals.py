"""From drift to a proposed rollout: build the candidates, register them, plan the rollout.

Three kinds of proposal, for one fleet at a time (one active rollout per fleet):

- **recalibration** (label-free): every *drifting* device whose raw features moved (layer-A
  alarm, readings buffered since, :class:`~service.learn.recent_readings.RecentReadings`) gets its
  own parameter set: new input normalisation from its fixed reference and its recent readings,
  the fleet's shared weights (:func:`service.learn.recalibration.recalibrate`). Each candidate is
  judged and signed by :func:`service.learn.candidate.register_candidate`; the refused ones are
  reported with their reason and left out. The rollout's members are the accepted devices
  (canary first, then waves). Its control is a few of those same drifting devices *held back*
  on the old parameters (same drift, so the canary must do at least as well as leaving the drift
  alone) and released as the last group once every wave passed. With too few drifting devices
  for that, each device is compared with itself before its update (``self_control``: its
  labelled error on the old parameters since the proposal vs on the new ones). Either way only
  the labelled error decides: a recalibration is *meant* to change a drifted device's confidence
  and class mix; without labels delivery and health decide (the candidate's own split-half check
  is then its quality check).
- **retrain** (labels): river continues learning the deployed model on the fleet's buffered
  labels (:func:`service.learn.retrain.retrain`); one shared candidate for every device on the
  deployed version; control sampled among them.
- **parameter set**: an operator-supplied, already registered set (``tinydrift registry
  import-blob``), e.g. one trained offline. The canary gate is its only check.

Every proposal records its timings and scores as metrics (``tinydrift_candidate_*``) and is
audited. With ``auto_approve`` the rollout starts at once; otherwise it waits for an operator.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from edge_agent.blob import BlobRejectedError, SigningKey, verify_blob
from service.learn.candidate import CandidateResult, GateConfig, register_candidate
from service.learn.deployed import DeployedModel
from service.learn.recalibration import RecalibrationError, recalibrate
from service.learn.recent_readings import RecentReadings
from service.learn.retrain import RetrainConfig, RetrainError, retrain
from service.metrics import ServiceMetrics
from service.registry.records import ParameterSetRecord
from service.registry.store import Registry
from service.rollout.groups import DeviceInfo, bucket, control_salt
from service.rollout.plan import DEFAULT_WAVES, GatePolicy, ParamRef, RolloutPlan
from service.rollout.reconciler import RolloutReconciler, RolloutView

log = logging.getLogger(__name__)

__all__ = [
    "CandidateProposer",
    "FleetDevice",
    "Proposal",
    "ProposalError",
    "ProposalSettings",
    "param_ref",
]

ProposalKind = Literal["recalibration", "retrain", "parameter_set"]


class ProposalError(ValueError):
    """Nothing to propose (no drifting device, no labels, unknown set ...); the message says why."""


@dataclass(frozen=True)
class FleetDevice:
    """What the proposer needs to know of one device (from the directory and the engine)."""

    device: str
    active_version: int | None
    schema_id: str | None
    last_deploy_seq: int
    last_seen: float
    online: bool
    drifting: tuple[str, ...] = ()
    """Layer-A signals still outside the device's reference."""


@dataclass(frozen=True)
class ProposalSettings:
    """How proposed rollouts are formed."""

    canary_size: int = 5
    control_size: int = 5
    waves_pct: tuple[float, ...] = DEFAULT_WAVES
    gates: GatePolicy = field(default_factory=GatePolicy)
    trial_timeout_s: int = 6 * 3600
    min_inferences: int = 200
    min_recent_readings: int = 128
    """Buffered readings a drifting device needs before it is recalibrated."""
    retrain_labels: int = 10_000
    """Newest labelled readings of the fleet a retrain learns from."""
    candidate_gate: GateConfig = field(default_factory=GateConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


@dataclass(frozen=True)
class Proposal:
    """What a proposal produced: the rollout (if any) and each candidate's decision."""

    kind: ProposalKind
    fleet: str
    rollout: RolloutView | None
    accepted: dict[str, int]
    """Device (or ``*`` for a shared set) → parameter version accepted."""
    refused: dict[str, str]
    """Device (or ``*``) → why no candidate was accepted."""
    seconds: float


def param_ref(rec: ParameterSetRecord) -> ParamRef:
    """The manifest's view of a stored parameter set (key id from the blob header).

    Raises :class:`ProposalError` for a blob that does not parse or whose payload does not match
    its header (corrupt or tampered in the registry). The signature is the devices' to check.
    """
    try:
        header = verify_blob(rec.blob, trusted=None, schema_id=None).header
    except BlobRejectedError as exc:
        raise ProposalError(
            f"parameter set {rec.schema_id} v{rec.version} is corrupt or tampered: {exc}"
        ) from exc
    return ParamRef(
        version=rec.version,
        schema_id=rec.schema_id,
        security_epoch=rec.security_epoch,
        blob_len=len(rec.blob),
        blob_sha256=rec.sha256,
        key_id=header.key_id,
    )


def _rollout_id(fleet: str, kind: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{fleet}-{kind}-{stamp}-{secrets.token_hex(2)}"


class CandidateProposer:
    """Builds candidates and proposes rollouts for a fleet (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        reconciler: RolloutReconciler,
        release_key: SigningKey,
        metrics: ServiceMetrics,
        devices_of: Callable[[str], list[FleetDevice]],
        reference_of: Callable[[str, str], tuple[Any, Any, int | None] | None],
        recent: RecentReadings,
        settings: ProposalSettings | None = None,
        on_registered: Callable[[ParameterSetRecord], None] | None = None,
    ) -> None:
        self.registry = registry
        self.reconciler = reconciler
        self.release_key = release_key
        self.metrics = metrics
        self.devices_of = devices_of
        self.reference_of = reference_of
        """``(fleet, device) → (μ_ref, σ_ref, model version)`` of layer A, or ``None``."""
        self.recent = recent
        self.settings = settings or ProposalSettings()
        self.on_registered = on_registered
        """Called with each accepted candidate and each registered set proposed by an operator
        (the service adds it to its catalog and names its model version)."""

    # -- shared ------------------------------------------------------------------------------

    def _fleet(self, fleet: str) -> tuple[list[FleetDevice], int, str]:
        devices = self.devices_of(fleet)
        versions = Counter(
            (d.schema_id, d.active_version)
            for d in devices
            if d.active_version is not None and d.schema_id is not None
        )
        if not versions:
            raise ProposalError(f"fleet {fleet!r} has no device with a known model version")
        (schema_id, version), _ = versions.most_common(1)[0]
        assert schema_id is not None
        assert version is not None
        return devices, version, schema_id

    def _deployed(self, schema_id: str, version: int) -> tuple[DeployedModel, ParamRef]:
        rec = self.registry.get_parameter_set(schema_id, version)
        if rec is None:
            raise ProposalError(
                f"the deployed parameter set {schema_id} v{version} is not in the registry "
                "(import it with `tinydrift registry import-blob`)"
            )
        try:
            return DeployedModel.from_blob(rec.blob), param_ref(rec)
        except BlobRejectedError as exc:
            raise ProposalError(f"stored parameter set v{version} is unreadable: {exc}") from exc

    def _observe(self, fleet: str, kind: str, result: CandidateResult, seconds: float) -> None:
        r = result.report
        m = self.metrics
        fleet = m.fleet(fleet)
        m.candidate_runs.labels(fleet=fleet, kind=kind, outcome=r.decision).inc()
        m.candidate_seconds.labels(kind=kind).observe(seconds)
        m.quantization_error.labels(fleet=fleet, kind=kind).set(r.quantization_loss_pp / 100.0)
        m.quantization_agreement.labels(fleet=fleet, kind=kind).set(r.agreement)
        if r.deployed_accuracy is not None and r.candidate_fixed_accuracy is not None:
            m.candidate_score.labels(fleet=fleet, kind=kind, model="deployed").set(
                r.deployed_accuracy
            )
            m.candidate_score.labels(fleet=fleet, kind=kind, model="candidate").set(
                r.candidate_fixed_accuracy
            )

    def _registered(self, record: ParameterSetRecord) -> None:
        if self.on_registered is not None:
            try:
                self.on_registered(record)
            except Exception:  # the catalog is a convenience; the rollout does not depend on it
                log.exception("parameter set v%d not added to the catalog", record.version)

    def _held_back(self, members: list[str], rollout_id: str) -> tuple[str, ...]:
        """A control from the devices that get a recalibration, held back until the canary
        passed (then released): the fair comparison, same drift, old parameters. Empty when
        there are too few of them for the canary, the gate's minimum control and a wave."""
        s = self.settings
        need = s.gates.quality.min_devices
        size = min(s.control_size, len(members) - s.canary_size)
        if size < need:
            return ()
        ordered = sorted(members, key=lambda dev: (bucket(dev, control_salt(rollout_id)), dev))
        return tuple(ordered[:size])

    def _control(
        self, devices: Sequence[FleetDevice], version: int, exclude: set[str], rollout_id: str
    ) -> tuple[str, ...]:
        healthy = [
            d
            for d in devices
            if d.active_version == version and d.device not in exclude and not d.drifting
        ]
        # online devices first: an offline control reports nothing to compare with
        salt = control_salt(rollout_id)
        healthy.sort(key=lambda d: (not d.online, bucket(d.device, salt), d.device))
        return tuple(d.device for d in healthy[: self.settings.control_size])

    def _plan(
        self,
        fleet: str,
        kind: str,
        rollout_id: str,
        target: ParamRef,
        previous: ParamRef,
        *,
        auto_approve: bool,
        control: tuple[str, ...] = (),
        device_targets: tuple[tuple[str, ParamRef], ...] = (),
        release_control: bool = False,
        self_control: bool = False,
    ) -> RolloutPlan:
        s = self.settings
        gates = s.gates
        if release_control or self_control:  # vs the drifted state: labelled error only
            gates = replace(gates, quality=replace(gates.quality, metrics=("error_rate",)))
        return RolloutPlan(
            rollout_id=rollout_id,
            fleet=fleet,
            target=target,
            previous=previous,
            kind=kind,
            canary_size=s.canary_size,
            control_devices=control,
            waves_pct=s.waves_pct,
            require_approval=not auto_approve,
            trial_timeout_s=s.trial_timeout_s,
            min_inferences=s.min_inferences,
            gates=gates,
            device_targets=device_targets,
            release_control=release_control,
            self_control=self_control,
            control_size=0 if self_control else s.control_size,
        )

    @staticmethod
    def _infos(devices: Sequence[FleetDevice], members: set[str]) -> list[DeviceInfo]:
        return [
            DeviceInfo(
                d.device, d.last_deploy_seq, int(d.last_seen * 1000), d.active_version, d.online
            )
            for d in devices
            if d.device in members
        ]

    def _audit(self, actor: str, proposal: Proposal, extra: dict[str, Any]) -> None:
        self.registry.append_audit(
            actor,
            f"candidate.propose_{proposal.kind}",
            f"fleet:{proposal.fleet}",
            {
                "rollout": proposal.rollout.rollout_id if proposal.rollout else None,
                "accepted": proposal.accepted,
                "refused": proposal.refused,
                "seconds": round(proposal.seconds, 4),
                **extra,
            },
        )

    # -- recalibration -----------------------------------------------------------------------

    def drifting_devices(self, fleet: str) -> list[str]:
        """Devices whose features are still off their reference and have readings buffered."""
        out = []
        for d in self.devices_of(fleet):
            if not {"feature", "feature_var"} & set(d.drifting):
                continue
            if self.recent.count((fleet, d.device)) >= self.settings.min_recent_readings:
                out.append(d.device)
        return sorted(out)

    def propose_recalibration(
        self,
        fleet: str,
        actor: str,
        devices: Sequence[str] | None = None,
        *,
        auto_approve: bool = False,
    ) -> Proposal:
        """One parameter set per drifting device; a rollout over the accepted ones."""
        t0 = time.perf_counter()
        fleet_devices, version, schema_id = self._fleet(fleet)
        deployed, previous = self._deployed(schema_id, version)
        wanted = list(devices) if devices else self.drifting_devices(fleet)
        if not wanted:
            raise ProposalError(
                f"no device of fleet {fleet!r} is drifting on its features with "
                f"{self.settings.min_recent_readings} readings buffered"
            )
        by_id = {d.device: d for d in fleet_devices}
        accepted: dict[str, int] = {}
        refused: dict[str, str] = {}
        targets: list[tuple[str, ParamRef]] = []
        for dev in wanted:
            info = by_id.get(dev)
            if info is None:
                refused[dev] = "unknown device"
                continue
            if info.active_version != version:
                refused[dev] = f"runs v{info.active_version}, not the fleet's v{version}"
                continue
            ref = self.reference_of(fleet, dev)
            if ref is None or ref[2] != version:
                refused[dev] = "no fixed reference for the deployed version yet"
                continue
            recent, rv = self.recent.get((fleet, dev))
            if rv != version or recent.shape[0] < self.settings.min_recent_readings:
                refused[dev] = (
                    f"{recent.shape[0]} recent readings buffered, "
                    f"{self.settings.min_recent_readings} needed"
                )
                continue
            t1 = time.perf_counter()
            try:
                cand = recalibrate(deployed, (ref[0], ref[1]), recent, device=dev)
                result, record = register_candidate(
                    self.registry,
                    deployed,
                    cand,
                    key=self.release_key,
                    recent=recent,
                    gate=self.settings.candidate_gate,
                    device=dev,
                )
            except RecalibrationError as exc:
                refused[dev] = str(exc)
                self.metrics.candidate_runs.labels(
                    fleet=self.metrics.fleet(fleet), kind="recalibration", outcome="refused"
                ).inc()
                continue
            self._observe(fleet, "recalibration", result, time.perf_counter() - t1)
            if record is None:
                refused[dev] = result.report.reason
                continue
            accepted[dev] = record.version
            self._registered(record)
            targets.append((dev, param_ref(record)))
        rollout = None
        if targets:
            rid = _rollout_id(fleet, "recal")
            members = {d for d, _ in targets}
            held_back = self._held_back(sorted(members), rid)
            plan = self._plan(
                fleet,
                "recalibration",
                rid,
                targets[0][1],
                previous,
                auto_approve=auto_approve,
                control=held_back,
                device_targets=tuple(targets),
                release_control=bool(held_back),
                self_control=not held_back,
            )
            rollout = self.reconciler.create(plan, self._infos(fleet_devices, members), actor)
        if rollout is not None:  # their readings served; a new alarm starts a new buffer
            self.recent.untrack((fleet, dev) for dev in accepted)
        proposal = Proposal(
            "recalibration", fleet, rollout, accepted, refused, time.perf_counter() - t0
        )
        self._audit(actor, proposal, {"base_version": version})
        return proposal

    # -- retrain -----------------------------------------------------------------------------

    def propose_retrain(self, fleet: str, actor: str, *, auto_approve: bool = False) -> Proposal:
        """Continue learning the deployed model on the fleet's labels; one shared candidate."""
        t0 = time.perf_counter()
        fleet_devices, version, schema_id = self._fleet(fleet)
        deployed, previous = self._deployed(schema_id, version)
        labels = self.registry.recent_labels(
            fleet, param_version=version, limit=self.settings.retrain_labels
        )
        refused: dict[str, str] = {}
        accepted: dict[str, int] = {}
        rollout = None
        try:
            cand = retrain(deployed, labels.features, labels.label, config=self.settings.retrain)
        except RetrainError as exc:
            raise ProposalError(f"cannot retrain on the buffered labels of {fleet}: {exc}") from exc
        result, record = register_candidate(
            self.registry, deployed, cand, key=self.release_key, gate=self.settings.candidate_gate
        )
        self._observe(fleet, "retrain", result, time.perf_counter() - t0)
        if record is None:
            refused["*"] = result.report.reason
        else:
            accepted["*"] = record.version
            self._registered(record)
            rollout = self._propose_shared(
                fleet, "retrain", fleet_devices, version, previous, record, actor, auto_approve
            )
        proposal = Proposal("retrain", fleet, rollout, accepted, refused, time.perf_counter() - t0)
        self._audit(actor, proposal, {"base_version": version, "labels": int(labels.label.size)})
        return proposal

    def _propose_shared(
        self,
        fleet: str,
        kind: str,
        fleet_devices: list[FleetDevice],
        version: int,
        previous: ParamRef,
        record: ParameterSetRecord,
        actor: str,
        auto_approve: bool,
    ) -> RolloutView:
        members = {d.device for d in fleet_devices if d.active_version == version}
        rid = _rollout_id(fleet, kind.replace("_", "-"))
        control = self._control(fleet_devices, version, set(), rid)
        plan = self._plan(
            fleet, kind, rid, param_ref(record), previous, auto_approve=auto_approve,
            control=control,
        )  # fmt: skip
        return self.reconciler.create(plan, self._infos(fleet_devices, members), actor)

    # -- operator-supplied parameter set -----------------------------------------------------

    def propose_parameter_set(
        self, fleet: str, version: int, actor: str, *, auto_approve: bool = False
    ) -> Proposal:
        """Roll out a registered parameter set of the fleet's schema (canary gate only)."""
        t0 = time.perf_counter()
        fleet_devices, deployed_version, schema_id = self._fleet(fleet)
        _, previous = self._deployed(schema_id, deployed_version)
        rec = self.registry.get_parameter_set(schema_id, version)
        if rec is None:
            raise ProposalError(f"no parameter set {schema_id} v{version} in the registry")
        if rec.status == "bad":
            raise ProposalError(
                f"parameter set v{version} is marked bad (a rollout of it was rolled back)"
            )
        if version == deployed_version:
            raise ProposalError(f"v{version} is what the fleet runs already")
        self._registered(rec)  # imported while running: the service learns it now
        rollout = self._propose_shared(
            fleet, "parameter_set", fleet_devices, deployed_version, previous, rec, actor,
            auto_approve,
        )  # fmt: skip
        proposal = Proposal(
            "parameter_set", fleet, rollout, {"*": version}, {}, time.perf_counter() - t0
        )
        self._audit(actor, proposal, {"base_version": deployed_version})
        return proposal
