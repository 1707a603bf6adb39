"""Stored models through the executor: ``from_snapshot`` on both graph conventions (the
ONNX adapter's and a live PyTorch module's), checked against onnxruntime on the original
ONNX file and against PyTorch; weight gradients against torch autograd, per tensor in the
canonical layout, and stored as a snapshot that the weight charts draw; the bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.core.executor import (
    from_snapshot,
    layer_output,
    occlusion,
    stored_gradients,
    weight_gradient_snapshot,
)
from weightatlas.errors import (
    InputMismatchError,
    IntegrityError,
    NotFoundError,
    ShapeError,
    SnapshotExistsError,
)
from weightatlas.storage import (
    RecordsSource,
    Store,
    TensorRecord,
    to_canonical_layout,
    to_source_layout,
)

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from tests import onnx_models as om  # noqa: E402
from tests.framework_models import torch_transformer  # noqa: E402
from tests.models import resnet18  # noqa: E402


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def trained_like(module: Any, seed: int = 0) -> Any:
    """Every parameter distinct and non-trivial, as after training (the TorchScript
    exporter merges initializers of equal values, such as freshly initialised biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def ort_run(model: Any, feeds: dict[str, np.ndarray], optimize: bool = True) -> list[Any]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # onnxruntime fuses DequantizeLinear into quantized kernels otherwise
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(
        None, feeds)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ResNet-18 (10 classes, 32x32): the module, an input, its ONNX export (batch norms
    folded) and one without constant folding, and stored snapshots of all three."""
    from weightatlas.adapters import torch as torch_adapter

    tmp = tmp_path_factory.mktemp("resnet")
    module = trained_like(resnet18(seed=0, num_classes=10))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    store = Store(tmp / "store", create=True)
    folded = om.export(module, (x,), str(tmp / "r18.onnx"), "ts")
    unfolded = om.export(module, (x,), str(tmp / "r18nf.onnx"), "tsnf")
    return {
        "module": module, "x": x, "store": store, "onnx": folded,
        "snaps": {
            "onnx": wa.ingest(folded, store=store, model="r18", step=3),
            "onnx-unfolded": wa.ingest(unfolded, store=store, model="r18nf"),
            "torch": store.write(torch_adapter.from_module(module, example_inputs=(x,)),
                                 "r18t", step=3),
        },
    }


@pytest.mark.parametrize("convention", ["onnx", "onnx-unfolded", "torch"])
def test_resnet18_from_snapshot_matches_onnxruntime(resnet: dict[str, Any],
                                                     convention: str) -> None:
    snap = resnet["snaps"][convention]
    fn = from_snapshot(snap)
    x = resnet["x"].numpy()
    (want,) = ort_run(resnet["onnx"], {"input.1": x})
    assert rel(fn(x)[0], want) < 1e-5
    with torch.no_grad():
        assert rel(fn(x)[0], resnet["module"](resnet["x"]).numpy()) < 1e-5
    assert len(fn._jitted) == 1  # the second call reused the compiled program
    # every executor weight is a stored tensor, one to one, read as a view of the file
    assert {fn.weight_of[t]: t for t in fn.weight_of} == fn.tensor_of
    assert set(fn.tensor_of) == set(fn.weights) | (set(fn.tensor_of) & set(fn.constants))
    for name, stored in fn.tensor_of.items():
        w = fn.weights.get(name, fn.constants.get(name))
        assert not w.flags.owndata and not w.flags.writeable, name
        assert w.tobytes() == snap.read(stored, layout="source").tobytes()
    assert fn.convention == ("torch" if convention == "torch" else "onnx")
    assert fn.snapshot_ref == snap.ref


def test_layer_output_names_activations(resnet: dict[str, Any]) -> None:
    fn = from_snapshot(resnet["snaps"]["torch"])
    conv = layer_output(fn, "layer1.0.conv2")
    assert layer_output(fn, "layer1.0.conv2.weight") == conv
    node = next(n for n in fn.graph.nodes if n.outputs[0] == conv)
    assert node.op_type == "Conv" and "layer1.0.conv2.weight" in node.inputs
    assert layer_output(fn, conv) == conv  # a graph value is its own activation
    fc = next(n for n in fn.graph.nodes if n.outputs[0] == layer_output(fn, "fc"))
    assert fc.op_type == "Gemm"
    with pytest.raises(NotFoundError, match=r"r18t@3: no layer.*'layer1\.0\.conv2'"):
        layer_output(fn, "layer1.0.conv9")


@pytest.mark.parametrize("convention,loss", [("torch", "target"),
                                              ("onnx-unfolded", "cross_entropy")])
def test_weight_gradients_equal_torch_autograd(resnet: dict[str, Any], convention: str,
                                               loss: str) -> None:
    module, x = resnet["module"], resnet["x"]
    targets = np.array([3, 7])
    fn = from_snapshot(resnet["snaps"][convention])
    found = stored_gradients(fn, x.numpy(), targets, loss=loss)
    module.zero_grad()
    logits = module(x)
    if loss == "target":
        logits[torch.arange(2), torch.from_numpy(targets)].sum().backward()
    else:
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets)).backward()
    params = dict(module.named_parameters())
    assert set(params) <= set(found)
    for name, p in params.items():
        assert found[name].shape == tuple(p.shape), name
        assert rel(found[name], p.grad.numpy()) < 1e-4, name


# ---- an MLP whose weights the store transposes -------------------------------------


def mlp(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """relu(x @ W1 + b1) @ W2 + b2 with W1 a MatMul operand and W2 a Gemm B without
    transB, both [in, out] in the file and [out, in] in the store."""
    rng = np.random.default_rng(0)
    w = {"W1": rng.standard_normal((4, 6)).astype(np.float32),
         "b1": rng.standard_normal(6).astype(np.float32),
         "W2": rng.standard_normal((6, 3)).astype(np.float32),
         "b2": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="/fc1/MatMul"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="/fc1/Add"),
             helper.make_node("Relu", ["h1"], ["h"], name="/relu/Relu"),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="/fc2/Gemm")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    path = str(tmp_path / "mlp.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, w


def test_gradient_snapshot_has_the_weights_schema(tmp_path: Path, store: Store) -> None:
    path, w = mlp(tmp_path)
    snap = wa.ingest(path, store=store, model="mlp", step=40)
    assert snap.info("fc2.weight").layout == ("out", "in")
    assert snap.info("fc2.weight").source_layout == ("in", "out")
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    t = np.array([2, 0])
    grads = weight_gradient_snapshot(snap, x, t, store=store)
    # closed form (NumPy backpropagation), in the canonical [out, in] layout
    pre = x @ w["W1"] + w["b1"]
    h = np.maximum(pre, 0)
    dy = np.eye(3, dtype=np.float32)[t]
    dpre = (dy @ w["W2"].T) * (pre > 0)
    want = {"fc1.weight": (x.T @ dpre).T, "fc1.bias": dpre.sum(0),
            "fc2.weight": (h.T @ dy).T, "fc2.bias": dy.sum(0)}
    assert grads.ref == "mlp.grad@40" and grads.verify() == []
    assert grads.names == snap.names
    for name, value in want.items():
        assert rel(grads.read(name), value) < 1e-6, name
        a, b = snap.info(name), grads.info(name)
        for field in ("name", "source_name", "kind", "layout", "source_layout",
                      "source_shape", "module", "param", "attrs", "shape", "dtype"):
            assert getattr(a, field) == getattr(b, field), (name, field)
    # the source layout of a gradient is the file's, as for the weight
    assert grads.read("fc2.weight", layout="source").shape == (6, 3)
    meta = grads.metadata["source"]["gradient"]
    assert meta["of"] == "mlp@40" and meta["objective"] == "target" and meta["target"] == [2, 0]
    assert meta["inputs"] == [{"name": "x", "shape": [2, 4], "dtype": "float32"}]
    assert meta["no_gradient"] == {} and len(meta["inputs_sha256"]) == 64
    spec = wa.viz.heatmap(grads, "fc2.weight").to_dict()
    assert "fc2.weight" in json.dumps(spec)
    # other inputs make another gradient: refused unless overwrite
    with pytest.raises(SnapshotExistsError):
        weight_gradient_snapshot(snap, x, 1, store=store)
    again = weight_gradient_snapshot(from_snapshot(snap), x, 1, store=store, overwrite=True)
    assert again.metadata["source"]["gradient"]["target"] == 1


def test_to_canonical_layout_inverts_to_source_layout(rng: np.random.Generator) -> None:
    cases = [(("out", "in"), ("in", "out"), (3, 5), (5, 3)),
             (("out", "in", "h", "w"), ("h", "w", "in", "out"), (2, 3, 4, 5), (4, 5, 3, 2)),
             (("out",), ("out",), (6,), (1, 6)),  # a [1, N] Gemm bias
             (("out", "in"), ("in", "out"), (4, 6), (2, 3, 4))]  # split axis
    for layout, source, shape, source_shape in cases:
        a = rng.standard_normal(shape)
        back = to_canonical_layout(to_source_layout(a, layout, source, source_shape), layout,
                                   source, shape)
        assert back.tobytes() == a.tobytes()
    # a Flax ConvTranspose kernel: stored spatially reversed (attrs["flip"])
    layout, source, flip = ("in", "out", "h", "w"), ("h", "w", "in", "out"), ("h", "w")
    a = rng.standard_normal((3, 2, 4, 5))
    src = to_source_layout(a, layout, source, (4, 5, 3, 2), flip)
    np.testing.assert_array_equal(src, a[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
    back = to_canonical_layout(src, layout, source, (3, 2, 4, 5), flip)
    assert back.tobytes() == a.tobytes()


def test_occlusion_runs_the_stored_model(tmp_path: Path, store: Store) -> None:
    path, _ = mlp(tmp_path)
    fn = from_snapshot(wa.ingest(path, store=store))
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    want = occlusion(onnx.load(path), x, 1, window=(1,))
    assert rel(occlusion(fn, x, 1, window=(1,)), want) < 1e-6


# ---- transformers ------------------------------------------------------------------


def test_live_transformer_with_fused_attention(store: Store) -> None:
    from weightatlas.adapters import torch as torch_adapter

    module = trained_like(torch_transformer())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the tracer's note on MultiheadAttention's checks
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        snap = store.write(torch_adapter.from_module(module, example_inputs=(ids,)), "tt")
    fn = from_snapshot(snap)
    with torch.no_grad():
        want = module(ids).numpy()
    assert rel(fn(ids.numpy())[0], want) < 1e-5
    # the fused in_proj is stored split: each part is a weight of its own
    q = "layers.0.self_attn.q_proj.weight"
    assert fn.tensor_of[fn.weight_of[q]] == q and fn.weights[fn.weight_of[q]].shape == (32, 32)
    head = fn.output_names[0]
    found = stored_gradients(fn, ids.numpy(), loss=lambda y: y[:, -1, 2].sum())
    assert fn.output_names == (head,)
    module.zero_grad()
    module(ids)[:, -1, 2].sum().backward()
    fused = module.layers[0].self_attn.in_proj_weight.grad.numpy()
    for i, part in enumerate("qkv"):
        assert rel(found[f"layers.0.self_attn.{part}_proj.weight"], fused[32 * i:32 * (i + 1)]
                   ) < 1e-4
    assert rel(found["tok.weight"], module.tok.weight.grad.numpy()) < 1e-4
    assert rel(found["layers.1.linear1.weight"],
               module.layers[1].linear1.weight.grad.numpy()) < 1e-4


def test_exported_transformer_matches_onnxruntime(tmp_path: Path, store: Store) -> None:
    module = om.transformer()
    (ids,) = om.example_input("transformer")
    path = om.export(module, (ids,), str(tmp_path / "bert.onnx"), "ts")
    fn = from_snapshot(wa.ingest(path, store=store))
    (want,) = ort_run(path, {fn.input_names[0]: ids.numpy()})
    assert rel(fn(ids.numpy())[0], want) < 1e-5


# ---- folded weights, Constant nodes, sparse initializers ---------------------------


def odd_model(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A quantized projection (DequantizeLinear per output channel, then Transpose), a
    transposed weight, one LayerNorm scale used directly and through Identity, and a
    Constant-node weight and bias."""
    rng = np.random.default_rng(3)
    v = {"q": rng.integers(-128, 128, (5, 4)).astype(np.int8),
         "s": (rng.random(5) * 0.004 + 0.002).astype(np.float32),
         "z": rng.integers(-3, 3, 5).astype(np.int8),
         "lin": 0.4 * rng.standard_normal((5, 5)).astype(np.float32),  # [out, in]
         "g": (1 + 0.3 * rng.standard_normal(4)).astype(np.float32),
         "cw": rng.standard_normal((5, 3)).astype(np.float32),
         "cb": rng.standard_normal(3).astype(np.float32)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g"], ["n1"], name="/ln1/LN"),
        helper.make_node("Identity", ["g"], ["g2"]),
        helper.make_node("LayerNormalization", ["x", "g2"], ["n2"], name="/ln2/LN"),
        helper.make_node("Add", ["n1", "n2"], ["n"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wq"], axis=0),
        helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]),
        helper.make_node("MatMul", ["n", "wqt"], ["p"], name="/proj/MatMul"),
        helper.make_node("Transpose", ["lin"], ["lint"], perm=[1, 0]),
        helper.make_node("MatMul", ["p", "lint"], ["r"], name="/lin/MatMul"),
        helper.make_node("Tanh", ["r"], ["rt"]),
        helper.make_node("Constant", [], ["cw_out"], name="/head/Constant",
                         value=numpy_helper.from_array(v["cw"], "cw")),
        helper.make_node("Constant", [], ["cb_out"], name="/head/Constant_1",
                         value_floats=v["cb"].tolist()),
        helper.make_node("MatMul", ["rt", "cw_out"], ["y0"], name="/head/MatMul"),
        helper.make_node("Add", ["y0", "cb_out"], ["y"], name="/head/Add"),
    ]
    inits = [numpy_helper.from_array(v[k], k) for k in ("q", "s", "z", "lin", "g")]
    g = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    path = str(tmp_path / "odd.onnx")
    onnx.save(m, path)
    return path, v


def test_folded_and_constant_node_weights(tmp_path: Path, store: Store,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = odd_model(tmp_path)
    snap = wa.ingest(path, store=store)
    assert {"proj.weight", "proj.weight_quantized", "ln1.weight", "ln2.weight",
            "head.weight", "head.bias", "lin.weight"} <= set(snap.names)
    read: list[str] = []
    original = snap.read
    monkeypatch.setattr(snap, "read", lambda name, **kw: read.append(name) or original(
        name, **kw))
    fn = from_snapshot(snap)
    # every tensor the model computes with is read once; the quantized originals never
    assert sorted(read) == sorted(fn.weight_of) and len(read) == len(set(read))
    assert not {"proj.weight_quantized", "proj.weight_scale"} & set(read)
    assert fn.weight_of["proj.weight"] == "wqt" and fn.weight_of["head.weight"] == "cw_out"
    assert fn.weight_of["ln2.weight"] == "g2" and fn.weight_of["ln1.weight"] == "g"
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    (want,) = ort_run(path, {"x": x}, optimize=False)
    assert rel(fn(x)[0], want) < 1e-5
    # gradients against torch autograd on the stored (folded) values
    leaf = {n: torch.tensor(np.array(snap.read(n)), requires_grad=True)
            for n in ("proj.weight", "lin.weight", "ln1.weight", "ln2.weight", "head.weight",
                      "head.bias")}
    xt = torch.from_numpy(x)
    n = (torch.nn.functional.layer_norm(xt, (4,), leaf["ln1.weight"])
         + torch.nn.functional.layer_norm(xt, (4,), leaf["ln2.weight"]))
    r = torch.tanh(n @ leaf["proj.weight"].T @ leaf["lin.weight"].T)
    y = r @ leaf["head.weight"].T + leaf["head.bias"]
    y[:, 1].sum().backward()
    found = stored_gradients(fn, x, 1)
    for name, t in leaf.items():
        assert found[name].shape == tuple(t.shape), name
        assert rel(found[name], t.grad.numpy()) < 1e-5, name
    grads = weight_gradient_snapshot(fn, x, 1, store=store)
    missing = grads.metadata["source"]["gradient"]["no_gradient"]
    assert set(missing) == set(snap.names) - set(found)
    assert missing["proj.weight_quantized"].startswith("not a weight of the executor")


def test_sparse_initializer_becomes_the_dense_weight(tmp_path: Path, store: Store) -> None:
    dense = np.zeros((6, 4), np.float32)
    rows, cols = np.array([0, 2, 5, 5]), np.array([3, 1, 0, 2])
    dense[rows, cols] = [1.5, -2.0, 0.25, 3.0]
    sp = helper.make_sparse_tensor(
        numpy_helper.from_array(dense[rows, cols], "emb.weight"),
        numpy_helper.from_array(np.stack([rows, cols], 1).astype(np.int64), "idx"), [6, 4])
    g = helper.make_graph([helper.make_node("Gather", ["emb.weight", "ids"], ["y"])], "s",
                          [helper.make_tensor_value_info("ids", T.INT64, [3])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [3, 4])],
                          sparse_initializer=[sp])
    path = str(tmp_path / "s.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    fn = from_snapshot(wa.ingest(path, store=store))
    ids = np.array([5, 0, 5], np.int64)
    (want,) = ort_run(path, {"ids": ids})
    assert np.asarray(fn(ids)[0]).tobytes() == want.tobytes()
    grad = stored_gradients(fn, ids, 2)["emb.weight"]
    expected = np.zeros((6, 4), np.float32)
    np.add.at(expected, (ids, 2), 1.0)  # each example's row, at the target column
    assert grad.tobytes() == expected.tobytes()


# ---- bad input ---------------------------------------------------------------------


def test_snapshot_without_a_graph(tmp_path: Path, store: Store) -> None:
    from weightatlas.adapters import safetensors

    safetensors.write({"fc.weight": np.ones((2, 3), np.float32)}, tmp_path / "m.safetensors")
    snap = wa.ingest(tmp_path / "m.safetensors", store=store)
    with pytest.raises(NotFoundError, match=r"snapshot m@0 has no graph\.onnx attachment \(only.*"
                                            r"safetensors source.*ingest the model from an "
                                            r"ONNX file.*example_inputs"):
        from_snapshot(snap)


def test_damaged_graph_attachments(tmp_path: Path, store: Store) -> None:
    path, _ = mlp(tmp_path)
    good = wa.ingest(path, store=store, model="mlp")
    records = [TensorRecord(n, np.array(good.read(n)), kind=good.info(n).kind)
               for n in good.names]

    def snap_with(graph: bytes, items: list[TensorRecord], model: str) -> Any:
        return store.write(RecordsSource(items, files={"graph.onnx": graph}), model)

    with pytest.raises(IntegrityError, match=r"graph\.onnx of bad1@0 is not a valid ONNX"):
        from_snapshot(snap_with(b"\xff\xff\xff\xff", records, "bad1"))
    with pytest.raises(IntegrityError, match=r"neither a weightatlas\.graph table nor"):
        from_snapshot(snap_with(onnx.load(path).SerializeToString(), records, "bad2"))
    # the graph refers to a tensor the snapshot lacks
    attached = good.attachment("graph.onnx")
    lacking = [r for r in records if r.name != "fc2.weight"]
    with pytest.raises(IntegrityError, match=r"bad3@0 refers to tensor 'fc2.weight' "
                                             r"\(initializer 'W2'\), which the snapshot does "
                                             "not hold"):
        from_snapshot(snap_with(attached, lacking, "bad3"))
    # the stored blob changed on disk: its sha256 no longer matches
    blob = next((Path(store.root) / "models" / "mlp" / "_blobs").iterdir())
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError):
        from_snapshot(store.snapshot("mlp@0"))


def test_torch_graph_with_a_missing_tensor(store: Store) -> None:
    from weightatlas.adapters import torch as torch_adapter

    module = trained_like(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                              torch.nn.Linear(4, 2)))
    x = torch.randn(1, 3)
    snap = store.write(torch_adapter.from_module(module, example_inputs=(x,)), "seq")
    records = [TensorRecord(n, np.array(snap.read(n))) for n in snap.names if n != "2.weight"]
    bad = store.write(RecordsSource(records, files={"graph.onnx": snap.attachment(
        "graph.onnx")}), "seq-bad")
    with pytest.raises(IntegrityError, match=r"initializer '2\.weight' has no values and no "
                                             r"stored tensor has source name '2\.weight'"):
        from_snapshot(bad)


