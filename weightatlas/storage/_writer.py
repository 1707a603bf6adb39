"""Writing one snapshot file from a tensor source, in one read of each tensor.

A first pass over the source's records reads only names, shapes and dtypes (cheap
for views of a memory map; a live module on an accelerator still copies to the host):
enough to lay out the rows (chunks) and every value of the snapshot metadata that
Arrow writes first, except those known only once every byte was read: the source
files' sha256 (computed meanwhile on a worker thread), the content digest and the
whole-file checksum. Those are written as placeholders of the same width and filled
in at the end (``_integrity.finalize_file_checksum``), which is why the file checksum
of format 2 hashes the header last.

Then each tensor is read once: its statistics and the checksum of each chunk are
taken block by block (``_stats.blocks``) while the block is in cache, and its row is
written after, straight from the source's memory (a memory map, usually) or, for a
one-chunk strided tensor (a transposed weight), from the one C-order copy those
blocks were copied into. A tensor split into several chunks is read twice
(statistics first, since every chunk's row holds those of the whole tensor). Every
row not written from that private copy is checked against its checksum just before
it is written, so a source that changed since it was read is an error rather than a
row whose checksum is wrong. Rows are written on a thread of their own while the
next tensor is read when the source keeps its previous record valid
(``keeps_previous``); the file is written through a ``DigestingFile``, so its
whole-file checksum needs no second read of the rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from weightatlas._version import __version__
from weightatlas.errors import IntegrityError, ShapeError, StoreError, WeightAtlasError
from weightatlas.storage._blocks import is_c_order_le
from weightatlas.storage._format import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_COLUMNS,
    MAX_CHUNK_ELEMENTS,
    METADATA_KEY,
    SCHEMA,
    STAT_COLUMNS,
    encode_metadata,
)
from weightatlas.storage._integrity import PLACEHOLDER, DigestingFile, finalize_file_checksum
from weightatlas.storage._mmap import map_file
from weightatlas.storage._record import TensorRecord
from weightatlas.storage._rows import chunk_bytes_of
from weightatlas.storage._source import SourceFile, TensorSource
from weightatlas.storage._stats import BLOCK, StatsBuilder, TensorStats, blocks

__all__ = ["Layout", "Progress", "chunk_rows", "layout_of", "scan_digest", "snapshot_metadata",
           "write_snapshot_file"]

#: ``progress(phase, nbytes, total)`` is called as bytes are checked (phase "read") and
#: written ("write"); ``nbytes`` is the increment, ``total`` the source's size in bytes.
Progress = Callable[[str, int, int], None]

_MARKER = b"weightatlas-alignment-marker-0123456789abcdef-fedcba9876543210!!"
#: Bytes Arrow gathers before handing them to the file.
_BUFFER = 1 << 20
#: What a sha256 (source files, content digest) reads as until it is known.
_LATER = "0" * 64


def _no_progress(phase: str, nbytes: int, total: int) -> None:
    pass


def chunk_rows(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split a tensor along its first axis into ``(row_start, row_count)`` chunks.

    Example:
        >>> chunk_rows((10, 4), 4, 64)
        [(0, 4), (4, 4), (8, 2)]
    """
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    row_elems = math.prod(shape[1:])
    row_bytes = row_elems * itemsize
    if rows == 0 or row_bytes == 0:
        return [(0, rows)]
    per = max(1, min(chunk_bytes // row_bytes, MAX_CHUNK_ELEMENTS // max(row_elems, 1)))
    if row_elems > MAX_CHUNK_ELEMENTS:
        raise ShapeError(
            f"shape {list(shape)}: one slice along the first axis holds {row_elems} elements, "
            f"more than a chunk can ({MAX_CHUNK_ELEMENTS}); reshape it so the first axis is longer"
        )
    return [(s, min(per, rows - s)) for s in range(0, rows, per)]


@dataclass
class Layout:
    """What the snapshot will hold, from the records' names, shapes and dtypes alone."""

    tensors: list[tuple[str, tuple[int, ...], str]]  #: name, shape, dtype of each record
    chunks: list[list[tuple[int, int]]]  #: each record's chunks
    chunk_bytes: int
    n_params: int
    nbytes: int

    @property
    def row_names(self) -> list[str]:
        return [name for (name, _, _), c in zip(self.tensors, self.chunks, strict=True)
                for _ in c]

    def check(self, i: int, rec: TensorRecord, label: str) -> list[tuple[int, int]]:
        """Record ``i`` of the writing pass, checked against the layout; its chunks."""
        if i >= len(self.tensors) or self.tensors[i][0] != rec.name:
            raise IntegrityError(f"{label}: the source changed while it was being ingested "
                                 f"(tensor {rec.name!r} out of place)")
        if self.tensors[i] != (rec.name, tuple(rec.data.shape), str(rec.data.dtype)):
            raise IntegrityError(f"{label}: tensor {rec.name!r} changed shape or dtype while "
                                 "it was being ingested")
        return self.chunks[i]

    def check_done(self, n: int, label: str) -> None:
        if n != len(self.tensors):
            raise IntegrityError(f"{label}: the source changed while it was being ingested "
                                 f"(tensor {self.tensors[n][0]!r} missing)")


def _records(source: TensorSource, before_next: Callable[[int], None] | None = None
             ) -> Iterator[TensorRecord]:
    """``source.records()``, ``before_next(i)`` called before record ``i`` is asked for,
    and an ``OSError`` from the source a ``StoreError`` naming it and the place."""
    records = iter(source.records())
    last: str | None = None
    i = 0
    while True:
        if before_next is not None:
            before_next(i)
        try:
            rec = next(records, None)
        except OSError as e:
            after = f"after tensor {last!r}" if last is not None else "the first tensor"
            raise StoreError(f"{source.label}: cannot read {after}: {e.strerror or e}") from e
        if rec is None:
            return
        last = rec.name
        i += 1
        yield rec


def layout_of(source: TensorSource, chunk_bytes: int) -> Layout:
    """The records' names, shapes and chunks, without reading any tensor's bytes."""
    layout = Layout([], [], chunk_bytes, 0, 0)
    seen: set[str] = set()
    for rec in _records(source):
        if rec.name in seen:
            raise StoreError(f"{source.label}: tensor {rec.name!r} appears twice")
        seen.add(rec.name)
        try:
            chunks = chunk_rows(rec.shape, rec.data.dtype.itemsize, chunk_bytes)
        except ShapeError as e:
            raise ShapeError(f"{source.label}: tensor {rec.name!r}: {e}") from None
        layout.tensors.append((rec.name, tuple(rec.data.shape), str(rec.data.dtype)))
        layout.chunks.append(chunks)
        layout.n_params += rec.data.size
        layout.nbytes += rec.data.nbytes
    return layout


def _scan(data: np.ndarray, chunks: list[tuple[int, int]], scratch: np.ndarray,
          into: np.ndarray | None = None) -> tuple[TensorStats, list[str]]:
    """One pass over a tensor: its statistics and the XXH3-128 of each chunk's bytes.

    With ``into``, a strided tensor's blocks are copied there (``c_blocks``), which then
    holds the tensor in C order.
    """
    builder = StatsBuilder(data.dtype)
    row = math.prod(data.shape[1:]) if data.ndim else 1
    itemsize = data.dtype.itemsize
    ends = [(start + count) * row for start, count in chunks]
    hashers = [xxhash.xxh3_128() for _ in chunks]
    k = 0
    for offset, block in blocks(data, scratch, into):
        builder.add(block)
        raw = block.view(np.uint8)
        pos, end = offset, offset + block.size
        while pos < end:  # a block may span chunks: each part to its chunk's hash
            while ends[k] <= pos:
                k += 1
            stop = min(end, ends[k])
            hashers[k].update(raw[(pos - offset) * itemsize : (stop - offset) * itemsize].data)
            pos = stop
    return builder.result(), [h.hexdigest() for h in hashers]


def _row_values(rec: TensorRecord, model: str, step: int | None, tag: str | None,
                chunks: list[tuple[int, int]], stats: dict[str, Any], sums: list[str]
                ) -> list[dict[str, Any]]:
    """The small columns (``INFO_COLUMNS``) of each of a tensor's rows."""
    attrs = json.dumps(dict(rec.attrs), sort_keys=True)
    row = math.prod(rec.shape[1:]) if rec.shape else 1
    itemsize = rec.data.dtype.itemsize
    out = []
    for i, (start, count) in enumerate(chunks):
        values = {
            "model": model, "step": step, "tag": tag, "name": rec.name,
            "source_name": rec.source_name, "module": rec.module, "param": rec.param,
            "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
            "layout": list(rec.layout), "source_layout": list(rec.source_layout),
            "source_shape": list(rec.source_shape), "chunk": i, "n_chunks": len(chunks),
            "row_start": start, "row_count": count,
            "nbytes": (count * row if rec.shape else 1) * itemsize, "attrs": attrs,
            "checksum": sums[i],
        }
        values.update((key, stats[key]) for key, _ in STAT_COLUMNS)
        out.append(values)
    return out


_DIGEST_KEYS = ("name", "kind", "dtype", "shape", "layout", "source_layout", "source_shape",
                "chunk", "attrs", "checksum")


class _ContentDigest:
    """A content digest over what defines the tensors (not when or how they were
    ingested), fed row by row; attachments are content too."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._h.update(json.dumps([row[k] for k in _DIGEST_KEYS]).encode())
            self._h.update(b"\n")

    def result(self, attached: dict[str, Any]) -> str:
        digest = self._h.hexdigest()
        if attached:
            digest = hashlib.sha256(
                (digest + json.dumps(attached, sort_keys=True)).encode()).hexdigest()
        return digest


def _analysed(source: TensorSource, layout: Layout, model: str, step: int | None,
              tag: str | None, progress: Progress, keep: str | None,
              before_next: Callable[[int], None] | None = None,
              ) -> Iterator[tuple[TensorRecord, list[dict[str, Any]], np.ndarray | None]]:
    """Each record with its rows' small columns, read once.

    With ``keep`` (``"one"`` or ``"two"``), a one-chunk strided tensor is also copied
    into C order (else None is handed out), into one buffer or two that take turns:
    with two, the copy of record ``i`` stays valid until record ``i + 2`` is read.
    ``before_next(i)`` is called before record ``i`` is asked of the source (which may
    then release record ``i - 2``, or ``i - 1``). An ``OSError`` from the source is a
    ``StoreError`` naming it.
    """
    scratch = np.empty(BLOCK * 8, np.uint8)  # one block of any dtype, reused
    wholes = [np.empty(0, np.uint8)] * (2 if keep == "two" else 1)
    total = layout.nbytes
    n = 0
    for i, rec in enumerate(_records(source, before_next)):
        chunks = layout.check(i, rec, source.label)
        into = None
        if keep and len(chunks) == 1 and rec.data.ndim and not is_c_order_le(rec.data):
            k = i % len(wholes)
            if wholes[k].nbytes < rec.data.nbytes:
                wholes[k] = np.empty(0, np.uint8)  # (the old one is freed first)
                wholes[k] = np.empty(rec.data.nbytes, np.uint8)
            into = wholes[k][: rec.data.nbytes]
        try:
            stats, sums = _scan(rec.data, chunks, scratch, into)
        except (ValueError, TypeError, OverflowError) as e:
            raise StoreError(f"{source.label}: tensor {rec.name!r}: statistics failed: {e}") from e
        progress("read", rec.data.nbytes, total)
        yield rec, _row_values(rec, model, step, tag, chunks, stats.as_dict(), sums), into
        del rec, into
        n = i + 1
    layout.check_done(n, source.label)


def scan_digest(source: TensorSource, layout: Layout, model: str, step: int | None,
                tag: str | None, attached: dict[str, Any], progress: Progress = _no_progress
                ) -> str:
    """The content digest a snapshot of ``source`` would have, reading without writing."""
    digest = _ContentDigest()
    for _, rows, _ in _analysed(source, layout, model, step, tag, progress, keep=None):
        digest.add_rows(rows)
    return digest.result(attached)


def _files_of(source: TensorSource, call: Callable[[], Any], doing: str) -> list[Any]:
    """``call()`` (the source's files, hashed or listed), an ``OSError`` from it a
    ``StoreError`` naming the source."""
    try:
        return list(call())
    except WeightAtlasError:
        raise
    except OSError as e:
        raise StoreError(f"{source.label}: cannot {doing} source files: "
                         f"{e.strerror or e}") from e


def _hashed(source: TensorSource) -> list[SourceFile]:
    return _files_of(source, source.source_files, "hash")


def snapshot_metadata(
    layout: Layout, source: TensorSource, files: list[SourceFile], content_digest: str,
    model: str, step: int | None, tag: str | None, created: str, attached: dict[str, Any],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document stored as the snapshot's schema metadata (``facts``: the
    source's ``metadata()``)."""
    if len(files) == 1:
        source_sha = files[0].sha256
    elif files:  # several files: sha256 of a sha256sum-style listing
        listing = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
        source_sha = hashlib.sha256(listing.encode()).hexdigest()
    else:
        source_sha = None
    row_names = layout.row_names
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "step": step,
        "tag": tag,
        "framework": source.framework,
        "source_file": files[0].name if len(files) == 1 else source.label,
        "source_sha256": source_sha,
        "source_files": [vars(f) for f in files],
        "source": facts,
        "created": created,
        "package": "weightatlas",
        "package_version": __version__,
        "checksum": CHECKSUM_ALGORITHM,
        "alignment": ALIGNMENT,
        "chunk_bytes": layout.chunk_bytes,
        "content_digest": content_digest,
        "n_tensors": len(layout.tensors),
        "n_rows": len(row_names),
        "n_params": layout.n_params,
        "nbytes": layout.nbytes,
        # The tensor of every row, in row order: a reader finds a tensor's rows from the
        # footer alone, without reading every row's columns.
        "row_names": row_names,
        "attachments": attached,
        "file_checksum": PLACEHOLDER,
    }


def _data_array(buf: np.ndarray | bytes) -> pa.Array:
    n = len(buf) if isinstance(buf, bytes) else buf.nbytes
    offsets = pa.py_buffer(np.array([0, n], dtype=np.int64))
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 1, [None, offsets, pa.py_buffer(buf)]
    )


_INFO_SCHEMA = pa.schema([SCHEMA.field(c) for c in INFO_COLUMNS])


def write_snapshot_file(
    path: str, source: TensorSource, layout: Layout, model: str, step: int | None,
    tag: str | None, created: str, attached: dict[str, Any], progress: Progress = _no_progress,
) -> str:
    """Write the snapshot to ``path`` (a fresh file), complete and fsynced; return its
    content digest. Every ``data`` value starts 64-byte aligned.

    A source that lists its files up front (``source_file_list``, names and sizes) has
    them hashed on a worker thread while the rows are written; any other is hashed first.
    Rows are written on a thread of their own while the next tensor is read, for a
    source whose records stay valid until the one after next is asked for
    (``keeps_previous``); for any other, once the previous one is written. ``progress``
    is only ever called on the calling thread.
    """
    listed = getattr(source, "source_file_list", None)
    ahead = 1 if getattr(source, "keeps_previous", False) else 0
    facts = dict(source.metadata())
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightatlas-sha256")
    hashing: Future[list[SourceFile]] | None = None
    try:
        if listed is None:
            files = _checked(source, _hashed(source))
        else:
            planned = [(str(name), int(size)) for name, size in _files_of(source, listed, "list")]
            hashing = pool.submit(_hashed, source)
            files = [SourceFile(name, size, _LATER) for name, size in planned]
        meta = snapshot_metadata(layout, source, files, _LATER, model, step, tag, created,
                                 attached, facts)
        encoded = encode_metadata(meta)
        schema = SCHEMA.with_metadata(encoded)
        written = encoded[METADATA_KEY]  # the bytes finalize_file_checksum looks for
        header_len = 8 + len(schema.serialize())  # magic + schema message, written lazily
        digest = _ContentDigest()
        # Every row is hashed on its way to the file, so the whole-file checksum reads
        # only the header and footer back (finalize_file_checksum).
        raw = DigestingFile(path, skip=header_len)
        # Arrow's own buffer gathers the many small writes of each row (its framing, its
        # small columns) into one, so the writing thread seldom needs the GIL; the data
        # buffers go through it without a copy.
        with (raw, pa.PythonFile(raw, mode="w") as py,
              pa.BufferedOutputStream(py, _BUFFER) as sink,
              pa.ipc.new_file(sink, schema) as writer):
            rows = _RowWriter(writer, sink, raw, schema, header_len, source.label)

            def report() -> None:
                if n := rows.newly_written():
                    progress("write", n, layout.nbytes)

            def before_next(i: int) -> None:
                rows.wait(i - ahead)
                if hashing is not None and hashing.done():
                    hashing.result()  # a failure (a file changed) is raised now, not at the end
                report()

            try:
                for tensor in _analysed(source, layout, model, step, tag, progress,
                                        keep="two" if ahead else "one",
                                        before_next=before_next):
                    digest.add_rows(tensor[1])
                    rows.put(tensor)
                rows.finish()
            except BaseException:
                rows.abort()  # stopped before the file closes
                raise
            report()
            sink.flush()
            raw.mark()
        if hashing is not None:
            files = _checked(source, hashing.result())
            if [(f.name, f.size) for f in files] != planned:
                raise IntegrityError(f"{source.label}: the source files changed while they "
                                     f"were being ingested (listed {planned}, hashed "
                                     f"{[(f.name, f.size) for f in files]})")
        unchanged = getattr(source, "check_files_unchanged", None)
        if unchanged is not None:
            unchanged()  # the bytes written are those the sha256 was taken of
    except BaseException:
        # The error is the user's now: a sha256 still running finishes on its own (an
        # idle thread is joined).
        pool.shutdown(wait=hashing is None or hashing.done(), cancel_futures=True)
        raise
    pool.shutdown()
    content = digest.result(attached)
    meta = snapshot_metadata(layout, source, files, content, model, step, tag, created,
                             attached, facts)
    final = encode_metadata(meta)[METADATA_KEY]
    _check_alignment(path)
    raw.remember()
    finalize_file_checksum(path, (written, final))
    return content


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked(source: TensorSource, files: list[SourceFile]) -> list[SourceFile]:
    for f in files:
        if not isinstance(f.sha256, str) or not _SHA256.fullmatch(f.sha256):
            raise StoreError(f"{source.label}: source file {f.name!r}: sha256 {f.sha256!r} is "
                             "not 64 lowercase hex digits")
    return files


class _RowWriter:
    """Writes tensors' rows on a thread of its own while the next tensor is read.

    ``put`` hands over a tensor read by ``_analysed``; ``wait(n)`` returns once ``n``
    tensors are written, so the reader asks the source for a record (and lets it
    release an earlier one) only when that one is in the file. An error on the thread
    is raised by the next ``wait`` or by ``finish``; ``abort`` stops the thread after
    the row it is writing, whatever happens meanwhile (a second Ctrl-C included), so the
    file is never closed under it.
    """

    def __init__(self, writer: Any, sink: Any, raw: DigestingFile, schema: pa.Schema,
                 header_len: int, label: str) -> None:
        self._args = (writer, sink, raw, schema, header_len, label)
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._written = 0
        self._bytes = 0  # written so far
        self._reported = 0  # of which handed to progress
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="weightatlas-writer",
                                        daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (tensor := self._todo.get()) is not None and not self._stop.is_set():
                rec, rows, whole = tensor
                n = _write_tensor(*self._args, rec, rows, whole, self._stop)
                del tensor, rec, whole
                with self._done:
                    self._written += 1
                    self._bytes += n
                    self._done.notify_all()
        except BaseException as e:  # handed to the reading thread, raised there
            with self._done:
                self._error = e
                self._done.notify_all()

    def put(self, tensor: tuple[TensorRecord, list[dict[str, Any]], np.ndarray | None]) -> None:
        self._todo.put(tensor)

    def wait(self, n: int) -> None:
        with self._done:
            while self._written < n and self._error is None:
                self._done.wait()
            if self._error is not None:
                raise self._error

    def newly_written(self) -> int:
        """Bytes of rows written since the last call."""
        with self._done:
            n, self._reported = self._bytes - self._reported, self._bytes
        return n

    def finish(self) -> None:
        """Stop the thread once it has written what it was given; raise its error."""
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the thread after the row it is writing and wait for it, uninterruptibly."""
        self._stop.set()
        self._todo.put(None)
        while self._thread.is_alive():
            with contextlib.suppress(KeyboardInterrupt):  # the first one is on its way
                self._thread.join()


def _write_tensor(writer: Any, sink: Any, raw: DigestingFile, schema: pa.Schema,
                  header_len: int, label: str, rec: TensorRecord, rows: list[dict[str, Any]],
                  whole: np.ndarray | None, stop: threading.Event) -> int:
    """Write a tensor's rows, just read by ``_analysed``; return the bytes written."""
    buf: np.ndarray | None = None
    written = 0
    for row in rows:
        if stop.is_set():
            break
        start, count = row["row_start"], row["row_count"]
        if whole is not None:  # a strided tensor, copied into C order while it was read
            data = whole
        else:
            # Straight from the source's memory when in C order (else a chunk of a larger
            # strided tensor, copied): checked again, so a source that changed since it
            # was read is an error rather than a row whose checksum is wrong.
            data, buf = chunk_bytes_of(rec, start, count, buf)
            if xxhash.xxh3_128(data.data).hexdigest() != row["checksum"]:
                raise IntegrityError(f"{label}: tensor {rec.name!r} changed while it was "
                                     "being ingested")
        _write_row(writer, sink, schema, header_len, row, data)
        written += data.nbytes
        raw.start_writeback()
    return written


def _write_row(writer: Any, sink: Any, schema: pa.Schema, header_len: int,
               row: dict[str, Any], data: np.ndarray) -> None:
    """One record batch, its ``pad`` sized so that ``data`` starts 64-byte aligned."""
    info = pa.RecordBatch.from_pylist([row], schema=_INFO_SCHEMA).columns

    def batch(pad: int, values: pa.Array) -> Any:
        return pa.RecordBatch.from_arrays(
            [*info, pa.array([b"\0" * pad], pa.binary()), values], schema=schema)

    twin = batch(0, _data_array(_MARKER)).serialize()
    offset = twin.to_pybytes().find(_MARKER)
    pos = sink.tell() or header_len
    pad = (-(pos + offset)) % ALIGNMENT
    writer.write_batch(batch(pad, _data_array(data)))


def _check_alignment(path: str) -> None:
    mapped = map_file(path)
    reader = pa.ipc.open_file(pa.BufferReader(mapped))
    for i in range(reader.num_record_batches):
        data = reader.get_batch(i).column(len(SCHEMA) - 1)
        values = data.buffers()[2]
        if values is not None and values.size and (values.address - mapped.address) % ALIGNMENT:
            raise StoreError(f"{path}: row {i} data is not {ALIGNMENT}-byte aligned "
                             "(this is a weightatlas bug; please report it)")


def fsync_path(path: str, directory: bool = False) -> None:
    """fsync a file or directory by path (durability of a commit)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

