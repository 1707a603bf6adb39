"""Walking an ONNX model: every constant, where it is used, and what folds into what.

:func:`walk` visits the main graph, every subgraph (``If`` branches, ``Loop`` and
``Scan`` bodies, to any depth up to a limit) and every local function, in node order.
It collects each constant: initializers, sparse initializers and ``Constant`` nodes
(``value``, ``value_float(s)``, ``value_int(s)``, ``sparse_value``); it folds the nodes
of :data:`~._onnx_fold.FOLDABLE` whose inputs are all constant (checking them, but
computing nothing yet); and it records every other use of a constant: the consuming
node, its graph and the input position. Names are resolved through the graph scopes
as ONNX defines them (a subgraph sees its parents' values unless it shadows them),
and a node input naming no value is an error (a truncated file, usually).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightatlas.adapters import _onnx_fold as fold
from weightatlas.adapters._onnx_external import ExternalFiles
from weightatlas.adapters._onnx_names import sanitize, scope_module
from weightatlas.adapters._onnx_tensors import (
    ONNX_TYPES,
    OnnxType,
    Payload,
    check_dims,
    payload,
)
from weightatlas.errors import FormatError, ResourceLimitError, ShapeError

__all__ = ["MAX_FOLD_DEPTH", "Graph", "Limits", "Use", "Value", "Walk", "attributes", "v_array",
           "walk"]

_INT, _FLOAT, _STRING, _TENSOR, _GRAPH = 2, 1, 3, 4, 5
#: Longest chain of folded nodes: deeper chains are left unfolded (bounded recursion).
MAX_FOLD_DEPTH = 64
_FLOATS, _INTS, _STRINGS, _GRAPHS, _SPARSE = 6, 7, 8, 10, 11


@dataclass(frozen=True)
class Limits:
    """What a model may ask for before it is refused."""

    max_depth: int  #: subgraph nesting
    max_tensor_bytes: int  #: one materialised (folded or densified) tensor


@dataclass(eq=False)
class Graph:
    """One graph (or function body) and its place in the model."""

    proto: Any
    path: str  #: ``""`` for the main graph, ``name/then_branch`` below it
    prefix: str  #: module prefix for weights named from inside it
    parent: Graph | None
    values: dict[str, Value] = field(default_factory=dict)
    defined: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Use:
    """A constant consumed by a node that is not folded (or by a graph output)."""

    node: Any  #: NodeProto, or None for a graph output
    index: int
    graph: Graph
    order: int


@dataclass(eq=False)
class Value:
    """A constant: a tensor stored in the model, or the output of a folded node."""

    name: str
    graph: Graph
    shape: tuple[int, ...]
    otype: OnnxType
    origin: str  #: initializer, sparse_initializer, constant, constant_list, folded
    order: int
    payload: Payload | None = None
    proto: Any = None  #: TensorProto, SparseTensorProto or AttributeProto holding it
    node: Any = None  #: the Constant node or the folded node
    step: fold.Fold | None = None
    inputs: list[Value | None] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)
    folds: list[tuple[Value, int]] = field(default_factory=list)  #: (folded output, index)
    sparse: np.ndarray | None = None  #: linear indices of a sparse tensor's values
    location_set: bool | None = None  #: the stored tensor had data_location set (proto2)
    depth: int = 0  #: folded nodes on the longest path from a stored tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.otype.name in ("FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16") or self.otype.name \
            .startswith("FLOAT8")


@dataclass
class Walk:
    """Everything :func:`walk` found, in model order."""

    values: list[Value]
    graphs: list[Graph]
    nodes: int


def attributes(node: Any) -> dict[str, Any] | None:
    """A node's attributes as Python values; ``None`` when one refers to a function's."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            return None
        t = a.type
        if t == _INT:
            out[a.name] = int(a.i)
        elif t == _FLOAT:
            out[a.name] = float(a.f)
        elif t == _STRING:
            out[a.name] = a.s.decode("utf-8", "replace")
        elif t == _INTS:
            out[a.name] = [int(v) for v in a.ints]
        elif t == _FLOATS:
            out[a.name] = [float(v) for v in a.floats]
        elif t == _TENSOR:
            out[a.name] = a.t
    return out


