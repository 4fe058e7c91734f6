"""Telemetry codecs: the binary frame, the JSON payload and the dispatcher (README §2.1, §2.2)."""

from __future__ import annotations

import json
import struct
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.wire import (
    HEADER_SIZE,
    REASONS,
    TelemetryBatch,
    WireError,
    decode_binary,
    decode_json,
    decode_telemetry,
    encode_binary,
    encode_binary_raw,
    encode_json,
    quantise_conf,
    quantise_features,
    round_half_away,
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(WireError) as exc:
        fn(*args, **kwargs)
    return exc.value.reason


# A frame written out by hand from the README §2.1 table, the reference for a C port:
# k=2, F=3, frac_bits=10, seq=0x01020304, boot=5, ts_ms=1764028800000, param_version=3
GOLDEN = bytes.fromhex(
    "5446 01 0a"  # magic "TF", version 1, frac_bits 10
    "04030201"  # seq
    "05000000"  # boot
    "005c4fb89a010000"  # ts_ms
    "03000000"  # param_version
    "0200 03 00"  # k, F, reserved
    "0004 00fe 0100 02 00"  # 1.0, -0.5, 2**-10; pred 2, conf 0
    "0080 ff7f ffff ff ff"  # -32.0, 32767/1024, -2**-10; pred 255, conf 255/256
)
GOLDEN_FIELDS: dict[str, Any] = {
    "seq": 0x01020304,
    "boot": 5,
    "ts_ms": 1764028800000,
    "param_version": 3,
    "features": [[1.0, -0.5, 2.0**-10], [-32.0, 32767 / 1024, -(2.0**-10)]],
    "pred": [2, 255],
    "conf": [0.0, 255 / 256],
}


# --- strategies ----------------------------------------------------------------------------------


@st.composite
def raw_readings(draw: st.DrawFn, max_k: int = 12, max_f: int = 10) -> dict[str, Any]:
    """What a device holds: int16 features, u8 pred and conf, plus header fields."""
    k = draw(st.integers(1, max_k))
    f = draw(st.integers(1, max_f))
    return {
        "features_q": draw(hnp.arrays(np.int16, (k, f))),
        "pred": draw(hnp.arrays(np.uint8, k)),
        "conf_q": draw(hnp.arrays(np.uint8, k)),
        "seq": draw(U32),
        "boot": draw(U32),
        "ts_ms": draw(U64),
        "param_version": draw(U32),
        "frac_bits": draw(st.integers(0, 15)),
    }


def batch_of(raw: dict[str, Any]) -> TelemetryBatch:
    """The batch a frame of ``raw`` stands for: int16 / 2**frac_bits and conf / 256."""
    return TelemetryBatch.create(
        seq=raw["seq"],
        boot=raw["boot"],
        ts_ms=raw["ts_ms"],
        param_version=raw["param_version"],
        features=raw["features_q"].astype(np.float64) / 2.0 ** raw["frac_bits"],
        pred=raw["pred"],
        conf=raw["conf_q"] / 256.0,
    )


def raw_frame(raw: dict[str, Any]) -> bytes:
    return encode_binary_raw(**raw)


@st.composite
def float_batches(draw: st.DrawFn, max_k: int = 8, max_f: int = 8) -> TelemetryBatch:
    k = draw(st.integers(1, max_k))
    f = draw(st.integers(1, max_f))
    finite = st.floats(allow_nan=False, allow_infinity=False)
    return TelemetryBatch.create(
        seq=draw(U32),
        boot=draw(U32),
        ts_ms=draw(U64),
        param_version=draw(U32),
        features=draw(hnp.arrays(np.float64, (k, f), elements=finite)),
        pred=draw(hnp.arrays(np.int64, k, elements=st.integers(0, 2**40))),
        conf=draw(hnp.arrays(np.float64, k, elements=st.floats(0.0, 1.0))),
    )


# --- golden frame --------------------------------------------------------------------------------


def test_golden_frame_decodes_to_the_documented_values() -> None:
    b = decode_binary(GOLDEN)
    assert b == TelemetryBatch.create(**GOLDEN_FIELDS)
    assert len(GOLDEN) == HEADER_SIZE + 2 * (2 * 3 + 2)


def test_golden_frame_is_what_both_encoders_write() -> None:
    raw = encode_binary_raw(
        [[1024, -512, 1], [-32768, 32767, -1]],
        [2, 255],
        [0, 255],
        seq=0x01020304,
        boot=5,
        ts_ms=1764028800000,
        param_version=3,
        frac_bits=10,
    )
    assert raw == GOLDEN
    assert encode_binary(TelemetryBatch.create(**GOLDEN_FIELDS), frac_bits=10) == GOLDEN


def test_eight_features_cost_18_bytes_per_reading() -> None:
    raw = {
        "features_q": np.zeros((64, 8), np.int16),
        "pred": np.zeros(64, np.uint8),
        "conf_q": np.zeros(64, np.uint8),
        "seq": 0,
        "boot": 0,
        "ts_ms": 0,
        "param_version": 0,
        "frac_bits": 0,
    }
    assert len(raw_frame(raw)) == 28 + 64 * 18


def test_decoded_arrays_are_read_only_with_contract_dtypes() -> None:
    b = decode_binary(GOLDEN)
    assert [a.dtype.name for a in (b.features, b.pred, b.conf)] == ["float64", "int64", "float64"]
    assert b.features.shape == (2, 3)
    for arr in (b.features, b.pred, b.conf):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1


# --- round trips ---------------------------------------------------------------------------------


@settings(deadline=None)
@given(raw_readings())
def test_binary_roundtrip_of_representable_batches(raw: dict[str, Any]) -> None:
    frame = raw_frame(raw)
    batch = batch_of(raw)
    assert decode_binary(frame) == batch
    # quantising representable values is exact: the float encoder writes the same bytes
    assert encode_binary(batch, raw["frac_bits"]) == frame


@settings(deadline=None)
@given(float_batches())
def test_json_roundtrip_is_exact_for_any_finite_batch(batch: TelemetryBatch) -> None:
    assert decode_json(encode_json(batch)) == batch
    assert decode_telemetry(encode_json(batch)) == batch


@settings(deadline=None)
@given(raw_readings())
def test_binary_and_json_decode_to_equal_batches(raw: dict[str, Any]) -> None:
    # the JSON is written independently of encode_json, as a device's JSON encoder would
    scale = 2.0 ** raw["frac_bits"]
    doc = {
        "v": 1,
        "seq": raw["seq"],
        "boot": raw["boot"],
        "ts_ms": raw["ts_ms"],
        "param_version": raw["param_version"],
        "features": [[int(q) / scale for q in row] for row in raw["features_q"]],
        "pred": [int(p) for p in raw["pred"]],
        "conf": [int(c) / 256 for c in raw["conf_q"]],
    }
    from_json = decode_telemetry(json.dumps(doc).encode())
    from_binary = decode_telemetry(raw_frame(raw))
    assert from_binary == from_json


def _reference_round(x: float) -> int:
    with localcontext() as ctx:
        ctx.prec = 2000
        return int(Decimal(x).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(st.lists(st.floats(-1e15, 1e15), min_size=1, max_size=20))
def test_round_half_away_matches_decimal_reference(xs: list[float]) -> None:
    assert round_half_away(xs).tolist() == [float(_reference_round(x)) for x in xs]


@settings(deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)),
    st.integers(0, 15),
)
def test_quantise_features_is_round_half_away_then_saturate(x: Any, frac_bits: int) -> None:
    expected = [min(32767, max(-32768, _reference_round(v * 2**frac_bits))) for v in x.tolist()]
    assert quantise_features(x, frac_bits).tolist() == expected


