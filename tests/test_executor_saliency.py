"""Attributions through the executor against Captum on the same PyTorch models, exported
to ONNX: saliency, gradient x input, integrated gradients (each quadrature), Grad-CAM and
occlusion within 1e-4 relative L2; SmoothGrad and weight gradients against torch autograd
on the same noise; batching and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.executor_models import exported
from weightatlas.core.executor import (
    InputMismatchError,
    from_onnx,
    grad_cam,
    gradient,
    gradient_x_input,
    integrated_gradients,
    occlusion,
    saliency,
    smoothgrad,
    smoothgrad_noise,
    weight_gradients,
)
from weightatlas.errors import ShapeError

captum_attr = pytest.importorskip("captum.attr")

TARGETS = np.array([3, 7])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def vgg():
    module, x, model = exported("vgg")
    return module, x, from_onnx(model)


@pytest.fixture(scope="module")
def resnet():
    module, x, model = exported("resnet18")
    return module, x, from_onnx(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_saliency_and_gradient_x_input_match_captum(request, name):
    module, x, fn = request.getfixturevalue(name)
    target = torch.from_numpy(TARGETS)
    leaf = x.clone().requires_grad_(True)
    expected = captum_attr.Saliency(module).attribute(leaf, target=target).numpy()
    assert rel(saliency(fn, x.numpy(), TARGETS), expected) < 1e-4
    expected = captum_attr.InputXGradient(module).attribute(leaf, target=target)
    expected = expected.detach().numpy()
    assert rel(gradient_x_input(fn, x.numpy(), TARGETS), expected) < 1e-4


@pytest.mark.parametrize(("method", "steps"), [("gausslegendre", 20),
                                               ("riemann_trapezoid", 16),
                                               ("riemann_middle", 8)])
def test_integrated_gradients_match_captum(vgg, method, steps):
    module, x, fn = vgg
    baseline = torch.full_like(x, -0.5)
    expected = captum_attr.IntegratedGradients(module).attribute(
        x, baselines=baseline, target=torch.from_numpy(TARGETS), n_steps=steps,
        method=method).detach().numpy()
    found = integrated_gradients(fn, x.numpy(), TARGETS, baseline=baseline.numpy(),
                                 steps=steps, method=method)
    assert rel(found, expected) < 1e-4


@pytest.mark.slow
def test_integrated_gradients_are_complete_and_chunking_changes_nothing(vgg):
    _, x, fn = vgg
    found = integrated_gradients(fn, x.numpy(), TARGETS, steps=32)
    chunked = integrated_gradients(fn, x.numpy(), TARGETS, steps=32, internal_batch_size=10)
    assert rel(chunked, found) < 1e-5
    (logits,) = fn(x.numpy())
    (at_zero,) = fn(np.zeros_like(x.numpy()))
    rows = np.arange(2)
    gap = np.asarray(logits)[rows, TARGETS] - np.asarray(at_zero)[rows, TARGETS]
    # Completeness, up to the quadrature's error on a piecewise-linear (ReLU) path: 32
    # Gauss-Legendre points land within 2% here (64 within 0.5%).
    np.testing.assert_allclose(found.reshape(2, -1).sum(axis=1), gap, rtol=5e-2)


def test_grad_cam_matches_captum(vgg):
    module, x, fn = vgg
    layer = fn.output_of("features.8.weight")  # the last convolution, before its ReLU
    for relu in (False, True):
        expected = captum_attr.LayerGradCam(module, module.features[8]).attribute(
            x, target=torch.from_numpy(TARGETS), relu_attributions=relu).detach().numpy()
        found = grad_cam(fn, x.numpy(), TARGETS, layer, relu=relu)
        assert found.shape == expected.shape == (2, 1, 8, 8)
        assert rel(found, expected) < 1e-4


@pytest.mark.slow
def test_occlusion_on_onnxruntime_matches_captum(vgg):
    module, x, fn = vgg
    with torch.no_grad():
        expected = captum_attr.Occlusion(module).attribute(
            x, sliding_window_shapes=(3, 8, 8), strides=(3, 6, 6), baselines=0.25,
            target=torch.from_numpy(TARGETS)).numpy()
    found = occlusion(fn, x.numpy(), TARGETS, window=(3, 8, 8), strides=(3, 6, 6),
                      baseline=0.25)
    assert rel(found, expected) < 1e-4
    assert rel(occlusion(fn.model, x.numpy(), TARGETS, window=(3, 8, 8), strides=(3, 6, 6),
                         baseline=0.25), expected) < 1e-4


@pytest.mark.slow
def test_smoothgrad_averages_torch_gradients_over_the_same_noise(vgg):
    module, x, fn = vgg
    noise = smoothgrad_noise(tuple(x.shape), 6, 0.2, seed=3)
    expected = np.zeros(x.shape)
    for eps in noise:
        xi = (x + torch.tensor(eps)).requires_grad_(True)
        module(xi)[torch.arange(2), torch.from_numpy(TARGETS)].sum().backward()
        expected += xi.grad.numpy() / len(noise)
    found = smoothgrad(fn, x.numpy(), TARGETS, samples=6, stdev=0.2, seed=3,
                       internal_batch_size=4)
    assert rel(found, expected) < 1e-4


@pytest.mark.slow
def test_weight_gradients_match_torch_for_a_target_and_a_loss(vgg):
    module, x, fn = vgg
    module.zero_grad()
    module(x)[torch.arange(2), torch.from_numpy(TARGETS)].sum().backward()
    found = weight_gradients(fn, [x.numpy()], TARGETS)
    assert set(found) == set(fn.weights)
    for name, param in module.named_parameters():
        assert rel(found[name], param.grad.numpy()) < 1e-4
    module.zero_grad()
    (module(x) ** 2).mean().backward()
    import jax.numpy as jnp

    found = weight_gradients(fn, [x.numpy()], loss=lambda y: jnp.mean(y ** 2))
    assert rel(found["classifier.4.weight"], module.classifier[4].weight.grad.numpy()) < 1e-4


def test_repeated_calls_reuse_one_compiled_program(vgg, monkeypatch):
    _, x, fn = vgg
    first = gradient(fn, x.numpy(), TARGETS)
    import jax

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(jax, "jit", refuse)
    np.testing.assert_array_equal(gradient(fn, x.numpy(), TARGETS[::-1]).shape, first.shape)


def test_bad_arguments_are_reported(vgg):
    _, x, fn = vgg
    with pytest.raises(InputMismatchError, match=r"target 10 is out of range for an output "
                                                 r"with 10 classes"):
        saliency(fn, x.numpy(), 10)
    with pytest.raises(InputMismatchError, match=r"3 targets for a batch of 2"):
        saliency(fn, x.numpy(), [1, 2, 3])
    with pytest.raises(InputMismatchError, match=r"integration method 'simpson' is not one"):
        integrated_gradients(fn, x.numpy(), 1, method="simpson")
    with pytest.raises(InputMismatchError, match=r"riemann_left needs at least 2 steps"):
        integrated_gradients(fn, x.numpy(), 1, steps=1, method="riemann_left")
    with pytest.raises(InputMismatchError, match=r"no node reads 'features.9.weight'; did "
                                                 r"you mean 'features.8.weight'"):
        grad_cam(fn, x.numpy(), 1, "features.9.weight")
    with pytest.raises(InputMismatchError, match=r"gradients need a floating-point input"):
        gradient(fn, x.numpy().astype(np.int32), 1)
    with pytest.raises(ShapeError, match=r"window \[3, 40, 8\] with strides \[1, 1, 1\] does "
                                         r"not fit an input of shape \[2, 3, 32, 32\]"):
        occlusion(fn, x.numpy(), 1, window=(3, 40, 8))


def test_other_inputs_are_arguments_not_baked_in():
    """y = (x * s) @ w: the gradient for class k is s * w[:, k], for each new s."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1.0, -2.0], [3.0, 4.0], [0.5, 0.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["h"]), helper.make_node("MatMul", ["h", "w"],
                                                                      ["y"])],
        "two_inputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                       helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(w, "w")])
    fn = from_onnx(helper.make_model(graph))
    x = np.ones((2, 3), np.float32)
    for scale in (1.0, 3.0):
        s = np.full((2, 3), scale, np.float32)
        np.testing.assert_allclose(gradient(fn, x, [0, 1], others=[s]),
                                   s * w[:, [0, 1]].T, rtol=1e-6)
        found = gradient(fn, s, 1, others=[x], input_index=1)  # now attribute to s
        np.testing.assert_allclose(found, x * w[:, 1], rtol=1e-6)
