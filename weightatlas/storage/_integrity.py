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

import mmap
import os
import struct

import xxhash

from weightatlas.errors import IntegrityError

__all__ = ["PLACEHOLDER", "file_checksum", "file_checksum_positions", "finalize_file_checksum"]

#: The value ``file_checksum`` holds while the digest is computed.
PLACEHOLDER = "0" * 32
_KEY = b'"file_checksum": "'
_TAIL = 10  # int32 footer length + b"ARROW1"


def file_checksum_positions(mm: mmap.mmap | bytes, path: str) -> list[int]:
    """Byte offsets of the two copies of the ``file_checksum`` value.

    The first copy is in the schema message right after the 8-byte magic; the second in
    the footer, whose length is the int32 before the closing magic.
    """
    size = len(mm)
    if size < 8 + _TAIL or mm[:6] != b"ARROW1" or mm[size - 6 :] != b"ARROW1":
        raise IntegrityError(f"{path}: not an Arrow IPC file (magic bytes missing or damaged)")
    (schema_len,) = struct.unpack("<i", mm[12:16])
    (footer_len,) = struct.unpack("<i", mm[size - _TAIL : size - 6])
    head_end = 16 + schema_len
    foot_start = size - _TAIL - footer_len
    if schema_len <= 0 or footer_len <= 0 or head_end > size or foot_start < head_end:
        raise IntegrityError(f"{path}: Arrow framing is damaged (schema length {schema_len}, "
                             f"footer length {footer_len}, file size {size})")
    positions = []
    for lo, hi in ((8, head_end), (foot_start, size - _TAIL)):
        at = bytes(mm[lo:hi]).find(_KEY)
        if at < 0:
            raise IntegrityError(f"{path}: snapshot metadata has no file checksum "
                                 "(the file is damaged or was not written by weightatlas)")
        positions.append(lo + at + len(_KEY))
    return positions


def _digest(mm: mmap.mmap | bytes, positions: list[int]) -> str:
    h = xxhash.xxh3_128()
    view = memoryview(mm)
    start = 0
    for pos in positions:
        h.update(view[start:pos])
        h.update(PLACEHOLDER.encode())
        start = pos + len(PLACEHOLDER)
    h.update(view[start:])
    view.release()
    return h.hexdigest()


def finalize_file_checksum(path: str) -> str:
    """Compute the digest of a freshly written snapshot and write it into both copies."""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            positions = file_checksum_positions(mm, path)
            for pos in positions:
                if mm[pos : pos + 32] != PLACEHOLDER.encode():
                    raise IntegrityError(f"{path}: file checksum placeholder not found")
            digest = _digest(mm, positions)
            for pos in positions:
                mm[pos : pos + 32] = digest.encode()
            mm.flush()
        finally:
            mm.close()
        os.fsync(f.fileno())
    return digest


def file_checksum(path: str) -> tuple[str, str]:
    """Return ``(stored, actual)`` file digests of a snapshot (equal when intact)."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: cannot read snapshot file: {e}") from e
    try:
        positions = file_checksum_positions(mm, path)
        stored = {bytes(mm[p : p + 32]).decode("ascii", "replace") for p in positions}
        actual = _digest(mm, positions)
    finally:
        mm.close()
    return (stored.pop() if len(stored) == 1 else "<copies differ>"), actual
