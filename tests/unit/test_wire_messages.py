"""Message models: errors, batches, status, acks, manifests, chunk requests (README §2, §4, §5)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.wire import (
    ACK_CODE_REASONS,
    REASONS,
    STATE_CODE,
    ChunkRequest,
    LabelBatch,
    Manifest,
    Status,
    TelemetryBatch,
    UpdateAck,
    WireError,
)
from edge_agent.wire.messages import U32_MAX, U64_MAX

README = Path(__file__).resolve().parents[2] / "edge_agent" / "README.md"


def _json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _readme_example(marker: str) -> dict[str, Any]:
    (block,) = [b for b in _json_blocks() if marker in b]
    obj: dict[str, Any] = json.loads(block)
    return obj


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(WireError) as exc:
        fn(*args, **kwargs)
    return exc.value.reason


def outcome(fn: Any, *args: Any) -> str:
    """The WireError reason of ``fn(*args)``, or "ok"; any other exception propagates."""
    try:
        fn(*args)
    except WireError as exc:
        return exc.reason
    return "ok"


# --- WireError -----------------------------------------------------------------------------------


def test_reasons_are_exactly_the_readme_list() -> None:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"is one of a fixed set\s*\((.*?)\)", text, flags=re.S)
    assert m is not None
    assert set(re.findall(r"`(\w+)`", m.group(1))) == REASONS
    assert len(REASONS) == 12


def test_wire_error_is_a_value_error_with_reason() -> None:
    err = WireError("non_finite", "NaN in features")
    assert isinstance(err, ValueError)
    assert (err.reason, err.message) == ("non_finite", "NaN in features")
    assert str(err) == "non_finite: NaN in features"
    assert str(WireError("decode")) == "decode"


def test_wire_error_refuses_unknown_reason() -> None:
    with pytest.raises(ValueError, match="unknown WireError reason") as exc:
        WireError("nope")  # type: ignore[arg-type]
    assert not isinstance(exc.value, WireError)


def test_wire_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(WireError("truncated", "short")))
    assert (type(err), err.reason, err.message) == (WireError, "truncated", "short")


# --- TelemetryBatch / LabelBatch -----------------------------------------------------------------

HEADER = {"seq": 7, "boot": 2, "ts_ms": 1764028800000, "param_version": 3}


def tel(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "v": 1,
        **HEADER,
        "features": [[0.5, -1.0], [2.0, 0.25]],
        "pred": [1, 0],
        "conf": [0.75, 1.0],
    }
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def test_batch_fields_are_read_only_float64_and_int64_copies() -> None:
    feats = np.array([[1.0, 2.0]], dtype=np.float32)
    b = TelemetryBatch.create(**HEADER, features=feats, pred=np.array([3], np.uint8), conf=[1])
    assert [a.dtype.name for a in (b.features, b.pred, b.conf)] == ["float64", "int64", "float64"]
    assert (b.k, b.n_features, b.v) == (1, 2, 1)
    feats[0, 0] = 99.0
    assert b.features[0, 0] == 1.0
    for arr in (b.features, b.pred, b.conf):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0
    with pytest.raises(ValidationError):
        b.seq = 8  # type: ignore[misc]


def test_batch_equality_compares_arrays() -> None:
    a = TelemetryBatch.from_obj(tel())
    assert a == TelemetryBatch.from_obj(tel())
    assert a != TelemetryBatch.from_obj(tel(conf=[0.75, 0.5]))
    assert a != TelemetryBatch.from_obj(tel(seq=8))
    assert a != LabelBatch.create(**HEADER, features=a.features, pred=a.pred, label=a.pred)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"v": 2}, "bad_version"),
        ({"v": 0}, "bad_version"),
        ({"v": "1"}, "schema"),
        ({"v": True}, "schema"),
        ({"v": 1.0}, "schema"),
        ({"v": _DROP}, "schema"),  # v is required on the wire
        ({"seq": _DROP}, "schema"),
        ({"extra": 1}, "schema"),
        ({"seq": -1}, "schema"),
        ({"seq": U32_MAX + 1}, "schema"),
        ({"boot": 1.0}, "schema"),
        ({"ts_ms": U64_MAX + 1}, "schema"),
        ({"param_version": True}, "schema"),
        ({"param_version": "3"}, "schema"),
        ({"features": []}, "schema"),
        ({"features": [1.0, 2.0]}, "schema"),
        ({"features": [[[1.0]], [[2.0]]]}, "schema"),
        ({"features": "[[1]]"}, "schema"),
        ({"features": [[1.0, "2"], [3.0, 4.0]]}, "schema"),
        ({"features": [[1.0, None], [3.0, 4.0]]}, "schema"),
        ({"features": [[1.0, True], [3.0, 4.0]]}, "schema"),
        ({"pred": [1]}, "schema"),
        ({"conf": [0.5, 0.5, 0.5]}, "schema"),
        ({"pred": [1.0, 0]}, "schema"),
        ({"pred": [True, 0]}, "schema"),
        ({"conf": ["0.5", 0.5]}, "schema"),
        ({"features": [[1.0, 2.0], [3.0]]}, "wrong_feature_count"),
        ({"features": [[], []]}, "wrong_feature_count"),
        ({"features": [[0.0] * 256] * 2}, "wrong_feature_count"),
        ({"features": [[float("nan"), 0.0], [0.0, 0.0]]}, "non_finite"),
        ({"features": [[0.0, 0.0], [float("-inf"), 0.0]]}, "non_finite"),
        ({"features": [[10**400, 0.0], [0.0, 0.0]]}, "non_finite"),
        ({"conf": [float("inf"), 0.5]}, "non_finite"),
        ({"conf": [float("nan"), 0.5]}, "non_finite"),
        ({"conf": [1.0000001, 0.5]}, "bad_confidence"),
        ({"conf": [-0.0001, 0.5]}, "bad_confidence"),
        ({"conf": [2, 0]}, "bad_confidence"),
        ({"pred": [-1, 0]}, "bad_class"),
        ({"pred": [2**63, 0]}, "bad_class"),
    ],
)
def test_telemetry_batch_reasons(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(TelemetryBatch.from_obj, tel(**overrides)) == reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        # the documented order: bad_version, schema, wrong_feature_count, non_finite,
        # bad_confidence, bad_class
        ({"v": 2, "seq": -1, "features": [[1.0], [float("nan")]]}, "bad_version"),
        ({"seq": -1, "features": [[1.0], [1.0, 2.0]]}, "schema"),
        ({"pred": [1], "features": [[1.0], [1.0, 2.0]]}, "schema"),
        ({"features": [[float("nan")], [1.0, 2.0]]}, "wrong_feature_count"),
        ({"features": [[float("nan"), 1.0], [1.0, 2.0]], "conf": [2.0, 0.5]}, "non_finite"),
        ({"conf": [float("nan"), 0.5], "pred": [-1, 0]}, "non_finite"),
        ({"conf": [2.0, 0.5], "pred": [-1, 0]}, "bad_confidence"),
    ],
)
def test_telemetry_batch_reason_precedence(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(TelemetryBatch.from_obj, tel(**overrides)) == reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("features", np.zeros((2, 2), dtype=bool), "schema"),
        ("features", np.zeros((2, 2), dtype=object), "schema"),
        ("features", np.zeros((2, 2), dtype=complex), "schema"),
        ("features", np.zeros((2, 2, 1)), "schema"),
        ("features", np.zeros((2, 0)), "wrong_feature_count"),
        ("features", np.full((2, 2), np.nan), "non_finite"),
        ("pred", np.array([1.0, 0.0]), "schema"),
        ("pred", np.array([2**63, 0], dtype=np.uint64), "bad_class"),
        ("pred", np.array([-3, 0], dtype=np.int8), "bad_class"),
        ("conf", np.array([0.5, 1.5], dtype=np.float32), "bad_confidence"),
        ("conf", np.array([[0.5, 0.5]]), "schema"),
    ],
)
def test_batch_from_arrays_reasons(field: str, value: Any, reason: str) -> None:
    assert reason_of(TelemetryBatch.create, **{**tel(), field: value}) == reason


def test_batch_limits_on_k() -> None:
    ok = TelemetryBatch.create(
        **HEADER, features=np.zeros((4096, 1)), pred=[0] * 4096, conf=[0] * 4096
    )
    assert ok.k == 4096
    too_many = dict(features=np.zeros((4097, 1)), pred=[0] * 4097, conf=[0] * 4097)
    assert reason_of(TelemetryBatch.create, **HEADER, **too_many) == "schema"


def test_batch_limits_on_features() -> None:
    ok = TelemetryBatch.from_obj(tel(features=[[0.0] * 255] * 2))
    assert ok.n_features == 255


def test_create_does_not_require_v_but_the_wire_does() -> None:
    assert TelemetryBatch.create(**{k: v for k, v in tel().items() if k != "v"}).v == 1
    assert reason_of(TelemetryBatch.from_obj, tel(v=_DROP)) == "schema"


def test_check_shape() -> None:
    b = TelemetryBatch.from_obj(tel())  # F = 2, classes {0, 1}
    b.check_shape(2, 2)
    assert reason_of(b.check_shape, 3, 2) == "wrong_feature_count"
    assert reason_of(b.check_shape, 1, 2) == "wrong_feature_count"
    assert reason_of(b.check_shape, 2, 1) == "bad_class"


def test_label_batch() -> None:
    d = {"v": 1, **HEADER, "features": [[1, 2]], "pred": [1], "label": [2]}
    b = LabelBatch.from_obj(d)
    assert b.label.dtype == np.int64
    assert b.label.tolist() == [2]
    assert json.loads(b.to_json()) == {**d, "features": [[1.0, 2.0]]}
    assert LabelBatch.from_json(b.to_json()) == b
    b.check_shape(2, 3)
    assert reason_of(b.check_shape, 2, 2) == "bad_class"  # the label, pred is 1
    assert reason_of(LabelBatch.from_obj, {**d, "label": [-1]}) == "bad_class"
    assert reason_of(LabelBatch.from_obj, {**d, "label": [0.5]}) == "schema"
    assert reason_of(LabelBatch.from_obj, {**d, "conf": [0.5]}) == "schema"
    assert reason_of(LabelBatch.from_obj, {**d, "features": [[1, float("inf")]]}) == "non_finite"


def test_readme_label_example_shape_parses() -> None:
    block = next(b for b in _json_blocks() if '"label"' in b)
    obj = json.loads(block.replace("[[...], ...]", "[[0.5]]").replace(", ...]", "]"))
    assert LabelBatch.from_obj(obj).label.tolist() == [1]


def test_batch_model_dump_is_json_ready() -> None:
    b = TelemetryBatch.from_obj(tel())
    assert b.model_dump(mode="json") == {**tel(), "conf": [0.75, 1.0]}


# --- shared from_json behaviour ------------------------------------------------------------------

MODELS = [TelemetryBatch, LabelBatch, Status, UpdateAck, Manifest, ChunkRequest]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "decode"),
        (b"{", "decode"),
        (b"[1, 2]", "decode"),
        (b'"v"', "decode"),
        (b"null", "decode"),
        (b'{"v": 1}\xff', "decode"),
        (b'\xef\xbb\xbf{"v": 2}', "decode"),  # UTF-8 BOM
        ('{"v": 2}'.encode("utf-16"), "decode"),
        (b'{"v": 3}', "bad_version"),
        (b'{"v": OWN}', "schema"),  # the model's own version, nothing else
        (b'{"v": "1"}', "schema"),
        (b"{}", "schema"),
        (b" " * 65537, "oversized"),
    ],
)
def test_from_json_common_reasons(model: Any, data: bytes, reason: str) -> None:
    data = data.replace(b"OWN", str(model.model_fields["v"].default).encode())
    assert reason_of(model.from_json, data) == reason


@pytest.mark.parametrize("model", MODELS)
def test_from_json_max_bytes_is_configurable(model: Any) -> None:
    assert reason_of(model.from_json, b'{"v": 2}', max_bytes=7) == "oversized"
    assert reason_of(model.from_json, b'{"v": 3}', max_bytes=8) == "bad_version"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["IDLE", "TRIAL", "install", "server", "a1b2c3d4e5f60718", "bin"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["v", "online", "seq", "state", "code", "param", "features", "pred", "conf", "x"]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(model=st.sampled_from(MODELS), value=json_values)
def test_any_json_value_raises_only_wire_error(model: Any, value: Any) -> None:
    assert outcome(model.from_json, json.dumps(value).encode()) in REASONS | {"ok"}


@given(model=st.sampled_from(MODELS), data=st.binary(max_size=200))
def test_any_bytes_raise_only_wire_error(model: Any, data: bytes) -> None:
    assert outcome(model.from_json, data) in REASONS | {"ok"}


# --- Status --------------------------------------------------------------------------------------


def birth(**overrides: Any) -> dict[str, Any]:
    d = _readme_example('"online": true')
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def test_readme_birth_example_roundtrips() -> None:
    s = Status.from_obj(birth())
    assert s.online is True
    assert s.caps is not None
    assert s.caps.telemetry == ("bin", "json")
    assert json.loads(s.to_json()) == birth()
    assert Status.from_json(s.to_json()) == s


def test_will_is_exactly_the_readme_payload() -> None:
    assert Status.will().to_json() == b'{"v":1,"online":false}'
    assert Status.from_json(b'{"v": 1, "online": false}') == Status.will()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"v": 3}, "bad_version"),
        ({"online": "true"}, "schema"),
        ({"online": 1}, "schema"),
        ({"schema_id": _DROP}, "schema"),
        ({"caps": _DROP}, "schema"),
        ({"update_state": "BUSY"}, "schema"),
        ({"schema_id": "A1B2C3D4E5F60718"}, "schema"),
        ({"schema_id": "a1b2c3d4e5f6071"}, "schema"),
        ({"schema_id": "a1b2c3d4e5f607189"}, "schema"),
        ({"schema_id": "a1b2c3d4e5f6071\n"}, "schema"),
        ({"schema_id": "a1b2c3d4e5f6071g"}, "schema"),
        ({"active_version": -1}, "schema"),
        ({"last_deploy_seq": U32_MAX + 1}, "schema"),
        ({"ts_ms": 1.5}, "schema"),
        ({"boot": True}, "schema"),
        ({"caps": {"max_chunk": 1024, "telemetry": ["xml"], "labels": True}}, "schema"),
        ({"caps": {"max_chunk": 1024, "telemetry": [], "labels": True}}, "schema"),
        ({"caps": {"max_chunk": 63, "telemetry": ["bin"], "labels": True}}, "schema"),
        ({"caps": {"max_chunk": 65536, "telemetry": ["bin"], "labels": True}}, "schema"),
        ({"caps": {"max_chunk": 1024, "telemetry": ["bin"], "labels": 1}}, "schema"),
        ({"caps": {"max_chunk": 1024, "telemetry": ["bin"]}}, "schema"),
        ({"color": "blue"}, "schema"),
        ({"online": False}, "schema"),  # a Will carries nothing else
    ],
)
def test_status_reasons(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(Status.from_obj, birth(**overrides)) == reason


def test_birth_optional_fields() -> None:
    s = Status.from_obj(birth(fw=_DROP, previous_version=_DROP))
    assert (s.fw, s.previous_version) == (None, None)
    assert b"fw" not in s.to_json()


# --- UpdateAck -----------------------------------------------------------------------------------


def ack(**overrides: Any) -> dict[str, Any]:
    d = _readme_example('"state": "TRIAL"')
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def test_readme_ack_example_roundtrips() -> None:
    a = UpdateAck.from_obj(ack())
    assert (a.state, a.code, a.reason, a.progress) == ("TRIAL", 202, "trial", (12, 12))
    assert json.loads(a.to_json()) == ack()
    assert UpdateAck.from_json(a.to_json()) == a


def test_ack_state_code_reason_follow_the_table() -> None:
    # every (state, code, reason) triple: valid exactly when the README §2.5 table allows it
    all_reasons = sorted(set().union(*ACK_CODE_REASONS.values()))
    n_valid = 0
    for state, state_code in STATE_CODE.items():
        for code in ACK_CODE_REASONS:
            for reason in all_reasons:
                d = ack(state=state, code=code, reason=reason)
                if code == state_code and reason in ACK_CODE_REASONS[code]:
                    assert UpdateAck.from_obj(d).reason == reason
                    n_valid += 1
                else:
                    assert reason_of(UpdateAck.from_obj, d) == "schema"
    assert n_valid == 3 * 3 + 1 + 12 + 4 + 3


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"state": "IDLE"}, "schema"),
        ({"code": 201}, "schema"),
        ({"code": "202"}, "schema"),
        ({"reason": "because"}, "schema"),
        ({"deploy_seq": _DROP}, "schema"),
        ({"deploy_seq": U32_MAX + 1}, "schema"),
        ({"ts_ms": _DROP}, "schema"),
        ({"progress": [13, 12]}, "schema"),
        ({"progress": [1, 2, 3]}, "schema"),
        ({"progress": [-1, 2]}, "schema"),
        ({"detail": 5}, "schema"),
        ({"v": 0}, "bad_version"),
    ],
)
def test_ack_reasons(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(UpdateAck.from_obj, ack(**overrides)) == reason


def test_ack_optional_fields() -> None:
    a = UpdateAck.create(deploy_seq=9, state="REJECTED", code=400, reason="stale_seq", ts_ms=5)
    assert a.to_json() == (
        b'{"v":1,"deploy_seq":9,"state":"REJECTED","code":400,"reason":"stale_seq",'
        b'"detail":"","ts_ms":5}'
    )


# --- Manifest ------------------------------------------------------------------------------------

SHA = "0123456789abcdef" * 4
SIG = "A" * 86 + "=="  # 64 bytes of base64


def manifest(**overrides: Any) -> dict[str, Any]:
    block = next(b for b in _json_blocks() if '"deploy_seq": 13, "action"' in b)
    d: dict[str, Any] = json.loads(block.replace("…64 hex…", SHA).replace("…base64 Ed25519…", SIG))
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not _DROP}


def test_readme_manifest_example_roundtrips() -> None:
    m = Manifest.from_obj(manifest())
    assert (m.action, m.param.blob_sha256, m.transfer.chunk, m.trial.confirm) == (
        "install",
        SHA,
        512,
        "server",
    )
    assert m.sig is not None
    assert m.sig.key_id == 2
    assert json.loads(m.to_json()) == manifest()
    assert Manifest.from_json(m.to_json()) == m


def test_signing_bytes_are_canonical_json_without_sig() -> None:
    """The known-answer vector of README §4 (fleet and device inside the signed bytes)."""
    m = Manifest.from_obj(manifest())
    (vector,) = re.findall(r"```text\n(\{.*?\})\n```", README.read_text(encoding="utf-8"))
    assert m.signing_bytes() == vector.encode()
    assert b'"fleet":"f1"' in m.signing_bytes()
    assert b'"device":"dev-0000"' in m.signing_bytes()


def test_a_manifest_names_its_fleet_and_device() -> None:
    assert reason_of(Manifest.from_obj, manifest(fleet=_DROP)) == "schema"
    assert reason_of(Manifest.from_obj, manifest(device=_DROP)) == "schema"
    assert reason_of(Manifest.from_obj, manifest(device="a/b")) == "schema"
    assert reason_of(Manifest.from_obj, manifest(fleet="+")) == "schema"
    # the old, unbound format is refused outright
    assert reason_of(Manifest.from_obj, manifest(v=1, fleet=_DROP, device=_DROP)) == "bad_version"
    other = Manifest.from_obj(manifest(fleet="f2"))
    assert other.signing_bytes() != Manifest.from_obj(manifest()).signing_bytes()


def test_signing_bytes_fill_in_defaults_and_ignore_sig() -> None:
    full = Manifest.from_obj(manifest())
    bare = Manifest.from_obj(manifest(rollback=_DROP, transfer=_DROP, sig=_DROP))
    assert bare.sig is None
    assert bare.signing_bytes() == full.signing_bytes()
    other_sig = Manifest.from_obj(manifest(sig={"key_id": 9, "value": "AAAA"}))
    assert other_sig.signing_bytes() == full.signing_bytes()
    assert Manifest.from_obj(manifest(rollback=True)).signing_bytes() != full.signing_bytes()


@given(st.permutations(list(manifest())))
def test_signing_bytes_do_not_depend_on_key_order(order: list[str]) -> None:
    d = manifest()
    shuffled = json.dumps({k: d[k] for k in order}).encode()
    assert Manifest.from_json(shuffled).signing_bytes() == Manifest.from_obj(d).signing_bytes()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"v": 1}, "bad_version"),
        ({"v": 3}, "bad_version"),
        ({"action": "upgrade"}, "schema"),
        ({"rollback": 0}, "schema"),
        ({"deploy_seq": -1}, "schema"),
        ({"deploy_seq": U32_MAX + 1}, "schema"),
        ({"issued_ms": U64_MAX + 1}, "schema"),
        ({"param": _DROP}, "schema"),
        ({"trial": _DROP}, "schema"),
        ({"transfer": {"chunk": 63}}, "schema"),
        ({"transfer": {"chunk": 65536}}, "schema"),
        ({"trial": {"confirm": "device", "timeout_s": 600, "min_inferences": 1}}, "schema"),
        ({"trial": {"confirm": "local", "timeout_s": 0, "min_inferences": 1}}, "schema"),
        ({"sig": {"key_id": 2, "value": "not base64!"}}, "schema"),
        ({"sig": {"key_id": 2, "value": "AAA"}}, "schema"),  # bad padding
        ({"sig": {"key_id": 2, "value": "ÀÀÀÀ"}}, "schema"),
        ({"sig": {"key_id": 2}}, "schema"),
        ({"sig": None, "extra": 1}, "schema"),
    ],
)
def test_manifest_reasons(overrides: dict[str, Any], reason: str) -> None:
    assert reason_of(Manifest.from_obj, manifest(**overrides)) == reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blob_sha256", SHA.upper()),
        ("blob_sha256", SHA[:-1]),
        ("schema_id", "a1b2c3d4e5f6071"),
        ("key_id", -1),
        ("blob_len", U32_MAX + 1),
        ("version", "4"),
        ("security_epoch", None),
    ],
)
def test_manifest_param_reasons(field: str, value: Any) -> None:
    d = manifest()
    d["param"] = {**d["param"], field: value}
    assert reason_of(Manifest.from_obj, d) == "schema"


# --- ChunkRequest --------------------------------------------------------------------------------


def test_readme_chunk_request_example() -> None:
    data = b'{"v": 1, "c": 17, "deploy_seq": 13, "sha256": "' + SHA.encode() + b'", '
    data += b'"index": 5, "count": 2, "chunk": 512}'
    r = ChunkRequest.from_json(data)
    assert (r.c, r.deploy_seq, r.index, r.count, r.chunk) == (17, 13, 5, 2, 512)
    assert ChunkRequest.from_json(r.to_json()) == r


def chunk_req(**overrides: Any) -> dict[str, Any]:
    d = {"v": 1, "c": 17, "deploy_seq": 13, "sha256": SHA, "index": 5, "count": 2, "chunk": 512}
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "overrides",
    [
        {"count": 0},
        {"count": 17},
        {"chunk": 63},
        {"chunk": 65536},
        {"index": U32_MAX, "count": 2},
        {"index": -1},
        {"c": U32_MAX + 1},
        {"sha256": SHA[:-2]},
        {"sha256": "g" * 64},
        {"count": 2.0},
    ],
)
def test_chunk_request_reasons(overrides: dict[str, Any]) -> None:
    assert reason_of(ChunkRequest.from_obj, chunk_req(**overrides)) == "schema"


def test_chunk_request_last_u32_index_is_allowed() -> None:
    assert ChunkRequest.from_obj(chunk_req(index=U32_MAX, count=1)).index == U32_MAX


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_u32_fields_accept_exactly_the_u32_range(x: int) -> None:
    d = chunk_req(c=x)
    if 0 <= x <= U32_MAX:
        assert ChunkRequest.from_obj(d).c == x
    else:
        assert reason_of(ChunkRequest.from_obj, d) == "schema"
