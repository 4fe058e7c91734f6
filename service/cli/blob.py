"""``tinydrift blob``: build, inspect and run signed parameter blobs from the command line."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import typer

from edge_agent.blob import (
    BlobRejectedError,
    KeyFileError,
    ParameterSet,
    VerifiedBlob,
    build_blob,
    load_public_key,
    load_signing_key,
    trusted_keys,
    verify_blob,
)
from edge_agent.blob.float_model import FloatLinearModel, FloatModelError
from edge_agent.blob.signed_blob import DEFAULT_MAX_BLOB
from edge_agent.fixedpoint import FixedPointOverflowError, quantization_report
from service.cli.errors import fail

app = typer.Typer(help="Signed parameter blobs.", no_args_is_help=True)


def read_feature_csv(path: Path, features: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """Read a CSV with a header row naming the features (any order, extra columns ignored).

    Blank lines are skipped; a missing column, a short row, a field that is not a number, NaN or
    infinity ends the command with one line naming the file, line and column.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except (UnicodeDecodeError, csv.Error) as exc:
        fail(f"{path} is not a UTF-8 CSV file: {exc}")
    if not rows:
        fail(f"{path} is empty; it needs a header row of feature names")
    header = [h.strip() for h in rows[0][1]]
    missing = [f for f in features if f not in header]
    if missing:
        fail(f"{path} lacks feature column(s) {', '.join(missing)}")
    cols = [header.index(f) for f in features]
    out = np.empty((len(rows) - 1, len(features)))
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) <= max(cols):
            fail(f"{path} line {line}: {len(row)} field(s), but the header has {len(header)}")
        for j, c in enumerate(cols):
            try:
                out[i, j] = float(row[c])
            except ValueError:
                fail(f"{path} line {line}, column {features[j]}: {row[c]!r} is not a number")
            if not np.isfinite(out[i, j]):
                fail(f"{path} line {line}, column {features[j]}: NaN or infinite value")
    return out


@app.command("build")
def build(
    params: Annotated[Path, typer.Option("--params", help="Float model PARAMS.json.")],
    key: Annotated[Path, typer.Option("--key", help="Release private key (PEM).")],
    version: Annotated[int, typer.Option("--version", min=0, max=2**32 - 1)],
    out: Annotated[Path, typer.Option("--out", help="Blob file to write.")],
    epoch: Annotated[int, typer.Option("--epoch", min=0, help="Security epoch.")] = 0,
    calibration: Annotated[
        Path | None, typer.Option(help="CSV of real readings for KATs and the agreement report.")
    ] = None,
    min_confidence: Annotated[int, typer.Option(min=0, max=255, help="1/256 units.")] = 0,
) -> None:
    """Quantize a float linear model, compute its known answers, sign it and write the blob."""
    try:
        fm = FloatLinearModel.load(params)
        signing_key = load_signing_key(key)
        model = fm.quantize()
        schema = fm.parameter_schema()
    except (FloatModelError, KeyFileError) as exc:
        fail(str(exc))
    except FixedPointOverflowError as exc:
        fail(f"{params}: {exc}; rescale the model (smaller bias or weights)")
    x = read_feature_csv(calibration, schema.features) if calibration else None
    if x is not None and len(x) == 0:
        fail(f"{calibration} has a header but no data rows; give real readings or omit it")
    ps = ParameterSet.create(
        schema,
        model,
        calibration=x,
        min_confidence=min_confidence,
        provenance={
            "source": params.name,
            "sha256": hashlib.sha256(params.read_bytes()).hexdigest(),
        },
    )
    data = build_blob(ps, param_version=version, security_epoch=epoch, key=signing_key)
    if len(data) > DEFAULT_MAX_BLOB:
        fail(f"blob is {len(data)} bytes, over the {DEFAULT_MAX_BLOB}-byte device slot")
    try:
        out.write_bytes(data)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}")
    rep = quantization_report(model, fm.weights, fm.bias, fm.mu, fm.sigma, x)
    typer.echo(
        f"wrote {out} ({len(data)} bytes), schema_id {schema.schema_id_hex}, "
        f"param_version {version}, epoch {epoch}, key_id {signing_key.key_id:#010x}"
    )
    typer.echo(
        f"quantization: max weight error {rep.max_weight_error:.3g}, "
        f"max bias error {rep.max_bias_error:.3g}, weight saturations {rep.weight_saturations}"
    )
    typer.echo(
        f"size: int8 weights+int32 bias {model.weight_bytes} B vs float32 "
        f"{model.float_weight_bytes} B ({model.float_weight_bytes / model.weight_bytes:.2f}x)"
    )
    if rep.agreement is not None and rep.input_saturation_rate is not None:
        typer.echo(
            f"calibration ({len(x) if x is not None else 0} rows): agreement with float "
            f"{100 * rep.agreement:.2f} %, inputs clipped at ±4σ "
            f"{100 * rep.input_saturation_rate:.2f} %"
        )


