"""What the consumers of a constant say about it: its role, whether it is a weight.

For each constant (:class:`~._onnx_graph.Value`), :func:`classify` looks at every node
that reads it. An input the role table knows (:func:`~._onnx_roles.role`) makes it a
weight with that role; a shape, index, axis or state input makes it a constant; for
any other input the data is followed through data-movement operators (``Expand``,
``Concat``, ``Slice``...) to see where it ends up, so zero initial states expanded
into an LSTM's ``initial_h`` are constants and slices concatenated into its ``W`` are
weights. :func:`bias_roles` gives a constant added to a ``MatMul``/``Gemm``/``Conv``
output its layer's bias role, and :func:`attention` marks the projections of
attention blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weightatlas.adapters._onnx_graph import Use, Value, Walk, attributes
from weightatlas.adapters._onnx_roles import PARAMETER_INPUTS, Role, attention_labels, role

__all__ = ["Info", "attention", "bias_roles", "classify"]

_STD = ("", "ai.onnx")
_LINEAR_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})
_BIAS_OF = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul"})


@dataclass(eq=False)
class Info:
    role: Role | None = None
    use: Use | None = None
    weight: bool = False
    primary: str = ""
    reaches: str = ""  #: ``op.input`` of a weight input reached through data movement
    reach_kind: str = ""
    also: list[str] = field(default_factory=list)
    bias_of: Value | None = None  #: the weight of the layer an added bias belongs to


#: Operators that move or reshape data without computing: a constant feeding one is
#: judged by where the result goes (zero initial states expanded into an LSTM's
#: ``initial_h`` are states; slices concatenated into an LSTM's ``W`` are weights).
_PASS = frozenset({"Expand", "Tile", "Concat", "Reshape", "Squeeze", "Unsqueeze", "Transpose",
                   "Identity", "Cast", "Slice", "Split", "Gather", "Pad", "Flatten"})


class _Uses:
    """Where each value name is consumed, and which inputs of each node are constants."""

    def __init__(self, walk: Walk) -> None:
        self.consts: dict[int, dict[int, Value]] = {}
        for v in walk.values:
            for u in v.uses:
                if u.node is not None:
                    self.consts.setdefault(id(u.node), {})[u.index] = v
        self.users: dict[str, list[tuple[Any, int]]] = {}
        for g in walk.graphs:
            for node in g.proto.node:
                for k, name in enumerate(node.input):
                    if name:
                        self.users.setdefault(name, []).append((node, k))

    def role(self, node: Any, index: int, v_shape: tuple[int, ...], is_float: bool,
             ) -> Role | None:
        mine = self.consts.get(id(node), {})
        flags = [k in mine for k in range(len(node.input))]
        shapes = [mine[k].shape if k in mine else None for k in range(len(node.input))]
        return role(node.domain, node.op_type, index, attributes(node) or {}, v_shape, flags,
                    shapes, is_float)

    def downstream(self, node: Any, index: int) -> tuple[str, str]:
        """Follow data movement from ``node`` input ``index``: ("param"|"other"|op.input, kind)."""
        seen: set[int] = set()
        stack = [(node, index, 0)]
        found: list[tuple[str, str]] = []
        while stack and len(found) < 64:
            n, k, depth = stack.pop()
            if n.domain in _STD and k in PARAMETER_INPUTS.get(n.op_type, ()):
                found.append(("param", ""))
                continue
            r = next((x for rank in (2, 4, 3, 1, 5) if depth and (
                x := self.role(n, k, (2,) * rank, True)) is not None), None)
            if r is not None:
                return f"{n.op_type}.{r.input}", r.kind
            if n.op_type not in _PASS or depth > 8 or id(n) in seen or (
                    n.op_type in ("Gather", "Pad", "Expand", "Tile") and k != 0):
                found.append(("other", ""))
                continue
            seen.add(id(n))
            outs = [(m, j) for o in n.output if o for m, j in self.users.get(o, [])]
            if not outs:
                found.append(("other", ""))
            stack.extend((m, j, depth + 1) for m, j in outs)
        if found and all(f[0] == "param" for f in found):
            return "param", ""
        return "other", ""


def classify(walk: Walk) -> dict[Value, Info]:
    uses = _Uses(walk)
    info: dict[Value, Info] = {}
    for v in walk.values:
        i = info[v] = Info()
        loose = False
        for u in v.uses:
            if u.node is None:
                loose = True
                continue
            op = u.node.op_type
            if u.node.domain in _STD and u.index in PARAMETER_INPUTS.get(op, ()):
                continue
            r = uses.role(u.node, u.index, v.shape, v.is_float)
            if r is not None:
                i.weight = True
                if i.role is None:
                    i.role, i.use, i.primary = r, u, f"{op}.{r.input}"
                elif f"{op}.{r.input}" not in (i.primary, *i.also):
                    i.also.append(f"{op}.{r.input}")
                continue
            if i.use is None:
                i.use = u
            where, kind = uses.downstream(u.node, u.index)
            if where == "param":
                continue
            if where != "other":
                i.reaches, i.reach_kind = i.reaches or where, i.reach_kind or kind
                i.weight = True
            else:
                loose = True
        if loose and not i.weight:
            i.weight = v.is_float and v.numel > 1
    return info


def bias_roles(walk: Walk, info: dict[Value, Info]) -> None:
    """A constant added to a MatMul/Gemm/Conv output is that layer's bias."""
    weight_of: dict[int, Value] = {}
    producer: dict[tuple[int, str], Any] = {}
    for v, i in info.items():
        if i.role is not None and i.role.role == "weight" and i.use and i.use.node is not None:
            weight_of.setdefault(id(i.use.node), v)
    for g in walk.graphs:
        for node in g.proto.node:
            for out in node.output:
                producer[(id(g), out)] = node
    for v, i in info.items():
        if i.role is not None or not v.is_float:
            continue
        for u in v.uses:
            if u.node is None or u.node.op_type != "Add" or len(u.node.input) != 2:
                continue
            prev = producer.get((id(u.graph), u.node.input[1 - u.index]))
            w = weight_of.get(id(prev)) if prev is not None else None
            if w is None or prev is None or prev.op_type not in _BIAS_OF:
                continue
            wr = info[w].role
            assert wr is not None
            out = dict(zip(wr.names, _shape_of(w), strict=True)).get("out")
            nonunit = [k for k, d in enumerate(v.shape) if d != 1]
            if out is None or [v.shape[k] for k in nonunit] != [out]:
                continue
            at = nonunit[0]
            conv = prev.op_type in ("Conv", "ConvTranspose")
            if not conv and at != len(v.shape) - 1:
                continue
            if conv and len(v.shape) - at != len(_shape_of(w)) - 1:
                continue
            axes = tuple("out" if k == at else None for k in range(len(v.shape)))
            i.role = Role("B", "bias", "bias", wr.kind, axes, ("out",), {"via": "Add"})
            i.use, i.weight, i.bias_of = u, True, w
            break


