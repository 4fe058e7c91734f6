"""Sensor simulator: a thigh-worn 3-axis accelerometer doing human-activity recognition.

A simulated device owns one :class:`SensorSimulator`. Each call to :meth:`SensorSimulator.sample`
synthesises ``n`` raw windows (2 s at 50 Hz, 100 samples per axis, units of g) *physically* and
reduces every window to the 8 features in :data:`FEATURES`, the vector the device's linear
classifier sees. Everything is vectorised over windows and deterministic given the seed.

Generative model (per window)
-----------------------------
The sensor sits in a trouser pocket on the thigh. Device axes: ``y`` along the thigh (pointing to
the hip), ``z`` out of the thigh's front face, ``x`` lateral. The body frame is (forward, lateral,
up); the accelerometer measures specific force, i.e. body acceleration plus ``+1 g`` along "up".

* **Thigh pitch** ``theta(t) = theta_m + A_theta sin(2 pi k f t + phi)`` rotates (forward, up) into
  (``z``, ``y``): this is how the *gravity vector's orientation* depends on the activity. Standing
  puts gravity on ``y``, sitting on ``z``, a pedalling thigh sits in between and swings.
* **Pocket roll** ``psi`` (per device, jittered per window) mixes ``x`` and ``z``; a small
  per-device **mount tilt** ``beta`` mixes ``y`` and ``z``.
* **Periodic motion** at the class cadence ``f``: vertical bounce with 2nd/3rd harmonics (heel
  strike), forward surge at ``f``, lateral sway at ``f/2``; the thigh swings at the stride frequency
  ``f/2`` when walking or running and at the pedal cadence ``f`` when cycling.
* **Amplitude** varies per window (log-normal) and per user; **cadence** varies per window and user.
* **Noise**: white sensor noise (per-device ``sigma0`` around 0.01 g) plus, for cycling, broadband
  road vibration; then a per-device calibration error (per-axis gain and zero-g offset) and a
  12-bit, +-8 g ADC (clipping and 3.9 mg quantisation).

========  ===============  =============  ================================================
class     cadence ``f``    thigh pitch    motion
========  ===============  =============  ================================================
still     0.2-0.8 Hz       0 or 80 deg    standing (40 %) or sitting; fidgeting of a few mg
walk      ~1.8 Hz (steps)  ~5 deg         bounce ~0.3 g, thigh swing ~20 deg at ``f/2``
run       ~2.8 Hz (steps)  ~15 deg        bounce ~0.6 g with impact harmonics, swing ~30 deg
cycle     ~1.2 Hz (pedal)  ~55 (30) deg   seated (or out of the saddle, 25 %); small bounce,
                                          swing ~20 deg at ``f``, road vibration ~0.04 g
========  ===============  =============  ================================================

Every class has per-window spread (cadence, amplitude, mean pitch, pocket roll) and 12 % of the
moving windows contain a start or stop of the activity (a smooth envelope on the motion). The
classes are learnable but overlap (slow runs and brisk walks, walking and out-of-the-saddle
pedalling, users with odd pocket orientations): a standardised logistic regression trained on
``generate_dataset(20_000, seed=0)`` scores about 0.92 on fresh devices (per device 0.82-0.95);
standing still is almost never confused, walk/run is the main confusion (see ``tests/unit``).

Drift (:class:`DriftSpec`) is applied on a schedule in simulated time (seconds since the device
started), either abruptly (``ramp_s=0``) or as a linear ramp. The random stream is consumed
identically whatever the drift, so a drifted and an undrifted simulator with the same seed see the
very same activities and the same underlying motion; only the drift differs.

>>> sim = SensorSimulator(seed=7)
>>> s = sim.sample(5, t=0.0)
>>> s.features.shape, s.features.dtype, s.labels.dtype
((5, 8), dtype('float64'), dtype('int64'))
>>> [CLASSES[c] for c in SensorSimulator(seed=7).sample(5, t=0.0).labels] == [
...     CLASSES[c] for c in s.labels]
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, get_args, overload

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ADC_LSB_G",
    "ADC_RANGE_G",
    "CLASSES",
    "DEFAULT_MAGNITUDE",
    "DRIFT_KINDS",
    "FEATURES",
    "FS_HZ",
    "WINDOW",
    "WINDOW_S",
    "DeviceProfile",
    "DriftKind",
    "DriftSpec",
    "Sample",
    "SensorSimulator",
    "generate_dataset",
    "window_times",
]

FS_HZ: Final = 50.0
"""Accelerometer output data rate."""
WINDOW: Final = 100
"""Samples per window and axis."""
WINDOW_S: Final = WINDOW / FS_HZ
"""Window length in seconds (2.0)."""
ADC_RANGE_G: Final = 8.0
"""Full-scale range of the simulated accelerometer, +-8 g."""
ADC_LSB_G: Final = 2.0 * ADC_RANGE_G / 4096.0
"""12-bit resolution over the full scale: 3.90625 mg per digit."""

FEATURES: Final[tuple[str, ...]] = (
    "mean_x",
    "mean_y",
    "mean_z",
    "std_x",
    "std_y",
    "std_z",
    "mag_mean",
    "mag_zcr_hz",
)
"""Per-window features, in order. ``mean_*``/``std_*``: per-axis mean and population standard
deviation (g). ``mag_mean``: mean of the magnitude ``|a|`` (g). ``mag_zcr_hz``: zero crossings of
``|a| - mean(|a|)`` per second, halved, i.e. a frequency estimate in Hz (0-25 Hz; high for
noise-dominated windows). Every feature lies in ``[-8, 25]``, so ``frac_bits <= 10`` fits int16."""

CLASSES: Final[tuple[str, ...]] = ("still", "walk", "run", "cycle")
"""Activity classes; the class id is the index."""

DriftKind = Literal["none", "gain", "offset", "noise", "prior", "concept"]
DRIFT_KINDS: Final[tuple[DriftKind, ...]] = get_args(DriftKind)

DEFAULT_MAGNITUDE: Final[dict[str, float]] = {
    "none": 0.0,
    "gain": 0.3,
    "offset": 0.25,
    "noise": 0.15,
    "prior": 0.7,
    "concept": 1.0,
}
"""Magnitude used when :class:`DriftSpec` is given none; each is clearly visible at full
intensity (see :class:`DriftSpec` for the meaning per kind)."""

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_N_CLASSES: Final = len(CLASSES)
_DEG: Final = math.pi / 180.0


# --------------------------------------------------------------------------------------------
# Drift specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriftSpec:
    """One drift, switched on at ``start_s`` and ramped linearly over ``ramp_s`` seconds.

    ``magnitude`` is the effect at full intensity; leave it out (NaN) for
    :data:`DEFAULT_MAGNITUDE` of the kind. At time ``t`` the effect is ``magnitude * intensity(t)``:

    ``none``
        nothing; magnitude ignored.
    ``gain``
        sensitivity aging: the raw reading of ``axis`` (``None``: all three axes) is multiplied by
        ``1 + magnitude * I``; must be ``> -1``. Means, stds and ``mag_mean`` scale with it.
    ``offset``
        bias aging: ``magnitude * I`` g is added to ``axis`` (``None``: all three axes).
    ``noise``
        the white sensor-noise standard deviation grows from the device's ``sigma0`` (about
        0.01 g) to ``sigma0 + magnitude * I`` g on ``axis`` (``None``: all axes); ``>= 0``.
    ``prior``
        class-prior change: the activity mix moves linearly from the device's own mix to one where
        class ``target`` has probability ``magnitude`` (in ``[0, 1]``) and the other classes share
        the rest in their original proportions. Class-conditional features do not change.
    ``concept``
        label change: a window whose activity is one of the pair ``swap`` is labelled as the other
        one of the pair with probability ``magnitude * I`` (``1.0``: the two labels swap
        completely). Inputs are untouched; only the label stream shows it.

    >>> d = DriftSpec("gain", start_s=100.0, ramp_s=50.0)
    >>> d.magnitude
    0.3
    >>> [d.intensity(t) for t in (0.0, 100.0, 125.0, 150.0, 1e9)]
    [0.0, 0.0, 0.5, 1.0, 1.0]
    >>> DriftSpec("offset", start_s=10.0).intensity(10.0)  # abrupt: full at start
    1.0
    """

    kind: DriftKind
    start_s: float
    ramp_s: float = 0.0
    magnitude: float = math.nan
    axis: int | None = None
    target: int = 2
    """``prior`` only: the class that becomes dominant (default ``run``: the user takes up
    running)."""
    swap: tuple[int, int] = field(default=(1, 2))
    """``concept`` only: the two classes whose labels are exchanged (default walk <-> run)."""

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.kind!r}")
        if not math.isfinite(self.start_s):
            raise ValueError("start_s must be finite")
        if not (math.isfinite(self.ramp_s) and self.ramp_s >= 0.0):
            raise ValueError("ramp_s must be finite and >= 0")
        if math.isnan(self.magnitude):
            object.__setattr__(self, "magnitude", DEFAULT_MAGNITUDE[self.kind])
        m = float(self.magnitude)
        object.__setattr__(self, "magnitude", m)
        if not math.isfinite(m):
            raise ValueError("magnitude must be finite")
        if self.kind == "gain" and m <= -1.0:
            raise ValueError("gain magnitude must be > -1")
        if self.kind == "noise" and m < 0.0:
            raise ValueError("noise magnitude must be >= 0")
        if self.kind in ("prior", "concept") and not 0.0 <= m <= 1.0:
            raise ValueError(f"{self.kind} magnitude must be in [0, 1]")
        if self.axis is not None:
            if self.kind not in ("gain", "offset", "noise"):
                raise ValueError("axis applies to gain, offset and noise drift only")
            if self.axis not in (0, 1, 2):
                raise ValueError("axis must be 0, 1, 2 or None")
        if not 0 <= self.target < _N_CLASSES:
            raise ValueError("target must be a class index")
        a, b = self.swap
        if not (0 <= a < _N_CLASSES and 0 <= b < _N_CLASSES and a != b):
            raise ValueError("swap must be two distinct class indices")

    @overload
    def intensity(self, t: float) -> float: ...
    @overload
    def intensity(self, t: FloatArray) -> FloatArray: ...
    def intensity(self, t: float | FloatArray) -> float | FloatArray:
        """Drift intensity in ``[0, 1]`` at time ``t`` (seconds since device start).

        0 before ``start_s``; rises linearly to 1 over ``ramp_s``; 1 from ``start_s + ramp_s`` on
        (from ``start_s`` on for an abrupt drift). Always 0 for kind ``none``. Vectorised: an
        array ``t`` gives an array.
        """
        ta = np.asarray(t, dtype=np.float64)
        if self.kind == "none":
            out = np.zeros_like(ta)
        elif self.ramp_s == 0.0:
            out = (ta >= self.start_s).astype(np.float64)
        else:
            out = np.clip((ta - self.start_s) / self.ramp_s, 0.0, 1.0)
        if np.ndim(t) == 0:
            return float(out)
        return out


# --------------------------------------------------------------------------------------------
# Device profile and class table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """The per-device ground truth drawn from the seed (calibration error and user style)."""

    gain: tuple[float, float, float]
    """Per-axis sensitivity error factor (about 1 +- 2 %)."""
    offset: tuple[float, float, float]
    """Per-axis zero-g offset in g (about +-30 mg)."""
    sigma0: float
    """White sensor-noise standard deviation in g."""
    cadence: float
    """User's cadence multiplier (about 1 +- 6 %)."""
    vigour: float
    """User's motion amplitude multiplier (log-normal around 1)."""
    pocket_roll_deg: float
    """How the device is rotated about the thigh axis in the pocket."""
    mount_tilt_deg: float
    """Tilt of the device against the thigh axis."""
    bike_deg: float
    """Offset of the mean thigh pitch while cycling (bike geometry)."""
    class_prior: tuple[float, float, float, float]
    """The user's own activity mix (used unless the caller gives one)."""

    @classmethod
    def draw(cls, rng: np.random.Generator) -> DeviceProfile:
        """Draw a profile; consumes a fixed number of variates."""
        gain = 1.0 + 0.02 * rng.standard_normal(3)
        offset = 0.03 * rng.standard_normal(3)
        prior = rng.dirichlet(np.full(_N_CLASSES, 40.0))
        return cls(
            gain=(float(gain[0]), float(gain[1]), float(gain[2])),
            offset=(float(offset[0]), float(offset[1]), float(offset[2])),
            sigma0=float(rng.uniform(0.006, 0.012)),
            cadence=float(1.0 + 0.06 * rng.standard_normal()),
            vigour=float(np.exp(0.15 * rng.standard_normal())),
            pocket_roll_deg=float(rng.uniform(-30.0, 30.0)),
            mount_tilt_deg=float(8.0 * rng.standard_normal()),
            bike_deg=float(8.0 * rng.standard_normal()),
            class_prior=(float(prior[0]), float(prior[1]), float(prior[2]), float(prior[3])),
        )


