"""What the API may show of the running service: a snapshot from a provider callable.

The API does not import :mod:`service.serve` (which hosts it); the service hands
``create_app`` a callable returning an object of this shape (``Service.status`` does), or
``None`` when the API runs without a live service (tests, a read-only deployment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol


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
