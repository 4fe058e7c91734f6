"""Judge the parameter version a device reports: sanctioned, or run without any rollout.

A device's versions are sanctioned when the service first saw the device running them
(provisioning: its first birth, or the version stored for it before a restart) or when a
rollout gave them (:class:`~service.rollout.intent_ledger.IntentLedger`). Any other version was
installed behind the service's back (a replayed manifest, a tampered device) and is reported
once per ``(fleet, device, version)``. Used only on the rollout worker thread: no lock.

>>> w = VersionWatch()
>>> w.report("f", "d", 1, frozenset()), w.report("f", "d", 2, frozenset({2}))
('sanctioned', 'sanctioned')
>>> w.report("f", "d", 7, frozenset({2})), w.report("f", "d", 7, frozenset({2}))
('unsanctioned', 'known')
>>> w.last_sanctioned("f", "d"), w.report("f", "d", 1, frozenset())
(2, 'sanctioned')
>>> w.report("f", "e", 5, frozenset(), birth=False), w.report("f", "e", 1, frozenset())
('unsanctioned', 'sanctioned')
"""

from __future__ import annotations

from typing import Literal

__all__ = ["VersionVerdict", "VersionWatch"]

VersionVerdict = Literal["sanctioned", "unsanctioned", "known"]
"""``unsanctioned``: reported for the first time; ``known``: already reported (not again)."""


class VersionWatch:
    """Per ``(fleet, device)``: versions seen at provisioning, the last sanctioned one, flags."""

    def __init__(self) -> None:
        self._baseline: dict[tuple[str, str], set[int]] = {}
        self._last: dict[tuple[str, str], int] = {}
        self._flagged: set[tuple[str, str, int]] = set()

    def seed(self, fleet: str, device: str, version: int) -> None:
        """The version stored for a device before this service started (a known device)."""
        self._baseline.setdefault((fleet, device), set()).add(version)
        self._last.setdefault((fleet, device), version)

    def report(
        self, fleet: str, device: str, version: int, given: frozenset[int], *, birth: bool = True
    ) -> VersionVerdict:
        """The device runs ``version``; ``given`` are the versions rollouts gave it.

        Only a birth can be the first sight: an ack of a version no rollout gave, from a device
        not yet seen, is unsanctioned (a forged ack must not become the device's baseline).
        """
        key = (fleet, device)
        baseline = self._baseline.get(key)
        if baseline is None and birth:  # first sight: what the device was provisioned with
            self._baseline[key] = {version}
        elif version not in (baseline or ()) and version not in given:
            if (fleet, device, version) in self._flagged:
                return "known"
            self._flagged.add((fleet, device, version))
            return "unsanctioned"
        self._last[key] = version
        return "sanctioned"

    def last_sanctioned(self, fleet: str, device: str) -> int | None:
        """The last sanctioned version the device reported (what it should run)."""
        return self._last.get((fleet, device))

    def forget_flag(self, fleet: str, device: str, version: int) -> None:
        """Report ``version`` again next time (its handling could not be completed)."""
        self._flagged.discard((fleet, device, version))
