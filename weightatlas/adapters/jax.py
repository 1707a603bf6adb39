"""JAX in: Flax (Linen and NNX) and Equinox parameters, Flax msgpack and Orbax checkpoints.

The same verbs as every adapter: :func:`from_pytree` takes a tree in memory (a Linen
``variables`` or ``params`` dict, an ``nnx.Module``, an ``equinox.Module``, any pytree
of arrays), :func:`read` opens a checkpoint file or folder (a Flax msgpack file, an
Orbax checkpoint, an Orbax ``CheckpointManager`` folder whose :func:`steps` it lists),
:func:`to_pytree` gives a snapshot back as nested dicts in the source's names and
layouts. Each returns a :class:`~weightatlas.storage.TensorSource` in the canonical
form: Dense kernels ``[in, out]`` become ``[out, in]``, convolution kernels HWIO become
OIHW, attention kernels keep their head axes, recurrent gates are recorded
(:mod:`._jax_layout` has the table), and every record keeps its source layout, so
``Snapshot.read(name, layout="source")`` is the original (a default ``ConvTranspose``
kernel, stored reversed on its spatial axes, comes back exactly from :func:`to_pytree`).

Arrays are not copied: a CPU ``jax.Array`` is viewed through NumPy, a transposed
kernel is a strided view, and msgpack leaves are views of the memory-mapped file.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weightatlas.adapters._files import check_unchanged, sha256_file
from weightatlas.adapters._jax_layout import LeafPlan, canonical
from weightatlas.adapters._jax_orbax import (
    MAX_BYTES,
    MAX_FILES,
    is_manager_root,
    is_orbax,
    items,
    manager_steps,
    restore,
    step_of,
)
from weightatlas.adapters._jax_tree import Leaf, walk
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    UnsafeInputError,
    UnsupportedError,
    WeightAtlasError,
)
from weightatlas.storage import Snapshot, SourceFile, TensorRecord

__all__ = ["JaxSource", "from_pytree", "read", "steps", "to_pytree"]

#: Top-level keys of a training state whose weights are under ``params``.
_TRAIN_STATE_KEYS = frozenset({"step", "opt_state", "tx", "apply_fn", "rng", "epoch"})


def _as_numpy(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise UnsafeInputError("an object array is not a tensor")
    return array


class JaxSource:
    """JAX arrays as a :class:`~weightatlas.storage.TensorSource`; made by :func:`from_pytree`
    or :func:`read`. Records are views of the arrays (transposed where the canonical layout
    asks) and may be iterated again; the arrays must not change while they are written."""

    framework = "jax"

    def __init__(self, label: str, leaves: list[Leaf], plans: list[LeafPlan],
                 facts: dict[str, Any], root: str | None = None,
                 files: list[tuple[str, int, int, int, int]] | None = None,
                 graph: bytes | None = None) -> None:
        self.label = label
        self._graph = graph
        self._leaves = leaves
        self._plans = plans
        self._facts = facts
        self._root = root
        self._file_facts = files or []
        self._lock = threading.Lock()
        self._files: list[SourceFile] | None = None

    def __repr__(self) -> str:
        return f"JaxSource({self.label!r}, tensors={len(self._plans)})"

    def names(self) -> list[str]:
        """Canonical tensor names, in the order :meth:`records` yields them."""
        return [p.name for p in self._plans]

    keeps_previous = True  #: records are arrays in memory, never released

    def records(self) -> Iterator[TensorRecord]:
        """Yield one canonical :class:`TensorRecord` per array leaf, in tree order."""
        for leaf, p in zip(self._leaves, self._plans, strict=True):
            try:
                data = _as_numpy(leaf.value)
                if p.flip:
                    data = data[tuple(slice(None, None, -1) if i in p.flip else slice(None)
                                      for i in range(data.ndim))]
                if p.perm is not None:
                    data = data.transpose(p.perm)
                if data.shape != p.shape:
                    data = data.reshape(p.shape)
                yield TensorRecord(p.name, data, source_name=p.source_name, kind=p.kind,
                                   layout=p.layout, source_layout=p.source_layout,
                                   source_shape=p.source_shape, attrs=p.attrs)
            except WeightAtlasError as e:
                raise type(e)(f"{self.label}: tensor {p.source_name!r}: {e}") from e

    def source_file_list(self) -> list[tuple[str, int]]:
        """The files :meth:`source_files` hashes, as ``(name, size)``, without hashing."""
        if self._root is None:
            return []
        return [(rel, size) for rel, size, _, _, _ in self._file_facts]

    def check_files_unchanged(self) -> None:
        """Refuse a checkpoint file that changed since it was read."""
        if self._root is not None:
            root = self._root
            check_unchanged([(os.path.join(root, rel), os.path.join(root, rel),
                              (dev, ino, size, mtime))
                             for rel, size, dev, ino, mtime in self._file_facts])

    def source_files(self) -> list[SourceFile]:
        """The checkpoint file(s) with sha256, each re-checked against what was read."""
        if self._root is None:
            return []
        with self._lock:
            if self._files is None:
                root = self._root
                self._files = [
                    SourceFile(rel, size, sha256_file(os.path.join(root, rel),
                                                      os.path.join(root, rel),
                                                      (dev, ino, size, mtime)))
                    for rel, size, dev, ino, mtime in self._file_facts]
            return list(self._files)

    def metadata(self) -> Mapping[str, Any]:
        """JSON-safe facts: the format, the tree kind, the non-array leaves skipped."""
        return dict(self._facts)

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(int(_as_numpy(leaf.value).nbytes) for leaf in self._leaves)

    def attachments(self) -> Mapping[str, bytes]:
        """``graph.onnx`` for a tree given with its ``apply`` function, else nothing."""
        return {"graph.onnx": self._graph} if self._graph is not None else {}


def _source(label: str, tree: Any, facts: dict[str, Any], root: str | None = None,
            files: list[tuple[str, int, int, int, int]] | None = None,
            transposed: Collection[str] = ()) -> JaxSource:
    leaves, skipped, kind = walk(tree)
    shapes = []
    for leaf in leaves:
        shape = tuple(int(d) for d in np.shape(leaf.value))
        shapes.append(shape)
    plans = canonical(leaves, shapes, frozenset(transposed))
    seen: dict[str, str] = {}
    for p in plans:
        if p.name in seen:
            raise FormatError(f"{label}: {p.source_name!r} and {seen[p.name]!r} both become "
                              f"tensor {p.name!r}")
        seen[p.name] = p.source_name
    facts = {**facts, "tree": kind}
    if skipped:
        facts["skipped_leaves"] = len(skipped)
        facts["skipped_examples"] = skipped[:20]
    return JaxSource(label, leaves, plans, facts, root, files)


def from_pytree(tree: Any, *, label: str | None = None, transposed: Collection[str] = (),
                apply: Callable[..., Any] | None = None,
                example_inputs: Sequence[Any] | None = None) -> JaxSource:
    """Parameters in memory: a Flax Linen dict, an NNX or Equinox module, any pytree.

    Args:
        tree: ``model.init(...)`` variables or their ``params``; an ``nnx.Module``; an
            ``equinox.Module``; or any pytree whose leaves are arrays.
        label: Name for messages and metadata (default: the tree's class name).
        transposed: Module names (``decoder.ConvTranspose_0``) of Linen
            ``ConvTranspose`` layers built with ``transpose_kernel=True``, for kernels
            whose shapes cannot tell (no bias, or as many inputs as outputs).
        apply: The model's function, ``apply(tree, *example_inputs) -> outputs`` (a Linen
            ``model.apply``; ``lambda m, x: jax.vmap(m)(x)`` for an Equinox module). With
            ``example_inputs``, it is traced and converted to ONNX (:mod:`._jax_graph`),
            attached as ``graph.onnx`` with each stored tensor's values left out, so
            :func:`~weightatlas.core.executor.from_snapshot` can run the stored model.
        example_inputs: The inputs of one call of ``apply`` (their shapes are the graph's).

    Raises:
        UnsupportedError: ``apply`` without ``example_inputs`` (or the other way round),
            an NNX module with ``apply``, a primitive the converter does not cover, or an
            ``apply`` that fails on the example inputs.

    Example:
        >>> import jax, flax.linen as nn
        >>> params = nn.Dense(3).init(jax.random.key(0), np.ones((1, 4)))
        >>> [(r.name, r.shape, r.source_layout) for r in from_pytree(params).records()]
        [('kernel', (3, 4), ('in', 'out')), ('bias', (3,), ('out',))]
    """
    label = label or type(tree).__name__
    source = _source(label, tree, {"format": "pytree"}, transposed=transposed)
    if apply is None and example_inputs is None:
        return source
    if apply is None or example_inputs is None:
        missing = "example_inputs" if apply is not None else "apply"
        raise UnsupportedError(f"{label}: exporting the graph needs both apply and "
                               f"example_inputs; {missing} is missing")
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(tree, nnx.Module):
        raise UnsupportedError(f"{label}: exporting the graph of an NNX module is not "
                               "supported; its weights can be stored without apply")
    from weightatlas.adapters._jax_graph import export_graph

    stored = {p.source_name for p in source._plans}
    source._graph = export_graph(apply, tree, tuple(example_inputs), stored, label)
    return source


def _weights(tree: Any) -> tuple[Any, dict[str, Any]]:
    """A training state's weights (its ``params`` and ``batch_stats``), else the tree."""
    facts: dict[str, Any] = {}
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping) and (
        set(tree) & _TRAIN_STATE_KEYS
    ):
        keep = {k: tree[k] for k in ("params", "batch_stats") if isinstance(tree.get(k), Mapping)}
        facts["other_keys"] = sorted(str(k) for k in tree if k not in keep)
        step = tree.get("step")
        if isinstance(step, int | np.integer) or (isinstance(step, np.ndarray) and step.size == 1):
            facts["step"] = int(np.asarray(step).reshape(-1)[0])
        return keep, facts
    return tree, facts


