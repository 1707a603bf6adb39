"""The ONNX adapter on models built with onnx.helper for the cases exporters produce rarely:
weights in Constant nodes and subgraphs, external data, quantized and narrow-float
weights, sparse initializers, chains of layout operators, every operator of the role
table, and the naming styles of other exporters. Values are checked against
onnxruntime and against NumPy computations of the expected layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import weightatlas as wa
from weightatlas.adapters import _onnx_fold as fold
from weightatlas.adapters import detect_format
from weightatlas.adapters import onnx as onnx_adapter
from weightatlas.adapters._onnx_tensors import ONNX_TYPES
from weightatlas.core._onnx_model import graph_table, load_graph, load_model
from weightatlas.storage import Store, to_source_layout

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from tests import onnx_models as om  # noqa: E402

F = T.FLOAT


def vi(name: str, elem: int = F, shape: list[Any] | None = None) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] = (),
          opset: int = 21, **kw: Any) -> Any:
    g = helper.make_graph(nodes, kw.pop("name", "g"), inputs, outputs, list(inits), **kw)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="weightatlas-tests")
    m.ir_version = 10
    return m


def arr(rng: np.random.Generator, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def save(m: Any, path: Path, **kw: Any) -> str:
    onnx.save_model(m, str(path), **kw)
    return str(path)


def ingest(path: str, store: Store, **kw: Any) -> Any:
    source = onnx_adapter.read(path, **kw)
    return store.write(source, "m", tag=f"t{len(store.snapshots())}")


def attrs(snap: Any, name: str) -> dict[str, Any]:
    return json.loads(snap.info(name).attrs)


def same_run(path: str, snap: Any, feeds: dict[str, np.ndarray]) -> None:
    """onnxruntime: the model rebuilt from the store gives bit-identical outputs."""
    rebuilt = load_model(snap)
    a = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(rebuilt.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert rebuilt.SerializeToString() == onnx.load(path).SerializeToString()


def matches_ort(path: str, snap: Any) -> None:
    """Every main-graph tensor's source-layout bytes are what onnxruntime computes."""
    names = {snap.info(n).source_name: n for n in snap.names
             if not attrs(snap, n).get("graph") and not attrs(snap, n).get("packed")}
    ref = om.ort_values(path, sorted(names))
    assert set(ref) == set(names)
    for source, name in names.items():
        got = snap.read(name, layout="source")
        want = np.asarray(ref[source])
        if got.dtype != want.dtype:
            got = got.astype(np.float32)
        assert got.tobytes() == want.tobytes(), name


# ---- Constant nodes ------------------------------------------------------------------


def test_weights_in_constant_nodes(tmp_path: Path, store: Store, rng) -> None:
    w, b, s = arr(rng, 4, 3, 3, 3), arr(rng, 4), arr(rng, 6, 5)
    dense = np.zeros((5, 2), np.float32)
    dense[[0, 3, 4], [1, 0, 1]] = [1.5, -2.0, 0.25]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense[dense != 0], "sv"),
                                       numpy_helper.from_array(np.array([1, 6, 9], np.int64),
                                                               "si"), [5, 2])
    nodes = [
        helper.make_node("Constant", [], ["conv_w"], name="/conv/Constant",
                         value=numpy_helper.from_array(w, "cw")),
        helper.make_node("Constant", [], ["conv_b"], name="/conv/Constant_1",
                         value_floats=b.tolist()),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="/conv/Conv", pads=[1] * 4),
        helper.make_node("Constant", [], ["shape"], value_ints=[1, 4 * 5 * 6]),
        helper.make_node("Reshape", ["c", "shape"], ["flat"]),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["flat", "half"], ["m"]),
        helper.make_node("Constant", [], ["fc_w"], name="/fc/Constant",
                         value=numpy_helper.from_array(s, "fw")),
        helper.make_node("Constant", [], ["sp_w"], name="/sp/Constant", sparse_value=sparse),
        helper.make_node("Reshape", ["m", "shape2"], ["m2"]),
        helper.make_node("MatMul", ["m2", "fc_w"], ["y0"], name="/fc/MatMul"),
        helper.make_node("MatMul", ["y0", "sp_w"], ["y"], name="/sp/MatMul"),
    ]
    shape2 = numpy_helper.from_array(np.array([-1, 6], np.int64), "shape2")
    path = save(model(nodes, [vi("x", F, [1, 3, 5, 6])], [vi("y")], [shape2], opset=17),
                tmp_path / "c.onnx")
    snap = ingest(path, store)
    assert snap.names == ["conv.weight", "conv.bias", "fc.weight", "sp.weight"]
    assert snap.read("conv.weight").tobytes() == w.tobytes()
    assert snap.read("conv.bias").tobytes() == b.tobytes()
    assert snap.read("fc.weight").tobytes() == s.T.copy().tobytes()
    assert snap.read("sp.weight", layout="source").tobytes() == dense.tobytes()
    assert attrs(snap, "conv.bias")["origin"] == "constant_list"
    assert attrs(snap, "sp.weight")["sparse"] == {"nnz": 3}
    assert (attrs(snap, "conv.weight")["origin"], attrs(snap, "conv.weight")["op"]) == (
        "constant", "Conv")
    matches_ort(path, snap)
    same_run(path, snap, {"x": arr(rng, 1, 3, 5, 6)})
    # the shape constants and the scalar are constants: stored only when asked for
    kept = ingest(path, store, keep_constants=True)
    extra = sorted(set(kept.names) - set(snap.names))
    assert extra == ["constants.half", "constants.shape", "constants.shape2"]
    assert all(attrs(kept, n)["constant"] and not attrs(kept, n)["effective"] for n in extra)
    assert kept.read("constants.shape").tolist() == [1, 120]
    same_run(path, kept, {"x": arr(rng, 1, 3, 5, 6)})


