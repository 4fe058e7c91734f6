"""Validated path and query parameters shared by the routers (bad values → 422 naming them)."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import Path, Query
from pydantic import AwareDatetime

MAX_LIMIT: Final = 1000

FleetPath = Annotated[str, Path(min_length=1, max_length=64, description="Fleet id.")]
DevicePath = Annotated[str, Path(min_length=1, max_length=64, description="Device id.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most items to return.")]
Offset = Annotated[int, Query(ge=0, description="Items to skip.")]
Since = Annotated[
    AwareDatetime | None,
    Query(description="Only items at or after this ISO 8601 time (with a time zone)."),
]
FleetQuery = Annotated[str | None, Query(min_length=1, max_length=64)]
DeviceQuery = Annotated[str | None, Query(min_length=1, max_length=64)]
