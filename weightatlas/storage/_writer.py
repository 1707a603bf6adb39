"""Writing one snapshot file from a tensor source, in two passes.

Pass 1 reads every tensor once to compute its statistics and the checksum of each
chunk (the source files' sha256 is computed at the same time on a worker thread).
The tensor is read in C-order blocks (``_stats.blocks``) that feed both while they
are in cache, so a strided tensor (a transposed view, say) is only ever copied a
block at a time in this pass.
Pass 2 writes the Arrow IPC file: the schema metadata, which Arrow writes first,
can then hold everything (source hash, content digest, totals), and every row is
written straight from the source's memory (a memory map, usually) to the file, or,
for a strided tensor, from one canonical copy. A worker thread prepares the next row
(the copy, the checksum) while the file is written, with two buffers taking turns, so
memory stays at about two chunks (``_rows``). The file is written through a
``DigestingFile`` (``_integrity``), so its whole-file checksum needs no second read.
Pass 2 checks each chunk's checksum again, so a source that changes between the
passes is an error, never a silently wrong snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from weightatlas._version import __version__
from weightatlas.errors import ShapeError, StoreError, WeightAtlasError
from weightatlas.storage._blocks import is_c_order_le
from weightatlas.storage._format import (
    ALIGNMENT,
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_COLUMNS,
    MAX_CHUNK_ELEMENTS,
    SCHEMA,
    STAT_COLUMNS,
    encode_metadata,
)
from weightatlas.storage._integrity import DigestingFile
from weightatlas.storage._mmap import map_file
from weightatlas.storage._rows import chunk_of, prepared_rows
from weightatlas.storage._source import SourceFile, TensorSource
from weightatlas.storage._stats import BLOCK, StatsBuilder, TensorStats, blocks

__all__ = ["Progress", "SnapshotPlan", "plan_snapshot", "write_snapshot_file"]

#: ``progress(phase, nbytes, total)`` is called as bytes are checked (phase "read") and
#: written ("write"); ``nbytes`` is the increment, ``total`` the source's size in bytes.
Progress = Callable[[str, int, int], None]

_MARKER = b"weightatlas-alignment-marker-0123456789abcdef-fedcba9876543210!!"


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


def _scan(data: np.ndarray, chunks: list[tuple[int, int]], scratch: np.ndarray
          ) -> tuple[TensorStats, list[str]]:
    """One pass over a tensor: its statistics and the XXH3-128 of each chunk's bytes."""
    builder = StatsBuilder(data.dtype)
    row = math.prod(data.shape[1:]) if data.ndim else 1
    itemsize = data.dtype.itemsize
    ends = [(start + count) * row for start, count in chunks]
    hashers = [xxhash.xxh3_128() for _ in chunks]
    k = 0
    for offset, block in blocks(data, scratch):
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


@dataclass
class SnapshotPlan:
    """Everything pass 1 learnt: one small-column row per chunk, and the totals."""

    rows: pa.Table  #: the INFO_COLUMNS of every row, in file order
    content_digest: str
    n_tensors: int
    n_params: int
    nbytes: int
    source_files: list[SourceFile]
    #: per row: its bytes are not in C order in the source (pass 2 copies them)
    strided: list[bool] = field(default_factory=list)


def _analyse(
    source: TensorSource, model: str, step: int | None, tag: str | None, chunk_bytes: int,
    progress: Progress,
) -> tuple[dict[str, list[Any]], list[bool], int, int, int]:
    cols: dict[str, list[Any]] = {c: [] for c in INFO_COLUMNS}
    strided: list[bool] = []
    expected_total = source.nbytes()
    seen: set[str] = set()
    n_tensors = n_params = total = 0
    scratch = np.empty(BLOCK * 8, np.uint8)  # one block of any dtype, reused
    for rec in source.records():
        if rec.name in seen:
            raise StoreError(f"{source.label}: tensor {rec.name!r} appears twice")
        seen.add(rec.name)
        try:
            chunks = chunk_rows(rec.shape, rec.data.dtype.itemsize, chunk_bytes)
        except ShapeError as e:
            raise ShapeError(f"{source.label}: tensor {rec.name!r}: {e}") from None
        try:
            stats_, sums = _scan(rec.data, chunks, scratch)
        except (ValueError, TypeError, OverflowError) as e:
            raise StoreError(f"{source.label}: tensor {rec.name!r}: statistics failed: {e}") from e
        stats = stats_.as_dict()
        attrs = json.dumps(dict(rec.attrs), sort_keys=True)
        row = math.prod(rec.shape[1:]) if rec.shape else 1
        itemsize = rec.data.dtype.itemsize
        for i, (start, count) in enumerate(chunks):
            fixed = {
                "model": model, "step": step, "tag": tag, "name": rec.name,
                "source_name": rec.source_name, "module": rec.module, "param": rec.param,
                "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
                "layout": list(rec.layout), "source_layout": list(rec.source_layout),
                "source_shape": list(rec.source_shape), "chunk": i, "n_chunks": len(chunks),
                "row_start": start, "row_count": count,
                "nbytes": (count * row if rec.shape else 1) * itemsize, "attrs": attrs,
                "checksum": sums[i],
            }
            for key, value in fixed.items():
                cols[key].append(value)
            for key, _ in STAT_COLUMNS:
                cols[key].append(stats[key])
            strided.append(not is_c_order_le(chunk_of(rec, start, count)))
        n_tensors += 1
        n_params += rec.data.size
        total += rec.data.nbytes
        progress("read", rec.data.nbytes, expected_total)
    return cols, strided, n_tensors, n_params, total


