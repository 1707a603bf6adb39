"""PyTorch in: live modules, ``torch.save`` checkpoints and TorchScript archives.

The same verbs as every adapter: :func:`read` opens a file, :func:`from_module` and
:func:`from_state_dict` take objects in memory, :func:`to_state_dict` gives a snapshot
back in PyTorch's own names and layouts. Every one returns a
:class:`~weightatlas.storage.TensorSource` in the canonical form described in
:mod:`weightatlas.adapters._torch_records` (kinds from module types, attention's fused
``in_proj`` split into q, k, v, recurrent gates recorded in ``attrs``).

Checkpoint files are read **without unpickling them**: the archive is checked and
memory-mapped (:mod:`._torch_zip`) and its pickle interpreted by a reader that imports
and calls nothing (:mod:`._torch_pickle`); a global outside its allowlist (the
``os.system`` of a malicious file, a pickled class) stops the read with
:class:`~weightatlas.errors.UnsafeInputError`. There is no fallback to ``torch.load``.
torch itself is needed only for live modules; checkpoint files are read without it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from weightatlas.adapters._files import check_unchanged, sha256_file
from weightatlas.adapters._torch_checkpoint import read_entries
from weightatlas.adapters._torch_module import module_entries, tensor_to_numpy
from weightatlas.adapters._torch_records import Entry, Planned, plan
from weightatlas.adapters._torch_zip import Archive
from weightatlas.errors import NotFoundError, WeightAtlasError
from weightatlas.storage import Snapshot, SourceFile, TensorRecord

__all__ = ["TorchSource", "from_module", "from_state_dict", "read", "to_state_dict"]



class TorchSource:
    """PyTorch tensors as a :class:`~weightatlas.storage.TensorSource`.

    Made by :func:`read`, :func:`from_module` or :func:`from_state_dict`. Iterating
    :meth:`records` hands out views (of the memory-mapped file, or of the module's own
    tensors) and may be repeated; a module must not change while it is written (the
    store checks each row against what it read, and notices if it does).
    """

    framework = "torch"

    def __init__(self, label: str, planned: list[Planned], facts: dict[str, Any],
                 archive: Archive | None = None, graph: bytes | None = None,
                 storages: Mapping[Any, Any] | None = None) -> None:
        self.label = label
        self._planned = planned
        self._facts = facts
        self._archive = archive
        self._storages = dict(storages or {})
        self._graph = graph
        self._lock = threading.Lock()
        self._files: list[SourceFile] | None = None
        last: dict[Any, int] = {}
        for i, p in enumerate(planned):
            if p.storage is not None:
                last[p.storage[0]] = i
        self._release_after: dict[int, list[Any]] = {}
        for key, i in last.items():
            self._release_after.setdefault(i, []).append(key)

    def __repr__(self) -> str:
        return f"TorchSource({self.label!r}, tensors={len(self._planned)})"

    def names(self) -> list[str]:
        """Canonical tensor names, in the order :meth:`records` yields them."""
        return [p.name for p in self._planned]

    def records(self) -> Iterator[TensorRecord]:
        """Yield one canonical :class:`TensorRecord` per tensor (q/k/v parts separately)."""
        for i, p in enumerate(self._planned):
            try:
                yield TensorRecord(p.name, p.load(), source_name=p.source_name, kind=p.kind,
                                   layout=p.layout, source_layout=p.source_layout,
                                   source_shape=p.source_shape, attrs=p.attrs)
            except WeightAtlasError as e:
                raise type(e)(f"{self.label}: {e}") from e
            # A record stays valid until the record after next is asked for (the store
            # writes one while it reads the next); the last one until the source closes.
            if i:
                self._release(i - 1)

    keeps_previous = True  #: (see records)

    def _release(self, i: int) -> None:
        """Release the pages of storages no tensor after tensor ``i`` uses."""
        if self._archive is not None:
            for key in self._release_after.get(i, ()):
                if key in self._storages:
                    self._archive.release(self._storages[key])

    def source_file_list(self) -> list[tuple[str, int]]:
        """The file :meth:`source_files` hashes, as ``(name, size)``, without hashing."""
        a = self._archive
        return [] if a is None else [(os.path.basename(a.path), a.size)]

    def check_files_unchanged(self) -> None:
        """Refuse the checkpoint file if it changed since it was read."""
        a = self._archive
        if a is not None:
            check_unchanged([(os.path.realpath(a.path), a.path, a.ident)])

    def source_files(self) -> list[SourceFile]:
        """The checkpoint file with its sha256 (hashed through its own handle), or nothing."""
        if self._archive is None:
            return []
        with self._lock:
            if self._files is None:
                a = self._archive
                self._files = [SourceFile(os.path.basename(a.path), a.size,
                                          sha256_file(os.path.realpath(a.path), a.path, a.ident))]
            return list(self._files)

    def metadata(self) -> Mapping[str, Any]:
        """JSON-safe facts: the format (``torch.save``, ``torchscript``, ``module``)..."""
        return dict(self._facts)

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(int(p.load().nbytes) for p in self._planned)

    def attachments(self) -> Mapping[str, bytes]:
        """``graph.onnx`` for a module exported with its graph, else nothing."""
        return {"graph.onnx": self._graph} if self._graph is not None else {}


def read(path: str | os.PathLike[str]) -> TorchSource:
    """Open a ``torch.save`` checkpoint or a TorchScript archive, running no pickled code.

    Args:
        path: A ``.pt``/``.pth``/``.bin`` file written by ``torch.save`` (a state dict, or
            a dict holding one under ``state_dict``, ``model``...) or by ``torch.jit.save``.

    Returns:
        A :class:`TorchSource` whose tensors are views of the memory-mapped file.

    Raises:
        NotFoundError: No such file.
        UnsafeInputError: The pickle names code (any global outside the tensor allowlist).
        FormatError: Not a zip checkpoint (legacy and tar formats are refused), a damaged
            archive or pickle, no state dict, or a non-tensor value inside it.
        ShapeError: A tensor reaches outside its storage.
        PathEscapeError: An archive entry named ``../x`` or ``/x``.

    Example:
        >>> import torch
        >>> torch.save({"fc.weight": torch.ones(2, 3)}, tmp / "m.pt")
        >>> [(r.name, r.kind, r.shape) for r in read(tmp / "m.pt").records()]
        [('fc.weight', 'linear', (2, 3))]
    """
    p = os.fspath(path)
    if not os.path.lexists(p):
        raise NotFoundError(f"{p}: no such file")
    archive = Archive(p)
    try:
        entries, facts, storages = read_entries(archive)
        planned = plan(entries)
    except WeightAtlasError as e:
        archive.close()
        if str(e).startswith(p):
            raise
        raise type(e)(f"{p}: {e}") from e
    except BaseException:
        archive.close()
        raise
    return TorchSource(Path(p).name, planned, facts, archive, storages=storages)


def from_module(module: Any, *, example_inputs: tuple[Any, ...] | None = None,
                label: str | None = None, gradients: bool = False) -> TorchSource:
    """A live ``torch.nn.Module``'s parameters and persistent buffers, without copying them.

    Args:
        module: The module (any device; non-CPU tensors are copied to the host as read).
        example_inputs: Inputs for one forward pass: with them the module's graph is
            exported to ONNX and attached to the snapshot as ``graph.onnx``.
        label: Name for messages and metadata (default: the module's class name).
        gradients: Also every parameter's ``.grad`` (where there is one), as tensors named
            ``<weight name>.grad`` with the weight's kind and canonical layout (a fused
            ``in_proj`` gradient is split like its weight) and ``attrs["role"]``
            ``"gradient"``, so every weight chart works on them.

    Example:
        >>> import torch
        >>> src = from_module(torch.nn.MultiheadAttention(4, 2))
        >>> [(r.name, r.kind, r.shape) for r in src.records()][:2]
        [('q_proj.weight', 'attention', (4, 4)), ('k_proj.weight', 'attention', (4, 4))]
    """
    entries = module_entries(module)
    graph = None
    if example_inputs is not None:
        from weightatlas.adapters._torch_graph import export_graph

        graph = export_graph(module, example_inputs, [e.name for e in entries])
    cls = type(module).__name__
    facts = {"format": "module", "module_class": f"{type(module).__module__}.{cls}",
             "n_parameters": int(sum(p.numel() for p in module.parameters()))}
    planned = plan(entries)
    if gradients:
        planned += _gradient_plan(module, entries)
    return TorchSource(label or cls, planned, facts, graph=graph)


def _gradient_plan(module: Any, entries: list[Entry]) -> list[Planned]:
    """Planned records of the parameters' gradients, canonicalised like the weights."""
    params = dict(module.named_parameters(remove_duplicate=False))
    grads = []
    for e in entries:
        grad = getattr(params.get(e.name), "grad", None)
        if grad is None:
            continue

        def load(grad: Any = grad, name: str = e.name) -> np.ndarray:
            return tensor_to_numpy(grad, f"{name}.grad")

        grads.append(Entry(e.name, e.shape, load, e.module_type, e.parent_type,
                           dict(e.module_attrs), None))
    out = []
    for p in plan(grads):
        p.name = f"{p.name}.grad"
        p.source_name = f"{p.source_name}.grad"
        p.attrs = {**p.attrs, "role": "gradient"}
        out.append(p)
    return out


