"""Attribution charts (``saliency_overlay``, ``saliency_strip``) and ``images``: the numbers in
each spec's data against NumPy on the raw arrays (pixel colours, block means of the
attribution), the colour domains, the size budget, export, and names as data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import weightatlas.viz as viz
from tests.test_viz_helpers import (
    HOSTILE,
    columns,
    dataset,
    distill_rgb,
    layers,
    meta,
    nodes,
    rendered_marks,
    rgb,
    strings_outside_data,
)
from tests.test_viz_reduce import reference_blocks
from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz._style import DEFAULT_MAX_BYTES, spec_bytes


def pixel_data(spec: dict) -> dict:
    """The columns of the chart's shared dataset (the pixels)."""
    return columns(spec, spec)


def texts(spec: dict) -> list[str]:
    """Every text of the header and label datasets (one-row ``text`` columns), in order."""
    out = []
    for _, node in nodes(spec):
        if isinstance(node, dict) and isinstance(node.get("data"), dict) and node is not spec:
            cols = dataset(spec, node)[0]
            if list(cols) == ["text"]:
                out.extend(cols["text"][0] if isinstance(cols["text"][0], list)
                           else cols["text"])
    return out


def unhex(colors: list[str]) -> np.ndarray:
    return np.array([rgb(c) for c in colors], np.int64)


def color_scales(spec: dict) -> list[dict]:
    """Every colour scale of the attribution layers (not the hex-coloured pixels)."""
    out = []
    for node in layers(spec):
        color = node.get("encoding", {}).get("color", {})
        if color.get("field") == "v":
            out.append(color["scale"])
    return out


# ---- saliency_overlay -----------------------------------------------------------------------


def test_overlay_cells_are_the_pixels_and_the_channel_summed_attribution(rng):
    img = rng.random((3, 20, 14)).astype(np.float32)          # CHW, as the executor's inputs
    attr = rng.standard_normal((3, 20, 14)).astype(np.float32)
    spec = viz.saliency_overlay(img, attr, name="resnet18 class 3").to_dict()
    cols = pixel_data(spec)
    assert meta(spec)["grid"] == [20, 14] and meta(spec)["block"] == [1, 1]
    # row-major cells: pixel colours are the image's values to 8 bits
    hwc = img.transpose(1, 2, 0).reshape(-1, 3)
    np.testing.assert_array_equal(unhex(cols["c"]), np.rint(hwc * 255).astype(np.int64))
    assert cols["gy"] == np.repeat(np.arange(20), 14).tolist()
    assert cols["gx"] == np.tile(np.arange(14), 20).tolist()
    luma = hwc.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_array_equal(cols["l"], np.rint(luma * 255).astype(np.int64))
    summed = attr.astype(np.float64).sum(axis=0).reshape(-1)
    np.testing.assert_allclose(cols["v"], summed, rtol=1e-6, atol=1e-6)
    m = np.abs(summed).max()
    assert meta(spec)["signed"] is True
    assert meta(spec)["domain"] == pytest.approx([-m, m], rel=1e-6)
    (scale,) = color_scales(spec)
    assert scale["domain"] == pytest.approx([-m, -m / 2, 0, m / 2, m], rel=1e-6)
    assert scale["range"] == ["#0571B0", "#92C5DE", "#F7F7F7", "#F4A582", "#CA0020"]
    assert texts(spec)[0] == "resnet18 class 3"


