"""Read ONNX models: every weight with its role, layout and name, and the graph beside it.

:func:`read` parses a ``.onnx`` file (``onnx`` is imported here, never at module
level), checks it, and returns an :class:`OnnxSource` for the store. Weights are
found wherever exporters put them: initializers and sparse initializers,
``Constant`` nodes, subgraphs of ``If``/``Loop``/``Scan`` (and local functions), external
data files, and chains of ``Transpose``/``Cast``/``Reshape``/``DequantizeLinear``...
that compute a weight from constants (folded exactly as onnxruntime computes
them). Roles, kinds and canonical layouts come from the consuming operators; names
from the exporters' scopes. See ``docs/formats/onnx.md`` for the rules.

The model's graph travels with the snapshot as the attachment ``graph.onnx``: the
same ``ModelProto`` with every stored tensor's bytes removed and replaced by a
reference to the snapshot tensor (``data_location = EXTERNAL``, ``location =
weightatlas:<tensor name>``); ``weightatlas.core._onnx_model.load_model`` rebuilds the
runnable model, bit for bit, from the store alone.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from weightatlas.adapters._files import check_unchanged
from weightatlas.adapters._onnx_attach import GRAPH_KEY, LOCATION_PREFIX, strip, table
from weightatlas.adapters._onnx_external import ExternalFiles, sha256_file
from weightatlas.adapters._onnx_graph import Limits, Value, v_array, walk
from weightatlas.adapters._onnx_load import facts, parse, resolve
from weightatlas.adapters._onnx_plan import Item, plan
from weightatlas.errors import FormatError, NotFoundError, WeightAtlasError
from weightatlas.storage import SourceFile, TensorRecord, dtype_name

__all__ = [
    # Verbs
    "looks_like_onnx",
    "read",
    # Source
    "OnnxSource",
    # Limits and format facts
    "DEFAULT_MAX_TENSOR_BYTES",
    "GRAPH_ATTACHMENT",
    "GRAPH_KEY",
    "LOCATION_PREFIX",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
]

#: A protobuf message (so an ``.onnx`` file) cannot exceed 2 GiB.
MAX_FILE_BYTES = 2**31 - 1
#: Default limit on subgraph nesting (protobuf itself stops near 31 levels).
MAX_DEPTH = 16
#: Default limit on one tensor materialised in memory (folded or densified).
DEFAULT_MAX_TENSOR_BYTES = 8 * 2**30
#: The attachment holding the graph without weight bytes (``graph.onnx``). Its tensors
#: point at the snapshot through ``LOCATION_PREFIX`` and the table under ``GRAPH_KEY``.
GRAPH_ATTACHMENT = "graph.onnx"
_HASH_CHUNK = 8 << 20


def looks_like_onnx(head: bytes) -> bool:
    """Whether a file's first bytes look like an ONNX ``ModelProto`` (``ir_version`` first).

    Example:
        >>> looks_like_onnx(bytes([0x08, 0x08, 0x12, 0x07]) + b"pytorch")
        True
        >>> looks_like_onnx(b"\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}")
        False
    """
    return (len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x20
            and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72))


class OnnxSource:
    """A checked ONNX model, read as a ``TensorSource``; made by :func:`read`.

    Every tensor was located and validated when the model was read; :meth:`records`
    computes folded weights and reads external data one tensor at a time. It may be
    iterated again, and :meth:`source_files` may run on another thread meanwhile.
    """

    framework = "onnx"

    def __init__(self, label: str, path: str, model: Any, items: list[Item],
                 files: ExternalFiles, facts: dict[str, Any]) -> None:
        self.label = label
        self._path = path
        self._ident = facts.pop("_ident")
        self._model = model
        self._items = items
        self._files = files
        self._facts = facts
        self._lock = threading.Lock()
        self._hashed: list[SourceFile] | None = None
        self._graph: bytes | None = None

    def __repr__(self) -> str:
        return f"OnnxSource({self.label!r}, tensors={len(self._items)})"

    def __enter__(self) -> OnnxSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the external data files."""
        self._files.close()

    def names(self) -> list[str]:
        """Tensor names in the order :meth:`records` yields them."""
        return [it.name for it in self._items]

    def describe(self) -> list[dict[str, Any]]:
        """What :meth:`records` will yield, without reading or computing any tensor.

        Each entry has ``name``, ``source_name``, ``kind``, ``dtype``, ``shape``,
        ``layout``, ``source_layout``, ``source_shape`` and ``attrs``.
        """
        out = []
        for it in self._items:
            dtype = it.value.otype.dtype
            assert dtype is not None
            out.append({
                "name": it.name, "source_name": it.value.name, "kind": it.kind,
                "dtype": "uint8" if it.packed else dtype_name(dtype),
                "shape": tuple(it.sizes[n] for n in it.canonical),
                "layout": it.canonical, "source_layout": it.source_layout,
                "source_shape": (_nbytes(it),) if it.packed else it.value.shape,
                "attrs": _attrs(it),
            })
        return out

    def records(self) -> Iterator[TensorRecord]:
        """Yield one record per stored tensor, in model order, canonical layout."""
        behind: list[Any] = []  # the previous record's external data
        for item in self._items:
            record = self._make(item)
            yield record
            # A record stays valid until the record after next is asked for (the store
            # writes one while it reads the next); the last one until the source closes.
            for s in behind:
                self._files.release(s)
            behind = list(_external(item.value))

    keeps_previous = True  #: (see records)

    def record(self, name: str) -> TensorRecord:
        """One tensor's record by its canonical name (computed now if it is folded)."""
        item = next((it for it in self._items if it.name == name), None)
        if item is None:
            raise NotFoundError(f"{self.label}: no tensor {name!r}")
        return self._make(item)

    def _make(self, item: Item) -> TensorRecord:
        try:
            return _record(item, self._files)
        except WeightAtlasError as e:
            raise type(e)(f"{self.label}: tensor {item.name!r}: {e}") from e
        except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
            raise FormatError(f"{self.label}: tensor {item.name!r} "
                              f"({item.value.name!r}): cannot read it: {e}") from e

    def source_file_list(self) -> list[tuple[str, int]]:
        """The files :meth:`source_files` hashes, as ``(name, size)``, without hashing."""
        return [(os.path.basename(self._path), self._ident[2]),
                *((n, size) for n, size in self._files.sizes())]

    def check_files_unchanged(self) -> None:
        """Refuse the model (or an external data file) if it changed since it was read."""
        check_unchanged([(self._path, self.label, self._ident), *self._files.identities()])

    def source_files(self) -> list[SourceFile]:
        """The model file then each external data file, with size and sha256."""
        with self._lock:
            if self._hashed is None:
                buf = bytearray(_HASH_CHUNK)
                name = os.path.basename(self._path)
                files = [SourceFile(name, self._ident[2],
                                    sha256_file(self._path, self.label, self._ident, buf))]
                files += [SourceFile(n, size, digest) for n, size, digest in
                          self._files.hashes(buf)]
                self._hashed = files
            return list(self._hashed)

    def metadata(self) -> Mapping[str, Any]:
        """JSON-safe facts about the model (producer, opsets, inputs, counts...)."""
        return dict(self._facts)

    def nbytes(self) -> int:
        """Total bytes of the stored tensors."""
        return sum(_nbytes(it) for it in self._items)

    def attachments(self) -> Mapping[str, bytes]:
        """``graph.onnx``: the model without its stored tensors' bytes."""
        with self._lock:
            if self._graph is None:
                graph_table = table(self._items)
                prop = self._model.metadata_props.add()
                prop.key, prop.value = GRAPH_KEY, json.dumps(graph_table, sort_keys=True)
                try:
                    self._graph = self._model.SerializeToString()
                finally:
                    del self._model.metadata_props[-1]
            return {GRAPH_ATTACHMENT: self._graph}


