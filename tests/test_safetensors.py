"""The safetensors adapter against the reference implementation and hand-made bad files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from _safetensors_helpers import CODES, entry, pack, put, raw_bytes, valid_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from weightatlas.adapters import detect_format, open_source
from weightatlas.adapters import safetensors as sft
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
from weightatlas.storage import TensorSource, to_source_layout


def _fuzz(examples: int) -> settings:
    """Fixed-size runs with a per-example tmp_path file (overwritten each example)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_BY_NUMPY = {
    np.dtype("u1"): torch.uint8,
    np.dtype("<f2"): torch.float16,
    np.dtype("<f4"): torch.float32,
    np.dtype("<f8"): torch.float64,
    **{CODES[code]: dtype for code, dtype in TORCH_DTYPES.items()},
}
CANONICAL = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64",
}  # fmt: skip


def _random(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns of a dtype (NaN payloads and all), bools kept 0/1."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == np.dtype("?"):
        return rng.integers(0, 2, n).astype("?").reshape(shape)
    return np.frombuffer(rng.bytes(n * dtype.itemsize), dtype).reshape(shape).copy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """The same bytes as a torch tensor of the matching dtype (bf16 and float8 included)."""
    dtype = TORCH_BY_NUMPY[array.dtype]
    flat = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy())
    return flat.view(dtype).reshape(array.shape)


def _read_all(path: Path) -> dict[str, np.ndarray]:
    return {r.name: r.data for r in sft.read(path).records()}


# ---- every dtype, against the reference writer and reader ----


@pytest.mark.parametrize("code", list(CODES), ids=list(CODES))
def test_reads_reference_files_bit_exact(tmp_path: Path, code: str) -> None:
    array = _random(CODES[code], (3, 5), seed=len(code))
    path = tmp_path / "ref.safetensors"
    scalar = np.array(3, "u1")
    if code in TORCH_DTYPES:  # numpy cannot hand these to the reference writer
        safetensors.torch.save_file({"t": to_torch(array), "s": to_torch(scalar)}, path)
    else:
        safetensors.numpy.save_file({"t": array, "s": scalar}, path)
    got = {r.name: r for r in sft.read(path).records()}
    assert got["t"].dtype == CANONICAL[code] and got["t"].data.dtype == CODES[code]
    assert got["t"].shape == (3, 5) and got["s"].shape == ()
    assert raw_bytes(got["t"].data) == raw_bytes(array)


@pytest.mark.parametrize("code", list(CODES), ids=list(CODES))
def test_written_files_load_in_reference_bit_exact(tmp_path: Path, code: str) -> None:
    array = _random(CODES[code], (4, 2, 3), seed=7)
    scalar = _random(CODES[code], (), seed=8)
    path = tmp_path / "ours.safetensors"
    sft.write({"a": array, "b.scalar": scalar, "c.empty": array[:0]}, path, {"k": "v"})
    loaded = safetensors.torch.load_file(path)
    for name, want in {"a": array, "b.scalar": scalar, "c.empty": array[:0]}.items():
        tensor = loaded[name].contiguous()
        assert tuple(tensor.shape) == want.shape
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == raw_bytes(want)
    if code not in TORCH_DTYPES:
        np_loaded = safetensors.numpy.load_file(path)
        assert np_loaded["a"].dtype == CODES[code]
        assert raw_bytes(np_loaded["a"]) == raw_bytes(array)


def test_write_is_byte_identical_to_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {
        "z.f64": rng.normal(size=(3,)),
        "a.i8": rng.integers(-5, 5, (2, 3)).astype("i1"),
        "m.f32": rng.normal(size=(2, 2)).astype("<f4"),
        "b.u64": np.arange(3, dtype="<u8"),
        "c.i64": np.arange(2, dtype="<i8"),
        "flag": np.array([True, False]),
        "h.f16": np.ones((1, 3), "<f2"),
    }
    for metadata in (None, {"format": "np"}):
        sft.write(tensors, tmp_path / "ours.safetensors", metadata)
        safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata)
        ours = (tmp_path / "ours.safetensors").read_bytes()
        assert ours == (tmp_path / "ref.safetensors").read_bytes()
        assert int.from_bytes(ours[:8], "little") % 8 == 0