def _read_msgpack(path: str, transposed: Collection[str]) -> JaxSource:
    from weightatlas.adapters._jax_msgpack import parse

    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise WeightAtlasError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(f"{path}: expected a regular file")
        if st.st_size == 0:
            raise FormatError(f"{path}: empty file")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise WeightAtlasError(f"{path}: cannot map: {e.strerror or e}") from e
    finally:
        os.close(fd)
    tree = parse(mm, path)
    if not isinstance(tree, Mapping):
        raise FormatError(f"{path}: holds a {type(tree).__name__}, expected a map of arrays")
    tree, facts = _weights(tree)
    folder, name = os.path.split(os.path.abspath(path))
    ident = (name, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns)
    return _source(name, tree, {"format": "flax.msgpack", **facts}, folder, [ident],
                   transposed)


def steps(path: str | os.PathLike[str], *, max_files: int = MAX_FILES) -> list[int]:
    """The steps of an Orbax ``CheckpointManager`` folder, ascending.

    Each step is read with ``read(path, step=s)``; to keep them all as snapshots of one
    model: ``for s in steps(path): store.write(read(path, step=s), "model", step=s)``.

    Raises:
        UnsupportedError: The folder is not a ``CheckpointManager`` root.
        PathEscapeError: An entry of the folder is a symbolic link leaving it.

    Example:
        >>> steps(tmp)
        Traceback (most recent call last):
        ...
        weightatlas.errors.UnsupportedError: ...: not an Orbax CheckpointManager folder (no \
step folders holding _CHECKPOINT_METADATA)
    """
    p = os.fspath(path)
    if not os.path.isdir(p) or not is_manager_root(p):
        raise UnsupportedError(f"{p}: not an Orbax CheckpointManager folder (no step folders "
                               "holding _CHECKPOINT_METADATA)")
    return list(manager_steps(p, max_files=max_files))


