"""The writer's fast paths: tiled C-order copies, one-pass statistics and checksums of
strided tensors, and pass 2 prepared on a worker thread.

Every check compares against an independent reference: NumPy's own C-order copy
(``np.ascontiguousarray``), ``xxhash`` over those bytes, a float64 NumPy reference for
the statistics, and what the store reads back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest
import xxhash

from weightatlas.errors import IntegrityError
from weightatlas.storage import RecordsSource, SourceFile, Store, TensorRecord, _stats, tensor_stats
from weightatlas.storage._blocks import c_blocks, copy_c_order
from weightatlas.storage._commit import STAGING

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.uint8, np.bool_,
          np.int64]


def canonical_bytes(a: np.ndarray) -> bytes:
    """The reference: NumPy's C-order copy, little-endian."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def strided_cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    base = rng.standard_normal((300, 517)) * 3
    stack = rng.standard_normal((3, 70, 129))
    conv = rng.standard_normal((3, 3, 24, 40))  # [h, w, in, out]
    return [
        ("transposed", base.T),
        ("transposed-slice", base.T[5:260, 11:]),
        ("stack-of-transposed", np.swapaxes(stack, -1, -2)),
        ("conv-hwio-to-oihw", conv.transpose(3, 2, 0, 1)),
        ("every-other-row", base[::2]),
        ("one-column", base[:, 7:8].T),
        ("contiguous", base),
        ("empty-rows", base.T[:0]),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_copy_c_order_equals_numpys_copy(rng, dtype):
    for name, a in strided_cases(rng):
        src = a.astype(dtype)  # order "K": a transposed view stays transposed
        dst = np.empty(src.shape, src.dtype)
        copy_c_order(dst, src)
        assert dst.tobytes() == canonical_bytes(src), name


def test_copy_c_order_tiles_cover_every_edge(rng):
    for rows, cols in [(1, 1), (2, 2), (127, 33), (128, 32), (129, 31), (257, 65), (3, 1000)]:
        a = rng.standard_normal((cols, rows)).astype(np.float32).T  # [rows, cols], transposed
        dst = np.full(a.shape, np.nan, np.float32)
        copy_c_order(dst, a)
        np.testing.assert_array_equal(dst, a)
    with pytest.raises(ValueError, match="shapes differ"):
        copy_c_order(np.empty((2, 3)), np.empty((3, 2)))


@pytest.mark.parametrize("size", [1, 7, 1000, 1 << 18])
def test_c_blocks_are_the_array_in_c_order(rng, size):
    cases = [
        *strided_cases(rng),
        ("big-endian", (rng.standard_normal((40, 30)) * 10).astype(">f4")),
        ("big-endian-transposed", rng.standard_normal((40, 30)).astype(">f8").T),
        ("0-d", np.array(2.5, np.float32)),
        ("0-d-big-endian", np.array(-1, ">i4")),
    ]
    for name, a in cases:
        parts, expect = [], 0
        for offset, block in c_blocks(a, size):
            assert offset == expect, name
            assert block.ndim == 1 and block.flags.c_contiguous and block.dtype.byteorder != ">"
            parts.append(block.tobytes())
            expect += block.size
        assert expect == a.size, name
        assert b"".join(parts) == canonical_bytes(a), name


def reference_stats(a: np.ndarray) -> dict:
    x = np.asarray(a, np.float64).reshape(-1)
    return {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
            "l2": np.sqrt((x * x).sum()), "frac_zero": float((x == 0).mean())}


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 4096, 1000], ids=["one-chunk", "4k", "1000b"])
@pytest.mark.parametrize("block", [1 << 18, 1000], ids=["block-256k", "block-1000"])
def test_strided_tensors_are_stored_as_their_c_order_bytes(tmp_path, rng, monkeypatch,
                                                           chunk_bytes, block):
    """Blocks straddle chunk boundaries (block 1000, rows of 517 or 300 values): each chunk's
    checksum is still that of its own bytes, and the statistics those of the whole tensor."""
    monkeypatch.setattr(_stats, "BLOCK", block)
    store = Store(tmp_path / "store", create=True)
    base = (rng.standard_normal((300, 517)) * 2 + 0.5).astype(np.float32)
    records = [TensorRecord("up.weight", base.T, kind="linear", layout=("out", "in"),
                            source_layout=("in", "out")),
               TensorRecord("plain.weight", base),
               TensorRecord("bf16.weight", base.astype(ml_dtypes.bfloat16)[:, ::3].T),
               TensorRecord("scalar", np.array(3.0, ">f8"))]
    snap = store.write(RecordsSource(records), "m", chunk_bytes=chunk_bytes)
    stat_keys = ("mean", "std", "min", "max", "abs_max", "l2", "frac_zero", "n_nan", "n_inf")
    for rec in records:
        got = snap.read(rec.name)
        assert got.tobytes() == canonical_bytes(rec.data), rec.name
        info = snap.info(rec.name)
        want = reference_stats(rec.data)
        assert info.l2 == pytest.approx(want["l2"], rel=1e-12), rec.name
        assert info.std == pytest.approx(want["std"], rel=1e-9, abs=1e-15), rec.name
        assert info.mean == pytest.approx(want["mean"], rel=1e-9, abs=1e-12), rec.name
        assert (info.min, info.max) == (want["min"], want["max"]), rec.name
        # The stored statistics are tensor_stats of the tensor, bit for bit.
        ts = tensor_stats(rec.data).as_dict()
        assert {k: getattr(info, k) for k in stat_keys} == {k: ts[k] for k in stat_keys}
    # Each row's checksum against xxhash of that chunk's bytes, read without weightatlas.
    import pyarrow as pa

    with pa.memory_map(snap.path) as f:
        full = pa.ipc.open_file(f).read_all().to_pylist()
    by_name = {rec.name: rec for rec in records}
    n_chunks = {}
    for row in full:
        rec = by_name[row["name"]]
        data = rec.data if rec.data.ndim == 0 else rec.data[
            row["row_start"] : row["row_start"] + row["row_count"]]
        assert row["data"] == canonical_bytes(data)
        assert row["checksum"] == xxhash.xxh3_128(canonical_bytes(data)).hexdigest()
        n_chunks[row["name"]] = row["n_chunks"]
    if chunk_bytes == 1000:
        assert n_chunks["up.weight"] > 1 and n_chunks["plain.weight"] > 1
    snap.close()


