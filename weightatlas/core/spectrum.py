"""Spectral analysis of weight matrices: singular values, ESD, power-law tail, ranks.

Every linear, attention, embedding and recurrent weight is a matrix; a convolution
weight ``[out, in, *spatial]`` is reshaped to ``[out, in * prod(spatial)]``
(``conv="flatten"``), or, as WeightWatcher does, cut into one ``[out, in]`` matrix per
spatial position whose eigenvalues are pooled (``conv="per_position"``).

For a matrix ``W`` of shape ``N x M`` (``N >= M`` after transposing), the eigenvalues
are ``lambda_i = s_i**2``, the squared singular values, as WeightWatcher uses (not
divided by ``N``). They are computed as the eigenvalues of the smaller Gram matrix
``W^T W`` in float64 (``numpy.linalg.eigvalsh``): exact to ``~1e-16 * lambda_max``,
which is all a tail fit and the ranks need, and faster than an SVD, much faster for
tall matrices (a 50,000 x 4,096 embedding is one 4,096 x 4,096 eigenproblem). For
float32 and narrower weights the Gram product itself is formed in float32
(:func:`eigenvalues` says what that costs in precision).

Figures per matrix (columns of :func:`spectrum`):

- ``alpha``, ``xmin``, ``ks_distance``, ``sigma``, ``n_tail``: the power-law fit of
  the ESD tail (:mod:`weightatlas.core._powerlaw`, WeightWatcher's fitter).
- ``spectral_norm`` ``= s_max``; ``stable_rank`` ``= sum(s**2) / s_max**2``;
  ``effective_rank`` ``= exp(H(p))`` with ``p_i = s_i / sum(s)`` (Roy and Vetterli).
- ``mp_lambda_plus`` ``= sigma_w**2 (sqrt(N) + sqrt(M))**2``: the upper edge of the
  Marchenko-Pastur bulk of a random matrix of the same shape and the same element
  variance ``sigma_w**2``; ``n_spikes`` counts eigenvalues above it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from weightatlas.core._powerlaw import PowerLawFit, fit_power_law
from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage import Snapshot

__all__ = [
    "MATRIX_KINDS",
    "SPECTRUM_SCHEMA",
    "MatrixSpectrum",
    "eigenvalues",
    "marchenko_pastur_density",
    "matrix_spectrum",
    "spectrum",
    "weight_matrices",
]

#: Kinds whose weights are analysed as matrices.
MATRIX_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose", "embedding",
                "attention", "recurrent")

SPECTRUM_SCHEMA = pa.schema([
    ("name", pa.string()), ("kind", pa.string()), ("matrix", pa.string()),
    ("rows", pa.int64()), ("cols", pa.int64()), ("n_evals", pa.int64()),
    ("alpha", pa.float64()), ("xmin", pa.float64()), ("ks_distance", pa.float64()),
    ("sigma", pa.float64()), ("n_tail", pa.int64()),
    ("spectral_norm", pa.float64()), ("stable_rank", pa.float64()),
    ("effective_rank", pa.float64()), ("mp_lambda_plus", pa.float64()),
    ("n_spikes", pa.int64()), ("status", pa.string()),
])


def eigenvalues(w: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Squared singular values of a 2-d matrix, ascending, in float64.

    The Gram matrix of a float32 (or narrower) weight is formed in float32 (a 4x
    faster product) and diagonalised in float64: eigenvalues then carry an absolute
    error below ``1e-6 * lambda_max`` (measured ~1e-7). ``exact=True``, or a float64
    weight, forms it in float64 (error ``~1e-16 * lambda_max``).
    :func:`matrix_spectrum` redoes a fit exactly when its tail reaches down to
    eigenvalues that error could move by more than 0.1%.

    Example:
        >>> eigenvalues(np.diag([3.0, 1.0, 2.0])).round(12).tolist()
        [1.0, 4.0, 9.0]
    """
    if w.ndim != 2:
        raise ShapeError(f"eigenvalues need a 2-d matrix, got shape {list(w.shape)}")
    wide = exact or w.dtype == np.float64
    a: np.ndarray = np.asarray(w, dtype=np.float64 if wide else np.float32)
    if a.shape[0] < a.shape[1]:
        a = a.T
    if a.shape[1] == 0:
        return np.zeros(0)
    gram = (a.T @ a).astype(np.float64)
    return np.clip(np.linalg.eigvalsh(gram), 0.0, None)


