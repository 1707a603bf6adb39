"""The writer's fast paths: tiled C-order copies, statistics and checksums taken in the
one read of each tensor, rows written on a thread of their own while the next tensor is
read, and the whole-file checksum taken as the file is written (header last).

Every check compares against an independent reference: NumPy's own C-order copy
(``np.ascontiguousarray``), ``xxhash`` over those bytes, a float64 NumPy reference for
the statistics, and what the store reads back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    """A source whose second reading differs from its first (a file edited mid-ingest).

    The store reads it twice: names, shapes and dtypes first, then every tensor once.
    """

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
    return not any(t.name.startswith(("weightatlas-writer", "weightatlas-sha256"))
                   for t in threading.enumerate())


def _nothing_left(store: Store) -> bool:
    staging = os.path.join(store.root, STAGING)
    return (not os.path.isdir(staging) or not os.listdir(staging)) and not store.snapshots()


def test_each_tensor_is_read_once_so_its_row_is_consistent(store: Store, rng):
    """Values that differ between the layout pass (which reads no values) and the read
    are stored as read, with statistics and checksums of exactly those values."""
    a = rng.standard_normal((64, 48)).astype(np.float32)
    b = a.copy()
    b[10, 3] += 1
    first = [TensorRecord("w0", a.T), TensorRecord("w1", a)]
    second = [TensorRecord("w0", b.T), TensorRecord("w1", b)]
    src = ChangingSource(first, second)
    snap = store.write(src, "m")
    assert src.reads == 2 and src.threads == {threading.current_thread().name}
    for name, want in (("w0", b.T), ("w1", b)):
        np.testing.assert_array_equal(snap.read(name), want)
        assert snap.info(name).l2 == tensor_stats(want).l2
    assert snap.verify() == []
    snap.close()


def test_a_source_that_changes_shape_or_dtype_is_refused(store: Store, rng):
    a = rng.standard_normal((8, 6)).astype(np.float32)
    for second in ([TensorRecord("w0", a[:4])], [TensorRecord("w0", a.astype(np.float64))],
                   [TensorRecord("w0", a.T)]):
        with pytest.raises(IntegrityError, match="changing: tensor 'w0' changed shape or dtype "
                                                 "while it was being ingested"):
            store.write(ChangingSource([TensorRecord("w0", a)], second), "m")
    assert _nothing_left(store) and _no_writer_threads()


def test_missing_or_reordered_tensors_in_the_second_pass_are_refused(store: Store, rng):
    a = rng.standard_normal((8, 8)).astype(np.float32)
    r0, r1 = TensorRecord("w0", a), TensorRecord("w1", a.T)
    with pytest.raises(IntegrityError, match=r"tensor 'w1' missing"):
        store.write(ChangingSource([r0, r1], [r0]), "m")
    with pytest.raises(IntegrityError, match=r"tensor 'w1' out of place"):
        store.write(ChangingSource([r0, r1], [r1, r0]), "m")
    with pytest.raises(IntegrityError, match=r"\(tensor 'w1' out of place\)"):
        store.write(ChangingSource([r0], [r0, r1]), "m")  # one more than laid out
    assert _nothing_left(store) and _no_writer_threads()


@pytest.mark.parametrize("case", ["c-order", "chunked", "chunked-strided"])
def test_a_tensor_changed_between_its_read_and_its_write_is_refused(store: Store, rng, case):
    """A tensor changed after its statistics and checksums were taken (here: by the
    progress callback, which runs between the two) is refused, whether its row is written
    straight from the source's memory or read again chunk by chunk."""
    a = rng.standard_normal((64, 48)).astype(np.float32)
    data = a.T.copy().T if case == "chunked-strided" else a
    records = [TensorRecord("w", data), TensorRecord("after", a[:3])]

    def progress(phase: str, n: int, total: int) -> None:
        if phase == "read" and n == data.nbytes:
            data[5, 7] += 1  # the source's memory, changed

    chunk = 1 << 30 if case == "c-order" else 1024
    with pytest.raises(IntegrityError, match="<memory>: tensor 'w' changed while it was being "
                                             "ingested"):
        store.write(RecordsSource(records), "m", chunk_bytes=chunk, progress=progress)
    assert _nothing_left(store) and _no_writer_threads()


