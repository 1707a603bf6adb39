"""JAX models ingested with their apply function: the traced graph runs from the store.

Real models (a Linen CNN trained a few steps on scikit-learn's digits, a Linen MLP with
layer norm, tanh-GELU and log-softmax, an Equinox MLP), each checked against the model
itself: the executor's outputs, onnxruntime on the attached graph with the weights
filled in, weight gradients against ``jax.grad`` (mapped to canonical names and
layouts), saliency against the input gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.core.executor import from_snapshot, stored_gradients
from weightatlas.errors import UnsupportedError
from weightatlas.storage import Store

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import jax.numpy as jnp  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from weightatlas.adapters import jax as wj  # noqa: E402
from weightatlas.adapters._jax_graph import SUPPORTED  # noqa: E402
from weightatlas.core._onnx_model import GRAPH_ATTACHMENT  # noqa: E402


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1], NHWC as Flax
    return x, d.target.astype(np.int32)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3), padding="VALID", feature_group_count=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class NormMLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(nn.LayerNorm()(nn.Dense(24)(x)), approximate=True)
        x = nn.max_pool(x[..., None], (3,), (1,), padding="SAME")[..., 0]
        return nn.log_softmax(nn.Dense(10)(x))


def train(model: nn.Module, steps: int = 20) -> dict[str, Any]:
    """A few steps of plain SGD on digits: weights that are not the initial ones."""
    x, y = digits()
    params = model.init(jax.random.key(0), x[:2])

    def loss(p: Any, xb: Any, yb: Any) -> Any:
        logits = model.apply(p, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    step = jax.jit(lambda p, xb, yb: jax.tree_util.tree_map(
        lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p, xb, yb)))
    for i in range(steps):
        params = step(params, x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
    return params


def canonical_grads(grads: Any, snap: Any) -> dict[str, np.ndarray]:
    """jax.grad's tree by stored name, in the canonical layout (independent mapping)."""
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    by_source = {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                          for k in keys): np.asarray(g) for keys, g in flat}
    out = {}
    for row in snap.tensors().select(["name", "source_name", "kind"]).to_pylist():
        g = by_source[row["source_name"]]
        if row["kind"] == "linear" and g.ndim == 2 and row["source_name"].endswith("kernel"):
            g = g.T  # [in, out] -> [out, in]
        elif row["kind"].startswith("conv") and g.ndim == 4:
            g = g.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[row["name"]] = g
    return out


def fill(graph: bytes, by_source: dict[str, np.ndarray]) -> Any:
    """The attached graph with its cleared initializers filled from the original tree."""
    model = onnx.load_from_string(graph)
    keep = []
    for t in model.graph.initializer:
        keep.append(numpy_helper.from_array(np.asarray(by_source[t.name]), t.name)
                    if t.name in by_source else t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.metadata_props[:]
    return model


def flat_by_source(tree: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                     for k in keys): np.asarray(v)
            for keys, v in flat if isinstance(v, jax.Array | np.ndarray)}


def linen_cnn() -> dict[str, Any]:
    model = CNN()
    return {"apply": model.apply, "tree": train(model), "x": digits()[0][:8]}


def linen_norm_mlp() -> dict[str, Any]:
    model = NormMLP()
    return {"apply": model.apply, "tree": train(model), "x": digits()[0][:8]}


def equinox_mlp() -> dict[str, Any]:
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(64, 10, 32, 2, activation=jax.nn.relu, key=jax.random.key(1))
    x = digits()[0][:8].reshape(8, 64)
    return {"apply": lambda m, xb: jax.vmap(m)(xb), "tree": mlp, "x": x}


MODELS: dict[str, Callable[[], dict[str, Any]]] = {
    "linen_cnn": linen_cnn, "linen_layernorm_gelu_mlp": linen_norm_mlp,
    "equinox_mlp": equinox_mlp,
}


_INGESTED: dict[str, dict[str, Any]] = {}


