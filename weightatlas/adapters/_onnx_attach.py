"""The graph that travels with the weights: the model without its stored tensors' bytes.

:func:`strip` moves every stored tensor's values out of the parsed model (they stay
with the source, which hands them to the store) and points each tensor at its
snapshot tensor: ``data_location = EXTERNAL``, one ``external_data`` entry
``location = weightatlas:<tensor name>``. External tensors that are not stored (shape
constants) are put inline, so the attached graph needs no file but the snapshot.
:func:`table` is the JSON stored under the model's ``metadata_props`` key
``weightatlas.graph``: for each stored tensor, the field that held its values and
whether ``data_location`` was set (so the original message comes back exactly), and
for each folded weight, the graph value it was computed as.
``weightatlas.core._onnx_model.load_model`` reads this format; docs/formats/onnx.md
describes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from weightatlas.adapters._onnx_external import ExternalFiles
from weightatlas.adapters._onnx_plan import Item
from weightatlas.adapters._onnx_tensors import check_dims, onnx_type

__all__ = ["GRAPH_KEY", "LOCATION_PREFIX", "strip", "table", "tensors"]

#: ``location`` prefix of a stored tensor in the attached graph.
LOCATION_PREFIX = "weightatlas:"
#: ``metadata_props`` key of the attached graph's table.
GRAPH_KEY = "weightatlas.graph"
_EXTERNAL = 1


def table(items: list[Item]) -> dict[str, Any]:
    """The attached graph's table: how to put every stored tensor back (docs/formats/onnx.md)."""
    tensors: dict[str, Any] = {}
    folded: dict[str, str] = {}
    for it in items:
        v = it.value
        if v.step is not None:
            folded[it.name] = v.name
            continue
        assert v.payload is not None
        entry: dict[str, Any] = {"field": v.payload.field, "origin": v.origin}
        if v.location_set is not None:
            entry["data_location"] = v.location_set
        if v.origin == "constant_list":
            entry["node_output"] = v.name
        if v.sparse is not None:
            entry["sparse"] = True
        if it.packed:
            entry["packed"] = True
        tensors[it.name] = entry
    return {"format": "weightatlas.onnx-graph", "version": 1, "location_prefix": LOCATION_PREFIX,
            "tensors": tensors, "folded": folded}


def strip(model: Any, items: list[Item], files: ExternalFiles) -> None:
    """Move every stored tensor's bytes out of the model; inline other external tensors."""
    from onnx import TensorProto

    ours: set[str] = set()
    for it in items:
        v = it.value
        if v.step is not None or v.payload is None:
            continue
        if v.origin == "constant_list":
            v.proto.ClearField({"value_floats": "floats", "value_ints": "ints",
                                "value_float": "f", "value_int": "i"}[v.payload.field])
            v.payload.proto = None
            continue
        t = v.proto.values if v.sparse is not None else v.proto
        external = v.payload.field == "external"
        v.location_set = True if external else t.HasField("data_location")
        if external:
            v.payload.field = "raw_data"  # what onnx.load puts back
        else:
            v.payload.extract()
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", LOCATION_PREFIX + it.name
        ours.add(entry.value)
    for t in tensors(model):
        mine = len(t.external_data) == 1 and t.external_data[0].value in ours
        if t.data_location == _EXTERNAL and not mine:
            s = files.locate(t, f"{files.model_label}: tensor {t.name!r}", _need(t))
            t.raw_data = files.bytes_view(s).tobytes()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT


def _need(t: Any) -> int:
    otype = onnx_type(t.data_type, t.name)
    return otype.nbytes(math.prod(check_dims(t.dims, t.name)))


def tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto in a model: initializers, attributes, sparse parts, subgraphs."""
    stack = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        yield from getattr(g, "initializer", ())
        for st in getattr(g, "sparse_initializer", ()):
            yield st.values
            yield st.indices
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for st in [a.sparse_tensor] if a.HasField("sparse_tensor") else []:
                    yield st.values
                    yield st.indices
                for st in a.sparse_tensors:
                    yield st.values
                    yield st.indices
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
