"""Expanded weights against their closed forms (Distill, "Visualizing Weights").

Each model is plain torch.nn, exported with ``torch.onnx.export`` and run by the executor;
every reference is computed independently from the PyTorch weights with numpy/scipy (the
products and full convolutions of the kernels) or with torch autograd on a linearized
PyTorch copy of the network (ReLU -> Identity, MaxPool2d -> AvgPool2d), as Captum does.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.signal
import torch
from torch import nn

from tests._cli import run_cli as _run
from tests.onnx_models import export
from weightatlas.core.executor import (
    ExpandedWeights,
    expanded_weights,
    from_onnx,
    linearized,
)
from weightatlas.errors import (
    InputMismatchError,
    NotFoundError,
    ShapeError,
    UnsupportedError,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _fn(tmp_path: Path, module: nn.Module, shape: tuple[int, ...], style: str = "ts"):
    """The module exported (by default with the TorchScript exporter, ten times faster than
    the dynamo one here; ResNet-18 and the batch-norm case use the dynamo exporter)."""
    torch.manual_seed(0)
    path = export(module.eval(), (torch.randn(*shape),), str(tmp_path / "m.onnx"), style)
    return from_onnx(onnx.load(path))  # with the exporter's external data


def _full2d(w2: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """sum_b w2[j, b] (full 2-d convolution) w1[b, i]: the kernel of two stacked
    cross-correlations."""
    out = np.zeros((w2.shape[0], w1.shape[1], w2.shape[2] + w1.shape[2] - 1,
                    w2.shape[3] + w1.shape[3] - 1))
    for j in range(w2.shape[0]):
        for i in range(w1.shape[1]):
            for b in range(w2.shape[1]):
                out[j, i] += scipy.signal.convolve2d(w2[j, b], w1[b, i], mode="full")
    return out


def _seed_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
    return bn


# ---- closed forms --------------------------------------------------------------------------


def test_adjacent_layers_give_the_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 3, 12, 12))
    e = expanded_weights(fn, fn.output_of("0.weight"), fn.output_of("2.weight"))
    assert isinstance(e, ExpandedWeights)
    assert e.array.dtype == np.float32 and e.array.shape == (4, 5, 3, 3)
    np.testing.assert_array_equal(e.array, m[2].weight.detach().numpy())
    assert e.offsets == (-1, -1) and e.centre == (5, 5) and e.affine and not e.at_border
    # Named by layer and by weight, the same activations.
    again = expanded_weights(fn, "0", "2.weight", channels=[3, 1])
    np.testing.assert_array_equal(again.array, e.array[[3, 1]])
    assert again.channels == (3, 1) and again.source == e.source


def test_bottleneck_then_kxk_gives_the_product_of_kernels(tmp_path: Path) -> None:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(6, 3, 1), nn.ReLU(), nn.Conv2d(3, 4, 5, padding=2))
    fn = _fn(tmp_path, m, (1, 6, 13, 13))
    e = expanded_weights(fn, fn.input_names[0], fn.output_of("2.weight"))
    w1, w2 = _np(m[0].weight)[:, :, 0, 0], _np(m[2].weight)
    closed = np.zeros((4, 6, 5, 5))
    for j in range(4):
        for i in range(6):
            for b in range(3):
                closed[j, i] += w2[j, b] * w1[b, i]
    assert e.array.shape == (4, 6, 5, 5)  # the support stays k x k
    np.testing.assert_allclose(e.array, closed, **TOL)


def test_two_3x3_convolutions_give_the_full_convolution(tmp_path: Path) -> None:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 11, 11))
    e = expanded_weights(fn, fn.input_names[0], fn.output_of("2.weight"))
    closed = _full2d(_np(m[2].weight), _np(m[0].weight))
    assert e.array.shape == (4, 2, 5, 5) and e.offsets == (-2, -2)
    np.testing.assert_allclose(e.array, closed, **TOL)
    # The network is affine: any input gives the same gradient.
    noisy = expanded_weights(fn, fn.input_names[0], fn.output_of("2.weight"),
                             inputs=[np.random.default_rng(0).normal(size=(1, 2, 11, 11))
                                     .astype(np.float32)])
    np.testing.assert_allclose(noisy.array, e.array, **TOL)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


def test_residual_block_sums_its_paths(tmp_path: Path) -> None:
    torch.manual_seed(4)
    m = _Residual()
    fn = _fn(tmp_path, m, (1, 3, 11, 11))
    e = expanded_weights(fn, fn.input_names[0], fn.output_names[0])
    closed = _full2d(_np(m.conv2.weight), _np(m.conv1.weight))
    closed[:, :, 2, 2] += np.eye(3)  # the identity path: delta at the centre
    np.testing.assert_allclose(e.array, closed, **TOL)


def test_max_pooling_is_replaced_by_average_pooling(tmp_path: Path) -> None:
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, 1),
                      nn.Conv2d(3, 2, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 15, 15))
    e = expanded_weights(fn, fn.input_names[0], fn.output_of("3.weight"))
    box = np.full((1, 1, 3, 3), 1 / 9)  # average pooling as a depthwise filter
    w2 = _np(m[3].weight)
    pooled = np.stack([[scipy.signal.convolve2d(w2[j, b], box[0, 0]) for b in range(3)]
                       for j in range(2)])
    closed = _full2d(pooled, _np(m[0].weight))
    assert e.array.shape == (2, 2, 7, 7)
    np.testing.assert_allclose(e.array, closed, **TOL)
    # From the pool's output: the weights of the next layer; from its input: W2 * box.
    np.testing.assert_allclose(
        expanded_weights(fn, fn.output_of("0.weight"), fn.output_of("3.weight")).array,
        pooled, **TOL)


def test_strided_max_pool_becomes_an_average_pool_with_its_parameters(tmp_path: Path) -> None:
    m = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.ReLU())
    fn = _fn(tmp_path, m, (1, 2, 9, 9))
    lin = linearized(fn)
    assert [n.op_type for n in lin.graph.nodes] == ["AveragePool", "Identity"]
    assert [n.op_type for n in fn.graph.nodes] == ["MaxPool", "Relu"]  # unchanged
    x = np.random.default_rng(0).normal(size=(1, 2, 9, 9)).astype(np.float32)
    ref = nn.AvgPool2d(3, 2, 1, count_include_pad=True)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(lin(x)[0]), ref, **TOL)


def test_batch_norm_scales_by_gamma_over_sigma(tmp_path: Path) -> None:
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _seed_bn(nn.BatchNorm2d(3)), nn.ReLU(),
                      nn.Conv2d(3, 2, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 11, 11), style="dyno")  # keeps BatchNormalization
    assert "BatchNormalization" in [n.op_type for n in fn.graph.nodes]
    bn = m[1]
    scale = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
    w2 = _np(m[3].weight)
    e = expanded_weights(fn, fn.output_of("0.weight"), fn.output_of("3.weight"))
    np.testing.assert_allclose(e.array, w2 * scale[None, :, None, None], **TOL)
    e = expanded_weights(fn, fn.input_names[0], fn.output_of("3.weight"))
    np.testing.assert_allclose(e.array, _full2d(w2 * scale[None, :, None, None],
                                                _np(m[0].weight)), **TOL)


def test_one_dimensional_convolutions(tmp_path: Path) -> None:
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.LeakyReLU(0.1),
                      nn.Conv1d(3, 2, 5, padding=2))
    fn = _fn(tmp_path, m, (1, 2, 21))
    e = expanded_weights(fn, fn.input_names[0], fn.output_of("2.weight"))
    w1, w2 = _np(m[0].weight), _np(m[2].weight)
    closed = np.zeros((2, 2, 7))
    for j in range(2):
        for i in range(2):
            for b in range(3):
                closed[j, i] += np.convolve(w2[j, b], w1[b, i])
    assert e.array.shape == (2, 2, 7) and e.offsets == (-3,)
    np.testing.assert_allclose(e.array, closed, **TOL)


def test_dense_layers_give_the_product_of_matrices(tmp_path: Path) -> None:
    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU6(),
                      nn.Linear(4, 3))
    fn = _fn(tmp_path, m, (2, 6))
    w1, w2, w3 = _np(m[0].weight), _np(m[2].weight), _np(m[4].weight)
    e = expanded_weights(fn, fn.input_names[0], fn.output_names[0])
    assert e.array.shape == (3, 6) and e.kernel == () and e.offsets == ()
    np.testing.assert_allclose(e.array, w3 @ w2 @ w1, **TOL)
    e = expanded_weights(fn, fn.output_of("0.weight"), "4")
    np.testing.assert_allclose(e.array, w3 @ w2, **TOL)
    np.testing.assert_allclose(e.norms(), np.abs(w3 @ w2), **TOL)
    with pytest.raises(ShapeError, match=r"size=3 crops spatial axes.*has none"):
        expanded_weights(fn, fn.input_names[0], "4", size=3)


class _Inception(nn.Module):
    """A 1x1 branch and a 1x1 -> 3x3 branch, concatenated (InceptionV1's mixed layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(4, 2, 1)
        self.reduce = nn.Conv2d(4, 3, 1)
        self.b3 = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(torch.relu(self.reduce(x)))], 1)


