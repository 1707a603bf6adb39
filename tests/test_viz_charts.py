"""Chart specs, asserted on ``chart.to_dict()``: encodings, the zero-centred Distill scale, the
data every cell shows (against NumPy on the raw arrays), aggregation metadata and size."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

import weightatlas.viz as viz
from tests.test_viz_helpers import (
    DISTILL,
    HOSTILE,
    columns,
    distill_rgb,
    header,
    layers,
    main,
    mark_type,
    meta,
    nodes,
    rendered_marks,
    rgb,
    strings_outside_data,
)
from tests.test_viz_reduce import reference_blocks
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    ResourceLimitError,
    ShapeError,
    UnsupportedError,
)
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord


def _records(rng: np.random.Generator, noise: float = 0.0) -> list[TensorRecord]:
    def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    bad = f32(10, 10)
    bad[2, 3], bad[4, 4], bad[9, 0] = np.nan, np.inf, -np.inf
    recs = [
        TensorRecord("conv.weight", f32(12, 5, 3, 3, scale=0.3), kind="conv2d",
                     layout=("out", "in", "h", "w")),
        TensorRecord("conv.bias", f32(12), kind="conv2d", layout=("out",)),
        TensorRecord("fc1.weight", f32(40, 24), kind="linear", layout=("out", "in")),
        TensorRecord("emb.weight", f32(3000, 64, scale=0.02), kind="embedding",
                     layout=("vocab", "dim")),
        TensorRecord("bn.running_var", np.abs(f32(12)) + 0.5, kind="norm", layout=("out",)),
        TensorRecord("bad.weight", bad, kind="linear", layout=("out", "in")),
    ]
    if noise:
        recs = [TensorRecord(r.name, (r.data + noise * rng.standard_normal(r.data.shape))
                             .astype(np.float32), kind=r.kind, layout=r.layout) for r in recs]
    return recs


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Snapshot, Snapshot]:
    store = Store(tmp_path_factory.mktemp("viz") / "store", create=True)
    a = store.write(RecordsSource(_records(np.random.default_rng(7))), "net", step=1)
    b = store.write(RecordsSource(_records(np.random.default_rng(7), noise=0.01)), "net", step=2)
    return a, b


def scale_of(node: dict) -> dict:
    return node["encoding"]["color"]["scale"]


def assert_distill(scale: dict, m: float, rel: float = 1e-12) -> None:
    assert scale["range"] == DISTILL
    np.testing.assert_allclose(scale["domain"], [-m, -m / 2, 0.0, m / 2, m], rtol=rel)
    assert scale["domain"][0] == -scale["domain"][-1]  # symmetric around zero
    assert scale["interpolate"] == "rgb" and scale["clamp"] is True


# ---- heatmap -----------------------------------------------------------------------------------


def test_heatmap_of_a_matrix_shows_every_value_exactly(snaps):
    a, _ = snaps
    w = a.read("fc1.weight")
    spec = viz.heatmap(a, "fc1.weight").to_dict()
    node = main(spec)
    cols = columns(spec, node)
    assert cols["v"] == [float(str(v)) for v in w.ravel()]  # float32 values, exactly
    assert cols["r0"] == np.repeat(np.arange(40), 24).tolist()
    assert cols["c0"] == np.tile(np.arange(24), 40).tolist()
    enc = node["encoding"]
    assert enc["x"]["field"] == "c0" and enc["x"]["type"] == "quantitative"
    assert enc["x"]["title"] == "in" and enc["y"]["axis"]["title"] == "out"
    assert enc["y"]["scale"]["reverse"] is True and enc["y"]["scale"]["domain"] == [0, 40]
    assert enc["x"]["scale"]["domain"] == [0, 24]
    m = float(np.abs(w).max())
    assert_distill(scale_of(node), m)
    assert enc["color"]["condition"]["value"] == "#000000"  # NaN/Inf drawn black
    assert enc["color"]["legend"] == {"format": ".3~g"} and enc["color"]["title"] == "weight"
    assert [t["field"] for t in enc["tooltip"]] == ["r0", "c0", "v"]
    assert meta(spec) == {"view": "heatmap", "mode": "matrix", "shape": [40, 24],
                          "grid": [40, 24], "block": [1, 1], "aggregated": False,
                          "agg": "none", "cells": 960, "domain": [-m, m]}
    assert header(spec) == ["fc1.weight", "float32 [40, 24] linear in net@1"]


@pytest.mark.parametrize("agg", ["maxabs", "mean"])
def test_heatmap_pools_large_tensors_honestly(snaps, agg: str):
    a, _ = snaps
    w = a.read("emb.weight")
    spec = viz.heatmap(a, "emb.weight", max_cells=512, agg=agg).to_dict()
    info = meta(spec)
    factors = tuple(info["block"])
    assert info["aggregated"] is True and info["agg"] == agg
    assert factors == viz.block_grid((3000, 64), 512)
    assert info["cells"] <= 512 and info["grid"] == [math.ceil(3000 / factors[0]),
                                                     math.ceil(64 / factors[1])]
    node = main(spec)
    cols = columns(spec, node)
    ref = reference_blocks(w, factors)
    assert cols["lo"] == [float(str(np.float32(v))) for v in ref["min"].ravel()]
    assert cols["hi"] == [float(str(np.float32(v))) for v in ref["max"].ravel()]
    np.testing.assert_allclose(cols["mu"], ref["mean"].ravel(), rtol=1e-6, atol=1e-9)
    calc = {t["as"]: t["calculate"] for t in node["transform"] if "calculate" in t}
    shown = ref["maxabs"] if agg == "maxabs" else ref["mean"]
    assert calc["v"] == ("abs(datum.hi) >= abs(datum.lo) ? datum.hi : datum.lo"
                         if agg == "maxabs" else "datum.mu")
    assert calc["r1"] == f"min(datum.r0 + {factors[0]}, 3000)"
    m = float(np.abs(shown).max())
    assert_distill(scale_of(node), m, rel=1e-6)
    if agg == "maxabs":
        assert m == float(np.abs(w).max())  # the largest weight is always visible
    titles = [t.get("title") for t in node["encoding"]["tooltip"]]
    assert titles[:2] == ["vocab", "dim"] and "block mean" in titles and "block max" in titles
    lines = header(spec)
    assert any(f"blocks of {factors[0]}×{factors[1]}" in s and "3000×64 values" in s
               for s in lines)


def test_heatmap_of_a_convolution_is_a_grid_of_kernels(snaps):
    a, _ = snaps
    w = a.read("conv.weight")
    spec = viz.heatmap(a, "conv.weight").to_dict()
    node = main(spec)
    cols = columns(spec, node)
    o, i, ky, kx = (np.array(cols[k]) for k in ("o0", "i0", "ky", "kx"))
    np.testing.assert_array_equal(np.array(cols["v"], np.float32), w[o, i, ky, kx])
    assert len(cols["v"]) == w.size and meta(spec)["mode"] == "conv"
    assert node["encoding"]["x"]["scale"]["domain"] == [0, 5]
    assert node["encoding"]["x"]["title"] == "in (each cell one 3×3 kernel)"
    assert_distill(scale_of(node), float(np.abs(w).max()))
    pooled = viz.heatmap(a, "conv.weight", max_cells=100).to_dict()
    pm = meta(pooled)
    assert pm["aggregated"] and pm["block"][2:] == [1, 1]  # kernels stay whole
    ref = reference_blocks(w, tuple(pm["block"]))
    pc = columns(pooled, main(pooled))
    assert pc["hi"] == [float(str(np.float32(v))) for v in ref["max"].ravel()]


def test_heatmap_of_one_output_neuron(snaps):
    a, _ = snaps
    w = a.read("conv.weight")
    spec = viz.heatmap(a, "conv.weight", out=7).to_dict()
    cols = columns(spec, main(spec))
    i, ky, kx = (np.array(cols[k]) for k in ("i0", "ky", "kx"))
    np.testing.assert_array_equal(np.array(cols["v"], np.float32), w[7][i, ky, kx])
    assert meta(spec)["mode"] == "neuron"
    assert_distill(scale_of(main(spec)), float(np.abs(w[7]).max()))  # normalised per neuron
    with pytest.raises(ShapeError, match=r"12 output neurons; out=12 is outside 0..11"):
        viz.heatmap(a, "conv.weight", out=12)
    with pytest.raises(UnsupportedError, match=r"out=0 picks an output neuron.*'fc1.weight'"):
        viz.heatmap(a, "fc1.weight", out=0)


def test_heatmap_draws_nan_and_inf_black_and_says_so(snaps):
    a, _ = snaps
    spec = viz.heatmap(a, "bad.weight").to_dict()
    node = main(spec)
    cols = columns(spec, node)
    assert [k for k, f in enumerate(cols["nf"]) if f] == [23, 44, 90]
    assert [cols["raw"][k] for k in (23, 44, 90)] == ["NaN", "+Inf", "-Inf"]
    assert [cols["v"][k] for k in (23, 44, 90)] == [None, None, None]
    assert "1 NaN and 2 ±Inf values: cells holding any are drawn black" in header(spec)
    fills = [it["fill"] for it in rendered_marks(spec, "rect")]
    assert len(fills) == 100 and fills.count("#000000") == 3
    pooled = viz.heatmap(a, "bad.weight", max_cells=25).to_dict()
    assert sum(columns(pooled, main(pooled))["nf"]) == 3


def test_heatmap_colours_are_the_distill_scale(tmp_path):
    values = np.array([[-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 3.0]], np.float32)
    spec = viz.heatmap(values, "w", domain=2.0).to_dict()
    items = sorted(rendered_marks(spec, "rect"), key=lambda it: it["x"])
    got = [rgb(it["fill"]) for it in items]
    want = [distill_rgb(float(v), 2.0) for v in values[0]]
    assert max(abs(g - w) for gs, ws in zip(got, want, strict=True)
               for g, w in zip(gs, ws, strict=True)) <= 1
    assert got[3] == (247, 247, 247) and got[-1] == rgb("#CA0020") and got[0] == rgb("#0571B0")


@pytest.mark.slow
def test_specs_stay_under_one_megabyte_for_fifty_million_values():
    rng = np.random.default_rng(3)
    big = rng.standard_normal((50_000, 1000), dtype=np.float32)
    chart = viz.heatmap(big, "embedding")
    text = json.dumps(chart.to_dict())
    assert len(text) <= 1_000_000 and meta(chart.to_dict())["aggregated"]
    assert len(chart.to_json()) <= 1_000_000
    spec = viz.histogram(big, "embedding").to_dict()
    assert sum(meta(spec)["counts"]) == big.size and len(json.dumps(spec)) <= 1_000_000
    conv = big.reshape(-1)[: 1000 * 1000 * 49].reshape(1000, 1000, 7, 7)  # 49 M values
    spec = viz.heatmap(conv, "conv").to_dict()
    assert len(json.dumps(spec)) <= 1_000_000 and meta(spec)["mode"] == "conv"


def test_max_bytes_is_a_budget(snaps):
    a, _ = snaps
    spec = viz.heatmap(a, "emb.weight", max_bytes=60_000).to_dict()
    assert len(json.dumps(spec, separators=(",", ":"))) <= 60_000
    assert meta(spec)["cells"] < 4096
    with pytest.raises(ResourceLimitError, match=r"over the budget of max_bytes=2000"):
        viz.heatmap(a, "emb.weight", max_bytes=2000)


def test_heatmap_input_errors(snaps):
    a, _ = snaps
    with pytest.raises(NotFoundError, match=r"no tensor 'fc9\.weight'; did you mean"):
        viz.heatmap(a, "fc9.weight")
    with pytest.raises(NotFoundError, match=r"snapshot net@1 holds 6 tensors; name one"):
        viz.heatmap(a)
    with pytest.raises(UnsupportedError, match="agg='median'; expected one of maxabs, mean"):
        viz.heatmap(a, "fc1.weight", agg="median")
    with pytest.raises(UnsupportedError, match="has dtype <U1"):
        viz.heatmap(np.array(["a"]), "s")
    with pytest.raises(ShapeError, match=r"shape \[0, 3\], no values"):
        viz.heatmap(np.zeros((0, 3)), "empty")


def test_heatmap_of_vectors_scalars_and_higher_ranks():
    spec = viz.heatmap(np.arange(5.0) - 2, "b").to_dict()
    assert meta(spec)["shape"] == [1, 5] and columns(spec, main(spec))["v"] == [-2, -1, 0, 1, 2]
    spec = viz.heatmap(np.float32(3.5), "s").to_dict()
    assert columns(spec, main(spec))["v"] == [3.5]
    x = np.arange(24.0).reshape(2, 3, 4)
    spec = viz.heatmap(x, "t").to_dict()
    assert meta(spec)["shape"] == [2, 12] and main(spec)["encoding"]["x"]["title"] == \
        "d1·d2 (flattened)"


# ---- kernels -----------------------------------------------------------------------------------


def test_kernels_rank_inputs_by_l2_norm_on_one_scale(snaps):
    a, _ = snaps
    w = a.read("conv.weight").astype(np.float64)
    spec = viz.kernels(a, "conv.weight", neurons=[3, 0], top=4).to_dict()
    assert meta(spec)["neurons"] == [3, 0] and meta(spec)["top"] == 4
    node = main(spec)
    facet = next(v for v in layers(spec) if mark_type(v) == "rect")
    assert facet is node
    body = spec["vconcat"][1]
    cols = columns(spec, body)
    shown = []
    for o in (3, 0):
        norms = np.sqrt((w[o] ** 2).sum(axis=(1, 2)))
        order = np.argsort(-norms, kind="stable")[:4]
        rows = [k for k, oo in enumerate(cols["o"]) if oo == o]
        got_inputs = [cols["i"][k] for k in rows[::9]]
        assert got_inputs == order.tolist()
        np.testing.assert_allclose([cols["norm"][k] for k in rows[::9]], norms[order])
        for rank, i in enumerate(order, start=1):
            cells = [k for k in rows if cols["rank"][k] == rank]
            np.testing.assert_array_equal(
                np.array([cols["v"][k] for k in cells], np.float32),
                w[o, i].astype(np.float32).ravel())
            shown.append(np.abs(w[o, i]).max())
    assert_distill(scale_of(node), max(shown), rel=1e-6)
    assert body["facet"]["row"]["field"] == "o" and body["facet"]["column"]["field"] == "rank"


def test_kernels_errors(snaps):
    a, _ = snaps
    with pytest.raises(UnsupportedError, match=r"'fc1.weight' has shape \[40, 24\].*expected a "
                                                r"convolution kernel"):
        viz.kernels(a, "fc1.weight")
    with pytest.raises(ShapeError, match=r"12 output neurons; neurons \[12\] are not in 0..11"):
        viz.kernels(a, "conv.weight", neurons=[1, 12])
    with pytest.raises(ShapeError, match="top=0; show at least 1"):
        viz.kernels(a, "conv.weight", top=0)


# ---- distributions -----------------------------------------------------------------------------


def test_histogram_counts_match_numpy_and_show_nonfinite(snaps):
    a, _ = snaps
    w = a.read("bad.weight")
    spec = viz.histogram(a, "bad.weight", bins=12).to_dict()
    finite = w[np.isfinite(w)].astype(np.float64)
    counts, edges = np.histogram(finite, bins=12)
    assert meta(spec)["counts"] == counts.tolist()
    cols = columns(spec, main(spec))
    assert cols["n"] == counts.tolist() and cols["x0"] == edges[:-1].tolist()
    assert cols["x1"] == edges[1:].tolist()
    assert (meta(spec)["n_nan"], meta(spec)["n_posinf"], meta(spec)["n_neginf"]) == (1, 1, 1)
    lines = header(spec)
    assert "NaN 1 · +Inf 1 · −Inf 1 (counted, not binned)" in lines
    assert any(f"97 finite values in 12 bins · mean {finite.mean():.4g}" in s for s in lines)
    m = max(abs(edges[0]), abs(edges[-1]))
    assert_distill(main(spec)["encoding"]["color"]["scale"], m)
    log = viz.histogram(a, "fc1.weight", log=True).to_dict()
    assert main(log)["encoding"]["y"]["scale"]["type"] == "symlog"


def test_ridgeline_in_model_order_with_each_tensors_histogram(snaps):
    a, _ = snaps
    spec = viz.ridgeline(a, bins=10).to_dict()
    names = ["conv.weight", "fc1.weight", "emb.weight", "bad.weight"]  # ndim >= 2, in order
    assert meta(spec)["tensors"] == 4
    body = spec["vconcat"][1]
    cols = columns(spec, body)
    lookup = next(t for t in body["transform"] if "lookup" in t)
    labels = json.loads(spec["datasets"][lookup["from"]["data"]["name"]])
    assert [r["name"] for r in labels] == names
    for t, name in enumerate(names):
        w = a.read(name)
        counts = np.histogram(w[np.isfinite(w)].astype(np.float64), bins=10)[0]
        got = [n for tt, n in zip(cols["t"], cols["n"], strict=True) if tt == t]
        assert got == counts.tolist()
        assert labels[t]["std"] == pytest.approx(np.nanstd(np.where(np.isfinite(w), w, np.nan)
                                                           .astype(np.float64)), rel=1e-9)
    assert body["facet"]["row"]["sort"] == {"field": "t", "op": "min"}
    with pytest.raises(NotFoundError, match="no tensor 'nope'"):
        viz.ridgeline(a, names=["fc1.weight", "nope"])
    spec = viz.ridgeline({"x": np.arange(10.0)}, bins=5).to_dict()
    assert columns(spec, spec["vconcat"][1])["n"] == [2, 2, 2, 2, 2]


# ---- overview ----------------------------------------------------------------------------------


def test_overview_rows_are_tensors_in_model_order_with_their_statistics(snaps):
    a, _ = snaps
    spec = viz.overview(a).to_dict()
    body = spec["vconcat"][1]
    cols = columns(spec, body)
    assert cols["name"] == a.names
    for k, name in enumerate(a.names):
        w = a.read(name).astype(np.float64)
        fin = w[np.isfinite(w)]
        assert cols["numel"][k] == w.size
        assert cols["l2"][k] == pytest.approx(np.sqrt((fin ** 2).sum()), rel=1e-9)
        assert cols["std"][k] == pytest.approx(fin.std(), rel=1e-9)
        assert cols["abs_max"][k] == pytest.approx(np.abs(fin).max(), rel=1e-12)
        assert cols["frac_zero"][k] == (w == 0).sum() / w.size
        assert cols["bad"][k] == int((~np.isfinite(w)).sum())
    fields = [p["encoding"]["x"]["field"] for p in body["hconcat"]]
    assert fields == ["numel_log", "l2_log", "std_log", "abs_max_log", "frac_zero", "bad"]
    std_panel = body["hconcat"][2]
    assert std_panel["transform"] == [{"calculate": "datum.std > 0 ? datum.std : null",
                                       "as": "std_log"}]  # log axes leave zeros out
    positive = [v for v in cols["std"] if v > 0]
    assert std_panel["encoding"]["x"]["scale"] == {
        "type": "log", "domain": [10.0 ** math.floor(math.log10(min(positive))), max(positive)]}
    param = spec["params"][0]
    assert param["bind"]["options"] == ["all", "linear", "conv2d", "embedding", "norm"]
    assert body["transform"][-1]["filter"] == "kind_filter == 'all' || datum.kind == kind_filter"
    only = viz.overview(a, kinds=["linear"]).to_dict()
    assert columns(only, only["vconcat"][1])["name"] == ["fc1.weight", "bad.weight"]
    linked = viz.overview(a, links=True).to_dict()
    assert columns(linked, linked["vconcat"][1])["href"][:2] == ["#t-0", "#t-1"]
    assert viz.overview(a.tensors()).to_dict()["usermeta"]["weightatlas"]["tensors"] == 6
    with pytest.raises(FormatError, match="lacks column"):
        viz.overview(pa.table({"name": ["x"]}))
    with pytest.raises(NotFoundError, match="no tensors to show"):
        viz.overview(a, kinds=["attention"])


# ---- comparisons -------------------------------------------------------------------------------


def test_compare_and_agreement_against_numpy(snaps):
    a, b = snaps
    table = viz.compare(a, b)
    assert table.column("a_name").to_pylist() == a.names
    for row in table.to_pylist():
        x = a.read(row["a_name"]).astype(np.float64).ravel()
        y = b.read(row["b_name"]).astype(np.float64).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        assert row["rel_l2"] == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-9)
        assert row["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y),
                                              rel=1e-9)
        assert row["max_abs_diff"] == pytest.approx(np.abs(y - x).max(), rel=1e-12)
        assert row["status"] == "ok" and row["method"] == "name"
    spec = viz.agreement(a, b).to_dict()
    cols = columns(spec, spec["vconcat"][1])
    assert cols["label"] == a.names and cols["rel"] == table.column("rel_l2").to_pylist()
    assert header(spec)[0] == "Agreement of net@1 (A) and net@2 (B)"


def test_comparisons_follow_a_given_alignment(snaps):
    a, b = snaps
    alignment = pa.table({"a_name": ["fc1.weight", "conv.weight", "gone"],
                          "b_name": ["bad.weight", "conv.weight", "x"],
                          "method": ["structure", "hash", "name"], "confidence": [0.5, 1, 1]})
    rows = viz.compare(a, b, alignment).to_pylist()
    assert [r["status"] for r in rows] == ["shape [40, 24] vs [10, 10]", "ok", "missing in A"]
    spec = viz.agreement(a, b, alignment=alignment).to_dict()
    assert columns(spec, spec["vconcat"][1])["label"][0] == "fc1.weight → bad.weight"
    core_like = pa.table({"a": ["fc1.weight"], "b": ["fc1.weight"], "method": ["name"],
                          "confidence": [1.0], "rel_l2": [0.1], "cosine": [0.99],
                          "max_abs_diff": [0.2], "verdict": ["changed"]})
    spec = viz.agreement(core_like).to_dict()
    assert columns(spec, spec["vconcat"][1])["status"] == ["changed"]
    from types import SimpleNamespace  # the shape of core's Comparison: .pairs, .a, .b

    spec = viz.agreement(SimpleNamespace(pairs=core_like, a="x@1", b="x@2")).to_dict()
    assert header(spec)[0] == "Agreement of x@1 (A) and x@2 (B)"
    with pytest.raises(FormatError, match="expected two snapshots or a table"):
        viz.agreement([1, 2])
    with pytest.raises(FormatError, match="alignment table lacks column"):
        viz.compare(a, b, pa.table({"a_name": ["x"]}))
    with pytest.raises(NotFoundError, match="the alignment pairs no tensor of net@2 with 'emb"):
        viz.diff(a, b, "emb.weight", alignment=alignment)
    renamed = pa.table({"a_name": ["fc1.weight"], "b_name": ["fc1.weight"],
                        "method": ["given"], "confidence": [1.0]})
    assert meta(viz.diff(a, b, "fc1.weight", alignment=renamed).to_dict())["view"] == "diff"


def test_diff_heatmap_shows_b_minus_a(snaps):
    a, b = snaps
    spec = viz.diff(a, b, "fc1.weight").to_dict()
    node = main(spec)
    delta = b.read("fc1.weight").astype(np.float64) - a.read("fc1.weight")
    assert columns(spec, node)["v"] == delta.ravel().tolist()
    assert_distill(scale_of(node), float(np.abs(delta).max()))
    assert node["encoding"]["color"]["title"] == "B − A"
    assert header(spec)[:2] == ["fc1.weight", "float32 [40, 24] linear in net@1; A = net@1, "
                                              "B = net@2"]
    with pytest.raises(ShapeError, match=r"shape \[2, 2\] and 'B' has \[2, 3\]"):
        viz.diff(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(NotFoundError, match="two snapshots or two arrays"):
        viz.diff(a, np.zeros(3), "fc1.weight")


def test_scatter_points_and_binned(snaps):
    a, b = snaps
    spec = viz.scatter(a, b, "fc1.weight").to_dict()
    cols = columns(spec, main(spec, "circle"))
    assert cols["a"] == [float(str(v)) for v in a.read("fc1.weight").ravel()]
    assert cols["b"] == [float(str(v)) for v in b.read("fc1.weight").ravel()]
    assert meta(spec)["binned"] is False and meta(spec)["points"] == 960
    spec = viz.scatter(a, b, "emb.weight", bins=20).to_dict()
    x, y = a.read("emb.weight").astype(np.float64).ravel(), b.read("emb.weight").ravel()
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    ref = np.histogram2d(x, y, bins=20, range=[[lo, hi], [lo, hi]])[0].astype(np.int64)
    cols = columns(spec, main(spec))
    assert sorted(cols["n"]) == sorted(ref[ref > 0].tolist())
    assert meta(spec)["binned"] is True and meta(spec)["points"] == x.size
    assert main(spec)["encoding"]["color"]["scale"]["type"] == "log"
    spec = viz.scatter(a, b, "bad.weight").to_dict()
    assert meta(spec)["skipped"] == 3


# ---- safety and conventions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Snapshot, Snapshot]:
    rng = np.random.default_rng(11)
    store = Store(tmp_path_factory.mktemp("hostile") / "store", create=True)
    recs = [TensorRecord(n, rng.standard_normal((6, 4, 3, 3)).astype(np.float32), kind="conv2d",
                         layout=("out", "in", "h", "w")) for n in HOSTILE]
    a = store.write(RecordsSource(recs), "evil", step=1)
    b = store.write(RecordsSource([TensorRecord(r.name, r.data * 2, kind=r.kind, layout=r.layout)
                                   for r in recs]), "evil", step=2)
    return a, b


def every_view(a: Snapshot, b: Snapshot, name: str) -> dict[str, object]:
    return {
        "heatmap": viz.heatmap(a, name), "neuron": viz.heatmap(a, name, out=1),
        "kernels": viz.kernels(a, name, top=2), "histogram": viz.histogram(a, name),
        "ridgeline": viz.ridgeline(a), "overview": viz.overview(a, links=True),
        "agreement": viz.agreement(a, b), "diff": viz.diff(a, b, name),
        "scatter": viz.scatter(a, b, name), "binned": viz.scatter(a, b, name, max_points=10),
    }


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
def test_tensor_names_are_only_ever_data(hostile, name: str):
    a, b = hostile
    for view, chart in every_view(a, b, name).items():
        spec = chart.to_dict()  # type: ignore[attr-defined]
        leaks = [(p, s) for p, s in strings_outside_data(spec) if any(h in s for h in HOSTILE)]
        assert leaks == [], view
        text = json.dumps(spec)
        assert json.dumps(name)[1:-1] in text, view  # it is there, as data


def test_every_view_renders_to_png_and_svg(hostile):
    a, b = hostile
    for view, chart in every_view(a, b, HOSTILE[0]).items():
        png = viz.to_png(chart)  # type: ignore[arg-type]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, view
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 100 and height > 60, view
        svg = viz.to_svg(chart)  # type: ignore[arg-type]
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>"), view
        assert "<script" not in svg, view


def test_theme_is_registered_and_carries_the_conventions():
    import altair as alt

    with alt.theme.enable("default"):
        viz.heatmap(np.eye(2), "w")
        assert alt.theme.active == "weightatlas"
        spec = alt.Chart().mark_rect().to_dict()
        assert spec["config"]["range"]["diverging"] == DISTILL
        assert spec["config"]["range"]["ramp"] == {"scheme": "viridis"}
    with alt.theme.enable("dark"):  # a theme the user chose is left alone
        viz.register_theme()
        assert alt.theme.active == "dark"


def test_views_by_name(snaps):
    a, b = snaps
    assert list(viz.VIEWS) == ["heatmap", "kernels", "histogram", "ridgeline", "overview",
                               "agreement", "diff", "scatter", "esd", "alphas", "projection",
                               "trajectory", "trajectory_path", "nmf_rgb", "factors"]
    assert meta(viz.chart("diff", a, "fc1.weight", against=b).to_dict())["view"] == "diff"
    with pytest.raises(UnsupportedError, match="unknown view 'pie'; views: heatmap"):
        viz.chart("pie", a)
    with pytest.raises(NotFoundError, match="view 'heatmap' shows one tensor: name it"):
        viz.chart("heatmap", a)
    with pytest.raises(UnsupportedError, match="view 'overview' shows the whole snapshot"):
        viz.chart("overview", a, "fc1.weight")
    with pytest.raises(NotFoundError, match="compares two snapshots: give the second one"):
        viz.chart("scatter", a, "fc1.weight")
    with pytest.raises(UnsupportedError, match="view 'histogram' takes no option top"):
        viz.chart("histogram", a, "fc1.weight", top=3)
    with pytest.raises(UnsupportedError, match="shows one snapshot; --against"):
        viz.chart("overview", a, against=b)


def test_templates_stay_under_the_bound_that_lets_builders_skip_measuring(hostile):
    from weightatlas.viz._style import TEMPLATE_BYTES

    a, b = hostile
    for view, chart in every_view(a, b, HOSTILE[0]).items():
        spec = chart.to_dict(validate=False)  # type: ignore[attr-defined]
        total = len(json.dumps(spec, separators=(",", ":")))
        data = sum(len(json.dumps(v)) for _, v in nodes(spec) if isinstance(v, str)
                   and v.startswith("[{"))
        assert total - data < TEMPLATE_BYTES, view


def test_narrow_and_integer_dtypes_are_shown_exactly(store: Store):
    import ml_dtypes

    bf = (np.arange(-8, 8, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(4, 4)
    ints = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    snap = store.write(RecordsSource([TensorRecord("bf", bf), TensorRecord("q", ints)]), "n",
                       step=0)
    spec = viz.heatmap(snap, "bf").to_dict()
    shown = np.array(columns(spec, main(spec))["v"], np.float32)  # shortest decimals that
    np.testing.assert_array_equal(shown, bf.astype(np.float32).ravel())  # round-trip exactly
    assert header(spec)[1] == "bfloat16 [4, 4] other in n@0"
    spec = viz.heatmap(snap, "q").to_dict()
    assert columns(spec, main(spec))["v"] == ints.ravel().astype(float).tolist()
    assert meta(viz.histogram(snap, "q", bins=3).to_dict())["counts"] == [4, 4, 4]
