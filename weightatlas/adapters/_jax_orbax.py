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

``CheckpointManager`` folders are read too. Its **root** holds one folder per step
(``0``, ``100``... or ``<prefix>_100``) and perhaps its own metadata; every entry of the
root is checked with ``lstat`` the same way (a symbolic link is refused, whatever it
is called), unfinished saves (``100.orbax-checkpoint-tmp-...``) are left out, and
:func:`manager_steps` lists the steps. A **step folder** holds
``_CHECKPOINT_METADATA`` and one folder per item; the items that are array trees
(an Orbax ``_METADATA`` inside) are restored, the others (JSON items) are left out.
The whole step folder is walked before and after, as a plain checkpoint folder is.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from weightatlas.errors import (
    FormatError,
    PathEscapeError,
    ResourceLimitError,
    UnsafeInputError,
    WeightAtlasError,
)

__all__ = ["MAX_BYTES", "MAX_FILES", "is_manager_root", "is_orbax", "items",
           "manager_steps", "prewalk", "restore", "step_of"]

#: Most files an Orbax folder may hold.
MAX_FILES = 100_000
#: Most bytes an Orbax folder may hold (1 TiB).
MAX_BYTES = 1 << 40
_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "orbax.checkpoint",
            "_sharding")
_MAX_DEPTH = 32
_STEP = re.compile(r"(?:(.+)_)?(\d+)")

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


