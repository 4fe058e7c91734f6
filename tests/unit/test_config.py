"""Service settings: flags over environment over a TOML file; one-line errors."""

from __future__ import annotations

import pytest

from service.config import FleetNormal, SettingsError, load_settings


def test_defaults_flags_environment_and_file(tmp_path, monkeypatch):
    cfg = tmp_path / "tinydrift.toml"
    cfg.write_text('broker = "mqtt://10.0.0.1:1884"\nwindow_s = 30.0\nfleets = ["a", "b"]\n')
    s = load_settings(cfg)
    assert (s.broker_host, s.broker_port, s.window_s, s.fleets) == (
        "10.0.0.1",
        1884,
        30.0,
        ["a", "b"],
    )
    monkeypatch.setenv("TINYDRIFT_WINDOW_S", "12")
    monkeypatch.setenv("TINYDRIFT_DB", "sqlite:///env.db")
    s = load_settings(cfg)
    assert (s.window_s, s.db) == (12.0, "sqlite:///env.db")  # environment beats the file
    s = load_settings(cfg, window_s=5.0, db=None)
    assert (s.window_s, s.db) == (5.0, "sqlite:///env.db")  # a flag beats both; None is "not given"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"broker": "http://x:1"}, "setting broker: expected mqtt://HOST[:PORT]"),
        ({"broker": "mqtt://h:99999"}, "setting broker: bad port"),
        ({"metrics_port": -1}, "setting metrics_port"),
        ({"unknown_devices": "maybe"}, "setting unknown_devices"),
        ({"window_s": 0}, "setting window_s"),
        ({"queue_size": 5}, "setting queue_size"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(flags, message):
    with pytest.raises(SettingsError) as info:
        load_settings(**flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_environment_value_and_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYDRIFT_METRICS_PORT", "lots")
    with pytest.raises(SettingsError, match="setting metrics_port"):
        load_settings()
    monkeypatch.delenv("TINYDRIFT_METRICS_PORT")
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("broker = [unclosed\n")
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('brokr = "mqtt://x"\n')
    with pytest.raises(SettingsError, match="brokr"):
        load_settings(unknown)


def test_fleet_normal_from_the_file_and_the_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "tinydrift.toml"
    cfg.write_text(
        "[fleet_normal.walkers]\nsession_s = 600\n\n"
        "[fleet_normal.greenhouse]\nperiod_s = 86400\nsession_s = 1800.5\n"
    )
    s = load_settings(cfg)
    assert s.fleet_normal == {
        "walkers": FleetNormal(session_s=600.0),
        "greenhouse": FleetNormal(period_s=86400.0, session_s=1800.5),
    }
    assert load_settings().fleet_normal == {}  # nothing declared by default
    # the sources merge per fleet and key (pydantic-settings' deep update): env over file
    monkeypatch.setenv(
        "TINYDRIFT_FLEET_NORMAL", '{"press-line": {"period_s": 42}, "walkers": {"period_s": 60}}'
    )
    assert load_settings(cfg).fleet_normal == {
        "walkers": FleetNormal(period_s=60.0, session_s=600.0),
        "greenhouse": FleetNormal(period_s=86400.0, session_s=1800.5),
        "press-line": FleetNormal(period_s=42.0),
    }


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"w": {"period_s": -5}}, "setting fleet_normal.w.period_s: must be a positive, finite "
                                  "number of seconds (e.g. 86400 for a daily cycle"),
        ({"w": {"session_s": 0}}, "setting fleet_normal.w.session_s: must be a positive"),
        ({"w": {"session_s": "nan"}}, "setting fleet_normal.w.session_s: must be a positive"),
        ({"w": {"period_s": float("inf")}}, "setting fleet_normal.w.period_s: must be a positive"),
        ({"w": {}}, "setting fleet_normal.w: declares nothing: give period_s and/or session_s"),
        ({"w": {"period": 60}}, "setting fleet_normal.w: unknown key 'period': a fleet declares "
                                "period_s and/or session_s"),
        ({"a/b": {"period_s": 60}}, "setting fleet_normal: 'a/b' is not a fleet id"),
        ({"w": 60}, "setting fleet_normal.w"),
    ],
)  # fmt: skip
def test_a_bad_fleet_normal_is_one_line_naming_the_fix(declared, message):
    with pytest.raises(SettingsError) as info:
        load_settings(fleet_normal=declared)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_declared_fleet_must_be_watched():
    with pytest.raises(SettingsError, match="setting fleet_normal: declares w, which fleets does "
                                            "not subscribe to: add them to fleets"):  # fmt: skip
        load_settings(fleets=["plant"], fleet_normal={"w": {"session_s": 60}})
    s = load_settings(fleets=["plant", "w"], fleet_normal={"w": {"session_s": 60}})
    assert s.fleet_normal == {"w": FleetNormal(session_s=60.0)}
