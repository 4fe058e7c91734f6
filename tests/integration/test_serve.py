"""``tinydrift serve`` end to end: real Mosquitto, simulated devices with injected drift, SQLite.

The drifting devices (and only they) show up in the registry and in ``/metrics``; every bad input
is counted by reason without stopping ingest; a restart resumes from the checkpoints.
"""

from __future__ import annotations

import json
import pickle
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from edge_agent.wire.messages import LabelBatch, TelemetryBatch
from edge_agent.wire.telemetry_json import encode_json
from edge_agent.wire.topics import Leaf, topic
from service.config import load_settings
from service.drift.device_monitor import DeviceMonitor
from service.firmware_bundle import Bundle
from service.registry.store import Registry
from service.serve import Service
from tests.integration.device_messages import birth, frame
from tests.integration.polling import wait

pytestmark = pytest.mark.integration
FLEET = "plant"
SERVICE_ID = "serve-test-svc"
"""The service's MQTT client id here: its own persistent session (the broker is shared)."""
DEVICES = 12


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += (
                float(value.split(" # ")[0])
                if " # " not in line
                else float(line.split(" # ")[0].rpartition(" ")[2])
            )
    return total


@pytest.fixture(scope="module")
def db_url(module_db_url: str, bundle: Bundle) -> str:
    """The module's registry (SQLite, then PostgreSQL) with the factory parameter set."""
    reg = Registry(module_db_url)
    fw = bundle.firmware()
    reg.add_parameter_set(
        fw.schema.schema_id_hex, 1, 0, fw.factory_blob, source="factory", status="good"
    )
    reg.close()
    return module_db_url


@pytest.fixture(scope="module")
def service(mosquitto, db_url) -> Iterator[Service]:
    s = load_settings(
        broker=mosquitto.url,
        db=db_url,
        metrics_port=0,
        window_s=3.0,
        checkpoint_interval_s=2.0,
        mqtt_client_id=SERVICE_ID,
        null_min_blocks=16,  # calibrated within 5-15 s at 320 readings/s (production: 48)
        null_horizon_readings=128,  # dependence over 8 frames (production: 512 readings)
        null_horizon_labels=8,  # and 8 labels (production: 32)
    )
    svc = Service(s)
    svc.start()
    assert svc.consumer.wait_connected(10)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def fleet(mosquitto, bundle, service) -> Iterator[Fleet]:
    plan = plan_drift(DEVICES, "offset", 0.25, after_s=20.0, seed=4)  # after calibration
    cfg = FleetConfig(
        fleet=FLEET,
        devices=DEVICES,
        host=mosquitto.host,
        port=mosquitto.port,
        seed=4,
        batch=16,
        period_s=0.05,
        label_rate=0.05,
    )
    f = Fleet(cfg, bundle.firmware(), plan)
    f.start()
    yield f
    f.stop()


def test_drifting_devices_are_found_and_stationary_ones_stay_quiet(service, fleet, db_url):
    drifting = set(fleet.plan)
    assert len(drifting) == 3

    def found() -> set[str]:
        return {d for (_f, d) in service.engine.drifting()} | {
            e.device for e in Registry(db_url).list_drift_events(limit=10_000) if e.device
        }

    wait(lambda: drifting <= found(), 90, f"detections on {sorted(drifting)}")
    service.writer.flush(10)
    events = Registry(db_url).list_drift_events(fleet=FLEET, limit=10_000)
    devices = {e.device for e in events if e.device}
    assert drifting <= devices
    assert devices <= drifting, f"false alarms on {sorted(devices - drifting)}"
    # an offset on every axis moves the mean features
    assert any(e.signal in ("feature", "feature_var") for e in events)
    text = scrape(service.metrics_port)
    assert metric(text, "tinydrift_drift_detections_total", fleet=FLEET, scope="device") >= 3
    assert metric(text, "tinydrift_readings_received_total", fleet=FLEET) > 10_000
    assert metric(text, "tinydrift_devices", fleet=FLEET, state="online") == DEVICES
    wait(
        lambda: (
            metric(scrape(service.metrics_port), "tinydrift_devices", fleet=FLEET, state="drifting")
            >= 3
        ),
        15,
        "drifting devices gauge",
    )
    # per-device detail is in the registry, never a per-device label
    assert "dev-0" not in "".join(
        line for line in text.splitlines() if not line.startswith("#") and " # " not in line
    )
    reg = Registry(db_url)
    stored = {d.device: d for d in reg.list_devices(FLEET)}
    assert set(stored) == {a.config.device_id for a in fleet.agents}
    assert all(stored[d].drift_state != "ok" for d in drifting)


