"""Attachments: content-addressed files that travel with snapshots (an ONNX graph, say).

A source may attach named byte strings to its snapshot (``TensorSource.attachments``).
Each is stored once per model as ``models/<model>/blobs/<sha256>``, immutable and
shared by every snapshot that attaches the same bytes (the hundreds of training
steps of one model share one graph). The snapshot's metadata maps each attachment
name to its sha256 and size; reading one checks both. Blobs are written and linked
into place before the snapshot that names them is published, so a visible snapshot
never names a missing blob. ``Store.gc`` removes blobs no snapshot names, after a
grace period, and under an exclusive lock (``models/<model>/.blobs.lock``) that every
writer holds shared from storing its blobs until its snapshot is published, so a blob
is never removed between the two. (The ``_`` prefix keeps ``pyarrow.dataset`` from
reading blobs as Arrow files.)
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from weightatlas.errors import IntegrityError, NotFoundError, StoreError
from weightatlas.storage._commit import make_dirs, publish, real_dir, staging_file

__all__ = [
    "BLOBS",
    "LOCK",
    "check_attachment_name",
    "clean_blobs",
    "read_blob",
    "write_blob",
]

BLOBS = "_blobs"
#: Per-model lock: writers hold it shared while they store blobs and publish; gc exclusive.
LOCK = ".blobs.lock"
#: Unreferenced blobs younger than this are kept (a writer may be about to publish).
GRACE_SECONDS = 3600
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_attachment_name(name: str) -> str:
    """Attachment names are short file-name-like strings (``graph.onnx``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(f"attachment name {name!r} is not allowed: use 1-128 letters, digits, "
                         "'_', '.', '+' or '-'")
    return name


def _intact(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except FileNotFoundError:
        return False


def write_blob(store_root: str, model_dir: str, data: bytes) -> tuple[str, int]:
    """Store ``data`` under its sha256 (once); return ``(sha256, size)``.

    The caller holds the model's blob lock shared. A blob already there is reused only
    if its bytes are intact; a damaged one is replaced.
    """
    digest = hashlib.sha256(data).hexdigest()
    directory = os.path.join(model_dir, BLOBS)
    path = os.path.join(directory, digest)
    make_dirs(directory, store_root)
    if _intact(path, data):
        os.utime(path, follow_symlinks=False)  # fresh again for gc's grace period
        return digest, len(data)
    with staging_file(store_root) as staging:
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Replacing is safe: the name is the content's hash.
        publish(staging, path, overwrite=True)
    return digest, len(data)


def read_blob(model_dir: str, digest: str, size: int, label: str) -> bytes:
    """Read a blob and check it against its sha256 and size."""
    if not isinstance(digest, str) or not _SHA.match(digest):
        raise IntegrityError(f"{label}: attachment digest {digest!r} is not a sha256")
    real_dir(os.path.join(model_dir, BLOBS))  # PathEscapeError for a linked folder
    path = os.path.join(model_dir, BLOBS, digest)
    if os.path.islink(path):
        raise IntegrityError(f"{path}: {label} is a symbolic link; the store never follows them")
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: {label} is missing from the store") from None
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read {label}: {e}") from e
    actual = hashlib.sha256(data).hexdigest()
    if len(data) != size or actual != digest:
        raise IntegrityError(f"{path}: {label} is damaged: {len(data)} bytes with sha256 {actual}, "
                             f"expected {size} bytes with sha256 {digest}")
    return data


def clean_blobs(model_dir: str, referenced: set[str], grace: float = GRACE_SECONDS) -> list[str]:
    """Remove blobs of a model that no snapshot names and that are older than ``grace``.

    The caller holds the model's blob lock exclusively.
    """
    directory = os.path.join(model_dir, BLOBS)
    if not real_dir(directory):
        return []
    removed = []
    names = [n for n in os.listdir(directory) if _SHA.match(n)]
    now = time.time()
    for name in names:
        path = os.path.join(directory, name)
        if name in referenced:
            continue
        try:
            if now - os.lstat(path).st_mtime < grace:
                continue
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed
