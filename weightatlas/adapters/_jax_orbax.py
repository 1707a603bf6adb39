"""Orbax checkpoint folders, restored on the CPU with nothing outside the folder read.

tensorstore follows symbolic links, so an Orbax checkpoint could make a reader
disclose any file on the host (google/flax#5487, google/orbax#3375). Before Orbax
opens anything, the folder is walked with ``lstat``:

- a symbolic link pointing outside the folder is a
  :class:`~weightatlas.errors.PathEscapeError`; any other symbolic link, a hard link
  (more than one name for a file), a FIFO, a socket or a device is an
  :class:`~weightatlas.errors.UnsafeInputError` (Orbax writes none of them);
- more than ``max_files`` files or ``max_bytes`` bytes is a
  :class:`~weightatlas.errors.ResourceLimitError`;
- every tree key in the metadata must be a plain name (no ``/``, ``\\``, ``..`` or NUL),
  since older layouts turn keys into folder names;
- a legacy aggregate ``checkpoint`` msgpack file is parsed by weightatlas's own reader
  first (an object-dtype leaf is refused).

The checkpoint is then restored against a target built from its own metadata (shapes
and dtypes, on the CPU device; restoring without a target is what lets a legacy
checkpoint read arrays from elsewhere), and the folder is walked again: if any file
changed, appeared or vanished meanwhile, the result is discarded with an
:class:`~weightatlas.errors.UnsafeInputError`.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from weightatlas.errors import (
    FormatError,
    PathEscapeError,
    ResourceLimitError,
    UnsafeInputError,
    WeightAtlasError,
)

__all__ = ["MAX_BYTES", "MAX_FILES", "is_orbax", "prewalk", "restore"]

#: Most files an Orbax folder may hold.
MAX_FILES = 100_000
#: Most bytes an Orbax folder may hold (1 TiB).
MAX_BYTES = 1 << 40
_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "orbax.checkpoint",
            "_sharding")
_MAX_DEPTH = 32

#: (relative path, size, device, inode, mtime_ns) for every regular file.
FileFacts = tuple[str, int, int, int, int]


def is_orbax(path: str) -> bool:
    """Whether a folder looks like an Orbax checkpoint (or holds exactly one).

    Example:
        >>> is_orbax(str(tmp))
        False
    """
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return bool(names & set(_MARKERS))


def prewalk(root: str, *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES
            ) -> list[FileFacts]:
    """Check every entry of a checkpoint folder without following links; list its files."""
    out: list[FileFacts] = []
    total = 0

    def visit(folder: str, rel: str, depth: int) -> None:
        nonlocal total
        if depth > _MAX_DEPTH:
            raise ResourceLimitError(f"{root}: folders nested more than {_MAX_DEPTH} deep")
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise WeightAtlasError(f"{root}: cannot list {rel or '.'}: {e.strerror or e}") from e
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise WeightAtlasError(f"{root}: cannot stat {name}: {e.strerror or e}") from e
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(entry.path)
                if os.path.commonpath([target, root]) != root:
                    raise PathEscapeError(f"{root}: {name} is a symbolic link to {target}, "
                                          "outside the checkpoint folder")
                raise UnsafeInputError(f"{root}: {name} is a symbolic link; an Orbax "
                                       "checkpoint holds none, and links are not followed")
            if stat.S_ISDIR(st.st_mode):
                visit(entry.path, name, depth + 1)
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket or device"
                raise UnsafeInputError(f"{root}: {name} is {kind}, not a regular file")
            if st.st_nlink > 1:
                raise UnsafeInputError(f"{root}: {name} has {st.st_nlink} hard links; a file "
                                       "shared with another folder is not read")
            total += st.st_size
            out.append((name, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns))
            if len(out) > max_files or total > max_bytes:
                raise ResourceLimitError(f"{root}: more than {max_files} files or {max_bytes} "
                                         "bytes (raise max_files / max_bytes if trusted)")

    visit(root, "", 0)
    return out


def _check_keys(tree: Any, root: str, path: tuple[str, ...] = ()) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = str(k)
            if not key or any(c in key for c in "/\\\x00") or key in (".", "..") or ".." in key:
                raise PathEscapeError(f"{root}: tree key {key!r} under "
                                      f"{'/'.join(path) or '<root>'} is not a plain name")
            _check_keys(v, root, (*path, key))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            _check_keys(v, root, (*path, str(i)))


def restore(root: str, *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES
            ) -> tuple[Any, list[FileFacts]]:
    """Restore an Orbax checkpoint folder on the CPU, after and before checking it."""
    root = os.path.realpath(root)
    before = prewalk(root, max_files=max_files, max_bytes=max_bytes)
    names = {f[0] for f in before}
    if "checkpoint" in names:  # legacy aggregate file: msgpack, possibly with object leaves
        from weightatlas.adapters._jax_msgpack import parse

        with open(os.path.join(root, "checkpoint"), "rb") as f:
            parse(f.read(), os.path.join(root, "checkpoint"))
    import jax
    import orbax.checkpoint as ocp

    try:
        checkpointer = ocp.StandardCheckpointer()
        meta = checkpointer.metadata(root)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:
            raise FormatError(f"{root}: cannot restore this Orbax checkpoint: its metadata "
                              "holds no tree (a damaged _METADATA file?)")
        _check_keys(tree, root)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

        def target(m: Any) -> Any:
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu)

        abstract = jax.tree_util.tree_map(target, tree)
        restored = checkpointer.restore(root, abstract)
        checkpointer.close()
    except WeightAtlasError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types; all mean "cannot read"
        raise FormatError(f"{root}: cannot restore this Orbax checkpoint: "
                          f"{type(e).__name__}: {str(e)[:400]}") from e
    after = prewalk(root, max_files=max_files, max_bytes=max_bytes)
    if after != before:
        raise UnsafeInputError(f"{root}: the checkpoint folder changed while it was being "
                               "restored; nothing was kept")
    return restored, before
