"""Whole-file checksums: every byte of a snapshot is covered by some checksum.

Each row's ``data`` has its own XXH3-128 (``checksum`` column), checked on every
read. On top of that, the file as a whole has an XXH3-128 stored *inside* it, in
the snapshot metadata under ``file_checksum``. Arrow writes that metadata twice (in
the schema message at the start of the file and in the footer), so the digest is
computed over the file with both copies of its own 32 hex digits replaced by
:data:`PLACEHOLDER`, then written into both places. ``verify`` recomputes it, so a
flipped byte anywhere (data, statistics, padding, Arrow framing) is caught.

The writer writes the file through a :class:`DigestingFile`, which hashes every byte
on its way out (the placeholders are what is written), so that
:func:`finalize_file_checksum` need not read the new file back; it still does when the
file is not the one the digest was taken of (another inode, size or time).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import xxhash

from weightatlas.errors import IntegrityError

__all__ = ["PLACEHOLDER", "DigestingFile", "file_checksum", "file_checksum_positions",
           "finalize_file_checksum"]

#: The value ``file_checksum`` holds while the digest is computed.
PLACEHOLDER = "0" * 32
_KEY = b'"file_checksum": "'
_TAIL = 10  # int32 footer length + b"ARROW1"
_BLOCK = 8 << 20


def file_checksum_positions(read: Callable[[int, int], bytes], size: int, path: str) -> list[int]:
    """Byte offsets of the two copies of the ``file_checksum`` value.

    The first copy is in the schema message right after the 8-byte magic; the second in
    the footer, whose length is the int32 before the closing magic. ``read(offset, n)``
    returns ``n`` bytes of the file from ``offset``.
    """
    if size < 16 + _TAIL or read(0, 6) != b"ARROW1" or read(size - 6, 6) != b"ARROW1":
        raise IntegrityError(f"{path}: not an Arrow IPC file (magic bytes missing or damaged)")
    (schema_len,) = struct.unpack("<i", read(12, 4))
    (footer_len,) = struct.unpack("<i", read(size - _TAIL, 4))
    head_end = 16 + schema_len
    foot_start = size - _TAIL - footer_len
    if schema_len <= 0 or footer_len <= 0 or head_end > size or foot_start < head_end:
        raise IntegrityError(f"{path}: Arrow framing is damaged (schema length {schema_len}, "
                             f"footer length {footer_len}, file size {size})")
    positions = []
    for lo, hi in ((8, head_end), (foot_start, size - _TAIL)):
        at = read(lo, hi - lo).find(_KEY)
        if at < 0:
            raise IntegrityError(f"{path}: snapshot metadata has no file checksum "
                                 "(the file is damaged or was not written by weightatlas)")
        positions.append(lo + at + len(_KEY))
    return positions


def _pread_all(fd: int) -> Callable[[int, int], bytes]:
    def read(offset: int, n: int) -> bytes:
        parts = []
        while n > 0:
            got = os.pread(fd, n, offset)
            if not got:
                break
            parts.append(got)
            offset += len(got)
            n -= len(got)
        return b"".join(parts)

    return read


def _digest(fd: int, size: int, positions: list[int]) -> str:
    """XXH3-128 of the file with the checksum copies read as the placeholder.

    The file is streamed through one reusable buffer (``readinto``), never mapped,
    so hashing a many-GB snapshot adds nothing to the process's resident memory.
    """
    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    spans = []
    start = 0
    for pos in positions:
        spans.append((start, pos))
        start = pos + len(PLACEHOLDER)
    spans.append((start, size))
    with open(fd, "rb", buffering=0, closefd=False) as f:
        for i, (lo, hi) in enumerate(spans):
            if i:
                h.update(PLACEHOLDER.encode())
            f.seek(lo)
            left = hi - lo
            while left > 0:
                got = f.readinto(view[: min(left, _BLOCK)])
                if not got:
                    raise IntegrityError("file ended early while hashing")
                h.update(view[:got])
                left -= got
    view.release()
    return h.hexdigest()


class DigestingFile(io.RawIOBase):
    """A new file, written in full on every call, whose XXH3-128 is taken as it is written.

    Once closed, :meth:`remember` hands its digest to :func:`finalize_file_checksum`,
    which checks it is still the same file (inode, size, modification time).

    Example:
        >>> with DigestingFile(str(tmp / "f")) as f:
        ...     f.write(b"abc")
        3
        >>> f.digest == file_checksum_of(str(tmp / "f"))
        True
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self.digest: str | None = None
        self._flushed = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a short write is finished here, never left to the caller
            done += self._file.write(view[done:]) or 0
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def start_writeback(self, at_least: int = 32 << 20) -> None:
        """Have the kernel start writing out what was written so far (Linux; else nothing).

        Called from a thread other than the writing one, so the file system's work for
        these pages (block allocation, starting the I/O) is done there, not in the
        ``close`` and ``fsync`` that end the write: those then find little left.
        """
        end = self.size
        if end - self._flushed < at_least or self.closed:
            return
        sync_range = _sync_file_range()
        if sync_range is not None:
            sync_range(self._file.fileno(), self._flushed, end - self._flushed, 2)  # WRITE
        self._flushed = end

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self.digest = self._hash.hexdigest()
        super().close()

    def remember(self) -> None:
        """Record the digest of the closed, complete file for :func:`finalize_file_checksum`."""
        if self.digest is None:
            raise ValueError(f"{self.path}: DigestingFile.remember before close")
        st = os.stat(self.path)
        with _LOCK:
            _STREAMED[self.path] = (_identity(st), self.digest)


