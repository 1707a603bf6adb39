"""The views by name, as ``weightatlas plot VIEW`` knows them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from weightatlas.errors import NotFoundError, UnsupportedError
from weightatlas.storage import Snapshot
from weightatlas.viz._compare import agreement, diff, scatter
from weightatlas.viz._dist import histogram, ridgeline
from weightatlas.viz._heatmap import heatmap
from weightatlas.viz._kernels import kernels
from weightatlas.viz._overview import overview

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