# ---- subgraphs -----------------------------------------------------------------------


def branch(name: str, nodes: list[Any], inits: list[Any] = ()) -> Any:
    return helper.make_graph(nodes, name, [], [vi(f"{name}_out")], list(inits))


def test_weights_inside_if_loop_and_scan(tmp_path: Path, store: Store, rng) -> None:
    wt, we, wl, ws = arr(rng, 4, 3), arr(rng, 4, 3), arr(rng, 4, 4), arr(rng, 4, 4)
    then_b = branch("then", [helper.make_node("MatMul", ["x", "w_then"], ["then_out"],
                                              name="/dense/MatMul")],
                    [numpy_helper.from_array(wt.T.copy(), "w_then")])
    else_b = branch("else", [
        helper.make_node("Constant", [], ["w_else"], value=numpy_helper.from_array(we, "c")),
        helper.make_node("Gemm", ["x", "w_else"], ["else_out"], name="/dense/Gemm", transB=1)])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "outer_w"], ["h_out"], name="/cell/MatMul"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("h_in")],
        [vi("cond_out", T.BOOL, []), vi("h_out")])
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "w_scan"], ["s_out"], name="/scan_cell/MatMul"),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "scan_body", [vi("s_in", F, [1, 4]), vi("x_t", F, [3])],
        [vi("s_out", F, [1, 4]), vi("y_t", F, [1, 4])],
        [numpy_helper.from_array(ws, "w_scan")])
    nodes = [
        helper.make_node("If", ["cond"], ["b"], name="/gate/If", then_branch=then_b,
                         else_branch=else_b),
        helper.make_node("Loop", ["trips", "", "b"], ["h"], name="/rnn/Loop", body=body),
        helper.make_node("Scan", ["h", "seq"], ["s", "ys"], name="/scan/Scan", body=scan_body,
                         num_scan_inputs=1),
    ]
    inits = [numpy_helper.from_array(wl, "outer_w"),
             numpy_helper.from_array(np.array(2, np.int64), "trips")]
    path = save(model(nodes, [vi("cond", T.BOOL, []), vi("x", F, [1, 3]), vi("seq", F, [2, 3])],
                      [vi("s"), vi("ys")], inits, opset=17), tmp_path / "sub.onnx")
    snap = ingest(path, store)
    # (onnx.helper writes attributes sorted by name: else_branch comes first in the file)
    assert snap.names == ["gate.else_branch.dense.weight", "gate.then_branch.dense.weight",
                          "rnn.body.cell.weight", "scan.body.scan_cell.weight"]
    assert snap.read("gate.then_branch.dense.weight").tobytes() == wt.tobytes()
    assert snap.read("gate.else_branch.dense.weight").tobytes() == we.tobytes()
    assert snap.read("rnn.body.cell.weight").tobytes() == wl.T.copy().tobytes()
    assert snap.read("scan.body.scan_cell.weight").tobytes() == ws.T.copy().tobytes()
    assert attrs(snap, "gate.then_branch.dense.weight")["graph"] == "gate/then_branch"
    assert "graph" not in attrs(snap, "rnn.body.cell.weight")  # an outer initializer
    for cond in (True, False):
        same_run(path, snap, {"cond": np.array(cond), "x": arr(rng, 1, 3),
                              "seq": arr(rng, 2, 3)})


W_THEN = numpy_helper.from_array(
    np.random.default_rng(3).standard_normal((4, 3)).astype(np.float16), "w_then")
W_ELSE = numpy_helper.from_array(
    np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32), "w_else")


try:  # onnxscript reads a function's source and resolves its names in this module
    from onnxscript import BOOL, FLOAT, script
    from onnxscript import opset18 as op

    @script()
    def gated(x: FLOAT[1, 4], flag: BOOL) -> FLOAT[1, 3]:
        if flag:
            y = op.MatMul(x, op.Cast(op.Constant(value=W_THEN), to=1))
        else:
            y = op.MatMul(x, op.Constant(value=W_ELSE))
        return y
except ImportError:  # the dynamo exporter's dependency; the tests install it
    gated = None


def test_onnxscript_model_with_weights_in_branches(tmp_path: Path, store: Store) -> None:
    """A model written with onnxscript: Constant-node weights inside If branches, one
    float16 weight cast to float32 before use."""
    if gated is None:
        pytest.skip("onnxscript is not installed")
    path = save(gated.to_model_proto(), tmp_path / "gated.onnx")
    snap = ingest(path, store)
    w16 = numpy_helper.to_array(W_THEN)
    by_kind = {n: snap.info(n) for n in snap.names}
    assert len(snap.names) == 3 and all(n.startswith("if_0.") for n in snap.names)
    cast = next(n for n in snap.names if n.endswith("weight_float16"))
    computed = cast.removesuffix("_float16")
    assert snap.read(cast, layout="source").tobytes() == w16.tobytes()
    assert snap.read(computed, layout="source").tobytes() == w16.astype(np.float32).tobytes()
    assert by_kind[computed].layout == ("out", "in") and by_kind[computed].kind == "linear"
    assert attrs(snap, computed)["graph"].startswith("if_0/")
    assert snap.metadata["source"]["n_params"] == 24  # one weight per branch
    rng = np.random.default_rng(0)
    for flag in (True, False):
        same_run(path, snap, {"x": arr(rng, 1, 4), "flag": np.array(flag)})


