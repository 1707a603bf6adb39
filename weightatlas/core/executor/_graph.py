"""A parsed, immutable view of an ONNX graph: nodes with decoded attributes, value specs.

The executor never walks protobuf messages while it traces: :func:`parse_model` decodes
every attribute, initializer and type once, checks that the nodes are in topological
order (each input defined before it is used) and refuses what it cannot read safely
(initializers stored as external data, sparse tensors) before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import FormatError, ResourceLimitError

from ._errors import UnsupportedOperatorError

if TYPE_CHECKING:
    import onnx

__all__ = ["MAX_SUBGRAPH_DEPTH", "Graph", "Node", "ValueSpec", "parse_model"]

#: Deepest nesting of subgraphs (``If`` branches inside ``If`` branches) accepted.
MAX_SUBGRAPH_DEPTH = 16

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ValueSpec:
    """A graph input or output: its name, element dtype and shape.

    ``dtype`` is None for non-tensor values (sequences, maps, optionals) and for values
    without a declared type; ``shape`` is None when the rank is unknown, and a dimension
    is a ``str`` when it is symbolic (``'batch'``) or None when it is unnamed.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    kind: str = "tensor"

    def describe(self) -> str:
        """The spec as text, e.g. ``float32[batch, 3, 224, 224]``."""
        dims = "?" if self.shape is None else ", ".join(
            "?" if d is None else str(d) for d in self.shape)
        dtype = "?" if self.dtype is None else self.dtype.name
        return f"{dtype}[{dims}]" if self.kind == "tensor" else self.kind


@dataclass(frozen=True)
class Node:
    """One operator application with its attributes decoded to Python values."""

    index: int
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    opset: int

    @property
    def label(self) -> str:
        """How messages name the node: ``node 'conv1' (Conv)``."""
        who = repr(self.name) if self.name else f"#{self.index}"
        return f"node {who} ({self.op_type})"

    def subgraphs(self) -> list[Graph]:
        """The graphs held in this node's attributes (``If`` branches, ``Loop`` bodies)."""
        found: list[Graph] = []
        for value in self.attrs.values():
            if isinstance(value, Graph):
                found.append(value)
            elif isinstance(value, list):
                found += [v for v in value if isinstance(v, Graph)]
        return found


@dataclass(frozen=True)
class Graph:
    """A graph: nodes in topological order, its inputs, outputs and initializers.

    ``external`` names the initializers whose bytes live in external data files; the
    executor never opens such files, so these must be given as weights.
    """

    name: str
    nodes: tuple[Node, ...]
    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    initializers: Mapping[str, np.ndarray]
    external: Mapping[str, ValueSpec] = field(default_factory=dict)

    def walk(self) -> list[Node]:
        """Every node of the graph and of its subgraphs, depth first."""
        found: list[Node] = []
        for node in self.nodes:
            found.append(node)
            for sub in node.subgraphs():
                found += sub.walk()
        return found


def parse_model(model: onnx.ModelProto, *, where: str = "model") -> tuple[Graph, int]:
    """Decodes a model's main graph and returns it with the default-domain opset version.

    Args:
        model: The ONNX model.
        where: How messages name the model (a file name, a snapshot reference).

    Returns:
        The parsed graph and the ``ai.onnx`` opset version the model imports.

    Raises:
        FormatError: A node uses a value before it is defined, or a tensor is malformed.
        UnsupportedOperatorError: The model holds sparse initializers.
        ResourceLimitError: Subgraphs are nested deeper than :data:`MAX_SUBGRAPH_DEPTH`.

    Example:
        >>> import onnx
        >>> from onnx import TensorProto, helper
        >>> g = helper.make_graph(
        ...     [helper.make_node("Relu", ["x"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
        >>> graph, opset = parse_model(helper.make_model(g))
        >>> graph.inputs[0].describe(), graph.nodes[0].label, opset >= 13
        ('float32[n, 4]', 'node #0 (Relu)', True)
    """
    opset = 0
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            opset = int(imp.version)
    graph = _parse_graph(model.graph, opset, outer=frozenset(), depth=0, where=where)
    if opset == 0 and any(not node.domain for node in graph.walk()):
        raise FormatError(f"{where}: the model uses default-domain operators but imports no "
                          "version of the default operator set ('' or 'ai.onnx' in "
                          "opset_import)")
    return graph, opset