def test_concatenated_branches_and_separable_convolutions(tmp_path: Path) -> None:
    torch.manual_seed(9)
    m = _Inception()
    fn = _fn(tmp_path, m, (1, 4, 9, 9))
    e = expanded_weights(fn, fn.input_names[0], fn.output_names[0])
    closed = np.zeros((4, 4, 3, 3))
    closed[:2, :, 1, 1] = _np(m.b1.weight)[:, :, 0, 0]  # 1x1 branch: the centre tap only
    closed[2:] = np.einsum("jbyx,bi->jiyx", _np(m.b3.weight), _np(m.reduce.weight)[:, :, 0, 0])
    np.testing.assert_allclose(e.array, closed, **TOL)
    # One channel per chunk: supports 1x1 and 3x3, placed on their union.
    one = expanded_weights(fn, fn.input_names[0], fn.output_names[0], batch=1,
                           channels=[1, 2, 0])
    np.testing.assert_array_equal(one.array, e.array[[1, 2, 0]])
    # Depthwise then pointwise: E[o, i] = P[o, i] * D[i].
    sep = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), nn.ReLU6(),
                        nn.Conv2d(3, 5, 1))
    fn = _fn(tmp_path, sep, (1, 3, 9, 9))
    e = expanded_weights(fn, fn.input_names[0], fn.output_names[0])
    d, p = _np(sep[0].weight)[:, 0], _np(sep[2].weight)[:, :, 0, 0]
    np.testing.assert_allclose(e.array, p[:, :, None, None] * d[None], **TOL)


