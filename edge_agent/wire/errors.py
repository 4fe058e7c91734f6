"""The single exception every wire decoder raises (README §2).

The service counts rejected messages by :attr:`WireError.reason`, so the set of reasons is fixed.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = ["REASONS", "Reason", "WireError"]

Reason = Literal[
    "decode",
    "schema",
    "truncated",
    "trailing_bytes",
    "oversized",
    "bad_version",
    "wrong_feature_count",
    "non_finite",
    "bad_class",
    "bad_confidence",
    "bad_id",
    "bad_topic",
]
"""The rejection reasons of README §2, as a type."""

REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))
"""The rejection reasons of README §2, as a set of strings."""


class WireError(ValueError):
    """A payload, topic or id was rejected; :attr:`reason` says why.

    >>> err = WireError("truncated", "need 46 bytes, got 40")
    >>> err.reason
    'truncated'
    >>> str(err)
    'truncated: need 46 bytes, got 40'
    >>> WireError("no_such_reason")
    Traceback (most recent call last):
    ...
    ValueError: unknown WireError reason 'no_such_reason'
    """

    reason: Reason
    message: str

    def __init__(self, reason: Reason, message: str = "") -> None:
        if reason not in REASONS:
            # A programming error, not a rejected payload: deliberately not a WireError.
            raise ValueError(f"unknown WireError reason {reason!r}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason
