"""Closing the loop end to end: real Mosquitto, real simulated devices, SQLite and PostgreSQL.

1. gain drift on some devices → recalibration candidates → canary → gate passes → every drifting
   device confirmed; their labelled accuracy recovers;
2. a deliberately worse candidate (trained on shuffled labels) → the canary does worse →
   automatic rollback; the control is never touched; the set is marked bad;
3. a tampered or wrongly signed blob, and a wrongly signed manifest → every device rejects it
   with its reason; the service counts it; nothing changes on the devices;
4. a device offline during a rollout converges to the final desired state when it reconnects;
5. the service killed mid-rollout resumes from the registry; no device stays in trial;
6. unauthorized API calls change nothing;
7. two fleets with the same device ids, one service: each canary is judged on its own fleet's
   frames, each fleet's devices get only their fleet's manifests (issue 11 item 2);
8. a device whose birth claims the largest ``deploy_seq`` is excluded and reported; the rollout
   goes on without it (issue 11 item 5).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import UTC
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.blob import build_blob, generate_key, verify_blob
from edge_agent.device.fleet import Fleet, FleetConfig, plan_drift
from edge_agent.wire.manifest_signature import sign_manifest
from edge_agent.wire.messages import Capabilities, Manifest, Status
from edge_agent.wire.topics import Leaf, topic
from service.demo import shuffled_label_candidate
from service.embedded_broker import EmbeddedBroker
from service.firmware_bundle import Bundle
from service.registry.store import Registry
from service.rollout.controller import (
    EXHAUSTED,
    MAX_DEPLOY_SEQ,
    PublishManifest,
    RolloutController,
    RolloutState,
)
from tests.integration.polling import wait
from tests.integration.rollout_rig import (
    DesiredLog,
    Rig,
    accuracy,
    running_rig,
    second_fleet,
    seed_registry,
)

pytestmark = pytest.mark.integration
DRIFT_AFTER_S = 20.0
"""Drift starts once layer A is calibrated (``null_min_blocks=16`` at 320 readings/s: 5-15 s)."""


@pytest.fixture
def db(db_url: str, bundle: Bundle) -> str:
    """A fresh registry (SQLite, then PostgreSQL) with the factory parameter set."""
    seed_registry(db_url, bundle)
    return db_url


def scrape(port: int | None) -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(rest.split(" # ")[0].split()[0])
    return total


def register(db_url: str, bundle: Bundle, blob: bytes, version: int, source: str) -> None:
    reg = Registry(db_url)
    try:
        reg.add_parameter_set(
            bundle.firmware().schema.schema_id_hex, version, 0, blob, source=source,
            status="candidate",
        )  # fmt: skip
    finally:
        reg.close()


def factory_resigned(bundle: Bundle, version: int) -> bytes:
    """The factory model signed again as ``version`` (a legitimate, equally good update)."""
    return bundle.factory_resigned(version)


def shuffled_label_blob(bundle: Bundle, version: int) -> bytes:
    """A retrain of the factory model on shuffled labels: deliberately worse, correctly signed."""
    return shuffled_label_candidate(bundle, 0, version)


def fleet_name(request: pytest.FixtureRequest) -> str:
    """A fleet id unique to the test (the session broker keeps other tests' retained state)."""
    backend = "pg" if "postgres" in request.node.name else "sq"
    return f"{request.node.originalname.removeprefix('test_')[:20]}-{backend}".replace("_", "-")


def members(rig: Rig, rollout_id: str) -> tuple[list[str], list[str]]:
    """(devices the rollout updates, control devices) from the controller state."""
    assert rig.service.reconciler is not None
    ctl = rig.service.reconciler.controllers[rollout_id]
    return [d for g in ctl.state.groups for d in g.devices], list(ctl.state.control)


# -------------------------------------------------------------------------------------------
# 1. recalibration


# one backend: the registry's backends are the registry tests' subject (the suite's time)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_gain_drift_is_recalibrated_and_accuracy_recovers(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest
) -> None:
    name = fleet_name(request)
    plan = plan_drift(14, "gain", 0.5, after_s=DRIFT_AFTER_S, seed=3, magnitude=0.6)
    drifting = set(plan)
    with running_rig(
        mosquitto,
        db,
        bundle,
        name,
        devices=14,
        plan=plan,
        update_policy="propose",
        policy_settle_s=10.0,
    ) as rig:
        t_drift = rig.started + DRIFT_AFTER_S
        svc = rig.service
        assert svc.reconciler is not None
        assert svc.operations is not None
        # the policy proposes a recalibration once drifting devices have readings buffered; a
        # device whose alarm came later gets the next proposal: approve until all are updated
        updated: list[str] = []
        rollouts: list[str] = []
        t_update = 0.0
        deadline = time.monotonic() + 120
        while not drifting <= set(updated) and time.monotonic() < deadline:
            wait(
                lambda: any(r.id not in rollouts for r in svc.registry.list_rollouts(fleet=name)),
                60,
                f"a proposed rollout (updated so far: {sorted(updated)})",
            )
            rid = next(r.id for r in svc.registry.list_rollouts(fleet=name) if r.id not in rollouts)
            rollouts.append(rid)
            view = rig.view(rid)
            assert view.status == "AWAITING_APPROVAL"
            assert view.kind == "recalibration"
            ctl = svc.reconciler.controllers[rid]
            new = [d for d, _ in ctl.plan.device_targets]
            assert set(new) <= drifting, "only drifting devices get a recalibration"
            if len(rollouts) == 1:
                proposals = svc.registry.list_audit(action="candidate.propose_recalibration")
                assert ctl.plan.release_control, f"control held back: {proposals[0].details}"
                assert set(ctl.state.control) <= set(new)
            time.sleep(4)  # the operator looks (and the devices' old-version evidence grows)
            t_update = t_update or time.time()
            svc.operations.approve(rid, "test-operator")
            view = rig.wait_status(rid, {"FINISHED", "ROLLED_BACK"}, 90)
            assert view.status == "FINISHED", view.reason
            n_new = len(new)
            wait(lambda r=rid, n=n_new: rig.view(r).summary.confirmed == n, 30, "confirmations")
            updated += new
        assert drifting == set(updated), f"drifting {sorted(drifting)}, updated {sorted(updated)}"
        assert len(rollouts) <= 3
        for rid in rollouts:
            ctl = svc.reconciler.controllers[rid]
            for dev, ref in ctl.plan.device_targets:
                v = ref.version
                wait(lambda d=dev, t=v: rig.active_version(d) == t, 20, f"{dev} on v{v}")
        healthy = {f"dev-{i:04d}" for i in range(14)} - drifting
        for dev in healthy:
            assert rig.active_version(dev) == 1, "healthy devices are not touched"
        view = rig.view(rollouts[0])
        canary = next(g for g in view.groups if g["name"] == "canary")
        assert canary["figures"]["quality_verdict"] == "pass"
        time.sleep(6)  # labelled readings on the new parameters
        svc.writer.flush(10)
        text = scrape(svc.metrics_port)
    assert metric(text, "tinydrift_update_results_total", fleet=name, code="200") >= len(updated)
    assert metric(text, "tinydrift_candidate_runs_total", fleet=name, outcome="accepted") >= len(
        updated
    )
    assert metric(text, "tinydrift_rollouts", fleet=name, state="FINISHED") == len(rollouts)
    devs = set(updated)
    before, n0 = accuracy(db, name, devs, until=t_drift)
    during, n1 = accuracy(db, name, devs, since=t_drift + 1, until=t_update, versions={1})
    after, n2 = accuracy(db, name, devs, exclude_versions={1})
    assert min(n0, n1, n2) >= 50, (n0, n1, n2)
    assert during < before - 0.08, f"the drift should cost accuracy: {before:.3f} → {during:.3f}"
    assert after > during + 0.08, f"accuracy should recover: {during:.3f} → {after:.3f}"
    assert after > before - 0.06, f"recovered to {after:.3f} of {before:.3f}"
    reg = Registry(db)
    try:
        audit = reg.list_audit(actor="test-operator")
        assert any(a.action == "rollout.approve" for a in audit)
        events = reg.list_rollout_events(rollouts[0])
        assert [e.to_state for e in events if e.scope == "rollout"][-1] == "FINISHED"
    finally:
        reg.close()


