"""Any strided array read in C order, a cache-sized block at a time.

The store reads each tensor in its canonical layout, but adapters often hand it a
strided view: a ``MatMul`` weight stored ``[in, out]`` in an ONNX file is canonical
``[out, in]`` only after a transpose. Copying such a view with NumPy walks the source
a column at a time, one cache line per element; :func:`copy_c_order` copies it in
tiles instead (several times as fast here), and :func:`c_blocks` hands out the
array as consecutive C-order blocks of about :data:`BLOCK` elements, copying only
the blocks of strided arrays, into one reused buffer. Statistics and checksums are
taken block by block while the block is still in cache, so a strided tensor is never
copied whole to compute them.

Every block comes out C-contiguous and little-endian, with the array's own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = ["BLOCK", "c_blocks", "copy_c_order", "is_c_order_le", "little_endian"]

#: Elements per block: large enough to amortise NumPy call overhead, small enough to
#: stay in cache and keep memory flat.
BLOCK = 1 << 18

# Tiles of a transposing copy: _ROWS destination rows by _COLS columns, so one tile
# reads _COLS source rows, _ROWS contiguous values each. Narrow tiles measured best
# (a 4096 x 1024 float32 transpose: 16 columns about 3 ms, 32 columns 8-12 ms, 64 x 64
# tiles 7 ms, NumPy's own copy 27 ms): few source rows stay in the level-1 cache.
_ROWS = 512
_COLS = 16
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def little_endian(dtype: np.dtype) -> np.dtype:
    """``dtype`` with little-endian byte order (unchanged when it has no byte order)."""
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def is_c_order_le(a: np.ndarray) -> bool:
    """Whether ``a``'s bytes are already what the store writes: C order, little-endian."""
    return bool(a.flags.c_contiguous) and a.dtype.byteorder != ">"


def _as_uint(a: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers (a view), so copies never convert values."""
    kind = _UINT.get(a.dtype.itemsize)
    return a if kind is None or a.dtype == kind else a.view(kind)


def copy_c_order(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into the C-contiguous ``dst`` of the same shape (and byte order).

    A ``src`` whose last axis has a larger stride than the one before it (a transposed
    matrix, a block of one, or a stack of them) is copied in tiles; anything else by
    NumPy.

    Example:
        >>> src = np.arange(12, dtype=np.float32).reshape(3, 4).T
        >>> dst = np.empty(src.shape, src.dtype)
        >>> copy_c_order(dst, src)
        >>> bool((dst == src).all())
        True
    """
    if src.shape != dst.shape:
        raise ValueError(f"copy_c_order: shapes differ, {src.shape} and {dst.shape}")
    if (src.ndim < 2 or src.size == 0 or src.dtype != dst.dtype or min(src.shape[-2:]) < 2
            or abs(src.strides[-1]) <= abs(src.strides[-2])):
        np.copyto(dst, src, casting="unsafe")
        return
    s, d = _as_uint(src), _as_uint(dst)
    rows, cols = src.shape[-2:]
    for lead in np.ndindex(*src.shape[:-2]):
        s_k, d_k = s[lead], d[lead]
        for r in range(0, rows, _ROWS):
            for c in range(0, cols, _COLS):
                d_k[r : r + _ROWS, c : c + _COLS] = s_k[r : r + _ROWS, c : c + _COLS]


def c_blocks(array: np.ndarray, size: int = BLOCK, scratch: np.ndarray | None = None,
             into: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(offset, block)``: the array's values in C order, in consecutive 1-d blocks.

    ``offset`` is the flat index of the block's first value. A C-contiguous
    little-endian array yields views of ``size`` values (the last one shorter); any
    other array yields whole first-axis slices of about ``size`` values each, copied
    into ``scratch`` (a 1-d uint8 array, replaced by a new one when too small), so
    each block is only valid until the next one is taken. With ``into`` (a uint8
    array of at least the array's byte size), each copied block goes to its own place
    in ``into`` instead, which holds the whole array in C order at the end: one copy
    that is both scanned block by block, while in cache, and kept.

    Example:
        >>> [(o, b.tolist()) for o, b in c_blocks(np.arange(6).reshape(2, 3).T)]
        [(0, [0, 3, 1, 4, 2, 5])]
    """
    if array.ndim == 0:
        yield 0, array.astype(little_endian(array.dtype)).reshape(1)
        return
    if is_c_order_le(array):
        flat = array.reshape(-1)
        for i in range(0, flat.size, size):
            yield i, flat[i : i + size]
        return
    dtype = little_endian(array.dtype)
    row = math.prod(array.shape[1:])
    rows = max(1, size // max(row, 1))
    need = min(rows, array.shape[0]) * row * dtype.itemsize
    if into is None and (scratch is None or scratch.nbytes < need):
        scratch = np.empty(need, np.uint8)
    for i in range(0, array.shape[0], rows):
        part = array[i : i + rows]
        if into is None:
            assert scratch is not None
            place = scratch[: part.size * dtype.itemsize]
        else:
            start = i * row * dtype.itemsize
            place = into[start : start + part.size * dtype.itemsize]
        out = place.view(dtype).reshape(part.shape)
        if part.dtype == dtype:
            copy_c_order(out, part)
        else:  # big-endian: NumPy swaps the bytes as it copies
            np.copyto(out, part)
        yield i * row, out.reshape(-1)
