"""The parameter schema a firmware is compiled against, and its ``schema_id``.

The schema fixes everything that changes the device's code path: model family, feature names
and order, class labels and order, weight rows, dtypes, kernel ABI, rounding mode and input
scale. Parameters (``mu``, ``sigma``, weights, bias, thresholds) are *not* part of it, so a new
parameter set for the same firmware keeps the same ``schema_id`` (the analogue of MATLAB's coder
attributes, ``../shared/research/fleet-update-anchors.md`` §2).

>>> s = ParameterSchema(features=("a", "b"), classes=("no", "yes"), rows=1)
>>> s.schema_id.hex() == s.schema_id_hex and len(s.schema_id)
8
>>> ParameterSchema.from_json(s.canonical_json()) == s
True
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

FAMILY_LINEAR_INT8 = "linear_int8"
KERNEL_ABI = 1
ROUNDING_DOUBLE = "double"
INPUT_SCALE_TEXT = "4/127"
_NAME = re.compile(r"^[^\x00-\x1f]{1,64}$")


@dataclass(frozen=True)
class ParameterSchema:
    """Shape and meaning of a parameter set; hashed into :attr:`schema_id`."""

    features: tuple[str, ...]
    classes: tuple[str, ...]
    rows: int
    family: str = FAMILY_LINEAR_INT8
    kernel_abi: int = KERNEL_ABI
    rounding: str = ROUNDING_DOUBLE
    input_scale: str = INPUT_SCALE_TEXT
    dtypes: dict[str, str] = field(
        default_factory=lambda: {
            "input": "f32",
            "q": "i8",
            "weights": "i8",
            "bias": "i32",
            "logits": "i32",
        }
    )

    def __post_init__(self) -> None:
        if self.family != FAMILY_LINEAR_INT8:
            raise ValueError(f"unsupported model family {self.family!r}")
        if self.kernel_abi != KERNEL_ABI or self.rounding != ROUNDING_DOUBLE:
            raise ValueError("only kernel ABI 1 with double rounding is defined")
        if not 1 <= len(self.features) <= 255:
            raise ValueError("a schema needs 1 to 255 features")
        if not 2 <= len(self.classes) <= 255:
            raise ValueError("a schema needs 2 to 255 classes")
        for kind, names in (("feature", self.features), ("class", self.classes)):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique")
            bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
            if bad:
                raise ValueError(f"bad {kind} name(s): {bad[:3]!r}")
        expected = 1 if len(self.classes) == 2 else len(self.classes)
        if self.rows not in {expected, len(self.classes)}:
            raise ValueError(
                f"rows must be {len(self.classes)} (one per class)"
                + (" or 1 (binary)" if len(self.classes) == 2 else "")
            )

    @property
    def n_features(self) -> int:
        """Number of features ``F``."""
        return len(self.features)

    @property
    def n_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The schema as a JSON-ready dict."""
        return {
            "family": self.family,
            "features": list(self.features),
            "classes": list(self.classes),
            "rows": self.rows,
            "kernel_abi": self.kernel_abi,
            "rounding": self.rounding,
            "input_scale": self.input_scale,
            "dtypes": dict(self.dtypes),
        }

    def canonical_json(self) -> bytes:
        """Sorted keys, no spaces, UTF-8: the bytes that are hashed."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()

    @functools.cached_property
    def schema_id(self) -> bytes:
        """First 8 bytes of the SHA-256 of :meth:`canonical_json` (computed once)."""
        return hashlib.sha256(self.canonical_json()).digest()[:8]

    @functools.cached_property
    def schema_id_hex(self) -> str:
        """:attr:`schema_id` as 16 lowercase hex characters."""
        return self.schema_id.hex()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParameterSchema:
        """Build from :meth:`to_dict` output; raises ``ValueError`` on anything malformed."""
        try:
            return cls(
                features=tuple(data["features"]),
                classes=tuple(data["classes"]),
                rows=int(data["rows"]),
                family=str(data["family"]),
                kernel_abi=int(data["kernel_abi"]),
                rounding=str(data["rounding"]),
                input_scale=str(data["input_scale"]),
                dtypes={str(k): str(v) for k, v in dict(data["dtypes"]).items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed parameter schema: {exc}") from exc

    @classmethod
    def from_json(cls, data: bytes) -> ParameterSchema:
        """Parse :meth:`canonical_json` output (or any equivalent JSON)."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"schema is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError("schema JSON must be an object")
        return cls.from_dict(obj)