def test_wrong_inputs_are_refused_before_computing(resnet: dict[str, Any]) -> None:
    fn = from_snapshot(resnet["snaps"]["onnx"])
    with pytest.raises(ShapeError, match=r"r18@3: input 'input.1' must have shape "
                                         r"float32\[2, 3, 32, 32\], got \[2, 3, 31, 32\]"):
        fn(np.zeros((2, 3, 31, 32), np.float32))
    with pytest.raises(InputMismatchError, match=r"input 'input.1' must be float32, got "
                                                 "float64"):
        fn(np.zeros((2, 3, 32, 32)))
    with pytest.raises(InputMismatchError, match="expects 1 inputs"):
        stored_gradients(fn, [np.zeros((2, 3, 32, 32), np.float32)] * 2, 0)
    with pytest.raises(InputMismatchError, match="loss 'mse' is not one of"):
        stored_gradients(fn, np.zeros((2, 3, 32, 32), np.float32), 0, loss="mse")
    with pytest.raises(InputMismatchError, match="give a target"):
        stored_gradients(fn, np.zeros((2, 3, 32, 32), np.float32))
    assert fn._jitted == {}  # nothing was compiled


def test_fresh_module_keeps_one_weight_per_parameter(store: Store) -> None:
    """A freshly initialised ResNet-18 has many parameters of equal values (zero biases,
    batch-norm scales of 1); the exporter must not merge them: each stored parameter is
    its own weight with its own gradient, as in torch autograd."""
    from weightatlas.adapters import torch as torch_adapter

    module = resnet18(seed=0, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    snap = store.write(torch_adapter.from_module(module, example_inputs=(x,)), "fresh")
    fn = from_snapshot(snap)
    params = dict(module.named_parameters())
    assert set(params) <= set(fn.weight_of)
    assert len({fn.weight_of[n] for n in params}) == len(params)
    assert [i.name for i in fn.inputs] == [fn.input_names[0]] and len(fn.inputs) == 1
    found = stored_gradients(fn, x.numpy(), np.array([3, 7]))
    module.zero_grad()
    module(x)[torch.arange(2), torch.tensor([3, 7])].sum().backward()
    for name, p in params.items():
        assert rel(found[name], p.grad.numpy()) < 1e-4, name
