"""Reductions behind the charts: block pooling, histograms and pair statistics (pure NumPy).

Nothing here knows about charts or the store: every function takes NumPy arrays and
returns NumPy arrays or small dataclasses, so other analyses can reuse them. Statistics
are over the *finite* values (NaN and ±Inf are counted, never averaged), accumulated in
float64, and large arrays are walked in slices so that memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError

__all__ = [
    "BlockStats",
    "Histogram",
    "PairStats",
    "as_float",
    "block_grid",
    "block_reduce",
    "histogram_counts",
    "joint_histogram",
    "pair_stats",
]

#: Values handled per slice when a whole-array pass would need a float64 copy.
_SLICE = 1 << 22


def as_float(array: np.ndarray, name: str = "tensor") -> np.ndarray:
    """The values of ``array`` as float32 or float64, copying only when the dtype needs it.

    float32 and float64 pass through; float16, bfloat16 and float8 widen to float32 (exact);
    integers and booleans widen to float64 (exact up to 2**53).

    Raises:
        UnsupportedError: Complex, string or object arrays.

    Example:
        >>> as_float(np.array([1, 2], np.int8)).dtype
        dtype('float64')
    """
    a = np.asarray(array)
    if a.dtype == np.float32 or a.dtype == np.float64:
        return a
    if a.dtype.kind in "iub":
        return a.astype(np.float64)
    if a.dtype.kind == "f" or a.dtype.name in ("bfloat16",) or a.dtype.name.startswith("float8"):
        return a.astype(np.float32)
    raise UnsupportedError(f"tensor {name!r}: dtype {a.dtype} cannot be charted; expected a "
                           "floating, integer or boolean array")


def _flat_slices(a: np.ndarray) -> Iterator[np.ndarray]:
    flat = a.reshape(-1)
    for start in range(0, flat.size, _SLICE):
        yield flat[start : start + _SLICE]


# ---- block pooling --------------------------------------------------------------------------


def block_grid(shape: Sequence[int], max_cells: int) -> tuple[int, ...]:
    """Block sizes, one per axis, that pool a 1-d or 2-d shape into at most ``max_cells`` cells.

    A 2-d grid keeps roughly the matrix's aspect ratio, clamped to 1:4..4:1 so that a tall
    embedding still gets several columns. Blocks are ``ceil`` sized: the last block along
    an axis may be smaller.

    Example:
        >>> block_grid((30522, 384), 4096)
        (239, 12)
        >>> block_grid((64, 64), 4096)
        (1, 1)
    """
    dims = [int(d) for d in shape]
    if max_cells < 1:
        raise ShapeError(f"max_cells must be at least 1, got {max_cells}")
    if len(dims) == 1:
        return (max(1, math.ceil(dims[0] / max_cells)),)
    if len(dims) != 2:
        raise ShapeError(f"block_grid takes a 1-d or 2-d shape, got {dims}")
    rows, cols = dims
    if rows * cols <= max_cells:
        return (1, 1)
    aspect = min(4.0, max(0.25, rows / max(cols, 1)))
    grid_rows = min(rows, max_cells, max(1, int(math.sqrt(max_cells * aspect))))
    grid_cols = min(cols, max(1, max_cells // grid_rows))
    if grid_cols == cols:  # narrow matrix: give the rows the rest of the budget
        grid_rows = min(rows, max(1, max_cells // cols))
    return (math.ceil(rows / grid_rows), math.ceil(cols / grid_cols))


@dataclass(frozen=True)
class BlockStats:
    """Statistics of each block of a block-pooled array (float64; NaN where a block has no
    finite value).

    Attributes:
        shape: Shape of the pooled array.
        factors: Block size along each axis (the last block along an axis may be smaller).
        min: Smallest finite value per block.
        max: Largest finite value per block.
        mean: Mean of the finite values per block.
        n_finite: Finite values per block.
        size: Values per block (finite or not).
    """

    shape: tuple[int, ...]
    factors: tuple[int, ...]
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    n_finite: np.ndarray
    size: np.ndarray

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(int(n) for n in self.mean.shape)

    @property
    def maxabs(self) -> np.ndarray:
        """The finite value of largest magnitude per block, with its sign (ties: the
        positive one)."""
        return np.where(np.abs(self.max) >= np.abs(self.min), self.max, self.min)

    @property
    def n_nonfinite(self) -> np.ndarray:
        """NaN and ±Inf values per block."""
        return self.size - self.n_finite

    def starts(self, axis: int) -> np.ndarray:
        """First index of each block along ``axis``."""
        return np.arange(0, self.shape[axis], self.factors[axis], dtype=np.int64)

    def stops(self, axis: int) -> np.ndarray:
        """One past the last index of each block along ``axis``."""
        return np.minimum(self.starts(axis) + self.factors[axis], self.shape[axis])


def _reduceat(ufunc: np.ufunc, a: np.ndarray, starts: list[np.ndarray], factors: Sequence[int],
              dtype: type | None = None) -> np.ndarray:
    out = a
    for axis, (idx, f) in enumerate(zip(starts, factors, strict=True)):
        if f == 1 and dtype is None:
            continue
        out = ufunc.reduceat(out, idx, axis=axis, dtype=dtype) if f > 1 else out.astype(dtype)
    return out


def block_reduce(array: np.ndarray, factors: Sequence[int], name: str = "tensor") -> BlockStats:
    """Pool ``array`` in blocks of ``factors`` values per axis: min, max, mean, counts.

    Example:
        >>> s = block_reduce(np.array([[1., -5.], [2., 3.]]), (2, 1))
        >>> s.maxabs.tolist(), s.mean.tolist()
        ([[2.0, -5.0]], [[1.5, -1.0]])
    """
    x = as_float(array, name)
    if x.ndim == 0:
        x = x.reshape(1)
    factors = tuple(int(f) for f in factors)
    if len(factors) != x.ndim or any(f < 1 for f in factors):
        raise ShapeError(f"tensor {name!r}: block factors {list(factors)} do not fit shape "
                         f"{list(x.shape)}")
    if x.size == 0:
        raise ShapeError(f"tensor {name!r}: shape {list(x.shape)} holds no values to pool")
    starts = [np.arange(0, n, f) for n, f in zip(x.shape, factors, strict=True)]
    lengths = [np.diff(np.append(s, n)) for s, n in zip(starts, x.shape, strict=True)]
    size = lengths[0].astype(np.int64)
    for ln in lengths[1:]:
        size = np.multiply.outer(size, ln.astype(np.int64))
    finite = np.isfinite(x)
    if bool(finite.all()):
        hi = _reduceat(np.maximum, x, starts, factors)
        lo = _reduceat(np.minimum, x, starts, factors)
        total = _reduceat(np.add, x, starts, factors, dtype=np.float64)
        n_finite = size
    else:
        masked = np.where(finite, x, np.nan)
        hi = _reduceat(np.fmax, masked, starts, factors)
        lo = _reduceat(np.fmin, masked, starts, factors)
        total = _reduceat(np.add, np.where(finite, x, 0), starts, factors, dtype=np.float64)
        n_finite = _reduceat(np.add, finite, starts, factors, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_finite > 0, total / np.maximum(n_finite, 1), np.nan)
    return BlockStats(shape=tuple(int(n) for n in x.shape), factors=factors,
                      min=np.asarray(lo, np.float64), max=np.asarray(hi, np.float64),
                      mean=mean, n_finite=np.asarray(n_finite, np.int64), size=size)


# ---- distributions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Counts of the finite values in equal bins, and the values left out.

    Attributes:
        counts: Values per bin (int64); bins are closed on the left, the last on both sides.
        edges: ``len(counts) + 1`` bin edges (float64).
        n_nan: NaN values (not binned).
        n_posinf: +Inf values (not binned).
        n_neginf: -Inf values (not binned).
    """

    counts: np.ndarray
    edges: np.ndarray
    n_nan: int
    n_posinf: int
    n_neginf: int

    @property
    def n_finite(self) -> int:
        """Values binned."""
        return int(self.counts.sum())


