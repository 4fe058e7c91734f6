"""``tinydrift demo``: the whole closed loop on one machine, with nothing installed but the package.

What runs is what ``tinydrift serve`` and ``tinydrift device`` run, wired as in production:

- an **embedded MQTT broker** on a free loopback port (Mosquitto when ``mosquitto`` is on
  ``PATH``, else amqtt in-process: :func:`~service.embedded_broker.start_embedded_broker`);
- a **registry** in SQLite in a temporary directory; the factory model (``create_bundle``:
  release and deploy keys, river model, int8, signed as v1) is registered with the function
  behind ``tinydrift registry import-blob``, and so is an operator-supplied candidate v2
  (see phase 5);
- the real :class:`~service.serve.Service` with both signing keys (updates on) and the update
  policy ``off``: every update is the operator's, made over the **operator HTTP API**
  (``/api/v1``, bearer token from :meth:`Registry.create_token`, via httpx), never by calling
  the service's Python objects. The service serves ``/metrics`` and the API on free ports,
  printed at the start with the token;
- a **simulated fleet** (default 50 devices, ``--devices N``) of
  :class:`~edge_agent.device.agent.EdgeAgent` s, each with its own MQTT connection, storage and
  update state machine, in one :class:`~edge_agent.device.fleet.Fleet` thread in this process;
  every device sends a frame of 16 readings every 0.15 s (107 readings/s) and a label for 20 %
  of its readings.

The scenario, phase by phase (the progress display shows the phase, elapsed time, devices,
readings, detections and the rollout state):

1. **stable**: every device learns its layer-A reference (512 readings) and the null of every
   signal stream and of its labelled error (``DeviceMonitor.calibration``: about 6,700
   readings and 400 labels for the demo's independent readings, about a minute).
2. **drift**: sensor aging on 20 % of the devices (gain ×1.6 on every axis, abrupt) and a label
   (concept) change on another 10 % (walk ↔ run swapped in the labels; inputs untouched). The
   devices are drawn from ``--seed``; the drift starts when phase 1 is complete.
3. **detected**: until layer A/B has flagged every injected device (or 30 s after the drift
   start once every gain device is flagged; at most 60 s). Detected devices are those with a
   device-scope drift event on the factory model after the drift start; a *false alarm device*
   is one with such an event that was not injected, or whose event came before its drift.
4. **bad candidate**: v2, a retrain of the factory model on *shuffled* labels, correctly signed
   with the release key and imported before the start like a parameter set trained offline, is
   proposed as ``parameter_set`` with ``auto_approve``; the canary gate (canary vs control on
   the labelled error, confidence and class mix) must fail it and roll it back.
5. **recalibration**: ``POST /candidates`` (kind ``recalibration``) builds one label-free
   parameter set per drifting device; ``POST /rollouts/{id}/approve`` starts it; canary, wave
   and the held-back control are gated on the labelled error and the rollout must finish with
   every member confirmed. A gain device left out of the first proposal (flagged too late, or
   its candidate refused by a candidate check; the label-free quantization test refuses a
   healthy recalibration at the allowed 1 % disagreement with probability ≤ 0.01) gets a
   follow-up rollout, as in ``tests/integration/test_rollout_e2e.py``; with too few devices to
   hold some back, each is compared with itself before its update, so the operator waits 5 s
   before approving for that "before" evidence to build up.
6. **recovered**: labelled accuracy of the recalibrated devices, from the registry's label
   buffer: before the drift, during it (factory model), after the update (their new versions).

The bad candidate comes first, as an operator's offline-trained set might: its canary may take
drifted devices, which it then reverts. A reverted device resumes the layer-A monitor of the
version it returned to (its pre-drift reference; ``DeviceMonitor`` keeps the previous version's),
so its drift stays in view and the recalibration that follows still covers it.

Exit 0 only if the loop closed (:class:`DemoResult` ``checks``): every gain device detected and
at least 80 % of all injected devices; the bad candidate rolled back by the canary gate; every
recalibration rollout FINISHED with all its devices confirmed, covering every gain device;
accuracy after the update ≥ during the drift + 0.08 and ≥ before the drift − 0.06.

Settings (:func:`demo_settings`) are tuned for a run of about a minute at 50 devices (under
3 minutes on a loaded 2-vCPU machine); production defaults differ:

- ``window_s=5`` (production 60): layer-B cohort windows close every 5 s so the per-device
  discoveries and cohort alarms come within seconds.
- ``min_soak_s=4`` (1800) and ``max_soak_s=60`` (14400): a group is judged after 4 s of soak,
  by when each arm has ≥ ``gate_min_readings=200`` readings (500) and ≥ 50 labels at the demo's
  reading and label rates; production soaks for real-world time-of-day effects.
- ``gate_error_margin=0.10`` (0.05): with ~100 labels per arm the one-sided bound is about
  ±0.09 wide; a 0.10 margin lets the gate decide after one soak instead of pausing as
  inconclusive. The bad candidate's error is ~0.5 above the control's, far past either margin.
- ``gate_min_devices=2`` (3), ``canary_size`` and ``control_size`` = 6 % of the fleet, at least
  3 (5 and 5), one wave (``waves_pct=[100]``; production 5, 25, 100 %). Fewer than 3 canary
  devices can leave the bad candidate's gate inconclusive: devices differ a lot in how badly a
  shuffled-label model does on them, and the gate's error bound accounts for that.
- ``rollout_tick_s=0.5`` (1): gates and timers evaluated twice a second.
- ``ack_timeout_s=60`` (900): a demo device fetches and trials a blob within a second or two;
  one silent for a minute is timed out rather than holding the demo up.
- ``label_cap_per_device=8000`` (2000): the label buffer keeps every label of the run, so the
  before-drift accuracy can still be measured at the end.
- ``update_policy="off"`` (``propose``): the demo is the operator.
- ``null_horizon_readings=256`` (the reference's 512): layer A checks every signal for
  dependence over blocks of 16 frames before monitoring it instead of 32, so an independent
  stream starts after 768 frames (2 minutes at the demo's rate) instead of 1,536. The simulated
  devices have no slow sensor noise; their sessions of activity need longer blocks anyway.
- Drift detection otherwise keeps its production calibration (512-reading references, the null
  of every signal learnt from 48 blocks a level, a fleet budget of 1e-7 false alarms per
  device-reading). Phase 1 ends when every device's labelled error and signal streams are
  calibrated, or once every device has learnt its labelled error and had its first look at its
  signals (some streams ready) and 90 % of the fleet's signal streams are ready: a stream whose
  two looks disagree waits for the next level, twice as long (another two minutes), and
  waiting for the last few of them would double the demo. After 4 minutes it goes on in any
  case. The streams still calibrating learn the drift as normal; the checks at the end say
  whether the loop still closed.

Besides the API the demo reads only what an operator could not ask the service for: the
simulated devices (which devices drift, their reading counters at the drift start), whether
layer A has calibrated every device (the engine's monitors, to end phase 1; the API shows it
per device too), and the
registry's label buffer for the accuracies (as the rollout tests do).

Detection delay: ``Detection.readings`` is the number of readings the device had sent on its
model version when the detection fired; the delay of a device is that minus the readings it had
sent when its drift started (read from the simulated device at the drift start, exact to one
frame of 16 readings).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edge_agent.blob import build_blob
from edge_agent.device.fleet import Fleet, FleetConfig, device_name
from edge_agent.device.simulator import DriftSpec, generate_dataset
from service.config import ServiceSettings, load_settings
from service.embedded_broker import EmbeddedBroker, start_embedded_broker
from service.firmware_bundle import Bundle, create_bundle
from service.learn.deployed import DeployedModel
from service.learn.retrain import RetrainConfig, retrain
from service.registry.records import LabelArrays
from service.registry.store import Registry
from service.serve import Service

FLEET: Final = "demo"
BATCH: Final = 16
"""Readings per telemetry frame."""
PERIOD_S: Final = 0.15
"""Seconds between a device's frames: 107 readings/s per device."""
LABEL_RATE: Final = 0.2
"""Share of readings a device sends a label for (the error detectors and the gates need them)."""
CALIBRATED_SHARE: Final = 0.9
"""Phase 1 ends once every device has looked at its streams and the fleet has learnt this share
of all signal streams (or every stream of every device, whichever comes first)."""
CALIBRATION_MAX_S: Final = 240.0
"""Phase 1 injects the drift after this long whatever is still calibrating."""
GAIN_SHARE: Final = 0.2
GAIN_MAGNITUDE: Final = 0.6
CONCEPT_SHARE: Final = 0.1
BAD_VERSION: Final = 2
"""Version of the shuffled-label candidate (the recalibrations get the next free ones)."""
DETECT_ALL_SHARE: Final = 0.8
"""Exit 0 needs every gain device detected and at least this share of all injected devices."""
RECOVERY_MARGIN: Final = 0.08
"""Accuracy after the update must exceed the accuracy during the drift by at least this much."""
RECOVERY_TOLERANCE: Final = 0.06
"""... and be at most this much below the accuracy before the drift."""
MIN_LABELS: Final = 100
"""Labelled readings each accuracy figure needs to count."""