class _ClassTable(NamedTuple):
    cadence_hz: FloatArray  # base cadence f
    cadence_sd: FloatArray  # relative per-window spread of f
    swing_k: FloatArray  # thigh swing frequency = k * f
    pitch_deg: FloatArray  # mean thigh pitch
    pitch_alt_deg: FloatArray  # alternative posture pitch (still: sitting)
    pitch_alt_p: FloatArray  # probability of the alternative posture
    pitch_sd_deg: FloatArray  # per-window spread of the mean pitch
    swing_deg: FloatArray  # thigh swing amplitude
    bounce_g: FloatArray  # vertical amplitude at f
    h2: FloatArray  # 2nd harmonic of the bounce, relative
    h3: FloatArray  # 3rd harmonic of the bounce, relative
    surge_g: FloatArray  # forward amplitude at f
    sway_g: FloatArray  # lateral amplitude at f/2
    amp_sd: FloatArray  # per-window log-normal amplitude spread
    vibration_g: FloatArray  # broadband body/road vibration std (median; log-normal per window)
    transition_p: FloatArray  # probability that the motion starts or stops within the window


def _table() -> _ClassTable:
    def a(*v: float) -> FloatArray:
        return np.array(v, dtype=np.float64)

    #              still  walk   run    cycle
    return _ClassTable(
        cadence_hz=a(0.5, 1.8, 2.8, 1.2),
        cadence_sd=a(0.40, 0.12, 0.12, 0.18),
        swing_k=a(1.0, 0.5, 0.5, 1.0),
        pitch_deg=a(0.0, 5.0, 15.0, 55.0),
        pitch_alt_deg=a(80.0, 5.0, 15.0, 30.0),
        pitch_alt_p=a(0.6, 0.0, 0.0, 0.25),
        pitch_sd_deg=a(10.0, 8.0, 10.0, 14.0),
        swing_deg=a(1.0, 20.0, 30.0, 20.0),
        bounce_g=a(0.004, 0.30, 0.60, 0.06),
        h2=a(0.0, 0.45, 0.50, 0.3),
        h3=a(0.0, 0.15, 0.25, 0.0),
        surge_g=a(0.004, 0.15, 0.35, 0.05),
        sway_g=a(0.003, 0.08, 0.15, 0.04),
        amp_sd=a(0.6, 0.38, 0.38, 0.4),
        vibration_g=a(0.0, 0.0, 0.0, 0.04),
        transition_p=a(0.0, 0.12, 0.12, 0.12),
    )