@dataclass
class ChangingSource:
    """A source whose second reading differs from its first (a file edited mid-ingest)."""

    first: list[TensorRecord]
    second: list[TensorRecord]
    label: str = "changing"
    framework: str = "test"
    reads: int = 0
    threads: set[str] = field(default_factory=set)

    def records(self) -> Iterator[TensorRecord]:
        self.reads += 1
        self.threads.add(threading.current_thread().name)
        yield from (self.first if self.reads == 1 else self.second)

    def source_files(self) -> list[SourceFile]:
        return []

    def metadata(self) -> dict:
        return {}

    def nbytes(self) -> int:
        return sum(r.data.nbytes for r in self.first)

    def attachments(self) -> dict:
        return {}


def _no_writer_threads() -> bool:
    return not any(t.name == "weightatlas-writer" for t in threading.enumerate())


def _nothing_left(store: Store) -> bool:
    staging = os.path.join(store.root, STAGING)
    return (not os.path.isdir(staging) or not os.listdir(staging)) and not store.snapshots()


def test_a_tensor_that_changes_between_the_passes_is_refused(store: Store, rng):
    a = rng.standard_normal((64, 48)).astype(np.float32)
    b = a.copy()
    b[10, 3] += 1
    first = [TensorRecord("w0", a.T), TensorRecord("w1", a)]
    second = [TensorRecord("w0", a.T), TensorRecord("w1", b)]
    with pytest.raises(IntegrityError, match=r"changing: tensor 'w1' changed while it was being "
                                             "ingested"):
        store.write(ChangingSource(first, second), "m")
    assert _nothing_left(store) and _no_writer_threads()
    src = ChangingSource([TensorRecord("w0", a.T)], [TensorRecord("w0", b.T)])
    with pytest.raises(IntegrityError, match="tensor 'w0' changed"):
        store.write(src, "m")
    assert src.threads == {threading.current_thread().name, "weightatlas-writer"}