class DemoError(RuntimeError):
    """A phase could not complete (timed out, or the API refused); the message says which."""


@dataclass
class DemoResult:
    """What the demo measured: the summary (also the ``--json`` output) and the checks."""

    summary: dict[str, Any]
    ok: bool
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DriftPlan:
    """Which devices drift and how (drawn from the seed)."""

    gain: tuple[str, ...]
    concept: tuple[str, ...]

    @property
    def injected(self) -> tuple[str, ...]:
        """Every device with a drift."""
        return tuple(sorted((*self.gain, *self.concept)))

    def spec(self, device: str, start_s: float) -> DriftSpec | None:
        """The device's drift from simulated time ``start_s`` (``None``: it does not drift)."""
        if device in self.gain:
            return DriftSpec("gain", start_s=start_s, magnitude=GAIN_MAGNITUDE)
        if device in self.concept:
            return DriftSpec("concept", start_s=start_s, magnitude=1.0)
        return None


def plan_scenario(devices: int, seed: int) -> DriftPlan:
    """Gain drift on ``GAIN_SHARE`` of the devices, a label change on ``CONCEPT_SHARE`` others.

    >>> p = plan_scenario(50, seed=0)
    >>> len(p.gain), len(p.concept), len(set(p.gain) & set(p.concept))
    (10, 5, 0)
    >>> p == plan_scenario(50, seed=0)
    True
    """
    order = np.random.default_rng(seed).permutation(devices)
    n_gain = max(1, round(GAIN_SHARE * devices))
    n_concept = max(1, round(CONCEPT_SHARE * devices))
    pick = [device_name(int(i)) for i in order]
    return DriftPlan(
        gain=tuple(sorted(pick[:n_gain])),
        concept=tuple(sorted(pick[n_gain : n_gain + n_concept])),
    )


def group_size(devices: int) -> int:
    """Canary and control size: 6 % of the fleet, at least 3.

    >>> group_size(24), group_size(50), group_size(200)
    (3, 3, 12)
    """
    return max(3, round(0.06 * devices))


