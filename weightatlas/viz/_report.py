"""The model report: one self-contained offline HTML page with the overview, the
distributions, the power-law exponent of every weight matrix, an index of every tensor and a
section per tensor (its statistics, histogram, heatmap, eigenvalue spectrum for weight
matrices and, for convolutions, its strongest kernels), linked to each other.

The page stays light for models of thousands of tensors: charts are drawn only when they
come near the viewport, heatmaps share a byte budget (fewer cells each when there are many),
and specs are built without Altair's schema validation (the builders' specs are validated by
the tests).
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from weightatlas.core.spectrum import MATRIX_KINDS
from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import Snapshot
from weightatlas.viz._analyses import alphas_of, esd_of, tensor_spectrum
from weightatlas.viz._dist import histogram_of, ridgeline
from weightatlas.viz._export import chart_div, page
from weightatlas.viz._heatmap import heatmap_of
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._kernels import kernels_of
from weightatlas.viz._overview import overview
from weightatlas.viz._style import THEME, register_theme

if TYPE_CHECKING:
    import altair as alt

__all__ = ["DEFAULT_REPORT_BYTES", "report_html", "save_report"]

#: Default budget of all the chart specs in one report.
DEFAULT_REPORT_BYTES = 24_000_000
_CELL_BYTES = 48      # JSON bytes per pooled heatmap cell, roughly
_CHART_BYTES = 6_000  # JSON bytes of a heatmap spec without its cells, roughly

_CSS = """
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 0 0 4px; font-family: Menlo, Consolas, monospace;
     word-break: break-all; }
