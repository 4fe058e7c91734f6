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
A proposal that is refused (no candidate passed its checks) is logged and retried after the set
changes again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from service.registry.errors import RegistryError
from service.rollout.proposals import CandidateProposer, ProposalError
from service.rollout.reconciler import RolloutReconciler

log = logging.getLogger(__name__)

PolicyMode = Literal["off", "propose", "auto"]

RETRAIN_MIN_SHARE = 0.10
"""Share of a fleet's devices drifting on the labelled error that triggers a retrain."""


class UpdatePolicy:
    """Decides, per fleet, whether to propose an update now (see the module docstring)."""

    def __init__(
        self,
        mode: PolicyMode,
        proposer: CandidateProposer,
        reconciler: RolloutReconciler,
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

    def _settled(self, fleet: str, kind: str, ready: frozenset[str]) -> bool:
        now = self.clock()
        key = (fleet, kind)
        seen = self._seen.get(key)
        if seen is None or seen[0] != ready:
            self._seen[key] = seen = (ready, now)
        if not ready or now - seen[1] < self.settle_s:
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
        proposed: list[str] = []
        for fleet in sorted(self.fleets() - busy):
            recal = frozenset(self.proposer.drifting_devices(fleet))
            try:
                if recal:
                    if not self._settled(fleet, "recalibration", recal):
                        continue
                    p = self.proposer.propose_recalibration(fleet, "policy", auto_approve=auto)
                else:
                    if not self._settled(fleet, "retrain", self._error_drifting(fleet)):
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
