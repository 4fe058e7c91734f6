"""What ingest hands to the detectors: validated telemetry and label batches of one device.

These are the keyed-stream records of DESIGN.md §6: everything a stateful worker needs, keyed by
``(fleet, device)``, ordered per device by ``(boot, seq)``, so that moving to a distributed
engine later is a transport swap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class DeviceFrame:
    """One validated telemetry batch of one device.

    ``features`` are the values the device holds (``int16 / 2**frac_bits`` for binary frames),
    ``[k, F]``; ``pred`` class indices ``[k]``; ``conf`` confidences in ``[0, 1]``, ``[k]``.
    ``recv_ts`` is the service's receive time (Unix seconds), ``ts_ms`` the device's clock.
    """

    fleet: str
    device: str
    boot: int
    seq: int
    ts_ms: int
    recv_ts: float
    param_version: int
    features: FloatArray
    pred: IntArray
    conf: FloatArray

    @property
    def k(self) -> int:
        """Readings in the frame."""
        return int(self.pred.shape[0])

    @property
    def key(self) -> tuple[str, str]:
        """The stream key ``(fleet, device)``."""
        return (self.fleet, self.device)


@dataclass(frozen=True, slots=True, eq=False)
class DeviceLabels:
    """One validated label batch: readings with the device's prediction and the true label."""

    fleet: str
    device: str
    boot: int
    seq: int
    ts_ms: int
    recv_ts: float
    param_version: int
    features: FloatArray
    pred: IntArray
    label: IntArray

    @property
    def k(self) -> int:
        """Labelled readings in the batch."""
        return int(self.label.shape[0])
