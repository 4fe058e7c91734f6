"""Multivariate drift: PCA reconstruction error of a window against the reference windows.

A change in how the features move *together* (a correlation flip, a rotated mount) can leave
every marginal histogram unchanged, so the univariate tests of ``cohort_monitor`` cannot see it.
PCA fitted on the reference captures the directions the data normally spans; readings that
leave that subspace have a large reconstruction error (research drift-anchors §3.7: a
correlation flip with unchanged marginals scored 1.468 against a threshold of 0.995).

* **Fit** (numpy SVD, no scikit-learn): from the exact **moment sums** (``n``, ``Σz``, ``Σzzᵀ``)
  of the reference windows' standardised features ``z`` — they merge by addition like the
  histograms, so every reference reading counts, not a sample. Centre ``c`` and scale ``s`` per
  feature; the correlation matrix is decomposed with ``numpy.linalg.svd``; the first ``k``
  components explaining at least ``variance`` (default 90 %) are kept, ``k ≤ F − 1`` so there is
  always a residual space.
* **Error of a reading**: the Euclidean distance ``‖(I − VVᵀ) u‖`` with ``u = (z − c) / s``
  (NannyML's choice). Not the squared distance: on the simulated fleet the squared error per
  reading has a kurtosis of about 220 (vigorous running puts a few readings far out), which
  makes the window means too erratic for a 20-window threshold (7.5 % false alerts in a
  60-window stationary run); the distance has a kurtosis of about 11 and a window mean of 3,200
  readings varies by about 1 %.
* **Window value**: the mean error over a uniform random sample of at most ``sample_size``
  readings of the window (:class:`ReservoirSample`, default 4,096), for the reference windows
  and the monitored ones alike, so the threshold means the same thing whatever the fleet size.
* **Threshold**: a one-sided normal *prediction* bound over the ``R`` reference windows' values,
  ``mean + t_{1−α, R−1} · sd · sqrt(1 + 1/R)`` with ``α = 0.00135`` by default, the tail
  probability of "mean + 3σ". The Student-t factor accounts for estimating the mean and sd
  from only ``R`` windows (with ``R = 20`` the factor is 3.45 · √1.05 = 3.53 instead of 3;
  with 5 windows it would be 6.62 · √1.2 = 7.25 — the fragility of plain mean ± 3σ on few
  chunks, 9.5 % false alerts with 5 reference chunks in drift-anchors §3.7). A window mean over
  thousands of readings is close to normal (CLT), which the bound assumes; a calibrated
  empirical quantile would need far more than 20 reference windows for a 0.1 % tail.

>>> rng = np.random.default_rng(0)
>>> cov = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
>>> mon = PcaMonitor(n_features=3)
>>> for _ in range(20):
...     z = rng.multivariate_normal(np.zeros(3), cov, 500)
...     mon.add_reference(MomentSums.of(z), z)
>>> mon.fit().n_components
2
>>> flipped = cov * np.array([[1, -1, 1], [-1, 1, 1], [1, 1, 1]])  # same marginals
>>> res = mon.evaluate(rng.multivariate_normal(np.zeros(3), flipped, 500))
>>> res.alarm, res.score > 2
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy import stats

FloatArray = npt.NDArray[np.float64]

DEFAULT_VARIANCE: Final = 0.90
DEFAULT_ALPHA: Final = 0.00135
"""One-sided tail of a 3σ normal bound."""
DEFAULT_SAMPLE_SIZE: Final = 4096
MIN_REFERENCE_WINDOWS: Final = 3


@dataclass(frozen=True, slots=True, eq=False)
class MomentSums:
    """Exact first and second moment sums of a set of vectors; merge with ``+``."""

    n: int
    s1: FloatArray
    """``Σ z`` ``[F]``."""
    s2: FloatArray
    """``Σ z zᵀ`` ``[F, F]``."""

    @classmethod
    def zeros(cls, n_features: int) -> MomentSums:
        """Sums of no vectors."""
        return cls(0, np.zeros(n_features), np.zeros((n_features, n_features)))

    @classmethod
    def of(cls, z: npt.ArrayLike) -> MomentSums:
        """Sums of the rows of ``z`` ``[N, F]``."""
        a = np.atleast_2d(np.asarray(z, dtype=np.float64))
        return cls(int(a.shape[0]), a.sum(axis=0), a.T @ a)

    @property
    def n_features(self) -> int:
        """Dimension ``F``."""
        return int(self.s1.shape[0])

    def __add__(self, other: MomentSums) -> MomentSums:
        if not isinstance(other, MomentSums):
            return NotImplemented
        return MomentSums(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    def covariance(self) -> tuple[FloatArray, FloatArray]:
        """Mean ``[F]`` and (population) covariance ``[F, F]`` of the summed vectors."""
        if self.n <= 0:
            raise ValueError("no vectors summed")
        mean = self.s1 / self.n
        cov: FloatArray = self.s2 / self.n - np.outer(mean, mean)
        return mean, 0.5 * (cov + cov.T)


class ReservoirSample:
    """A uniform random sample of at most ``size`` rows of a stream (bottom-k random keys).

    Every row gets a uniform key; the ``size`` rows with the smallest keys are kept, so the
    sample is uniform without replacement whatever the batch sizes. Vectorised per batch.

    >>> rs = ReservoirSample(3, n_features=1, rng=np.random.default_rng(0))
    >>> rs.add(np.arange(10.0)[:, None]); rs.seen, rs.rows.shape
    (10, (3, 1))
    """

    def __init__(self, size: int, n_features: int, rng: np.random.Generator) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.rng = rng
        self.rows: FloatArray = np.zeros((0, n_features))
        self.keys: FloatArray = np.zeros(0)
        self.seen = 0

    def add(self, rows: FloatArray) -> None:
        """Offer a batch of rows ``[N, F]``."""
        n = rows.shape[0]
        if n == 0:
            return
        self.seen += n
        keys = np.concatenate([self.keys, self.rng.random(n)])
        allrows = np.concatenate([self.rows, rows])
        if keys.shape[0] > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, allrows = keys[keep], allrows[keep]
        self.keys, self.rows = keys, allrows

    def clear(self) -> None:
        """Forget the sample (a new window)."""
        self.rows = self.rows[:0]
        self.keys = self.keys[:0]
        self.seen = 0


@dataclass(frozen=True, slots=True, eq=False)
class PcaModel:
    """A fitted PCA: centre, scale, kept components."""

    center: FloatArray
    scale: FloatArray
    components: FloatArray
    """``V`` ``[F, k]``, orthonormal columns."""
    explained: FloatArray
    """Share of the (standardised) variance per component, all ``F`` of them, descending."""

    @property
    def n_components(self) -> int:
        """Components kept, ``k``."""
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, moments: MomentSums, variance: float = DEFAULT_VARIANCE) -> PcaModel:
        """Fit on pooled reference moments; keep ≥ ``variance`` of the variance, ``k ≤ F − 1``."""
        if not 0.0 < variance <= 1.0:
            raise ValueError("variance must be in (0, 1]")
        if moments.n < 2:
            raise ValueError("need at least two reference vectors")
        center, cov = moments.covariance()
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        scale = np.where(sd > 1e-12, sd, 1.0)  # a constant feature contributes nothing
        corr = cov / np.outer(scale, scale)
        u, sv, _ = np.linalg.svd(corr)  # symmetric PSD: singular vectors = eigenvectors
        total = float(sv.sum())
        explained = sv / total if total > 0 else np.zeros_like(sv)
        f = center.shape[0]
        k = int(np.searchsorted(np.cumsum(explained), variance - 1e-12) + 1)
        k = max(0, min(k, f - 1))
        return cls(center, scale, np.ascontiguousarray(u[:, :k]), explained)

    def reconstruction_error(self, z: npt.ArrayLike) -> FloatArray:
        """Euclidean reconstruction error of every row of ``z`` ``[N, F]``."""
        u = (np.atleast_2d(np.asarray(z, dtype=np.float64)) - self.center) / self.scale
        r = u - (u @ self.components) @ self.components.T
        out: FloatArray = np.sqrt(np.einsum("ij,ij->i", r, r))
        return out


@dataclass(frozen=True, slots=True)
class PcaResult:
    """One window's PCA verdict."""

    error: float
    """Mean reconstruction error of the window's (sampled) readings."""
    threshold: float
    score: float
    """``error / threshold``."""
    alarm: bool


