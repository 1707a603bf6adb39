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
