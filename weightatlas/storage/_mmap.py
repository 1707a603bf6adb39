"""Read-only memory maps of snapshot files, as pyarrow buffers.

``pyarrow.memory_map`` asks the kernel to read ahead (``MADV_WILLNEED``) every range
the IPC reader touches, which includes each row's whole body: opening a 1 GB snapshot
of 32 tensors took 4 ms that way, 0.3 ms through a plain ``mmap`` wrapped as a
buffer. Both are zero-copy. The map lives as long as any buffer or array made from
it, and is unmapped when the last one is released.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import pyarrow as pa

__all__ = ["MappedFile", "map_file"]


class MappedFile:
    """A read-only map of a file: ``buffer`` for pyarrow, ``release`` to drop pages."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            empty = os.fstat(f.fileno()).st_size == 0
            self._mm = None if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buffer = pa.py_buffer(b"" if self._mm is None else self._mm)

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of [start, stop) from this process's memory (not from the file).

        Later reads of the range fault the pages back in from the page cache, so views
        over it stay valid; this only keeps resident memory flat while streaming.
        """
        page = mmap.PAGESIZE
        start -= start % page
        if self._mm is None or stop <= start or not hasattr(mmap, "MADV_DONTNEED"):
            return
        with contextlib.suppress(OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED, start, min(stop, len(self._mm)) - start)


def map_file(path: str) -> pa.Buffer:
    """Map ``path`` read-only and return it as one zero-copy pyarrow buffer."""
    return MappedFile(path).buffer
