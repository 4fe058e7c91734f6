"""MQTT topic names: ``td/v1/{fleet}/{device}/{leaf}`` (README §1).

>>> topic("plant-7", "dev_0001", Leaf.TEL)
'td/v1/plant-7/dev_0001/tel'
>>> parse_topic("td/v1/plant-7/dev_0001/blob/get")
Topic(fleet='plant-7', device='dev_0001', leaf=<Leaf.BLOB_GET: 'blob/get'>)
>>> subscription(Leaf.ACK)
'td/v1/+/+/ack'
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, NamedTuple

from edge_agent.wire.errors import WireError

__all__ = [
    "ID_MAX_LEN",
    "PREFIX",
    "Leaf",
    "Topic",
    "parse_topic",
    "subscription",
    "topic",
    "validate_id",
]

PREFIX: Final = "td/v1"
"""The first two topic levels shared by every tinydrift topic."""

ID_MAX_LEN: Final = 64
"""Longest fleet or device id, in characters."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class Leaf(StrEnum):
    """The last one or two topic levels, naming the message kind.

    >>> Leaf("blob/data") is Leaf.BLOB_DATA
    True
    >>> Leaf.STATUS.qos, Leaf.STATUS.retained, Leaf.TEL.qos
    (1, True, 0)
    """

    TEL = "tel"
    LBL = "lbl"
    STATUS = "status"
    ACK = "ack"
    DESIRED = "desired"
    BLOB_GET = "blob/get"
    BLOB_DATA = "blob/data"

    @property
    def qos(self) -> int:
        """The MQTT QoS this leaf is published with (README §1)."""
        return 0 if self is Leaf.TEL else 1

    @property
    def retained(self) -> bool:
        """Whether messages on this leaf are published retained (README §1)."""
        return self in (Leaf.STATUS, Leaf.DESIRED)


class Topic(NamedTuple):
    """A parsed tinydrift topic."""

    fleet: str
    device: str
    leaf: Leaf


def validate_id(s: str) -> str:
    """Return ``s`` if it is a valid fleet or device id, else raise ``WireError("bad_id")``.

    Ids are 1–64 characters from ``[A-Za-z0-9_.-]``.

    >>> validate_id("dev-01.a_b")
    'dev-01.a_b'
    >>> validate_id("dev/01")
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: bad_id: invalid id 'dev/01'
    """
    if not isinstance(s, str) or _ID_RE.fullmatch(s) is None:
        shown = s[:80] if isinstance(s, str) else type(s).__name__
        raise WireError("bad_id", f"invalid id {shown!r}")
    return s


def _leaf(leaf: str) -> Leaf:
    try:
        return Leaf(leaf)
    except ValueError:
        raise WireError("bad_topic", f"unknown leaf {str(leaf)[:80]!r}") from None


def topic(fleet: str, device: str, leaf: Leaf | str) -> str:
    """The topic ``td/v1/{fleet}/{device}/{leaf}``.

    Raises ``WireError("bad_id")`` for an invalid id and ``WireError("bad_topic")`` for an
    unknown leaf.
    """
    return f"{PREFIX}/{validate_id(fleet)}/{validate_id(device)}/{_leaf(leaf).value}"


def parse_topic(topic: str) -> Topic:
    """Split a tinydrift topic into ``(fleet, device, leaf)``.

    A topic outside ``td/v1/``, with the wrong number of levels or an unknown leaf raises
    ``WireError("bad_topic")``; a well-formed topic whose fleet or device level is not a valid
    id (empty, a wildcard, whitespace, …) raises ``WireError("bad_id")``.

    >>> parse_topic("td/v2/f/d/tel")
    Traceback (most recent call last):
    ...
    edge_agent.wire.errors.WireError: bad_topic: not a td/v1 topic: 'td/v2/f/d/tel'
    """
    if not isinstance(topic, str):
        raise WireError("bad_topic", f"topic must be str, not {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "td" or parts[1] != "v1":
        raise WireError("bad_topic", f"not a td/v1 topic: {topic[:200]!r}")
    leaf = _leaf("/".join(parts[4:]))
    return Topic(validate_id(parts[2]), validate_id(parts[3]), leaf)


def subscription(leaf: Leaf | str, fleet: str = "+") -> str:
    """The wildcard filter matching ``leaf`` of every device of ``fleet`` (default: all fleets).

    >>> subscription("blob/get", fleet="plant-7")
    'td/v1/plant-7/+/blob/get'
    """
    fleet_level = "+" if fleet == "+" else validate_id(fleet)
    return f"{PREFIX}/{fleet_level}/+/{_leaf(leaf).value}"
