"""Drive an ``UpdateMachine`` without MQTT: a fake clock, a chunk server and a lossy pump."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.blob import SigningKey
from edge_agent.device.firmware import Firmware
from edge_agent.device.update_machine import Outgoing, TransferTuning, UpdateMachine
from edge_agent.wire.chunk_frame import CHUNK_HEADER_LEN
from edge_agent.wire.manifest_signature import sign_manifest
from edge_agent.wire.messages import ChunkRequest, Manifest
from edge_agent.wire.topics import Leaf
from service.rollout.chunk_server import BlobCache, serve_chunks
from tests.integration.update_fixtures import DEVICE, FLEET

T0 = 1_700_000_000.0

Ack = tuple[int, str, str, int | None]
"""``(deploy_seq, state, reason, param_version)`` of one ack."""


@dataclass
class FakeClock:
    """A mutable time source (seconds) for the machine."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Chaos:
    """What the pump does to the frames it delivers, driven by a seeded RNG."""

    seed: int = 0
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    reorder: bool = False
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def mangle(self, frames: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for frame in frames:
            if self.rng.random() < self.drop:
                continue
            if self.rng.random() < self.corrupt and len(frame) > CHUNK_HEADER_LEN:
                pos = self.rng.randrange(CHUNK_HEADER_LEN, len(frame))
                frame = frame[:pos] + bytes([frame[pos] ^ 0x5A]) + frame[pos + 1 :]
            out.append(frame)
            if self.rng.random() < self.duplicate:
                out.append(frame)
        if self.reorder:
            self.rng.shuffle(out)
        return out


def ack_tuple(payload: bytes) -> Ack:
    a = json.loads(payload)
    return a["deploy_seq"], a["state"], a["reason"], a.get("param_version")


class Device:
    """One ``UpdateMachine`` on ``storage`` plus the service side that answers its requests.

    Every ack is decoded into ``acks`` (full JSON) and returned as :data:`Ack` tuples; every
    ``blob/get`` is parsed into ``requests`` (the full log) and ``queue`` (not yet served).
    """

    def __init__(
        self,
        fw: Firmware,
        deploy_key: SigningKey,
        storage: Path,
        *,
        tuning: TransferTuning | None = None,
    ) -> None:
        self.fw = fw
        self.deploy_key = deploy_key
        self.storage = storage
        self.tuning = tuning
        self.clock = FakeClock()
        self.cache = BlobCache()
        self.acks: list[dict[str, Any]] = []
        self.requests: list[ChunkRequest] = []
        self.queue: list[ChunkRequest] = []
        self.machine = self.boot()

    def boot(self, *, fault_reset: bool = False) -> UpdateMachine:
        """(Re)start the device on the same storage; requests in flight are lost."""
        self.queue = []
        self.machine = UpdateMachine(
            self.fw,
            self.storage,
            fleet=FLEET,
            device=DEVICE,
            clock=self.clock,
            fault_reset=fault_reset,
            tuning=self.tuning,
            fsync=False,
        )
        return self.machine

    def handle(self, out: list[Outgoing]) -> list[Ack]:
        acks: list[Ack] = []
        for msg in out:
            if msg.leaf == Leaf.ACK:
                self.acks.append(json.loads(msg.payload))
                acks.append(ack_tuple(msg.payload))
            elif msg.leaf == Leaf.BLOB_GET:
                req = ChunkRequest.from_json(msg.payload)
                self.requests.append(req)
                self.queue.append(req)
            else:
                raise AssertionError(f"unexpected {msg.leaf} message")
        return acks

    def send(self, manifest: Manifest, key: SigningKey | None = None) -> list[Ack]:
        """Sign ``manifest`` (deploy key unless ``key``) and deliver it."""
        signed = sign_manifest(manifest, key or self.deploy_key)
        return self.send_raw(signed.to_json())

    def send_raw(self, payload: bytes) -> list[Ack]:
        return self.handle(self.machine.on_manifest(payload))

    def tick(self) -> list[Ack]:
        return self.handle(self.machine.tick())

    def frames(self) -> list[bytes]:
        """Answer every queued request from the cache."""
        frames = [f for req in self.queue for f in serve_chunks(req, self.cache)]
        self.queue = []
        return frames

    def deliver(self, frames: list[bytes]) -> list[Ack]:
        acks: list[Ack] = []
        for frame in frames:
            acks += self.handle(self.machine.on_chunk(frame))
        return acks

    def pump(self, chaos: Chaos | None = None, max_rounds: int = 2000) -> list[Ack]:
        """Serve requests and tick until the machine leaves ``DOWNLOADING``.

        When nothing is outstanding the clock moves on by one request timeout, so lost
        frames are re-requested.
        """
        chaos = chaos or Chaos()
        acks: list[Ack] = []
        for _ in range(max_rounds):
            if self.machine.state != "DOWNLOADING":
                return acks
            acks += self.deliver(chaos.mangle(self.frames()))
            acks += self.tick()
            if not self.queue and self.machine.state == "DOWNLOADING":
                self.clock.advance(self.machine.tuning.request_timeout_s)
                acks += self.tick()
        raise AssertionError(f"still downloading after {max_rounds} rounds")

    def install(self, manifest: Manifest, chaos: Chaos | None = None) -> list[Ack]:
        """Send an install manifest and pump the download to its end."""
        return self.send(manifest) + self.pump(chaos)

    def slot_bytes(self, slot: str, length: int) -> bytes:
        return (self.storage / "slots" / f"slot_{slot}.bin").read_bytes()[:length]
