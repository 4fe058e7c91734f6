"""The device's update state machine (README §7), free of MQTT so it can be tested exactly.

``IDLE → DOWNLOADING → VERIFYING → TRIAL → CONFIRMED | REVERTED``, with MCUboot's test /
confirm / revert semantics: new parameters run from the other slot while the old slot stays
intact; success counts only at confirmation. Feed the machine what arrives (manifests, chunk
frames), what the device did (inferences) and the passing of time (:meth:`tick`); each call
returns the messages to publish. Every transition is written to the power-fail-safe state record
before its ack is returned.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.blob import BlobRejectedError, VerifiedBlob, verify_blob
from edge_agent.blob.header import HEADER_LEN, PAYLOAD_OFFSET, BlobHeader
from edge_agent.device.firmware import Firmware
from edge_agent.device.slot_store import SlotStore
from edge_agent.device.state_record import (
    RecordStore,
    SlotInfo,
    SlotName,
    StateRecord,
    TrialInfo,
    other_slot,
    seq_newer,
)
from edge_agent.device.transfer import ChunkAssembler
from edge_agent.wire.chunk_frame import ChunkStatus, decode_chunk
from edge_agent.wire.errors import WireError
from edge_agent.wire.manifest_signature import ManifestSignatureError, verify_manifest
from edge_agent.wire.messages import (
    STATE_CODE,
    AckReason,
    AckState,
    Capabilities,
    ChunkRequest,
    Manifest,
    Status,
    UpdateAck,
)
from edge_agent.wire.topics import Leaf, validate_id

log = logging.getLogger(__name__)

BAD_LENGTH_LIMIT = 3
"""Chunks of the wrong length tolerated before the download is rejected as ``bad_manifest``."""
INFERENCE_CHECKPOINT = 256
"""A trial's inference count is persisted each time it crosses a multiple of this."""


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message the device should publish under its own topic prefix."""

    leaf: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class TransferTuning:
    """Pacing of the device-driven blob download."""

    max_inflight: int = 2
    chunks_per_request: int = 4
    request_timeout_s: float = 2.0
    stall_timeout_s: float = 300.0
    """No new chunk for this long: the download fails with ``transfer_timeout`` (retryable)."""
    checkpoint_every: int = 8
    """Persist the received-chunk bitmap after this many new chunks."""


@dataclass
class MachineCounters:
    """What the device rejected or ignored, for its own diagnostics and the tests."""

    bad_manifest: int = 0
    wrong_device: int = 0
    stale_manifest: int = 0
    stray_chunks: int = 0
    bad_chunks: int = 0
    boots_with_corrupt_slot: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class UpdateMachine:
    """A/B parameter slots, the persisted state record and the update protocol of one device.

    ``fleet`` and ``device`` are the device's own ids (its topic prefix): a manifest naming any
    other is refused (``REJECTED wrong_device``) before anything else happens.

    Construction is a boot: it reads the state record (or creates the factory state), bumps the
    boot counter, loads and re-verifies the active slot, and applies the restart rules: a trial
    survives a clean restart and is reverted after a fault reset; a download resumes from its
    bitmap; a verification in progress is re-run.
    """

    def __init__(
        self,
        firmware: Firmware,
        storage: Path,
        *,
        fleet: str,
        device: str,
        clock: Callable[[], float] = time.time,
        fault_reset: bool = False,
        tuning: TransferTuning | None = None,
        fsync: bool = True,
    ) -> None:
        self.fw = firmware
        self.fleet = validate_id(fleet)
        self.device = validate_id(device)
        self.clock = clock
        self.tuning = tuning or TransferTuning()
        self.counters = MachineCounters()
        self.records = RecordStore(storage / "state", fsync=fsync)
        self.slots = SlotStore(storage / "slots", slot_size=firmware.slot_size)
        self._token = 0
        self._assembler: ChunkAssembler | None = None
        self._last_progress = clock()
        self._since_checkpoint = 0
        self._pending_acks: list[Outgoing] = []
        rec = self.records.read()
        if rec is None:
            rec = self._factory_state()
        self.rec = rec.model_copy(update={"boot": (rec.boot + 1) & 0xFFFFFFFF})
        self.active = self._boot_active_slot()
        self._apply_restart_rules(fault_reset)
        self._save()

    # -- what the rest of the device reads ---------------------------------------------------

    @property
    def param_version(self) -> int:
        """Version of the parameters the device is running now."""
        return self.active.header.param_version

    @property
    def state(self) -> str:
        """``IDLE``, ``DOWNLOADING``, ``VERIFYING`` or ``TRIAL``."""
        return self.rec.update_state

    def birth(self) -> Outgoing:
        """The retained birth ``status`` message."""
        prev = self.rec.slots[self.rec.inactive_slot]
        status = Status.create(
            online=True,
            fw=self.fw.name,
            schema_id=self.fw.schema.schema_id_hex,
            active_version=self.param_version,
            previous_version=prev.version if prev.status in ("valid", "confirmed") else None,
            update_state=self.rec.update_state,
            last_deploy_seq=self.rec.last_deploy_seq,
            epoch_floor=self.rec.epoch_floor,
            boot=self.rec.boot,
            ts_ms=self._now_ms(),
            caps=Capabilities(max_chunk=self.fw.max_chunk, telemetry=("bin", "json"), labels=True),
        )
        return Outgoing(Leaf.STATUS, status.to_json(), qos=1, retain=True)

    def drain(self) -> list[Outgoing]:
        """Messages produced during boot (e.g. the revert ack after a fault reset)."""
        out, self._pending_acks = self._pending_acks, []
        return out

    # -- inputs ---------------------------------------------------------------------------

    def on_manifest(self, payload: bytes) -> list[Outgoing]:
        """Handle a (retained) ``desired`` message."""
        if not payload:
            return []  # a cleared retained message
        try:
            m = Manifest.from_json(payload)
        except WireError as exc:
            self.counters.bad_manifest += 1
            return [self._ack(0, "REJECTED", "bad_manifest", detail=str(exc))]
        if m.deploy_seq == self.rec.last_deploy_seq:
            return []  # already acted on (brokers may deliver a retained message twice)
        try:
            verify_manifest(m, self.fw.deploy_keys)
        except ManifestSignatureError as exc:
            self.counters.bad_manifest += 1
            return [self._ack(m.deploy_seq, "REJECTED", "bad_manifest", detail=str(exc))]
        if (m.fleet, m.device) != (self.fleet, self.device):
            # a manifest signed for another device (a replay): nothing changes, not even the seq
            self.counters.wrong_device += 1
            return [
                self._ack(
                    m.deploy_seq,
                    "REJECTED",
                    "wrong_device",
                    m.param.version,
                    detail=f"manifest is for {m.fleet}/{m.device}, "
                    f"this is {self.fleet}/{self.device}",
                )
            ]
        if not seq_newer(m.deploy_seq, self.rec.last_deploy_seq):
            self.counters.stale_manifest += 1
            return [
                self._ack(
                    m.deploy_seq,
                    "REJECTED",
                    "stale_seq",
                    detail=f"deploy_seq {m.deploy_seq} is not newer than "
                    f"{self.rec.last_deploy_seq}",
                )
            ]
        self.rec.last_deploy_seq = m.deploy_seq
        if self.rec.update_state == "DOWNLOADING":
            self._discard_download()  # a changed deploy_seq discards the partial download (§5)
        if m.action == "install":
            out = self._install(m)
        elif m.action == "confirm":
            out = self._confirm_cmd(m)
        elif m.action == "revert":
            out = self._revert_cmd(m)
        else:
            out = []
        self._save()
        return out

    def on_chunk(self, payload: bytes) -> list[Outgoing]:
        """Handle a ``blob/data`` frame."""
        asm = self._assembler
        if asm is None or self.rec.update_state != "DOWNLOADING":
            self.counters.stray_chunks += 1
            return []
        try:
            frame = decode_chunk(payload)
        except WireError:
            self.counters.bad_chunks += 1
            return []
        if frame.deploy_seq != asm.deploy_seq:
            self.counters.stray_chunks += 1
            return []
        if frame.status == ChunkStatus.UNKNOWN_BLOB:
            return self._fail_download("chunk_error", "the service does not hold this blob")
        if frame.status == ChunkStatus.BAD_REQUEST:
            return self._fail_download("chunk_error", "the service refused the chunk request")
        if frame.total != asm.total or asm.stats.bad_length >= BAD_LENGTH_LIMIT:
            # the served blob is not the length the manifest promised: retrying cannot help
            return self._reject_download(
                "bad_manifest", "manifest blob_len disagrees with the blob the service serves"
            )
        before = asm.progress[0]
        asm.accept(frame, self.clock())
        got, _ = asm.progress
        if got > before:
            self._last_progress = self.clock()
            self._since_checkpoint += got - before
        if asm.complete:
            return self._downloaded()
        if self._since_checkpoint >= self.tuning.checkpoint_every:
            self._since_checkpoint = 0
            self.rec.pending = asm.checkpoint()
            self._save()
        return []

    def count_inferences(self, n: int) -> list[Outgoing]:
        """Record ``n`` inferences on the active parameters (drives local confirmation)."""
        trial = self.rec.trial
        if self.rec.update_state != "TRIAL" or trial is None:
            return []
        before = trial.inferences
        trial.inferences += n
        if trial.confirm == "local" and trial.inferences >= trial.min_inferences:
            return self._confirm(trial.deploy_seq)
        if trial.inferences // INFERENCE_CHECKPOINT != before // INFERENCE_CHECKPOINT:
            self._save()  # the record keeps the count across a restart, at bounded flash wear
        return []

    def tick(self) -> list[Outgoing]:
        """Let time pass: chunk requests and their retries, stalls, trial timeouts."""
        now = self.clock()
        state = self.rec.update_state
        if state == "DOWNLOADING" and self._assembler is not None:
            if now - self._last_progress >= self.tuning.stall_timeout_s:
                return self._fail_download("transfer_timeout", "no chunk arrived in time")
            return self._requests(now)
        trial = self.rec.trial
        if (
            state == "TRIAL"
            and trial is not None
            and self._now_ms() - trial.started_ms >= trial.timeout_s * 1000
        ):
            out = self._revert("trial_timeout", trial.deploy_seq)
            self._save()
            return out
        return []

    def simulate_power_loss(self) -> None:
        """Drop in-memory progress not yet checkpointed, as a power cut would (for tests)."""
        self._assembler = None

    # -- install ---------------------------------------------------------------------------

    def _install(self, m: Manifest) -> list[Outgoing]:
        p = m.param
        seq = m.deploy_seq
        if p.schema_id != self.fw.schema.schema_id_hex:
            return [self._ack(seq, "REJECTED", "schema_mismatch", p.version)]
        if p.security_epoch < self.rec.epoch_floor:
            return [self._ack(seq, "REJECTED", "epoch_below_floor", p.version)]
        if p.blob_len > self.fw.slot_size:
            return [self._ack(seq, "REJECTED", "too_large", p.version)]
        if p.blob_len < PAYLOAD_OFFSET:
            return [self._ack(seq, "REJECTED", "truncated", p.version)]
        if p.key_id not in self.fw.release_keys:
            return [self._ack(seq, "REJECTED", "unknown_key", p.version)]
        active = self.rec.slots[self.rec.active_slot]
        out: list[Outgoing] = []
        if p.blob_sha256 == active.sha256:
            if self.rec.update_state == "TRIAL" and self.rec.trial is not None:
                self.rec.trial.deploy_seq = seq  # the same trial, now under the newer seq
                return [self._ack(seq, "TRIAL", "trial", p.version)]
            return [self._ack(seq, "CONFIRMED", "confirmed", p.version, detail="already active")]
        if not m.rollback and p.version <= active.version:
            return [self._ack(seq, "REJECTED", "stale_version", p.version)]
        if self.rec.update_state == "TRIAL" and self.rec.trial is not None:
            out += self._revert("server_revert", self.rec.trial.deploy_seq, detail="superseded")
            if p.blob_sha256 == self.rec.slots[self.rec.active_slot].sha256:
                return [
                    *out,
                    self._ack(seq, "CONFIRMED", "confirmed", p.version, detail="already active"),
                ]
        self._assembler = None
        self.rec.pending = None
        self.rec.desired = m.model_dump(mode="json")
        target = self.rec.inactive_slot
        held = self.rec.slots[target]
        if held.sha256 == p.blob_sha256 and held.status in ("valid", "confirmed"):
            return [*out, *self._verify_and_trial(m)]  # rollback target still in the other slot
        self.rec.slots[target] = SlotInfo()
        asm = ChunkAssembler(
            deploy_seq=seq,
            sha256=p.blob_sha256,
            blob_len=p.blob_len,
            chunk=min(m.transfer.chunk, self.fw.max_chunk),
            slot_store=self.slots,
            slot=target,
        )
        self._start_download(asm)
        out.append(self._ack(seq, "DOWNLOADING", "downloading", p.version, progress=asm.progress))
        return [*out, *self._requests(self.clock())]

    def _discard_download(self) -> None:
        """Drop the partial download (its slot is already marked empty) and go back to IDLE."""
        self._assembler = None
        self.rec.pending = None
        self.rec.desired = None
        self.rec.update_state = "IDLE"

    def _start_download(self, asm: ChunkAssembler) -> None:
        self._assembler = asm
        self._last_progress = self.clock()
        self._since_checkpoint = 0
        self.rec.update_state = "DOWNLOADING"
        self.rec.pending = asm.checkpoint()
        self._save()

    def _requests(self, now: float) -> list[Outgoing]:
        asm = self._assembler
        assert asm is not None
        out = []
        for index, count in asm.next_requests(
            now,
            max_inflight=self.tuning.max_inflight,
            timeout_s=self.tuning.request_timeout_s,
            max_count=self.tuning.chunks_per_request,
        ):
            self._token = (self._token + 1) & 0xFFFFFFFF
            req = ChunkRequest.create(
                c=self._token,
                deploy_seq=asm.deploy_seq,
                sha256=asm.sha256,
                index=index,
                count=count,
                chunk=asm.chunk,
            )
            out.append(Outgoing(Leaf.BLOB_GET, req.to_json(), qos=1))
        return out

    def _fail_download(self, reason: AckReason, detail: str) -> list[Outgoing]:
        """End the download with a retryable ``FAILED`` (500)."""
        return self._end_download("FAILED", reason, detail)

    def _reject_download(self, reason: AckReason, detail: str) -> list[Outgoing]:
        """End the download with a permanent ``REJECTED`` (400)."""
        return self._end_download("REJECTED", reason, detail)

    def _end_download(self, state: AckState, reason: AckReason, detail: str) -> list[Outgoing]:
        asm = self._assembler
        assert asm is not None
        version = self._desired().param.version if self.rec.desired else None
        self._assembler = None
        self.rec.pending = None
        self.rec.desired = None
        self.rec.update_state = "IDLE"
        self.slots.erase(asm.slot)
        self._save()
        return [self._ack(asm.deploy_seq, state, reason, version, detail=detail)]

    def _downloaded(self) -> list[Outgoing]:
        self._assembler = None
        self.rec.pending = None
        m = self._desired()
        return self._verify_and_trial(m)

    def _verify_and_trial(self, m: Manifest) -> list[Outgoing]:
        p, seq = m.param, m.deploy_seq
        target: SlotName = self.rec.inactive_slot
        self.rec.update_state = "VERIFYING"
        self._save()
        out = [self._ack(seq, "VERIFYING", "verifying", p.version)]
        data = self.slots.read(target, p.blob_len)
        reason: AckReason | None = None
        detail = ""
        verified: VerifiedBlob | None = None
        if hashlib.sha256(data).hexdigest() != p.blob_sha256:
            reason, detail = "hash_mismatch", "blob differs from the manifest's SHA-256"
        else:
            min_version = 0 if m.rollback else self.param_version + 1
            try:
                verified = verify_blob(
                    data,
                    trusted=self.fw.release_keys,
                    schema_id=self.fw.schema.schema_id,
                    epoch_floor=self.rec.epoch_floor,
                    min_version=min_version,
                    max_len=self.fw.slot_size,
                )
            except BlobRejectedError as exc:
                reason, detail = exc.reason, exc.detail
            else:
                h = verified.header
                if (h.param_version, h.security_epoch) != (p.version, p.security_epoch):
                    reason, detail = "bad_manifest", "manifest and blob disagree on version/epoch"
        if reason is not None or verified is None:
            self.slots.erase(target)
            self.rec.slots[target] = SlotInfo()
            self.rec.update_state = "IDLE"
            self.rec.desired = None
            self._save()
            out.append(self._ack(seq, "REJECTED", reason or "internal", p.version, detail=detail))
            return out
        # activate the trial: the new slot becomes active, the old one stays intact
        self.rec.slots[target] = SlotInfo(version=p.version, sha256=p.blob_sha256, status="trial")
        self.rec.active_slot = target
        self.rec.update_state = "TRIAL"
        self.rec.trial = TrialInfo(
            deploy_seq=seq,
            started_ms=self._now_ms(),
            inferences=0,
            confirm=m.trial.confirm,
            timeout_s=m.trial.timeout_s,
            min_inferences=m.trial.min_inferences,
        )
        self.active = verified
        self._save()
        try:
            verified.run_known_answers()  # the device's own kernel against the signer's answers
        except BlobRejectedError as exc:
            out += self._revert("kat_mismatch", seq, detail=exc.detail)
            self._save()
            return out
        out.append(self._ack(seq, "TRIAL", "trial", p.version))
        return out

    # -- confirm / revert -------------------------------------------------------------------

    def _confirm_cmd(self, m: Manifest) -> list[Outgoing]:
        active = self.rec.slots[self.rec.active_slot]
        if active.sha256 != m.param.blob_sha256:
            return [
                self._ack(
                    m.deploy_seq,
                    "REJECTED",
                    "bad_manifest",
                    m.param.version,
                    detail=f"version {m.param.version} is not in trial here",
                )
            ]
        if self.rec.update_state == "TRIAL":
            return self._confirm(m.deploy_seq)
        return [
            self._ack(m.deploy_seq, "CONFIRMED", "confirmed", m.param.version, detail="already")
        ]

    def _revert_cmd(self, m: Manifest) -> list[Outgoing]:
        active = self.rec.slots[self.rec.active_slot]
        if self.rec.update_state == "TRIAL" and active.sha256 == m.param.blob_sha256:
            return self._revert("server_revert", m.deploy_seq)
        if active.sha256 != m.param.blob_sha256:
            return [
                self._ack(
                    m.deploy_seq,
                    "REVERTED",
                    "server_revert",
                    m.param.version,
                    detail="not running this version",
                )
            ]
        return [
            self._ack(
                m.deploy_seq,
                "REJECTED",
                "bad_manifest",
                m.param.version,
                detail="already confirmed: roll back with an install of the previous set",
            )
        ]

    def _confirm(self, seq: int) -> list[Outgoing]:
        slot = self.rec.active_slot
        info = self.rec.slots[slot]
        self.rec.slots[slot] = info.model_copy(update={"status": "confirmed"})
        old = other_slot(slot)
        if self.rec.slots[old].status == "confirmed":
            self.rec.slots[old] = self.rec.slots[old].model_copy(update={"status": "valid"})
        self.rec.epoch_floor = max(self.rec.epoch_floor, self.active.header.security_epoch)
        self.rec.trial = None
        self.rec.desired = None
        self.rec.update_state = "IDLE"
        self._save()
        return [self._ack(seq, "CONFIRMED", "confirmed", info.version)]

    def _revert(self, reason: AckReason, seq: int, detail: str = "") -> list[Outgoing]:
        slot = self.rec.active_slot
        info = self.rec.slots[slot]
        status = "bad" if reason == "kat_mismatch" else "valid"
        self.rec.slots[slot] = info.model_copy(update={"status": status})
        self.rec.active_slot = other_slot(slot)
        self.rec.trial = None
        self.rec.desired = None
        self.rec.update_state = "IDLE"
        self.active = self._load_slot(self.rec.active_slot) or self._factory_blob()
        self._save()
        return [self._ack(seq, "REVERTED", reason, info.version, detail=detail)]

    # -- boot -----------------------------------------------------------------------------

    def _factory_state(self) -> StateRecord:
        v = self._factory_blob()
        data = self.fw.factory_blob
        self.slots.erase("A")
        self.slots.erase("B")
        self.slots.write_chunk("A", 0, data)
        rec = StateRecord()
        rec.slots["A"] = SlotInfo(
            version=v.header.param_version, sha256=v.sha256, status="confirmed"
        )
        return rec

    def _factory_blob(self) -> VerifiedBlob:
        return verify_blob(
            self.fw.factory_blob,
            trusted=self.fw.release_keys,
            schema_id=self.fw.schema.schema_id,
            max_len=self.fw.slot_size,
        )

    def _load_slot(self, slot: SlotName) -> VerifiedBlob | None:
        info = self.rec.slots[slot]
        if info.sha256 is None or info.status in ("empty", "bad"):
            return None
        try:
            head = BlobHeader.unpack(self.slots.read(slot, HEADER_LEN))
            length = PAYLOAD_OFFSET + head.payload_len
            if length > self.fw.slot_size:
                return None
            data = self.slots.read(slot, length)
            if hashlib.sha256(data).hexdigest() != info.sha256:
                return None
            return verify_blob(
                data,
                trusted=self.fw.release_keys,
                schema_id=self.fw.schema.schema_id,
                max_len=self.fw.slot_size,
            )
        except (BlobRejectedError, ValueError, OSError):
            return None

    def _boot_active_slot(self) -> VerifiedBlob:
        slot = self.rec.active_slot
        loaded = self._load_slot(slot)
        if loaded is not None:
            return loaded
        # the active slot is corrupt: fall back to the other slot, then to the factory set
        self.counters.boots_with_corrupt_slot += 1
        log.warning("active slot %s failed verification at boot; falling back", slot)
        self.rec.slots[slot] = self.rec.slots[slot].model_copy(update={"status": "bad"})
        fallback = other_slot(slot)
        loaded = self._load_slot(fallback)
        trial = self.rec.trial
        if self.rec.update_state == "TRIAL" and trial is not None:
            self._pending_acks.append(
                self._ack(
                    trial.deploy_seq,
                    "REVERTED",
                    "fault_reset",
                    self.rec.slots[slot].version,
                    detail="the trial slot failed verification at boot",
                )
            )
        if self.rec.update_state in ("TRIAL", "VERIFYING", "DOWNLOADING"):
            self.rec.update_state, self.rec.trial, self.rec.pending = "IDLE", None, None
            self.rec.desired = None
        if loaded is not None:
            self.rec.active_slot = fallback
            return loaded
        self.rec = self._factory_state().model_copy(
            update={
                "boot": self.rec.boot,
                "last_deploy_seq": self.rec.last_deploy_seq,
                "epoch_floor": self.rec.epoch_floor,
            }
        )
        return self._factory_blob()

    def _apply_restart_rules(self, fault_reset: bool) -> None:
        if self.rec.desired is not None and self._stored_manifest() is None:
            # a manifest stored by an older firmware (format v1, bound to no device): a download
            # or verification it started is dropped (the service re-issues its intent); a trial
            # goes on, it needs only the trial record
            if self.rec.update_state in ("DOWNLOADING", "VERIFYING"):
                self._discard_download()
            self.rec.desired = None
        state = self.rec.update_state
        if state == "TRIAL" and self.rec.trial is not None:
            if fault_reset:
                self._pending_acks += self._revert("fault_reset", self.rec.trial.deploy_seq)
            else:
                try:  # the power may have failed after activation, before the KATs ran
                    self.active.run_known_answers()
                except BlobRejectedError as exc:
                    self._pending_acks += self._revert(
                        "kat_mismatch", self.rec.trial.deploy_seq, detail=exc.detail
                    )
        elif state == "DOWNLOADING" and self.rec.pending is not None and self.rec.desired:
            pending = self.rec.pending
            self._start_download(ChunkAssembler.resume(pending, self.slots, self.rec.inactive_slot))
        elif state == "VERIFYING" and self.rec.desired:
            self._pending_acks += self._verify_and_trial(self._desired())
        elif state != "IDLE":
            self.rec.update_state, self.rec.pending, self.rec.trial = "IDLE", None, None

    # -- helpers ----------------------------------------------------------------------------

    def _desired(self) -> Manifest:
        assert self.rec.desired is not None
        return Manifest.model_validate(self.rec.desired)

    def _stored_manifest(self) -> Manifest | None:
        """The manifest in the state record, or ``None`` if it is not of the current format."""
        try:
            return Manifest.from_obj(self.rec.desired, wire=False)
        except WireError:
            return None

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _save(self) -> None:
        self.records.write(self.rec)

    def _ack(
        self,
        seq: int,
        state: AckState,
        reason: AckReason,
        version: int | None = None,
        *,
        detail: str = "",
        progress: tuple[int, int] | None = None,
    ) -> Outgoing:
        ack = UpdateAck.create(
            deploy_seq=seq,
            state=state,
            code=STATE_CODE[state],
            reason=reason,
            param_version=version,
            detail=detail[:200],
            ts_ms=self._now_ms(),
            progress=progress,
        )
        self.rec.last_ack = ack.model_dump(mode="json")
        log.info("ack deploy_seq=%d %s %s %s", seq, state, reason, detail)
        return Outgoing(Leaf.ACK, ack.to_json(), qos=1)
