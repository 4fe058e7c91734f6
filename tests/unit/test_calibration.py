"""Budget → thresholds: the shipped table, the fit and its conservative inverse, the split."""

from __future__ import annotations

import json
import math

import pytest

from service.drift import calibration as cal
from service.drift.calibration import (
    CalibrationTable,
    RateCurve,
    RatePoint,
    drifting_band,
    load_table,
    simulate_adwin,
    simulate_hddm_a,
    thresholds,
)


def test_shipped_table_loads_and_is_sane():
    tab = load_table()
    assert tab.river_version.startswith("0.26")
    for curve in (tab.adwin_frame, tab.adwin_frame_sensitive, tab.adwin_error):
        assert len(curve.points) >= 4
        assert all(p.alarms >= 20 for p in curve.points)  # every point is measured, not guessed
        assert 1.0 <= curve.b <= 1.6
        rates = [p.rate for p in sorted(curve.points, key=lambda p: p.param)]
        assert rates == sorted(rates)
        for p in curve.points:  # the fit goes through the data within Poisson noise
            assert abs(math.log(curve.rate(p.param) / p.rate)) < 4 / math.sqrt(p.alarms)
    # HDDM_A's bound holds with a wide margin
    assert all(p.rate < p.param / 2 / 10 for p in tab.hddm_a_check)
    again = CalibrationTable.from_json(json.loads(json.dumps(tab.to_json())))
    assert again == tab


def test_other_table_format_is_refused(tmp_path):
    obj = load_table().to_json()
    obj["format"] = 99
    path = tmp_path / "t.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="--write"):
        load_table(path)
    with pytest.raises(FileNotFoundError, match="--write"):
        load_table(tmp_path / "missing.json")


def test_fit_recovers_a_power_law_and_inverts_it():
    pts = [RatePoint(d, 10**9, round(1e9 * 0.002 * d**1.25)) for d in (0.1, 0.01, 0.001)]
    c = RateCurve.fit(pts)
    assert c.b == pytest.approx(1.25, rel=1e-3)
    assert c.a == pytest.approx(0.002, rel=1e-2)
    for d in (0.1, 0.03, 0.001):
        assert c.param_for_rate(c.rate(d)) == pytest.approx(d, rel=1e-9)


def test_extrapolation_below_the_data_uses_unit_slope():
    c = RateCurve.fit([RatePoint(0.1, 10**6, 1000), RatePoint(0.01, 10**7, 500)])
    assert c.b > 1.0
    r0 = c.rate(0.01)
    # 100x below the smallest measured rate: δ 100x smaller (not 100**(1/b)x)
    assert c.param_for_rate(r0 / 100) == pytest.approx(0.01 / 100, rel=1e-9)
    assert c.param_for_rate(r0 / 100) < (r0 / 100 / c.a) ** (1 / c.b)  # more conservative
    with pytest.raises(ValueError, match="positive"):
        c.param_for_rate(0.0)
    with pytest.raises(ValueError, match="two"):
        RateCurve.fit([RatePoint(0.1, 100, 5)])


def test_budget_split_and_monotonicity():
    t = thresholds(n_streams=22, frame_readings=16)
    assert t.n_detectors == 24
    assert t.frame_budget == pytest.approx(1e-7 * 16 / 24)
    assert t.label_budget == pytest.approx(1e-7 / 24)
    assert t.hddm_drift_confidence == pytest.approx(2 * 1e-7 / 24)
    assert t.hddm_warning_confidence == pytest.approx(2e-5)
    tab = load_table()
    assert tab.adwin_frame.rate(t.frame_delta) <= t.frame_budget * (1 + 1e-9)
    # larger frames may spend more per frame; a smaller budget needs a smaller δ
    t64 = thresholds(22, 64)
    tight = thresholds(22, 16, budget_per_device_reading=1e-9)
    assert t64.frame_delta > t.frame_delta > tight.frame_delta
    assert tight.error_delta < t.error_delta
    # more streams: each gets less
    assert thresholds(44, 16).frame_delta < t.frame_delta
    with pytest.raises(ValueError, match="n_streams"):
        thresholds(0, 16)
    with pytest.raises(ValueError, match="positive"):
        thresholds(22, 16, budget_per_device_reading=0.0)


