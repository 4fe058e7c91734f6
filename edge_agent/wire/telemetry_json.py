"""The JSON telemetry payload (README §2.2), for bring-up and devices without a binary encoder.

>>> from edge_agent.wire.messages import TelemetryBatch
>>> b = decode_json(b'{"v":1,"seq":7,"boot":2,"ts_ms":0,"param_version":3,'
...                 b'"features":[[0.5,-1]],"pred":[2],"conf":[0.91]}')
>>> b.features.tolist(), b.pred.tolist()
([[0.5, -1.0]], [2])
>>> decode_json(encode_json(b)) == b
True
>>> decode_json(b'{"v":1,"seq":7,"boot":2,"ts_ms":0,"param_version":3,'
...             b'"features":[[NaN,-1]],"pred":[2],"conf":[0.91]}')
Traceback (most recent call last):
...
edge_agent.wire.errors.WireError: non_finite: features holds NaN or infinity
"""

from __future__ import annotations

from edge_agent.wire._json import DEFAULT_MAX_BYTES, Payload
from edge_agent.wire.messages import TelemetryBatch

__all__ = ["decode_json", "encode_json"]


def encode_json(batch: TelemetryBatch) -> bytes:
    """Compact UTF-8 JSON; floats are written so that they parse back to the same float64."""
    return batch.to_json()


def decode_json(data: Payload, max_bytes: int = DEFAULT_MAX_BYTES) -> TelemetryBatch:
    """Decode and validate a JSON telemetry payload; raises only ``WireError``.

    Checks, in order: ``oversized``, ``decode`` (not strict UTF-8 JSON, or not an object),
    ``bad_version``, ``schema``, ``wrong_feature_count``, ``non_finite``, ``bad_confidence``,
    ``bad_class``.
    """
    return TelemetryBatch.from_json(data, max_bytes)