def _load_blob(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


def _schema_id(expect_schema: str | None) -> bytes | None:
    if expect_schema is None:
        return None
    try:
        schema_id = bytes.fromhex(expect_schema)
    except ValueError:
        schema_id = b""
    if len(schema_id) != 8:
        fail(f"--expect-schema {expect_schema!r}: a schema_id is 16 hex characters")
    return schema_id


def _verified(data: bytes, pubkey: Path, expect_schema: str | None) -> VerifiedBlob:
    schema_id = _schema_id(expect_schema)
    try:
        trusted = trusted_keys([load_public_key(pubkey)])
    except KeyFileError as exc:
        fail(str(exc))
    try:
        return verify_blob(data, trusted=trusted, schema_id=schema_id)
    except BlobRejectedError as exc:
        fail(f"blob rejected: {exc}")


@app.command("inspect")
def inspect(
    file: Annotated[Path, typer.Argument(help="Blob file.")],
    pubkey: Annotated[
        Path | None, typer.Option("--pubkey", help="Verify the signature with this key.")
    ] = None,
    expect_schema: Annotated[
        str | None, typer.Option(help="schema_id (hex) the target firmware expects.")
    ] = None,
) -> None:
    """Print the header and sections; exit 1 with one line of reason if the blob is bad."""
    data = _load_blob(file)
    if pubkey is not None:
        v = _verified(data, pubkey, expect_schema)
        header, params, status = v.header, v.params, "signature OK"
    else:
        schema_id = _schema_id(expect_schema)
        try:
            unsigned = verify_blob(data, trusted=None, schema_id=schema_id)
        except BlobRejectedError as exc:
            fail(f"blob rejected: {exc}")
        header, params = unsigned.header, unsigned.params
        status = "signature NOT checked (give --pubkey)"
    m, s = params.model, params.schema
    typer.echo(f"TDPB v1  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    typer.echo(
        f"schema_id {header.schema_id.hex()}  param_version {header.param_version}  "
        f"epoch {header.security_epoch}  key_id {header.key_id:#010x}  created {header.created}"
    )
    typer.echo(f"{status}; payload {header.payload_len} bytes, hash OK")
    typer.echo(
        f"family {s.family}  kernel ABI {s.kernel_abi}  rounding {s.rounding}  "
        f"input scale {s.input_scale}"
    )
    typer.echo(f"features ({s.n_features}): {', '.join(s.features)}")
    typer.echo(f"classes ({s.n_classes}): {', '.join(s.classes)}; weight rows {m.n_rows}")
    typer.echo(
        f"weights int8 {m.weights.shape[0]}x{m.weights.shape[1]} (|w| max "
        f"{int(np.abs(m.weights).max())}), bias int32, s_out {m.s_out:.6g}"
    )
    typer.echo(f"known answers {params.kats.n}, min_confidence {params.min_confidence}/256")
    typer.echo(f"provenance {json.dumps(dict(params.provenance), sort_keys=True)}")


@app.command("run")
def run(
    file: Annotated[Path, typer.Argument(help="Blob file.")],
    pubkey: Annotated[Path, typer.Option("--pubkey", help="Release public key.")],
    input: Annotated[Path, typer.Option("--input", help="CSV: header of feature names.")],
) -> None:
    """Verify the blob, run its KATs, then print one predicted label per CSV row."""
    v = _verified(_load_blob(file), pubkey, None)
    try:
        v.run_known_answers()
    except BlobRejectedError as exc:
        fail(f"blob rejected: {exc}")
    x = read_feature_csv(input, v.params.schema.features)
    classes = v.params.schema.classes
    for c in v.params.model.predict(x).tolist() if len(x) else []:
        typer.echo(classes[c])