nav a, .links a { margin-right: 12px; }
.facts, .meta { color: #555; font-size: 12px; margin: 2px 0 8px; }
.bad { color: #b00020; font-weight: bold; }
section.tensor { border-top: 1px solid #eee; padding-top: 14px; margin-top: 18px; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
table.index { border-collapse: collapse; font-size: 12px; }
table.index td, table.index th { padding: 2px 8px; text-align: right;
  border-bottom: 1px solid #f0f0f0; }
table.index td:first-child, table.index th:first-child { text-align: left;
  font-family: Menlo, Consolas, monospace; word-break: break-all; }
"""


def _spec(chart: alt.TopLevelMixin) -> dict[str, Any]:
    import altair as alt

    with alt.theme.enable(THEME):
        out: dict[str, Any] = chart.to_dict(validate=False)
    return out


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else f"{v:,}"


def _facts(r: dict[str, Any]) -> str:
    shape = "×".join(map(str, r["shape"])) or "scalar"
    bad = r["n_nan"] + r["n_inf"]
    parts = [html.escape(r["kind"]), html.escape(r["dtype"]), shape, f"{r['numel']:,} values",
             f"mean {_num(r['mean'])}", f"std {_num(r['std'])}", f"min {_num(r['min'])}",
             f"max {_num(r['max'])}", f"max |w| {_num(r['abs_max'])}",
             f"L2 {_num(r['l2'])}", f"zeros {r['frac_zero']:.1%}"]
    text = " · ".join(parts)
    if bad:
        text += f' · <span class="bad">NaN {r["n_nan"]:,} · Inf {r["n_inf"]:,}</span>'
    return text


def report_html(
    snapshot: Snapshot,
    *,
    max_bytes: int = DEFAULT_REPORT_BYTES,
    heatmap_cells: int = 2048,
    bins: int = 40,
    kernels_top: int = 8,
    renderer: str = "canvas",
    spectra: bool = True,
    esd_bins: int = 40,
) -> str:
    """The report of one snapshot as a self-contained HTML page (JavaScript inlined).

    Args:
        snapshot: The snapshot to report on.
        max_bytes: Budget of all the chart specs; heatmaps get fewer cells to fit.
        heatmap_cells: Most cells per tensor heatmap.
        bins: Bins per histogram.
        kernels_top: Inputs shown per neuron in kernel views.
        renderer: ``"canvas"`` (fast for big pages) or ``"svg"``.
        spectra: Add the alpha of every weight matrix (a section of the page) and each
            matrix's eigenvalue spectrum (in its section); see :func:`weightatlas.viz.esd`.
        esd_bins: Bins per spectrum.

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.arange(12, dtype=np.float32).reshape(3, 4)
        >>> snap = store.write(RecordsSource([TensorRecord("</script>", w)]), "m", step=0)
        >>> page_ = wa.viz.report_html(snap)
        >>> "&lt;/script&gt;" in page_ and page_.count("</script") == page_.count("<script")
        True
    """
    register_theme()
    rows = snapshot.tensors().to_pylist()
    specs: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(NotFoundError):  # a snapshot without tensors has no overview
        specs["s-overview"] = _spec(overview(snapshot, links=True))
    with contextlib.suppress(NotFoundError):  # no floating tensor: no ridgeline
        specs["s-ridgeline"] = _spec(ridgeline(snapshot, bins=bins))
    sections: list[tuple[int, dict[str, Any], list[str]]] = []
    heat: list[tuple[int, Any]] = []
    fits: dict[str, list[Any]] = {k: [] for k in ("name", "kind", "alpha", "sigma",
                                                  "ks_distance", "n_evals", "status")}
    for i, r in enumerate(rows):
        ids = []
        if r["numel"] >= 2:  # one value is all in the facts line
            t = resolve(snapshot, r["name"], None, "report")
            specs[f"s-{i}-h"] = _spec(histogram_of(t, bins=bins, named=False))
            ids.append(f"s-{i}-h")
            if t.array.ndim >= 2:
                heat.append((i, t))
                ids.append(f"s-{i}-m")
            if spectra and _is_matrix(r):
                chart = _esd(t, r, fits, esd_bins)
                if chart is not None:
                    specs[f"s-{i}-e"] = _spec(chart)
                    ids.append(f"s-{i}-e")
            if t.is_conv and t.array.ndim == 4 and t.shape[2] * t.shape[3] > 1:
                specs[f"s-{i}-k"] = _spec(kernels_of(t, top=kernels_top, named=False))
                ids.append(f"s-{i}-k")
        sections.append((i, r, ids))
    if fits["name"]:
        specs["s-alphas"] = _spec(alphas_of(pa.table(fits), ref=snapshot.ref, conv="flatten"))
    used = sum(len(str(s)) for s in specs.values())
    if heat:
        each = (max_bytes - used) / len(heat) - _CHART_BYTES
        cells = int(max(64, min(heatmap_cells, each / _CELL_BYTES)))
        for i, t in heat:
            specs[f"s-{i}-m"] = _spec(heatmap_of(t, max_cells=cells, lines=[]))
    body = _body(snapshot, sections, "s-overview" in specs, "s-ridgeline" in specs,
                 "s-alphas" in specs)
    order: list[str] = [k for k in ("s-overview", "s-ridgeline", "s-alphas") if k in specs]
    order += [k for _, _, ids in sections for k in ids]
    return page(f"weightatlas report: {snapshot.ref}", body, {k: specs[k] for k in order},
                css=_CSS, renderer=renderer)


def _is_matrix(r: dict[str, Any]) -> bool:
    """A weight matrix, as :func:`weightatlas.core.spectrum` chooses them."""
    return r["kind"] in MATRIX_KINDS and len(r["shape"]) >= 2 and r["param"] != "bias"


def _esd(t: TensorInput, r: dict[str, Any], fits: dict[str, list[Any]], bins: int) -> Any:
    """The spectrum chart of one matrix (None when it has none), its fit added to ``fits``
    with the statuses of :func:`weightatlas.core.spectrum`."""
    chart, spec, status = None, None, "non-finite values"
    if not (r["n_nan"] or r["n_inf"]):
        try:
            spec = tensor_spectrum(t, "flatten")
        except ShapeError:  # a matrix without values
            status = "too small"
    if spec is not None:
        status = "ok" if spec.fit.ok else "fit failed"
        chart = esd_of(spec, t.shape, bins=bins)
    ok = status == "ok"
    fit = spec.fit if spec is not None else None
    for key, value in (("name", r["name"]), ("kind", r["kind"]),
                       ("alpha", fit.alpha if ok and fit else None),
                       ("sigma", fit.sigma if ok and fit else None),
                       ("ks_distance", fit.ks_distance if ok and fit else None),
                       ("n_evals", int(spec.evals.size) if spec is not None else None),
                       ("status", status)):
        fits[key].append(value)
    return chart


def _body(snapshot: Snapshot, sections: list[tuple[int, dict[str, Any], list[str]]],
          overview_ok: bool, ridges: bool, spectra: bool = False) -> str:
    meta = snapshot.metadata
    esc = html.escape
    out = [f"<header><h1>{esc(snapshot.ref)}</h1>",
           f'<p class="meta">{meta["n_tensors"]:,} tensors · {meta["n_params"]:,} values · '
           f'{esc(str(meta.get("framework")))} from {esc(str(meta.get("source_file")))} · '
           f'ingested {esc(str(meta.get("created", "")))} · report written '
           f'{time.strftime("%Y-%m-%d %H:%M", time.gmtime())} UTC</p>',
           '<nav><a href="#overview">Overview</a><a href="#distributions">Distributions</a>'
           + ('<a href="#spectra">Spectra</a>' if spectra else "")
           + '<a href="#index">Index</a><a href="#tensors">Tensors</a></nav></header>']
    bad = [(i, r) for i, r, _ in sections if r["n_nan"] or r["n_inf"]]
    if bad:
        links = ", ".join(f'<a href="#t-{i}">{esc(r["name"])}</a>' for i, r in bad)
        out.append(f'<p class="bad">{len(bad)} tensor(s) hold NaN or Inf: {links}</p>')
    out.append('<section id="overview"><h2>Overview</h2><p class="meta">One row per tensor in '
               "model order; click a bar to open the tensor's section.</p>"
               + (chart_div("s-overview", eager=True) if overview_ok else "<p>No tensors.</p>")
               + "</section>")
    out.append('<section id="distributions"><h2>Distributions</h2>'
               '<p class="meta">Weight matrices and kernels in model order.</p>'
               + (chart_div("s-ridgeline") if ridges else "<p>No floating tensors.</p>")
               + "</section>")
    if spectra:
        out.append('<section id="spectra"><h2>Spectra</h2><p class="meta">The power-law '
                   "exponent α of each weight matrix's eigenvalue spectrum (WeightWatcher's "
                   "fit; 2–6 is its 'well trained' range). Each matrix's section shows its "
                   "spectrum.</p>" + chart_div("s-alphas") + "</section>")
    out.append('<section id="index"><h2>Index</h2><table class="index"><thead><tr>'
               "<th>tensor</th><th>kind</th><th>shape</th><th>values</th><th>std</th>"
               "<th>max |w|</th><th>zeros</th><th>NaN/Inf</th></tr></thead><tbody>")
    for i, r, _ in sections:
        bad_n = r["n_nan"] + r["n_inf"]
        out.append(f'<tr><td><a href="#t-{i}">{esc(r["name"])}</a></td><td>{esc(r["kind"])}</td>'
                   f'<td>{"×".join(map(str, r["shape"])) or "scalar"}</td>'
                   f'<td>{r["numel"]:,}</td><td>{_num(r["std"])}</td>'
                   f'<td>{_num(r["abs_max"])}</td><td>{r["frac_zero"]:.1%}</td>'
                   f'<td{" class=bad" if bad_n else ""}>{bad_n:,}</td></tr>')
    out.append("</tbody></table></section><section id=\"tensors\"><h2>Tensors</h2>")
    n = len(sections)
    for i, r, ids in sections:
        nav = ['<a href="#overview">↑ overview</a>', '<a href="#index">index</a>']
        if i > 0:
            nav.append(f'<a href="#t-{i - 1}">← previous</a>')
        if i < n - 1:
            nav.append(f'<a href="#t-{i + 1}">next →</a>')
        charts = "".join(chart_div(s) for s in ids)
        out.append(f'<section class="tensor" id="t-{i}"><h3>{esc(r["name"])}</h3>'
                   f'<p class="facts">{_facts(r)}</p><div class="charts">{charts}</div>'
                   f'<p class="links">{"".join(nav)}</p></section>')
    out.append("</section>")
    return "\n".join(out)


def save_report(snapshot: Snapshot, path: str | os.PathLike[str], **options: Any) -> Path:
    """Write :func:`report_html` to ``path`` (folders created as needed).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> snap = store.write(RecordsSource([TensorRecord("w", np.eye(3))]), "m", step=0)
        >>> wa.viz.save_report(snap, tmp / "r" / "report.html").stat().st_size > 100_000
        True
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report_html(snapshot, **options), encoding="utf-8")
    return target