@pytest.mark.parametrize(
    ("x", "frac_bits", "q"),
    [
        (0.5, 0, 1),  # np.round would give 0
        (2.5, 0, 3),  # np.round would give 2
        (-2.5, 0, -3),
        (0.49999999999999994, 0, 0),  # floor(x + 0.5) would give 1
        (1.5 / 1024, 10, 2),
        (-0.5 / 1024, 10, -1),
        (32.0, 10, 32767),
        (-32.0, 10, -32768),
        (-32.0 - 2**-10, 10, -32768),
        (1e300, 15, 32767),
        (-1e300, 0, -32768),
    ],
)
def test_quantise_features_examples(x: float, frac_bits: int, q: int) -> None:
    assert quantise_features([x], frac_bits).tolist() == [q]


@pytest.mark.parametrize(
    ("conf", "q"),
    [
        (0.0, 0),
        (1 / 512, 1),
        (1.5 / 256, 2),
        (0.5, 128),
        (255.5 / 256, 255),
        (0.998, 255),
        (1.0, 255),
    ],
)
def test_quantise_conf_examples(conf: float, q: int) -> None:
    assert quantise_conf([conf]).tolist() == [q]


@settings(deadline=None)
@given(float_batches(max_k=4, max_f=4), st.integers(0, 15))
def test_encode_binary_quantises_any_batch(batch: TelemetryBatch, frac_bits: int) -> None:
    batch = TelemetryBatch.create(**{**batch.model_dump(), "pred": batch.pred % 256})
    got = decode_binary(encode_binary(batch, frac_bits))
    scale = 2.0**frac_bits
    assert np.array_equal(got.features * scale, quantise_features(batch.features, frac_bits))
    assert np.array_equal(got.conf * 256, quantise_conf(batch.conf))
    assert np.array_equal(got.pred, batch.pred)
    assert (got.seq, got.boot, got.ts_ms, got.param_version) == (
        batch.seq,
        batch.boot,
        batch.ts_ms,
        batch.param_version,
    )