def test_weights_inside_local_functions(tmp_path: Path, store: Store, rng) -> None:
    w = arr(rng, 3, 3)
    body = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
            helper.make_node("MatMul", ["inp", "w"], ["out"], name="/proj/MatMul")]
    fn = helper.make_function("local", "Block", ["inp"], ["out"], body,
                              [helper.make_opsetid("", 21)])
    m = model([helper.make_node("Block", ["x"], ["y"], domain="local")],
              [vi("x", F, [1, 3])], [vi("y")])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(fn)
    path = save(m, tmp_path / "f.onnx")
    snap = ingest(path, store)
    assert snap.names == ["functions.local.Block.proj.weight"]
    assert snap.read("functions.local.Block.proj.weight").tobytes() == w.T.copy().tobytes()
    assert attrs(snap, snap.names[0])["graph"] == "functions/local.Block"
    same_run(path, snap, {"x": arr(rng, 1, 3)})


def nested(depth: int) -> Any:
    """An If nested ``depth`` levels, a weight at the bottom."""
    g = branch("b0", [helper.make_node("Constant", [], ["b0_out"],
                                       value=numpy_helper.from_array(np.ones((2, 2), np.float32),
                                                                     "w"))])
    for k in range(1, depth + 1):
        g = branch(f"b{k}", [helper.make_node("If", ["cond"], [f"b{k}_out"], name=f"if{k}",
                                               then_branch=g, else_branch=g)])
    return model(list(g.node), [vi("cond", T.BOOL, [])], [vi(f"b{depth}_out")], opset=17)


def test_nested_subgraphs_named_by_their_path(tmp_path: Path) -> None:
    path = save(nested(3), tmp_path / "n.onnx")
    names = onnx_adapter.read(path).names()
    # nodes named like their operator (if3) are numbered in model order instead
    branches = ("else_branch", "then_branch")  # (attributes are sorted by name)
    paths = [[p for p in n.split(".") if p.endswith("_branch")] for n in names]
    assert paths == [[a, b, c] for a in branches for b in branches for c in branches]
    assert len(set(names)) == 8
    assert all(n.startswith("if_0.") and n.endswith(".b0_out.weight") for n in names)


# ---- external data -------------------------------------------------------------------


def mlp(rng: np.random.Generator) -> tuple[Any, dict[str, np.ndarray]]:
    weights = {"fc1.weight": arr(rng, 16, 8), "fc1.bias": arr(rng, 16),
               "fc2.weight": arr(rng, 4, 16), "fc2.bias": arr(rng, 4)}
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    return model(nodes, [vi("x", F, [1, 8])], [vi("y")], inits), weights


@pytest.mark.parametrize("one_file", [True, False], ids=["one-file", "file-per-tensor"])
def test_external_data(tmp_path: Path, store: Store, rng, one_file: bool) -> None:
    m, weights = mlp(rng)
    path = save(m, tmp_path / "ext.onnx", save_as_external_data=True,
                all_tensors_to_one_file=one_file, location="ext.bin", size_threshold=0)
    snap = ingest(path, store)
    for name, value in weights.items():
        assert snap.read(name).tobytes() == value.tobytes()
        assert attrs(snap, name)["external"]["file"] == ("ext.bin" if one_file else name)
    files = {f["name"]: f for f in snap.metadata["source_files"]}
    import hashlib
    for name, f in files.items():
        assert f["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert set(files) == {"ext.onnx", *(["ext.bin"] if one_file else weights)}
    graph = load_graph(snap)  # holds no weight bytes
    locations = [e.value for t in graph.graph.initializer for e in t.external_data]
    assert sorted(locations) == sorted(f"weightatlas:{n}" for n in weights)
    assert len(snap.attachment("graph.onnx")) < 1000
    same_run(path, snap, {"x": arr(rng, 1, 8)})


def test_external_constants_are_inlined_in_the_attached_graph(tmp_path: Path, store: Store,
                                                               rng) -> None:
    m, weights = mlp(rng)
    m.graph.node.insert(2, helper.make_node("Reshape", ["r", "shape"], ["r2"]))
    m.graph.node[3].input[0] = "r2"
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 16], np.int64), "shape"))
    path = save(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin",
                size_threshold=0)
    snap = ingest(path, store)
    assert sorted(snap.names) == sorted(weights)  # the shape is a constant, not a weight
    shape = next(t for t in load_graph(snap).graph.initializer if t.name == "shape")
    assert numpy_helper.to_array(shape).tolist() == [1, 16] and not shape.external_data
    assert load_model(snap).SerializeToString() == onnx.load(path).SerializeToString()


def test_external_data_at_odd_offsets_is_copied_aligned(tmp_path: Path, rng) -> None:
    w = arr(rng, 5, 3)
    (tmp_path / "w.bin").write_bytes(b"\x01" + w.tobytes())
    t = onnx.TensorProto(name="w", data_type=F, dims=[5, 3], data_location=T.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "1"), ("length", str(w.nbytes))):
        t.external_data.add(key=k, value=v)
    path = save(model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                      [vi("x", F, [1, 3])], [vi("y")], [t]), tmp_path / "m.onnx")
    rec = next(onnx_adapter.read(path).records())
    assert rec.data.flags.aligned and rec.data.tobytes() == w.tobytes()


