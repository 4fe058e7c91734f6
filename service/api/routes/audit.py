"""The audit log (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.auth import Admin
from service.api.deps import RegistryDep
from service.api.params import Limit, Since
from service.api.schemas import AuditList, AuditOut

router = APIRouter(tags=["audit"])

Text = Annotated[str | None, Query(min_length=1, max_length=256)]


@router.get("/audit", response_model=AuditList)
def list_audit(
    _: Admin,
    registry: RegistryDep,
    actor: Text = None,
    action: Text = None,
    target: Text = None,
    since: Since = None,
    limit: Limit = 100,
) -> AuditList:
    """Audit entries, newest first, filtered by actor, action, target and time."""
    entries = registry.list_audit(actor, action, target, since, limit)
    return AuditList(items=[AuditOut.of(e) for e in entries])