# --- encoder errors ------------------------------------------------------------------------------


def test_encode_binary_refuses_unencodable() -> None:
    b = TelemetryBatch.create(**GOLDEN_FIELDS)
    assert reason_of(encode_binary, b, 16) == "schema"
    assert reason_of(encode_binary, b, -1) == "schema"
    assert reason_of(encode_binary, b, True) == "schema"
    assert reason_of(encode_binary, b, 8.0) == "schema"
    big_class = TelemetryBatch.create(**{**GOLDEN_FIELDS, "pred": [2, 256]})
    assert reason_of(encode_binary, big_class, 10) == "bad_class"


def _raw_args(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "features_q": [[1, 2], [3, 4]],
        "pred": [0, 1],
        "conf_q": [0, 255],
        "seq": 0,
        "boot": 0,
        "ts_ms": 0,
        "param_version": 0,
        "frac_bits": 8,
    }
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"features_q": [[1, 32768], [3, 4]]}, "schema"),
        ({"features_q": [[1, -32769], [3, 4]]}, "schema"),
        ({"features_q": [[1.0, 2.0], [3.0, 4.0]]}, "schema"),
        ({"features_q": [1, 2]}, "schema"),
        ({"features_q": np.zeros((0, 2), np.int16), "pred": [], "conf_q": []}, "schema"),
        ({"features_q": np.zeros((4097, 1), np.int16)}, "schema"),
        ({"features_q": np.zeros((2, 0), np.int16)}, "wrong_feature_count"),
        ({"features_q": np.zeros((2, 256), np.int16)}, "wrong_feature_count"),
        ({"pred": [0, 256]}, "bad_class"),
        ({"pred": [-1, 0]}, "bad_class"),
        ({"pred": [0]}, "schema"),
        ({"conf_q": [0, 256]}, "bad_confidence"),
        ({"conf_q": [0.5, 0.5]}, "schema"),
        ({"conf_q": [0, 1, 2]}, "schema"),
        ({"seq": 2**32}, "schema"),
        ({"boot": -1}, "schema"),
        ({"ts_ms": 2**64}, "schema"),
        ({"param_version": 1.0}, "schema"),
        ({"frac_bits": 16}, "schema"),
    ],
)
def test_encode_binary_raw_reasons(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(encode_binary_raw, **_raw_args(**overrides)) == reason


# --- binary decoder errors -----------------------------------------------------------------------


def _with_header(frame: bytes, **fields: int) -> bytes:
    """``frame`` with some header fields replaced."""
    offsets = {"version": (2, "B"), "frac_bits": (3, "B"), "k": (24, "<H"), "F": (26, "B")}
    offsets["reserved"] = (27, "B")
    buf = bytearray(frame)
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


@pytest.mark.parametrize("length", range(len(GOLDEN)))
def test_every_truncation_is_truncated(length: int) -> None:
    assert reason_of(decode_binary, GOLDEN[:length]) == "truncated"
    if length:  # the dispatcher calls an empty payload "decode"
        assert reason_of(decode_telemetry, GOLDEN[:length]) == "truncated"


def test_empty_payload() -> None:
    assert reason_of(decode_telemetry, b"") == "decode"
    assert reason_of(decode_binary, b"") == "truncated"


@pytest.mark.parametrize(
    "extra", [b"\x00", b"\xff" * 3, GOLDEN[HEADER_SIZE : HEADER_SIZE + 8], GOLDEN]
)
def test_trailing_bytes(extra: bytes) -> None:
    assert reason_of(decode_telemetry, GOLDEN + extra) == "trailing_bytes"


def test_oversized_is_checked_before_parsing() -> None:
    assert decode_binary(GOLDEN, max_bytes=len(GOLDEN)) == decode_binary(GOLDEN)
    assert reason_of(decode_binary, GOLDEN, max_bytes=len(GOLDEN) - 1) == "oversized"
    assert reason_of(decode_telemetry, GOLDEN, max_bytes=len(GOLDEN) - 1) == "oversized"
    junk = b"XX" + bytes(65535)
    assert reason_of(decode_binary, junk) == "oversized"
    assert reason_of(decode_telemetry, junk) == "oversized"
    assert reason_of(decode_json, b"{" + bytes(65536)) == "oversized"


def test_default_limit_is_64_kib() -> None:
    # k = 4096 readings of F = 7 features: 28 + 4096 * 16 = 65564 bytes > 65536
    raw = _raw_args(
        features_q=np.zeros((4096, 7), np.int16),
        pred=np.zeros(4096, np.uint8),
        conf_q=np.zeros(4096, np.uint8),
    )
    frame = encode_binary_raw(**raw)
    assert reason_of(decode_telemetry, frame) == "oversized"
    assert decode_telemetry(frame, max_bytes=len(frame)).k == 4096


@pytest.mark.parametrize("magic", [b"TG", b"Tf", b"T\x00", b"XF", b"tf"])
def test_bad_magic_is_decode(magic: bytes) -> None:
    assert reason_of(decode_binary, magic + GOLDEN[2:]) == "decode"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version: int) -> None:
    frame = _with_header(GOLDEN, version=version)
    assert reason_of(decode_telemetry, frame) == "bad_version"
    assert reason_of(decode_telemetry, frame[:3]) == "bad_version"  # known before the header