def test_missing_or_reordered_tensors_in_the_second_pass_are_refused(store: Store, rng):
    a = rng.standard_normal((8, 8)).astype(np.float32)
    r0, r1 = TensorRecord("w0", a), TensorRecord("w1", a.T)
    with pytest.raises(IntegrityError, match=r"tensor 'w1' missing"):
        store.write(ChangingSource([r0, r1], [r0]), "m")
    with pytest.raises(IntegrityError, match=r"tensor 'w1' out of place"):
        store.write(ChangingSource([r0, r1], [r1, r0]), "m")
    assert _nothing_left(store) and _no_writer_threads()


class Boom(RuntimeError):
    pass


def test_a_failure_while_writing_stops_the_worker_and_leaves_nothing(store: Store, rng):
    """An error in the writing thread (here: the progress callback) while the worker has
    the next row ready: the worker is stopped and joined, nothing is published."""
    records = [TensorRecord(f"w{i}", rng.standard_normal((40, 30)).astype(np.float32).T)
               for i in range(6)]
    calls = []

    def progress(phase: str, n: int, total: int) -> None:
        calls.append(phase)
        if phase == "write" and calls.count("write") == 2:
            raise Boom("disk on fire")

    with pytest.raises(Boom):
        store.write(RecordsSource(records), "m", progress=progress)
    assert _nothing_left(store) and _no_writer_threads()
    # The same store then writes the same tensors normally.
    snap = store.write(RecordsSource(records), "m")
    for r in records:
        np.testing.assert_array_equal(snap.read(r.name), r.data)
    snap.close()


def test_ingest_is_deterministic(tmp_path, rng):
    """Two ingests of one source give the same rows and digest, byte for byte apart from
    the time of ingest (and the file checksum that covers it)."""
    import pyarrow as pa

    records = [TensorRecord("a.weight", rng.standard_normal((90, 70)).astype(np.float32).T),
               TensorRecord("b.weight", rng.standard_normal((33,)).astype(np.float16))]
    tables, metas = [], []
    for k in range(2):
        snap = Store(tmp_path / f"s{k}", create=True).write(RecordsSource(records), "m")
        with pa.memory_map(snap.path) as f:
            tables.append(pa.ipc.open_file(f).read_all())
        metas.append(dict(snap.metadata))
        snap.close()
    assert tables[0].equals(tables[1])
    for k in ("created", "file_checksum"):
        metas[0].pop(k), metas[1].pop(k)
    assert metas[0] == metas[1]


def test_the_file_checksum_is_taken_while_writing(store: Store, rng, monkeypatch):
    """The whole-file XXH3 comes from the bytes as written (no read-back: reading is made
    to fail), and equals the digest of the file read back afterwards."""
    from weightatlas.storage import _integrity

    records = [TensorRecord("w", rng.standard_normal((50, 40)).astype(np.float32).T)]

    def no_reading(*args: object) -> str:
        raise AssertionError("the new file was read back")

    with monkeypatch.context() as m:
        m.setattr(_integrity, "_digest", no_reading)
        snap = store.write(RecordsSource(records), "m")
    stored, actual = _integrity.file_checksum(snap.path)
    assert stored == actual == snap.metadata["file_checksum"]
    assert snap.verify() == []
    snap.close()
    assert not _integrity._STREAMED


def test_a_file_changed_after_writing_is_hashed_again(tmp_path, rng):
    """finalize_file_checksum uses the streamed digest only for the very file it was taken
    of: a file rewritten since (other size and time) is read back instead."""
    from weightatlas.storage import _integrity, _writer

    values = rng.standard_normal((30, 20)).astype(np.float32)
    source = RecordsSource([TensorRecord("w", values)])
    plan = _writer.plan_snapshot(source, "m", 0, None, 1 << 20)
    meta = _writer.snapshot_metadata(plan, source, "m", 0, None, "2026-01-01T00:00:00", 1 << 20)
    meta["file_checksum"] = _integrity.PLACEHOLDER
    path = str(tmp_path / "s.arrow")
    _writer.write_snapshot_file(path, source, plan, meta)
    with open(path, "r+b") as f:  # a value changes after the digest was taken
        at = f.read().find(values.tobytes()[:64])
        f.seek(at + 10)
        f.write(b"\xff")
    os.utime(path, ns=(1, 1))
    _integrity.finalize_file_checksum(path)
    stored, actual = _integrity.file_checksum(path)
    assert at > 0 and stored == actual
