"""Distributions: the histogram of one tensor (NaN and Inf counted, not hidden) and a ridgeline
of many tensors' distributions in model order."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import Snapshot, tensor_stats
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._reduce import Histogram, histogram_counts
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    SEQUENTIAL_SCHEME,
    diverging_scale,
    fit_budget,
    fmt,
    header_chart,
    header_layers,
    inline_data,
    inline_rows,
    inline_values,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["finite_moments", "histogram", "histogram_of", "ridgeline"]


def finite_moments(array: np.ndarray) -> tuple[float, float]:
    """Mean and population std of the finite values, in float64 (NaN when there are none).

    Example:
        >>> finite_moments(np.array([1., 3., np.nan]))
        (2.0, 1.0)
    """
    stats = tensor_stats(np.asarray(array))  # the store's statistics, one pass in float64
    if stats.mean is None or stats.std is None:
        return math.nan, math.nan
    return stats.mean, stats.std


def _nonfinite_line(h: Histogram) -> tuple[str, str]:
    text = (f"NaN {h.n_nan:,} · +Inf {h.n_posinf:,} · −Inf {h.n_neginf:,} "
            "(counted, not binned)")
    return ("alert" if h.n_nan or h.n_posinf or h.n_neginf else "info", text)


def histogram(
    snapshot: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    bins: int = 60,
    range: tuple[float, float] | None = None,
    log: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """Histogram of one tensor's finite values, bars coloured by their bin's centre on the
    zero-centred Distill scale; the NaN, +Inf and -Inf counts are printed in the header (in
    red when any is non-zero).

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or an array.
        tensor: The tensor's name (required with a snapshot; a label with an array).
        bins: Number of equal bins (as ``np.histogram``).
        range: ``(low, high)`` of the bins (default: the finite min and max).
        log: Counts on a symmetric-log axis (for long tails).
        max_bytes: Budget of the spec.

    Example:
        >>> spec = wa.viz.histogram(np.array([0., 1., 1., np.nan]), "b", bins=2).to_dict()
        >>> meta = spec["usermeta"]["weightatlas"]
        >>> meta["counts"], meta["n_nan"]
        ([1, 2], 1)
    """
    t = resolve(snapshot, tensor, None, "histogram")
    return histogram_of(t, bins=bins, range=range, log=log, max_bytes=max_bytes)


def histogram_of(t: TensorInput, *, bins: int = 60,
                 range: tuple[float, float] | None = None,
                 log: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                 named: bool = True) -> alt.LayerChart:
    """:func:`histogram` of a resolved tensor (``named=False``: without the header lines that
    name and describe it, for pages that already do)."""
    import altair as alt

    h = histogram_counts(t.array, bins, range, t.name)
    mean, std = finite_moments(t.array)
    m = max(abs(float(h.edges[0])), abs(float(h.edges[-1]))) or 1.0
    lines = [("name", t.name), ("info", t.describe())] if named else []
    lines += [("info", f"{h.n_finite:,} finite values in {bins} bins · mean {fmt(mean)} · "
                      f"std {fmt(std)} · min {fmt(float(h.edges[0]))} · "
                      f"max {fmt(float(h.edges[-1]))}"),
             _nonfinite_line(h)]

    def build(_: int) -> alt.LayerChart:
        bars = inline_data({"x0": numbers(h.edges[:-1]), "x1": numbers(h.edges[1:]),
                            "n": h.counts}).transform_calculate(
            c="(datum.x0 + datum.x1) / 2").mark_rect().encode(
            x=alt.X("x0:Q", title="value", scale=alt.Scale(zero=False, nice=False,
                                                            domain=[float(h.edges[0]),
                                                                    float(h.edges[-1])])),
            x2=alt.X2("x1:Q"),
            y=alt.Y("n:Q", title="count (symlog)" if log else "count",
                    scale=alt.Scale(type="symlog") if log else alt.Scale()),
            y2=alt.Y2(datum=0),
            color=alt.Color("c:Q", scale=diverging_scale(m), title="bin centre",
                            legend=alt.Legend(format=".3~g")),
            tooltip=[alt.Tooltip("x0:Q", title="from", format=".7~g"),
                     alt.Tooltip("x1:Q", title="to", format=".7~g"),
                     alt.Tooltip("n:Q", title="count", format=",")],
        ).properties(width=420, height=180)
        return cast("alt.LayerChart", alt.layer(bars, *header_layers(lines)).properties(
            usermeta={"weightatlas": {
            "view": "histogram", "bins": bins, "range": [float(h.edges[0]), float(h.edges[-1])],
            "counts": h.counts.tolist(), "n_nan": h.n_nan, "n_posinf": h.n_posinf,
            "n_neginf": h.n_neginf, "log": log}}))

    return fit_budget(build, bins, max_bytes, f"histogram of {t.name!r}")  # type: ignore[return-value]


def _default_names(snapshot: Snapshot) -> list[str]:
    rows = snapshot.tensors().select(["name", "shape", "dtype", "numel"]).to_pylist()
    floats = [r for r in rows if r["dtype"].startswith(("float", "bfloat")) and r["numel"] > 1]
    layers = [r["name"] for r in floats if len(r["shape"]) >= 2]
    return layers or [r["name"] for r in floats]


def ridgeline(
    snapshot: Snapshot | Mapping[str, np.ndarray],
    *,
    names: Sequence[str] | None = None,
    bins: int = 40,
    max_bytes: int = DEFAULT_MAX_BYTES,
    step: int = 18,
    overlap: float = 1.5,
) -> alt.VConcatChart:
    """Ridgeline of many tensors' distributions, one ridge per tensor in model order.

    Each ridge is the histogram of one tensor's finite values over its own range, drawn on
    the shared value axis and scaled to its own peak; its fill is the tensor's std
    (sequential scale). By default the ridges are the snapshot's weight matrices and kernels
    (floating tensors of 2 or more axes).

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or ``{name: array}`` in order.
        names: Tensors to show, in this order.
        bins: Bins per tensor (fewer when the spec would exceed ``max_bytes``).
        max_bytes: Budget of the spec.
        step: Pixels between ridges.
        overlap: How many steps a ridge's peak reaches up.

    Raises:
        NotFoundError: A name not in the snapshot, or nothing to show.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> chart = wa.viz.ridgeline({"a": rng.normal(size=100), "b": rng.normal(size=50)})
        >>> chart.to_dict()["usermeta"]["weightatlas"]["tensors"]
        2
    """

    if isinstance(snapshot, Snapshot):
        chosen = list(names) if names is not None else _default_names(snapshot)
        missing = [n for n in chosen if n not in snapshot]
        if missing:
            snapshot.info(missing[0])  # raises NotFoundError with suggestions
        arrays: Mapping[str, np.ndarray] = {n: snapshot.read(n) for n in chosen}
        ref = snapshot.ref
    else:
        source = dict(snapshot)
        chosen = list(names) if names is not None else list(source)
        missing = [n for n in chosen if n not in source]
        if missing:
            raise NotFoundError(f"ridgeline: no tensor {missing[0]!r} among the "
                                f"{len(source)} given")
        arrays = {n: source[n] for n in chosen}
        ref = None
    if not chosen:
        raise NotFoundError("ridgeline: no tensors to show")
    if bins < 2:
        raise ShapeError(f"ridgeline: bins={bins}; use at least 2")
    stds = [finite_moments(arrays[n])[1] for n in chosen]

    def build(k: int) -> alt.VConcatChart:
        k = max(2, k)
        hists = [histogram_counts(arrays[n], k, None, n) for n in chosen]
        return _ridges(chosen, hists, stds, k, ref, step, overlap)

    return fit_budget(build, bins, max_bytes, "ridgeline")  # type: ignore[return-value]


def _ridges(chosen: list[str], hists: list[Histogram], stds: list[float], bins: int,
            ref: str | None, step: int, overlap: float) -> alt.VConcatChart:
    import altair as alt

    lo = min(float(h.edges[0]) for h in hists)
    hi = max(float(h.edges[-1]) for h in hists)
    centres = np.concatenate([(h.edges[:-1] + h.edges[1:]) / 2 for h in hists])
    peaks = [max(int(h.counts.max()), 1) for h in hists]
    data, fields = inline_values({
        "t": np.arange(len(hists)).repeat(bins), "x": numbers(centres),
        "n": np.concatenate([h.counts for h in hists]),
        "d": numbers(np.concatenate([h.counts / p for h, p in zip(hists, peaks, strict=True)])
                     .round(5)),
    })
    labels = inline_rows([{"t": i, "name": n, "std": s if math.isfinite(s) else None,
                           "bad": h.n_nan + h.n_posinf + h.n_neginf}
                          for i, (n, s, h) in enumerate(zip(chosen, stds, hists, strict=True))])
    area = alt.Chart().mark_area(interpolate="linear", fillOpacity=0.85, stroke="#ffffff",
                                 strokeWidth=0.6).encode(
        x=alt.X("x:Q", title="value", scale=alt.Scale(domain=[lo, hi], nice=False, zero=False)),
        y=alt.Y("d:Q", axis=None, stack=None,
                scale=alt.Scale(domain=[0, 1], range=[step, -step * overlap])),
        fill=alt.Fill("std:Q", title="tensor std",
                      scale=alt.Scale(scheme=SEQUENTIAL_SCHEME, zero=True),
                      legend=alt.Legend(format=".3~g")),
        tooltip=[alt.Tooltip("name:N", title="tensor"),
                 alt.Tooltip("x:Q", title="bin centre", format=".6~g"),
                 alt.Tooltip("n:Q", title="count", format=","),
                 alt.Tooltip("std:Q", title="tensor std", format=".4~g"),
                 alt.Tooltip("bad:Q", title="NaN/Inf (not binned)")],
    ).properties(width=440, height=step)
    ridges = alt.FacetChart(
        data=data, spec=area,
        facet=alt.FacetMapping(row=alt.Row(
            "name:N", title=None, sort=alt.EncodingSortField(field="t", op="min"),
            header=alt.Header(labelAngle=0, labelAlign="left", labelLimit=260, labelPadding=4,
                              labelFontSize=10))),
        spacing=0, bounds="flush",
    ).transform_flatten(fields).transform_lookup(
        lookup="t", from_=alt.LookupData(data=labels, key="t", fields=["name", "std", "bad"]))
    where = f" of {ref}" if ref else ""
    lines = [("name", f"Distributions{where}"),
             ("info", f"{len(chosen)} tensors in model order; each ridge: one tensor's finite "
                      f"values in {bins} bins over its own range, scaled to its peak"),
             ("info", "fill: the tensor's std; NaN/Inf are counted in the tooltips")]
    return alt.vconcat(header_chart(lines), ridges, spacing=4).properties(usermeta={
        "weightatlas": {"view": "ridgeline", "tensors": len(chosen), "bins": bins,
                        "range": [lo, hi]}})