def test_symlink_inside_the_folder_is_followed(tmp_path: Path, rng) -> None:
    m, weights = mlp(rng)
    save(m, tmp_path / "ext.onnx", save_as_external_data=True, location="real.bin",
         size_threshold=0)
    (tmp_path / "real.bin").rename(tmp_path / "data.bin")
    os.symlink("data.bin", tmp_path / "real.bin")
    recs = {r.name: r.data for r in onnx_adapter.read(tmp_path / "ext.onnx").records()}
    assert recs["fc1.weight"].tobytes() == weights["fc1.weight"].tobytes()


# ---- quantized weights ---------------------------------------------------------------


def test_dequantize_linear_chains(tmp_path: Path, store: Store, rng) -> None:
    q_conv = rng.integers(0, 256, (6, 2, 3, 3)).astype(np.uint8)
    q_mm = rng.integers(-128, 128, (5, 4)).astype(np.int8)
    q4 = rng.integers(-8, 8, (4, 8)).astype(ml_dtypes.int4)
    f8 = arr(rng, 3, 8).astype(ml_dtypes.float8_e4m3fn)
    s_mm = (rng.random(5) * 0.1 + 0.01).astype(np.float32)
    z_mm = rng.integers(-3, 3, 5).astype(np.int8)
    s4 = (rng.random((4, 2)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(q_conv, "conv.q"),
             numpy_helper.from_array(np.array(0.02, np.float32), "conv.s"),
             numpy_helper.from_array(np.array(128, np.uint8), "conv.z"),
             numpy_helper.from_array(q_mm, "mm.q"), numpy_helper.from_array(s_mm, "mm.s"),
             numpy_helper.from_array(z_mm, "mm.z"),
             helper.make_tensor("blk.q", T.INT4, [4, 8], q4.astype(np.int8).ravel().tolist()),
             numpy_helper.from_array(s4, "blk.s"),
             numpy_helper.from_array(f8, "f8.q"),
             numpy_helper.from_array(np.array(0.5, np.float32), "f8.s")]
    nodes = [
        helper.make_node("DequantizeLinear", ["conv.q", "conv.s", "conv.z"], ["conv_w"]),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="/conv/Conv", group=2),
        helper.make_node("GlobalAveragePool", ["c"], ["c1"]),
        helper.make_node("Flatten", ["c1"], ["p"]),
        helper.make_node("DequantizeLinear", ["mm.q", "mm.s", "mm.z"], ["mm_w"], axis=0),
        helper.make_node("Transpose", ["mm_w"], ["mm_wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["p_pad", "mm_wt"], ["y1"], name="/proj/MatMul"),
        helper.make_node("DequantizeLinear", ["blk.q", "blk.s"], ["blk_w"], axis=1,
                         block_size=4),
        helper.make_node("MatMul", ["y1p", "blk_w"], ["y2"], name="/blk/MatMul"),
        helper.make_node("DequantizeLinear", ["f8.q", "f8.s"], ["f8_w"]),
        helper.make_node("Gemm", ["y2", "f8_w"], ["y"], name="/head/Gemm", transB=1),
        helper.make_node("Slice", ["p", "st", "en", "ax"], ["p_pad"]),
        helper.make_node("Slice", ["y1", "st", "en", "ax"], ["y1p"]),
    ]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n)
              for n, v in (("st", 0), ("en", 4), ("ax", 1))]
    path = save(model(nodes, [vi("x", F, [1, 4, 5, 5])], [vi("y")], inits),
                tmp_path / "q.onnx")
    snap = ingest(path, store)
    assert snap.names == [
        "conv.weight", "conv.weight_quantized", "conv.weight_scale", "conv.weight_zero_point",
        "proj.weight", "proj.weight_quantized", "proj.weight_scale", "proj.weight_zero_point",
        "blk.weight", "blk.weight_quantized", "blk.weight_scale",
        "head.weight", "head.weight_quantized", "head.weight_scale"]
    eff = {n for n in snap.names if attrs(snap, n)["effective"]}
    assert eff == {"conv.weight", "proj.weight", "blk.weight", "head.weight"}
    assert snap.metadata["source"]["n_params"] == 6 * 18 + 20 + 32 + 24
    # the quantized originals are laid out like their weights
    q = snap.info("conv.weight_quantized")
    assert (q.kind, q.layout, q.dtype) == ("conv2d", ("out", "in", "h", "w"), "uint8")
    assert attrs(snap, "conv.weight_quantized")["role"] == "quantized"
    assert attrs(snap, "conv.weight")["groups"] == 2
    pq = snap.info("proj.weight_quantized")
    assert pq.layout == ("out", "in") and pq.source_layout == ("out", "in")
    assert snap.read("proj.weight_quantized").tobytes() == q_mm.tobytes()
    assert snap.info("proj.weight_scale").layout == ("out",)  # per-axis along the output
    assert snap.info("proj.weight").source_layout == ("in", "out")
    expected = (q_mm.astype(np.float32) - z_mm[:, None]) * s_mm[:, None]  # [out, in]
    np.testing.assert_array_equal(snap.read("proj.weight"), expected)
    assert snap.info("blk.weight_quantized").dtype == "uint8"  # int4, kept packed
    assert attrs(snap, "blk.weight_quantized")["packed"] is True
    assert snap.info("head.weight_quantized").dtype == "float8_e4m3fn"
    matches_ort(path, snap)
    same_run(path, snap, {"x": arr(rng, 1, 4, 5, 5)})


# ---- element types and fields ---------------------------------------------------------


