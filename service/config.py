"""Service settings: command-line flags over ``TINYDRIFT_*`` environment variables over a TOML
file over defaults, validated with pydantic-settings.

>>> s = ServiceSettings(broker="mqtt://127.0.0.1:1884", db="sqlite:///x.db")
>>> s.broker_host, s.broker_port, s.metrics_port
('127.0.0.1', 1884, 9464)
>>> load_settings(broker="http://x", metrics_port=99999)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
service.config.SettingsError: setting broker: expected mqtt://HOST[:PORT], got 'http://x'; ...
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_agent.wire.errors import WireError
from edge_agent.wire.topics import validate_id


class SettingsError(ValueError):
    """A setting is invalid; the message is one line naming the setting and the problem."""


class FleetNormal(BaseModel):
    """What is normal for a fleet, declared by its operator (``fleet_normal``), in seconds.

    Layer A takes it as a floor on every signal stream's block: a block spans at least one
    ``period_s`` and two ``session_s`` (``service/drift/declared_normal.py``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    period_s: float | None = None
    """A cycle present in normal operation (a daily temperature: 86400; a duty cycle)."""
    session_s: float | None = None
    """The longest normal session or dwell (a user walks for minutes: e.g. 600)."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown key {', '.join(map(repr, unknown))}: a fleet declares period_s "
                    "and/or session_s (seconds)"
                )
        return data

    @field_validator("period_s", "session_s")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0.0):
            raise ValueError(
                f"must be a positive, finite number of seconds (e.g. 86400 for a daily cycle, "
                f"600 for sessions of up to 10 minutes), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _something(self) -> FleetNormal:
        if self.period_s is None and self.session_s is None:
            raise ValueError(
                "declares nothing: give period_s and/or session_s in seconds, or remove the "
                "fleet from fleet_normal"
            )
        return self


class ServiceSettings(BaseSettings):
    """Everything ``tinydrift serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="TINYDRIFT_", extra="forbid")
    config_file: ClassVar[Path | None] = None

    broker: str = "mqtt://127.0.0.1:1883"
    """MQTT broker URL, ``mqtt://HOST[:PORT]``."""
    mqtt_client_id: str = "tinydrift-service"
    """Fixed client id: with a persistent session the broker queues QoS 1 messages meanwhile."""
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    db: str = "sqlite:///tinydrift.db"
    """SQLAlchemy URL of the registry (SQLite default; ``postgresql+psycopg://…`` in production)."""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Port of ``/metrics`` (0: any free port)."""
    metrics_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=0, le=65535)
    """Port of the operator REST API (0: any free port); see ``service/api``."""
    api_host: str = "127.0.0.1"
    fleets: list[str] = Field(default_factory=lambda: ["+"])
    """Fleets to subscribe to (``+``: all)."""
    max_fleets: int = Field(100, ge=1)
    """With ``fleets = +``: most fleets monitored, each admitted when a device is first
    registered in it (a birth, an adoption, the registry at start). Births in further fleets
    are rejected as ``unknown_fleet`` (logged once), and every message on a topic of a fleet not
    monitored is counted under ``fleet="_unknown"``: metric series stay bounded whatever
    fleet names the topics carry. List ``fleets`` to pin the set instead."""
    unknown_devices: Literal["reject", "adopt"] = "reject"
    """Telemetry from a device with no birth: count and drop it, or register it from the frame."""
    queue_size: int = Field(20_000, ge=100)
    """Telemetry messages buffered between the MQTT thread and the batcher; beyond that: shed +
    count (``queue_full``). Control messages (QoS 1 births, Wills, acks, labels) are never shed."""
    control_queue_bytes: int = Field(16 << 20, ge=0)
    """Control messages acknowledged to the broker before the batcher takes them, in bytes;
    beyond that each is acknowledged only when taken, so the broker holds the rest (its
    in-flight window bounds what else waits in the service: ``service/ingest/ingest_queue.py``)."""
    batch_max_messages: int = Field(2_000, ge=1)
    batch_max_wait_s: float = Field(0.05, gt=0, le=5)
    max_payload_bytes: int = Field(65_536, ge=1024)
    window_s: float = Field(60.0, gt=0)
    """Cohort (layer B) window length."""
    checkpoint_interval_s: float = Field(60.0, gt=0)
    reference_readings: int = Field(512, ge=32)
    """Readings per (device, model version) that form the fixed reference of layer A."""
    null_min_blocks: int = Field(48, ge=8)
    """Blocks per batch-means level before layer A takes a stream's null as learnt: an
    independent stream is monitored after 8× this many frames, a dependent one after
    proportionally more (``service/drift/long_run_variance.py``). Lower learns sooner from
    noisier estimates, which the thresholds absorb by being stricter."""
    null_horizon_readings: int | None = Field(None, ge=16)
    """Shortest span of dependence (readings) layer A checks every signal stream for before
    monitoring it: blocks this long must have been seen ``null_min_blocks`` times. Default
    (unset): ``reference_readings``. Lower starts independent streams sooner and may miss a
    slow component of the noise (a slow sensor) until the learning that follows finds it."""
    null_horizon_labels: int = Field(32, ge=1)
    """The same for the labelled error stream, in labels (errors come in sessions too)."""
    fleet_normal: dict[str, FleetNormal] = Field(default_factory=dict)
    """Per fleet, what is normal (``period_s``, ``session_s``): a floor on layer A's blocks
    for that fleet's devices; fleets not listed are learnt from their data alone. In TOML
    ``[fleet_normal.NAME]``, in the environment JSON (``TINYDRIFT_FLEET_NORMAL``); the sources
    merge per fleet and key (environment over file)."""
    false_alarm_budget: float = Field(1e-7, gt=0, lt=1)
    """Fleet-level false drift alarms per device-reading on stationary data."""
    label_cap_per_device: int = Field(2_000, ge=0)
    # updates (service/rollout); without both keys the service only monitors
    release_key: Path | None = None
    """Private release key (``tinydrift keys generate``): signs candidate parameter blobs."""
    deploy_key: Path | None = None
    """Private deploy key: signs the desired-state manifests."""
    update_policy: Literal["off", "propose", "auto"] = "propose"
    """On drift: ``off`` (operator only), ``propose`` (build candidates, wait for approval) or
    ``auto`` (build and start the rollout)."""
    policy_interval_s: float = Field(30.0, gt=0)
    """How often the policy looks for drifting devices to recalibrate."""
    policy_settle_s: float = Field(120.0, ge=0)
    """The set of drifting devices must stay the same this long before the policy proposes
    (devices' alarms come seconds to minutes apart: one rollout for all of them), counted also
    from the end of the fleet's last rollout."""
    rollout_tick_s: float = Field(1.0, gt=0, le=60)
    """How often rollout timers and gates are evaluated."""
    canary_size: int = Field(5, ge=1)
    control_size: int = Field(5, ge=0)
    waves_pct: list[float] = Field(default_factory=lambda: [5.0, 25.0, 100.0])
    min_soak_s: float = Field(1800.0, ge=0)
    """The canary gate is not decided before the canary has soaked this long."""
    max_soak_s: float = Field(4 * 3600.0, gt=0)
    """Still inconclusive after this long: the rollout pauses for the operator."""
    gate_confidence_margin: float = Field(0.05, ge=0, le=1)
    """Largest tolerated drop of the canary's mean confidence vs the control (absolute)."""
    gate_error_margin: float = Field(0.05, ge=0, le=1)
    """Largest tolerated rise of the canary's labelled error rate vs the control (absolute)."""
    gate_max_class_js: float = Field(0.1, ge=0, le=1)
    """Largest tolerated Jensen-Shannon divergence of the canary's class mix vs the control."""
    gate_min_readings: int = Field(500, ge=1)
    gate_min_devices: int = Field(3, ge=1)
    ack_timeout_s: float = Field(900.0, gt=0)
    min_recent_readings: int = Field(128, ge=64)
    """Readings buffered after a drift alarm before the device is recalibrated."""

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        p = urlparse(v)
        if p.scheme != "mqtt" or not p.hostname:
            raise ValueError(f"expected mqtt://HOST[:PORT], got {v!r}")
        try:
            _ = p.port
        except ValueError:
            raise ValueError(f"bad port in {v!r}") from None
        return v

    @field_validator("fleet_normal")
    @classmethod
    def _declared_fleets(
        cls, v: dict[str, FleetNormal], info: ValidationInfo
    ) -> dict[str, FleetNormal]:
        for name in v:
            try:
                validate_id(name)
            except WireError:
                raise ValueError(
                    f"{name!r} is not a fleet id (1-64 characters of A-Z a-z 0-9 _ . -): "
                    "key each declaration by the fleet's name"
                ) from None
        fleets = info.data.get("fleets", ["+"])
        unwatched = sorted(set(v) - set(fleets)) if "+" not in fleets else []
        if unwatched:
            raise ValueError(
                f"declares {', '.join(unwatched)}, which fleets does not subscribe to: add "
                "them to fleets or remove them from fleet_normal"
            )
        return v

    @property
    def broker_host(self) -> str:
        """Host part of :attr:`broker`."""
        return urlparse(self.broker).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        """Port part of :attr:`broker` (1883 by default)."""
        return urlparse(self.broker).port or 1883

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then environment, then the TOML file given with ``--config``."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **flags: Any) -> ServiceSettings:
    """Build settings from flags (``None`` values are ignored), env and ``config_file``.

    Raises :class:`SettingsError` with one line per problem, naming the setting.
    """
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    given = {k: v for k, v in flags.items() if v is not None}
    ServiceSettings.config_file = config_file
    try:
        return ServiceSettings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"setting {where}: {msg}")
        raise SettingsError("; ".join(lines)) from None
    except Exception as exc:  # a malformed TOML file
        raise SettingsError(f"cannot read config file {config_file}: {exc}") from None
    finally:
        ServiceSettings.config_file = None
