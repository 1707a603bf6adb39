"""Ingest statistics against a float64 NumPy reference, NaN/Inf counted, extremes handled."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weightatlas.storage import RecordsSource, Store, TensorRecord, _stats, tensor_stats


def reference(a: np.ndarray) -> dict:
    x = a.astype(np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    out = {
        "numel": x.size,
        "n_nan": int(np.isnan(x).sum()),
        "n_inf": int(np.isinf(x).sum()),
        "frac_zero": float((x == 0).mean()) if x.size else 0.0,
    }
    if finite.size:
        out.update(mean=finite.mean(), std=finite.std(), min=finite.min(), max=finite.max(),
                   abs_max=np.abs(finite).max(), l2=np.sqrt((finite**2).sum()))
    else:
        out.update(mean=None, std=None, min=None, max=None, abs_max=None, l2=None)
    return out


def check(a: np.ndarray, rel: float = 1e-9) -> None:
    got = tensor_stats(a).as_dict()
    want = reference(a)
    for k, v in want.items():
        if v is None or isinstance(v, int):
            assert got[k] == v, k
        else:
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-12), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.int8,
                                   np.int64, np.uint8, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_matches_float64_reference(dtype, rng):
    a = (rng.standard_normal((300, 70)) * 3).astype(dtype)
    check(a)


def test_many_blocks_and_strided_input(rng, monkeypatch):
    monkeypatch.setattr(_stats, "BLOCK", 1000)
    a = rng.standard_normal((97, 211)).astype(np.float32)
    check(a)
    check(a.T)  # non-contiguous: blocks taken along the first axis
    check(a[::3, 5:])


@pytest.mark.parametrize("mean,spread", [(1.0, 1e-4), (100.0, 1e-3), (1000.0, 1e-3),
                                         (-3e4, 0.5)])
def test_std_is_accurate_when_the_mean_dwarfs_the_spread(rng, monkeypatch, mean, spread):
    monkeypatch.setattr(_stats, "BLOCK", 4096)  # many blocks to merge
    a = (mean + spread * rng.standard_normal(1_000_003)).astype(np.float32)
    x = a.astype(np.float64)
    s = tensor_stats(a)
    assert s.std == pytest.approx(x.std(), rel=1e-9)
    assert s.mean == pytest.approx(x.mean(), rel=1e-12)
    assert s.l2 == pytest.approx(np.sqrt((x * x).sum()), rel=1e-12)


@pytest.mark.parametrize("value", [1.1, 0.3, -7.25, 1e30])
def test_constant_tensors_have_zero_std(value, monkeypatch):
    monkeypatch.setattr(_stats, "BLOCK", 1000)
    s = tensor_stats(np.full(10_007, value, np.float32))
    assert s.std == 0.0
    assert s.mean == float(np.float32(value))


def test_nan_and_inf_are_counted_and_excluded_from_moments():
    a = np.array([1.0, np.nan, -np.inf, 2.0, np.inf, 0.0, -0.0, np.nan], np.float32)
    s = tensor_stats(a)
    assert (s.n_nan, s.n_inf, s.numel) == (2, 2, 8)
    assert s.mean == pytest.approx(0.75)
    assert (s.min, s.max, s.abs_max) == (0.0, 2.0, 2.0) or (s.min, s.max) == (-0.0, 2.0)
    assert s.l2 == pytest.approx(math.sqrt(5))
    assert s.frac_zero == 2 / 8


def test_all_nan_and_empty_tensors():
    s = tensor_stats(np.full(5, np.nan, np.float16))
    assert s.n_nan == 5 and s.mean is None and s.l2 is None and s.frac_zero == 0.0
    e = tensor_stats(np.zeros((0, 3), np.float32))
    assert e.numel == 0 and e.mean is None and e.frac_zero == 0.0


def test_float64_extremes_do_not_overflow():
    a = np.array([1e300, -1e300, 1e300, 3.0])
    s = tensor_stats(a)
    assert s.mean == pytest.approx(a.mean())
    assert s.std == pytest.approx(np.std(a / 1e300) * 1e300)
    assert s.l2 == pytest.approx(math.sqrt(3) * 1e300)
    assert tensor_stats(np.array([1.7e308, 1.7e308])).l2 == math.inf  # true norm > max float


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16]),
                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=20),
                  elements=st.floats(-1e4, 1e4, width=16)
                  | st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])))
def test_property_matches_reference(a):
    check(a, rel=1e-7)


def test_statistics_are_stored_on_the_row(store: Store, rng):
    a = rng.standard_normal((40, 9)).astype(np.float32)
    a[0, 0] = np.nan
    snap = store.write(RecordsSource([TensorRecord("w", a)]), "m")
    row = snap.tensors().to_pylist()[0]
    want = reference(a)
    assert row["n_nan"] == 1 and row["numel"] == a.size
    assert row["std"] == pytest.approx(want["std"], rel=1e-12)
    assert row["l2"] == pytest.approx(want["l2"], rel=1e-12)
