"""Pass 2's rows: each chunk's bytes in C order, checked, prepared one row ahead.

The writer (``_writer.write_snapshot_file``) writes rows on its own thread while a
worker thread reads the source for the next one: copying a strided chunk (a
transposed weight) into C order, and checking its XXH3-128 against pass 1's, so a
source that changed between the passes is refused. NumPy, xxhash and the file writes
release the GIL, so the two overlap on two cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from weightatlas.errors import IntegrityError
from weightatlas.storage._blocks import copy_c_order, is_c_order_le, little_endian
from weightatlas.storage._record import TensorRecord
from weightatlas.storage._source import TensorSource

if TYPE_CHECKING:
    from weightatlas.storage._writer import SnapshotPlan

__all__ = ["AHEAD_BYTES", "chunk_of", "prepared_rows"]


def chunk_of(rec: TensorRecord, start: int, count: int) -> np.ndarray:
    """The record's rows ``[start, start + count)`` (the record itself when 0-d)."""
    return rec.data if rec.data.ndim == 0 else rec.data[start : start + count]


def _chunk_bytes(rec: TensorRecord, start: int, count: int, buf: np.ndarray | None = None,
                 copy: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The chunk's values as contiguous little-endian bytes (uint8, 1-d), and ``buf``.

    A chunk already in C order is a view of the record unless ``copy``; any other is
    copied into ``buf`` (a uint8 array, replaced by a larger one when too small), which
    is returned so the caller can reuse it.
    """
    a = chunk_of(rec, start, count)
    if is_c_order_le(a) and not copy:
        return a.reshape(-1).view(np.uint8), buf
    dtype = little_endian(a.dtype)
    n = a.size * dtype.itemsize
    if buf is None or buf.nbytes < n:
        # (the caller still holds the old buffer until this returns: while growing, both
        # exist for a moment; buffers are at most one chunk)
        buf = np.empty(n, np.uint8)
    out = buf[:n].view(dtype).reshape(a.shape)
    if a.dtype == dtype:
        copy_c_order(out, a)
    else:  # big-endian: NumPy swaps the bytes as it copies
        np.copyto(out, a)
    return buf[:n], buf


def _records_in_order(
    source: TensorSource, plan: SnapshotPlan
) -> Iterator[tuple[TensorRecord, list[tuple[int, int, int, str]]]]:
    """Pass 2's view of the source: each record with its planned rows, checked in order."""
    names = plan.rows.column("name").to_pylist()
    starts = plan.rows.column("row_start").to_pylist()
    counts = plan.rows.column("row_count").to_pylist()
    sums = plan.rows.column("checksum").to_pylist()
    i = 0
    for rec in source.records():
        if i >= len(names) or rec.name != names[i]:
            raise IntegrityError(f"{source.label}: the source changed while it was being "
                                 f"ingested (tensor {rec.name!r} out of place)")
        rows = []
        while i < len(names) and names[i] == rec.name:
            rows.append((i, starts[i], counts[i], sums[i]))
            i += 1
        yield rec, rows
    if i != len(names):
        raise IntegrityError(f"{source.label}: the source changed while it was being ingested "
                             f"(tensor {names[i]!r} missing)")


#: Rows up to this size are read ahead into buffers of the writer's own; a larger row
#: is prepared only once the file has caught up, so at most one such buffer exists.
AHEAD_BYTES = 64 << 20
_DONE = object()


def prepared_rows(source: TensorSource, plan: SnapshotPlan,
                  between: Callable[[], None] = lambda: None
                  ) -> Generator[tuple[int, np.ndarray], None, None]:
    """Each row's bytes, checked against pass 1, prepared one row ahead on a worker thread.

    The worker reads the source, copying strided chunks into C order, while the caller
    writes the previous row; Arrow and NumPy release the GIL for both. Two tokens, each
    a reusable buffer, bound what is in flight: the row being written and the one being
    prepared. A source releases a tensor's memory when asked for the next one, so the
    worker moves on from a tensor handed over as a view of the source only once it has
    been written (else its pages would come back, never to be released). When the
    source has strided tensors, rows up to ``AHEAD_BYTES`` are therefore copied too
    (a memcpy, cheaper than the write it overlaps), so the next transpose runs while
    the file is written; a source without any (safetensors) is written from its own
    memory, as before. ``between`` is called on the worker after each row it hands
    over (the writer starts the write-back of what was written so far).
    """
    tokens: queue.Queue[np.ndarray | None] = queue.Queue()
    ready: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    n_tokens = 2
    for _ in range(n_tokens):
        tokens.put(None)
    ahead = any(plan.strided)
    nbytes = plan.rows.column("nbytes").to_pylist()

    def caught_up() -> bool:
        """Wait until every handed row is written (all tokens back); False when stopping."""
        held = [tokens.get() for _ in range(n_tokens)]
        for t in held:
            tokens.put(t)
        return not stop.is_set()

    def work() -> None:
        try:
            for rec, rows in _records_in_order(source, plan):
                shared = False  # a row was handed over as a view of the source's memory
                for i, start, count, checksum in rows:
                    big = nbytes[i] > AHEAD_BYTES
                    if big and not caught_up():
                        return
                    buf = tokens.get()
                    if stop.is_set():
                        return
                    copy = plan.strided[i] or (ahead and not big)
                    data, buf = _chunk_bytes(rec, start, count, buf, copy=copy)
                    shared |= not copy
                    if xxhash.xxh3_128(data.data).hexdigest() != checksum:
                        raise IntegrityError(f"{source.label}: tensor {rec.name!r} changed "
                                             "while it was being ingested")
                    ready.put((i, data, None if big else buf))
                    del data, buf
                    between()
                del rec
                if shared and not caught_up():
                    return
            ready.put(_DONE)
        except BaseException as e:  # handed to the caller, re-raised there
            ready.put(e)

    worker = threading.Thread(target=work, name="weightatlas-writer", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            i, data, buf = item
            del item
            yield i, data
            del data
            tokens.put(buf)
    finally:
        stop.set()
        for _ in range(n_tokens):
            tokens.put(None)
        worker.join()
