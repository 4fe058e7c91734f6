"""Int8 fixed-point vs float: accuracy, agreement and parameter bytes of river linear models.

Run as a script: ``python tests/bench/bench_fixedpoint.py [--seeds 10] [--epochs 5] [--quick]``.
Importing this module does nothing (river and scikit-learn are imported inside functions).

Protocol (after ``../shared/research/fixedpoint-anchors.md`` §4.1):

- Data that ships with the installed packages, nothing is downloaded: scikit-learn's
  ``load_digits``, ``load_wine``, ``load_breast_cancer``, ``load_iris`` and river's bundled
  ``datasets.Phishing`` and ``datasets.ImageSegments``.
- Models: river ``preprocessing.StandardScaler() | m`` with ``m`` one of
  ``linear_model.LogisticRegression``, ``Perceptron`` (a ``LogisticRegression`` with hinge loss,
  SGD(1)), ``PAClassifier``, ``ALMAClassifier`` (no intercept) for binary data, and
  ``linear_model.SoftmaxRegression`` (no intercept) and
  ``multiclass.OneVsRestClassifier(LogisticRegression())`` for multiclass data. All of them
  predict from a linear logit: ``sigmoid(w·z + b)`` against ``1 − sigmoid`` (i.e. ``logit > 0``)
  for the binary ones, softmax / normalised sigmoids (argmax of the logits) for the others.
- Seed ``s``: a stratified 70/30 split with ``random_state=s``; ``learn_one`` over the training
  rows for ``--epochs`` passes (default 5, as the research note), each pass in a fresh
  permutation drawn from ``default_rng(s)``.
- Freeze: ``mu = scaler.means``, ``sigma = sqrt(scaler.vars)``. river maps a zero-variance
  feature to 0 (``... if v else 0.0``); here its ``sigma`` is 1.0 and its weight column is set to
  0, so float and fixed point see the same standardised contribution. ``W``/``b`` come from the
  model's weight dicts in a fixed feature order; rows follow the model's own class order, so
  first-maximum tie-breaking matches river's ``max`` over its dict.
- Float reference: river's own ``predict_one``. The extracted float linear model must reproduce
  it on ≥ 99.9 % of the test rows of every run (checked, reported as "extract").
- Fixed point: ``edge_agent.fixedpoint.quantize_linear`` and the integer kernel's ``predict``.

Sizes: "W+b" is int8 weights + int32 bias against float32 weights + bias (the research note's
measure, without the 5 B/row requantization words). "params" is the payload of the four parameter
sections of README §6.2 (INPUT_NORM, WEIGHTS, BIAS, REQUANT with their 8-byte section headers and
padding) against float32 ``mu``, ``1/sigma``, ``W``, ``b``. "blob" is a complete signed blob as
``edge_agent.blob`` builds it (160-byte header + signature, plus THRESHOLDS, LABELS, 8 KATs,
SCHEMA and an empty PROVENANCE section), when that package is importable.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

TARGET_MEAN_LOSS_PP = 0.5
TARGET_WORST_LOSS_PP = 1.5
TARGET_AGREEMENT = 0.995
TARGET_SIZE_RATIO = 2.5
TARGET_EXTRACTION = 0.999

BINARY_MODELS = ("LogisticRegression", "Perceptron", "PAClassifier", "ALMAClassifier")
MULTICLASS_MODELS = ("SoftmaxRegression", "OvR(LogisticRegression)")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Features as a float64 matrix, labels as Python objects, a fixed feature order."""

    name: str
    x: npt.NDArray[np.float64]
    y: list[Any]
    features: tuple[str, ...]
    binary: bool


def _from_sklearn(name: str, loader: Callable[..., Any], binary: bool) -> Dataset:
    bunch = loader()
    target = bunch.target.tolist()
    y = [bool(v) for v in target] if binary else [int(v) for v in target]
    names = tuple(str(f) for f in bunch.feature_names)
    return Dataset(name, np.asarray(bunch.data, dtype=np.float64), y, names, binary)


def _from_river(name: str, stream: Any, binary: bool) -> Dataset:
    rows = list(stream)
    names = tuple(rows[0][0].keys())
    x = np.array([[float(r[0][f]) for f in names] for r in rows], dtype=np.float64)
    return Dataset(name, x, [r[1] for r in rows], names, binary)


@functools.cache
def load_dataset(name: str) -> Dataset:
    """Load one bundled dataset by name (cached per process)."""
    from river import datasets as rd
    from sklearn import datasets as sd

    loaders: dict[str, Callable[[], Dataset]] = {
        "digits": lambda: _from_sklearn("digits", sd.load_digits, binary=False),
        "wine": lambda: _from_sklearn("wine", sd.load_wine, binary=False),
        "breast_cancer": lambda: _from_sklearn("breast_cancer", sd.load_breast_cancer, True),
        "iris": lambda: _from_sklearn("iris", sd.load_iris, binary=False),
        "Phishing": lambda: _from_river("Phishing", rd.Phishing(), binary=True),
        "ImageSegments": lambda: _from_river(
            "ImageSegments",
            rd.ImageSegments(),  # type: ignore[no-untyped-call]
            binary=False,
        ),
    }
    return loaders[name]()


DATASETS = ("digits", "wine", "breast_cancer", "iris", "Phishing", "ImageSegments")
BINARY_DATASETS = frozenset({"breast_cancer", "Phishing"})


# ------------------------------------------------------------------------------------------------
# Models and parameter extraction
# ------------------------------------------------------------------------------------------------


def make_pipeline(model: str) -> Any:
    """``StandardScaler() | model`` with river's default hyper-parameters."""
    from river import linear_model, multiclass, preprocessing

    factories: dict[str, Callable[[], Any]] = {
        "LogisticRegression": linear_model.LogisticRegression,
        "Perceptron": linear_model.Perceptron,
        "PAClassifier": linear_model.PAClassifier,
        "ALMAClassifier": linear_model.ALMAClassifier,
        "SoftmaxRegression": linear_model.SoftmaxRegression,
        "OvR(LogisticRegression)": lambda: multiclass.OneVsRestClassifier(
            linear_model.LogisticRegression()
        ),
    }
    return preprocessing.StandardScaler() | factories[model]()


