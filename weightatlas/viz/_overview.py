"""Model overview: one row per tensor in model order, with its size, norm, std, largest
magnitude, sparsity and NaN/Inf count, filterable by kind."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from weightatlas.errors import FormatError, NotFoundError
from weightatlas.storage import KINDS, Snapshot
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    fit_budget,
    header_chart,
    inline_values,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["OVERVIEW_COLUMNS", "overview", "overview_table"]

#: Columns an overview needs from a table of tensor statistics (as ``Snapshot.tensors()``).
OVERVIEW_COLUMNS = ("name", "kind", "numel", "l2", "std", "abs_max", "frac_zero", "n_nan",
                    "n_inf")
_OPTIONAL = ("dtype", "shape", "mean", "min", "max")
#: (field, panel title, scale type, format). Norms and magnitudes span decades across a
#: model (a step counter of 1e5 beside weights of 1e-2), so they are on log axes; a zero (an
#: all-zero bias) has no bar there, and shows as 100 % in the zeros panel.
_PANELS = (("numel", "values (log)", "log", "~s"), ("l2", "L2 norm (log)", "log", ".1~e"),
           ("std", "std (log)", "log", ".1~e"), ("abs_max", "max |w| (log)", "log", ".1~e"),
           ("frac_zero", "zeros (fraction)", "linear", ".0%"),
           ("bad", "NaN + Inf", "linear", ",d"))


def overview_table(source: Snapshot | pa.Table, kinds: Sequence[str] | None = None) -> pa.Table:
    """One row per tensor in model order with the overview's statistics.

    Args:
        source: A snapshot, or a table with at least :data:`OVERVIEW_COLUMNS` (a table of
            snapshot rows with a ``chunk`` column keeps ``chunk == 0``).
        kinds: Keep only these kinds.

    Raises:
        FormatError: The table lacks a column.

    Example:
        >>> t = pa.table({"name": ["a"], "kind": ["linear"], "numel": [4], "l2": [2.0],
        ...               "std": [1.0], "abs_max": [1.0], "frac_zero": [0.0], "n_nan": [0],
        ...               "n_inf": [0]})
        >>> overview_table(t).num_rows
        1
    """
    table = source.tensors() if isinstance(source, Snapshot) else source
    missing = [c for c in OVERVIEW_COLUMNS if c not in table.column_names]
    if missing:
        raise FormatError(f"overview: the table lacks column(s) {', '.join(missing)}; it needs "
                          f"{', '.join(OVERVIEW_COLUMNS)} (as Snapshot.tensors() gives)")
    if "chunk" in table.column_names:
        table = table.filter(pc.equal(table["chunk"], 0))
    if kinds is not None:
        table = table.filter(pc.is_in(table["kind"], pa.array(list(kinds), pa.string())))
    keep = list(OVERVIEW_COLUMNS) + [c for c in _OPTIONAL if c in table.column_names]
    return table.select(keep)


def overview(
    snapshot: Snapshot | pa.Table,
    *,
    kinds: Sequence[str] | None = None,
    links: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    row_height: int = 14,
) -> alt.VConcatChart:
    """One row per tensor in model order: values, L2 norm, std, largest magnitude, fraction of
    zeros and NaN + Inf count, bars coloured by kind, with a drop-down that filters by kind.

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or a table of per-tensor
            statistics (:data:`OVERVIEW_COLUMNS`, e.g. ``Snapshot.tensors()`` or core's).
        kinds: Show only these kinds.
        links: Make each row a link to ``#t-<row>`` (the report's per-tensor sections).
        max_bytes: Budget of the spec.
        row_height: Pixels per tensor.

    Raises:
        NotFoundError: No tensor left to show.
        FormatError: A table without the needed columns.

    Example:
        >>> w = np.ones((2, 3), np.float32)
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> snap = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "m", step=0)
        >>> wa.viz.overview(snap).to_dict()["usermeta"]["weightatlas"]["tensors"]
        1
    """

    table = overview_table(snapshot, kinds)
    n = table.num_rows
    if n == 0:
        raise NotFoundError(f"overview: no tensors to show (kinds={list(kinds or [])})")
    cols = table.to_pydict()
    present = sorted(set(cols["kind"]) & set(KINDS), key=KINDS.index)
    data: dict[str, Any] = {
        "i": list(range(n)), "name": cols["name"], "kind": cols["kind"],
        "numel": cols["numel"], "l2": numbers(cols["l2"]), "std": numbers(cols["std"]),
        "abs_max": numbers(cols["abs_max"]), "frac_zero": numbers(cols["frac_zero"]),
        "bad": [a + b for a, b in zip(cols["n_nan"], cols["n_inf"], strict=True)],
    }
    if "shape" in cols:
        data["shape"] = ["×".join(map(str, s)) or "scalar" for s in cols["shape"]]
    if "dtype" in cols:
        data["dtype"] = cols["dtype"]
    if links:
        data["href"] = [f"#t-{i}" for i in range(n)]
    ref = snapshot.ref if isinstance(snapshot, Snapshot) else None

    def build(_: int) -> alt.VConcatChart:
        return _chart(data, present, ref, n, row_height, links)

    return fit_budget(build, n, max_bytes, "overview")  # type: ignore[return-value]


def _chart(data: dict[str, Any], present: list[str], ref: str | None, n: int, row_height: int,
           links: bool) -> alt.VConcatChart:
    import altair as alt

    values, fields = inline_values(data)
    pick = alt.param(name="kind_filter", value="all", bind=alt.binding_select(
        options=["all", *present], name="kind: "))
    tips = [alt.Tooltip("name:N", title="tensor"), alt.Tooltip("kind:N", title="kind")]
    if "dtype" in data:
        tips.append(alt.Tooltip("dtype:N", title="dtype"))
    if "shape" in data:
        tips.append(alt.Tooltip("shape:N", title="shape"))
    tips += [alt.Tooltip("numel:Q", title="values", format=","),
             alt.Tooltip("l2:Q", title="L2 norm", format=".6~g"),
             alt.Tooltip("std:Q", title="std", format=".6~g"),
             alt.Tooltip("abs_max:Q", title="max |w|", format=".6~g"),
             alt.Tooltip("frac_zero:Q", title="zeros", format=".2%"),
             alt.Tooltip("bad:Q", title="NaN + Inf")]
    y_sort = alt.EncodingSortField(field="i", op="min")
    panels = []
    for k, (field, title, scale_type, form) in enumerate(_PANELS):
        positive = [v for v in data[field] if v is not None and v > 0]
        if scale_type == "log" and not positive:
            scale_type, title = "linear", title.replace(" (log)", "")
        y = alt.Y("name:N", sort=y_sort, title=None,
                  axis=alt.Axis(labelLimit=280, labelFontSize=10) if k == 0 else None)
        color: Any = (alt.ColorValue("#B00020") if field == "bad" else
                      alt.Color("kind:N", title="kind", scale=alt.Scale(scheme="tableau10")))
        shown = field
        base = alt.Chart()
        if field == "frac_zero":
            scale = alt.Scale(domain=[0, 1])
        elif scale_type == "log":  # zeros have no place on a log axis: leave them out
            floor = 10.0 ** math.floor(math.log10(min(positive)))
            scale = alt.Scale(type="log", domain=[floor, max(positive)])
            shown = f"{field}_log"
            base = base.transform_calculate(**{shown: f"datum.{field} > 0 ? datum.{field} : null"})
        else:
            scale = alt.Scale()
        enc: dict[str, Any] = {
            "x": alt.X(f"{shown}:Q", title=title, scale=scale,
                       axis=alt.Axis(format=form, labelOverlap=True, orient="top")),
            "y": y, "color": color, "tooltip": tips}
        if scale_type == "log":  # log bars start a decade below the smallest positive value
            enc["x2"] = alt.X2(datum=floor)
        if links:
            enc["href"] = alt.Href("href:N")
        mark = base.mark_bar(cursor="pointer" if links else "default")
        panels.append(mark.encode(**enc).properties(width=110 if k else 130,
                                                    height=row_height * n))
    body = alt.hconcat(*panels, data=values, spacing=6).transform_flatten(fields)\
        .add_params(pick).transform_filter("kind_filter == 'all' || datum.kind == kind_filter")
    lines = [("name", f"Overview of {ref}" if ref else "Overview"),
             ("info", f"{n} tensors in model order; pick a kind to filter"
                      + ("; click a bar to open the tensor's section" if links else ""))]
    return alt.vconcat(header_chart(lines), body, spacing=4).properties(usermeta={
        "weightatlas": {"view": "overview", "tensors": n, "kinds": present, "links": links}})
