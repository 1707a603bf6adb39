"""Rebuild an ONNX model from the store alone: the attached graph plus the snapshot's tensors.

The ONNX adapter attaches ``graph.onnx`` to every snapshot it writes: the model's own
``ModelProto`` in which each stored tensor's bytes are replaced by a reference,
``data_location = EXTERNAL`` and ``external_data = [location: "weightatlas:<name>"]``
(``<name>`` is the tensor's canonical name in the snapshot). A table in the model's
``metadata_props`` (key ``weightatlas.graph``, JSON) says how to put each tensor back:
the field that held it (``raw_data``, ``float_data``, ``int32_data``...), whether
``data_location`` was set, and the special cases (a sparse tensor's values, a
``Constant`` node's ``value_floats``, types kept as packed bytes). It also maps each
folded weight to the graph value it was computed as (``folded``).

:func:`load_model` reads every referenced tensor with ``layout="source"``, so the
bytes are exactly the original's, and puts them back where they were: the result is
the original model, message for message (a model that used external data comes back
with its tensors inline, as ``onnx.load`` returns it). onnx is imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from weightatlas.errors import IntegrityError, NotFoundError
from weightatlas.storage import Snapshot

__all__ = ["GRAPH_ATTACHMENT", "GRAPH_KEY", "LOCATION_PREFIX", "graph_table", "load_graph",
           "load_model"]

#: The attachment the ONNX adapter writes (the same names as ``adapters.onnx``).
GRAPH_ATTACHMENT = "graph.onnx"
#: ``location`` prefix of a tensor stored in the snapshot.
LOCATION_PREFIX = "weightatlas:"
#: ``metadata_props`` key of the table.
GRAPH_KEY = "weightatlas.graph"

# TensorProto.DataType codes whose typed field is int32_data / uint64_data.
_INT32_16BIT = {4, 5, 10, 16}  # UINT16 INT16 FLOAT16 BFLOAT16 (FLOAT16/BFLOAT16 as bits)
_INT32_8BIT = {2, 3, 9, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26}


def attached_model(snapshot: Snapshot, missing: str) -> Any:
    """The snapshot's ``graph.onnx`` parsed as a ``ModelProto``.

    Raises:
        NotFoundError: The snapshot has no such attachment (``missing`` says why).
        IntegrityError: The attachment is not a valid ONNX model.
    """
    import onnx
    from google.protobuf.message import DecodeError

    if GRAPH_ATTACHMENT not in snapshot.attachments:
        raise NotFoundError(f"{snapshot.path}: snapshot {snapshot.ref} has no "
                            f"{GRAPH_ATTACHMENT} attachment ({missing})")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(snapshot.attachment(GRAPH_ATTACHMENT))
    except DecodeError as e:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} is not a "
                             f"valid ONNX model: {e}") from e
    return model


def pop_graph_table(snapshot: Snapshot, model: Any) -> dict[str, Any]:
    """The ONNX adapter's table, the last of ``model.metadata_props``, checked and removed
    from the model (which is then the original's graph again)."""
    props = model.metadata_props
    if not props or props[-1].key != GRAPH_KEY:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} has no "
                             f"{GRAPH_KEY} table")
    try:
        table = json.loads(props[-1].value)
    except ValueError as e:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_KEY} table of {snapshot.ref} is not "
                             f"JSON: {e}") from e
    if not isinstance(table, dict) or table.get("format") != "weightatlas.onnx-graph" \
            or table.get("version") != 1:
        found = (table.get("format"), table.get("version")) if isinstance(table, dict) else table
        raise IntegrityError(f"{snapshot.path}: {GRAPH_KEY} table of {snapshot.ref} is "
                             f"{found!r}, expected 'weightatlas.onnx-graph' version 1")
    del props[-1]
    return table


def _parse(snapshot: Snapshot) -> tuple[Any, dict[str, Any]]:
    model = attached_model(snapshot, "it was not ingested from an ONNX model")
    return model, pop_graph_table(snapshot, model)


def graph_table(snapshot: Snapshot) -> dict[str, Any]:
    """The attached graph's table: stored tensors and folded weights (see the module doc).

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((3, 4), np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)],
        ...     "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 3])], [w])
        >>> onnx.save(helper.make_model(g), tmp / "m.onnx")
        >>> snap = wa.ingest(tmp / "m.onnx", store=store)
        >>> graph_table(snap)["tensors"]["fc.weight"]["field"]
        'raw_data'
    """
    return _parse(snapshot)[1]