def test_narrow_floats_integers_and_typed_fields(tmp_path: Path, store: Store, rng) -> None:
    w16 = arr(rng, 4, 3, dtype=np.float16)
    wbf = arr(rng, 4, 3).astype(ml_dtypes.bfloat16)
    w8 = arr(rng, 4, 3).astype(ml_dtypes.float8_e5m2)
    w64 = arr(rng, 4, 3, dtype=np.float64)
    typed16 = helper.make_tensor("typed16", T.FLOAT16, [4, 3], w16.view(np.uint16).tolist())
    typed16.ClearField("int32_data")
    typed16.int32_data.extend(w16.view(np.uint16).ravel().astype(int).tolist())
    typed32 = helper.make_tensor("typed32", F, [3, 4], arr(rng, 3, 4).ravel().tolist())
    i8 = helper.make_tensor("i8", T.INT8, [4, 3], rng.integers(-128, 128, 12).tolist())
    inits = [numpy_helper.from_array(w16, "w16"), numpy_helper.from_array(wbf, "wbf"),
             numpy_helper.from_array(w8, "w8"), numpy_helper.from_array(w64, "w64"),
             typed16, typed32, i8]
    nodes = [helper.make_node("Cast", [n], [f"{n}_f"], to=F) for n in
             ("w16", "wbf", "w8", "w64", "typed16", "i8")]
    nodes += [helper.make_node("Gemm", ["x", f"{n}_f"], [f"y_{n}"], name=f"/{n}/Gemm", transB=1)
              for n in ("w16", "wbf", "w8", "w64", "typed16", "i8")]
    nodes.append(helper.make_node("MatMul", ["x", "typed32"], ["y_t32"], name="/t32/MatMul"))
    outs = [vi(f"y_{n}") for n in ("w16", "wbf", "w8", "w64", "typed16", "i8", "t32")]
    path = save(model(nodes, [vi("x", F, [1, 3])], outs, inits), tmp_path / "t.onnx")
    snap = ingest(path, store)
    assert snap.info("w16.weight_float16").dtype == "float16"
    assert snap.info("wbf.weight_bfloat16").dtype == "bfloat16"
    assert snap.info("w8.weight_float8e5m2").dtype == "float8_e5m2"
    assert snap.info("w64.weight_double").dtype == "float64"
    assert snap.info("i8.weight_int8").dtype == "int8"
    assert snap.info("w16.weight").dtype == "float32"  # as the model computes with it
    assert snap.read("wbf.weight_bfloat16").tobytes() == wbf.tobytes()
    assert snap.read("typed16.weight_float16").tobytes() == w16.tobytes()
    table = graph_table(snap)["tensors"]
    assert table["typed16.weight_float16"]["field"] == "int32_data"
    assert table["t32.weight"]["field"] == "float_data"
    assert table["i8.weight_int8"]["field"] == "int32_data"
    matches_ort(path, snap)
    same_run(path, snap, {"x": arr(rng, 1, 3)})


def test_sparse_initializer(tmp_path: Path, store: Store, rng) -> None:
    dense = np.zeros((6, 4), np.float32)
    rows, cols = np.array([0, 2, 5, 5]), np.array([3, 1, 0, 2])
    dense[rows, cols] = arr(rng, 4)
    values = numpy_helper.from_array(dense[rows, cols], "emb.weight")
    coords = numpy_helper.from_array(np.stack([rows, cols], 1).astype(np.int64), "idx")
    sp = helper.make_sparse_tensor(values, coords, [6, 4])
    path = save(model([helper.make_node("Gather", ["emb.weight", "ids"], ["y"])],
                      [vi("ids", T.INT64, [3])], [vi("y")], sparse_initializer=[sp]),
                tmp_path / "s.onnx")
    snap = ingest(path, store)
    assert snap.names == ["emb.weight"]
    assert (snap.info("emb.weight").kind, snap.info("emb.weight").layout) == (
        "embedding", ("vocab", "dim"))
    assert snap.read("emb.weight").tobytes() == dense.tobytes()
    assert attrs(snap, "emb.weight")["origin"] == "sparse_initializer"
    same_run(path, snap, {"ids": np.array([0, 5, 2], np.int64)})


# ---- layout chains -------------------------------------------------------------------


