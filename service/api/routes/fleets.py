"""Fleets and their devices (viewer and above)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.auth import Viewer
from service.api.deps import ContextDep, RegistryDep
from service.api.params import DevicePath, FleetPath, Limit, Offset
from service.api.schemas import (
    DeviceDetail,
    DeviceOut,
    DevicePage,
    FleetCalibrationOut,
    FleetList,
    FleetOut,
)

router = APIRouter(tags=["fleets"])

RECENT_EVENTS = 20
"""Drift events shown with a device."""


@router.get("/fleets", response_model=FleetList)
def list_fleets(_: Viewer, registry: RegistryDep) -> FleetList:
    """Every fleet with its device, online and drifting counts."""
    return FleetList(items=[FleetOut.of(f) for f in registry.fleet_summaries()])


@router.get(
    "/fleets/{fleet}/devices",
    response_model=DevicePage,
    responses={404: {"description": "No such fleet."}},
)
def list_devices(
    _: Viewer, registry: RegistryDep, fleet: FleetPath, limit: Limit = 100, offset: Offset = 0
) -> DevicePage:
    """One page of the fleet's devices, by device id: update and drift state, online, last seen."""
    if fleet not in registry.list_fleets():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no fleet {fleet!r}")
    records = registry.list_devices(fleet, limit=limit, offset=offset)
    return DevicePage(
        items=[DeviceOut.of(r) for r in records],
        total=registry.count_devices(fleet),
        limit=limit,
        offset=offset,
    )


@router.get(
    "/fleets/{fleet}/calibration",
    response_model=FleetCalibrationOut,
    responses={
        404: {"description": "No such fleet."},
        503: {"description": "No live service in this process."},
    },
)
def get_fleet_calibration(
    _: Viewer, ctx: ContextDep, registry: RegistryDep, fleet: FleetPath
) -> FleetCalibrationOut:
    """What the operator declared normal for the fleet (settings ``fleet_normal``) and what
    layer A learnt of its devices: states, block sizes in readings and seconds, κ."""
    if fleet not in registry.list_fleets():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no fleet {fleet!r}")
    provider = ctx.fleet_calibration_provider
    if provider is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="layer A's calibration is known only to a running service (this API has none)",
        )
    return FleetCalibrationOut(**provider(fleet))


@router.get(
    "/devices/{fleet}/{device}",
    response_model=DeviceDetail,
    responses={404: {"description": "No such device."}},
)
def get_device(
    _: Viewer, ctx: ContextDep, registry: RegistryDep, fleet: FleetPath, device: DevicePath
) -> DeviceDetail:
    """One device with its most recent drift events and, from the running service, what layer
    A learnt of its normal variation (``calibration``)."""
    record = registry.get_device(fleet, device)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no device {device!r} in {fleet!r}")
    events = registry.list_drift_events(fleet=fleet, device=device, limit=RECENT_EVENTS)
    provider = ctx.calibration_provider
    calibration = None if provider is None else provider(fleet, device)
    return DeviceDetail.detail(record, events, calibration)