def marchenko_pastur_density(x: np.ndarray, n: int, m: int, variance: float) -> np.ndarray:
    """Marchenko-Pastur density of the eigenvalues ``s**2`` of an ``n x m`` random matrix.

    Entries i.i.d. with ``variance``; ``n >= m``. The support is
    ``[variance (sqrt(n) - sqrt(m))**2, variance (sqrt(n) + sqrt(m))**2]``.

    Example:
        >>> x = np.linspace(1, 100, 200_000)
        >>> round(float(np.trapezoid(marchenko_pastur_density(x, 40, 10, 1.0), x)), 3)
        1.0
    """
    n, m = max(n, m), min(n, m)
    lo = variance * (math.sqrt(n) - math.sqrt(m)) ** 2
    hi = variance * (math.sqrt(n) + math.sqrt(m)) ** 2
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((hi - xi) * (xi - lo)) / (2 * math.pi * variance * m * xi)
    return out


@dataclass(frozen=True)
class MatrixSpectrum:
    """The spectrum of one matrix (or of the pooled per-position matrices of a conv)."""

    rows: int
    cols: int
    evals: np.ndarray  #: ascending
    fit: PowerLawFit
    spectral_norm: float
    stable_rank: float
    effective_rank: float
    mp_lambda_plus: float
    n_spikes: int


def matrix_spectrum(mats: Iterable[np.ndarray]) -> MatrixSpectrum:
    """Spectrum figures of one matrix, or of several same-shape matrices pooled.

    Example:
        >>> s = matrix_spectrum([np.diag([4.0, 2.0, 1.0])])
        >>> s.spectral_norm, s.stable_rank
        (4.0, 1.3125)
    """
    mats = list(mats)
    evals = np.sort(np.concatenate([eigenvalues(w) for w in mats]))
    fit = fit_power_law(evals)
    if evals.size and fit.ok and fit.xmin < 1e-3 * evals[-1] and any(
            w.dtype != np.float64 for w in mats):
        # The tail reaches eigenvalues a float32 Gram could move by > 0.1%: redo exactly.
        evals = np.sort(np.concatenate([eigenvalues(w, exact=True) for w in mats]))
        fit = fit_power_law(evals)
    rows, cols = mats[0].shape
    n, m = max(rows, cols), min(rows, cols)
    sv = np.sqrt(evals)
    total = float(sv.sum())
    if total > 0:
        p = sv[sv > 0] / total
        effective_rank = math.exp(float(-(p * np.log(p)).sum()))
    else:
        effective_rank = 0.0
    lam_max = float(evals[-1]) if evals.size else 0.0
    stable_rank = float(evals.sum()) / lam_max if lam_max > 0 else 0.0
    variance = float(np.mean([np.var(np.asarray(w, dtype=np.float64)) for w in mats]))
    lam_plus = variance * (math.sqrt(n) + math.sqrt(m)) ** 2
    return MatrixSpectrum(
        rows=rows, cols=cols, evals=evals, fit=fit,
        spectral_norm=math.sqrt(lam_max), stable_rank=stable_rank,
        effective_rank=effective_rank, mp_lambda_plus=lam_plus,
        n_spikes=int((evals > lam_plus).sum()),
    )


