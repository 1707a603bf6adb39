"""The contextualized-weights figure: the weights and their normalisation against NumPy on
the raw arrays, the input ranking, the feature-visualization pixels, the size budget,
export, and names as data."""

from __future__ import annotations

import numpy as np
import pytest

import weightatlas.viz as viz
from tests.test_viz_helpers import (
    HOSTILE,
    columns,
    layers,
    meta,
    rgb,
    strings_outside_data,
)
from tests.test_viz_reduce import reference_blocks
from weightatlas.errors import ShapeError, UnsupportedError
from weightatlas.viz._style import DEFAULT_MAX_BYTES, spec_bytes


def data_of(spec: dict, first_column: str) -> dict:
    """The columns of the one dataset whose first column is ``first_column``."""
    found = [columns(spec, n) for n in layers(spec) if "data" in n]
    found = [c for c in found if next(iter(c)) == first_column]
    assert len(found) >= 1 and all(c == found[0] for c in found)  # one dataset, maybe shared
    return found[0]


def weight_scale(spec: dict) -> dict:
    (scale,) = [n["encoding"]["color"]["scale"] for n in layers(spec)
                if n.get("encoding", {}).get("color", {}).get("field") in ("s", "v")]
    return scale


def test_conv_weights_cells_and_the_per_output_normalisation(rng):
    w = rng.standard_normal((6, 10, 5, 5)).astype(np.float32)
    fv_in = rng.random((10, 3, 12, 12))
    fv_out = rng.random((6, 3, 12, 12))
    spec = viz.contextualized(w, fv_in, fv_out, outputs=[4, 1], top=4, name="a→b").to_dict()
    # inputs: the 4 largest L2 norms of W[[4, 1], i], strongest first
    norms = [np.sqrt(sum(float((w[o, i].astype(np.float64) ** 2).sum()) for o in (4, 1)))
             for i in range(10)]
    want_inputs = sorted(range(10), key=lambda i: -norms[i])[:4]
    assert meta(spec)["inputs"] == want_inputs and meta(spec)["outputs"] == [4, 1]
    cells = data_of(spec, "o")
    expect_v, expect_s = [], []
    for o in (4, 1):
        biggest = np.abs(w[o]).max()  # over all of o's inputs, not only those shown
        for i in want_inputs:
            expect_v += w[o, i].reshape(-1).tolist()
            expect_s += (w[o, i] / biggest).reshape(-1).tolist()
    np.testing.assert_allclose(cells["v"], expect_v, rtol=1e-7)
    np.testing.assert_allclose(cells["s"], expect_s, rtol=1e-6)
    assert cells["ky"][:5] == [0, 0, 0, 0, 0] and cells["kx"][:5] == [0, 1, 2, 3, 4]
    assert meta(spec)["domain"] == [-1.0, 1.0]
    assert weight_scale(spec)["domain"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert weight_scale(spec)["range"] == ["#0571B0", "#92C5DE", "#F7F7F7", "#F4A582",
                                           "#CA0020"]
    # pixels: the chosen inputs' images along the top, then the outputs' (12x12: unpooled)
    pix = data_of(spec, "x0")
    hexes = np.array([rgb(c) for c in pix["c"]])
    want = np.concatenate([fv_in[want_inputs], fv_out[[4, 1]]]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(hexes, np.rint(want.reshape(-1, 3) * 255))


def test_dense_weights_global_scale_and_images_in_the_order_shown(rng):
    w = rng.standard_normal((5, 3))
    fv_out = rng.random((2, 1, 64, 64))  # one per output shown
    spec = viz.contextualized(w, None, fv_out, outputs=[3, 0], inputs=[2, 0],
                              normalize="global", max_image_cells=64).to_dict()
    cells = data_of(spec, "o")
    np.testing.assert_allclose(cells["v"], [w[3, 2], w[3, 0], w[0, 2], w[0, 0]])
    m = np.abs(w[np.ix_([3, 0], [2, 0])]).max()
    assert meta(spec)["domain"] == pytest.approx([-m, m])
    assert weight_scale(spec)["domain"] == pytest.approx([-m, -m / 2, 0, m / 2, m])
    f = meta(spec)["output_block"][0]
    assert f == 8
    pix = data_of(spec, "x0")
    means = np.stack([reference_blocks(img[0], (f, f))["mean"] for img in fv_out])
    gray = np.array([rgb(c) for c in pix["c"]])
    np.testing.assert_array_equal(gray[:, 0], np.rint(means.reshape(-1) * 255))
    assert (gray[:, 0] == gray[:, 1]).all()


def test_size_budget_labels_as_data_and_export(rng, tmp_path):
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    w[0, 0, 1, 1] = np.nan
    big = rng.random((64, 3, 128, 128)).astype(np.float32)
    chart = viz.contextualized(w, big, big, outputs=range(8), top=8, max_image_cells=4096)
    assert spec_bytes(chart) <= DEFAULT_MAX_BYTES
    small = viz.contextualized(w[:3, :4], None, None, outputs=[0, 1, 2],
                               input_labels=HOSTILE[:4], output_labels=HOSTILE[3:6],
                               name=HOSTILE[0])
    spec = small.to_dict()
    for _, s in strings_outside_data(spec):
        assert all(h not in s for h in HOSTILE)
    labels = data_of(spec, "x")
    assert labels["t"] == [f"in {h}" for h in HOSTILE[:4]] + [f"out {h}" for h in HOSTILE[3:6]]
    assert data_of(spec, "o")["v"][4] is None  # the NaN weight, drawn black
    svg = viz.to_svg(small)
    assert "&lt;/script&gt;" in svg and "<script>" not in svg
    assert viz.to_png(chart)[:4] == b"\x89PNG"
    assert HOSTILE[0] not in viz.to_html(small)


def test_bad_input():
    w = np.zeros((4, 6, 3, 3))
    with pytest.raises(ShapeError, match=r"weights have shape \[6\]; expected \[out, in\]"):
        viz.contextualized(np.zeros(6))
    with pytest.raises(ShapeError, match=r"4 output neurons; outputs \[4\] are not in 0\.\.3"):
        viz.contextualized(w, outputs=[0, 4])
    with pytest.raises(ShapeError, match=r"6 input neurons; inputs \[-1\] are not in 0\.\.5"):
        viz.contextualized(w, inputs=[-1])
    with pytest.raises(ShapeError, match=r"input_images has 5 images; expected one per input "
                                         r"neuron \(6\) or one per input shown \(4\)"):
        viz.contextualized(w, np.zeros((5, 3, 8, 8)), top=4)
    with pytest.raises(UnsupportedError, match="normalize='row'; expected one of output, global"):
        viz.contextualized(w, normalize="row")
    with pytest.raises(ShapeError, match="1 output_labels for 2 outputs shown"):
        viz.contextualized(w, outputs=[0, 1], output_labels=["a"])
