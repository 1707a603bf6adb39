"""Charts of the analyses (spectra, projections, trajectories, NMF), their CLI commands and
their place in the report: every number a chart shows against NumPy, SciPy, scikit-learn or
the core functions' documented definitions, on the raw arrays."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import weightatlas.viz as viz
from tests._cli import run_cli as cli
from tests.test_viz_helpers import (
    DISTILL,
    HOSTILE,
    columns,
    layers,
    mark_type,
    meta,
    nodes,
    strings_outside_data,
)
from weightatlas import core
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    ShapeError,
    UnsupportedError,
)
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord

LIN, CONV = ("out", "in"), ("out", "in", "h", "w")


def units(spec: dict, mark: str, x: str | None = None) -> list[dict]:
    """Unit specs with this mark (and x field), header lines excluded."""
    out = []
    for node in layers(spec):
        if mark_type(node) != mark:
            continue
        enc = node.get("encoding", {})
        if mark == "text" and "text" in enc and "field" not in enc.get("x", {}):
            continue  # a header line
        if x is None or enc.get("x", {}).get("field") == x:
            out.append(node)
    return out


def one(spec: dict, mark: str, x: str | None = None) -> dict:
    found = units(spec, mark, x)
    assert len(found) == 1, [(mark_type(n), n.get("encoding", {}).get("x")) for n in layers(spec)]
    return found[0]


def header(spec: dict) -> list[str]:
    """The header lines drawn above a chart (text layers whose data is a ``text`` column)."""
    out = []
    for node in layers(spec):
        if mark_type(node) == "text" and "data" in node and "text" in (
                cols := columns(spec, node)):
            out += cols["text"][0]
    return out


def heavy_tailed(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """A matrix with constructed singular values (a Pareto tail), and those values."""
    u, _ = np.linalg.qr(rng.standard_normal((n, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = np.sort((1 - rng.random(m)) ** (-1 / 1.5))[::-1]
    return (u * s) @ v.T, s


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[Store, Snapshot, dict[str, np.ndarray]]:
    rng = np.random.default_rng(6)
    store = Store(tmp_path_factory.mktemp("analyses") / "store", create=True)
    fc, _ = heavy_tailed(rng, 120, 60)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    emb[:100] += 4.0  # a planted cluster
    bad = rng.standard_normal((20, 10)).astype(np.float32)
    bad[3, 4] = np.nan
    arrays = {"fc.weight": fc, "conv.weight": rng.standard_normal((8, 6, 3, 3)).astype(np.float32),
              "emb.weight": emb, "bad.weight": bad, "fc.bias": rng.standard_normal(60)}
    kinds = {"fc.weight": ("linear", LIN), "conv.weight": ("conv2d", CONV),
             "emb.weight": ("embedding", ("vocab", "dim")), "bad.weight": ("linear", LIN),
             "fc.bias": ("linear", ("out",))}
    recs = [TensorRecord(n, a, kind=kinds[n][0], layout=kinds[n][1]) for n, a in arrays.items()]
    snap = store.write(RecordsSource(recs), "lab", step=0)
    return store, snap, arrays


# ---- the eigenvalue spectrum ---------------------------------------------------------------


def test_esd_histogram_fit_and_figures_against_numpy_and_scipy(lab):
    from scipy import stats

    _, snap, arrays = lab
    w = arrays["fc.weight"]
    spec = viz.esd(snap, "fc.weight", bins=30).to_dict()
    m = meta(spec)
    s = np.linalg.svd(w, compute_uv=False)
    evals = np.sort(s**2)
    from weightatlas.core import EVALS_THRESHOLD
    from weightatlas.viz._analyses import _EVALS_THRESHOLD

    assert _EVALS_THRESHOLD == EVALS_THRESHOLD == 1e-5  # the chart drops what the fit drops
    shown = evals[evals > 1e-5]
    edges = np.geomspace(shown[0], shown[-1], 31)
    np.testing.assert_allclose(m["edges"], edges, rtol=1e-9)
    outer = np.asarray(m["edges"]) * np.r_[1 - 1e-9, np.ones(29), 1 + 1e-9]  # SVD vs eigh
    counts = np.histogram(shown, bins=outer)[0]
    assert m["counts"] == counts.tolist() and sum(m["counts"]) == 60 == m["n_evals"]
    widths = np.diff(m["edges"])
    np.testing.assert_allclose(m["density"], counts / (60 * widths), rtol=1e-12)
    assert math.isclose(float(np.sum(np.asarray(m["density"]) * widths)), 1.0, rel_tol=1e-12)
    # the figures: closed forms on the SVD's singular values, the fit as core.spectrum's
    assert math.isclose(m["spectral_norm"], s[0], rel_tol=1e-9)
    assert math.isclose(m["stable_rank"], (s**2).sum() / s[0] ** 2, rel_tol=1e-9)
    p = s / s.sum()
    assert math.isclose(m["effective_rank"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-9)
    lam_plus = np.var(w) * (math.sqrt(120) + math.sqrt(60)) ** 2
    assert math.isclose(m["mp_lambda_plus"], lam_plus, rel_tol=1e-9)
    assert m["n_spikes"] == int((evals > lam_plus).sum())
    row = core.spectrum(snap, ["fc.weight"]).to_pylist()[0]
    for key in ("alpha", "xmin", "ks_distance", "sigma", "n_tail"):
        assert math.isclose(m[key], row[key], rel_tol=1e-9), key
    # the fitted line is the Pareto density of the tail, scaled by the tail's share
    x, y = np.asarray(m["fit_line"]["x"]), np.asarray(m["fit_line"]["y"])
    assert math.isclose(x[0], m["xmin"]) and math.isclose(x[-1], shown[-1], rel_tol=1e-12)
    ref = stats.pareto.pdf(x, m["alpha"] - 1, scale=m["xmin"]) * m["n_tail"] / shown.size
    np.testing.assert_allclose(y, ref, rtol=1e-9)
    # spec: bars of the non-empty bins on log-log axes, the line, rules at xmin and lambda+
    bars = one(spec, "rect", "x0")
    assert bars["encoding"]["x"]["scale"]["type"] == "log"
    assert bars["encoding"]["y"]["scale"]["type"] == "log"
    cols = columns(spec, bars)
    nz = counts > 0
    assert cols["n"] == counts[nz].tolist()
    np.testing.assert_allclose(cols["x0"], np.asarray(m["edges"])[:-1][nz], rtol=1e-15)
    np.testing.assert_allclose(cols["d"], np.asarray(m["density"])[nz], rtol=1e-15)
    lines = units(spec, "line", "x")
    assert len(lines) == 2  # the fit and the Marchenko-Pastur density
    fit_line = next(n for n in lines if n["mark"]["color"] == "#CA0020")
    np.testing.assert_allclose(columns(spec, fit_line)["y"], ref, rtol=1e-9)
    mp = next(n for n in lines if n is not fit_line)
    mp_cols = columns(spec, mp)
    np.testing.assert_allclose(mp_cols["y"], core.marchenko_pastur_density(
        np.asarray(mp_cols["x"]), 120, 60, float(np.var(w))), rtol=1e-9)
    rules = columns(spec, one(spec, "rule", "x"))
    assert rules["label"] == ["xmin", "MP edge λ+"]
    np.testing.assert_allclose(rules["x"], [m["xmin"], lam_plus], rtol=1e-9)
    lines_text = header(spec)
    assert lines_text[0] == "fc.weight"
    assert f"α {m['alpha']:.4g}" in lines_text[3] and "tail " in lines_text[3]


def test_esd_of_a_convolution_flattened_or_per_position(lab):
    _, snap, arrays = lab
    w = arrays["conv.weight"].astype(np.float64)
    flat = meta(viz.esd(snap, "conv.weight", bins=10).to_dict())
    assert (flat["rows"], flat["cols"], flat["n_evals"], flat["matrices"]) == (8, 54, 8, 1)
    ref = np.sort(np.linalg.svd(w.reshape(8, -1), compute_uv=False) ** 2)
    assert math.isclose(flat["spectral_norm"] ** 2, ref[-1], rel_tol=1e-6)
    per = meta(viz.esd(snap, "conv.weight", conv="per_position", bins=10).to_dict())
    assert (per["rows"], per["cols"], per["n_evals"], per["matrices"]) == (8, 6, 54, 9)
    pooled = np.concatenate([np.linalg.svd(w[:, :, i, j], compute_uv=False) ** 2
                             for i in range(3) for j in range(3)])
    assert sum(per["counts"]) == int((pooled > 1e-5).sum())
    assert math.isclose(per["edges"][-1], pooled.max(), rel_tol=1e-6)
    row = core.spectrum(snap, ["conv.weight"], conv="per_position").to_pylist()[0]
    assert math.isclose(per["alpha"], row["alpha"], rel_tol=1e-6)  # float32: see alphas


def test_esd_bad_input(lab):
    _, snap, _ = lab
    with pytest.raises(ShapeError, match=r"'fc\.bias': a matrix analysis needs at least 2 dim"):
        viz.esd(snap, "fc.bias")
    with pytest.raises(ShapeError, match=r"'bad\.weight' holds 1 NaN/Inf values"):
        viz.esd(snap, "bad.weight")
    with pytest.raises(ShapeError, match="bins=1; use at least 2"):
        viz.esd(snap, "fc.weight", bins=1)
    with pytest.raises(UnsupportedError, match="conv must be 'flatten' or 'per_position'"):
        viz.esd(snap, "conv.weight", conv="rows")
    with pytest.raises(NotFoundError, match=r"fc\.wieght"):
        viz.esd(snap, "fc.wieght")


# ---- alpha across the model ------------------------------------------------------------------


def test_alphas_show_every_matrix_with_core_figures_and_mark_the_unfitted(lab):
    _, snap, _ = lab
    spec = viz.alphas(snap).to_dict()
    m = meta(spec)
    table = core.spectrum(snap).to_pylist()
    assert [r["name"] for r in table] == ["fc.weight", "conv.weight", "emb.weight",
                                          "bad.weight"]
    assert m["status"] == [r["status"] for r in table]
    assert m["status"][3] == "non-finite values" and m["alpha"][3] is None
    # alphas() runs BLAS on one thread: a float32 Gram product may round differently
    np.testing.assert_allclose(m["alpha"][:3], [r["alpha"] for r in table[:3]], rtol=1e-6)
    np.testing.assert_allclose(m["sigma"][:3], [r["sigma"] for r in table[:3]], rtol=1e-6)
    assert m["in_band"] == sum(2 <= r["alpha"] <= 6 for r in table[:3])
    points = one(spec, "circle", "i")
    data = columns(spec, points)
    assert data["name"] == [r["name"] for r in table]  # names are data
    assert data["a"][:3] == m["alpha"][:3] and data["a"][3] is None
    assert points["transform"][-1] == {"filter": "isValid(datum.a)"}
    cross = one(spec, "point", "i")
    assert cross["mark"]["shape"] == "cross" and cross["transform"][-1] == {
        "filter": "!isValid(datum.a)"}
    band = next(n for n in units(spec, "rect") if "x" not in n.get("encoding", {}))
    band_rows = json.loads(band["data"]["values"]) if "values" in band["data"] else \
        json.loads(spec["datasets"][band["data"]["name"]])
    assert band_rows == [{"lo": 2.0, "hi": 6.0}]
    errors = one(spec, "rule", "i")
    assert {t.get("calculate") for t in errors["transform"]} >= {"datum.a - datum.s",
                                                                  "datum.a + datum.s"}
    assert "1 without a fit (1 non-finite values): red × at the bottom; bad.weight" in \
        header(spec)
    # from a table, and a table without the columns
    assert meta(viz.alphas(core.spectrum(snap)).to_dict())["alpha"] == m["alpha"]
    with pytest.raises(FormatError, match=r"lacks column.*ks_distance"):
        viz.alphas(pa.table({"name": ["a"], "alpha": [2.0], "sigma": [0.1], "n_evals": [4],
                             "status": ["ok"]}))
    with pytest.raises(NotFoundError, match="no weight matrices"):
        viz.alphas(core.spectrum(snap).slice(0, 0))


# ---- projections ----------------------------------------------------------------------------


def test_projection_chart_against_scikit_learn(lab):
    from sklearn.decomposition import PCA

    _, snap, arrays = lab
    table = core.projection(snap, "emb.weight", clusters=2)
    spec = viz.projection_chart(table, color="cluster").to_dict()
    m = meta(spec)
    x = arrays["emb.weight"].astype(np.float64)
    ref = PCA(2).fit(x)
    coords = ref.transform(x)
    data = columns(spec, one(spec, "circle", "x"))
    for k, key in enumerate(("x", "y")):  # equal to scikit-learn up to each axis's sign
        got = np.asarray(data[key])
        sign = np.sign(got @ coords[:, k])
        np.testing.assert_allclose(got, sign * coords[:, k], atol=1e-9)
        assert math.isclose(m["facts"][f"explained_variance_{k + 1}"],
                            ref.explained_variance_ratio_[k], rel_tol=1e-9)
    np.testing.assert_allclose(data["norm"], np.linalg.norm(x, axis=1), rtol=1e-12)
    assert data["index"] == list(range(300)) and set(data["tensor"]) == {"emb.weight"}
    assert data["c"] == [str(c) for c in table.column("cluster").to_pylist()]
    assert sorted(np.bincount(table.column("cluster").to_numpy()).tolist()) == [100, 200]
    points = one(spec, "circle", "x")
    enc = points["encoding"]
    assert enc["color"]["field"] == "c" and enc["color"]["type"] == "nominal"
    assert [t["field"] for t in enc["tooltip"]][:3] == ["tensor", "index", "c"]
    assert enc["x"]["title"] == f"PC1 ({ref.explained_variance_ratio_[0]:.1%} of variance)"
    assert (m["method"], m["points"], m["skipped_rows"], m["binned"]) == ("pca", 300, 0, False)
    by_norm = viz.projection_chart(table, color="norm").to_dict()
    assert one(by_norm, "circle", "x")["encoding"]["color"]["type"] == "quantitative"
    with pytest.raises(FormatError, match="no column 'cluster' to colour by"):
        viz.projection_chart(core.projection(snap, "emb.weight"), color="cluster")


def test_projection_chart_bins_many_points_and_reports_skipped_rows(lab):
    _, snap, _ = lab
    table = core.projection(snap, "emb.weight")
    spec = viz.projection_chart(table, max_points=100, bins=8).to_dict()
    m = meta(spec)
    assert m["binned"] and m["bins"] == 8 and m["counts"] == 300
    cells = columns(spec, one(spec, "rect", "x0"))
    xs, ys = table.column("x").to_numpy(), table.column("y").to_numpy()
    ref, ex, _ = np.histogram2d(xs, ys, bins=8, range=[[xs.min(), xs.max()],
                                                        [ys.min(), ys.max()]])
    ix, iy = np.nonzero(ref)
    assert cells["n"] == ref[ix, iy].astype(int).tolist()
    np.testing.assert_allclose(cells["x0"], ex[ix], rtol=1e-12)
    skipped = viz.projection_chart(core.projection(snap, "bad.weight")).to_dict()
    assert meta(skipped)["skipped_rows"] == 1 and meta(skipped)["points"] == 19
    assert "1 row(s) with NaN or Inf left out" in header(skipped)


# ---- trajectories -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Store, dict[int, dict[str, np.ndarray]]]:
    """Steps 0, 10, 20, 30 of a model with known updates; 'b' is missing at step 20."""
    rng = np.random.default_rng(9)
    store = Store(tmp_path_factory.mktemp("run") / "store", create=True)
    w = {"a": rng.standard_normal((6, 5)), "b": rng.standard_normal(7)}
    steps: dict[int, dict[str, np.ndarray]] = {}
    for k, step in enumerate((0, 10, 20, 30)):
        steps[step] = {n: v.copy() for n, v in w.items() if not (n == "b" and step == 20)}
        store.write(RecordsSource([TensorRecord(n, v) for n, v in steps[step].items()]), "run",
                    step=step).close()
        w = {n: v + rng.standard_normal(v.shape) * 0.5 * 0.1**k for n, v in w.items()}
    return store, steps


def test_trajectory_chart_lines_are_numpy_updates_with_statuses_marked(run):
    store, steps = run
    table = core.trajectory(store, "run")
    spec = viz.trajectory_chart(table).to_dict()
    m = meta(spec)
    ref = []
    for name in ("a", "b"):
        prev = None
        for step in (0, 10, 20, 30):
            cur = steps[step].get(name)
            if cur is None or prev is None:
                ref.append(None)
            else:
                ref.append(float(np.linalg.norm(cur - prev) / np.linalg.norm(prev)))
            prev = cur
    assert [v is None for v in m["values"]] == [v is None for v in ref]
    np.testing.assert_allclose([v for v in m["values"] if v is not None],
                               [v for v in ref if v is not None], rtol=1e-12)
    assert m["log"] is True  # updates shrink tenfold a step: a log axis
    line = one(spec, "line", "step")
    assert line["encoding"]["y"]["scale"]["type"] == "log"
    assert line["encoding"]["color"]["field"] == "tensor"
    data = columns(spec, line)
    assert data["status"] == ["first", "ok", "ok", "ok", "first", "ok", "missing", "resumed"]
    strip = one(spec, "point", "step")
    assert strip["encoding"]["y"]["field"] == "status" and strip["mark"]["color"] == "#B00020"
    assert "not comparable, red × below: 1 missing, 1 resumed" in header(spec)
    cosine = viz.trajectory_chart(table, metric="update_cosine").to_dict()
    assert meta(cosine)["log"] is False
    assert one(cosine, "line", "step")["encoding"]["y"]["scale"].get("type") is None
    with pytest.raises(UnsupportedError, match="metric='speed'; expected one of"):
        viz.trajectory_chart(table, metric="speed")
    with pytest.raises(FormatError, match=r"lacks column.*status"):
        viz.trajectory_chart(table.drop(["status"]))


def test_trajectory_path_is_the_pca_of_the_snapshots(run):
    from sklearn.decomposition import PCA

    store, steps = run
    table = core.trajectory_pca(store, "run")
    spec = viz.trajectory_path(table).to_dict()
    m = meta(spec)
    stacked = np.stack([steps[s]["a"].ravel() for s in (0, 10, 20, 30)])  # b is missing once
    ref = PCA(2).fit(stacked)
    coords = ref.transform(stacked)
    for k, key in enumerate(("pc1", "pc2")):
        got = np.asarray(m[key])
        np.testing.assert_allclose(np.abs(got), np.abs(coords[:, k]), atol=1e-9)
    np.testing.assert_allclose(m["explained_variance_ratio"], ref.explained_variance_ratio_,
                               rtol=1e-9)
    assert m["labels"] == ["0", "10", "20", "30"] and m["excluded"] == 1
    path = one(spec, "line", "pc1")
    assert path["encoding"]["order"]["field"] == "o"
    assert columns(spec, one(spec, "text", "pc1"))["label"] == m["labels"]
    assert "1 tensor(s) left out (missing, changed shape or NaN/Inf): b" in header(spec)


# ---- NMF views ---------------------------------------------------------------------------------


def test_nmf_rgb_colours_are_scikit_learn_nmf_of_the_split_kernel(lab):
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    _, snap, arrays = lab
    w = arrays["conv.weight"].astype(np.float64)
    spec = viz.nmf_rgb(snap, "conv.weight", neurons=[1, 5]).to_dict()
    assert meta(spec)["neurons"] == [1, 5] and meta(spec)["kernel"] == [3, 3]
    tile = one(spec, "rect", "kx")
    assert tile["encoding"]["color"] == {"field": "c", "scale": None, "type": "nominal"}
    data = columns(spec, next(n for _, n in nodes(spec) if isinstance(n, dict)
                              and n.get("facet") is not None))
    for k, neuron in enumerate((1, 5)):
        kernel = w[neuron]
        x = np.concatenate([np.maximum(kernel, 0), np.maximum(-kernel, 0)]).reshape(12, 9).T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            u = NMF(3, init="nndsvda", random_state=0, max_iter=1000, tol=1e-6).fit_transform(x)
        rgb = u / u.max()
        expected = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in
                    np.rint(rgb * 255).astype(int).tolist()]
        assert data["c"][k * 9:(k + 1) * 9] == expected
        np.testing.assert_allclose(data["r"][k * 9:(k + 1) * 9], rgb[:, 0].round(4), atol=1e-12)
    assert data["o"] == [1] * 9 + [5] * 9 and data["ky"][:4] == [0, 0, 0, 1]
    with pytest.raises(ShapeError, match=r"'fc\.weight' has shape \[120, 60\]; per-neuron NMF"):
        viz.nmf_rgb(snap, "fc.weight")
    with pytest.raises(ShapeError, match=r"has 8 units; \[8\] are not in 0\.\.7"):
        viz.nmf_rgb(snap, "conv.weight", neurons=[8])


def test_factors_chart_shows_the_factorisation_and_its_error(rng):
    h = rng.random((3, 10))                      # known non-negative factors: recoverable
    s = rng.random((7, 3, 4, 4))
    family = np.einsum("ukyx,kc->ucyx", s, h)
    f = core.one_sided_nmf(family, 3)
    spec = viz.factors_chart(f, "layer").to_dict()
    m = meta(spec)
    recon = np.einsum("ukyx,kc->ucyx", f.spatial, f.channel)
    err = np.linalg.norm(family - recon) / np.linalg.norm(family)
    assert math.isclose(m["relative_error"], err, rel_tol=1e-9) and err < 1e-3
    assert (m["n_factors"], m["channels"], m["units"], m["kernel"]) == (3, 10,
                                                                       list(range(7)), [4, 4])
    loadings = one(spec, "rect", "ch")
    np.testing.assert_allclose(columns(spec, loadings)["v"], f.channel.ravel(), rtol=1e-15)
    assert loadings["encoding"]["color"]["scale"]["domain"] == [0, float(f.channel.max())]
    tiles = one(spec, "rect", "kx")
    grid = next(n for _, n in nodes(spec) if isinstance(n, dict) and "facet" in n)
    np.testing.assert_allclose(columns(spec, grid)["v"], f.spatial.ravel(), rtol=1e-15)
    mx = float(np.abs(f.spatial).max())
    scale = tiles["encoding"]["color"]["scale"]
    assert scale["domain"] == [-mx, -mx / 2, 0.0, mx / 2, mx] and scale["range"] == DISTILL
    assert m["domain"] == [-mx, mx]
    assert f"relative reconstruction error ||E − S·H|| / ||E|| = {err:.4g}" in header(spec)
    two = meta(viz.factors_chart(family, "layer", n_factors=2, units=[0, 3]).to_dict())
    assert two["units"] == [0, 3] and two["relative_error"] > m["relative_error"]
    with pytest.raises(ShapeError, match="a weight family is \\[units, channels\\]"):
        viz.factors_chart(np.ones(5), "v")


# ---- conventions: names are data, every view renders, views by name -----------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Snapshot:
    rng = np.random.default_rng(13)
    store = Store(tmp_path_factory.mktemp("hostile") / "store", create=True)
    for step in (0, 1, 2):
        recs = [TensorRecord(n, rng.standard_normal((12, 4, 3, 3)).astype(np.float32),
                             kind="conv2d", layout=CONV) for n in HOSTILE]
        store.write(RecordsSource(recs), "evil", step=step).close()
    return store.snapshot("evil@2")


def every_view(snap: Snapshot, name: str) -> dict[str, object]:
    return {v: viz.chart(v, snap, name if viz.VIEWS[v].tensor else None)
            for v in ("esd", "alphas", "projection", "trajectory", "trajectory_path",
                      "nmf_rgb", "factors")}


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_tensor_names_are_only_ever_data(hostile, name: str):
    for view, chart in every_view(hostile, name).items():
        spec = chart.to_dict()  # type: ignore[attr-defined]
        leaks = [(p, s) for p, s in strings_outside_data(spec) if any(h in s for h in HOSTILE)]
        assert leaks == [], view
        if view != "trajectory_path":  # the path names tensors only when it leaves some out
            assert json.dumps(name)[1:-1] in json.dumps(spec), view


def test_every_analysis_view_renders_to_png_and_svg(hostile):
    from weightatlas.viz._style import TEMPLATE_BYTES

    for view, chart in every_view(hostile, HOSTILE[0]).items():
        assert meta(chart.to_dict())["view"] == view  # type: ignore[attr-defined]
        png = viz.to_png(chart)  # type: ignore[arg-type]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, view
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 100 and height > 60, view
        svg = viz.to_svg(chart)  # type: ignore[arg-type]
        assert svg.startswith("<svg") and "<script" not in svg, view
        spec = chart.to_dict(validate=False)  # type: ignore[attr-defined]
        total = len(json.dumps(spec, separators=(",", ":")))
        data = sum(len(json.dumps(v)) for _, v in nodes(spec)
                   if isinstance(v, str) and v.startswith("[{"))
        usermeta = len(json.dumps(spec["usermeta"]))
        assert total - data - usermeta < TEMPLATE_BYTES, view


def test_views_by_name_and_the_store_of_a_snapshot(hostile, lab, tmp_path: Path):
    _, snap, _ = lab
    assert {"esd", "alphas", "projection", "trajectory", "trajectory_path", "nmf_rgb",
            "factors"} <= set(viz.VIEWS)
    assert viz.VIEWS["projection"].options() == ["method", "clusters", "color", "max_points",
                                                 "max_bytes"]
    spec = viz.chart("projection", snap, "emb.weight", method="pca", clusters=2).to_dict()
    assert meta(spec)["color"] == "tensor" and meta(spec)["points"] == 300
    assert meta(viz.chart("esd", snap, "fc.weight", bins=12).to_dict())["bins"] == 12
    assert meta(viz.chart("trajectory", hostile, metric="norm").to_dict())["steps"] == [0, 1, 2]
    with pytest.raises(UnsupportedError, match="view 'alphas' takes no option bins"):
        viz.chart("alphas", snap, bins=3)
    with pytest.raises(ShapeError, match="at least 2 step-numbered snapshots, found 1"):
        viz.chart("trajectory", snap)
    loose = tmp_path / "copy.arrow"
    shutil.copy(snap.path, loose)
    with pytest.raises(NotFoundError, match="is not inside a weightatlas store"):
        viz.chart("trajectory_path", Snapshot(loose))


# ---- the report -------------------------------------------------------------------------------


def test_report_shows_alphas_and_each_matrix_spectrum(lab):
    from tests.test_viz_export import check_page

    _, snap, _ = lab
    page = viz.report_html(snap, esd_bins=16)
    specs = {meta(s)["view"] + str(i): s for i, s in enumerate(check_page(page))}
    esds = [s for s in specs.values() if meta(s)["view"] == "esd"]
    alpha = next(s for s in specs.values() if meta(s)["view"] == "alphas")
    table = core.spectrum(snap).to_pylist()
    assert meta(alpha)["status"] == [r["status"] for r in table]
    assert meta(alpha)["alpha"][3] is None
    np.testing.assert_allclose(meta(alpha)["alpha"][:3], [r["alpha"] for r in table[:3]],
                               rtol=1e-6)  # one BLAS thread: float32 Gram rounding may differ
    assert [meta(s)["n_evals"] for s in esds] == [r["n_evals"] for r in table[:3]]
    assert all(meta(s)["bins"] == 16 for s in esds)
    for s, r in zip(esds, table[:3], strict=True):
        assert math.isclose(meta(s)["alpha"], r["alpha"], rel_tol=1e-6)
        assert "fc.weight" not in json.dumps(s)  # the section names the tensor, not the chart
    assert 'id="spectra"' in page and '<a href="#spectra">Spectra</a>' in page
    assert 'data-spec="s-0-e"' in page and 'data-spec="s-3-e"' not in page  # bad: NaN
    plain = viz.report_html(snap, spectra=False)
    assert 'id="spectra"' not in plain and "-e\"" not in plain


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture
def digits(tmp_path: Path, digits_checkpoints: list[str], capsys) -> tuple[str, Store]:
    root = str(tmp_path / "store")
    code, _, err = cli(capsys, "--store", root, "ingest", "--model", "digits",
                       *digits_checkpoints)
    assert code == 0, err
    return root, Store(root)


def close(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)  # type: ignore[arg-type]
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k])
                                                                     for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    return a == b


def test_cli_spectrum(digits, capsys, tmp_path: Path):
    root, store = digits
    code, out, _ = cli(capsys, "--store", root, "spectrum", "digits@10", "--json")
    assert code == 0
    doc = json.loads(out)
    with store.snapshot("digits@10") as snap:
        ref = core.spectrum(snap).to_pylist()
    assert doc["snapshot"] == "digits@10" and doc["conv"] == "flatten"
    assert [r["name"] for r in doc["matrices"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert close(doc["matrices"], ref)
    code, out, err = cli(capsys, "--store", root, "spectrum", "digits", "-o",
                         str(tmp_path / "a.svg"))
    assert code == 0 and "fc3.weight" in out and "digits@60: 3 weight matrices" in out
    assert (tmp_path / "a.svg").read_text().startswith("<svg") and "wrote" in err
    code, _, err = cli(capsys, "--store", root, "spectrum", "digits", "--conv", "rows")
    assert code == 1 and err.strip() == ("error: spectrum: --conv 'rows'; expected flatten or "
                                         "per_position")
    code, _, err = cli(capsys, "--store", root, "spectrum", "digits", "-o", "x.gif")
    assert code == 1 and "unknown chart format" in err and "\n" not in err.strip()


def test_cli_project(digits, capsys, tmp_path: Path):
    root, store = digits
    code, out, _ = cli(capsys, "--store", root, "project", "digits", "fc1.weight",
                       "--clusters", "3", "--json", "-o", str(tmp_path / "p.vl.json"))
    assert code == 0
    doc = json.loads(out)
    with store.snapshot("digits") as snap:
        ref = core.projection(snap, "fc1.weight", clusters=3)
    assert close(doc["points"], ref.to_pylist()) and len(doc["points"]) == 64
    assert doc["meta"]["method"] == "pca" and doc["meta"]["skipped_rows"] == 0
    chart = json.loads((tmp_path / "p.vl.json").read_text())
    assert meta(chart)["color"] == "cluster" and meta(chart)["points"] == 64
    code, out, _ = cli(capsys, "--store", root, "project", "digits", "fc2.weight")
    assert code == 0 and "pca of 32 neurons of fc2.weight" in out
    code, out, _ = cli(capsys, "--store", root, "project", "digits", "fc1.weight", "fc2.weight")
    assert code == 0 and "pca of 96 neurons of fc1.weight, fc2.weight" in out
    code, _, err = cli(capsys, "--store", root, "project", "digits", "fc1.weight", "fc3.weight")
    assert code == 1 and err.strip() == ("error: tensor 'fc3.weight': rows of 32 values cannot "
                                         "be projected with rows of 64 ('fc1.weight')")
    code, _, err = cli(capsys, "--store", root, "project", "digits", "fc1.bias")
    assert code == 1 and "need a weight with at least 2 dimensions" in err
    code, _, err = cli(capsys, "--store", root, "project", "digits", "fc1.weight",
                       "--method", "mds")
    assert code == 1 and err.strip() == ("error: projection method must be 'pca', 'tsne' or "
                                         "'umap', got 'mds'")


def test_cli_nmf(digits, capsys, tmp_path: Path):
    root, store = digits
    code, out, _ = cli(capsys, "--store", root, "nmf", "digits", "fc2.weight", "--factors", "2",
                       "--json", "-o", str(tmp_path / "f.svg"))
    assert code == 0
    doc = json.loads(out)
    with store.snapshot("digits") as snap:
        ref = core.one_sided_nmf(snap.read("fc2.weight"), 2)
    assert doc["n_factors"] == 2 and math.isclose(doc["relative_error"], ref.relative_error)
    np.testing.assert_allclose(doc["channel"], ref.channel, rtol=1e-12)
    np.testing.assert_allclose(doc["spatial"], ref.spatial, rtol=1e-12, atol=1e-15)
    assert (tmp_path / "f.svg").read_text().startswith("<svg")
    code, out, _ = cli(capsys, "--store", root, "nmf", "digits", "fc2.weight")
    assert code == 0 and "one-sided NMF, 3 factors" in out  # the default
    code, _, err = cli(capsys, "--store", root, "nmf", "digits", "fc2.weight", "--neuron", "1")
    assert code == 1 and err.strip() == ("error: tensor 'fc2.weight': per-neuron NMF needs a "
                                         "conv weight [out, in, h, w], got shape [32, 64]")
    code, _, err = cli(capsys, "--store", root, "nmf", "digits", "fc2.weight", "--neuron", "1",
                       "--factors", "2")
    assert code == 1 and "give --factors K or --neuron N, not both" in err
    # per-neuron colours of a convolution, in a store of its own
    rng = np.random.default_rng(2)
    conv = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    Store(tmp_path / "c", create=True).write(RecordsSource([TensorRecord(
        "conv.weight", conv, kind="conv2d", layout=CONV)]), "cnn", step=1).close()
    code, out, _ = cli(capsys, "--store", str(tmp_path / "c"), "nmf", "cnn", "conv.weight",
                       "--neuron", "0", "--neuron", "4", "--json", "-o", str(tmp_path / "r.png"))
    assert code == 0
    doc = json.loads(out)
    assert [n["neuron"] for n in doc["neurons"]] == [0, 4]
    for n in doc["neurons"]:
        np.testing.assert_allclose(n["rgb"], core.neuron_rgb(conv, n["neuron"]), rtol=1e-12)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_trajectory(digits, capsys, tmp_path: Path):
    root, store = digits
    code, out, _ = cli(capsys, "--store", root, "trajectory", "digits", "--json", "-o",
                       str(tmp_path / "t.vl.json"), "--metric", "update_norm")
    assert code == 0
    doc = json.loads(out)
    ref = core.trajectory(store, "digits").to_pylist()
    assert doc["model"] == "digits" and close(doc["rows"], ref)
    # against NumPy on the checkpoints' weights
    snaps = [store.snapshot(f"digits@{s}") for s in (1, 10, 60)]
    w = [s.read("fc1.weight").astype(np.float64) for s in snaps]
    rows = [r for r in doc["rows"] if r["tensor"] == "fc1.weight"]
    assert math.isclose(rows[2]["update_norm"], np.linalg.norm(w[2] - w[1]), rel_tol=1e-12)
    assert math.isclose(rows[2]["relative_distance"],
                        np.linalg.norm(w[2] - w[0]) / np.linalg.norm(w[0]), rel_tol=1e-12)
    for s in snaps:
        s.close()
    chart = json.loads((tmp_path / "t.vl.json").read_text())
    assert meta(chart)["metric"] == "update_norm"
    assert close(meta(chart)["values"], [r["update_norm"] for r in ref])
    code, out, _ = cli(capsys, "--store", root, "trajectory", "digits", "--pca", "--json")
    assert code == 0
    doc = json.loads(out)
    pca = core.trajectory_pca(store, "digits")
    assert close(doc["points"], pca.to_pylist()) and len(doc["points"]) == 3
    code, out, _ = cli(capsys, "--store", root, "trajectory", "digits")
    assert code == 0 and "fc3.weight" in out and "first" in out
    for args, message in (
            (("digits@10",), "give the model name alone ('digits'), not 'digits@10'"),
            (("digits", "--metric", "speed"), "--metric 'speed'; expected one of"),
            (("nope",), "no model 'nope' (models: digits)")):
        code, _, err = cli(capsys, "--store", root, "trajectory", *args)
        assert code == 1 and message in err and err.count("\n") == 1, args