def test_chunks_and_forced_size_agree(tmp_path: Path) -> None:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 12, 12))
    whole = expanded_weights(fn, fn.input_names[0], "2")
    chunked = expanded_weights(fn, fn.input_names[0], "2", batch=2)
    np.testing.assert_array_equal(chunked.array, whole.array)
    big = expanded_weights(fn, fn.input_names[0], "2", size=9, channels=[4, 0])
    assert big.array.shape == (2, 2, 9, 9) and big.offsets == (-4, -4)
    np.testing.assert_array_equal(big.array[:, :, 2:7, 2:7], whole.array[[4, 0]])
    assert not big.array[:, :, :2].any() and not big.array[:, :, 7:].any()
    small = expanded_weights(fn, fn.input_names[0], "2", size=(3, 1))
    np.testing.assert_array_equal(small.array, whole.array[:, :, 1:4, 2:3])
    assert small.offsets == (-1, 0)
    # The strongest sources of a target channel, by kernel norm.
    norms = np.sqrt((whole.array.astype(np.float64) ** 2).sum(axis=(2, 3)))
    top = whole.strongest(3, top=2)
    assert [i for i, _ in top] == list(np.argsort(-norms[3])[:2])
    np.testing.assert_allclose([n for _, n in top], np.sort(norms[3])[::-1][:2])


