"""JAX in: Flax Linen and NNX, Equinox, plain pytrees; layouts canonical, sources exact.

The models are built here (a Flax transformer and a CNN trained a few steps on
scikit-learn's digits); each framework's own leaf counts and values are the references.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from weightatlas.adapters import jax as wj
from weightatlas.errors import FormatError, UnsupportedError

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")

from tests import framework_models as fm  # noqa: E402


def leaves(tree: object) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def flax_transformer() -> dict:
    return fm.transformer_to_flax(fm.torch_transformer(seed=3))


@pytest.fixture(scope="module")
def trained_cnn() -> tuple[dict, float]:
    return fm.train_flax_cnn()


def test_linen_transformer_round_trips_with_canonical_layouts(store, flax_transformer):
    variables = flax_transformer
    snap = store.write(wj.from_pytree(variables), "flax-tr")
    assert snap.metadata["n_params"] == sum(x.size for x in leaves(variables))
    rows = {r["name"]: r for r in snap.tensors().to_pylist()}
    q = rows["layers_0.self_attn.query.kernel"]
    assert (q["kind"], q["layout"], q["source_layout"]) == (
        "attention", ["heads", "head_dim", "in"], ["in", "heads", "head_dim"])
    out = rows["layers_0.self_attn.out.kernel"]
    assert out["layout"] == ["out", "heads", "head_dim"] and out["shape"] == [32, 4, 8]
    dense = rows["layers_0.linear1.kernel"]
    assert (dense["kind"], dense["shape"], dense["source_shape"]) == ("linear", [64, 32], [32, 64])
    assert rows["tok.embedding"]["kind"] == "embedding"
    assert rows["layers_1.norm2.scale"]["kind"] == "norm"
    assert rows["head.bias"]["kind"] == "linear"
    params = variables["params"]
    kernel = params["layers_0"]["linear1"]["kernel"]
    assert np.array_equal(snap.read("layers_0.linear1.kernel"), kernel.T)
    assert np.array_equal(snap.read("layers_0.linear1.kernel", layout="source"), kernel)
    qk = params["layers_0"]["self_attn"]["query"]["kernel"]
    assert np.array_equal(snap.read("layers_0.self_attn.query.kernel"), qk.transpose(1, 2, 0))
    back = wj.to_pytree(snap)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for x, y in zip(leaves(back), leaves(variables), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_trained_cnn_layouts_and_msgpack_file(tmp_path, store, trained_cnn):
    from flax import serialization

    variables, accuracy = trained_cnn
    assert accuracy > 0.5  # it learnt something from digits in a few steps
    path = tmp_path / "cnn.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    reference = serialization.msgpack_restore(path.read_bytes())
    src = wj.read(path)
    records = {r.name: r for r in src.records()}
    kernel = reference["params"]["Conv_1"]["kernel"]  # HWIO [3, 3, 8, 16]
    r = records["Conv_1.kernel"]
    assert (r.kind, r.shape, r.layout) == ("conv2d", (16, 8, 3, 3), ("out", "in", "h", "w"))
    assert np.array_equal(r.data, kernel.transpose(3, 2, 0, 1))
    assert not r.data.flags.writeable and not r.data.flags.owndata  # a view of the file
    snap = store.write(src, "cnn")
    back = wj.to_pytree(snap)
    for x, y in zip(leaves(back), leaves(reference), strict=True):
        assert np.array_equal(x, y)
    import hashlib

    assert snap.metadata["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert snap.metadata["framework"] == "jax"


def test_train_state_checkpoint_keeps_params_and_step(tmp_path, trained_cnn):
    from flax import serialization

    variables, _ = trained_cnn
    state = {"step": 30, "params": variables["params"],
             "opt_state": {"mu": variables["params"], "count": np.int32(30)}}
    path = tmp_path / "state.msgpack"
    path.write_bytes(serialization.to_bytes(state))
    src = wj.read(path)
    assert src.metadata()["step"] == 30 and src.metadata()["other_keys"] == ["opt_state", "step"]
    # (jax.tree_util rebuilt the trained params with sorted keys: that is the file's order)
    assert [r.name for r in src.records()] == ["Conv_0.bias", "Conv_0.kernel", "Conv_1.bias",
                                              "Conv_1.kernel", "Dense_0.bias", "Dense_0.kernel"]


def test_chunked_msgpack_arrays_are_joined(tmp_path, monkeypatch):
    from flax import serialization

    big = np.arange(5000, dtype=np.float32).reshape(50, 100)
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 4096)
    raw = serialization.to_bytes({"Dense_0": {"kernel": big}})
    assert b"__msgpack_chunked_array__" in raw
    (tmp_path / "big.msgpack").write_bytes(raw)
    rec = next(wj.read(tmp_path / "big.msgpack").records())
    assert np.array_equal(rec.data, big.T)


def test_nnx_module(store):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(3, 8, (3, 3), feature_group_count=1, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.att = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
            self.fc = nnx.Linear(8, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    net = Net(nnx.Rngs(0, dropout=1))
    snap = store.write(wj.from_pytree(net), "nnx")
    params = nnx.state(net, nnx.Param)
    stats = nnx.state(net, nnx.BatchStat)
    assert snap.metadata["n_params"] == sum(x.size for x in leaves(params) + leaves(stats))
    assert snap.metadata["source"]["skipped_leaves"] == 2  # the dropout's RNG key and count
    info = snap.info("conv.kernel")
    assert (info.kind, info.shape) == ("conv2d", (8, 3, 3, 3))
    assert np.array_equal(snap.read("conv.kernel", layout="source"), np.asarray(net.conv.kernel))
    assert snap.info("att.query.kernel").layout == ("heads", "head_dim", "in")
    assert json.loads(snap.info("bn.mean").attrs)["collection"] == "batch_stats"
    assert snap.info("fc.kernel").shape == (4, 8)


def test_equinox_module_keeps_pytorch_layouts(store):
    import equinox as eqx

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    model = [eqx.nn.Conv2d(3, 4, 3, key=k1), eqx.nn.Linear(4, 2, key=k2),
             eqx.nn.Embedding(10, 4, key=k3), eqx.nn.LayerNorm(4),
             eqx.nn.MultiheadAttention(2, 8, key=k4), jax.nn.relu]

    class Wrap(eqx.Module):
        layers: list

    src = wj.from_pytree(Wrap(model))
    snap = store.write(src, "eqx")
    arrays = leaves(eqx.filter(Wrap(model), eqx.is_array))
    assert snap.metadata["n_params"] == sum(x.size for x in arrays)
    conv_b = snap.info("layers.0.bias")
    assert (conv_b.shape, conv_b.source_shape, conv_b.kind) == ((4,), (4, 1, 1), "conv2d")
    assert snap.read("layers.0.bias", layout="source").shape == (4, 1, 1)
    assert snap.info("layers.0.weight").layout == ("out", "in", "h", "w")
    assert snap.info("layers.1.weight").kind == "linear"
    assert snap.info("layers.2.weight").kind == "embedding"
    assert snap.info("layers.3.weight").kind == "norm"
    assert snap.info("layers.4.query_proj.weight").kind == "attention"
    assert np.array_equal(snap.read("layers.1.weight"), np.asarray(model[1].weight))


def test_plain_dicts_and_pytrees(store):
    tree = {"encoder": {"w": np.ones((3, 2), np.float32), "kernel": np.ones((3, 2), np.float32)},
            "blocks": [np.zeros(4, np.float16), np.zeros((2, 2), np.int32)], "step": 7}
    src = wj.from_pytree(tree)
    recs = {r.name: r for r in src.records()}
    assert recs["encoder.kernel"].shape == (2, 3) and recs["encoder.kernel"].kind == "linear"
    assert recs["encoder.w"].kind == "other" and recs["encoder.w"].shape == (3, 2)
    assert list(recs) == ["encoder.w", "encoder.kernel", "blocks.0", "blocks.1"]
    assert src.metadata()["skipped_examples"] == ["step"]
    nt = wj.from_pytree((np.ones(2), {"a": np.zeros(3)}))
    assert [r.name for r in nt.records()] == ["0", "1.a"]
    with pytest.raises(UnsupportedError, match="got one array"):
        wj.from_pytree(np.ones(3))
    with pytest.raises(FormatError,
                       match=r"dict: 'a\.b/c' and 'a/b\.c' both become tensor 'a\.b\.c'"):
        wj.from_pytree({"a": {"b.c": np.ones(1)}, "a.b": {"c": np.ones(1)}})
    bf = wj.from_pytree({"x": jax.numpy.ones((2, 2), jax.numpy.bfloat16)})
    assert next(bf.records()).dtype == "bfloat16"


def conv_transpose_pair(transpose_kernel: bool, cin: int = 3, cout: int = 5):  # type: ignore[no-untyped-def]
    """A torch ConvTranspose2d and the Flax variables of the same layer, mapped by hand.

    torch: weight [in, out, kh, kw], the gradient of a convolution, padding p. Flax:
    padding ((k-1-p, k-1-p),) * 2 on the dilated input gives the same size. With
    transpose_kernel=True the kernel is [kh, kw, out, in], applied as torch applies its
    weight; by default it is [kh, kw, in, out] and correlated unflipped, so it is torch's
    weight reversed on both spatial axes.
    """
    import flax.linen as fnn
    import torch

    k, s, p = 3, 2, 1
    torch.manual_seed(4)
    layer = torch.nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p).eval()
    w = layer.weight.detach().numpy()
    kernel = (w.transpose(2, 3, 1, 0) if transpose_kernel
              else w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))

    class Up(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            return fnn.ConvTranspose(cout, (k, k), strides=(s, s), padding=[(k - 1 - p,) * 2] * 2,
                                     transpose_kernel=transpose_kernel)(x)

    variables = {"params": {"ConvTranspose_0": {"kernel": np.ascontiguousarray(kernel),
                                                "bias": layer.bias.detach().numpy().copy()}}}
    return layer, Up(), variables


@pytest.mark.parametrize("transpose_kernel", [True, False], ids=["transpose_kernel", "default"])
def test_conv_transpose_kernels_map_to_torchs_layout(store, transpose_kernel):
    import torch

    from weightatlas.adapters import torch as wt
    from weightatlas.core.compare import compare

    layer, up, variables = conv_transpose_pair(transpose_kernel)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ours = np.asarray(up.apply(variables, x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, layer(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    a = store.write(wt.from_module(layer), "torch-up")
    b = store.write(wj.from_pytree(variables), "flax-up")
    info = b.info("ConvTranspose_0.kernel")
    assert (info.kind, info.layout, info.shape) == ("conv_transpose", ("in", "out", "h", "w"),
                                                    (3, 5, 3, 3))
    attrs = json.loads(info.attrs)
    assert attrs["transpose_kernel"] is transpose_kernel and "transpose_kernel_known" not in attrs
    assert attrs.get("flip") == (None if transpose_kernel else ["h", "w"])
    assert np.array_equal(b.read("ConvTranspose_0.kernel"), layer.weight.detach().numpy())
    original = variables["params"]["ConvTranspose_0"]["kernel"]
    back = wj.to_pytree(b)["params"]["ConvTranspose_0"]["kernel"]
    assert back.shape == original.shape and np.array_equal(back, original)
    assert np.array_equal(b.read("ConvTranspose_0.kernel", layout="source"), original)
    result = compare(a, b)
    assert result.complete and {r["verdict"] for r in result.records()} == {"identical"}
    pair = next(r for r in result.records() if r["a"] == "weight")
    assert (pair["b"], pair["max_abs_diff"]) == ("ConvTranspose_0.kernel", 0.0)


def test_conv_transpose_kernel_when_shapes_cannot_tell(store):
    from flax import nnx

    _, _, variables = conv_transpose_pair(True, cin=4, cout=4)  # in == out: ambiguous
    src = wj.from_pytree(variables)
    attrs = next(src.records()).attrs
    assert (attrs["transpose_kernel"], attrs["transpose_kernel_known"]) == (False, False)
    told = wj.from_pytree(variables, transposed={"ConvTranspose_0"})
    rec = next(told.records())
    assert rec.attrs["transpose_kernel"] is True and "flip" not in rec.attrs
    kernel = variables["params"]["ConvTranspose_0"]["kernel"]
    assert np.array_equal(rec.data, kernel.transpose(3, 2, 0, 1))
    for tk in (False, True):  # NNX modules say which they are
        module = nnx.ConvTranspose(4, 4, (3, 3), transpose_kernel=tk, rngs=nnx.Rngs(0))
        rec = next(r for r in wj.from_pytree(module).records() if r.name == "kernel")
        assert (rec.kind, rec.attrs["transpose_kernel"]) == ("conv_transpose", tk)
        source = np.asarray(module.kernel[...])
        expected = source.transpose(3, 2, 0, 1) if tk else source[::-1, ::-1].transpose(2, 3, 0, 1)
        assert np.array_equal(rec.data, expected)


def test_nnx_attention_aligns_with_torch_multihead_attention(store):
    import torch
    from flax import nnx

    from weightatlas.adapters import torch as wt
    from weightatlas.core.compare import compare

    dim, heads = 16, 4
    torch.manual_seed(5)
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    w, b = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    att = nnx.MultiHeadAttention(heads, dim, dim, dim, decode=False, rngs=nnx.Rngs(0))
    for j, proj in enumerate((att.query, att.key, att.value)):  # in_proj rows are q, k, v
        proj.kernel[...] = w[j * dim:(j + 1) * dim].T.reshape(dim, heads, dim // heads)
        proj.bias[...] = b[j * dim:(j + 1) * dim].reshape(heads, dim // heads)
    att.out.kernel[...] = mha.out_proj.weight.detach().numpy().T.reshape(heads, dim // heads, dim)
    att.out.bias[...] = mha.out_proj.bias.detach().numpy()
    x = np.random.default_rng(1).standard_normal((2, 5, dim)).astype(np.float32)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(np.asarray(att(x)), mha(xt, xt, xt, need_weights=False)[0]
                               .detach().numpy(), atol=1e-5)
    a = store.write(wt.from_module(mha), "torch-mha")
    b_snap = store.write(wj.from_pytree(att), "nnx-mha")
    q = b_snap.info("query.kernel")
    assert (q.kind, q.layout, q.source_layout, q.shape) == (
        "attention", ("heads", "head_dim", "in"), ("in", "heads", "head_dim"), (4, 4, 16))
    assert b_snap.info("out.kernel").layout == ("out", "heads", "head_dim")
    result = compare(a, b_snap)
    assert result.complete, result.summary()
    rows = {r["a"]: r for r in result.records()}
    assert (rows["q_proj.weight"]["b"], rows["q_proj.weight"]["transform"]) == (
        "query.kernel", "reshape")
    assert rows["v_proj.bias"]["b"] == "value.bias" and rows["out_proj.weight"]["b"] == "out.kernel"
    assert {r["verdict"] for r in rows.values()} == {"identical"}
