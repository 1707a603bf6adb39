"""Charts of projections and training trajectories: neurons as points (PCA, t-SNE, UMAP), each
tensor's updates over training steps, and a model's path through weight space.

They draw the tables of :func:`weightatlas.core.projection`, :func:`weightatlas.core.trajectory`
and :func:`weightatlas.core.trajectory_pca`; ``weightatlas.viz._views`` computes those tables
from a snapshot for :data:`weightatlas.viz.VIEWS` (``weightatlas plot``).
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from weightatlas.errors import FormatError, UnsupportedError
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    SEQUENTIAL_SCHEME,
    fit_budget,
    header_chart,
    header_layers,
    inline_data,
    inline_values,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["TRAJECTORY_METRICS", "projection_chart", "trajectory_chart", "trajectory_path"]

#: Columns of a trajectory table :func:`trajectory_chart` can draw.
TRAJECTORY_METRICS = ("relative_update", "update_norm", "update_cosine", "norm",
                      "distance_from_init", "relative_distance")
_TITLES = {"relative_update": "relative update", "update_norm": "update norm",
           "update_cosine": "cosine of successive updates", "norm": "norm",
           "distance_from_init": "distance from initialisation",
           "relative_distance": "relative distance from initialisation"}
_FORMULAS = {"relative_update": "||W_t − W_t−1|| / ||W_t−1||",
             "update_norm": "||W_t − W_t−1||", "update_cosine": "cos(W_t − W_t−1, W_t−1 − W_t−2)",
             "norm": "||W_t||", "distance_from_init": "||W_t − W_0||",
             "relative_distance": "||W_t − W_0|| / ||W_0||"}
_METHODS = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
_SAFE = re.compile(r"[A-Za-z0-9_]{1,24}")
_ALERT = "#B00020"


def _meta_of(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"weightatlas")
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError as e:
        raise FormatError(f"the table's weightatlas metadata is not JSON: {e}") from e
    return doc if isinstance(doc, dict) else {}


def _need(table: pa.Table, columns: tuple[str, ...], what: str, source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FormatError(f"{what}: the table lacks column(s) {', '.join(missing)}; it needs "
                          f"{', '.join(columns)} (as {source} gives)")


def _names_line(names: list[str], what: str) -> str:
    shown = ", ".join(names[:3]) + (f", … ({len(names):,} in all)" if len(names) > 3 else "")
    return f"{what}: {shown}"


# ---- neuron projections ---------------------------------------------------------------------


def projection_chart(
    table: pa.Table,
    *,
    color: str = "tensor",
    max_points: int = 5000,
    bins: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """Neurons as points: a table of :func:`weightatlas.core.projection` drawn as a scatter.

    Each point is one neuron (a row of a weight); its tooltip gives the tensor, the neuron's
    index and the L2 norm of its weights. Above ``max_points`` points they are counted in a
    ``bins x bins`` 2-d histogram instead (never sampled), and the header says so.

    Args:
        table: A projection table (``tensor``, ``index``, ``x``, ``y``, ``norm``...).
        color: ``"tensor"``, ``"cluster"``, or any other column: text and integers are
            categories, floats a sequential scale.
        max_points: Most points drawn one by one.
        bins: Bins per axis when binned.
        max_bytes: Budget of the spec.

    Raises:
        FormatError: A table without the needed columns or the ``color`` column.

    Example:
        >>> t = pa.table({"tensor": ["fc", "fc"], "index": [0, 1], "x": [0.0, 1.0],
        ...               "y": [1.0, 0.0], "norm": [1.0, 2.0]})
        >>> m = wa.viz.projection_chart(t).to_dict()["usermeta"]["weightatlas"]
        >>> m["points"], m["binned"], m["color"]
        (2, False, 'tensor')
    """
    _need(table, ("tensor", "index", "x", "y", "norm"), "projection_chart",
          "weightatlas.core.projection")
    if color not in table.column_names:
        hint = " (projection(..., clusters=K) adds it)" if color == "cluster" else ""
        raise FormatError(f"projection_chart: no column {color!r} to colour by{hint}; the "
                          f"table has {', '.join(table.column_names)}")
    meta = _meta_of(table)
    method = str(meta.get("method", "pca"))
    label = _METHODS.get(method, "projection")
    n = table.num_rows
    xs = table.column("x").to_numpy(zero_copy_only=False).astype(np.float64)
    ys = table.column("y").to_numpy(zero_copy_only=False).astype(np.float64)
    tensors = [str(t) for t in table.column("tensor").to_pylist()]
    order = list(dict.fromkeys(tensors))
    position = {t: i for i, t in enumerate(order)}
    skipped = int(meta.get("skipped_rows", 0))
    facts = {k: float(v) for k, v in meta.items() if k.startswith(("explained_variance_",
                                                                    "pca_variance_kept"))}
    axes = [f"{label} {k}" for k in (1, 2)]
    if method == "pca":
        axes = [f"PC{k} ({facts[f'explained_variance_{k}']:.1%} of variance)"
                if f"explained_variance_{k}" in facts else f"PC{k}" for k in (1, 2)]
    head = [("name", f"{label} of {n:,} neurons (rows of the weights)"),
            ("info", _names_line(order, f"{len(order)} tensor(s)"))]
    if "pca_variance_kept" in facts:
        head.append(("info", f"{label} after a PCA to 50 dimensions keeping "
                             f"{facts['pca_variance_kept']:.1%} of the variance"))
    head.append(("alert" if skipped else "info",
                 f"{skipped:,} row(s) with NaN or Inf left out" if skipped
                 else "no rows left out (all finite)"))
    kind = "tensor" if color == "tensor" else "cluster" if color == "cluster" else "column"
    column = table.column(color)
    quantitative = pa.types.is_floating(column.type)
    values = column.to_pylist()
    base_meta = {"view": "projection", "method": method, "points": n, "skipped_rows": skipped,
                 "color": kind, "facts": facts}
    title = color if _SAFE.fullmatch(color) else "colour"

    def build(cells: int) -> alt.LayerChart:
        if n <= max_points and cells >= n:
            data: dict[str, Any] = {
                "t": [position[t] for t in tensors],
                "tensor": tensors, "index": table.column("index").to_pylist(),
                "x": numbers(xs), "y": numbers(ys),
                "norm": numbers(table.column("norm").to_numpy(zero_copy_only=False)),
            }
            if kind != "tensor":
                data["c"] = numbers(values) if quantitative else [
                    None if v is None else str(v) for v in values]
            return _points(data, kind, quantitative, title, axes, head,
                           {**base_meta, "binned": False})
        return _binned(xs, ys, max(2, math.isqrt(cells)), axes, head, base_meta)

    return fit_budget(build, n if n <= max_points else bins * bins, max_bytes,  # type: ignore[return-value]
                      "projection_chart")


def _points(data: dict[str, Any], kind: str, quantitative: bool, title: str, axes: list[str],
            head: list[tuple[str, str]], meta: dict[str, Any]) -> alt.LayerChart:
    import altair as alt

    if kind == "tensor":
        color: Any = alt.Color("tensor:N", title="tensor", scale=alt.Scale(scheme="tableau10"),
                               sort=alt.EncodingSortField(field="t", op="min"),
                               legend=alt.Legend(labelLimit=240))
    elif quantitative:
        color = alt.Color("c:Q", title=title, scale=alt.Scale(scheme=SEQUENTIAL_SCHEME),
                          legend=alt.Legend(format=".3~g"))
    else:
        color = alt.Color("c:N", title=title, scale=alt.Scale(scheme="tableau10"))
    tips = [alt.Tooltip("tensor:N", title="tensor"), alt.Tooltip("index:Q", title="neuron"),
            alt.Tooltip("norm:Q", title="L2 norm", format=".6~g"),
            alt.Tooltip("x:Q", title=axes[0].split(" (")[0], format=".4~g"),
            alt.Tooltip("y:Q", title=axes[1].split(" (")[0], format=".4~g")]
    if kind != "tensor":
        tips.insert(2, alt.Tooltip("c:Q" if quantitative else "c:N", title=title))
    points = inline_data(data).mark_circle(size=24, opacity=0.75).encode(
        x=alt.X("x:Q", title=axes[0], scale=alt.Scale(zero=False)),
        y=alt.Y("y:Q", title=axes[1], scale=alt.Scale(zero=False)),
        color=color, tooltip=tips,
    ).properties(width=380, height=380)
    return cast("alt.LayerChart", alt.layer(points, *header_layers(head)).properties(
        usermeta={"weightatlas": meta}))


def _binned(xs: np.ndarray, ys: np.ndarray, bins: int, axes: list[str],
            head: list[tuple[str, str]], meta: dict[str, Any]) -> alt.LayerChart:
    import altair as alt

    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    ex = np.histogram_bin_edges(xs, bins=bins, range=(x0, x1) if x1 > x0 else (x0 - .5, x0 + .5))
    ey = np.histogram_bin_edges(ys, bins=bins, range=(y0, y1) if y1 > y0 else (y0 - .5, y0 + .5))
    counts = np.histogram2d(xs, ys, bins=(ex, ey))[0].astype(np.int64)
    ix, iy = np.nonzero(counts)
    cells = inline_data({"x0": numbers(ex[ix]), "x1": numbers(ex[ix + 1]),
                         "y0": numbers(ey[iy]), "y1": numbers(ey[iy + 1]),
                         "n": counts[ix, iy]}).mark_rect().encode(
        x=alt.X("x0:Q", title=axes[0], scale=alt.Scale(domain=[ex[0], ex[-1]], nice=False,
                                                       zero=False)),
        x2=alt.X2("x1:Q"),
        y=alt.Y("y0:Q", title=axes[1], scale=alt.Scale(domain=[ey[0], ey[-1]], nice=False,
                                                       zero=False)),
        y2=alt.Y2("y1:Q"),
        color=alt.Color("n:Q", title="neurons in bin",
                        scale=alt.Scale(type="log", scheme=SEQUENTIAL_SCHEME)),
        tooltip=[alt.Tooltip("x0:Q", title="x from", format=".4~g"),
                 alt.Tooltip("x1:Q", title="x to", format=".4~g"),
                 alt.Tooltip("y0:Q", title="y from", format=".4~g"),
                 alt.Tooltip("y1:Q", title="y to", format=".4~g"),
                 alt.Tooltip("n:Q", title="neurons", format=",")],
    ).properties(width=380, height=380)
    lines = [*head, ("info", f"binned: {int(counts.sum()):,} neurons in {bins}×{bins} bins "
                             "(colour: count, log scale); raise max_points to see each one")]
    return cast("alt.LayerChart", alt.layer(cells, *header_layers(lines)).properties(
        usermeta={"weightatlas": {**meta, "binned": True, "bins": bins,
                                  "counts": int(counts.sum())}}))


# ---- training trajectories ------------------------------------------------------------------


def trajectory_chart(
    table: pa.Table,
    *,
    metric: str = "relative_update",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.VConcatChart:
    """One line per tensor over training steps: a column of :func:`weightatlas.core.trajectory`.

    The y axis is logarithmic when every value is positive and they span a decade or more
    (never for ``update_cosine``). Rows whose status is not ``ok`` or ``first`` (missing, NaN
    or Inf, resumed after a gap, shape changed) are red crosses in a strip below the lines,
    and counted in the header.

    Args:
        table: A trajectory table.
        metric: One of :data:`TRAJECTORY_METRICS`.
        max_bytes: Budget of the spec.

    Raises:
        UnsupportedError: An unknown metric.
        FormatError: A table without the needed columns.

    Example:
        >>> t = pa.table({"tensor": ["w", "w", "w"], "step": [0, 1, 2],
        ...               "relative_update": [None, 0.5, 0.05],
        ...               "status": ["first", "ok", "ok"]})
        >>> m = wa.viz.trajectory_chart(t).to_dict()["usermeta"]["weightatlas"]
        >>> m["log"], m["values"]
        (True, [None, 0.5, 0.05])
    """
    if metric not in TRAJECTORY_METRICS:
        raise UnsupportedError(f"trajectory_chart: metric={metric!r}; expected one of "
                               f"{', '.join(TRAJECTORY_METRICS)}")
    _need(table, ("tensor", "step", metric, "status"), "trajectory_chart",
          "weightatlas.core.trajectory")
    cols = table.select(["tensor", "step", metric, "status"]).to_pydict()
    values = [None if v is None or not math.isfinite(v) else float(v) for v in cols[metric]]
    names = [str(t) for t in cols["tensor"]]
    order = list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(order)}
    status = [str(s) for s in cols["status"]]
    odd = [i for i, s in enumerate(status) if s not in ("ok", "first")]
    drawn = [v for v in values if v is not None]
    log = (metric != "update_cosine" and bool(drawn) and min(drawn) > 0
           and max(drawn) >= 10 * min(drawn))
    steps = [s for s in cols["step"] if s is not None]
    head = [("name", f"{_TITLES[metric].capitalize()} of each tensor over training"),
            ("info", f"{_FORMULAS[metric]} (Frobenius norms); {len(order):,} tensors × "
                     f"{len(set(steps)):,} steps; {len(drawn):,} values drawn"
                     f"{' on a log scale' if log else ''}")]
    if odd:
        by: dict[str, int] = {}
        for i in odd:
            by[status[i]] = by.get(status[i], 0) + 1
        head.append(("alert", "not comparable, red × below: " + ", ".join(
            f"{v:,} {k}" for k, v in sorted(by.items()))))
    meta = {"view": "trajectory", "metric": metric, "log": log, "tensors": len(order),
            "steps": sorted(set(steps)), "values": values, "odd": len(odd)}
    data = {"t": [index[n] for n in names], "tensor": names, "step": cols["step"],
            "v": numbers([np.nan if v is None else v for v in values]), "status": status}

    def build(_: int) -> alt.VConcatChart:
        return _lines(data, odd, len(order), metric, log, head, meta)

    return fit_budget(build, len(names), max_bytes, "trajectory_chart")  # type: ignore[return-value]


def _lines(data: dict[str, Any], odd: list[int], n_tensors: int, metric: str, log: bool,
           head: list[tuple[str, str]], meta: dict[str, Any]) -> alt.VConcatChart:
    import altair as alt

    values, fields = inline_values(data)
    steps = [s for s in data["step"] if s is not None]
    xs = alt.Scale(domain=[min(steps), max(steps)], nice=False, zero=False) if steps \
        else alt.Scale()
    x = alt.X("step:Q", title="step", scale=xs, axis=alt.Axis(format="~s", tickMinStep=1))
    tips = [alt.Tooltip("tensor:N", title="tensor"), alt.Tooltip("step:Q", title="step"),
            alt.Tooltip("v:Q", title=metric.replace("_", " "), format=".4~g"),
            alt.Tooltip("status:N", title="status")]
    legend = alt.Legend(labelLimit=240) if n_tensors <= 20 else None
    lines = alt.Chart(values).transform_flatten(fields).transform_filter(
        "isValid(datum.v)" + (" && datum.v > 0" if log else "")).mark_line(
        point=alt.OverlayMarkDef(size=20), strokeWidth=1.3, opacity=0.85).encode(
        x=x, y=alt.Y("v:Q", title=_FORMULAS[metric] + (" (log)" if log else ""),
                     scale=alt.Scale(type="log") if log else alt.Scale(zero=False),
                     axis=alt.Axis(format=".2~g")),
        color=alt.Color("tensor:N", title="tensor", scale=alt.Scale(scheme="tableau10"),
                        sort=alt.EncodingSortField(field="t", op="min"), legend=legend),
        detail=alt.Detail("t:N"), tooltip=tips,
    ).properties(width=460, height=260)
    panels: list[Any] = [header_chart(head), lines]
    if odd:
        strip = alt.Chart(values).transform_flatten(fields).transform_filter(
            "datum.status != 'ok' && datum.status != 'first'").mark_point(
            shape="cross", angle=45, color=_ALERT, size=60, filled=True, opacity=1).encode(
            x=x, y=alt.Y("status:N", title=None), tooltip=tips,
        ).properties(width=460)
        panels.append(strip)
    return alt.vconcat(*panels, spacing=6).properties(usermeta={"weightatlas": meta})


def trajectory_path(
    table: pa.Table,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """A model's path through weight space: a :func:`weightatlas.core.trajectory_pca` table
    drawn over its first two components, in step order, each snapshot labelled.

    Args:
        table: A trajectory PCA table (``ref``, ``step``, ``tag``, ``pc1``, ``pc2``).
        max_bytes: Budget of the spec.

    Raises:
        FormatError: A table without the needed columns.

    Example:
        >>> t = pa.table({"ref": ["m@0", "m@1"], "step": [0, 1], "tag": [None, None],
        ...               "pc1": [-1.0, 1.0], "pc2": [0.0, 0.0]})
        >>> wa.viz.trajectory_path(t).to_dict()["usermeta"]["weightatlas"]["labels"]
        ['0', '1']
    """
    _need(table, ("ref", "step", "tag", "pc1"), "trajectory_path",
          "weightatlas.core.trajectory_pca")
    meta_in = _meta_of(table)
    cols = table.to_pydict()
    n = table.num_rows
    pc2 = cols.get("pc2") or [0.0] * n
    labels = [str(s) if s is not None else str(t) for s, t in
              zip(cols["step"], cols["tag"], strict=True)]
    ratio = [float(r) for r in meta_in.get("explained_variance_ratio", [])]
    used = [str(t) for t in meta_in.get("tensors", [])]
    excluded = meta_in.get("excluded", {})
    excluded = excluded if isinstance(excluded, dict) else {}
    axes = [f"PC{k} ({ratio[k - 1]:.1%} of variance)" if len(ratio) >= k else f"PC{k}"
            for k in (1, 2)]
    head = [("name", f"Path through weight space of {n} snapshots"),
            ("info", f"PCA of each snapshot's flattened weights ({len(used):,} tensors), in "
                     "step order; labels: steps (or tags)")]
    if excluded:
        head.append(("alert", _names_line([str(k) for k in excluded],
                                          f"{len(excluded):,} tensor(s) left out (missing, "
                                          "changed shape or NaN/Inf)")))
    meta = {"view": "trajectory_path", "snapshots": n, "labels": labels,
            "pc1": numbers(cols["pc1"]), "pc2": numbers(pc2), "explained_variance_ratio": ratio,
            "tensors": len(used), "excluded": len(excluded)}
    data = {"o": list(range(n)), "ref": cols["ref"], "label": labels,
            "pc1": numbers(cols["pc1"]), "pc2": numbers(pc2)}

    def build(_: int) -> alt.LayerChart:
        import altair as alt

        base = inline_data(data)
        x = alt.X("pc1:Q", title=axes[0], scale=alt.Scale(zero=False))
        y = alt.Y("pc2:Q", title=axes[1], scale=alt.Scale(zero=False))
        path = base.mark_line(color="#999999", strokeWidth=1.2).encode(
            x=x, y=y, order=alt.Order("o:Q"))
        tips = [alt.Tooltip("ref:N", title="snapshot"), alt.Tooltip("o:Q", title="order"),
                alt.Tooltip("pc1:Q", title="PC1", format=".4~g"),
                alt.Tooltip("pc2:Q", title="PC2", format=".4~g")]
        dots = base.mark_circle(size=60, opacity=1).encode(
            x=x, y=y, tooltip=tips,
            color=alt.Color("o:Q", title="order", scale=alt.Scale(scheme=SEQUENTIAL_SCHEME),
                            legend=None))
        text = base.mark_text(align="left", dx=6, dy=-6, fontSize=10, color="#333333").encode(
            x=x, y=y, text=alt.Text("label:N"))
        return cast("alt.LayerChart", alt.layer(path, dots, text, *header_layers(head))
                    .properties(width=380, height=320, usermeta={"weightatlas": meta}))

    return fit_budget(build, n, max_bytes, "trajectory_path")  # type: ignore[return-value]
