"""Charts of NMF factors, the Distill "Visualizing Weights" views: each neuron's kernel as an RGB
image of its three NMF factors, and a family's one-sided factorisation (non-negative channel
factors, signed spatial factors on the zero-centred scale).

The factors come from :mod:`weightatlas.core.factors` (scikit-learn's NMF, fixed seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from weightatlas.core import FamilyFactors, neuron_rgb, one_sided_nmf
from weightatlas.errors import ShapeError
from weightatlas.storage import Snapshot
from weightatlas.viz._inputs import resolve
from weightatlas.viz._reduce import as_float
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    SEQUENTIAL_SCHEME,
    diverging_scale,
    fit_budget,
    fmt,
    header_chart,
    inline_data,
    inline_values,
    numbers,
    symmetric_extent,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["factors_chart", "nmf_rgb", "rgb_hex"]


def rgb_hex(rgb: np.ndarray) -> list[str]:
    """``#rrggbb`` of each ``[..., 3]`` colour in ``[0, 1]`` (rounded to 8 bits).

    Example:
        >>> rgb_hex(np.array([[1.0, 0.5, 0.0]]))
        ['#ff8000']
    """
    q = np.clip(np.rint(np.asarray(rgb, np.float64).reshape(-1, 3) * 255), 0, 255).astype(int)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in q.tolist()]


def _pick(chosen: Sequence[int] | None, n: int, name: str, view: str, default: int
          ) -> list[int]:
    picked = list(range(min(default, n))) if chosen is None else [int(c) for c in chosen]
    bad = [c for c in picked if not 0 <= c < n]
    if bad or not picked:
        raise ShapeError(f"{view}: tensor {name!r} has {n} units; {bad or picked} are not in "
                         f"0..{n - 1}")
    return list(dict.fromkeys(picked))


def nmf_rgb(
    snapshot: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    neurons: Sequence[int] | None = None,
    seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """Each chosen output neuron's kernel as an RGB image of its 3-factor NMF (the first
    figure of the Distill article), one small pixelated tile per neuron.

    Each tile is :func:`weightatlas.core.neuron_rgb`: the neuron's input weights ``[in, h,
    w]`` split by sign along the channel axis, factored into three non-negative factors over
    the channels, and each kernel position coloured by its three loadings (red, green, blue)
    divided by the neuron's largest. Factors are fitted per neuron, so colours are not
    comparable across tiles.

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or an array ``[out, in, h, w]``.
        tensor: The tensor's name (required with a snapshot; a label with an array).
        neurons: Output neurons (default: the first 16).
        seed: NMF's random seed.
        max_bytes: Budget of the spec; fewer neurons are shown if it is exceeded.

    Raises:
        ShapeError: Not a ``[out, in, h, w]`` weight, a neuron outside it, or NaN/Inf.

    Example:
        >>> w = np.random.default_rng(0).normal(size=(4, 6, 3, 3))
        >>> m = wa.viz.nmf_rgb(w, "conv", neurons=[0, 2]).to_dict()["usermeta"]["weightatlas"]
        >>> m["neurons"], m["kernel"]
        ([0, 2], [3, 3])
    """
    t = resolve(snapshot, tensor, None, "nmf_rgb")
    if t.array.ndim != 4:
        raise ShapeError(f"nmf_rgb: tensor {t.name!r} has shape {list(t.shape)}; per-neuron "
                         "NMF needs a convolution weight [out, in, h, w]")
    x = as_float(t.array, t.name)
    chosen = _pick(neurons, x.shape[0], t.name, "nmf_rgb", 16)
    images = {n: neuron_rgb(x, n, seed=seed, name=t.name) for n in chosen}
    kh, kw = x.shape[2:]

    def build(k: int) -> alt.VConcatChart:
        import altair as alt

        shown = chosen[: max(1, k)]
        ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
        rgb = np.stack([images[n] for n in shown])                    # [n, h, w, 3]
        data, fields = inline_values({
            "o": np.repeat(shown, kh * kw), "ky": np.tile(ky.reshape(-1), len(shown)),
            "kx": np.tile(kx.reshape(-1), len(shown)), "c": rgb_hex(rgb),
            "r": numbers(rgb[..., 0].reshape(-1).round(4)),
            "g": numbers(rgb[..., 1].reshape(-1).round(4)),
            "b": numbers(rgb[..., 2].reshape(-1).round(4))})
        px = max(4, min(16, 72 // max(kh, kw)))
        tile = alt.Chart().mark_rect().encode(
            x=alt.X("kx:O", axis=None), y=alt.Y("ky:O", axis=None),
            color=alt.Color("c:N", scale=None),
            tooltip=[alt.Tooltip("o:Q", title="neuron"), alt.Tooltip("ky:Q", title="kernel row"),
                     alt.Tooltip("kx:Q", title="kernel column"),
                     alt.Tooltip("r:Q", title="factor 1 (red)"),
                     alt.Tooltip("g:Q", title="factor 2 (green)"),
                     alt.Tooltip("b:Q", title="factor 3 (blue)")],
        ).properties(width=kw * px, height=kh * px)
        grid = alt.FacetChart(data=data, spec=tile, facet=alt.Facet(
            "o:O", title=None, header=alt.Header(labelFontSize=9, labelExpr="'out ' + "
                                                 "datum.value")),
            columns=8, spacing=6).transform_flatten(fields)
        lines = [("name", t.name), ("info", t.describe()),
                 ("info", f"{len(shown)} output neurons, each its {x.shape[1]} input kernels "
                          f"({kh}×{kw}) factored into 3 NMF factors: red, green, blue"),
                 ("info", "the sign is split along the channel axis; factors are fitted per "
                          "neuron, so colours do not compare across tiles")]
        return alt.vconcat(header_chart(lines), grid, spacing=4).properties(usermeta={
            "weightatlas": {"view": "nmf_rgb", "neurons": shown, "kernel": [kh, kw],
                            "seed": seed, "factors": 3}})

    return fit_budget(build, len(chosen), max_bytes, "nmf_rgb")  # type: ignore[return-value]


def factors_chart(
    source: FamilyFactors | Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    n_factors: int = 3,
    units: Sequence[int] | None = None,
    seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """A one-sided NMF of a family of weights: its non-negative channel factors and its signed
    spatial factors, with the relative reconstruction error in the header.

    The family ``E [units, channels, h, w]`` (or ``[units, channels]``) is factored by
    :func:`weightatlas.core.one_sided_nmf` as ``E ~ S H``. The top panel is ``H [k,
    channels]`` on a sequential scale from 0; below, for each shown unit, its ``k`` spatial
    factors ``S[unit, k]`` as kernels on one zero-centred Distill scale.

    Args:
        source: A :class:`~weightatlas.core.FamilyFactors`, a snapshot, or an array.
        tensor: The tensor's name (with a snapshot), or a label.
        n_factors: Factors ``k`` to fit (ignored for a ``FamilyFactors``).
        units: Units whose spatial factors to show (default: the first 16).
        seed: NMF's random seed.
        max_bytes: Budget of the spec; fewer units are shown if it is exceeded.

    Raises:
        ShapeError: A family that is not 2-d or 4-d, all zeros or with NaN/Inf; a unit
            outside it.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> family = rng.random((6, 2)) @ rng.random((2, 10))
        >>> m = wa.viz.factors_chart(family, "fc", n_factors=2).to_dict()
        >>> m["usermeta"]["weightatlas"]["n_factors"], m["usermeta"]["weightatlas"]["units"]
        (2, [0, 1, 2, 3, 4, 5])
    """
    if isinstance(source, FamilyFactors):
        f, name, describe, used = source, tensor or "weights", None, None
    else:
        t = resolve(source, tensor, None, "factors_chart")
        f = one_sided_nmf(as_float(t.array, t.name), n_factors, seed=seed, name=t.name)
        name, describe, used = t.name, t.describe(), seed
    n_units = f.spatial.shape[0]
    chosen = _pick(units, n_units, name, "factors_chart", 16)

    def build(m: int) -> alt.VConcatChart:
        shown = chosen[: max(1, m)]
        lines = [("name", name)] + ([("info", describe)] if describe else [])
        return _factor_panels(f, shown, lines, n_units, used)

    return fit_budget(build, len(chosen), max_bytes, "factors_chart")  # type: ignore[return-value]


def _factor_panels(f: FamilyFactors, shown: list[int], lines: list[tuple[str, str]],
                   n_units: int, seed: int | None) -> alt.VConcatChart:
    import altair as alt

    k, channels = f.channel.shape
    _, _, kh, kw = f.spatial.shape
    spatial = f.spatial[shown]                                          # [units, k, h, w]
    m = symmetric_extent(spatial)
    top = float(f.channel.max()) if f.channel.size and f.channel.max() > 0 else 1.0
    lines = [*lines,
             ("info", f"one-sided NMF: {k} non-negative channel factors H [{k}×{channels}] × "
                      f"signed spatial factors S [{n_units}×{k}×{kh}×{kw}], E ≈ S·H"),
             ("info", f"relative reconstruction error ||E − S·H|| / ||E|| = "
                      f"{fmt(f.relative_error)}"),
             ("info", f"spatial factors of {len(shown)} of {n_units} units on one scale "
                      f"±{fmt(m)}")]
    fi, ci = np.meshgrid(np.arange(k), np.arange(channels), indexing="ij")
    loadings = inline_data({"f": fi.reshape(-1), "ch": ci.reshape(-1),
                            "v": numbers(f.channel.reshape(-1))}).mark_rect().encode(
        x=alt.X("ch:O", title="channel", axis=alt.Axis(labelOverlap=True, labelAngle=0)),
        y=alt.Y("f:O", title="factor"),
        color=alt.Color("v:Q", title="channel loading",
                        scale=alt.Scale(scheme=SEQUENTIAL_SCHEME, domain=[0, top]),
                        legend=alt.Legend(format=".3~g", gradientLength=60)),
        tooltip=[alt.Tooltip("f:Q", title="factor"), alt.Tooltip("ch:Q", title="channel"),
                 alt.Tooltip("v:Q", title="loading", format=".6~g")],
    ).properties(width=max(60, min(640, channels * 14)), height=k * 14)
    u, q, y, x = np.meshgrid(np.asarray(shown), np.arange(k), np.arange(kh), np.arange(kw),
                             indexing="ij")
    data, fields = inline_values({"u": u.reshape(-1), "f": q.reshape(-1), "ky": y.reshape(-1),
                                  "kx": x.reshape(-1), "v": numbers(spatial.reshape(-1))})
    px = max(4, min(14, 56 // max(kh, kw)))
    tile = alt.Chart().mark_rect().encode(
        x=alt.X("kx:O", axis=None), y=alt.Y("ky:O", axis=None),
        color=alt.Color("v:Q", scale=diverging_scale(m), title="spatial factor",
                        legend=alt.Legend(format=".3~g")),
        tooltip=[alt.Tooltip("u:Q", title="unit"), alt.Tooltip("f:Q", title="factor"),
                 alt.Tooltip("ky:Q", title="kernel row"),
                 alt.Tooltip("kx:Q", title="kernel column"),
                 alt.Tooltip("v:Q", title="value", format=".6~g")],
    ).properties(width=kw * px, height=kh * px)
    grid = alt.FacetChart(data=data, spec=tile, facet=alt.FacetMapping(
        row=alt.Row("u:O", title="unit", header=alt.Header(labelAngle=0, labelAlign="right")),
        column=alt.Column("f:O", title="factor")),
        spacing={"row": 4, "column": 4}).transform_flatten(fields)
    return alt.vconcat(header_chart(lines), loadings, grid, spacing=10).properties(
        usermeta={"weightatlas": {
            "view": "factors", "n_factors": k, "channels": channels, "units": shown,
            "n_units": n_units, "kernel": [kh, kw], "relative_error": f.relative_error,
            "domain": [-m, m], "loading_max": top, "seed": seed}}).resolve_scale(
        color="independent")
