"""Projections of neurons (PCA, t-SNE, UMAP) and of a model's path through training.

The points of a neuron projection are the rows of weight matrices: each output
neuron's incoming weights (a linear weight's rows, a conv filter flattened over
``in x h x w``, an embedding's rows). Several tensors can be projected together when
their rows have the same length, so points can be coloured by layer.

- **PCA** is exact: the eigenvectors of the covariance (``d x d``) in float64, signs
  fixed so that each component's largest loading is positive; it matches
  scikit-learn's PCA up to that sign (tested).
- **t-SNE** runs openTSNE (FFT-accelerated gradients, Barnes-Hut-free, multi-threaded)
  on the data first reduced by PCA to ``pca_dims`` (50) dimensions. The reduction
  keeps the leading variance and the neighbourhoods t-SNE preserves; the cost in
  fidelity is reported as ``pca_variance_kept`` in the table metadata. scikit-learn's
  exact t-SNE is 10x+ slower (docs/performance.md).
- **UMAP** needs the ``umap`` extra (umap-learn).
- **Trajectory PCA** projects whole snapshots: the flattened weights of every step of
  a model. It never builds the ``steps x parameters`` matrix: the ``steps x steps``
  Gram matrix is accumulated tensor by tensor, then centred and diagonalised, which
  is exact PCA with memory bounded by the steps times the largest tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage import Snapshot, Store

__all__ = ["neuron_rows", "pca", "project", "projection", "trajectory_pca"]


def neuron_rows(array: np.ndarray, name: str = "tensor") -> np.ndarray:
    """The rows a weight's neurons are: axis 0 kept, the other axes flattened.

    Raises:
        ShapeError: A tensor with fewer than two dimensions.
    """
    if array.ndim < 2:
        raise ShapeError(f"tensor {name!r}: neuron projections need a weight with at least "
                         f"2 dimensions (one row per neuron), got shape {list(array.shape)}")
    return array.reshape(array.shape[0], -1)


def pca(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Exact PCA: ``(coordinates [n, k], explained_variance_ratio [k])``.

    Example:
        >>> x = np.array([[0.0, 0], [2, 0], [4, 0], [6, 1]])
        >>> coords, ratio = pca(x, 1)
        >>> coords.ravel().round(2).tolist(), bool(ratio[0] > 0.95)
        ([-3.0, -1.03, 0.95, 3.08], True)
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    k = min(n_components, n, d)
    centred = x - x.mean(axis=0)
    if d <= n:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(values)[::-1][:k]
        components = vectors[:, order]
        values = values[order]
        coords = centred @ components
    else:  # fewer points than dimensions: diagonalise the n x n Gram matrix
        values, vectors = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(values)[::-1][:k]
        values = values[order]
        coords = vectors[:, order] * np.sqrt(np.clip(values, 0, None))
        components = centred.T @ vectors[:, order]
    # Deterministic signs: each component's largest |loading| is positive.
    flip = np.sign(components[np.abs(components).argmax(axis=0), np.arange(k)])
    flip[flip == 0] = 1
    total = float((centred**2).sum())
    ratio = np.clip(values, 0, None) / total if total > 0 else np.zeros(k)
    return coords * flip, ratio


def project(x: np.ndarray, method: str = "pca", *, n_components: int = 2, seed: int = 0,
            perplexity: float = 30.0, pca_dims: int = 50, n_jobs: int = 2,
            ) -> tuple[np.ndarray, dict[str, float]]:
    """Project the rows of ``x``; returns the coordinates and facts about the method.

    Raises:
        UnsupportedError: An unknown method, or UMAP without umap-learn installed.
    """
    x = np.asarray(x, dtype=np.float64)
    if method == "pca":
        coords, ratio = pca(x, n_components)
        return coords, {f"explained_variance_{i + 1}": float(r) for i, r in enumerate(ratio)}
    if method not in ("tsne", "umap"):
        raise UnsupportedError(f"projection method must be 'pca', 'tsne' or 'umap', "
                               f"got {method!r}")
    facts: dict[str, float] = {}
    if x.shape[1] > pca_dims:
        reduced, ratio = pca(x, pca_dims)
        facts["pca_variance_kept"] = float(ratio.sum())
        x = reduced
    if method == "tsne":
        import openTSNE

        if x.shape[0] < 3 * perplexity + 1:
            perplexity = max(1.0, (x.shape[0] - 1) / 3)
        tsne = openTSNE.TSNE(n_components=n_components, perplexity=perplexity,
                             random_state=seed, n_jobs=n_jobs, initialization="pca",
                             verbose=False)
        return np.asarray(tsne.fit(x)), facts
    try:
        import umap
    except ImportError:
        raise UnsupportedError("UMAP needs the umap extra: pip install 'weightatlas[umap]'"
                               ) from None
    reducer = umap.UMAP(n_components=n_components, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x)), facts


def projection(snapshot: Snapshot, tensors: str | Sequence[str], method: str = "pca", *,
               clusters: int | None = None, seed: int = 0, **options: float) -> pa.Table:
    """Project the neurons (rows) of one or more tensors of a snapshot.

    Args:
        snapshot: The snapshot.
        tensors: One tensor name, or several whose rows have the same length.
        method: ``"pca"``, ``"tsne"`` or ``"umap"``.
        clusters: Also label the points with k-means clusters (``cluster`` column).
        seed: Random seed for t-SNE, UMAP and k-means.
        **options: Passed to :func:`project` (``perplexity``, ``pca_dims``...).

    Returns:
        One row per neuron: ``tensor``, ``index``, ``x``, ``y``, ``norm`` (L2 of the row),
        and ``cluster`` when asked. Rows holding NaN or Inf are left out and counted in
        the table metadata (``skipped_rows``), as are the method's facts.

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.random.default_rng(0).standard_normal((40, 8))
        >>> snap = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "m")
        >>> projection(snap, "fc.weight").column_names
        ['tensor', 'index', 'x', 'y', 'norm']
    """
    names = [tensors] if isinstance(tensors, str) else list(tensors)
    blocks: list[np.ndarray] = []
    labels: list[str] = []
    index: list[np.ndarray] = []
    for name in names:
        rows = neuron_rows(snapshot.read(name), name)
        if blocks and rows.shape[1] != blocks[0].shape[1]:
            raise ShapeError(f"tensor {name!r}: rows of {rows.shape[1]} values cannot be "
                             f"projected with rows of {blocks[0].shape[1]} ({names[0]!r})")
        blocks.append(rows)
        labels += [name] * rows.shape[0]
        index.append(np.arange(rows.shape[0]))
    x = np.concatenate(blocks).astype(np.float64)
    finite = np.isfinite(x).all(axis=1)
    x = x[finite]
    if x.shape[0] < 2:
        raise ShapeError(f"{', '.join(names)}: need at least 2 finite rows to project, "
                         f"found {x.shape[0]}")
    coords, facts = project(x, method, seed=seed, **options)  # type: ignore[arg-type]
    columns = {
        "tensor": pa.array(np.asarray(labels)[finite].tolist(), pa.string()),
        "index": pa.array(np.concatenate(index)[finite], pa.int64()),
        "x": pa.array(coords[:, 0]),
        "y": pa.array(coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(x))),
        "norm": pa.array(np.linalg.norm(x, axis=1)),
    }
    if clusters:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit(x)
        columns["cluster"] = pa.array(km.labels_.astype(np.int64))
    meta = {"method": method, "skipped_rows": int((~finite).sum()), **facts}
    return pa.table(columns).replace_schema_metadata({"weightatlas": json.dumps(meta)})


def trajectory_pca(store: Store, model: str, tensors: Iterable[str] | None = None,
                   n_components: int = 2) -> pa.Table:
    """PCA of the flattened weights of every snapshot of a model, in step order.

    Tensors missing from a snapshot, or whose shape changed between snapshots, or that
    hold NaN/Inf anywhere, are left out and listed in the metadata (``excluded``).

    Returns:
        One row per snapshot: ``ref``, ``step``, ``tag``, ``pc1``, ``pc2``...; the
        explained variance ratios and the tensors used are in the table metadata.
    """
    infos = store.snapshots(model)
    if len(infos) < 2:
        raise ShapeError(f"model {model!r}: a trajectory needs at least 2 snapshots, "
                         f"found {len(infos)}")
    snaps = [Snapshot(i.path) for i in infos]
    try:
        wanted = list(tensors) if tensors is not None else snaps[0].names
        used, excluded = [], {}
        for name in wanted:
            reason = _trajectory_problem(snaps, name)
            if reason:
                excluded[name] = reason
            else:
                used.append(name)
        if not used:
            raise ShapeError(f"model {model!r}: no tensor is usable in every snapshot "
                             f"({json.dumps(excluded)})")
        k = len(snaps)
        gram = np.zeros((k, k))
        for name in used:
            stack = np.stack([s.read(name).reshape(-1).astype(np.float64) for s in snaps])
            gram += stack @ stack.T
    finally:
        for s in snaps:
            s.close()
    ones = np.full((k, k), 1.0 / k)
    centred = gram - ones @ gram - gram @ ones + ones @ gram @ ones
    values, vectors = np.linalg.eigh(centred)
    order = np.argsort(values)[::-1][: min(n_components, k)]
    values = np.clip(values[order], 0, None)
    coords = vectors[:, order] * np.sqrt(values)
    total = float(np.trace(centred))
    columns: dict[str, object] = {
        "ref": [i.ref for i in infos], "step": pa.array([i.step for i in infos], pa.int64()),
        "tag": pa.array([i.tag for i in infos], pa.string()),
    }
    for j in range(coords.shape[1]):
        columns[f"pc{j + 1}"] = coords[:, j]
    meta = {"explained_variance_ratio": (values / total if total > 0 else values).tolist(),
            "tensors": used, "excluded": excluded}
    return pa.table(columns).replace_schema_metadata({"weightatlas": json.dumps(meta)})


def _trajectory_problem(snaps: list[Snapshot], name: str) -> str | None:
    shapes = set()
    for s in snaps:
        if name not in s:
            return f"missing from {s.ref}"
        info = s.info(name)
        if info.n_nan or info.n_inf:
            return f"non-finite values in {s.ref}"
        shapes.add(info.shape)
    if len(shapes) > 1:
        return f"shape changed between snapshots: {sorted(map(list, shapes))}"
    return None