def test_nonlinear_gates_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(11)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Conv2d(3, 2, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 9, 9))
    e = expanded_weights(fn, fn.input_names[0], "2")
    assert not e.affine and e.nonaffine[0].endswith("(Sigmoid)")
    # Evaluated at zero: sigmoid'(conv1 bias) scales each bottleneck channel.
    slope = torch.sigmoid(m[0].bias).detach().double().numpy()
    slope = slope * (1 - slope)
    closed = _full2d(_np(m[2].weight) * slope[None, :, None, None], _np(m[0].weight))
    np.testing.assert_allclose(e.array, closed, **TOL)


# ---- ResNet-18 -----------------------------------------------------------------------------


@functools.cache
def _resnet_export() -> tuple[nn.Module, str]:
    import tempfile

    from tests.models import resnet18

    model = resnet18(seed=0, num_classes=10)
    folder = tempfile.mkdtemp(prefix="wa-expanded-")
    return model, export(model, (torch.randn(1, 3, 64, 64),), str(Path(folder) / "r.onnx"),
                         "dy")


@functools.cache
def _resnet() -> tuple[nn.Module, object]:
    model, path = _resnet_export()
    return model, from_onnx(onnx.load(path))


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> np.ndarray:
    return _np(conv.weight) * (_np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps))[
        :, None, None, None]


def _linear_copy(model: nn.Module) -> nn.Module:
    """The PyTorch model linearized as Captum does: ReLU -> Identity, MaxPool -> AvgPool."""
    lin = copy.deepcopy(model).double()
    for module in list(lin.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                   child.padding, count_include_pad=True))
    return lin


def _autograd(block, shape: tuple[int, ...], channel: int) -> np.ndarray:
    """d block(s)[0, channel, centre] / d s, by torch autograd, in float64."""
    s = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = block(s)
    cy, cx = (out.shape[2] - 1) // 2, (out.shape[3] - 1) // 2
    out[0, channel, cy, cx].backward()
    return s.grad[0].numpy()


def _embed(e: ExpandedWeights, row: int) -> np.ndarray:
    """Row ``row`` of the expanded weights placed back on the source grid."""
    full = np.zeros(e.source_shape[1:])
    oy = (e.source_shape[2] - 1) // 2 + e.offsets[0]
    ox = (e.source_shape[3] - 1) // 2 + e.offsets[1]
    kh, kw = e.kernel
    full[:, oy:oy + kh, ox:ox + kw] = e.array[row]
    return full


def _add_after(fn, value: str) -> str:
    return next(n.outputs[0] for n in fn.graph.nodes
                if n.op_type == "Add" and value in n.inputs)