def load_graph(snapshot: Snapshot) -> Any:
    """The attached graph as an ``onnx.ModelProto``, without weight bytes.

    Each stored tensor is an external reference ``weightatlas:<name>``; use
    :func:`load_model` for a runnable model.

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 2), np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 2])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> onnx.save(helper.make_model(g), tmp / "m.onnx")
        >>> graph = load_graph(wa.ingest(tmp / "m.onnx", store=store))
        >>> [(e.key, e.value) for e in graph.graph.initializer[0].external_data]
        [('location', 'weightatlas:fc.weight')]
    """
    return _parse(snapshot)[0]


def _tensors(model: Any) -> Iterator[tuple[Any, Any]]:
    """Every TensorProto in a model with the SparseTensorProto holding it (or None)."""
    stack = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        for t in getattr(g, "initializer", ()):
            yield t, None
        for st in getattr(g, "sparse_initializer", ()):
            yield st.values, st
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t, None
                for t in a.tensors:
                    yield t, None
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values, a.sparse_tensor
                for st in a.sparse_tensors:
                    yield st.values, st
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _nodes(model: Any) -> Iterator[Any]:
    stack = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _fill(t: Any, field: str, values: np.ndarray, packed: bool) -> None:
    """Put values back in the field that held them, exactly as they were encoded."""
    if field == "none":
        return
    if field == "raw_data":
        t.raw_data = np.ascontiguousarray(values).tobytes()
        return
    flat = np.ascontiguousarray(values).reshape(-1)
    if packed:  # bytes of a type the store keeps packed (complex, float8 fnuz, int4...)
        raw = flat.view(np.uint8)
        base = {"float_data": np.float32, "double_data": np.float64, "int64_data": np.int64,
                "uint64_data": np.uint64}.get(field)
        codes = raw.view(base) if base is not None else raw.astype(np.int32)
        getattr(t, field).extend(codes.tolist())
        return
    code = t.data_type
    if field == "int32_data" and code in _INT32_16BIT and values.dtype.kind in "fV":
        codes = flat.view(np.uint16).astype(np.int32)
    elif field == "int32_data" and code in _INT32_8BIT and values.dtype.kind == "V":
        codes = flat.view(np.uint8).astype(np.int32)
    elif field == "int32_data":
        codes = flat.astype(np.int32)
    else:
        codes = flat
    getattr(t, field).extend(codes.tolist())


def _sparse_positions(st: Any, dims: tuple[int, ...]) -> np.ndarray:
    from onnx import numpy_helper

    idx = np.asarray(numpy_helper.to_array(st.indices), np.int64)
    if idx.ndim == 2 and len(dims) > 1:
        return np.asarray(np.ravel_multi_index(idx.T, dims), np.int64)
    return idx.reshape(-1)


def load_model(snapshot: Snapshot) -> Any:
    """Rebuild the ONNX model a snapshot was ingested from, with its original bytes.

    Raises:
        NotFoundError: The snapshot has no ``graph.onnx`` (it did not come from ONNX).
        IntegrityError: The graph, its table or a tensor it names is damaged or missing.

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 3])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 4])], [w])
        >>> original = helper.make_model(g)
        >>> onnx.save(original, tmp / "m.onnx")
        >>> snap = wa.ingest(tmp / "m.onnx", store=store)
        >>> load_model(snap) == original
        True
    """
    model, table = _parse(snapshot)
    entries: dict[str, Any] = table.get("tensors", {})
    done: set[str] = set()
    for t, sparse in _tensors(model):
        if t.data_location != 1:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if not location.startswith(LOCATION_PREFIX):
            continue
        name = location[len(LOCATION_PREFIX):]
        entry = entries.get(name)
        if entry is None or name in done:
            raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} refers "
                                 f"to tensor {name!r}, which its table does not list once")
        values = snapshot.read(name, layout="source")
        if entry.get("sparse") and sparse is not None:
            values = values.reshape(-1)[_sparse_positions(sparse, tuple(sparse.dims))]
        del t.external_data[:]
        if entry.get("data_location"):
            t.data_location = 0
        else:
            t.ClearField("data_location")
        _fill(t, entry["field"], values, bool(entry.get("packed")))
        done.add(name)
    lists = {e["node_output"]: (n, e) for n, e in entries.items() if "node_output" in e}
    for node in _nodes(model):
        if node.op_type == "Constant" and node.output and node.output[0] in lists:
            name, entry = lists[node.output[0]]
            values = snapshot.read(name, layout="source")
            attr = next(a for a in node.attribute if a.name == entry["field"])
            if entry["field"] == "value_floats":
                attr.floats.extend(values.astype(np.float32).reshape(-1).tolist())
            elif entry["field"] == "value_ints":
                attr.ints.extend(values.astype(np.int64).reshape(-1).tolist())
            elif entry["field"] == "value_float":
                attr.f = float(values)
            else:
                attr.i = int(values)
            done.add(name)
    missing = sorted(set(entries) - done)
    if missing:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} lists "
                             f"{len(missing)} tensors it does not use (first: {missing[0]!r})")
    return model