def _read_orbax(p: str, step: int | None, max_files: int, max_bytes: int,
                transposed: Collection[str]) -> JaxSource:
    facts: dict[str, Any] = {"format": "orbax"}
    folder = p
    if is_manager_root(p) or step is not None:
        if not is_manager_root(p):
            raise UnsupportedError(f"{p}: step={step} needs an Orbax CheckpointManager folder "
                                   "(a folder of step folders); this is one checkpoint")
        found = manager_steps(p, max_files=max_files)
        chosen = max(found) if step is None else step
        if chosen not in found:
            raise NotFoundError(f"{p}: no step {chosen} (steps: {list(found)})")
        folder = os.path.join(os.path.realpath(p), found[chosen])
        facts.update({"step": chosen, "manager_steps": list(found)})
    arrays: list[str] | None = None
    if os.path.lexists(os.path.join(folder, "_CHECKPOINT_METADATA")) and not os.path.lexists(
            os.path.join(folder, "_METADATA")):
        arrays, others = items(folder)
        facts["items"] = arrays
        named = step_of(os.path.basename(os.path.realpath(folder)))
        if named is not None:
            facts.setdefault("step", named)  # a step folder is named by its step
        if others:
            facts["items_skipped"] = others
    elif "step" in facts:
        items(folder)  # raises: a step folder that is not a checkpoint
    tree, files = restore(folder, item_names=arrays, max_files=max_files, max_bytes=max_bytes)
    tree, state = _weights(tree)
    if "step" in facts and "step" in state and state["step"] != facts["step"]:
        state["state_step"] = state.pop("step")  # the folder's step wins; both are kept
    facts.update({k: v for k, v in state.items() if k not in facts})
    return _source(Path(p).name, tree, facts, os.path.realpath(folder), files, transposed)