def test_layout_chains_keep_the_initializer_bytes(tmp_path: Path, store: Store, rng) -> None:
    w = arr(rng, 6, 4)  # [out, in], as torch stores it
    shared = arr(rng, 4)
    odd = arr(rng, 3, 8)
    inits = [numpy_helper.from_array(w, "lin.weight"), numpy_helper.from_array(shared, "g"),
             numpy_helper.from_array(odd, "odd"),
             numpy_helper.from_array(np.array([6, 4], np.int64), "shp")]
    nodes = [helper.make_node("Transpose", ["lin.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("Unsqueeze", ["wt", "ax"], ["wt3"]),
             helper.make_node("Squeeze", ["wt3", "ax"], ["wt2"]),
             helper.make_node("MatMul", ["x", "wt2"], ["h"], name="/lin/MatMul"),
             helper.make_node("Identity", ["g"], ["g2"]),
             helper.make_node("LayerNormalization", ["x", "g"], ["n1"], name="/ln1/LN"),
             helper.make_node("LayerNormalization", ["x", "g2"], ["n2"], name="/ln2/LN"),
             helper.make_node("Transpose", ["odd"], ["odd_t"], perm=[1, 0]),
             helper.make_node("Reshape", ["odd_t", "shp"], ["odd_r"]),
             helper.make_node("Gemm", ["h", "odd_r"], ["y"], name="/odd/Gemm")]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax"))
    path = save(model(nodes, [vi("x", F, [2, 4])], [vi("y"), vi("n1"), vi("n2")], inits),
                tmp_path / "l.onnx")
    snap = ingest(path, store)
    # Transpose/Unsqueeze/Squeeze of an initializer used once: stored once, canonical
    assert snap.read("lin.weight").tobytes() == w.tobytes()
    assert snap.info("lin.weight").source_name == "lin.weight"
    assert attrs(snap, "lin.weight")["ops"] == ["Transpose", "Unsqueeze", "Squeeze"]
    # an initializer used directly and through Identity: two weights, as torch has two
    assert attrs(snap, "ln2.weight")["ops"] == ["Identity"]
    assert snap.read("ln1.weight").tobytes() == snap.read("ln2.weight").tobytes()
    # a transpose, then a reshape that mixes axes: stored as computed, and its source
    assert attrs(snap, "odd.weight")["folded_from"] == ["odd"]
    assert snap.read("odd.weight").tobytes() == odd.T.reshape(6, 4).T.copy().tobytes()
    assert snap.read("odd.weight_source").tobytes() == odd.tobytes()
    assert not attrs(snap, "odd.weight_source")["effective"]
    matches_ort(path, snap)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_back_layout_recovers_any_representable_chain(data: st.DataObject) -> None:
    """Random Transpose/Reshape/Unsqueeze chains from a source to a 3-d weight: whenever
    back_layout answers, the source is the weight's canonical array transposed into that
    order and reshaped; and a chain of transposes and unit reshapes always has an answer."""
    dims = data.draw(st.lists(st.integers(1, 4), min_size=3, max_size=3))
    source = np.arange(int(np.prod(dims)), dtype=np.int32).reshape(dims)
    x, steps, simple = source, [], True
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["Transpose", "Reshape", "Unsqueeze"]))
        if kind == "Transpose":
            perm = data.draw(st.permutations(list(range(x.ndim))))
            f = fold.Fold("Transpose", tuple(x.shape[p] for p in perm), ONNX_TYPES[6],
                          {"perm": list(perm)})
            y = x.transpose(perm)
        elif kind == "Unsqueeze":
            at = data.draw(st.integers(0, x.ndim))
            y = np.expand_dims(x, at)
            f = fold.Fold("Unsqueeze", y.shape, ONNX_TYPES[6])
        else:
            y = x.reshape(-1)
            f = fold.Fold("Reshape", y.shape, ONNX_TYPES[6])
            simple = False
        steps.append((kind, f, x.shape))
        x = y
    if x.ndim != 3:  # back to three axes: drop unit axes if that is enough, else reshape
        nonunit = [d for d in x.shape if d != 1]
        target = tuple(nonunit) if len(nonunit) == 3 else tuple(dims)
        simple = simple and len(nonunit) == 3
        steps.append(("Reshape", fold.Fold("Reshape", target, ONNX_TYPES[6]), x.shape))
        x = x.reshape(target)
    names = ("a", "b", "c")
    canonical = ("c", "a", "b")
    layout = fold.back_layout(list(reversed(steps)), names, x.shape)
    if simple:
        assert layout is not None
    if layout is not None:
        canon = x.transpose([names.index(n) for n in canonical])
        back = to_source_layout(canon, canonical, layout, source.shape)
        assert back.tobytes() == source.tobytes()


# ---- roles of every operator in the table ---------------------------------------------


