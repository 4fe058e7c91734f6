"""Decode a ``tel`` payload in either encoding, chosen by its first byte (README §2.1, §2.2).

>>> decode_telemetry(b"<xml/>")
Traceback (most recent call last):
...
edge_agent.wire.errors.WireError: decode: unknown telemetry encoding, first byte 0x3c
"""

from __future__ import annotations

from edge_agent.wire._json import DEFAULT_MAX_BYTES, Payload
from edge_agent.wire.errors import WireError
from edge_agent.wire.messages import TelemetryBatch
from edge_agent.wire.telemetry_binary import BinaryHeader, decode_binary, decode_binary_header
from edge_agent.wire.telemetry_json import decode_json

__all__ = ["decode_telemetry", "decode_telemetry_header"]


def decode_telemetry(data: Payload, max_bytes: int = DEFAULT_MAX_BYTES) -> TelemetryBatch:
    """Decode a binary frame (first byte ``T``) or a JSON object (first byte ``{``).

    Anything else, including an empty payload, raises ``WireError("decode")``; the chosen
    decoder's own ``WireError`` passes through (``oversized`` is checked before anything else).
    """
    data = _checked(data, max_bytes)
    if data[0] == 0x54:  # "T"
        return decode_binary(data, max_bytes)
    return decode_json(data, max_bytes)


def decode_telemetry_header(
    data: Payload, max_bytes: int = DEFAULT_MAX_BYTES
) -> BinaryHeader | TelemetryBatch:
    """:func:`decode_telemetry` with the same checks and errors, but a binary frame's records
    are not decoded: its :class:`~edge_agent.wire.telemetry_binary.BinaryHeader` is returned
    (the records follow the 28-byte header); a JSON object is decoded whole."""
    data = _checked(data, max_bytes)
    if data[0] == 0x54:  # "T"
        return decode_binary_header(data, max_bytes)
    return decode_json(data, max_bytes)


def _checked(data: Payload, max_bytes: int) -> bytes:
    """The payload as bytes once its type, size and first byte (``T`` or ``{``) are checked."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("decode", f"payload must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireError("oversized", f"{len(data)} bytes > limit {max_bytes}")
    if not data:
        raise WireError("decode", "empty payload")
    if data[0] not in (0x54, 0x7B):
        raise WireError("decode", f"unknown telemetry encoding, first byte 0x{data[0]:02x}")
    return data
