"""Round trips through the store: exact bytes, exact schema, layouts, chunks, alignment."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weightatlas.errors import NotFoundError, ShapeError, StoreError, UnsupportedError
from weightatlas.storage import (
    ALIGNMENT,
    DTYPES,
    SCHEMA,
    RecordsSource,
    Snapshot,
    Store,
    TensorRecord,
)

ALL_DTYPES = list(DTYPES)


def _random(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dt = DTYPES[dtype]
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    # Every bit pattern of the float type, NaN and Inf included.
    raw = rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_DTYPES)
def test_every_dtype_round_trips_bit_exact(store: Store, rng: np.random.Generator, dtype: str):
    data = _random(dtype, (17, 5), rng)
    snap = store.write(RecordsSource([TensorRecord("t", data)]), "m")
    back = snap.read("t")
    assert back.dtype == np.dtype(DTYPES[dtype])
    assert back.shape == (17, 5)
    assert back.tobytes() == data.tobytes()
    assert snap.info("t").dtype == dtype


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    chunk_bytes=st.sampled_from([1, 7, 64, 1 << 20]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_shape_and_chunking_round_trips(tmp_path_factory, dtype, shape, chunk_bytes, seed):
    store = Store(tmp_path_factory.mktemp("s") / "store", create=True)
    data = _random(dtype, shape, np.random.default_rng(seed))
    snap = store.write(RecordsSource([TensorRecord("a.b", data)]), "m", chunk_bytes=chunk_bytes)
    back = snap.read("a.b")
    assert back.shape == data.shape
    assert back.tobytes() == data.tobytes()
    assert snap.verify() == []


def test_schema_is_exactly_the_documented_one(store: Store):
    snap = store.write(RecordsSource([TensorRecord("w", np.ones(3, np.float32))]), "m")
    with pa.memory_map(snap.path) as mm:
        schema = pa.ipc.open_file(mm).schema
    assert schema.remove_metadata() == SCHEMA
    assert [f.name for f in schema] == [
        "model", "step", "tag", "name", "source_name", "module", "param", "kind", "dtype",
        "shape", "layout", "source_layout", "source_shape", "chunk", "n_chunks", "row_start",
        "row_count", "nbytes", "numel", "mean", "std", "min", "max", "abs_max", "l2",
        "frac_zero", "n_nan", "n_inf", "attrs", "checksum", "pad", "data",
    ]
    meta = json.loads(schema.metadata[b"weightatlas"])
    for key in ("model", "step", "tag", "framework", "source_file", "source_sha256", "created",
                "package_version", "format_version", "content_digest", "file_checksum"):
        assert key in meta, key
    assert meta["format"] == "weightatlas.snapshot" and meta["format_version"] == 2


def test_every_data_value_starts_64_byte_aligned(store: Store, rng: np.random.Generator):
    records = [
        TensorRecord(f"layer{i}.w" + "x" * (i * 3), rng.standard_normal(i * 13 + 1).astype(dt))
        for i, dt in enumerate([np.float32, np.float16, np.int8, np.float64, np.uint8] * 4)
    ]
    snap = store.write(RecordsSource(records), "m", chunk_bytes=40)
    with open(snap.path, "rb") as f:
        raw = f.read()
    assert snap.metadata["n_rows"] > len(records)  # some tensors were chunked
    with pa.memory_map(snap.path) as mm:
        base = mm.read_buffer(1).address
        reader = pa.ipc.open_file(mm)
        for i in range(reader.num_record_batches):
            values = reader.get_batch(i).column("data").buffers()[2]
            offset = values.address - base
            assert offset % ALIGNMENT == 0
            # The file really holds the row's bytes at that offset.
            assert raw[offset : offset + values.size] == values.to_pybytes()


def test_single_chunk_read_is_zero_copy_view_of_the_file(store: Store, rng):
    data = rng.standard_normal((64, 32)).astype(np.float32)
    snap = store.write(RecordsSource([TensorRecord("w", data)]), "m")
    a = snap.read("w")
    assert not a.flags.writeable and not a.flags.owndata
    assert a.ctypes.data % ALIGNMENT == 0
    b = snap.read("w")
    assert a.ctypes.data == b.ctypes.data  # both views of the same mapped bytes


def test_chunked_tensor_comes_back_whole(store: Store, rng):
    data = rng.standard_normal((1000, 30)).astype(np.float32)
    snap = store.write(RecordsSource([TensorRecord("emb", data, kind="embedding",
                                                   layout=("vocab", "dim"))]),
                       "m", chunk_bytes=30 * 4 * 128)
    rows = snap.rows().to_pylist()
    assert [r["chunk"] for r in rows] == list(range(8))
    assert [r["row_start"] for r in rows] == list(range(0, 1000, 128))
    assert sum(r["row_count"] for r in rows) == 1000
    assert all(r["n_chunks"] == 8 for r in rows)
    np.testing.assert_array_equal(snap.read("emb"), data)
    # Statistics on every chunk row are the whole tensor's.
    means = {r["mean"] for r in rows}
    assert len(means) == 1
    assert means.pop() == pytest.approx(float(data.astype(np.float64).mean()), rel=1e-12)
    assert snap.tensors().column("nbytes")[0].as_py() == data.nbytes


def test_chunks_never_exceed_the_element_cap(monkeypatch):
    from weightatlas.storage import _writer

    monkeypatch.setattr(_writer, "MAX_CHUNK_ELEMENTS", 100)
    assert _writer.chunk_rows((50, 10), 1, 1 << 30) == [(0, 10), (10, 10), (20, 10), (30, 10),
                                                        (40, 10)]
    with pytest.raises(ShapeError, match="one slice along the first axis holds 101 elements"):
        _writer.chunk_rows((2, 101), 1, 1 << 30)


def test_source_layout_is_restored_exactly(store: Store, rng):
    flax_kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)  # HWIO
    canonical = flax_kernel.transpose(3, 2, 0, 1)  # OIHW, a strided view
    dense = rng.standard_normal((5, 7)).astype(np.float32)  # [in, out]
    rec = TensorRecord("conv.kernel", canonical, kind="conv2d", layout=("out", "in", "h", "w"),
                       source_layout=("h", "w", "in", "out"))
    rec2 = TensorRecord("fc.kernel", dense.T, kind="linear", layout=("out", "in"),
                        source_layout=("in", "out"))
    snap = store.write(RecordsSource([rec, rec2]), "m")
    np.testing.assert_array_equal(snap.read("conv.kernel"), canonical)
    assert snap.read("conv.kernel").flags.c_contiguous
    assert snap.read("conv.kernel", layout="source").tobytes() == flax_kernel.tobytes()
    assert snap.read("fc.kernel", layout="source").tobytes() == dense.tobytes()
    info = snap.info("conv.kernel")
    assert info.layout == ("out", "in", "h", "w")
    assert info.source_shape == (3, 3, 4, 8)


def test_source_shape_for_fused_axes(store: Store, rng):
    fused = rng.standard_normal((6, 4)).astype(np.float32)  # source [in, heads*head_dim]
    canonical = fused.reshape(6, 2, 2)  # [in, heads, head_dim]
    rec = TensorRecord("attn.q", canonical, kind="attention", layout=("in", "heads", "head_dim"),
                       source_layout=("in", "qkv"), source_shape=(6, 4))
    snap = store.write(RecordsSource([rec]), "m")
    assert snap.read("attn.q", layout="source").tobytes() == fused.tobytes()


def test_big_endian_input_is_stored_little_endian(store: Store):
    data = np.arange(6, dtype=">f4").reshape(2, 3)
    snap = store.write(RecordsSource([TensorRecord("w", data)]), "m")
    back = snap.read("w")
    assert back.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back, data)


def test_module_param_kind_and_attrs(store: Store):
    rec = TensorRecord("layer1.0.conv2.weight", np.zeros((4, 2, 3, 3), np.float32),
                       kind="conv2d", layout=("out", "in", "h", "w"), attrs={"groups": 2})
    snap = store.write(RecordsSource([rec]), "m")
    row = snap.tensors().to_pylist()[0]
    assert (row["module"], row["param"], row["kind"]) == ("layer1.0.conv2", "weight", "conv2d")
    assert json.loads(row["attrs"]) == {"groups": 2}
    assert row["source_name"] == "layer1.0.conv2.weight"


def test_bad_records_are_refused_with_clear_errors():
    with pytest.raises(ShapeError, match="layout \\['out'\\] names 1 axes, data has 2"):
        TensorRecord("w", np.zeros((2, 2)), layout=("out",))
    with pytest.raises(UnsupportedError, match="tensor 'w': kind 'dense' is not one of"):
        TensorRecord("w", np.zeros(2), kind="dense")
    with pytest.raises(UnsupportedError, match="dtype complex64 cannot be stored"):
        TensorRecord("w", np.zeros(2, np.complex64))
    with pytest.raises(ShapeError, match="source shape \\[3\\] holds 3 values, data has 2"):
        TensorRecord("w", np.zeros(2), source_shape=(3,))
    with pytest.raises(ShapeError, match="non-empty string"):
        TensorRecord("", np.zeros(2))


def test_duplicate_names_in_a_source_are_refused(store: Store):
    recs = [TensorRecord("w", np.zeros(2)), TensorRecord("w", np.ones(2))]
    with pytest.raises(StoreError, match="tensor 'w' appears twice"):
        store.write(RecordsSource(recs), "m")
    assert store.snapshots() == []


def test_missing_tensor_suggests_close_names(store: Store):
    snap = store.write(RecordsSource([TensorRecord("fc1.weight", np.zeros(2))]), "m")
    with pytest.raises(NotFoundError,
                       match=r"no tensor 'fc1\.weights'; did you mean 'fc1\.weight'"):
        snap.read("fc1.weights")


def test_arrays_outlive_the_snapshot_they_came_from(store: Store, rng):
    data = rng.standard_normal(1000).astype(np.float32)
    path = store.write(RecordsSource([TensorRecord("w", data)]), "m").path
    with Snapshot(path) as snap:
        a = snap.read("w")
    np.testing.assert_array_equal(a, data)


def test_notebook_html_escapes_names(store: Store):
    recs = [TensorRecord("</script><script>alert(1)</script>", np.ones(3, np.float32)),
            TensorRecord("fc.weight", np.full((2, 2), 0.5, np.float32))]
    html = store.write(RecordsSource(recs), "m")._repr_html_()
    assert "<script>" not in html and "&lt;/script&gt;" in html
    assert "<td>fc.weight</td>" in html and "<td>2×2</td>" in html and "<td>0.5</td>" in html
