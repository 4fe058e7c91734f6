"""Waiting for asynchronous effects in integration tests, with a message naming what failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``cond`` every 0.1 s until it is true; fail after ``timeout`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