@dataclass(frozen=True)
class FrozenLinear:
    """The float model ``logit = W · z + b`` on ``z = (x − mu) / sigma`` and its row labels."""

    mu: npt.NDArray[np.float64]
    sigma: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    bias: npt.NDArray[np.float64]
    row_labels: list[Any]
    """Class label of each logit row; for one-row binary models ``[False, True]`` (0, 1)."""
    constant: npt.NDArray[np.bool_]
    """Zero-variance features (river standardises them to 0)."""

    def predict_index(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Float64 decision of the extracted model (README §3.4 semantics)."""
        z = (x - self.mu) / self.sigma
        z[:, self.constant] = 0.0
        logits = z @ self.weights.T + self.bias
        if self.weights.shape[0] == 1:
            return np.asarray(logits[:, 0] > 0, dtype=np.int64)
        return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)


def freeze(pipeline: Any, model: str, features: Sequence[str]) -> FrozenLinear:
    """Read the scaler statistics and linear weights out of a trained river pipeline.

    Uses the service's exporter (``service.learn.river_export``), so the benchmark measures
    exactly what ``tinydrift`` ships.
    """
    from service.learn.river_export import export_linear, model_classes

    del model  # the exporter recognises the model from the pipeline
    labels = model_classes(pipeline)
    fm = export_linear(pipeline, features, labels)
    scaler = next(iter(pipeline.steps.values()))
    constant = np.array([float(scaler.vars.get(f, 0.0)) <= 0 for f in features])
    return FrozenLinear(
        np.array(fm.mu),
        np.array(fm.sigma),
        np.array(fm.weights),
        np.array(fm.bias),
        labels,
        constant,
    )


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------


def _section(length: int) -> int:
    """Bytes of one README §6.2 section: 8-byte header, data, zero padding to 4."""
    return 8 + length + (-length) % 4


def param_payload_bytes(rows: int, features: int) -> int:
    """Payload of INPUT_NORM + WEIGHTS + BIAS + REQUANT (README §6.2).

    For Phishing (one row, 9 features): 80 + 24 + 12 + 20 = 136 bytes. (No doctest here: the
    project runs ``--doctest-modules`` over ``tests/`` and this script must not be collected.)
    """
    return (
        _section(8 * features)
        + _section(4 + rows * features)
        + _section(4 * rows)
        + _section(8 * rows + 4)
    )


def float_payload_bytes(rows: int, features: int) -> int:
    """The same container holding float32 parameters: INPUT_NORM + f32 WEIGHTS + f32 BIAS.

    No REQUANT section is needed in float. For Phishing: 80 + 48 + 12 = 140 bytes.
    """
    return _section(8 * features) + _section(4 + 4 * rows * features) + _section(4 * rows)


def full_blob_bytes(model: Any, features: Sequence[str], labels: Sequence[Any]) -> int | None:
    """Length of a complete signed blob built by ``edge_agent.blob`` (None if unavailable)."""
    try:
        from edge_agent.blob.parameter_set import ParameterSet
        from edge_agent.blob.schema import ParameterSchema

        classes = tuple(str(c) for c in labels)
        try:
            schema = ParameterSchema(features=tuple(features), classes=classes, rows=model.n_rows)
        except ValueError:  # names the schema refuses: same count, generic names
            schema = ParameterSchema(
                features=tuple(f"f{j}" for j in range(len(features))),
                classes=tuple(f"c{k}" for k in range(len(classes))),
                rows=model.n_rows,
            )
        return 160 + len(ParameterSet.create(schema, model).to_payload())
    except Exception:  # another package's work in progress must not stop the benchmark
        return None


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """Metrics of one dataset × model × seed."""

    dataset: str
    model: str
    seed: int
    n_test: int
    rows: int
    features: int
    float_acc: float
    fixed_acc: float
    agreement: float
    extraction: float
    clip_rate: float
    weight_bytes: int
    float_weight_bytes: int
    blob_bytes: int | None
    seconds: float

    @property
    def delta_pp(self) -> float:
        """Fixed-point minus float accuracy, percentage points."""
        return 100.0 * (self.fixed_acc - self.float_acc)


def run_one(dataset: str, model: str, seed: int, epochs: int) -> RunResult:
    """Train, freeze, quantise and evaluate one dataset × model × seed."""
    from sklearn.model_selection import train_test_split

    from edge_agent.fixedpoint import quantize_linear

    start = time.perf_counter()
    data = load_dataset(dataset)
    idx = np.arange(len(data.y))
    strata = [str(v) for v in data.y]
    train, test = train_test_split(idx, test_size=0.3, stratify=strata, random_state=seed)
    rng = np.random.default_rng(seed)
    records = [dict(zip(data.features, r, strict=True)) for r in data.x.tolist()]

    pipeline = make_pipeline(model)
    for _ in range(epochs):
        for i in rng.permutation(train).tolist():
            pipeline.learn_one(records[i], data.y[i])

    x_test = data.x[test]
    y_test = [data.y[i] for i in test.tolist()]
    river_pred = [pipeline.predict_one(records[i]) for i in test.tolist()]

    frozen = freeze(pipeline, model, data.features)
    extracted = [frozen.row_labels[k] for k in frozen.predict_index(x_test).tolist()]

    qmodel = quantize_linear(frozen.mu, frozen.sigma, frozen.weights, frozen.bias)
    q = qmodel.quantize_input(x_test)
    fixed = [frozen.row_labels[k] for k in qmodel.decide(qmodel.logits_q(q)).tolist()]
    live = ~frozen.constant  # clipping of constant features is irrelevant (weight 0)
    clip = float(np.mean((q[:, live] == 127) | (q[:, live] == -128))) if live.any() else 0.0

    def share(a: Sequence[Any], b: Sequence[Any]) -> float:
        return sum(bool(u == v) for u, v in zip(a, b, strict=True)) / len(a)

    return RunResult(
        dataset=dataset,
        model=model,
        seed=seed,
        n_test=len(test),
        rows=qmodel.n_rows,
        features=qmodel.n_features,
        float_acc=share(river_pred, y_test),
        fixed_acc=share(fixed, y_test),
        agreement=share(fixed, river_pred),
        extraction=share(extracted, river_pred),
        clip_rate=clip,
        weight_bytes=qmodel.weight_bytes,
        float_weight_bytes=qmodel.float_weight_bytes,
        blob_bytes=full_blob_bytes(qmodel, data.features, frozen.row_labels) if seed == 0 else None,
        seconds=time.perf_counter() - start,
    )


def _run_job(job: tuple[str, str, int, int]) -> RunResult:
    return run_one(*job)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine() -> str:
    """One line describing the machine and library versions."""
    from importlib.metadata import version

    return (
        f"{platform.platform()} | {platform.machine()} {platform.processor() or ''}".rstrip()
        + f" | cpus={os.cpu_count()} | Python {platform.python_version()}"
        + f" | numpy {np.__version__} | river {version('river')}"
        + f" | scikit-learn {version('scikit-learn')}"
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: list[RunResult], seeds: int, epochs: int, jobs: int, seconds: float) -> bool:
    """Print the tables and the verdicts; returns whether every target is met."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.model), []).append(r)

    print(f"# int8 fixed point vs float (river predict_one): {seeds} seeds, {epochs} epochs")
    print(f"# machine: {machine()}")
    print()
    head = (
        f"{'dataset':<14}{'model':<24}{'R×F':>6}{'n_test':>7}{'float %':>9}{'fixed %':>9}"
        f"{'Δ mean':>8}{'Δ worst':>8}{'agree %':>9}{'worst %':>9}{'extract':>9}{'clip %':>8}"
    )
    print(head)
    print("-" * len(head))
    for (ds, model), rs in groups.items():
        d = [r.delta_pp for r in rs]
        print(
            f"{ds:<14}{model:<24}{f'{rs[0].rows}×{rs[0].features}':>6}{rs[0].n_test:>7}"
            f"{100 * np.mean([r.float_acc for r in rs]):>9.2f}"
            f"{100 * np.mean([r.fixed_acc for r in rs]):>9.2f}"
            f"{np.mean(d):>+8.2f}{min(d):>+8.2f}"
            f"{100 * np.mean([r.agreement for r in rs]):>9.2f}"
            f"{100 * min(r.agreement for r in rs):>9.2f}"
            f"{100 * min(r.extraction for r in rs):>9.2f}"
            f"{100 * np.mean([r.clip_rate for r in rs]):>8.2f}"
        )
    print()
    print("Δ = fixed − float accuracy in pp (mean and worst over seeds); agree = fixed-point")
    print("predictions equal to river's; extract = worst share of test rows where the extracted")
    print("float64 linear model equals river's predict_one; clip = inputs saturated at ±4σ.")
    print()

    head2 = (
        f"{'dataset':<14}{'model':<24}{'W+b int':>8}{'W+b f32':>8}{'ratio':>7}"
        f"{'params':>8}{'p. f32':>8}{'ratio':>7}{'blob':>7}"
    )
    print(head2)
    print("-" * len(head2))
    ratios = []
    for (ds, model), rs in groups.items():
        r0 = rs[0]
        ratio = r0.float_weight_bytes / r0.weight_bytes
        ratios.append(ratio)
        params = param_payload_bytes(r0.rows, r0.features)
        params_f32 = float_payload_bytes(r0.rows, r0.features)
        blob = next((r.blob_bytes for r in rs if r.blob_bytes is not None), None)
        print(
            f"{ds:<14}{model:<24}{r0.weight_bytes:>8}{r0.float_weight_bytes:>8}{ratio:>6.2f}×"
            f"{params:>8}{params_f32:>8}{params_f32 / params:>6.2f}×"
            f"{blob if blob is not None else 'n/a':>7}"
        )
    print()
    print("W+b: int8 weights + int32 bias vs float32 weights + bias (bytes). params: README §6.2")
    print("sections INPUT_NORM+WEIGHTS+BIAS+REQUANT incl. 8-B section headers and padding; p. f32:")
    print("the same container with float32 W and b and no REQUANT (mu, 1/sigma are f32 in both).")
    print("blob: complete signed TDPB blob from edge_agent.blob (160-B header+signature, those")
    print("sections, THRESHOLDS, LABELS, 8 KATs, SCHEMA JSON, empty PROVENANCE).")
    print()

    deltas = [r.delta_pp for r in results]
    mean_delta, worst_delta = float(np.mean(deltas)), min(deltas)
    mean_agree = float(np.mean([r.agreement for r in results]))
    worst_agree = min(r.agreement for r in results)
    worst_extract = min(r.extraction for r in results)
    min_ratio = min(ratios)
    checks = [
        (
            f"mean Δacc {mean_delta:+.3f} pp (loss ≤ {TARGET_MEAN_LOSS_PP} pp)",
            -mean_delta <= TARGET_MEAN_LOSS_PP,
        ),
        (
            f"worst Δacc {worst_delta:+.3f} pp (loss ≤ {TARGET_WORST_LOSS_PP} pp)",
            -worst_delta <= TARGET_WORST_LOSS_PP,
        ),
        (
            f"mean agreement {100 * mean_agree:.2f} % (≥ {100 * TARGET_AGREEMENT:.1f} %)",
            mean_agree >= TARGET_AGREEMENT,
        ),
        (
            f"min size ratio, W+b, {min_ratio:.2f}× (≥ {TARGET_SIZE_RATIO}×)",
            min_ratio >= TARGET_SIZE_RATIO,
        ),
        (
            f"extraction ≥ {100 * TARGET_EXTRACTION:.1f} % of test rows in every run"
            f" (worst {100 * worst_extract:.2f} %)",
            worst_extract >= TARGET_EXTRACTION,
        ),
    ]
    print(f"overall over {len(results)} runs ({len(groups)} dataset×model pairs × {seeds} seeds):")
    print(f"  worst single-run agreement {100 * worst_agree:.2f} %")
    for text, ok in checks:
        print(f"  {_verdict(ok)}  {text}")
    cpu = sum(r.seconds for r in results)
    print()
    print(f"wall time {seconds:.1f} s with {jobs} worker(s); {cpu:.1f} s of work")
    return all(ok for _, ok in checks)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables; exit code 0 iff every target is met."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds / splits (default 10)")
    parser.add_argument("--epochs", type=int, default=5, help="training passes (default 5)")
    parser.add_argument(
        "--quick", action="store_true", help="3 seeds and 2 epochs (a smoke run, ~5 s)"
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes"
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="subset"
    )
    args = parser.parse_args(argv)
    seeds, epochs = args.seeds, args.epochs
    if args.quick:
        seeds, epochs = min(seeds, 3), min(epochs, 2)
    if seeds < 1 or epochs < 1 or args.jobs < 1:
        parser.error("--seeds, --epochs and --jobs must be ≥ 1")

    jobs = [
        (ds, model, seed, epochs)
        for ds in args.datasets
        for model in (BINARY_MODELS if ds in BINARY_DATASETS else MULTICLASS_MODELS)
        for seed in range(seeds)
    ]
    start = time.perf_counter()
    if args.jobs == 1:
        results = [_run_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_run_job, jobs))
    ok = report(results, seeds, epochs, args.jobs, time.perf_counter() - start)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
