"""Bad ONNX input: every case gives a WeightAtlasError naming the file and the tensor,
nothing is written to the store, and no other exception escapes (including on random
mutations of valid files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.adapters import onnx as onnx_adapter
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    PathEscapeError,
    ResourceLimitError,
    ShapeError,
    UnsafeInputError,
    UnsupportedError,
    WeightAtlasError,
)
from weightatlas.storage import Store

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

F = T.FLOAT
W = np.arange(15, dtype=np.float32).reshape(5, 3)
CANARY = b"CANARY-outside-the-model-folder-" * 4


def gemm_model(weight: Any, *extra: Any, nodes: list[Any] | None = None) -> Any:
    nodes = nodes or [helper.make_node("Gemm", ["x", weight.name], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3])],
                          [helper.make_tensor_value_info("y", F, None)], [weight, *extra])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def write(m: Any, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    path.write_bytes(m.SerializeToString())
    return path


def external(folder: Path, keys: dict[str, str] | list[tuple[str, str]],
             data: bytes | None = W.tobytes()) -> Path:
    """A model whose weight lives in external data described by ``keys``."""
    t = T(name="fc.weight", data_type=F, dims=[5, 3], data_location=T.EXTERNAL)
    for k, v in (keys.items() if isinstance(keys, dict) else keys):
        t.external_data.add(key=k, value=v)
    if data is not None:
        (folder / "w.bin").write_bytes(data)
    return write(gemm_model(t), folder)


def fails(path: Path, error: type[Exception], match: str, tmp_path: Path, **kw: Any) -> None:
    """Reading and ingesting raise ``error`` naming the file; the store stays empty."""
    with pytest.raises(error, match=match) as info:
        onnx_adapter.read(path, **kw).describe()
    assert str(path.name) in str(info.value) or str(path.parent) in str(info.value)
    if kw:
        return
    store = Store(tmp_path / "store", create=True)
    with pytest.raises(error, match=match):
        wa.ingest(path, store=store)
    left = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert [p.name for p in left] == ["weightatlas-store.json"], left
    assert store.models() == []


# ---- the file -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "match"), [
    (b"", r"no graph found"),
    (b"\xff\xff\xff\xff\x0f garbage", r"not a valid ONNX protobuf"),
    (b"hello, this is a text file\n", r"not a valid ONNX protobuf|no graph found"),
    (b"\x08\x08\x3a\xff\x7f", r"not a valid ONNX protobuf.*truncated"),
], ids=["empty", "garbage", "text", "length-past-end"])
def test_malformed_protobuf(tmp_path: Path, raw: bytes, match: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(raw)
    fails(path, FormatError, match, tmp_path)


def test_truncated_real_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{k}")
               for k in range(4)]
    nodes = [helper.make_node("MatMul", ["x" if k == 0 else f"h{k}", f"w{k}"], [f"h{k + 1}"])
             for k in range(4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 64])],
                          [helper.make_tensor_value_info("h4", F, None)], weights)
    full = helper.make_model(g).SerializeToString()
    for cut in (len(full) - 1, len(full) - 20, len(full) * 3 // 4, len(full) // 2, 100, 9):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(full[:cut])
        with pytest.raises(FormatError, match=rf"cut{cut}\.onnx: .*(truncated|no graph)"):
            onnx_adapter.read(path)


def test_over_two_gigabytes_without_external_data(tmp_path: Path) -> None:
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: no disk space used
    fails(path, ResourceLimitError, r"huge\.onnx: 2147483648 bytes; an ONNX protobuf file "
          r"cannot exceed 2147483647 bytes.*save_as_external_data", tmp_path)


def deep(levels: int) -> bytes:
    """A model whose graph nests ``levels`` If subgraphs, written as raw protobuf bytes."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            if not n:
                return out + bytes([b])
            out += bytes([b | 0x80])

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    g = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "g", [],
                          []).SerializeToString()
    for _ in range(levels):
        attr = field(1, b"then_branch") + varint(20 << 3) + varint(5) + field(6, g)
        node = field(1, b"c") + field(2, b"o") + field(4, b"If") + field(5, attr)
        g = field(1, node) + field(2, b"g")
    g += field(11, field(1, b"c"))  # the outermost graph's input "c", read at every level
    opset = varint(2 << 3) + varint(21)  # OperatorSetIdProto.version = 21
    return bytes([0x08, 0x08]) + field(7, g) + field(8, opset)


