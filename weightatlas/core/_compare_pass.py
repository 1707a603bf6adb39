"""Measuring one aligned pair: each side's bytes read once, checked and measured hot.

A pair whose B tensor needs no transpose (``identity`` or ``reshape``: the values of
both sides line up in C order) is measured in a single pass: both tensors are
streamed with :meth:`~weightatlas.storage.Snapshot.iter_chunks` in pieces of
``block`` values, each piece checksummed (XXH3-128, the stored row's) and handed,
while it is still in the cache, to the metrics'
:class:`~weightatlas.core._compare_metrics.Accumulator`, which computes everything
from it. A checksum mismatch surfaces as an :class:`~weightatlas.errors.IntegrityError`
before the pass ends, so no result is made from damaged bytes. A pair holding NaN or
infinities gets a second pass, in float64 over the positions where both are finite.
Pairs of equal content (equal dtype and XXH3-128 of every chunk, from the snapshots'
small columns) are identical without reading a byte.

A transposed pair is read whole (checksum verified: one pass) and differenced from
strided views a few rows at a time (a second pass). A square matrix whose axes are
unnamed on either side may be stored transposed on one side: when it comes out
``changed``, a fixed sample of 4,096 positions tells whether the transpose is clearly
closer (half the squared difference or less), and only then is the transpose measured
in full and kept if closer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from weightatlas.core._align_names import Transform
from weightatlas.core._align_tensors import Alignment, Match, Tensor
from weightatlas.core._compare_metrics import PairStats, diff_arrays, measure_pieces
from weightatlas.errors import IntegrityError
from weightatlas.storage import Snapshot

__all__ = ["SAMPLE", "measure", "paired"]

#: Positions sampled to decide whether a square pair with unnamed axes is transposed.
SAMPLE = 4096


def _range(t: Tensor, rows: tuple[int, int] | None) -> tuple[int, int]:
    """The flat value range of ``rows`` (of the first axis) of a tensor, or all of it."""
    if rows is None:
        return 0, t.numel
    inner = t.numel // t.shape[0] if t.shape and t.shape[0] else 0
    return rows[0] * inner, rows[1] * inner


def paired(xs: Iterator[np.ndarray], ys: Iterator[np.ndarray], what: str
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pieces of two streams of equally many values, cut to line up pairwise.

    Both streams are run to their end (their checksums are checked there).

    Raises:
        IntegrityError: One stream ends before the other (``what`` names the pair).

    Example:
        >>> xs = iter([np.arange(3), np.arange(3, 5)])
        >>> ys = iter([np.arange(2), np.arange(2, 5)])
        >>> [(x.tolist(), y.tolist()) for x, y in paired(xs, ys, "x, y")]
        [([0, 1], [0, 1]), ([2], [2]), ([3, 4], [3, 4])]
    """
    x, y = next(xs, None), next(ys, None)
    while x is not None and y is not None:
        if x.size == y.size:  # the usual case: both cut at the same places
            yield x, y
            x, y = next(xs, None), next(ys, None)
            continue
        n = min(x.size, y.size)
        yield x[:n], y[:n]
        x = x[n:] if n < x.size else next(xs, None)
        y = y[n:] if n < y.size else next(ys, None)
    if x is not None or y is not None:
        raise IntegrityError(f"{what}: the two tensors hold different numbers of values")


def _stream(a: Snapshot, b: Snapshot, ta: Tensor, tb: Tensor, m: Match, block: int
            ) -> PairStats:
    a0, a1 = _range(ta, m.a_rows)
    b0, b1 = _range(tb, m.b_rows)

    def pieces() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        xs = a.iter_chunks(m.a, size=block, start=a0, stop=a1)
        ys = b.iter_chunks(m.b, size=block, start=b0, stop=b1)
        return paired(xs, ys, f"{a.ref} {m.a!r} and {b.ref} {m.b!r}")

    return measure_pieces(ta.dtype, tb.dtype, pieces, block)