@pytest.mark.slow
def test_resnet18_adjacent_and_residual_layers() -> None:
    model, fn = _resnet()
    block = model.layer1[0]
    conv1 = fn.output_of("layer1.0.conv1.weight")
    conv2 = fn.output_of("layer1.0.conv2.weight")
    e = expanded_weights(fn, conv1, conv2)  # adjacent: the (BN-folded) weights themselves
    np.testing.assert_allclose(e.array, _folded(block.conv2, block.bn2), rtol=1e-5, atol=1e-6)
    assert e.array.shape == (64, 64, 3, 3) and e.affine
    # The block from its input to its sum: identity + conv2 * conv1.
    source = next(n.outputs[0] for n in fn.graph.nodes if n.op_type == "MaxPool")
    out = _add_after(fn, conv2)
    e = expanded_weights(fn, source, out)
    closed = _full2d(_folded(block.conv2, block.bn2), _folded(block.conv1, block.bn1))
    closed[:, :, 2, 2] += np.eye(64)
    np.testing.assert_allclose(e.array, closed, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resnet18_non_adjacent_layers_match_torch_autograd() -> None:
    model, fn = _resnet()
    lin = _linear_copy(model)
    source = next(n.outputs[0] for n in fn.graph.nodes if n.op_type == "MaxPool")
    layer1 = _add_after(fn, fn.output_of("layer1.1.conv2.weight"))
    e = expanded_weights(fn, source, layer1, channels=[0, 37])  # two blocks, 9x9
    assert e.array.shape == (2, 64, 9, 9) and np.isfinite(e.array).all() and not e.at_border
    for row, channel in enumerate(e.channels):
        ref = _autograd(lin.layer1, (1, 64, 16, 16), channel)
        np.testing.assert_allclose(_embed(e, row), ref, rtol=1e-4, atol=1e-6)
    # Across a strided block (with its downsampling path): layer1's output to layer2.0's.
    layer2 = _add_after(fn, fn.output_of("layer2.0.conv2.weight"))
    layer1_out = next(n.outputs[0] for n in fn.graph.nodes
                      if n.op_type == "Relu" and n.inputs[0] == layer1)
    e = expanded_weights(fn, layer1_out, layer2, channels=[5, 100])
    assert e.source_shape == (1, 64, 16, 16) and e.target_shape == (1, 128, 8, 8)
    for row, channel in enumerate(e.channels):
        ref = _autograd(lin.layer2[0], (1, 64, 16, 16), channel)
        np.testing.assert_allclose(_embed(e, row), ref, rtol=1e-4, atol=1e-6)


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input(tmp_path: Path) -> None:
    torch.manual_seed(12)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 9, 9))
    with pytest.raises(NotFoundError, match=r"source '0.weigth' is neither a value of the "
                                            r"graph nor a layer or weight; did you mean "
                                            r"'0.weight'"):
        expanded_weights(fn, "0.weigth", "2")
    with pytest.raises(InputMismatchError, match=r"source '2' \(value '\d+'\) is not "
                                                 r"upstream of target '0'"):
        expanded_weights(fn, "2", "0")
    with pytest.raises(InputMismatchError, match=r"they are the same value"):
        expanded_weights(fn, "0", "0.weight")
    with pytest.raises(InputMismatchError, match=r"has 2 channels; channels \[5\]"):
        expanded_weights(fn, fn.input_names[0], "2", channels=[0, 5])
    with pytest.raises(ShapeError, match=r"size=\(3,\); expected a positive int or one per"):
        expanded_weights(fn, fn.input_names[0], "2", size=(3,))
    with pytest.raises(InputMismatchError, match=r"expects 1 inputs \['input.1'\], got 2"):
        expanded_weights(fn, fn.input_names[0], "2", inputs=[np.zeros((1, 2, 9, 9))] * 2)
    pool = nn.MaxPool2d(2, return_indices=True)

    class WithIndices(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, i = pool(x)
            return y + i.float()

    fn = _fn(tmp_path, WithIndices(), (1, 1, 4, 4), style="dy")
    with pytest.raises(UnsupportedError, match=r"\(MaxPool\): its indices output .* is used"):
        linearized(fn)


def test_symbolic_input_shape_needs_input_shape(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "sym",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])], [w])
    fn = from_onnx(helper.make_model(graph))
    with pytest.raises(ShapeError, match=r"input 'x' has shape \['n', 1, 'h', 'w'\].*give "
                                         r"input_shape="):
        expanded_weights(fn, "x", "y")
    e = expanded_weights(fn, "x", "y", input_shape=(1, 1, 7, 7))
    np.testing.assert_array_equal(e.array, np.ones((2, 1, 3, 3)))
    assert e.source_shape == (1, 1, 7, 7) and not e.at_border
    small = expanded_weights(fn, "x", "y", input_shape=(1, 1, 2, 2))  # centre (0, 0)
    assert small.at_border and small.offsets == (0, 0) and small.kernel == (2, 2)
    np.testing.assert_array_equal(small.array, np.ones((2, 1, 2, 2)))  # the cut-off kernel
    with pytest.raises(InputMismatchError, match=r"batch=0; give at least 1"):
        expanded_weights(fn, "x", "y", input_shape=(1, 1, 7, 7), batch=0)
    with pytest.raises(NotFoundError, match=r"target channel 5 of 'y' was not computed"):
        e.strongest(5)


