"""The ``tinydrift keys`` and ``tinydrift blob`` command lines, and ``parse_broker``.

Real models: scikit-learn's LogisticRegression fitted on StandardScaler'd iris (3 classes, one
weight row per class) and breast_cancer (binary, one weight row), written to ``PARAMS.json`` by
hand. Every failure must end with exit code 1 and exactly one ``error:`` line on stderr.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from click.testing import Result
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from edge_agent.blob import (
    ParameterSet,
    build_blob,
    load_public_key,
    load_signing_key,
    trusted_keys,
    verify_blob,
)
from edge_agent.blob.header import HEADER_LEN, PAYLOAD_OFFSET
from edge_agent.fixedpoint import INPUT_SCALE, quantize_input, quantize_linear
from service.cli.app import app
from service.cli.device import BrokerAddress, parse_broker

runner = CliRunner()

# ``blob build`` reports for the sklearn models (weights R×F int8 + R int32 vs float32)
SIZE_RE = re.compile(r"size: int8 weights\+int32 bias (\d+) B vs float32 (\d+) B \(([\d.]+)x\)")
QUANT_RE = re.compile(
    r"quantization: max weight error (\S+), max bias error (\S+), weight saturations (\d+)"
)
CALIB_RE = re.compile(
    r"calibration \((\d+) rows\): agreement with float ([\d.]+) %, "
    r"inputs clipped at ±4σ ([\d.]+) %"
)


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit code 1, a clean exit (no exception escaped), one ``error:`` line naming ``needles``."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@dataclass(frozen=True)
class Model:
    """A fitted sklearn model, its PARAMS.json and its dataset as CSV (reversed column order)."""

    name: str
    params: dict[str, Any]
    params_path: Path
    csv_path: Path
    x: np.ndarray
    sklearn_pred: np.ndarray  # class indices from the float sklearn model

    @property
    def features(self) -> list[str]:
        return list(self.params["features"])

    @property
    def classes(self) -> list[str]:
        return list(self.params["classes"])

    def integer_pred(self) -> np.ndarray:
        """Class indices from edge_agent.fixedpoint, quantised straight from the parameters."""
        p = self.params
        model = quantize_linear(
            p["mu"], p["sigma"], p["weights"], p["bias"], n_classes=len(p["classes"])
        )
        return model.predict(self.x)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def fit_model(name: str, loader: Any, out: Path) -> Model:
    ds = loader()
    scaler = StandardScaler().fit(ds.data)
    clf = LogisticRegression(max_iter=5000).fit(scaler.transform(ds.data), ds.target)
    params = {
        "features": [str(f) for f in ds.feature_names],
        "classes": [str(c) for c in ds.target_names],
        "mu": scaler.mean_.tolist(),
        "sigma": scaler.scale_.tolist(),
        "weights": clf.coef_.tolist(),
        "bias": clf.intercept_.tolist(),
    }
    params_path = out / f"{name}.json"
    params_path.write_text(json.dumps(params, indent=1))
    order = list(range(len(params["features"])))[::-1]  # columns in another order than the model
    csv_path = write_csv(
        out / f"{name}.csv",
        [params["features"][j] for j in order],
        ds.data[:, order].tolist(),
    )
    pred = clf.predict(scaler.transform(ds.data))
    return Model(name, params, params_path, csv_path, ds.data, np.asarray(pred))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def iris(work: Path) -> Model:
    return fit_model("iris", load_iris, work)


@pytest.fixture(scope="module")
def cancer(work: Path) -> Model:
    return fit_model("breast_cancer", load_breast_cancer, work)


@pytest.fixture(params=["iris", "cancer"])
def model(request: pytest.FixtureRequest) -> Model:
    return request.getfixturevalue(request.param)


@dataclass(frozen=True)
class Keys:
    key: Path
    pub: Path
    other_key: Path
    other_pub: Path


@pytest.fixture(scope="module")
def keys(work: Path) -> Keys:
    d = work / "keys"
    assert invoke("keys", "generate", "--out", d).exit_code == 0
    assert invoke("keys", "generate", "--out", d, "--name", "other").exit_code == 0
    return Keys(d / "release.key", d / "release.pub", d / "other.key", d / "other.pub")


@pytest.fixture(scope="module")
def blobs(work: Path, keys: Keys, iris: Model, cancer: Model) -> dict[str, Path]:
    """iris: v7 epoch 2 with calibration; breast_cancer: v1; iris signed by the other key."""
    out = {
        "iris": work / "iris.blob",
        "cancer": work / "cancer.blob",
        "iris_other": work / "iris_other.blob",
    }
    args = [
        (
            "iris",
            iris,
            keys.key,
            ["--version", "7", "--epoch", "2", "--calibration", iris.csv_path],
        ),
        ("cancer", cancer, keys.key, ["--version", "1"]),
        ("iris_other", iris, keys.other_key, ["--version", "7"]),
    ]
    for name, m, key, extra in args:
        r = invoke(
            "blob", "build", "--params", m.params_path, "--key", key, "--out", out[name], *extra
        )
        assert r.exit_code == 0, r.output
    return out


def tampered(src: Path, dst: Path, edit: Any) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(data)))
    return dst


def flip(offset: int) -> Any:
    def edit(data: bytearray) -> bytearray:
        data[offset] ^= 0x01
        return data

    return edit


# -- tinydrift keys generate ----------------------------------------------------------------


def test_keys_generate_writes_a_0600_private_key_with_its_public_key_beside_it(tmp_path: Path):
    out = tmp_path / "new" / "keys"
    result = invoke("keys", "generate", "--out", out)

    assert result.exit_code == 0, result.output
    private, public = out / "release.key", out / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.is_file()
    key = load_signing_key(private)
    assert load_public_key(public) == key.public
    assert f"key_id      {key.key_id:#010x}" in result.stdout.splitlines()
    assert str(private) in result.stdout
    assert str(public) in result.stdout
    assert result.stderr == ""


def test_keys_generate_uses_the_name_option_and_gives_each_key_its_own_id(tmp_path: Path):
    a = invoke("keys", "generate", "--out", tmp_path)
    b = invoke("keys", "generate", "--out", tmp_path, "--name", "deploy")

    assert a.exit_code == b.exit_code == 0
    assert stat.S_IMODE((tmp_path / "deploy.key").stat().st_mode) == 0o600
    ids = [re.findall(r"key_id\s+(0x[0-9a-f]{8})", r.stdout) for r in (a, b)]
    assert ids[0] != ids[1]
    assert ids[1] == [f"{load_signing_key(tmp_path / 'deploy.key').key_id:#010x}"]


def test_keys_generate_refuses_to_overwrite_a_private_key(tmp_path: Path):
    assert invoke("keys", "generate", "--out", tmp_path).exit_code == 0
    before = (tmp_path / "release.key").read_bytes()

    result = invoke("keys", "generate", "--out", tmp_path)

    assert_one_line_error(result, str(tmp_path / "release.key"), "refusing to overwrite")
    assert result.stdout == ""
    assert (tmp_path / "release.key").read_bytes() == before


def test_keys_generate_into_an_unwritable_place_is_one_error_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke("keys", "generate", "--out", blocker / "keys")
    assert_one_line_error(result, "cannot write keys into", str(blocker / "keys"))


# -- tinydrift blob build -------------------------------------------------------------------


def expected_max_weight_error(weights: list[list[float]]) -> float:
    w = np.asarray(weights)
    s_w = np.abs(w).max(axis=1, keepdims=True) / 127.0
    return float(np.abs(w - np.round(w / s_w) * s_w).max())


def test_blob_build_reports_quantization_error_saturations_and_size(
    model: Model, keys: Keys, tmp_path: Path
):
    out = tmp_path / "m.blob"
    result = invoke(
        "blob",
        "build",
        "--params",
        model.params_path,
        "--key",
        keys.key,
        "--version",
        "5",
        "--out",
        out,
    )

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    v = verify_blob(
        out.read_bytes(), trusted=trusted_keys([load_public_key(keys.pub)]), schema_id=None
    )
    assert v.header.param_version == 5
    assert v.params.schema.features == tuple(model.features)
    assert f"schema_id {v.params.schema.schema_id_hex}" in result.stdout
    assert f"key_id {load_signing_key(keys.key).key_id:#010x}" in result.stdout

    quant = QUANT_RE.search(result.stdout)
    assert quant, result.stdout
    assert float(quant.group(1)) == pytest.approx(
        expected_max_weight_error(model.params["weights"]), rel=6e-3
    )
    assert 0 < float(quant.group(1)) <= max(map(abs, np.ravel(model.params["weights"]))) / 254
    assert quant.group(3) == "0"

    rows, feats = len(model.params["weights"]), len(model.features)
    int_bytes, float_bytes = rows * feats + 4 * rows, 4 * (rows * feats + rows)
    size = SIZE_RE.search(result.stdout)
    assert size, result.stdout
    assert size.groups() == (str(int_bytes), str(float_bytes), f"{float_bytes / int_bytes:.2f}")
    assert "calibration" not in result.stdout  # only with --calibration


def test_blob_build_binary_model_keeps_one_weight_row(cancer: Model, blobs: dict[str, Path]):
    result = invoke("blob", "inspect", blobs["cancer"])
    assert result.exit_code == 0, result.output
    assert "classes (2): malignant, benign; weight rows 1" in result.stdout
    assert "weights int8 1x30" in result.stdout


def test_blob_build_with_calibration_reports_agreement_and_clip_rate(
    model: Model, keys: Keys, tmp_path: Path
):
    result = invoke(
        "blob",
        "build",
        "--params",
        model.params_path,
        "--key",
        keys.key,
        "--version",
        "1",
        "--out",
        tmp_path / "m.blob",
        "--calibration",
        model.csv_path,
    )

    assert result.exit_code == 0, result.output
    calib = CALIB_RE.search(result.stdout)
    assert calib, result.stdout
    n, agreement, clipped = int(calib.group(1)), float(calib.group(2)), float(calib.group(3))
    assert n == len(model.x)
    # agreement of the integer kernel with the float parameters = with sklearn's predictions
    expected = 100 * float(np.mean(model.integer_pred() == model.sklearn_pred))
    assert agreement == pytest.approx(expected, abs=0.006)
    assert agreement >= 97.0
    p = model.params
    q = quantize_input(
        model.x, np.asarray(p["mu"], np.float32), (1 / np.asarray(p["sigma"])).astype(np.float32)
    )
    assert clipped == pytest.approx(100 * float(np.mean((q == 127) | (q == -128))), abs=0.006)


def test_blob_build_calibration_clip_rate_sees_outliers(cancer: Model, keys: Keys, tmp_path: Path):
    # breast_cancer has readings beyond ±4σ (e.g. area error); the report must count them
    result = invoke(
        "blob",
        "build",
        "--params",
        cancer.params_path,
        "--key",
        keys.key,
        "--version",
        "1",
        "--out",
        tmp_path / "b.blob",
        "--calibration",
        cancer.csv_path,
    )
    calib = CALIB_RE.search(result.stdout)
    assert calib, result.output
    z = np.abs((cancer.x - np.asarray(cancer.params["mu"])) / np.asarray(cancer.params["sigma"]))
    assert np.any(z > 4.1)
    assert float(calib.group(3)) > 0


def _edit_params(edit: Any) -> Any:
    def make(m: Model, path: Path) -> Path:
        p = json.loads(json.dumps(m.params))
        text = edit(p)
        path.write_text(text if isinstance(text, str) else json.dumps(p))
        return path

    return make


def _nan_weight(p: dict[str, Any]) -> str:
    p["weights"][1][2] = "NAN_HERE"
    return json.dumps(p).replace('"NAN_HERE"', "NaN")


def _set(field: str, index: int, value: Any) -> Any:
    return lambda p: p[field].__setitem__(index, value)


def _accumulator_bias(p: dict[str, Any]) -> None:
    # just below the int32 bias limit at this row's weight scale: the bias fits in int32 but
    # bias + 128·Σ|w| does not, so the accumulator could overflow on the device
    row_max = max(abs(v) for v in p["weights"][0])
    p["bias"][0] = (2**31 - 1000) * INPUT_SCALE * row_max / 127


BAD_PARAMS = {
    "missing file": (None, ["cannot read", "No such file"]),
    "not JSON": (_edit_params(lambda p: '{"features": ["a", '), ["Invalid JSON"]),
    "mu has 3 of 4": (
        _edit_params(lambda p: p.update(mu=p["mu"][:3])),
        ["mu and sigma need 4 entries"],
    ),
    "weight row of 3": (
        _edit_params(lambda p: p.update(weights=[r[:3] for r in p["weights"]])),
        ["every weight row needs 4 entries"],
    ),
    "NaN literal": (_edit_params(_nan_weight), ["weights[1][2]", "finite"]),
    "sigma zero": (
        _edit_params(_set("sigma", 1, 0.0)),
        ["sigma[1]", "must be positive"],
    ),
    "sigma negative": (
        _edit_params(_set("sigma", 3, -0.5)),
        ["sigma[3]", "must be positive"],
    ),
    "bias beyond int32": (
        _edit_params(_set("bias", 2, 1e9)),
        ["bias too large for int32", "rescale"],
    ),
    "accumulator overflow": (
        _edit_params(_accumulator_bias),
        ["int32 accumulator could overflow", "rescale"],
    ),
    "duplicate feature names": (
        _edit_params(_set("features", 2, "sepal length (cm)")),
        ["feature names must be unique", "sepal length (cm)"],
    ),
    "duplicate class names": (
        _edit_params(_set("classes", 2, "setosa")),
        ["class names must be unique", "setosa"],
    ),
    "1/sigma beyond float32": (
        _edit_params(_set("sigma", 0, 1e-50)),
        ["sigma[0]", "float32"],
    ),
    "unknown field": (_edit_params(lambda p: p.update(scale=2)), ["scale", "Extra inputs"]),
}


@pytest.mark.parametrize(("make", "needles"), BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_blob_build_bad_params_exit_1_with_one_error_line(
    make: Any, needles: list[str], iris: Model, keys: Keys, tmp_path: Path
):
    params = tmp_path / "PARAMS.json"
    if make is not None:
        make(iris, params)
    out = tmp_path / "bad.blob"

    result = invoke(
        "blob", "build", "--params", params, "--key", keys.key, "--version", "1", "--out", out
    )

    line = assert_one_line_error(result, *needles)
    if make is not None:
        assert str(params) in line
    assert result.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(
    ("key_attr", "needles"),
    [
        ("pub", ["not an unencrypted PEM private key"]),
        ("missing", ["cannot read private key", "No such file"]),
    ],
)
def test_blob_build_bad_key_file(
    key_attr: str, needles: list[str], iris: Model, keys: Keys, tmp_path: Path
):
    key = keys.pub if key_attr == "pub" else tmp_path / "nope.key"
    out = tmp_path / "bad.blob"
    result = invoke(
        "blob", "build", "--params", iris.params_path, "--key", key, "--version", "1", "--out", out
    )
    assert_one_line_error(result, str(key), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("rows", "needles"),
    [
        ([], ["no data rows"]),
        ([["5.1", "3.5", "x", "0.2"]], ["line 2", "petal length (cm)", "'x' is not a number"]),
    ],
    ids=["header only", "non-numeric"],
)
def test_blob_build_bad_calibration_csv(
    rows: list[list[str]], needles: list[str], iris: Model, keys: Keys, tmp_path: Path
):
    calib = write_csv(tmp_path / "calib.csv", iris.features, rows)
    out = tmp_path / "bad.blob"
    result = invoke(
        "blob",
        "build",
        "--params",
        iris.params_path,
        "--key",
        keys.key,
        "--version",
        "1",
        "--out",
        out,
        "--calibration",
        calib,
    )
    assert_one_line_error(result, str(calib), *needles)
    assert not out.exists()


def test_blob_build_rejects_a_version_beyond_u32(iris: Model, keys: Keys, tmp_path: Path):
    result = invoke(
        "blob",
        "build",
        "--params",
        iris.params_path,
        "--key",
        keys.key,
        "--version",
        str(2**32),
        "--out",
        tmp_path / "x.blob",
    )
    assert result.exit_code == 2  # click usage error
    assert "--version" in result.stderr
    assert not (tmp_path / "x.blob").exists()


# -- tinydrift blob inspect -----------------------------------------------------------------


def test_blob_inspect_with_pubkey_prints_header_and_sections(
    iris: Model, keys: Keys, blobs: dict[str, Path]
):
    result = invoke("blob", "inspect", blobs["iris"], "--pubkey", keys.pub)

    assert result.exit_code == 0, result.output
    out = result.stdout
    schema_hex = verify_blob(
        blobs["iris"].read_bytes(),
        trusted=trusted_keys([load_public_key(keys.pub)]),
        schema_id=None,
    ).params.schema.schema_id_hex
    key_id = load_signing_key(keys.key).key_id
    assert re.search(
        rf"^schema_id {schema_hex}  param_version 7  epoch 2  key_id {key_id:#010x}  created \d+$",
        out,
        re.MULTILINE,
    ), out
    assert "signature OK; payload" in out
    assert f"features (4): {', '.join(iris.features)}" in out
    assert "classes (3): setosa, versicolor, virginica; weight rows 3" in out
    assert "known answers 8" in out
    assert '"source": "iris.json"' in out


def test_blob_inspect_without_pubkey_says_the_signature_was_not_checked(blobs: dict[str, Path]):
    result = invoke("blob", "inspect", blobs["cancer"])
    assert result.exit_code == 0, result.output
    assert "signature NOT checked" in result.stdout
    assert "signature OK" not in result.stdout
    assert "param_version 1  epoch 0" in result.stdout


def test_blob_inspect_expect_schema_accepts_the_matching_schema(keys: Keys, blobs: dict[str, Path]):
    schema_hex = re.search(
        r"schema_id ([0-9a-f]{16})", invoke("blob", "inspect", blobs["iris"]).stdout
    )
    assert schema_hex
    for extra in ([], ["--pubkey", keys.pub]):
        r = invoke(
            "blob", "inspect", blobs["iris"], "--expect-schema", schema_hex.group(1).upper(), *extra
        )
        assert r.exit_code == 0, r.output


def _claim_release_key(keys: Keys) -> Any:
    """The other key's blob with its header claiming the release key: a wrong signature."""
    key_id = load_signing_key(keys.key).key_id.to_bytes(4, "little")

    def edit(data: bytearray) -> bytearray:
        data[64:68] = key_id
        return data

    return edit


# (name, source blob, edit, with --pubkey: reason, without --pubkey: reason or None = accepted)
TAMPERS = [
    ("header byte", "iris", flip(20), "bad_signature", None),
    ("signature byte", "iris", flip(HEADER_LEN + 5), "bad_signature", None),
    ("payload byte", "iris", flip(PAYLOAD_OFFSET + 40), "hash_mismatch", "hash_mismatch"),
    ("last payload byte", "cancer", flip(-1), "hash_mismatch", "hash_mismatch"),
    ("truncated payload", "iris", lambda d: d[:500], "truncated", "truncated"),
    ("truncated signature", "iris", lambda d: d[:120], "truncated", "truncated"),
    ("truncated header", "iris", lambda d: d[:50], "truncated", "truncated"),
    ("trailing byte", "iris", lambda d: d + b"\0", "unsupported_format", "unsupported_format"),
    ("bad magic", "iris", flip(0), "unsupported_format", "unsupported_format"),
    ("other key's blob", "iris_other", lambda d: d, "unknown_key", None),
]


@pytest.mark.parametrize(
    ("src", "edit", "reason", "reason_unsigned"),
    [t[1:] for t in TAMPERS],
    ids=[t[0] for t in TAMPERS],
)
def test_blob_inspect_rejects_a_tampered_blob_with_one_line_reason(
    src: str,
    edit: Any,
    reason: str,
    reason_unsigned: str | None,
    keys: Keys,
    blobs: dict[str, Path],
    tmp_path: Path,
):
    bad = tampered(blobs[src], tmp_path / "bad.blob", edit)

    result = invoke("blob", "inspect", bad, "--pubkey", keys.pub)
    assert_one_line_error(result, f"blob rejected: {reason}:")
    assert result.stdout == ""

    unsigned = invoke("blob", "inspect", bad)
    if reason_unsigned is None:  # only the signature could tell: say it was not checked
        assert unsigned.exit_code == 0, unsigned.output
        assert "signature NOT checked" in unsigned.stdout
    else:
        assert_one_line_error(unsigned, f"blob rejected: {reason_unsigned}:")


def test_blob_inspect_bad_signature_from_another_key(
    keys: Keys, blobs: dict[str, Path], tmp_path: Path
):
    bad = tampered(blobs["iris_other"], tmp_path / "bad.blob", _claim_release_key(keys))
    key_id = load_signing_key(keys.key).key_id
    result = invoke("blob", "inspect", bad, "--pubkey", keys.pub)
    assert_one_line_error(result, "bad_signature", f"{key_id:#010x}")
    # the other key's own blob is fine under the other key, unknown under the release key
    assert invoke("blob", "inspect", blobs["iris_other"], "--pubkey", keys.other_pub).exit_code == 0
    assert_one_line_error(
        invoke("blob", "inspect", blobs["iris"], "--pubkey", keys.other_pub), "unknown_key"
    )


def test_blob_inspect_schema_mismatch(keys: Keys, blobs: dict[str, Path]):
    cancer_schema = re.search(
        r"schema_id ([0-9a-f]{16})", invoke("blob", "inspect", blobs["cancer"]).stdout
    )
    assert cancer_schema
    for extra in (["--pubkey", keys.pub], []):
        result = invoke(
            "blob", "inspect", blobs["iris"], "--expect-schema", cancer_schema.group(1), *extra
        )
        assert_one_line_error(result, "blob rejected: schema_mismatch:", cancer_schema.group(1))


@pytest.mark.parametrize("value", ["zz", "90fa", "0123456789abcdef00"])
@pytest.mark.parametrize("with_pubkey", [True, False])
def test_blob_inspect_expect_schema_must_be_16_hex_characters(
    value: str, with_pubkey: bool, keys: Keys, blobs: dict[str, Path]
):
    extra = ["--pubkey", keys.pub] if with_pubkey else []
    result = invoke("blob", "inspect", blobs["iris"], "--expect-schema", value, *extra)
    assert_one_line_error(result, "--expect-schema", "16 hex characters")


def test_blob_inspect_unreadable_files(keys: Keys, blobs: dict[str, Path], tmp_path: Path):
    assert_one_line_error(invoke("blob", "inspect", tmp_path / "none.blob"), "cannot read")
    assert_one_line_error(
        invoke("blob", "inspect", blobs["iris"], "--pubkey", keys.key), "not a PEM public key"
    )


# -- tinydrift blob run ---------------------------------------------------------------------


def test_blob_run_prints_the_integer_kernels_label_per_row(
    model: Model, keys: Keys, blobs: dict[str, Path]
):
    blob = blobs["iris" if model.name == "iris" else "cancer"]

    result = invoke("blob", "run", blob, "--pubkey", keys.pub, "--input", model.csv_path)

    assert result.exit_code == 0, result.output
    labels = result.stdout.splitlines()
    assert len(labels) == len(model.x)
    integer = model.integer_pred()
    assert labels == [model.classes[c] for c in integer]
    sklearn_labels = [model.classes[c] for c in model.sklearn_pred]
    agreement = np.mean([a == b for a, b in zip(labels, sklearn_labels, strict=True)])
    assert agreement >= 0.97
    assert len(set(labels)) == len(model.classes)  # not a constant predictor


def test_blob_run_reads_columns_by_header_name_in_any_order(
    iris: Model, keys: Keys, blobs: dict[str, Path], tmp_path: Path
):
    order = [2, 0, 3, 1]
    rows = [[f"row-{i}", *(iris.x[i, order])] for i in range(len(iris.x))]
    shuffled = write_csv(tmp_path / "s.csv", ["id", *(iris.features[j] for j in order)], rows)

    a = invoke("blob", "run", blobs["iris"], "--pubkey", keys.pub, "--input", shuffled)
    b = invoke("blob", "run", blobs["iris"], "--pubkey", keys.pub, "--input", iris.csv_path)

    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout
    assert a.stdout.splitlines() == [iris.classes[c] for c in iris.integer_pred()]


def _iris_rows(iris: Model, n: int = 3) -> list[list[Any]]:
    return [list(r) for r in iris.x[:n]]


BAD_CSV = {
    "missing column": (
        lambda m: (m.features[:3], [r[:3] for r in _iris_rows(m)]),
        ["lacks feature column(s) petal width (cm)"],
    ),
    "non-numeric": (
        lambda m: (m.features, [*_iris_rows(m, 2), [5.0, "abc", 1.0, 0.2]]),
        ["line 4", "sepal width (cm)", "'abc' is not a number"],
    ),
    "NaN": (
        lambda m: (m.features, [*_iris_rows(m, 1), [5.0, 3.0, "NaN", 0.2]]),
        ["line 3", "petal length (cm)", "NaN or infinite"],
    ),
    "infinite": (
        lambda m: (m.features, [[5.0, 3.0, 1.0, "inf"]]),
        ["line 2", "petal width (cm)", "NaN or infinite"],
    ),
    "short row": (
        lambda m: (m.features, [*_iris_rows(m, 1), [5.0, 3.0]]),
        ["line 3", "2 field(s)", "header has 4"],
    ),
}


