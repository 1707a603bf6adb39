"""Differences between two tensors of one shape, in one pass over pieces of both.

For each pair: the largest absolute difference, the relative L2 difference
``||a - b|| / ||a||``, the cosine similarity, and a verdict on what the difference is
(:mod:`weightatlas.core._compare_casts`):

- ``identical``: every value equal (the dtypes may differ: an exact up-cast);
- ``cast_float32`` / ``cast_float16`` / ``cast_bfloat16``: one side is exactly the
  other rounded to that dtype (round to nearest even, as a cast does);
- ``rounding``: not one cast, but no difference exceeds 4 units in the last place of
  the coarser of the two dtypes (arithmetic at that precision, e.g. an exporter
  folding constants);
- ``changed``: anything larger: a real change.

One pass: an :class:`Accumulator` takes the two tensors piece by piece (a piece of
:data:`BLOCK` values, 256 KiB of float32, stays in the core's L2 cache while it is
used) and from each piece computes everything: ``d = a - b`` into a reused buffer,
the four sums ``a.a``, ``b.b``, ``a.b``, ``d.d``, ``max |d|``, and the cast and
rounding checks that are still open (nothing is checked for NaN piece by piece). No
temporaries: loads, differences and partial sums go into buffers allocated once per
pair.

Precision: float32, float16 and bfloat16 pairs are differenced in float32 (exact for
the narrower types; for float32 a difference is rounded once, a relative error below
6e-8). The sums are taken as float32 dot products of rows of :data:`ROW` values
(BLAS, a few dozen terms per accumulator lane) and those row sums are added in
float64, so the relative error of the norms and the cosine stays near 1e-7 even for
constant tensors, where one float32 accumulator over a whole piece would lose 1e-5;
the tests compare against NumPy float64 at 1e-6. float64 and integer pairs are
computed in float64. Values are compared where both are finite: a NaN or infinity
anywhere (or squares beyond float32's range) leaves the sums non-finite, and such a
pair is measured again (:func:`measure_pieces`) in float64 over the positions where
both values are finite; the positions where one side is NaN or infinite and the other
is not the same are counted (``n_nonfinite``) and make the verdict ``changed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightatlas.core._compare_casts import NARROW, Explanation, dtype_name

__all__ = ["BLOCK", "ROW", "Accumulator", "PairStats", "diff_arrays", "measure_pieces"]

#: Values per piece (65,536 float32 = 256 KiB, three buffers of it fit a 1 MiB L2).
BLOCK = 1 << 16
#: Below this, a float32 sum of squares may have lost values to underflow: measured again
#: in float64.
_TINY = 1e-30
#: Values per float32 partial sum (summed in float64 across rows).
ROW = 1024


@dataclass(frozen=True)
class PairStats:
    """The differences of one pair."""

    max_abs_diff: float
    rel_l2: float
    cosine: float | None
    verdict: str
    n_nonfinite: int

    @property
    def cast_consistent(self) -> bool:
        """Whether the difference is explained by rounding or a dtype cast (not a change)."""
        return self.verdict != "changed"


class Accumulator:
    """Every metric of one pair, accumulated piece by piece in a single pass.

    Args:
        a_dtype, b_dtype: The stored dtype names of the two sides.
        block: Values per piece: longer pieces given to :meth:`add` are split.
        finite: Measure only where both values are finite, counting the mismatched
            non-finite positions (float64, slower: the second pass of
            :func:`measure_pieces` for a pair whose first pass was not :attr:`clean`).

    Example:
        >>> acc = Accumulator("float32", "float32", block=4)
        >>> acc.add(np.ones(6, np.float32), np.full(6, 2, np.float32))
        >>> s = acc.result()
        >>> acc.clean, s.max_abs_diff, s.rel_l2, s.cosine, s.verdict
        (True, 1.0, 1.0, 1.0, 'changed')
    """

    def __init__(self, a_dtype: str, b_dtype: str, block: int = BLOCK, *,
                 finite: bool = False) -> None:
        self.block = max(1, block)
        self.row = min(ROW, self.block)
        self.finite = finite
        self.work = np.float32 if a_dtype in NARROW and b_dtype in NARROW else np.float64
        self.explain = Explanation(a_dtype, b_dtype, self.block)
        self.max_abs = 0.0
        self.sums = np.zeros((4, max(1, self.block // self.row)))  # a.a, b.b, a.b, d.d
        self.nonfinite = 0
        self.buf = np.empty((3, self.block), self.work)  # a, b loaded; |a - b|
        self.part = np.empty((4, self.block // self.row, 1, 1), self.work)  # row sums

    @property
    def clean(self) -> bool:
        """Whether the one-pass sums can be trusted: every value added was finite (a NaN or
        Inf makes the sums non-finite) and, in float32, no sum of squares is so small that
        squares underflowed (values below about 1e-19, or differences that small)."""
        if self.finite:
            return True
        totals = self.sums.sum(axis=1)
        if not (math.isfinite(self.max_abs) and np.isfinite(totals).all()):
            return False
        return not (self.work is np.float32 and self.max_abs > 0
                    and float(min(totals[0], totals[1], totals[3])) < _TINY)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add the next values of both sides (1-d, equal lengths, any numeric dtypes)."""
        self.add_all(((a, b),))

    def add_all(self, pieces: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Add the pairs of pieces of a stream, in order (as :meth:`add`, one at a time)."""
        block, add = self.block, self._add_finite if self.finite else self._add
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf: see `clean`
            for a, b in pieces:
                if a.size <= block:
                    add(a, b)
                    continue
                for start in range(0, a.size, block):
                    add(a[start : start + block], b[start : start + block])

    def _load(self, x: np.ndarray, row: int) -> np.ndarray:
        out = self.buf[row, : x.size]
        np.copyto(out, x, casting="unsafe")
        return out

    def _add(self, a: np.ndarray, b: np.ndarray) -> None:
        n = a.size
        if n == 0:
            return
        if a.dtype.itemsize == 8 and a.dtype.kind in "iu" and a.dtype == b.dtype:
            # float64 cannot hold 64-bit integers exactly: the largest difference, exactly
            self.max_abs = max(self.max_abs, _int64_max_abs_diff(a, b))
        x = a if a.dtype == self.work else self._load(a, 0)
        y = b if b.dtype == self.work else self._load(b, 1)
        d = np.subtract(x, y, out=self.buf[2, :n])
        self._dots(x, y, d)
        ad = np.abs(d, out=d)
        worst = float(ad.max())
        if not worst <= self.max_abs:  # larger, or NaN (kept: the pair is not clean)
            self.max_abs = worst
        if self.explain.open:  # also where equal: a cast must round every value
            self.explain.update(x, y, ad)

    def _add_finite(self, a: np.ndarray, b: np.ndarray) -> None:
        x, y = a.astype(np.float64), b.astype(np.float64)
        both = np.isfinite(x) & np.isfinite(y)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        self.nonfinite += int(np.count_nonzero(~both & ~same))
        x, y = x[both], y[both]
        if x.size == 0:
            return
        d = x - y
        self.sums[:, 0] += (x @ x, y @ y, x @ y, d @ d)
        ad = np.abs(d)
        self.max_abs = max(self.max_abs, float(ad.max()))
        if self.explain.open:
            self.explain.update(x, y, ad)

    def _dots(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
        """Add ``[x.x, y.y, x.y, d.d]``: row sums in the work dtype, into float64."""
        n, row = x.size, self.row
        rows = n // row
        k = rows * row
        if k < n:  # the values after the last whole row: in float64
            tx, ty, td = (v[k:].astype(np.float64) for v in (x, y, d))
            self.sums[:, 0] += (tx @ tx, ty @ ty, tx @ ty, td @ td)
            x, y, d = x[:k], y[:k], d[:k]
        if not rows:
            return
        xr, yr, dr = x.reshape(rows, 1, row), y.reshape(rows, 1, row), d.reshape(rows, 1, row)
        yc = y.reshape(rows, row, 1)
        part = self.part[:, :rows]  # (4, rows, 1, 1): one BLAS dot product per row
        np.matmul(xr, x.reshape(rows, row, 1), out=part[0])
        np.matmul(yr, yc, out=part[1])
        np.matmul(xr, yc, out=part[2])
        np.matmul(dr, d.reshape(rows, row, 1), out=part[3])
        sums = self.sums[:, :rows]
        np.add(sums, part.reshape(4, rows), out=sums)

    def result(self) -> PairStats:
        """The metrics and verdict of everything added (meaningful when :attr:`clean`)."""
        ssa, ssb, sab, ssd = (float(v) for v in self.sums.sum(axis=1))
        na, nb, nd = math.sqrt(ssa), math.sqrt(ssb), math.sqrt(ssd)
        rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        cosine = None if na == 0 or nb == 0 else max(-1.0, min(1.0, sab / (na * nb)))
        if self.max_abs == 0 and self.nonfinite == 0:
            return PairStats(0.0, 0.0, 1.0 if cosine is not None else None, "identical", 0)
        verdict = "changed" if self.nonfinite else self.explain.verdict()
        return PairStats(self.max_abs, rel, cosine, verdict, self.nonfinite)


def _int64_max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|`` of two 64-bit integer arrays of one dtype, without overflow (the
    difference taken modulo 2**64 and folded to its magnitude)."""
    ua, ub = a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False)
    ge = a >= b
    with np.errstate(over="ignore"):
        mag = np.where(ge, ua - ub, ub - ua)
    return float(mag.max()) if mag.size else 0.0