def test_write_converts_big_endian_and_strided_arrays(tmp_path: Path) -> None:
    base = np.arange(12, dtype=">f4").reshape(3, 4)
    sft.write({"t": base.T, "b": base[:, ::2]}, tmp_path / "x.safetensors")
    got = _read_all(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["t"], base.T)
    np.testing.assert_array_equal(got["b"], base[:, ::2])
    assert got["t"].dtype == np.dtype("<f4")


def test_write_rejects_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="complex"):
        sft.write({"c": np.zeros(2, np.complex64)}, tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedError, match="'__metadata__': not a usable tensor name"):
        sft.write({"__metadata__": np.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedError, match="metadata must map str to str"):
        sft.write({"a": np.zeros(2)}, tmp_path / "x.safetensors", {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(NotFoundError, match="missing"):
        sft.write({"a": np.zeros(2)}, tmp_path / "missing" / "x.safetensors")


def test_nan_inf_and_odd_floats_round_trip_bit_exact(tmp_path: Path) -> None:
    special = [0x7FC00000, 0x7F800001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001]
    tensors = {
        "f32": np.array(special, "<u4").view("<f4"),
        "f64": np.array([np.nan, -np.inf, np.inf, -0.0, 5e-324], "<f8"),
        "f16": np.array([0x7E00, 0x7C01, 0xFC00, 0x8000, 0x0001], "<u2").view("<f2"),
        "bf16": np.array([0x7FC1, 0xFF80, 0x7F80, 0x8000, 0x0001], "<u2").view(ml_dtypes.bfloat16),
    }
    sft.write(tensors, tmp_path / "ours.safetensors")
    safetensors.torch.save_file(
        {k: to_torch(v) for k, v in tensors.items()}, tmp_path / "ref.safetensors"
    )
    for name in ("ours", "ref"):
        got = _read_all(tmp_path / f"{name}.safetensors")
        for key, want in tensors.items():
            assert raw_bytes(got[key]) == raw_bytes(want), (name, key)


# ---- a real model ----


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 8, num_layers=2, bidirectional=True)
        self.attn = nn.MultiheadAttention(16, 2)
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.conv1d = nn.Conv1d(4, 5, 3)
        self.deconv = nn.ConvTranspose2d(6, 3, 2)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 10), nn.BatchNorm1d(10))
        self.lm_head = nn.Linear(16, 50, bias=False)


EXPECTED = {
    "embed.weight": ("embedding", ("vocab", "dim")),
    "lstm.weight_ih_l0": ("recurrent", ("gates_out", "in")),
    "lstm.weight_hh_l1_reverse": ("recurrent", ("gates_out", "in")),
    "lstm.bias_ih_l1": ("recurrent", ("gates_out",)),
    "attn.in_proj_weight": ("attention", ("out", "in")),
    "attn.in_proj_bias": ("attention", ("out",)),
    "attn.out_proj.weight": ("attention", ("out", "in")),
    "attn.out_proj.bias": ("attention", ("out",)),
    "conv.weight": ("conv2d", ("out", "in", "h", "w")),
    "conv.bias": ("conv2d", ("out",)),
    "bn.weight": ("norm", ("channel",)),
    "bn.running_var": ("norm", ("channel",)),
    "bn.num_batches_tracked": ("norm", ()),
    "conv1d.weight": ("conv1d", ("out", "in", "w")),
    "deconv.weight": ("conv_transpose", ("out", "in", "h", "w")),
    "deconv.bias": ("conv_transpose", ("out",)),
    "norm.weight": ("norm", ("channel",)),
    "norm.bias": ("norm", ("channel",)),
    "head.0.weight": ("linear", ("out", "in")),
    "head.0.bias": ("linear", ("out",)),
    "head.1.weight": ("norm", ("channel",)),
    "head.1.bias": ("norm", ("channel",)),
    "head.1.running_mean": ("norm", ("channel",)),
    "lm_head.weight": ("linear", ("out", "in")),
}