@pytest.mark.parametrize(
    "fields",
    [{"frac_bits": 16}, {"frac_bits": 255}, {"k": 0}, {"k": 4097}, {"F": 0}, {"reserved": 1}],
)
def test_bad_header_fields_are_schema(fields: dict[str, int]) -> None:
    assert reason_of(decode_telemetry, _with_header(GOLDEN, **fields)) == "schema"


@pytest.mark.parametrize(
    ("fields", "reason"), [({"k": 3}, "truncated"), ({"k": 1}, "trailing_bytes")]
)
def test_length_follows_k(fields: dict[str, int], reason: str) -> None:
    assert reason_of(decode_telemetry, _with_header(GOLDEN, **fields)) == reason


@pytest.mark.parametrize(
    ("fields", "reason"), [({"F": 4}, "truncated"), ({"F": 2}, "trailing_bytes")]
)
def test_length_follows_f(fields: dict[str, int], reason: str) -> None:
    # F sets the record size: 2 records of 4 features need 48 bytes, of 2 features 40; GOLDEN has 44
    assert reason_of(decode_telemetry, _with_header(GOLDEN, **fields)) == reason


def test_bytes_like_payloads_are_accepted() -> None:
    expected = decode_binary(GOLDEN)
    assert decode_telemetry(bytearray(GOLDEN)) == expected
    assert decode_telemetry(memoryview(GOLDEN)) == expected
    assert decode_binary(bytearray(GOLDEN)) == expected


@pytest.mark.parametrize("payload", ["TF", None, 42, [84, 70]])
def test_non_bytes_payload_is_decode(payload: Any) -> None:
    assert reason_of(decode_telemetry, payload) == "decode"
    assert reason_of(decode_binary, payload) == "decode"
    assert reason_of(decode_json, payload) == "decode"


@pytest.mark.parametrize("first", [b"[", b" ", b"\x00", b"t", b"\xef", b"\n", b"}"])
def test_unknown_first_byte_is_decode(first: bytes) -> None:
    assert reason_of(decode_telemetry, first + b'{"v":1}') == "decode"


# --- JSON decoder errors -------------------------------------------------------------------------

JSON_HEAD = '{"v":1,"seq":7,"boot":2,"ts_ms":0,"param_version":3,'


def jpayload(
    features: str = "[[0.5,-1],[2,0.25]]", pred: str = "[1,0]", conf: str = "[0.5,1]"
) -> bytes:
    return f'{JSON_HEAD}"features":{features},"pred":{pred},"conf":{conf}}}'.encode()


