"""The fused stage of alignment: one tensor that is several on the other side.

A fused attention projection (``in_proj_weight``, ``qkv``, ``c_attn``...) is the
concatenation along its first axis of q, k and v; a recurrent layer's kernel with
``attrs["gates"]`` stacks one block per gate. :func:`fused` pairs each part with the
rows of the whole it covers, the parts ordered by their names (q, k, v; the gate
letters of Flax's ``ii``/``hi``... cells) or by the ``attrs["fused"]`` index PyTorch
parts carry, all parts from one parent module.
"""

from __future__ import annotations

import re
from collections import defaultdict

from weightatlas.core._align_names import (
    Transform,
    name_similarity,
    relate,
    roles_compatible,
    tokens,
)
from weightatlas.core._align_tensors import Match, State, Tensor

__all__ = ["fused"]

_FUSED_HINTS = ("in_proj", "qkv", "c_attn", "query_key_value", "wqkv")
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}


def _parent(module: str) -> str:
    return module.rpartition(".")[0]


def _part_order(t: Tensor, gates: list[str] | None, from_input: bool | None) -> int | None:
    """Where a part tensor goes in its fused whole, from its name (None: not a part)."""
    last = t.module.rpartition(".")[2].lower()
    fused = t.attrs.get("fused")
    if isinstance(fused, dict) and isinstance(fused.get("index"), int):
        return int(fused["index"])
    if gates is None:
        for tok in (last, *reversed(t.tokens[:-1])):
            tok = {"query": "q", "key": "k", "value": "v"}.get(tok, tok)
            tok = tok.removesuffix("_proj")
            if tok in _QKV_ORDER:
                return _QKV_ORDER[tok]
        return None
    gate = t.attrs.get("gate")
    source = t.attrs.get("from")
    m = re.fullmatch(r"([ih])([a-z])", last)
    if gate is None and m:
        gate, source = m.group(2), "input" if m.group(1) == "i" else "hidden"
    if gate not in gates or (from_input is not None and source is not None
                             and (source == "input") != from_input):
        return None
    return gates.index(gate)


def _fused_one(st: State, whole: Tensor, other: str) -> None:
    gates = whole.attrs.get("gates")
    low = whole.name.lower()
    if isinstance(gates, list) and gates:
        k, order = len(gates), [str(g) for g in gates]
        from_input = None if whole.role.split("_")[-1] not in ("ih", "hh") else (
            whole.role.endswith("_ih"))
    elif any(h in low for h in _FUSED_HINTS):
        k, order, from_input = 3, None, None
    else:
        return
    if not whole.shape or whole.shape[0] % k:
        return
    size = whole.shape[0] // k
    part_shape = (size, *whole.shape[1:])
    groups: dict[str, dict[int, Tensor]] = defaultdict(dict)
    for t in st.unmatched(other):
        if t.numel * k != whole.numel or not roles_compatible(whole.role, t.role):
            continue
        if relate(part_shape, whole.layout, t.shape, t.layout) is None:
            continue
        pos = _part_order(t, order, from_input)
        if pos is not None:
            groups[_parent(t.module)].setdefault(pos, t)
    complete = [(p, g) for p, g in groups.items() if len(g) == k]
    if not complete:
        return
    _, parts = max(complete, key=lambda pg: name_similarity(tokens(pg[0]), whole.tokens))
    for i in range(k):
        t = parts[i]
        rows = (i * size, (i + 1) * size)
        tr = relate(part_shape, whole.layout, t.shape, t.layout) or Transform(None, True)
        if other == "b":
            st.take(Match(whole.name, t.name, "structure", 0.85, tr, a_rows=rows,
                          note=f"part {i} of {k} of a fused tensor"))
        else:
            back = relate(t.shape, t.layout, part_shape, whole.layout) or Transform(None, True)
            st.take(Match(t.name, whole.name, "structure", 0.85, back, b_rows=rows,
                          note=f"part {i} of {k} of a fused tensor"))


def fused(st: State) -> None:
    """Pair every fused tensor, on either side, with its parts on the other."""
    for t in st.unmatched("a"):
        if t.name in st.free_a:
            _fused_one(st, t, "b")
    for t in st.unmatched("b"):
        if t.name in st.free_b:
            _fused_one(st, t, "a")
