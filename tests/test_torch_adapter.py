"""PyTorch in: live modules, torch.save checkpoints and TorchScript archives, on real models.

Every model is built here from plain torch.nn (ResNet-18, a VGG-style net, an LSTM/GRU
tagger, a transformer encoder); torch's own state_dict, parameter counts and
torch.load / torch.jit.load are the references.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.adapters import detect_format, open_source
from weightatlas.adapters import torch as wt
from weightatlas.errors import UnsupportedError

torch = pytest.importorskip("torch")

from tests import framework_models as fm  # noqa: E402
from tests.models import resnet18  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet18": lambda: resnet18(num_classes=1000), "vgg": fm.vgg_style,
          "lstm": fm.lstm_tagger, "transformer": fm.torch_transformer}


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: make() for name, make in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_module_round_trips_exactly_through_the_store(store, models, name: str):
    model = models[name]
    snap = store.write(wt.from_module(model), name)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    assert snap.metadata["n_params"] == n_params + n_buffers
    assert snap.metadata["source"]["n_parameters"] == n_params
    if name == "resnet18":
        assert n_params == 11_689_512  # torchvision's figure
    back = wt.to_state_dict(snap)
    reference = state_numpy(model)
    assert list(back) == list(reference)
    for key, value in reference.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    fresh = type(model)() if name != "resnet18" else resnet18(seed=5)
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()})
    for key, value in fresh.state_dict().items():
        assert np.array_equal(value.numpy(), reference[key])


def test_kinds_come_from_module_types(store, models):
    rows = {r["name"]: r for r in store.write(wt.from_module(models["vgg"]), "vgg")
            .tensors().to_pylist()}
    assert rows["features.0.weight"]["kind"] == "conv2d"
    assert rows["features.0.weight"]["layout"] == ["out", "in", "h", "w"]
    assert rows["features.1.running_var"]["kind"] == "norm"
    assert rows["features.1.num_batches_tracked"]["layout"] == []
    assert rows["classifier.0.weight"]["kind"] == "linear"
    rows = {r["name"]: r for r in store.write(wt.from_module(models["lstm"]), "lstm")
            .tensors().to_pylist()}
    assert rows["embed.weight"]["kind"] == "embedding"
    import json

    attrs = json.loads(rows["lstm.weight_hh_l1_reverse"]["attrs"])
    assert attrs["gates"] == ["i", "f", "g", "o"] and attrs["hidden_size"] == 24
    assert attrs["layer"] == 1 and attrs["direction"] == "reverse"
    assert rows["lstm.weight_ih_l0"]["shape"] == [4 * 24, 16]
    assert json.loads(rows["gru.bias_hh_l0"]["attrs"])["gates"] == ["r", "z", "n"]
    assert json.loads(rows["embed.weight"]["attrs"])["padding_idx"] == 0


def test_attention_is_split_into_q_k_v_views(store, models):
    model = models["transformer"]
    snap = store.write(wt.from_module(model), "tr")
    attn = model.layers[0].self_attn
    w = attn.in_proj_weight.detach().numpy()
    e = attn.embed_dim
    for i, part in enumerate("qkv"):
        name = f"layers.0.self_attn.{part}_proj.weight"
        info = snap.info(name)
        assert info.kind == "attention" and info.shape == (e, e)
        assert info.source_name == "layers.0.self_attn.in_proj_weight"
        assert np.array_equal(snap.read(name), w[i * e:(i + 1) * e])
        assert np.array_equal(snap.read(name, layout="source"), w[i * e:(i + 1) * e])
    assert "layers.0.self_attn.in_proj_weight" not in snap
    assert snap.info("layers.0.self_attn.out_proj.weight").kind == "attention"
    kdim = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    names = [r.name for r in wt.from_module(kdim).records()]
    assert names[:3] == ["q_proj.weight", "k_proj.weight", "v_proj.weight"]


def test_checkpoint_files_match_torch_load(tmp_path: Path, models):
    model = models["lstm"]
    sd = model.state_dict()
    for wrapper, key in ((None, None), ("state_dict", "state_dict"), ("model", "model")):
        path = tmp_path / f"{key or 'plain'}.pth"
        obj = sd if wrapper is None else {wrapper: sd, "epoch": 7, "optimizer": {"lr": 0.1}}
        torch.save(obj, path)
        reference = torch.load(path, weights_only=True, mmap=True)
        reference = reference if wrapper is None else reference[wrapper]
        src = wt.read(path)
        records = {r.name: r for r in src.records()}
        assert list(records) == list(reference)
        for name, tensor in reference.items():
            assert np.array_equal(records[name].data, tensor.numpy()), name
        if wrapper is not None:
            meta = src.metadata()
            assert meta["wrapper_key"] == wrapper and meta["values"] == {"epoch": 7}
        assert records["lstm.weight_ih_l0"].attrs["gates"] == ["i", "f", "g", "o"]


def test_dtypes_views_and_tied_tensors(tmp_path: Path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"emb.weight": base, "head.weight": base,  # tied: one storage, two names
             "t": base.t(), "half": base.half(), "bf16": base.bfloat16(),
             "f8": base.to(torch.float8_e4m3fn), "i64": torch.arange(5), "flag": torch.ones(
                 3, dtype=torch.bool), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "mixed.bin"
    torch.save(state, path)
    records = {r.name: r for r in wt.read(path).records()}
    for name, tensor in state.items():
        got = records[name].data
        ref = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        ref = ref.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else ref
        raw = got.view(np.int16) if tensor.dtype == torch.bfloat16 else got
        raw = raw.view(np.uint8) if tensor.dtype == torch.float8_e4m3fn else raw
        assert np.array_equal(raw, ref.numpy()) and got.shape == tuple(tensor.shape), name
    assert records["head.weight"].attrs["tied_to"] == "emb.weight"
    assert str(records["bf16"].data.dtype) == "bfloat16"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_torchscript_parameters_and_buffers_match_jit_load(tmp_path: Path, models):
    model = models["vgg"]
    path = tmp_path / "vgg_ts.pt"
    torch.jit.script(model).save(str(path))
    reference = torch.jit.load(str(path)).state_dict()
    src = wt.read(path)
    records = {r.name: r for r in src.records()}
    assert list(records) == list(reference)
    for name, tensor in reference.items():
        assert np.array_equal(records[name].data, tensor.numpy()), name
    assert records["features.0.weight"].kind == "conv2d"
    assert records["features.0.weight"].attrs["module_type"] == "Conv2d"
    assert records["classifier.3.bias"].kind == "linear"
    assert src.metadata()["format"] == "torchscript"
    tr = tmp_path / "tr_ts.pt"
    torch.jit.script(models["transformer"]).save(str(tr))
    names = [r.name for r in wt.read(tr).records()]
    assert "layers.1.self_attn.v_proj.bias" in names


@pytest.mark.slow
def test_checkpoint_module_and_safetensors_ingest_identically(tmp_path: Path, models):
    from weightatlas.adapters import safetensors
    from weightatlas.core.compare import compare

    model = models["resnet18"]
    store = wa.open_store(tmp_path / "store")
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    safetensors.write(state_numpy(model), tmp_path / "r18.safetensors")
    a = wa.ingest(tmp_path / "r18.pt", store=store)
    b = wa.ingest(tmp_path / "r18.safetensors", store=store, model="r18st")
    c = store.write(wt.from_module(model), "r18mod")
    assert detect_format(tmp_path / "r18.pt") == "torch" and a.metadata["framework"] == "torch"
    import hashlib

    digest = hashlib.sha256((tmp_path / "r18.pt").read_bytes()).hexdigest()
    assert a.metadata["source_sha256"] == digest
    for x, y in ((a, b), (a, c)):
        result = compare(x, y)
        assert result.complete
        assert set(result.pairs.column("verdict").to_pylist()) == {"identical"}
        assert set(result.pairs.column("method").to_pylist()) == {"hash"}


def test_unusable_modules_are_refused():
    lazy = torch.nn.LazyLinear(3)
    with pytest.raises(UnsupportedError, match="'weight' is not initialised yet"):
        wt.from_module(lazy)
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(UnsupportedError, match="'weight' is on the meta device"):
        wt.from_module(meta)
    with pytest.raises(UnsupportedError, match=r"expected a torch\.nn\.Module"):
        wt.from_module({"w": 1})


@pytest.mark.slow
def test_module_with_its_graph_runs_from_the_store(store):
    import onnx
    import onnxruntime as ort

    model = fm.TorchCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    snap = store.write(wt.from_module(model, example_inputs=(x,)), "cnn")
    graph = onnx.load_from_string(snap.attachment("graph.onnx"))
    weights = wt.to_state_dict(snap)
    for init in graph.graph.initializer:
        if init.name in weights:  # cleared in the attachment: values come from the snapshot
            assert not init.raw_data
            init.CopyFrom(onnx.numpy_helper.from_array(weights[init.name], init.name))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    other = store.write(wt.from_module(fm.TorchCNN(), example_inputs=(x,)), "cnn", step=1)
    assert other.attachments["graph.onnx"] == snap.attachments["graph.onnx"]  # one blob


def test_safetensors_models_ingest_without_torch(tmp_path: Path):
    from weightatlas.adapters import safetensors

    safetensors.write({"fc.weight": np.ones((2, 3), np.float32)}, tmp_path / "m.safetensors")
    code = ("import sys; sys.modules['torch'] = None; import weightatlas as wa; "
            f"s = wa.ingest({str(tmp_path / 'm.safetensors')!r}, store={str(tmp_path / 's')!r});"
            " print(s.ref, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["m@0", "False"]


def test_open_source_reads_pt_files(tmp_path: Path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.bin")
    src = open_source(tmp_path / "weights.bin")
    assert src.framework == "torch" and [r.name for r in src.records()] == ["w"]
    (tmp_path / "noext").write_bytes((tmp_path / "weights.bin").read_bytes())
    assert detect_format(tmp_path / "noext") == "torch"
