"""The expanded-weights chart: the data of every cell against the array, the ranking by
kernel L2 norm (against NumPy), the shared zero-centred scale, the labels, and export."""

from __future__ import annotations

import numpy as np
import pytest

import weightatlas.viz as viz
from tests.test_viz_helpers import (
    DISTILL,
    HOSTILE,
    columns,
    header,
    main,
    meta,
    strings_outside_data,
)
from weightatlas.core.executor import expanded_weights, from_onnx
from weightatlas.errors import ShapeError


def _result():
    """Expanded weights computed by the executor: a 1x1 conv (5 -> 4), ReLU, a 3x3 conv
    (4 -> 6), ReLU, a 3x3 conv (6 -> 3), from the input to the last conv: [3, 5, 5, 5]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    shapes = {"a.weight": (4, 5, 1, 1), "b.weight": (6, 4, 3, 3), "c.weight": (3, 6, 3, 3)}
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in shapes.items()]
    pad = [1, 1, 1, 1]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "a.weight"], ["a"]),
         helper.make_node("Relu", ["a"], ["ra"]),
         helper.make_node("Conv", ["ra", "b.weight"], ["b"], pads=pad),
         helper.make_node("Relu", ["b"], ["rb"]),
         helper.make_node("Conv", ["rb", "c.weight"], ["c"], pads=pad)], "three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 11, 11])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 11, 11])], inits)
    return expanded_weights(from_onnx(helper.make_model(graph)), "x", "c")


def test_cells_show_the_expanded_kernels_strongest_first():
    e = _result()
    assert e.array.shape == (3, 5, 5, 5)
    spec = viz.expanded(e, top=3).to_dict()
    body = spec["vconcat"][1]
    cols = columns(spec, body)
    shown = []
    for t in e.channels:
        norms = np.sqrt((e.array[t].astype(np.float64) ** 2).sum(axis=(1, 2)))
        order = np.argsort(-norms, kind="stable")[:3]
        assert meta(spec)["sources"][t] == order.tolist()
        for rank, s in enumerate(order, start=1):
            cells = [k for k in range(len(cols["v"])) if cols["t"][k] == t
                     and cols["rank"][k] == rank]
            assert {cols["s"][k] for k in cells} == {s}
            np.testing.assert_allclose([cols["norm"][k] for k in cells], norms[s])
            got = np.zeros((5, 5), np.float32)
            for k in cells:  # relative positions: offsets (-2, -2) + kernel index
                got[cols["dy"][k] + 2, cols["dx"][k] + 2] = cols["v"][k]
            np.testing.assert_array_equal(got, e.array[t, s])  # float32 values, exactly
            shown.append(np.abs(e.array[t, s]).max())
    scale = main(spec)["encoding"]["color"]["scale"]
    assert scale["range"] == DISTILL
    np.testing.assert_allclose(scale["domain"], np.array([-1, -0.5, 0, 0.5, 1]) * max(shown),
                               rtol=1e-6)
    assert body["facet"]["row"]["field"] == "t" and body["facet"]["column"]["field"] == "rank"
    assert header(spec)[0] == "expanded weights: x → c"
    assert meta(spec)["kernel"] == [5, 5] and meta(spec)["targets"] == [0, 1, 2]


def test_sources_targets_and_labels():
    e = _result()
    spec = viz.expanded(e, targets=[2, 0], sources=[1, 3, 4], top=2,
                        source_layer="layer1", target_layer="layer3").to_dict()
    sub = e.array[:, [1, 3, 4]].astype(np.float64)
    for row, t in enumerate([0, 2]):  # rows in ascending channel order
        norms = np.sqrt((sub[t] ** 2).sum(axis=(1, 2)))
        assert meta(spec)["sources"][row] == np.array([1, 3, 4])[
            np.argsort(-norms, kind="stable")[:2]].tolist()
    assert header(spec)[0] == "expanded weights: layer1 → layer3"
    assert "3 target channels" not in header(spec)[1] and "2 target channels" in header(spec)[1]


def test_plain_arrays_of_one_and_no_kernel_axes():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(4, 6)).astype(np.float32)
    spec = viz.expanded(dense, top=6).to_dict()
    cols = columns(spec, spec["vconcat"][1])
    for t in range(4):
        order = np.argsort(-np.abs(dense[t]), kind="stable")
        assert meta(spec)["sources"][t] == order.tolist()
        got = [cols["v"][k] for k in range(len(cols["v"])) if cols["t"][k] == t]
        np.testing.assert_array_equal(np.array(got, np.float32), dense[t, order])
    assert meta(spec)["kernel"] == [] and "kernel 1 (dense)" in header(spec)[1]
    line = rng.normal(size=(2, 3, 7)).astype(np.float32)
    spec = viz.expanded(line, top=1).to_dict()
    cols = columns(spec, spec["vconcat"][1])
    assert cols["dx"][:7] == list(range(-3, 4)) and set(cols["dy"]) == {0}
    assert meta(spec)["kernel"] == [7]


def test_names_stay_data_and_flags_are_shown():
    e = _result()
    for name in HOSTILE:
        spec = viz.expanded(e, source_layer=name, target_layer=name, top=1).to_dict()
        outside = [v for _, v in strings_outside_data(spec)]
        assert not any(name in v for v in outside)
        assert header(spec)[0] == f"expanded weights: {name} → {name}"
    from dataclasses import replace

    gated = replace(e, nonaffine=("node 'gate' (Sigmoid)",), at_border=True)
    lines = header(viz.expanded(gated, top=1).to_dict())
    assert any("not affine between the layers (node 'gate' (Sigmoid))" in s for s in lines)
    assert any("reach the edge of the source activation" in s for s in lines)


def test_exports_to_svg_and_png():
    chart = viz.expanded(_result(), top=4)
    assert viz.to_svg(chart).lstrip().startswith("<svg")
    assert viz.to_png(chart)[:4] == b"\x89PNG"


def test_errors():
    e = _result()
    with pytest.raises(ShapeError, match=r"target channels \[7\] were not computed"):
        viz.expanded(e, targets=[0, 7])
    with pytest.raises(ShapeError, match=r"the source has 5 channels; sources \[5\] are not"):
        viz.expanded(e, sources=[5])
    with pytest.raises(ShapeError, match="top=0; show at least 1"):
        viz.expanded(e, top=0)
    with pytest.raises(ShapeError, match=r"weights of shape \[3\]; expected \[n_target"):
        viz.expanded(np.zeros(3))