def test_role_table(tmp_path: Path, store: Store, rng) -> None:
    t = {
        "ct_w": arr(rng, 3, 2, 2, 2), "ct_b": arr(rng, 2), "c1_w": arr(rng, 5, 3, 3),
        "c3_w": arr(rng, 2, 3, 1, 1, 1), "ga": arr(rng, 3, 4), "gb": arr(rng, 5, 4),
        "gc": arr(rng, 1, 5), "ma": arr(rng, 7, 3), "bn_s": arr(rng, 3), "bn_b": arr(rng, 3),
        "bn_m": arr(rng, 3), "bn_v": np.abs(arr(rng, 3)) + 0.5, "in_s": arr(rng, 3),
        "in_b": arr(rng, 3), "gn_s": arr(rng, 3), "gn_b": arr(rng, 3), "pr": arr(rng, 3, 1, 1),
        "rnn_w": arr(rng, 1, 4, 3), "rnn_r": arr(rng, 1, 4, 4), "rnn_b": arr(rng, 1, 8),
        "gru_w": arr(rng, 2, 12, 3), "gru_r": arr(rng, 2, 12, 4), "emb_t": arr(rng, 5, 9),
        "cb": arr(rng, 1, 2, 1, 1), "cw": arr(rng, 2, 3, 1, 1), "lb": arr(rng, 5),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in t.items()]
    x4 = "x4"
    nodes = [
        helper.make_node("ConvTranspose", [x4, "ct_w", "ct_b"], ["o1"], name="/up/ConvTranspose"),
        helper.make_node("Conv", ["x3", "c1_w"], ["o2"], name="/c1/Conv"),
        helper.make_node("Conv", ["x5", "c3_w"], ["o3"], name="/c3/Conv"),
        helper.make_node("Gemm", ["ga", "xg"], ["o4"], name="/ga/Gemm", transA=1),
        helper.make_node("Gemm", ["xg2", "gb", "gc"], ["o5"], name="/gb/Gemm", transB=1,
                         alpha=0.5),
        helper.make_node("MatMul", ["ma", "xm"], ["o6"], name="/ma/MatMul"),
        helper.make_node("BatchNormalization", [x4, "bn_s", "bn_b", "bn_m", "bn_v"], ["o7"],
                         name="/bn/BN"),
        helper.make_node("InstanceNormalization", [x4, "in_s", "in_b"], ["o8"], name="/in/IN"),
        helper.make_node("GroupNormalization", [x4, "gn_s", "gn_b"], ["o9"], name="/gn/GN",
                         num_groups=3),
        helper.make_node("PRelu", [x4, "pr"], ["o10"], name="/act/PRelu"),
        helper.make_node("RNN", ["xs", "rnn_w", "rnn_r", "rnn_b"], ["o11"], name="/rnn/RNN",
                         hidden_size=4),
        helper.make_node("GRU", ["xs", "gru_w", "gru_r"], ["o12"], name="/gru/GRU",
                         hidden_size=4, direction="bidirectional"),
        helper.make_node("Gather", ["emb_t", "ids"], ["o13"], name="/emb/Gather", axis=1),
        helper.make_node("Conv", [x4, "cw"], ["cv"], name="/proj/Conv"),
        helper.make_node("Add", ["cv", "cb"], ["o14"], name="/proj/Add"),
        helper.make_node("MatMul", ["xg2", "gb_t"], ["mm"], name="/lin/MatMul"),
        helper.make_node("Add", ["mm", "lb"], ["o15"], name="/lin/Add"),
    ]
    nodes.insert(0, helper.make_node("Transpose", ["gb"], ["gb_t"], perm=[1, 0]))
    inputs = [vi(x4, F, [1, 3, 2, 2]), vi("x3", F, [1, 3, 6]), vi("x5", F, [1, 3, 2, 2, 2]),
              vi("xg", F, [3, 2]), vi("xg2", F, [2, 4]), vi("xm", F, [3, 2]),
              vi("xs", F, [2, 1, 3]), vi("ids", T.INT64, [2])]
    outs = [vi(f"o{k}") for k in range(1, 16)]
    path = save(model(nodes, inputs, outs, inits), tmp_path / "roles.onnx")
    snap = ingest(path, store)

    def check(name: str, kind: str, layout: tuple[str, ...], canonical: np.ndarray,
              **expect: Any) -> None:
        info = snap.info(name)
        assert (info.kind, info.layout) == (kind, layout), name
        assert snap.read(name).tobytes() == np.ascontiguousarray(canonical).tobytes(), name
        a = attrs(snap, name)
        for k, v in expect.items():
            assert a[k] == v, (name, k)

    check("up.weight", "conv_transpose", ("in", "out", "h", "w"), t["ct_w"], op="ConvTranspose")
    check("up.bias", "conv_transpose", ("out",), t["ct_b"])
    check("c1.weight", "conv1d", ("out", "in", "w"), t["c1_w"])
    check("c3.weight", "conv3d", ("out", "in", "d", "h", "w"), t["c3_w"])
    check("ga.weight", "linear", ("out", "in"), t["ga"].T, input="A", transA=1)  # A' = A.T
    check("gb.weight", "linear", ("out", "in"), t["gb"], input="B", transB=1, alpha=0.5)
    check("gb.bias", "linear", ("out",), t["gc"].reshape(-1), input="C")
    assert snap.info("gb.bias").source_shape == (1, 5)
    check("ma.weight", "linear", ("out", "in"), t["ma"], input="A")
    for param, key, role in (("weight", "bn_s", "weight"), ("bias", "bn_b", "bias"),
                             ("running_mean", "bn_m", "running_mean"),
                             ("running_var", "bn_v", "running_var")):
        check(f"bn.{param}", "norm", ("channel",), t[key], role=role)
    check("in.weight", "norm", ("channel",), t["in_s"], op="InstanceNormalization")
    check("gn.bias", "norm", ("channel",), t["gn_b"], num_groups=3)
    check("act.weight", "other", ("channel",), t["pr"].reshape(-1), op="PRelu")
    check("rnn.weight_ih", "recurrent", ("direction", "gates_out", "in"), t["rnn_w"],
          gates=["h"], hidden_size=4)
    check("rnn.bias", "recurrent", ("direction", "gates_out"), t["rnn_b"], halves=["W", "R"])
    check("gru.weight_hh", "recurrent", ("direction", "gates_out", "in"), t["gru_r"],
          gates=["z", "r", "h"], direction="bidirectional")
    check("emb.weight", "embedding", ("vocab", "dim"), t["emb_t"].T)  # Gather along axis 1
    check("proj.bias", "conv2d", ("out",), t["cb"].reshape(-1), via="Add")
    check("lin.weight", "linear", ("out", "in"), t["gb"], ops=["Transpose"])
    check("lin.bias", "linear", ("out",), t["lb"], via="Add")
    assert attrs(snap, "gb.weight")["op"] == "Gemm"  # used directly and through a Transpose
    same_run(path, snap, {n.name: (np.array([0, 8], np.int64) if n.name == "ids" else
                                   arr(rng, *[d.dim_value for d in n.type.tensor_type.shape.dim]))
                          for n in inputs})


# ---- names from other exporters ---------------------------------------------------------


