"""Statistics computed once, at ingest, for every tensor.

The moments (``mean``, ``std``, ``min``, ``max``, ``abs_max``, ``l2``) are taken over
the finite values only; NaN and Inf are counted (``n_nan``, ``n_inf``), never
silently dropped. ``frac_zero`` is over all values (-0.0 counts as zero). Means and
squared deviations are accumulated in float64 block by block and merged exactly
(Chan, Golub and LeVeque's parallel update), so memory stays flat for any tensor size
and ``std`` stays accurate even when the mean is far larger than the spread. ``std``
is the population standard deviation (ddof=0), as in NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from weightatlas.storage._blocks import c_blocks, little_endian

__all__ = ["STAT_FIELDS", "StatsBuilder", "TensorStats", "blocks", "tensor_stats"]

#: Elements per block: large enough to amortise NumPy call overhead, small enough
#: to stay in cache-friendly sizes and keep memory flat.
BLOCK = 1 << 18


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor. Moments are ``None`` when no value is finite."""

    numel: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    abs_max: float | None
    l2: float | None
    frac_zero: float
    n_nan: int
    n_inf: int

    def as_dict(self) -> dict[str, float | int | None]:
        """The statistics as a plain dict, in column order."""
        return asdict(self)


STAT_FIELDS = tuple(TensorStats.__dataclass_fields__)


class _Accumulator:
    """Streaming mean and sum of squared deviations (Chan et al.'s parallel update).

    Each block contributes its own mean and ``M2 = sum((x - block mean)**2)``, merged
    exactly; this keeps ``std`` accurate when the mean dwarfs the spread (a LayerNorm
    weight near 1 with a spread of 1e-4), where ``E[x**2] - mean**2`` would cancel.
    Figures are kept in units of ``2**e``; ``e`` only becomes non-zero when a block
    holds values above ``2**500`` (float64 data near its range), as LAPACK's ``dnrm2``
    scales, so nothing overflows.
    """

    def __init__(self) -> None:
        # Reused float64 scratch blocks: a fresh 2 MB array per block would cost more
        # in page faults than the arithmetic.
        self.scratch = np.empty(BLOCK, np.float64)
        self.deviations = np.empty(BLOCK, np.float64)
        self.n = 0  # all values
        self.n_finite = 0
        self.n_nan = 0
        self.n_inf = 0
        self.n_zero = 0
        self.e = 0
        self.mean = 0.0  # of the finite values, in units of 2**e
        self.m2 = 0.0  # sum of squared deviations from the mean, in units of 4**e
        self.mn = math.inf
        self.mx = -math.inf

    def add(self, block: np.ndarray, is_float: bool) -> None:
        """Add a 1-d block of float32/float64 (or int converted to float64) values."""
        self.n += block.size
        self.n_zero += int(np.count_nonzero(block == 0))
        if block.size == 0:
            return
        mn, mx = float(block.min()), float(block.max())
        if is_float and not (math.isfinite(mn) and math.isfinite(mx)):
            # Only blocks that hold NaN or Inf pay for the masks.
            nan = np.isnan(block)
            inf = np.isinf(block)
            self.n_nan += int(nan.sum())
            self.n_inf += int(inf.sum())
            block = block[~(nan | inf)]
            if block.size == 0:
                return
            mn, mx = float(block.min()), float(block.max())
        self.mn = min(self.mn, mn)
        self.mx = max(self.mx, mx)
        e = max(0, math.frexp(max(abs(mn), abs(mx)))[1] - 500)
        if e > self.e:
            self.mean = math.ldexp(self.mean, self.e - e)
            self.m2 = math.ldexp(self.m2, 2 * (self.e - e))
            self.e = e
        size = block.size
        if size > self.scratch.size:
            self.scratch = np.empty(size, np.float64)
            self.deviations = np.empty(size, np.float64)
        if block.dtype == np.float64:
            b64, dev = block, self.deviations[:size]  # never write into the caller's data
        else:
            b64 = dev = self.scratch[:size]  # a converted copy: deviations overwrite it
            b64[...] = block
        if self.e:
            b64 = np.ldexp(b64, -self.e)
        block_mean = float(b64.sum()) / size
        dev = np.subtract(b64, block_mean, out=dev)
        # einsum, not ``dev @ dev``: BLAS would start its own threads, which fight the
        # sha256 and writing threads that run beside it (measured: 0.95 s vs 0.59 s per GB).
        block_m2 = float(np.einsum("i,i->", dev, dev))
        total = self.n_finite + size
        delta = block_mean - self.mean
        self.mean += delta * size / total
        self.m2 += block_m2 + delta * delta * self.n_finite * size / total
        self.n_finite = total

    def result(self) -> TensorStats:
        frac_zero = self.n_zero / self.n if self.n else 0.0
        if self.n_finite == 0:
            return TensorStats(self.n, None, None, None, None, None, None,
                               frac_zero, self.n_nan, self.n_inf)
        var = self.m2 / self.n_finite
        sum_squares = self.m2 + self.n_finite * self.mean * self.mean  # no cancellation
        try:
            l2 = math.ldexp(math.sqrt(sum_squares), self.e)
        except OverflowError:
            l2 = math.inf  # the true norm exceeds the float64 range
        return TensorStats(
            numel=self.n,
            mean=math.ldexp(self.mean, self.e),
            std=math.ldexp(math.sqrt(var), self.e),
            min=self.mn,
            max=self.mx,
            abs_max=max(abs(self.mn), abs(self.mx)),
            l2=l2,
            frac_zero=frac_zero,
            n_nan=self.n_nan,
            n_inf=self.n_inf,
        )