@pytest.mark.parametrize("saver", ["save_file", "save_model"])
def test_real_model_counts_kinds_and_layouts(tmp_path: Path, saver: str) -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    path = tmp_path / "model.safetensors"
    if saver == "save_model":
        safetensors.torch.save_model(model, str(path), metadata={"format": "pt"})
    else:
        safetensors.torch.save_file(model.state_dict(), path, metadata={"format": "pt"})
    source = sft.read(tmp_path)  # the folder resolves to model.safetensors
    assert isinstance(source, TensorSource)
    records = {r.name: r for r in source.records()}
    state = model.state_dict()
    assert set(records) == set(state)
    numel = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert sum(r.data.size for r in records.values()) == numel
    assert source.nbytes() == sum(t.numel() * t.element_size() for t in state.values())
    for name, (kind, layout) in EXPECTED.items():
        rec = records[name]
        assert (rec.kind, rec.layout) == (kind, layout), name
        original = to_source_layout(rec.data, rec.layout, rec.source_layout, rec.source_shape)
        np.testing.assert_array_equal(original, state[name].numpy())
        if name != "deconv.weight":
            assert rec.source_layout == layout
    # ConvTranspose keeps [in, out, h, w] in PyTorch: stored canonically as [out, in, h, w].
    deconv = records["deconv.weight"]
    assert deconv.source_layout == ("in", "out", "h", "w")
    np.testing.assert_array_equal(deconv.data, state["deconv.weight"].numpy().swapaxes(0, 1))
    assert records["lstm.weight_ih_l0"].module == "lstm"
    assert records["lstm.weight_ih_l0"].param == "weight_ih_l0"
    assert source.metadata()["metadata"] == {"format": "pt"}


# ---- the source protocol ----


def test_records_twice_and_sha256_and_metadata(tmp_path: Path) -> None:
    path = put(tmp_path, "m.safetensors", valid_file())
    source = open_source(path)
    first = [(r.name, r.dtype, r.shape, raw_bytes(r.data)) for r in source.records()]
    second = [(r.name, r.dtype, r.shape, raw_bytes(r.data)) for r in source.records()]
    assert first == second
    assert [n for n, *_ in first] == ["fc.weight", "fc.bias", "empty", "step"]  # file order
    (file,) = source.source_files()
    assert (file.name, file.size) == ("m.safetensors", path.stat().st_size)
    assert file.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.metadata() == {"format": "safetensors", "shards": 1, "metadata": {"format": "pt"}}
    assert json.dumps(source.metadata())
    assert (source.label, source.framework) == ("m.safetensors", "safetensors")


def test_zero_length_and_scalar_tensors(tmp_path: Path) -> None:
    got = _read_all(put(tmp_path, "m.safetensors", valid_file()))
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == np.float64
    assert got["step"].shape == () and int(got["step"]) == 7
    only_empty = pack({"e": entry("F32", [0], 0, 0), "f": entry("F32", [3, 0], 0, 0)})
    got = _read_all(put(tmp_path, "e.safetensors", only_empty))
    assert got["e"].shape == (0,) and got["f"].shape == (3, 0)


def test_views_are_zero_copy_and_read_only(tmp_path: Path) -> None:
    got = _read_all(put(tmp_path, "m.safetensors", valid_file()))
    weight = got["fc.weight"]
    assert not weight.flags.writeable and not weight.flags.owndata
    assert weight.flags.aligned


def test_misaligned_data_is_copied_to_aligned_arrays(tmp_path: Path) -> None:
    values = np.array([1.5, -2.25], "<f4")
    raw = pack(
        {"a": entry("U8", [1], 0, 1), "b": entry("F32", [2], 1, 9)}, b"\x09" + values.tobytes()
    )
    path = put(tmp_path, "m.safetensors", raw)
    got = _read_all(path)
    assert got["b"].flags.aligned
    np.testing.assert_array_equal(got["b"], values)
    np.testing.assert_array_equal(safetensors.numpy.load_file(path)["b"], values)


def test_source_files_from_another_thread_while_iterating(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tensors = {f"layer{i}.weight": rng.normal(size=(64, 64)).astype("<f4") for i in range(40)}
    path = tmp_path / "m.safetensors"
    sft.write(tensors, path)
    source = sft.read(path)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(source.source_files()))
    seen = []
    for i, record in enumerate(source.records()):
        if i == 3:
            worker.start()
        seen.append(float(record.data.sum()))
    worker.join()
    assert len(seen) == 40
    assert result == [source.source_files()]
    assert source.source_files()[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rss_stays_flat_while_reading_tensor_by_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psutil = pytest.importorskip("psutil")
    chunk = np.ones((1 << 20,), "<f4")  # 4 MiB
    path = tmp_path / "big.safetensors"
    sft.write({f"t{i:02d}": chunk for i in range(32)}, path)  # 128 MiB
    proc = psutil.Process()

    def peak_growth() -> int:
        source = sft.read(path)
        base = proc.memory_info().rss
        peak = base
        for record in source.records():
            assert float(record.data[::1024].sum()) == 1024.0  # touch every page
            peak = max(peak, proc.memory_info().rss)
        source.close()
        return peak - base

    assert peak_growth() < 40 << 20
    # Not a vacuous check: without releasing pages the same loop maps the whole file.
    monkeypatch.setattr(sft, "_drop", lambda *args: None)
    assert peak_growth() > 64 << 20


def test_source_changed_after_read_is_reported(tmp_path: Path) -> None:
    path = put(tmp_path, "m.safetensors", valid_file())
    source = sft.read(path)
    path.write_bytes(valid_file())  # same size, new mtime/inode not guaranteed: force mtime
    os.utime(path, ns=(1, 1))
    with pytest.raises(FormatError, match=r"m\.safetensors: file changed since it was read"):
        source.source_files()


# ---- sharded checkpoints ----


def _sharded(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    tensors = {f"layers.{i}.weight": rng.normal(size=(4, 3)).astype("<f4") for i in range(6)}
    tensors["embed.weight"] = rng.normal(size=(10, 4)).astype(ml_dtypes.bfloat16)
    names = sorted(tensors)
    weight_map = {}
    for k in range(3):
        shard = f"model-{k + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[k::3]}
        sft.write(part, folder / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_sharded_checkpoint(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    for path in (tmp_path, tmp_path / "model.safetensors.index.json"):
        source = sft.read(path)
        got = {r.name: r for r in source.records()}
        assert set(got) == set(tensors)
        for name, want in tensors.items():
            assert raw_bytes(got[name].data) == raw_bytes(want)
        assert got["embed.weight"].kind == "embedding"
        files = source.source_files()
        assert [f.name for f in files] == [
            "model.safetensors.index.json",
            *(f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)),
        ]
        for f in files:
            assert f.sha256 == hashlib.sha256((tmp_path / f.name).read_bytes()).hexdigest()
        meta = source.metadata()
        assert meta["shards"] == 3 and meta["metadata"] == {"format": "pt"}
        assert meta["index_metadata"] == {"total_size": 1}


def _index(folder: Path, weight_map: dict[str, str]) -> Path:
    path = folder / "ckpt" / "model.safetensors.index.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", "a\x00.safetensors",
     "..\\outside.safetensors", "C:\\outside.safetensors"],
    ids=["dotdot", "nested-dotdot", "absolute", "nul", "backslash", "drive"],
)  # fmt: skip
def test_shard_names_cannot_leave_the_folder(tmp_path: Path, shard: str) -> None:
    put(tmp_path, "outside.safetensors", valid_file())
    if shard == "ABS":
        shard = str(tmp_path / "outside.safetensors")
    index = _index(tmp_path, {"fc.weight": shard})
    with pytest.raises(
        PathEscapeError, match=r"model\.safetensors\.index\.json: tensor 'fc.weight'"
    ):
        sft.read(index)


def test_symlinked_shard_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    put(tmp_path, "outside.safetensors", valid_file())
    index = _index(
        tmp_path, dict.fromkeys(["fc.weight", "fc.bias", "empty", "step"], "a.safetensors")
    )
    (index.parent / "a.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(PathEscapeError, match=r"shard 'a.safetensors'.*outside"):
        sft.read(index)
    (index.parent / "a.safetensors").unlink()  # a link that stays inside is fine
    put(index.parent, "real.safetensors", valid_file())
    (index.parent / "a.safetensors").symlink_to("real.safetensors")
    assert sft.read(index).names() == ["fc.weight", "fc.bias", "empty", "step"]


def test_weight_map_and_shards_must_agree(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    sft.write({"a": np.zeros(2), "b": np.zeros(2)}, put(folder, "s1.safetensors", b""))
    sft.write({"c": np.zeros(2)}, folder / "s2.safetensors")
    with pytest.raises(FormatError, match=r"tensor 'b': present in shard 's1.safetensors' but"):
        sft.read(_index(tmp_path, {"a": "s1.safetensors", "c": "s2.safetensors"}))
    with pytest.raises(FormatError, match=r"tensor 'x': listed in the weight_map for shard 's2"):
        sft.read(_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors",
                                   "c": "s2.safetensors", "x": "s2.safetensors"}))  # fmt: skip
    sft.write({"a": np.zeros(2), "c": np.zeros(2)}, folder / "s2.safetensors")
    with pytest.raises(FormatError, match=r"tensor 'a': found in shard 's1.safetensors' and again"):
        sft.read(_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors",
                                   "c": "s2.safetensors"}))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("[1]", FormatError, "expected a JSON object, found list"),
        ('{"weight_map": []}', FormatError, "expected a 'weight_map' object"),
        ('{"weight_map": {"a": 3}}', FormatError, "tensor 'a': expected a shard file name"),
        ('{"weight_map": {}, "weight_map": {}}', FormatError, "repeats the key 'weight_map'"),
        ("{", FormatError, "index is not valid JSON"),
    ],
)
def test_bad_index_files(tmp_path: Path, text: str, error: type, message: str) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(text)
    with pytest.raises(error, match=rf"model\.safetensors\.index\.json: .*{message}"):
        sft.read(path)


