"""A row's bytes as the store writes them: C order, little-endian, one chunk.

The writer (``_writer.write_snapshot_file``) writes a tensor held in C order straight
from the source's memory; a chunk of a larger strided tensor is copied into a reused
buffer first.
"""

from __future__ import annotations

import numpy as np

from weightatlas.storage._blocks import copy_c_order, is_c_order_le, little_endian
from weightatlas.storage._record import TensorRecord

__all__ = ["chunk_bytes_of", "chunk_of"]


def chunk_of(rec: TensorRecord, start: int, count: int) -> np.ndarray:
    """The record's rows ``[start, start + count)`` (the record itself when 0-d)."""
    return rec.data if rec.data.ndim == 0 else rec.data[start : start + count]


def chunk_bytes_of(rec: TensorRecord, start: int, count: int, buf: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """The chunk's values as contiguous little-endian bytes (uint8, 1-d), and ``buf``.

    A chunk already in C order is a view of the record; any other is copied into
    ``buf`` (a uint8 array, replaced by a larger one when too small), which is returned
    so the caller can reuse it.
    """
    a = chunk_of(rec, start, count)
    if is_c_order_le(a):
        return a.reshape(-1).view(np.uint8), buf
    dtype = little_endian(a.dtype)
    n = a.size * dtype.itemsize
    if buf is None or buf.nbytes < n:
        buf = None  # (freed before the larger one is made: at most one chunk exists)
        buf = np.empty(n, np.uint8)
    out = buf[:n].view(dtype).reshape(a.shape)
    if a.dtype == dtype:
        copy_c_order(out, a)
    else:  # big-endian: NumPy swaps the bytes as it copies
        np.copyto(out, a)
    return buf[:n], buf
