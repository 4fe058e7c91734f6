"""Session fixtures: a real Mosquitto on a free loopback port, a firmware bundle."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.embedded_broker import EmbeddedBroker, start_mosquitto
from service.firmware_bundle import Bundle, create_bundle


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[EmbeddedBroker]:
    """Mosquitto for this test session (``apt-get install -y mosquitto``; .ci/run does it)."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (see .ci/run)")
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Keys, factory model and firmware bundle, created once per session."""
    return create_bundle(tmp_path_factory.mktemp("bundle"), seed=0)
