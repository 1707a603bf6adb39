"""Whole models through the executor: parity with onnxruntime and PyTorch, and gradients
(with respect to the input and to weights) against torch autograd.

Models: the nine shipped in onnx/backend/test/data/light/ (their weights are constant
fills, replaced here by random ones so that outputs depend on every layer), ResNet-18
from tests/models.py, VGG-, MobileNet-style networks and a small transformer encoder
from tests/executor_models.py, exported with ``torch.onnx.export``.
"""

from __future__ import annotations

import glob
import io
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from tests.executor_models import TinyEncoder, exported, seeded
from weightatlas.core.executor import from_onnx

LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend", "test",
                                      "data", "light", "*.onnx")))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 distance of ``a`` from ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def onnxruntime(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))


def with_random_weights(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """The light models build every weight with ConstantOfShape(0.02); make them random
    initializers (He-scaled kernels, per-channel parameters in [0.5, 1.5]) and drop a
    final Softmax, so that outputs are informative logits."""
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = [int(d) for d in shapes[node.input[0]]]
            w = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
                 if len(shape) > 1 else rng.uniform(0.5, 1.5, shape))
            model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32),
                                                                   node.output[0]))
        else:
            kept.append(node)
    if kept[-1].op_type == "Softmax":
        logits = kept.pop().input[0]
        model.graph.output[0].name = logits
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT, ids=[Path(p).stem for p in LIGHT])
def test_light_models_match_onnxruntime(path):
    model = with_random_weights(onnx.load(path), np.random.default_rng(0))
    fn = from_onnx(model)
    spec = fn.inputs[0]
    x = np.random.default_rng(1).standard_normal([int(d) for d in spec.shape])
    x = x.astype(np.float32)
    (out,) = fn(x)
    (ref,) = onnxruntime(model, x)
    assert np.asarray(out).shape == ref.shape
    assert np.std(ref) > 1e-3  # the comparison is not between constants
    assert rel(out, ref) < 1e-4


# PyTorch models, exported once per session


@pytest.fixture(scope="module")
def torch_models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, onnx.ModelProto]]:
    return {name: exported(name) for name in ("resnet18", "vgg", "mobilenet", "encoder")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg", "mobilenet", "encoder"])
def test_exported_models_match_onnxruntime_and_torch(torch_models, name):
    module, x, model = torch_models[name]
    fn = from_onnx(model)
    (out,) = fn(x.numpy())
    (ref,) = onnxruntime(model, x.numpy())
    with torch.no_grad():
        expected = module(x).numpy()
    assert rel(out, ref) < 1e-4
    assert rel(out, expected) < 1e-4


def test_torchscript_export_with_shape_arithmetic_and_a_dynamic_batch():
    """The legacy exporter computes Reshape targets with Shape/Gather/Unsqueeze/Concat
    chains: they fold at trace time, for each batch size."""
    module = seeded(TinyEncoder())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, (torch.randint(0, 50, (3, 12)),), buffer, dynamo=False,
                          input_names=["tokens"], dynamic_axes={"tokens": {0: "batch"}},
                          opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= {n.op_type for n in model.graph.node}
    fn = from_onnx(model)
    for batch in (1, 4):
        tokens = torch.randint(0, 50, (batch, 12))
        (out,) = fn(tokens.numpy())
        with torch.no_grad():
            assert rel(out, module(tokens).numpy()) < 1e-4


@pytest.mark.slow
def test_jit_and_eager_runs_agree_on_a_whole_model(torch_models):
    _, x, model = torch_models["mobilenet"]
    fn = from_onnx(model)
    (jitted,) = fn(x.numpy())
    (eager,) = fn.apply(fn.weights, x.numpy())
    assert rel(eager, jitted) < 1e-6


# Gradients against torch autograd


def torch_grads(module: torch.nn.Module, x: torch.Tensor, target: int, weight: str
                ) -> tuple[np.ndarray | None, np.ndarray]:
    """Gradients of sum(logits[:, target]) with respect to x (if float) and a parameter."""
    module.zero_grad()
    x = x.clone().requires_grad_(x.is_floating_point())
    module(x)[:, target].sum().backward()
    param = dict(module.named_parameters())[weight]
    grad_x = x.grad.numpy() if x.grad is not None else None
    return grad_x, param.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weight"), [("resnet18", "fc.weight"),
                                              ("vgg", "features.0.weight"),
                                              ("mobilenet", "head.4.weight")])
def test_input_and_weight_gradients_match_torch(torch_models, name, weight):
    module, x, model = torch_models[name]
    fn = from_onnx(model)
    target = 3

    def objective(weights, inputs):
        return jnp.sum(fn.apply(weights, inputs)[0][:, target])

    grad_w, grad_x = jax.jit(jax.grad(objective, argnums=(0, 1)))(fn.weights, x.numpy())
    expected_x, expected_w = torch_grads(module, x, target, weight)
    assert rel(grad_x, expected_x) < 1e-4
    assert rel(grad_w[weight], expected_w) < 1e-4


@pytest.mark.slow
def test_embedding_and_head_gradients_of_the_encoder_match_torch(torch_models):
    module, tokens, model = torch_models["encoder"]
    fn = from_onnx(model)

    def objective(weights):
        return jnp.sum(fn.apply(weights, tokens.numpy())[0][:, 1])

    grads = jax.jit(jax.grad(objective))(fn.weights)
    for weight in ("embed.weight", "head.weight", "blocks.0.norm1.weight"):
        _, expected = torch_grads(module, tokens, 1, weight)
        assert rel(grads[weight], expected) < 1e-4