def _publish(mosquitto, items: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bad-inputs")
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    for t, payload in items:
        c.publish(t, payload, qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def _birth(bundle: Bundle, boot: int) -> bytes:
    return birth(bundle.firmware().schema.schema_id_hex, boot=boot)


def test_every_bad_input_is_counted_by_reason_and_ingest_goes_on(service, fleet, mosquitto, bundle):
    dev = "probe-1"
    _publish(mosquitto, [(topic(FLEET, dev, Leaf.STATUS), _birth(bundle, 3))])
    wait(lambda: service.directory.get(FLEET, dev) is not None, 10, "the probe's birth")
    t = topic(FLEET, dev, Leaf.TEL)
    good = frame(0, 3)
    nan_json = encode_json(
        TelemetryBatch.from_obj(
            json.loads(
                encode_json(
                    TelemetryBatch.create(
                        seq=9,
                        boot=3,
                        ts_ms=0,
                        param_version=1,
                        features=np.zeros((2, 8)),
                        pred=[0, 1],
                        conf=[0.5, 0.6],
                    )
                )
            )
        )
    ).replace(b"0.5", b"NaN", 1)
    before = dict(service.batcher.rejections)
    items = [
        (t, good),
        (t, b"\x00\x01garbage"),
        (t, good[:-3]),
        (t, good + b"\x00"),
        (t, frame(1, 3, features=9)),
        (t, nan_json),
        (t, b"{" + b" " * 70_000 + b"}"),
        (topic(FLEET, "never-born", Leaf.TEL), frame(0, 1)),
        (t, good),  # replayed: a duplicate
        (t, frame(0, 2)),  # an older boot: stale
        (t, frame(5, 3)),  # accepted, four frames lost
        (topic(FLEET, dev, Leaf.LBL), b'{"v": 1, "seq": "x"}'),
        (topic(FLEET, dev, Leaf.STATUS), b"[]"),
    ]
    _publish(mosquitto, items)
    expected = {
        "decode": 2,
        "truncated": 1,
        "trailing_bytes": 1,
        "wrong_feature_count": 1,
        "non_finite": 1,
        "oversized": 1,
        "unknown_device": 1,
        "duplicate": 1,
        "stale": 1,
        "schema": 1,
    }

    def delta() -> dict[str, int]:
        now = service.batcher.rejections
        return {k: now.get(k, 0) - before.get(k, 0) for k in expected}

    wait(lambda: all(delta()[k] >= v for k, v in expected.items()), 20, f"rejections {expected}")
    assert delta() == expected
    assert service.directory.get(FLEET, dev).lost_frames == 4
    text = scrape(service.metrics_port)
    for reason in expected:
        assert metric(text, "tinydrift_ingest_rejected_total", reason=reason) >= 1, reason
    assert metric(text, "tinydrift_ingest_sequence_gaps_total", fleet=FLEET) >= 4
    # the fleet keeps flowing
    n = service.status().readings
    wait(lambda: service.status().readings > n + 1000, 20, "ingest continuing")


def labels(seq: int, boot: int) -> bytes:
    """A label batch of two labelled readings."""
    return LabelBatch.create(
        seq=seq,
        boot=boot,
        ts_ms=int(time.time() * 1000),
        param_version=1,
        features=np.zeros((2, 8)),
        pred=[0, 1],
        label=[1, 1],
    ).to_json()


def test_lost_label_batches_are_counted_exactly(service, mosquitto, bundle):
    """Labels carry their own ``(boot, seq)``: a hole in it is counted as lost label batches
    (``stream="labels"``), a repeat is a duplicate, a reboot's missing first batches are lost."""
    fleet, dev = "lblgap", "probe-3"  # a fleet of its own: the counts below are exact
    _publish(mosquitto, [(topic(fleet, dev, Leaf.STATUS), _birth(bundle, 3))])
    wait(lambda: service.directory.get(fleet, dev) is not None, 10, "the probe's birth")
    t = topic(fleet, dev, Leaf.LBL)
    sent = [(3, 0), (3, 1), (3, 5), (3, 5), (3, 6), (4, 1), (4, 2)]
    _publish(mosquitto, [(t, labels(seq, boot)) for boot, seq in sent])
    # 6 batches accepted (one duplicate); lost: 2, 3, 4 of boot 3 and 0 of boot 4
    wait(
        lambda: (
            metric(scrape(service.metrics_port), "tinydrift_labels_received_total", fleet=fleet)
            == 12
        ),
        20,
        "the probe's labels",
    )
    text = scrape(service.metrics_port)
    gaps = {
        stream: metric(text, "tinydrift_ingest_sequence_gaps_total", fleet=fleet, stream=stream)
        for stream in ("telemetry", "labels")
    }
    assert gaps == {"telemetry": 0, "labels": 4}
    assert service.directory.get(fleet, dev).lost_labels == 4


def test_a_poisoned_or_restarted_sequence_does_not_lock_a_device_out(service, mosquitto, bundle):
    """One frame with ``seq`` or ``boot`` = 0xFFFFFFFF is held as an unconfirmed jump (the
    device's real frames go on being accepted, no gap is counted); a re-flashed device whose
    boot counter restarts at 0 is taken back by its birth."""
    dev = "probe-2"
    t = topic(FLEET, dev, Leaf.TEL)
    _publish(mosquitto, [(topic(FLEET, dev, Leaf.STATUS), _birth(bundle, 3))])
    wait(lambda: service.directory.get(FLEET, dev) is not None, 10, "the probe's birth")
    info = service.directory.get(FLEET, dev)
    before = dict(service.batcher.rejections)

    def delta(reason: str) -> int:
        return service.batcher.rejections.get(reason, 0) - before.get(reason, 0)

    u32 = 0xFFFFFFFF
    _publish(mosquitto, [(t, frame(0, 3)), (t, frame(u32, 3)), (t, frame(0, u32)),
                         (t, frame(1, 3)), (t, frame(2, 3))])  # fmt: skip
    wait(lambda: info.seq == 2 and delta("sequence_jump") == 2, 20, "the real frames after")
    assert (info.tel_seq.boot, info.frames, info.lost_frames) == (3, 3, 0)
    # re-flashed: the boot counter restarts; without a birth its frames are stale
    _publish(mosquitto, [(t, frame(0, 0))])
    wait(lambda: delta("stale") == 1, 20, "a stale frame of boot 0")
    _publish(mosquitto, [(topic(FLEET, dev, Leaf.STATUS), _birth(bundle, 0))])
    wait(lambda: info.boot == 0, 20, "the re-flashed device's birth")
    _publish(mosquitto, [(t, frame(0, 0)), (t, frame(1, 0))])
    wait(lambda: info.tel_seq.boot == 0 and info.seq == 1, 20, "frames of the new epoch")
    assert (info.frames, info.lost_frames) == (5, 0)
    assert (delta("sequence_jump"), delta("stale"), delta("duplicate")) == (2, 1, 0)
    text = scrape(service.metrics_port)
    assert metric(text, "tinydrift_ingest_rejected_total", reason="sequence_jump") >= 2


def test_restart_resumes_from_checkpoints(mosquitto, db_url, service, fleet):
    names = {a.config.device_id for a in fleet.agents}

    def fleet_monitors(svc: Service) -> dict[str, object]:
        return {d: m for (_f, d), m in svc.engine.monitors.items() if d in names}

    wait(
        lambda: (
            len(fleet_monitors(service)) == DEVICES
            and all(m.reference_complete for m in fleet_monitors(service).values())
        ),
        30,
        "complete references",
    )
    service.stop()
    saved = Registry(db_url).load_checkpoints(kind="device_monitor")
    assert names <= {c.device for c in saved}
    s = load_settings(
        broker=mosquitto.url, db=db_url, metrics_port=0, window_s=3.0, mqtt_client_id=SERVICE_ID
    )
    again = Service(s)
    try:
        restored = fleet_monitors(again)
        assert set(restored) == names
        assert all(m.reference_complete for m in restored.values())
        readings = {d: m.readings for d, m in restored.items()}
        again.start()
        assert again.consumer.wait_connected(10)
        n = again.status().readings
        wait(lambda: again.status().readings > n + 2000, 30, "ingest after restart")
        # the restored monitors carry on from where they were: no relearning
        after = fleet_monitors(again)
        assert all(after[d].readings > readings[d] for d in names)
        assert all(m.reference_complete for m in after.values())
        assert again.batcher.rejections.get("unknown_device", 0) == 0
    finally:
        again.stop()


def test_a_checkpoint_is_handed_over_in_slices_while_ingest_goes_on(db_url, mosquitto, fleet):
    """The fleet keeps publishing. A checkpoint in slices of 4 devices: while the writer holds
    the first slice (the checkpoint half done), frames are still ingested; every device record
    stored is one consistent instant of its monitor."""
    s = load_settings(
        broker=mosquitto.url, db=db_url, metrics_port=0, window_s=3.0, mqtt_client_id=SERVICE_ID
    )
    svc = Service(s)
    names = {a.config.device_id for a in fleet.agents}
    slices: list[int] = []
    ingested_meanwhile: list[int] = []
    save = svc.writer.save_checkpoints

    def holding_save(records, on_settled=None):  # the first slice is held until ingest moved on
        monitors = sum(r.kind == "device_monitor" for r in records)
        if monitors:  # not the sequence positions, which go the same way
            slices.append(monitors)
        if len(slices) == 1 and monitors:
            n = svc.status().readings
            wait(lambda: svc.status().readings > n + 160, 30, "ingest during a checkpoint")
            ingested_meanwhile.append(svc.status().readings - n)
        return save(records, on_settled)

    try:
        svc.start()
        assert svc.consumer.wait_connected(10)
        restored = {d: m.readings for (_f, d), m in svc.engine.monitors.items() if d in names}

        def fed() -> bool:  # every device has frames since the restore: all are due
            now = {d: m.readings for (_f, d), m in list(svc.engine.monitors.items())}
            return all(now.get(d, 0) > restored.get(d, 0) for d in names)

        wait(fed, 30, "frames of every device")
        svc.engine.checkpoint_slice = 4
        svc.writer.save_checkpoints = holding_save  # type: ignore[method-assign]
        assert svc.checkpoint() >= len(names)
        assert slices[0] == 4  # not all the devices at once
        assert max(slices) <= 4
        assert len(slices) >= -(-len(names) // 4)  # every due device, 4 a slice
        assert ingested_meanwhile
        assert svc.writer.flush(30)
        for rec in Registry(db_url).load_checkpoints(kind="device_monitor"):
            if rec.device in names:
                mon = DeviceMonitor.from_state_bytes(rec.state)
                assert mon.last_frame == (rec.last_boot, rec.last_seq)
    finally:
        svc.stop()


class _Planted:
    """A pickle payload that creates ``path`` when unpickled (a hostile registry's plant)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_planted_or_old_checkpoint_is_refused_unread_and_counted(db_url, mosquitto, tmp_path):
    """A pickle in the registry, under the old format (3, zlib(pickle)) or today's header, is
    never unpickled: the service starts, the fleet's other monitors are restored, the planted
    records' devices relearn, and the refusals are counted."""
    import zlib

    from service.drift.checkpoint_format import add_header
    from service.drift.device_monitor import STATE_FORMAT, STATE_MAGIC
    from service.registry.records import CheckpointRecord

    planted = tmp_path / "planted"
    body = zlib.compress(pickle.dumps({"layout": _Planted(str(planted))}))
    reg = Registry(db_url)
    good = {c.device for c in reg.load_checkpoints(kind="device_monitor")}
    reg.save_checkpoints(
        [
            CheckpointRecord(
                FLEET, f"dev-999{v}", "device_monitor", v, add_header(STATE_MAGIC, v, body)
            )
            for v in (3, STATE_FORMAT)
        ]
    )
    reg.close()
    s = load_settings(broker=mosquitto.url, db=db_url, metrics_port=0, mqtt_client_id=SERVICE_ID)
    svc = Service(s)
    try:
        assert not planted.exists()
        assert {d for _f, d in svc.engine.monitors} == good
        assert svc.engine.stats.checkpoints_refused["device_monitor"] == 2
        text = svc.metrics.exposition().decode()
        assert metric(text, "tinydrift_checkpoints_refused_total", kind="device_monitor") == 2
    finally:
        svc.writer.close()
        svc.registry.close()
