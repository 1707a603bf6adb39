"""The executor's fast formulations of convolution and max pooling (``_conv_impl``) give
the same values and the same gradients as PyTorch, and are really the ones used."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightatlas.core.executor._conv_impl import MAX_UNROLLED, SMALL_CHANNELS, conv, max_pool

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (input shape, kernel shape, strides, pads per axis, groups)
CONVS = [
    ((2, 3, 31, 29), (8, 3, 7, 7), (2, 2), ((3, 3), (3, 3)), 1),  # a ResNet stem
    ((2, 4, 17, 18), (6, 2, 3, 5), (2, 3), ((1, 0), (2, 1)), 2),  # groups, uneven pads
    ((2, 3, 20), (5, 3, 4), (3,), ((1, 2),), 1),  # 1-d, kernel not a multiple of the stride
    ((1, 2, 9, 8, 7), (3, 2, 3, 3, 3), (2, 1, 2), ((1, 1), (0, 1), (1, 0)), 1),  # 3-d
    ((2, 3, 16, 16), (4, 3, 3, 3), (2, 2), ((0, 0), (0, 0)), 1),  # no padding, crops
    ((2, 32, 12, 12), (8, 32, 3, 3), (2, 2), ((1, 1), (1, 1)), 1),  # many channels: plain
]


def _torch_conv(x: np.ndarray, w: np.ndarray, strides: tuple[int, ...],
                pads: tuple[tuple[int, int], ...], group: int) -> torch.Tensor:
    flat = [p for lo, hi in reversed(pads) for p in (lo, hi)]  # F.pad: last axis first
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(strides)]
    return fn(F.pad(x, flat), w, stride=strides, groups=group)


@pytest.mark.parametrize(("shape", "kshape", "strides", "pads", "group"), CONVS,
                         ids=["stem", "groups", "1d", "3d", "valid", "wide"])
def test_conv_values_and_gradients_match_torch(shape, kshape, strides, pads, group) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(kshape).astype(np.float32)
    n = len(strides)

    def ours(x, w):
        return conv(x, w, strides, pads, (1,) * n, group)

    y = np.asarray(jax.jit(ours)(x, w))
    tx = torch.from_numpy(x).double().requires_grad_(True)
    tw = torch.from_numpy(w).double().requires_grad_(True)
    expected = _torch_conv(tx, tw, strides, pads, group)
    ct = rng.standard_normal(expected.shape)
    expected.backward(torch.from_numpy(ct))
    scale = np.abs(expected.detach().numpy()).max()
    np.testing.assert_allclose(y, expected.detach().numpy(), atol=2e-5 * scale)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * ct), argnums=(0, 1)))(x, w)
    for found, want in ((gx, tx.grad.numpy()), (gw, tw.grad.numpy())):
        np.testing.assert_allclose(np.asarray(found), want, atol=2e-5 * np.abs(want).max())
    # Forward mode and batching go through the same rule.
    tangent = jax.jvp(ours, (x, w), (x, w))[1]  # bilinear: d(x*w) along (x, w) is 2 x*w
    np.testing.assert_allclose(np.asarray(tangent), 2 * y, atol=4e-5 * scale)
    batched = jax.vmap(lambda x: jax.grad(lambda x: jnp.sum(ours(x, w) * ct))(x))(
        np.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(gx), atol=1e-5 * scale)


def _primitives(jaxpr: object) -> list:
    """Every equation of a jaxpr, inner jaxprs (jit, custom rules) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr holds its Jaxpr
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for value in eqn.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                if hasattr(getattr(inner, "jaxpr", inner), "eqns"):
                    found += _primitives(inner)
    return found


def test_stem_input_gradient_has_no_dilated_convolution() -> None:
    """The point of the formulation: the input gradient of a strided convolution over
    few channels is a stride-1 convolution, not one over an input dilated by the
    strides (XLA's slow path); a wide one keeps the plain gradient."""
    def dilations(w: np.ndarray) -> list:
        x = np.zeros((1, w.shape[1], 32, 32), np.float32)
        jaxpr = jax.make_jaxpr(jax.grad(
            lambda x: conv(x, w, (2, 2), ((3, 3), (3, 3)), (1, 1), 1).sum()))(x)
        return [e.params["lhs_dilation"] for e in _primitives(jaxpr)
                if e.primitive.name == "conv_general_dilated"]

    assert SMALL_CHANNELS > 3
    stem = dilations(np.zeros((8, 3, 7, 7), np.float32))
    assert stem and all(d == (1, 1) for d in stem)
    assert (2, 2) in dilations(np.zeros((8, SMALL_CHANNELS, 7, 7), np.float32))


# (input shape, kernel, strides, dilations, pads)
POOLS = [
    ((2, 3, 14, 13), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))),  # ResNet's
    ((2, 3, 14, 13), (3, 3), (2, 2), (2, 2), ((1, 1), (1, 1))),  # dilated
    ((2, 3, 14, 13), (2, 3), (1, 2), (2, 1), ((1, 1), (1, 1))),
    ((2, 3, 15), (4,), (3,), (1,), ((2, 2),)),  # 1-d
    ((1, 2, 6, 7, 5), (2, 2, 2), (2, 1, 2), (1, 1, 1), ((1, 1), (0, 0), (1, 1))),  # 3-d
]