def _finite_range(x: np.ndarray) -> tuple[float, float] | None:
    lo, hi = math.inf, -math.inf
    for part in _flat_slices(x):
        fin = part[np.isfinite(part)]
        if fin.size:
            lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
    return None if lo > hi else (lo, hi)


def histogram_counts(array: np.ndarray, bins: int = 60,
                     range: tuple[float, float] | None = None,
                     name: str = "tensor") -> Histogram:
    """Histogram of the finite values, counting NaN, +Inf and -Inf apart.

    Bins are those of ``np.histogram(finite_values, bins, range)``: ``range`` defaults to the
    finite minimum and maximum (widened by 0.5 on each side when they are equal).

    Example:
        >>> h = histogram_counts(np.array([0., 1., 1., np.nan, np.inf]), bins=2)
        >>> h.counts.tolist(), h.edges.tolist(), h.n_nan, h.n_posinf
        ([1, 2], [0.0, 0.5, 1.0], 1, 1)
    """
    if bins < 1:
        raise ShapeError(f"tensor {name!r}: bins must be at least 1, got {bins}")
    x = as_float(array, name)
    lo_hi = range if range is not None else _finite_range(x)
    if lo_hi is None:
        lo_hi = (0.0, 1.0)
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ShapeError(f"tensor {name!r}: histogram range ({lo}, {hi}) is not a finite "
                         "interval")
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = np.zeros(bins, np.int64)
    n_nan = n_pos = n_neg = 0
    edges = np.histogram_bin_edges(np.empty(0), bins=bins, range=(lo, hi))
    for part in _flat_slices(x):
        fin = np.isfinite(part)
        if not fin.all():
            n_nan += int(np.isnan(part).sum())
            n_pos += int(np.isposinf(part).sum())
            n_neg += int(np.isneginf(part).sum())
            part = part[fin]
        counts += np.histogram(part, bins=bins, range=(lo, hi))[0]
    return Histogram(counts=counts, edges=edges, n_nan=n_nan, n_posinf=n_pos, n_neginf=n_neg)


