"""Candidates from the real simulator and factory model: recalibration, retrain, the gate."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.blob import trusted_keys, verify_blob
from edge_agent.device.simulator import DriftSpec, SensorSimulator, window_times
from service.firmware_bundle import Bundle
from service.learn.candidate import GateConfig, build_candidate, register_candidate
from service.learn.deployed import DeployedModel
from service.learn.recalibration import RecalibrationError, fit_affine, recalibrate
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
