"""The views by name, as ``weightatlas plot VIEW`` knows them.

Views of the analyses that need a table (a projection, a trajectory) compute it from the
snapshot here: ``projection`` projects one tensor's neurons, ``trajectory`` and
``trajectory_path`` cover the model of the snapshot named, in the store that holds it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from weightatlas.core import projection, trajectory, trajectory_pca
from weightatlas.errors import NotFoundError, UnsupportedError
from weightatlas.storage import Snapshot, Store
from weightatlas.viz._analyses import alphas, esd
from weightatlas.viz._compare import agreement, diff, scatter
from weightatlas.viz._dist import histogram, ridgeline
from weightatlas.viz._factors import factors_chart, nmf_rgb
from weightatlas.viz._heatmap import heatmap
from weightatlas.viz._kernels import kernels
from weightatlas.viz._overview import overview
from weightatlas.viz._projections import projection_chart, trajectory_chart, trajectory_path
from weightatlas.viz._style import DEFAULT_MAX_BYTES

__all__ = ["VIEWS", "ViewInfo", "chart"]


@dataclass(frozen=True)
class ViewInfo:
    """One named view.

    Attributes:
        name: The view's name (``heatmap``...).
        build: Its builder function.
        tensor: It shows one tensor, so it needs a tensor name.
        pair: It compares two snapshots (A and B).
        summary: One line for help texts.
    """

    name: str
    build: Callable[..., Any]
    tensor: bool
    pair: bool
    summary: str

    def options(self) -> list[str]:
        """Keyword options the builder takes."""
        params = inspect.signature(self.build).parameters.values()
        return [p.name for p in params if p.kind == p.KEYWORD_ONLY]


# ---- analyses computed from a snapshot -------------------------------------------------------


def store_of(snapshot: Snapshot) -> Store:
    """The store that holds ``snapshot`` (its file is ``ROOT/models/MODEL/FILE``).

    Raises:
        NotFoundError: The snapshot's file is not where that store keeps it.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(snapshot.path))))
    problem = f"snapshot file {snapshot.path} is not inside a weightatlas store"
    try:
        store = Store(root)
        same = os.path.samefile(store.path(snapshot.model, snapshot.step, snapshot.tag),
                                snapshot.path)
    except (OSError, NotFoundError) as e:
        raise NotFoundError(f"{problem}; trajectories need the store ({e})") from e
    if not same:
        raise NotFoundError(f"{problem}; trajectories need the store")
    return store


def projection_view(snapshot: Snapshot, tensor: str, *, method: str = "pca",
                    clusters: int | None = None, color: str = "tensor",
                    max_points: int = 5000, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """``projection_chart(projection(snapshot, tensor, method, clusters=...))``."""
    table = projection(snapshot, tensor, method, clusters=clusters)
    return projection_chart(table, color=color, max_points=max_points, max_bytes=max_bytes)


def trajectory_view(snapshot: Snapshot, *, metric: str = "relative_update",
                    max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """:func:`trajectory_chart` of the snapshot's model: its step-numbered snapshots."""
    table = trajectory(store_of(snapshot), snapshot.model)
    return trajectory_chart(table, metric=metric, max_bytes=max_bytes)


def trajectory_path_view(snapshot: Snapshot, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """:func:`trajectory_path` of the snapshot's model."""
    table = trajectory_pca(store_of(snapshot), snapshot.model)
    return trajectory_path(table, max_bytes=max_bytes)


#: Every view, by name.
VIEWS: dict[str, ViewInfo] = {v.name: v for v in (
    ViewInfo("heatmap", heatmap, True, False, "one tensor on the zero-centred scale (pooled "
             "when large); convolutions as a grid of kernels"),
    ViewInfo("kernels", kernels, True, False, "a convolution's strongest input kernels per "
             "output neuron"),
    ViewInfo("histogram", histogram, True, False, "distribution of one tensor, NaN/Inf counted"),
    ViewInfo("ridgeline", ridgeline, False, False, "distributions of the weight tensors in "
             "model order"),
    ViewInfo("overview", overview, False, False, "one row per tensor: size, norm, std, max, "
             "zeros, NaN/Inf"),
    ViewInfo("agreement", agreement, False, True, "per-tensor agreement of two snapshots"),
    ViewInfo("diff", diff, True, True, "heatmap of B - A for one tensor"),
    ViewInfo("scatter", scatter, True, True, "A's weights against B's (binned when large)"),
    ViewInfo("esd", esd, True, False, "eigenvalue spectrum of one weight matrix on log-log axes "
             "with its power-law fit"),
    ViewInfo("alphas", alphas, False, False, "power-law exponent alpha of every weight matrix "
             "in model order"),
    ViewInfo("projection", projection_view, True, False, "one tensor's neurons projected by "
             "PCA, t-SNE or UMAP"),
    ViewInfo("trajectory", trajectory_view, False, False, "each tensor's updates over the "
             "model's training steps"),
    ViewInfo("trajectory_path", trajectory_path_view, False, False, "the model's path through "
             "weight space (PCA of every step)"),
    ViewInfo("nmf_rgb", nmf_rgb, True, False, "each neuron's kernel as an RGB image of its "
             "3-factor NMF"),
    ViewInfo("factors", factors_chart, True, False, "one-sided NMF of a weight family: channel "
             "and spatial factors"),
)}


def chart(view: str, snapshot: Snapshot, tensor: str | None = None, *,
          against: Snapshot | None = None, alignment: pa.Table | None = None,
          **options: Any) -> Any:
    """Build a view by name.

    Args:
        view: One of :data:`VIEWS`.
        snapshot: The snapshot (A, for comparisons).
        tensor: The tensor, for views of one tensor.
        against: Snapshot B, for comparisons.
        alignment: Pairs of A's and B's tensors (default: equal names).
        **options: The view's keyword options; ``None`` values are ignored.

    Raises:
        UnsupportedError: An unknown view, or an option the view does not take.
        NotFoundError: A missing tensor name or second snapshot.

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> snap = store.write(RecordsSource([TensorRecord("w", np.eye(3))]), "m", step=0)
        >>> spec = wa.viz.chart("histogram", snap, "w", bins=3).to_dict()
        >>> spec["usermeta"]["weightatlas"]["bins"]
        3
    """
    info = VIEWS.get(view)
    if info is None:
        raise UnsupportedError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(info.options()))
    if unknown:
        raise UnsupportedError(f"view {view!r} takes no option {', '.join(unknown)}; it takes "
                               f"{', '.join(o for o in info.options() if o != 'alignment')}")
    if info.tensor and tensor is None:
        raise NotFoundError(f"view {view!r} shows one tensor: name it (e.g. "
                            f"{snapshot.names[0] if len(snapshot) else 'fc.weight'!r})")
    if not info.tensor and tensor is not None:
        raise UnsupportedError(f"view {view!r} shows the whole snapshot and takes no tensor "
                               f"name (got {tensor!r})")
    if info.pair:
        if against is None:
            raise NotFoundError(f"view {view!r} compares two snapshots: give the second one "
                                "(--against MODEL@STEP)")
        if info.tensor:
            return info.build(snapshot, against, tensor, alignment=alignment, **given)
        return info.build(snapshot, against, alignment=alignment, **given)
    if against is not None or alignment is not None:
        raise UnsupportedError(f"view {view!r} shows one snapshot; --against and --alignment "
                               "apply to agreement, diff and scatter")
    if info.tensor:
        return info.build(snapshot, tensor, **given)
    return info.build(snapshot, **given)
