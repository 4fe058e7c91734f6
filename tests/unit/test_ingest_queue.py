"""The ingest queue's two lanes: telemetry shed when full, control never refused, taken first,
acknowledged ahead up to a budget and then only when taken, in arrival order."""

from __future__ import annotations

import threading

from service.ingest.ingest_queue import ENTRY_OVERHEAD, Incoming, IngestQueue, Receipt


def item(i: int, leaf: str = "tel") -> Incoming:
    return Incoming(f"td/v1/f/d{i}/{leaf}", b"x", float(i))


def size(m: Incoming) -> int:
    """What a control message counts against the acknowledgement budget."""
    return len(m.payload) + len(m.topic) + ENTRY_OVERHEAD


def test_telemetry_is_shed_when_its_lane_is_full_and_control_is_not():
    q = IngestQueue(2, ack_ahead_bytes=0)
    assert q.offer(item(0))
    assert q.offer(item(1))
    assert not q.offer(item(2))
    for i in range(50):  # far past both bounds: never refused
        q.put_control(item(100 + i, "lbl"), Receipt(i, 1))
    assert (q.qsize(), q.control_depth) == (52, 50)


def test_control_is_taken_first_and_the_limit_is_kept():
    q = IngestQueue(10)
    q.offer(item(0))
    q.offer(item(1))
    q.put_control(item(2, "status"), None)
    batch: list[Incoming] = []
    assert q.take(batch, 2) == 2
    assert [m.recv_ts for m in batch] == [2.0, 0.0]
    assert q.take(batch, 10) == 1
    assert q.take(batch, 10) == 0
    assert q.empty()


def test_acknowledgements_beyond_the_budget_wait_for_the_take_and_keep_their_order():
    q = IngestQueue(10, ack_ahead_bytes=2 * size(item(0, "ack")))
    acked: list[int] = []
    q.acknowledge = lambda receipts: acked.extend(r.mid for r in receipts)
    now = [q.put_control(item(i, "ack"), Receipt(i, 1)) for i in range(5)]
    assert now == [True, True, False, False, False]
    assert q.deferred_total == 3
    assert q.control_high_water == 5
    batch: list[Incoming] = []
    assert q.take(batch, 3) == 3  # mids 0, 1 (acknowledged on receipt), 2 (deferred)
    assert acked == [2]
    # one deferred receipt still waits: a new message must not overtake it
    assert q.put_control(item(5, "ack"), Receipt(5, 1)) is False
    q.take(batch, 100)
    assert acked == [2, 3, 4, 5]
    assert q.put_control(item(6, "ack"), Receipt(6, 1)) is True  # none pending: at once


def test_take_waits_for_the_first_message():
    q = IngestQueue(10)
    batch: list[Incoming] = []
    assert q.take(batch, 10, timeout=0.01) == 0
    t = threading.Timer(0.05, lambda: q.put_control(item(1, "lbl"), None))
    t.start()
    try:
        moved = 0
        for _ in range(200):  # generous: the put may come late on a loaded machine
            moved = q.take(batch, 10, timeout=0.5)
            if moved:
                break
        assert moved == 1
    finally:
        t.join()
