"""Exports (Vega-Lite, Vega, SVG, PNG, offline HTML), the ``plot`` and ``report`` commands,
and charts of real models checked against the files they came from."""

from __future__ import annotations

import html.parser
import json
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
import weightatlas.viz as viz
from tests._cli import run_cli as run
from tests.test_viz_helpers import HOSTILE, columns, header, main, meta
from weightatlas.errors import FormatError, UnsupportedError


class Scripts(html.parser.HTMLParser):
    """Every <script> element of a page: its attributes and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.other_sources: list[str] = []
        self._open: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self._open = dict(attrs)
            self.scripts.append((self._open, ""))
        elif any(k in ("src", "href") and v and "//" in v for k, v in attrs):
            self.other_sources.append(tag)

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._open = None


def parse_page(page: str) -> Scripts:
    parser = Scripts()
    parser.feed(page)
    return parser


def check_page(page: str) -> list[dict]:
    """Structure every offline page must have; returns the specs it holds."""
    parsed = parse_page(page)
    assert parsed.other_sources == []  # nothing fetched: no external src or href
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    specs = []
    nonces = set()
    for attrs, text in parsed.scripts:
        assert "src" not in attrs
        if attrs.get("type") == "application/json":
            assert "<" not in text and ">" not in text and "&" not in text
            assert "\u2028" not in text and "\u2029" not in text
            specs.append(json.loads(text))
        else:
            nonces.add(attrs["nonce"])  # every executable script carries the page's nonce
    assert len(nonces) == 1 and f"'nonce-{nonces.pop()}'" in page
    assert len(parsed.scripts) == len(specs) + 2  # the inlined libraries and the page's script
    return specs


def test_save_writes_every_format(tmp_path: Path, rng):
    chart = viz.heatmap(rng.standard_normal((6, 5)).astype(np.float32), "fc.weight")
    vl = json.loads(viz.save(chart, tmp_path / "c.vl.json").read_text())
    assert vl["$schema"].startswith("https://vega.github.io/schema/vega-lite/v6")
    assert vl["config"]["range"]["diverging"] == list(viz.DISTILL_COLORS)  # the theme
    assert json.loads(viz.save(chart, tmp_path / "c.json").read_text())["layer"]
    vg = json.loads(viz.save(chart, tmp_path / "c.vg.json").read_text())
    assert vg["$schema"].startswith("https://vega.github.io/schema/vega/v6") and vg["marks"]
    svg = viz.save(chart, tmp_path / "c.svg").read_text()
    assert svg.startswith("<svg") and "fc.weight" in svg
    png = viz.save(chart, tmp_path / "C.PNG").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = viz.save(chart, tmp_path / "c.html").read_text()
    assert check_page(page) == [viz.to_vega_lite(chart)]
    with pytest.raises(UnsupportedError, match=r"c\.pdf: unknown chart format; use one of "
                                               r"\.vl\.json"):
        viz.save(chart, tmp_path / "c.pdf")


def test_script_json_cannot_close_its_element():
    for name in HOSTILE:
        text = viz.script_json({"name": name, "spec": "</SCRIPT><!--"})
        assert "<" not in text and ">" not in text and "&" not in text
        assert "\u2028" not in text and json.loads(text)["name"] == name


def test_html_pins_the_bundled_libraries():
    versions = viz.javascript_versions()
    page = viz.to_html(viz.heatmap(np.eye(2), "w"))
    assert (f'vega {versions["vega"]}, vega-lite {versions["vega-lite"]}, vega-embed '
            f'{versions["vega-embed"]}') in page
    assert "vegaEmbed" in page and "https://cdn" not in page.split("<body")[1]
    assert versions["vega-lite"] == ".".join(viz.to_vega_lite(
        viz.heatmap(np.eye(2), "w"))["$schema"].split("/v")[-1].split(".")[:2])


# ---- real models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits_checkpoints: list[str]) -> Path:
    root = tmp_path_factory.mktemp("digits") / "store"
    for path in digits_checkpoints:
        step = int(Path(path).parent.name.split("-")[1])
        wa.ingest(path, store=root, model="digits", step=step)
    return root


def test_charts_of_the_digits_mlp_show_the_file_values(digits_store: Path,
                                                       digits_checkpoints: list[str]):
    from safetensors.numpy import load_file

    reference = load_file(digits_checkpoints[-1])  # step 60, read by the reference library
    snap = wa.open_store(digits_store).snapshot("digits@60")
    spec = viz.heatmap(snap, "fc1.weight").to_dict()
    cols = columns(spec, main(spec))
    np.testing.assert_array_equal(np.array(cols["v"], np.float32), reference["fc1.weight"].ravel())
    assert meta(spec)["shape"] == [64, 64] and header(spec)[0] == "fc1.weight"
    spec = viz.histogram(snap, "fc2.weight", bins=20).to_dict()
    assert meta(spec)["counts"] == np.histogram(reference["fc2.weight"].astype(np.float64),
                                                bins=20)[0].tolist()
    first = wa.open_store(digits_store).snapshot("digits@1")
    table = viz.compare(first, snap)
    w0 = load_file(digits_checkpoints[0])
    for row in table.to_pylist():
        x = w0[row["a_name"]].astype(np.float64).ravel()
        y = reference[row["b_name"]].astype(np.float64).ravel()
        assert row["rel_l2"] == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), 1e-9)


def test_kernels_of_resnet18_rank_like_torch(tmp_path: Path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    from tests.models import resnet18

    state = {k: v.contiguous() for k, v in resnet18(num_classes=10).state_dict().items()}
    st_torch.save_file(state, str(tmp_path / "r18.safetensors"))
    snap = wa.ingest(tmp_path / "r18.safetensors", store=tmp_path / "store")
    w = state["layer1.0.conv1.weight"]  # [64, 64, 3, 3]
    spec = viz.kernels(snap, "layer1.0.conv1.weight", neurons=[5, 9], top=6).to_dict()
    cols = columns(spec, spec["vconcat"][1])
    for o in (5, 9):
        norms = torch.linalg.vector_norm(w[o].double(), dim=(1, 2))
        want = torch.argsort(norms, descending=True, stable=True)[:6].tolist()
        got = [i for i, oo, ky, kx in zip(cols["i"], cols["o"], cols["ky"], cols["kx"],
                                          strict=True) if oo == o and ky == 0 and kx == 0]
        assert got == want
    spec = viz.heatmap(snap, "conv1.weight").to_dict()  # [64, 3, 7, 7]: 9408 values, pooled
    info = meta(spec)
    assert info["mode"] == "conv" and info["aggregated"] and info["block"][2:] == [1, 1]
    ref = state["conv1.weight"].abs().max().item()
    assert info["domain"] == [-ref, ref]


# ---- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("view,tensor,suffix,extra", [
    ("heatmap", "fc1.weight", ".png", ["--agg", "mean", "--max-cells", "256"]),
    ("heatmap", "fc1.weight", ".vl.json", []),
    ("histogram", "fc2.weight", ".svg", ["--bins", "15", "--log"]),
    ("ridgeline", None, ".vg.json", []),
    ("overview", None, ".html", []),
    ("agreement", None, ".svg", ["--against", "digits@1"]),
    ("diff", "fc1.weight", ".png", ["--against", "digits@1"]),
    ("scatter", "fc3.weight", ".vl.json", ["--against", "digits@10"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_plot_command(capsys, digits_store: Path, tmp_path: Path, view, tensor, suffix, extra):
    out = tmp_path / f"chart{suffix}"
    args = ["--store", str(digits_store), "plot", view, "digits@60",
            *([tensor] if tensor else []), "-o", str(out), *extra]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: {view}")
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:4] == b"\x89PNG"
    elif suffix == ".svg":
        assert data.startswith(b"<svg")
    elif suffix == ".html":
        check_page(data.decode())
    else:
        spec = json.loads(data)
        assert ("marks" in spec) == (suffix == ".vg.json")
    if suffix == ".vl.json":
        assert meta(spec)["view"] == view


def test_plot_command_kernels_and_options(capsys, tmp_path: Path):
    rng = np.random.default_rng(0)
    from weightatlas.adapters import safetensors

    safetensors.write({"conv.weight": rng.standard_normal((6, 4, 3, 3)).astype(np.float32)},
                      tmp_path / "c.safetensors")
    store = str(tmp_path / "store")
    wa.ingest(tmp_path / "c.safetensors", store=store, step=3)
    out = tmp_path / "k.vl.json"
    code, _, err = run(capsys, "--store", store, "plot", "kernels", "c@3", "conv.weight",
                       "--neurons", "1,4", "--top", "2", "-o", str(out))
    assert code == 0, err
    assert meta(json.loads(out.read_text()))["neurons"] == [1, 4]
    code, _, err = run(capsys, "--store", store, "plot", "heatmap", "c", "conv.weight",
                       "--neuron", "2", "-o", str(out))
    assert code == 0 and meta(json.loads(out.read_text()))["mode"] == "neuron"


def test_plot_and_report_command_errors(capsys, digits_store: Path, tmp_path: Path):
    store = str(digits_store)
    code, _, err = run(capsys, "--store", store, "plot", "heatmap", "digits", "fc1.weight", "-o",
                       str(tmp_path / "x.gif"))
    assert code == 1 and "x.gif: unknown chart format; use one of .vl.json" in err
    assert not (tmp_path / "x.gif").exists()
    code, _, err = run(capsys, "--store", store, "plot", "pie", "digits", "-o",
                       str(tmp_path / "x.png"))
    assert code == 1 and "unknown view 'pie'" in err
    code, _, err = run(capsys, "--store", store, "plot", "heatmap", "digits", "fc1.weight")
    assert code == 1 and "give the file to write with -o FILE" in err
    code, _, err = run(capsys, "--store", store, "plot", "histogram", "digits", "fc1.weight",
                       "--top", "3", "-o", str(tmp_path / "h.png"))
    assert code == 1 and "view 'histogram' takes no option top" in err
    code, _, err = run(capsys, "--store", store, "plot", "diff", "digits", "fc1.weight",
                       "--against", "digits@1", "--alignment", str(tmp_path / "none.arrow"),
                       "-o", str(tmp_path / "d.png"))
    assert code == 1 and "none.arrow: cannot read an alignment table" in err
    code, _, err = run(capsys, "--store", store, "report", "nope", "-o", str(tmp_path / "r.html"))
    assert code == 1 and "nope" in err


def test_plot_with_an_alignment_file(capsys, digits_store: Path, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.feather as feather

    path = tmp_path / "align.arrow"
    feather.write_feather(pa.table({"a_name": ["fc1.weight", "fc2.weight"],
                                    "b_name": ["fc1.weight", "fc2.weight"],
                                    "method": ["given", "given"], "confidence": [1.0, 0.5]}),
                          str(path))
    out = tmp_path / "a.vl.json"
    code, _, err = run(capsys, "--store", str(digits_store), "plot", "agreement", "digits@60",
                       "--against", "digits@1", "--alignment", str(path), "-o", str(out))
    assert code == 0, err
    spec = json.loads(out.read_text())
    assert columns(spec, spec["vconcat"][1])["method"] == ["given", "given"]
    with pytest.raises(FormatError, match="needs columns a_name, b_name, method, confidence"):
        feather.write_feather(pa.table({"x": [1]}), str(tmp_path / "bad.arrow"))
        wa.read_alignment(tmp_path / "bad.arrow")


def test_report_command_writes_an_offline_page(capsys, digits_store: Path, tmp_path: Path):
    out = tmp_path / "site" / "report.html"
    code, stdout, err = run(capsys, "--store", str(digits_store), "report", "digits@10", "-o",
                            str(out))
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: report of digits@10")
    specs = check_page(out.read_text())
    # overview, ridgeline, 6 histograms, 3 heatmaps, the alphas and the 3 matrices' spectra
    assert len(specs) == 2 + 6 + 3 + 1 + 3
