"""Service settings: flags over environment over a TOML file; one-line errors."""

from __future__ import annotations

import pytest

from service.config import SettingsError, load_settings


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