def _lstat(path: str, root: str, name: str) -> os.stat_result:
    """An entry's ``lstat``; a symbolic link is refused (PathEscapeError if it leaves root)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise WeightAtlasError(f"{root}: cannot stat {name}: {e.strerror or e}") from e
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if os.path.commonpath([target, root]) != root:
            raise PathEscapeError(f"{root}: {name} is a symbolic link to {target}, "
                                  "outside the checkpoint folder")
        raise UnsafeInputError(f"{root}: {name} is a symbolic link; an Orbax "
                               "checkpoint holds none, and links are not followed")
    return st


def step_of(name: str) -> int | None:
    """The step a ``CheckpointManager`` step folder's name gives (``100``, ``ckpt_100``).

    Example:
        >>> step_of("100"), step_of("ckpt_7"), step_of("7.orbax-checkpoint-tmp-99")
        (100, 7, None)
    """
    match = _STEP.fullmatch(name)
    return int(match.group(2)) if match else None


def is_manager_root(path: str) -> bool:
    """Whether a folder is an Orbax ``CheckpointManager`` root: no checkpoint of its own,
    and at least one step folder (named by a number) holding ``_CHECKPOINT_METADATA``.

    Example:
        >>> (tmp / "ckpts" / "5").mkdir(parents=True)
        >>> _ = (tmp / "ckpts" / "5" / "_CHECKPOINT_METADATA").write_text("{}")
        >>> is_manager_root(str(tmp / "ckpts")), is_manager_root(str(tmp / "ckpts" / "5"))
        (True, False)
    """
    if is_orbax(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    for name in names:
        entry = os.path.join(path, name)
        if _STEP.fullmatch(name) and not os.path.islink(entry) and os.path.lexists(
                os.path.join(entry, "_CHECKPOINT_METADATA")):
            return True
    return False


def manager_steps(root: str, *, max_files: int = MAX_FILES) -> dict[int, str]:
    """The steps of a ``CheckpointManager`` root: step -> folder name, every entry checked.

    Raises:
        PathEscapeError: An entry is a symbolic link leaving the root.
        UnsafeInputError: An entry is another symbolic link.
        FormatError: Two folders for one step, or no step folder at all.
        ResourceLimitError: More than ``max_files`` entries.
    """
    root = os.path.realpath(root)
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        raise WeightAtlasError(f"{root}: cannot list: {e.strerror or e}") from e
    if len(names) > max_files:
        raise ResourceLimitError(f"{root}: more than {max_files} entries (raise max_files if "
                                 "trusted)")
    steps: dict[int, str] = {}
    prefixes = set()
    for name in names:
        st = _lstat(os.path.join(root, name), root, name)
        match = _STEP.fullmatch(name)
        if match is None or not stat.S_ISDIR(st.st_mode):
            continue  # the manager's own metadata, unfinished saves (N.orbax-checkpoint-tmp-T)
        step = int(match.group(2))
        if step in steps:
            raise FormatError(f"{root}: step {step} twice ({steps[step]} and {name})")
        steps[step] = name
        prefixes.add(match.group(1))
    if not steps:
        raise FormatError(f"{root}: no step folders (expected folders named by their step "
                          "number, as Orbax's CheckpointManager writes)")
    if len(prefixes) > 1:
        raise FormatError(f"{root}: step folders with different prefixes "
                          f"({sorted(str(p) for p in prefixes)}); pass one step folder")
    return dict(sorted(steps.items()))


def items(step_dir: str) -> tuple[list[str], list[str]]:
    """(array items, other items) of a ``CheckpointManager`` step folder, by name.

    Raises:
        FormatError: The folder holds no ``_CHECKPOINT_METADATA`` (not a finished step)
            or no array item.
    """
    root = os.path.realpath(step_dir)
    if not os.path.lexists(os.path.join(root, "_CHECKPOINT_METADATA")):
        raise FormatError(f"{step_dir}: not an Orbax checkpoint step (no "
                          "_CHECKPOINT_METADATA: an unfinished save, or another folder)")
    arrays: list[str] = []
    others: list[str] = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        st = _lstat(path, root, name)
        if not stat.S_ISDIR(st.st_mode):
            continue
        (arrays if is_orbax(path) and os.path.lexists(os.path.join(path, "_METADATA"))
         else others).append(name)
    if not arrays:
        raise FormatError(f"{step_dir}: no array item in this checkpoint step (items: "
                          f"{others or 'none'}; expected a folder with an Orbax _METADATA)")
    return arrays, others


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
                _lstat(entry.path, root, name)  # raises
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


def _restore_item(folder: str, label: str, names: set[str]) -> Any:
    if "checkpoint" in names:  # legacy aggregate file: msgpack, possibly with object leaves
        from weightatlas.adapters._jax_msgpack import parse

        with open(os.path.join(folder, "checkpoint"), "rb") as f:
            parse(f.read(), os.path.join(label, "checkpoint"))
    import jax
    import orbax.checkpoint as ocp

    try:
        checkpointer = ocp.StandardCheckpointer()
        meta = checkpointer.metadata(folder)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:
            raise FormatError(f"{label}: cannot restore this Orbax checkpoint: its metadata "
                              "holds no tree (a damaged _METADATA file?)")
        _check_keys(tree, label)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

        def target(m: Any) -> Any:
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu)

        abstract = jax.tree_util.tree_map(target, tree)
        restored = checkpointer.restore(folder, abstract)
        checkpointer.close()
    except WeightAtlasError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types; all mean "cannot read"
        raise FormatError(f"{label}: cannot restore this Orbax checkpoint: "
                          f"{type(e).__name__}: {str(e)[:400]}") from e
    return restored


def restore(root: str, *, item_names: list[str] | None = None, max_files: int = MAX_FILES,
            max_bytes: int = MAX_BYTES) -> tuple[Any, list[FileFacts]]:
    """Restore an Orbax checkpoint folder on the CPU, after and before checking it.

    ``item_names`` restores those subfolders of a ``CheckpointManager`` step folder
    (one: its tree; several: ``{item: tree}``); the whole of ``root`` is checked.
    """
    root = os.path.realpath(root)
    before = prewalk(root, max_files=max_files, max_bytes=max_bytes)
    if item_names is None:
        restored = _restore_item(root, root, {f[0] for f in before})
    else:
        trees = {}
        for item in item_names:
            names = {f[0].removeprefix(item + "/") for f in before
                     if f[0].startswith(item + "/")}
            trees[item] = _restore_item(os.path.join(root, item), os.path.join(root, item),
                                        names)
        restored = trees[item_names[0]] if len(item_names) == 1 else trees
    after = prewalk(root, max_files=max_files, max_bytes=max_bytes)
    if after != before:
        raise UnsafeInputError(f"{root}: the checkpoint folder changed while it was being "
                               "restored; nothing was kept")
    return restored, before