def test_shard_header_failure_names_the_shard(tmp_path: Path) -> None:
    put(tmp_path, "ckpt/s1.safetensors", valid_file()[:-1])
    with pytest.raises(FormatError, match=r"ckpt/s1\.safetensors: tensor data ends"):
        sft.read(_index(tmp_path, {"fc.weight": "s1.safetensors"}))


# ---- every validation failure, one hand-made file each ----

F32_A = '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
FOUR = b"\0" * 4


def _one(info: object, data: bytes = FOUR) -> bytes:
    return pack({"a": info}, data)


BAD_FILES = {
    # id: (file bytes, error, regex that follows "bad.safetensors: ")
    "shorter-than-8": (b"\x01\x02\x03", FormatError, "file has 3 bytes, .* at least 8"),
    "header-over-limit": (
        pack("{}", n=100_000_001),
        ResourceLimitError,
        "header length 100000001 bytes exceeds the limit of 100000000",
    ),
    "header-u64-max": (
        pack("{}", n=2**64 - 1),
        ResourceLimitError,
        "header length 18446744073709551615 bytes exceeds the limit",
    ),
    "header-past-end": (
        pack("{}", n=1000),
        FormatError,
        "header length 1000 bytes runs past the end of the file: expected at most 8, found 1000",
    ),
    "not-utf8": (pack(b'{"\xff":{}}'), FormatError, "header is not valid UTF-8"),
    "not-json": (pack('{"a":'), FormatError, "header is not valid JSON"),
    "nan-constant": (
        pack('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}', FOUR),
        FormatError,
        "header is not valid JSON: NaN",
    ),
    "deep-nesting": (pack("[" * 100_000), FormatError, "header is nested too deeply"),
    "huge-integer": (
        pack('{"a":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}', FOUR),
        FormatError,
        "header is not valid JSON",
    ),
    "not-an-object": (
        pack("[]"),
        FormatError,
        "expected the header to be a JSON object, found list",
    ),
    "duplicate-tensor": (
        pack("{" + F32_A + "," + F32_A + "}", FOUR),
        FormatError,
        "tensor 'a': appears twice in the header; duplicate keys are not allowed",
    ),
    "duplicate-field": (
        pack('{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', FOUR),
        FormatError,
        "header repeats the key 'dtype' in one object",
    ),
    "metadata-not-object": (
        pack({"__metadata__": ["x"]}),
        FormatError,
        r"expected __metadata__ to map strings to strings, found \['x'\]",
    ),
    "metadata-not-str": (
        pack({"__metadata__": {"k": 1}}),
        FormatError,
        "expected __metadata__ to map strings to strings, found {'k': 1}",
    ),
    "entry-not-object": (_one([1]), FormatError, "tensor 'a': expected an object, found list"),
    "entry-extra-key": (
        _one({**entry("F32", [1], 0, 4), "x": 1}),
        FormatError,
        "tensor 'a': expected exactly the keys dtype, shape, data_offsets, found .*'x'",
    ),
    "entry-missing-key": (
        _one({"dtype": "F32", "shape": [1]}),
        FormatError,
        "tensor 'a': expected exactly the keys dtype, shape, data_offsets, found 'dtype', 'shape'",
    ),
    "unknown-dtype": (
        _one(entry("F8_E8M0", [4], 0, 4)),
        UnsupportedError,
        "tensor 'a': dtype 'F8_E8M0' is not supported; expected one of BOOL, U8",
    ),
    "complex-dtype": (
        _one(entry("C64", [1], 0, 8)),
        UnsupportedError,
        "tensor 'a': dtype 'C64' is not supported",
    ),
    "dtype-not-string": (
        _one({**entry("F32", [1], 0, 4), "dtype": 4}),
        FormatError,
        "tensor 'a': expected dtype to be a string, found 4",
    ),
    "shape-not-list": (
        _one({**entry("F32", [1], 0, 4), "shape": 1}),
        ShapeError,
        "tensor 'a': expected shape to be a list of non-negative ints, found 1",
    ),
    "shape-negative": (
        _one(entry("F32", [-1], 0, 4)),
        ShapeError,
        r"tensor 'a': expected shape to be .*, found \[-1\]",
    ),
    "shape-float": (
        _one({**entry("F32", [1], 0, 4), "shape": [1.0]}),
        ShapeError,
        r"tensor 'a': expected shape to be .*, found \[1.0\]",
    ),
    "shape-bool": (
        _one({**entry("F32", [1], 0, 4), "shape": [True]}),
        ShapeError,
        r"tensor 'a': expected shape to be .*, found \[True\]",
    ),
    "rank-65": (
        _one(entry("F32", [1] * 65, 0, 4)),
        ShapeError,
        "tensor 'a': shape has 65 dimensions, at most 64 allowed",
    ),
    "shape-overflow": (  # wraps to 4 elements in unchecked uint64 arithmetic
        _one(entry("F32", [4194305, 4194305, 211106198978564], 0, 16), b"\0" * 16),
        ShapeError,
        r"tensor 'a': data_offsets \[0, 16\] hold 16 bytes, shape \[4194305, 4194305, "
        rf"211106198978564\] float32 needs {4194305 * 4194305 * 211106198978564 * 4}",
    ),
    "size-mismatch": (
        _one(entry("F32", [2, 3], 0, 16), b"\0" * 16),
        ShapeError,
        r"tensor 'a': data_offsets \[0, 16\] hold 16 bytes, shape \[2, 3\] float32 needs 24",
    ),
    "offsets-one-int": (
        _one({**entry("F32", [1], 0, 4), "data_offsets": [4]}),
        FormatError,
        r"tensor 'a': expected data_offsets to be two non-negative ints .*, found \[4\]",
    ),
    "offsets-three-ints": (
        _one({**entry("F32", [1], 0, 4), "data_offsets": [0, 4, 4]}),
        FormatError,
        r"tensor 'a': expected data_offsets .*, found \[0, 4, 4\]",
    ),
    "offsets-negative": (
        _one(entry("F32", [1], -4, 0)),
        FormatError,
        r"tensor 'a': expected data_offsets .*, found \[-4, 0\]",
    ),
    "offsets-float": (
        _one({**entry("F32", [1], 0, 4), "data_offsets": [0, 4.0]}),
        FormatError,
        r"tensor 'a': expected data_offsets .*, found \[0, 4.0\]",
    ),
    "offsets-reversed": (
        pack({"a": entry("F32", [0], 4, 0)}, FOUR),
        FormatError,
        r"tensor 'a': data_offsets \[4, 0\]: expected begin <= end",
    ),
    "first-not-at-zero": (
        _one(entry("F32", [1], 4, 8), b"\0" * 8),
        FormatError,
        r"tensor 'a': data_offsets \[4, 8\]: expected the first tensor to begin at 0, found 4",
    ),
    "gap": (
        pack({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12),
        FormatError,
        r"tensor 'b': data_offsets \[8, 12\]: gap of 4 bytes after tensor 'a' \(which ends at 4\): "
        "expected begin 4, found 8",
    ),
    "overlap": (
        pack({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, b"\0" * 8),
        FormatError,
        r"tensor 'b': data_offsets \[4, 8\]: overlap with tensor 'a' \(which ends at 8\): "
        "expected begin 8, found 4",
    ),
    "trailing-bytes": (  # a polyglot payload after the data
        _one(entry("F32", [1], 0, 4), b"\0" * 5) + b"<script>",
        FormatError,
        "tensor data ends at byte 4 of the data section, the file holds 13 bytes after the "
        r"header: expected 4, found 13 \(trailing bytes after the last tensor\)",
    ),
    "data-truncated": (
        _one(entry("F32", [2], 0, 8)),
        FormatError,
        r"tensor data ends at byte 8 .*: expected 8, found 4 \(truncated\)",
    ),
    "empty-name": (
        pack({"": entry("F32", [1], 0, 4)}, FOUR),
        FormatError,
        "tensor '': expected a non-empty name",
    ),
    "nul-in-name": (
        pack({"a\x00b": entry("F32", [1], 0, 4)}, FOUR),
        FormatError,
        r"tensor 'a\\x00b': expected a non-empty name without NUL",
    ),
    "lone-surrogate-name": (
        pack('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', FOUR),
        FormatError,
        "tensor name '.ud800' is not valid UTF-8",
    ),
}


#: Files the reference reader (safetensors 0.8) accepts and weightatlas refuses on purpose.
STRICTER_THAN_REFERENCE = {
    "duplicate-tensor",  # TOB-SFTN-7: parsers disagree on which duplicate wins
    "entry-extra-key",
    "rank-65",
    "empty-name",
    "nul-in-name",
}


@pytest.mark.parametrize(("case", "raw", "error", "message"),
                         [(k, *v) for k, v in BAD_FILES.items()], ids=list(BAD_FILES))  # fmt: skip
def test_malformed_file(tmp_path: Path, case: str, raw: bytes, error: type, message: str) -> None:
    path = put(tmp_path, "bad.safetensors", raw)
    with pytest.raises(error, match=rf"/bad\.safetensors: {message}") as info:
        sft.read(path)
    assert type(info.value) is error
    if case in STRICTER_THAN_REFERENCE:
        safetensors.torch.load(raw)
    else:
        with pytest.raises(Exception, match=r"."):  # the reference refuses it too
            safetensors.torch.load(raw)


def test_truncated_real_file(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file(model.state_dict(), full)
    cut = put(tmp_path, "cut.safetensors", full.read_bytes()[:-1])
    with pytest.raises(FormatError, match=r"cut\.safetensors: tensor data ends .* \(truncated\)"):
        sft.read(cut)
    header_cut = put(tmp_path, "hcut.safetensors", full.read_bytes()[:20])
    with pytest.raises(FormatError, match=r"hcut\.safetensors: header length \d+ bytes runs past"):
        sft.read(header_cut)


def test_tensor_count_limits(tmp_path: Path) -> None:
    four = {f"t{i}": np.zeros(1, "<f4") for i in range(4)}
    sft.write(four, tmp_path / "four.safetensors")
    with pytest.raises(ResourceLimitError, match=r"four\.safetensors: header lists .*3"):
        sft.read(tmp_path / "four.safetensors", max_tensors=3)
    assert len(sft.read(tmp_path / "four.safetensors", max_tensors=4).names()) == 4
    many = ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(200_000)
    )
    path = put(tmp_path, "many.safetensors", pack("{" + many + "}", b"\0" * 200_000))
    with pytest.raises(
        ResourceLimitError, match=r"many\.safetensors: header lists more than 150000"
    ):
        sft.read(path)
    with pytest.raises(
        ResourceLimitError, match=r"header length \d+ bytes exceeds the limit of 1000"
    ):
        sft.read(path, max_header_bytes=1000)
    # Keys written with JSON escapes slip past a byte count; counting objects as they are
    # built still refuses the header before all of it is built.
    escaped = ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offset\\u0073":[{i},{i + 1}]}}'
        for i in range(200_000)
    )
    path = put(tmp_path, "escaped.safetensors", pack("{" + escaped + "}", b"\0" * 200_000))
    with pytest.raises(ResourceLimitError, match=r"escaped\.safetensors: header holds more "
                       r"than 150002 JSON objects"):
        sft.read(path)


def test_missing_and_odd_paths(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nope\.safetensors: no such file"):
        sft.read(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match=r"empty: expected model\.safetensors"):
        sft.read(tmp_path / "empty")
    put(tmp_path, "two/a.safetensors", valid_file())
    put(tmp_path, "two/b.safetensors", valid_file())
    with pytest.raises(NotFoundError, match=r"found 2 candidates \(a\.safetensors, b\.safetens"):
        sft.read(tmp_path / "two")
    put(tmp_path, "one/weights.safetensors", valid_file())
    assert sft.read(tmp_path / "one").label == "weights.safetensors"
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(UnsafeInputError, match=r"fifo\.safetensors: expected a regular file"):
        sft.read(tmp_path / "fifo.safetensors")


# ---- properties ----

SEED_FILE = valid_file()


@_fuzz(300)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(SEED_FILE) - 1), st.integers(0, 255)), min_size=0, max_size=4
    ),
    cut=st.none() | st.integers(0, len(SEED_FILE)),
)
def test_mutants_raise_only_weightatlas_errors(
    tmp_path: Path, flips: list[tuple[int, int]], cut: int | None
) -> None:
    raw = bytearray(SEED_FILE)
    for at, byte in flips:
        raw[at] = byte
    raw = raw[:cut] if cut is not None else raw
    path = put(tmp_path, "mutant.safetensors", bytes(raw))
    try:
        source = sft.read(path)
        got = {r.name: (r.dtype, r.shape, raw_bytes(r.data)) for r in source.records()}
        source.source_files()
    except WeightAtlasError:
        return
    # Whatever we accept, the reference accepts too, with the same contents.
    ref = safetensors.torch.load(bytes(raw))
    assert set(ref) == set(got)
    for name, tensor in ref.items():
        assert got[name][1] == tuple(tensor.shape)
        assert got[name][2] == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_NAMES = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=8
).filter(lambda s: s != "__metadata__")


