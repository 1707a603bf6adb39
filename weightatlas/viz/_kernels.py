"""Convolution kernels as small multiples, in the style of the Distill article "Visualizing
Weights": for chosen output neurons, their strongest input connections, ranked by the L2 norm
of the spatial kernel, each kernel a small pixelated heatmap on one shared zero-centred scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.storage import Snapshot
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._reduce import as_float
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    axis_name,
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

__all__ = ["kernels", "kernels_of", "rank_inputs"]


def rank_inputs(weight: np.ndarray, neuron: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of one output neuron ranked by the L2 norm of their spatial kernels.

    Args:
        weight: A convolution kernel ``[out, in, h, w]`` (or ``[out, in, w]``).
        neuron: The output neuron.

    Returns:
        ``(inputs, norms)``, strongest first (ties: lower input index first; kernels holding
        NaN or Inf rank last).

    Example:
        >>> w = np.zeros((1, 3, 2, 2)); w[0, 2] = 1; w[0, 0, 0, 0] = -1.5
        >>> inputs, norms = rank_inputs(w, 0)
        >>> inputs.tolist(), norms.tolist()
        ([2, 0, 1], [2.0, 1.5, 0.0])
    """
    x = as_float(weight)
    kernels = x[neuron].reshape(x.shape[1], -1).astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", kernels, kernels))
    key = np.where(np.isfinite(norms), -norms, np.inf)
    order = np.lexsort((np.arange(norms.size), key))
    return order, norms[order]


def kernels(
    snapshot: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    neurons: Sequence[int] | None = None,
    top: int = 8,
    max_bytes: int = DEFAULT_MAX_BYTES,
    domain: float | None = None,
    layout: Sequence[str] | None = None,
) -> alt.VConcatChart:
    """Small multiples of a convolution's kernels: rows are output neurons, columns their
    ``top`` strongest inputs by the L2 norm of the spatial kernel, strongest first.

    Every kernel is drawn pixel for pixel (row = relative y, column = relative x, not
    flipped) on one zero-centred scale shared by all the kernels shown.

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or an array ``[out, in, h, w]``.
        tensor: The tensor's name (required with a snapshot; a label with an array).
        neurons: Output neurons to show (default: the first 8).
        top: Inputs per neuron.
        max_bytes: Budget of the spec; fewer inputs per neuron are shown if it is exceeded.
        domain: Half-width of the colour domain (default: the largest magnitude shown).
        layout: Axis names overriding the stored layout.

    Raises:
        UnsupportedError: The tensor is not a convolution kernel.
        ShapeError: A neuron outside the tensor, or ``top`` below 1.

    Example:
        >>> w = np.random.default_rng(0).normal(size=(4, 6, 3, 3))
        >>> spec = wa.viz.kernels(w, "conv", neurons=[1, 2], top=3).to_dict()
        >>> spec["usermeta"]["weightatlas"]["neurons"], spec["usermeta"]["weightatlas"]["top"]
        ([1, 2], 3)
    """
    t = resolve(snapshot, tensor, layout, "kernels")
    return kernels_of(t, neurons=neurons, top=top, max_bytes=max_bytes, domain=domain)


def kernels_of(t: TensorInput, *, neurons: Sequence[int] | None = None, top: int = 8,
               max_bytes: int = DEFAULT_MAX_BYTES, domain: float | None = None,
               named: bool = True) -> alt.VConcatChart:
    """:func:`kernels` of a resolved tensor (``named=False``: without the lines that name and
    describe it)."""
    if not t.is_conv:
        raise UnsupportedError(f"kernels: tensor {t.name!r} has shape {list(t.shape)}, layout "
                               f"{list(t.layout)} and kind {t.kind}; expected a convolution "
                               "kernel [out, in, h, w]")
    x = as_float(t.array, t.name)
    x4 = x.reshape(x.shape[0], x.shape[1], 1, x.shape[2]) if x.ndim == 3 else x
    n_out, n_in = x4.shape[:2]
    chosen = list(range(min(8, n_out))) if neurons is None else [int(n) for n in neurons]
    bad = [n for n in chosen if not 0 <= n < n_out]
    if bad or not chosen:
        raise ShapeError(f"kernels: tensor {t.name!r} has {n_out} output neurons; neurons "
                         f"{bad or chosen} are not in 0..{n_out - 1}")
    if top < 1:
        raise ShapeError(f"kernels: top={top}; show at least 1 input per neuron")
    chosen = list(dict.fromkeys(chosen))
    ranked = [rank_inputs(x4, n) for n in chosen]

    def build(k: int) -> alt.VConcatChart:
        head = [("name", t.name), ("info", t.describe())] if named else []
        return _build(head, t.layout, t.exact32, x4, chosen, ranked, min(k, n_in), domain)

    return fit_budget(build, min(top, n_in), max_bytes,  # type: ignore[return-value]
                      f"kernels of {t.name!r}")


