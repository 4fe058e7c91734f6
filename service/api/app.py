"""``create_app``: the operator API over a registry, with the error mapping and OpenAPI docs."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from service.api.deps import ApiContext
from service.api.routes import ROUTERS
from service.api.state import (
    CalibrationProvider,
    FleetCalibrationProvider,
    RolloutOperations,
    ServiceStateProvider,
)
from service.registry.errors import (
    RegistryConflictError,
    RegistryError,
    RegistryOperationError,
    RegistryUnavailableError,
    UnknownParameterSetError,
    UnknownTokenError,
)
from service.registry.store import Registry

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

DESCRIPTION = """\
Fleets, devices, drift events, parameter sets and the audit log of a tinydrift service.

Every request needs `Authorization: Bearer <token>`. Roles, each including the ones before it:
**viewer** (read), **operator** (rollout and candidate actions), **admin** (tokens, audit log).
A missing, unknown or revoked token gets 401, too low a role 403; neither changes anything.
Every change is written to the audit log in the same transaction, with the token's name as actor.
"""


def _package_version() -> str:
    try:
        return version("tinydrift")
    except PackageNotFoundError:
        return "0"


def create_app(
    registry: Registry,
    service_state_provider: ServiceStateProvider | None = None,
    *,
    operations: RolloutOperations | None = None,
    calibration: CalibrationProvider | None = None,
    fleet_calibration: FleetCalibrationProvider | None = None,
) -> FastAPI:
    """The operator API over ``registry``; ``service_state_provider`` gives live service figures.

    ``operations`` (the service's proposer and reconciler) enables the update actions; without
    it (no signing keys configured, or a read-only deployment) they answer 503.
    ``calibration`` (the drift engine's) adds layer A's calibration to a device's detail;
    ``fleet_calibration`` serves a fleet's declared normal and what layer A learnt of it
    (without it that endpoint answers 503).

    The caller owns ``registry`` (the app never closes it). Docs at ``/docs``, the OpenAPI
    document at ``/openapi.json``.
    """
    app = FastAPI(
        title="tinydrift operator API",
        version=_package_version(),
        description=DESCRIPTION,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.state.ctx = ApiContext(
        registry=registry,
        state_provider=service_state_provider,
        operations=operations,
        calibration_provider=calibration,
        fleet_calibration_provider=fleet_calibration,
    )
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Registry errors as HTTP statuses with a one-line ``detail``."""

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, exc: Exception) -> JSONResponse:
        code = status.HTTP_500_INTERNAL_SERVER_ERROR
        if isinstance(exc, UnknownTokenError | UnknownParameterSetError):
            code = status.HTTP_404_NOT_FOUND
        elif isinstance(exc, RegistryConflictError):
            code = status.HTTP_409_CONFLICT
        elif isinstance(exc, RegistryUnavailableError) or (
            isinstance(exc, RegistryOperationError) and exc.transient
        ):
            code = status.HTTP_503_SERVICE_UNAVAILABLE
        if code >= 500:
            log.error("API request failed: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=code)