class PcaMonitor:
    """Reference windows → PCA + threshold; then one :class:`PcaResult` per window.

    Feed each reference window's moment sums and reading sample with :meth:`add_reference`,
    call :meth:`fit` (at least 3 windows; 20 or more recommended, research drift-anchors §3.7),
    then :meth:`evaluate` each window's sample.
    """

    def __init__(
        self,
        n_features: int,
        variance: float = DEFAULT_VARIANCE,
        alpha: float = DEFAULT_ALPHA,
    ) -> None:
        if n_features < 1:
            raise ValueError("n_features must be >= 1")
        if not 0.0 < alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        if not 0.0 < variance <= 1.0:
            raise ValueError("variance must be in (0, 1]")
        self.n_features = n_features
        self.variance = variance
        self.alpha = alpha
        self.moments = MomentSums.zeros(n_features)
        self.samples: list[FloatArray] = []
        self.model: PcaModel | None = None
        self.reference_errors: FloatArray = np.zeros(0)
        self.threshold: float | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self.model is not None

    @property
    def n_reference(self) -> int:
        """Reference windows added."""
        return len(self.samples)

    def add_reference(self, moments: MomentSums, sample: npt.ArrayLike) -> None:
        """Add one reference window: its moment sums and a sample of its readings."""
        if self.model is not None:
            raise RuntimeError("the reference is already fitted")
        s = np.atleast_2d(np.array(sample, dtype=np.float64))  # a copy: the caller reuses its own
        if moments.n_features != self.n_features or s.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features")
        if moments.n == 0 or s.shape[0] == 0:
            return
        self.moments = self.moments + moments
        self.samples.append(s)

    def fit(self) -> PcaModel:
        """Fit the PCA on the pooled reference and set the threshold from the windows' errors.

        The samples are dropped afterwards (only the per-window errors are kept).
        """
        r = len(self.samples)
        if r < MIN_REFERENCE_WINDOWS:
            raise ValueError(f"need at least {MIN_REFERENCE_WINDOWS} reference windows, have {r}")
        model = PcaModel.fit(self.moments, self.variance)
        errors = np.array([float(model.reconstruction_error(s).mean()) for s in self.samples])
        self.model = model
        self.reference_errors = errors
        self.threshold = prediction_bound(errors, self.alpha)
        self.samples = []
        return model

    def evaluate(self, sample: npt.ArrayLike) -> PcaResult | None:
        """The window's mean error against the threshold (``None`` if unfitted or empty)."""
        s = np.atleast_2d(np.asarray(sample, dtype=np.float64))
        if self.model is None or self.threshold is None or s.shape[0] == 0:
            return None
        err = float(self.model.reconstruction_error(s).mean())
        return PcaResult(
            error=err,
            threshold=self.threshold,
            score=err / self.threshold if self.threshold > 0 else float("inf"),
            alarm=err > self.threshold,
        )

    def state(self) -> dict[str, Any]:
        """Arrays and numbers that :meth:`from_state` restores (for checkpoints)."""
        return {
            "n": self.moments.n,
            "s1": self.moments.s1,
            "s2": self.moments.s2,
            "samples": list(self.samples),
            "reference_errors": self.reference_errors,
            "fitted": self.model is not None,
        }

    @classmethod
    def from_state(
        cls, n_features: int, variance: float, alpha: float, state: dict[str, Any]
    ) -> PcaMonitor:
        """Inverse of :meth:`state` (the fit is recomputed; it is deterministic)."""
        mon = cls(n_features, variance, alpha)
        mon.moments = MomentSums(
            int(state["n"]),
            np.asarray(state["s1"], dtype=np.float64).reshape(n_features),
            np.asarray(state["s2"], dtype=np.float64).reshape(n_features, n_features),
        )
        mon.samples = [np.asarray(s, dtype=np.float64) for s in state["samples"]]
        if state["fitted"]:
            errors = np.asarray(state["reference_errors"], dtype=np.float64)
            mon.model = PcaModel.fit(mon.moments, variance)
            mon.reference_errors = errors
            mon.threshold = prediction_bound(errors, alpha)
        return mon


def prediction_bound(values: FloatArray, alpha: float) -> float:
    """Upper one-sided normal prediction bound for one new value, from ``R ≥ 2`` past values.

    ``mean + t_{1−α, R−1} · sd · sqrt(1 + 1/R)``; with a zero sd, a hair above the mean.

    >>> round(prediction_bound(np.array([1.0, 2.0, 3.0]), 0.05), 3)
    5.372
    """
    v = np.asarray(values, dtype=np.float64)
    r = v.shape[0]
    if r < 2:
        raise ValueError("need at least two values")
    mean = float(v.mean())
    sd = float(v.std(ddof=1))
    if sd <= 0.0:
        return mean * (1.0 + 1e-9) + 1e-12
    t = float(stats.t.ppf(1.0 - alpha, r - 1))
    return mean + t * sd * float(np.sqrt(1.0 + 1.0 / r))
