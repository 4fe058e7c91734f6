"""Drift events (viewer and above)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.auth import Viewer
from service.api.deps import RegistryDep
from service.api.params import DeviceQuery, FleetQuery, Limit, Since
from service.api.schemas import DriftEventList, DriftEventOut

router = APIRouter(tags=["drift"])


@router.get("/drift-events", response_model=DriftEventList)
def list_drift_events(
    _: Viewer,
    registry: RegistryDep,
    fleet: FleetQuery = None,
    device: DeviceQuery = None,
    since: Since = None,
    limit: Limit = 100,
) -> DriftEventList:
    """Drift events, newest first, filtered by fleet, device and time."""
    events = registry.list_drift_events(fleet=fleet, device=device, since=since, limit=limit)
    return DriftEventList(items=[DriftEventOut.of(e) for e in events])
