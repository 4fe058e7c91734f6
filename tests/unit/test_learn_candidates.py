"""Candidates from the real simulator and factory model: recalibration, retrain, the gate."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy.stats import binom

import service.learn.candidate as candidate_mod
from edge_agent.blob import trusted_keys, verify_blob
from edge_agent.device.simulator import DriftSpec, SensorSimulator, window_times
from service.firmware_bundle import Bundle
from service.learn.candidate import (
    GateConfig,
    build_candidate,
    quantization_disagreement_test,
    register_candidate,
)
from service.learn.comparison import float_predict
from service.learn.deployed import DeployedModel
from service.learn.recalibration import (
    RecalibrationCandidate,
    RecalibrationError,
    fit_affine,
    recalibrate,
)
from service.learn.retrain import RetrainConfig, RetrainError, pipeline_from_float, retrain
from service.learn.river_export import export_linear
from service.registry.store import Registry

N = 3072  # readings per device: reference 0..511, drift from 1024, fit 1024..2047, judge 2048..


@pytest.fixture(scope="module")
def deployed(bundle: Bundle) -> DeployedModel:
    return DeployedModel.from_blob(
        (bundle.firmware_dir / "factory.blob").read_bytes(),
        trusted=trusted_keys([bundle.release_key.public]),
    )


def _stream(seed: int, drift: DriftSpec | None) -> tuple[np.ndarray, np.ndarray]:
    s = SensorSimulator(seed=seed, drift=drift).sample(N, t=window_times(N))
    return s.features, s.labels


def _acc(dep_or_params: object, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(dep_or_params.predict(x) == y))  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [11, 14])
def test_gain_drift_recalibration_restores_accuracy(
    deployed: DeployedModel, bundle: Bundle, seed: int
) -> None:
    x, y = _stream(seed, DriftSpec("gain", start_s=2.0 * 1024))
    x_clean, y_clean = _stream(seed, None)
    reference = (x[:512].mean(axis=0), x[:512].std(axis=0))
    before = _acc(deployed, x_clean[2048:], y_clean[2048:])
    drifted = _acc(deployed, x[2048:], y[2048:])
    cand = recalibrate(deployed, reference, x[1024:2048], device="d1")
    after = _acc(cand.params.model, x[2048:], y[2048:])
    assert drifted < before - 0.05  # the drift hurts
    assert after >= before - 0.02, (before, drifted, after)
    # only the input normalisation changed
    assert np.array_equal(cand.params.model.weights, deployed.params.model.weights)
    assert np.array_equal(cand.params.model.bias, deployed.params.model.bias)
    assert not np.array_equal(cand.params.model.mu, deployed.params.model.mu)
    assert cand.diagnostics.readings == 1024
    assert 1.2 < cand.diagnostics.gain[0] < 1.4

    result = build_candidate(
        deployed, cand, key=bundle.release_key, param_version=2, recent=x[1024:2048]
    )
    assert result.report.decision == "accepted", result.report.reason
    assert result.report.kind == "recalibration"
    assert result.report.labels_used == 0
    assert result.blob is not None
    v = verify_blob(
        result.blob,
        trusted=trusted_keys([bundle.release_key.public]),
        schema_id=deployed.params.schema.schema_id,
    )
    assert v.header.param_version == 2
    assert v.header.security_epoch == deployed.security_epoch
    v.run_known_answers()
    # labelled judgement of the same candidate (labels from the simulator)
    labelled = build_candidate(
        deployed, cand, key=bundle.release_key, param_version=2, labelled=(x[2048:], y[2048:])
    )
    assert labelled.report.decision == "accepted"
    assert labelled.report.candidate_fixed_accuracy == pytest.approx(after)


def test_no_drift_recalibration_is_identity(deployed: DeployedModel) -> None:
    x, _ = _stream(12, None)
    cand = recalibrate(deployed, (x[:512].mean(axis=0), x[:512].std(axis=0)), x[1024:2048])
    assert cand.diagnostics.gain == (1.0,) * 8
    assert cand.diagnostics.offset == (0.0,) * 8
    assert cand.diagnostics.changed_predictions == 0.0


def test_concept_change_retrain_is_accepted(deployed: DeployedModel, bundle: Bundle) -> None:
    x, y = _stream(21, DriftSpec("concept", start_s=0.0))
    cand = retrain(deployed, x[:2000], y[:2000])
    assert cand.train_n == 1500
    assert len(cand.holdout_y) == 500
    assert cand.prequential.candidate_accuracy > cand.prequential.deployed_accuracy + 0.15
    result = build_candidate(deployed, cand, key=bundle.release_key, param_version=5)
    r = result.report
    assert r.decision == "accepted", r.reason
    assert r.candidate_fixed_accuracy is not None
    assert r.deployed_accuracy is not None
    assert r.candidate_fixed_accuracy > r.deployed_accuracy + 0.15
    assert r.agreement > 0.97
    assert r.quantization_loss_pp <= 1.0
    assert r.prequential_candidate_accuracy == cand.prequential.candidate_accuracy
    # fresh readings of the same device: the candidate generalises
    assert _acc(cand.params.model, x[2000:], y[2000:]) > _acc(deployed, x[2000:], y[2000:]) + 0.15


def test_shuffled_labels_candidate_is_refused(deployed: DeployedModel, bundle: Bundle) -> None:
    x, y = _stream(22, None)
    y_shuffled = np.random.default_rng(0).permutation(y[:1500])
    cand = retrain(deployed, x[:1500], y_shuffled, holdout=(x[1500:2000], y[1500:2000]))
    result = build_candidate(deployed, cand, key=bundle.release_key, param_version=3)
    assert result.blob is None
    assert result.report.decision == "refused"
    assert "worse than deployed" in result.report.reason
    assert result.report.p_worse is not None
    assert result.report.p_worse < 1e-6


def test_quantization_loss_refused(deployed: DeployedModel, bundle: Bundle) -> None:
    x, y = _stream(23, DriftSpec("concept", start_s=0.0))
    cand = retrain(deployed, x[:1200], y[:1200])
    gate = GateConfig(max_quantization_loss_pp=-1.0)  # nothing can pass
    result = build_candidate(deployed, cand, key=bundle.release_key, param_version=3, gate=gate)
    assert result.blob is None
    assert "quantization costs" in result.report.reason


# ---- the label-free quantization check: a one-sided exact binomial test -------------------

RECENT = 256  # readings buffered per drifting device (RecentReadings' capacity)


def test_disagreement_test_figures_and_boundary() -> None:
    """256 readings, 1 pp allowed, alpha 0.01: 7 disagreements pass, 8 are refused."""
    t3 = quantization_disagreement_test(3, RECENT, 1.0, 0.01)
    assert round(t3.observed_pp, 2) == 1.17  # over 1 pp raw, which the old rule refused
    assert t3.p_value == pytest.approx(binom.sf(2, RECENT, 0.01))  # P(X >= 3) = 0.472
    assert t3.p_value == pytest.approx(0.4722, abs=1e-4)
    assert not t3.exceeds
    t7 = quantization_disagreement_test(7, RECENT, 1.0, 0.01)
    t8 = quantization_disagreement_test(8, RECENT, 1.0, 0.01)
    assert t7.p_value == pytest.approx(binom.sf(6, RECENT, 0.01))
    assert t8.p_value == pytest.approx(binom.sf(7, RECENT, 0.01))
    assert t7.p_value == pytest.approx(0.01541, abs=1e-5)
    assert t8.p_value == pytest.approx(0.00463, abs=1e-5)
    assert (t7.exceeds, t8.exceeds) == (False, True)
    # the Clopper-Pearson lower bound crosses 1 pp between the same counts (test/CI duality)
    assert t7.lower_bound_pp < 1.0 < t8.lower_bound_pp
    for k in range(RECENT + 1):
        t = quantization_disagreement_test(k, RECENT, 1.0, 0.01)
        assert t.exceeds == (k >= 8) == (t.lower_bound_pp > 1.0), k
    t20 = quantization_disagreement_test(20, RECENT, 1.0, 0.01)
    assert t20.exceeds
    assert t20.p_value < 1e-8
    # the significance is the configured one: at 0.05 the boundary is 5 | 6
    assert [quantization_disagreement_test(k, RECENT, 1.0, 0.05).exceeds for k in (5, 6)] == [
        False,
        True,
    ]
    assert quantization_disagreement_test(0, RECENT, 0.0, 0.01).exceeds is False
    assert quantization_disagreement_test(1, RECENT, 0.0, 0.01).exceeds is True


def test_disagreement_test_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no readings"):
        quantization_disagreement_test(0, 0, 1.0, 0.01)
    with pytest.raises(ValueError, match="disagreements"):
        quantization_disagreement_test(257, RECENT, 1.0, 0.01)
    with pytest.raises(ValueError, match="not a rate"):
        quantization_disagreement_test(1, RECENT, -1.0, 0.01)
    with pytest.raises(ValueError, match="significance"):
        quantization_disagreement_test(1, RECENT, 1.0, 0.0)


@pytest.fixture(scope="module")
def recal_256(deployed: DeployedModel) -> tuple[RecalibrationCandidate, np.ndarray]:
    """A real gain-drift recalibration fitted on 256 readings, and those readings."""
    x, _ = _stream(11, DriftSpec("gain", start_s=2.0 * 1024))
    recent = x[1024 : 1024 + RECENT]
    return recalibrate(deployed, (x[:512].mean(axis=0), x[:512].std(axis=0)), recent), recent


def _with_disagreements(
    monkeypatch: pytest.MonkeyPatch,
    cand: RecalibrationCandidate,
    recent: np.ndarray,
    mask: npt.NDArray[np.bool_],
) -> None:
    """Make the fixed-point predictions differ from the float ones exactly where ``mask`` is."""
    fl = float_predict(cand.float_model, recent)
    fx = np.where(mask, fl + 1, fl)

    def both(*_args: object) -> tuple[np.ndarray, np.ndarray]:
        return fl, fx

    monkeypatch.setattr(candidate_mod, "_predict_both", both)


@pytest.mark.parametrize(
    ("disagreements", "decision"),
    [(0, "accepted"), (3, "accepted"), (7, "accepted"), (8, "refused"), (20, "refused")],
)
def test_label_free_recalibration_is_judged_by_the_binomial_test(
    deployed: DeployedModel,
    bundle: Bundle,
    recal_256: tuple[RecalibrationCandidate, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    disagreements: int,
    decision: str,
) -> None:
    cand, recent = recal_256
    _with_disagreements(monkeypatch, cand, recent, np.arange(RECENT) < disagreements)
    result = build_candidate(
        deployed,
        cand,
        key=bundle.release_key,
        param_version=2,
        recent=recent,
    )
    r = result.report
    assert r.decision == decision, r.reason
    assert (result.blob is not None) == (decision == "accepted")
    assert r.quantization_loss_pp == pytest.approx(100 * disagreements / RECENT)
    assert r.agreement == pytest.approx(1 - disagreements / RECENT)
    assert r.quantization_p_value == pytest.approx(
        binom.sf(disagreements - 1, RECENT, 0.01) if disagreements else 1.0
    )
    assert r.quantization_lower_bound_pp is not None
    assert f"{disagreements}/{RECENT} readings" in r.reason
    if decision == "refused":
        assert r.reason.startswith("quantization disagreement significantly above 1 pp allowed")
        assert r.quantization_lower_bound_pp > 1.0
    else:
        assert r.reason.startswith("passed: label-free")
        assert r.quantization_lower_bound_pp <= 1.0


def _refusals(
    deployed: DeployedModel,
    bundle: Bundle,
    recal_256: tuple[RecalibrationCandidate, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    rate: float,
    seeds: range,
) -> tuple[int, int]:
    """Refusals of candidates whose true disagreement rate is ``rate``: (new rule, raw share)."""
    cand, recent = recal_256
    refused = raw_refused = 0
    for seed in seeds:
        mask = np.random.default_rng(seed).random(RECENT) < rate
        _with_disagreements(monkeypatch, cand, recent, mask)
        result = build_candidate(
            deployed,
            cand,
            key=bundle.release_key,
            param_version=2,
            recent=recent,
        )
        refused += not result.report.accepted
        raw_refused += 100 * int(mask.sum()) / RECENT > 1.0
    return refused, raw_refused


def test_healthy_candidate_at_the_allowed_rate_is_accepted_in_most_draws(
    deployed: DeployedModel,
    bundle: Bundle,
    recal_256: tuple[RecalibrationCandidate, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """True disagreement rate exactly 1 %: refused with probability P(X >= 8) = 0.46 %."""
    refused, raw_refused = _refusals(deployed, bundle, recal_256, monkeypatch, 0.01, range(1000))
    assert refused <= 20, refused  # 1000 seeded draws: 2 refused (expected 4.6)
    assert raw_refused >= 300, raw_refused  # the raw share refused 464 of the same draws


def test_clearly_bad_candidate_is_refused_in_almost_every_draw(
    deployed: DeployedModel,
    bundle: Bundle,
    recal_256: tuple[RecalibrationCandidate, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """True disagreement rate 8 %: refused with probability P(X >= 8) = 99.96 %."""
    refused, _ = _refusals(deployed, bundle, recal_256, monkeypatch, 0.08, range(200))
    assert refused >= 198, refused


def test_pipeline_round_trip(deployed: DeployedModel) -> None:
    fm = deployed.float_model()
    back = export_linear(pipeline_from_float(fm), fm.features, fm.classes)
    assert back.weights == fm.weights
    assert back.mu == fm.mu
    np.testing.assert_allclose(back.sigma, fm.sigma, rtol=1e-12)


def test_register_candidate(deployed: DeployedModel, bundle: Bundle, sqlite_url: str) -> None:
    x, y = _stream(21, DriftSpec("concept", start_s=0.0))
    cand = retrain(deployed, x[:1000], y[:1000])
    with Registry(sqlite_url) as reg:
        _res1, rec1 = register_candidate(reg, deployed, cand, key=bundle.release_key)
        _res2, rec2 = register_candidate(reg, deployed, cand, key=bundle.release_key)
        assert rec1 is not None
        assert rec2 is not None
        assert (rec1.version, rec2.version) == (2, 3)
        assert rec1.status == "candidate"
        assert rec1.source == "retrain"
        assert rec1.metrics is not None
        assert rec1.metrics["decision"] == "accepted"
        bad = retrain(
            deployed, x[:1000], np.random.default_rng(1).permutation(y[:1000]),
            holdout=(x[1000:1500], y[1000:1500]),
        )  # fmt: skip
        res3, rec3 = register_candidate(reg, deployed, bad, key=bundle.release_key)
        assert rec3 is None
        assert res3.report.decision == "refused"
        assert [a.action for a in reg.list_audit()] == ["candidate.refused"]
        assert len(reg.list_parameter_sets(schema_id=deployed.schema_id)) == 2


# ---- degenerate inputs ------------------------------------------------------------------


def test_recalibration_errors(deployed: DeployedModel) -> None:
    x, _ = _stream(12, None)
    ref = (x[:512].mean(axis=0), x[:512].std(axis=0))
    with pytest.raises(RecalibrationError, match="at least 64"):
        recalibrate(deployed, ref, x[:10])
    bad = x[:200].copy()
    bad[5, 2] = np.nan
    with pytest.raises(RecalibrationError, match="reading 5 is not finite"):
        recalibrate(deployed, ref, bad)
    flat = x[:200].copy()
    flat[:, 3] = 0.25
    with pytest.raises(RecalibrationError, match="recent std of std_x"):
        recalibrate(deployed, ref, flat)
    zero_ref = (ref[0], np.where(np.arange(8) == 1, 0.0, ref[1]))
    with pytest.raises(RecalibrationError, match="reference std of mean_y"):
        recalibrate(deployed, zero_ref, x[:200])
    with pytest.raises(RecalibrationError, match=r"reference mean of .* not finite"):
        recalibrate(deployed, (np.full(8, np.inf), ref[1]), x[:200])
    with pytest.raises(RecalibrationError, match="outside"):
        fit_affine(ref[0], ref[1] * 100.0, x[:200], shrink_z=0.0)
    with pytest.raises(RecalibrationError, match="shape"):
        recalibrate(deployed, ref, x[:200, :5])


def test_retrain_errors(deployed: DeployedModel) -> None:
    x, y = _stream(12, None)
    with pytest.raises(RetrainError, match="retraining needs 100"):
        retrain(deployed, x[:50], y[:50])
    bad = x[:200].copy()
    bad[7, 0] = np.inf
    with pytest.raises(RetrainError, match="reading 7 is not finite"):
        retrain(deployed, bad, y[:200])
    with pytest.raises(RetrainError, match="class indices"):
        retrain(deployed, x[:200], y[:200] + 4)
    with pytest.raises(RetrainError, match="one label per reading"):
        retrain(deployed, x[:200], y[:199])
    with pytest.raises(RetrainError, match="holdout_fraction"):
        retrain(deployed, x[:200], y[:200], config=RetrainConfig(holdout_fraction=0.0))


def test_version_must_advance(deployed: DeployedModel, bundle: Bundle) -> None:
    x, _ = _stream(12, None)
    cand = recalibrate(deployed, (x[:512].mean(axis=0), x[:512].std(axis=0)), x[1024:2048])
    with pytest.raises(ValueError, match="must exceed"):
        build_candidate(deployed, cand, key=bundle.release_key, param_version=1, recent=x[:100])
