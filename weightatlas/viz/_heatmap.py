"""Heatmap of one tensor: a matrix as is, a convolution as an [out x in] grid of kernels, or
one output neuron's kernels; large tensors pooled in blocks, never sampled.

Cells are positioned in tensor-index units (the axes read ``0..n`` whatever the pooling),
rows top to bottom. A pooled cell shows its block's value of largest magnitude (signed; or
the block mean) and its tooltip gives the block's index ranges, min, max and mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage import Snapshot
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._reduce import as_float, block_grid, block_reduce
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CELLS,
    axis_name,
    dims,
    diverging_color,
    fit_budget,
    fmt,
    header_layers,
    inline_data,
    numbers,
    symmetric_extent,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["AGGREGATIONS", "heatmap", "heatmap_of"]

#: What a pooled cell shows: the value of largest magnitude, or the mean.
AGGREGATIONS = ("maxabs", "mean")
_GAP = 0.08  # fraction of a kernel cell left blank on each side in kernel grids
_SHOWN = {"maxabs": "max |w| in block (signed)", "mean": "block mean"}


def heatmap(
    snapshot: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    out: int | None = None,
    agg: str = "maxabs",
    max_cells: int = DEFAULT_MAX_CELLS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    domain: float | None = None,
    layout: Sequence[str] | None = None,
) -> alt.LayerChart:
    """Heatmap of one tensor on the zero-centred Distill scale.

    A 2-d tensor is drawn as is (rows = its first axis, top to bottom); a convolution
    ``[out, in, h, w]`` (or ``[out, in, w]``) as an [out x in] grid of its spatial kernels;
    with ``out=o``, output neuron ``o``'s kernels across its inputs. 1-d tensors are one
    row; other tensors are drawn as ``[first axis, all other axes flattened]``. When the
    tensor has more than ``max_cells`` cells it is pooled in blocks (see ``agg``); the header
    and ``usermeta`` say by how much.

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or an array to chart directly.
        tensor: The tensor's name (required with a snapshot; a label with an array).
        out: Show only this output neuron's kernels (convolutions).
        agg: What a pooled cell shows: ``"maxabs"`` (the value of largest magnitude, signed)
            or ``"mean"``.
        max_cells: Most cells drawn before pooling.
        max_bytes: Budget of the Vega-Lite spec; pooling tightens until it fits.
        domain: Half-width ``m`` of the colour domain ``[-m, m]`` (default: the largest
            magnitude shown), to share one scale across charts.
        layout: Axis names overriding the stored layout (e.g. ``["out", "in"]``).

    Returns:
        An Altair layer chart (the cells, and a header naming the tensor).

    Raises:
        NotFoundError: No such tensor in the snapshot.
        UnsupportedError: ``out`` on a tensor that is not a convolution; an unknown ``agg``.
        ShapeError: ``out`` outside the tensor; a tensor with no values.

    Example:
        >>> chart = wa.viz.heatmap(np.arange(-6., 6.).reshape(3, 4), "w")
        >>> spec = chart.to_dict()
        >>> spec["usermeta"]["weightatlas"]["grid"], spec["usermeta"]["weightatlas"]["domain"]
        ([3, 4], [-6.0, 6.0])
    """
    t = resolve(snapshot, tensor, layout, "heatmap")
    return heatmap_of(t, out=out, agg=agg, max_cells=max_cells, max_bytes=max_bytes,
                      domain=domain)


def heatmap_of(t: TensorInput, *, out: int | None = None, agg: str = "maxabs",
               max_cells: int = DEFAULT_MAX_CELLS, max_bytes: int = DEFAULT_MAX_BYTES,
               domain: float | None = None, legend: str = "weight", view: str = "heatmap",
               lines: Sequence[tuple[str, str]] | None = None) -> alt.LayerChart:
    """:func:`heatmap` of a resolved tensor, with its legend title and header lines."""
    if agg not in AGGREGATIONS:
        raise UnsupportedError(f"{view} of {t.name!r}: agg={agg!r}; expected one of "
                               f"{', '.join(AGGREGATIONS)}")
    if t.array.size == 0:
        raise ShapeError(f"{view}: tensor {t.name!r} has shape {list(t.shape)}, no values")
    head = list(lines) if lines is not None else [("name", t.name), ("info", t.describe())]
    x = as_float(t.array, t.name)
    if out is not None:
        if not t.is_conv:
            raise UnsupportedError(
                f"{view}: out={out} picks an output neuron of a convolution [out, in, h, w]; "
                f"tensor {t.name!r} has layout {list(t.layout)} and kind {t.kind}")
        if not 0 <= out < t.shape[0]:
            raise ShapeError(f"{view}: tensor {t.name!r} has {t.shape[0]} output neurons; "
                             f"out={out} is outside 0..{t.shape[0] - 1}")

        def build(cells: int) -> alt.LayerChart:
            return _neuron(t, x, int(out), agg, cells, domain, legend, head, view)
    elif t.is_conv:
        def build(cells: int) -> alt.LayerChart:
            return _conv(t, x, agg, cells, domain, legend, head, view)
    else:
        def build(cells: int) -> alt.LayerChart:
            return _matrix(t, x, agg, cells, domain, legend, head, view)
    return fit_budget(build, max_cells, max_bytes, f"{view} of {t.name!r}")  # type: ignore[return-value]


# ---- shared pieces ---------------------------------------------------------------------------


def _with_nonfinite(head: Sequence[tuple[str, str]], x: np.ndarray) -> list[tuple[str, str]]:
    lines = list(head)
    finite = np.isfinite(x)
    if not finite.all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(finite.size - finite.sum()) - n_nan
        lines.append(("alert", f"{n_nan} NaN and {n_inf} ±Inf values: cells holding any are "
                               "drawn black"))
    return lines


def _values(x: np.ndarray, factors: tuple[int, ...], agg: str, exact32: bool,
            ) -> tuple[dict[str, Any], np.ndarray, bool]:
    """Value columns (C order over the grid), the values shown, and whether pooled."""
    if all(f == 1 for f in factors):
        flat = x.reshape(-1)
        cols: dict[str, Any] = {"v": numbers(flat, exact32)}
        bad = ~np.isfinite(flat)
        if bad.any():
            cols["nf"] = bad.astype(np.int64)
            cols["raw"] = [None if ok else ("NaN" if np.isnan(v) else "+Inf" if v > 0 else "-Inf")
                           for ok, v in zip((~bad).tolist(), flat.tolist(), strict=True)]
        return cols, flat, False
    s = block_reduce(x, factors)
    cols = {"mu": numbers(s.mean.reshape(-1), exact32), "lo": numbers(s.min.reshape(-1), exact32),
            "hi": numbers(s.max.reshape(-1), exact32)}
    if (s.n_nonfinite > 0).any():
        cols["nf"] = s.n_nonfinite.reshape(-1)
    shown = s.maxabs if agg == "maxabs" else s.mean
    return cols, shown.reshape(-1), True


def _shown_calc(agg: str) -> str:
    if agg == "maxabs":
        return "abs(datum.hi) >= abs(datum.lo) ? datum.hi : datum.lo"
    return "datum.mu"


def _grid_index(grid: Sequence[int]) -> list[np.ndarray]:
    mesh = np.meshgrid(*[np.arange(g, dtype=np.int64) for g in grid], indexing="ij")
    return [m.reshape(-1) for m in mesh]


def _tooltips(pooled: bool, index: list[Any], agg: str, nonfinite: bool) -> list[Any]:
    import altair as alt

    tips = list(index)
    if pooled:
        tips += [alt.Tooltip("v:Q", title=f"shown: {_SHOWN[agg]}", format=".9~g"),
                 alt.Tooltip("mu:Q", title="block mean", format=".7~g"),
                 alt.Tooltip("lo:Q", title="block min", format=".9~g"),
                 alt.Tooltip("hi:Q", title="block max", format=".9~g"),
                 alt.Tooltip("n:Q", title="values in block")]
        if nonfinite:
            tips.append(alt.Tooltip("nf:Q", title="NaN/Inf in block"))
    else:
        tips.append(alt.Tooltip("v:Q", title="value", format=".9~g"))
        if nonfinite:
            tips.append(alt.Tooltip("raw:N", title="non-finite"))
    return tips


def _pool_lines(shape: Sequence[int], grid: Sequence[int], factors: Sequence[int],
                agg: str) -> list[tuple[str, str]]:
    what = ("its value of largest magnitude (signed)" if agg == "maxabs" else "its mean")
    return [("info", f"aggregated: {dims(shape)} values → {dims(grid)} cells, blocks of "
                     f"{dims(factors)}"),
            ("info", f"each cell shows {what}; tooltips give the block's range, min, max, mean")]


def _meta(view: str, mode: str, shape: Sequence[int], grid: Sequence[int],
          factors: Sequence[int], pooled: bool, agg: str, m: float) -> dict[str, Any]:
    return {"weightatlas": {
        "view": view, "mode": mode, "shape": [int(d) for d in shape],
        "grid": [int(g) for g in grid], "block": [int(f) for f in factors],
        "aggregated": pooled, "agg": agg if pooled else "none",
        "cells": int(np.prod(grid)), "domain": [-m, m]}}


def _layer(cells: alt.Chart, lines: Sequence[tuple[str, str]],
           meta: dict[str, Any]) -> alt.LayerChart:
    import altair as alt

    return cast("alt.LayerChart", alt.layer(cells, *header_layers(lines)).properties(
        usermeta=meta))


def _px(across: int, down: int, limit: int = 560) -> int:
    return max(1, min(18, limit // max(across, down, 1)))


def _range_calc(start: str, stop: str, pooled: bool) -> str:
    if not pooled:
        return f"datum.{start}"
    return (f"datum.{stop} - datum.{start} > 1 ? datum.{start} + '–' + (datum.{stop} - 1) "
            f": '' + datum.{start}")


# ---- a matrix ---------------------------------------------------------------------------------


def _matrix(t: TensorInput, x: np.ndarray, agg: str, cells: int, domain: float | None,
            legend: str, head: list[tuple[str, str]], view: str) -> alt.LayerChart:
    import altair as alt

    lines = _with_nonfinite(head, x)
    if x.ndim == 0:
        x2, names = x.reshape(1, 1), ("", "value")
    elif x.ndim == 1:
        x2, names = x.reshape(1, -1), ("", axis_name(t.layout, 0))
    else:
        x2 = x.reshape(x.shape[0], -1)
        rest = "·".join(axis_name(t.layout, i) for i in range(1, x.ndim))
        names = (axis_name(t.layout, 0), rest if x.ndim == 2 else f"{rest} (flattened)")
    rows, cols = x2.shape
    factors = block_grid((rows, cols), cells)
    values, shown, pooled = _values(x2, factors, agg, t.exact32)
    grid = (math.ceil(rows / factors[0]), math.ceil(cols / factors[1]))
    gr, gc = _grid_index(grid)
    data = {"r0": gr * factors[0], "c0": gc * factors[1], **values}
    m = symmetric_extent(shown, domain)
    if pooled:
        lines.extend(_pool_lines(x2.shape, grid, factors, agg))
    nonfinite = "nf" in values
    base = inline_data(data).transform_calculate(
        r1=f"min(datum.r0 + {factors[0]}, {rows})", c1=f"min(datum.c0 + {factors[1]}, {cols})")
    if pooled:
        base = base.transform_calculate(
            v=_shown_calc(agg), n="(datum.r1 - datum.r0) * (datum.c1 - datum.c0)",
            rows=_range_calc("r0", "r1", True), cols=_range_calc("c0", "c1", True))
        index = [alt.Tooltip("rows:N", title=names[0] or "row"),
                 alt.Tooltip("cols:N", title=names[1])]
    else:
        index = [alt.Tooltip("r0:Q", title=names[0] or "row"),
                 alt.Tooltip("c0:Q", title=names[1])]
    px = _px(grid[1], grid[0])
    width, height = max(60, min(640, grid[1] * px)), max(16, min(640, grid[0] * px))
    yaxis: Any = alt.Axis(title=names[0], format="d", tickMinStep=1) if names[0] else None
    cellsch = base.mark_rect(invalid="show").encode(
        x=alt.X("c0:Q", title=names[1], scale=alt.Scale(domain=[0, cols], nice=False, zero=False),
                axis=alt.Axis(format="d", tickMinStep=1)),
        x2=alt.X2("c1:Q"),
        y=alt.Y("r0:Q", scale=alt.Scale(domain=[0, rows], nice=False, zero=False, reverse=True),
                axis=yaxis),
        y2=alt.Y2("r1:Q"),
        color=_color(m, legend, pooled, agg),
        tooltip=_tooltips(pooled, index, agg, nonfinite),
    ).properties(width=width, height=height)
    return _layer(cellsch, lines, _meta(view, "matrix", x2.shape, grid, factors, pooled, agg, m))


def _color(m: float, legend: str, pooled: bool, agg: str) -> Any:
    title = f"{legend}: {_SHOWN[agg]}" if pooled else legend
    return diverging_color("v", m, title)


# ---- convolutions ------------------------------------------------------------------------------


def _as4d(t: TensorInput, x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], x.shape[1], 1, x.shape[2]) if x.ndim == 3 else x


def _kernel_factors(channels: tuple[int, ...], kh: int, kw: int, cells: int,
                    ) -> tuple[tuple[int, ...], tuple[int, int]]:
    budget = cells // (kh * kw)
    if budget >= 1:
        if len(channels) == 2:
            return block_grid(channels, budget), (1, 1)
        return (math.ceil(channels[0] / min(channels[0], budget)),), (1, 1)
    spatial = block_grid((kh, kw), cells)
    return tuple(channels), (spatial[0], spatial[1])


def _conv(t: TensorInput, x: np.ndarray, agg: str, cells: int, domain: float | None,
          legend: str, head: list[tuple[str, str]], view: str) -> alt.LayerChart:
    import altair as alt

    x4 = _as4d(t, x)
    lines = _with_nonfinite(head, x4)
    n_out, n_in, kh, kw = x4.shape
    (fo, fi), (fh, fw) = _kernel_factors((n_out, n_in), kh, kw, cells)
    factors = (fo, fi, fh, fw)
    values, shown, pooled = _values(x4, factors, agg, t.exact32)
    grid = tuple(math.ceil(n / f) for n, f in zip(x4.shape, factors, strict=True))
    go, gi, gy, gx = _grid_index(grid)
    data = {"o0": go * fo, "i0": gi * fi, "ky": gy, "kx": gx, **values}
    m = symmetric_extent(shown, domain)
    if pooled:
        lines.extend(_pool_lines(x4.shape, grid, factors, agg))
    gap = _GAP if grid[2] * grid[3] > 1 else 0.0
    sw, sh = (1 - 2 * gap) / grid[3], (1 - 2 * gap) / grid[2]
    out_name, in_name = axis_name(t.layout, 0), axis_name(t.layout, 1)
    base = inline_data(data).transform_calculate(
        o1=f"min(datum.o0 + {fo}, {n_out})", i1=f"min(datum.i0 + {fi}, {n_in})",
    ).transform_calculate(
        x=f"datum.i0 + (datum.i1 - datum.i0) * ({gap} + datum.kx * {sw})",
        x2=f"datum.i0 + (datum.i1 - datum.i0) * ({gap} + (datum.kx + 1) * {sw})",
        y=f"datum.o0 + (datum.o1 - datum.o0) * ({gap} + datum.ky * {sh})",
        y2=f"datum.o0 + (datum.o1 - datum.o0) * ({gap} + (datum.ky + 1) * {sh})",
        outs=_range_calc("o0", "o1", fo > 1), ins=_range_calc("i0", "i1", fi > 1),
    )
    if pooled:
        base = base.transform_calculate(
            v=_shown_calc(agg), n=f"(datum.o1 - datum.o0) * (datum.i1 - datum.i0) * {fh * fw}")
    index = [alt.Tooltip("outs:N", title=out_name), alt.Tooltip("ins:N", title=in_name),
             alt.Tooltip("ky:Q", title="kernel row" if fh == 1 else "kernel row block"),
             alt.Tooltip("kx:Q", title="kernel column" if fw == 1 else "kernel column block")]
    across, down = grid[1] * grid[3], grid[0] * grid[2]
    px = _px(across, down)
    kernel = f"each cell one {kh}×{kw} kernel" if kh > 1 else f"each cell one 1×{kw} kernel"
    cellsch = base.mark_rect(invalid="show").encode(
        x=alt.X("x:Q", title=f"{in_name} ({kernel})",
                scale=alt.Scale(domain=[0, n_in], nice=False, zero=False),
                axis=alt.Axis(format="d", tickMinStep=1)),
        x2=alt.X2("x2:Q"),
        y=alt.Y("y:Q", title=out_name,
                scale=alt.Scale(domain=[0, n_out], nice=False, zero=False, reverse=True),
                axis=alt.Axis(format="d", tickMinStep=1)),
        y2=alt.Y2("y2:Q"),
        color=_color(m, legend, pooled, agg),
        tooltip=_tooltips(pooled, index, agg, "nf" in values),
    ).properties(width=max(60, min(640, across * px)), height=max(30, min(640, down * px)))
    return _layer(cellsch, lines, _meta(view, "conv", x4.shape, grid, factors, pooled, agg, m))


def _neuron(t: TensorInput, x: np.ndarray, out: int, agg: str, cells: int,
            domain: float | None, legend: str, head: list[tuple[str, str]],
            view: str) -> alt.LayerChart:
    import altair as alt

    x3 = _as4d(t, x)[out]
    n_in, kh, kw = x3.shape
    (fi,), (fh, fw) = _kernel_factors((n_in,), kh, kw, cells)
    factors = (fi, fh, fw)
    values, shown, pooled = _values(x3, factors, agg, t.exact32)
    grid = tuple(math.ceil(n / f) for n, f in zip(x3.shape, factors, strict=True))
    gi, gy, gx = _grid_index(grid)
    data = {"i0": gi * fi, "ky": gy, "kx": gx, **values}
    m = symmetric_extent(shown, domain)
    columns = math.ceil(math.sqrt(grid[0]))
    rows = math.ceil(grid[0] / columns)
    in_name, out_name = axis_name(t.layout, 1), axis_name(t.layout, 0)
    lines = [*_with_nonfinite(head, x3),
        ("info", f"{out_name} {out} of {t.shape[0]}: its {n_in} {in_name} kernels ({kh}×{kw}), "
                 f"{columns} per row in {in_name} order; scale ±{fmt(m)}")]
    if pooled:
        lines.extend(_pool_lines(x3.shape, grid, factors, agg))
    gap = _GAP if grid[1] * grid[2] > 1 else 0.0
    sw, sh = (1 - 2 * gap) / grid[2], (1 - 2 * gap) / grid[1]
    base = inline_data(data).transform_calculate(
        i1=f"min(datum.i0 + {fi}, {n_in})", b=f"floor(datum.i0 / {fi})",
    ).transform_calculate(
        gx=f"datum.b % {columns}", gy=f"floor(datum.b / {columns})",
        ins=_range_calc("i0", "i1", fi > 1),
    ).transform_calculate(
        x=f"datum.gx + {gap} + datum.kx * {sw}", x2=f"datum.gx + {gap} + (datum.kx + 1) * {sw}",
        y=f"datum.gy + {gap} + datum.ky * {sh}", y2=f"datum.gy + {gap} + (datum.ky + 1) * {sh}",
    )
    if pooled:
        base = base.transform_calculate(v=_shown_calc(agg),
                                        n=f"(datum.i1 - datum.i0) * {fh * fw}")
    index = [alt.Tooltip("ins:N", title=in_name), alt.Tooltip("ky:Q", title="kernel row"),
             alt.Tooltip("kx:Q", title="kernel column")]
    px = _px(columns * grid[2], rows * grid[1], 480)
    quiet = alt.Axis(labels=False, ticks=False, grid=False, domain=False)
    cellsch = base.mark_rect(invalid="show").encode(
        x=alt.X("x:Q", title=f"{in_name} kernels, left to right", axis=quiet,
                scale=alt.Scale(domain=[0, columns], nice=False, zero=False)),
        x2=alt.X2("x2:Q"),
        y=alt.Y("y:Q", title="then top to bottom", axis=quiet,
                scale=alt.Scale(domain=[0, rows], nice=False, zero=False, reverse=True)),
        y2=alt.Y2("y2:Q"),
        color=_color(m, legend, pooled, agg),
        tooltip=_tooltips(pooled, index, agg, "nf" in values),
    ).properties(width=max(60, columns * grid[2] * px), height=max(60, rows * grid[1] * px))
    return _layer(cellsch, lines, _meta(view, "neuron", x3.shape, grid, factors, pooled, agg, m))