def measure_pieces(a_dtype: str, b_dtype: str, pieces: Callable[[], Iterable[tuple[np.ndarray,
            np.ndarray]]], block: int = BLOCK) -> PairStats:
    """The metrics of a pair given as pieces: one pass, a second one if it held NaN/Inf.

    Args:
        a_dtype, b_dtype: Stored dtype names.
        pieces: Makes the stream of equal-length pairs of pieces (called once, or
            twice when the first pass finds a non-finite value or a square beyond
            float32's range, for the float64 pass over the finite positions).
        block: Values per piece.

    Example:
        >>> a = np.array([1.0, np.nan, 3.0], np.float32)
        >>> measure_pieces("float32", "float32", lambda: [(a, a * 2)]).n_nonfinite
        0
    """
    acc = Accumulator(a_dtype, b_dtype, block)
    acc.add_all(pieces())
    if not acc.clean:
        acc = Accumulator(a_dtype, b_dtype, block, finite=True)
        acc.add_all(pieces())
    return acc.result()


def diff_arrays(a: Any, b: Any, a_dtype: str | None = None, b_dtype: str | None = None,
                *, block: int = BLOCK) -> PairStats:
    """Compare two arrays of one shape (see the module docstring for the verdicts).

    Args:
        a, b: Arrays of the same shape (contiguous ones are read in place, strided views
            row block by row block, never copied whole).
        a_dtype, b_dtype: Their stored dtype names (default: the arrays' own).
        block: Values per piece.

    Example:
        >>> import ml_dtypes
        >>> a = np.linspace(-1, 1, 101, dtype=np.float32)
        >>> diff_arrays(a, a.astype(ml_dtypes.bfloat16)).verdict
        'cast_bfloat16'
        >>> round(diff_arrays(a, a * 1.1).rel_l2, 6)
        0.1
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    names = a_dtype or dtype_name(a.dtype), b_dtype or dtype_name(b.dtype)
    if a.ndim == 0 or (a.flags.c_contiguous and b.flags.c_contiguous):
        return measure_pieces(*names, lambda: [(a.reshape(-1), b.reshape(-1))], block)
    row = max(1, a.size // max(a.shape[0], 1))
    step = max(1, max(1, block) // row)
    return measure_pieces(*names, lambda: (  # strided: a few rows at a time, copied
        (np.ascontiguousarray(a[s : s + step]).reshape(-1),
         np.ascontiguousarray(b[s : s + step]).reshape(-1))
        for s in range(0, a.shape[0], step)), block)