@pytest.mark.parametrize(("make", "needles"), BAD_CSV.values(), ids=BAD_CSV.keys())
def test_blob_run_bad_csv_is_one_error_line_and_no_labels(
    make: Any, needles: list[str], iris: Model, keys: Keys, blobs: dict[str, Path], tmp_path: Path
):
    header, rows = make(iris)
    data = write_csv(tmp_path / "in.csv", header, rows)

    result = invoke("blob", "run", blobs["iris"], "--pubkey", keys.pub, "--input", data)

    assert_one_line_error(result, str(data), *needles)
    assert result.stdout == ""


def test_blob_run_csv_edge_cases(iris: Model, keys: Keys, blobs: dict[str, Path], tmp_path: Path):
    def run(path: Path) -> Result:
        return invoke("blob", "run", blobs["iris"], "--pubkey", keys.pub, "--input", path)

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_one_line_error(run(empty), "is empty", "header row")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81junk")
    assert_one_line_error(run(binary), "not a UTF-8 CSV")
    assert_one_line_error(run(tmp_path / "none.csv"), "cannot read", "No such file")
    # blank lines (a trailing one from an editor) are skipped, a BOM is ignored
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + ",".join(iris.features) + "\n5.1,3.5,1.4,0.2\n\n6.7,3.0,5.2,2.3\n\n")
    ok = run(bom)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines() == ["setosa", "virginica"]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (flip(PAYLOAD_OFFSET + 100), "hash_mismatch"),
        (flip(24), "bad_signature"),
        (lambda d: d[:-10], "truncated"),
    ],
)
def test_blob_run_refuses_a_tampered_blob_before_any_prediction(
    edit: Any, reason: str, iris: Model, keys: Keys, blobs: dict[str, Path], tmp_path: Path
):
    bad = tampered(blobs["iris"], tmp_path / "bad.blob", edit)
    result = invoke("blob", "run", bad, "--pubkey", keys.pub, "--input", iris.csv_path)
    assert_one_line_error(result, f"blob rejected: {reason}")
    assert result.stdout == ""


