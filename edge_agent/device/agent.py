"""One simulated edge device on MQTT: sensor → integer inference → telemetry, and updates.

The agent owns a paho-mqtt 2.x client (MQTT 3.1.1; client id = username = device id), a
:class:`~edge_agent.device.simulator.SensorSimulator` and an
:class:`~edge_agent.device.update_machine.UpdateMachine`. It does not run its own network
thread: :class:`~edge_agent.device.device_loop.DeviceLoop` multiplexes many agents' sockets in
one thread, which is how ``tinydrift fleet-sim`` runs a thousand devices in one process.

Each telemetry frame holds ``batch`` readings. A reading's features are what the device holds:
int16 at ``2**-frac_bits`` (so the service can re-run the exact inference); predictions and
confidences come from the integer kernel of the active parameter set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.device.simulator import SensorSimulator
from edge_agent.device.update_machine import Outgoing, UpdateMachine
from edge_agent.fixedpoint import round_half_away
from edge_agent.wire.messages import LabelBatch, Status, TelemetryBatch
from edge_agent.wire.telemetry_binary import encode_binary_raw
from edge_agent.wire.telemetry_json import encode_json
from edge_agent.wire.topics import Leaf, topic

log = logging.getLogger(__name__)

FRAC_BITS = 11
"""Telemetry features are int16 in Q4.11: ±16 g at 0.5 mg steps."""


@dataclass(frozen=True)
class AgentConfig:
    """How one device talks: ids, broker, pacing and what it publishes."""

    fleet: str
    device_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    password: str | None = None
    batch: int = 16
    """Readings per telemetry frame."""
    period_s: float = 2.0
    """Wall-clock seconds between frames (0: as fast as the loop runs)."""
    time_scale: float = 1.0
    """Simulated seconds per wall-clock second (a reading is a 2 s window)."""
    label_rate: float = 0.1
    """Share of readings for which a label is published."""
    codec: Literal["bin", "json"] = "bin"
    keepalive: int = 30
    client_id: str | None = None
    """MQTT client id; ``None``: the device id (the contract). Fleets that reuse device ids need
    their own broker each, or distinct client ids on a shared test broker."""


@dataclass
class AgentStats:
    """What this device did, scored against the simulator's ground truth."""

    frames: int = 0
    readings: int = 0
    labels: int = 0
    correct_by_version: dict[int, list[int]] = field(default_factory=dict)
    """``param_version → [correct, total]`` against the true labels of every reading."""
    connects: int = 0
    disconnects: int = 0
    acks_sent: int = 0

    def accuracy(self, version: int | None = None) -> float | None:
        """Accuracy of all readings (or those made with ``version``)."""
        items = (
            [self.correct_by_version.get(version, [0, 0])]
            if version is not None
            else list(self.correct_by_version.values())
        )
        total = sum(t for _, t in items)
        return sum(c for c, _ in items) / total if total else None