def file_checksum_of(path: str) -> str:
    """XXH3-128 of a whole file, read back (the reference :class:`DigestingFile` matches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _digest(fd, os.fstat(fd).st_size, [])
    finally:
        os.close(fd)


_SYNC: Any = None


def _sync_file_range() -> Any:
    """Linux's ``sync_file_range(2)`` (which Python does not offer), or None."""
    global _SYNC
    if _SYNC is None:
        _SYNC = False
        if sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8:
            with contextlib.suppress(OSError, AttributeError):
                f = ctypes.CDLL(None, use_errno=True).sync_file_range
                f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                f.restype = ctypes.c_int
                _SYNC = f
    return _SYNC or None


_LOCK = threading.Lock()
_STREAMED: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def finalize_file_checksum(path: str) -> str:
    """Compute the digest of a freshly written snapshot, write it into both copies, fsync.

    The digest a :class:`DigestingFile` took while writing ``path`` is used when the file
    is still that file; otherwise the file is read back and hashed.
    """
    with _LOCK:
        streamed = _STREAMED.pop(path, None)
    fd = os.open(path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        size = st.st_size
        read = _pread_all(fd)
        positions = file_checksum_positions(read, size, path)
        for pos in positions:
            if read(pos, len(PLACEHOLDER)) != PLACEHOLDER.encode():
                raise IntegrityError(f"{path}: file checksum placeholder not found")
        if streamed is not None and streamed[0] == _identity(st):
            digest = streamed[1]
        else:
            digest = _digest(fd, size, positions)
        for pos in positions:
            os.pwrite(fd, digest.encode(), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def file_checksum(path: str) -> tuple[str, str]:
    """Return ``(stored, actual)`` file digests of a snapshot (equal when intact)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read snapshot file: {e}") from e
    try:
        size = os.fstat(fd).st_size
        read = _pread_all(fd)
        positions = file_checksum_positions(read, size, path)
        stored = {read(p, len(PLACEHOLDER)).decode("ascii", "replace") for p in positions}
        try:
            actual = _digest(fd, size, positions)
        except IntegrityError as e:
            raise IntegrityError(f"{path}: {e}") from None
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read snapshot file: {e}") from e
    finally:
        os.close(fd)
    return (stored.pop() if len(stored) == 1 else "<copies differ>"), actual
