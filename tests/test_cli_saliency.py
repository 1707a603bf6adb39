"""``weightatlas saliency`` and ``weightatlas gradients`` on real stored models, and the
package-root API under them (``wa.attribute``, ``wa.weight_gradients``), against Captum
and torch autograd on the PyTorch originals; Grad-CAM's upsampling against
``torch.nn.functional.interpolate`` and Captum's ``LayerAttribution.interpolate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
from tests._cli import run_cli as run
from weightatlas.core.executor import INTERPOLATION_MODES, interpolate
from weightatlas.errors import InputMismatchError, ShapeError, UnsupportedError

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from tests import onnx_models as om  # noqa: E402


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small CNN stored from its ONNX export, images saved with numpy.save, an MLP over
    1-d inputs, and a snapshot without a graph."""
    from weightatlas.adapters import safetensors

    tmp = tmp_path_factory.mktemp("saliency")
    torch.manual_seed(0)
    module = SmallCNN().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    store = str(tmp / "store")
    wa.ingest(om.export(module, (x,), str(tmp / "cnn.onnx"), "ts"), store=store, model="cnn")
    np.save(tmp / "x.npy", x.numpy().astype(np.float64))  # converted to float32 on reading
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    v = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    wa.ingest(om.export(mlp, (v,), str(tmp / "mlp.onnx"), "ts"), store=store, model="mlp")
    np.save(tmp / "v.npy", v.numpy())
    safetensors.write({"fc.weight": np.ones((2, 3), np.float32)}, tmp / "plain.safetensors")
    wa.ingest(tmp / "plain.safetensors", store=store, model="plain")
    return {"tmp": tmp, "store": store, "module": module, "x": x, "mlp": mlp, "v": v}


