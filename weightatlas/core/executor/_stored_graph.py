"""The attached graph of a stored snapshot, rewritten for the executor (see ``_stored``).

:func:`read_graph` parses a snapshot's ``graph.onnx`` and tells its convention (the ONNX
adapter's table ``weightatlas.graph``, or the PyTorch adapter's note
``weightatlas.weights``); :func:`rewrite` turns it, without reading a weight byte of the
main graph, into a model whose every stored tensor the model computes with is a
main-graph initializer referring to it (``location = weightatlas:<name>``): folded weights
and ``Constant``-node weights become initializers named by their values, fused q/k/v a
``Concat`` of the stored parts, sparse initializers dense ones; what no output needs is
dropped and the nodes are ordered topologically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.core._onnx_model import (
    GRAPH_ATTACHMENT,
    GRAPH_KEY,
    LOCATION_PREFIX,
    _fill,
    attached_model,
    pop_graph_table,
)
from weightatlas.errors import IntegrityError
from weightatlas.storage import Snapshot, dtype_from_name

if TYPE_CHECKING:
    import onnx

__all__ = ["TORCH_KEY", "location", "read_graph", "rewrite"]

#: ``metadata_props`` key of a graph exported by the PyTorch adapter.
TORCH_KEY = "weightatlas.weights"
_EXTERNAL = 1


def rewrite(model: Any, convention: str, table: dict[str, Any],
            rows: dict[str, dict[str, Any]], snapshot: Snapshot) -> None:
    """Rewrites ``model`` in place for the executor (the module doc says how)."""
    if convention == "onnx":
        _rewrite_onnx(model, table, rows, snapshot)
    else:
        _rewrite_torch(model, rows, snapshot)
    _drop_dead(model.graph)


# ---- reading the attachment ------------------------------------------------------------


def read_graph(snapshot: Snapshot) -> tuple[onnx.ModelProto, str, dict[str, Any]]:
    """(the attached model, its convention, the ONNX adapter's table or ``{}``)."""
    framework = snapshot.metadata.get("framework") or "its"
    model = attached_model(
        snapshot,
        f"only its weights were stored ({framework} source), so it cannot be run; ingest "
        "the model from an ONNX file (wa.ingest('model.onnx')), a live PyTorch module "
        "with example inputs (wa.adapters.torch.from_module(module, "
        "example_inputs=(x,))), or JAX parameters with their function "
        "(wa.adapters.jax.from_pytree(params, apply=model.apply, example_inputs=(x,)))")
    props = model.metadata_props
    key = props[-1].key if len(props) else ""
    if key == TORCH_KEY:
        del props[-1]
        return model, "torch", {}
    if key != GRAPH_KEY:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} has "
                             f"neither a {GRAPH_KEY} table nor a {TORCH_KEY} note")
    return model, "onnx", pop_graph_table(snapshot, model)


def location(t: Any) -> str | None:
    """The stored tensor a TensorProto refers to, or None."""
    if t.data_location != _EXTERNAL:
        return None
    for e in t.external_data:
        if e.key == "location" and e.value.startswith(LOCATION_PREFIX):
            return str(e.value[len(LOCATION_PREFIX):])
    return None


def _reference(name: str, row: dict[str, Any], data_type: int | None = None) -> Any:
    """An initializer ``name`` referring to the stored tensor of ``row`` (no bytes)."""
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = name
    t.dims.extend(int(d) for d in row["source_shape"])
    t.data_type = data_type if data_type is not None else int(
        helper.np_dtype_to_tensor_dtype(dtype_from_name(row["dtype"])))
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", LOCATION_PREFIX + row["name"]
    return t


