"""Comparing two snapshots (or two arrays): per-tensor agreement, the difference heatmap of a
tensor pair, and a scatter of A's weights against B's (binned for large tensors).

Which tensor of A goes with which of B is an *alignment* (see :mod:`weightatlas.viz._pairs`);
without one, tensors are matched by equal names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from weightatlas.errors import FormatError, NotFoundError, ShapeError
from weightatlas.storage import Snapshot
from weightatlas.viz._heatmap import heatmap_of
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._pairs import check_alignment, compare, normalize
from weightatlas.viz._reduce import as_float, joint_histogram
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CELLS,
    SEQUENTIAL_SCHEME,
    diverging_scale,
    fit_budget,
    header_chart,
    header_layers,
    inline_data,
    inline_values,
    numbers,
    symmetric_extent,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["agreement", "diff", "scatter"]

def agreement(
    a: Snapshot | pa.Table | Any,
    b: Snapshot | None = None,
    *,
    alignment: pa.Table | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    row_height: int = 14,
) -> alt.VConcatChart:
    """Per-tensor agreement of two snapshots: relative L2 difference ``||b-a||/||a||`` (log
    axis), cosine similarity and max ``|b - a|``, one row per aligned pair in A's order.

    Args:
        a: Snapshot A, or a table of compared pairs (from :func:`compare`, or the pairs of
            ``weightatlas.core.compare``: the alignment's columns with ``rel_l2``, ``cosine``
            and ``max_abs_diff``), or an object with such a table as ``.pairs`` (core's
            ``Comparison``); then ``b`` is not given.
        b: Snapshot B.
        alignment: Pairs to compare (default: equal names).
        max_bytes: Budget of the spec.
        row_height: Pixels per pair.

    Raises:
        NotFoundError: No pair to show.

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> a = store.write(RecordsSource([TensorRecord("x", np.array([3., 0.]))]), "m", step=1)
        >>> b = store.write(RecordsSource([TensorRecord("x", np.array([3., 4.]))]), "m", step=2)
        >>> wa.viz.agreement(a, b).to_dict()["usermeta"]["weightatlas"]["pairs"]
        1
    """
    import altair as alt

    if isinstance(a, Snapshot):
        if b is None:
            raise NotFoundError("agreement: give two snapshots, or one table from compare()")
        table = compare(a, b, alignment)
        title = f"Agreement of {a.ref} (A) and {b.ref} (B)"
    else:
        title = "Agreement"
        if not isinstance(a, pa.Table) and isinstance(getattr(a, "pairs", None), pa.Table):
            if isinstance(getattr(a, "a", None), str) and isinstance(getattr(a, "b", None), str):
                title = f"Agreement of {a.a} (A) and {a.b} (B)"
            a = a.pairs
        if not isinstance(a, pa.Table):
            raise FormatError(f"agreement: expected two snapshots or a table of compared pairs, "
                              f"got {type(a).__name__}")
        table = normalize(a)
        check_alignment(table)
        lacking = [c for c in ("rel_l2", "cosine", "max_abs_diff") if c not in table.column_names]
        if lacking:
            raise FormatError(f"agreement: the table lacks column(s) {', '.join(lacking)}")
        if "status" not in table.column_names:
            status = next((c for c in ("verdict", "note") if c in table.column_names), None)
            table = table.append_column("status", table[status] if status else
                                        pa.array(["ok"] * table.num_rows, pa.string()))
    if table.num_rows == 0:
        raise NotFoundError("agreement: no aligned tensor pairs to compare")
    cols = table.to_pydict()
    n = table.num_rows
    label = [an if an == bn else f"{an} → {bn}" for an, bn in zip(cols["a_name"], cols["b_name"],
                                                                  strict=True)]
    data = {"i": list(range(n)), "label": label, "method": cols["method"],
            "confidence": numbers(cols["confidence"]), "rel": numbers(cols["rel_l2"]),
            "cos": numbers(cols["cosine"]), "dmax": numbers(cols["max_abs_diff"]),
            "status": cols["status"]}
    lines = [("name", title), ("info", f"{n} aligned pairs in A's order; relative difference "
                                       "||B−A|| / ||A||, cosine similarity, max |B−A|")]

    def build(_: int) -> alt.VConcatChart:
        values, fields = inline_values(data)
        tips = [alt.Tooltip("label:N", title="pair"), alt.Tooltip("method:N", title="matched by"),
                alt.Tooltip("confidence:Q", title="confidence", format=".3~g"),
                alt.Tooltip("rel:Q", title="||B−A|| / ||A||", format=".4~g"),
                alt.Tooltip("cos:Q", title="cosine", format=".6~g"),
                alt.Tooltip("dmax:Q", title="max |B−A|", format=".4~g"),
                alt.Tooltip("status:N", title="status")]
        y_sort = alt.EncodingSortField(field="i", op="min")
        panels = []
        positive = [r for r in data["rel"] if r is not None and r > 0]
        floor = 10.0 ** math.floor(math.log10(min(positive))) if positive else None
        specs: list[tuple[str, str, Any, Any]] = [
            ("rel", "||B−A|| / ||A|| (log)" if floor else "||B−A|| / ||A||",
             alt.Scale(type="log") if floor else alt.Scale(), floor),
            ("cos", "cosine similarity", alt.Scale(domain=[-1, 1]), None),
            ("dmax", "max |B−A|", alt.Scale(), None)]
        for k, (field, axis_title, scale, base) in enumerate(specs):
            enc: dict[str, Any] = {} if base is None else {"x2": alt.X2(datum=base)}
            panels.append(alt.Chart().mark_bar().encode(
                **enc,
                x=alt.X(f"{field}:Q", title=axis_title, scale=scale,
                        axis=alt.Axis(orient="top", labelOverlap=True, format=".2~g")),
                y=alt.Y("label:N", sort=y_sort, title=None,
                        axis=alt.Axis(labelLimit=280) if k == 0 else None),
                color=alt.Color("method:N", title="matched by",
                                scale=alt.Scale(scheme="tableau10")),
                tooltip=tips).properties(width=150, height=row_height * n))
        body = alt.hconcat(*panels, data=values, spacing=6).transform_flatten(fields)
        return alt.vconcat(header_chart(lines), body, spacing=4).properties(usermeta={
            "weightatlas": {"view": "agreement", "pairs": n}})

    return fit_budget(build, n, max_bytes, "agreement")  # type: ignore[return-value]


def _pair_inputs(a: Snapshot | np.ndarray, b: Snapshot | np.ndarray, tensor: str | None,
                 alignment: pa.Table | None, view: str) -> tuple[TensorInput, TensorInput]:
    if isinstance(a, Snapshot) != isinstance(b, Snapshot):
        raise NotFoundError(f"{view}: give two snapshots or two arrays, not one of each")
    if isinstance(a, Snapshot) and isinstance(b, Snapshot):
        if tensor is None:
            raise NotFoundError(f"{view}: name the tensor of A to compare")
        b_name = tensor
        if alignment is not None:
            matches = [p["b_name"] for p in check_alignment(alignment) if p["a_name"] == tensor]
            if not matches:
                raise NotFoundError(f"{view}: the alignment pairs no tensor of {b.ref} with "
                                    f"{tensor!r} of {a.ref}")
            b_name = matches[0]
        ta, tb = resolve(a, tensor, None, view), resolve(b, b_name, None, view)
    else:
        ta = resolve(a, tensor or "A", None, view)
        tb = resolve(b, tensor or "B", None, view)
    if ta.shape != tb.shape:
        raise ShapeError(f"{view}: tensor {ta.name!r} has shape {list(ta.shape)} and "
                         f"{tb.name!r} has {list(tb.shape)}; a {view} needs equal shapes")
    return ta, tb


def _pair_lines(ta: TensorInput, tb: TensorInput) -> list[tuple[str, str]]:
    lines = [("name", ta.name)] if ta.name == tb.name else [("name", ta.name), ("name", tb.name)]
    where = f"A = {ta.ref}, B = {tb.ref}" if ta.ref and tb.ref else "A and B"
    return [*lines, ("info", f"{ta.describe()}; {where}")]


def diff(
    a: Snapshot | np.ndarray,
    b: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    alignment: pa.Table | None = None,
    agg: str = "maxabs",
    max_cells: int = DEFAULT_MAX_CELLS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    domain: float | None = None,
) -> alt.LayerChart:
    """Heatmap of ``B - A`` for one tensor pair, on the zero-centred Distill scale (pooled like
    :func:`heatmap`).

    Args:
        a: Snapshot A or an array.
        b: Snapshot B or an array of the same shape.
        tensor: The tensor of A (its partner in B comes from ``alignment``, else the same
            name); a label with arrays.
        alignment: Pairs A's tensors with B's (default: equal names).
        agg: ``"maxabs"`` or ``"mean"`` for pooled cells.
        max_cells: Most cells before pooling.
        max_bytes: Budget of the spec.
        domain: Half-width of the colour domain.

    Raises:
        ShapeError: The two tensors' shapes differ.

    Example:
        >>> spec = wa.viz.diff(np.zeros((2, 2)), np.eye(2), "w").to_dict()
        >>> spec["usermeta"]["weightatlas"]["domain"]
        [-1.0, 1.0]
    """
    ta, tb = _pair_inputs(a, b, tensor, alignment, "diff")
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, drawn black and counted
        delta = as_float(tb.array, tb.name).astype(np.float64) - as_float(ta.array, ta.name)
    td = TensorInput(name=ta.name, array=delta, layout=ta.layout, kind=ta.kind, dtype="float64",
                     ref=None)
    return heatmap_of(td, agg=agg, max_cells=max_cells, max_bytes=max_bytes, domain=domain,
                      legend="B − A", view="diff", lines=_pair_lines(ta, tb))


def scatter(
    a: Snapshot | np.ndarray,
    b: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    alignment: pa.Table | None = None,
    max_points: int = 2000,
    bins: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """A's weights against B's, with the line ``B = A``: one point per weight when there are
    at most ``max_points``, else a ``bins x bins`` 2-d histogram (counts on a log colour
    scale); pairs with a NaN or Inf are counted in the header.

    Args:
        a: Snapshot A or an array.
        b: Snapshot B or an array of the same shape.
        tensor: The tensor of A (see :func:`diff`).
        alignment: Pairs A's tensors with B's (default: equal names).
        max_points: Most points drawn one by one.
        bins: Bins per axis of the 2-d histogram.
        max_bytes: Budget of the spec.

    Example:
        >>> x = np.linspace(-1, 1, 10)
        >>> spec = wa.viz.scatter(x, 2 * x, "w").to_dict()
        >>> spec["usermeta"]["weightatlas"]["binned"]
        False
    """
    ta, tb = _pair_inputs(a, b, tensor, alignment, "scatter")
    x = as_float(ta.array, ta.name).reshape(-1)
    y = as_float(tb.array, tb.name).reshape(-1)
    if x.size <= max_points:
        def build(_: int) -> alt.LayerChart:
            return _points(ta, tb, x, y)
        return fit_budget(build, x.size, max_bytes, "scatter")  # type: ignore[return-value]

    def build_binned(k: int) -> alt.LayerChart:
        return _binned(ta, tb, x, y, max(2, math.isqrt(k)))

    return fit_budget(build_binned, bins * bins, max_bytes, "scatter")  # type: ignore[return-value]


def _diagonal(lo: float, hi: float) -> alt.Chart:
    import altair as alt


    return inline_data({"a": [lo, hi], "b": [lo, hi]}).mark_line(
        color="#888888", strokeDash=[4, 3], strokeWidth=1).encode(x=alt.X("a:Q"), y=alt.Y("b:Q"))


def _points(ta: TensorInput, tb: TensorInput, x: np.ndarray, y: np.ndarray) -> alt.LayerChart:
    import altair as alt

    ok = np.isfinite(x) & np.isfinite(y)
    both = np.concatenate([x[ok], y[ok]])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    with np.errstate(invalid="ignore"):
        delta = y.astype(np.float64) - x
    m = symmetric_extent(delta[ok])
    exact = ta.exact32 and tb.exact32
    points = inline_data({"k": np.arange(x.size), "a": numbers(x, exact), "b": numbers(y, exact),
                          "d": numbers(delta)}).mark_circle(size=18, opacity=0.8).encode(
        x=alt.X("a:Q", title="A", scale=alt.Scale(domain=[lo, hi], zero=False)),
        y=alt.Y("b:Q", title="B", scale=alt.Scale(domain=[lo, hi], zero=False)),
        color=alt.Color("d:Q", scale=diverging_scale(m), title="B − A",
                        legend=alt.Legend(format=".3~g")),
        tooltip=[alt.Tooltip("k:Q", title="flat index"),
                 alt.Tooltip("a:Q", title="A", format=".9~g"),
                 alt.Tooltip("b:Q", title="B", format=".9~g"),
                 alt.Tooltip("d:Q", title="B − A", format=".6~g")],
    ).properties(width=320, height=320)
    lines = [*_pair_lines(ta, tb), ("info", f"{int(ok.sum()):,} points, one per weight")]
    if not ok.all():
        lines.append(("alert", f"{int((~ok).sum()):,} pairs with NaN or Inf not drawn"))
    return cast("alt.LayerChart", alt.layer(_diagonal(lo, hi), points, *header_layers(lines))
                .properties(usermeta={"weightatlas": {
                    "view": "scatter", "binned": False, "points": int(ok.sum()),
                    "skipped": int((~ok).sum())}}))


def _binned(ta: TensorInput, tb: TensorInput, x: np.ndarray, y: np.ndarray,
            bins: int) -> alt.LayerChart:
    import altair as alt

    counts, edges, skipped = joint_histogram(x, y, bins)
    ia, ib = np.nonzero(counts)
    lo, hi = float(edges[0]), float(edges[-1])
    cells = inline_data({"a0": numbers(edges[ia]), "a1": numbers(edges[ia + 1]),
                         "b0": numbers(edges[ib]), "b1": numbers(edges[ib + 1]),
                         "n": counts[ia, ib]}).mark_rect().encode(
        x=alt.X("a0:Q", title="A", scale=alt.Scale(domain=[lo, hi], nice=False, zero=False)),
        x2=alt.X2("a1:Q"),
        y=alt.Y("b0:Q", title="B", scale=alt.Scale(domain=[lo, hi], nice=False, zero=False)),
        y2=alt.Y2("b1:Q"),
        color=alt.Color("n:Q", title="weights in bin",
                        scale=alt.Scale(type="log", scheme=SEQUENTIAL_SCHEME)),
        tooltip=[alt.Tooltip("a0:Q", title="A from", format=".6~g"),
                 alt.Tooltip("a1:Q", title="A to", format=".6~g"),
                 alt.Tooltip("b0:Q", title="B from", format=".6~g"),
                 alt.Tooltip("b1:Q", title="B to", format=".6~g"),
                 alt.Tooltip("n:Q", title="weights", format=",")],
    ).properties(width=320, height=320)
    total = int(counts.sum())
    lines = [*_pair_lines(ta, tb),
             ("info", f"binned: {total:,} weights in {bins}×{bins} bins (colour: count, log "
                      "scale)")]
    if skipped:
        lines.append(("alert", f"{skipped:,} pairs with NaN or Inf not counted"))
    return cast("alt.LayerChart", alt.layer(cells, _diagonal(lo, hi), *header_layers(lines))
                .properties(usermeta={"weightatlas": {
                    "view": "scatter", "binned": True, "bins": bins, "points": total,
                    "skipped": skipped, "range": [lo, hi]}}))
