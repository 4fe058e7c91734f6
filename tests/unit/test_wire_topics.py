"""Topic helpers: ids, topic building, parsing and subscription filters (README §1)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.wire import Leaf, Topic, WireError, parse_topic, subscription, topic, validate_id

ID_ALPHABET = string.ascii_letters + string.digits + "_.-"
ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=64)
leaves = st.sampled_from(list(Leaf))


def _reason(exc: pytest.ExceptionInfo[WireError]) -> str:
    return exc.value.reason


# --- ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", ["a", "Z", "0", "dev-01.a_b", "...", "-", "x" * 64])
def test_valid_ids_are_returned_unchanged(s: str) -> None:
    assert validate_id(s) == s


@pytest.mark.parametrize(
    "s",
    [
        "",
        "x" * 65,
        "+",
        "#",
        "/",
        "a+b",
        "dev#1",
        "fleet/dev",
        "a b",
        " a",
        "a\t",
        "a\n",  # a regex with `$` would accept this
        "a\x00b",
        "dévice",  # non-ASCII letter
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a Unicode digit, not [0-9]
        "ａ",  # FULLWIDTH LATIN SMALL LETTER A
        "a\u200bb",  # zero-width space
        "😀",
        "a:b",
        "a*b",
    ],
)
def test_invalid_ids_are_bad_id(s: str) -> None:
    with pytest.raises(WireError) as exc:
        validate_id(s)
    assert _reason(exc) == "bad_id"


@pytest.mark.parametrize("s", [None, 5, b"dev", ["dev"]])
def test_non_string_ids_are_bad_id(s: object) -> None:
    with pytest.raises(WireError) as exc:
        validate_id(s)  # type: ignore[arg-type]
    assert _reason(exc) == "bad_id"


@given(st.text(max_size=80))
def test_validate_id_accepts_exactly_the_id_alphabet(s: str) -> None:
    ok = 1 <= len(s) <= 64 and all(c in ID_ALPHABET for c in s)
    if ok:
        assert validate_id(s) == s
    else:
        with pytest.raises(WireError) as exc:
            validate_id(s)
        assert _reason(exc) == "bad_id"


# --- topic() / parse_topic() ---------------------------------------------------------------------


def test_topic_layout() -> None:
    assert topic("plant-7", "dev_0001", Leaf.TEL) == "td/v1/plant-7/dev_0001/tel"
    assert topic("f", "d", "blob/data") == "td/v1/f/d/blob/data"


@given(ids, ids, leaves)
def test_topic_parse_roundtrip(fleet: str, device: str, leaf: Leaf) -> None:
    t = topic(fleet, device, leaf)
    parsed = parse_topic(t)
    assert parsed == Topic(fleet, device, leaf)
    assert parsed.leaf is leaf
    assert topic(*parsed) == t


@pytest.mark.parametrize(
    ("fleet", "device"),
    [("", "d"), ("f", ""), ("+", "d"), ("f", "#"), ("f/g", "d"), ("f", "d" * 65)],
)
def test_topic_refuses_bad_ids(fleet: str, device: str) -> None:
    with pytest.raises(WireError) as exc:
        topic(fleet, device, Leaf.TEL)
    assert _reason(exc) == "bad_id"


@pytest.mark.parametrize("leaf", ["", "tel/", "blob", "blob/put", "TEL", "#", "+", "status/x"])
def test_topic_refuses_unknown_leaf(leaf: str) -> None:
    with pytest.raises(WireError) as exc:
        topic("f", "d", leaf)
    assert _reason(exc) == "bad_topic"


@pytest.mark.parametrize(
    "t",
    [
        "",
        "td",
        "td/v1",
        "td/v1/f",
        "td/v1/f/d",
        "td/v1/f/d/",
        "td/v2/f/d/tel",
        "TD/v1/f/d/tel",
        "xx/v1/f/d/tel",
        "/td/v1/f/d/tel",
        "td/v1/f/d/tel/",
        "td/v1/f/d/tel/extra",
        "td/v1/f/d/blob",
        "td/v1/f/d/blob/put",
        "td/v1/f/d/blob/get/x",
        "td/v1/f/d/#",
        "td/v1/f/d/+",
        "td/v1/#",
        "$SYS/broker/uptime",
    ],
)
def test_parse_topic_refuses_foreign_or_malformed(t: str) -> None:
    with pytest.raises(WireError) as exc:
        parse_topic(t)
    assert _reason(exc) == "bad_topic"


@pytest.mark.parametrize(
    "t",
    [
        "td/v1//d/tel",
        "td/v1/f//tel",
        "td/v1/+/d/tel",
        "td/v1/f/+/tel",
        "td/v1/#/d/tel",
        "td/v1/f/d d/tel",
        "td/v1/f/dé/tel",
        "td/v1/f/d\x00/tel",
        "td/v1/" + "f" * 65 + "/d/tel",
        "td/v1/f/" + "d" * 65 + "/status",
    ],
)
def test_parse_topic_refuses_bad_ids_in_a_well_formed_topic(t: str) -> None:
    with pytest.raises(WireError) as exc:
        parse_topic(t)
    assert _reason(exc) == "bad_id"


@pytest.mark.parametrize("t", [None, b"td/v1/f/d/tel", 5])
def test_parse_topic_refuses_non_strings(t: object) -> None:
    with pytest.raises(WireError) as exc:
        parse_topic(t)  # type: ignore[arg-type]
    assert _reason(exc) == "bad_topic"


@given(st.text(max_size=120))
def test_parse_topic_on_any_text_raises_only_wire_error(t: str) -> None:
    reason: str
    try:
        parsed = parse_topic(t)
    except WireError as exc:
        reason = exc.reason
    else:
        reason = "ok"
        assert topic(*parsed) == t
    assert reason in ("bad_topic", "bad_id", "ok")


# --- subscription() and Leaf ---------------------------------------------------------------------


def test_subscription_filters() -> None:
    assert subscription(Leaf.TEL) == "td/v1/+/+/tel"
    assert subscription("blob/get") == "td/v1/+/+/blob/get"
    assert subscription(Leaf.STATUS, fleet="plant-7") == "td/v1/plant-7/+/status"


@given(ids, ids, leaves)
def test_subscription_matches_the_topics_of_its_leaf(fleet: str, device: str, leaf: Leaf) -> None:
    # MQTT `+` matches exactly one level: substitute and compare level by level
    for filt in (subscription(leaf), subscription(leaf, fleet=fleet)):
        levels = filt.split("/")
        t_levels = topic(fleet, device, leaf).split("/")
        assert len(levels) == len(t_levels)
        assert all(f in ("+", t) for f, t in zip(levels, t_levels, strict=True))


@pytest.mark.parametrize("fleet", ["#", "", "a/b", "a+"])
def test_subscription_refuses_bad_fleet(fleet: str) -> None:
    with pytest.raises(WireError) as exc:
        subscription(Leaf.TEL, fleet=fleet)
    assert _reason(exc) == "bad_id"


@pytest.mark.parametrize("leaf", ["#", "+", "blob/#", "nope"])
def test_subscription_refuses_unknown_leaf(leaf: str) -> None:
    with pytest.raises(WireError) as exc:
        subscription(leaf)
    assert _reason(exc) == "bad_topic"


def test_leaf_qos_and_retain_follow_the_table() -> None:
    table = {
        "tel": (0, False),
        "lbl": (1, False),
        "status": (1, True),
        "ack": (1, False),
        "desired": (1, True),
        "blob/get": (1, False),
        "blob/data": (1, False),
    }
    assert {leaf.value: (leaf.qos, leaf.retained) for leaf in Leaf} == table
