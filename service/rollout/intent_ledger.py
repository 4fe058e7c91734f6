"""What the service's rollouts gave each device: the blob it may fetch, the versions it may run.

Keyed by ``(fleet, device)``. The reconciler records every manifest *before* it publishes it, so
a device can never ask for a blob, or report a version, ahead of the record. The chunk server
asks :meth:`IntentLedger.may_fetch` from its own thread; the rollout worker asks
:meth:`IntentLedger.given`. The ledger owns its lock.

>>> ledger = IntentLedger()
>>> ledger.record("f1", "d1", "install", "ab" * 32, 2)
>>> ledger.may_fetch("f1", "d1", "AB" * 32), ledger.may_fetch("f2", "d1", "ab" * 32)
('ok', 'no_intent')
>>> ledger.record("f1", "d1", "confirm", "ab" * 32, 2)
>>> ledger.may_fetch("f1", "d1", "ab" * 32), ledger.given("f1", "d1")
('no_intent', frozenset({2}))
"""

from __future__ import annotations

import threading
from typing import Literal

__all__ = ["FetchVerdict", "IntentLedger"]

FetchVerdict = Literal["ok", "no_intent", "other_blob"]
"""``ok``; ``no_intent``: the device's current manifest is no install; ``other_blob``: it
names another blob."""


class IntentLedger:
    """Per ``(fleet, device)``: the blob of its current install intent, the versions given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fetchable: dict[tuple[str, str], str] = {}
        self._given: dict[tuple[str, str], frozenset[int]] = {}

    def record(self, fleet: str, device: str, action: str, sha256: str, version: int) -> None:
        """The manifest about to be published for ``fleet/device`` (it replaces the retained
        one): an ``install`` makes its blob fetchable and its version given; another action
        leaves nothing to fetch."""
        key = (fleet, device)
        with self._lock:
            if action == "install":
                self._fetchable[key] = sha256.lower()
                self._given[key] = self._given.get(key, frozenset()) | {version}
            else:
                self._fetchable.pop(key, None)

    def give(self, fleet: str, device: str, version: int) -> None:
        """``version`` was given to the device by an earlier (stored) rollout."""
        key = (fleet, device)
        with self._lock:
            self._given[key] = self._given.get(key, frozenset()) | {version}

    def may_fetch(self, fleet: str, device: str, sha256: str) -> FetchVerdict:
        """Whether ``fleet/device``'s current install intent names the blob ``sha256``."""
        with self._lock:
            held = self._fetchable.get((fleet, device))
        if held is None:
            return "no_intent"
        return "ok" if held == sha256.lower() else "other_blob"

    def given(self, fleet: str, device: str) -> frozenset[int]:
        """Every parameter version a rollout of this service installed on the device."""
        with self._lock:
            return self._given.get((fleet, device), frozenset())