def demo_settings(broker: EmbeddedBroker, db: str, bundle: Bundle, devices: int) -> ServiceSettings:
    """The service settings of the demo (why each differs from production: module docstring)."""
    size = group_size(devices)
    return load_settings(
        broker=broker.url,
        db=db,
        metrics_port=0,
        api_port=0,
        fleets=[FLEET],
        mqtt_client_id="tinydrift-demo-service",
        window_s=5.0,
        null_horizon_readings=256,
        checkpoint_interval_s=30.0,
        release_key=bundle.keys_dir / "release.key",
        deploy_key=bundle.keys_dir / "deploy.key",
        update_policy="off",
        rollout_tick_s=0.5,
        canary_size=size,
        control_size=size,
        waves_pct=[100.0],
        min_soak_s=4.0,
        max_soak_s=60.0,
        gate_min_readings=200,
        gate_min_devices=2,
        gate_error_margin=0.10,
        ack_timeout_s=60.0,
        label_cap_per_device=8000,
    )


def import_blob_file(path: Path, db: str, pubkey: Path, status: str) -> str:
    """Register a signed blob exactly as ``tinydrift registry import-blob`` does; its output."""
    from service.cli.serve import import_blob

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        import_blob([path], db=db, pubkey=pubkey, status=status)
    return out.getvalue().strip()


def shuffled_label_candidate(bundle: Bundle, seed: int, version: int = BAD_VERSION) -> bytes:
    """A retrain of the factory model on shuffled labels: deliberately bad, correctly signed."""
    deployed = DeployedModel.from_blob(bundle.firmware().factory_blob)
    x, y = generate_dataset(3000, seed=seed + 99)
    y = np.random.default_rng(seed + 5).permutation(y)
    cand = retrain(deployed, x, y, config=RetrainConfig(learning_rate=0.5, epochs=3))
    return build_blob(cand.params, param_version=version, security_epoch=0, key=bundle.release_key)


def labelled_accuracy(
    lab: LabelArrays,
    devices: set[str],
    *,
    since: float = 0.0,
    until: float = 1e18,
    versions: set[int] | None = None,
    exclude_versions: set[int] | None = None,
    per_device: dict[str, int] | None = None,
) -> tuple[float, int]:
    """Accuracy of ``devices``' labelled readings in ``[since, until)``: ``(accuracy, labels)``.

    Restricted to model ``versions``, or away from ``exclude_versions``, or to each device's own
    version in ``per_device``; ``nan`` accuracy when no label qualifies.
    """
    m = np.isin(lab.device, sorted(devices)) & (lab.ts >= since) & (lab.ts < until)
    if versions is not None:
        m &= np.isin(lab.param_version, sorted(versions))
    if exclude_versions is not None:
        m &= ~np.isin(lab.param_version, sorted(exclude_versions))
    if per_device is not None:
        want = np.array([per_device.get(d, -1) for d in lab.device], dtype=np.int64)
        m &= lab.param_version == want
    n = int(m.sum())
    return (float(np.mean(lab.pred[m] == lab.label[m])) if n else float("nan")), n


# ---------------------------------------------------------------------------------------------
# the operator's side: the HTTP API


