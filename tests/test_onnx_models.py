"""The ONNX adapter on real models: exported from torch.nn by both exporters, and the small
models that ship inside the ``onnx`` package (written by no one on this team).

Every fixture is checked for its parameter count (against torch, or against published
figures and an independent count from the graph), for each tensor's bytes against what
onnxruntime computes for that value, for names, roles and layouts, and for the graph
attached to the snapshot: the model rebuilt from the store is the original, and
onnxruntime gives bit-identical outputs on it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.adapters import onnx as onnx_adapter
from weightatlas.core._onnx_model import load_model
from weightatlas.storage import Store, to_source_layout

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tests import onnx_models as om  # noqa: E402
from tests.models import resnet18  # noqa: E402

nn = torch.nn
ARCHS: dict[str, Any] = {"resnet18": lambda: resnet18(num_classes=10), "vgg": om.vgg,
                         "mobilenet": om.mobilenet, "transformer": om.transformer,
                         "recurrent": om.recurrent}
EXPORTS = [(a, s) for a in ARCHS for s in ("ts", "dy")] + [
    ("resnet18", "tsnf"), ("resnet18", "dyno"), ("mobilenet", "tsnf"), ("recurrent", "tsnf"),
    ("transformer", "dyno")]
EXPORT_IDS = [f"{a}-{s}" for a, s in EXPORTS]
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
#: Light models whose folded weights take hundreds of MB: checked without a full ingest.
LIGHT_LARGE = ("bvlc_alexnet", "vgg19", "zfnet512")
LIGHT_NAMES = sorted(os.path.basename(p)[6:-5] for p in glob.glob(f"{LIGHT}/light_*.onnx"))
#: Published parameter counts (weights and biases, no BatchNorm running statistics).
PUBLISHED = {"bvlc_alexnet": 60_965_224, "vgg19": 143_667_240, "resnet50": 25_557_032,
             "squeezenet": 1_235_496, "inception_v1": 6_998_552}


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``get(arch, style) -> (path, torch module)``, each exported once per session."""
    folder = tmp_path_factory.mktemp("onnx_exports")
    cache: dict[tuple[str, str], tuple[str, Any]] = {}
    models: dict[str, Any] = {}

    def get(arch: str, style: str) -> tuple[str, Any]:
        if (arch, style) not in cache:
            model = models.setdefault(arch, ARCHS[arch]())
            path = om.export(model, om.example_input(arch), str(folder / f"{arch}-{style}.onnx"),
                             style)
            cache[(arch, style)] = (path, model)
        return cache[(arch, style)]

    return get


@pytest.fixture(scope="session")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    """``get(path) -> Snapshot``: each file ingested once into one session store."""
    store = Store(tmp_path_factory.mktemp("onnx_store") / "store", create=True)
    cache: dict[str, Any] = {}

    def get(path: str) -> Any:
        if path not in cache:
            cache[path] = wa.ingest(path, store=store, model="m",
                                    tag=f"t{len(cache)}")
        return cache[path]

    return get


def attrs_of(snap: Any) -> dict[str, dict[str, Any]]:
    return {r["name"]: json.loads(r["attrs"]) for r in snap.tensors().to_pylist()}


def effective_params(snap: Any) -> int:
    rows = snap.tensors().to_pylist()
    return sum(r["numel"] for r in rows if json.loads(r["attrs"]).get("effective"))


def torch_count(model: Any) -> int:
    """What torch reports: parameters plus buffers (num_batches_tracked is not exported)."""
    buffers = sum(b.numel() for n, b in model.named_buffers() if "num_batches" not in n)
    return sum(p.numel() for p in model.parameters()) + buffers