def test_added_bias_takes_its_layers_name(tmp_path: Path, rng) -> None:
    inits = [numpy_helper.from_array(arr(rng, 3, 4), "onnx::MatMul_1"),
             numpy_helper.from_array(arr(rng, 4), "const_7")]
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["h"],
                              name="/decoder/proj/MatMul"),
             helper.make_node("Add", ["const_7", "h"], ["y"])]  # an unnamed Add, bias first
    path = save(model(nodes, [vi("x", F, [2, 3])], [vi("y")], inits), tmp_path / "b.onnx")
    described = {t["name"]: t for t in onnx_adapter.read(path).describe()}
    assert list(described) == ["decoder.proj.weight", "decoder.proj.bias"]
    assert described["decoder.proj.bias"]["attrs"]["via"] == "Add"
    assert described["decoder.proj.bias"]["kind"] == "linear"


def test_names_from_tensorflow_paddle_caffe_and_scopes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    specs = [  # (initializer name, consumer node name, expected canonical name)
        ("sequential/dense/MatMul/ReadVariableOp:0", "sequential/dense/MatMul",
         "sequential.dense.weight"),
        ("linear_0.w_0", "p2o.MatMul.0", "linear_0.weight"),
        ("inception_3a/1x1_w_0", "", "inception_3a.1x1.weight"),
        ("onnx::MatMul_7", "/encoder/layer.0/attention/self/query/MatMul",
         "encoder.layer.0.attention.self.query.weight"),
        ("onnx::MatMul_8", "/features/features.0/features.0.1/MatMul", "features.0.1.weight"),
        ("val_3", "node_linear_3", "stage.block.fc.weight"),
        ("W", "conv_1x1", "conv_1x1.weight"),
    ]
    nodes, inits, outs = [], [], []
    for k, (init, node, _) in enumerate(specs):
        inits.append(numpy_helper.from_array(arr(rng, 3, 3), init))
        n = helper.make_node("MatMul", ["x", init], [f"y{k}"], name=node)
        if node == "node_linear_3":
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                                 value="['', 'stage', 'stage.block', 'stage.block.fc', 'linear']")
        nodes.append(n)
        outs.append(vi(f"y{k}"))
    path = save(model(nodes, [vi("x", F, [1, 3])], outs, inits), tmp_path / "n.onnx")
    src = onnx_adapter.read(path)
    assert src.names() == [expected for _, _, expected in specs]
    assert [t["source_name"] for t in src.describe()] == [init for init, _, _ in specs]


# ---- registry, metadata, attachments ----------------------------------------------------


def test_registry_metadata_and_ingest_entry_point(tmp_path: Path, rng) -> None:
    m, weights = mlp(rng)
    folder = tmp_path / "model"
    folder.mkdir()
    path = save(m, folder / "model.onnx")
    bare = tmp_path / "weights"
    bare.write_bytes(Path(path).read_bytes())
    assert detect_format(path) == detect_format(folder) == detect_format(bare) == "onnx"
    snap = wa.ingest(folder, store=tmp_path / "store")
    assert snap.ref == "model@0"
    meta = snap.metadata["source"]
    assert meta["producer_name"] == "weightatlas-tests"
    assert meta["opset_import"] == {"ai.onnx": 21} and meta["ir_version"] == 10
    assert meta["inputs"] == [{"name": "x", "elem_type": 1, "shape": [1, 8]}]
    assert meta["n_params"] == sum(v.size for v in weights.values())
    assert snap.metadata["framework"] == "onnx"
    # a second step of the same graph shares the attached graph's blob
    again = wa.ingest(folder, store=tmp_path / "store", step=1)
    assert again.attachments == snap.attachments
    digest = snap.attachments["graph.onnx"]["sha256"]
    assert len(list((tmp_path / "store" / "models" / "model").rglob(digest))) == 1


def test_graph_format_is_shared_and_load_model_refuses_what_it_cannot_rebuild(
        tmp_path: Path, store: Store, rng) -> None:
    from weightatlas.core import _onnx_model as core
    from weightatlas.errors import IntegrityError, NotFoundError
    from weightatlas.storage import RecordsSource, TensorRecord

    assert (core.GRAPH_ATTACHMENT, core.LOCATION_PREFIX, core.GRAPH_KEY) == (
        onnx_adapter.GRAPH_ATTACHMENT, onnx_adapter.LOCATION_PREFIX, onnx_adapter.GRAPH_KEY)
    plain = store.write(RecordsSource([TensorRecord("w", np.ones(2, np.float32))]), "plain")
    with pytest.raises(NotFoundError, match=r"plain@0 has no graph\.onnx attachment \(it was "
                                            r"not ingested from an ONNX model\)"):
        load_model(plain)
    m, _ = mlp(rng)
    snap = ingest(save(m, tmp_path / "m.onnx"), store)
    graph = snap.attachment("graph.onnx")
    table = graph_table(snap)
    del table["tensors"]["fc2.bias"]
    forged = load_graph(snap)
    forged.metadata_props.add(key=core.GRAPH_KEY, value=json.dumps(table))
    records = [TensorRecord(n, np.array(snap.read(n))) for n in snap.names]
    broken = store.write(RecordsSource(records, files={"graph.onnx": forged.SerializeToString()}),
                         "broken")
    with pytest.raises(IntegrityError, match=r"refers to tensor 'fc2\.bias', which its table "
                                             r"does not list once"):
        load_model(broken)
    bad = store.write(RecordsSource(records, files={"graph.onnx": graph[:-7]}), "cut")
    with pytest.raises(IntegrityError, match=r"graph\.onnx of cut@0 (is not a valid ONNX model|"
                                             r"has no weightatlas\.graph table)"):
        load_model(bad)