def test_the_sensitive_tier_has_its_own_curve_budget_and_split():
    tab = load_table()
    assert tab.sensitive_settings == cal.SENSITIVE_FRAME_ADWIN
    assert tab.sensitive_settings.min_window_length == 1
    assert tab.frame_settings.min_window_length == 2
    # a shorter minimum window fires more often at the same δ
    assert tab.adwin_frame_sensitive.rate(0.01) > tab.adwin_frame.rate(0.01)
    s = thresholds(22, 16, budget_per_device_reading=1e-4, tier="sensitive")
    assert s.n_detectors == 23  # no HDDM_A
    assert s.frame_budget == pytest.approx(1e-4 * 16 / 23)
    assert s.label_budget == pytest.approx(1e-4 / 23)
    # δ inside the simulated range: no extrapolation for frames of 16
    assert tab.adwin_frame_sensitive.min_param <= s.frame_delta <= 0.1
    assert tab.adwin_frame_sensitive.rate(s.frame_delta) == pytest.approx(
        s.frame_budget / cal.FRAME_MODEL_MARGIN, rel=1e-9
    )
    # the calibrated null rate is the budget (the curves are inverted exactly)
    assert s.null_rate_per_reading == pytest.approx(1e-4, rel=1e-9)
    strict = thresholds(22, 16, budget_per_device_reading=5e-8)
    assert strict.null_rate_per_reading == pytest.approx(5e-8, rel=1e-9)
    assert s.frame_delta > 100 * strict.frame_delta
    with pytest.raises(ValueError, match="tier"):
        thresholds(22, 16, tier="loud")  # type: ignore[arg-type]


def test_rate_bound_inverts_param_for_rate_on_both_sides():
    c = RateCurve.fit([RatePoint(0.1, 10**6, 1000), RatePoint(0.01, 10**7, 500)])
    for r in (c.rate(0.05), c.rate(0.01) / 30):
        assert c.rate_bound(c.param_for_rate(r)) == pytest.approx(r, rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        c.rate_bound(0.0)


def test_both_tiers_must_be_fed_the_same_values():
    obj = load_table().to_json()
    obj["adwin_frame_sensitive"]["detector"]["u_scale"] = 2.0
    with pytest.raises(ValueError, match="same values"):
        CalibrationTable.from_json(obj)


def test_drifting_band_is_the_bonferroni_normal_quantile():
    assert drifting_band(0.05, 1) == pytest.approx(1.959964, abs=1e-6)
    assert drifting_band(1e-3, 23) == pytest.approx(4.088, abs=1e-3)
    assert drifting_band(1e-3, 46) > drifting_band(1e-3, 23)
    with pytest.raises(ValueError, match="alpha"):
        drifting_band(0.0, 3)


def test_a_fresh_simulation_agrees_with_the_shipped_curve():
    tab = load_table()
    pt = simulate_adwin(0.1, 300_000, seed=12345)
    assert pt == simulate_adwin(0.1, 300_000, seed=12345)  # deterministic
    expected = tab.adwin_frame.rate(0.1) * pt.updates
    assert abs(pt.alarms - expected) < 4 * math.sqrt(expected)
    err = simulate_adwin(0.3, 200_000, seed=1, bernoulli_p=0.5)
    expected = tab.adwin_error.rate(0.3) * err.updates
    assert abs(err.alarms - expected) < 4 * math.sqrt(expected)
    h = simulate_hddm_a(0.01, 20_000, seed=1)
    assert h.updates == 20_000
    assert h.rate < 0.005


def test_cli_shows_the_table(capsys):
    assert cal.main([]) == 0
    out = capsys.readouterr().out
    assert "adwin_frame" in out
    assert "adwin_frame_sensitive" in out
    assert "sensitive tier" in out
    assert "δ_frame" in out