@_fuzz(60)
@given(
    spec=st.dictionaries(
        _NAMES,
        st.tuples(
            st.sampled_from(list(CODES)),
            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
            st.integers(0, 2**32 - 1),
        ),
        max_size=6,
    ),
    metadata=st.none() | st.dictionaries(_NAMES, _NAMES, max_size=3),
)
def test_write_read_round_trip(
    tmp_path: Path,
    spec: dict[str, tuple[str, tuple[int, ...], int]],
    metadata: dict[str, str] | None,
) -> None:
    tensors = {
        name: _random(CODES[code], shape, seed) for name, (code, shape, seed) in spec.items()
    }
    path = tmp_path / "rt.safetensors"
    sft.write(tensors, path, metadata)
    source = sft.read(path)
    got = {r.name: r.data for r in source.records()}
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        assert raw_bytes(got[name]) == raw_bytes(want)
    assert source.metadata()["metadata"] == (metadata or {})
    ref = safetensors.torch.load(path.read_bytes())
    for name, want in tensors.items():
        assert ref[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == raw_bytes(
            want
        )


# ---- the registry ----


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("m.onnx", "onnx"),
        ("m.pt", "torch"),
        ("m.pth", "torch"),
        ("pytorch_model.bin", "torch"),
        ("flax_model.msgpack", "flax_msgpack"),
    ],
)
def test_other_formats_are_routed_to_their_adapters(tmp_path: Path, name: str, fmt: str) -> None:
    path = put(tmp_path, name, b"\0" * 16)
    assert detect_format(path) == fmt
    # 16 zero bytes are no checkpoint of any format: the adapter says so, naming the file.
    with pytest.raises(FormatError, match=re.escape(str(path))):
        open_source(path)


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(put(tmp_path, "m.safetensors", valid_file())) == "safetensors"
    assert detect_format(tmp_path) == "safetensors"
    no_suffix = put(tmp_path, "weights", valid_file())
    assert detect_format(no_suffix) == "safetensors"
    assert next(r.name for r in open_source(no_suffix).records()) == "fc.weight"
    _sharded(put(tmp_path, "sharded/x", b"").parent)
    assert detect_format(tmp_path / "sharded" / "model.safetensors.index.json") == "safetensors"
    assert len(list(open_source(tmp_path / "sharded").records())) == 7
    assert detect_format(put(tmp_path, "archive", b"PK\x03\x04" + b"\0" * 20)) == "torch"
    with pytest.raises(UnsupportedError, match=r"notes\.txt: unknown format; supported: \.safet"):
        detect_format(put(tmp_path, "notes.txt", b"hello world"))
    with pytest.raises(NotFoundError, match=r"absent\.safetensors: no such file"):
        detect_format(tmp_path / "absent.safetensors")
    (tmp_path / "void").mkdir()
    with pytest.raises(UnsupportedError, match=r"void: no checkpoint found in this folder"):
        open_source(tmp_path / "void")


def test_importing_adapters_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, weightatlas.adapters, weightatlas.adapters.safetensors; "
        "bad = {'torch', 'jax', 'onnx', 'safetensors'} & set(sys.modules); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
