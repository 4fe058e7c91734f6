"""Label-free recalibration: new input normalisation for a device whose sensor aged.

A gain/offset drift of the sensor (``edge_agent.device.simulator.DriftSpec`` kinds ``gain`` and
``offset``) changes a device's raw features ``x`` into ``x' ≈ a·x + b`` per feature. From the
device's fixed reference statistics before the drift (``m0``, ``s0``: ``DeviceMonitor.reference``)
and its recent raw readings after it (``m1``, ``s1``), moment matching gives

    ``a = s1 / s0``,  ``b = m1 − a·m0``.

The deployed model standardises with ``(x − mu) / sigma``. With ``mu' = a·mu + b`` and
``sigma' = a·sigma``, ``(x' − mu') / sigma' = (x − mu) / sigma``: the drifted readings reach the
shared integer weights exactly as the undrifted ones did. Only the float32 ``mu`` and
``inv_sigma`` of the :class:`~edge_agent.fixedpoint.QuantizedLinear` change; weights, bias and
requantization stay bit for bit, and the new :class:`~edge_agent.blob.ParameterSet` carries fresh
known answers computed from the recent readings.

Assumptions and limits: the class mix of the recent window must resemble the reference's (a
class-prior change would be mistaken for gain/offset), the drift must be stationary over the
window (checked by the split-half diagnostics), and features that are not affine in the raw
signal (``mag_mean`` under an offset on some axes) are corrected only to first order.

>>> import numpy as np
>>> a, b = fit_affine(np.array([1.0, 0.0]), np.array([2.0, 1.0]),
...                   np.array([[3.0, 0.5], [5.0, 2.5], [7.0, 0.5], [9.0, 2.5]] * 20),
...                   shrink_z=0.0)
>>> a.round(3).tolist(), b.round(3).tolist()
([1.118, 1.0], [4.882, 1.5])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.blob import ParameterSet
from edge_agent.blob.float_model import FloatLinearModel
from edge_agent.fixedpoint import QuantizedLinear
from service.learn.deployed import DeployedModel

FloatArray = npt.NDArray[np.float64]

MIN_READINGS = 64
"""Fewest recent readings a recalibration accepts (the standard error of ``a`` is ≈ 1/√(2n))."""
MIN_STD = 1e-6
"""Reference or recent standard deviations below this (in feature units) are refused."""
SHRINK_Z = 3.0
"""Changes below this many standard errors are treated as noise (see :func:`fit_affine`)."""
REFERENCE_READINGS = 512
"""Readings behind the reference statistics (``DeviceMonitorConfig.reference_readings``)."""
MAX_GAIN = 10.0
"""Gains outside ``[1/MAX_GAIN, MAX_GAIN]`` are refused as implausible for sensor aging."""


class RecalibrationError(ValueError):
    """The inputs cannot support a recalibration; the message names the feature and the fix."""


@dataclass(frozen=True)
class RecalibrationDiagnostics:
    """What the fit found and how well it holds on the recent window."""

    features: tuple[str, ...]
    gain: tuple[float, ...]
    """``a`` per feature (1 = no gain change)."""
    offset: tuple[float, ...]
    """``b`` per feature, in feature units."""
    readings: int
    """Recent readings the fit used."""
    split_z_mean: tuple[float, ...]
    """Split-half check: fit on the first half, map the second half back to the reference scale
    with ``(x − b)/a``; its mean minus ``m0`` in units of ``s0`` (≈ 0 if the drift is affine and
    stationary; noise ≈ ``1/√(n/2)``)."""
    split_std_ratio: tuple[float, ...]
    """Same check: the back-mapped second half's standard deviation over ``s0`` (≈ 1)."""
    changed_predictions: float
    """Share of the recent readings whose predicted class the recalibration changes."""

    @property
    def max_abs_z_mean(self) -> float:
        """Worst feature of :attr:`split_z_mean`."""
        return float(np.max(np.abs(self.split_z_mean)))

    @property
    def max_abs_log_std_ratio(self) -> float:
        """Worst feature of :attr:`split_std_ratio` as ``|ln ratio|``."""
        return float(np.max(np.abs(np.log(self.split_std_ratio))))