@pytest.mark.parametrize(("levels", "match"), [
    (20, r"subgraphs nested deeper than 16 levels"),
    (10_000, r"nested deeper than protobuf's limit"),
])
def test_graph_nested_too_deeply(tmp_path: Path, levels: int, match: str) -> None:
    path = tmp_path / "deep.onnx"
    path.write_bytes(deep(levels))
    fails(path, ResourceLimitError, match, tmp_path)


def test_nesting_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "deep.onnx"
    path.write_bytes(deep(3))
    onnx_adapter.read(path)
    with pytest.raises(ResourceLimitError, match=r"deeper than 2 levels"):
        onnx_adapter.read(path, max_depth=2)


def test_not_a_model(tmp_path: Path) -> None:
    m = gemm_model(numpy_helper.from_array(W, "fc.weight"))
    del m.opset_import[:]
    fails(write(m, tmp_path), FormatError, r"m\.onnx: model has no opset_import", tmp_path)
    missing = gemm_model(numpy_helper.from_array(W, "fc.weight"),
                         nodes=[helper.make_node("Gemm", ["x", "nope"], ["y"], name="fc")])
    fails(write(missing, tmp_path, "u.onnx"), FormatError,
          r"u\.onnx: node 'fc' \(Gemm\) reads 'nope', which no graph input.*truncated", tmp_path)
    twice = gemm_model(numpy_helper.from_array(W, "fc.weight"),
                       numpy_helper.from_array(W, "fc.weight"))
    fails(write(twice, tmp_path, "d.onnx"), FormatError, r"tensor 'fc\.weight' is defined twice",
          tmp_path)
    with pytest.raises(NotFoundError, match=r"absent\.onnx: no such file"):
        onnx_adapter.read(tmp_path / "absent.onnx")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(NotFoundError, match=r"empty_dir: no \.onnx file in this folder"):
        onnx_adapter.read(tmp_path / "empty_dir")
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(UnsafeInputError, match=r"fifo\.onnx: expected a regular file"):
        onnx_adapter.read(tmp_path / "fifo.onnx")


# ---- tensors --------------------------------------------------------------------------


def tensor(**fields: Any) -> Any:
    t = T(name="fc.weight", data_type=fields.pop("data_type", F),
          dims=fields.pop("dims", [5, 3]))
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(t, k).extend(v)
        else:
            setattr(t, k, v)
    return t


@pytest.mark.parametrize(("t", "error", "match"), [
    (tensor(dims=[5, -3], raw_data=W.tobytes()), ShapeError,
     r"tensor 'fc\.weight': shape \[5, -3\] has a negative dimension"),
    (tensor(dims=[2**40, 2**40], raw_data=b"\0" * 8), ShapeError,
     r"raw_data has 8 bytes, shape \[1099511627776, 1099511627776\] FLOAT needs "
     r"4835703278458516698824704"),
    (tensor(raw_data=W.tobytes()[:-1]), ShapeError,
     r"tensor 'fc\.weight': raw_data has 59 bytes, shape \[5, 3\] FLOAT needs 60"),
    (tensor(raw_data=W.tobytes() + b"\0"), ShapeError, r"raw_data has 61 bytes"),
    (tensor(float_data=list(range(14))), ShapeError,
     r"float_data holds 14 values, shape \[5, 3\] FLOAT needs 15"),
    (tensor(raw_data=W.tobytes(), float_data=list(range(15))), FormatError,
     r"holds both raw_data and float_data"),
    (tensor(int64_data=list(range(15))), FormatError, r"FLOAT values belong in float_data"),
    (tensor(data_type=99, raw_data=W.tobytes()), UnsupportedError, r"element type 99"),
    (tensor(dims=[1] * 65, raw_data=b"\0" * 4), ShapeError, r"65 dimensions, at most 64"),
    (tensor(), ShapeError, r"holds no values, shape \[5, 3\] needs 15"),
    (tensor(data_type=T.INT8, int32_data=[300] * 15), FormatError,
     r"int32_data holds 300, outside INT8's range"),
    (tensor(data_type=T.FLOAT16, int32_data=[70000] * 15), FormatError,
     r"int32_data holds 70000, outside FLOAT16's range"),
], ids=["negative-dim", "overflowing-dims", "raw-short", "raw-long", "typed-short",
        "raw-and-typed", "wrong-field", "unknown-type", "rank-65", "no-values", "int8-range",
        "float16-range"])