def from_state_dict(state_dict: Mapping[str, Any], *, label: str = "state_dict") -> TorchSource:
    """A state dict in memory (torch tensors or NumPy arrays), kinds inferred from names.

    Example:
        >>> src = from_state_dict({"rnn.weight_ih_l0": np.zeros((8, 3), np.float32),
        ...                        "rnn.weight_hh_l0": np.zeros((8, 2), np.float32)})
        >>> next(src.records()).attrs["gates"]
        ['i', 'f', 'g', 'o']
    """
    entries = []
    for name, value in state_dict.items():
        load = _loader(name, value)
        entries.append(Entry(name, tuple(int(d) for d in load().shape), load))
    return TorchSource(label, plan(entries), {"format": "state_dict"})


def _loader(name: str, value: Any) -> Callable[[], np.ndarray]:
    if isinstance(value, np.ndarray):
        return lambda: value
    tensor_to_numpy(value, name)  # refuse unusable values now
    return lambda: tensor_to_numpy(value, name)


def to_state_dict(snapshot: Snapshot) -> dict[str, np.ndarray]:
    """A snapshot back in PyTorch's names and layouts, fused tensors rebuilt exactly.

    The inverse of the canonical form: q/k/v parts are concatenated back into
    ``in_proj_weight``/``in_proj_bias``, renamed tensors get their source names, and
    every tensor its source layout. Load it with
    ``module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()})``.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(4, 2)
        >>> snap = store.write(from_module(mha), "mha")
        >>> sd = to_state_dict(snap)
        >>> list(sd) == list(mha.state_dict())
        True
        >>> bool((sd["in_proj_weight"] == mha.in_proj_weight.detach().numpy()).all())
        True
    """
    import json

    out: dict[str, Any] = {}
    pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for row in snapshot.tensors().select(["name", "source_name", "attrs"]).to_pylist():
        attrs = json.loads(row["attrs"] or "{}")
        array = snapshot.read(row["name"], layout="source")
        fused = attrs.get("fused")
        if isinstance(fused, dict) and isinstance(fused.get("name"), str):
            out.setdefault(fused["name"], None)
            pieces.setdefault(fused["name"], []).append((int(fused.get("index", 0)), array))
        else:
            out[row["source_name"]] = array
    for name, parts in pieces.items():
        parts.sort(key=lambda item: item[0])
        out[name] = np.concatenate([a for _, a in parts], axis=0)
    return out
