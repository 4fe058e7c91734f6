"""Rollouts: their stored state with gate figures (viewer), and the operator's actions on them.

Reads come from the registry (``rollouts`` row, its ``state_json`` parsed for the device counts
and group figures, and ``rollout_events``). Actions (approve, pause, resume, roll back; operator
and above) go to the service's :class:`~service.api.state.RolloutOperations`, which makes the
change and its audit entry (actor = the token's name) in one registry transaction and answers
with the rollout's live view. Errors: no operations (the service has no signing keys) → 503;
unknown rollout → 404; not allowed in the rollout's state, or a conflict → 409 with the reason;
the rollout worker busy past its timeout → 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Final, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, status

from service.api.auth import Operator, Viewer
from service.api.deps import ApiContext, ContextDep, RegistryDep
from service.api.params import FleetQuery, Limit, Offset
from service.api.schemas import (
    RolloutActionReason,
    RolloutDetail,
    RolloutList,
    RolloutOut,
    RolloutViewOut,
)
from service.api.state import RolloutOperations
from service.registry.rollout_store import RolloutRecord
from service.rollout.controller import RolloutController, RolloutState, RolloutStatus
from service.rollout.reconciler import ServiceStoppingError

log = logging.getLogger(__name__)

router = APIRouter(tags=["rollouts"])

T = TypeVar("T")

UPDATES_DISABLED: Final = (
    "updates are disabled: start the service with --release-key and --deploy-key"
)
DEFAULT_REASON: Final = "operator"
"""The reason recorded for a pause or rollback when the caller gives none."""

RolloutIdPath = Annotated[str, Path(min_length=1, max_length=128, description="Rollout id.")]
StateQuery = Annotated[
    RolloutStatus | None, Query(alias="state", description="Only rollouts in this state.")
]

ACTION_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "No such rollout."},
    409: {"description": "Not allowed in the rollout's current state (the detail says why)."},
    503: {"description": "Updates are disabled, or the rollout worker is busy."},
}


def operations_of(ctx: ApiContext) -> RolloutOperations:
    """The service's update operations, or 503 when the service has none (no signing keys)."""
    if ctx.operations is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=UPDATES_DISABLED)
    return ctx.operations


def operate(action: Callable[[], T]) -> T:
    """Run an update operation, mapping its errors onto HTTP statuses (see the module doc)."""
    try:
        return action()
    except KeyError as exc:  # UnknownRolloutError
        detail = str(exc.args[0]) if exc.args else "unknown rollout"
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=detail) from None
    except ValueError as exc:  # IllegalTransitionError, ProposalError, RolloutConflictError
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except ServiceStoppingError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None
    except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
        log.warning("an update operation timed out waiting for the rollout worker")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the rollout worker is busy and did not answer in time; try again",
        ) from None


def parse_state(rec: RolloutRecord) -> RolloutState | None:
    """The rollout's stored controller state, or ``None`` (logged) when it cannot be read."""
    try:
        return RolloutState.from_json(rec.state_json)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("stored state of rollout %s is unreadable: %s", rec.id, exc)
        return None


@router.get("/rollouts", response_model=RolloutList)
def list_rollouts(
    _: Viewer,
    registry: RegistryDep,
    fleet: FleetQuery = None,
    state: StateQuery = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> RolloutList:
    """Rollouts, newest first, filtered by fleet and state, with their device counts."""
    records = registry.list_rollouts(fleet, state.value if state is not None else None)
    items = []
    for rec in records[offset : offset + limit]:
        parsed = parse_state(rec)
        summary = RolloutController(parsed).summary() if parsed is not None else None
        items.append(RolloutOut.of(rec, summary))
    return RolloutList(items=items)


@router.get(
    "/rollouts/{rollout_id}",
    response_model=RolloutDetail,
    responses={404: {"description": "No such rollout."}},
)
def get_rollout(_: Viewer, registry: RegistryDep, rollout_id: RolloutIdPath) -> RolloutDetail:
    """One rollout: device counts, groups with their last gate figures, control size, reason,
    and every transition with the gate figures it was decided on."""
    rec = registry.get_rollout(rollout_id)
    if rec is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no rollout {rollout_id!r}")
    return RolloutDetail.detail(rec, parse_state(rec), registry.list_rollout_events(rollout_id))


@router.post(
    "/rollouts/{rollout_id}/approve", response_model=RolloutViewOut, responses=ACTION_RESPONSES
)
def approve_rollout(
    rollout_id: RolloutIdPath, operator: Operator, ctx: ContextDep
) -> RolloutViewOut:
    """AWAITING_APPROVAL → RUNNING: the canary starts."""
    ops = operations_of(ctx)
    return RolloutViewOut.of(operate(lambda: ops.approve(rollout_id, operator.name)))


@router.post(
    "/rollouts/{rollout_id}/pause", response_model=RolloutViewOut, responses=ACTION_RESPONSES
)
def pause_rollout(
    rollout_id: RolloutIdPath,
    operator: Operator,
    ctx: ContextDep,
    body: RolloutActionReason | None = None,
) -> RolloutViewOut:
    """RUNNING → PAUSED: no gate decisions and no new groups until resumed."""
    ops = operations_of(ctx)
    reason = (body.reason if body is not None else None) or DEFAULT_REASON
    return RolloutViewOut.of(operate(lambda: ops.pause(rollout_id, operator.name, reason)))


@router.post(
    "/rollouts/{rollout_id}/resume", response_model=RolloutViewOut, responses=ACTION_RESPONSES
)
def resume_rollout(
    rollout_id: RolloutIdPath, operator: Operator, ctx: ContextDep
) -> RolloutViewOut:
    """PAUSED → RUNNING (after an inconclusive pause the soak deadline is extended once)."""
    ops = operations_of(ctx)
    return RolloutViewOut.of(operate(lambda: ops.resume(rollout_id, operator.name)))


@router.post(
    "/rollouts/{rollout_id}/rollback", response_model=RolloutViewOut, responses=ACTION_RESPONSES
)
def rollback_rollout(
    rollout_id: RolloutIdPath,
    operator: Operator,
    ctx: ContextDep,
    body: RolloutActionReason | None = None,
) -> RolloutViewOut:
    """Roll back (from RUNNING, PAUSED or FINISHED): every touched device returns to the
    previous parameters and the rolled-out set is marked bad."""
    ops = operations_of(ctx)
    reason = (body.reason if body is not None else None) or DEFAULT_REASON
    return RolloutViewOut.of(operate(lambda: ops.rollback(rollout_id, operator.name, reason)))