def test_saliency_of_the_predicted_class_matches_captum(setup: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    tmp, x = setup["tmp"], setup["x"]
    code, out, err = run(capsys, "--store", setup["store"], "saliency", "cnn", "-i",
                         str(tmp / "x.npy"), "-o", str(tmp / "s.npy"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    with torch.no_grad():
        predicted = setup["module"](x).argmax(1)
    assert doc["target"] == predicted.tolist() and doc["method"] == "saliency"
    assert doc["snapshot"] == "cnn@0" and doc["shape"] == [2, 3, 16, 16]
    found = np.load(tmp / "s.npy")
    want = captum_attr.Saliency(setup["module"]).attribute(x.clone().requires_grad_(),
                                                           target=predicted).numpy()
    assert rel(found, want) < 1e-5
    assert doc["examples"][1]["abs_max"] == pytest.approx(float(np.abs(found[1]).max()))


def test_integrated_gradients_with_a_target_per_example(setup: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    tmp, x = setup["tmp"], setup["x"]
    code, out, err = run(capsys, "--store", setup["store"], "saliency", "cnn@0", "-i",
                         str(tmp / "x.npy"), "--method", "ig", "--steps", "16",
                         "--target", "1,4", "--batch-size", "8", "-o", str(tmp / "ig.npy"))
    assert code == 0, err
    assert "cnn@0: integrated_gradients, [2, 3, 16, 16] float32" in out
    want = captum_attr.IntegratedGradients(setup["module"]).attribute(
        x, target=torch.tensor([1, 4]), n_steps=16).numpy()
    assert rel(np.load(tmp / "ig.npy"), want) < 1e-4


def test_grad_cam_upsampled_matches_captum_and_draws(setup: dict[str, Any],
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    tmp, x, module = setup["tmp"], setup["x"], setup["module"]
    code, _, err = run(capsys, "--store", setup["store"], "saliency", "cnn", "-i",
                       str(tmp / "x.npy"), "--method", "grad_cam", "--layer", "conv2",
                       "--target", "2", "-o", str(tmp / "cam.npy"), "-o",
                       str(tmp / "cam.svg"))
    assert code == 0, err
    coarse = captum_attr.LayerGradCam(module, module.conv2).attribute(x, target=2)
    want = captum_attr.LayerAttribution.interpolate(coarse, (16, 16), "bilinear")
    found = np.load(tmp / "cam.npy")
    assert found.shape == (2, 1, 16, 16) and rel(found, want.detach().numpy()) < 1e-4
    assert (tmp / "cam.svg").read_text().startswith("<svg")
    assert f"wrote {tmp / 'cam.svg'}" in err
    # without upsampling: the layer's 8x8 map
    code, _, err = run(capsys, "--store", setup["store"], "saliency", "cnn", "-i",
                       str(tmp / "x.npy"), "--method", "grad_cam", "--layer", "conv2.weight",
                       "--target", "2", "--no-upsample", "-o", str(tmp / "coarse.npy"))
    assert code == 0, err
    assert rel(np.load(tmp / "coarse.npy"), coarse.detach().numpy()) < 1e-4


def test_strip_chart_for_one_dimensional_inputs(setup: dict[str, Any],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tmp = setup["tmp"]
    chart = tmp / "strip.vl.json"
    code, _, err = run(capsys, "--store", setup["store"], "saliency", "mlp", "-i",
                       str(tmp / "v.npy"), "--method", "gradient_x_input", "--target", "0",
                       "-o", str(chart), "-o", str(tmp / "gx.npy"))
    assert code == 0, err
    want = captum_attr.InputXGradient(setup["mlp"]).attribute(
        setup["v"].clone().requires_grad_(), target=0).detach().numpy()
    found = np.load(tmp / "gx.npy")
    assert rel(found, want) < 1e-5
    spec = json.loads(chart.read_text())
    meta = spec["usermeta"]["weightatlas"]
    assert meta["signed"] is True
    assert meta["domain"] == pytest.approx([-float(np.abs(found).max()),
                                            float(np.abs(found).max())])


def test_gradients_command_writes_the_gradient_snapshot(setup: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    tmp, x, module = setup["tmp"], setup["x"], setup["module"]
    code, out, err = run(capsys, "--store", setup["store"], "gradients", "cnn", "-i",
                         str(tmp / "x.npy"), "--target", "3,0", "--loss", "cross_entropy",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["snapshot"] == "cnn.grad@0" and doc["of"] == "cnn@0"
    assert doc["objective"] == "cross_entropy" and doc["target"] == [3, 0]
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(x), torch.tensor([3, 0])).backward()
    grads = wa.open_store(setup["store"]).snapshot("cnn.grad@0")
    for name, p in module.named_parameters():
        assert rel(grads.read(name), p.grad.numpy()) < 1e-4, name
    # again: the snapshot exists with other content
    code, _, err = run(capsys, "--store", setup["store"], "gradients", "cnn", "-i",
                       str(tmp / "x.npy"), "--target", "1")
    assert code == 1 and err.count("\n") == 1 and "cnn.grad@0" in err


def test_attribute_api(setup: dict[str, Any]) -> None:
    x = setup["x"].numpy()
    fn = wa.core.executor.from_snapshot(wa.open_store(setup["store"]).snapshot("cnn"))
    for method, options in [("gradient", {}), ("smoothgrad", {"samples": 4, "stdev": 0.1}),
                            ("occlusion", {"window": (3, 4, 4), "strides": (3, 2, 2)})]:
        result = wa.attribute("cnn", x, 1, method=method, store=setup["store"], **options)
        call = getattr(wa.core.executor, method)
        assert np.array_equal(np.asarray(result), call(fn, x, 1, **options)), method
        assert (result.method, result.snapshot, result.target) == (method, "cnn@0", 1)
    same = wa.attribute("cnn", x, 1, store=setup["store"])
    assert wa.attribute("cnn", x, 1, store=setup["store"]).values.tobytes() == \
        same.values.tobytes()
    with pytest.raises(InputMismatchError, match="smoothgrad takes no option 'steps'"):
        wa.attribute("cnn", x, 1, method="smoothgrad", steps=3, store=setup["store"])
    with pytest.raises(InputMismatchError, match="grad_cam needs a layer"):
        wa.attribute("cnn", x, 1, method="grad_cam", store=setup["store"])


@pytest.mark.parametrize("shape,size", [((2, 1, 7, 7), (32, 32)), ((1, 3, 5, 9), (12, 4)),
                                        ((2, 1, 6), (15,)), ((1, 1, 2, 3, 4), (5, 6, 7))],
                         ids=["up", "mixed", "1d", "3d"])
@pytest.mark.parametrize("mode", INTERPOLATION_MODES)
def test_interpolate_matches_torch(shape: tuple[int, ...], size: tuple[int, ...],
                                   mode: str) -> None:
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)] \
        if mode != "nearest" else "nearest"
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    want = torch.nn.functional.interpolate(torch.from_numpy(values), size=size,
                                           mode=torch_mode, **kwargs).numpy()
    assert np.abs(interpolate(values, size, mode) - want).max() < 1e-6


def test_interpolate_refuses_bad_arguments() -> None:
    with pytest.raises(UnsupportedError, match="mode 'cubic' is not one of"):
        interpolate(np.zeros((1, 1, 2, 2)), (4, 4), "cubic")
    with pytest.raises(ShapeError, match=r"2 spatial axes .* size \[4\] names 1"):
        interpolate(np.zeros((1, 1, 2, 2)), (4,))


@pytest.mark.parametrize("args,message", [
    (["saliency", "cnn", "-i", "{tmp}/none.npy"], "{tmp}/none.npy: no such file (input"),
    (["saliency", "cnn", "-i", "{tmp}/small.npy"],
     "{tmp}/small.npy: input 'input.1' of cnn@0 must have shape float32[2, 3, 16, 16]; the "
     "file holds float32[2, 3, 8, 16]"),
    (["saliency", "cnn", "-i", "{tmp}/ints.npy"],
     "{tmp}/ints.npy: input 'input.1' of cnn@0 is float32[2, 3, 16, 16] (floating-point); "
     "the file holds int64"),
    (["saliency", "cnn", "-i", "{tmp}/both.npz"], "{tmp}/both.npz: holds several arrays"),
    (["saliency", "cnn", "-i", "{tmp}/text.npy"], "{tmp}/text.npy: not a .npy array"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "-i", "{tmp}/x.npy"],
     "cnn@0 takes 1 input(s) (input.1: float32[2, 3, 16, 16]); got 2 --input file(s)"),
    (["saliency", "plain", "-i", "{tmp}/x.npy"], "snapshot plain@0 has no graph"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "--method", "lrp"], "--method 'lrp'; expected"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "--method", "grad_cam", "--layer", "conv7"],
     "no layer, stored tensor or graph value named 'conv7'; close names: 'conv2', 'conv1'"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "--target", "a"], "--target 'a': expected"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "--target", "9"],
     "target 9 is out of range for an output with 5 classes"),
    (["saliency", "cnn", "-i", "{tmp}/x.npy", "-o", "{tmp}/a.txt"], "{tmp}/a.txt: write .npy"),
    (["gradients", "cnn", "-i", "{tmp}/x.npy", "--loss", "mse"], "--loss 'mse'; expected"),
    (["saliency", "nomodel", "-i", "{tmp}/x.npy"], "no model 'nomodel'"),
], ids=["missing", "shape", "dtype", "npz", "not-npy", "count", "no-graph", "method", "layer",
        "target-text", "target-range", "suffix", "loss", "no-model"])
