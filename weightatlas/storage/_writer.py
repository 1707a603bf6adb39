"""Writing one snapshot file from a tensor source, in two passes.

Pass 1 reads every tensor once to compute its statistics and the checksum of each
chunk (the source files' sha256 is computed at the same time on a worker thread).
Pass 2 writes the Arrow IPC file: the schema metadata, which Arrow writes first,
can then hold everything (source hash, content digest, totals), and every row is
written straight from the source's memory (a memory map, usually) to the file.
Pass 2 checks each chunk's checksum again, so a source that changes between the
passes is an error, never a silently wrong snapshot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from weightatlas._version import __version__
from weightatlas.errors import IntegrityError, ShapeError, StoreError, WeightAtlasError
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
from weightatlas.storage._mmap import map_file
from weightatlas.storage._record import TensorRecord
from weightatlas.storage._source import SourceFile, TensorSource
from weightatlas.storage._stats import tensor_stats

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


def _chunk_bytes(rec: TensorRecord, start: int, count: int) -> np.ndarray:
    """The chunk's values as a contiguous little-endian uint8 array (a view when possible)."""
    a = rec.data if rec.data.ndim == 0 else rec.data[start : start + count]
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


@dataclass
class SnapshotPlan:
    """Everything pass 1 learnt: one small-column row per chunk, and the totals."""

    rows: pa.Table  #: the INFO_COLUMNS of every row, in file order
    content_digest: str
    n_tensors: int
    n_params: int
    nbytes: int
    source_files: list[SourceFile]


def _analyse(
    source: TensorSource, model: str, step: int | None, tag: str | None, chunk_bytes: int,
    progress: Progress,
) -> tuple[dict[str, list[Any]], int, int, int]:
    cols: dict[str, list[Any]] = {c: [] for c in INFO_COLUMNS}
    expected_total = source.nbytes()
    seen: set[str] = set()
    n_tensors = n_params = total = 0
    for rec in source.records():
        if rec.name in seen:
            raise StoreError(f"{source.label}: tensor {rec.name!r} appears twice")
        seen.add(rec.name)
        try:
            stats = tensor_stats(rec.data).as_dict()
        except (ValueError, TypeError, OverflowError) as e:
            raise StoreError(f"{source.label}: tensor {rec.name!r}: statistics failed: {e}") from e
        try:
            chunks = chunk_rows(rec.shape, rec.data.dtype.itemsize, chunk_bytes)
        except ShapeError as e:
            raise ShapeError(f"{source.label}: tensor {rec.name!r}: {e}") from None
        attrs = json.dumps(dict(rec.attrs), sort_keys=True)
        for i, (start, count) in enumerate(chunks):
            buf = _chunk_bytes(rec, start, count)
            fixed = {
                "model": model, "step": step, "tag": tag, "name": rec.name,
                "source_name": rec.source_name, "module": rec.module, "param": rec.param,
                "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
                "layout": list(rec.layout), "source_layout": list(rec.source_layout),
                "source_shape": list(rec.source_shape), "chunk": i, "n_chunks": len(chunks),
                "row_start": start, "row_count": count, "nbytes": buf.nbytes, "attrs": attrs,
                "checksum": xxhash.xxh3_128(buf.data).hexdigest(),
            }
            for key, value in fixed.items():
                cols[key].append(value)
            for key, _ in STAT_COLUMNS:
                cols[key].append(stats[key])
            del buf
        n_tensors += 1
        n_params += rec.data.size
        total += rec.data.nbytes
        progress("read", rec.data.nbytes, expected_total)
    return cols, n_tensors, n_params, total


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
            cols, n_tensors, n_params, total = _analyse(
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
    return SnapshotPlan(rows, _digest(cols), n_tensors, n_params, total, files)


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


def _rows_in_order(
    source: TensorSource, plan: SnapshotPlan
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass 2's view of the source: each planned row with its chunk bytes, checked."""
    names = plan.rows.column("name").to_pylist()
    starts = plan.rows.column("row_start").to_pylist()
    counts = plan.rows.column("row_count").to_pylist()
    sums = plan.rows.column("checksum").to_pylist()
    i = 0
    for rec in source.records():
        if i >= len(names) or rec.name != names[i]:
            raise IntegrityError(f"{source.label}: the source changed while it was being "
                                 f"ingested (tensor {rec.name!r} out of place)")
        while i < len(names) and names[i] == rec.name:
            buf = _chunk_bytes(rec, starts[i], counts[i])
            if xxhash.xxh3_128(buf.data).hexdigest() != sums[i]:
                raise IntegrityError(f"{source.label}: tensor {rec.name!r} changed while it was "
                                     "being ingested")
            yield i, buf
            i += 1
    if i != len(names):
        raise IntegrityError(f"{source.label}: the source changed while it was being ingested "
                             f"(tensor {names[i]!r} missing)")


def write_snapshot_file(
    fd_path: str, source: TensorSource, plan: SnapshotPlan, metadata: dict[str, Any],
    progress: Progress = _no_progress,
) -> None:
    """Pass 2: write the snapshot to ``fd_path`` (a fresh file), every data value 64-aligned."""
    schema = SCHEMA.with_metadata(encode_metadata(metadata))
    header_len = 8 + len(schema.serialize())  # magic + schema message, written lazily
    total = plan.nbytes
    with pa.OSFile(fd_path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for i, buf in _rows_in_order(source, plan):
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
    _check_alignment(fd_path)


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