def test_json_payload_parses() -> None:
    b = decode_telemetry(jpayload())
    assert b.features.tolist() == [[0.5, -1.0], [2.0, 0.25]]
    assert b.pred.tolist() == [1, 0]
    assert b.conf.tolist() == [0.5, 1.0]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # Python's json accepts these literals; the contract does not
        (jpayload(features="[[NaN,0],[0,0]]"), "non_finite"),
        (jpayload(features="[[0,Infinity],[0,0]]"), "non_finite"),
        (jpayload(features="[[0,0],[-Infinity,0]]"), "non_finite"),
        (jpayload(conf="[NaN,0.5]"), "non_finite"),
        (jpayload(conf="[Infinity,0.5]"), "non_finite"),
        (jpayload(features="[[1e400,0],[0,0]]"), "non_finite"),  # overflows to inf
        (jpayload(features="[[-1e309,0],[0,0]]"), "non_finite"),
        (jpayload(features="[[1" + "0" * 400 + ",0],[0,0]]"), "non_finite"),  # int > float max
        (jpayload(features="[[1,2],[3]]"), "wrong_feature_count"),
        (jpayload(features="[[1,2],[3,4,5]]"), "wrong_feature_count"),
        (jpayload(features="[[],[]]"), "wrong_feature_count"),
        (jpayload(features="[1,2]"), "schema"),
        (jpayload(features="[[[1]],[[2]]]"), "schema"),
        (jpayload(features="[[true,0],[0,0]]"), "schema"),
        (jpayload(features='[["1",0],[0,0]]'), "schema"),
        (jpayload(features="[[null,0],[0,0]]"), "schema"),
        (jpayload(features='{"a":1}'), "schema"),
        (jpayload(features="[]", pred="[]", conf="[]"), "schema"),
        (jpayload(pred="[1]"), "schema"),
        (jpayload(pred="[1.0,0]"), "schema"),
        (jpayload(pred="[1,null]"), "schema"),
        (jpayload(conf="[0.5]"), "schema"),
        (jpayload(conf="[1.5,0.5]"), "bad_confidence"),
        (jpayload(conf="[-1e-9,0.5]"), "bad_confidence"),
        (jpayload(conf="[1.0000000000000002,0.5]"), "bad_confidence"),
        (jpayload(pred="[-1,0]"), "bad_class"),
        (jpayload(pred="[9223372036854775808,0]"), "bad_class"),
        (jpayload().replace(b'"v":1', b'"v":2'), "bad_version"),
        (jpayload().replace(b'"v":1', b'"v":"1"'), "schema"),
        (jpayload().replace(b'"v":1,', b""), "schema"),
        (jpayload().replace(b'"seq":7', b'"seq":-7'), "schema"),
        (jpayload().replace(b'"seq":7', b'"seq":4294967296'), "schema"),
        (jpayload().replace(b'"ts_ms":0', b'"ts_ms":0.0'), "schema"),
        (jpayload().replace(b'"seq":7', b'"seq":NaN'), "schema"),
        (jpayload().replace(b'"seq":7', b'"sequence":7'), "schema"),
        (jpayload()[:-1] + b',"x":null}', "schema"),
        (jpayload()[:-1], "decode"),
        (jpayload() + b"x", "decode"),
        (jpayload().replace(b"0.25", b"0.25\xff"), "decode"),
        (b"{" * 40000, "decode"),  # nesting deeper than the parser's recursion limit
        (b"{}", "schema"),
        (b'{"v":1}', "schema"),
    ],
)
def test_json_reasons(payload: bytes, reason: str) -> None:
    assert reason_of(decode_telemetry, payload, max_bytes=1 << 20) == reason
    assert reason_of(decode_json, payload, max_bytes=1 << 20) == reason


# --- garbage -------------------------------------------------------------------------------------


def _only_wire_error(data: bytes) -> None:
    """``decode_telemetry`` returns a batch or raises WireError; anything else propagates."""
    reason: str
    try:
        batch = decode_telemetry(data)
    except WireError as exc:
        reason = exc.reason
    else:
        reason = "ok"
        # a returned batch satisfies the contract
        assert np.isfinite(batch.features).all()
        assert ((batch.conf >= 0) & (batch.conf <= 1)).all()
        assert (batch.pred >= 0).all()
    assert reason in REASONS | {"ok"}


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    _only_wire_error(data)


@given(st.sampled_from([b"T", b"TF", b"TF\x01", b"{"]), st.binary(max_size=300))
def test_arbitrary_bytes_after_a_plausible_prefix_raise_only_wire_error(
    prefix: bytes, data: bytes
) -> None:
    _only_wire_error(prefix + data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_raise_only_wire_error(data: st.DataObject) -> None:
    frame = bytearray(GOLDEN)
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    _only_wire_error(bytes(frame))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_json_raises_only_wire_error(data: st.DataObject) -> None:
    payload = bytearray(jpayload())
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(
            st.sampled_from(b'{}[],:"-.0123456789eEtrufalsnNI\xff ')
        )
    _only_wire_error(bytes(payload))