def test_bad_input_exits_1_with_one_line(setup: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str], args: list[str],
                                         message: str) -> None:
    tmp = setup["tmp"]
    np.save(tmp / "small.npy", np.zeros((2, 3, 8, 16), np.float32))
    np.save(tmp / "ints.npy", np.zeros((2, 3, 16, 16), np.int64))
    np.savez(tmp / "both.npz", a=np.zeros(2), b=np.zeros(2))
    (tmp / "text.npy").write_text("not an array")
    code, out, err = run(capsys, "--store", setup["store"],
                         *[a.format(tmp=tmp) for a in args])
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp) in err


def test_snapshot_written_by_the_api_is_the_snapshots_own_store(setup: dict[str, Any]
                                                                ) -> None:
    snap = wa.open_store(setup["store"]).snapshot("mlp")
    grads = wa.weight_gradients(snap, setup["v"].numpy(), 2, overwrite=True)
    assert Path(grads.path).is_relative_to(Path(setup["store"]))
    assert grads.ref == "mlp.grad@0"
    setup["mlp"].zero_grad()
    setup["mlp"](setup["v"])[:, 2].sum().backward()
    assert rel(grads.read("0.weight"), setup["mlp"][0].weight.grad.numpy()) < 1e-5


def test_strip_chart_of_a_channels_first_signal(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A Conv1d model's input is [n, channels, time]: the strip runs over time, the
    attribution summed over the channels (not over time, which would leave one cell)."""
    net = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 40, 3)).eval()
    sig = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(4))
    store = str(tmp_path / "store")
    wa.ingest(om.export(net, (sig,), str(tmp_path / "c1d.onnx"), "ts"), store=store,
              model="c1d")
    np.save(tmp_path / "s.npy", sig.numpy())
    chart = tmp_path / "strip.vl.json"
    code, _, err = run(capsys, "--store", store, "saliency", "c1d", "-i",
                       str(tmp_path / "s.npy"), "--method", "gradient", "--target", "1",
                       "-o", str(chart), "-o", str(tmp_path / "g.npy"))
    assert code == 0, err
    found = np.load(tmp_path / "g.npy")
    want = captum_attr.Saliency(net).attribute(sig.clone().requires_grad_(), target=1,
                                               abs=False).detach().numpy()
    assert found.shape == (2, 1, 40) and rel(found, want) < 1e-5
    spec = json.loads(chart.read_text())
    cells = next(d[0] for d in (json.loads(v) for v in spec["datasets"].values())
                 if "v" in d[0])  # columns: row, position, value...
    assert len(cells["v"]) == 2 * 40
    strip = np.zeros((2, 40))
    strip[np.asarray(cells["row"]), np.asarray(cells["p0"], int)] = cells["v"]
    np.testing.assert_allclose(strip, found.sum(axis=1), rtol=1e-5, atol=1e-7)
