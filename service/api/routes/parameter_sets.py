"""Parameter sets: metadata and SHA-256, never the blob bytes (viewer and above)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from service.api.auth import Viewer
from service.api.deps import RegistryDep
from service.api.params import Limit, Offset
from service.api.schemas import ParameterSetDetail, ParameterSetList, ParameterSetOut
from service.registry.records import ParameterStatus

router = APIRouter(tags=["parameter sets"])

SchemaId = Annotated[str, Path(min_length=1, max_length=64, description="Schema id (hex).")]
Version = Annotated[int, Path(ge=0, le=2**32 - 1, description="Parameter version (U32).")]


@router.get("/parameter-sets", response_model=ParameterSetList)
def list_parameter_sets(
    _: Viewer,
    registry: RegistryDep,
    schema_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    status_: Annotated[ParameterStatus | None, Query(alias="status")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ParameterSetList:
    """Parameter sets by schema and version, filtered by schema and status."""
    sets = registry.list_parameter_set_summaries(schema_id, status_, limit=limit, offset=offset)
    return ParameterSetList(items=[ParameterSetOut.of(p) for p in sets])


@router.get(
    "/parameter-sets/{schema_id}/{version}",
    response_model=ParameterSetDetail,
    responses={404: {"description": "No such parameter set."}},
)
def get_parameter_set(
    _: Viewer, registry: RegistryDep, schema_id: SchemaId, version: Version
) -> ParameterSetDetail:
    """One parameter set: metadata, SHA-256, metrics and notes."""
    rec = registry.get_parameter_set_summary(schema_id, version)
    if rec is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no parameter set {schema_id} version {version}"
        )
    return ParameterSetDetail.detail(rec)
