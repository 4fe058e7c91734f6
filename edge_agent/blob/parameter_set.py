"""A complete parameter set (never code) and its payload sections (README §6.2).

>>> import numpy as np
>>> from edge_agent.fixedpoint import quantize_linear
>>> from edge_agent.blob.schema import ParameterSchema
>>> schema = ParameterSchema(features=("a", "b"), classes=("x", "y", "z"), rows=3)
>>> model = quantize_linear([0.0, 1.0], [1.0, 2.0], np.eye(3, 2), [0.0, 0.0, 0.1])
>>> ps = ParameterSet.create(schema, model)
>>> back = ParameterSet.from_payload(ps.to_payload())
>>> back.schema == schema and np.array_equal(back.model.weights, model.weights)
True
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.blob.errors import BlobRejectedError
from edge_agent.blob.kat import KnownAnswers, make_known_answers
from edge_agent.blob.schema import ParameterSchema
from edge_agent.blob.sections import CRITICAL_TAGS, Section, Tag, iter_sections, pack_sections
from edge_agent.fixedpoint import FixedPointOverflowError, QuantizedLinear


@dataclass(frozen=True, eq=False)
class ParameterSet:
    """Schema, integer model, confidence threshold, known answers and provenance."""

    schema: ParameterSchema
    model: QuantizedLinear
    kats: KnownAnswers
    min_confidence: int = 0
    """Readings below this confidence (1/256 units) are flagged as uncertain on the device."""
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model.n_features != self.schema.n_features:
            raise ValueError("model and schema disagree on the feature count")
        if self.model.n_rows != self.schema.rows:
            raise ValueError("model and schema disagree on the number of weight rows")
        if not 0 <= self.min_confidence <= 255:
            raise ValueError("min_confidence must lie in [0, 255]")

    @classmethod
    def create(
        cls,
        schema: ParameterSchema,
        model: QuantizedLinear,
        *,
        calibration: npt.ArrayLike | None = None,
        min_confidence: int = 0,
        provenance: Mapping[str, Any] | None = None,
    ) -> ParameterSet:
        """Bundle a model with freshly computed known answers."""
        return cls(
            schema=schema,
            model=model,
            kats=make_known_answers(model, calibration),
            min_confidence=min_confidence,
            provenance=dict(provenance or {}),
        )

    def to_payload(self) -> bytes:
        """The payload bytes: all sections of format version 1."""
        m = self.model
        r, f = m.n_rows, m.n_features
        kat_rows = b"".join(
            self.kats.inputs[i].astype("<f4").tobytes()
            + self.kats.logits[i].astype("<i4").tobytes()
            + struct.pack("<I", int(self.kats.preds[i]))
            for i in range(self.kats.n)
        )
        sections = [
            Section(
                Tag.INPUT_NORM, m.mu.astype("<f4").tobytes() + m.inv_sigma.astype("<f4").tobytes()
            ),
            Section(Tag.WEIGHTS, struct.pack("<HH", r, f) + m.weights.astype("<i1").tobytes()),
            Section(Tag.BIAS, m.bias.astype("<i4").tobytes()),
            Section(
                Tag.REQUANT,
                m.multiplier.astype("<i4").tobytes()
                + m.shift.astype("<i4").tobytes()
                + struct.pack("<f", m.s_out),
            ),
            Section(Tag.THRESHOLDS, struct.pack("<B3x", self.min_confidence), critical=False),
            Section(Tag.LABELS, _json_bytes(list(self.schema.classes))),
            Section(
                Tag.KAT, struct.pack("<HHHH", self.kats.n, f, self.schema.n_classes, 0) + kat_rows
            ),
            Section(Tag.PROVENANCE, _json_bytes(dict(self.provenance)), critical=False),
            Section(Tag.SCHEMA, self.schema.canonical_json(), critical=False),
        ]
        return pack_sections(sections)

    @classmethod
    def from_payload(cls, payload: bytes) -> ParameterSet:
        """Parse payload sections; raises ``BlobRejectedError("unsupported_format")``."""
        found: dict[int, bytes] = {}
        for s in iter_sections(payload):
            if s.tag in found:
                raise BlobRejectedError("unsupported_format", f"section {s.tag} repeated")
            if s.tag not in Tag.__members__.values():
                if s.critical:
                    raise BlobRejectedError(
                        "unsupported_format", f"unknown critical section {s.tag}"
                    )
                continue
            found[s.tag] = s.data
        missing = [Tag(t).name for t in CRITICAL_TAGS | {Tag.SCHEMA} if t not in found]
        if missing:
            raise BlobRejectedError("unsupported_format", f"missing section(s) {missing}")
        try:
            return _decode(found)
        except (struct.error, ValueError, FixedPointOverflowError, KeyError, TypeError) as exc:
            if isinstance(exc, BlobRejectedError):
                raise
            raise BlobRejectedError("unsupported_format", f"malformed section: {exc}") from exc


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _array(data: bytes, dtype: str, count: int, offset: int = 0) -> npt.NDArray[Any]:
    need = np.dtype(dtype).itemsize * count
    if len(data) < offset + need:
        raise ValueError("section shorter than its declared arrays")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


def _decode(found: dict[int, bytes]) -> ParameterSet:
    schema = ParameterSchema.from_json(found[Tag.SCHEMA])
    w_raw = found[Tag.WEIGHTS]
    rows, features = struct.unpack_from("<HH", w_raw)
    if (rows, features) != (schema.rows, schema.n_features):
        raise ValueError("weight shape disagrees with the schema")
    if len(w_raw) != 4 + rows * features:
        raise ValueError("weights section has the wrong length")
    weights = _array(w_raw, "<i1", rows * features, 4).reshape(rows, features).astype(np.int64)
    norm = found[Tag.INPUT_NORM]
    if len(norm) != 8 * features:
        raise ValueError("input normalisation section has the wrong length")
    mu = _array(norm, "<f4", features).astype(np.float32)
    inv_sigma = _array(norm, "<f4", features, 4 * features).astype(np.float32)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(inv_sigma))):
        raise ValueError("non-finite input normalisation")
    bias_raw, rq = found[Tag.BIAS], found[Tag.REQUANT]
    if len(bias_raw) != 4 * rows or len(rq) != 8 * rows + 4:
        raise ValueError("bias or requantization section has the wrong length")
    labels = json.loads(found[Tag.LABELS])
    if labels != list(schema.classes):
        raise ValueError("label map disagrees with the schema")
    model = QuantizedLinear(
        mu=mu,
        inv_sigma=inv_sigma,
        weights=weights,
        bias=_array(bias_raw, "<i4", rows).astype(np.int64),
        multiplier=_array(rq, "<i4", rows).astype(np.int64),
        shift=_array(rq, "<i4", rows, 4 * rows).astype(np.int64),
        s_out=float(struct.unpack_from("<f", rq, 8 * rows)[0]),
        n_classes=schema.n_classes,
    )
    kat_raw = found[Tag.KAT]
    n, kf, kc, _ = struct.unpack_from("<HHHH", kat_raw)
    if (kf, kc) != (features, schema.n_classes):
        raise ValueError("known-answer shape disagrees with the schema")
    kat_dtype = np.dtype([("x", "<f4", (features,)), ("logits", "<i4", (rows,)), ("pred", "<u4")])
    if len(kat_raw) != 8 + n * kat_dtype.itemsize:
        raise ValueError("known-answer section has the wrong length")
    kat = np.frombuffer(kat_raw, dtype=kat_dtype, count=n, offset=8)
    kats = KnownAnswers(
        inputs=kat["x"].astype(np.float32),
        logits=kat["logits"].astype(np.int64),
        preds=kat["pred"].astype(np.int64),
    )
    min_conf = struct.unpack_from("<B", found[Tag.THRESHOLDS])[0] if Tag.THRESHOLDS in found else 0
    provenance = json.loads(found[Tag.PROVENANCE]) if Tag.PROVENANCE in found else {}
    if not isinstance(provenance, dict):
        raise ValueError("provenance must be a JSON object")
    return ParameterSet(schema, model, kats, min_conf, provenance)
