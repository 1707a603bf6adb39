"""The model report's page: sections and links, hostile names, the byte budget, laziness."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
import weightatlas.viz as viz
from tests.test_viz_export import check_page, parse_page
from tests.test_viz_helpers import HOSTILE, meta, strings_outside_data
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Snapshot:
    rng = np.random.default_rng(4)
    store = Store(tmp_path_factory.mktemp("report") / "store", create=True)
    recs = [
        TensorRecord("embed.weight", rng.standard_normal((5000, 96)).astype(np.float32),
                     kind="embedding", layout=("vocab", "dim")),
        TensorRecord("conv.weight", rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
                     kind="conv2d", layout=("out", "in", "h", "w")),
        TensorRecord("proj.weight", rng.standard_normal((96, 16, 1, 1)).astype(np.float32),
                     kind="conv2d", layout=("out", "in", "h", "w")),
        TensorRecord("norm.weight", np.ones(96, np.float32), kind="norm", layout=("out",)),
        TensorRecord("steps", np.array(7, np.int64)),
    ]
    for i, name in enumerate(HOSTILE):
        w = rng.standard_normal((12, 10)).astype(np.float32)
        if i == 0:
            w[0, 0] = np.nan
        recs.append(TensorRecord(name, w, kind="linear", layout=("out", "in")))
    return store.write(RecordsSource(recs), "net", step=5)


def test_report_has_a_linked_section_per_tensor(model: Snapshot):
    page = viz.report_html(model)
    specs = check_page(page)
    n = len(model)
    sections = re.findall(r'<section class="tensor" id="t-(\d+)"><h3>(.*?)</h3>', page)
    assert [int(i) for i, _ in sections] == list(range(n))
    assert [html.unescape(t) for _, t in sections] == model.names  # names shown literally
    for i in range(n):
        assert page.count(f'href="#t-{i}"') >= 2  # from the index, and from a neighbour
    chart_ids = re.findall(r'<div class="wa-chart" data-spec="([^"]+)"', page)
    json_ids = [attrs["id"] for attrs, _ in parse_page(page).scripts
                if attrs.get("type") == "application/json"]
    assert chart_ids == json_ids and len(specs) == len(chart_ids)
    # a histogram per tensor of 2+ values, a heatmap per matrix or kernel, kernels for 3x3
    assert [c for c in chart_ids if c.endswith("-h")] == [f"s-{i}-h" for i in range(n)
                                                           if i != 4]  # "steps" is a scalar
    assert len([c for c in chart_ids if c.endswith("-m")]) == 3 + len(HOSTILE)
    assert [c for c in chart_ids if c.endswith("-k")] == ["s-1-k"]
    assert 'data-spec="s-overview" data-eager' in page  # drawn first; the rest lazily
    overview = specs[0]
    assert meta(overview)["links"] is True and meta(overview)["tensors"] == n
    assert "1 tensor(s) hold NaN or Inf" in page and '<a href="#t-5">' in page


def test_report_names_are_escaped_text_and_data(model: Snapshot):
    page = viz.report_html(model)
    body = page.split("<body", 1)[1]
    for name in HOSTILE:
        assert html.escape(name) in body
    visible = re.sub(r"<script.*?</script>", "", body, flags=re.S)
    assert "<img" not in visible and "alert(1)</script>" not in visible
    assert "onerror" not in re.sub(r"&lt;img src=x onerror=alert\(2\)&gt;", "", visible)
    for spec in check_page(page):
        leaks = [s for _, s in strings_outside_data(spec) if any(h in s for h in HOSTILE)]
        assert leaks == []


def test_report_heatmaps_share_the_byte_budget(model: Snapshot):
    roomy = check_page(viz.report_html(model))
    tight = check_page(viz.report_html(model, max_bytes=400_000))
    cells = {meta(s)["shape"][0]: meta(s)["cells"] for s in tight
             if meta(s)["view"] == "heatmap" and meta(s)["mode"] == "matrix"}
    roomy_cells = {meta(s)["shape"][0]: meta(s)["cells"] for s in roomy
                   if meta(s)["view"] == "heatmap" and meta(s)["mode"] == "matrix"}
    assert cells[5000] < roomy_cells[5000] <= 2048
    assert sum(len(json.dumps(s)) for s in tight) < sum(len(json.dumps(s)) for s in roomy)
    embed = next(s for s in roomy if meta(s).get("shape") == [5000, 96])
    assert meta(embed)["aggregated"] is True  # and the chart says so
    texts = [json.loads(v)[0]["text"] for k, v in embed["datasets"].items()
             if '"text"' in v]
    assert any("aggregated: 5000×96 values" in line for t in texts for line in t[0])


def test_report_api_from_a_store(tmp_path: Path):
    from weightatlas.adapters import safetensors

    safetensors.write({"fc.weight": np.eye(4, dtype=np.float32),
                       "fc.bias": np.zeros(4, np.float32)}, tmp_path / "m.safetensors")
    wa.ingest(tmp_path / "m.safetensors", store=tmp_path / "store", step=2)
    out = wa.report("m@2", tmp_path / "r.html", store=tmp_path / "store", bins=8)
    specs = check_page(out.read_text())
    hist = [s for s in specs if meta(s)["view"] == "histogram"]
    assert [meta(s)["bins"] for s in hist] == [8, 8]
    chart = wa.plot("overview", "m", store=tmp_path / "store")
    assert meta(chart.to_dict())["tensors"] == 2


def test_report_of_an_empty_snapshot(store: Store):
    snap = store.write(RecordsSource([]), "empty", step=0)
    page = viz.report_html(snap)
    assert check_page(page) == [] and "No tensors." in page
