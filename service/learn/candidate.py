"""Gate a candidate parameter set, sign it, and register it: :func:`build_candidate`.

Decision rule (first failing check wins; the report records the reason):

1. **Quantization.** With labelled held-out readings, the quantization loss is the candidate's
   float accuracy minus its fixed-point accuracy, in percentage points, refused if it exceeds
   ``max_quantization_loss_pp`` (default 1.0). Without labels the check is on the readings where
   the float and fixed-point predictions *disagree* (their rate bounds any accuracy loss), and
   it is a test, not a comparison of the raw share (:func:`quantization_disagreement_test`):
   with ``k`` disagreements in ``n`` recent readings, refused only if the one-sided exact
   binomial test of H0 "rate ≤ ``max_quantization_loss_pp``" gives ``p < quantization_alpha``
   (default 0.01): the data show the rate is above the allowed one. (Comparing the raw share
   would refuse 3 disagreements in 256, 1.17 %, yet a candidate at exactly 1 % shows 3 or more
   in 256 readings 47 % of the time; the test refuses such a candidate with probability 0.46 %,
   when it shows 8 or more.)
2. **Not worse than deployed** (labelled held-out readings, never learnt from): both models
   predict the same readings with their integer kernels. Refused if the candidate's accuracy is
   below the deployed model's by more than ``margin_pp`` (default 0.0) **and** the paired
   one-sided exact sign test on the discordant readings (:mod:`service.learn.comparison`) gives
   ``p_worse < alpha`` (default 0.05): worse beyond noise. A candidate that is slightly, not
   significantly, worse passes; the rollout's canary gate is the next check.
3. **Label-free recalibration** (no labels): refused if the split-half check shows the fitted
   drift does not hold over the window (``max |z mean| > max_split_z``, default 1.0 reference
   standard deviations).

An accepted candidate is signed with the release key as ``param_version`` (the next free version
of the schema, :func:`next_free_version`) under the deployed ``security_epoch``.
:func:`register_candidate` stores it with status ``candidate`` and the report as its metrics; a
refusal is written to the audit log instead (no blob exists).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest

from edge_agent.blob import ParameterSet, SigningKey, build_blob
from edge_agent.blob.float_model import FloatLinearModel
from edge_agent.fixedpoint import quantization_report
from service.learn.comparison import compare_paired, float_predict
from service.learn.deployed import DeployedModel
from service.learn.recalibration import RecalibrationCandidate
from service.learn.retrain import RetrainCandidate
from service.registry.errors import RegistryConflictError
from service.registry.records import ParameterSetRecord
from service.registry.store import Registry

CandidateKind = Literal["recalibration", "retrain"]
Decision = Literal["accepted", "refused"]

AUDIT_ACTOR = "learn"


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the decision rule (module docstring)."""

    margin_pp: float = 0.0
    alpha: float = 0.05
    max_quantization_loss_pp: float = 1.0
    """Allowed quantization cost (pp); label-free: the allowed float/fixed disagreement rate."""
    quantization_alpha: float = 0.01
    """Significance of the label-free quantization test (:func:`quantization_disagreement_test`)."""
    max_split_z: float = 1.0


