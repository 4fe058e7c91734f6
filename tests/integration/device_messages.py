"""Messages a device would publish, built as the device contract says (for the service tests).

>>> from edge_agent.wire.messages import Status
>>> s = Status.model_validate_json(birth("00" * 8, active_version=3, boot=2))
>>> (s.active_version, s.boot, s.last_deploy_seq, s.online)
(3, 2, 0, True)
"""

from __future__ import annotations

import time

import numpy as np

from edge_agent.wire.messages import Status, TelemetryBatch
from edge_agent.wire.telemetry_binary import encode_binary


def birth(
    schema_id: str,
    *,
    active_version: int = 1,
    boot: int = 1,
    last_deploy_seq: int = 0,
    max_chunk: int = 512,
    labels: bool = True,
) -> bytes:
    """A device's birth (``status``, online) running ``active_version`` of ``schema_id``."""
    return Status.create(
        online=True,
        fw="test",
        schema_id=schema_id,
        active_version=active_version,
        update_state="IDLE",
        last_deploy_seq=last_deploy_seq,
        epoch_floor=0,
        boot=boot,
        ts_ms=int(time.time() * 1000),
        caps={"max_chunk": max_chunk, "telemetry": ["bin"], "labels": labels},
    ).to_json()


def frame(seq: int, boot: int = 1, *, version: int = 1, features: int = 8) -> bytes:
    """A binary telemetry frame of two readings (``features`` per reading) on ``version``."""
    b = TelemetryBatch.create(
        seq=seq,
        boot=boot,
        ts_ms=int(time.time() * 1000),
        param_version=version,
        features=np.zeros((2, features)),
        pred=[0, 1],
        conf=[0.5, 0.6],
    )
    return encode_binary(b, frac_bits=11)