# -------------------------------------------------------------------------------------------
# 2. a worse candidate is rolled back by the canary gate


def test_worse_candidate_is_rolled_back_by_the_canary(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest
) -> None:
    name = fleet_name(request)
    register(db, bundle, shuffled_label_blob(bundle, 2), 2, "shuffled-labels")
    with running_rig(mosquitto, db, bundle, name, devices=12) as rig:
        svc = rig.service
        assert svc.operations is not None
        rig.wait_references([f"dev-{i:04d}" for i in range(12)])
        proposal = svc.operations.propose(name, "parameter_set", "test-operator", version=2,
                                          auto_approve=True)  # fmt: skip
        assert proposal.rollout is not None
        rid = proposal.rollout.rollout_id
        _, control = members(rig, rid)
        view = rig.wait_status(rid, {"ROLLED_BACK", "FINISHED"}, 90)
        assert view.status == "ROLLED_BACK"
        assert "gate failed in canary" in view.reason
        canary = next(g for g in view.groups if g["name"] == "canary")
        failed = [c["metric"] for c in canary["figures"]["checks"] if c["verdict"] == "fail"]
        assert failed, canary["figures"]
        ctl = svc.reconciler.controllers[rid]  # type: ignore[union-attr]
        touched = set(ctl.state.devices)
        assert not touched & set(control), "control devices never receive a manifest"
        assert touched <= {d for g in ctl.state.groups[:1] for d in g.devices}, "only the canary"
        for dev in touched:
            wait(lambda d=dev: rig.active_version(d) == 1, 30, f"{dev} back on v1")
        for dev in control:
            assert rig.active_version(dev) == 1
        text = scrape(svc.metrics_port)
    assert metric(text, "tinydrift_rollbacks_total", fleet=name, cause="gate") == 1
    reg = Registry(db)
    try:
        assert reg.get_parameter_set(bundle.firmware().schema.schema_id_hex, 2).status == "bad"
        assert any(a.action == "rollout.transition" for a in reg.list_audit(limit=1000))
    finally:
        reg.close()