def _arrays(a: Snapshot, b: Snapshot, m: Match, verify: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """Both sides whole, B brought to A's shape by the pair's transform (views)."""
    xa = a.read(m.a, verify=verify)
    xb = b.read(m.b, verify=verify)
    if m.a_rows is not None:
        xa = xa[m.a_rows[0] : m.a_rows[1]]
    if m.b_rows is not None:
        xb = xb[m.b_rows[0] : m.b_rows[1]]
    perm = m.transform.perm
    yb = xb.transpose(perm) if perm is not None else xb
    return xa, yb if yb.shape == xa.shape else yb.reshape(xa.shape)


def _whole(a: Snapshot, b: Snapshot, ta: Tensor, tb: Tensor, m: Match, block: int, *,
           flip: bool = False) -> PairStats:
    xa, yb = _arrays(a, b, m)
    return diff_arrays(xa, yb.T if flip else yb, ta.dtype, tb.dtype, block=block)


@functools.lru_cache(maxsize=16)
def _sample(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of :data:`SAMPLE` fixed positions of an ``n`` x ``n`` matrix, and of
    their mirror images."""
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, n, SAMPLE), rng.integers(0, n, SAMPLE)
    return i * n + j, j * n + i


def _transpose_closer(a: Snapshot, b: Snapshot, m: Match) -> bool:
    """Whether B's transpose is clearly closer to A than B is, on a fixed sample.

    Squared differences at :data:`SAMPLE` positions (seeded, so repeatable), unverified
    bytes: only the decision to measure the transpose, which reads verified, rests on it.
    Unrelated matrices are about as far from B as from its transpose; those keep the
    stored orientation, instead of taking whichever came out closer by chance.
    """
    xa, yb = _arrays(a, b, m, verify=False)
    here, mirrored = _sample(xa.shape[0])
    flat_a, flat_b = xa.reshape(-1), np.ascontiguousarray(yb).reshape(-1)
    va = flat_a.take(here).astype(np.float64)
    vb, vm = flat_b.take(here).astype(np.float64), flat_b.take(mirrored).astype(np.float64)
    ok = np.isfinite(va) & np.isfinite(vb) & np.isfinite(vm)  # a NaN must not decide
    with np.errstate(invalid="ignore", over="ignore"):
        kept = float(np.sum((va[ok] - vb[ok]) ** 2))
        flipped = float(np.sum((va[ok] - vm[ok]) ** 2))
    return flipped < 0.5 * kept


def measure(a: Snapshot, b: Snapshot, found: Alignment, m: Match, block: int
            ) -> tuple[Match, PairStats]:
    """The differences of one aligned pair (and the match, relabelled if they tell more).

    A square matrix whose axes are unnamed on either side that came out ``changed`` is
    measured transposed too when a sample says the transpose is clearly closer, and the
    closer kept (noted); rows of a fused tensor that
    are byte-identical to their part become method ``hash``.
    """
    ta, tb = found.tensors_a[m.a], found.tensors_b[m.b]
    if (m.a_rows is None and m.b_rows is None and m.transform.perm is None
            and ta.content == tb.content):
        # Equal dtype and XXH3-128 of every chunk: equal bytes, nothing to read.
        return m, PairStats(0.0, 0.0, 1.0 if ta.l2 else None, "identical", 0)
    t = m.transform
    if t.perm is None:
        stats = _stream(a, b, ta, tb, m, block)
    else:
        stats = _whole(a, b, ta, tb, m, block)
    shape = ta.shape if m.a_rows is None else (m.a_rows[1] - m.a_rows[0], *ta.shape[1:])
    square = len(shape) == 2 and shape[0] == shape[1] and t.perm is None and any(
        x.startswith("d") and x[1:].isdigit() for x in (*ta.layout, *tb.layout))
    if square and stats.verdict == "changed" and _transpose_closer(a, b, m):
        other = _whole(a, b, ta, tb, m, block, flip=True)
        if other.rel_l2 < stats.rel_l2:
            m = Match(m.a, m.b, m.method, m.confidence, Transform((1, 0)), m.a_rows, m.b_rows,
                      (m.note + "; " if m.note else "") + "transposed: axes were unnamed")
            stats = other
    if (m.a_rows or m.b_rows) and stats.verdict == "identical" and ta.dtype == tb.dtype:
        m = Match(m.a, m.b, "hash", 1.0, m.transform, m.a_rows, m.b_rows, m.note)
    return m, stats
