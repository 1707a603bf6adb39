"""Differences between two tensors of one shape, block by block.

For each pair: the largest absolute difference, the relative L2 difference
``||a - b|| / ||a||``, the cosine similarity, and a verdict on what the difference is:

- ``identical``: every value equal (the dtypes may differ: an exact up-cast);
- ``cast_float32`` / ``cast_float16`` / ``cast_bfloat16``: one side is exactly the
  other rounded to that dtype (round to nearest even, as a cast does);
- ``rounding``: not one cast, but no difference exceeds 4 units in the last place of
  the coarser of the two dtypes (arithmetic at that precision, e.g. an exporter
  folding constants);
- ``changed``: anything larger: a real change.

Precision: float32, float16 and bfloat16 pairs are differenced in float32 (exact for
the narrower types; for float32 a difference is rounded once, a relative error below
6e-8), and their sums of squares and products accumulate in float32 within blocks of
16,384 values and in float64 across blocks (relative error of the norms and the cosine
below 1e-5 in practice; the tests compare against NumPy float64 at that tolerance).
float64 and integer pairs are computed in float64. Values are compared where both are
finite; positions where one side is NaN or infinite and the other is not the same are
counted (``n_nonfinite``) and make the verdict ``changed``. Memory stays within a few
blocks beyond the two inputs, which are views of the memory-mapped snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["BLOCK", "PairStats", "diff_arrays"]

#: Values per block (16,384 float32 = 64 KiB: stays in cache; einsum, not BLAS, so no
#: thread pool of its own).
BLOCK = 1 << 14
#: (mantissa bits including the implicit one, smallest normal exponent) of each float.
_FORMATS = {"float64": (53, -1022), "float32": (24, -126), "float16": (11, -14),
            "bfloat16": (8, -126), "float8_e4m3fn": (4, -6), "float8_e5m2": (3, -14)}
_NARROW = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
_CASTS = ("float32", "float16", "bfloat16")
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


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


def _ulp(x: np.ndarray, fmt: str) -> np.ndarray:
    """One unit in the last place of ``fmt`` at magnitude ``x`` (float64, x >= 0)."""
    p, emin = _FORMATS[fmt]
    _, e = np.frexp(x)
    e = np.where(x == 0, emin + 1, e) - 1
    return np.ldexp(1.0, np.maximum(e, emin) - (p - 1))


def _precision(dtype: str) -> int:
    return _FORMATS[dtype][0] if dtype in _FORMATS else 0


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.einsum("i,i->", x, y))


class _Acc:
    def __init__(self, a_dtype: str, b_dtype: str, block: int) -> None:
        self.floats = a_dtype in _FORMATS and b_dtype in _FORMATS
        self.work = np.float32 if a_dtype in _NARROW and b_dtype in _NARROW else np.float64
        coarse = min((a_dtype, b_dtype), key=_precision)
        self.coarse = coarse if self.floats else None
        finest = max(_precision(a_dtype), _precision(b_dtype))
        # a cast to t can explain the pair when t is coarser than the finer dtype
        self.casts: dict[str, set[str]] = {
            t: {"a", "b"} for t in _CASTS if self.floats and _FORMATS[t][0] < finest}
        self.rounding = self.floats
        self.max_abs = 0.0
        self.ssd = self.ssa = self.ssb = self.sab = 0.0
        self.nonfinite = 0
        self.buf = np.empty((3, block), self.work)

    def _load(self, x: np.ndarray, row: int) -> np.ndarray:
        flat = x.reshape(-1)
        if flat.dtype == self.work:
            return flat
        out = self.buf[row, : flat.size]
        np.copyto(out, flat, casting="unsafe")
        return out

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        x, y = self._load(a, 0), self._load(b, 1)
        ssa, ssb = _dot(x, x), _dot(y, y)
        if not (math.isfinite(ssa) and math.isfinite(ssb)):
            x, y = self._finite(x.astype(np.float64), y.astype(np.float64))
            ssa, ssb = _dot(x, x), _dot(y, y)
        d = np.subtract(x, y, out=self.buf[2, : x.size] if x.dtype == self.work else None)
        self.ssa += ssa
        self.ssb += ssb
        self.sab += _dot(x, y)
        self.ssd += _dot(d, d)
        if d.size == 0:
            return
        worst = max(float(d.max()), -float(d.min()))
        self.max_abs = max(self.max_abs, worst)
        if worst > 0 and (self.casts or self.rounding):
            self._explain(x, y, d)

    def _finite(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        both = np.isfinite(x) & np.isfinite(y)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        self.nonfinite += int(np.count_nonzero(~both & ~same))
        return x[both], y[both]

    def _explain(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
        """Keep only the casts (and the rounding) that can still explain every value."""
        for t in list(self.casts):
            kind = _NUMPY[t]
            for side, mine, other in (("a", x, y), ("b", y, x)):
                if side in self.casts[t] and not np.array_equal(
                        other.astype(kind).astype(mine.dtype), mine):
                    self.casts[t].discard(side)
            if not self.casts[t]:
                del self.casts[t]
        if self.rounding and not self.casts and self.coarse is not None:
            mag = np.maximum(np.abs(x), np.abs(y)).astype(np.float64)
            self.rounding = bool(np.all(np.abs(d) <= 4 * _ulp(mag, self.coarse)))

    def result(self) -> PairStats:
        na, nb = math.sqrt(self.ssa), math.sqrt(self.ssb)
        nd = math.sqrt(self.ssd)
        rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        cosine = None if na == 0 or nb == 0 else max(-1.0, min(1.0, self.sab / (na * nb)))
        if self.max_abs == 0 and self.nonfinite == 0:
            verdict = "identical"
            cosine = 1.0 if cosine is not None else None
            rel = 0.0
        elif self.nonfinite:
            verdict = "changed"
        elif self.casts:
            verdict = "cast_" + next(t for t in _CASTS if t in self.casts)
        elif self.rounding:
            verdict = "rounding"
        else:
            verdict = "changed"
        return PairStats(self.max_abs, rel, cosine, verdict, self.nonfinite)


def diff_arrays(a: Any, b: Any, a_dtype: str | None = None, b_dtype: str | None = None,
                *, block: int = BLOCK) -> PairStats:
    """Compare two arrays of one shape (see the module docstring for the verdicts).

    Args:
        a, b: Arrays of the same shape (views are read block by block, never copied whole).
        a_dtype, b_dtype: Their stored dtype names (default: the arrays' own).
        block: Values per block.

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
    block = max(1, block)
    acc = _Acc(a_dtype or _name(a.dtype), b_dtype or _name(b.dtype), block)
    if a.ndim == 0:
        acc.add(a.reshape(1), b.reshape(1))
        return acc.result()
    if a.flags.c_contiguous and b.flags.c_contiguous:
        fa, fb = a.reshape(-1), b.reshape(-1)
        for start in range(0, fa.size, block):
            acc.add(fa[start : start + block], fb[start : start + block])
        return acc.result()
    row = max(1, a.size // max(a.shape[0], 1))
    if row > block:  # rows wider than a block: copy row by row, then take blocks
        acc.buf = np.empty((3, row), acc.work)
    step = max(1, block // row)
    for start in range(0, a.shape[0], step):
        acc.add(np.ascontiguousarray(a[start : start + step]),
                np.ascontiguousarray(b[start : start + step]))
    return acc.result()


def _name(dtype: np.dtype[Any]) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)
