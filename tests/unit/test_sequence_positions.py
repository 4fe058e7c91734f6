"""Saved sequence positions: the row's format, and one write per fleet in flight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from service.ingest.device_directory import DeviceDirectory
from service.ingest.schema_catalog import SchemaCatalog
from service.ingest.sequence_positions import (
    PositionSaver,
    PositionsFormatError,
    positions_record,
    read_positions,
)
from service.registry.records import CheckpointRecord


def test_the_directory_positions_round_trip_through_a_row():
    d = DeviceDirectory(SchemaCatalog(), unknown_devices="adopt")
    d.check_sequence("f", "a", 2, 7)
    d.check_label_sequence("f", "a", 2, 3)
    d.check_label_sequence("g", "b", 1, 0)
    positions = d.positions()
    assert positions == {"f": {"a": (2, 7, 2, 3)}, "g": {"b": (None, None, 1, 0)}}
    again = DeviceDirectory(SchemaCatalog(), unknown_devices="adopt")
    for fleet, devices in positions.items():
        for device, (tb, ts, lb, ls) in read_positions(positions_record(fleet, devices)).items():
            if tb is not None and ts is not None:
                again.restore_sequence(fleet, device, tb, ts)
            if lb is not None and ls is not None:
                again.restore_sequence(fleet, device, lb, ls, labels=True)
    assert again.positions() == positions
    # what the restarted service sees next: a replay is a duplicate, a hole is counted
    assert again.check_sequence("f", "a", 2, 7) == "duplicate"
    assert again.check_label_sequence("f", "a", 2, 6) == "ok"
    assert again.get("f", "a").lost_labels == 2


def test_a_row_of_another_kind_or_a_corrupt_one_is_refused():
    rec = positions_record("f", {"a": (1, 2, None, None)})
    with pytest.raises(PositionsFormatError):
        read_positions(replace(rec, kind="device_monitor"))
    with pytest.raises(PositionsFormatError):
        read_positions(replace(rec, state=b"not zlib"))


def test_one_write_per_fleet_in_flight_and_a_failed_one_is_written_again():
    queued: list[tuple[CheckpointRecord, Callable[[bool], None]]] = []
    saver = PositionSaver(lambda rec, settled: queued.append((rec, settled)))
    assert saver.save({"f": {"a": (1, 1, None, None)}}) == 1
    assert saver.save({"f": {"a": (1, 2, None, None)}}) == 0  # the first is still in flight
    queued[0][1](False)  # it failed for good
    assert saver.save({"f": {"a": (1, 2, None, None)}}) == 1
    queued[1][1](True)
    assert saver.save({"f": {"a": (1, 2, None, None)}}) == 0  # unchanged since
    assert saver.save({"f": {"a": (1, 3, None, None)}}) == 1
    assert saver.save({"f": {"a": (1, 4, None, None)}}, wait=True) == 1  # at shutdown
    assert [read_positions(rec)["a"][1] for rec, _ in queued] == [1, 2, 3, 4]
