"""The one exception a blob check raises, with a machine-readable reason."""

from __future__ import annotations

from typing import Literal, get_args

RejectReason = Literal[
    "unsupported_format",
    "truncated",
    "too_large",
    "unknown_key",
    "bad_signature",
    "hash_mismatch",
    "schema_mismatch",
    "epoch_below_floor",
    "stale_version",
    "kat_mismatch",
]
"""Why a device refuses a blob; the reasons of ``edge_agent/README.md`` §2.5 and §6.1."""

REJECT_REASONS: frozenset[str] = frozenset(get_args(RejectReason))


class BlobRejectedError(ValueError):
    """A blob failed a check; ``reason`` names which (see :data:`RejectReason`).

    >>> e = BlobRejectedError("bad_signature", "signature does not verify under key 7")
    >>> e.reason, str(e)
    ('bad_signature', 'bad_signature: signature does not verify under key 7')
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason: RejectReason = reason
        self.detail = message
