"""A device provisioned while its fleet's rollout runs joins it (the wave its id hashes to); a
device born in another fleet, with another parameter schema, or while no rollout takes
newcomers, does not. The real
reconciler on a fake clock and a never-connected client (its manifests go nowhere)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from service.firmware_bundle import Bundle
from service.metrics import ServiceMetrics
from service.registry.store import Registry
from service.rollout.groups import DeviceInfo
from service.rollout.plan import RolloutPlan
from service.rollout.proposals import param_ref
from service.rollout.reconciler import RolloutReconciler

FLEET = "plant"


def wave_devices(reconciler: RolloutReconciler, rid: str) -> int:
    return sum(g["devices"] for g in reconciler.view(rid).groups if g["name"].startswith("wave"))


def test_a_device_born_mid_rollout_joins_a_wave(bundle: Bundle, sqlite_url: str) -> None:
    reg = Registry(sqlite_url)
    schema = bundle.firmware().schema.schema_id_hex
    old = reg.add_parameter_set(
        schema, 1, 0, bundle.firmware().factory_blob, source="factory", status="good"
    )
    new = reg.add_parameter_set(
        schema, 2, 0, bundle.factory_resigned(2), source="resigned", status="candidate"
    )
    t = [1_000.0]
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    reconciler = RolloutReconciler(
        reg, client, bundle.deploy_key, ServiceMetrics(), clock=lambda: t[0]
    )
    reconciler.start()
    try:
        plan = RolloutPlan(
            "r1", FLEET, param_ref(new), param_ref(old), canary_size=2, control_size=1
        )
        reconciler.create(plan, [DeviceInfo(f"d{i}", last_active_ms=i) for i in range(6)], "alice")
        before = wave_devices(reconciler, "r1")
        reconciler.on_birth(FLEET, "d-new", 0, 1, schema)  # awaiting approval: not yet open
        reconciler.flush()
        assert wave_devices(reconciler, "r1") == before
        reconciler.approve("r1", "alice")
        reconciler.on_birth("elsewhere", "d-other", 0, 1, schema)  # another fleet's device
        reconciler.on_birth(FLEET, "d-alien", 0, 1, "ff" * 8)  # another model's parameters
        reconciler.on_birth(FLEET, "d-new", 0, 1, schema)
        reconciler.flush()
        assert wave_devices(reconciler, "r1") == before + 1
        reconciler.on_birth(FLEET, "d-new", 0, 1, schema)  # a reconnect: already a member
        reconciler.flush()
        assert wave_devices(reconciler, "r1") == before + 1
    finally:
        reconciler.stop()
        reg.close()
