"""A fast load generator: valid binary telemetry frames of N devices, paced, over MQTT.

``fleet-sim`` synthesises every accelerometer window physically (~30 µs a reading), too slow to
load the service at 200k readings/s from this 2-core machine. This generator does the expensive
part once: it draws a pool of real readings per device profile (the simulator plus the factory
model's integer inference, exactly as a device computes them), packs frames of ``k`` readings,
and then only patches ``seq`` and ``ts_ms`` in place before each publish. Births (retained
``status``) are published first, so the service knows every device and its schema.

Optional drift: ``drift_devices`` get their pool from a drifting simulator (drift active from the
start of their pool's second half), so a benchmark can check detections end to end.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.blob import verify_blob
from edge_agent.device.agent import FRAC_BITS
from edge_agent.device.firmware import Firmware
from edge_agent.device.simulator import DriftSpec, SensorSimulator, window_times
from edge_agent.fixedpoint import round_half_away
from edge_agent.wire.messages import Capabilities, Status
from edge_agent.wire.telemetry_binary import encode_binary_raw
from edge_agent.wire.topics import Leaf, topic

_SEQ = struct.Struct("<I")
_TS = struct.Struct("<Q")


@dataclass
class LoadResult:
    """What was sent."""

    devices: int
    frames: int
    readings: int
    seconds: float
    frames_per_device: dict[str, int] = field(default_factory=dict)

    @property
    def readings_per_s(self) -> float:
        """Offered load."""
        return self.readings / self.seconds if self.seconds else 0.0


def device_pool(
    fw: Firmware, seed: int, n: int, drift: DriftSpec | None = None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``n`` readings of one simulated device as it holds them: int16 features, pred, conf u8."""
    model = verify_blob(fw.factory_blob, trusted=fw.release_keys, schema_id=None).params.model
    sim = SensorSimulator(seed, drift=drift)
    s = sim.sample(n, t=window_times(n))
    scale = float(1 << FRAC_BITS)
    held = np.clip(round_half_away(s.features * scale), -32768, 32767).astype(np.int64)
    logits = model.logits(held / scale)
    return held, model.decide(logits), model.confidence(logits)


