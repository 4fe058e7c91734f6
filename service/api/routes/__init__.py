"""The API's routers, one module per resource, all mounted under ``/api/v1``.

Read routers: ``fleets`` (fleets, devices), ``drift``, ``parameter_sets``, ``status``; admin:
``audit``, ``tokens``. The rollout controller's actions (candidates: propose; rollouts: approve,
pause, resume, rollback) go in ``candidates.py`` and ``rollouts.py`` beside these, taking an
:data:`~service.api.auth.Operator` principal and writing their audit entry in the same registry
transaction as the change, and are added to :data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import audit, drift, fleets, parameter_sets, status, tokens

ROUTERS: tuple[APIRouter, ...] = (
    status.router,
    fleets.router,
    drift.router,
    parameter_sets.router,
    audit.router,
    tokens.router,
)
"""Every router, in the order the OpenAPI document lists them."""