# ---- the API and the command line on a stored ResNet-18 ----------------------------------


@pytest.fixture(scope="module")
def stored_resnet(tmp_path_factory: pytest.TempPathFactory) -> str:
    import weightatlas as wa

    _, path = _resnet_export()
    root = str(tmp_path_factory.mktemp("resnet") / "store")
    wa.ingest(path, store=root, model="resnet", step=3).close()
    return root


@pytest.mark.slow
def test_api_expand_on_a_stored_model(stored_resnet: str) -> None:
    import weightatlas as wa

    model, _ = _resnet()
    block = model.layer1[0]
    e = wa.expand("resnet@3", "layer1.0.conv1", "layer1.0.conv2.weight", store=stored_resnet,
                  channels=[2, 9])
    np.testing.assert_allclose(e.array, _folded(block.conv2, block.bn2)[[2, 9]], rtol=1e-5,
                               atol=1e-6)
    assert e.source_layer == "layer1.0.conv1" and e.channels == (2, 9)
    with wa.open_store(stored_resnet).snapshot("resnet@3") as snap:
        same = wa.expand(snap, "layer1.0.conv1", "layer1.0.conv2", channels=[2, 9])
    np.testing.assert_array_equal(same.array, e.array)


def test_api_expand_on_a_stored_live_module(tmp_path: Path) -> None:
    """The PyTorch adapter's convention: a live module stored with its exported graph."""
    import weightatlas as wa
    from weightatlas.adapters import torch as wt

    torch.manual_seed(13)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _seed_bn(nn.BatchNorm2d(3)), nn.ReLU(),
                      nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 2, 3, padding=1)).eval()
    store = wa.open_store(tmp_path / "store")
    with store.write(wt.from_module(m, example_inputs=(torch.randn(1, 2, 11, 11),)),
                     "live") as snap:
        after_bn = wa.expand(snap, "1", "4")  # BatchNorm's output -> the last conv's
        after_conv = wa.expand(snap, "0", "4")
    box = np.full((3, 3), 1 / 9)
    w2 = _np(m[4].weight)
    pooled = np.stack([[scipy.signal.convolve2d(w2[j, b], box) for b in range(3)]
                       for j in range(2)])
    np.testing.assert_allclose(after_bn.array, pooled, **TOL)
    bn = m[1]
    scale = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
    np.testing.assert_allclose(after_conv.array, pooled * scale[None, :, None, None], **TOL)