_TABLE: Final = _table()
_TAU: Final = np.arange(WINDOW, dtype=np.float64) / FS_HZ


class Sample(NamedTuple):
    """A batch of ``n`` windows."""

    features: FloatArray
    """``float64[n, 8]`` in :data:`FEATURES` order."""
    labels: IntArray
    """``int64[n]``: the label a user would supply, i.e. after concept drift if active."""
    t: FloatArray
    """``float64[n]``: time of each window, seconds since the device started."""
    activity: IntArray
    """``int64[n]``: the physical activity that generated the window (labels before concept
    drift)."""


def window_times(n: int, t0: float = 0.0) -> FloatArray:
    """Start times of ``n`` consecutive windows from ``t0``.

    >>> window_times(3, 10.0).tolist()
    [10.0, 12.0, 14.0]
    """
    return t0 + WINDOW_S * np.arange(n, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class SensorSimulator:
    """The accelerometer of one simulated device, with optional drift.

    ``seed`` fixes both the device (calibration and user style, :attr:`profile`) and its random
    stream: two simulators with the same seed return the same batches for the same calls.
    ``class_prior`` overrides the device's own activity mix (normalised; 4 non-negative weights).

    >>> sim = SensorSimulator(seed=1, drift=DriftSpec("offset", start_s=60.0, axis=2))
    >>> sim.drifting_at(59.0), sim.drifting_at(60.0)
    (False, True)
    >>> before = SensorSimulator(seed=1).sample(200, t=0.0)
    >>> after = sim.sample(200, t=60.0)
    >>> bool((before.activity == after.activity).all())  # same draws, only the drift differs
    True
    >>> shift = after.features[:, 2] - before.features[:, 2]  # mean_z
    >>> bool(abs(shift.mean() - 0.25) < 0.01)
    True
    """

    __slots__ = ("_rng", "class_prior", "drift", "profile", "seed")

    def __init__(
        self,
        seed: int,
        drift: DriftSpec | None = None,
        class_prior: Sequence[float] | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = int(seed)
        self.drift = drift
        device_ss, stream_ss = np.random.SeedSequence(self.seed).spawn(2)
        self.profile = DeviceProfile.draw(np.random.default_rng(device_ss))
        self._rng = np.random.default_rng(stream_ss)
        prior = np.asarray(
            self.profile.class_prior if class_prior is None else class_prior, dtype=np.float64
        )
        if prior.shape != (_N_CLASSES,) or not np.all(np.isfinite(prior)) or np.any(prior < 0):
            raise ValueError(f"class_prior must be {_N_CLASSES} non-negative weights")
        if prior.sum() <= 0:
            raise ValueError("class_prior must not be all zero")
        self.class_prior: FloatArray = prior / prior.sum()

    def drifting_at(self, t: float) -> bool:
        """Whether the drift has any effect at time ``t`` (intensity above 0)."""
        return self.drift is not None and self.drift.intensity(float(t)) > 0.0

    def prior_at(self, t: float) -> FloatArray:
        """The activity mix at time ``t`` (after prior drift, if any).

        >>> sim = SensorSimulator(seed=0, class_prior=[1, 1, 1, 1],
        ...                       drift=DriftSpec("prior", start_s=0.0, target=3))
        >>> sim.prior_at(10.0).round(2).tolist()
        [0.1, 0.1, 0.1, 0.7]
        """
        out: FloatArray = self._priors(np.array([float(t)]))[0]
        return out

    def _priors(self, t: FloatArray) -> FloatArray:
        base = np.broadcast_to(self.class_prior, (t.shape[0], _N_CLASSES))
        d = self.drift
        if d is None or d.kind != "prior":
            return base.copy()
        rest = self.class_prior.copy()
        rest[d.target] = 0.0
        total = rest.sum()
        if total > 0.0:
            goal = rest * ((1.0 - d.magnitude) / total)
        else:  # the device only ever did the target activity
            goal = np.full(_N_CLASSES, (1.0 - d.magnitude) / (_N_CLASSES - 1))
        goal[d.target] = d.magnitude
        i = d.intensity(t)[:, None]
        out: FloatArray = (1.0 - i) * base + i * goal
        return out

    def sample(self, n: int, t: float | FloatArray) -> Sample:
        """Simulate ``n`` windows at time(s) ``t`` (seconds since the device started).

        ``t`` is either one time for the whole batch or ``n`` times, one per window (see
        :func:`window_times` for consecutive windows). Advances the device's random stream by a
        fixed amount per window, whatever the drift.

        >>> s = SensorSimulator(seed=3).sample(4, t=window_times(4))
        >>> s.t.tolist(), s.features.shape, bool(np.isfinite(s.features).all())
        ([0.0, 2.0, 4.0, 6.0], (4, 8), True)
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        ta = np.asarray(t, dtype=np.float64)
        if ta.ndim == 0:
            ta = np.full(n, float(ta))
        elif ta.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {ta.shape}")
        else:
            ta = ta.copy()
        if not np.all(np.isfinite(ta)):
            raise ValueError("t must be finite")

        rng = self._rng
        p = self.profile
        tab = _TABLE
        d = self.drift
        intensity = d.intensity(ta) if d is not None else np.zeros(n)

        # ---- fixed-size draws, always in this order (drift-independent consumption) --------
        u_class = rng.random(n)
        u_label = rng.random(n)
        u_posture = rng.random(n)
        u_trans = rng.random((2, n))  # transition?, its direction
        z = rng.standard_normal((7, n))  # cadence, amplitude, pitch, roll, swing, tilt, vibration
        phases = rng.uniform(0.0, 2.0 * math.pi, (5, n))
        t_edge = rng.uniform(0.25 * WINDOW_S, 0.75 * WINDOW_S, n)
        noise = rng.standard_normal((3, n, WINDOW))

        # ---- activity (prior drift) and label (concept drift) -----------------------------
        cum = np.cumsum(self._priors(ta), axis=1)
        activity = (u_class[:, None] >= cum[:, :-1]).sum(axis=1).astype(np.int64)
        labels = activity.copy()
        if d is not None and d.kind == "concept":
            a, b = d.swap
            flip = u_label < d.magnitude * intensity
            labels[flip & (activity == a)] = b
            labels[flip & (activity == b)] = a

        # ---- per-window motion parameters --------------------------------------------------
        c = activity
        f = tab.cadence_hz[c] * p.cadence * np.exp(tab.cadence_sd[c] * z[0])
        amp = p.vigour * np.exp(tab.amp_sd[c] * z[1])
        alt = u_posture < tab.pitch_alt_p[c]
        pitch_m = np.where(alt, tab.pitch_alt_deg[c], tab.pitch_deg[c])
        pitch_m = pitch_m + tab.pitch_sd_deg[c] * z[2] + np.where(c == 3, p.bike_deg, 0.0)
        roll = (p.pocket_roll_deg + 8.0 * z[3]) * _DEG
        swing = tab.swing_deg[c] * np.exp(0.2 * z[4]) * np.sqrt(amp)
        tilt = (p.mount_tilt_deg + 2.0 * z[5]) * _DEG

        vibration = tab.vibration_g[c] * np.exp(0.6 * z[6])

        # motion envelope: 1, or a smooth start/stop of the activity inside the window
        edge = 1.0 / (1.0 + np.exp(-(_TAU[None, :] - t_edge[:, None]) / 0.15))
        edge = np.where((u_trans[1] < 0.5)[:, None], edge, 1.0 - edge)
        env = np.where((u_trans[0] < tab.transition_p[c])[:, None], edge, 1.0)

        w = 2.0 * math.pi * f[:, None] * _TAU[None, :]  # (n, W) cadence phase
        ph = phases[:, :, None]
        a_up = (
            env
            * (tab.bounce_g[c] * amp)[:, None]
            * (
                np.sin(w + ph[0])
                + tab.h2[c][:, None] * np.sin(2.0 * w + ph[1])
                + tab.h3[c][:, None] * np.sin(3.0 * w + ph[2])
            )
        )
        a_fwd = env * (tab.surge_g[c] * amp)[:, None] * np.sin(w + ph[3])
        a_lat = env * (tab.sway_g[c] * amp)[:, None] * np.sin(0.5 * w + ph[4])
        swing_t = env * swing[:, None] * np.sin(tab.swing_k[c][:, None] * w + ph[1])
        theta = (pitch_m[:, None] + swing_t) * _DEG

        # specific force in the body frame: motion + 1 g up; rotate into the device frame
        up = a_up + 1.0
        ct, st = np.cos(theta), np.sin(theta)
        thigh_y = up * ct - a_fwd * st
        thigh_z = up * st + a_fwd * ct
        cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]
        ax = cr * a_lat + sr * thigh_z
        az0 = -sr * a_lat + cr * thigh_z
        cb, sb = np.cos(tilt)[:, None], np.sin(tilt)[:, None]
        ay = cb * thigh_y - sb * az0
        az = sb * thigh_y + cb * az0
        raw = np.stack([ax, ay, az])  # (3, n, W)

        # ---- sensor: calibration, noise, drift, ADC --------------------------------------
        sigma = np.full((3, n), p.sigma0)
        if d is not None and d.kind == "noise":
            axes = slice(None) if d.axis is None else d.axis
            sigma[axes] += d.magnitude * intensity
        sigma = np.sqrt(sigma**2 + vibration[None, :] ** 2)
        raw = (
            np.asarray(p.gain)[:, None, None] * raw
            + np.asarray(p.offset)[:, None, None]
            + sigma[:, :, None] * noise
        )
        if d is not None and d.kind in ("gain", "offset"):
            axes = slice(None) if d.axis is None else d.axis
            if d.kind == "gain":
                raw[axes] *= (1.0 + d.magnitude * intensity)[:, None]
            else:
                raw[axes] += (d.magnitude * intensity)[:, None]
        raw = np.clip(np.round(raw / ADC_LSB_G) * ADC_LSB_G, -ADC_RANGE_G, ADC_RANGE_G - ADC_LSB_G)

        return Sample(features=_features(raw), labels=labels, t=ta, activity=activity)


def _features(raw: FloatArray) -> FloatArray:
    """Features of windows ``raw`` (``float64[3, n, W]``) as ``float64[n, 8]``."""
    n = raw.shape[1]
    out = np.empty((n, len(FEATURES)), dtype=np.float64)
    out[:, 0:3] = raw.mean(axis=2).T
    out[:, 3:6] = raw.std(axis=2).T
    mag = np.sqrt((raw**2).sum(axis=0))
    mag_mean = mag.mean(axis=1)
    out[:, 6] = mag_mean
    neg = np.signbit(mag - mag_mean[:, None])
    crossings = (neg[:, 1:] != neg[:, :-1]).sum(axis=1)
    out[:, 7] = crossings / (2.0 * WINDOW_S)
    return out


def generate_dataset(n: int, seed: int, devices: int = 20) -> tuple[FloatArray, IntArray]:
    """A stationary training set of ``n`` windows pooled over ``devices`` simulated devices.

    The devices' seeds are derived from ``seed`` (so they are not small integers and do not
    collide with hand-picked device seeds); each gives ``n // devices`` windows (the first
    ``n % devices`` one more), each with its own activity mix; rows are shuffled. Returns
    ``(X float64[n, 8], y int64[n])``; used to train the factory model.

    >>> X, y = generate_dataset(400, seed=0)
    >>> X.shape, y.shape, sorted(set(y.tolist())) == list(range(len(CLASSES)))
    ((400, 8), (400,), True)
    """
    if n < 0 or devices < 1:
        raise ValueError("need n >= 0 and devices >= 1")
    ss = np.random.SeedSequence(seed)
    dev_seeds = ss.generate_state(devices, dtype=np.uint64)
    counts = np.full(devices, n // devices)
    counts[: n % devices] += 1
    parts = [
        SensorSimulator(int(s)).sample(int(k), t=0.0)
        for s, k in zip(dev_seeds, counts, strict=True)
    ]
    X = np.concatenate([s.features for s in parts]) if parts else np.empty((0, len(FEATURES)))
    y = np.concatenate([s.labels for s in parts]).astype(np.int64)
    order = np.random.default_rng(ss.spawn(1)[0]).permutation(n)
    return X[order], y[order]
