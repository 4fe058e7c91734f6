"""The deployed parameter set a candidate is built from: integer model, float view, versions.

A candidate (recalibration or retrain) starts from what the devices actually run: the signed
blob's :class:`~edge_agent.blob.ParameterSet`, its ``param_version`` and ``security_epoch``.
:meth:`DeployedModel.float_model` is the float model the integer one represents (``mu`` and
``sigma = 1/inv_sigma`` from the float32 input stage, weights and bias dequantized), the starting
point for retraining.

>>> import numpy as np
>>> from edge_agent.blob import ParameterSchema, ParameterSet, build_blob, generate_key
>>> from edge_agent.fixedpoint import quantize_linear
>>> schema = ParameterSchema(features=("a", "b"), classes=("x", "y", "z"), rows=3)
>>> ps = ParameterSet.create(schema, quantize_linear([0, 1], [1, 2], np.eye(3, 2), [0, 0, 0]))
>>> dep = DeployedModel.from_blob(build_blob(ps, param_version=4, security_epoch=2,
...                                          key=generate_key()))
>>> dep.param_version, dep.security_epoch, dep.float_model().sigma
(4, 2, [1.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.blob import ParameterSet, verify_blob
from edge_agent.blob.float_model import FloatLinearModel
from edge_agent.fixedpoint.rounding import IntArray


@dataclass(frozen=True, eq=False)
class DeployedModel:
    """What the devices run: parameters plus the blob header's version and security epoch."""

    params: ParameterSet
    param_version: int
    security_epoch: int

    @classmethod
    def from_blob(
        cls, blob: bytes, trusted: Mapping[int, Ed25519PublicKey] | None = None
    ) -> DeployedModel:
        """Parse (with ``trusted`` keys: verify) a signed blob; raises ``BlobRejectedError``."""
        v = verify_blob(blob, trusted=trusted, schema_id=None)
        return cls(v.params, v.header.param_version, v.header.security_epoch)

    @property
    def schema_id(self) -> str:
        """The parameter schema's id in hex (the registry's key)."""
        return self.params.schema.schema_id_hex

    def predict(self, x: npt.ArrayLike) -> IntArray:
        """Class indices exactly as the device computes them (integer kernel)."""
        return self.params.model.predict(x)

    def float_model(self) -> FloatLinearModel:
        """The float model the integer parameters represent (dequantized weights and bias)."""
        m = self.params.model
        w, b = m.dequantized()
        sigma = 1.0 / m.inv_sigma.astype(np.float64)
        return FloatLinearModel(
            features=list(self.params.schema.features),
            classes=list(self.params.schema.classes),
            mu=[float(v) for v in m.mu.astype(np.float64)],
            sigma=[float(v) for v in sigma],
            weights=[[float(v) for v in row] for row in w],
            bias=[float(v) for v in b],
        )
