"""The update policy: when drift has settled, propose (or start) the update that answers it.

``tinydrift serve --update-policy``: ``off`` leaves every proposal to the operator; ``propose``
builds the candidates and creates the rollout, which waits for an operator's approval; ``auto``
also starts it (the canary gate is then the only judge).

Per fleet without an active rollout, each pass (every ``policy_interval_s``):

1. **Recalibration** when devices drift on their *features* and have readings buffered
   (:meth:`CandidateProposer.drifting_devices`): sensor aging, label-free.
2. Otherwise **retrain** when at least ``max(2, 10 %)`` of the fleet's devices are off their
   reference on the *labelled error* (a concept change that inputs do not show).

Either set must stay the same for ``policy_settle_s`` before anything is proposed: devices'
alarms come seconds to minutes apart, and one rollout for all of them is better than one each.
The settle time also counts from the end of the fleet's last rollout (FINISHED, STOPPED or
ROLLED_BACK, :meth:`RolloutReconciler.rollouts_ended_ago`): a set watched since before a rollout
is not "settled" the moment that rollout ends; its devices' drift must first show how it stands
after the update (or the revert). A proposal that is refused (no candidate passed its checks) is
logged and retried after the set changes again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from service.registry.errors import RegistryError
from service.rollout.proposals import FleetDevice, Proposal, ProposalError

log = logging.getLogger(__name__)

PolicyMode = Literal["off", "propose", "auto"]

RETRAIN_MIN_SHARE = 0.10
"""Share of a fleet's devices drifting on the labelled error that triggers a retrain."""


class PolicyProposer(Protocol):
    """What the policy uses of :class:`~service.rollout.proposals.CandidateProposer`."""

    @property
    def devices_of(self) -> Callable[[str], list[FleetDevice]]: ...

    def drifting_devices(self, fleet: str) -> list[str]: ...

    def propose_recalibration(
        self,
        fleet: str,
        actor: str,
        devices: Sequence[str] | None = None,
        *,
        auto_approve: bool = False,
    ) -> Proposal: ...

    def propose_retrain(
        self, fleet: str, actor: str, *, auto_approve: bool = False
    ) -> Proposal: ...


class PolicyRollouts(Protocol):
    """What the policy uses of :class:`~service.rollout.reconciler.RolloutReconciler`."""

    def active_fleets(self) -> set[str]: ...

    def rollouts_ended_ago(self) -> dict[str, float]: ...


class UpdatePolicy:
    """Decides, per fleet, whether to propose an update now (see the module docstring)."""

    def __init__(
        self,
        mode: PolicyMode,
        proposer: PolicyProposer,
        reconciler: PolicyRollouts,
        fleets: Callable[[], set[str]],
        *,
        settle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self.proposer = proposer
        self.reconciler = reconciler
        self.fleets = fleets
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[frozenset[str], float]] = {}

    def _settled(self, fleet: str, kind: str, ready: frozenset[str], ended: float | None) -> bool:
        """Whether ``ready`` (non-empty) has stayed the same for ``settle_s`` by now.

        Counted from the later of its first sighting and ``ended``, the end of the fleet's last
        rollout on the policy's clock (``None``: no rollout ended).
        """
        now = self.clock()
        key = (fleet, kind)
        seen = self._seen.get(key)
        if seen is None or seen[0] != ready:
            self._seen[key] = seen = (ready, now)
        since = seen[1] if ended is None else max(seen[1], ended)
        if not ready or now - since < self.settle_s:
            return False
        del self._seen[key]
        return True

    def _error_drifting(self, fleet: str) -> frozenset[str]:
        devices = self.proposer.devices_of(fleet)
        drifting = frozenset(d.device for d in devices if "error" in d.drifting)
        need = max(2, math.ceil(RETRAIN_MIN_SHARE * len(devices)))
        return drifting if len(drifting) >= need else frozenset()

    def apply(self) -> list[str]:
        """One pass; returns the ids of the rollouts proposed."""
        if self.mode == "off":
            return []
        auto = self.mode == "auto"
        busy = self.reconciler.active_fleets()
        # asked after the busy fleets: a rollout ending in between is busy now or has its end here
        ended_ago = self.reconciler.rollouts_ended_ago()
        asked = self.clock()
        proposed: list[str] = []
        for fleet in sorted(self.fleets() - busy):
            ago = ended_ago.get(fleet)
            ended = None if ago is None else asked - ago
            recal = frozenset(self.proposer.drifting_devices(fleet))
            try:
                if recal:
                    if not self._settled(fleet, "recalibration", recal, ended):
                        continue
                    p = self.proposer.propose_recalibration(fleet, "policy", auto_approve=auto)
                else:
                    if not self._settled(fleet, "retrain", self._error_drifting(fleet), ended):
                        continue
                    p = self.proposer.propose_retrain(fleet, "policy", auto_approve=auto)
            except (ProposalError, RegistryError) as exc:
                log.warning("update policy: nothing proposed for %s: %s", fleet, exc)
                continue
            if p.rollout is None:
                log.warning(
                    "update policy: every %s candidate for %s was refused: %s",
                    p.kind,
                    fleet,
                    p.refused,
                )
                continue
            proposed.append(p.rollout.rollout_id)
            log.info(
                "update policy: proposed %s (%s, %d parameter sets) for %s: %s",
                p.rollout.rollout_id,
                p.kind,
                len(p.accepted),
                fleet,
                p.rollout.status,
            )
        return proposed