def test_overlay_pools_a_224_image_in_block_means_and_stays_under_budget(rng):
    img = rng.random((224, 224, 3))                               # HWC
    attr = rng.standard_normal((224, 224, 3)) * np.linspace(0, 2, 224)[None, :, None]
    chart = viz.saliency_overlay(img, attr)
    spec = chart.to_dict()
    assert spec_bytes(chart) < DEFAULT_MAX_BYTES
    f = meta(spec)["block"][0]
    assert f > 1 and meta(spec)["grid"] == [-(-224 // f)] * 2
    cols = pixel_data(spec)
    want = reference_blocks(attr.sum(axis=2), (f, f))["mean"]
    np.testing.assert_allclose(cols["v"], want.reshape(-1), rtol=1e-6, atol=1e-6)
    rgb_means = np.stack([reference_blocks(img[:, :, c], (f, f))["mean"] for c in range(3)], -1)
    np.testing.assert_array_equal(unhex(cols["c"]),
                                  np.rint(rgb_means.reshape(-1, 3) * 255).astype(np.int64))
    assert any("blocks of" in line and "block mean" in line for line in texts(spec))


def test_overlay_pools_sizes_that_do_not_divide_and_a_batch_with_labels(rng):
    img = rng.random((2, 1, 37, 50))                              # grayscale batch
    attr = rng.standard_normal((2, 37, 50))
    labels = ["class 3", HOSTILE[0]]
    spec = viz.saliency_overlay(img, attr, labels=labels, max_cells=300).to_dict()
    f = meta(spec)["block"][0]
    assert f > 1 and meta(spec)["examples"] == 2
    cols = pixel_data(spec)
    want = np.stack([reference_blocks(a, (f, f))["mean"] for a in attr]).reshape(-1)
    np.testing.assert_allclose(cols["v"], want, rtol=1e-6, atol=1e-9)
    assert cols["n"] == np.repeat([0, 1], want.size // 2).tolist()
    assert labels[0] in texts(spec) and labels[1] in texts(spec)


def test_overlay_absolute_attributions_use_the_sequential_scale_from_zero(rng):
    img = rng.random((8, 8))
    attr = np.abs(rng.standard_normal((8, 8)))
    spec = viz.saliency_overlay(img, attr).to_dict()
    assert meta(spec)["signed"] is False
    (scale,) = color_scales(spec)
    assert scale["scheme"] == "viridis" and scale["domain"] == [0.0, pytest.approx(attr.max())]
    signed = rng.standard_normal((8, 8))
    spec = viz.saliency_overlay(img, signed, signed=False).to_dict()
    np.testing.assert_allclose(pixel_data(spec)["v"], np.abs(signed).reshape(-1), rtol=1e-6)
    spec = viz.saliency_overlay(img, signed, percentile=50).to_dict()
    assert meta(spec)["domain"][1] == pytest.approx(np.percentile(np.abs(signed), 50), rel=1e-6)


def test_overlay_rescales_images_outside_unit_range_and_marks_nonfinite(rng):
    img = rng.standard_normal((3, 6, 6)) * 2                      # a normalised input
    attr = rng.standard_normal((6, 6))
    attr[2, 3] = np.nan
    spec = viz.saliency_overlay(img, attr).to_dict()
    cols = pixel_data(spec)
    unit = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_array_equal(unhex(cols["c"]),
                                  np.rint(unit.transpose(1, 2, 0).reshape(-1, 3) * 255))
    assert cols["v"][2 * 6 + 3] is None and cols["nf"][2 * 6 + 3] == 1
    assert any("NaN" in line for line in texts(spec))
    spec = viz.saliency_overlay(img, attr, value_range=(-1, 1)).to_dict()
    want = np.clip((img + 1) / 2, 0, 1).transpose(1, 2, 0).reshape(-1, 3)
    np.testing.assert_array_equal(unhex(pixel_data(spec)["c"]), np.rint(want * 255))


def test_overlay_names_are_data_and_it_exports(rng, tmp_path):
    img, attr = rng.random((3, 10, 10)), rng.standard_normal((3, 10, 10))
    chart = viz.saliency_overlay(img, attr, name=HOSTILE[0], labels=[HOSTILE[1]])
    spec = chart.to_dict()
    for _, s in strings_outside_data(spec):
        assert all(h not in s for h in HOSTILE)
    assert HOSTILE[0] in texts(spec)
    svg = viz.to_svg(chart)
    assert svg.startswith("<svg") and "&lt;/script&gt;" in svg and "<script>" not in svg
    assert viz.to_png(chart)[:8] == b"\x89PNG\r\n\x1a\n"
    page = viz.to_html(chart)
    assert HOSTILE[0] not in page
    viz.save(chart, tmp_path / "overlay.svg")


def test_overlay_draws_the_distill_colour_and_opacity_of_each_cell():
    img = np.full((4, 4), 0.5)
    attr = np.linspace(-1.5, 3.0, 16).reshape(4, 4)
    spec = viz.saliency_overlay(img, attr, show_image=False, alpha=0.8).to_dict()
    items = rendered_marks(spec, "rect")
    under = [it for it in items if "opacity" not in it]
    heat = [it for it in items if "opacity" in it]
    assert [rgb(it["fill"]) for it in under] == [(128, 128, 128)] * 16
    np.testing.assert_allclose([rgb(it["fill"]) for it in heat],
                               [distill_rgb(v, 3.0) for v in attr.reshape(-1)], atol=1)
    np.testing.assert_allclose([it["opacity"] for it in heat],
                               0.8 * np.minimum(1, np.abs(attr.reshape(-1)) / 3.0), atol=1e-9)


def test_overlay_bad_input():
    img = np.zeros((3, 8, 8))
    with pytest.raises(ShapeError,
                       match=r"attribution has shape \[3, 8, 9\], the image \[3, 8, 8\]"):
        viz.saliency_overlay(img, np.zeros((3, 8, 9)))
    with pytest.raises(ShapeError, match=r"shape \[4, 8, 8\] has 4 channels first; expected 1 "
                                         r"or 3 channels"):
        viz.saliency_overlay(np.zeros((4, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ShapeError, match=r"shape \[8\] is not an image"):
        viz.saliency_overlay(np.zeros(8), np.zeros(8))
    with pytest.raises(UnsupportedError, match=r"alpha=0; expected a number in \(0, 1\]"):
        viz.saliency_overlay(img, np.zeros((8, 8)), alpha=0)
    with pytest.raises(ShapeError, match="2 labels for 1 examples"):
        viz.saliency_overlay(img, np.zeros((8, 8)), labels=["a", "b"])
    with pytest.raises(UnsupportedError, match="percentile=0"):
        viz.saliency_overlay(img, np.ones((8, 8)), percentile=0)


# ---- saliency_strip ---------------------------------------------------------------------------


def test_strip_of_tokens_wraps_like_text_and_keeps_every_value(rng):
    values = rng.standard_normal(40).astype(np.float32)
    tokens = [f"w{i}" for i in range(40)]
    tokens[5] = HOSTILE[0]
    tokens[6] = '"quoted" \'token\''
    chart = viz.saliency_strip(values, tokens, wrap=16, name=HOSTILE[3])
    spec = chart.to_dict()
    cols = pixel_data(spec)
    np.testing.assert_allclose(cols["v"], values, rtol=1e-7)
    assert cols["t"] == tokens
    assert cols["line"] == (np.arange(40) // 16).tolist()
    assert cols["col"] == (np.arange(40) % 16).tolist()
    m = float(np.abs(values).max())
    assert meta(spec)["domain"] == pytest.approx([-m, m])
    for _, s in strings_outside_data(spec):
        assert all(h not in s for h in HOSTILE)
    svg = viz.to_svg(chart)
    assert "&lt;/script&gt;" in svg and "<script>" not in svg
    assert viz.to_png(chart)[:4] == b"\x89PNG"


def test_strip_draws_the_distill_colour_of_each_token():
    values = np.array([-2.0, -1.0, 0.0, 0.5, 2.0])
    spec = viz.saliency_strip(values, list("abcde")).to_dict()
    fills = [rgb(it["fill"]) for it in rendered_marks(spec, "rect")]
    np.testing.assert_allclose(fills, [distill_rgb(v, 2.0) for v in values], atol=1)


def test_strip_pools_long_signals_in_block_means(rng):
    values = rng.standard_normal((3, 5000))
    chart = viz.saliency_strip(values, rows=["ig", "saliency", HOSTILE[1]], max_cells=600)
    spec = chart.to_dict()
    f = meta(spec)["block"]
    assert f == 25 and meta(spec)["cells"] == 200
    want = np.stack([reference_blocks(r, (f,))["mean"] for r in values]).reshape(-1)
    np.testing.assert_allclose(pixel_data(spec)["v"], want, rtol=1e-6, atol=1e-9)
    assert pixel_data(spec)["rname"][-1] == HOSTILE[1]
    assert spec_bytes(chart) < DEFAULT_MAX_BYTES
    labelled = viz.saliency_strip(values[0, :10], list("abcdefghij"), max_cells=5).to_dict()
    assert pixel_data(labelled)["t"] == ["a…b", "c…d", "e…f", "g…h", "i…j"]


def test_strip_absolute_values_and_bad_input(rng):
    spec = viz.saliency_strip(np.abs(rng.standard_normal(12))).to_dict()
    assert meta(spec)["signed"] is False and meta(spec)["domain"][0] == 0.0
    with pytest.raises(ShapeError, match=r"values have shape \[2, 3, 4\]"):
        viz.saliency_strip(np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="2 labels for 3 positions"):
        viz.saliency_strip(np.zeros(3), ["a", "b"])
    with pytest.raises(ShapeError, match="1 row names for 2 rows"):
        viz.saliency_strip(np.zeros((2, 3)), rows=["a"])


# ---- images -----------------------------------------------------------------------------------


def test_images_are_drawn_pixel_for_pixel_or_in_block_means(rng):
    x = rng.random((3, 3, 9, 9))
    spec = viz.images(x, ["a", "b", HOSTILE[2]]).to_dict()
    cols = pixel_data(spec)
    np.testing.assert_array_equal(unhex(cols["c"]),
                                  np.rint(x.transpose(0, 2, 3, 1).reshape(-1, 3) * 255))
    big = rng.random((2, 64, 64, 3))
    chart = viz.images(big, max_cells=256)
    spec = chart.to_dict()
    f = meta(spec)["block"][0]
    assert f == 4
    means = np.stack([np.stack([reference_blocks(im[:, :, c], (f, f))["mean"] for c in range(3)],
                               -1) for im in big])
    np.testing.assert_array_equal(unhex(pixel_data(spec)["c"]),
                                  np.rint(means.reshape(-1, 3) * 255))
    assert viz.to_svg(chart).startswith("<svg")
    json.dumps(spec)


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed (apt-get install -y chromium)")
def test_charts_draw_offline_in_a_browser_with_names_as_text(tmp_path, rng):
    from tests.test_report_browser import Browser

    charts = [
        viz.saliency_overlay(rng.random((2, 3, 12, 12)), rng.standard_normal((2, 3, 12, 12)),
                             labels=HOSTILE[:2], name=HOSTILE[2]),
        viz.saliency_strip(rng.standard_normal(6), HOSTILE, name="tokens"),
        viz.contextualized(rng.standard_normal((3, 4, 3, 3)), rng.random((4, 3, 6, 6)),
                           rng.random((3, 3, 6, 6)), input_labels=HOSTILE[:4], name="ctx"),
    ]
    browser = Browser(tmp_path / "profile")
    try:
        for i, chart in enumerate(charts):
            out = viz.save(chart, tmp_path / f"chart{i}.html")
            session = browser.open(out.as_uri())
            browser.wait_for(session, "window.weightatlas && window.weightatlas.ok === 1")
            texts = browser.evaluate(session, "Array.from(document.querySelectorAll("
                                              "'.wa-chart svg text')).map(t => t.textContent)")
            rects = browser.evaluate(session, "document.querySelectorAll('.wa-chart svg path"
                                              "[aria-roledescription=\"rect mark\"]').length")
            if i == 0:
                assert HOSTILE[0] in texts and HOSTILE[2] in texts
                assert rects == 2 * 3 * 144  # per example: the image, the gray, the heat
            elif i == 1:
                # tokens are cut to their cell's width, drawn literally
                assert "</script>…" in texts and '"}]}' in texts and rects == 6
            else:
                assert "in </script…" in texts and 'in "}]}' in texts
                assert rects == 3 * 4 * 9 + 7 * 36  # kernels, then 7 images of 6x6
        assert browser.problems() == []
    finally:
        browser.close()