class OperatorApi:
    """The operator API over HTTP with a bearer token (what an operator's tooling calls)."""

    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.http = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {token}"}, timeout=60.0
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _json(self, r: httpx.Response, what: str) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise DemoError(f"{what}: HTTP {r.status_code}: {detail}")
        return r.json()

    def status(self) -> dict[str, Any]:
        """``GET /status``: the service's live figures."""
        return dict(self._json(self.http.get("/status"), "GET /status")["service"] or {})

    def drift_events(self, since: datetime | None) -> list[dict[str, Any]]:
        """``GET /drift-events`` of the demo fleet at or after ``since`` (newest first)."""
        params: dict[str, Any] = {"fleet": FLEET, "limit": 1000}
        if since is not None:
            params["since"] = since.isoformat()
        return list(
            self._json(self.http.get("/drift-events", params=params), "GET /drift-events")["items"]
        )

    def devices(self) -> list[dict[str, Any]]:
        """``GET /fleets/demo/devices`` (every page)."""
        out: list[dict[str, Any]] = []
        while True:
            page = self._json(
                self.http.get(
                    f"/fleets/{FLEET}/devices", params={"limit": 1000, "offset": len(out)}
                ),
                "GET /fleets/demo/devices",
            )
            out += page["items"]
            if not page["items"] or len(out) >= page["total"]:
                return out

    def propose(self, kind: str, **extra: Any) -> dict[str, Any]:
        """``POST /candidates``."""
        body = {"fleet": FLEET, "kind": kind, **extra}
        return dict(self._json(self.http.post("/candidates", json=body), f"propose {kind}"))

    def approve(self, rollout_id: str) -> dict[str, Any]:
        """``POST /rollouts/{id}/approve``."""
        r = self.http.post(f"/rollouts/{rollout_id}/approve")
        return dict(self._json(r, f"approve {rollout_id}"))

    def rollback(self, rollout_id: str, reason: str) -> dict[str, Any]:
        """``POST /rollouts/{id}/rollback``."""
        r = self.http.post(f"/rollouts/{rollout_id}/rollback", json={"reason": reason})
        return dict(self._json(r, f"roll back {rollout_id}"))

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /rollouts/{id}``: state, groups with gate figures, transitions."""
        return dict(self._json(self.http.get(f"/rollouts/{rollout_id}"), f"GET {rollout_id}"))


# ---------------------------------------------------------------------------------------------
# the progress display


@dataclass
class Dashboard:
    """What the live display shows; rendered by Rich a few times a second."""

    devices: int
    phase: str = "starting"
    phase_no: int = 0
    started: float = field(default_factory=time.monotonic)
    online: int = 0
    readings: int = 0
    detections: int = 0
    detected: int = 0
    injected: int = 0
    false_alarms: int = 0
    rejected: int = 0
    rollout: str = "-"
    note: str = ""

    def __rich__(self) -> Table:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold cyan", justify="right")
        t.add_column()
        elapsed = time.monotonic() - self.started
        t.add_row("phase", f"[bold]{self.phase_no}/6 {self.phase}[/bold]  {self.note}")
        t.add_row("elapsed", f"{elapsed:5.1f} s")
        t.add_row("devices", f"{self.online}/{self.devices} online")
        t.add_row("readings", f"{self.readings:,} ingested, {self.rejected} rejected")
        detected = f"{self.detected}/{self.injected} injected devices flagged"
        t.add_row(
            "detections", f"{self.detections:,} ({detected}, {self.false_alarms} false alarm)"
        )
        t.add_row("rollout", self.rollout)
        return t


# ---------------------------------------------------------------------------------------------
# the run


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


@dataclass
class _Detections:
    """Device-scope drift events on the factory model, as read from the API."""

    seen: set[int] = field(default_factory=set)
    cursor: datetime | None = None
    total: int = 0
    cohort_alarms: int = 0
    first_after_drift: dict[str, dict[str, Any]] = field(default_factory=dict)
    before_drift: dict[str, dict[str, Any]] = field(default_factory=dict)


class DemoRun:
    """One run of the scenario (see the module docstring); :meth:`run` returns the result."""

    def __init__(
        self, devices: int, seed: int, console: Console, *, show_progress: bool = True
    ) -> None:
        self.n = devices
        self.seed = seed
        self.out = console
        self.show_progress = show_progress
        self.plan = plan_scenario(devices, seed)
        self.board = Dashboard(devices=devices, injected=len(self.plan.injected))
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.phases: list[dict[str, Any]] = []
        self.det = _Detections()
        self.drift_wall: float | None = None
        self.drift_readings: dict[str, int] = {}
        self.update_wall: float | None = None
        self.rollouts: list[dict[str, Any]] = []
        self.recal_targets: dict[str, int] = {}
        self.refusals: list[dict[str, str]] = []
        self.checks: list[tuple[str, bool, str]] = []
        self._last_poll = 0.0
        self.api: OperatorApi | None = None
        self.fleet: Fleet | None = None
        self.svc: Service | None = None
        self.db = ""
        self.broker_kind = ""
        self.urls: dict[str, str] = {}

    # -- helpers -------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """A log line above the live display."""
        self.out.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim] {message}")

    @contextlib.contextmanager
    def phase(self, no: int, name: str) -> Iterator[None]:
        """Run one phase: shown on the display, timed in the summary."""
        self.board.phase_no, self.board.phase, self.board.note = no, name, ""
        start = time.monotonic()
        self.say(f"[bold]phase {no}: {name}[/bold]")
        try:
            yield
        finally:
            self.phases.append(
                {
                    "phase": no,
                    "name": name,
                    "start_s": round(start - self.t0, 1),
                    "seconds": round(time.monotonic() - start, 1),
                }
            )

    def poll(self, force: bool = False) -> None:
        """Refresh the display's figures from the API (at most once a second)."""
        now = time.monotonic()
        if not force and now - self._last_poll < 1.0:
            return
        self._last_poll = now
        assert self.api is not None
        st = self.api.status()
        b = self.board
        b.readings = int(st.get("readings", 0))
        b.detections = int(st.get("detections", 0))
        b.rejected = sum(st.get("rejections", {}).values())
        if self.fleet is not None:
            b.online = self.fleet.loop.connected
        self._read_events()

    def _read_events(self) -> None:
        assert self.api is not None
        # events are stamped when detected and committed in batches by the registry writer, so
        # one may land behind the newest seen: read with an overlap, skip the ids already seen
        since = None if self.det.cursor is None else self.det.cursor - timedelta(seconds=10)
        events = self.api.drift_events(since)
        injected = set(self.plan.injected)
        for ev in reversed(events):  # oldest first
            if ev["id"] in self.det.seen:
                continue
            self.det.seen.add(ev["id"])
            self.det.total += 1
            ts = datetime.fromisoformat(ev["ts"])
            if ts.tzinfo is None:  # the registry stores UTC
                ts = ts.replace(tzinfo=UTC)
            if self.det.cursor is None or ts > self.det.cursor:
                self.det.cursor = ts
            if ev["scope"] != "device" or ev["device"] is None:
                self.det.cohort_alarms += 1
                continue
            if ev["model_version"] != 1:
                continue  # detections on the updated devices' new versions: not this drift
            dev = ev["device"]
            after = self.drift_wall is not None and ts.timestamp() >= self.drift_wall
            if after and dev not in self.det.first_after_drift:
                self.det.first_after_drift[dev] = ev
            elif not after and dev not in self.det.before_drift:
                self.det.before_drift[dev] = ev
        detected = set(self.det.first_after_drift)
        self.board.detected = len(detected & injected)
        self.board.false_alarms = len(self._false_alarms())

    def _false_alarms(self) -> set[str]:
        injected = set(self.plan.injected)
        return (set(self.det.first_after_drift) - injected) | set(self.det.before_drift)

    def wait_for(
        self, cond: Callable[[], bool], timeout: float, what: str, *, poll_s: float = 0.25
    ) -> None:
        """Poll ``cond`` (refreshing the display) until true; :class:`DemoError` after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if cond():
                return
            if time.monotonic() >= deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll_s)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds``, keeping the display fresh."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.poll()
            time.sleep(min(0.25, left))

    def check(self, name: str, ok: bool, detail: str) -> None:
        """Record one exit check."""
        self.checks.append((name, ok, detail))
        mark = "[green]ok[/green]" if ok else "[red]FAILED[/red]"
        self.say(f"check {mark} {name}: {detail}")

    # -- the scenario --------------------------------------------------------------------------

    def run(self) -> DemoResult:
        """Run everything; never raises for a failed phase (it becomes a failed check)."""
        error: str | None = None
        with tempfile.TemporaryDirectory(prefix="tinydrift-demo-") as tmp:
            live = Live(
                self.board,
                console=self.out,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            with live if self.show_progress else contextlib.nullcontext():
                try:
                    self._run(Path(tmp))
                except DemoError as exc:
                    error = str(exc)
                    self.say(f"[red]stopped:[/red] {error}")
                finally:
                    self._stop()
                summary = self._summary(error)
        problems = [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]
        if error is not None:
            problems.insert(0, error)
        return DemoResult(summary=summary, ok=not problems, problems=problems)

    def _run(self, tmp: Path) -> None:
        self.board.phase = "set-up"
        broker = start_embedded_broker()
        self._broker = broker
        self.broker_kind = broker.kind
        self.say(f"broker: {broker.kind} on {broker.url}")
        bundle = create_bundle(tmp / "bundle", seed=self.seed)
        self.db = f"sqlite:///{tmp / 'registry.db'}"
        pub = bundle.keys_dir / "release.pub"
        factory = bundle.firmware_dir / "factory.blob"
        self.say(
            "factory model v1 trained (river), quantised, signed: "
            + import_blob_file(factory, self.db, pub, "good")
        )
        bad = tmp / "candidate-v2.blob"
        bad.write_bytes(shuffled_label_candidate(bundle, self.seed))
        self.say(
            "offline candidate v2 (retrained on shuffled labels): "
            + import_blob_file(bad, self.db, pub, "candidate")
        )
        reg = Registry(self.db)
        try:
            _, token = reg.create_token("demo-operator", "operator", actor="tinydrift-demo")
        finally:
            reg.close()
        svc = Service(demo_settings(broker, self.db, bundle, self.n))
        self.svc = svc
        svc.start()
        self.api = OperatorApi(int(svc.api_port or 0), token)
        self.urls = {
            "metrics": f"http://127.0.0.1:{svc.metrics_port}/metrics",
            "api": f"http://127.0.0.1:{svc.api_port}/docs",
        }
        self.say(f"metrics: {self.urls['metrics']}")
        self.say(f"operator API: {self.urls['api']}  (token, role operator: {token})")
        if not svc.consumer.wait_connected(15):
            raise DemoError("the service did not connect to the broker")
        self.fleet = Fleet(
            FleetConfig(
                fleet=FLEET,
                devices=self.n,
                host=broker.host,
                port=broker.port,
                seed=self.seed,
                batch=BATCH,
                period_s=PERIOD_S,
                label_rate=LABEL_RATE,
                state_dir=tmp / "devices",
            ),
            bundle.firmware(),
            {},
        )
        self.fleet.start()
        self._stable()
        self._inject()
        self._detect()
        self._bad_candidate()
        self._recalibrate()
        self._recovered()

    def _stop(self) -> None:
        if self.api is not None:
            with contextlib.suppress(Exception):
                if self.svc is not None:
                    self.svc.writer.flush(10)
                self.poll(force=True)
        if self.fleet is not None:
            self.fleet.stop()
        if self.svc is not None:
            self.svc.stop()
        if self.api is not None:
            self.api.close()
        broker = getattr(self, "_broker", None)
        if broker is not None:
            broker.stop()

    def _stable(self) -> None:
        assert self.fleet is not None
        assert self.svc is not None
        fleet, svc = self.fleet, self.svc
        with self.phase(1, "stable operation: references and nulls learnt"):
            self.wait_for(lambda: fleet.loop.connected == self.n, 30, "every device online")
            self.say(f"{self.n} devices online, {BATCH} readings every {PERIOD_S:g} s each")

            def ready() -> bool:
                with svc.engine.lock:
                    mons = svc.engine.monitors
                    status = [
                        m.calibration()
                        for a in fleet.agents
                        if (m := mons.get((FLEET, a.config.device_id))) is not None
                    ]
                # every stream and the labelled error; or every device past its first look
                # and most of the fleet's streams (a drift on a stream still learning its
                # null is learnt as normal)
                learnt = sum(1 for c in status if c.streams_ready + c.error_ready > c.streams)
                looked = len(status) == self.n and all(
                    c.error_ready and c.streams_ready > 0 for c in status
                )
                streams = sum(c.streams_ready for c in status)
                total = self.n * (status[0].streams if status else 1)
                self.board.note = (
                    f"calibrated {learnt}/{self.n} devices ({streams}/{total} signal streams)"
                )
                return learnt == self.n or (looked and streams >= CALIBRATED_SHARE * total)

            try:
                self.wait_for(ready, CALIBRATION_MAX_S, "every device's layer-A calibration")
            except DemoError:
                # a stream whose looks keep disagreeing can take another doubling: the drift
                # goes on; it is learnt as normal on the streams still calibrating
                self.say(
                    f"after {CALIBRATION_MAX_S:g} s, {self.board.note}: injecting the drift anyway"
                )
                return
            self.say(
                f"{self.board.note}: each device's reference (512 readings), the null of its "
                "labelled error and of its signals (about two minutes of independent readings; "
                "longer where readings depend on each other)"
            )

    def _inject(self) -> None:
        assert self.fleet is not None
        with self.phase(2, "sensor aging + label change injected"):
            start = time.time() + 0.3
            for agent in self.fleet.agents:
                spec = self.plan.spec(agent.config.device_id, agent.sim_time(start))
                if spec is not None:
                    agent.sensor.drift = spec
            time.sleep(max(0.0, start - time.time()))
            self.drift_wall = start
            self.drift_readings = {
                a.config.device_id: a.stats.readings
                for a in self.fleet.agents
                if a.config.device_id in self.plan.injected
            }
            self.say(
                f"gain ×{1 + GAIN_MAGNITUDE:g} on {len(self.plan.gain)} devices "
                f"({', '.join(self.plan.gain)}); walk↔run labels swapped on "
                f"{len(self.plan.concept)} ({', '.join(self.plan.concept)})"
            )

    def _detect(self) -> None:
        gain, injected = set(self.plan.gain), set(self.plan.injected)
        with self.phase(3, "drift detection"):

            def done() -> bool:
                age = time.time() - (self.drift_wall or 0.0)
                flagged = set(self.det.first_after_drift)
                self.board.note = (
                    f"gain {len(flagged & gain)}/{len(gain)}, "
                    f"concept {len(flagged & set(self.plan.concept))}/{len(self.plan.concept)}"
                )
                return injected <= flagged or (gain <= flagged and age >= 30)

            try:
                self.wait_for(done, 60, "detections on the injected devices")
            except DemoError:
                if not gain <= set(self.det.first_after_drift):
                    raise
            flagged = set(self.det.first_after_drift) & injected
            self.say(
                f"flagged {len(flagged)}/{len(injected)} injected devices "
                f"{time.time() - (self.drift_wall or 0):.1f} s after the drift start"
            )

    def _recalibrate(self) -> None:
        assert self.api is not None
        api = self.api
        gain = set(self.plan.gain)
        updated: set[str] = set()
        with self.phase(5, "good candidate: recalibration, canary, promotion"):
            deadline = time.monotonic() + 150
            attempts = 0
            while not gain <= updated:
                if time.monotonic() > deadline or len(self.rollouts) >= 4 or attempts >= 10:
                    break
                attempts += 1
                self._wait_feature_drift(gain - updated)
                try:
                    missing = sorted(gain - updated)
                    body: dict[str, Any] = {} if not updated else {"devices": missing}
                    p = api.propose("recalibration", **body)
                except DemoError as exc:
                    if "409" not in str(exc):
                        raise
                    self.say(f"nothing to propose yet ({exc}); retrying")
                    time.sleep(1.0)
                    continue
                for dev, why in p["refused"].items():
                    self.refusals.append({"device": dev, "reason": why})
                refused = f"; refused {p['refused']}" if p["refused"] else ""
                if p["rollout"] is None:
                    # the candidate check judges a fresh sample next time (the buffer rolls on)
                    self.say(f"POST /candidates recalibration: nothing accepted{refused}; retrying")
                    continue
                rid = p["rollout"]["id"]
                self.recal_targets.update(p["accepted"])
                self.say(
                    f"POST /candidates recalibration → rollout {rid} "
                    f"({len(p['accepted'])} devices, {p['rollout']['state']}){refused}"
                )
                if not p["rollout"]["control"]:
                    # too few devices to hold some back: each is compared with itself before
                    # its update, so the operator lets that evidence grow before approving
                    self.say("no control group (devices judged against themselves): review 5 s")
                    self.pause(5.0)
                self.update_wall = self.update_wall or time.time()
                api.approve(rid)
                self.say(f"POST /rollouts/{rid}/approve → canary starts")
                detail = self._follow(rid, {"FINISHED", "ROLLED_BACK", "PAUSED", "STOPPED"}, 120)
                n = len(p["accepted"])
                if detail["state"] == "FINISHED":

                    def confirmed(r: str = rid, n: int = n) -> bool:
                        return bool(api.rollout(r)["summary"]["confirmed"] >= n)

                    self.wait_for(confirmed, 30, "every device of the recalibration confirmed")
                    detail = api.rollout(rid)
                if detail["state"] == "PAUSED":
                    self.say(f"{rid} paused ({detail['reason']}): the operator rolls it back")
                    api.rollback(rid, "demo: inconclusive")
                    detail = self._follow(rid, {"ROLLED_BACK"}, 30)
                self._record_rollout(detail, f"recalibration v{self._versions(p['accepted'])}")
                if detail["state"] != "FINISHED":
                    break
                updated |= set(p["accepted"])
            rolled = [r for r in self.rollouts if r["kind"] == "recalibration"]
            promoted = [r for r in rolled if r["outcome"] == "promoted"]
            self.check(
                "good candidate promoted",
                bool(rolled) and len(promoted) == len(rolled) and gain <= updated,
                f"{len(promoted)}/{len(rolled)} recalibration rollouts FINISHED, "
                f"{len(gain & updated)}/{len(gain)} gain devices confirmed on their new version",
            )

    @staticmethod
    def _versions(accepted: dict[str, int]) -> str:
        vs = sorted(set(accepted.values()))
        return f"{vs[0]}" if len(vs) == 1 else f"{vs[0]}–{vs[-1]}"

    def _wait_feature_drift(self, devices: set[str]) -> None:
        """Wait (≤ 20 s) until the API shows the devices drifting on their features."""
        assert self.api is not None
        api = self.api

        def drifting() -> bool:
            states = {d["device"]: d["drift_state"] for d in api.devices()}
            flagged = {d for d in devices if "feature" in states.get(d, "")}
            self.board.note = f"{len(flagged)}/{len(devices)} drifting on their features"
            return flagged == devices

        with contextlib.suppress(DemoError):
            self.wait_for(drifting, 20, "feature drift on the gain devices", poll_s=0.5)
        self.pause(2.5)  # a full buffer of readings after the alarm (256; 128 needed)

    def _follow(self, rid: str, final: set[str], timeout: float) -> dict[str, Any]:
        """Follow a rollout on the display until it reaches a state in ``final``."""
        assert self.api is not None
        api = self.api
        state: dict[str, Any] = {}

        def at_end() -> bool:
            d = api.rollout(rid)
            state["d"] = d
            group = d["current_group"] or "-"
            s = d["summary"] or {}
            self.board.rollout = (
                f"{d['kind']} {d['to_version']}: {d['state']}, group {group}; confirmed "
                f"{s.get('confirmed', 0)}, in trial {s.get('in_trial', 0)}, rolled back "
                f"{s.get('rolled_back', 0)}"
            )
            seen = state.setdefault("seen", set())
            for t in d["transitions"]:
                if t["id"] in seen:
                    continue
                seen.add(t["id"])
                what = "rollout" if t["scope"] == "rollout" else t["name"]
                reason = f" ({t['reason']})" if t["reason"] else ""
                self.say(f"  {what}: {t['from_state']} → {t['to_state']}{reason}")
            return str(d["state"]) in final

        self.wait_for(at_end, timeout, f"rollout {rid}", poll_s=0.5)
        return dict(state["d"])

    def _record_rollout(self, d: dict[str, Any], candidate: str) -> None:
        gates = []
        for g in d["groups"]:
            fig = g.get("figures") or {}
            if not fig:
                continue
            gate: dict[str, Any] = {
                "group": g["name"],
                "devices": g["devices"],
                "status": g["status"],
                "soaked_s": round(fig.get("soaked_ms", 0) / 1000, 1),
                "verdict": fig.get("verdict"),
                "delivery": fig.get("delivery_verdict"),
                "health": fig.get("health_verdict"),
                "quality": fig.get("quality_verdict"),
                "reason": fig.get("reason"),
                "checks": [
                    {k: _round(v) if isinstance(v, float) else v for k, v in c.items()}
                    for c in fig.get("checks", [])
                ],
            }
            q = fig.get("quality")
            if q:
                for arm in ("canary", "control"):
                    a = q[arm]
                    gate[arm] = {
                        "devices": a["devices"],
                        "readings": a["readings"],
                        "labels": a["labelled"],
                        "error_rate": _round(a["errors"] / a["labelled"])
                        if a["labelled"]
                        else None,
                        "mean_confidence": _round(a["mean_confidence"]),
                    }
                gate["class_js"] = _round(q["class_js"])
            gates.append(gate)
        state = str(d["state"])
        outcome = {"FINISHED": "promoted", "ROLLED_BACK": "rolled_back"}.get(state, state.lower())
        s = d["summary"] or {}
        self.rollouts.append(
            {
                "id": d["id"],
                "candidate": candidate,
                "kind": d["kind"],
                "from_version": d["from_version"],
                "to_version": d["to_version"],
                "outcome": outcome,
                "state": state,
                "reason": d["reason"],
                "devices": sum(int(g["devices"]) for g in d["groups"]),
                "control": d["control"],
                "confirmed": s.get("confirmed"),
                "rolled_back": s.get("rolled_back"),
                "gates": gates,
            }
        )

    def _bad_candidate(self) -> None:
        assert self.api is not None
        with self.phase(4, "bad candidate: shuffled-label retrain, canary gate"):
            p = self.api.propose("parameter_set", version=BAD_VERSION, auto_approve=True)
            rid = p["rollout"]["id"]
            self.say(
                f"POST /candidates parameter_set v{BAD_VERSION} auto_approve → rollout {rid} "
                f"({p['rollout']['state']})"
            )
            d = self._follow(rid, {"FINISHED", "ROLLED_BACK", "PAUSED", "STOPPED"}, 90)
            if d["state"] in ("FINISHED", "PAUSED"):
                self.say(f"{rid} {d['state']}: the operator rolls it back")
                self.api.rollback(rid, "demo operator: the canary gate did not stop it")
                d = self._follow(rid, {"ROLLED_BACK"}, 30)
            if d["state"] == "ROLLED_BACK":
                self.wait_for(self._all_back_on_v1, 30, "the canary devices back on v1")
                d = self.api.rollout(rid)
            self._record_rollout(d, f"v{BAD_VERSION} (retrained on shuffled labels)")
            self.check(
                "bad candidate rolled back",
                d["state"] == "ROLLED_BACK" and "gate failed in canary" in d["reason"],
                f"{d['state']}: {d['reason']}",
            )

    def _all_back_on_v1(self) -> bool:
        assert self.api is not None
        on_bad = [d["device"] for d in self.api.devices() if d["model_version"] == BAD_VERSION]
        self.board.note = f"{len(on_bad)} devices still on v{BAD_VERSION}"
        return not on_bad

    def _recovered(self) -> None:
        targets = self.recal_targets
        with self.phase(6, "accuracy after the update"):
            t_end = time.monotonic() + 30

            def enough() -> bool:
                _, n = self._accuracy(set(targets), versions=set(targets.values()))
                self.board.note = f"{n} labels on the new versions"
                return n >= 10 * MIN_LABELS or time.monotonic() > t_end

            if targets:
                self.wait_for(enough, 40, "labelled readings on the new versions", poll_s=2.0)

    # -- measurements --------------------------------------------------------------------------

    def _labels(self) -> Any:
        reg = Registry(self.db)
        try:
            return reg.recent_labels(FLEET, limit=10_000_000)
        finally:
            reg.close()

    def _accuracy(
        self,
        devices: set[str],
        *,
        since: float = 0.0,
        until: float = 1e18,
        versions: set[int] | None = None,
        per_device: dict[str, int] | None = None,
        lab: Any = None,
    ) -> tuple[float, int]:
        """Labelled accuracy of ``devices`` in ``[since, until)`` on ``versions`` (or each
        device's own version in ``per_device``): (accuracy, labels)."""
        if self.svc is not None and not self.svc._stopped:
            self.svc.writer.flush(10)
        lab = lab if lab is not None else self._labels()
        return labelled_accuracy(
            lab, devices, since=since, until=until, versions=versions, per_device=per_device
        )

    def _summary(self, error: str | None) -> dict[str, Any]:
        gain, concept = set(self.plan.gain), set(self.plan.concept)
        injected = gain | concept
        fleet = self.fleet
        drift = self.drift_wall or float("inf")
        acc: dict[str, Any] = {"devices": "the gain-drift devices (the ones recalibrated)"}
        if self.db:
            lab = self._labels()
            upd = self.update_wall or float("inf")
            before = self._accuracy(gain, until=drift, lab=lab)
            during = self._accuracy(gain, since=drift + 1.0, until=upd, versions={1}, lab=lab)
            after = self._accuracy(gain, per_device=self.recal_targets, lab=lab)
            others = {device_name(i) for i in range(self.n)} - injected
            acc.update(
                before_drift=_round(before[0]),
                during_drift=_round(during[0]),
                after_update=_round(after[0]),
                labels={"before_drift": before[1], "during_drift": during[1],
                        "after_update": after[1]},
                concept_devices={
                    "before_drift": _round(self._accuracy(concept, until=drift, lab=lab)[0]),
                    "during_drift": _round(
                        self._accuracy(concept, since=drift + 1.0, versions={1}, lab=lab)[0]
                    ),
                },
                stable_devices=_round(self._accuracy(others, versions={1}, lab=lab)[0]),
                per_device={
                    dev: [
                        _round(self._accuracy({dev}, until=drift, lab=lab)[0]),
                        _round(self._accuracy({dev}, since=drift + 1.0, until=upd, versions={1},
                                              lab=lab)[0]),
                        _round(self._accuracy({dev}, per_device=self.recal_targets, lab=lab)[0]),
                    ]
                    for dev in sorted(gain)
                },
            )  # fmt: skip
        delays = {
            d: int(ev["readings"]) - self.drift_readings.get(d, 0)
            for d, ev in self.det.first_after_drift.items()
            if d in injected
        }
        detected = sorted(set(self.det.first_after_drift) & injected)
        false_alarms = sorted(self._false_alarms())

        def kind(devs: set[str]) -> dict[str, Any]:
            got = sorted(set(detected) & devs)
            return {
                "injected": len(devs),
                "detected": len(got),
                "median_delay_readings": _median([delays[d] for d in got]),
            }

        threshold = (
            f"every gain device and ≥ {DETECT_ALL_SHARE:.0%} of all injected devices flagged"
        )
        if self.drift_wall is not None:
            need = math.ceil(DETECT_ALL_SHARE * len(injected))
            self.check(
                "drift detected",
                gain <= set(detected) and len(detected) >= need,
                f"{len(set(detected) & gain)}/{len(gain)} gain, "
                f"{len(set(detected) & concept)}/{len(concept)} concept devices flagged "
                f"(needed: {threshold}); {len(false_alarms)} false-alarm devices",
            )
            self.check(
                "no false-alarm device",
                not false_alarms,
                "no alarm on a device without an injected drift, nor before its drift"
                if not false_alarms
                else f"{len(false_alarms)} devices alarmed without a drift: "
                + ", ".join(false_alarms[:5])
                + (" ..." if len(false_alarms) > 5 else ""),
            )
        if self.db and self.recal_targets:
            b, d_, a = acc["before_drift"], acc["during_drift"], acc["after_update"]
            n_ok = min(acc["labels"].values()) >= MIN_LABELS
            ok = (
                n_ok and None not in (b, d_, a)
                and a >= d_ + RECOVERY_MARGIN and a >= b - RECOVERY_TOLERANCE
            )  # fmt: skip
            self.check(
                "accuracy recovered",
                bool(ok),
                f"before {b}, during {d_}, after {a} (needed: after ≥ during + "
                f"{RECOVERY_MARGIN} and ≥ before − {RECOVERY_TOLERANCE}; labels {acc['labels']})",
            )
        elif error is None:
            self.check("accuracy recovered", False, "no recalibration was rolled out")
        st = self.svc.status() if self.svc is not None else None
        summary: dict[str, Any] = {
            "devices": self.n,
            "seed": self.seed,
            "broker": self.broker_kind,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "readings": sum(a.stats.readings for a in fleet.agents) if fleet else 0,
            "readings_ingested": st.readings if st else 0,
            "labels": sum(a.stats.labels for a in fleet.agents) if fleet else 0,
            "urls": self.urls,
            "phases": self.phases,
            "drift": {
                "start_s": None if self.drift_wall is None else round(
                    self.drift_wall - self.t0_wall, 1
                ),
                "gain": {"devices": sorted(gain), "magnitude": GAIN_MAGNITUDE, **kind(gain)},
                "concept": {"devices": sorted(concept), "swap": "walk<->run", **kind(concept)},
                "injected_devices": sorted(injected),
                "detected_devices": detected,
                "missed_devices": sorted(injected - set(detected)),
                "false_alarm_devices": false_alarms,
                "false_alarm_events": [
                    {k: ev.get(k) for k in ("device", "signal", "feature", "detector", "readings")}
                    | {"before_drift": dev in self.det.before_drift}
                    for dev in false_alarms
                    for ev in [self.det.before_drift.get(dev) or self.det.first_after_drift[dev]]
                ],
                "median_delay_readings": _median(list(delays.values())),
                "delay_readings": dict(sorted(delays.items())),
                "detections": st.detections if st else self.det.total,
                "cohort_alarms": self.det.cohort_alarms,
                "threshold": threshold,
            },
            "accuracy": acc,
            "rollouts": self.rollouts,
            "recalibration_refusals": self.refusals,
            "rejected_messages": dict(st.rejections) if st else {},
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
            "error": error,
        }  # fmt: skip
        summary["ok"] = error is None and all(ok for _, ok, _ in self.checks)
        return summary


def run_demo(
    devices: int = 50,
    seed: int = 0,
    console: Console | None = None,
    *,
    show_progress: bool = True,
) -> DemoResult:
    """Run the scenario and return its figures; ``ok`` only if the loop really closed."""
    return DemoRun(
        devices, seed, console or Console(stderr=True), show_progress=show_progress
    ).run()
