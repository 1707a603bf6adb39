"""Deciding what a model's constants are: weights, their roles, names and layouts.

From :func:`~._onnx_graph.walk`'s constants and uses, :func:`plan` makes one
:class:`Item` per tensor the snapshot will hold, in model order:

- a constant consumed by an operator the role table knows (``Conv`` ``W``, ``Gemm``
  ``B``, ``LSTM`` ``R``...) is a weight with that role, kind and canonical layout;
  a constant used only as a shape, index, axis, state or activation quantization
  parameter is a *constant*, left out unless ``keep_constants``; a constant used
  elsewhere is a weight (role ``other``) when it is a floating-point tensor of more
  than one value, else a constant;
- a folded value (a weight computed by ``Transpose``, ``Cast``, ``DequantizeLinear``...)
  is stored as computed, and the tensors it was computed from are stored too
  (``effective`` false: the quantized original, its scale and zero point), except when
  the chain only moves values (``Transpose``, ``Reshape``...) from one initializer used
  nowhere else: then the initializer itself is stored, in the weight's canonical
  layout, and its source layout gives its bytes back exactly;
- a bias added after a ``MatMul``/``Conv`` takes its layer's module and kind, and the
  projections of attention blocks are found from the graph (kind ``attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from weightatlas.adapters import _naming
from weightatlas.adapters import _onnx_fold as fold
from weightatlas.adapters import _onnx_names as names
from weightatlas.adapters._onnx_graph import Use, Value, Walk
from weightatlas.adapters._onnx_roles import Role
from weightatlas.adapters._onnx_usage import Info, attention, bias_roles, classify

__all__ = ["Item", "plan"]

@dataclass(eq=False)
class Item:
    """One tensor of the snapshot: what to read, and how to name and lay it out."""

    value: Value  #: the constant whose values are stored
    role: Role | None
    kind: str
    sizes: dict[str, int]  #: canonical axis name -> size
    canonical: tuple[str, ...]
    source_layout: tuple[str, ...]
    attrs: dict[str, Any]
    sort: tuple[float, int, int]
    use: Use | None = None
    name: str = ""
    module: str = ""
    param: str = ""
    packed: bool = False
    bias_of: Value | None = None


Steps = list[tuple[str, fold.Fold, tuple[int, ...]]]


def _closure(value: Value) -> list[tuple[Value, Steps, list[Value]]]:
    """Every stored tensor a folded value is computed from, with the path back to it."""
    found: list[tuple[Value, Steps, list[Value]]] = []

    def visit(v: Value, steps: Steps, via: list[Value]) -> None:
        if v.step is None:
            found.append((v, steps, via))
            return
        op = v.step.op
        for k in sorted(fold.VALUE_INPUTS[op]):
            src = v.inputs[k] if k < len(v.inputs) else None
            if src is not None:
                visit(src, [*steps, (op if k == 0 else f"{op}.{k}", v.step, src.shape)],
                      [*via, v])

    visit(value, [], [])
    return found


def _chain(value: Value) -> list[Value]:
    """A folded value and the folded values it is computed from (value inputs), nearest first."""
    out, queue = [value], [value]
    while queue:
        v = queue.pop(0)
        if v.step is None:
            continue
        for k in sorted(fold.VALUE_INPUTS[v.step.op]):
            src = v.inputs[k] if k < len(v.inputs) else None
            if src is not None and src.step is not None and src not in out:
                out.append(src)
                queue.append(src)
    return out


def _d(shape: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"d{k}" for k in range(len(shape)))


def _view(r: Role | None, shape: tuple[int, ...]) -> tuple[tuple[str | None, ...], dict[str, int],
                                                           tuple[str, ...]]:
    """(names as the consumer sees the tensor, canonical sizes, canonical order)."""
    names_ = r.names if r is not None and len(r.names) == len(shape) else _d(shape)
    canon = r.canonical if r is not None and len(r.names) == len(shape) else _d(shape)
    sizes = {n: d for n, d in zip(names_, shape, strict=True) if n is not None}
    return names_, sizes, canon


_SUFFIX = {"DequantizeLinear": ("_quantized", "quantized"),
           "DequantizeLinear.1": ("_scale", "scale"),
           "DequantizeLinear.2": ("_zero_point", "zero_point")}


def _source_item(s: Value, steps: Steps, f: Value, r: Role | None, kind: str,
                 sort: tuple[float, int, int]) -> Item:
    """A tensor a folded weight is computed from, laid out like the weight when it can be."""
    names_, sizes, canon = _view(r, f.shape)
    last = steps[-1][0] if steps else ""
    suffix, what = _SUFFIX.get(last, (f"_{s.otype.name.lower()}", "source")
                               if last.startswith("Cast") else ("_source", "source"))
    attrs: dict[str, Any] = {"role": what, "feeds": f.name, "effective": False}
    if last in ("DequantizeLinear.1", "DequantizeLinear.2"):
        found = fold.back_names(steps[:-1], names_, f.shape)
        axes = found[0] if found is not None else None
        params = steps[-1][1].params
        if params["mode"] == "tensor":
            return Item(s, r, kind, {}, (), (), attrs, sort, param=suffix)
        if params["mode"] == "axis" and axes is not None and axes[params["axis"]] is not None:
            name = str(axes[params["axis"]])
            return Item(s, r, kind, {name: s.shape[0]}, (name,), (name,), attrs, sort,
                        param=suffix)
        d = _d(s.shape)
        return Item(s, None, "other", dict(zip(d, s.shape, strict=True)), d, d, attrs, sort,
                    param=suffix)
    layout = fold.back_layout(steps, names_, f.shape)
    if layout is None or not s.otype.stored:
        d = _d(s.shape)
        return Item(s, None, "other", dict(zip(d, s.shape, strict=True)), d, d, attrs, sort,
                    param=suffix)
    return Item(s, r, kind, sizes, canon, layout, attrs, sort, param=suffix)


def _kind(r: Role | None, v: Value) -> str:
    return r.kind if r is not None else "other"


def _guess(v: Value, i: Info) -> tuple[Role | None, str]:
    """A role from the tensor's name (PyTorch-style names) or from what it reaches."""
    if names.is_dotted(v.name):
        kind, layout = _naming.infer(v.name, v.shape)
        if kind != "other":
            return Role("", "weight", "", kind, layout, layout), kind
    if i.reach_kind:
        d = _d(v.shape)
        return Role("", "other", "", i.reach_kind, d, d), i.reach_kind
    return None, "other"