def weight_matrices(array: np.ndarray, kind: str, conv: str = "flatten",
                    name: str = "tensor") -> list[np.ndarray]:
    """The matrices a weight is analysed as (see the module docstring).

    Raises:
        ShapeError: A tensor with fewer than two dimensions.
    """
    if array.ndim < 2:
        raise ShapeError(f"tensor {name!r}: a matrix analysis needs at least 2 dimensions, "
                         f"got shape {list(array.shape)}")
    if array.ndim == 2:
        return [array]
    if conv == "flatten":
        return [array.reshape(array.shape[0], -1)]
    if conv == "per_position":
        spatial = array.reshape(array.shape[0], array.shape[1], -1)
        return [spatial[:, :, k] for k in range(spatial.shape[2])]
    raise UnsupportedError(f"conv must be 'flatten' or 'per_position', got {conv!r}")


def spectrum(snapshot: Snapshot, tensors: Iterable[str] | None = None, *,
             conv: str = "flatten", min_evals: int = 0) -> pa.Table:
    """Spectral figures of every weight matrix of a snapshot (one row per matrix).

    Args:
        snapshot: The snapshot to analyse.
        tensors: Tensor names; default every ``weight`` of a matrix kind with 2+ dims.
        conv: ``"flatten"`` or ``"per_position"`` for convolution weights.
        min_evals: Matrices with fewer eigenvalues are listed with status ``"too small"``.

    Returns:
        A table with :data:`SPECTRUM_SCHEMA`. ``status`` is ``"ok"``, ``"fit failed"``,
        ``"too small"`` or ``"non-finite values"`` (a matrix with NaN or Inf is listed,
        never analysed silently).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.random.default_rng(0).standard_normal((300, 100))
        >>> snap = store.write(RecordsSource([TensorRecord("fc.weight", w, kind="linear",
        ...                                   layout=("out", "in"))]), "m")
        >>> spectrum(snap).select(["name", "rows", "cols", "n_evals", "status"]).to_pylist()
        [{'name': 'fc.weight', 'rows': 300, 'cols': 100, 'n_evals': 100, 'status': 'ok'}]
    """
    table = snapshot.tensors()
    rows = table.select(["name", "kind", "shape", "param", "n_nan", "n_inf"]).to_pylist()
    if tensors is None:
        chosen = [r for r in rows if r["kind"] in MATRIX_KINDS and len(r["shape"]) >= 2
                  and r["param"] != "bias"]
    else:
        by_name = {r["name"]: r for r in rows}
        chosen = []
        for t in tensors:
            snapshot.info(t)  # NotFoundError with suggestions
            chosen.append(by_name[t])
    out: dict[str, list[object]] = {f.name: [] for f in SPECTRUM_SCHEMA}
    for r in chosen:
        array = snapshot.read(r["name"])
        mats = weight_matrices(array, r["kind"], conv, r["name"])
        base = {"name": r["name"], "kind": r["kind"],
                "matrix": "per_position" if len(mats) > 1 else "whole",
                "rows": mats[0].shape[0], "cols": mats[0].shape[1]}
        if r["n_nan"] or r["n_inf"]:
            _append(out, base, None, "non-finite values")
            continue
        n_evals = min(mats[0].shape) * len(mats)
        if n_evals < max(min_evals, 1):
            _append(out, base, None, "too small")
            continue
        spec = matrix_spectrum(mats)
        _append(out, base, spec, "ok" if spec.fit.ok else "fit failed")
    return pa.table(out, schema=SPECTRUM_SCHEMA)


def _append(out: dict[str, list[object]], base: dict[str, object],
            spec: MatrixSpectrum | None, status: str) -> None:
    values: dict[str, object] = dict(base, status=status)
    if spec is not None:
        values.update(
            n_evals=int(spec.evals.size), alpha=spec.fit.alpha, xmin=spec.fit.xmin,
            ks_distance=spec.fit.ks_distance, sigma=spec.fit.sigma, n_tail=spec.fit.n_tail,
            spectral_norm=spec.spectral_norm, stable_rank=spec.stable_rank,
            effective_rank=spec.effective_rank, mp_lambda_plus=spec.mp_lambda_plus,
            n_spikes=spec.n_spikes,
        )
        if not spec.fit.ok:
            values.update(alpha=None, xmin=None, ks_distance=None, sigma=None)
    for key in out:
        out[key].append(values.get(key))
