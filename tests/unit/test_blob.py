"""Signed parameter blobs: round trip, every tamper, every policy rejection with its reason."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from edge_agent.blob import (
    BlobRejectedError,
    ParameterSchema,
    ParameterSet,
    build_blob,
    generate_key,
    trusted_keys,
    verify_blob,
)
from edge_agent.blob.header import HEADER_LEN, PAYLOAD_OFFSET
from edge_agent.blob.kat import KnownAnswers
from edge_agent.blob.sections import Section, pack_sections
from edge_agent.fixedpoint import quantize_linear

FEATURES = ("f0", "f1", "f2", "f3")
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def schema() -> ParameterSchema:
    return ParameterSchema(features=FEATURES, classes=CLASSES, rows=3)


@pytest.fixture(scope="module")
def params(schema: ParameterSchema) -> ParameterSet:
    rng = np.random.default_rng(1)
    model = quantize_linear(
        rng.normal(size=4), rng.uniform(0.5, 2, size=4), rng.normal(size=(3, 4)), rng.normal(size=3)
    )
    return ParameterSet.create(schema, model, min_confidence=100, provenance={"source": "test"})


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def blob(params: ParameterSet, key) -> bytes:
    return build_blob(params, param_version=5, security_epoch=2, key=key, created=1_700_000_000)


def _verify(data: bytes, key, schema: ParameterSchema, **kw):
    return verify_blob(data, trusted=trusted_keys([key.public]), schema_id=schema.schema_id, **kw)


def test_round_trip_preserves_every_parameter(blob, key, schema, params):
    v = _verify(blob, key, schema)
    m0, m1 = params.model, v.params.model
    for name in ("weights", "bias", "multiplier", "shift", "mu", "inv_sigma"):
        assert np.array_equal(getattr(m0, name), getattr(m1, name)), name
    assert m1.s_out == pytest.approx(m0.s_out, rel=1e-6)
    assert v.params.min_confidence == 100
    assert v.params.provenance == {"source": "test"}
    assert (v.header.param_version, v.header.security_epoch) == (5, 2)
    assert len(blob) % 4 == 0
    v.run_known_answers()
    x = np.random.default_rng(3).normal(size=(50, 4))
    assert np.array_equal(m0.predict(x), m1.predict(x))


def test_every_single_byte_flip_is_rejected(blob, key, schema):
    reasons: set[str] = set()
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[pos] ^= mask
            with pytest.raises(BlobRejectedError) as info:
                _verify(bytes(tampered), key, schema)
            reasons.add(info.value.reason)
    assert {"bad_signature", "hash_mismatch", "unsupported_format", "unknown_key"} <= reasons


def test_header_flips_fail_the_signature_and_payload_flips_the_hash(blob, key, schema):
    header_flip = bytearray(blob)
    header_flip[20] ^= 1  # param_version
    with pytest.raises(BlobRejectedError, match="bad_signature"):
        _verify(bytes(header_flip), key, schema)
    payload_flip = bytearray(blob)
    payload_flip[PAYLOAD_OFFSET + 40] ^= 1
    with pytest.raises(BlobRejectedError) as info:
        _verify(bytes(payload_flip), key, schema)
    assert info.value.reason == "hash_mismatch"


def test_truncation_and_trailing_bytes(blob, key, schema):
    for n in (0, 10, HEADER_LEN, PAYLOAD_OFFSET - 1, PAYLOAD_OFFSET, len(blob) - 1):
        with pytest.raises(BlobRejectedError) as info:
            _verify(blob[:n], key, schema)
        assert info.value.reason == "truncated", n
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob + b"\0", key, schema)
    assert info.value.reason == "unsupported_format"


def test_wrong_key_is_unknown_and_a_forged_key_id_fails_the_signature(params, key, schema):
    other = generate_key()
    blob = build_blob(params, param_version=5, security_epoch=2, key=other)
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob, key, schema)
    assert info.value.reason == "unknown_key"
    forged = bytearray(blob)
    forged[64:68] = struct.pack("<I", key.key_id)
    with pytest.raises(BlobRejectedError) as info:
        _verify(bytes(forged), key, schema)
    assert info.value.reason == "bad_signature"


def test_policy_rejections_each_have_their_reason(blob, key, schema):
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob, key, schema, min_version=6)
    assert info.value.reason == "stale_version"
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob, key, schema, epoch_floor=3)
    assert info.value.reason == "epoch_below_floor"
    other_schema = ParameterSchema(features=(*FEATURES[:3], "g"), classes=CLASSES, rows=3)
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob, key, other_schema)
    assert info.value.reason == "schema_mismatch"
    with pytest.raises(BlobRejectedError) as info:
        _verify(blob, key, schema, max_len=len(blob) - 1)
    assert info.value.reason == "too_large"
    # boundaries are inclusive: the same version and the floor epoch pass
    _verify(blob, key, schema, min_version=5, epoch_floor=2)


def test_kat_mismatch_is_caught_after_a_valid_signature(params, key, schema):
    k = params.kats
    bad_logits = k.logits.copy()
    bad_logits[0, 0] += 1  # a signer whose reference kernel is off by one LSB
    bad = dataclasses.replace(params, kats=KnownAnswers(k.inputs, bad_logits, k.preds))
    v = _verify(build_blob(bad, param_version=6, security_epoch=2, key=key), key, schema)
    with pytest.raises(BlobRejectedError) as info:
        v.run_known_answers()
    assert info.value.reason == "kat_mismatch"


def test_unknown_sections_are_skipped_unless_critical(params):
    payload = params.to_payload()
    extra = pack_sections([Section(200, b"future", critical=False)])
    assert ParameterSet.from_payload(payload + extra).schema == params.schema
    critical = pack_sections([Section(201, b"must-know", critical=True)])
    with pytest.raises(BlobRejectedError) as info:
        ParameterSet.from_payload(payload + critical)
    assert info.value.reason == "unsupported_format"


def test_signed_but_malformed_payload_is_refused_not_crashed(params, key, schema):
    payload = params.to_payload()[:-8]  # cut the last section short
    import hashlib

    from edge_agent.blob.header import BlobHeader

    header = BlobHeader(
        schema_id=schema.schema_id,
        param_version=1,
        security_epoch=0,
        payload_len=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
        key_id=key.key_id,
        created=0,
    ).pack()
    with pytest.raises(BlobRejectedError) as info:
        _verify(header + key.sign(header) + payload, key, schema)
    assert info.value.reason == "unsupported_format"


def test_binary_one_row_model_round_trips(key):
    schema = ParameterSchema(features=("x", "y"), classes=("neg", "pos"), rows=1)
    model = quantize_linear([0.0, 0.0], [1.0, 1.0], [[2.0, -1.0]], [0.1])
    ps = ParameterSet.create(schema, model)
    v = _verify(build_blob(ps, param_version=1, security_epoch=0, key=key), key, schema)
    assert v.params.model.n_classes == 2
    assert v.params.model.predict([[1.0, 0.0], [-1.0, 0.0]]).tolist() == [1, 0]


def test_schema_id_depends_on_order_not_parameters():
    a = ParameterSchema(features=("x", "y"), classes=("n", "p"), rows=1)
    b = ParameterSchema(features=("y", "x"), classes=("n", "p"), rows=1)
    c = ParameterSchema(features=("x", "y"), classes=("n", "p"), rows=2)
    assert len({a.schema_id, b.schema_id, c.schema_id}) == 3
    assert a.schema_id == ParameterSchema(features=("x", "y"), classes=("n", "p"), rows=1).schema_id
    with pytest.raises(ValueError, match="unique"):
        ParameterSchema(features=("x", "x"), classes=("n", "p"), rows=1)
    with pytest.raises(ValueError, match="rows"):
        ParameterSchema(features=("x",), classes=("a", "b", "c"), rows=1)
