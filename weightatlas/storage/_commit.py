"""The commit protocol: staging files, atomic visibility, and safe cleanup.

A writer creates a staging file in ``<store>/.staging/`` with ``O_CREAT | O_EXCL``
and holds an exclusive ``flock`` on it for as long as it lives. It writes and
fsyncs the file, then makes it visible under its final name with ``link()``, which
fails if the name exists (so two writers can never both create one snapshot), or
with ``rename()`` when overwriting on purpose; then it fsyncs the directory.
Readers only ever open final names, so they never see a partial snapshot.

A writer killed mid-way leaves its staging file behind, but its lock dies with it.
:func:`clean_staging` removes exactly the staging files nobody holds a lock on. The
one race (a cleaner locking a brand-new file before its writer does) is closed by
the writer: after taking its lock it checks that its path still names its inode,
and starts over if a cleaner removed it.

The store never follows a symbolic link inside itself: every folder it writes to or
deletes from is checked to be a real folder (:func:`real_dir`), and cleanup only
touches names it created.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from weightatlas.errors import PathEscapeError, StoreError

__all__ = [
    "STAGING",
    "clean_staging",
    "fsync_dir",
    "locked",
    "make_dirs",
    "publish",
    "real_dir",
    "staging_file",
]

STAGING = ".staging"
_SUFFIX = ".arrow.partial"
_STAGING_NAME = re.compile(r"^\d+-[0-9a-f]{32}\.arrow\.partial$")


def _fcntl() -> Any:
    """``fcntl``, imported when a store is written (it exists on Linux and macOS only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise StoreError("writing to a weightatlas store needs a POSIX system (Linux, macOS): "
                         "its commit protocol uses flock and hard links") from None
    return fcntl


def real_dir(path: str) -> bool:
    """Whether ``path`` is a real folder; ``False`` if absent.

    Raises:
        PathEscapeError: ``path`` is a symbolic link or not a folder (the store never
            follows links inside itself).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise PathEscapeError(f"{path}: is {what}; a weightatlas store only holds real folders "
                              "and never follows links inside itself")
    return True


def make_dirs(path: str, stop: str) -> None:
    """Create ``path`` and its missing parents below ``stop`` durably (parents fsynced).

    Every existing component is checked with :func:`real_dir`.
    """
    missing = []
    current = path
    while not real_dir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if current == stop or parent == current:
            break
        current = parent
    for directory in reversed(missing):
        with suppress(FileExistsError):
            os.mkdir(directory)
        real_dir(directory)  # a link raced in: refuse it
        fsync_dir(os.path.dirname(directory))


def fsync_dir(path: str) -> None:
    """fsync a directory, so that names created or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(path: str, *, shared: bool, wait: bool = True) -> Iterator[bool]:
    """Hold a shared or exclusive ``flock`` on the file ``path`` (created if missing).

    Yields whether the lock was taken: always ``True`` when ``wait``; with
    ``wait=False``, ``False`` if another process holds it.
    """
    fcntl = _fcntl()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


@contextmanager
def staging_file(store_root: str) -> Iterator[str]:
    """Create a locked, empty staging file; remove it on exit unless it was published.

    Yields the staging path. The lock is held until the context exits.
    """
    staging = os.path.join(store_root, STAGING)
    make_dirs(staging, store_root)
    fcntl = _fcntl()
    for _ in range(100):
        path = os.path.join(staging, f"{os.getpid()}-{uuid.uuid4().hex}{_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a cleaner removed it between our create and our lock: try again
    else:  # pragma: no cover - would need 100 lost races in a row
        raise StoreError(f"{staging}: could not create a staging file")
    try:
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def publish(staging_path: str, final_path: str, *, overwrite: bool) -> bool:
    """Make a fully written, fsynced staging file visible under ``final_path``.

    Returns ``False`` (and publishes nothing) when ``final_path`` exists and
    ``overwrite`` is false; the caller decides whether that is a conflict.
    """
    directory = os.path.dirname(final_path)
    if overwrite:
        os.replace(staging_path, final_path)
    else:
        try:
            os.link(staging_path, final_path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise StoreError(
                    f"{directory}: the file system does not support hard links, which the "
                    "store's commit protocol needs (use a local POSIX file system)"
                ) from e
            raise
    fsync_dir(directory)
    return True


def clean_staging(store_root: str) -> list[str]:
    """Remove staging files left by writers that died; return the paths removed.

    Only names this module creates are touched, only regular files are opened (never
    followed links, FIFOs or devices), and only files no live writer has locked.
    """
    staging = os.path.join(store_root, STAGING)
    if not real_dir(staging):
        return []
    fcntl = _fcntl()
    removed: list[str] = []
    for name in os.listdir(staging):
        if not _STAGING_NAME.match(name):
            continue
        path = os.path.join(staging, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            with suppress(FileNotFoundError):
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    removed.append(path)
        finally:
            os.close(fd)
    if removed:
        fsync_dir(staging)
    return removed