def fused_count(model: Any) -> int:
    """torch's count once the exporter folds each BatchNorm into the conv before it:
    the BatchNorm's four vectors become the conv's bias (one vector)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return torch_count(model) - sum(3 * m.num_features for m in bns)


def check_against_onnxruntime(path: str, snap: Any) -> int:
    """Every stored tensor of the main graph equals onnxruntime's value; returns how many."""
    info = attrs_of(snap)
    wanted = set()
    for name, a in info.items():
        wanted.add(snap.info(name).source_name)
        if "value" in a:
            wanted.add(a["value"])
    ref = om.ort_values(path, sorted(wanted))
    checked = 0
    for name, a in info.items():
        if a.get("packed") or a.get("graph"):
            continue
        source = snap.info(name).source_name
        assert source in ref, f"{name}: onnxruntime cannot compute {source!r}"
        got = snap.read(name, layout="source")
        want = np.asarray(ref[source])
        if want.dtype != got.dtype:  # bfloat16/float8 came back from onnxruntime as float32
            got = got.astype(np.float32)
        assert got.shape == want.shape and got.tobytes() == want.tobytes(), name
        if "value" in a:  # a weight computed by Transpose/Reshape... of this initializer
            info_ = snap.info(name)
            as_used = to_source_layout(snap.read(name), info_.layout,
                                       [x or "?" for x in a["value_layout"]], a["value_shape"])
            assert as_used.tobytes() == np.asarray(ref[a["value"]]).tobytes(), name
        checked += 1
    return checked


