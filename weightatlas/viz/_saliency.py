"""Charts of attributions: a heat overlay on the input image, and a strip over a sequence.

Signed attributions (gradients, gradient x input, integrated gradients) use the Distill
diverging scale centred on zero (red positive, blue negative); absolute ones (saliency,
squared SmoothGrad) the sequential scale from zero. Large images and long signals are
pooled in blocks (block means of the attribution, never sampled), so a spec stays within
its byte budget; the header says by how much.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz._images import (
    as_images,
    image_factor,
    image_panel,
    label_layer,
    pixel_columns,
    pool_images,
    to_unit,
)
from weightatlas.viz._reduce import as_float, block_reduce
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    NONFINITE_COLOR,
    SEQUENTIAL_SCHEME,
    dims,
    diverging_scale,
    fit_budget,
    fmt,
    header_chart,
    inline_values,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["saliency_overlay", "saliency_strip"]

#: Cells per image before the overlay pools blocks of pixels (112x112 for a 224x224 image).
OVERLAY_CELLS = 12544
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, for the gray underlay


def _signed(values: np.ndarray, signed: bool | None) -> bool:
    if signed is not None:
        return bool(signed)
    finite = values[np.isfinite(values)]
    return bool(finite.size and finite.min() < 0)


def _extent(shown: np.ndarray, domain: float | None, percentile: float) -> float:
    if domain is not None:
        if not (math.isfinite(domain) and domain > 0):
            raise UnsupportedError(f"domain must be a positive finite number, got {domain}")
        return float(domain)
    if not 0 < percentile <= 100:
        raise UnsupportedError(f"percentile={percentile}; expected a number in (0, 100]")
    v = np.abs(shown[np.isfinite(shown)])
    m = float(np.percentile(v, percentile)) if v.size else 0.0
    return m if m > 0 else (float(v.max()) if v.size and v.max() > 0 else 1.0)


def _heat_color(m: float, signed: bool, title: str) -> Any:
    import altair as alt

    if signed:
        scale = diverging_scale(m)
    else:
        scale = alt.Scale(scheme=SEQUENTIAL_SCHEME, domain=[0.0, m], clamp=True)
    return alt.condition("!isValid(datum.v) || datum.nf > 0", alt.ColorValue(NONFINITE_COLOR),
                         alt.Color("v:Q", scale=scale, title=title,
                                   legend=alt.Legend(format=".3~g")))


def _attribution_maps(attribution: Any, image_shape: tuple[int, ...], x: np.ndarray,
                      batched: bool, channels_last: bool | None) -> np.ndarray:
    """The attribution as ``[n, h, w]``: summed over its channel axis when it has one."""
    a = as_float(np.asarray(attribution), "attribution")
    n, h, w = x.shape[:3]
    shape = list(a.shape)
    if a.shape == image_shape:
        if a.ndim == 2:
            return a[None]
        ax, _ = as_images(a, "attribution", channels_last=channels_last)
        return ax.sum(axis=3)
    if batched and a.ndim == 4:  # [n, c, h, w] or [n, h, w, c] with another channel count
        if a.shape[0] == n and a.shape[2:] == (h, w):
            return a.sum(axis=1)
        if a.shape[0] == n and a.shape[1:3] == (h, w):
            return a.sum(axis=3)
    if a.shape == ((n, h, w) if batched else (h, w)):
        return a if batched else a[None]
    if not batched and a.ndim == 3 and a.shape[1:] == (h, w):
        return a.sum(axis=0)[None]
    if not batched and a.ndim == 3 and a.shape[:2] == (h, w):
        return a.sum(axis=2)[None]
    want = f"[{n}, c, {h}, {w}] or [{n}, {h}, {w}]" if batched else f"[c, {h}, {w}] or [{h}, {w}]"
    raise ShapeError(f"saliency_overlay: attribution has shape {shape}, the image "
                     f"{list(image_shape)}; expected {want} (channels are summed)")


def saliency_overlay(
    image: Any,
    attribution: Any,
    *,
    alpha: float = 0.8,
    signed: bool | None = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    show_image: bool = True,
    domain: float | None = None,
    percentile: float = 100.0,
    value_range: tuple[float, float] | None = None,
    channels_last: bool | None = None,
    max_cells: int = OVERLAY_CELLS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """An attribution as a heat overlay on its input image; a batch as small multiples.

    Each example is drawn as the input image (optional) and, next to it, the attribution
    over the image in gray: red for positive and blue for negative on the zero-centred
    Distill scale (signed), or the sequential scale from 0 (absolute), more opaque where
    the attribution is larger (up to ``alpha``). An attribution with channels (``[c, h, w]``,
    as gradients of an RGB input are) is summed over them (Captum's
    ``visualize_image_attr`` does the same). Images larger than ``max_cells`` cells are
    pooled in square blocks: each cell shows the block means of the image and of the
    attribution.

    Args:
        image: ``[h, w]``, ``[c, h, w]``, ``[h, w, c]`` (c = 1 or 3) or a batch
            ``[n, c, h, w]`` / ``[n, h, w, c]``; values in [0, 1], or see ``value_range``.
        attribution: The same shape as ``image``, or without its channel axis
            (``[h, w]``, ``[n, h, w]``), or with another channel count.
        alpha: Opacity of the strongest attribution over the image.
        signed: Diverging scale (True) or the sequential scale of ``|attribution|``
            (False); default: diverging when any value is negative.
        labels: One label per example, drawn above it (data: shown literally).
        name: A line naming what is shown (data), e.g. the model and target.
        show_image: Draw the input image on its own next to the overlay.
        domain: Half-width of the colour domain (signed) or its top (absolute); default:
            the ``percentile`` of the magnitudes shown.
        percentile: Percentile of the magnitudes that sets the domain (Captum clips at
            98); larger values are drawn at full colour.
        value_range: Pixel values drawn as black and white (default: [0, 1] when the
            image is in it, else each image's min and max).
        channels_last: Force the channel axis of ``image`` (see ``as_images``).
        max_cells: Cells per image before blocks of pixels are pooled.
        max_bytes: Budget of the spec; pooling coarsens until it fits.

    Returns:
        An Altair chart: a header, then one row per example.

    Raises:
        ShapeError: An image that is not one, or an attribution of another size.
        UnsupportedError: ``alpha`` outside (0, 1], a bad ``domain`` or ``percentile``.

    Example:
        >>> img = np.random.default_rng(0).random((3, 16, 16))
        >>> attr = np.random.default_rng(1).normal(size=(3, 16, 16))
        >>> spec = wa.viz.saliency_overlay(img, attr, name="x").to_dict()
        >>> spec["usermeta"]["weightatlas"]["signed"], spec["usermeta"]["weightatlas"]["grid"]
        (True, [16, 16])
    """
    if not 0 < alpha <= 1:
        raise UnsupportedError(f"saliency_overlay: alpha={alpha}; expected a number in (0, 1]")
    x, batched = as_images(image, "saliency_overlay: image", channels_last=channels_last)
    maps = _attribution_maps(attribution, tuple(np.shape(image)), x, batched, channels_last)
    is_signed = _signed(maps, signed)
    values = maps if is_signed else np.abs(maps)
    unit, note = to_unit(x, value_range, "saliency_overlay: image")
    gray = (unit * _LUMA).sum(axis=3, keepdims=True) if unit.shape[3] == 3 else unit
    n, h, w = x.shape[:3]
    if labels is not None and len(labels) != n:
        raise ShapeError(f"saliency_overlay: {len(labels)} labels for {n} examples")
    finite = np.isfinite(values)

    def build(cells: int) -> alt.VConcatChart:
        import altair as alt

        per = max(1, cells // n)
        f = image_factor(h, w, per)
        cols, grid = pixel_columns(unit, f)
        cols["l"] = np.rint(np.clip(pool_images(gray, f), 0, 1) * 255).astype(np.int64
                                                                                 ).reshape(-1)
        if f > 1:
            s = block_reduce(values, (1, f, f), "attribution")
            shown, nonfinite = s.mean, s.n_nonfinite
        else:
            shown, nonfinite = values, (~finite).astype(np.int64)
        cols["v"] = numbers(shown.reshape(-1), exact32=True)
        if nonfinite.any():
            cols["nf"] = nonfinite.reshape(-1)
        m = _extent(shown, domain, percentile)
        data, fields = inline_values(cols)
        size = _size(h, w)
        under = alt.Color("g:N", scale=None)
        heat = _heat_color(m, is_signed, "attribution" if is_signed else "|attribution|")
        rows = []
        for i in range(n):
            where = f"datum.n == {i}"
            over = image_panel(grid, (h, w), f, size, where, under).transform_calculate(
                g="'rgb(' + datum.l + ',' + datum.l + ',' + datum.l + ')'")
            top = image_panel(grid, (h, w), f, size, where, heat).transform_calculate(
                a=f"isValid(datum.v) && !(datum.nf > 0) ? "
                  f"{alpha} * min(1, abs(datum.v) / {m}) : 1").encode(
                opacity=alt.Opacity("a:Q", scale=None),
                tooltip=[alt.Tooltip("y0:Q", title="row"), alt.Tooltip("x0:Q", title="column"),
                         alt.Tooltip("v:Q", title="block mean" if f > 1 else "attribution",
                                     format=".6~g")])
            layers: list[Any] = [over, top]
            if labels is not None:
                layers.append(label_layer(str(labels[i])))
            panel: Any = alt.layer(*layers)
            if show_image:
                plain = image_panel(grid, (h, w), f, size, where)
                panel = alt.hconcat(plain, panel, spacing=6)
            rows.append(panel)
        lines = [("name", name)] if name else []
        kind = (f"signed: red positive, blue negative, scale ±{fmt(m)}" if is_signed
                else f"absolute: |attribution| from 0, scale 0..{fmt(m)}")
        lines.append(("info", f"{n} example{'s' if n > 1 else ''} of {dims((h, w))} pixels; "
                              f"{kind}"))
        if f > 1:
            lines.append(("info", f"pooled: blocks of {f}×{f} pixels → {dims(grid)} cells, "
                                  "each the block mean of the image and of the attribution"))
        lines.append(("info", f"{note}; opacity grows with |attribution| up to {alpha:g}"))
        if not finite.all():
            lines.append(("alert", f"{int((~finite).sum())} NaN or ±Inf attribution values: "
                                   "cells holding any are drawn black"))
        return alt.vconcat(
            header_chart(lines), *rows, spacing=10, data=data,
        ).transform_flatten(fields).properties(usermeta={"weightatlas": {
            "view": "saliency_overlay", "examples": n, "shape": [h, w], "grid": list(grid),
            "block": [f, f], "signed": is_signed,
            "domain": [-m, m] if is_signed else [0.0, m]}})

    return fit_budget(build, max_cells * n, max_bytes,  # type: ignore[return-value]
                      "saliency_overlay")


def _size(h: int, w: int) -> tuple[int, int]:
    side = min(240, max(120, max(h, w)))
    return max(8, round(side * w / max(h, w))), max(8, round(side * h / max(h, w)))


def saliency_strip(
    values: Any,
    labels: Sequence[str] | None = None,
    *,
    rows: Sequence[str] | None = None,
    signed: bool | None = None,
    name: str | None = None,
    wrap: int | None = None,
    domain: float | None = None,
    percentile: float = 100.0,
    max_cells: int = 2048,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """Attribution over a 1-d signal or a token sequence as a coloured strip.

    Each position is a cell coloured by its attribution (zero-centred diverging scale when
    signed, sequential from 0 when absolute), with its token written in it when ``labels``
    are given. A 1-d sequence of tokens wraps onto lines of ``wrap`` cells, like text; a
    2-d ``values`` ``[rows, positions]`` draws one strip per row (methods, targets, or
    examples). Above ``max_cells`` cells, positions are pooled in blocks (block means;
    a pooled cell's label reads ``first…last``).

    Args:
        values: ``[positions]`` or ``[rows, positions]`` attributions (e.g. summed over
            the embedding dimension).
        labels: One label per position (tokens); data, shown literally.
        rows: One name per row (data).
        signed: Diverging scale (True) or the sequential scale of ``|values|`` (False);
            default: diverging when any value is negative.
        name: A line naming what is shown (data).
        wrap: Cells per line for a 1-d sequence (default: 16 with labels, else no wrap).
        domain: Half-width of the colour domain (or its top when absolute).
        percentile: Percentile of the magnitudes that sets the domain.
        max_cells: Cells drawn before positions are pooled.
        max_bytes: Budget of the spec.

    Raises:
        ShapeError: ``values`` not 1-d or 2-d, or labels/rows of the wrong length.

    Example:
        >>> spec = wa.viz.saliency_strip(np.array([0.5, -1.0, 2.0]), ["a", "cat", "sat"]
        ...                              ).to_dict()
        >>> spec["usermeta"]["weightatlas"]["domain"]
        [-2.0, 2.0]
    """
    a = as_float(np.asarray(values), "values")
    if a.ndim not in (1, 2) or a.size == 0:
        raise ShapeError(f"saliency_strip: values have shape {list(a.shape)}; expected "
                         "[positions] or [rows, positions] with at least one value")
    one = a.ndim == 1
    a2 = a[None] if one else a
    n_rows, length = a2.shape
    if labels is not None and len(labels) != length:
        raise ShapeError(f"saliency_strip: {len(labels)} labels for {length} positions")
    if rows is not None and len(rows) != n_rows:
        raise ShapeError(f"saliency_strip: {len(rows)} row names for {n_rows} rows")
    if wrap is not None and wrap < 1:
        raise ShapeError(f"saliency_strip: wrap={wrap}; expected at least 1")
    is_signed = _signed(a2, signed)
    v2 = a2 if is_signed else np.abs(a2)
    finite = np.isfinite(v2)

    def build(cells: int) -> alt.VConcatChart:
        import altair as alt

        f = max(1, math.ceil(length / max(1, cells // n_rows)))
        if f > 1:
            s = block_reduce(v2, (1, f), "values")
            shown, nonfinite = s.mean, s.n_nonfinite
        else:
            shown, nonfinite = v2, (~finite).astype(np.int64)
        cells_per_row = shown.shape[1]
        per_line = (wrap if wrap is not None else 16 if labels is not None else cells_per_row)
        per_line = cells_per_row if not one else min(per_line, cells_per_row)
        idx = np.arange(cells_per_row)
        start, stop = idx * f, np.minimum(idx * f + f, length)
        r = np.repeat(np.arange(n_rows), cells_per_row)
        pos = np.tile(idx, n_rows)
        line = r if not one else pos // per_line
        cols: dict[str, Any] = {
            "row": r, "line": line, "col": pos % per_line if one else pos,
            "p0": np.tile(start, n_rows), "p1": np.tile(stop - 1, n_rows),
            "v": numbers(shown.reshape(-1), exact32=True)}
        if labels is not None:
            text = [str(labels[s]) if e == s else f"{labels[s]}…{labels[e]}"
                    for s, e in zip(start.tolist(), (stop - 1).tolist(), strict=True)]
            cols["t"] = text * n_rows
        if rows is not None:
            cols["rname"] = [str(rows[i]) for i in r.tolist()]
        if nonfinite.any():
            cols["nf"] = nonfinite.reshape(-1)
        m = _extent(shown, domain, percentile)
        data, fields = inline_values(cols)
        n_lines = int(line.max()) + 1
        cell_w = 56 if labels is not None else max(2, min(40, 720 // per_line))
        cell_h = 22
        width, height = per_line * cell_w, n_lines * cell_h
        heat = _heat_color(m, is_signed, "attribution" if is_signed else "|attribution|")
        tips = [alt.Tooltip("p0:Q", title="from position"),
                alt.Tooltip("p1:Q", title="to position"),
                alt.Tooltip("v:Q", title="block mean" if f > 1 else "attribution",
                            format=".6~g")]
        if labels is not None:
            tips.insert(0, alt.Tooltip("t:N", title="token"))
        if rows is not None:
            tips.insert(0, alt.Tooltip("rname:N", title="row"))
        xs = alt.X("col:Q", scale=alt.Scale(domain=[0, per_line], nice=False, zero=False),
                   axis=None if labels is not None else alt.Axis(
                       title="position" if f == 1 else f"position block ({f} per cell)",
                       format="d", tickMinStep=1))
        ys = alt.Y("line:Q", scale=alt.Scale(domain=[0, n_lines], nice=False, zero=False,
                                             reverse=True), axis=None)
        base = alt.Chart().transform_calculate(col1="datum.col + 1", line1="datum.line + 1")
        rect = base.mark_rect(stroke="#ffffff", strokeWidth=1 if labels is not None else 0,
                              ).encode(x=xs, x2=alt.X2("col1:Q"), y=ys, y2=alt.Y2("line1:Q"),
                                       color=heat, tooltip=tips)
        layers: list[Any] = [rect]
        if labels is not None:
            layers.append(base.transform_calculate(
                xm="datum.col + 0.5", ym="datum.line + 0.5",
                dark=f"isValid(datum.v) && abs(datum.v) > {0.6 * m}",
            ).mark_text(fontSize=10, limit=cell_w - 4, baseline="middle").encode(
                x=alt.X("xm:Q", scale=alt.Scale(domain=[0, per_line], nice=False, zero=False),
                        axis=None),
                y=alt.Y("ym:Q", scale=alt.Scale(domain=[0, n_lines], nice=False, zero=False,
                                                reverse=True), axis=None),
                text=alt.Text("t:N"),
                color=alt.condition("datum.dark", alt.ColorValue("#ffffff"),
                                    alt.ColorValue("#111111")),
                tooltip=tips))
        if rows is not None and not one:
            layers.append(base.transform_filter("datum.col == 0").transform_calculate(
                ym="datum.line + 0.5").mark_text(align="right", dx=-6, fontSize=10,
                                                 baseline="middle", limit=160).encode(
                x=alt.XValue(0),
                y=alt.Y("ym:Q", scale=alt.Scale(domain=[0, n_lines], nice=False, zero=False,
                                                reverse=True), axis=None),
                text=alt.Text("rname:N")))
        strip = alt.layer(*layers).properties(width=width, height=height,
                                              view=alt.ViewConfig(stroke=None))
        lines = [("name", name)] if name else []
        kind = (f"signed: red positive, blue negative, scale ±{fmt(m)}" if is_signed
                else f"absolute: |attribution| from 0, scale 0..{fmt(m)}")
        lines.append(("info", f"{length} positions" + (f" × {n_rows} rows" if not one else "")
                      + f"; {kind}"))
        if f > 1:
            lines.append(("info", f"pooled: blocks of {f} positions → {cells_per_row} cells, "
                                  "each the block mean"))
        if not finite.all():
            lines.append(("alert", f"{int((~finite).sum())} NaN or ±Inf values: cells holding "
                                   "any are drawn black"))
        return alt.vconcat(
            header_chart(lines), strip, spacing=4, data=data,
        ).transform_flatten(fields).properties(usermeta={"weightatlas": {
            "view": "saliency_strip", "shape": [int(d) for d in a.shape],
            "cells": int(cells_per_row), "block": f, "signed": is_signed,
            "domain": [-m, m] if is_signed else [0.0, m]}})

    return fit_budget(build, max_cells, max_bytes, "saliency_strip")  # type: ignore[return-value]
