"""The API's routers, one module per resource, all mounted under ``/api/v1``.

Read routers: ``fleets`` (fleets, devices), ``drift``, ``parameter_sets``, ``status``; admin:
``audit``, ``tokens``. The rollout controller's: ``rollouts`` (list and detail with gate figures
for viewers; approve, pause, resume, rollback) and ``candidates`` (candidate sets; propose). Their
actions take an :data:`~service.api.auth.Operator` principal and call the service's
:class:`~service.api.state.RolloutOperations`, which writes the change and its audit entry in one
registry transaction.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import (
    audit,
    candidates,
    drift,
    fleets,
    parameter_sets,
    rollouts,
    status,
    tokens,
)

ROUTERS: tuple[APIRouter, ...] = (
    status.router,
    fleets.router,
    drift.router,
    parameter_sets.router,
    candidates.router,
    rollouts.router,
    audit.router,
    tokens.router,
)
"""Every router, in the order the OpenAPI document lists them."""
