"""Private JSON helpers shared by the message models: bounded parsing and canonical dumping."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

from pydantic import ValidationError

from edge_agent.wire.errors import Reason, WireError

Payload: TypeAlias = bytes | bytearray | memoryview
"""What the decoders accept: an MQTT payload as bytes or any contiguous bytes-like view."""

DEFAULT_MAX_BYTES = 65536
"""Default payload limit of every decoder (README §2.1: 64 KiB)."""

# When several WireErrors are collected from one ValidationError, report the first of these.
_PRIORITY: tuple[Reason, ...] = (
    "oversized",
    "decode",
    "bad_version",
    "schema",
    "wrong_feature_count",
    "non_finite",
    "bad_confidence",
    "bad_class",
)


def check_size(data: Payload, max_bytes: int) -> None:
    """Raise ``WireError("oversized")`` if ``data`` is longer than ``max_bytes``."""
    if len(data) > max_bytes:
        raise WireError("oversized", f"{len(data)} bytes > limit {max_bytes}")


def loads_object(data: Payload, max_bytes: int) -> dict[str, Any]:
    """Parse strict-UTF-8 JSON that must be an object (``decode`` otherwise).

    Python's ``json`` module accepts ``NaN``/``Infinity`` and turns ``1e400`` into ``inf``; those
    reach the model validators as non-finite floats and are rejected there.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("decode", f"payload must be bytes, not {type(data).__name__}")
    check_size(data, max_bytes)
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise WireError("decode", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("decode", f"JSON payload must be an object, not {type(obj).__name__}")
    return obj


def dumps(obj: Any, *, canonical: bool = False) -> bytes:
    """Compact JSON as UTF-8; ``canonical`` also sorts keys. NaN/inf are refused."""
    return json.dumps(
        obj, separators=(",", ":"), sort_keys=canonical, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def wire_error_from(exc: ValidationError) -> WireError:
    """Translate a pydantic ``ValidationError`` into the most specific ``WireError``.

    A ``WireError`` raised inside a validator is recovered; invalid JSON or a non-object top
    level is ``decode``; anything else is ``schema``.
    """
    found: list[WireError] = []
    for err in exc.errors(include_url=False):
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, WireError):
            found.append(inner)
        elif err["type"] == "json_invalid" or (
            err["loc"] == () and err["type"] in ("model_type", "model_attributes_type")
        ):
            found.append(WireError("decode", err["msg"]))
        else:
            loc = ".".join(str(part) for part in err["loc"]) or "<root>"
            found.append(WireError("schema", f"{loc}: {err['msg']}"))
    if not found:  # pragma: no cover - pydantic never raises an empty ValidationError
        return WireError("schema", str(exc))
    return min(found, key=lambda e: _PRIORITY.index(e.reason) if e.reason in _PRIORITY else 99)
