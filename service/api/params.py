"""Validated path and query parameters shared by the routers (bad values → 422 naming them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final

from fastapi import Path, Query
from pydantic import AfterValidator, AwareDatetime

MAX_LIMIT: Final = 1000
MAX_OFFSET: Final = 2**62
"""Beyond any table, and within the databases' 64-bit integers with room for ``offset +
limit`` (a larger offset was a 500 from the driver)."""


def _in_utc(value: datetime | None) -> datetime | None:
    """The time in UTC; a time that has none (``0001-01-01T00:00:00+23:59``) is a 422."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range once converted to UTC") from None


FleetPath = Annotated[str, Path(min_length=1, max_length=64, description="Fleet id.")]
DevicePath = Annotated[str, Path(min_length=1, max_length=64, description="Device id.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most items to return.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
Since = Annotated[
    AwareDatetime | None,
    AfterValidator(_in_utc),
    Query(description="Only items at or after this ISO 8601 time (with a time zone)."),
]
FleetQuery = Annotated[str | None, Query(min_length=1, max_length=64)]
DeviceQuery = Annotated[str | None, Query(min_length=1, max_length=64)]
