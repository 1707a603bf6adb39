"""Whole-file checksums: every byte of a snapshot is covered by some checksum.

Each row's ``data`` has its own XXH3-128 (``checksum`` column), checked on every
read. On top of that, the file as a whole has an XXH3-128 stored *inside* it, in
the snapshot metadata under ``file_checksum``. Arrow writes that metadata twice (in
the schema message at the start of the file and in the footer), so the digest is
computed over the file with both copies of its own 32 hex digits replaced by
:data:`PLACEHOLDER`, then written into both places. ``verify`` recomputes it, so a
flipped byte anywhere (data, statistics, padding, Arrow framing) is caught.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import xxhash

from weightatlas.errors import IntegrityError

__all__ = ["PLACEHOLDER", "file_checksum", "file_checksum_positions", "finalize_file_checksum"]

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


def finalize_file_checksum(path: str) -> str:
    """Compute the digest of a freshly written snapshot, write it into both copies, fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        read = _pread_all(fd)
        positions = file_checksum_positions(read, size, path)
        for pos in positions:
            if read(pos, len(PLACEHOLDER)) != PLACEHOLDER.encode():
                raise IntegrityError(f"{path}: file checksum placeholder not found")
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
