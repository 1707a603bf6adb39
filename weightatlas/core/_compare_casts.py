"""What a difference between two tensors is: a dtype cast, rounding, or a real change.

Fed the same pieces as the metrics (:mod:`weightatlas.core._compare_metrics`), an
:class:`Explanation` keeps the explanations that still hold for every value seen:

- ``cast_<t>`` (``t`` in float32, float16, bfloat16), per side: one side is exactly the
  other rounded to ``t`` (round to nearest even, as a cast does), ``b == t(a)`` or
  ``a == t(b)``; only dtypes coarser than the finer of the pair are candidates;
- ``rounding``: not one cast, but no difference exceeds 4 units in the last place of
  the coarser dtype of the pair (arithmetic at that precision).

A candidate that fails on one piece is dropped and never checked again, and the first
piece's first 256 values are checked before the rest, so a real change usually costs
one check of 256 values; a pair that *is* a cast is checked on every value. The
bfloat16 check on float32 values is integer arithmetic on the bit patterns (round to
nearest even: add ``0x7fff`` plus the lowest kept bit, clear the low 16 bits), about
twice as fast as casting there and back; the others cast. The rounding bound for two
float32 tensors takes the unit in the last place from the exponent bits, in float32;
it is checked on every piece while it holds (also while a cast still explains them).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CASTS", "FORMATS", "NARROW", "PROBE", "Explanation", "bfloat16_bits", "dtype_name",
           "precision", "ulp"]

#: (mantissa bits including the implicit one, smallest normal exponent) of each float.
FORMATS = {"float64": (53, -1022), "float32": (24, -126), "float16": (11, -14),
           "bfloat16": (8, -126), "float8_e4m3fn": (4, -6), "float8_e5m2": (3, -14)}
#: Formats differenced in float32 (exactly, for all but float32 itself).
NARROW = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: The casts a difference can be explained by, finest first.
CASTS = ("float32", "float16", "bfloat16")
#: Values checked first, before the whole piece.
PROBE = 256
_NUMPY: dict[str, Any] = {"float32": np.float32, "float16": np.float16,
                          "bfloat16": ml_dtypes.bfloat16}


def precision(dtype: str) -> int:
    """Mantissa bits of a float format (0 for anything else).

    Example:
        >>> precision("bfloat16"), precision("int32")
        (8, 0)
    """
    return FORMATS[dtype][0] if dtype in FORMATS else 0


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The store's name of a NumPy dtype (``bfloat16`` for ml_dtypes' type)."""
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)


def ulp(x: np.ndarray, fmt: str) -> np.ndarray:
    """One unit in the last place of ``fmt`` at magnitude ``x`` (float64, ``x >= 0``).

    Example:
        >>> ulp(np.array([1.0, 0.0]), "bfloat16").tolist() == [2.0**-7, 2.0**-133]
        True
    """
    p, emin = FORMATS[fmt]
    _, e = np.frexp(x)
    e = np.where(x == 0, emin + 1, e) - 1
    return np.ldexp(1.0, np.maximum(e, emin) - (p - 1))