def _subgraphs(graph: Any) -> Iterator[Any]:
    """Every graph nested in ``graph``'s node attributes, recursively (not ``graph``)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            for a in node.attribute:
                found = ([a.g] if a.HasField("g") else []) + list(a.graphs)
                yield from found
                stack.extend(found)


def _stored_row(snapshot: Snapshot, rows: dict[str, dict[str, Any]], name: str,
                what: str) -> dict[str, Any]:
    row = rows.get(name)
    if row is None:
        raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref} refers to "
                             f"tensor {name!r} ({what}), which the snapshot does not hold; "
                             "re-ingest the model")
    return row


# ---- the ONNX adapter's convention -----------------------------------------------------


def _rewrite_onnx(model: Any, table: dict[str, Any], rows: dict[str, dict[str, Any]],
                  snapshot: Snapshot) -> None:
    graph = model.graph
    entries: dict[str, Any] = table.get("tensors") or {}
    # Folded weights: the value they were computed as becomes an initializer.
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    drop: set[int] = set()
    for name, value in (table.get("folded") or {}).items():
        if value in producers:
            row = _stored_row(snapshot, rows, name, f"folded weight {value!r}")
            graph.initializer.append(_reference(value, row))
            drop.add(producers[value])
    # Constant nodes holding stored tensors become initializers named by their output.
    lists = {e["node_output"]: n for n, e in entries.items() if "node_output" in e}
    for i, node in enumerate(graph.node):
        if node.op_type != "Constant" or i in drop or not node.output:
            continue
        out = node.output[0]
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        stored = None
        if attr is not None and attr.name == "value":
            stored = location(attr.t)
        elif attr is not None and attr.name == "sparse_value":
            stored = location(attr.sparse_tensor.values)
        elif out in lists:
            stored = lists[out]
        if stored is None or (entries.get(stored) or {}).get("packed"):
            continue
        row = _stored_row(snapshot, rows, stored, f"Constant node output {out!r}")
        data_type = attr.t.data_type if attr is not None and attr.name == "value" else None
        graph.initializer.append(_reference(out, row, data_type))
        drop.add(i)
    if drop:
        kept = [n for i, n in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(kept)
    # Sparse initializers: the store holds the dense tensor.
    for st in list(graph.sparse_initializer):
        stored = location(st.values)
        if stored is not None:
            row = _stored_row(snapshot, rows, stored, f"sparse initializer {st.values.name!r}")
            graph.initializer.append(_reference(st.values.name, row, st.values.data_type))
            graph.sparse_initializer.remove(st)
    # Packed tensors in the main graph, and stored tensors in subgraphs: inline values.
    for t in graph.initializer:
        stored = location(t)
        if stored is not None and (entries.get(stored) or {}).get("packed"):
            _inline(t, snapshot, rows, stored, entries[stored])
    for sub in _subgraphs(graph):
        for t in sub.initializer:
            stored = location(t)
            if stored is not None:
                _inline(t, snapshot, rows, stored, entries.get(stored) or {})
        for node in sub.node:
            if node.op_type == "Constant" and node.attribute and \
                    node.attribute[0].name == "value":
                t = node.attribute[0].t
                stored = location(t)
                if stored is not None:
                    _inline(t, snapshot, rows, stored, entries.get(stored) or {})


def _inline(t: Any, snapshot: Snapshot, rows: dict[str, dict[str, Any]], name: str,
            entry: dict[str, Any]) -> None:
    """Write a stored tensor's values back into its TensorProto (a copy)."""
    _stored_row(snapshot, rows, name, f"tensor {t.name!r}")
    values = snapshot.read(name, layout="source")
    del t.external_data[:]
    t.ClearField("data_location")
    _fill(t, str(entry.get("field", "raw_data")), values, bool(entry.get("packed")))


# ---- the PyTorch adapter's convention --------------------------------------------------


def _rewrite_torch(model: Any, rows: dict[str, dict[str, Any]], snapshot: Snapshot) -> None:
    from onnx import helper

    graph = model.graph
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in rows.values():
        attrs = json.loads(row["attrs"] or "{}")
        fused = attrs.get("fused")
        key = fused["name"] if isinstance(fused, dict) and isinstance(fused.get("name"), str) \
            else row["source_name"]
        by_source.setdefault(key, []).append({**row, "_fused": fused})
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    concats = []
    kept = []
    for t in graph.initializer:
        if not _cleared(t, t.name in by_source):
            kept.append(t)
            continue
        parts = by_source.get(t.name)
        if not parts:
            raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {snapshot.ref}: "
                                 f"initializer {t.name!r} has no values and no stored tensor "
                                 f"has source name {t.name!r}; re-ingest the module")
        if len(parts) == 1 and parts[0]["_fused"] is None:
            kept.append(_reference(t.name, parts[0], t.data_type))
            continue
        parts.sort(key=lambda r: int(r["_fused"].get("index", 0)))
        names = []
        for row in parts:
            name = row["name"] if row["name"] not in taken else f"{t.name}.{row['name']}"
            taken.add(name)
            kept.append(_reference(name, row, t.data_type))
            names.append(name)
        axis = int(parts[0]["_fused"].get("axis", 0))
        concats.append(helper.make_node("Concat", names, [t.name], axis=axis,
                                        name=f"weightatlas.fuse.{t.name}"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if concats:
        nodes = [*concats, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def _cleared(t: Any, stored: bool) -> bool:
    """An initializer the PyTorch adapter emptied: no values where some are due."""
    if t.data_location == _EXTERNAL or not (stored or int(np.prod(list(t.dims))) > 0):
        return False
    return not (t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data
                or t.uint64_data or t.string_data)


# ---- dead code -------------------------------------------------------------------------


def _drop_dead(graph: Any) -> None:
    """Removes nodes and initializers nothing reads (the chains folded weights replaced)."""
    _sort(graph)
    used = {o.name for o in graph.output} | {i.name for i in graph.input}
    for sub in _subgraphs(graph):  # outer-scope names read inside subgraphs
        used.update(n for node in sub.node for n in node.input)
        used.update(o.name for o in sub.output)
    kept = []
    for node in reversed(graph.node):
        if any(o in used for o in node.output):
            kept.append(node)
            used.update(node.input)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in used]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)


def _sort(graph: Any) -> None:
    """Orders the main graph's nodes topologically (ONNX requires it; not every file
    obeys), keeping the file's order where it is valid. A cycle is left to the parser."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    needs: list[set[int]] = []
    for node in graph.node:
        names = set(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names.update(n for inner in [sub, *_subgraphs(sub)] for nd in inner.node
                             for n in nd.input)
        needs.append({producer[n] for n in names if n in producer})
    order: list[int] = []
    done: set[int] = set()

    def visit(i: int) -> None:
        stack = [(i, iter(sorted(needs[i])))]
        on_path = {i}
        while stack:
            j, deps = stack[-1]
            nxt = next((d for d in deps if d not in done and d not in on_path), None)
            if nxt is None:
                stack.pop()
                on_path.discard(j)
                done.add(j)
                order.append(j)
            else:
                on_path.add(nxt)
                stack.append((nxt, iter(sorted(needs[nxt]))))

    for i in range(len(graph.node)):
        if i not in done:
            visit(i)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)
