"""``GET /api/v1/status``: registry backend and the hosting service's live figures."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.auth import Viewer
from service.api.deps import ContextDep
from service.api.schemas import ServiceStateOut, StatusOut

router = APIRouter(tags=["status"])


@router.get("/status", response_model=StatusOut)
def get_status(_: Viewer, ctx: ContextDep) -> StatusOut:
    """The registry backend and, when a service hosts the API, its live figures."""
    state = ctx.state_provider() if ctx.state_provider is not None else None
    service = None
    if state is not None:
        service = ServiceStateOut(
            connected=state.connected,
            devices=state.devices,
            readings=state.readings,
            rejections=dict(state.rejections),
            detections=state.detections,
            queue_depth=state.queue_depth,
        )
    return StatusOut(api_version="v1", registry=ctx.registry.dialect, service=service)