def read(path: str | os.PathLike[str], *, step: int | None = None, max_files: int = MAX_FILES,
         max_bytes: int = MAX_BYTES, transposed: Collection[str] = ()) -> JaxSource:
    """Open a Flax msgpack file or an Orbax checkpoint folder (restored on the CPU).

    A training state (``{"step", "params", "opt_state"...}``) gives its ``params`` and
    ``batch_stats``; the step goes into the metadata. An Orbax ``CheckpointManager``
    folder (one folder per step) gives its latest step, or ``step``; a step folder
    gives its array items (one: its tree; several: ``{item: tree}``); the step goes into
    the metadata (``metadata()["step"]``), and :func:`weightatlas.ingest` stores the
    snapshot at that step.

    Args:
        path: A ``.msgpack`` file, an Orbax checkpoint folder, a ``CheckpointManager``
            folder or one of its step folders.
        step: Which step of a ``CheckpointManager`` folder (default: the latest).
        max_files: Most files an Orbax folder may hold.
        max_bytes: Most bytes an Orbax folder may hold.
        transposed: Linen ``ConvTranspose`` modules built with ``transpose_kernel=True``
            (see :func:`from_pytree`).

    Raises:
        NotFoundError: No such file or folder, or no such step.
        PathEscapeError: An Orbax folder with a symbolic link leaving it, or a tree key
            that is a path.
        UnsafeInputError: Other links, FIFOs, devices, hard links; object-dtype leaves.
        ResourceLimitError: A folder over ``max_files`` files or ``max_bytes`` bytes.
        FormatError: A malformed file, a checkpoint Orbax cannot restore, a step folder
            that holds no checkpoint.

    Example:
        >>> import flax.serialization
        >>> params = {"params": {"Conv_0": {"kernel": np.ones((3, 3, 1, 4), np.float32)}}}
        >>> _ = (tmp / "cnn.msgpack").write_bytes(flax.serialization.to_bytes(params))
        >>> [(r.name, r.kind, r.shape) for r in read(tmp / "cnn.msgpack").records()]
        [('Conv_0.kernel', 'conv2d', (4, 1, 3, 3))]
    """
    p = os.fspath(path)
    if not os.path.lexists(p):
        raise NotFoundError(f"{p}: no such file or folder")
    if os.path.isdir(p):
        if not is_orbax(p) and not is_manager_root(p):
            raise UnsupportedError(f"{p}: not an Orbax checkpoint folder (no _METADATA, "
                                   "_CHECKPOINT_METADATA or manifest.ocdbt, and no step "
                                   "folders holding one)")
        return _read_orbax(p, step, max_files, max_bytes, transposed)
    if step is not None:
        raise UnsupportedError(f"{p}: step={step} needs an Orbax CheckpointManager folder; "
                               "this is a file")
    return _read_msgpack(p, transposed)


def to_pytree(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot back as nested dicts in the source's names and layouts.

    Source names are split on ``/`` (``params/Dense_0/kernel``), so a Linen snapshot
    gives back ``{"params": {"Dense_0": {"kernel": ...}}}`` with ``[in, out]`` kernels.
    A default ``ConvTranspose`` kernel, stored reversed on its spatial axes
    (``attrs["flip"]``), is reversed back.

    Example:
        >>> params = {"params": {"Dense_0": {"kernel": np.arange(6.0).reshape(3, 2)}}}
        >>> snap = store.write(from_pytree(params), "mlp")
        >>> back = to_pytree(snap)
        >>> back["params"]["Dense_0"]["kernel"].shape
        (3, 2)
    """
    out: dict[str, Any] = {}
    for row in snapshot.tensors().select(["name", "source_name", "attrs"]).to_pylist():
        path = row["source_name"].split("/")
        attrs = json.loads(row["attrs"] or "{}")
        if isinstance(attrs.get("path"), list):
            path = [str(p) for p in attrs["path"]]
        node = out
        for key in path[:-1]:
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise FormatError(f"{snapshot.path}: {row['source_name']!r} nests under a tensor")
            node = nxt
        node[path[-1]] = _source_array(snapshot, row["name"], attrs)
    return out


def _source_array(snapshot: Snapshot, name: str, attrs: Mapping[str, Any]) -> np.ndarray:
    """A tensor in its source layout (the store undoes the spatial flip of ``attrs["flip"]``)."""
    flip = attrs.get("flip")
    if flip:
        info = snapshot.info(name)
        if not set(flip) <= set(info.layout):
            raise FormatError(f"{snapshot.path}: tensor {name!r}: flipped axes {flip} are not "
                              f"axes of its layout {list(info.layout)}")
    return snapshot.read(name, layout="source")