def _ingest(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model built (trained), ingested with its apply function, once per session."""
    if name not in _INGESTED:
        case = MODELS[name]()
        store = Store(tmp_path_factory.mktemp("jaxgraph") / "store", create=True)
        src = wj.from_pytree(case["tree"], apply=case["apply"], example_inputs=(case["x"],))
        snap = store.write(src, name)
        _INGESTED[name] = {**case, "snap": snap,
                           "graph": src.attachments()[GRAPH_ATTACHMENT]}
    return _INGESTED[name]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def ingested(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:
    return _ingest(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _ingest("linen_cnn", tmp_path_factory)


def test_executor_equals_the_model(ingested: dict[str, Any]) -> None:
    fn = from_snapshot(ingested["snap"])
    want = np.asarray(ingested["apply"](ingested["tree"], ingested["x"]))
    (got,) = fn(ingested["x"])
    assert rel(got, want) < 1e-5
    # Every stored tensor is a weight of the executor, read from the store.
    assert set(fn.weight_of) == set(ingested["snap"].names)


def test_onnxruntime_on_the_filled_graph(ingested: dict[str, Any]) -> None:
    model = fill(ingested["graph"], flat_by_source(ingested["tree"]))
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_0": ingested["x"]})
    want = np.asarray(ingested["apply"](ingested["tree"], ingested["x"]))
    assert rel(got, want) < 1e-5


def test_weight_gradients_equal_jax_grad(ingested: dict[str, Any]) -> None:
    apply, tree, x = ingested["apply"], ingested["tree"], ingested["x"]
    target = np.arange(len(x)) % 10
    fn = from_snapshot(ingested["snap"])
    got = stored_gradients(fn, x, target)

    def score(t: Any) -> Any:
        return apply(t, x)[np.arange(len(x)), target].sum()

    eqx = __import__("sys").modules.get("equinox")
    grad = (eqx.filter_grad(score) if eqx is not None and isinstance(tree, eqx.Module)
            else jax.grad(score))(tree)
    want = canonical_grads(grad, ingested["snap"])
    assert set(got) == set(want)
    for name, g in want.items():
        assert got[name].shape == g.shape, name
        assert rel(got[name], g) < 1e-4, name


def test_saliency_equals_the_input_gradient(ingested: dict[str, Any]) -> None:
    apply, tree, x = ingested["apply"], ingested["tree"], ingested["x"]
    target = np.arange(len(x)) % 10
    a = wa.attribute(ingested["snap"], x, target, method="saliency")
    want = jax.grad(lambda xb: apply(tree, xb)[np.arange(len(x)), target].sum())(x)
    assert rel(a.values, np.abs(np.asarray(want))) < 1e-4


def test_graph_names_and_layouts(ingested: dict[str, Any]) -> None:
    model = onnx.load_from_string(ingested["graph"])
    assert model.metadata_props[-1].key == "weightatlas.weights"
    cleared = {t.name for t in model.graph.initializer if not t.raw_data}
    sources = set(ingested["snap"].tensors().column("source_name").to_pylist())
    assert sources <= cleared
    # Nodes are named after their primitive and index, every name unique.
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    if ingested["snap"].model == "linen_cnn":
        ops = {n.op_type for n in model.graph.node}
        assert {"Conv", "Relu", "AveragePool", "MatMul"} <= ops
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        assert conv.name.startswith("conv_general_dilated_")


def test_cnn_layer_output_and_grad_cam(cnn: dict[str, Any]) -> None:
    from weightatlas.core.executor import layer_output

    fn = from_snapshot(cnn["snap"])
    assert layer_output(fn, "Conv_1").startswith("conv_general_dilated_")  # the Conv node
    a = wa.attribute(fn, cnn["x"], 3, method="grad_cam", layer="Conv_1")
    # Independently, in JAX: Conv_1's output before its bias, NHWC.
    p, x = cnn["tree"]["params"], cnn["x"]

    def conv(h: Any, k: Any, padding: str, groups: int = 1) -> Any:
        return jax.lax.conv_general_dilated(h, k, (1, 1), padding, feature_group_count=groups,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    h = nn.avg_pool(jax.nn.relu(conv(x, p["Conv_0"]["kernel"], "SAME") + p["Conv_0"]["bias"]),
                    (2, 2), (2, 2))
    act = conv(h, p["Conv_1"]["kernel"], "VALID", 2)

    def score(act: Any) -> Any:
        z = jax.nn.relu(act + p["Conv_1"]["bias"]).reshape(len(x), -1)
        z = jax.nn.relu(z @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return (z @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])[:, 3].sum()

    alpha = jax.grad(score)(act).mean(axis=(1, 2), keepdims=True)
    want = (alpha * act).sum(-1)[:, None]  # [batch, 1, h, w]
    assert a.values.shape == want.shape
    assert rel(a.values, want) < 1e-4


def test_cnn_expanded_weights_closed_forms(cnn: dict[str, Any]) -> None:
    from weightatlas.core.executor import expanded_weights

    fn = from_snapshot(cnn["snap"])
    params = cnn["tree"]["params"]
    # Adjacent dense layers (relu between): the weights themselves, [out, in].
    e = expanded_weights(fn, "Dense_0", "Dense_1")
    assert rel(e.array, np.asarray(params["Dense_1"]["kernel"]).T) < 1e-5
    # Conv_0 -> 2x2 average pool -> Conv_1 (two groups): each tap of Conv_1 spread over
    # its 2x2 window, divided by 4, zero across groups.
    e = expanded_weights(fn, "Conv_0", "Conv_1")
    w2 = np.asarray(params["Conv_1"]["kernel"]).transpose(3, 2, 0, 1)  # OIHW [8, 3, 3, 3]
    want = np.zeros((8, 6, 6, 6), np.float32)
    for o in range(8):
        g = o // 4
        want[o, 3 * g:3 * g + 3] = np.kron(w2[o], np.ones((2, 2), np.float32)) / 4
    assert e.array.shape == want.shape
    assert rel(e.array, want) < 1e-5


def test_cnn_feature_visualization(cnn: dict[str, Any], store: Store) -> None:
    """Feature visualization needs an NCHW image input: the NHWC model is wrapped."""
    from weightatlas.core.executor import feature_visualization, layer_output

    params = cnn["tree"]

    def nchw(v: Any, x: Any) -> Any:
        return CNN().apply(v, jnp.transpose(x, (0, 2, 3, 1)))

    x = np.transpose(cnn["x"][:2], (0, 3, 1, 2))
    fn = from_snapshot(store.write(wj.from_pytree(params, apply=nchw, example_inputs=(x,)),
                                   "cnn_nchw"))
    r = feature_visualization(fn, layer_output(fn, "Conv_1"), [0, 5], steps=48, jitter=1,
                              scales=(1,), rotate=(0,), batch=2)
    assert r.images.shape == (2, 1, 8, 8)
    # The final objective is Conv_1's channel mean (before its bias) on the final image.
    p = params["params"]
    h = jnp.transpose(jnp.asarray(r.images), (0, 2, 3, 1))
    h = jax.lax.conv_general_dilated(h, p["Conv_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = nn.avg_pool(jax.nn.relu(h + p["Conv_0"]["bias"]), (2, 2), (2, 2))
    act = jax.lax.conv_general_dilated(h, p["Conv_1"]["kernel"], (1, 1), "VALID",
                                       feature_group_count=2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = np.asarray(act.mean(axis=(1, 2)))[[0, 1], [0, 5]]
    assert rel(r.final, want) < 1e-4
    assert (r.final > r.objective[0]).all()


# ---- primitives: small plain-JAX functions, each against JAX itself ------------------

_W = np.random.default_rng(0).standard_normal((4, 3, 3, 2)).astype(np.float32)
PRIMITIVES: dict[str, tuple[Callable[..., Any], dict[str, Any], tuple[Any, ...]]] = {
    "batched_dot_general": (
        lambda p, x: jnp.einsum("bij,bjk->bik", x, p["w"]) + jnp.einsum("bij,kj->bik", x,
                                                                          p["v"]),
        {"w": np.ones((2, 3, 5), np.float32) * 0.3, "v": np.arange(15.0, dtype=np.float32)
         .reshape(5, 3)}, (np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 4, 3),)),
    "contract_two_axes": (
        lambda p, x: jnp.tensordot(x, p["w"], axes=([1, 2], [0, 1])),
        {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 4, 2)},
        (np.linspace(-2, 2, 60, dtype=np.float32).reshape(5, 3, 4),)),
    "strided_dilated_padded_conv": (
        lambda p, x: jax.lax.conv_general_dilated(
            x, p["w"], (2, 1), ((1, 2), (0, 1)), rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC")),
        {"w": _W[:, :, :2, :]}, (np.linspace(-1, 1, 2 * 9 * 8 * 2, dtype=np.float32)
                                   .reshape(2, 9, 8, 2),)),
    "nchw_conv": (
        lambda p, x: jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME"),
        {"w": _W.transpose(3, 2, 0, 1)[:, :3]}, (np.ones((1, 3, 5, 5), np.float32),)),
    "max_pool_strided_padded": (
        lambda p, x: nn.max_pool(x * p["s"], (3, 2), (2, 1), padding=((1, 1), (0, 1))),
        {"s": np.float32(1.5)}, (np.linspace(-3, 3, 2 * 7 * 6 * 3, dtype=np.float32)
                                 .reshape(2, 7, 6, 3),)),
    "avg_pool_1d": (
        lambda p, x: nn.avg_pool(x + p["b"], (3,), (2,), padding="SAME"),
        {"b": np.arange(4.0, dtype=np.float32)}, (np.linspace(0, 1, 40, dtype=np.float32)
                                                   .reshape(2, 5, 4),)),
    "elementwise": (
        lambda p, x: (jnp.sqrt(jnp.abs(x) + 1) + jax.lax.rsqrt(x * x + p["e"]) + jnp.exp(-x)
                      + jnp.log1p(x * x) + jax.scipy.special.erf(x) + x ** 3 + x ** -2
                      + jnp.maximum(x, p["e"]) - jnp.minimum(x, 0.5) + jnp.power(2.0, x)
                      + jax.nn.sigmoid(x) + jnp.tanh(x) + jnp.clip(x, -0.5, 0.5)
                      + jnp.expm1(x) / 2 + jnp.sign(x) + jnp.floor(x)),
        {"e": np.float32(0.25)}, (np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4),)),
    "selects_and_comparisons": (
        lambda p, x: (jnp.where(x > p["t"], x, -x) + jnp.where(x <= 0, 1.0, 0.0)
                      + jnp.where((x != 1) & (x >= -1), 2.0, 0.0)
                      + (x == 0).astype(jnp.float32)),
        {"t": np.float32(0.5)}, (np.linspace(-2, 2, 9, dtype=np.float32).reshape(3, 3),)),
    "shapes": (
        lambda p, x: jnp.concatenate([x[:, 1:3], x[:, ::2].T.reshape(2, -1)[:, :2]
                                      * p["w"]], axis=1)[:, None, :].squeeze(1),
        {"w": np.float32(3.0)}, (np.arange(8.0, dtype=np.float32).reshape(2, 4),)),
    "reductions_and_argmax": (
        lambda p, x: (x.sum(0) + x.max(1).mean() + x.min() + jnp.prod(x[:1] + p["b"], 1),
                      jnp.argmax(x, -1), jnp.argmin(x, 0)),
        {"b": np.float32(2.0)}, (np.asarray([[1, 5, 2], [7, 0, 3]], np.float32),)),
    "split_pad_iota": (
        lambda p, x: (jnp.split(jnp.pad(x, ((0, 1), (2, 0)), constant_values=p["c"]), [1],
                                axis=1)[1] + jnp.arange(x.shape[1] + 1, dtype=jnp.float32)),
        {"c": np.float32(-1.0)}, (np.ones((2, 3), np.float32),)),
    "more_elementwise": (
        lambda p, x: (jnp.sin(x) * jnp.cos(x) + jnp.ceil(x) + jnp.exp2(x * p["s"])
                      + jax.lax.clamp(np.float32(-0.3), x, np.float32(0.7)) + jnp.square(x)
                      + jnp.where(~(x < 0) | (x > 1.5), 1.0, -1.0)),
        {"s": np.float32(0.5)}, (np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3),)),
    "scalar_output": (  # a loss: scalar literals must not make it [1]
        lambda p, x: (jnp.mean((x * p["w"]) ** 2) / 3.0, x * p["w"]),
        {"w": np.full((2, 3), 0.5, np.float32)},
        (np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),)),
    "calls_and_pass_through": (
        lambda p, x: (_cube(jax.checkpoint(lambda y: jnp.tanh(y) * p["w"])(x))
                      + jax.lax.stop_gradient(x) * x, p["w"]),
        {"w": np.float32(0.5)}, (np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),)),
}


@jax.custom_vjp
def _cube(x: Any) -> Any:
    return x * x * x


_cube.defvjp(lambda x: (x * x * x, x), lambda x, g: (3 * x * x * g,))


@pytest.mark.parametrize("case", list(PRIMITIVES), ids=list(PRIMITIVES))
def test_primitive_conversions(case: str, store: Store) -> None:
    apply, params, xs = PRIMITIVES[case]
    src = wj.from_pytree(params, label=case, apply=apply, example_inputs=xs)
    fn = from_snapshot(store.write(src, case))
    want = [np.asarray(w) for w in jax.tree_util.tree_leaves(apply(params, *xs))]
    got = fn(*xs)
    model = fill(src.attachments()[GRAPH_ATTACHMENT], dict(params))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, {f"input_{i}": x for i, x in enumerate(xs)})
    assert len(got) == len(want) == len(ort_out)
    for g, o, w in zip(got, ort_out, want, strict=True):
        assert np.asarray(g).dtype == w.dtype and o.dtype == w.dtype
        assert np.asarray(g).shape == w.shape
        assert rel(g, w) < 1e-5 and rel(o, w) < 1e-5


def test_log1p_expm1_and_softplus_keep_small_values(store: Store) -> None:
    """log1p and expm1 stay exact where 1 + x rounds to 1 (and softplus, which uses
    log1p(exp(-|x|)), in its far tail), and their gradients stay finite."""
    def apply(p: Any, x: Any) -> Any:
        # log1p of |x|: log1p is NaN below -1; expm1 down to exp(x) == 0
        return (jnp.log1p(jnp.abs(x) * p["s"]), jnp.log1p(-jnp.minimum(x * x, 0.5) * p["s"]),
                jnp.expm1(x * p["s"]), jax.nn.softplus(-30 * x))

    x = np.asarray([1e-8, -1e-9, 1e-10, 2e-3, 0.5, -0.75, 0.999, -200.0], np.float32)
    params = {"s": np.float32(1.0)}
    src = wj.from_pytree(params, label="tiny", apply=apply, example_inputs=(x,))
    fn = from_snapshot(store.write(src, "tiny"))
    model = fill(src.attachments()[GRAPH_ATTACHMENT], dict(params))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got in (fn(x), sess.run(None, {"input_0": x})):
        for g, w in zip(got, apply(params, x), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-30)
    grad = jax.grad(lambda v: sum(o.sum() for o in fn.apply(fn.weights, v)))(x)
    want = jax.grad(lambda v: sum(o.sum() for o in apply(params, v)))(x)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("apply", "why"), [
    (lambda p, x: ~(x + p["s"]), "bitwise not of integers"),
    (lambda p, x: jax.lax.reduce_window(x + p["s"], 0, jax.lax.add, (2,), (1,), "VALID"),
     "window reduction of int32"),
], ids=["int_not", "int_pooling"])
def test_integer_operations_onnx_cannot_express_are_refused(apply: Any, why: str) -> None:
    x = np.asarray([-3, 0, 4], np.int32)
    with pytest.raises(UnsupportedError, match=why):
        wj.from_pytree({"s": np.int32(1)}, apply=apply, example_inputs=(x,))


# ---- bad input ---------------------------------------------------------------------


def test_unsupported_primitive_is_refused_before_writing(store: Store) -> None:
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), np.ones((2, 3), np.float32))
    before = store.snapshots()
    with pytest.raises(UnsupportedError, match=r"sorter: cannot export the graph to ONNX: "
                                               r"JAX primitive 'sort' is not supported"):
        src = wj.from_pytree(params, label="sorter",
                             apply=lambda p, x: jnp.sort(model.apply(p, x), axis=-1),
                             example_inputs=(np.ones((2, 3), np.float32),))
        store.write(src, "sorter")
    assert store.snapshots() == before
    assert "sort" not in SUPPORTED


def test_transposed_convolution_is_refused() -> None:
    model = nn.ConvTranspose(2, (3, 3), strides=(2, 2))
    x = np.ones((1, 4, 4, 1), np.float32)
    params = model.init(jax.random.key(0), x)
    with pytest.raises(UnsupportedError, match=r"'conv_general_dilated'.*lhs_dilation"):
        wj.from_pytree(params, apply=model.apply, example_inputs=(x,))


def test_params_that_do_not_fit_the_apply_function() -> None:
    params = nn.Dense(4).init(jax.random.key(0), np.ones((2, 3), np.float32))
    with pytest.raises(UnsupportedError, match=r"dense: cannot trace apply\(params, "
                                               r"\*example_inputs\): .*"):
        wj.from_pytree(params, label="dense", apply=nn.Dense(4).apply,
                       example_inputs=(np.ones((2, 5), np.float32),))
    with pytest.raises(UnsupportedError, match=r"cannot trace"):
        wj.from_pytree({"params": {"Other_0": params["params"]}}, label="dense",
                       apply=nn.Dense(4).apply, example_inputs=(np.ones((2, 3), np.float32),))


def test_missing_example_inputs_or_apply() -> None:
    params = nn.Dense(4).init(jax.random.key(0), np.ones((2, 3), np.float32))
    with pytest.raises(UnsupportedError, match=r"needs both apply and example_inputs; "
                                               r"example_inputs is missing"):
        wj.from_pytree(params, label="dense", apply=nn.Dense(4).apply)
    with pytest.raises(UnsupportedError, match=r"apply is missing"):
        wj.from_pytree(params, label="dense", example_inputs=(np.ones((2, 3)),))
    with pytest.raises(UnsupportedError, match=r"example input 0 is a str"):
        wj.from_pytree(params, label="dense", apply=nn.Dense(4).apply, example_inputs=("x",))


def test_nnx_module_with_apply_is_refused() -> None:
    nnx = pytest.importorskip("flax.nnx")
    layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(UnsupportedError, match=r"Linear: exporting the graph of an NNX "
                                               r"module is not supported"):
        wj.from_pytree(layer, apply=lambda m, x: m(x),
                       example_inputs=(np.ones((2, 3), np.float32),))


def test_without_apply_nothing_is_attached() -> None:
    params = nn.Dense(4).init(jax.random.key(0), np.ones((2, 3), np.float32))
    assert wj.from_pytree(params).attachments() == {}
