"""NMF of weights and connection ranking against known factors and NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from weightatlas.core.factors import neuron_rgb, one_sided_nmf, rank_connections
from weightatlas.errors import ShapeError, UnsupportedError


def match_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine similarity between rows of a and their best match in b."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((an @ bn.T).max(axis=1).min())


def test_family_with_known_nonnegative_factors_is_recovered(rng):
    channel = rng.random((3, 40)) * (rng.random((3, 40)) > 0.6)  # sparse, non-negative
    spatial = rng.random((12, 3, 5, 5))
    family = np.einsum("ukyx,kc->ucyx", spatial, channel)
    f = one_sided_nmf(family, 3)
    assert f.relative_error < 1e-3
    assert match_rows(f.channel, channel) > 0.999
    np.testing.assert_allclose(f.reconstruct(), family, atol=1e-3 * np.abs(family).max())


def test_signed_spatial_factors_recombine(rng):
    channel = rng.random((2, 30)) * (rng.random((2, 30)) > 0.5)
    spatial = rng.standard_normal((8, 2, 3, 3))
    family = np.einsum("ukyx,kc->ucyx", spatial, channel)
    f = one_sided_nmf(family, 4)
    assert f.spatial.shape == (8, 4, 3, 3) and (f.channel >= 0).all()
    recon = np.einsum("ukyx,kc->ucyx", f.spatial, f.channel)
    assert f.relative_error == pytest.approx(
        np.linalg.norm(family - recon) / np.linalg.norm(family), rel=1e-12)
    assert f.relative_error < 0.05
    more = one_sided_nmf(family, 1)
    assert more.relative_error > f.relative_error  # fewer factors, worse fit


def test_linear_family_and_table(rng):
    w = rng.random((10, 2)) @ rng.random((2, 16))
    f = one_sided_nmf(w, 2)
    assert f.spatial.shape == (10, 2, 1, 1)
    t = f.table()
    assert t.num_rows == 32 and set(t.column("factor").to_pylist()) == {0, 1}
    np.testing.assert_allclose(t.column("loading").to_numpy().reshape(2, 16), f.channel)


def test_neuron_rgb_is_a_normalised_three_factor_image(rng):
    w = rng.standard_normal((6, 16, 5, 5))
    rgb = neuron_rgb(w, 3)
    assert rgb.shape == (5, 5, 3) and rgb.min() >= 0 and rgb.max() == pytest.approx(1.0)
    from sklearn.decomposition import NMF

    x = np.concatenate([np.maximum(w[3], 0), np.maximum(-w[3], 0)]).reshape(32, 25).T
    u = NMF(3, init="nndsvda", random_state=0, max_iter=1000, tol=1e-6).fit_transform(x)
    np.testing.assert_allclose(rgb.reshape(25, 3), u / u.max(), rtol=1e-6, atol=1e-9)


def test_rank_connections_by_kernel_norm(rng):
    w = rng.standard_normal((5, 20, 3, 3))
    table = rank_connections(w, 2, top_k=4)
    norms = np.linalg.norm(w[2].reshape(20, 9), axis=1)
    expected = np.argsort(-norms)[:4]
    assert table.column("neuron").to_pylist() == expected.tolist()
    np.testing.assert_allclose(table.column("l2").to_numpy(), norms[expected], rtol=1e-12)
    assert table.column("rank").to_pylist() == [1, 2, 3, 4]
    kept = rank_connections(w, 2, min_fraction=0.7)
    assert (kept.column("fraction").to_numpy() >= 0.7).all()
    assert kept.num_rows == int((norms >= 0.7 * norms.max()).sum())
    fwd = rank_connections(w, 7, direction="forward")
    np.testing.assert_allclose(np.sort(fwd.column("l2").to_numpy())[::-1],
                               np.sort(np.linalg.norm(w[:, 7].reshape(5, 9), axis=1))[::-1])
    linear = rank_connections(np.array([[0.5, -3.0, 1.0]]), 0)
    assert linear.column("neuron").to_pylist() == [1, 2, 0]
    assert linear.column("mean").to_pylist() == [-3.0, 1.0, 0.5]


def test_bad_inputs(rng):
    w = rng.standard_normal((4, 3, 3, 3))
    with pytest.raises(ShapeError, match=r"tensor 'b': connection ranking needs"):
        rank_connections(np.ones(3), 0, name="b")
    with pytest.raises(ShapeError, match=r"neuron 9 is outside 0\.\.3"):
        rank_connections(w, 9)
    with pytest.raises(ShapeError, match="per-neuron NMF needs a conv weight"):
        neuron_rgb(np.ones((3, 3)), 0)
    bad = w.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ShapeError, match="NMF needs finite weights, found 1 NaN/Inf"):
        one_sided_nmf(bad, 2)
    with pytest.raises(UnsupportedError, match="n_factors must be at least 1"):
        one_sided_nmf(w, 0)