@pytest.mark.parametrize(("shape", "kernel", "strides", "dilations", "pads"), POOLS,
                         ids=["resnet", "dilated", "mixed", "1d", "3d"])
def test_max_pool_values_and_gradients_match_torch(shape, kernel, strides, dilations,
                                                   pads) -> None:
    rng = np.random.default_rng(1)
    # Rounded values: many ties, whose gradient must go to the first maximum in the
    # window, as in PyTorch.
    x = np.round(rng.standard_normal(shape) * 1.5).astype(np.float32)
    x = np.maximum(x, 0)  # after a ReLU, most windows tie at zero

    def ours(x):
        return max_pool(x, kernel, strides, dilations, pads)

    tx = torch.from_numpy(x).requires_grad_(True)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    expected = pool(tx, kernel, strides, [lo for lo, _ in pads], dilations)
    ct = rng.standard_normal(expected.shape).astype(np.float32)
    expected.backward(torch.from_numpy(ct))
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(x)), expected.detach().numpy())
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ours(x) * ct)))(x)
    np.testing.assert_array_equal(np.asarray(grad), tx.grad.numpy())
    # Forward mode is the transpose of reverse mode: <jvp(t), ct> == <t, vjp(ct)>.
    t = rng.standard_normal(shape).astype(np.float32)
    tangent = jax.jvp(ours, (x,), (t,))[1]
    np.testing.assert_allclose(float(jnp.sum(tangent * ct)), float(np.sum(t * grad)),
                               rtol=1e-5)


def test_max_pool_gradient_has_no_select_and_scatter() -> None:
    x = np.zeros((1, 2, 8, 8), np.float32)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda x: max_pool(x, (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))).sum()))(x)
    names = {e.primitive.name for e in _primitives(jaxpr)}
    assert not {n for n in names if "select_and" in n}, names


def test_max_pool_nan_integers_and_large_windows() -> None:
    x = np.array([[[[1.0, np.nan, 3.0, 2.0]]]], np.float32)
    y = np.asarray(max_pool(x, (1, 2), (1, 2), (1, 1), ((0, 0), (0, 0))))
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 3.0  # NaN propagates, as in PyTorch
    ints = np.arange(-8, 8, dtype=np.int8).reshape(1, 1, 4, 4)
    y = np.asarray(max_pool(ints, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))))
    assert y.dtype == np.int8 and y.ravel().tolist() == [-3, -1, 5, 7]
    big = (MAX_UNROLLED + 1,)  # reduce_window path: same values, same gradient
    v = np.random.default_rng(2).standard_normal((1, 1, 3 * big[0])).astype(np.float32)
    grad = jax.grad(lambda v: max_pool(v, big, big, (1,), ((0, 0),)).sum())(v)
    want = np.zeros_like(v)
    for i in range(3):
        want[0, 0, i * big[0] + np.argmax(v[0, 0, i * big[0]:(i + 1) * big[0]])] = 1
    np.testing.assert_array_equal(np.asarray(grad), want)


def _stem_model(w: np.ndarray, fc: np.ndarray):
    """Conv 7x7/2 (no bias) -> Relu -> MaxPool 3x3/2 -> Flatten -> MatMul, as ONNX."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_stem_saliency_matches_torch_and_follows_replaced_weights() -> None:
    """Through the executor: the saliency of a stem (fast convolution and pooling
    gradients) equals PyTorch autograd's, and replacing a weight of the model is seen by
    the next call (the compiled attribution holds the model's weights as constants)."""
    from weightatlas.core.executor import from_onnx, saliency

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 3, 7, 7)) * 0.2).astype(np.float32)
    fc = rng.standard_normal((8 * 8 * 8, 5)).astype(np.float32)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    fn = from_onnx(_stem_model(w, fc))

    def reference(w: np.ndarray) -> np.ndarray:
        tx = torch.from_numpy(x).double().requires_grad_(True)
        h = F.max_pool2d(F.relu(F.conv2d(tx, torch.from_numpy(w).double(), stride=2,
                                         padding=3)), 3, 2, 1)
        y = h.flatten(1) @ torch.from_numpy(fc).double()
        y[torch.arange(2), torch.tensor([1, 4])].sum().backward()
        return np.abs(tx.grad.numpy())

    found = saliency(fn, x, [1, 4])
    expected = reference(w)
    assert np.linalg.norm(found - expected) / np.linalg.norm(expected) < 1e-5
    fn.weights["w"] = 2 * w  # positively homogeneous: the input gradient doubles
    doubled = saliency(fn, x, [1, 4])
    np.testing.assert_allclose(doubled, 2 * found, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(doubled - reference(2 * w)) / np.linalg.norm(doubled) < 1e-5
