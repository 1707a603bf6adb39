"""Power-law fits of an eigenvalue tail, the way WeightWatcher fits them.

The fit is Clauset, Shalizi and Newman's continuous power law: for each candidate
``xmin`` (every eigenvalue but the largest), the maximum-likelihood exponent of the
values at or above it, ``alpha = 1 + n / sum(log(x / xmin))``, and the
Kolmogorov-Smirnov distance ``D`` between the empirical and the fitted CDF; the fit
keeps the ``xmin`` with the smallest ``D``. This is WeightWatcher's own fitter
(``WW_powerlaw.WWFit``, its default since 0.7): eigenvalues at or below ``1e-5`` are
dropped first, and spectra of fewer than 20 values use its small-sample variant
(bias-corrected ``alpha = 1 + (n - 1) / sum(log(x / xmin))``, tails of at least 8;
like WeightWatcher 0.7.7, the smallest ``D`` still picks ``xmin``).
``sigma = (alpha - 1) / sqrt(n)`` is the standard error.

WeightWatcher loops over candidates in Python; here blocks of candidates are
evaluated as one masked matrix, which gives the same numbers (the tests compare them
with WeightWatcher's own fitter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EVALS_THRESHOLD", "PowerLawFit", "fit_power_law"]

#: Eigenvalues at or below this are left out of the fit (WeightWatcher's EVALS_THRESH).
EVALS_THRESHOLD = 1e-5
_SMALL_N = 20
_K_MIN = 8


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit of the tail of a spectrum; ``alpha`` is NaN when it failed."""

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    n_tail: int
    n_fitted: int

    @property
    def ok(self) -> bool:
        """Whether a fit was found."""
        return math.isfinite(self.alpha)


_FAILED = PowerLawFit(math.nan, math.nan, math.nan, math.nan, 0, 0)


def _candidates(data: np.ndarray, small: bool) -> tuple[np.ndarray, np.ndarray]:
    """``alpha`` and KS ``D`` for every candidate xmin (index ``i`` of sorted ``data``).

    One NumPy pass over the tail per candidate, as WeightWatcher does: evaluating all
    candidates as one masked matrix was measured slower (it computes the power of the
    masked half too).
    """
    n_all = data.size
    log = np.log(data)
    suffix = np.cumsum(log[::-1])[::-1]  # sum of log over the tail starting at i
    n = (n_all - np.arange(n_all - 1)).astype(np.float64)
    s = suffix[:-1] - n * log[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + (n - 1.0 if small else n) / s
    usable = alphas > 1.0
    if small:
        usable &= (n >= _K_MIN) & (s > 1e-12)
    ds = np.ones(n_all - 1)
    ranks = np.arange(n_all, dtype=np.float64)
    for i in np.flatnonzero(usable):
        tail = data[i:]
        fitted = 1.0 - (tail / data[i]) ** (1.0 - alphas[i])
        ds[i] = np.max(np.abs(fitted - ranks[: tail.size] / tail.size))
    return alphas, ds


def fit_power_law(evals: np.ndarray) -> PowerLawFit:
    """Fit a power law to the tail of an eigenvalue spectrum (WeightWatcher's method).

    Args:
        evals: Eigenvalues (squared singular values), any order.

    Returns:
        The fit; ``alpha`` is NaN when fewer than two eigenvalues exceed the threshold.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = (1 - rng.random(20000)) ** (-1 / 1.5)      # a Pareto tail, alpha = 2.5
        >>> round(fit_power_law(x).alpha, 1)
        2.5
    """
    data = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    data = data[np.isfinite(data) & (data > EVALS_THRESHOLD)]
    if data.size < 2:
        return _FAILED
    alphas, ds = _candidates(data, data.size < _SMALL_N)
    best = int(np.argmin(ds))
    alpha = float(alphas[best])
    if not (math.isfinite(alpha) and alpha > 1.0):
        return _FAILED
    n_tail = data.size - best
    sigma = (alpha - 1.0) / math.sqrt(n_tail)
    return PowerLawFit(alpha, float(data[best]), float(ds[best]), sigma, n_tail, int(data.size))
