"""Expanded weights as small multiples (Distill, "Visualizing Weights", figures 9-13): for each
target channel, its strongest source channels through all the layers between them, ranked by
the L2 norm of the expanded kernel, each kernel a pixelated heatmap on one shared zero-centred
scale.

The chart takes the result of :func:`weightatlas.core.executor.expanded_weights` (read by its
attributes, so viz imports no executor and no framework) or a plain array
``[n_target, n_source, *kernel]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import ShapeError
from weightatlas.viz._kernels import rank_inputs
from weightatlas.viz._reduce import as_float
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    diverging_scale,
    fit_budget,
    fmt,
    header_chart,
    inline_values,
    numbers,
    symmetric_extent,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["expanded"]


def expanded(
    weights: Any,
    *,
    targets: Sequence[int] | None = None,
    sources: Sequence[int] | None = None,
    top: int = 8,
    source_layer: str | None = None,
    target_layer: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    domain: float | None = None,
) -> alt.VConcatChart:
    """Small multiples of expanded weights: rows are target channels, columns their ``top``
    strongest source channels by the L2 norm of the expanded kernel, strongest first.

    Each kernel is drawn pixel for pixel (row = relative y, column = relative x, not flipped;
    tooltips give the position relative to the target's centre) on one Distill red-blue
    scale centred on zero and shared by every cell. A dense expanded weight (``[out, in]``) is
    one pixel per cell.

    Args:
        weights: An ``ExpandedWeights`` (from ``wa.expand`` or ``expanded_weights``), or an
            array ``[n_target, n_source, *kernel]`` with 0 to 2 kernel axes.
        targets: Target channels to show, as rows in ascending order (default: the first 8
            computed).
        sources: Source channels to rank among (default: all).
        top: Source channels per row.
        source_layer, target_layer: Names for the header (default: the result's).
        max_bytes: Budget of the spec; fewer source channels per row are shown if needed.
        domain: Half-width of the colour domain (default: the largest magnitude shown).

    Raises:
        ShapeError: An array of the wrong rank, a channel not in the result, ``top`` below 1.

    Example:
        >>> e = np.zeros((2, 3, 3, 3), np.float32); e[0, 2, 1, 1] = 1.0; e[1, 0] = -0.5
        >>> spec = wa.viz.expanded(e, top=2, source_layer="conv1", target_layer="conv2"
        ...                        ).to_dict()
        >>> spec["usermeta"]["weightatlas"]["sources"]
        [[2, 0], [0, 1]]
    """
    array = getattr(weights, "array", weights)
    x = as_float(np.asarray(array), "expanded weights")
    if not 2 <= x.ndim <= 4:
        raise ShapeError(f"expanded: weights of shape {list(x.shape)}; expected "
                         "[n_target, n_source, *kernel] with 0 to 2 kernel axes")
    n_target, n_source = x.shape[:2]
    channels = [int(c) for c in getattr(weights, "channels", range(n_target))]
    offsets = [int(o) for o in getattr(weights, "offsets", [-((k - 1) // 2)
                                                           for k in x.shape[2:]])]
    src_name = source_layer or str(getattr(weights, "source_layer", "source"))
    tgt_name = target_layer or str(getattr(weights, "target_layer", "target"))
    if len(channels) != n_target or len(offsets) != x.ndim - 2:
        raise ShapeError(f"expanded: {len(channels)} channels and {len(offsets)} offsets for "
                         f"weights of shape {list(x.shape)}")
    chosen = channels[:8] if targets is None else [int(t) for t in targets]
    missing = [t for t in chosen if t not in channels]
    if missing or not chosen:
        raise ShapeError(f"expanded: target channels {missing or chosen} were not computed "
                         f"(computed: {channels[:20]}{'...' if len(channels) > 20 else ''})")
    pool = list(range(n_source)) if sources is None else [int(s) for s in sources]
    wrong = [s for s in pool if not 0 <= s < n_source]
    if wrong or not pool:
        raise ShapeError(f"expanded: the source has {n_source} channels; sources "
                         f"{wrong or pool} are not in 0..{n_source - 1}")
    if top < 1:
        raise ShapeError(f"expanded: top={top}; show at least 1 source channel per row")
    # Rows in ascending channel order (Vega-Lite misplaces the cells of a layered facet
    # whose rows are given another order).
    chosen = sorted(set(chosen))
    pool = list(dict.fromkeys(pool))
    # [rows, sources, kh, kw], kernels of 0 or 1 axes as 1 x 1 or 1 x k.
    x4 = x[[channels.index(t) for t in chosen]][:, pool]
    x4 = x4.reshape(*x4.shape[:2], *([1] * (4 - x4.ndim)), *x4.shape[2:])
    ranked = [rank_inputs(x4, r) for r in range(len(chosen))]
    ranked = [(np.asarray(pool)[order], norms) for order, norms in ranked]
    rel = [0] * (2 - len(offsets)) + offsets
    nonaffine = list(getattr(weights, "nonaffine", ()))
    at_border = bool(getattr(weights, "at_border", False))
    lookup = {s: k for k, s in enumerate(pool)}

    def build(k: int) -> alt.VConcatChart:
        return _build(x4, chosen, ranked, lookup, min(k, len(pool)), rel, domain,
                      (src_name, tgt_name), nonaffine, at_border, x.ndim - 2)

    return fit_budget(build, min(top, len(pool)), max_bytes,  # type: ignore[return-value]
                      "expanded weights")


def _build(x4: np.ndarray, chosen: list[int], ranked: list[tuple[np.ndarray, np.ndarray]],
           lookup: dict[int, int], top: int, rel: list[int], domain: float | None,
           names: tuple[str, str], nonaffine: list[str], at_border: bool,
           spatial: int) -> alt.VConcatChart:
    import altair as alt

    n_rows, _, kh, kw = x4.shape
    sources = np.stack([r[0][:top] for r in ranked])               # [rows, top] channels
    norms = np.stack([r[1][:top] for r in ranked])
    rows = np.arange(n_rows)[:, None].repeat(top, axis=1)
    values = x4[rows, np.vectorize(lookup.get)(sources)]           # [rows, top, kh, kw]
    m = symmetric_extent(values, domain)
    per = kh * kw
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    data, fields = inline_values({
        "t": np.asarray(chosen)[rows].repeat(per),
        "rank": np.tile(np.arange(1, top + 1).repeat(per), n_rows),
        "s": sources.repeat(per),
        "dy": np.tile(ky.reshape(-1) + rel[0], n_rows * top),
        "dx": np.tile(kx.reshape(-1) + rel[1], n_rows * top),
        "v": numbers(values.reshape(-1), True),
        "norm": numbers(norms.repeat(per)),
    })
    px = max(4, min(14, 72 // max(kh, kw)))
    pixels = alt.Chart().mark_rect(invalid="show").encode(
        x=alt.X("dx:O", axis=None, title=None),
        y=alt.Y("dy:O", axis=None, title=None),
        color=alt.condition("!isValid(datum.v)", alt.ColorValue("#000000"),
                            alt.Color("v:Q", scale=diverging_scale(m),
                                      title="expanded weight",
                                      legend=alt.Legend(format=".3~g"))),
        tooltip=[alt.Tooltip("t:Q", title="target channel"),
                 alt.Tooltip("s:Q", title="source channel"),
                 alt.Tooltip("rank:Q", title="rank"),
                 *([alt.Tooltip("dy:Q", title="relative y")] if spatial == 2 else []),
                 *([alt.Tooltip("dx:Q", title="relative x")] if spatial >= 1 else []),
                 alt.Tooltip("v:Q", title="expanded weight", format=".9~g"),
                 alt.Tooltip("norm:Q", title="kernel L2 norm", format=".6~g")],
    ).properties(width=kw * px, height=kh * px)
    first = f"datum.dy == {rel[0]} && datum.dx == {rel[1]}"
    labels = alt.Chart().transform_filter(first).transform_calculate(
        label="'ch ' + datum.s").mark_text(
        align="left", baseline="bottom", fontSize=9, color="#555555", dy=-2,
    ).encode(text=alt.Text("label:N"), x=alt.XValue(0), y=alt.YValue(0))
    grid = alt.layer(pixels, labels, data=data).transform_flatten(fields).facet(
        row=alt.Row("t:O", title="target channel",
                    header=alt.Header(labelAngle=0, labelAlign="right")),
        column=alt.Column("rank:O", title="source channels ranked by expanded-kernel L2 norm"),
        spacing={"row": 16, "column": 6},
    )
    kernel = "×".join(map(str, (kh, kw)[2 - spatial:])) if spatial else "1 (dense)"
    lines = [("name", f"expanded weights: {names[0]} → {names[1]}"),
             ("info", f"{n_rows} target channels × their {top} strongest source channels by "
                      f"L2 norm; kernel {kernel}; one scale ±{fmt(m)}")]
    if nonaffine:
        lines.append(("alert", f"not affine between the layers ({', '.join(nonaffine[:3])}"
                               f"{'...' if len(nonaffine) > 3 else ''}): the gradient at "
                               "the input used"))
    if at_border:
        lines.append(("alert", "the kernels reach the edge of the source activation: a "
                               "larger input may show more of them"))
    if not np.isfinite(values).all():
        lines.append(("alert", "kernels holding NaN or Inf: those pixels are drawn black"))
    return alt.vconcat(header_chart(lines), grid, spacing=4).properties(usermeta={
        "weightatlas": {"view": "expanded", "targets": chosen, "top": top,
                        "sources": sources.tolist(), "rank_by": "l2",
                        "kernel": [kh, kw][2 - spatial:] if spatial else [],
                        "domain": [-m, m]}})