def _external(v: Value) -> Iterator[Any]:
    if v.payload is not None and v.payload.external is not None:
        yield v.payload.external
    for s in v.inputs:
        if s is not None:
            yield from _external(s)


def _nbytes(it: Item) -> int:
    if it.packed:
        return it.sizes["bytes"]
    dtype = it.value.otype.dtype
    assert dtype is not None
    return it.value.numel * dtype.itemsize


def _record(it: Item, files: ExternalFiles) -> TensorRecord:
    v = it.value
    if it.packed:
        assert v.payload is not None
        data = v.payload.packed(files)
        source_shape: tuple[int, ...] = (data.size,)
    else:
        a = v_array(v, files)
        source_shape = v.shape
        sizes = [it.sizes[n] for n in it.source_layout]
        # A view: the store copies a transposed weight into C order block by block
        # (weightatlas.storage._blocks), never holding a second whole copy per pass.
        data = a.reshape(sizes).transpose([it.source_layout.index(n) for n in it.canonical])
    return TensorRecord(it.name, data, source_name=v.name, kind=it.kind, layout=it.canonical,
                        source_layout=it.source_layout, source_shape=source_shape,
                        module=it.module, param=it.param, attrs=_attrs(it))


def _attrs(it: Item) -> dict[str, Any]:
    v, r = it.value, it.role
    out: dict[str, Any] = {"origin": v.origin, "onnx_dtype": v.otype.name}
    extra = dict(it.attrs)
    out["role"] = extra.pop("role", r.role if r is not None else "other")
    out["effective"] = extra.pop("effective", not extra.get("constant", False))
    child = "feeds" in extra
    use = it.use
    if use is not None and not child:
        node = use.node
        out["op"] = node.op_type if node is not None else "graph output"
        if node is not None and node.domain not in ("", "ai.onnx"):
            out["domain"] = node.domain
        if r is not None:
            out["input"] = r.input
        if node is not None and node.name:
            out["node"] = node.name
    if v.graph.path:
        out["graph"] = v.graph.path
    if r is not None and (not child or out["role"] == "quantized"):
        out.update(r.attrs)
    if v.payload is not None and v.payload.external is not None:
        out["external"] = {"file": v.payload.external.file, "offset": v.payload.external.offset}
    if v.sparse is not None:
        out["sparse"] = {"nnz": int(v.sparse.size)}
    if it.packed:
        out["packed"] = True
        out["onnx_shape"] = list(v.shape)
    out.update(extra)
    return out