def _build(head: list[tuple[str, str]], layout: Sequence[str], exact32: bool, x4: np.ndarray,
           chosen: list[int], ranked: list[tuple[np.ndarray, np.ndarray]], top: int,
           domain: float | None) -> alt.VConcatChart:
    import altair as alt

    _, n_in, kh, kw = x4.shape
    inputs = np.stack([r[0][:top] for r in ranked])               # [neurons, top]
    norms = np.stack([r[1][:top] for r in ranked])
    neurons = np.asarray(chosen)[:, None].repeat(top, axis=1)
    values = x4[neurons, inputs]                                  # [neurons, top, kh, kw]
    m = symmetric_extent(values, domain)
    per = kh * kw
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    data, fields = inline_values({
        "o": neurons.repeat(per), "rank": np.tile(np.arange(1, top + 1).repeat(per),
                                                  len(chosen)),
        "i": inputs.repeat(per), "ky": np.tile(ky.reshape(-1), len(chosen) * top),
        "kx": np.tile(kx.reshape(-1), len(chosen) * top),
        "v": numbers(values.reshape(-1), exact32), "norm": numbers(norms.repeat(per)),
    })
    out_name, in_name = axis_name(layout, 0), axis_name(layout, 1)
    px = max(4, min(14, 64 // max(kh, kw)))
    quiet = None
    pixels = alt.Chart().mark_rect(invalid="show").encode(
        x=alt.X("kx:O", axis=quiet, title=None),
        y=alt.Y("ky:O", axis=quiet, title=None),
        color=alt.condition("!isValid(datum.v)", alt.ColorValue("#000000"),
                            alt.Color("v:Q", scale=diverging_scale(m), title="weight",
                                      legend=alt.Legend(format=".3~g"))),
        tooltip=[alt.Tooltip("o:Q", title=out_name), alt.Tooltip("i:Q", title=in_name),
                 alt.Tooltip("rank:Q", title="rank"), alt.Tooltip("ky:Q", title="kernel row"),
                 alt.Tooltip("kx:Q", title="kernel column"),
                 alt.Tooltip("v:Q", title="weight", format=".9~g"),
                 alt.Tooltip("norm:Q", title="kernel L2 norm", format=".6~g")],
    ).properties(width=kw * px, height=kh * px)
    labels = alt.Chart().transform_filter("datum.ky == 0 && datum.kx == 0").transform_calculate(
        label=f"'{in_name} ' + datum.i").mark_text(
        align="left", baseline="bottom", fontSize=9, color="#555555", dy=-2,
    ).encode(text=alt.Text("label:N"), x=alt.XValue(0), y=alt.YValue(0))
    grid = alt.layer(pixels, labels, data=data).transform_flatten(fields).facet(
        row=alt.Row("o:O", title=f"{out_name} neuron",
                    header=alt.Header(labelAngle=0, labelAlign="right")),
        column=alt.Column("rank:O", title=f"{in_name} inputs ranked by kernel L2 norm"),
        spacing={"row": 16, "column": 6},
    )
    lines = [*head,
             ("info", f"{len(chosen)} {out_name} neurons × their {top} strongest of {n_in} "
                      f"{in_name} kernels ({kh}×{kw}) by L2 norm; one scale ±{fmt(m)}")]
    if not np.isfinite(values).all():
        lines.append(("alert", "kernels holding NaN or Inf: those pixels are drawn black"))
    return alt.vconcat(header_chart(lines), grid, spacing=4).properties(usermeta={
        "weightatlas": {"view": "kernels", "neurons": chosen, "top": top, "rank_by": "l2",
                        "kernel": [kh, kw], "domain": [-m, m]}})