def test_bad_tensors(tmp_path: Path, t: Any, error: type[Exception], match: str) -> None:
    fails(write(gemm_model(t), tmp_path), error, match, tmp_path)


def test_segmented_tensor(tmp_path: Path) -> None:
    t = tensor(raw_data=W.tobytes())
    t.segment.begin, t.segment.end = 0, 15
    fails(write(gemm_model(t), tmp_path), UnsupportedError, r"segmented tensors", tmp_path)


def test_bad_folds(tmp_path: Path) -> None:
    shape = numpy_helper.from_array(np.array([4, 4], np.int64), "shape")
    reshape = gemm_model(numpy_helper.from_array(W, "w"), shape, nodes=[
        helper.make_node("Reshape", ["w", "shape"], ["w2"], name="bad_reshape"),
        helper.make_node("MatMul", ["x", "w2"], ["y"])])
    fails(write(reshape, tmp_path, "r.onnx"), ShapeError,
          r"r\.onnx: node 'bad_reshape' \(Reshape\): cannot reshape \[5, 3\] \(15 values\) to "
          r"\[4, 4\]", tmp_path)
    perm = gemm_model(numpy_helper.from_array(W, "w"), nodes=[
        helper.make_node("Transpose", ["w"], ["w2"], name="t", perm=[0, 0]),
        helper.make_node("MatMul", ["x", "w2"], ["y"])])
    fails(write(perm, tmp_path, "p.onnx"), FormatError,
          r"Transpose perm \[0, 0\] is not a permutation", tmp_path)
    big = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "big")
    bomb = gemm_model(big, nodes=[helper.make_node("ConstantOfShape", ["big"], ["w"], name="c"),
                                  helper.make_node("MatMul", ["x", "w"], ["y"])])
    fails(write(bomb, tmp_path, "b.onnx"), ResourceLimitError,
          r"b\.onnx: node 'c' \(ConstantOfShape\): would take 4398046511104 bytes in memory, "
          r"over the limit of 8589934592", tmp_path)
    small = gemm_model(numpy_helper.from_array(np.array([64, 64], np.int64), "s"), nodes=[
        helper.make_node("ConstantOfShape", ["s"], ["w"], name="c"),
        helper.make_node("MatMul", ["x", "w"], ["y"])])
    with pytest.raises(ResourceLimitError, match=r"over the limit of 1000"):
        onnx_adapter.read(write(small, tmp_path, "s.onnx"), max_tensor_bytes=1000)
    q = numpy_helper.from_array(np.zeros((5, 3), np.int8), "q")
    s = numpy_helper.from_array(np.ones(4, np.float32), "s")
    dq = gemm_model(q, s, nodes=[helper.make_node("DequantizeLinear", ["q", "s"], ["w"],
                                                  name="dq", axis=0),
                                 helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)])
    fails(write(dq, tmp_path, "q.onnx"), ShapeError,
          r"q\.onnx: node 'dq' \(DequantizeLinear\): per-axis x_scale has shape \[4\], x has 5 "
          r"values along axis 0", tmp_path)


