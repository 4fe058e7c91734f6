"""Dependencies shared by the routers: the API context and the registry behind it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.api.state import (
    CalibrationProvider,
    FleetCalibrationProvider,
    RolloutOperations,
    ServiceStateProvider,
)
from service.registry.store import Registry

TOUCH_INTERVAL_S = 60.0
"""A token's ``last_used`` is written at most this often (per process)."""


@dataclass
class ApiContext:
    """What the app was created with, kept in ``app.state.ctx``."""

    registry: Registry
    state_provider: ServiceStateProvider | None = None
    operations: RolloutOperations | None = None
    """The update actions (``None``: the service has no signing keys; actions answer 503)."""
    calibration_provider: CalibrationProvider | None = None
    """Layer A's calibration of a device (``None``: no live service in this process)."""
    fleet_calibration_provider: FleetCalibrationProvider | None = None
    """Layer A's calibration of a fleet (``None``: no live service in this process)."""
    _touched: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def should_touch(self, token_name: str) -> bool:
        """Whether this use of ``token_name`` should be written as its ``last_used``."""
        now = time.monotonic()
        with self._lock:
            last = self._touched.get(token_name)
            if last is not None and now - last < TOUCH_INTERVAL_S:
                return False
            self._touched[token_name] = now
            return True


def get_context(request: Request) -> ApiContext:
    """The :class:`ApiContext` of the app serving ``request``."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


def get_registry(ctx: Annotated[ApiContext, Depends(get_context)]) -> Registry:
    """The registry (thread-safe; each call runs its own transaction)."""
    return ctx.registry


ContextDep = Annotated[ApiContext, Depends(get_context)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
