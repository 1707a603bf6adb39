"""Charts of weight spectra: the empirical spectral density of one matrix on log-log axes with
its power-law fit, and the fitted exponent alpha of every matrix of a model.

The numbers come from :mod:`weightatlas.core.spectrum` (eigenvalues ``lambda = s**2`` of the
smaller Gram matrix, WeightWatcher's power-law fitter); the charts add nothing but binning.
The projection, trajectory and factor charts live in ``_projections.py`` and ``_factors.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from weightatlas.core import (
    EVALS_THRESHOLD,
    MatrixSpectrum,
    matrix_spectrum,
    spectrum,
    weight_matrices,
)
from weightatlas.errors import FormatError, NotFoundError, ShapeError
from weightatlas.storage import Snapshot
from weightatlas.viz._inputs import TensorInput, resolve
from weightatlas.viz._reduce import _flat_slices, as_float
from weightatlas.viz._style import (
    DEFAULT_MAX_BYTES,
    _count,
    fit_budget,
    fmt,
    header_layers,
    inline_data,
    inline_rows,
    numbers,
)

if TYPE_CHECKING:
    import altair as alt

__all__ = ["ALPHA_BAND", "alphas", "alphas_of", "esd", "esd_of", "one_blas_thread",
           "tensor_spectrum"]

#: WeightWatcher's "well trained" range of the power-law exponent alpha.
ALPHA_BAND = (2.0, 6.0)
#: Columns :func:`alphas` needs from a spectrum table (as :func:`weightatlas.core.spectrum`).
_ALPHA_COLUMNS = ("name", "alpha", "sigma", "ks_distance", "n_evals", "status")
_FIT, _MP, _BAR = "#CA0020", "#777777", "#4C78A8"
#: Eigenvalues at or below this are left out of the fit, and so of the chart.
_EVALS_THRESHOLD = EVALS_THRESHOLD


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread: many small eigenproblems (a model's matrices) are 10x+ faster
    that way on a busy machine, where BLAS threads wait for each other (measured on 2 cores:
    0.42 s against 8 ms for one 384x384 ``eigvalsh``)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def tensor_spectrum(t: TensorInput, conv: str = "flatten") -> MatrixSpectrum:
    """The spectrum of a resolved tensor (:func:`weightatlas.core.matrix_spectrum`).

    Raises:
        ShapeError: Fewer than two dimensions, NaN or Inf values, or no values.
    """
    x = as_float(t.array, t.name)
    mats = weight_matrices(x, t.kind, conv, t.name)
    bad = sum(part.size - int(np.count_nonzero(np.isfinite(part))) for part in _flat_slices(x))
    if bad:
        raise ShapeError(f"esd: tensor {t.name!r} holds {bad:,} NaN/Inf values; its spectrum "
                         "is undefined (core.spectrum lists it with status 'non-finite values')")
    if min(mats[0].shape) == 0:
        raise ShapeError(f"esd: tensor {t.name!r} has shape {list(t.shape)}, no eigenvalues")
    with one_blas_thread():
        return matrix_spectrum(mats)


def _none(v: float | int) -> float | int | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def esd(
    snapshot: Snapshot | np.ndarray,
    tensor: str | None = None,
    *,
    conv: str = "flatten",
    bins: int = 60,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """Empirical spectral density of one weight matrix on log-log axes, with its power-law fit.

    The eigenvalues ``lambda = s**2`` (squared singular values, as WeightWatcher) above
    ``1e-5`` are binned in ``bins`` log-spaced bins, each bar's height its density (count
    over the number of eigenvalues and the bin's width). The fitted power law
    ``p(x) = (alpha - 1) / xmin * (x / xmin)**-alpha`` is drawn over ``[xmin, lambda_max]``,
    scaled by the tail's share of the eigenvalues, with rules at ``xmin`` and at the upper
    edge ``lambda+`` of the Marchenko-Pastur bulk of a random matrix of the same shape and
    variance (whose density is the dashed grey curve).

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot`, or an array.
        tensor: The tensor's name (required with a snapshot; a label with an array).
        conv: ``"flatten"`` (``[out, in*h*w]``) or ``"per_position"`` (one ``[out, in]``
            matrix per kernel position, eigenvalues pooled) for convolutions.
        bins: Number of log-spaced bins.
        max_bytes: Budget of the spec.

    Raises:
        ShapeError: A tensor with fewer than two dimensions, or holding NaN or Inf.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((200, 50))
        >>> m = wa.viz.esd(w, "fc", bins=20).to_dict()["usermeta"]["weightatlas"]
        >>> m["n_evals"], sum(m["counts"]), m["rows"], m["cols"]
        (50, 50, 200, 50)
    """
    if bins < 2:
        raise ShapeError(f"esd: bins={bins}; use at least 2")
    t = resolve(snapshot, tensor, None, "esd")
    spec = tensor_spectrum(t, conv)
    lines = [("name", t.name), ("info", t.describe())]
    return esd_of(spec, t.shape, conv=conv, bins=bins, max_bytes=max_bytes, lines=lines)


def esd_of(s: MatrixSpectrum, shape: Sequence[int], *, conv: str = "flatten", bins: int = 60,
           max_bytes: int = DEFAULT_MAX_BYTES,
           lines: Sequence[tuple[str, str]] = ()) -> alt.LayerChart:
    """:func:`esd` of a computed spectrum (``shape``: the tensor's), below ``lines``."""
    evals = s.evals
    shown = evals[evals > _EVALS_THRESHOLD]
    n_pos = len(shape) > 2 and conv == "per_position"
    n_mats = int(np.prod(shape[2:])) if n_pos else 1
    how = (f"{n_mats} per-position matrices {s.rows}×{s.cols} pooled" if n_pos
           else f"the {s.rows}×{s.cols} matrix" + (" (a conv flattened to out × in·kernel)"
                                                   if len(shape) > 2 else ""))
    head = [*lines, ("info", f"ESD: {evals.size:,} eigenvalues λ = s² of {how}, "
                             f"{bins} log-spaced bins, density")]
    fit = s.fit
    if fit.ok:
        head.append(("info", f"power law: α {fmt(fit.alpha)} ± {fmt(fit.sigma)} · xmin "
                             f"{fmt(fit.xmin)} · KS distance {fmt(fit.ks_distance)} · tail "
                             f"{fit.n_tail:,} of {shown.size:,} eigenvalues"))
    else:
        head.append(("alert", "no power-law fit: fewer than two eigenvalues above 1e-5"))
    head.append(("info", f"spectral norm {fmt(s.spectral_norm)} · stable rank "
                         f"{fmt(s.stable_rank)} · effective rank {fmt(s.effective_rank)} · "
                         f"MP edge λ+ {fmt(s.mp_lambda_plus)} ({s.n_spikes:,} above)"))
    if shown.size < evals.size:
        head.append(("info", f"{evals.size - shown.size:,} eigenvalues ≤ 1e-5 not drawn "
                             "(left out of the fit too)"))
    if shown.size:
        lo, hi = float(shown[0]), float(shown[-1])
        if lo == hi:
            lo, hi = lo / 1.5, hi * 1.5
    else:
        lo, hi = _EVALS_THRESHOLD, 1.0
    edges = np.geomspace(lo, hi, bins + 1)
    edges[0], edges[-1] = lo, hi
    counts = np.histogram(shown, bins=edges)[0]
    density = counts / (max(shown.size, 1) * np.diff(edges))
    # the axis always shows lambda+ (at most 4 lambda_max, since lambda_max >= N var)
    x_lo = min(lo, s.mp_lambda_plus / 1.1) if s.mp_lambda_plus > 0 else lo
    x_hi = max(hi, s.mp_lambda_plus * 1.1)
    line_x = np.geomspace(fit.xmin, hi, 32) if fit.ok else np.zeros(0)
    line_y = (fit.n_tail / max(shown.size, 1) * (fit.alpha - 1) / fit.xmin
              * (line_x / fit.xmin) ** -fit.alpha) if fit.ok else np.zeros(0)
    meta: dict[str, Any] = {
        "view": "esd", "conv": conv, "matrices": n_mats, "rows": s.rows, "cols": s.cols,
        "n_evals": int(evals.size), "n_shown": int(shown.size), "bins": bins,
        "edges": edges.tolist(), "counts": counts.tolist(), "density": density.tolist(),
        "alpha": _none(fit.alpha), "xmin": _none(fit.xmin), "ks_distance": _none(fit.ks_distance),
        "sigma": _none(fit.sigma), "n_tail": fit.n_tail, "spectral_norm": s.spectral_norm,
        "stable_rank": s.stable_rank, "effective_rank": s.effective_rank,
        "mp_lambda_plus": s.mp_lambda_plus, "n_spikes": s.n_spikes,
        "fit_line": {"x": line_x.tolist(), "y": line_y.tolist()}, "x_domain": [x_lo, x_hi]}
    mp_x, mp_y = _mp_curve(s, x_lo, x_hi)

    def build(_: int) -> alt.LayerChart:
        _count(json.dumps(meta))
        return _esd_layers(edges, counts, density, line_x, line_y, mp_x, mp_y, s, head, meta)

    return fit_budget(build, bins, max_bytes, "esd")  # type: ignore[return-value]


def _mp_curve(s: MatrixSpectrum, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    from weightatlas.core import marchenko_pastur_density

    n, m = max(s.rows, s.cols), min(s.rows, s.cols)
    variance = s.mp_lambda_plus / (math.sqrt(n) + math.sqrt(m)) ** 2
    if not variance > 0:
        return np.zeros(0), np.zeros(0)
    bottom = max(variance * (math.sqrt(n) - math.sqrt(m)) ** 2, lo)
    top = min(s.mp_lambda_plus, hi)
    if not bottom < top:
        return np.zeros(0), np.zeros(0)
    x = np.geomspace(bottom, top, 80)
    y = marchenko_pastur_density(x, n, m, variance)
    return x[y > 0], y[y > 0]


def _esd_layers(edges: np.ndarray, counts: np.ndarray, density: np.ndarray, line_x: np.ndarray,
                line_y: np.ndarray, mp_x: np.ndarray, mp_y: np.ndarray, s: MatrixSpectrum,
                head: list[tuple[str, str]], meta: dict[str, Any]) -> alt.LayerChart:
    import altair as alt

    full = density[counts > 0]
    top = float(max(full.max() if full.size else 1.0, line_y.max() if line_y.size else 0.0))
    floor = 10.0 ** math.floor(math.log10(float(full.min()) if full.size else top) - 0.5)
    keep = mp_y >= floor
    xs = alt.Scale(type="log", domain=meta["x_domain"], nice=False)
    ys = alt.Scale(type="log", domain=[floor, top * 1.5], nice=False)
    nz = counts > 0
    bars = inline_data({"x0": numbers(edges[:-1][nz]), "x1": numbers(edges[1:][nz]),
                        "n": counts[nz], "d": numbers(density[nz])}).mark_rect(
        color=_BAR, opacity=0.75, stroke="#ffffff", strokeWidth=0.3).encode(
        x=alt.X("x0:Q", title="eigenvalue λ = s² (log)", scale=xs,
                axis=alt.Axis(format=".2~g", labelOverlap=True)),
        x2=alt.X2("x1:Q"),
        y=alt.Y("d:Q", title="density (log)", scale=ys, axis=alt.Axis(format=".1~e")),
        y2=alt.Y2(datum=floor),
        tooltip=[alt.Tooltip("x0:Q", title="from", format=".6~g"),
                 alt.Tooltip("x1:Q", title="to", format=".6~g"),
                 alt.Tooltip("n:Q", title="eigenvalues", format=","),
                 alt.Tooltip("d:Q", title="density", format=".4~g")],
    ).properties(width=420, height=240)
    layers: list[Any] = [bars]
    if keep.any():
        layers.append(inline_data({"x": numbers(mp_x[keep]), "y": numbers(mp_y[keep])})
                      .mark_line(color=_MP, strokeDash=[4, 3], strokeWidth=1.2, clip=True).encode(
            x=alt.X("x:Q", scale=xs), y=alt.Y("y:Q", scale=ys)))
    if line_x.size:
        layers.append(inline_data({"x": numbers(line_x), "y": numbers(line_y)}).mark_line(
            color=_FIT, strokeWidth=2, clip=True).encode(
            x=alt.X("x:Q", scale=xs), y=alt.Y("y:Q", scale=ys),
            tooltip=[alt.Tooltip("x:Q", title="λ", format=".6~g"),
                     alt.Tooltip("y:Q", title="fitted density", format=".4~g")]))
    rules = [("xmin", meta["xmin"], _FIT)] if line_x.size else []
    if s.mp_lambda_plus > 0:
        rules.append(("MP edge λ+", s.mp_lambda_plus, _MP))
    if rules:
        rule = inline_data({"x": [r[1] for r in rules], "label": [r[0] for r in rules]})
        color = alt.Color("label:N", legend=None, scale=alt.Scale(
            domain=[r[0] for r in rules], range=[r[2] for r in rules]))
        layers.append(rule.mark_rule(strokeDash=[2, 2]).encode(
            x=alt.X("x:Q", scale=xs), color=color,
            tooltip=[alt.Tooltip("label:N", title="rule"), alt.Tooltip("x:Q", format=".6~g")]))
        layers.append(rule.mark_text(align="left", dx=3, dy=6, fontSize=10, baseline="top")
                      .encode(x=alt.X("x:Q", scale=xs), y=alt.YValue(0), color=color,
                              text=alt.Text("label:N")))
    chart = alt.layer(*layers, *header_layers(head))
    chart.usermeta = {"weightatlas": meta}  # not .properties(): no schema walk of the numbers
    return cast("alt.LayerChart", chart)


# ---- alpha across a model -------------------------------------------------------------------


def alphas(
    snapshot: Snapshot | pa.Table,
    *,
    conv: str = "flatten",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> alt.LayerChart:
    """The power-law exponent alpha of every weight matrix, in model order.

    Each fitted matrix is a point with an error bar of ``± sigma``, coloured by kind, over a
    band for WeightWatcher's "well trained" range 2..6. Matrices without a fit (NaN or Inf,
    too small, fit failed) are red crosses along the bottom and counted in the header.

    Args:
        snapshot: A :class:`~weightatlas.storage.Snapshot` (its spectra are computed with
            :func:`weightatlas.core.spectrum`), or a table such as that function returns.
        conv: For a snapshot: ``"flatten"`` or ``"per_position"`` convolutions.
        max_bytes: Budget of the spec.

    Raises:
        FormatError: A table without the needed columns.
        NotFoundError: No weight matrix to show.

    Example:
        >>> t = pa.table({"name": ["a", "b"], "alpha": [3.0, None], "sigma": [0.1, None],
        ...               "ks_distance": [0.05, None], "n_evals": [100, 2],
        ...               "status": ["ok", "too small"]})
        >>> m = wa.viz.alphas(t).to_dict()["usermeta"]["weightatlas"]
        >>> m["alpha"], m["status"], m["in_band"]
        ([3.0, None], ['ok', 'too small'], 1)
    """
    if isinstance(snapshot, Snapshot):
        with one_blas_thread():
            table = spectrum(snapshot, conv=conv)
        return alphas_of(table, ref=snapshot.ref, conv=conv, max_bytes=max_bytes)
    return alphas_of(snapshot, max_bytes=max_bytes)


def alphas_of(table: pa.Table, *, ref: str | None = None, conv: str | None = None,
              max_bytes: int = DEFAULT_MAX_BYTES) -> alt.LayerChart:
    """:func:`alphas` of a spectrum table (``ref``: the snapshot, for the header)."""
    missing = [c for c in _ALPHA_COLUMNS if c not in table.column_names]
    if missing:
        raise FormatError(f"alphas: the table lacks column(s) {', '.join(missing)}; it needs "
                          f"{', '.join(_ALPHA_COLUMNS)} (as weightatlas.core.spectrum gives)")
    if table.num_rows == 0:
        raise NotFoundError("alphas: no weight matrices to show")
    cols = table.to_pydict()
    n = table.num_rows
    kinds = cols.get("kind") or ["matrix"] * n
    status = [str(s) for s in cols["status"]]
    ok = [s == "ok" and a is not None and math.isfinite(a) for s, a in
          zip(status, cols["alpha"], strict=True)]
    alpha = [a if k else None for a, k in zip(cols["alpha"], ok, strict=True)]
    sigma = [v if k and v is not None and math.isfinite(v) else None
             for v, k in zip(cols["sigma"], ok, strict=True)]
    ks = [v if k else None for v, k in zip(cols["ks_distance"], ok, strict=True)]
    fitted = [a for a in alpha if a is not None]
    in_band = sum(ALPHA_BAND[0] <= a <= ALPHA_BAND[1] for a in fitted)
    tops = [a + (s or 0.0) for a, s in zip(alpha, sigma, strict=True) if a is not None]
    lows = [a - (s or 0.0) for a, s in zip(alpha, sigma, strict=True) if a is not None]
    lo = min([ALPHA_BAND[0] - 1.0, *lows])
    hi = max([ALPHA_BAND[1] + 1.0, *tops])
    meta = {"view": "alphas", "conv": conv, "matrices": n, "fitted": len(fitted),
            "in_band": in_band, "band": list(ALPHA_BAND), "alpha": alpha, "sigma": sigma,
            "ks_distance": ks, "status": status}
    bad = [(cols["name"][i], status[i]) for i in range(n) if not ok[i]]
    where = f" of {ref}" if ref else ""
    head = [("name", f"Power-law exponent α of every weight matrix{where}"),
            ("info", f"{n:,} matrices in model order; {len(fitted):,} fitted, {in_band:,} in "
                     f"WeightWatcher's 'well trained' band {ALPHA_BAND[0]:g}–{ALPHA_BAND[1]:g} "
                     "(shaded); bars: ± σ")]
    if bad:
        by: dict[str, int] = {}
        for _, st in bad:
            by[st] = by.get(st, 0) + 1
        counts = ", ".join(f"{v:,} {k}" for k, v in sorted(by.items()))
        names = ", ".join(name for name, _ in bad[:3]) + (", …" if len(bad) > 3 else "")
        head.append(("alert", f"{len(bad):,} without a fit ({counts}): red × at the bottom; "
                              f"{names}"))
    data = {"i": list(range(n)), "name": cols["name"], "kind": kinds, "a": numbers(
        [np.nan if a is None else a for a in alpha]), "s": numbers(
        [np.nan if v is None else v for v in sigma]), "ks": numbers(
        [np.nan if v is None else v for v in ks]), "ne": cols["n_evals"], "st": status}

    def build(_: int) -> alt.LayerChart:
        _count(json.dumps(meta))
        return _alpha_layers(data, ok, n, lo, hi, head, meta)

    return fit_budget(build, n, max_bytes, "alphas")  # type: ignore[return-value]


def _alpha_layers(data: dict[str, Any], ok: list[bool], n: int, lo: float, hi: float,
                  head: list[tuple[str, str]], meta: dict[str, Any]) -> alt.LayerChart:
    import altair as alt

    xs = alt.Scale(domain=[-0.5, n - 0.5], nice=False, zero=False)
    ys = alt.Scale(domain=[lo, hi], nice=False, zero=False)
    x = alt.X("i:Q", title="weight matrix (model order)", scale=xs,
              axis=alt.Axis(format="d", tickMinStep=1))
    tips = [alt.Tooltip("name:N", title="tensor"), alt.Tooltip("kind:N", title="kind"),
            alt.Tooltip("a:Q", title="alpha", format=".4~g"),
            alt.Tooltip("s:Q", title="sigma", format=".3~g"),
            alt.Tooltip("ks:Q", title="KS distance", format=".3~g"),
            alt.Tooltip("ne:Q", title="eigenvalues", format=","),
            alt.Tooltip("st:N", title="status")]
    band = inline_rows([{"lo": ALPHA_BAND[0], "hi": ALPHA_BAND[1]}])
    layers: list[Any] = [alt.Chart(band).mark_rect(color="#A1D99B", opacity=0.3).encode(
        y=alt.Y("lo:Q", scale=ys), y2=alt.Y2("hi:Q"))]
    base = inline_data(data)
    fitted = base.transform_filter("isValid(datum.a)")
    layers.append(fitted.transform_filter("isValid(datum.s)").transform_calculate(
        a0="datum.a - datum.s", a1="datum.a + datum.s").mark_rule(color="#888888").encode(
        x=x, y=alt.Y("a0:Q", scale=ys), y2=alt.Y2("a1:Q")))
    layers.append(fitted.mark_circle(size=36, opacity=0.9).encode(
        x=x, y=alt.Y("a:Q", title="alpha", scale=ys),
        color=alt.Color("kind:N", title="kind", scale=alt.Scale(scheme="tableau10")),
        tooltip=tips))
    if not all(ok):
        layers.append(base.transform_filter("!isValid(datum.a)").mark_point(
            shape="cross", angle=45, color="#B00020", size=60, filled=True, opacity=1).encode(
            x=x, y=alt.YValue(232), tooltip=tips))
    chart = alt.layer(*layers, *header_layers(head)).properties(
        width=max(300, min(900, 12 * n)), height=240)
    chart.usermeta = {"weightatlas": meta}  # not .properties(): no schema walk of the numbers
    return cast("alt.LayerChart", chart)