@pytest.mark.slow
def test_cli_expand(stored_resnet: str, tmp_path: Path, capsys) -> None:
    import json

    model, _ = _resnet()
    block = model.layer1[0]
    folded = _folded(block.conv2, block.bn2)
    code, out, err = _run(capsys, "--store", stored_resnet, "expand", "resnet@3",
                          "layer1.0.conv1", "layer1.0.conv2", "--channels", "0,3", "--top",
                          "4", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["snapshot"] == "resnet@3" and doc["shape"] == [2, 64, 3, 3]
    assert doc["channels"] == [0, 3] and doc["offsets"] == [-1, -1] and doc["affine"]
    for entry in doc["strongest"]:
        norms = np.sqrt((folded[entry["channel"]] ** 2).sum(axis=(1, 2)))
        assert [s["channel"] for s in entry["sources"]] == np.argsort(-norms)[:4].tolist()
        np.testing.assert_allclose([s["norm"] for s in entry["sources"]],
                                   np.sort(norms)[::-1][:4], rtol=1e-5)
    npy = tmp_path / "e.npy"
    code, out, err = _run(capsys, "--store", stored_resnet, "expand", "resnet",
                          "layer1.0.conv1", "layer1.0.conv2", "-o", str(npy))
    assert code == 0, err
    assert "resnet@3: expanded weights layer1.0.conv1" in out and "kernel 3×3" in out
    assert f"wrote {npy}" in err
    np.testing.assert_allclose(np.load(npy), folded, rtol=1e-5, atol=1e-6)
    svg = tmp_path / "e.svg"
    code, out, err = _run(capsys, "--store", stored_resnet, "expand", "resnet@3",
                          "layer1.0.conv1", "layer1.1.conv1", "--channels", "1,2", "--top", "3",
                          "-o", str(svg))
    assert code == 0, err
    assert svg.read_text().lstrip().startswith("<svg") and "kernel 5×5" in out


@pytest.mark.slow
def test_cli_expand_errors(stored_resnet: str, tmp_path: Path, capsys) -> None:
    def fails(*args: str) -> str:
        code, out, err = _run(capsys, "--store", stored_resnet, "expand", *args)
        assert code == 1 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no layer, stored tensor or graph value named 'layer1.0.conv3'; close names: " \
        "'layer1.0.conv2'" in fails("resnet@3", "layer1.0.conv3", "layer2.0.conv1")
    assert "source 'layer2.0.conv1' (value " in fails("resnet@3", "layer2.0.conv1",
                                                      "layer1.0.conv2")
    assert "is not upstream of target 'layer1.0.conv2'" in fails(
        "resnet@3", "layer2.0.conv1", "layer1.0.conv2")
    _, fn = _resnet()
    flat = next(n.inputs[0] for n in fn.graph.nodes if n.op_type == "Gemm")
    assert "size=3 crops spatial axes" in fails("resnet@3", flat, "fc", "--size", "3")
    assert "--channels '0,a'; expected integers" in fails("resnet@3", "x", "fc", "--channels",
                                                          "0,a")
    assert "channels [10] are not in 0..9" in fails("resnet@3", "x", "fc", "--channels", "10")
    from weightatlas.adapters import safetensors

    safetensors.write({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "plain.safetensors"))
    import weightatlas as wa

    wa.ingest(tmp_path / "plain.safetensors", store=stored_resnet, model="plain").close()
    assert "plain" in fails("plain", "w", "w")


def test_compiled_once_per_layer_pair_and_freed_with_the_model(tmp_path: Path) -> None:
    import gc
    import weakref

    from weightatlas.core.executor import _expanded

    torch.manual_seed(14)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    fn = _fn(tmp_path, m, (1, 2, 9, 9))
    first = expanded_weights(fn, fn.input_names[0], "2")
    lin, cache = _expanded._LINEAR[fn]
    again = expanded_weights(fn, fn.input_names[0], "2")
    assert len(cache) == 1 and _expanded._LINEAR[fn][0] is lin  # nothing rebuilt
    np.testing.assert_array_equal(again.array, first.array)
    expanded_weights(fn, "0", "2")
    assert len(cache) == 2
    alive = weakref.ref(lin)
    del fn, lin, cache
    gc.collect()
    assert alive() is None


def test_image_to_dense_logits_is_the_weight_product_without_border_warning() -> None:
    """The demo's case: an image flattened into an MLP. The expanded weight from the
    image to each logit is the product of the layers' matrices reshaped as the image,
    and a dense target, which sees the whole image at any size, is never "at the border"."""
    from weightatlas._demo import mlp_onnx

    rng = np.random.default_rng(3)
    w = [rng.standard_normal((16, 5)).astype(np.float32),
         rng.standard_normal((5, 3)).astype(np.float32)]
    b = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    fn = from_onnx(onnx.load_from_string(mlp_onnx(w, b, image=(1, 4, 4))))
    e = expanded_weights(fn, "x", fn.output_names[0], input_shape=(1, 1, 4, 4))
    want = (w[0].astype(np.float64) @ w[1]).T.reshape(3, 1, 4, 4)
    np.testing.assert_allclose(e.array, want, rtol=1e-5, atol=1e-6)
    assert not e.at_border and e.affine