def _parse_graph(proto: onnx.GraphProto, opset: int, *, outer: frozenset[str], depth: int,
                 where: str) -> Graph:
    from onnx import TensorProto

    if depth > MAX_SUBGRAPH_DEPTH:
        raise ResourceLimitError(f"{where}: subgraphs are nested more than "
                                 f"{MAX_SUBGRAPH_DEPTH} levels deep (graph {proto.name!r})")
    if len(proto.sparse_initializer):
        raise UnsupportedOperatorError(
            f"{where}: graph {proto.name!r} holds {len(proto.sparse_initializer)} sparse "
            "initializers; the executor reads dense initializers only")
    initializers: dict[str, np.ndarray] = {}
    external: dict[str, ValueSpec] = {}
    for tensor in proto.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            external[tensor.name] = ValueSpec(tensor.name, _np_dtype(tensor.data_type),
                                              tuple(int(d) for d in tensor.dims))
        else:
            initializers[tensor.name] = _to_array(tensor, where)
    inputs = tuple(_value_spec(v) for v in proto.input)
    outputs = tuple(_value_spec(v) for v in proto.output)

    defined = set(outer) | set(initializers) | set(external) | {v.name for v in inputs}
    nodes = []
    for index, node_proto in enumerate(proto.node):
        node = _parse_node(node_proto, index, opset, defined, depth, where)
        missing = [n for n in node.inputs if n and n not in defined]
        if missing:
            raise FormatError(f"{where}: {node.label} reads {missing[0]!r}, which no graph "
                              "input, initializer or earlier node defines (nodes must be in "
                              "topological order)")
        defined.update(n for n in node.outputs if n)
        nodes.append(node)
    for out in outputs:
        if out.name not in defined:
            raise FormatError(f"{where}: graph output {out.name!r} is never computed")
    return Graph(proto.name, tuple(nodes), inputs, outputs, initializers, external)


def _parse_node(proto: onnx.NodeProto, index: int, opset: int, defined: set[str], depth: int,
                where: str) -> Node:
    attrs: dict[str, Any] = {}
    for attr in proto.attribute:
        attrs[attr.name] = _attribute(attr, opset, frozenset(defined), depth, where)
    domain = "" if proto.domain in _DEFAULT_DOMAINS else proto.domain
    return Node(index, proto.name, proto.op_type, domain, tuple(proto.input),
                tuple(proto.output), attrs, opset)


def _attribute(attr: onnx.AttributeProto, opset: int, outer: frozenset[str], depth: int,
               where: str) -> Any:
    from onnx import AttributeProto, helper

    kind = attr.type
    if kind == AttributeProto.GRAPH:
        return _parse_graph(attr.g, opset, outer=outer, depth=depth + 1, where=where)
    if kind == AttributeProto.GRAPHS:
        return [_parse_graph(g, opset, outer=outer, depth=depth + 1, where=where)
                for g in attr.graphs]
    if kind == AttributeProto.TENSOR:
        return _to_array(attr.t, where)
    if kind == AttributeProto.TENSORS:
        return [_to_array(t, where) for t in attr.tensors]
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8", errors="replace")
    if kind == AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attr.strings]
    if kind in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
        return _Unreadable("a sparse tensor")
    if kind in (AttributeProto.TYPE_PROTO, AttributeProto.TYPE_PROTOS):
        return _Unreadable("a type")
    return helper.get_attribute_value(attr)


@dataclass(frozen=True)
class _Unreadable:
    """An attribute value the executor does not decode; ops that need it refuse the node."""

    what: str


def _to_array(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        raise UnsupportedOperatorError(
            f"{where}: tensor {tensor.name!r} is stored as external data inside a node "
            "attribute; the executor never opens external files")
    try:
        return np.asarray(numpy_helper.to_array(tensor))
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: tensor {tensor.name!r} with dims {list(tensor.dims)} "
                          f"cannot be decoded: {e}") from e


def _np_dtype(elem_type: int) -> np.dtype | None:
    from onnx import helper

    if elem_type == 0:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return None


def _value_spec(info: onnx.ValueInfoProto) -> ValueSpec:
    which = info.type.WhichOneof("value")
    if which is None:  # no declared type: a tensor the graph computes
        return ValueSpec(info.name, None, None)
    if which != "tensor_type":
        return ValueSpec(info.name, None, None, kind=which.replace("_type", ""))
    tt = info.type.tensor_type
    if not tt.HasField("shape"):
        return ValueSpec(info.name, _np_dtype(tt.elem_type), None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return ValueSpec(info.name, _np_dtype(tt.elem_type), tuple(dims))
