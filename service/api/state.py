"""What the API may show of the running service: a snapshot from a provider callable.

The API does not import :mod:`service.serve` (which hosts it); the service hands
``create_app`` a callable returning an object of this shape (``Service.status`` does), or
``None`` when the API runs without a live service (tests, a read-only deployment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class ServiceStateLike(Protocol):
    """The live figures of a running service (``service.serve.ServiceStatus`` has them)."""

    @property
    def connected(self) -> bool:
        """Whether the MQTT consumer is connected to the broker."""

    @property
    def devices(self) -> int:
        """Devices known to the device directory."""

    @property
    def readings(self) -> int:
        """Readings ingested since start."""

    @property
    def rejections(self) -> Mapping[str, int]:
        """Rejected messages by reason."""

    @property
    def detections(self) -> int:
        """Drift detections since start."""

    @property
    def queue_depth(self) -> int:
        """Messages waiting between the MQTT thread and the batcher."""


ServiceStateProvider = Callable[[], ServiceStateLike | None]
"""Returns the service's live state, or ``None`` when there is no service in this process."""

CalibrationProvider = Callable[[str, str], Mapping[str, Any] | None]
"""``(fleet, device)`` → what layer A learnt of the device's normal variation (the fields of
``service.drift.device_monitor.CalibrationStatus``), or ``None`` for a device it has no
monitor of."""

FleetCalibrationProvider = Callable[[str], Mapping[str, Any]]
"""``fleet`` → the fleet's declared normal and what layer A learnt of its devices (the fields of
``service.drift.engine.FleetCalibration``)."""


class RolloutOperations(Protocol):
    """The update actions the API triggers (the service's proposer and reconciler).

    Errors: ``KeyError`` (unknown rollout: 404), ``ValueError`` (not allowed now, nothing to
    propose, conflict: 409), ``TimeoutError`` (the worker is busy: 503).
    """

    def propose(
        self,
        fleet: str,
        kind: str,
        actor: str,
        *,
        devices: list[str] | None = None,
        version: int | None = None,
        auto_approve: bool = False,
    ) -> Any:
        """Build candidate(s) and propose a rollout; returns a ``Proposal``."""

    def approve(self, rollout_id: str, actor: str) -> Any:
        """Approve a rollout awaiting approval; returns a ``RolloutView``."""

    def pause(self, rollout_id: str, actor: str, reason: str) -> Any:
        """Pause a running rollout."""

    def resume(self, rollout_id: str, actor: str) -> Any:
        """Resume a paused rollout."""

    def rollback(self, rollout_id: str, actor: str, reason: str) -> Any:
        """Roll a rollout back."""

    def view(self, rollout_id: str) -> Any:
        """The live view of a rollout."""