def run_both(original: str, rebuilt: bytes, feeds: dict[str, np.ndarray]) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    a = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(rebuilt, options, providers=["CPUExecutionProvider"])
    out_a, out_b = a.run(None, feeds), b.run(None, feeds)
    assert len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def feeds_for(session_path: str) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(session_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if "int64" in i.type:
            feeds[i.name] = rng.integers(0, 40, shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# ---- exported torch.nn models ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "style"), EXPORTS, ids=EXPORT_IDS)
def test_export_counts_bytes_and_rebuild(exported, ingested, arch: str, style: str) -> None:
    path, model = exported(arch, style)
    snap = ingested(path)
    assert snap.metadata["framework"] == "onnx"
    # parameter count: what torch reports, adjusted only for what the exporter folds
    if style in ("tsnf", "dyno"):
        expected = torch_count(model)
    elif arch == "transformer" and style == "dy":  # position table sliced to the 8 used rows
        expected = torch_count(model) - 16 * 32 + 8 * 32
    else:
        expected = fused_count(model)
    assert effective_params(snap) == expected
    assert snap.metadata["source"]["n_params"] == expected
    # every tensor's bytes are what onnxruntime computes for that value
    assert check_against_onnxruntime(path, snap) == len(snap)
    # the graph travels with the weights: the model comes back, and runs the same
    rebuilt = load_model(snap)
    assert rebuilt.SerializeToString() == onnx.load(path).SerializeToString()
    run_both(path, rebuilt.SerializeToString(), feeds_for(path))


def state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items() if "num_batches" not in k}


@pytest.mark.parametrize(("arch", "style"), [("resnet18", "tsnf"), ("resnet18", "dyno"),
                                             ("mobilenet", "tsnf"), ("vgg", "ts"), ("vgg", "dy"),
                                             ("transformer", "ts"), ("transformer", "dyno")])
def test_names_and_values_are_the_state_dict(exported, ingested, arch: str, style: str) -> None:
    """Unfused exports hold every tensor of the state dict: same names, and in canonical
    layout the same bytes (MatMul weights were stored [in, out] and come back [out, in])."""
    path, model = exported(arch, style)
    snap = ingested(path)
    expected = state(model)
    assert sorted(snap.names) == sorted(expected)
    for name, value in expected.items():
        assert snap.read(name).tobytes() == value.tobytes(), name


@pytest.mark.parametrize(("arch", "style"), [("resnet18", "ts"), ("resnet18", "dy"),
                                             ("mobilenet", "ts"), ("mobilenet", "dy")])
def test_folded_batchnorm_names_and_values(exported, ingested, arch: str, style: str) -> None:
    """With BatchNorm folded into convolutions, each conv keeps its name and gains a bias;
    the values are torch's conv weight scaled by gamma / sqrt(var + eps)."""
    path, model = exported(arch, style)
    snap = ingested(path)
    modules = dict(model.named_modules())
    pairs = []  # (conv name, batchnorm module following it)
    names = list(modules)
    for i, n in enumerate(names):
        if isinstance(modules[n], nn.Conv2d):
            nxt = next((modules[m] for m in names[i + 1:] if isinstance(modules[m], nn.BatchNorm2d)
                        and modules[m].num_features == modules[n].out_channels), None)
            pairs.append((n, nxt if modules[n].bias is None else None))
    expected = {f"{n}.weight" for n, _ in pairs} | {f"{n}.bias" for n, _ in pairs}
    expected |= {f"{n}.{p}" for n, m in modules.items() if isinstance(m, nn.Linear)
                 for p in ("weight", "bias")}
    assert set(snap.names) == expected
    for conv, bn in pairs:
        w = modules[conv].weight.detach().double().numpy()
        if bn is None:
            continue
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
        bias = (bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale)
        np.testing.assert_allclose(snap.read(f"{conv}.weight"), w * scale[:, None, None, None],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(snap.read(f"{conv}.bias"), bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["ts", "dy"])
def test_conv_roles_groups_and_depthwise(exported, ingested, style: str) -> None:
    path, model = exported("mobilenet", style)
    info = attrs_of(ingested(path))
    snap = ingested(path)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            a = info[f"{name}.weight"]
            t = snap.info(f"{name}.weight")
            assert (t.kind, t.layout, a["op"], a["input"]) == (
                "conv2d", ("out", "in", "h", "w"), "Conv", "W")
            assert a["groups"] == m.groups
            assert a.get("depthwise", False) == (m.groups > 1 and m.groups == m.in_channels)
            assert snap.info(f"{name}.bias").kind == "conv2d"
    assert info["classifier.weight"]["transB"] == 1
    assert snap.info("classifier.weight").layout == ("out", "in")


@pytest.mark.parametrize("style", ["ts", "dy", "dyno"])
def test_transformer_roles(exported, ingested, style: str) -> None:
    path, _ = exported("transformer", style)
    snap = ingested(path)
    info = attrs_of(snap)
    for layer in range(2):
        base = f"encoder.layer.{layer}.attention"
        for proj, label in (("self.query", "q"), ("self.key", "k"), ("self.value", "v"),
                            ("output.dense", "o")):
            for param in ("weight", "bias"):
                t = snap.info(f"{base}.{proj}.{param}")
                assert t.kind == "attention", t.name
                assert info[t.name]["attention"] == label, t.name
            assert snap.info(f"{base}.{proj}.weight").layout == ("out", "in")
        inter = snap.info(f"encoder.layer.{layer}.intermediate.dense.weight")
        assert inter.kind == "linear" and inter.shape == (64, 32)
        if style != "dyno":  # the unoptimised export transposes in the graph instead
            assert inter.source_layout == ("in", "out") and inter.source_shape == (32, 64)
        for ln in (f"{base}.output.LayerNorm", f"encoder.layer.{layer}.output.LayerNorm"):
            assert snap.info(f"{ln}.weight").kind == "norm"
            assert info[f"{ln}.weight"]["op"] == "LayerNormalization"
    emb = snap.info("embeddings.word_embeddings.weight")
    assert (emb.kind, emb.layout) == ("embedding", ("vocab", "dim"))
    assert info[emb.name]["op"] == "Gather"


@pytest.mark.parametrize("style", ["ts", "dy"])
def test_recurrent_weights_per_gate(exported, ingested, style: str) -> None:
    """LSTM W/R/B keep ONNX's gate order i, o, f, c (torch's is i, f, g, o); GRU z, r, h
    (torch's r, z, n). Every gate block equals torch's, both directions, both layers."""
    path, model = exported("recurrent", style)
    snap = ingested(path)
    info = attrs_of(snap)
    sd = state(model)
    torch_gate = {"i": 0, "f": 1, "c": 2, "o": 3}
    h = 24
    for layer in range(2):
        w = snap.read(f"lstm.weight_ih_l{layer}")
        r = snap.read(f"lstm.weight_hh_l{layer}")
        b = snap.read(f"lstm.bias_l{layer}")
        assert snap.info(f"lstm.weight_ih_l{layer}").layout == ("direction", "gates_out", "in")
        assert info[f"lstm.weight_ih_l{layer}"]["gates"] == ["i", "o", "f", "c"]
        assert info[f"lstm.bias_l{layer}"]["halves"] == ["W", "R"]
        for d, suffix in enumerate(("", "_reverse")):
            for k, gate in enumerate(info[f"lstm.weight_ih_l{layer}"]["gates"]):
                t = torch_gate[gate]
                rows = slice(t * h, (t + 1) * h)
                mine = slice(k * h, (k + 1) * h)
                torch_ = {p: sd[f"lstm.{p}_l{layer}{suffix}"][rows]
                          for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
                assert w[d, mine].tobytes() == torch_["weight_ih"].tobytes()
                assert r[d, mine].tobytes() == torch_["weight_hh"].tobytes()
                assert b[d, mine].tobytes() == torch_["bias_ih"].tobytes()
                assert b[d, 4 * h:][mine].tobytes() == torch_["bias_hh"].tobytes()
    gru = snap.read("gru.weight_ih")
    assert info["gru.weight_ih"]["gates"] == ["z", "r", "h"]
    for k, t in enumerate((1, 0, 2)):  # z, r, h in torch's r, z, n rows
        assert gru[0, k * h:(k + 1) * h].tobytes() == \
            sd["gru.weight_ih_l0"][t * h:(t + 1) * h].tobytes()
    assert snap.info("embedding.weight").kind == "embedding"


def test_unfolded_recurrent_export_keeps_torch_names(exported, ingested) -> None:
    """Without constant folding, the LSTM's W is built by Slice/Concat from torch's own
    tensors: those are stored under their names, as recurrent weights, and the zero
    initial states expanded into initial_h/initial_c are states, not weights."""
    path, model = exported("recurrent", "tsnf")
    snap = ingested(path)
    assert sorted(snap.names) == sorted(state(model))
    assert effective_params(snap) == torch_count(model)
    assert snap.info("lstm.weight_ih_l0").kind == "recurrent"
    assert attrs_of(snap)["lstm.weight_ih_l0"]["reaches"] == "LSTM.W"


def test_cli_ingests_an_onnx_model(exported, tmp_path: Path, capsys) -> None:
    from weightatlas.cli import main

    path, _ = exported("vgg", "ts")
    try:
        main(["--store", str(tmp_path / "s"), "ingest", path])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr().out
    assert code == 0
    assert "18 tensors" in out
    snap = Store(tmp_path / "s").snapshot("vgg-ts")
    assert snap.read("classifier.6.weight").shape == (10, 64)
    assert snap.attachments["graph.onnx"]["size"] > 0


# ---- the onnx package's own models ----------------------------------------------------


def independent_count(path: str) -> tuple[int, int]:
    """(parameters, running statistics) read off the graph by the operators' schemas.

    A reference that shares no code with the adapter: every weight input of Conv, Gemm,
    BatchNormalization and the per-channel Mul/Add of Caffe's Scale layers, counted
    from its initializer or the shape its ConstantOfShape is given.
    """
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    numel = {n: math.prod(t.dims) for n, t in inits.items()}
    for node in g.node:  # ConstantOfShape(shape), and reshapes of those
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            numel[node.output[0]] = int(np.prod(onnx.numpy_helper.to_array(inits[node.input[0]])))
        elif node.op_type in ("Unsqueeze", "Reshape") and node.input[0] in numel:
            numel[node.output[0]] = numel[node.input[0]]
    params = stats = 0
    for node in g.node:
        for k, name in enumerate(node.input):
            if name not in numel:
                continue
            if (node.op_type in ("Conv", "Gemm") and k in (1, 2)) or \
                    (node.op_type == "BatchNormalization" and k in (1, 2)) or \
                    (node.op_type in ("Mul", "Add") and numel[name] > 1):
                params += numel[name]
            elif node.op_type == "BatchNormalization" and k in (3, 4):
                stats += numel[name]
    return params, stats


@pytest.mark.parametrize("name", LIGHT_NAMES)
def test_light_model_counts_roles_and_names(name: str) -> None:
    path = f"{LIGHT}/light_{name}.onnx"
    with onnx_adapter.read(path) as src:
        tensors = src.describe()
        meta = src.metadata()
    params, stats = independent_count(path)
    running = sum(math.prod(t["shape"]) for t in tensors
                  if t["attrs"]["role"] in ("running_mean", "running_var"))
    assert running == stats
    assert meta["n_params"] == params + stats
    if name in PUBLISHED:
        assert meta["n_params"] - running == PUBLISHED[name]
    by_name = {t["name"]: t for t in tensors}
    assert len(by_name) == len(tensors)
    for t in tensors:
        a = t["attrs"]
        if a.get("op") == "Conv":
            assert t["kind"] == "conv2d" and t["layout"][:2] in (("out", "in"), ("out",))
        if a.get("op") == "Gemm" and a["input"] == "B":
            assert t["kind"] == "linear" and t["layout"] == ("out", "in")
            assert a["transB"] == 1 and t["source_layout"] == ("out", "in")
        if a.get("op") == "BatchNormalization":
            assert t["kind"] == "norm" and t["layout"] == ("channel",)
        assert not t["name"].startswith(("gpu_0", "n0", "r1")), t["name"]
    expected_names = {"inception_v1": ["inception_3a.1x1.weight", "conv1.7x7_s2.bias",
                                       "loss3.classifier.weight"],
                      "resnet50": ["conv1.weight", "res2_0_branch2a_bn.running_var",
                                   "res5_2_branch2c.weight", "pred.weight"],
                      "squeezenet": ["fire2.squeeze1x1.weight", "conv10.bias"],
                      "vgg19": ["conv1_1.weight", "fc8.bias"],
                      "bvlc_alexnet": ["conv1.weight", "fc6.weight"]}
    for expected in expected_names.get(name, []):
        assert expected in by_name, (expected, sorted(by_name)[:10])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LIGHT_NAMES if n not in LIGHT_LARGE])
def test_light_model_bytes_and_rebuild(ingested, name: str) -> None:
    path = f"{LIGHT}/light_{name}.onnx"
    snap = ingested(path)
    assert check_against_onnxruntime(path, snap) == len(snap)
    rebuilt = load_model(snap)
    assert rebuilt.SerializeToString() == onnx.load(path).SerializeToString()
    run_both(path, rebuilt.SerializeToString(), feeds_for(path))


@pytest.mark.parametrize("name", LIGHT_LARGE)
def test_large_light_models_small_tensors_match_onnxruntime(name: str) -> None:
    """The light AlexNet, VGG-19 and ZFNet fold to 240-580 MB: check the biases (computed
    by the same ConstantOfShape folding as the weights) against onnxruntime."""
    path = f"{LIGHT}/light_{name}.onnx"
    with onnx_adapter.read(path) as src:
        small = {t["name"]: t["source_name"] for t in src.describe()
                 if math.prod(t["shape"]) <= 4096}
        ref = om.ort_values(path, sorted(small.values()))
        got = {n: np.array(src.record(n).data) for n in small}
    assert len(got) == len(small) > 0
    for name_, source in small.items():
        assert got[name_].tobytes() == np.asarray(ref[source]).tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bvlc_alexnet", "zfnet512", "vgg19"])
def test_large_light_models_full_ingest(tmp_path: Path, name: str) -> None:
    """A full ingest of the light AlexNet, ZFNet-512 and VGG-19 (240-575 MB of weights made
    by ConstantOfShape): the parameter counts against the graph read independently (and
    the published count), and every stored tensor's bytes against onnxruntime's values."""
    path = f"{LIGHT}/light_{name}.onnx"
    snap = wa.ingest(path, store=Store(tmp_path / "store", create=True), model=name)
    params, stats = independent_count(path)
    assert stats == 0  # no BatchNorm in these three
    assert snap.metadata["n_params"] == params == sum(r["numel"] for r in
                                                      snap.tensors().to_pylist())
    if name in PUBLISHED:
        assert params == PUBLISHED[name]
    assert check_against_onnxruntime(path, snap) == len(snap)
    snap.close()