class EdgeAgent:
    """A simulated device: produces telemetry on :meth:`step`, reacts to messages."""

    def __init__(
        self,
        config: AgentConfig,
        machine: UpdateMachine,
        sensor: SensorSimulator,
        *,
        start_time: float,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.machine = machine
        self.sensor = sensor
        self.start_time = start_time
        self.stats = AgentStats()
        self._rng = np.random.default_rng(seed)
        self._seq = 0
        self._lbl_seq = 0
        self._next_frame = start_time
        self.connected = False
        self.last_error: str | None = None
        """Why the broker last refused this device, if it did."""
        self.client = self._make_client()

    # -- MQTT plumbing -----------------------------------------------------------------------

    def _topic(self, leaf: str) -> str:
        return topic(self.config.fleet, self.config.device_id, leaf)

    def _make_client(self) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=c.client_id or c.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(c.device_id, c.password)
        client.will_set(self._topic(Leaf.STATUS), Status.will().to_json(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.max_queued_messages_set(2000)
        return client

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = (
                f"broker refused device {self.config.device_id}: {reason} "
                "(check its username/password and the broker ACL)"
            )
            log.warning("%s", self.last_error)
            return
        self.last_error = None
        self.connected = True
        self.stats.connects += 1
        client.subscribe([(self._topic(Leaf.DESIRED), 1), (self._topic(Leaf.BLOB_DATA), 1)])
        self.publish([self.machine.birth(), *self.machine.drain()])

    def _on_disconnect(
        self, _client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if self.connected:
            self.stats.disconnects += 1
        self.connected = False
        log.info("%s: disconnected (%s)", self.config.device_id, reason)

    def _on_message(self, _client: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/" + Leaf.DESIRED):
            out = self.machine.on_manifest(bytes(msg.payload))
        elif msg.topic.endswith("/" + Leaf.BLOB_DATA):
            out = self.machine.on_chunk(bytes(msg.payload))
        else:
            return
        self.publish(out)

    def publish(self, messages: list[Outgoing]) -> None:
        """Publish machine output under this device's prefix (queued while offline)."""
        for m in messages:
            if m.leaf == Leaf.ACK:
                self.stats.acks_sent += 1
            self.client.publish(self._topic(m.leaf), m.payload, qos=m.qos, retain=m.retain)

    def disconnect(self) -> None:
        """Clean shutdown: publish the offline status ourselves, then disconnect."""
        if self.connected:
            self.client.publish(
                self._topic(Leaf.STATUS), Status.will().to_json(), qos=1, retain=True
            )
        self.client.disconnect()

    # -- the device's work -------------------------------------------------------------------

    def sim_time(self, now: float) -> float:
        """Simulated seconds since the device started."""
        return (now - self.start_time) * self.config.time_scale

    @property
    def next_frame(self) -> float:
        """Wall-clock time the next telemetry frame is due."""
        return self._next_frame

    def delay_first_frame(self, seconds: float) -> None:
        """Start publishing ``seconds`` after the start time (spreads a fleet's frames)."""
        self._next_frame = self.start_time + seconds

    def due(self, now: float) -> bool:
        """Whether a telemetry frame is due at wall-clock ``now``."""
        return now >= self._next_frame

    def step(self, now: float) -> None:
        """Sense, infer and publish one frame (and labels); let the update machine tick."""
        c = self.config
        self._next_frame = max(self._next_frame + c.period_s, now) if c.period_s else now
        t0 = self.sim_time(now)
        # the frame's readings were taken over the last period: spread them evenly over it, so
        # a drift scheduled at time T shows in exactly the readings taken after T
        span = c.period_s * c.time_scale
        times = t0 - span + span * (np.arange(c.batch, dtype=np.float64) + 1) / c.batch
        sample = self.sensor.sample(c.batch, t=np.maximum(times, 0.0))
        scale = float(1 << FRAC_BITS)
        held = np.clip(round_half_away(sample.features * scale), -32768, 32767).astype(np.int64)
        x = held / scale  # what the device holds, exactly representable in float32
        model = self.machine.active.params.model
        logits = model.logits(x)
        pred = model.decide(logits)
        conf = model.confidence(logits)
        version = self.machine.param_version
        score = self.stats.correct_by_version.setdefault(version, [0, 0])
        score[0] += int(np.sum(pred == sample.labels))
        score[1] += c.batch
        ts_ms = int(now * 1000)
        boot = self.machine.rec.boot
        if c.codec == "bin":
            payload = encode_binary_raw(
                held,
                pred,
                conf,
                seq=self._seq,
                boot=boot,
                ts_ms=ts_ms,
                param_version=version,
                frac_bits=FRAC_BITS,
            )
        else:
            payload = encode_json(
                TelemetryBatch.create(
                    seq=self._seq,
                    boot=boot,
                    ts_ms=ts_ms,
                    param_version=version,
                    features=x,
                    pred=pred,
                    conf=conf.astype(np.float64) / 256.0,
                )
            )
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self.client.publish(self._topic(Leaf.TEL), payload, qos=0)
        self.stats.frames += 1
        self.stats.readings += c.batch
        if c.label_rate > 0:
            chosen = np.flatnonzero(self._rng.random(c.batch) < c.label_rate)
            if chosen.size:
                lbl = LabelBatch.create(
                    seq=self._lbl_seq,
                    boot=boot,
                    ts_ms=ts_ms,
                    param_version=version,
                    features=x[chosen],
                    pred=pred[chosen],
                    label=sample.labels[chosen],
                )
                self._lbl_seq = (self._lbl_seq + 1) & 0xFFFFFFFF
                self.client.publish(self._topic(Leaf.LBL), lbl.to_json(), qos=1)
                self.stats.labels += int(chosen.size)
        self.publish(self.machine.count_inferences(c.batch))
        self.publish(self.machine.tick())

    def idle(self) -> None:
        """Between frames: let the update machine pace downloads and time trials out."""
        self.publish(self.machine.tick())
