"""The operator's update actions in one place: what the API's action routes call.

:class:`UpdateOperations` joins the :class:`~service.rollout.proposals.CandidateProposer`
(propose) and the :class:`~service.rollout.reconciler.RolloutReconciler` (approve, pause,
resume, roll back, view); it satisfies :class:`service.api.state.RolloutOperations`.
"""

from __future__ import annotations

from service.rollout.proposals import CandidateProposer, Proposal, ProposalError
from service.rollout.reconciler import RolloutReconciler, RolloutView

PROPOSAL_KINDS = ("recalibration", "retrain", "parameter_set")


class UpdateOperations:
    """Propose and steer rollouts (thread-safe: the reconciler serialises everything)."""

    def __init__(self, proposer: CandidateProposer, reconciler: RolloutReconciler) -> None:
        self.proposer = proposer
        self.reconciler = reconciler

    def propose(
        self,
        fleet: str,
        kind: str,
        actor: str,
        *,
        devices: list[str] | None = None,
        version: int | None = None,
        auto_approve: bool = False,
    ) -> Proposal:
        """Propose a rollout of ``kind`` (``recalibration``, ``retrain`` or ``parameter_set``)."""
        if kind == "recalibration":
            return self.proposer.propose_recalibration(
                fleet, actor, devices, auto_approve=auto_approve
            )
        if kind == "retrain":
            return self.proposer.propose_retrain(fleet, actor, auto_approve=auto_approve)
        if kind == "parameter_set":
            if version is None:
                raise ProposalError("a parameter_set proposal needs the version to roll out")
            return self.proposer.propose_parameter_set(
                fleet, version, actor, auto_approve=auto_approve
            )
        raise ProposalError(f"unknown proposal kind {kind!r}; one of {', '.join(PROPOSAL_KINDS)}")

    def approve(self, rollout_id: str, actor: str) -> RolloutView:
        """Approve (the canary starts)."""
        return self.reconciler.approve(rollout_id, actor)

    def pause(self, rollout_id: str, actor: str, reason: str = "operator") -> RolloutView:
        """Pause."""
        return self.reconciler.pause(rollout_id, actor, reason)

    def resume(self, rollout_id: str, actor: str) -> RolloutView:
        """Resume."""
        return self.reconciler.resume(rollout_id, actor)

    def rollback(self, rollout_id: str, actor: str, reason: str = "operator") -> RolloutView:
        """Roll back."""
        return self.reconciler.rollback(rollout_id, actor, reason)

    def view(self, rollout_id: str) -> RolloutView:
        """Live view."""
        return self.reconciler.view(rollout_id)
