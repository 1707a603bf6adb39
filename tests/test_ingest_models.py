"""End to end on real models: safetensors files made by the reference library, ingested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

from tests.models import resnet18  # noqa: E402


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[Path, dict]:
    model = resnet18()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    st_torch.save_file(state, str(path), metadata={"arch": "resnet18"})
    return path, state


def test_resnet18_ingests_completely_and_bit_exactly(tmp_path: Path, resnet_file):
    path, state = resnet_file
    snap = wa.ingest(path, store=tmp_path / "store")
    assert snap.ref == "resnet18@0"
    assert snap.metadata["n_params"] == sum(v.numel() for v in state.values())
    n_parameters = sum(p.numel() for p in resnet18().parameters())
    assert n_parameters == 11_689_512  # torchvision's figure for resnet18
    assert sorted(snap.names) == sorted(state)
    for name, tensor in state.items():
        back = snap.read(name)
        assert back.tobytes() == tensor.numpy().tobytes(), name
        assert back.shape == tuple(tensor.shape)
    assert snap.metadata["source"]["metadata"] == {"arch": "resnet18"}
    import hashlib
    assert snap.metadata["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_resnet18_kinds_layouts_and_statistics(tmp_path: Path, resnet_file):
    path, state = resnet_file
    snap = wa.ingest(path, store=tmp_path / "store", model="r18", step=3)
    rows = {r["name"]: r for r in snap.tensors().to_pylist()}
    assert rows["conv1.weight"]["kind"] == "conv2d"
    assert rows["conv1.weight"]["layout"] == ["out", "in", "h", "w"]
    assert rows["layer2.0.downsample.0.weight"]["kind"] == "conv2d"
    assert rows["fc.weight"]["kind"] == "linear" and rows["fc.weight"]["layout"] == ["out", "in"]
    assert rows["fc.bias"]["kind"] == "linear"
    for param in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert rows[f"layer1.0.bn1.{param}"]["kind"] == "norm", param
    assert rows["bn1.num_batches_tracked"]["dtype"] == "int64"
    for name, tensor in state.items():
        t = tensor.double()
        r = rows[name]
        assert r["numel"] == t.numel()
        assert r["mean"] == pytest.approx(t.mean().item(), rel=1e-9, abs=1e-12), name
        assert r["std"] == pytest.approx(t.std(unbiased=False).item(), rel=1e-9, abs=1e-12)
        assert r["abs_max"] == pytest.approx(t.abs().max().item())
        assert r["l2"] == pytest.approx(torch.linalg.vector_norm(t).item(), rel=1e-9)
        assert r["frac_zero"] == pytest.approx((t == 0).double().mean().item())


def test_bfloat16_and_float16_models(tmp_path: Path):
    model = resnet18(seed=1, num_classes=10)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in model.state_dict().items()}
        path = tmp_path / f"r18-{name}.safetensors"
        st_torch.save_file(state, str(path))
        snap = wa.ingest(path, store=tmp_path / "store")
        assert snap.info("fc.weight").dtype == name
        for key, tensor in state.items():
            back = snap.read(key)
            want = tensor.view(torch.int16).numpy() if tensor.is_floating_point() else tensor
            got = back.view(np.int16) if tensor.is_floating_point() else back
            np.testing.assert_array_equal(got, np.asarray(want), err_msg=key)
        w = state["fc.weight"].double()
        assert snap.info("fc.weight").std == pytest.approx(w.std(unbiased=False).item(), rel=1e-9)


def test_nan_and_inf_weights_are_accepted_and_counted(tmp_path: Path):
    w = torch.randn(8, 8)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    path = tmp_path / "bad.safetensors"
    st_torch.save_file({"fc.weight": w}, str(path))
    snap = wa.ingest(path, store=tmp_path / "store")
    info = snap.info("fc.weight")
    assert (info.n_nan, info.n_inf) == (1, 2)
    finite = w[torch.isfinite(w)].double()
    assert info.mean == pytest.approx(finite.mean().item())
    assert info.max == pytest.approx(finite.max().item())
    assert snap.read("fc.weight").tobytes() == w.numpy().tobytes()


def test_sharded_checkpoint_is_one_snapshot(tmp_path: Path, resnet_file):
    _, state = resnet_file
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards, start=1):
        fname = f"model-0000{i}-of-00002.safetensors"
        st_torch.save_file({k: state[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    snap = wa.ingest(folder, store=tmp_path / "store", model="sharded")
    assert sorted(snap.names) == names
    assert len(snap.metadata["source_files"]) == 3
    np.testing.assert_array_equal(snap.read("layer4.1.conv2.weight"),
                                  state["layer4.1.conv2.weight"].numpy())


def test_ingest_is_idempotent_and_leaves_nothing_on_failure(tmp_path: Path, resnet_file):
    path, _ = resnet_file
    store = wa.open_store(tmp_path / "store")
    first = wa.ingest(path, store=store, step=1)
    assert wa.ingest(path, store=store, step=1).metadata["created"] == first.metadata["created"]
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(wa.FormatError, match=r"cut\.safetensors"):
        wa.ingest(truncated, store=store, step=2)
    assert [i.ref for i in store.snapshots()] == ["resnet18@1"]
    assert store.gc() == []