def _shape_of(v: Value) -> tuple[int, ...]:
    return v.shape


def attention(walk: Walk, info: dict[Value, Info]) -> None:
    constant = {n for g in walk.graphs for n in g.values}
    for g in walk.graphs:
        nodes = list(g.proto.node)
        linear: dict[int, Any] = {}
        for v, i in info.items():
            if (i.role is not None and i.role.kind == "linear" and i.role.role == "weight"
                    and i.use is not None and i.use.node is not None and i.use.graph is g
                    and i.use.node.op_type in _LINEAR_OPS):
                linear[id(i.use.node)] = v
        if not linear:
            continue
        labels = attention_labels(nodes, linear, constant.__contains__)
        for node_id, label in labels.items():
            by_node = [(v, i) for v, i in info.items()
                       if i.use is not None and i.use.node is not None
                       and id(i.use.node) == node_id]
            adds = [(v, i) for v, i in info.items() if i.role is not None
                    and i.role.attrs.get("via") == "Add" and i.use is not None
                    and i.use.node is not None and any(
                        o in i.use.node.input for n in nodes if id(n) == node_id
                        for o in n.output)]
            for _, i in by_node + adds:
                if i.role is not None and i.role.kind == "linear":
                    attrs = dict(i.role.attrs, attention=label)
                    i.role = Role(i.role.input, i.role.role, i.role.param, "attention",
                                  i.role.names, i.role.canonical, attrs)