def test_blob_run_refuses_an_unknown_key(iris: Model, keys: Keys, blobs: dict[str, Path]):
    result = invoke(
        "blob", "run", blobs["iris_other"], "--pubkey", keys.pub, "--input", iris.csv_path
    )
    assert_one_line_error(result, "blob rejected: unknown_key")
    assert result.stdout == ""


def test_blob_run_refuses_a_signed_blob_whose_known_answers_are_wrong(
    iris: Model, keys: Keys, blobs: dict[str, Path], tmp_path: Path
):
    pub = trusted_keys([load_public_key(keys.pub)])
    good = verify_blob(blobs["iris"].read_bytes(), trusted=pub, schema_id=None).params
    kats = replace(
        good.kats, logits=good.kats.logits + np.eye(*good.kats.logits.shape, dtype=np.int64)
    )
    bad_params = ParameterSet(
        schema=good.schema, model=good.model, kats=kats, min_confidence=0, provenance={}
    )
    bad = tmp_path / "kat.blob"
    bad.write_bytes(
        build_blob(bad_params, param_version=8, security_epoch=2, key=load_signing_key(keys.key))
    )
    assert invoke("blob", "inspect", bad, "--pubkey", keys.pub).exit_code == 0  # signed and intact

    result = invoke("blob", "run", bad, "--pubkey", keys.pub, "--input", iris.csv_path)

    assert_one_line_error(result, "blob rejected: kat_mismatch")
    assert result.stdout == ""


# -- the installed console script -----------------------------------------------------------


def _console_script() -> str:
    exe = shutil.which("tinydrift")
    assert exe, "the tinydrift console script is not on PATH: pip install -e ."
    return exe


