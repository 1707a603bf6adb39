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
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from weightatlas.errors import StoreError

__all__ = ["STAGING", "clean_staging", "fsync_dir", "publish", "staging_file"]

STAGING = ".staging"


def _fcntl():  # type: ignore[no-untyped-def]
    """``fcntl``, imported when a store is written (it exists on Linux and macOS only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise StoreError("writing to a weightatlas store needs a POSIX system (Linux, macOS): "
                         "its commit protocol uses flock and hard links") from None
    return fcntl
_SUFFIX = ".arrow.partial"


def fsync_dir(path: str) -> None:
    """fsync a directory, so that names created or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staging_file(store_root: str) -> Iterator[str]:
    """Create a locked, empty staging file; remove it on exit unless it was published.

    Yields the staging path. The lock is held until the context exits.
    """
    staging = os.path.join(store_root, STAGING)
    os.makedirs(staging, exist_ok=True)
    for _ in range(100):
        path = os.path.join(staging, f"{os.getpid()}-{uuid.uuid4().hex}{_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl = _fcntl()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
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
    """Remove staging files left by writers that died; return the paths removed."""
    staging = os.path.join(store_root, STAGING)
    removed: list[str] = []
    try:
        names = os.listdir(staging)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(staging, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl = _fcntl()
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            try:
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    if removed:
        fsync_dir(staging)
    return removed