def bfloat16_bits(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The float32 bit patterns of finite float32 ``x`` rounded to bfloat16 (into ``out``).

    Example:
        >>> import ml_dtypes
        >>> x = np.array([1.00390625, 1.01171875, -3.3e38, 1e-40], np.float32)
        >>> got = bfloat16_bits(x, np.empty(4, np.uint32)).view(np.float32)
        >>> bool(np.array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32)))
        True
    """
    u = x.view(np.uint32)
    np.right_shift(u, 16, out=out)
    np.bitwise_and(out, 1, out=out)
    np.add(out, u, out=out)
    np.add(out, 0x7FFF, out=out)
    return np.bitwise_and(out, 0xFFFF0000, out=out)


def _within_4_ulp32(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> bool:
    """``|d| <= 4 ulp(max(|x|, |y|))`` for float32, from the exponent bits (as :func:`ulp`).

    Example:
        >>> x = np.array([1.0, 0.0], np.float32)
        >>> y = np.array([1.0 + 2**-21, 2.0**-147], np.float32)
        >>> _within_4_ulp32(x, y, x - y), _within_4_ulp32(x, 2 * y, x - 2 * y)
        (True, False)
    """
    mag = np.maximum(np.abs(x), np.abs(y))
    np.bitwise_and(mag.view(np.uint32), 0x7F800000, out=mag.view(np.uint32))  # 2**e, or 0
    np.multiply(mag, np.float32(2.0**-21), out=mag)  # 4 ulp of a normal number
    np.maximum(mag, np.float32(2.0**-147), out=mag)  # 4 ulp of zero and subnormals
    return bool(np.all(np.abs(d) <= mag))


class Explanation:
    """The casts (and the rounding) that can still explain every pair of values seen.

    Args:
        a_dtype, b_dtype: The stored dtype names of the two sides.
        size: The largest piece :meth:`update` will get (sizes the scratch buffers).

    Example:
        >>> import ml_dtypes
        >>> x = np.linspace(-1, 1, 101, dtype=np.float32)
        >>> y = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        >>> e = Explanation("float32", "float32", 101)
        >>> e.update(x, y, x - y)
        >>> e.verdict()
        'cast_bfloat16'
    """

    def __init__(self, a_dtype: str, b_dtype: str, size: int) -> None:
        floats = a_dtype in FORMATS and b_dtype in FORMATS
        self.coarse = min((a_dtype, b_dtype), key=precision) if floats else None
        finest = max(precision(a_dtype), precision(b_dtype))
        self.casts: dict[str, set[str]] = {
            t: {"a", "b"} for t in CASTS if floats and FORMATS[t][0] < finest}
        self.rounding = floats
        self._probe = True
        self._same = np.empty(size, np.bool_)

    @property
    def open(self) -> bool:
        """Whether any explanation is still possible (else checking can stop)."""
        return bool(self.casts) or self.rounding

    def update(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
        """Drop the explanations that fail on one piece (finite ``x``, ``y``; ``d``: ``x - y``
        or its absolute value, used as scratch space once the rounding is checked: its
        values are lost).

        On the first piece, its first :data:`PROBE` values are checked first: a real
        change usually fails every explanation there, without a cast of the whole piece
        (an explanation that survives a whole piece is likely to hold: no more probes).
        """
        if self._probe and x.size > PROBE:
            self._update(x[:PROBE], y[:PROBE], d[:PROBE].copy())  # d stays whole for below
            if not self.open:
                return
        self._probe = False
        self._update(x, y, d)

    def _update(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
        if self.rounding and self.coarse is not None:  # every piece: casts may die later
            if self.coarse == "float32" and x.dtype == y.dtype == d.dtype == np.float32:
                self.rounding = _within_4_ulp32(x, y, d)
            else:
                mag = np.maximum(np.abs(x), np.abs(y)).astype(np.float64)
                self.rounding = bool(np.all(np.abs(d) <= 4 * ulp(mag, self.coarse)))
        scratch = d.view(np.uint32) if d.dtype == np.float32 and d.flags.c_contiguous else None
        for t in list(self.casts):
            for side, mine, other in (("a", x, y), ("b", y, x)):
                if side in self.casts[t] and not self._is_cast(other, mine, t, scratch):
                    self.casts[t].discard(side)
            if not self.casts[t]:
                del self.casts[t]

    def _is_cast(self, src: np.ndarray, dst: np.ndarray, t: str,
                 scratch: np.ndarray | None = None) -> bool:
        """Whether ``dst`` holds exactly ``src`` rounded to ``t`` (nearest, ties even)."""
        same = self._same[: src.size]
        if t == "bfloat16" and src.dtype == dst.dtype == np.float32:
            # the bits go where the (already used) differences were: no cache line more
            bits = bfloat16_bits(src, scratch if scratch is not None else np.empty(
                src.size, np.uint32))
            return bool(np.equal(bits, dst.view(np.uint32), out=same).all())
        with np.errstate(over="ignore", invalid="ignore"):  # beyond t's range: inf, as a cast
            rounded = src.astype(_NUMPY[t]).astype(dst.dtype)
        return bool(np.equal(rounded, dst, out=same).all())

    def verdict(self) -> str:
        """``cast_<t>`` (finest ``t`` first), ``rounding`` or ``changed``."""
        for t in CASTS:
            if t in self.casts:
                return "cast_" + t
        return "rounding" if self.rounding else "changed"
