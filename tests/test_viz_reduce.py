"""The reductions behind the charts, against NumPy references computed block by block."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz import (
    _reduce,
    as_float,
    block_grid,
    block_reduce,
    histogram_counts,
    joint_histogram,
    pair_stats,
)


def reference_blocks(x: np.ndarray, factors: tuple[int, ...]) -> dict[str, np.ndarray]:
    """min, max, mean, value of largest magnitude and non-finite count per block, by slicing."""
    grid = [math.ceil(n / f) for n, f in zip(x.shape, factors, strict=True)]
    out = {k: np.full(grid, np.nan) for k in ("min", "max", "mean", "maxabs")}
    out["bad"] = np.zeros(grid, np.int64)
    for idx in np.ndindex(*grid):
        sl = tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors, strict=True))
        block = x[sl].astype(np.float64).ravel()
        fin = block[np.isfinite(block)]
        out["bad"][idx] = block.size - fin.size
        if fin.size:
            out["min"][idx], out["max"][idx] = fin.min(), fin.max()
            out["mean"][idx] = fin.sum() / fin.size
            hi, lo = fin.max(), fin.min()
            out["maxabs"][idx] = hi if abs(hi) >= abs(lo) else lo
    return out


def test_block_grid_fits_the_budget_and_keeps_columns_for_tall_matrices():
    assert block_grid((30522, 384), 4096) == (239, 12)
    fr, fc = block_grid((30522, 384), 4096)
    assert math.ceil(30522 / fr) * math.ceil(384 / fc) <= 4096
    assert math.ceil(384 / fc) >= 16  # a tall matrix still has many columns
    assert block_grid((10, 10), 100) == (1, 1)
    assert block_grid((1000,), 64) == (16,)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3000), cols=st.integers(1, 3000), cells=st.integers(1, 5000))
def test_block_grid_never_exceeds_the_cell_budget(rows: int, cols: int, cells: int):
    fr, fc = block_grid((rows, cols), cells)
    assert fr >= 1 and fc >= 1
    assert math.ceil(rows / fr) * math.ceil(cols / fc) <= max(cells, 1)


def test_block_grid_rejects_bad_budgets():
    with pytest.raises(ShapeError, match="max_cells must be at least 1"):
        block_grid((4, 4), 0)
    with pytest.raises(ShapeError, match="1-d or 2-d shape"):
        block_grid((2, 2, 2), 4)


@pytest.mark.parametrize("shape,factors", [((37, 23), (5, 4)), ((64, 64), (1, 8)),
                                           ((6, 5, 3, 3), (4, 2, 1, 1)), ((100,), (7,)),
                                           ((9, 9, 5, 5), (9, 9, 2, 3))],
                         ids=["2d-edges", "2d-cols", "conv-channels", "1d", "conv-spatial"])
def test_block_reduce_matches_slicing(rng: np.random.Generator, shape, factors):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    s = block_reduce(x, factors)
    ref = reference_blocks(x, factors)
    np.testing.assert_array_equal(s.min, ref["min"])
    np.testing.assert_array_equal(s.max, ref["max"])
    np.testing.assert_array_equal(s.maxabs, ref["maxabs"])
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(s.n_nonfinite, ref["bad"])
    assert s.size.sum() == x.size
    assert s.grid == ref["min"].shape


def test_block_reduce_counts_nan_and_inf_apart_and_keeps_finite_statistics(rng):
    x = rng.standard_normal((20, 30))
    x[0, 0], x[0, 1], x[7, 13] = np.nan, np.inf, -np.inf
    x[12:16, 20:25] = np.nan  # a whole block of NaN: no finite value at all
    s = block_reduce(x, (4, 5))
    ref = reference_blocks(x, (4, 5))
    np.testing.assert_array_equal(s.n_nonfinite, ref["bad"])
    np.testing.assert_array_equal(s.max, ref["max"])
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=1e-12)
    assert np.isnan(s.mean[3, 4]) and s.n_finite[3, 4] == 0
    assert s.n_nonfinite.sum() == 3 + 20


def test_block_maxabs_keeps_the_sign_and_prefers_positive_on_ties():
    s = block_reduce(np.array([[0.5, -0.5, -3.0, 1.0]]), (1, 2))
    assert s.maxabs.tolist() == [[0.5, -3.0]]


def test_block_reduce_rejects_bad_factors_and_empty_tensors():
    with pytest.raises(ShapeError, match=r"block factors \[2\] do not fit shape \[3, 3\]"):
        block_reduce(np.zeros((3, 3)), (2,))
    with pytest.raises(ShapeError, match="holds no values"):
        block_reduce(np.zeros((0, 3)), (1, 1))


def test_as_float_widens_exactly_and_refuses_non_numbers():
    bf = np.array([1.5, -2.25, 3e38], ml_dtypes.bfloat16)
    assert as_float(bf).dtype == np.float32
    assert as_float(bf).tolist() == [float(v) for v in bf.astype(np.float32)]
    assert as_float(np.array([True, False])).tolist() == [1.0, 0.0]
    assert as_float(np.array([2**40], np.int64)).tolist() == [2.0**40]
    x = np.ones(3, np.float32)
    assert as_float(x) is x  # no copy
    with pytest.raises(UnsupportedError, match="dtype complex128 cannot be charted"):
        as_float(np.ones(2, complex), "z")


@pytest.mark.parametrize("bins", [1, 7, 60])
def test_histogram_counts_match_numpy_and_count_nonfinite(rng, bins: int, monkeypatch):
    monkeypatch.setattr(_reduce, "_SLICE", 1000)  # walk the array in many slices
    x = rng.standard_normal(12_345).astype(np.float32)
    x[[3, 50, 900]] = np.nan
    x[[4, 5]] = np.inf
    x[6] = -np.inf
    h = histogram_counts(x, bins)
    finite = x[np.isfinite(x)].astype(np.float64)
    counts, edges = np.histogram(finite, bins=bins)
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_array_equal(h.edges, edges)
    assert (h.n_nan, h.n_posinf, h.n_neginf) == (3, 2, 1)
    assert h.n_finite == finite.size


def test_histogram_counts_constant_and_empty_tensors():
    h = histogram_counts(np.full(10, 2.0), 4)
    assert h.edges[0] == 1.5 and h.edges[-1] == 2.5  # numpy widens a constant's range
    np.testing.assert_array_equal(h.counts, np.histogram(np.full(10, 2.0), 4)[0])
    h = histogram_counts(np.array([np.nan, np.nan]), 3)
    assert h.n_finite == 0 and h.n_nan == 2
    with pytest.raises(ShapeError, match="bins must be at least 1"):
        histogram_counts(np.ones(3), 0)
    with pytest.raises(ShapeError, match="is not a finite interval"):
        histogram_counts(np.ones(3), 3, range=(1.0, math.inf))


def test_joint_histogram_matches_numpy_histogram2d(rng, monkeypatch):
    monkeypatch.setattr(_reduce, "_SLICE", 700)
    a = rng.standard_normal(5000)
    b = a + 0.1 * rng.standard_normal(5000)
    b[17] = np.nan
    counts, edges, skipped = joint_histogram(a, b, 16)
    ok = np.isfinite(a) & np.isfinite(b)
    lo, hi = min(a[ok].min(), b[ok].min()), max(a[ok].max(), b[ok].max())
    ref, ea, _ = np.histogram2d(a[ok], b[ok], bins=16, range=[[lo, hi], [lo, hi]])
    np.testing.assert_array_equal(counts, ref.astype(np.int64))
    np.testing.assert_allclose(edges, ea)
    assert skipped == 1 and counts.sum() == 4999


def test_pair_stats_match_float64_formulas(rng, monkeypatch):
    monkeypatch.setattr(_reduce, "_SLICE", 333)
    a = rng.standard_normal((40, 30)).astype(np.float32)
    b = (a + 0.01 * rng.standard_normal((40, 30))).astype(np.float32)
    s = pair_stats(a, b)
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    assert s.rel_l2 == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-12)
    assert s.cosine == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel=1e-12)
    assert s.max_abs_diff == np.abs(y - x).max()
    assert s.numel == 1200 and s.n_nonfinite == 0


def test_pair_stats_edge_cases():
    z = np.zeros(3)
    assert pair_stats(z, z).rel_l2 == 0.0 and math.isnan(pair_stats(z, z).cosine)
    assert pair_stats(z, np.ones(3)).rel_l2 == math.inf
    s = pair_stats(np.array([1.0, np.nan, 2.0]), np.array([1.0, 5.0, 4.0]))
    assert s.n_nonfinite == 1 and s.max_abs_diff == 2.0
    with pytest.raises(ShapeError, match=r"shapes \[2, 3\] and \[3, 2\] differ"):
        pair_stats(np.zeros((2, 3)), np.zeros((3, 2)))
