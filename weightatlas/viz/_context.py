"""Contextualized weights (Distill, "Visualizing Weights", figures 3-5): a grid of the weights
between chosen input and output neurons, each neuron shown by its feature visualization.

Input neurons' images run along the top, output neurons' down the left, and each cell of
the grid holds the weight between them: one coloured square for a dense weight
``[out, in]``, the spatial kernel drawn pixel for pixel for a convolution
``[out, in, kh, kw]`` (cross-correlation orientation, not flipped). Colours are the
article's zero-centred red-blue scale, by default normalized per output neuron by the
largest magnitude of *all* its weights and clipped, as in the article's figures, so the
cells of one row compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz._images import as_images, image_factor, pool_images, to_unit
from weightatlas.viz._images import hex_colors as _hex
from weightatlas.viz._reduce import as_float
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    NONFINITE_COLOR,
    dims,
    diverging_scale,
    fit_budget,
    fmt,
    header_chart,
    inline_data,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["NORMALIZATIONS", "contextualized"]

#: How weights are coloured: divided by the largest magnitude of each output neuron's
#: weights (the article's), or on one scale for the whole grid.
NORMALIZATIONS = ("output", "global")
_GAP = 6
_LABEL_W = 64
_LABEL_H = 16


def _pick_images(images: Any, chosen: list[int], total: int, side: str,
                 value_range: tuple[float, float] | None) -> tuple[np.ndarray, str] | None:
    if images is None:
        return None
    x, _ = as_images(images, f"contextualized: {side}_images")
    if x.shape[0] == total:
        x = x[chosen]
    elif x.shape[0] != len(chosen):
        raise ShapeError(f"contextualized: {side}_images has {x.shape[0]} images; expected one "
                         f"per {side} neuron ({total}) or one per {side} shown ({len(chosen)})")
    return to_unit(x, value_range, f"contextualized: {side}_images")


def _choose(weights: np.ndarray, inputs: Sequence[int] | None, outputs: Sequence[int] | None,
            top: int) -> tuple[list[int], list[int], str]:
    n_out, n_in = weights.shape[:2]
    outs = list(range(min(8, n_out))) if outputs is None else [int(o) for o in outputs]
    bad = [o for o in outs if not 0 <= o < n_out]
    if bad or not outs:
        raise ShapeError(f"contextualized: the weights have {n_out} output neurons; outputs "
                         f"{bad or outs} are not in 0..{n_out - 1}")
    if inputs is not None:
        ins = [int(i) for i in inputs]
        bad = [i for i in ins if not 0 <= i < n_in]
        if bad or not ins:
            raise ShapeError(f"contextualized: the weights have {n_in} input neurons; inputs "
                             f"{bad or ins} are not in 0..{n_in - 1}")
        return ins, outs, "inputs as given"
    if top < 1:
        raise ShapeError(f"contextualized: top={top}; show at least 1 input")
    if n_in <= top:
        return list(range(n_in)), outs, "all inputs"
    w = weights[outs].reshape(len(outs), n_in, -1).astype(np.float64)
    norms = np.sqrt(np.nansum(w * w, axis=(0, 2)))
    order = np.lexsort((np.arange(n_in), -norms))[:top]
    return order.tolist(), outs, (f"the {top} of {n_in} inputs with the largest L2 norm of "
                                  "their weights to the outputs shown, strongest first")


def contextualized(
    weights: Any,
    input_images: Any = None,
    output_images: Any = None,
    *,
    inputs: Sequence[int] | None = None,
    outputs: Sequence[int] | None = None,
    top: int = 8,
    normalize: str = "output",
    name: str | None = None,
    input_labels: Sequence[str] | None = None,
    output_labels: Sequence[str] | None = None,
    value_range: tuple[float, float] | None = None,
    max_image_cells: int = 1024,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """The weights between input and output neurons, in the context of what the neurons do.

    Args:
        weights: ``[out, in]`` or a convolution ``[out, in, kh, kw]`` (``[out, in, k]``),
            e.g. a layer's kernel or expanded weights between two layers.
        input_images: Feature visualizations of the input neurons: one per input neuron
            (``[in, c, h, w]``) or one per input shown, in the order shown; or None.
        output_images: The same for the output neurons.
        inputs: Input neurons to show (default: all when there are at most ``top``, else
            the ``top`` with the largest L2 norm of their weights to the outputs shown).
        outputs: Output neurons to show (default: the first 8).
        top: How many inputs are chosen when ``inputs`` is not given.
        normalize: ``"output"``: each weight divided by the largest magnitude of its output
            neuron's weights (over all inputs) and clipped to [-1, 1], as in the article;
            ``"global"``: one scale, the largest magnitude shown.
        name: A line naming what is shown (data), e.g. ``"conv2.weight"``.
        input_labels: One label per input shown (default: its index); data.
        output_labels: One label per output shown (default: its index); data.
        value_range: Pixel values drawn as black and white (default: [0, 1] when the
            images are in it, else each image's min and max).
        max_image_cells: Cells per image before blocks of pixels are pooled (block means).
        max_bytes: Budget of the spec.

    Raises:
        ShapeError: Weights that are not 2-d to 4-d, neurons out of range, or images that do
            not match.
        UnsupportedError: An unknown ``normalize``.

    Example:
        >>> w = np.random.default_rng(0).normal(size=(4, 6, 3, 3))
        >>> fv_in = np.random.default_rng(1).random((6, 3, 8, 8))
        >>> spec = wa.viz.contextualized(w, fv_in, None, outputs=[0, 2], top=3).to_dict()
        >>> meta = spec["usermeta"]["weightatlas"]
        >>> meta["outputs"], len(meta["inputs"])
        ([0, 2], 3)
    """
    x = as_float(np.asarray(weights), "weights")
    if x.ndim not in (2, 3, 4) or x.size == 0:
        raise ShapeError(f"contextualized: weights have shape {list(x.shape)}; expected "
                         "[out, in] or a convolution [out, in, kh, kw]")
    if normalize not in NORMALIZATIONS:
        raise UnsupportedError(f"contextualized: normalize={normalize!r}; expected one of "
                               f"{', '.join(NORMALIZATIONS)}")
    w4 = x.reshape(*x.shape[:2], 1, 1) if x.ndim == 2 else (
        x.reshape(x.shape[0], x.shape[1], 1, x.shape[2]) if x.ndim == 3 else x)
    ins, outs, how = _choose(w4, inputs, outputs, top)
    for labels, chosen, side in ((input_labels, ins, "input"), (output_labels, outs, "output")):
        if labels is not None and len(labels) != len(chosen):
            raise ShapeError(f"contextualized: {len(labels)} {side}_labels for {len(chosen)} "
                             f"{side}s shown")
    pics_in = _pick_images(input_images, ins, w4.shape[1], "input", value_range)
    pics_out = _pick_images(output_images, outs, w4.shape[0], "output", value_range)
    shown = w4[np.ix_(outs, ins)]                                 # [rows, cols, kh, kw]
    if normalize == "output":
        row_max = np.array([np.nanmax(np.abs(np.where(np.isfinite(w4[o]), w4[o], np.nan)))
                            if np.isfinite(w4[o]).any() else 0.0 for o in outs])
        row_max = np.where(row_max > 0, row_max, 1.0)
        scaled = np.clip(shown / row_max[:, None, None, None], -1, 1)
        m = 1.0
    else:
        finite = np.abs(shown[np.isfinite(shown)])
        m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        scaled, row_max = shown, np.full(len(outs), m)
    in_names = [str(i) for i in ins] if input_labels is None else [str(s) for s in input_labels]
    out_names = ([str(o) for o in outs] if output_labels is None
                 else [str(s) for s in output_labels])

    def build(cells: int) -> alt.VConcatChart:
        return _build(w4, shown, scaled, m, row_max, ins, outs, in_names, out_names, pics_in,
                      pics_out, cells, normalize, name, how)

    return fit_budget(build, max_image_cells, max_bytes,  # type: ignore[return-value]
                      "contextualized")


def _build(w4: np.ndarray, shown: np.ndarray, scaled: np.ndarray, m: float,
           row_max: np.ndarray, ins: list[int], outs: list[int], in_names: list[str],
           out_names: list[str], pics_in: tuple[np.ndarray, str] | None,
           pics_out: tuple[np.ndarray, str] | None, cells: int, normalize: str,
           name: str | None, how: str) -> alt.VConcatChart:
    import altair as alt

    kh, kw = w4.shape[2:]
    rows, cols = len(outs), len(ins)
    images = pics_in is not None or pics_out is not None
    size = 56 if images or max(kh, kw) > 1 else 24
    step = size + _GAP
    left = _LABEL_W + (step if pics_out is not None else 0)
    top = _LABEL_H + (step if pics_in is not None else 0)
    # the weights: one cell per (output, input), kernels pixel for pixel
    r, c, ky, kx = (a.reshape(-1) for a in np.meshgrid(
        np.arange(rows), np.arange(cols), np.arange(kh), np.arange(kw), indexing="ij"))
    ph, pw = size / kh, size / kw
    data = {"o": np.asarray(outs)[r], "i": np.asarray(ins)[c], "ky": ky, "kx": kx,
            "x0": left + c * step + kx * pw, "y0": top + r * step + ky * ph,
            "v": numbers(shown.reshape(-1)), "s": numbers(scaled.reshape(-1))}
    field = "s" if normalize == "output" else "v"
    legend = "weight ÷ max |w| of its output" if normalize == "output" else "weight"
    color = alt.condition(f"!isValid(datum.{field})", alt.ColorValue(NONFINITE_COLOR),
                          alt.Color(f"{field}:Q", scale=diverging_scale(m), title=legend,
                                    legend=alt.Legend(format=".3~g")))
    width, height = left + cols * step, top + rows * step
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    ys = alt.Scale(domain=[0, height], nice=False, zero=False, reverse=True)
    kernel_cells = inline_data(data).transform_calculate(
        x1=f"datum.x0 + {pw}", y1=f"datum.y0 + {ph}").mark_rect(strokeWidth=0).encode(
        x=alt.X("x0:Q", scale=xs, axis=None), x2=alt.X2("x1:Q"),
        y=alt.Y("y0:Q", scale=ys, axis=None), y2=alt.Y2("y1:Q"), color=color,
        tooltip=[alt.Tooltip("o:Q", title="output neuron"),
                 alt.Tooltip("i:Q", title="input neuron"),
                 alt.Tooltip("ky:Q", title="kernel row"),
                 alt.Tooltip("kx:Q", title="kernel column"),
                 alt.Tooltip("v:Q", title="weight", format=".6~g"),
                 alt.Tooltip("s:Q", title="÷ max |w| of its output", format=".4~g")])
    layers: list[Any] = [kernel_cells]
    meta: dict[str, Any] = {}
    lines = [("name", name)] if name else []
    lines.append(("info", f"weights {dims(w4.shape if kh * kw > 1 else w4.shape[:2])}: "
                          f"{rows} outputs (rows) × {cols} inputs (columns); {how}"))
    scale_text = ("each output's weights divided by its largest |w| (over all its inputs), "
                  "clipped to ±1" if normalize == "output" else f"one scale ±{fmt(m)}")
    lines.append(("info", f"red excites, blue inhibits; {scale_text}"))
    # the images: inputs along the top, outputs down the left
    pix: dict[str, list[Any]] = {"x0": [], "y0": [], "p": [], "c": []}
    notes = []
    for pics, first, across in ((pics_in, (left, _LABEL_H), True),
                                (pics_out, (_LABEL_W, top), False)):
        if pics is None:
            continue
        unit, note = pics
        h, w = unit.shape[1:3]
        f = image_factor(h, w, cells)
        pooled = pool_images(unit, f)
        gh, gw = pooled.shape[1:3]
        p = size / max(gh, gw)
        k, gy, gx = (a.reshape(-1) for a in np.meshgrid(
            np.arange(pooled.shape[0]), np.arange(gh), np.arange(gw), indexing="ij"))
        ox = first[0] + (k * step if across else 0)
        oy = first[1] + (0 if across else k * step)
        pix["x0"] += (ox + gx * p).tolist()
        pix["y0"] += (oy + gy * p).tolist()
        pix["p"] += [p] * k.size
        pix["c"] += _hex(pooled).reshape(-1).tolist()
        side = "input" if across else "output"
        meta[f"{side}_block"] = [f, f]
        notes.append(f"{side} images {dims((h, w))}" + (f" pooled in {f}×{f} blocks" if f > 1
                                                        else "") + f" ({note})")
    if pix["c"]:
        layers.append(inline_data(pix).transform_calculate(
            x1="datum.x0 + datum.p", y1="datum.y0 + datum.p").mark_rect(strokeWidth=0).encode(
            x=alt.X("x0:Q", scale=xs, axis=None), x2=alt.X2("x1:Q"),
            y=alt.Y("y0:Q", scale=ys, axis=None), y2=alt.Y2("y1:Q"),
            color=alt.Color("c:N", scale=None)))
        lines.append(("info", "; ".join(notes)))
    # labels: above each input column, left of each output row
    labels: dict[str, list[Any]] = {
        "x": [left + j * step for j in range(cols)] + [_LABEL_W - 6] * rows,
        "y": [_LABEL_H - 3] * cols + [top + i * step + size / 2 for i in range(rows)],
        "t": [f"in {s}" for s in in_names] + [f"out {s}" for s in out_names],
        "a": ["left"] * cols + ["right"] * rows}
    for align in ("left", "right"):
        layers.append(inline_data(labels).transform_filter(f"datum.a == '{align}'").mark_text(
            align=align, baseline="bottom" if align == "left" else "middle", fontSize=10,
            color="#333333", limit=_LABEL_W - 8 if align == "right" else step - 4,
        ).encode(x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None),
                 text=alt.Text("t:N")))
    grid = alt.layer(*layers).resolve_scale(color="independent").properties(
        width=width, height=height, view=alt.ViewConfig(stroke=None))
    return alt.vconcat(header_chart(lines), grid, spacing=4).properties(usermeta={
        "weightatlas": {"view": "contextualized", "inputs": ins, "outputs": outs,
                        "shape": list(w4.shape), "normalize": normalize,
                        "domain": [-m, m], "row_max": [float(v) for v in row_max], **meta}})