def read(
    path: str | os.PathLike[str],
    *,
    keep_constants: bool = False,
    max_bytes: int = MAX_FILE_BYTES,
    max_depth: int = MAX_DEPTH,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> OnnxSource:
    """Open and check an ONNX model; every weight is located before any is read.

    Args:
        path: A ``.onnx`` file, or a folder holding ``model.onnx`` (or one ``.onnx`` file).
        keep_constants: Also store shape and index constants (``attrs.constant``).
        max_bytes: Largest model file accepted (protobuf's own limit is 2 GiB).
        max_depth: Deepest subgraph nesting accepted.
        max_tensor_bytes: Largest tensor that may be computed in memory (a folded
            ``ConstantOfShape``, a densified sparse tensor).

    Raises:
        NotFoundError: The path, or an external data file, does not exist.
        FormatError: The file is not a valid ONNX model (``ShapeError`` for shapes that
            disagree with the bytes given).
        PathEscapeError: External data names a file outside the model's folder.
        ResourceLimitError: The file, the nesting or a tensor exceeds its limit.
        UnsupportedError: An element type or feature weightatlas does not handle.

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((3, 4), np.float32), "fc.weight")
        >>> graph = helper.make_graph(
        ...     [helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)], "g",
        ...     [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], [w])
        >>> onnx.save(helper.make_model(graph), tmp / "m.onnx")
        >>> [(r.name, r.kind, r.layout) for r in read(tmp / "m.onnx").records()]
        [('fc.weight', 'linear', ('out', 'in'))]
    """
    target = Path(os.fspath(path))
    if not os.path.lexists(target):
        raise NotFoundError(f"{target}: no such file or folder")
    target = resolve(target)
    label = str(target)
    model, fid = parse(label, label, max_bytes)
    folder = os.path.dirname(os.path.abspath(label))
    files = ExternalFiles(folder, label)
    try:
        found = walk(model, label, files, Limits(max_depth, max_tensor_bytes))
        items = plan(found, keep_constants=keep_constants)
        strip(model, items, files)
        facts_ = facts(model, items, files)
    except WeightAtlasError:
        files.close()
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError,
            UnicodeError, AttributeError) as e:
        files.close()
        raise FormatError(f"{label}: malformed ONNX model: {type(e).__name__}: {e}") from e
    facts_["_ident"] = fid
    return OnnxSource(target.name, label, model, items, files, facts_)