def plan(walk: Walk, *, keep_constants: bool) -> list[Item]:
    """One :class:`Item` per stored tensor, in model order (see the module doc)."""
    info = classify(walk)
    bias_roles(walk, info)
    attention(walk, info)
    items: list[Item] = []
    owner: dict[Value, Item] = {}
    memo: dict[Value, float] = {}

    def first(v: Value) -> float:
        """Where the model first uses a value (node order, then input position)."""
        if v not in memo:
            orders = [u.order + u.index / 1000 for u in v.uses]
            orders += [first(out) for out, _ in v.folds if info[out].weight]
            memo[v] = min(orders) if orders else math.inf
        return memo[v]

    for v in walk.values:  # folded weights and what they are computed from
        i = info[v]
        if v.step is None or not i.weight:
            continue
        names_, sizes, canon = _view(i.role, v.shape)
        sources = _closure(v)
        sort = (first(v), v.order, 0)
        if len(sources) == 1:
            src, steps, via = sources[0]
            layout = fold.back_layout(steps, names_, v.shape)
            if (layout is not None and not src.uses and len(src.folds) == 1
                    and src not in owner and src.otype.stored
                    and all(st[0] in fold.LAYOUT_OPS for st in steps)
                    and all(not m.uses and len(m.folds) <= 1 for m in via[1:])):
                moved = {"ops": [st[0] for st in reversed(steps)], "value": v.name,
                         "value_shape": list(v.shape),
                         "value_layout": [n or "" for n in names_]}
                item = Item(src, i.role, _kind(i.role, v), sizes, canon, layout, moved, sort,
                            use=i.use)
                items.append(item)
                owner[src] = owner[v] = item
                continue
        chain = _chain(v)
        attrs: dict[str, Any] = {
            "ops": sorted({c.step.op for c in chain if c.step is not None}),
            "folded_from": [s.name for s, _, _ in sources],
            "chain": [c.name for c in chain[1:]]}
        layout = fold.back_layout([], names_, v.shape)
        assert layout is not None
        item = Item(v, i.role, _kind(i.role, v), sizes, canon, layout, attrs, sort, use=i.use)
        items.append(item)
        owner[v] = item
        for k, (s, steps, _) in enumerate(sources):
            if s in owner or info[s].role is not None:
                continue
            sub = _source_item(s, steps, v, i.role, _kind(i.role, v), (sort[0], sort[1], k + 1))
            items.append(sub)
            owner[s] = sub
    for v in walk.values:  # constants stored as they are
        if v in owner or v.step is not None:
            continue
        i = info[v]
        unused = not v.uses and not v.folds
        attrs = {}
        if unused and v.is_float and v.numel > 1:
            attrs["role"] = "unused"
        elif not i.weight:
            if not keep_constants:
                continue
            i.role = None
            attrs["constant"] = True
        r, kind = (i.role, _kind(i.role, v)) if i.role is not None else _guess(v, i)
        if i.reaches:
            attrs["reaches"] = i.reaches
        names_, sizes, canon = _view(r, v.shape)
        layout = fold.back_layout([], names_, v.shape)
        assert layout is not None
        item = Item(v, i.role, kind, sizes, canon, layout, attrs, (first(v), v.order, 0),
                    use=i.use, bias_of=i.bias_of)
        items.append(item)
        owner[v] = item
    for item in items:
        if item.value in info and info[item.value].also:
            item.attrs["also"] = info[item.value].also
        if not item.value.otype.stored and item.value.step is None:
            item.packed = True
            item.role, item.kind, item.sizes = None, "other", {"bytes": item.value.payload.nbytes
                                                                if item.value.payload else 0}
            item.canonical = item.source_layout = ("bytes",)
    items.sort(key=lambda it: it.sort)
    names.name_items(items)
    return items
