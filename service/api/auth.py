"""Bearer-token authentication and role checks.

``Authorization: Bearer <token>``: the token's SHA-256 is looked up in the registry
(:meth:`~service.registry.store.Registry.verify_token`). Missing, unknown or revoked → 401 with
``WWW-Authenticate: Bearer``; a valid token whose role is below what the route needs → 403.
Neither writes anything: authentication is a read, and a token's ``last_used`` is written only
after the role check has passed (at most once a minute per token and process).

Roles are ordered, each including the ones before it: ``viewer`` reads fleets, devices, drift
events and parameter sets; ``operator`` will act on candidates and rollouts; ``admin`` also
reads the audit log and manages tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import ContextDep, RegistryDep
from service.registry.errors import RegistryError
from service.registry.records import Role, role_rank

log = logging.getLogger(__name__)

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token: `tinydrift api-token create` or `POST /api/v1/tokens`.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name (the audit actor) and its role."""

    name: str
    role: Role

    def has(self, role: Role) -> bool:
        """Whether this principal's role includes ``role``."""
        return role_rank(self.role) >= role_rank(role)


def _unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


def get_principal(
    registry: RegistryDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The caller, from ``Authorization: Bearer …``; 401 if missing, unknown or revoked."""
    if credentials is None:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)", None)
    record = registry.verify_token(credentials.credentials)
    if record is None:
        raise _unauthorized("invalid or revoked token", "invalid_token")
    return Principal(record.name, record.role)


def require_role(role: Role) -> Callable[..., Principal]:
    """A dependency: the caller if their role includes ``role``, else 403 (401 if anonymous)."""
    role_rank(role)  # refuse a typo at import time

    def dependency(
        principal: Annotated[Principal, Depends(get_principal)], ctx: ContextDep
    ) -> Principal:
        if not principal.has(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"token {principal.name!r} has role {principal.role}; "
                f"this needs {role} or above",
            )
        if ctx.should_touch(principal.name):
            try:
                ctx.registry.touch_token(principal.name)
            except RegistryError as exc:  # bookkeeping must not fail the request
                log.warning("cannot record use of token %s: %s", principal.name, exc)
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


Viewer = Annotated[Principal, Depends(require_role("viewer"))]
"""A route parameter that admits viewers and above."""
Operator = Annotated[Principal, Depends(require_role("operator"))]
"""A route parameter that admits operators and admins (rollout and candidate actions)."""
Admin = Annotated[Principal, Depends(require_role("admin"))]
"""A route parameter that admits admins only (tokens, audit log)."""