def joint_histogram(a: np.ndarray, b: np.ndarray, bins: int = 64,
                    range: tuple[float, float] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """2-d histogram of the pairs ``(a[i], b[i])`` where both are finite, on one shared range.

    Returns:
        ``(counts[bins, bins], edges, n_skipped)``: ``counts[i, j]`` counts pairs with ``a`` in
        bin ``i`` and ``b`` in bin ``j`` (bins as ``np.histogram2d``'s); ``n_skipped`` pairs had
        a non-finite value or fell outside ``range``.

    Example:
        >>> c, e, skipped = joint_histogram(np.array([0., 1.]), np.array([0., 1.]), bins=2)
        >>> c.tolist(), skipped
        ([[1, 0], [0, 1]], 0)
    """
    x, y = _pair(a, b)
    if range is None:
        ra, rb = _finite_range(x), _finite_range(y)
        spans = [r for r in (ra, rb) if r is not None]
        range = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0.0, 1.0)
    lo, hi = float(range[0]), float(range[1])
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.histogram_bin_edges(np.empty(0), bins=bins, range=(lo, hi))
    counts = np.zeros(bins * bins, np.int64)
    skipped = 0
    for pa_, pb_ in zip(_flat_slices(x), _flat_slices(y), strict=True):
        ok = np.isfinite(pa_) & np.isfinite(pb_)
        ok &= (pa_ >= lo) & (pa_ <= hi) & (pb_ >= lo) & (pb_ <= hi)
        skipped += int(ok.size - ok.sum())
        cell = _bin_index(pa_[ok], edges) * bins + _bin_index(pb_[ok], edges)
        counts += np.bincount(cell, minlength=bins * bins)
    return counts.reshape(bins, bins), edges, skipped


def _bin_index(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value in ``[edges[0], edges[-1]]``, as ``np.histogram`` assigns it (half-open
    bins, the last closed; index arithmetic corrected against the edges)."""
    n = edges.size - 1
    x = v.astype(np.float64)
    idx = ((x - edges[0]) * (n / (edges[-1] - edges[0]))).astype(np.intp)
    idx[idx == n] -= 1
    idx[x < edges[idx]] -= 1
    idx[(x >= edges[idx + 1]) & (idx != n - 1)] += 1
    return idx


# ---- pairs ----------------------------------------------------------------------------------


def _pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b"),
          ) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float(a, names[0]), as_float(b, names[1])
    if x.shape != y.shape:
        raise ShapeError(f"tensors {names[0]!r} and {names[1]!r}: shapes {list(x.shape)} and "
                         f"{list(y.shape)} differ; only tensors of one shape can be compared")
    return x, y


@dataclass(frozen=True)
class PairStats:
    """How two tensors of one shape agree, over the positions where both are finite.

    Attributes:
        numel: Values per tensor.
        n_nonfinite: Positions where either value is NaN or ±Inf (left out of the sums).
        l2_a: ``||a||_2``.
        l2_b: ``||b||_2``.
        l2_diff: ``||b - a||_2``.
        max_abs_diff: ``max |b - a|`` (NaN when no position is finite in both).
        dot: ``a . b``.
    """

    numel: int
    n_nonfinite: int
    l2_a: float
    l2_b: float
    l2_diff: float
    max_abs_diff: float
    dot: float

    @property
    def rel_l2(self) -> float:
        """``||b - a|| / ||a||`` (0 when both are zero, inf when only ``a`` is)."""
        if self.l2_a == 0:
            return 0.0 if self.l2_diff == 0 else math.inf
        return self.l2_diff / self.l2_a

    @property
    def cosine(self) -> float:
        """Cosine similarity ``a.b / (||a|| ||b||)`` (NaN when either norm is zero)."""
        if self.l2_a == 0 or self.l2_b == 0:
            return math.nan
        return max(-1.0, min(1.0, self.dot / (self.l2_a * self.l2_b)))


def pair_stats(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> PairStats:
    """Norms, dot product and differences of two same-shape tensors, in float64.

    Raises:
        ShapeError: The shapes differ.

    Example:
        >>> s = pair_stats(np.array([3., 0.]), np.array([3., 4.]))
        >>> s.rel_l2, round(s.cosine, 4), s.max_abs_diff
        (1.3333333333333333, 0.6, 4.0)
    """
    x, y = _pair(a, b, names)
    sums = np.zeros(4)  # a.a, b.b, d.d, a.b
    max_diff = -math.inf
    bad = 0
    for pa_, pb_ in zip(_flat_slices(x), _flat_slices(y), strict=True):
        u, v = pa_.astype(np.float64), pb_.astype(np.float64)
        ok = np.isfinite(u) & np.isfinite(v)
        if not ok.all():
            bad += int(ok.size - ok.sum())
            u, v = u[ok], v[ok]
        d = v - u
        sums += (u @ u, v @ v, d @ d, u @ v)
        if d.size:
            max_diff = max(max_diff, float(np.abs(d).max()))
    return PairStats(numel=int(x.size), n_nonfinite=bad, l2_a=math.sqrt(sums[0]),
                     l2_b=math.sqrt(sums[1]), l2_diff=math.sqrt(sums[2]),
                     max_abs_diff=max_diff if max_diff > -math.inf else math.nan,
                     dot=float(sums[3]))