@dataclass(frozen=True)
class CandidateReport:
    """Scores and decision of one candidate; :meth:`to_json` is what the registry stores."""

    kind: CandidateKind
    schema_id: str
    base_version: int
    decision: Decision
    reason: str
    readings_used: int
    labels_used: int
    evaluation_readings: int
    """Labelled held-out readings the decision used (0: label-free)."""
    deployed_accuracy: float | None
    candidate_float_accuracy: float | None
    candidate_fixed_accuracy: float | None
    p_worse: float | None
    agreement: float
    """Share of evaluation readings where the candidate's float and fixed predictions agree."""
    quantization_loss_pp: float
    max_weight_error: float
    quantization_p_value: float | None = None
    """Label-free: one-sided exact binomial p-value of "disagreement rate ≤ allowed"."""
    quantization_lower_bound_pp: float | None = None
    """Label-free: one-sided ``1 − quantization_alpha`` Clopper–Pearson lower bound of the
    disagreement rate, in percentage points (refused iff it exceeds the allowed rate)."""
    prequential_deployed_accuracy: float | None = None
    prequential_candidate_accuracy: float | None = None
    param_version: int | None = None
    security_epoch: int | None = None
    sha256: str | None = None
    device: str | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """Whether a blob was signed."""
        return self.decision == "accepted"

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (the registry's ``metrics``)."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out


@dataclass(frozen=True, eq=False)
class CandidateResult:
    """A report and, when accepted, the signed blob."""

    report: CandidateReport
    blob: bytes | None


Candidate = RecalibrationCandidate | RetrainCandidate


def _kind(candidate: Candidate) -> CandidateKind:
    return "recalibration" if isinstance(candidate, RecalibrationCandidate) else "retrain"


@dataclass(frozen=True)
class DisagreementTest:
    """The label-free quantization check's figures (:func:`quantization_disagreement_test`)."""

    disagreements: int
    readings: int
    allowed_pp: float
    alpha: float
    p_value: float
    """``P(X ≥ disagreements)`` for ``X ~ Binomial(readings, allowed_pp / 100)``."""
    lower_bound_pp: float
    """One-sided ``1 − alpha`` Clopper–Pearson lower confidence bound of the rate, in pp."""

    @property
    def observed_pp(self) -> float:
        """The raw disagreement share, in percentage points."""
        return 100.0 * self.disagreements / self.readings

    @property
    def exceeds(self) -> bool:
        """The data show the rate is above the allowed one (``p_value < alpha``)."""
        return self.p_value < self.alpha


def quantization_disagreement_test(
    disagreements: int, readings: int, allowed_pp: float, alpha: float
) -> DisagreementTest:
    """One-sided exact binomial test of H0 "disagreement rate ≤ ``allowed_pp``".

    ``disagreements`` of ``readings`` recent readings got different classes from the float and
    the fixed-point model. The rate is judged too high only when the data show it: the p-value
    ``P(X ≥ disagreements)``, ``X ~ Binomial(readings, allowed_pp / 100)``
    (:func:`scipy.stats.binomtest`, ``alternative="greater"``), is below ``alpha``. Equivalently
    (test/interval duality) the one-sided ``1 − alpha`` Clopper–Pearson lower confidence bound of
    the rate exceeds ``allowed_pp``. Reference: C. J. Clopper and E. S. Pearson, "The use of
    confidence or fiducial limits illustrated in the case of the binomial", *Biometrika* 26(4),
    404–413 (1934). A candidate whose true rate is exactly the allowed one is refused with
    probability at most ``alpha`` (the exact test is conservative).

    With 256 readings, 1 pp allowed and ``alpha`` 0.01, up to 7 disagreements pass (p = 0.0154)
    and 8 are refused (p = 0.0046):

    >>> t = quantization_disagreement_test(3, 256, 1.0, 0.01)
    >>> round(t.observed_pp, 2), round(t.p_value, 3), t.exceeds
    (1.17, 0.472, False)
    >>> [quantization_disagreement_test(k, 256, 1.0, 0.01).exceeds for k in (7, 8)]
    [False, True]

    Raises ``ValueError`` without readings, for counts outside ``0..readings``, for an allowed
    rate outside 0–100 pp or ``alpha`` outside (0, 1).
    """
    if readings <= 0:
        raise ValueError("no readings to judge the quantization on")
    if not 0 <= disagreements <= readings:
        raise ValueError(f"{disagreements} disagreements in {readings} readings")
    if not 0.0 <= allowed_pp <= 100.0:
        raise ValueError(f"allowed disagreement {allowed_pp} pp is not a rate")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"significance {alpha} is not in (0, 1)")
    result = binomtest(disagreements, readings, allowed_pp / 100.0, alternative="greater")
    low = result.proportion_ci(confidence_level=1.0 - alpha, method="exact").low
    return DisagreementTest(
        disagreements=disagreements,
        readings=readings,
        allowed_pp=allowed_pp,
        alpha=alpha,
        p_value=float(result.pvalue),
        lower_bound_pp=100.0 * float(low),
    )


