"""The label values ``fleet`` and ``model_version`` may take on ``/metrics``: bounded sets.

Both come from the topic or the payload of what devices send, so neither is used as it comes.
A fleet has its own series once the service monitors it (:class:`FleetLabels`); a model version
is named by the registered base model it runs (:class:`ModelVersionLabels`). Anything else is
counted under the one value :data:`UNKNOWN`.

>>> f = FleetLabels(max_fleets=1)
>>> f.admit("plant"), f.admit("intruder"), f.label("plant"), f.label("intruder")
(True, False, 'plant', '_unknown')
>>> v = ModelVersionLabels()
>>> v.register(1)
>>> for version in range(2, 20):  # eighteen devices recalibrated from v1
...     v.register(version, recalibration_of=1)
>>> sorted({v.label(n) for n in range(0, 100)})
['1', '1-recalibrated', '_unknown']
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

UNKNOWN: Final = "_unknown"
"""The label value of every fleet the service does not monitor and every unregistered model
version (a fleet id may not be ``_unknown``: it is never admitted)."""

RECALIBRATED: Final = "recalibrated"
"""Suffix of a recalibration's model version label: ``{base}-recalibrated``."""

MAX_LINEAGE: Final = 16
"""Recalibrations of recalibrations followed back to their base model, at most."""


class FleetLabels:
    """The fleets that have their own series.

    ``configured`` (the ``fleets`` setting when it is not ``+``) is the whole set. Otherwise a
    fleet is admitted the first time a device is registered in it (a valid birth or Will, an
    adopted device, a device in the registry at start), up to ``max_fleets``; ``on_admit`` is
    called once per admitted fleet (its series are created at 0 there).

    >>> FleetLabels(5, configured=["a"]).admit("b")
    False
    """

    def __init__(
        self,
        max_fleets: int,
        configured: Iterable[str] | None = None,
        on_admit: Callable[[str], None] | None = None,
    ) -> None:
        self.max_fleets = max_fleets
        self._lock = threading.Lock()
        self._on_admit = on_admit
        self._closed = configured is not None
        self._fleets: set[str] = set()
        for fleet in configured or ():
            self._add(fleet)

    def _add(self, fleet: str) -> None:
        self._fleets.add(fleet)
        if self._on_admit is not None:
            self._on_admit(fleet)

    def admit(self, fleet: str) -> bool:
        """Whether ``fleet`` has its own series, admitting it if there is room."""
        with self._lock:
            if fleet in self._fleets:
                return True
            if self._closed or fleet == UNKNOWN or len(self._fleets) >= self.max_fleets:
                return False
            self._add(fleet)
            return True

    def __contains__(self, fleet: object) -> bool:
        with self._lock:
            return fleet in self._fleets

    def __len__(self) -> int:
        with self._lock:
            return len(self._fleets)

    def label(self, fleet: str) -> str:
        """``fleet`` if it has its own series, else :data:`UNKNOWN`."""
        with self._lock:
            return fleet if fleet in self._fleets else UNKNOWN


class ModelVersionLabels:
    """Model versions as label values: a registered base model (a factory, imported or
    retrained parameter set) is its own version; a recalibration (one device's own input
    normalisation on a base model's weights, a new version per device) is
    ``{base}-recalibrated``; a version the service has not registered is :data:`UNKNOWN`.

    Label values carry the version number only: should one number be a base model in one
    schema and a recalibration in another, the base model wins.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base_of: dict[int, int | None] = {}
        self._labels: dict[int, str] = {}

    def register(self, version: int, recalibration_of: int | None = None) -> None:
        """A registered parameter set: a base model, or a recalibration of ``version``
        ``recalibration_of``."""
        with self._lock:
            if version in self._base_of and self._base_of[version] is None:
                return  # a base model stays one
            self._base_of[version] = recalibration_of
            self._labels = {v: self._resolve(v) for v in self._base_of}

    def _resolve(self, version: int) -> str:
        base = self._base_of.get(version)
        if base is None:
            return str(version)
        seen = {version}
        while base not in seen and len(seen) < MAX_LINEAGE:
            parent = self._base_of.get(base)
            if parent is None:
                break
            seen.add(base)
            base = parent
        return f"{base}-{RECALIBRATED}"

    def label(self, version: int | None) -> str:
        """The label value of ``version`` (``None``: no version known, :data:`UNKNOWN`)."""
        if version is None:
            return UNKNOWN
        with self._lock:
            return self._labels.get(version, UNKNOWN)


def recalibration_base(source: str, metrics: Mapping[str, Any] | None) -> int | None:
    """The base version of a stored parameter set if it is a recalibration (its registry
    ``source`` and the candidate report in ``metrics``), else ``None``."""
    if source != "recalibration" or not metrics:
        return None
    base = metrics.get("base_version")
    return base if isinstance(base, int) and not isinstance(base, bool) else None