# -------------------------------------------------------------------------------------------
# 3. tampered and wrongly signed updates


def test_tampered_or_wrongly_signed_updates_are_rejected(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest
) -> None:
    name = fleet_name(request)
    good = factory_resigned(bundle, 2)
    tampered = bytearray(good)
    tampered[100] ^= 0x01  # a signature byte: header and payload intact, signature wrong
    register(db, bundle, bytes(tampered), 2, "tampered")
    corrupt = bytearray(factory_resigned(bundle, 4))
    corrupt[-5] ^= 0x01  # a payload byte: the payload no longer matches the signed header
    register(db, bundle, bytes(corrupt), 4, "corrupt")
    params = verify_blob(good, trusted=None, schema_id=None).params
    foreign = build_blob(params, param_version=3, security_epoch=0, key=generate_key())
    register(db, bundle, foreign, 3, "foreign-key")
    with running_rig(mosquitto, db, bundle, name, devices=8) as rig:
        svc = rig.service
        assert svc.operations is not None
        devices = [f"dev-{i:04d}" for i in range(8)]
        rig.wait_references(devices)
        with pytest.raises(ValueError, match="corrupt or tampered"):
            svc.operations.propose(name, "parameter_set", "test-operator", version=4)
        for version, reason in ((2, "bad_signature"), (3, "unknown_key")):
            p = svc.operations.propose(name, "parameter_set", "test-operator", version=version,
                                       auto_approve=True)  # fmt: skip
            assert p.rollout is not None
            view = rig.wait_status(p.rollout.rollout_id, {"ROLLED_BACK", "FINISHED"}, 60)
            assert view.status == "ROLLED_BACK", view.reason
            ctl = svc.reconciler.controllers[p.rollout.rollout_id]  # type: ignore[union-attr]
            reasons = {pr.reason for pr in ctl.state.devices.values() if pr.phase == "forward"}
            assert reasons == {reason} or reason in reasons, reasons
            text = scrape(svc.metrics_port)
            assert metric(text, "tinydrift_update_results_total", fleet=name, code="400",
                          reason=reason) >= 1  # fmt: skip
        # a manifest signed with a key the devices do not trust
        victim = devices[-1]
        rogue = sign_manifest(
            Manifest.create(
                fleet=name,
                device=victim,
                deploy_seq=10_000,
                action="install",
                param={
                    "version": 2, "schema_id": bundle.firmware().schema.schema_id_hex,
                    "security_epoch": 0, "blob_len": len(good),
                    "blob_sha256": verify_blob(good, trusted=None, schema_id=None).sha256,
                    "key_id": next(iter(bundle.firmware().release_keys)),
                },
                trial={"confirm": "local", "timeout_s": 60, "min_inferences": 0},
                issued_ms=int(time.time() * 1000),
            ),
            generate_key(),
        )  # fmt: skip
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"x-{name}")
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        pub.publish(topic(name, victim, Leaf.DESIRED), rogue.to_json(), 1, True).wait_for_publish(5)

        def counted() -> float:
            return metric(scrape(svc.metrics_port), "tinydrift_update_acks_total", fleet=name,
                          state="REJECTED")  # fmt: skip

        before = counted()
        wait(lambda: counted() > before, 30, "the rogue manifest's rejection ack")
        pub.publish(topic(name, victim, Leaf.DESIRED), b"", 1, True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        for dev in devices:
            assert rig.active_version(dev) == 1, "nothing changed on the devices"


# -------------------------------------------------------------------------------------------
# 4. a device offline during the rollout


# one backend: the registry's backends are the registry tests' subject (the suite's time)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_offline_device_converges_when_it_reconnects(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    name = fleet_name(request)
    register(db, bundle, factory_resigned(bundle, 2), 2, "resigned")
    late = "dev-0010"
    late_fleet = Fleet(
        FleetConfig(fleet=name, devices=1, host=mosquitto.host, port=mosquitto.port, seed=3,
                    batch=16, period_s=0.05, label_rate=0.1, state_dir=tmp_path / "late",
                    first_index=10),
        bundle.firmware(),
        {},
    )  # fmt: skip
    # the subject is convergence, not the gate's power (see the restart test): a wide margin
    # and a canary that is still inconclusive after 60 s soaks on instead of pausing
    with running_rig(
        mosquitto, db, bundle, name, devices=10, gate_error_margin=0.2, max_soak_s=150.0
    ) as rig:
        svc = rig.service
        assert svc.operations is not None
        late_fleet.start()
        rig.wait_references([f"dev-{i:04d}" for i in range(11)])
        late_fleet.stop()  # clean disconnect: offline, state kept on its storage
        wait(lambda: not svc.directory.get(name, late).online, 10, f"{late} offline")
        p = svc.operations.propose(name, "parameter_set", "test-operator", version=2,
                                   auto_approve=True)  # fmt: skip
        assert p.rollout is not None
        rid = p.rollout.rollout_id
        updated, control = members(rig, rid)
        assert late in updated, "the offline device is a member of a wave"
        assert late not in control
        # canary passes, the wave starts; every online member reaches trial, the late one not
        wait(lambda: rig.view(rid).groups[1]["status"] in ("RUNNING", "SOAKING"), 160, "wave-1")
        time.sleep(2)
        assert svc.reconciler is not None
        prog = svc.reconciler.controllers[rid].state.devices[late]
        assert prog.status.value == "PENDING"
        # it comes back: the retained manifest takes it to the final state in one step
        back = Fleet(
            FleetConfig(fleet=name, devices=1, host=mosquitto.host, port=mosquitto.port, seed=3,
                        batch=16, period_s=0.05, label_rate=0.1, state_dir=tmp_path / "late",
                        first_index=10),
            bundle.firmware(),
            {},
        )  # fmt: skip
        back.start()
        try:
            view = rig.wait_status(rid, {"FINISHED", "ROLLED_BACK"}, 90)
            assert view.status == "FINISHED", view.reason
            wait(lambda: rig.active_version(late) == 2, 20, f"{late} on v2")
            prog = svc.reconciler.controllers[rid].state.devices[late]
            wait(lambda: prog.status.value == "CONFIRMED", 20, f"{late} confirmed")
            assert prog.deploy_seq == prog.first_seq + 1, "install then confirm: no extra steps"
        finally:
            back.stop()


# -------------------------------------------------------------------------------------------
# 5. the service restarts mid-rollout


def test_rollout_resumes_after_a_service_restart(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    name = fleet_name(request)
    register(db, bundle, factory_resigned(bundle, 2), 2, "resigned")
    state = tmp_path / "devices"
    # the subject is resuming, not the gate's power: an identical model's labelled error moves
    # with the devices' activities over a few seconds, so the margin is wide here
    gate = {"min_soak_s": 8.0, "gate_error_margin": 0.2}
    with running_rig(mosquitto, db, bundle, name, devices=10, state_dir=state, **gate) as rig:
        svc = rig.service
        assert svc.operations is not None
        rig.wait_references([f"dev-{i:04d}" for i in range(10)])
        p = svc.operations.propose(name, "parameter_set", "test-operator", version=2,
                                   auto_approve=True)  # fmt: skip
        assert p.rollout is not None
        rid = p.rollout.rollout_id
        wait(lambda: rig.view(rid).summary.in_trial >= 2, 60, "the canary in trial")

        def canary_status() -> str:
            return str(next(g for g in rig.view(rid).groups if g["name"] == "canary")["status"])

        wait(lambda: canary_status() == "SOAKING", 60, "the canary soaking")

        def stored_canary_soaking() -> bool:  # the state is stored on the reconciler's tick
            with Registry(db) as reg:
                rec = reg.get_rollout(rid)
            if rec is None:
                return False
            groups = RolloutState.from_json(rec.state_json).groups
            return next(g for g in groups if g.name == "canary").status.value == "SOAKING"

        wait(stored_canary_soaking, 30, "the canary's soak stored")
        # kill the service while the canary soaks (devices keep running, in trial)
        svc.stop()
        time.sleep(2)
        reg = Registry(db)
        stored = reg.get_rollout(rid)
        reg.close()
        assert stored is not None
        assert stored.state == "RUNNING"
        from service.serve import Service
        from tests.integration.rollout_rig import rig_settings

        svc2 = Service(rig_settings(mosquitto, db, bundle, name, **gate))
        restarted = time.time()
        svc2.start()
        try:
            assert svc2.reconciler is not None
            assert rid in svc2.reconciler.controllers, "restored from the registry"
            rig.service = svc2
            view = rig.wait_status(rid, {"FINISHED", "ROLLED_BACK"}, 90)
            assert view.status == "FINISHED", view.reason
            ctl = svc2.reconciler.controllers[rid]

            def stuck() -> list[str]:
                return [d for d, pr in ctl.state.devices.items() if pr.status.value == "TRIAL"]

            wait(lambda: not stuck(), 30, "every device out of trial")
            assert rig.view(rid).summary.confirmed == len(ctl.state.devices)
            # the canary's evidence went with the old process: its soak started over, and it
            # passed no sooner than a whole soak after the restart (issue 11 item 8)
            assert svc2.writer.flush(30)
            reg = Registry(db)
            try:
                audit = [a for a in reg.list_audit(limit=1000) if a.target == f"rollout:{rid}"]
            finally:
                reg.close()
            soak = [a for a in audit if a.action == "rollout.soak_restarted"]
            assert [a.details["group"] for a in soak if a.details] == ["canary"], audit
            assert soak[0].details is not None
            assert soak[0].details["restarted_ms"] >= restarted * 1000
            passed = [
                (a.ts if a.ts.tzinfo else a.ts.replace(tzinfo=UTC)).timestamp()
                for a in audit
                if a.action == "rollout.group_transition"
                and a.details
                and a.details["group"] == "canary"
                and a.details["to"] == "PASSED"
            ]
            assert passed, audit
            assert passed[0] >= restarted + gate["min_soak_s"], (passed, restarted)
        finally:
            svc2.stop()
            rig.service = svc  # the rig stops the first one again: idempotent


# -------------------------------------------------------------------------------------------
# 6. unauthorized API calls change nothing


def _post(port: int | None, path: str, token: str | None, body: bytes = b"{}") -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_unauthorized_api_calls_change_nothing(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest
) -> None:
    name = fleet_name(request)
    register(db, bundle, factory_resigned(bundle, 2), 2, "resigned")
    with running_rig(mosquitto, db, bundle, name, devices=8) as rig:
        svc = rig.service
        _, viewer = svc.registry.create_token("viewer-1", "viewer")
        _, operator = svc.registry.create_token("operator-1", "operator")
        rig.wait_references([f"dev-{i:04d}" for i in range(8)])
        port = svc.api_port
        body = json.dumps({"fleet": name, "kind": "parameter_set", "version": 2}).encode()
        assert _post(port, "/candidates", None, body) == 401
        assert _post(port, "/candidates", "not-a-token", body) == 401
        assert _post(port, "/candidates", viewer, body) == 403
        assert svc.registry.list_rollouts(fleet=name) == [], "no proposal was made"
        assert _post(port, "/candidates", operator, body) == 200
        rid = svc.registry.list_rollouts(fleet=name)[0].id
        audit_before = len(svc.registry.list_audit(limit=10_000))
        events_before = len(svc.registry.list_rollout_events(rid))
        for path in ("approve", "pause", "resume", "rollback"):
            assert _post(port, f"/rollouts/{rid}/{path}", None) == 401
            assert _post(port, f"/rollouts/{rid}/{path}", viewer) == 403
        assert rig.view(rid).status == "AWAITING_APPROVAL"
        assert len(svc.registry.list_audit(limit=10_000)) == audit_before
        assert len(svc.registry.list_rollout_events(rid)) == events_before
        ctl = svc.reconciler.controllers[rid]  # type: ignore[union-attr]
        assert not ctl.state.devices, "no device was sent anything"
        assert _post(port, f"/rollouts/{rid}/approve", operator) == 200
        assert rig.view(rid).status == "RUNNING"
        assert any(
            a.actor == "operator-1" and a.action == "rollout.approve"
            for a in svc.registry.list_audit(limit=10_000)
        )


# -------------------------------------------------------------------------------------------
# 7. two fleets with the same device ids


def _get(port: int | None, path: str, token: str) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _group_figures(rig: Rig, rollout_id: str, group: str) -> dict[str, Any]:
    figures = next(g for g in rig.view(rollout_id).groups if g["name"] == group)["figures"]
    assert figures is not None
    assert figures["quality"] is not None, figures
    quality: dict[str, Any] = figures["quality"]
    return quality


# one backend: what this tests is the service's keying, not the registry's (the suite's time)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fleets_sharing_device_ids_are_judged_on_their_own_frames(
    mosquitto: EmbeddedBroker, bundle: Bundle, db: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    a = fleet_name(request)
    b = f"{a}-b"
    ids = [f"dev-{i:04d}" for i in range(12)]
    register(db, bundle, shuffled_label_blob(bundle, 2), 2, "shuffled-labels")
    register(db, bundle, factory_resigned(bundle, 3), 3, "resigned")
    # fleet A labels one reading in ten, fleet B (the same device ids) none: a label in B's gate
    # figures is another fleet's. A wide error margin: A's bad update fails by ~0.8 regardless.
    with (
        running_rig(mosquitto, db, bundle, a, fleets=[a, b], gate_error_margin=0.2) as rig,
        second_fleet(mosquitto, bundle, b, tmp_path / "b", seed=11, label_rate=0.0),
    ):
        svc = rig.service
        ops, rec = svc.operations, svc.reconciler
        assert ops is not None
        assert rec is not None
        desired = DesiredLog(mosquitto, [a, b], f"desired-{a}")
        try:
            rig.wait_references(ids)
            rig.wait_references(ids, fleet=b)
            infos = [svc.directory.get(f, d) for f in (a, b) for d in ids]
            assert all(i is not None and i.online for i in infos), "24 devices, each online"
            # A's bad candidate waits for approval (its devices are watched from now on) while
            # B's good one runs, canary to the last wave, on the same device ids
            pa = ops.propose(a, "parameter_set", "test-operator", version=2)
            pb = ops.propose(b, "parameter_set", "test-operator", version=3, auto_approve=True)
            assert pa.rollout is not None
            assert pb.rollout is not None
            ra, rb = pa.rollout.rollout_id, pb.rollout.rollout_id
            vb = rig.wait_status(rb, {"FINISHED", "ROLLED_BACK", "PAUSED"}, 120)
            qb = _group_figures(rig, rb, "canary")
            # B's arms counted B's frames only (A's devices of the same ids run v1 too, labelled)
            assert qb["control"]["labelled"] == 0, qb
            assert qb["canary"]["labelled"] == 0, qb
            assert qb["paired_devices"] == 0, qb
            assert vb.status == "FINISHED", vb.reason
            updated_b, control_b = members(rig, rb)
            assert qb["canary"]["devices"] == 3
            assert qb["control"]["devices"] == len(control_b)
            for dev in updated_b:
                wait(lambda d=dev: rig.active_version(d, b) == 3, 30, f"{b}/{dev} on v3")
            assert all(rig.active_version(d) == 1 for d in ids), "fleet A is untouched"

            # A's canary starts only now, after B's rollout ended and stopped watching B's devices
            ops.approve(ra, "test-operator")
            va = rig.wait_status(ra, {"FINISHED", "ROLLED_BACK", "PAUSED"}, 120)
            assert va.status == "ROLLED_BACK", va.reason
            assert "gate failed in canary" in va.reason
            qa = _group_figures(rig, ra, "canary")
            _, control_a = members(rig, ra)
            assert qa["canary"]["devices"] == 3
            assert qa["control"]["devices"] == len(control_a)
            assert qa["paired_devices"] == 3, qa
            touched_a = set(rec.controllers[ra].state.devices)
            canary_a = set(rec.controllers[ra].state.groups[0].devices)
            assert touched_a <= canary_a, "only A's canary got A's update"
            for dev in touched_a:
                wait(lambda d=dev: rig.active_version(d) == 1, 30, f"{a}/{dev} back on v1")
            assert all(rig.active_version(d, b) == 3 for d in updated_b), "B keeps its update"

            # each fleet's devices got their own fleet's manifests, nothing of the other's
            touched_b = set(rec.controllers[rb].state.devices)
            wait(lambda: set(desired.of(a)) == touched_a, 30, f"{a}'s manifests")
            wait(lambda: set(desired.of(b)) == touched_b, 30, f"{b}'s manifests")
            assert touched_b == set(updated_b)
            versions_a = {m.param.version for ms in desired.of(a).values() for m in ms}
            versions_b = {m.param.version for ms in desired.of(b).values() for m in ms}
            assert versions_a <= {1, 2}, versions_a
            assert versions_b == {3}, versions_b

            # per-device views are distinct per fleet: directory, layer A, API
            mons = svc.engine.monitors
            assert all(mons[(a, d)] is not mons[(b, d)] for d in ids)
            _, viewer = svc.registry.create_token("viewer-1", "viewer")
            port = svc.api_port
            for fleet in (a, b):
                page = _get(port, f"/fleets/{fleet}/devices", viewer)
                assert page["total"] == len(ids)
                assert {d["device"] for d in page["items"]} == set(ids)
                assert {d["fleet"] for d in page["items"]} == {fleet}
            # an id that ran v2 in A (back on v1 now) and v3 in B, if there is one
            target = min(touched_a & set(updated_b) or set(updated_b))

            def shown() -> tuple[int, int]:
                return tuple(  # type: ignore[return-value]
                    _get(port, f"/devices/{f}/{target}", viewer)["model_version"] for f in (a, b)
                )

            wait(lambda: shown() == (1, 3), 30, f"the API showing {target} on v1 in A, v3 in B")
            text = scrape(svc.metrics_port)
        finally:
            desired.close()
    assert metric(text, "tinydrift_rollbacks_total", fleet=a, cause="gate") == 1
    assert metric(text, "tinydrift_rollbacks_total", fleet=b) == 0
    assert metric(text, "tinydrift_rollouts", fleet=b, state="FINISHED") == 1
    assert metric(text, "tinydrift_rollouts", fleet=a, state="ROLLED_BACK") == 1


# -------------------------------------------------------------------------------------------
# 8. a device that can take no larger deploy_seq


# one backend: what this tests is the service's keying, not the registry's (the suite's time)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_device_that_can_take_no_update_is_excluded_not_blocking(
    mosquitto: EmbeddedBroker,
    bundle: Bundle,
    db: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = fleet_name(request)
    register(db, bundle, factory_resigned(bundle, 2), 2, "resigned")
    devices = [f"dev-{i:04d}" for i in range(10)]
    stuck = "dev-0099"
    fw = bundle.firmware()

    def birth() -> bytes:
        return Status.create(
            online=True, fw=fw.name, schema_id=fw.schema.schema_id_hex, active_version=1,
            update_state="IDLE", last_deploy_seq=MAX_DEPLOY_SEQ, epoch_floor=0, boot=1,
            ts_ms=int(time.time() * 1000),
            caps=Capabilities(max_chunk=fw.max_chunk, telemetry=("bin",), labels=False),
        ).to_json()  # fmt: skip

    caplog.set_level(logging.WARNING, logger="service.rollout.reconciler")
    # the subject is exclusion, not the gate's power: a wide margin (see the restart test)
    with running_rig(
        mosquitto, db, bundle, name, devices=10, gate_error_margin=0.2, max_soak_s=150.0
    ) as rig:
        svc = rig.service
        assert svc.operations is not None
        assert svc.reconciler is not None
        status_topic = topic(name, stuck, Leaf.STATUS)
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"x-{name}")
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        desired = DesiredLog(mosquitto, [name], f"desired-{name}")
        try:
            # its birth, then its clean disconnect: a member of the fleet, offline, so it is
            # drawn neither for the canary nor for the control but for the wave
            pub.publish(status_topic, birth(), 1, True).wait_for_publish(5)
            wait(lambda: (i := svc.directory.get(name, stuck)) is not None and i.online, 10,
                 f"{stuck}'s birth")  # fmt: skip
            pub.publish(status_topic, Status.will().to_json(), 1, True).wait_for_publish(5)
            wait(lambda: not svc.directory.get(name, stuck).online, 10, f"{stuck} offline")  # type: ignore[union-attr]
            rig.wait_references(devices)
            p = svc.operations.propose(name, "parameter_set", "test-operator", version=2,
                                       auto_approve=True)  # fmt: skip
            assert p.rollout is not None
            rid = p.rollout.rollout_id
            updated, control = members(rig, rid)
            assert stuck in updated
            assert stuck not in control
            ctl = svc.reconciler.controllers[rid]
            assert stuck not in ctl.state.groups[0].devices, "not the canary"

            def excluded() -> list[Any]:
                return svc.registry.list_audit(action="rollout.device_excluded", limit=100)

            wait(lambda: excluded(), 120, f"{stuck} excluded when its wave starts")
            # it comes back, still claiming the largest deploy_seq: nothing is sent to it
            pub.publish(status_topic, birth(), 1, True).wait_for_publish(5)
            view = rig.wait_status(rid, {"FINISHED", "ROLLED_BACK", "PAUSED"}, 120)
            assert view.status == "FINISHED", view.reason
            others = [d for d in updated if d != stuck]
            wait(lambda: rig.view(rid).summary.confirmed == len(others), 30, "confirmations")
            for dev in others:
                wait(lambda d=dev: rig.active_version(d) == 2, 20, f"{dev} on v2")
            wait(lambda: set(desired.of(name)) == set(others), 30, "the others' manifests")
            assert stuck not in desired.of(name), "no manifest for the excluded device"
            prog = ctl.state.devices[stuck]
            assert (prog.status.value, prog.reason, prog.intent) == ("FAILED", EXHAUSTED, "none")
            svc.reconciler.flush()
            text = scrape(svc.metrics_port)
        finally:
            desired.close()
            pub.publish(status_topic, b"", 1, True).wait_for_publish(5)  # clear its retained birth
            pub.loop_stop()
            pub.disconnect()
    assert metric(text, "tinydrift_update_results_total", fleet=name, code="409",
                  reason=EXHAUSTED) == 1  # fmt: skip
    assert metric(text, "tinydrift_update_results_total", fleet=name, code="200") == len(others)
    lines = [r.getMessage() for r in caplog.records if "excluded" in r.getMessage()]
    assert len(lines) == 1, lines
    assert stuck in lines[0], lines
    assert str(MAX_DEPLOY_SEQ) in lines[0], lines
    reg = Registry(db)
    try:
        [entry] = reg.list_audit(action="rollout.device_excluded", limit=100)
        assert entry.target == f"rollout:{rid}"
        assert entry.details == {
            "device": stuck, "reason": EXHAUSTED, "last_deploy_seq": MAX_DEPLOY_SEQ,
        }  # fmt: skip
        # what is stored is a state the service can act on: finished, every intent within u32,
        # and a restart of it publishes nothing
        stored = reg.get_rollout(rid)
        assert stored is not None
        assert stored.state == "FINISHED"
        state = json.loads(stored.state_json)
        assert all(d["deploy_seq"] <= MAX_DEPLOY_SEQ for d in state["devices"].values())
        assert state["devices"][stuck]["deploy_seq"] == 0, "never issued"
        restored, actions = RolloutController.restore(stored.state_json, int(time.time() * 1000))
        actions += restored.resync(int(time.time() * 1000))
        assert not [a for a in actions if isinstance(a, PublishManifest)]
    finally:
        reg.close()