def _predict_both(
    params: ParameterSet, fm: FloatLinearModel, x: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    return float_predict(fm, x), params.model.predict(x)


def build_candidate(
    deployed: DeployedModel,
    candidate: Candidate,
    *,
    key: SigningKey,
    param_version: int,
    recent: npt.ArrayLike | None = None,
    labelled: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    gate: GateConfig | None = None,
    device: str | None = None,
) -> CandidateResult:
    """Judge ``candidate`` against ``deployed`` and sign it if it passes the decision rule.

    Evaluation data: ``labelled`` (features, class indices) if given, else a retrain's own
    held-out tail; a recalibration without labels is judged label-free on ``recent`` (its
    readings). Raises ``ValueError`` when there is nothing to evaluate on or ``param_version``
    does not exceed the deployed version.
    """
    g = gate or GateConfig()
    if param_version <= deployed.param_version:
        raise ValueError(
            f"param_version {param_version} must exceed the deployed {deployed.param_version}"
        )
    kind = _kind(candidate)
    if labelled is None and isinstance(candidate, RetrainCandidate):
        labelled = (candidate.holdout_x, candidate.holdout_y)
    params, fm = candidate.params, candidate.float_model
    w, b = np.asarray(fm.weights), np.asarray(fm.bias)
    max_w_err = quantization_report(params.model, w, b).max_weight_error
    diagnostics: dict[str, Any] = {}
    preq_dep = preq_cand = None
    if isinstance(candidate, RecalibrationCandidate):
        diagnostics = asdict(candidate.diagnostics)
        readings, labels_used = candidate.diagnostics.readings, 0
    else:
        preq_dep = candidate.prequential.deployed_accuracy
        preq_cand = candidate.prequential.candidate_accuracy
        readings = labels_used = candidate.train_n
        diagnostics = {"prequential": asdict(candidate.prequential)}

    dep_acc = fl_acc = fx_acc = p_worse = None
    q_test: DisagreementTest | None = None
    if labelled is not None:
        x = np.asarray(labelled[0], dtype=np.float64)
        y = np.asarray(labelled[1], dtype=np.int64)
        if x.ndim != 2 or x.shape[0] == 0 or y.shape != (x.shape[0],):
            raise ValueError("labelled evaluation data must be (n, F) features and n labels")
        fl, fx = _predict_both(params, fm, x)
        cmp = compare_paired(y, deployed.predict(x), fx)
        dep_acc, fx_acc, p_worse = cmp.deployed_accuracy, cmp.candidate_accuracy, cmp.p_worse
        fl_acc = float(np.mean(fl == y))
        agreement = float(np.mean(fl == fx))
        q_loss = 100.0 * (fl_acc - fx_acc)
        n_eval = int(y.size)
    else:
        if recent is None:
            if not isinstance(candidate, RecalibrationCandidate):
                raise ValueError("a retrain needs labelled evaluation data")
            raise ValueError("a label-free recalibration needs its recent readings")
        x = np.atleast_2d(np.asarray(recent, dtype=np.float64))
        fl, fx = _predict_both(params, fm, x)
        q_test = quantization_disagreement_test(
            int(np.sum(fl != fx)), int(fl.size), g.max_quantization_loss_pp, g.quantization_alpha
        )
        agreement = 1.0 - q_test.disagreements / q_test.readings
        q_loss = q_test.observed_pp
        n_eval = 0

    if q_test is not None:  # label-free
        reason = f"passed: label-free; quantization disagreement {_describe(q_test)}"
        refused_q = q_test.exceeds
        refusal = (
            f"quantization disagreement significantly above {g.max_quantization_loss_pp:g} pp "
            f"allowed: {_describe(q_test)}"
        )
    else:
        reason = "passed: " + (
            f"candidate {100 * fx_acc:.1f} % vs deployed {100 * dep_acc:.1f} % on {n_eval} "
            f"held-out labels (p_worse {p_worse:.3g}), quantization loss {q_loss:.2f} pp"
            if fx_acc is not None and dep_acc is not None and p_worse is not None
            else f"quantization loss {q_loss:.2f} pp"
        )
        refused_q = q_loss > g.max_quantization_loss_pp
        refusal = f"quantization costs {q_loss:.2f} pp > {g.max_quantization_loss_pp:g} pp allowed"
    decision: Decision = "accepted"
    if refused_q:
        decision, reason = "refused", refusal
    elif fx_acc is not None and dep_acc is not None and p_worse is not None:
        delta = 100.0 * (fx_acc - dep_acc)
        if delta < -g.margin_pp and p_worse < g.alpha:
            decision, reason = (
                "refused",
                (
                    f"worse than deployed: {100 * fx_acc:.1f} % vs {100 * dep_acc:.1f} % "
                    f"({delta:+.1f} pp, margin {g.margin_pp:g} pp) on {n_eval} held-out labels, "
                    f"sign test p_worse = {p_worse:.3g} < {g.alpha:g}"
                ),
            )
    elif isinstance(candidate, RecalibrationCandidate):
        z = candidate.diagnostics.max_abs_z_mean
        if z > g.max_split_z:
            decision, reason = (
                "refused",
                (
                    f"the fitted gain/offset does not hold over the window: split-half |z mean| "
                    f"{z:.2f} > {g.max_split_z:g}"
                ),
            )

    blob = sha = None
    if decision == "accepted":
        blob = build_blob(
            params, param_version=param_version, security_epoch=deployed.security_epoch, key=key
        )
        sha = hashlib.sha256(blob).hexdigest()
    report = CandidateReport(
        kind=kind,
        schema_id=deployed.schema_id,
        base_version=deployed.param_version,
        decision=decision,
        reason=reason,
        readings_used=readings,
        labels_used=labels_used,
        evaluation_readings=n_eval,
        deployed_accuracy=dep_acc,
        candidate_float_accuracy=fl_acc,
        candidate_fixed_accuracy=fx_acc,
        p_worse=p_worse,
        agreement=agreement,
        quantization_loss_pp=q_loss,
        max_weight_error=max_w_err,
        quantization_p_value=q_test.p_value if q_test is not None else None,
        quantization_lower_bound_pp=q_test.lower_bound_pp if q_test is not None else None,
        prequential_deployed_accuracy=preq_dep,
        prequential_candidate_accuracy=preq_cand,
        param_version=param_version if blob is not None else None,
        security_epoch=deployed.security_epoch if blob is not None else None,
        sha256=sha,
        device=device,
        diagnostics=diagnostics,
    )
    return CandidateResult(report=report, blob=blob)


def _describe(t: DisagreementTest) -> str:
    return (
        f"{t.disagreements}/{t.readings} readings ({t.observed_pp:.2f} pp), one-sided binomial "
        f"p = {t.p_value:.3g} against ≤ {t.allowed_pp:g} pp (refused if < {t.alpha:g}), "
        f"{100 * (1 - t.alpha):g} % lower bound {t.lower_bound_pp:.2f} pp"
    )


def next_free_version(registry: Registry, deployed: DeployedModel) -> int:
    """One more than the highest version stored for the schema (and than the deployed one)."""
    versions = [r.version for r in registry.list_parameter_sets(schema_id=deployed.schema_id)]
    return max([deployed.param_version, *versions]) + 1


def register_candidate(
    registry: Registry,
    deployed: DeployedModel,
    candidate: Candidate,
    *,
    key: SigningKey,
    recent: npt.ArrayLike | None = None,
    labelled: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    gate: GateConfig | None = None,
    device: str | None = None,
    attempts: int = 3,
) -> tuple[CandidateResult, ParameterSetRecord | None]:
    """Build the candidate at the next free version and store it (status ``candidate``).

    A version taken concurrently (``RegistryConflictError``) is retried with a fresh version up
    to ``attempts`` times. A refused candidate is audited (action ``candidate.refused``) and
    ``(result, None)`` returned.
    """
    for attempt in range(attempts):
        version = next_free_version(registry, deployed)
        result = build_candidate(
            deployed, candidate, key=key, param_version=version, recent=recent,
            labelled=labelled, gate=gate, device=device,
        )  # fmt: skip
        if result.blob is None:
            registry.append_audit(
                AUDIT_ACTOR, "candidate.refused", deployed.schema_id, result.report.to_json()
            )
            return result, None
        try:
            record = registry.add_parameter_set(
                deployed.schema_id,
                version,
                deployed.security_epoch,
                result.blob,
                source=result.report.kind,
                status="candidate",
                metrics=result.report.to_json(),
                notes=result.report.reason,
            )
        except RegistryConflictError:
            if attempt + 1 == attempts:
                raise
            continue
        return result, record
    raise AssertionError("unreachable")