def test_a_strided_tensor_is_written_from_the_copy_it_was_read_into(store: Store, rng):
    """A one-chunk strided tensor is copied into C order once, while its statistics are
    taken; a change to the source after that does not reach its row: the row is the
    values read, consistent with its statistics and checksum."""
    a = rng.standard_normal((64, 48)).astype(np.float32)
    before = a.T.copy()

    def progress(phase: str, n: int, total: int) -> None:
        if phase == "read":
            a[5, 7] += 1

    snap = store.write(RecordsSource([TensorRecord("w", a.T)]), "m", progress=progress)
    np.testing.assert_array_equal(snap.read("w"), before)
    assert snap.info("w").l2 == tensor_stats(before).l2
    assert snap.verify() == []  # (every row's checksum against its bytes)
    snap.close()


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


def test_a_file_changed_after_writing_is_hashed_again(store: Store, rng, monkeypatch):
    """finalize_file_checksum uses the streamed digest only for the very file it was taken
    of: a file rewritten since (other size and time) is read back instead."""
    from weightatlas.storage import _integrity, _writer

    values = rng.standard_normal((30, 20)).astype(np.float32)
    real = _writer.finalize_file_checksum
    seen = []

    def tamper_then_finalize(path: str, complete: tuple[bytes, bytes]) -> str:
        with open(path, "r+b") as f:  # a value changes after the digest was taken
            at = f.read().find(values.tobytes()[:64])
            f.seek(at + 10)
            f.write(b"\xff")
        os.utime(path, ns=(1, 1))
        seen.append(at)
        return real(path, complete)

    monkeypatch.setattr(_writer, "finalize_file_checksum", tamper_then_finalize)
    snap = store.write(RecordsSource([TensorRecord("w", values)]), "m")
    stored, actual = _integrity.file_checksum(snap.path)
    assert seen[0] > 0 and stored == actual == snap.metadata["file_checksum"]
    # The file checksum is right, and the row's own checksum catches the changed value.
    assert len(snap.verify()) == 1 and "checksum" in snap.verify()[0]
    snap.close()


def _reference_digest(data: bytes, start: int) -> str:
    """The whole-file checksum by its definition, without weightatlas: XXH3-128 of the
    bytes from ``start`` to the end then of the first ``start``, both copies of
    ``file_checksum`` read as 32 zeros."""
    key = b'"file_checksum": "'
    first = data.find(key) + len(key)
    second = data.rfind(key) + len(key)
    assert 0 < first < second
    blank = bytearray(data)
    for pos in (first, second):
        blank[pos : pos + 32] = b"0" * 32
    return xxhash.xxh3_128(bytes(blank[start:] + blank[:start])).hexdigest()


def test_the_file_checksum_hashes_the_header_last(store: Store, rng):
    """Format 2: the digest stored in both metadata copies is XXH3-128 of the file from
    the end of the schema message on, then the magic and schema message."""
    import struct

    records = [TensorRecord("w", rng.standard_normal((50, 40)).astype(np.float32).T),
               TensorRecord("b", rng.standard_normal(7).astype(np.float16))]
    snap = store.write(RecordsSource(records), "m")
    data = Path(snap.path).read_bytes()
    (schema_len,) = struct.unpack("<i", data[12:16])
    head_end = 16 + schema_len
    stored = snap.metadata["file_checksum"]
    assert snap.metadata["format_version"] == 2
    assert stored == _reference_digest(data, head_end)
    assert stored != _reference_digest(data, 0)  # not the format 1 order
    snap.close()


def test_a_format_1_snapshot_still_verifies(store: Store, rng):
    """A snapshot written by format 1 (file checksum in file order) reads and verifies;
    damaging it is still caught."""
    import pyarrow as pa

    from weightatlas.storage import Snapshot

    values = rng.standard_normal((20, 10)).astype(np.float32)
    snap = store.write(RecordsSource([TensorRecord("w", values)]), "m")
    path = snap.path
    snap.close()
    data = bytearray(Path(path).read_bytes())
    old, new = b'"format_version": 2', b'"format_version": 1'
    assert data.count(old) == 2
    data = bytearray(bytes(data).replace(old, new))
    digest = _reference_digest(bytes(data), 0).encode()
    key = b'"file_checksum": "'
    for pos in (data.find(key) + len(key), data.rfind(key) + len(key)):
        data[pos : pos + 32] = digest
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(data)
    old_snap = Snapshot(path, ("m", 0, None))
    assert old_snap.metadata["format_version"] == 1
    assert pa.ipc.open_file(pa.BufferReader(bytes(data))).schema.metadata is not None
    assert old_snap.verify() == []
    np.testing.assert_array_equal(old_snap.read("w"), values)
    old_snap.close()
    at = bytes(data).find(values.tobytes())
    data[at + 3] ^= 1
    with open(path, "wb") as f:
        f.write(data)
    problems = Snapshot(path, ("m", 0, None)).verify()
    assert any("file checksum" in p for p in problems)