def test_long_fold_chains_stay_bounded(tmp_path: Path) -> None:
    """5,000 Identity nodes in a row: folding stops after 64 (no unbounded recursion), and
    the weight is still found, stored once, with its bytes."""
    nodes = [helper.make_node("Identity", ["w" if k == 0 else f"w{k}"], [f"w{k + 1}"])
             for k in range(5000)]
    nodes.append(helper.make_node("Gemm", ["x", "w5000"], ["y"], transB=1, name="/fc/Gemm"))
    path = write(gemm_model(numpy_helper.from_array(W, "w"), nodes=nodes), tmp_path)
    src = onnx_adapter.read(path)
    records = list(src.records())
    assert len(records) == 1 and records[0].source_name == "w"
    assert records[0].data.tobytes() == W.tobytes()
    assert len(records[0].attrs["ops"]) == 64


def test_bad_sparse_tensors(tmp_path: Path) -> None:
    def sparse(indices: list[int], dims: list[int]) -> Any:
        values = numpy_helper.from_array(np.ones(len(indices), np.float32), "fc.weight")
        idx = numpy_helper.from_array(np.array(indices, np.int64), "i")
        return helper.make_sparse_tensor(values, idx, dims)

    for indices, match in (([0, 15], r"an index lies outside the 15 values of shape \[5, 3\]"),
                           ([2, 2], r"an index appears twice")):
        g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)],
                              "g", [helper.make_tensor_value_info("x", F, [1, 3])],
                              [helper.make_tensor_value_info("y", F, None)],
                              sparse_initializer=[sparse(indices, [5, 3])])
        fails(write(helper.make_model(g), tmp_path), FormatError,
              rf"sparse tensor 'fc\.weight': {match}", tmp_path)


# ---- external data ----------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "error", "match"), [
    ({"location": "missing.bin"}, NotFoundError,
     r"tensor 'fc\.weight': external data file 'missing\.bin' does not exist"),
    ({"location": "w.bin", "offset": "40"}, FormatError,
     r"tensor 'fc\.weight': external data 'w\.bin' has 60 bytes, the tensor needs bytes 40 to "
     r"100 \(file short or truncated\?\)"),
    ({"location": "w.bin", "length": "8"}, ShapeError,
     r"external_data length is 8 bytes, shape \[5, 3\] needs 60"),
    ({"location": "w.bin", "offset": "-1"}, FormatError,
     r"external_data offset '-1' is not a non-negative integer"),
    ({"location": "w.bin", "length": "1e3"}, FormatError, r"length '1e3' is not a non-negative"),
    ({"location": "w.bin", "__class__": "x"}, FormatError, r"unknown external_data key "
                                                           r"'__class__'"),
    ([("location", "w.bin"), ("location", "w.bin")], FormatError,
     r"key 'location' appears twice"),
    ({"offset": "0"}, FormatError, r"external_data has no location"),
    ({"location": ""}, FormatError, r"external_data location is empty"),
    ({"location": "../w.bin"}, PathEscapeError, r"'\.\./w\.bin' uses '\.\.'"),
    ({"location": "sub/../../w.bin"}, PathEscapeError, r"uses '\.\.'"),
    ({"location": "/etc/passwd"}, PathEscapeError, r"'/etc/passwd' is absolute"),
    ({"location": "C:\\w.bin"}, PathEscapeError, r"is absolute"),
    ({"location": "sub\\w.bin"}, PathEscapeError, r"contains a backslash"),
    ({"location": "w.bin\x00.txt"}, PathEscapeError, r"contains a NUL byte"),
], ids=["missing", "short", "length", "negative-offset", "not-integer", "unknown-key",
        "duplicate-key", "no-location", "empty-location", "dotdot", "nested-dotdot", "absolute",
        "drive", "backslash", "nul"])
def test_bad_external_data(tmp_path: Path, keys: Any, error: type[Exception],
                           match: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "w.bin").write_bytes(CANARY)
    fails(external(folder, keys), error, match, tmp_path)


