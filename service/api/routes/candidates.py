"""Candidates: the registered candidate parameter sets (viewer), and proposals (operator).

``POST /candidates`` asks the service's proposer to build candidate parameter sets for a fleet
(recalibration, retrain) or to take a registered one (parameter_set), and to propose a rollout
of the accepted ones; it answers with each candidate's decision and the rollout, if any. The
proposer audits the proposal (actor = the token's name). Errors as in
:mod:`service.api.routes.rollouts`: 503 without signing keys, 409 when there is nothing to
propose or the fleet already has an active rollout (the detail says which).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from service.api.auth import Operator, Viewer
from service.api.deps import ContextDep, RegistryDep
from service.api.params import Limit, Offset
from service.api.routes.rollouts import ACTION_RESPONSES, operate, operations_of
from service.api.schemas import (
    CandidateProposal,
    ParameterSetList,
    ParameterSetOut,
    ProposalOut,
)

router = APIRouter(tags=["candidates"])


def _field_error(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 naming ``body.field``, like pydantic's own."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}]
    )


def _check(body: CandidateProposal) -> None:
    """Fields that only one kind takes (422 naming the field)."""
    if body.kind == "parameter_set" and body.version is None:
        raise _field_error("version", "a parameter_set proposal needs the version", None)
    if body.kind != "parameter_set" and body.version is not None:
        raise _field_error("version", "only a parameter_set proposal takes a version", body.version)
    if body.kind != "recalibration" and body.devices is not None:
        raise _field_error("devices", "only a recalibration proposal takes devices", body.devices)


@router.get("/candidates", response_model=ParameterSetList)
def list_candidates(
    _: Viewer,
    registry: RegistryDep,
    schema_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ParameterSetList:
    """Registered parameter sets with status ``candidate`` (metadata, never blob bytes)."""
    sets = registry.list_parameter_set_summaries(schema_id, "candidate", limit=limit, offset=offset)
    return ParameterSetList(items=[ParameterSetOut.of(p) for p in sets])


@router.post(
    "/candidates",
    response_model=ProposalOut,
    responses={**ACTION_RESPONSES, 409: {"description": "Nothing to propose, or a conflict."}},
)
def propose_candidates(body: CandidateProposal, operator: Operator, ctx: ContextDep) -> ProposalOut:
    """Build and judge candidates for a fleet and propose a rollout of the accepted ones
    (awaiting approval, or started at once with ``auto_approve``)."""
    _check(body)
    ops = operations_of(ctx)
    proposal = operate(
        lambda: ops.propose(
            body.fleet,
            body.kind,
            operator.name,
            devices=body.devices,
            version=body.version,
            auto_approve=body.auto_approve,
        )
    )
    return ProposalOut.of(proposal)