@dataclass
class ListedSource:
    """A source read from files that lists them first (names, sizes) and hashes later."""

    items: list[TensorRecord]
    listed: list[tuple[str, int]]
    hashed: list[SourceFile]
    label: str = "listed"
    framework: str = "test"
    threads: set[str] = field(default_factory=set)

    def records(self) -> Iterator[TensorRecord]:
        return iter(self.items)

    def source_file_list(self) -> list[tuple[str, int]]:
        return self.listed

    def source_files(self) -> list[SourceFile]:
        self.threads.add(threading.current_thread().name)
        return self.hashed

    def metadata(self) -> dict:
        return {}

    def nbytes(self) -> int:
        return sum(r.data.nbytes for r in self.items)

    def attachments(self) -> dict:
        return {}


def test_source_files_are_hashed_while_writing_and_filled_in(store: Store, rng):
    """The sha256 learnt after the rows were written is in both metadata copies (the
    footer, which readers use, and the header), and the file checksum covers it."""
    import hashlib

    import pyarrow as pa

    items = [TensorRecord("w", rng.standard_normal((40, 30)).astype(np.float32))]
    shas = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    src = ListedSource(items, [("a.bin", 10), ("b.bin", 20)],
                       [SourceFile("a.bin", 10, shas[0]), SourceFile("b.bin", 20, shas[1])])
    snap = store.write(src, "m")
    assert src.threads and threading.current_thread().name not in src.threads
    listing = f"{shas[0]}  a.bin\n{shas[1]}  b.bin\n"
    assert snap.metadata["source_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert [f["sha256"] for f in snap.metadata["source_files"]] == shas
    data = Path(snap.path).read_bytes()
    header = pa.ipc.open_stream(pa.BufferReader(data[8:])).schema.metadata
    footer = pa.ipc.open_file(pa.BufferReader(data)).schema.metadata
    assert header == footer and shas[1].encode() in header[b"weightatlas"]
    assert b"0" * 64 not in data
    assert snap.verify() == []
    snap.close()


def test_source_files_that_differ_from_their_listing_are_refused(store: Store, rng):
    items = [TensorRecord("w", rng.standard_normal((4, 3)).astype(np.float32))]
    src = ListedSource(items, [("a.bin", 10)], [SourceFile("a.bin", 11, "1" * 64)])
    with pytest.raises(IntegrityError, match=r"listed: the source files changed while they "
                                             "were being ingested"):
        store.write(src, "m")
    assert _nothing_left(store) and _no_writer_threads()


def test_a_snapshot_of_no_tensors_verifies(store: Store):
    """No row is written (Arrow writes its header only at the close): the file checksum
    is still that of the definition."""
    import struct

    snap = store.write(RecordsSource([]), "empty")
    data = Path(snap.path).read_bytes()
    (schema_len,) = struct.unpack("<i", data[12:16])
    assert snap.metadata["file_checksum"] == _reference_digest(data, 16 + schema_len)
    assert snap.verify() == [] and store.verify("empty") == {"empty@0": []}
    snap.close()


def test_source_metadata_is_asked_once(store: Store, rng):
    calls = []

    class Chatty(RecordsSource):
        def metadata(self) -> dict:
            calls.append(1)
            return {"call": "x" * len(calls)}

    snap = store.write(Chatty([TensorRecord("w", np.ones(4, np.float32))]), "m")
    assert calls == [1] and snap.metadata["source"] == {"call": "x"}
    assert snap.verify() == []
    snap.close()


def test_a_source_that_reuses_its_memory_is_written_one_tensor_at_a_time(store: Store):
    """A source that does not say its records outlive the next one (``keeps_previous``)
    may reuse their memory as soon as the next is asked for: each row is written first."""

    class Streaming(RecordsSource):
        def records(self) -> Iterator[TensorRecord]:
            buf = np.empty((64, 64), np.float32)
            for i in range(6):
                buf[...] = i
                yield TensorRecord(f"w{i}", buf)
                buf = buf if i % 2 else buf.T  # strided every other time

    assert not Streaming([]).keeps_previous and RecordsSource([]).keeps_previous
    snap = store.write(Streaming([]), "m")
    for i in range(6):
        np.testing.assert_array_equal(snap.read(f"w{i}"), np.full((64, 64), i, np.float32))
    assert snap.verify() == []
    snap.close()


def test_progress_is_called_on_the_calling_thread_only(store: Store, rng):
    threads = set()
    phases = {"read": 0, "write": 0}

    def progress(phase: str, n: int, total: int) -> None:
        threads.add(threading.current_thread().name)
        phases[phase] += n

    records = [TensorRecord(f"w{i}", rng.standard_normal((30, 20)).astype(np.float32).T)
               for i in range(5)]
    store.write(RecordsSource(records), "m", progress=progress).close()
    total = sum(r.data.nbytes for r in records)
    assert threads == {threading.current_thread().name}
    assert phases == {"read": total, "write": total}


def test_an_interrupt_stops_the_writing_thread_before_the_file_closes(store: Store, rng):
    """Ctrl-C while rows are being written: the thread is stopped and joined, nothing is
    published or left behind."""
    records = [TensorRecord(f"w{i}", rng.standard_normal((200, 100)).astype(np.float32).T)
               for i in range(8)]
    reads = []

    def progress(phase: str, n: int, total: int) -> None:
        if phase == "read":
            reads.append(n)
            if len(reads) == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write(RecordsSource(records), "m", progress=progress)
    assert _nothing_left(store) and _no_writer_threads()


def test_a_source_file_digest_that_is_not_a_sha256_is_refused(store: Store, rng):
    from weightatlas.errors import StoreError

    items = [TensorRecord("w", rng.standard_normal((4, 3)).astype(np.float32))]
    src = ListedSource(items, [("a.bin", 10)], [SourceFile("a.bin", 10, "sha256:" + "1" * 64)])
    with pytest.raises(StoreError, match=r"listed: source file 'a.bin': sha256 'sha256:1+' is "
                                         "not 64 lowercase hex digits"):
        store.write(src, "m")
    assert _nothing_left(store) and _no_writer_threads()


def _sha_threads_end() -> bool:
    """The sha256 thread of a failed write may finish its file on its own: give it a
    moment, then no thread of the writer's is left."""
    import time

    for _ in range(400):
        if _no_writer_threads():
            return True
        time.sleep(0.01)
    return False


@dataclass
class FailingHash(ListedSource):
    """Its files are listed up front; hashing them fails (or takes ``delay`` seconds)."""

    delay: float = 0.0

    def source_files(self) -> list[SourceFile]:
        import time

        from weightatlas.errors import FormatError

        if self.delay:
            time.sleep(self.delay)
            return self.hashed
        raise FormatError("a.bin: file changed since it was read; read it again")


def test_a_failed_sha256_stops_the_write_early(store: Store, rng):
    from weightatlas.errors import FormatError

    items = [TensorRecord(f"w{i}", rng.standard_normal((256, 256)).astype(np.float32))
             for i in range(20)]
    reads = []

    def progress(phase: str, n: int, total: int) -> None:
        import time

        if phase == "read":
            reads.append(n)
            time.sleep(0.005)

    src = FailingHash(items, [("a.bin", 10)], [])
    with pytest.raises(FormatError, match=r"a\.bin: file changed since it was read"):
        store.write(src, "m", progress=progress)
    assert len(reads) < 20  # raised between tensors, not after the whole file
    assert _nothing_left(store) and _sha_threads_end()


def test_an_error_does_not_wait_for_the_sha256(store: Store, rng):
    """The user's error (here from the progress callback) comes back at once; the sha256
    of a large source file finishes on its own thread."""
    import time

    items = [TensorRecord("w", rng.standard_normal((64, 64)).astype(np.float32))]
    src = FailingHash(items, [("a.bin", 10)], [SourceFile("a.bin", 10, "1" * 64)], delay=1.5)

    def progress(phase: str, n: int, total: int) -> None:
        raise Boom("stop")

    start = time.perf_counter()
    with pytest.raises(Boom):
        store.write(src, "m", progress=progress)
    assert time.perf_counter() - start < 1.0
    assert _nothing_left(store)
    assert _sha_threads_end()  # the sha256 then ends on its own


def test_an_os_error_from_the_source_names_it_and_the_place(store: Store, rng):
    from weightatlas.errors import StoreError

    a = rng.standard_normal((8, 8)).astype(np.float32)

    class Flaky(RecordsSource):
        def records(self) -> Iterator[TensorRecord]:
            yield TensorRecord("w0", a)
            raise OSError(5, "Input/output error")

    with pytest.raises(StoreError, match=r"<memory>: cannot read after tensor 'w0': "
                                         "Input/output error"):
        store.write(Flaky([]), "m")
    assert _nothing_left(store)


def test_a_damaged_existing_snapshot_is_refused_before_reading_the_source(store: Store, rng):
    from weightatlas.errors import SnapshotExistsError

    records = [TensorRecord("w", rng.standard_normal((64, 64)).astype(np.float32))]
    snap = store.write(RecordsSource(records), "m")
    path = snap.path
    snap.close()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(100)
    reads = []
    with pytest.raises(SnapshotExistsError, match="already exists and is damaged"):
        store.write(RecordsSource(records), "m",
                    progress=lambda phase, n, total: reads.append(phase))
    assert reads == []


def test_a_source_file_rewritten_during_ingest_is_refused(tmp_path: Path, rng):
    """The sha256 recorded and the bytes written must describe one file: a safetensors
    file rewritten in place (same size) while it is ingested is refused, and nothing is
    published."""
    from weightatlas.adapters import safetensors as sft
    from weightatlas.errors import FormatError

    path = tmp_path / "m.safetensors"
    tensors = {f"w{i}": rng.standard_normal((128, 128)).astype(np.float32) for i in range(6)}
    sft.write(tensors, path)
    store = Store(tmp_path / "store", create=True)
    done = []

    def progress(phase: str, n: int, total: int) -> None:
        if phase == "read" and not done:
            done.append(1)
            data = bytearray(path.read_bytes())
            data[-8:] = b"\x00" * 8  # the last tensor's last values
            with open(path, "r+b") as f:
                f.write(data)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    with pytest.raises(FormatError, match=r"m\.safetensors: file changed (since it was read|"
                                          "while it was being ingested)"):
        store.write(sft.read(path), "m", progress=progress)
    assert _nothing_left(store)


def test_file_sources_check_their_files_are_unchanged(tmp_path: Path, rng):
    """What the store asks once every row is written, for each file adapter."""
    import torch

    from weightatlas.adapters import safetensors as sft
    from weightatlas.adapters import torch as torch_adapter
    from weightatlas.errors import FormatError

    values = {"w": rng.standard_normal((16, 16)).astype(np.float32)}
    st_path = tmp_path / "m.safetensors"
    sft.write(values, st_path)
    pt_path = tmp_path / "m.pt"
    torch.save({k: torch.from_numpy(v) for k, v in values.items()}, pt_path)
    for path, source in ((st_path, sft.read(st_path)), (pt_path, torch_adapter.read(pt_path))):
        source.check_files_unchanged()  # untouched: fine
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(FormatError, match=rf"{path.name}: file changed while it was being "
                                              "ingested"):
            source.check_files_unchanged()


def test_the_same_tensors_chunked_differently_say_so(store: Store, rng):
    from weightatlas.errors import SnapshotExistsError

    records = [TensorRecord("w", rng.standard_normal((64, 64)).astype(np.float32))]
    store.write(RecordsSource(records), "m", chunk_bytes=4096).close()
    store.write(RecordsSource(records), "m", chunk_bytes=4096).close()  # same: a no-op
    with pytest.raises(SnapshotExistsError, match=r"already exists with different tensors than "
                       r"<memory> \(or the same tensors chunked differently: it was written "
                       r"with chunks of 4096 bytes, this write uses 8192\)"):
        store.write(RecordsSource(records), "m", chunk_bytes=8192)
    other = [TensorRecord("w", rng.standard_normal((64, 64)).astype(np.float32))]
    with pytest.raises(SnapshotExistsError) as e:
        store.write(RecordsSource(other), "m", chunk_bytes=4096)
    assert "chunked differently" not in str(e.value)