def test_symbolic_links_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(CANARY[:60])
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside / "secret.bin", folder / "link.bin")
    fails(external(folder, {"location": "link.bin"}, data=None), PathEscapeError,
          r"'link\.bin' resolves to .*secret\.bin, outside the model's folder", tmp_path)
    os.symlink(outside, folder / "sub")
    fails(external(folder, {"location": "sub/secret.bin"}, data=None), PathEscapeError,
          r"outside the model's folder", tmp_path)


def test_hard_links_fifos_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(CANARY[:60])
    os.link(tmp_path / "secret.bin", folder / "hard.bin")
    fails(external(folder, {"location": "hard.bin"}, data=None), PathEscapeError,
          r"external data 'hard\.bin': has 2 hard links", tmp_path)
    os.mkfifo(folder / "pipe.bin")
    fails(external(folder, {"location": "pipe.bin"}, data=None), UnsafeInputError,
          r"external data 'pipe\.bin': expected a regular file, found a FIFO", tmp_path)
    (folder / "dir.bin").mkdir()
    fails(external(folder, {"location": "dir.bin"}, data=None), FormatError,
          r"expected a regular file, found a folder", tmp_path)


def test_external_and_inline_at_once(tmp_path: Path) -> None:
    t = tensor(raw_data=W.tobytes())
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value="w.bin")
    fails(write(gemm_model(t), tmp_path), FormatError,
          r"data_location is EXTERNAL but the tensor also holds raw_data", tmp_path)


# ---- random mutations ----------------------------------------------------------------


def test_mutants_raise_only_weightatlas_errors(tmp_path: Path) -> None:
    """300 mutants (byte flips, truncations, insertions) of a valid model with Constant
    nodes, folds, a subgraph and external data: each reads, or fails with a
    WeightAtlasError; never another exception."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "fc.weight")
    q = numpy_helper.from_array(rng.integers(-9, 9, (4, 3)).astype(np.int8), "q")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    sub = helper.make_graph([helper.make_node("Constant", [], ["c_out"],
                                              value_floats=[1.0, 2.0, 3.0])], "sub", [],
                            [helper.make_tensor_value_info("c_out", F, [3])])
    nodes = [helper.make_node("Transpose", ["fc.weight"], ["wt"]),
             helper.make_node("MatMul", ["x", "wt"], ["h"]),
             helper.make_node("DequantizeLinear", ["q", "s"], ["wq"]),
             helper.make_node("Gemm", ["x", "wq"], ["y"], transB=1),
             helper.make_node("If", ["cond"], ["z"], then_branch=sub, else_branch=sub)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3]),
                                       helper.make_tensor_value_info("cond", T.BOOL, [])],
                          [helper.make_tensor_value_info("y", F, None)], [w, q, s])
    seed = helper.make_model(g)
    onnx.save_model(seed, str(tmp_path / "seed.onnx"), save_as_external_data=True,
                    location="seed.bin", size_threshold=0)
    good = (tmp_path / "seed.onnx").read_bytes()
    data = (tmp_path / "seed.bin").read_bytes()
    outcomes: dict[str, int] = {}
    for k in range(300):
        blob = bytearray(good)
        kind = k % 3
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
        elif kind == 1:
            blob = blob[: int(rng.integers(len(blob)))]
        else:
            at = int(rng.integers(len(blob)))
            blob[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 6))).tolist())
        path = tmp_path / "mutant.onnx"
        path.write_bytes(bytes(blob))
        try:
            src = onnx_adapter.read(path, max_tensor_bytes=1 << 20)
            for rec in src.records():
                np.asarray(rec.data).sum()
            src.attachments()
            src.close()
            outcomes["read"] = outcomes.get("read", 0) + 1
        except WeightAtlasError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            assert "mutant.onnx" in str(e)
    assert (tmp_path / "seed.bin").read_bytes() == data
    assert sum(outcomes.values()) == 300 and len(outcomes) > 2, outcomes