class LoadGenerator:
    """Prebuilt frames for ``devices`` devices, published at a paced rate from one client."""

    def __init__(
        self,
        host: str,
        port: int,
        fw: Firmware,
        *,
        devices: int,
        k: int = 64,
        fleet: str = "bench",
        profiles: int = 32,
        frames_per_device: int = 8,
        drift_devices: dict[str, DriftSpec] | None = None,
        seed: int = 0,
    ) -> None:
        self.fw, self.fleet, self.k = fw, fleet, k
        self.names = [f"dev-{i:05d}" for i in range(devices)]
        drift_devices = drift_devices or {}
        pools: dict[int, tuple[Any, Any, Any]] = {}
        n = k * frames_per_device
        self.payloads: list[list[bytearray]] = []
        for i, name in enumerate(self.names):
            spec = drift_devices.get(name)
            if spec is not None:
                pool = device_pool(fw, seed * 7919 + i, n, spec)
            else:
                pool = pools.get(i % profiles)
                if pool is None:
                    pool = pools[i % profiles] = device_pool(fw, seed * 7919 + i % profiles, n)
            held, pred, conf = pool
            frames = []
            for j in range(frames_per_device):
                sl = slice(j * k, (j + 1) * k)
                frames.append(
                    bytearray(
                        encode_binary_raw(
                            held[sl],
                            pred[sl],
                            conf[sl],
                            seq=0,
                            boot=1,
                            ts_ms=0,
                            param_version=1,
                            frac_bits=FRAC_BITS,
                        )
                    )
                )
            self.payloads.append(frames)
        self.topics = [topic(fleet, name, Leaf.TEL) for name in self.names]
        self.seed = seed
        self.seq = [0] * devices
        self.client = self._connect(host, port) if host else None

    def take(self, n: int) -> list[tuple[str, bytes]]:
        """The next ``n`` frames round-robin as ``(topic, payload)``, without publishing them
        (for in-process harnesses)."""
        out = []
        n_dev = len(self.names)
        i = sum(self.seq)
        now_ms = int(time.time() * 1000)
        for _ in range(n):
            d = i % n_dev
            frames = self.payloads[d]
            payload = frames[self.seq[d] % len(frames)]
            _SEQ.pack_into(payload, 4, self.seq[d])
            _TS.pack_into(payload, 12, now_ms)
            out.append((self.topics[d], bytes(payload)))
            self.seq[d] += 1
            i += 1
        return out

    def birth_messages(self) -> list[tuple[str, bytes]]:
        """Every device's birth as ``(topic, payload)`` (for in-process harnesses)."""
        caps = Capabilities(max_chunk=1024, telemetry=("bin",), labels=False)
        return [
            (
                topic(self.fleet, name, Leaf.STATUS),
                Status.create(
                    online=True,
                    fw="loadgen",
                    schema_id=self.fw.schema.schema_id_hex,
                    active_version=1,
                    update_state="IDLE",
                    last_deploy_seq=0,
                    epoch_floor=0,
                    boot=1,
                    ts_ms=int(time.time() * 1000),
                    caps=caps,
                ).to_json(),
            )
            for name in self.names
        ]

    def _connect(self, host: str, port: int) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"loadgen-{self.seed}",
            protocol=mqtt.MQTTv311,
        )
        client.max_queued_messages_set(0)
        client.connect(host, port)
        client.loop_start()
        return client

    def reconnect(self, host: str, port: int) -> None:
        """The same prebuilt frames to another broker, sequence numbers from 0 again."""
        self.close()
        self.seq = [0] * len(self.names)
        self.client = self._connect(host, port)

    def births(self) -> None:
        """Publish every device's retained birth (QoS 1) and wait until sent."""
        infos = [self.client.publish(t, p, 1, True) for t, p in self.birth_messages()]
        for info in infos:
            info.wait_for_publish(30)

    def clear_births(self) -> None:
        """Remove the retained births (so a later benchmark on the same broker starts clean)."""
        for name in self.names:
            self.client.publish(topic(self.fleet, name, Leaf.STATUS), b"", 1, True)

    def run(
        self, readings_per_s: float, seconds: float, max_frames: int | None = None
    ) -> LoadResult:
        """Publish frames round-robin over devices at ``readings_per_s`` for ``seconds`` (or
        until ``max_frames`` frames are sent)."""
        frames_per_s = readings_per_s / self.k
        n_dev = len(self.names)
        sent = 0
        start = time.perf_counter()
        i = sum(self.seq)  # round-robin resumes where the last run stopped
        while max_frames is None or sent < max_frames:
            now = time.perf_counter()
            elapsed = now - start
            if elapsed >= seconds:
                break
            due = int(elapsed * frames_per_s) + 1
            if max_frames is not None:
                due = min(due, max_frames)
            if sent >= due:
                time.sleep(min(0.002, (sent - due + 1) / frames_per_s))
                continue
            for _ in range(min(due - sent, 256)):
                d = i % n_dev
                frames = self.payloads[d]
                payload = frames[self.seq[d] % len(frames)]
                _SEQ.pack_into(payload, 4, self.seq[d])
                _TS.pack_into(payload, 12, int(time.time() * 1000))
                self.client.publish(self.topics[d], bytes(payload), 0)
                self.seq[d] += 1
                sent += 1
                i += 1
        took = time.perf_counter() - start
        return LoadResult(
            devices=n_dev,
            frames=sent,
            readings=sent * self.k,
            seconds=took,
            frames_per_device=dict(zip(self.names, self.seq, strict=True)),
        )

    def close(self) -> None:
        """Flush and disconnect."""
        if self.client is None:
            return
        time.sleep(0.5)
        self.client.loop_stop()
        self.client.disconnect()
