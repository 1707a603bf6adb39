"""Flax recurrent cells (Linen and NNX) against PyTorch's LSTM and GRU.

The references: each framework's own parameter count and leaves (round trips are
bit-for-bit), and PyTorch's ``nn.LSTM``/``nn.GRU`` with the same weights, moved by the
test itself gate by gate; the two forward passes must agree before the snapshots are
compared, so the mapping the comparison is checked against is known to be right.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from weightatlas.adapters import jax as wj
from weightatlas.core.compare import compare

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
torch = pytest.importorskip("torch")

from weightatlas.adapters import torch as wt  # noqa: E402

IN, H, T, B = 5, 6, 7, 3
LSTM_GATES = "ifgo"  # torch stacks i, f, g, o in weight_ih/weight_hh; Flax names i, f, g, o
GRU_GATES = "rzn"  # torch stacks r, z, n; Flax names r, z, n


def leaves(tree: object) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def flat(tree: dict, prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, (*prefix, k)))
        else:
            out["/".join((*prefix, k))] = np.asarray(v)
    return out


def attrs(snap, name: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(snap.info(name).attrs)


def inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((B, T, IN)).astype(np.float32)


def torch_rnn(cls: type, zero: str | None = None, rows: slice = slice(None)):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = cls(IN, H, batch_first=True).eval()
    if zero is not None:  # a bias Flax cannot hold separately (see each test)
        with torch.no_grad():
            getattr(model, zero)[rows] = 0
    return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def block(w: np.ndarray, g: int) -> np.ndarray:
    return w[g * H:(g + 1) * H]


@pytest.mark.parametrize("cell", ["LSTMCell", "OptimizedLSTMCell", "GRUCell", "MGUCell",
                                  "SimpleCell"])
def test_linen_cells_are_recurrent_per_gate_and_round_trip(store, cell):
    rnn = nn.RNN(getattr(nn, cell)(H), name="encoder")
    variables = rnn.init(jax.random.key(0), inputs())
    snap = store.write(wj.from_pytree(variables), cell)
    assert snap.metadata["n_params"] == sum(x.size for x in leaves(variables))
    params = flat(variables["params"])
    assert len(snap) == len(params)
    expected_cell = {"LSTMCell": "lstm", "OptimizedLSTMCell": "lstm", "GRUCell": "gru",
                     "MGUCell": "mgu", "SimpleCell": "rnn"}[cell]
    for source, value in params.items():
        name = source.replace("/", ".")
        info, a = snap.info(name), attrs(snap, name)
        gate_module = source.split("/")[-2]  # ii, hf, ... (i, h for SimpleCell)
        assert info.kind == "recurrent"
        assert (a["cell"], a["from"], a["hidden_size"]) == (
            expected_cell, "input" if gate_module[0] == "i" else "hidden", H)
        assert a["gate"] == (gate_module[1:] or "h")
        assert "gates" not in a  # a per-gate tensor, not a stacked one
        got = snap.read(name, layout="source")
        assert got.dtype == value.dtype and np.array_equal(got, value)
        if value.ndim == 2:  # [in, out] -> [out, in]
            assert (info.layout, info.source_layout) == (("out", "in"), ("in", "out"))
            assert np.array_equal(snap.read(name), value.T)
    back = wj.to_pytree(snap)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)


def test_cells_are_found_by_structure_whatever_their_names(store):
    model = nn.Bidirectional(nn.RNN(nn.LSTMCell(H)), nn.RNN(nn.GRUCell(H)))
    variables = model.init(jax.random.key(0), inputs())
    snap = store.write(wj.from_pytree(variables), "bi")
    kinds = {r["name"]: r["kind"] for r in snap.tensors().to_pylist()}
    assert len(kinds) == (8 + 4) + (6 + 4) and set(kinds.values()) == {"recurrent"}
    assert attrs(snap, "backward_rnn.cell.hz.kernel")["gate"] == "z"
    # two Dense layers called i and h outside anything recurrent stay linear
    plain = {"params": {"mlp": {"i": {"kernel": np.ones((3, 4), np.float32)},
                                "h": {"kernel": np.ones((4, 4), np.float32)}}}}
    assert {r.kind for r in wj.from_pytree(plain).records()} == {"linear"}


def test_torch_lstm_and_linen_lstmcell_with_the_same_weights_align_gate_by_gate(store):
    # torch: gates = W_ih x + b_ih + W_hh h + b_hh, rows stacked i, f, g, o.
    # Flax LSTMCell: one Dense per gate, ii..io without bias, hi..ho with one bias, so
    # Flax's bias is b_ih + b_hh; with b_ih = 0 it is b_hh exactly.
    model, sd = torch_rnn(torch.nn.LSTM, zero="bias_ih_l0")
    cell: dict = {}
    for g, gate in enumerate(LSTM_GATES):
        cell[f"i{gate}"] = {"kernel": block(sd["weight_ih_l0"], g).T.copy()}
        cell[f"h{gate}"] = {"kernel": block(sd["weight_hh_l0"], g).T.copy(),
                            "bias": block(sd["bias_ih_l0"] + sd["bias_hh_l0"], g).copy()}
    variables = {"params": {"cell": cell}}
    x = inputs()
    flax_out = np.asarray(nn.RNN(nn.LSTMCell(H)).apply(variables, x))
    torch_out = model(torch.from_numpy(x))[0].detach().numpy()
    np.testing.assert_allclose(flax_out, torch_out, atol=1e-5)  # the mapping is right

    a = store.write(wt.from_module(model), "torch-lstm")
    b = store.write(wj.from_pytree(variables), "flax-lstm")
    assert a.metadata["n_params"] == sum(p.numel() for p in model.parameters())
    assert b.metadata["n_params"] == sum(x.size for x in leaves(variables))
    result = compare(a, b)
    assert not result.unmatched_b  # every Flax tensor found its rows in torch's
    assert set(result.unmatched_a) == {"bias_ih_l0"}  # zeros Flax has no place for
    rows = {(r["b"]): r for r in result.records()}
    assert len(rows) == 12
    for g, gate in enumerate(LSTM_GATES):
        for src, whole in (("i", "weight_ih_l0"), ("h", "weight_hh_l0"), ("h", "bias_hh_l0")):
            param = "bias" if whole.startswith("bias") else "kernel"
            r = rows[f"cell.{src}{gate}.{param}"]
            assert (r["a"], r["a_rows"]) == (whole, [g * H, (g + 1) * H])
            assert r["max_abs_diff"] == 0.0 and r["cosine"] == pytest.approx(1.0, abs=1e-12)
            assert r["verdict"] == "identical"


def test_torch_gru_and_linen_grucell_align_gate_by_gate(store):
    # torch: r, z = sigma(W_i x + b_i + W_h h + b_h); n = tanh(W_in x + b_in + r*(W_hn h + b_hn)).
    # Linen GRUCell: ir, iz, in with bias; hr, hz without; hn with bias. So Flax's ir bias
    # is b_ir + b_hr (likewise z); with b_hr = b_hz = 0 every Flax bias is a torch row block.
    model, sd = torch_rnn(torch.nn.GRU, zero="bias_hh_l0", rows=slice(0, 2 * H))
    cell: dict = {}
    for g, gate in enumerate(GRU_GATES):
        cell[f"i{gate}"] = {"kernel": block(sd["weight_ih_l0"], g).T.copy(),
                            "bias": block(sd["bias_ih_l0"], g).copy()}
        cell[f"h{gate}"] = {"kernel": block(sd["weight_hh_l0"], g).T.copy()}
    cell["hn"]["bias"] = block(sd["bias_hh_l0"], 2).copy()
    variables = {"params": {"cell": cell}}
    x = inputs()
    flax_out = np.asarray(nn.RNN(nn.GRUCell(H)).apply(variables, x))
    np.testing.assert_allclose(flax_out, model(torch.from_numpy(x))[0].detach().numpy(),
                               atol=1e-5)
    a = store.write(wt.from_module(model), "torch-gru")
    b = store.write(wj.from_pytree(variables), "flax-gru")
    result = compare(a, b)
    # torch's bias_hh holds three gates, Flax has a hidden bias for n only: the aligner
    # pairs a stacked tensor with a complete set of gates, so both stay listed unmatched
    assert (set(result.unmatched_a), set(result.unmatched_b)) == ({"bias_hh_l0"},
                                                                  {"cell.hn.bias"})
    rows = {r["b"]: r for r in result.records()}
    for g, gate in enumerate(GRU_GATES):
        for src, whole in (("i", "weight_ih_l0"), ("h", "weight_hh_l0"), ("i", "bias_ih_l0")):
            param = "bias" if whole.startswith("bias") else "kernel"
            r = rows[f"cell.{src}{gate}.{param}"]
            assert (r["a"], r["a_rows"], r["max_abs_diff"]) == (whole, [g * H, (g + 1) * H], 0.0)


def test_nnx_fused_cells_are_whole_like_torch_and_compare_equal(store):
    # NNX OptimizedLSTMCell: dense_i [in, 4H] (no bias) and dense_h [H, 4H] (bias),
    # gates side by side in Flax's split order i, f, g, o (torch's too): the kernels are
    # torch's weight_ih / weight_hh transposed, the bias b_ih + b_hh (= b_hh, b_ih zeroed).
    model, sd = torch_rnn(torch.nn.LSTM, zero="bias_ih_l0")
    cell = nnx.OptimizedLSTMCell(IN, H, rngs=nnx.Rngs(0))
    cell.dense_i.kernel[...] = sd["weight_ih_l0"].T
    cell.dense_h.kernel[...] = sd["weight_hh_l0"].T
    cell.dense_h.bias[...] = sd["bias_ih_l0"] + sd["bias_hh_l0"]
    rnn = nnx.RNN(cell)
    x = inputs()
    np.testing.assert_allclose(np.asarray(rnn(x)), model(torch.from_numpy(x))[0].detach().numpy(),
                               atol=1e-5)
    snap = store.write(wj.from_pytree(rnn), "nnx-lstm")
    params = nnx.state(rnn, nnx.Param)
    assert snap.metadata["n_params"] == sum(x.size for x in leaves(params))
    info, a = snap.info("cell.dense_i.kernel"), attrs(snap, "cell.dense_i.kernel")
    assert (info.kind, info.shape, info.layout) == ("recurrent", (4 * H, IN), ("gates_out", "in"))
    assert (a["gates"], a["gate_axis"], a["from"], a["hidden_size"]) == (
        ["i", "f", "g", "o"], 0, "input", H)
    assert np.array_equal(snap.read("cell.dense_h.kernel", layout="source"),
                          np.asarray(cell.dense_h.kernel[...]))
    result = compare(store.write(wt.from_module(model), "torch-lstm"), snap)
    assert set(result.unmatched_a) == {"bias_ih_l0"} and not result.unmatched_b
    pairs = {r["a"]: (r["b"], r["method"], r["max_abs_diff"]) for r in result.records()}
    assert pairs == {"weight_ih_l0": ("cell.dense_i.kernel", "hash", 0.0),
                     "weight_hh_l0": ("cell.dense_h.kernel", "hash", 0.0),
                     "bias_hh_l0": ("cell.dense_h.bias", "hash", 0.0)}


def test_nnx_gru_and_per_gate_lstm_cells(store):
    # NNX GRUCell has no hidden bias at all (n = tanh(W_in x + b_in + r * W_hn h)), so it
    # equals torch's GRU when torch's bias_hh is zero; dense_i's bias is then b_ih.
    model, sd = torch_rnn(torch.nn.GRU, zero="bias_hh_l0")
    gru = nnx.GRUCell(IN, H, rngs=nnx.Rngs(0))
    gru.dense_i.kernel[...] = sd["weight_ih_l0"].T
    gru.dense_i.bias[...] = sd["bias_ih_l0"]
    gru.dense_h.kernel[...] = sd["weight_hh_l0"].T
    x = inputs()
    np.testing.assert_allclose(np.asarray(nnx.RNN(gru)(x)),
                               model(torch.from_numpy(x))[0].detach().numpy(), atol=1e-5)
    snap = store.write(wj.from_pytree(nnx.RNN(gru)), "nnx-gru")
    assert attrs(snap, "cell.dense_h.kernel")["gates"] == ["r", "z", "n"]
    result = compare(store.write(wt.from_module(model), "torch-gru"), snap)
    assert set(result.unmatched_a) == {"bias_hh_l0"} and not result.unmatched_b
    assert {r["verdict"] for r in result.records()} == {"identical"}

    lstm = nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0)))
    snap = store.write(wj.from_pytree(lstm), "nnx-lstm-gates")
    a = attrs(snap, "cell.if_.kernel")  # NNX's name for the input->forget gate
    assert (a["gate"], a["from"], a["cell"]) == ("f", "input", "lstm")
    assert snap.metadata["n_params"] == sum(x.size for x in leaves(nnx.state(lstm, nnx.Param)))
    back = wj.to_pytree(snap)["params"]["cell"]
    for name in ("ii", "if_", "hg"):
        original = np.asarray(getattr(lstm.cell, name).kernel[...])
        assert np.array_equal(back[name]["kernel"], original)

    simple = nnx.RNN(nnx.SimpleCell(IN, H, rngs=nnx.Rngs(0)))
    recs = {r.name: r for r in wj.from_pytree(simple).records()}
    assert {r.kind for r in recs.values()} == {"recurrent"}
    assert (recs["cell.dense_h.kernel"].attrs["gates"], recs["cell.dense_h.kernel"].shape) == (
        ["h"], (H, H))
