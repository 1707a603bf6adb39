"""Projections against scikit-learn, on planted clusters and on a model trained on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.core.projection import pca, project, projection, trajectory_pca
from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def clusters(rng, n_per=60, dims=40, k=3, spread=8.0):
    centres = rng.standard_normal((k, dims)) * spread
    x = np.concatenate([c + rng.standard_normal((n_per, dims)) for c in centres])
    return x, np.repeat(np.arange(k), n_per)


def knn_purity(coords, labels, k=5):
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def test_pca_matches_scikit_learn(rng):
    from sklearn.decomposition import PCA

    for shape in [(300, 20), (15, 60)]:
        x = rng.standard_normal(shape) @ rng.standard_normal((shape[1], shape[1]))
        coords, ratio = pca(x, 3)
        ref = PCA(3, svd_solver="full").fit(x)
        theirs = ref.transform(x)
        signs = np.sign((coords * theirs).sum(axis=0))
        np.testing.assert_allclose(coords, theirs * signs, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-9)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_planted_clusters_are_separated(rng, method):
    x, labels = clusters(rng)
    coords, facts = project(x, method, seed=0, n_jobs=1)
    assert coords.shape == (180, 2)
    assert knn_purity(coords, labels) > 0.95
    if method == "tsne":
        assert facts == {}  # 40 dims: no PCA pre-reduction


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_umap_separates_planted_clusters(rng):
    pytest.importorskip("umap")
    x, labels = clusters(rng)
    coords, _ = project(x, "umap", seed=0)
    assert knn_purity(coords, labels) > 0.95


def test_tsne_reduces_wide_rows_with_pca_first(rng):
    x, labels = clusters(rng, dims=120)
    coords, facts = project(x, "tsne", pca_dims=10, n_jobs=1)
    assert 0.5 < facts["pca_variance_kept"] <= 1.0
    assert knn_purity(coords, labels) > 0.95


def test_projection_of_snapshot_neurons(store: Store, rng):
    conv = rng.standard_normal((24, 3, 3, 3)).astype(np.float32)
    conv[5, 0, 0, 0] = np.nan
    fc = rng.standard_normal((10, 27)).astype(np.float32)
    snap = store.write(RecordsSource([
        TensorRecord("conv.weight", conv, kind="conv2d", layout=("out", "in", "h", "w")),
        TensorRecord("fc.weight", fc, kind="linear", layout=("out", "in")),
        TensorRecord("head.weight", rng.standard_normal((4, 7)).astype(np.float32)),
        TensorRecord("bias", np.zeros(3, np.float32)),
    ]), "m")
    table = projection(snap, ["conv.weight", "fc.weight"], clusters=2)
    assert table.num_rows == 24 + 10 - 1
    meta = json.loads(table.schema.metadata[b"weightatlas"])
    assert meta["skipped_rows"] == 1 and meta["method"] == "pca"
    rows = table.to_pylist()
    assert 5 not in [r["index"] for r in rows if r["tensor"] == "conv.weight"]
    fc_rows = [r for r in rows if r["tensor"] == "fc.weight"]
    np.testing.assert_allclose([r["norm"] for r in fc_rows],
                               np.linalg.norm(fc.astype(np.float64), axis=1), rtol=1e-12)
    assert set(table.column("cluster").to_pylist()) == {0, 1}
    with pytest.raises(ShapeError, match=r"rows of 7 values cannot be projected with rows "
                       r"of 27"):
        projection(snap, ["conv.weight", "head.weight"])
    with pytest.raises(ShapeError, match=r"tensor 'bias': neuron projections need"):
        projection(snap, "bias")
    with pytest.raises(UnsupportedError, match="projection method must be"):
        projection(snap, "fc.weight", "lda")


def test_trajectory_pca_matches_scikit_learn(tmp_path, digits_checkpoints):
    from sklearn.decomposition import PCA

    store = wa.open_store(tmp_path / "store")
    for path, step in zip(digits_checkpoints, (1, 10, 60), strict=True):
        wa.ingest(path, store=store, model="digits", step=step)
    table = trajectory_pca(store, "digits")
    assert table.column("step").to_pylist() == [1, 10, 60]
    snaps = [store.snapshot(f"digits@{s}") for s in (1, 10, 60)]
    names = snaps[0].names
    flat = np.stack([np.concatenate([s.read(n).ravel() for n in names]).astype(np.float64)
                     for s in snaps])
    ref = PCA(2).fit(flat)
    theirs = ref.transform(flat)
    ours = np.stack([table.column("pc1").to_numpy(), table.column("pc2").to_numpy()], axis=1)
    signs = np.sign((ours * theirs).sum(axis=0))
    np.testing.assert_allclose(ours, theirs * signs, rtol=1e-6, atol=1e-8)
    meta = json.loads(table.schema.metadata[b"weightatlas"])
    np.testing.assert_allclose(meta["explained_variance_ratio"], ref.explained_variance_ratio_,
                               rtol=1e-6)


def test_trajectory_reports_changed_shapes_per_tensor(store: Store, rng):
    for step, width in ((0, 4), (1, 4), (2, 5)):
        store.write(RecordsSource([
            TensorRecord("stable.weight", rng.standard_normal((3, 3))),
            TensorRecord("grown.weight", rng.standard_normal((3, width))),
        ]), "m", step=step)
    table = trajectory_pca(store, "m")
    meta = json.loads(table.schema.metadata[b"weightatlas"])
    assert meta["tensors"] == ["stable.weight"]
    assert meta["excluded"] == {"grown.weight": "shape changed between snapshots: "
                                                "[[3, 4], [3, 5]]"}
    store.rm("m@1")
    store.rm("m@2")
    with pytest.raises(ShapeError, match="needs at least 2 snapshots, found 1"):
        trajectory_pca(store, "m")