def test_console_script_runs_the_same_app(keys: Keys, blobs: dict[str, Path], iris: Model):
    exe = _console_script()
    inspect = subprocess.run(
        [exe, "blob", "inspect", str(blobs["iris"]), "--pubkey", str(keys.pub)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert inspect.returncode == 0, inspect.stderr
    assert inspect.stdout == invoke("blob", "inspect", blobs["iris"], "--pubkey", keys.pub).stdout

    run = subprocess.run(
        [
            exe,
            "blob",
            "run",
            str(blobs["iris"]),
            "--pubkey",
            str(keys.pub),
            "--input",
            str(iris.csv_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [iris.classes[c] for c in iris.integer_pred()]


def test_console_script_error_is_one_line_without_traceback(
    iris: Model, keys: Keys, tmp_path: Path
):
    dup = tmp_path / "dup.json"
    params = dict(iris.params, features=["a", "b", "a", "d"])
    dup.write_text(json.dumps(params))
    proc = subprocess.run(
        [
            _console_script(),
            "blob",
            "build",
            "--params",
            str(dup),
            "--key",
            str(keys.key),
            "--version",
            "1",
            "--out",
            str(tmp_path / "x.blob"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {dup}: feature names must be unique; repeated: a"]


# -- parse_broker ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example:1884", BrokerAddress("broker.example", 1884)),
        ("mqtt://127.0.0.1", BrokerAddress("127.0.0.1", 1883)),
        ("mqtt://127.0.0.1:", BrokerAddress("127.0.0.1", 1883)),
        ("10.1.2.3:2000", BrokerAddress("10.1.2.3", 2000)),
        ("mqtt://[::1]:1885", BrokerAddress("::1", 1885)),
        ("mqtt://h:65535/", BrokerAddress("h", 65535)),
    ],
)
def test_parse_broker_accepts(url: str, expected: BrokerAddress):
    assert parse_broker(url) == expected


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://h:1883", "expected mqtt://HOST:PORT"),
        ("mqtts://h:8883", "expected mqtt://HOST:PORT"),
        ("mqtt://:1883", "expected mqtt://HOST:PORT"),
        ("", "expected mqtt://HOST:PORT"),
        ("mqtt://h:abc", "the port must be a number 1-65535"),
        ("mqtt://h:70000", "the port must be a number 1-65535"),
        ("mqtt://h:0", "the port must be a number 1-65535"),
        ("mqtt://h:-1", "the port must be a number 1-65535"),
        ("mqtt://h:1883/fleet", "nothing after the port"),
        ("mqtt://dev:secret@h:1883", "--password"),
    ],
)
def test_parse_broker_rejects_with_a_clear_message(
    url: str, needle: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(typer.Exit) as exc:
        parse_broker(url)
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [err[0]]
    assert err[0].startswith(f"error: bad broker URL {url!r}: ")
    assert needle in err[0]


def test_fleet_sim_checks_the_broker_url_before_doing_anything(tmp_path: Path):
    result = invoke("fleet-sim", "--broker", "tcp://127.0.0.1:1883", "--state-dir", tmp_path / "s")
    assert_one_line_error(result, "bad broker URL 'tcp://127.0.0.1:1883'")
    assert not (tmp_path / "s").exists()


def test_registry_import_blob_verifies_against_the_release_key(
    keys: Keys, blobs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A set signed by another key is refused (devices would refuse it and a canary would be
    spent); without a key to verify with nothing is imported."""
    from service.registry.store import Registry

    db = f"sqlite:///{tmp_path / 'r.db'}"
    monkeypatch.delenv("TINYDRIFT_RELEASE_KEY", raising=False)
    assert_one_line_error(
        invoke("registry", "import-blob", blobs["iris"], "--db", db), "no key", "--pubkey"
    )
    assert_one_line_error(
        invoke("registry", "import-blob", blobs["iris_other"], "--db", db, "--pubkey", keys.pub),
        "blob rejected",
        "unknown_key",
    )
    monkeypatch.setenv("TINYDRIFT_RELEASE_KEY", str(keys.key))  # the service's own key
    assert_one_line_error(
        invoke("registry", "import-blob", blobs["iris_other"], "--db", db), "unknown_key"
    )
    reg = Registry(db)
    try:
        assert reg.list_parameter_sets() == []
    finally:
        reg.close()
    ok = invoke("registry", "import-blob", blobs["iris"], "--db", db)
    assert ok.exit_code == 0, ok.output
    assert "registered" in ok.output
    ok = invoke("registry", "import-blob", blobs["cancer"], "--db", db, "--pubkey", keys.pub)
    assert ok.exit_code == 0, ok.output
    reg = Registry(db)
    try:
        assert len(reg.list_parameter_sets()) == 2
    finally:
        reg.close()