@dataclass(frozen=True, eq=False)
class RecalibrationCandidate:
    """A recalibrated parameter set (same integer weights, new ``mu``/``inv_sigma``)."""

    params: ParameterSet
    float_model: FloatLinearModel
    """The float model the new parameters represent (dequantized weights, new ``mu``/``sigma``)."""
    diagnostics: RecalibrationDiagnostics


def _check_recent(recent: npt.ArrayLike, n_features: int, min_readings: int) -> FloatArray:
    x = np.asarray(recent, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise RecalibrationError(
            f"recent readings must have shape (n, {n_features}), got {x.shape}"
        )
    if x.shape[0] < min_readings:
        raise RecalibrationError(
            f"{x.shape[0]} recent readings; recalibration needs at least {min_readings}"
        )
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise RecalibrationError(f"recent reading {int(bad[0])} is not finite (NaN or inf)")
    return x


def fit_affine(
    reference_mean: npt.ArrayLike,
    reference_std: npt.ArrayLike,
    recent: npt.ArrayLike,
    *,
    min_readings: int = MIN_READINGS,
    min_std: float = MIN_STD,
    max_gain: float = MAX_GAIN,
    features: tuple[str, ...] | None = None,
    shrink_z: float = SHRINK_Z,
    reference_readings: int = REFERENCE_READINGS,
) -> tuple[FloatArray, FloatArray]:
    """Moment-matched ``(a, b)`` per feature with ``recent ≈ a·x_ref + b``.

    With ``shrink_z > 0`` a change that is not significant is dropped, feature by feature: a
    gain whose ``|ln a|`` is below ``shrink_z`` standard errors becomes 1 (offset only,
    ``b = m1 − m0``), and then an offset below ``shrink_z`` standard errors becomes 0. Standard
    errors: ``SE(ln a) ≈ ½·√((κ − 1)(1/n0 + 1/n1))`` with ``κ`` the recent window's kurtosis
    (moments of mixtures of activities are heavy-tailed), ``SE(b) = √(s0²/n0 + s1²/n1)``;
    ``n0 = reference_readings``. Unshrunk moment matching turns class-mix noise in a window into
    spurious gains (``mag_mean``'s ratio of standard deviations varies by ±15 % between
    undrifted windows of 512 readings).

    Raises :class:`RecalibrationError` for too few or non-finite readings, non-finite reference
    statistics, a (near-)zero reference or recent standard deviation, or an implausible gain.
    """
    m0 = np.asarray(reference_mean, dtype=np.float64)
    s0 = np.asarray(reference_std, dtype=np.float64)
    if m0.ndim != 1 or s0.shape != m0.shape:
        raise RecalibrationError("the reference mean and std must be 1-D of the same length")
    names = features or tuple(f"feature {j}" for j in range(m0.size))
    x = _check_recent(recent, m0.size, min_readings)
    for what, arr in (("mean", m0), ("std", s0)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise RecalibrationError(f"reference {what} of {names[int(bad[0])]} is not finite")
    m1, s1 = x.mean(axis=0), x.std(axis=0)
    for what, arr in (("reference", s0), ("recent", s1)):
        small = np.flatnonzero(arr < min_std)
        if small.size:
            j = int(small[0])
            raise RecalibrationError(
                f"{what} std of {names[j]} is {arr[j]:.3g} (< {min_std:g}): a constant feature "
                "gives no gain estimate; recalibrate from a window where it varies"
            )
    a = s1 / s0
    b = m1 - a * m0
    if shrink_z > 0:
        a, b = _shrink(m0, s0, x, a, b, shrink_z, reference_readings)
    wild = np.flatnonzero(~np.isfinite(a) | (a <= 0) | (a > max_gain) | (a < 1.0 / max_gain))
    if wild.size:
        j = int(wild[0])
        raise RecalibrationError(
            f"gain of {names[j]} is {a[j]:.3g}, outside [1/{max_gain:g}, {max_gain:g}]: "
            "not a sensor-aging drift; retrain with labels instead"
        )
    if not np.all(np.isfinite(b)):
        raise RecalibrationError("the fitted offsets are not finite")
    return a, b


def _shrink(
    m0: FloatArray,
    s0: FloatArray,
    x: FloatArray,
    a: FloatArray,
    b: FloatArray,
    z: float,
    n0: int,
) -> tuple[FloatArray, FloatArray]:
    n1 = x.shape[0]
    m1, s1 = x.mean(axis=0), x.std(axis=0)
    kurt = np.mean(((x - m1) / s1) ** 4, axis=0)
    se_log_a = 0.5 * np.sqrt(np.maximum(kurt - 1.0, 0.0) * (1.0 / n0 + 1.0 / n1))
    gain_noise = np.abs(np.log(a)) < z * se_log_a
    a = np.where(gain_noise, 1.0, a)
    b = np.where(gain_noise, m1 - m0, b)
    se_b = np.sqrt(s0**2 / n0 + s1**2 / n1)
    offset_noise = gain_noise & (np.abs(b) < z * se_b)
    return a, np.where(offset_noise, 0.0, b)


def recalibrate(
    deployed: DeployedModel,
    reference: tuple[npt.ArrayLike, npt.ArrayLike],
    recent: npt.ArrayLike,
    *,
    device: str | None = None,
    min_readings: int = MIN_READINGS,
    min_std: float = MIN_STD,
    max_gain: float = MAX_GAIN,
    shrink_z: float = SHRINK_Z,
    reference_readings: int = REFERENCE_READINGS,
) -> RecalibrationCandidate:
    """Recalibrate ``deployed`` for a device from its reference ``(m0, s0)`` and recent readings.

    ``reference`` is ``DeviceMonitor.reference`` of the device and deployed version (raw
    features, before the drift); ``recent`` the device's raw readings after it, ``[n, F]``.
    Raises :class:`RecalibrationError` (see :func:`fit_affine`), also when the new normalisation
    does not fit the device's float32 input stage.
    """
    features = deployed.params.schema.features
    x = _check_recent(recent, len(features), min_readings)
    m0 = np.asarray(reference[0], dtype=np.float64)
    s0 = np.asarray(reference[1], dtype=np.float64)
    a, b = fit_affine(
        m0, s0, x, min_readings=min_readings, min_std=min_std, max_gain=max_gain,
        features=features, shrink_z=shrink_z, reference_readings=reference_readings,
    )  # fmt: skip

    old = deployed.params.model
    mu = old.mu.astype(np.float64)
    sigma = 1.0 / old.inv_sigma.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        new_mu = (a * mu + b).astype(np.float32)
        new_inv_sigma = (1.0 / (a * sigma)).astype(np.float32)
    if not (np.all(np.isfinite(new_mu)) and np.all(np.isfinite(new_inv_sigma))):
        raise RecalibrationError("the new mu or 1/sigma does not fit in float32")
    model = QuantizedLinear(
        mu=new_mu,
        inv_sigma=new_inv_sigma,
        weights=old.weights.copy(),
        bias=old.bias.copy(),
        multiplier=old.multiplier.copy(),
        shift=old.shift.copy(),
        s_out=old.s_out,
        n_classes=old.n_classes,
    )
    provenance = {
        "source": "recalibration",
        "base_version": deployed.param_version,
        "device": device,
        "readings": int(x.shape[0]),
        "gain": [round(float(v), 6) for v in a],
        "offset": [round(float(v), 6) for v in b],
    }
    params = ParameterSet.create(
        deployed.params.schema,
        model,
        calibration=x,
        min_confidence=deployed.params.min_confidence,
        provenance=provenance,
    )
    base = deployed.float_model()
    fm = base.model_copy(
        update={
            "mu": [float(v) for v in new_mu.astype(np.float64)],
            "sigma": [float(v) for v in 1.0 / new_inv_sigma.astype(np.float64)],
        }
    )

    half = x.shape[0] // 2
    a1, b1 = fit_affine(
        m0, s0, x[:half], min_readings=2, min_std=min_std, max_gain=max_gain,
        features=features, shrink_z=shrink_z, reference_readings=reference_readings,
    )  # fmt: skip
    back = (x[half:] - b1) / a1
    diagnostics = RecalibrationDiagnostics(
        features=tuple(features),
        gain=tuple(float(v) for v in a),
        offset=tuple(float(v) for v in b),
        readings=int(x.shape[0]),
        split_z_mean=tuple(float(v) for v in (back.mean(axis=0) - m0) / s0),
        split_std_ratio=tuple(float(v) for v in back.std(axis=0) / s0),
        changed_predictions=float(np.mean(model.predict(x) != old.predict(x))),
    )
    return RecalibrationCandidate(params=params, float_model=fm, diagnostics=diagnostics)
