"""Opening untrusted input files safely, shared by the adapters.

Every adapter opens files the same way: read-only, never blocking on a FIFO, refusing
anything but a regular file, optionally refusing a symbolic link, and remembering the
file's identity (device, inode, size, modification time) so that a file changed
between reading and hashing is caught. Errors are ``WeightAtlasError`` subclasses
naming the file.
"""

from __future__ import annotations

import hashlib
import os
import stat

from weightatlas.errors import (
    FormatError,
    NotFoundError,
    PathEscapeError,
    UnsafeInputError,
    WeightAtlasError,
)

__all__ = ["HASH_CHUNK", "check_unchanged", "ident", "open_regular", "os_error", "read_at",
           "sha256_file"]

#: Bytes hashed at a time: one reusable buffer keeps resident memory flat.
HASH_CHUNK = 8 << 20


def os_error(label: str, e: OSError) -> WeightAtlasError:
    """An ``OSError`` as a WeightAtlasError naming the file."""
    if isinstance(e, FileNotFoundError | NotADirectoryError):
        return NotFoundError(f"{label}: no such file")
    return WeightAtlasError(f"{label}: cannot read: {e.strerror or e}")


def open_regular(path: str, label: str, *, nofollow: bool) -> tuple[int, os.stat_result]:
    """Open a regular file read-only (FIFOs never block); return ``(fd, fstat)``."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if nofollow and os.path.islink(path):
            raise PathEscapeError(f"{label}: is a symbolic link (changed while reading)") from e
        raise os_error(label, e) from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise os_error(label, e) from e
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FormatError(f"{label}: expected a regular file, found a folder")
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device, socket or other special file"
        raise UnsafeInputError(f"{label}: expected a regular file, found {kind}")
    return fd, st


def read_at(fd: int, offset: int, n: int, label: str) -> bytes:
    """Exactly ``n`` bytes from ``offset`` (the file ending early is a FormatError)."""
    chunks: list[bytes] = []
    try:
        while n > 0:
            chunk = os.pread(fd, min(n, 1 << 26), offset)
            if not chunk:
                raise FormatError(f"{label}: file ended early (changed while reading?)")
            chunks.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
    except OSError as e:
        raise os_error(label, e) from e
    return b"".join(chunks)


def ident(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's version: device, inode, size, modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def sha256_file(path: str, label: str, expected: tuple[int, int, int, int],
                buf: bytearray | None = None) -> str:
    """Stream a file through sha256 (hashlib releases the GIL), refusing it if it changed
    since it was read."""
    fd, st = open_regular(path, label, nofollow=True)
    digest = hashlib.sha256()
    view = memoryview(buf if buf is not None else bytearray(HASH_CHUNK))
    try:
        if ident(st) != expected:
            raise FormatError(f"{label}: file changed since it was read; read it again")
        with open(fd, "rb", buffering=0, closefd=False) as f:
            total = 0
            while got := f.readinto(view):
                digest.update(view[:got])
                total += got
        if total != st.st_size:
            raise FormatError(f"{label}: file changed while being hashed")
    except OSError as e:
        raise os_error(label, e) from e
    finally:
        view.release()
        os.close(fd)
    return digest.hexdigest()


def check_unchanged(files: list[tuple[str, str, tuple[int, int, int, int]]]) -> None:
    """Refuse any of ``(path, label, identity when read)`` that changed since it was read
    (a file rewritten in place while a snapshot was written from it: its sha256 and the
    bytes written might then describe different contents)."""
    for path, label, expected in files:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as e:
            raise os_error(label, e) from e
        if ident(st) != expected:
            raise FormatError(f"{label}: file changed while it was being ingested; "
                              "ingest it again")