def _digest(cols: dict[str, list[Any]]) -> str:
    """A content digest over what defines the tensors (not when or how they were ingested)."""
    h = hashlib.sha256()
    keys = ("name", "kind", "dtype", "shape", "layout", "source_layout", "source_shape",
            "chunk", "attrs", "checksum")
    for i in range(len(cols["name"])):
        h.update(json.dumps([cols[k][i] for k in keys]).encode())
        h.update(b"\n")
    return h.hexdigest()


def plan_snapshot(
    source: TensorSource, model: str, step: int | None, tag: str | None, chunk_bytes: int,
    progress: Progress = _no_progress,
) -> SnapshotPlan:
    """Pass 1: statistics and checksums of every chunk; the source hashed in parallel."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightatlas-sha256") as pool:
        hashing = pool.submit(source.source_files)
        try:
            cols, strided, n_tensors, n_params, total = _analyse(
                source, model, step, tag, chunk_bytes, progress
            )
        finally:
            try:
                files = hashing.result()
            except WeightAtlasError:
                raise
            except OSError as e:
                raise StoreError(f"{source.label}: cannot hash source files: {e}") from e
    schema = pa.schema([SCHEMA.field(c) for c in INFO_COLUMNS])
    rows = pa.Table.from_pydict(cols, schema=schema)
    return SnapshotPlan(rows, _digest(cols), n_tensors, n_params, total, files, strided)


def snapshot_metadata(
    plan: SnapshotPlan, source: TensorSource, model: str, step: int | None, tag: str | None,
    created: str, chunk_bytes: int,
) -> dict[str, Any]:
    """The JSON document stored as the snapshot's schema metadata."""
    files = plan.source_files
    if len(files) == 1:
        source_sha = files[0].sha256
    elif files:  # several files: sha256 of a sha256sum-style listing
        listing = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
        source_sha = hashlib.sha256(listing.encode()).hexdigest()
    else:
        source_sha = None
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
        "source": dict(source.metadata()),
        "created": created,
        "package": "weightatlas",
        "package_version": __version__,
        "checksum": CHECKSUM_ALGORITHM,
        "alignment": ALIGNMENT,
        "chunk_bytes": chunk_bytes,
        "content_digest": plan.content_digest,
        "n_tensors": plan.n_tensors,
        "n_rows": plan.rows.num_rows,
        "n_params": plan.n_params,
        "nbytes": plan.nbytes,
        # The tensor of every row, in row order: a reader finds a tensor's rows from the
        # footer alone, without reading every row's columns.
        "row_names": plan.rows.column("name").to_pylist(),
    }


def _data_array(buf: np.ndarray | bytes) -> pa.Array:
    n = len(buf) if isinstance(buf, bytes) else buf.nbytes
    offsets = pa.py_buffer(np.array([0, n], dtype=np.int64))
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 1, [None, offsets, pa.py_buffer(buf)]
    )


def write_snapshot_file(
    fd_path: str, source: TensorSource, plan: SnapshotPlan, metadata: dict[str, Any],
    progress: Progress = _no_progress,
) -> None:
    """Pass 2: write the snapshot to ``fd_path`` (a fresh file), every data value 64-aligned."""
    schema = SCHEMA.with_metadata(encode_metadata(metadata))
    header_len = 8 + len(schema.serialize())  # magic + schema message, written lazily
    # Every byte is hashed on its way to the file, so the whole-file checksum needs no
    # second read of it (finalize_file_checksum).
    raw = DigestingFile(fd_path)
    with raw, pa.PythonFile(raw, mode="w") as sink, pa.ipc.new_file(sink, schema) as writer:
        rows = prepared_rows(source, plan, raw.start_writeback)
        with contextlib.closing(rows):  # the worker is stopped before the file closes
            _write_rows(writer, sink, rows, plan, schema, header_len, progress)
    _check_alignment(fd_path)
    raw.remember()


def _write_rows(writer: Any, sink: Any, rows: Iterator[tuple[int, np.ndarray]],
                plan: SnapshotPlan, schema: pa.Schema, header_len: int, progress: Progress
                ) -> None:
    total = plan.nbytes
    for i, buf in rows:
        small = plan.rows.slice(i, 1).columns

        def batch(pad: int, data: pa.Array, small: list[pa.ChunkedArray] = small) -> Any:
            arrays = [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in small]
            return pa.RecordBatch.from_arrays(
                [*arrays, pa.array([b"\0" * pad], pa.binary()), data], schema=schema
            )

        twin = batch(0, _data_array(_MARKER)).serialize()
        offset = twin.to_pybytes().find(_MARKER)
        pos = sink.tell() or header_len
        pad = (-(pos + offset)) % ALIGNMENT
        writer.write_batch(batch(pad, _data_array(buf)))
        progress("write", buf.nbytes, total)


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

