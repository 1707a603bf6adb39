"""Cross-model and cross-framework comparison: alignment, differences, verdicts, outputs.

The references: numpy float64 for every metric; the same weights moved between PyTorch,
Flax, safetensors and ONNX by the test itself (so alignment must be complete and the
differences zero); two seeds of one architecture (real differences); two training
steps of the digits MLP (the trajectory case).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import weightatlas as wa
from weightatlas.adapters import safetensors
from weightatlas.core._compare_casts import bfloat16_bits
from weightatlas.core.compare import PAIR_SCHEMA, compare, diff
from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import RecordsSource, TensorRecord

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

from tests import framework_models as fm  # noqa: E402
from weightatlas.adapters import jax as wj  # noqa: E402
from weightatlas.adapters import torch as wt  # noqa: E402


def reference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = a64 - b64
    return (float(np.abs(d).max()), float(np.linalg.norm(d) / np.linalg.norm(a64)),
            float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64))))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
       block=st.integers(1, 50), transpose=st.booleans(), seed=st.integers(0, 2**16))
def test_metrics_match_numpy_float64(shape, dtype, block, transpose, seed):
    rng = np.random.default_rng(seed)
    kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    a = rng.normal(size=shape).astype(kind)
    b = (a.astype(np.float64) + rng.normal(scale=0.1, size=shape)).astype(kind)
    if transpose and a.ndim > 1:  # strided views are read row block by row block
        a, b = a.T, b.T
    s = diff(a, b, block=block)
    want = reference(a, b)
    # float64 pairs are computed in float64; narrower ones in float32 (module docstring)
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert s.max_abs_diff == pytest.approx(want[0], rel=min(tol, 1e-7), abs=0)
    assert s.rel_l2 == pytest.approx(want[1], rel=tol)
    assert s.cosine == pytest.approx(want[2], rel=tol)


def finite_reference(a: np.ndarray, b: np.ndarray) -> dict[str, float | int | None]:
    """The metrics in float64 over the positions where both values are finite."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    both = np.isfinite(a64) & np.isfinite(b64)
    mismatched = ~both & ~((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    x, y = a64[both], b64[both]
    na, nb, nd = np.linalg.norm(x), np.linalg.norm(y), np.linalg.norm(x - y)
    return {"max_abs_diff": float(np.abs(x - y).max()) if x.size else 0.0,
            "rel_l2": float(nd / na) if na else (0.0 if nd == 0 else np.inf),
            "cosine": float(x @ y / (na * nb)) if na and nb else None,
            "n_nonfinite": int(mismatched.sum())}


def _pair(kind, n, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    return a.astype(kind), (a * (1 + noise * rng.standard_normal(n))).astype(kind)


def _nonfinite(kind):
    a, b = _pair(kind, 5003, 1e-2)
    a, b = a.copy(), b.copy()
    a[[0, 17, 4000]] = [np.nan, np.inf, -np.inf]
    b[[0, 17, 4001, 5002]] = [np.nan, 1.0, np.inf, np.nan]  # NaN/NaN is no mismatch
    return a, b


BF16 = ml_dtypes.bfloat16
PAIRS = {  # name -> (a, b, verdict)
    "float32 noise": (*_pair(np.float32, 10007), "changed"),
    "float16 noise": (*_pair(np.float16, 10007, 1e-2), "changed"),
    "bfloat16 noise": (*_pair(BF16, 10007, 1e-1), "changed"),
    "float32 vs bfloat16": (_pair(np.float32, 10007)[0], _pair(BF16, 10007, 1e-1)[1],
                            "changed"),
    "bfloat16 round trip": (_pair(np.float32, 10007)[0],
                            _pair(np.float32, 10007)[0].astype(BF16).astype(np.float32),
                            "cast_bfloat16"),
    "float16 copy": (_pair(np.float32, 4099)[0], _pair(np.float32, 4099)[0].astype(np.float16),
                     "cast_float16"),
    "constant, 2 ulp apart": (np.full(10007, 0.1, np.float32),
                              np.full(10007, np.float32(0.1) + 2 * np.spacing(np.float32(0.1))),
                              "rounding"),
    "constant, changed": (np.full(10007, 0.1, np.float32), np.full(10007, 0.1001, np.float32),
                          "changed"),
    "unrelated": (_pair(np.float32, 10007)[0], _pair(np.float32, 10007, seed=1)[0], "changed"),
    "zeros against values": (np.zeros(3001, np.float32), _pair(np.float32, 3001)[0],
                             "changed"),
    "zeros": (np.zeros(3001, np.float16), np.zeros(3001, np.float16), "identical"),
    "non-finite float32": (*_nonfinite(np.float32), "changed"),
    "non-finite bfloat16": (*_nonfinite(BF16), "changed"),
    "squares beyond float32": (_pair(np.float32, 3001)[0] * np.float32(1e25),
                               _pair(np.float32, 3001)[1] * np.float32(1e25), "changed"),
}


@pytest.mark.parametrize("block", [7, 1000, 1024, 4099, 1 << 16])
@pytest.mark.parametrize("name", list(PAIRS))
def test_single_pass_metrics_match_numpy_float64(name, block):
    """Every metric against float64 NumPy, across piece boundaries (sizes not multiples)."""
    a, b, verdict = PAIRS[name]
    s = diff(a, b, block=block)
    want = finite_reference(a, b)
    assert s.max_abs_diff == pytest.approx(want["max_abs_diff"], rel=1e-7, abs=0)
    assert s.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-6, abs=0)
    if want["cosine"] is None:
        assert s.cosine is None
    else:
        assert s.cosine == pytest.approx(want["cosine"], rel=1e-6, abs=1e-9)
    assert s.n_nonfinite == want["n_nonfinite"]
    assert s.verdict == verdict


@pytest.mark.parametrize("block", [7, 1000, 1024, 1 << 16])
def test_every_piece_must_fit_the_verdict(block):
    """A verdict holds for every value, whichever piece it is in: a bfloat16 cast in the
    first half and 1-ulp noise in the second is neither (the rounding bound used to be
    checked only on pieces after the casts had failed), and a cast of half the values
    is no cast (pieces without differences used to go unchecked)."""
    a = _pair(np.float32, 2048)[0]
    half = a[:1024].astype(BF16).astype(np.float32)
    nudged = np.nextafter(a[1024:], np.float32(np.inf))
    assert diff(a, np.concatenate([half, nudged]), block=block).verdict == "changed"
    assert diff(a, np.concatenate([a[:1024], nudged]), block=block).verdict == "rounding"
    assert diff(a, np.concatenate([half, a[1024:]]), block=block).verdict == "changed"
    assert diff(np.concatenate([a[:1024], half]), a, block=block).verdict == "changed"
    cast = a.astype(BF16).astype(np.float32)
    assert diff(a, cast, block=block).verdict == "cast_bfloat16"
    assert diff(cast, a, block=block).verdict == "cast_bfloat16"  # either side


def test_bfloat16_rounding_by_bits_is_the_cast():
    """Integer round-to-nearest-even against ml_dtypes on bit patterns, ties included."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway
    near_max = np.arange(0x7F7F0000, 0x7F800000, 97, dtype=np.uint32)  # overflow to inf
    x = np.concatenate([bits, ties, near_max, near_max | np.uint32(0x80000000)]).view(
        np.float32)
    x = x[np.isfinite(x)]
    got = bfloat16_bits(x, np.empty(x.size, np.uint32)).view(np.float32)
    np.testing.assert_array_equal(got, x.astype(BF16).astype(np.float32))


def test_casts_beyond_float16_range_warn_nothing():
    a = np.array([1e6, 1.0, -7e4], np.float32)
    assert diff(a, a * np.float32(1.5)).verdict == "changed"  # filterwarnings = error


def test_verdicts_tell_casts_from_changes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000).astype(np.float32)
    assert diff(a, a.copy()).verdict == "identical"
    assert diff(a, a.astype(ml_dtypes.bfloat16)).verdict == "cast_bfloat16"
    assert diff(a, a.astype(np.float16)).verdict == "cast_float16"
    round_trip = a.astype(ml_dtypes.bfloat16).astype(np.float32)  # cast and back, same dtype
    assert diff(a, round_trip).verdict == "cast_bfloat16"
    assert diff(a.astype(np.float64), a).verdict == "identical"  # an exact up-cast
    assert diff(a.astype(np.float64) + 1e-12, a).verdict == "cast_float32"
    nudged = np.nextafter(a, np.float32(np.inf))  # one ulp: arithmetic, not a cast
    assert diff(a, nudged).verdict == "rounding"
    changed = diff(a, a * np.float32(1.001))
    assert changed.verdict == "changed" and not changed.cast_consistent
    assert diff(a, round_trip).cast_consistent
    ints = diff(np.arange(5), np.arange(5) + 1)
    assert ints.verdict == "changed" and ints.max_abs_diff == 1
    nan = a.copy()
    nan[3] = np.nan
    s = diff(a, nan)
    assert s.verdict == "changed" and s.n_nonfinite == 1
    assert diff(nan, nan.copy()).verdict == "identical"
    zeros = diff(np.zeros(3), np.zeros(3))
    assert (zeros.rel_l2, zeros.cosine) == (0.0, None)
    with pytest.raises(ShapeError, match=r"shapes \[3\] and \[4\]"):
        diff(np.zeros(3), np.zeros(4))


def test_torch_and_flax_transformers_with_the_same_weights_align_completely(store):
    model = fm.torch_transformer(seed=1)
    variables = fm.transformer_to_flax(model)
    x = np.random.default_rng(0).integers(0, 64, (2, 12))
    flax_out = np.asarray(fm.flax_modules()["FlaxTransformer"]().apply(variables, x))
    np.testing.assert_allclose(flax_out, model(torch.from_numpy(x)).detach().numpy(),
                               atol=2e-5)  # the test's own mapping is right
    a = store.write(wt.from_module(model), "torch-tr")
    b = store.write(wj.from_pytree(variables), "flax-tr")
    result = compare(a, b)
    assert result.complete, result.summary()
    rows = {r["a"]: r for r in result.records()}
    assert len(rows) == len(a) == len(b)
    assert {r["verdict"] for r in rows.values()} == {"identical"}
    assert {r["method"] for r in rows.values()} == {"hash"}
    q = rows["layers.0.self_attn.q_proj.weight"]
    assert (q["b"], q["transform"]) == ("layers_0.self_attn.query.kernel", "reshape")
    assert rows["layers.1.self_attn.v_proj.bias"]["b"] == "layers_1.self_attn.value.bias"
    assert rows["layers.1.self_attn.out_proj.weight"]["b"] == "layers_1.self_attn.out.kernel"
    assert rows["layers.0.norm2.weight"]["b"] == "layers_0.norm2.scale"
    assert rows["head.weight"]["b"] == "head.kernel"


def onnx_export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """A torch.onnx.export of the model (TorchScript exporter), for the ONNX adapter to read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    return path


@pytest.mark.slow
def test_one_model_from_flax_torch_onnx_and_safetensors_aligns_three_ways(tmp_path, store):
    variables, _ = fm.train_flax_cnn()
    model = fm.cnn_to_torch(variables)
    x, _ = fm.digits_data()
    xt = torch.from_numpy(x[:16].transpose(0, 3, 1, 2).copy())
    flax_out = np.asarray(fm.flax_modules()["FlaxCNN"]().apply(variables, x[:16]))
    np.testing.assert_allclose(model(xt).detach().numpy(), flax_out, atol=1e-5)
    safetensors.write({k: v.numpy() for k, v in model.state_dict().items()},
                      tmp_path / "cnn.safetensors")
    snaps = {"flax": store.write(wj.from_pytree(variables), "cnn-flax"),
             "onnx": wa.ingest(onnx_export(model, xt, tmp_path / "cnn.onnx"), store=store,
                               model="cnn-onnx"),
             "safetensors": wa.ingest(tmp_path / "cnn.safetensors", store=store),
             "torch": store.write(wt.from_module(model), "cnn-torch")}
    for left, right in (("flax", "onnx"), ("flax", "safetensors"), ("onnx", "safetensors"),
                        ("torch", "flax"), ("torch", "onnx")):
        result = compare(snaps[left], snaps[right])
        assert result.complete, (left, right, result.summary())
        assert result.pairs.num_rows == 6
        assert set(result.pairs.column("verdict").to_pylist()) <= {"identical", "rounding"}
        assert max(result.pairs.column("max_abs_diff").to_pylist()) <= 1e-6
    rows = {r["a"]: r["b"] for r in compare(snaps["flax"], snaps["onnx"]).records()}
    assert rows == {"Conv_0.kernel": "conv1.weight", "Conv_0.bias": "conv1.bias",
                    "Conv_1.kernel": "conv2.weight", "Conv_1.bias": "conv2.bias",
                    "Dense_0.kernel": "fc.weight", "Dense_0.bias": "fc.bias"}


def test_two_seeds_align_by_structure_and_differ_for_real(store):
    a = store.write(wt.from_module(fm.vgg_style(seed=0)), "vgg", step=0)
    b = store.write(wt.from_module(fm.vgg_style(seed=1)), "vgg-seed1")
    result = compare(a, b)
    assert result.complete
    rows = {r["a"]: r for r in result.records()}
    for name, r in rows.items():
        assert r["a"] == r["b"], name
        if name.endswith("weight") and rows[name]["kind"] in ("conv2d", "linear"):
            assert r["method"] == "structure" and r["verdict"] == "changed"
            assert r["rel_l2"] > 0.5 and abs(r["cosine"]) < 0.3
            ref = reference(a.read(name), b.read(name))
            assert r["rel_l2"] == pytest.approx(ref[1], rel=1e-5)
            assert r["cosine"] == pytest.approx(ref[2], rel=1e-5, abs=1e-6)
            assert r["max_abs_diff"] == pytest.approx(ref[0], rel=1e-7)
    # BatchNorm starts at ones/zeros in both seeds: equal contents, found by hash
    assert rows["features.1.weight"]["method"] == "hash"
    assert rows["features.1.weight"]["verdict"] == "identical"


def test_renamed_and_reordered_model_aligns_by_structure(store):
    """The same architecture with other names and other weights: structure, then names."""
    model = fm.vgg_style(seed=0)
    renamed = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        renamed[f"block{i // 6}.{k.replace('features', 'f').replace('classifier', 'c')}"] = v
    other = {k: v.double().numpy() * 1.01 if v.is_floating_point() else v.numpy()
             for k, v in renamed.items()}
    a = store.write(wt.from_module(model), "orig")
    b = store.write(wt.from_state_dict(other), "renamed")
    result = compare(a, b)
    assert result.complete
    pairs = {r["a"]: r["b"] for r in result.records()}
    for (k, _), r in zip(model.state_dict().items(), renamed, strict=True):
        assert pairs[k] == r
    verdicts = {r["a"]: r["verdict"] for r in result.records()}
    assert verdicts["features.0.weight"] == "changed"


def test_training_steps_compare_the_same_way(store, digits_checkpoints):
    snaps = [wa.ingest(p, store=store, model="mlp", step=s)
             for p, s in zip(digits_checkpoints, (1, 10, 60), strict=True)]
    early = compare(snaps[0], snaps[2])
    assert early.complete and early.pairs.num_rows == 6  # 64-32-10: three weights, biases
    assert early.pairs.column("a").to_pylist() == early.pairs.column("b").to_pylist()
    assert set(early.pairs.column("verdict").to_pylist()) == {"changed"}
    late = compare(snaps[1], snaps[2])
    change = dict(zip(late.pairs.column("a").to_pylist(), late.pairs.column("rel_l2").to_pylist(),
                      strict=True))
    first = dict(zip(early.pairs.column("a").to_pylist(),
                     early.pairs.column("rel_l2").to_pylist(), strict=True))
    assert change["fc1.weight"] < first["fc1.weight"]  # less moves between later steps
    same = compare(snaps[2], snaps[2])
    assert set(same.pairs.column("verdict").to_pylist()) == {"identical"}


def test_bfloat16_copy_is_a_cast_not_a_change(store):
    model = fm.lstm_tagger()
    a = store.write(wt.from_module(model), "lstm32")
    b = store.write(wt.from_module(model.to(torch.bfloat16)), "lstm16")
    result = compare(a, b)
    assert result.complete
    assert set(result.pairs.column("verdict").to_pylist()) == {"cast_bfloat16"}
    assert all(result.pairs.column("cast_consistent").to_pylist())


def test_fused_attention_and_recurrent_gates_align_with_their_parts(tmp_path, store):
    model = fm.torch_transformer(seed=2)
    safetensors.write({k: v.numpy() for k, v in model.state_dict().items()},
                      tmp_path / "tr.safetensors")
    a = store.write(wt.from_module(model), "split")
    b = wa.ingest(tmp_path / "tr.safetensors", store=store, model="fused")
    result = compare(a, b)
    assert result.complete
    rows = {r["a"]: r for r in result.records()}
    k = rows["layers.0.self_attn.k_proj.weight"]
    assert (k["b"], k["b_rows"], k["method"], k["verdict"]) == (
        "layers.0.self_attn.in_proj_weight", [32, 64], "hash", "identical")
    lstm = torch.nn.LSTM(3, 4)
    sd = {k: v.detach().numpy() for k, v in lstm.state_dict().items()}
    gates = {}
    for g, gate in enumerate("ifgo"):  # Flax LSTMCell: one Dense per gate, [in, out]
        gates[f"cell.i{gate}.kernel"] = sd["weight_ih_l0"][g * 4:(g + 1) * 4].T.copy()
        gates[f"cell.h{gate}.kernel"] = sd["weight_hh_l0"][g * 4:(g + 1) * 4].T.copy()
    c = store.write(wt.from_module(lstm), "lstm")
    d = store.write(wj.from_pytree(gates), "gates")
    result = compare(c, d)
    pairs = {(r["b"], tuple(r["a_rows"])): r["verdict"] for r in result.records()
             if r["a_rows"]}
    for g, gate in enumerate("ifgo"):
        assert pairs[(f"cell.i{gate}.kernel", (4 * g, 4 * g + 4))] == "identical"
        assert pairs[(f"cell.h{gate}.kernel", (4 * g, 4 * g + 4))] == "identical"
    assert set(result.unmatched_a) == {"bias_ih_l0", "bias_hh_l0"}  # Flax has one bias


def test_unmatched_tensors_are_listed_with_reasons_and_given_pairs_checked(store):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = store.write(RecordsSource([TensorRecord("fc.weight", w),
                                   TensorRecord("extra.weight", np.ones((7, 7), np.float32))]),
                    "a")
    b = store.write(RecordsSource([TensorRecord("fc.weight", np.ones((5, 4), np.float32))]), "b")
    result = compare(a, b)
    assert not result.complete and result.pairs.num_rows == 0
    assert result.unmatched_a["fc.weight"] == ("shape [3, 4] differs from [5, 4] of the same "
                                               "name on the other side")
    assert result.unmatched_a["extra.weight"] == "no tensor of 49 values on the other side"
    assert result.to_json()["unmatched"] == {"a": ["fc.weight", "extra.weight"],
                                             "b": ["fc.weight"]}
    with pytest.raises(ShapeError, match=r"cannot compare tensor 'fc\.weight' \[3, 4\] with "
                                         r"'fc\.weight' \[5, 4\]"):
        compare(a, b, mapping={"fc.weight": "fc.weight"})
    with pytest.raises(NotFoundError, match="mapping names 'nope'"):
        compare(a, b, mapping={"nope": "fc.weight"})
    plain = store.write(RecordsSource([TensorRecord("w1", w.T.copy())]), "plain")
    given_pair = compare(a, plain, mapping={"fc.weight": "w1"}).records()[0]
    assert (given_pair["method"], given_pair["transform"], given_pair["verdict"]) == (
        "given", "transpose(1, 0)", "identical")
    square = np.arange(16, dtype=np.float32).reshape(4, 4)
    c = store.write(RecordsSource([TensorRecord("fc.weight", square, kind="linear",
                                                layout=("out", "in"))]), "sq")
    d = store.write(RecordsSource([TensorRecord("w", square.T.copy())]), "sq-unnamed")
    pair = compare(c, d, mapping={"fc.weight": "w"}).records()[0]
    assert (pair["transform"], pair["verdict"]) == ("transpose(1, 0)", "identical")
    assert "axes were unnamed" in pair["note"]


def test_outputs_arrow_json_summary_and_cli(store, tmp_path, capsys):
    from weightatlas.cli import main

    model = fm.torch_transformer(seed=4)
    a = store.write(wt.from_module(model), "m", step=1)
    with torch.no_grad():
        model.head.weight.mul_(2)
    b = store.write(wt.from_module(model), "m", step=2)
    result = compare(a, b)
    assert result.pairs.schema == PAIR_SCHEMA
    assert isinstance(result.pairs, pa.Table)
    text = result.summary(max_rows=3)
    assert text.splitlines()[0] == "compare m@1 with m@2"
    assert "head.weight" in text.splitlines()[5]  # the largest change comes first
    doc = json.loads(json.dumps(result.to_json()))
    head = next(r for r in doc["pairs"] if r["a"] == "head.weight")
    assert head["rel_l2"] == pytest.approx(1.0) and head["verdict"] == "changed"
    assert set(head) >= {"a", "b", "method", "confidence", "max_abs_diff", "rel_l2", "cosine"}
    assert run(main, "--store", str(store.root), "compare", "m@1", "m@2", "--json") == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["pairs"] == doc["pairs"] and cli["unmatched"] == {"a": [], "b": []}
    assert run(main, "--store", str(store.root), "compare", "m@1", "m@2", "--rows", "2") == 0
    out = capsys.readouterr().out
    assert out.startswith("compare m@1 with m@2") and "verdicts: identical" in out
    assert run(main, "--store", str(store.root), "compare", "m@1", "nope@3") == 1
    assert "nope" in capsys.readouterr().err


def run(main, *args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.parametrize("block", [5, 1000, 1 << 16], ids=["block5", "block1000", "default"])
def test_compare_streams_stored_chunks_and_fused_rows_exactly(store, block):
    """Stored in many small chunks on one side, fused on the other, mixed dtypes and NaN:
    every pair's metrics equal float64 NumPy on the arrays read back whole."""
    rng = np.random.default_rng(5)
    e = 24
    q, k, v = (rng.standard_normal((e, e)).astype(np.float32) for _ in range(3))
    emb = rng.standard_normal((301, e)).astype(np.float32)
    emb[7, 3] = np.nan
    a = store.write(RecordsSource([
        TensorRecord("attn.q_proj.weight", q, kind="attention", layout=("out", "in")),
        TensorRecord("attn.k_proj.weight", k, kind="attention", layout=("out", "in")),
        TensorRecord("attn.v_proj.weight", v, kind="attention", layout=("out", "in")),
        TensorRecord("emb.weight", emb, kind="embedding", layout=("vocab", "dim"))]),
        "split", chunk_bytes=e * 4 * 10)  # 10 rows a stored chunk: pieces cross them
    fused = np.concatenate([q, k * np.float32(1.01), v + np.float32(0.01)])
    later = (emb * (1 + 1e-2 * rng.standard_normal(emb.shape))).astype(BF16)
    later[7, 3] = 1.0  # NaN on one side only
    b = store.write(RecordsSource([
        TensorRecord("attn.in_proj_weight", fused, kind="attention", layout=("out", "in")),
        TensorRecord("emb.weight", later, kind="embedding", layout=("vocab", "dim"))]),
        "fused", chunk_bytes=e * 4 * 7)
    result = compare(a, b, block=block)
    assert result.complete, result.summary()
    rows = {r["a"]: r for r in result.records()}
    assert [rows[f"attn.{x}_proj.weight"]["b_rows"] for x in "qkv"] == [[0, e], [e, 2 * e],
                                                                         [2 * e, 3 * e]]
    assert rows["attn.q_proj.weight"]["verdict"] == "identical"
    for name, r in rows.items():
        xb = b.read(r["b"])
        if r["b_rows"]:
            xb = xb[r["b_rows"][0] : r["b_rows"][1]]
        want = finite_reference(a.read(name), xb)
        for key in ("max_abs_diff", "rel_l2"):
            assert r[key] == pytest.approx(want[key], rel=1e-6, abs=0), (name, key)
        assert r["cosine"] == pytest.approx(want["cosine"], rel=1e-6), name
        assert r["n_nonfinite"] == want["n_nonfinite"], name
    assert rows["emb.weight"]["n_nonfinite"] == 1 and rows["emb.weight"]["verdict"] == "changed"


def test_compare_reads_only_verified_bytes(store):
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    a = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "m", step=1)
    b = store.write(RecordsSource([TensorRecord("fc.weight", w * 2)]), "m", step=2)
    path = b.path
    b.close()
    raw = Path(path).read_bytes()
    with open(path, "r+b") as f:  # flip one byte of the second snapshot's tensor
        at = raw.find((w * 2).tobytes()[:64]) + 4000
        f.seek(at)
        f.write(bytes([raw[at] ^ 0x40]))
    with pytest.raises(wa.errors.IntegrityError,
                       match=r"step-2\.arrow: tensor 'fc\.weight' \(chunk 0\) is damaged"):
        compare(a, store.snapshot("m@2"), block=1000)


def test_compare_memory_is_a_few_pieces_not_a_tensor(store):
    """tracemalloc sees NumPy's allocations: the pass keeps a few pieces, not 16 MiB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    a = store.write(RecordsSource([TensorRecord("w", w, layout=("out", "in"))]), "m", step=1)
    b = store.write(RecordsSource([TensorRecord("w", w.astype(BF16).astype(np.float32),
                                                layout=("out", "in"))]), "m", step=2)
    tracemalloc.start()
    try:
        result = compare(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.records()[0]["verdict"] == "cast_bfloat16"
    assert peak < 4 * 2**20, peak


def test_square_unnamed_matrices_are_transposed_only_when_that_is_clearly_closer(store):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    a = store.write(RecordsSource([TensorRecord("w", w)]), "sq", step=1)
    flipped = store.write(RecordsSource([TensorRecord("w", (w * 1.01).T.copy())]), "sq", step=2)
    other = store.write(RecordsSource([TensorRecord("w", rng.standard_normal((32, 32)).astype(
        np.float32))]), "sq", step=3)
    pair = compare(a, flipped).records()[0]
    assert (pair["transform"], pair["rel_l2"]) == ("transpose(1, 0)", pytest.approx(0.01))
    assert "axes were unnamed" in pair["note"]
    for x, y in ((a, other), (other, a)):
        # unrelated: as far from B as from its transpose, so the stored orientation stays
        pair = compare(x, y).records()[0]
        assert (pair["transform"], pair["note"]) == ("identity", "")
        assert pair["rel_l2"] == pytest.approx(reference(x.read("w"), y.read("w"))[1], rel=1e-6)


@settings(max_examples=300, deadline=None)
@given(a=st.lists(st.sampled_from(["layer", "0", "1", "q", "weight", "norm", "attention"]),
                  max_size=9),
       b=st.lists(st.sampled_from(["layer", "0", "1", "q", "weight", "norm", "bias"]),
                  max_size=9))
def test_name_similarity_is_difflibs_ratio(a, b):
    import difflib

    from weightatlas.core._align_names import name_similarity

    want = 1.0 if a == b else difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    assert name_similarity(a, b) == want


@pytest.mark.parametrize("k", [-5, -4, -1, 1, 3, 4, 5, 9])
def test_rounding_rule_in_float32_bits_is_four_numpy_spacings(k):
    """``|d| <= 4 ulp(max(|a|, |b|))`` from exponent bits against NumPy's own spacing."""
    from weightatlas.core._compare_casts import _within_4_ulp32

    rng = np.random.default_rng(k + 10)
    x = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    y = (x.view(np.int32) + k).view(np.float32)  # k units apart, across binades too
    keep = np.isfinite(y) & (np.sign(x) == np.sign(y))
    x, y = x[keep], y[keep]
    d = x - y
    want = np.abs(d.astype(np.float64)) <= 4 * np.spacing(np.maximum(np.abs(x), np.abs(y))
                                                         ).astype(np.float64)
    got = [_within_4_ulp32(x[i : i + 1], y[i : i + 1], d[i : i + 1]) for i in range(x.size)]
    np.testing.assert_array_equal(got, want)


def test_a_nan_does_not_hide_a_transpose(store):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[0, 1] = np.nan
    a = store.write(RecordsSource([TensorRecord("w", w)]), "sqn", step=1)
    b = store.write(RecordsSource([TensorRecord("w", w.T.copy())]), "sqn", step=2)
    pair = compare(a, b).records()[0]
    assert pair["transform"] == "transpose(1, 0)" and pair["max_abs_diff"] == 0.0


def test_tiny_values_are_measured_without_underflow():
    """float32 squares of values near 1e-22 underflow; such pairs are measured in float64."""
    a = np.full(4096, 1e-25, np.float32)
    s = diff(a, 2 * a)
    assert (s.rel_l2, s.cosine, s.verdict) == (pytest.approx(1.0), pytest.approx(1.0),
                                               "changed")
    r = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 1e-22
    s = diff(r, 1.5 * r)
    want = reference(r, 1.5 * r)
    assert s.rel_l2 == pytest.approx(want[1], rel=1e-6) and s.cosine == pytest.approx(1.0)


def test_64_bit_integers_differ_exactly():
    """float64 cannot tell 2**60 from 2**60 + 1: the verdict comes from the integers."""
    s = diff(np.array([2**60, 1], np.int64), np.array([2**60 + 1, 1], np.int64))
    assert (s.max_abs_diff, s.verdict) == (1.0, "changed")
    s = diff(np.array([-(2**62), 1], np.int64), np.array([2**62, 1], np.int64))
    assert s.max_abs_diff == float(2**63)
    assert diff(np.array([2**60], np.int64), np.array([2**60], np.int64)).verdict == "identical"
