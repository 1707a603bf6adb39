"""Whole-file checksums: every byte of a snapshot is covered by some checksum.

Each row's ``data`` has its own XXH3-128 (``checksum`` column), checked on every
read. On top of that, the file as a whole has an XXH3-128 stored *inside* it, in
the snapshot metadata under ``file_checksum``. Arrow writes that metadata twice (in
the schema message at the start of the file and in the footer), so the digest is
computed with both copies of its own 32 hex digits read as :data:`PLACEHOLDER`, then
written into both places. ``verify`` recomputes it, so a flipped byte anywhere (data,
statistics, padding, Arrow framing) is caught.

Format 2 takes the file's bytes *header last*: from the end of the schema message to
the end of the file, then the magic and schema message. The writer learns some of
the header's values (the source files' sha256, the content digest) only once every
row is written; it writes placeholders of the same width, hashes every row as it
goes out through a :class:`DigestingFile`, and :func:`finalize_file_checksum` then
puts the real values in both metadata copies and hashes only the footer and the
header, never reading the rows back. Format 1 files (in order, from byte 0) are
still verified.
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
from dataclasses import dataclass
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
    head_end, foot_start = _regions(read, size, path)
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


def _regions(read: Callable[[int, int], bytes], size: int, path: str) -> tuple[int, int]:
    """``(header_end, footer_start)``: where the schema message ends and the footer begins."""
    if size < 16 + _TAIL or read(0, 6) != b"ARROW1" or read(size - 6, 6) != b"ARROW1":
        raise IntegrityError(f"{path}: not an Arrow IPC file (magic bytes missing or damaged)")
    (schema_len,) = struct.unpack("<i", read(12, 4))
    (footer_len,) = struct.unpack("<i", read(size - _TAIL, 4))
    head_end = 16 + schema_len
    foot_start = size - _TAIL - footer_len
    if schema_len <= 0 or footer_len <= 0 or head_end > size or foot_start < head_end:
        raise IntegrityError(f"{path}: Arrow framing is damaged (schema length {schema_len}, "
                             f"footer length {footer_len}, file size {size})")
    return head_end, foot_start


def _digest(fd: int, size: int, positions: list[int], start: int = 0) -> str:
    """XXH3-128 of the file from ``start`` to its end, then its first ``start`` bytes,
    with the checksum copies at ``positions`` read as the placeholder.

    The file is streamed through one reusable buffer (``readinto``), never mapped,
    so hashing a many-GB snapshot adds nothing to the process's resident memory.
    """
    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    spans: list[tuple[int, int] | None] = []  # None: the placeholder
    for lo, hi in ((start, size), (0, start)):
        for pos in sorted(p for p in positions if lo <= p < hi):
            spans += [(lo, pos), None]
            lo = pos + len(PLACEHOLDER)
        spans.append((lo, hi))
    with open(fd, "rb", buffering=0, closefd=False) as f:
        for span in spans:
            if span is None:
                h.update(PLACEHOLDER.encode())
                continue
            lo, hi = span
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

    The first ``skip`` bytes (the header, hashed last in format 2) are written but not
    hashed. :meth:`mark` notes where the rows end (what follows, the footer, may still
    be completed, so it is hashed at the end). Once closed, :meth:`remember` hands the
    state to :func:`finalize_file_checksum`, which checks it is still the same file
    (inode, size, modification time).

    Example:
        >>> with DigestingFile(str(tmp / "f")) as f:
        ...     f.write(b"abc")
        3
        >>> f.digest == file_checksum_of(str(tmp / "f"))
        True
    """

    def __init__(self, path: str, skip: int = 0) -> None:
        super().__init__()
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        self._hash = xxhash.xxh3_128()
        self._skip = skip
        self.size = 0
        self.digest: str | None = None  #: of the bytes after ``skip``, once closed
        self._mark: tuple[int, Any] | None = None
        self._flushed = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a short write is finished here, never left to the caller
            done += self._file.write(view[done:]) or 0
        unhashed = self._skip - self.size
        self._hash.update(view if unhashed <= 0 else view[unhashed:])
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def mark(self) -> None:
        """Note that everything written so far is final (the rows); the rest is not yet."""
        self._mark = (self.size, self._hash.copy())

    def start_writeback(self, at_least: int = 32 << 20) -> None:
        """Have the kernel start writing out what was written so far (Linux; else nothing).

        Called between rows, so the file system's work for these pages (block
        allocation, starting the I/O) is spread over the write rather than left to
        the ``close`` and ``fsync`` that end it.
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
        """Hand the digest state of the closed file to :func:`finalize_file_checksum`."""
        if self.digest is None or self._mark is None:
            raise ValueError(f"{self.path}: DigestingFile.remember before mark and close")
        st = os.stat(self.path)
        with _LOCK:
            _STREAMED[self.path] = _Streamed(_identity(st), self._skip, *self._mark)


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


@dataclass(frozen=True)
class _Streamed:
    identity: tuple[int, int, int, int]
    skip: int  #: bytes not hashed at the start (the header)
    mark: int  #: the hashed bytes end here
    state: Any  #: XXH3-128 of the bytes from ``skip`` to ``mark``


_LOCK = threading.Lock()
_STREAMED: dict[str, _Streamed] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def finalize_file_checksum(path: str, complete: tuple[bytes, bytes] | None = None) -> str:
    """Complete a freshly written snapshot: its late metadata, its digest, then fsync.

    ``complete`` is ``(placeholder_json, final_json)``: the snapshot metadata as written
    (with placeholders for what was learnt while writing) and as it must read, of the
    same length; both copies, in the header and in the footer, are replaced. Then the
    digest (format 2 order) is written into both ``file_checksum`` copies. The state a
    :class:`DigestingFile` kept is used when the file is still the one it wrote (only the
    footer and the header are then read); otherwise the whole file is read back.
    """
    with _LOCK:
        streamed = _STREAMED.pop(path, None)
    fd = os.open(path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        size = st.st_size
        read = _pread_all(fd)
        head_end, foot_start = _regions(read, size, path)
        if complete is not None:
            old, new = complete
            if len(old) != len(new):
                raise IntegrityError(f"{path}: the completed metadata changed length (this is "
                                     "a weightatlas bug; please report it)")
            for lo, hi in ((8, head_end), (foot_start, size - _TAIL)):
                region = read(lo, hi - lo)
                at = region.find(old)
                if at < 0 or region.find(old, at + 1) >= 0:
                    raise IntegrityError(f"{path}: the metadata to complete is not in the "
                                         "file once (this is a weightatlas bug; please report it)")
                os.pwrite(fd, new, lo + at)
        positions = file_checksum_positions(read, size, path)
        for pos in positions:
            if read(pos, len(PLACEHOLDER)) != PLACEHOLDER.encode():
                raise IntegrityError(f"{path}: file checksum placeholder not found")
        if (streamed is not None and streamed.identity == _identity(st)
                and streamed.skip == head_end and streamed.mark <= foot_start):
            h = streamed.state.copy()  # of [skip, mark): nothing when no row was written
            rest = max(streamed.mark, head_end)
            h.update(read(rest, size - rest))  # the footer, completed
            h.update(read(0, head_end))  # the header, completed
            digest = h.hexdigest()
        else:
            digest = _digest(fd, size, positions, start=head_end)
        for pos in positions:
            os.pwrite(fd, digest.encode(), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def file_checksum(path: str, header_last: bool = True) -> tuple[str, str]:
    """Return ``(stored, actual)`` file digests of a snapshot (equal when intact).

    ``header_last`` is the order of format 2 (False for a format 1 snapshot).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read snapshot file: {e}") from e
    try:
        size = os.fstat(fd).st_size
        read = _pread_all(fd)
        positions = file_checksum_positions(read, size, path)
        head_end = _regions(read, size, path)[0] if header_last else 0
        stored = {read(p, len(PLACEHOLDER)).decode("ascii", "replace") for p in positions}
        try:
            actual = _digest(fd, size, positions, start=head_end)
        except IntegrityError as e:
            raise IntegrityError(f"{path}: {e}") from None
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read snapshot file: {e}") from e
    finally:
        os.close(fd)
    return (stored.pop() if len(stored) == 1 else "<copies differ>"), actual
