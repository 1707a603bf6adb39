"""The executor's compiled programs and the package-root wrappers over a stored model:
programs live exactly as long as their model, repeated calls reuse them, results read
as arrays, and option mistakes are refused with a WeightAtlasError before computing."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.core.executor import (
    feature_visualization,
    from_onnx,
    saliency,
    smoothgrad,
)
from weightatlas.errors import InputMismatchError, UnsupportedError, WeightAtlasError

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def conv_model() -> onnx.ModelProto:
    """Conv(2 -> 3 channels, 3x3) -> Relu -> global average -> Gemm to 4 classes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
                                     "conv.weight"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32),
                                     "fc.weight")]
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["h"], pads=[1, 1, 1, 1],
                              name="/conv/Conv"),
             helper.make_node("Relu", ["h"], ["r"], name="/relu/Relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="/pool/Pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="/flat/Flatten"),
             helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1, name="/fc/Gemm")]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", 1, [2, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, [2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def stored(tmp_path: Path) -> tuple[wa.Store, str]:
    onnx.save(conv_model(), tmp_path / "net.onnx")
    store = wa.open_store(tmp_path / "store")
    wa.ingest(tmp_path / "net.onnx", store=store, model="net", step=1).close()
    return store, "net@1"


X = np.random.default_rng(1).random((2, 2, 8, 8), dtype=np.float32)


def test_compiled_programs_die_with_their_model() -> None:
    fn = from_onnx(conv_model())
    saliency(fn, X, [0, 1])
    feature_visualization(fn, "h", [0], steps=2, size=8)
    ref = weakref.ref(fn)
    del fn
    gc.collect()
    assert ref() is None


def test_repeated_calls_on_a_stored_model_reuse_one_function(stored) -> None:
    store, ref = stored
    a = wa.stored_function(ref, store)
    assert wa.stored_function(ref, store) is a
    e1 = wa.expand(a, "x", "conv")
    e2 = wa.expand(ref, "x", "conv", store=store)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    assert np.asarray(e1).shape == (3, 2, 3, 3)
    # adjacent layers: the expanded weights are the stored weights
    with store.snapshot(ref) as snap:
        np.testing.assert_allclose(np.asarray(e1), snap.read("conv.weight"), rtol=1e-6)
    r = wa.feature_visualization(a, "conv", [0, 2], steps=2, size=8)
    assert np.asarray(r).shape == (2, 2, 8, 8) and np.asarray(r) is r.images


def test_option_mistakes_are_refused_before_computing(stored) -> None:
    store, ref = stored
    fn = from_onnx(conv_model())
    with pytest.raises(InputMismatchError, match="samples=0"):
        smoothgrad(fn, X, [0, 1], samples=0)
    with pytest.raises(UnsupportedError, match=r"steps=2\.5"):
        feature_visualization(fn, "h", [0], steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="channels='12'"):
        feature_visualization(fn, "h", "12")  # type: ignore[arg-type]
    with pytest.raises(InputMismatchError, match=r"unknown options \['step'\]"):
        wa.feature_visualization(ref, "conv", [0], store=store, step=2)
    with pytest.raises(InputMismatchError, match="needs upsample=True"):
        wa.attribute(ref, X, [0, 1], method="grad_cam", layer="conv", mode="nearest",
                     store=store)
    with pytest.raises(WeightAtlasError, match="steps"):
        wa.attribute(ref, X, [0, 1], method="ig", steps=0.5, store=store)


def test_contextualized_weights_of_a_stored_model(tmp_path: Path) -> None:
    """The article's figure from the store alone: conv2's kernels between the feature
    visualizations of conv1's channels (its inputs) and of its own (its outputs)."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "conv1.weight"], ["h"], pads=[1, 1, 1, 1],
                              name="/conv1/Conv"),
             helper.make_node("Relu", ["h"], ["r"], name="/relu/Relu"),
             helper.make_node("Conv", ["r", "conv2.weight"], ["y"], pads=[1, 1, 1, 1],
                              name="/conv2/Conv")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "conv1.weight"),
                           numpy_helper.from_array(w2, "conv2.weight")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "two.onnx")
    store = wa.open_store(tmp_path / "store")
    snap = wa.ingest(tmp_path / "two.onnx", store=store, model="two")
    w = snap.read("conv2.weight")
    fv_in = wa.feature_visualization(snap, "conv1", range(3), steps=4, size=8)
    fv_out = wa.feature_visualization(snap, "conv2", range(4), steps=4, size=8)
    assert fv_in.value == "h" and fv_out.value == "y"
    assert fv_in.images.shape == (3, 3, 8, 8) and fv_out.images.shape == (4, 3, 8, 8)
    spec = wa.viz.contextualized(w, fv_in.images, fv_out.images, outputs=[0, 1, 2, 3],
                                 name="conv2.weight").to_dict()
    meta = spec["usermeta"]["weightatlas"]
    assert meta["outputs"] == [0, 1, 2, 3] and sorted(meta["inputs"]) == [0, 1, 2]
    assert wa.viz.to_svg(spec).startswith("<svg")
    snap.close()