class _Walker:
    def __init__(self, label: str, files: ExternalFiles | None, limits: Limits) -> None:
        self.label = label
        self.files = files
        self.limits = limits
        self.values: list[Value] = []
        self.graphs: list[Graph] = []
        self.order = 0
        self.op_counts: dict[str, int] = {}

    def where(self, g: Graph, what: str) -> str:
        return f"{self.label}: {what}" + (f" (in {g.path})" if g.path else "")

    # ---- scopes ----------------------------------------------------------------------
    def lookup(self, g: Graph, name: str, node: Any) -> Value | None:
        scope: Graph | None = g
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            if name in scope.defined:
                return None
            scope = scope.parent
        raise FormatError(self.where(g, f"node {node.name or node.op_type!r} ({node.op_type}) "
                                        f"reads {name!r}, which no graph input, initializer or "
                                        "node output defines (file truncated?)"))

    def define(self, g: Graph, value: Value) -> None:
        if value.name in g.values:
            raise FormatError(self.where(g, f"tensor {value.name!r} is defined twice"))
        g.values[value.name] = value
        self.values.append(value)

    # ---- constants -------------------------------------------------------------------
    def tensor_value(self, g: Graph, t: Any, origin: str, node: Any = None) -> Value | None:
        where = self.where(g, f"tensor {t.name!r}")
        p = payload(t, where, self.files)
        if p is None:
            return None
        return Value(t.name, g, p.shape, p.otype, origin, self.order, payload=p, proto=t,
                     node=node)

    def sparse_value(self, g: Graph, st: Any, origin: str, name: str) -> Value | None:
        where = self.where(g, f"sparse tensor {name!r}")
        dims = check_dims(st.dims, where)
        values = payload(st.values, where + " values", self.files)
        indices = payload(st.indices, where + " indices", self.files)
        if values is None or indices is None:
            return None
        nnz = values.numel
        if len(values.shape) != 1:
            raise ShapeError(f"{where}: values must be 1-d, found shape {list(values.shape)}")
        if indices.otype.name != "INT64":
            raise FormatError(f"{where}: indices must be INT64, found {indices.otype.name}")
        numel = math.prod(dims)
        self.check_size(values.otype, dims, where)
        idx = np.asarray(indices.array(self.files), np.int64)
        if idx.shape == (nnz, len(dims)) and len(dims) > 1:
            if idx.size and ((idx < 0).any() or (idx >= np.array(dims)).any()):
                raise FormatError(f"{where}: an index lies outside shape {list(dims)}")
            linear = np.asarray(np.ravel_multi_index(idx.T, dims) if nnz else (), np.int64)
        elif idx.shape == (nnz,):
            if nnz and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise FormatError(f"{where}: an index lies outside the {numel} values of shape "
                                  f"{list(dims)}")
            linear = idx
        else:
            raise ShapeError(f"{where}: indices have shape {list(idx.shape)}, expected [{nnz}] "
                             f"or [{nnz}, {len(dims)}]")
        if np.unique(linear).size != linear.size:
            raise FormatError(f"{where}: an index appears twice")
        return Value(name, g, dims, values.otype, origin, self.order, payload=values, proto=st,
                     sparse=linear)

    def check_size(self, otype: OnnxType, shape: tuple[int, ...], where: str) -> None:
        need = otype.nbytes(math.prod(shape))
        if need > self.limits.max_tensor_bytes:
            raise ResourceLimitError(
                f"{where}: would take {need} bytes in memory, over the limit of "
                f"{self.limits.max_tensor_bytes} (raise max_tensor_bytes if the model is trusted)")

    def constant_node(self, g: Graph, node: Any) -> None:
        out = node.output[0] if node.output else ""
        if len(node.attribute) != 1 or not out:
            raise FormatError(self.where(g, f"Constant node {node.name or out!r} must have one "
                                            "attribute and one output"))
        a = node.attribute[0]
        value: Value | None = None
        if a.ref_attr_name:
            return
        if a.name == "value" and a.type == _TENSOR:
            value = self.tensor_value(g, a.t, "constant", node)
            if value is not None:
                value.name = out
        elif a.name == "sparse_value" and a.type == _SPARSE:
            value = self.sparse_value(g, a.sparse_tensor, "constant", out)
            if value is not None:
                value.node = node
        elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            data = {"value_float": [a.f], "value_floats": list(a.floats), "value_int": [a.i],
                    "value_ints": list(a.ints)}[a.name]
            code = 1 if "float" in a.name else 7
            array = np.asarray(data, ONNX_TYPES[code].dtype)
            if a.name in ("value_float", "value_int"):
                array = array.reshape(())
            array.flags.writeable = False
            p = Payload(ONNX_TYPES[code], array.shape, a.name, typed=array, proto=node)
            value = Value(out, g, array.shape, p.otype, "constant_list", self.order, payload=p,
                          proto=a, node=node)
        if value is not None:
            self.define(g, value)

    # ---- folding ---------------------------------------------------------------------
    def try_fold(self, g: Graph, node: Any, ins: list[Value | None]) -> bool:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in fold.FOLDABLE or len(node.output) != 1:
            return False
        wanted = fold.VALUE_INPUTS[op] | fold.PARAM_INPUTS.get(op, frozenset())
        present = [i for i, n in enumerate(node.input) if n]
        if any(ins[i] is None for i in present) or not set(present) <= wanted:
            return False
        attrs = attributes(node)
        depth = 1 + max((v.depth for v in ins if v is not None), default=0)
        if attrs is None or depth > MAX_FOLD_DEPTH:
            return False
        where = self.where(g, f"node {node.name or node.output[0]!r} ({op})")
        params = {i: v_array(ins[i], self.files) for i in fold.PARAM_INPUTS.get(op, ())
                  if i < len(ins) and ins[i] is not None}
        if op == "ConstantOfShape" and "value" in attrs:
            p = payload(attrs["value"], where + " value", self.files)
            if p is None:
                return False
            attrs["value"] = p.array(self.files)
        shapes = [v.shape if v is not None else None for v in ins]
        types = [v.otype if v is not None else None for v in ins]
        step = fold.plan(op, attrs, shapes, types, params, where)
        if step is None:
            return False
        self.check_size(step.otype, step.shape, where)
        value = Value(node.output[0], g, step.shape, step.otype, "folded", self.order,
                      node=node, step=step, inputs=list(ins), depth=depth)
        for i, v in enumerate(ins):
            if v is not None:
                v.folds.append((value, i))
        self.define(g, value)
        return True

    # ---- graphs ----------------------------------------------------------------------
    def graph(self, g: Graph, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise ResourceLimitError(self.where(g, f"subgraphs nested deeper than "
                                                   f"{self.limits.max_depth} levels "
                                                   "(raise max_depth if the model is trusted)"))
        self.graphs.append(g)
        proto = g.proto
        g.defined.update(i if isinstance(i, str) else i.name for i in proto.input)
        for node in proto.node:
            g.defined.update(o for o in node.output if o)
        for t in getattr(proto, "initializer", ()):
            g.defined.add(t.name)
            value = self.tensor_value(g, t, "initializer")
            if value is not None:
                self.define(g, value)
        for st in getattr(proto, "sparse_initializer", ()):
            g.defined.add(st.values.name)
            value = self.sparse_value(g, st, "sparse_initializer", st.values.name)
            if value is not None:
                self.define(g, value)
        for node in proto.node:
            self.order += 1
            self.node(g, node, depth)
        for out in getattr(proto, "output", ()):
            name = out if isinstance(out, str) else out.name
            if name and (value := self.lookup(g, name, _OutputNode(name))) is not None:
                value.uses.append(Use(None, 0, g, self.order))

    def node(self, g: Graph, node: Any, depth: int) -> None:
        key = node.op_type.lower()
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
        ins = [self.lookup(g, n, node) if n else None for n in node.input]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            self.constant_node(g, node)
            return
        if self.try_fold(g, node, ins):
            return
        for i, v in enumerate(ins):
            if v is not None:
                v.uses.append(Use(node, i, g, self.order))
        base = scope_module(node) or f"{key}_{self.op_counts[key] - 1}"
        for a in node.attribute:
            subs = [a.g] if a.type == _GRAPH else list(a.graphs) if a.type == _GRAPHS else []
            for k, sub in enumerate(subs):
                tail = a.name if len(subs) == 1 else f"{a.name}.{k}"
                path = f"{g.path}/{base}/{tail}" if g.path else f"{base}/{tail}"
                prefix = f"{g.prefix}.{base}.{tail}" if g.prefix else f"{base}.{tail}"
                self.graph(Graph(sub, path, prefix, g), depth + 1)


class _OutputNode:
    """Stands in for a node in the message about an undefined graph output."""

    op_type = "graph output"

    def __init__(self, name: str) -> None:
        self.name = name


def v_array(value: Value | None, files: ExternalFiles | None) -> np.ndarray:
    """A constant's values (source tensors only; folded parameters are computed)."""
    assert value is not None
    if value.step is not None:
        ins = [v_array(v, files) if v is not None else None for v in value.inputs]
        return fold.run(value.step, ins)
    assert value.payload is not None
    if value.sparse is not None:
        dense = np.zeros(value.shape, value.payload.otype.dtype)
        dense.reshape(-1)[value.sparse] = value.payload.array(files).reshape(-1)
        dense.flags.writeable = False
        return dense
    return value.payload.array(files)


def walk(model: Any, label: str, files: ExternalFiles | None, limits: Limits) -> Walk:
    """Collect the constants of a model, its folds and their uses (see the module doc)."""
    walker = _Walker(label, files, limits)
    main = Graph(model.graph, "", "", None)
    walker.graph(main, 0)
    for f in model.functions:
        name = sanitize(f"{f.domain}.{f.name}" if f.domain else f.name)
        body = Graph(f, f"functions/{name}", f"functions.{name}", None)
        walker.graph(body, 0)
    return Walk(walker.values, walker.graphs, walker.order)
