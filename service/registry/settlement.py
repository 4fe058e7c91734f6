"""Several queued writes that settle as one: a checkpoint handed to the writer in slices.

Each slice gets its own ``on_settled`` callback from :meth:`Settlement.part`; once the sender
has :meth:`~Settlement.seal`-ed the settlement (no more parts) and every part has settled, the
settlement calls its own callback once: ``True`` if every part committed and the sender handed
over everything it meant to, ``False`` otherwise.

>>> outcomes = []
>>> s = Settlement(outcomes.append)
>>> first, second = s.part(), s.part()
>>> first(True)
>>> s.seal(complete=True)
>>> outcomes
[]
>>> second(True)
>>> outcomes
[True]
>>> s = Settlement(outcomes.append)
>>> only = s.part()
>>> s.seal(complete=False)    # the sender failed after this part
>>> only(True)
>>> outcomes
[True, False]
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Settlement"]


class Settlement:
    """Counts the parts of one logical write; reports once when all settled after the seal."""

    def __init__(self, on_settled: Callable[[bool], None]) -> None:
        self._on_settled = on_settled
        self._lock = threading.Lock()
        self._pending = 0
        self._ok = True
        self._sealed = False
        self._reported = False

    def part(self) -> Callable[[bool], None]:
        """A new part's ``on_settled`` callback (call it exactly once)."""
        with self._lock:
            if self._sealed:
                raise RuntimeError("settlement already sealed: no new parts")
            self._pending += 1
        return self._settle

    def seal(self, *, complete: bool) -> None:
        """No more parts; ``complete=False`` if the sender did not hand over everything."""
        with self._lock:
            self._sealed = True
            self._ok = self._ok and complete
        self._maybe_report()

    def _settle(self, committed: bool) -> None:
        with self._lock:
            self._pending -= 1
            self._ok = self._ok and committed
        self._maybe_report()

    def _maybe_report(self) -> None:
        with self._lock:
            if self._reported or not self._sealed or self._pending > 0:
                return
            self._reported = True
            ok = self._ok
        self._on_settled(ok)