def blocks(array: np.ndarray, scratch: np.ndarray | None = None,
           into: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The blocks statistics are taken over: :func:`~._blocks.c_blocks` of ``BLOCK``.

    The writer feeds these same blocks to :class:`StatsBuilder` (and to its checksums),
    so a tensor's stored statistics equal :func:`tensor_stats` of it, bit for bit.
    """
    return c_blocks(array, BLOCK, scratch, into)


class StatsBuilder:
    """The statistics of one tensor, fed its values block by block in C order.

    Example:
        >>> b = StatsBuilder(np.dtype(np.float32))
        >>> for _, block in blocks(np.array([[3.0, 0.0], [-4.0, np.inf]], np.float32)):
        ...     b.add(block)
        >>> s = b.result()
        >>> (s.l2, s.n_inf, s.frac_zero)
        (5.0, 1, 0.25)
    """

    def __init__(self, dtype: np.dtype) -> None:
        dtype = little_endian(np.dtype(dtype))
        self._acc = _Accumulator()
        self._kind = dtype.kind
        # ml_dtypes types (bfloat16, float8) report kind 'V'; treat them as floats.
        self._is_float = self._kind in ("f", "V")
        self._target = np.float64 if dtype == np.float64 or not self._is_float else np.float32
        self._convert: np.ndarray | None = None  # reused for narrow floats and integers

    def add(self, block: np.ndarray) -> None:
        """Add the next 1-d block of values (in C order)."""
        if self._kind == "b":
            block = block.view(np.uint8)
        if block.dtype not in (np.float32, np.float64):
            if self._convert is None or block.size > self._convert.size:
                self._convert = np.empty(block.size, self._target)
            converted = self._convert[: block.size]
            converted[...] = block
            block = converted
        self._acc.add(block, self._is_float)

    def result(self) -> TensorStats:
        """The statistics of every value added so far."""
        return self._acc.result()


def tensor_stats(array: np.ndarray) -> TensorStats:
    """Compute the ingest statistics of an array of any stored dtype.

    Example:
        >>> tensor_stats(np.array([3.0, -4.0, 0.0, np.nan], np.float32)).l2
        5.0
    """
    builder = StatsBuilder(array.dtype)
    for _, block in blocks(array):
        builder.add(block)
    return builder.result()
