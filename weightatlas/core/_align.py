"""Aligning two snapshots tensor by tensor, whatever their framework and names.

Stages, each only looking at what earlier ones left unmatched:

1. **given**: pairs the caller names (``mapping=``); a shape that cannot be brought
   to the other's is a :class:`~weightatlas.errors.ShapeError`.
2. **hash**: equal content (dtype, size and the XXH3-128 of every chunk). A content
   found once on each side is a match (confidence 1); duplicates (zero biases,
   LayerNorm weights at init) pair by equal names, the rest wait for later stages.
3. **fused** (method ``hash`` or ``structure``): one tensor on a side that is the
   concatenation, along its first axis, of several on the other: attention's fused
   ``in_proj``/``qkv`` against separate q, k, v; a recurrent layer's stacked gates
   against per-gate kernels. Parts are ordered by their names (q, k, v; the gate
   order in ``attrs["gates"]``) and each part is one pair, with the rows it covers.
4. **structure**: tensors of equal size whose roles (weight, bias, mean...), kind
   families and shapes are compatible (equal, split or merged axes, a transpose), scored
   by name similarity, position among their likes, and statistics, and paired greedily,
   best first; the siblings of a matched tensor follow it (``fc1.bias`` goes where
   ``fc1.weight`` went).
5. **name**: what is left, when names are similar enough (kind and role disregarded).

Everything still unmatched is listed with the reason. A structure or name match whose
contents are equal is relabelled ``hash`` (confidence 0.9: the content is certain,
which of several identical tensors it is, less so).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weightatlas.core._align_names import (
    Transform,
    family,
    name_similarity,
    relate,
    role,
    roles_compatible,
    tokens,
)
from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import Snapshot

__all__ = ["Alignment", "Match", "Tensor", "align", "describe"]

_FUSED_HINTS = ("in_proj", "qkv", "c_attn", "query_key_value", "wqkv")
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}
_MAX_GROUP = 3000


@dataclass
class Tensor:
    """What the aligner knows of one tensor (no bytes)."""

    name: str
    index: int
    kind: str
    dtype: str
    shape: tuple[int, ...]
    layout: tuple[str, ...]
    numel: int
    module: str
    role: str
    family: str
    tokens: list[str]
    attrs: dict[str, Any]
    content: tuple[Any, ...]  #: (dtype, numel, checksums of every chunk)
    rms: float | None
    l2: float | None


@dataclass(frozen=True)
class Match:
    """One aligned pair: B's tensor (or its rows) brought to A's by ``transform``."""

    a: str
    b: str
    method: str  #: given, hash, structure, name
    confidence: float
    transform: Transform = field(default_factory=Transform)
    a_rows: tuple[int, int] | None = None
    b_rows: tuple[int, int] | None = None
    note: str = ""


@dataclass
class Alignment:
    """The pairs found and what each side kept unmatched, with the reason."""

    matches: list[Match]
    unmatched_a: dict[str, str]
    unmatched_b: dict[str, str]
    tensors_a: dict[str, Tensor] = field(default_factory=dict)
    tensors_b: dict[str, Tensor] = field(default_factory=dict)


def describe(snapshot: Snapshot) -> list[Tensor]:
    """The aligner's view of every tensor of a snapshot, in model order."""
    table = snapshot.rows().select(["name", "kind", "dtype", "shape", "layout", "numel",
                                    "module", "param", "attrs", "checksum", "l2", "chunk"])
    rows = table.to_pylist()
    checks: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in rows:
        checks[r["name"]].append((r["chunk"], r["checksum"]))
    out: list[Tensor] = []
    for r in rows:
        if r["chunk"] != 0:
            continue
        numel = int(r["numel"])
        try:
            attrs = json.loads(r["attrs"] or "{}")
        except ValueError:
            attrs = {}
        l2 = r["l2"]
        out.append(Tensor(
            r["name"], len(out), r["kind"], r["dtype"], tuple(r["shape"]), tuple(r["layout"]),
            numel, r["module"], role(r["param"]), family(r["kind"]), tokens(r["name"]),
            attrs if isinstance(attrs, dict) else {},
            (r["dtype"], numel, tuple(c for _, c in sorted(checks[r["name"]]))),
            None if l2 is None or numel == 0 else float(l2) / numel ** 0.5,
            None if l2 is None else float(l2),
        ))
    return out


class _State:
    def __init__(self, a: list[Tensor], b: list[Tensor]) -> None:
        self.a = {t.name: t for t in a}
        self.b = {t.name: t for t in b}
        self.free_a = dict.fromkeys(t.name for t in a)
        self.free_b = dict.fromkeys(t.name for t in b)
        self.matches: list[Match] = []

    def take(self, m: Match) -> None:
        self.matches.append(m)
        self.free_a.pop(m.a, None)
        self.free_b.pop(m.b, None)

    def unmatched(self, side: str) -> list[Tensor]:
        src, free = (self.a, self.free_a) if side == "a" else (self.b, self.free_b)
        return [src[n] for n in free]


def _given(st: _State, mapping: Mapping[str, str]) -> None:
    for an, bn in mapping.items():
        if an not in st.a:
            raise NotFoundError(f"mapping names {an!r}, which the first snapshot does not hold")
        if bn not in st.b:
            raise NotFoundError(f"mapping names {bn!r}, which the second snapshot does not hold")
        ta, tb = st.a[an], st.b[bn]
        t = relate(ta.shape, ta.layout, tb.shape, tb.layout)
        if t is None:
            raise ShapeError(f"cannot compare tensor {an!r} {list(ta.shape)} with {bn!r} "
                             f"{list(tb.shape)}: their shapes hold different numbers of "
                             f"values ({ta.numel} and {tb.numel}) or cannot be transposed "
                             "into each other")
        st.take(Match(an, bn, "given", 1.0, t))


def _hash(st: _State) -> None:
    groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = defaultdict(
        lambda: ([], []))
    for t in st.unmatched("a"):
        groups[t.content][0].append(t)
    for t in st.unmatched("b"):
        groups[t.content][1].append(t)
    for left, right in groups.values():
        if not left or not right:
            continue
        if len(left) == 1 and len(right) == 1:
            ta, tb = left[0], right[0]
            tr = relate(ta.shape, ta.layout, tb.shape, tb.layout) or Transform(None, True)
            st.take(Match(ta.name, tb.name, "hash", 1.0, tr))
            continue
        names = {x.name: x for x in right}
        for ta in left:
            same = names.get(ta.name)
            if same is not None:
                tr = relate(ta.shape, ta.layout, same.shape, same.layout) or Transform(None, True)
                st.take(Match(ta.name, same.name, "hash", 1.0, tr))


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


def _fused_one(st: _State, whole: Tensor, other: str) -> None:
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


def _fused(st: _State) -> None:
    for t in st.unmatched("a"):
        if t.name in st.free_a:
            _fused_one(st, t, "b")
    for t in st.unmatched("b"):
        if t.name in st.free_b:
            _fused_one(st, t, "a")


def _compatible(ta: Tensor, tb: Tensor, strict: bool) -> Transform | None:
    if ta.numel != tb.numel:
        return None
    if strict and not (roles_compatible(ta.role, tb.role) and (
            ta.family == tb.family or "?" in (ta.family, tb.family))):
        return None
    return relate(ta.shape, ta.layout, tb.shape, tb.layout)


def _siblings(st: _State) -> None:
    """Tensors of modules already paired follow their module (``fc1.bias`` after ``weight``)."""
    changed = True
    while changed:
        changed = False
        pairs = {(st.a[m.a].module, st.b[m.b].module) for m in st.matches
                 if m.a_rows is None and m.b_rows is None}
        free_a = defaultdict(list)
        for t in st.unmatched("a"):
            free_a[t.module].append(t)
        free_b = defaultdict(list)
        for t in st.unmatched("b"):
            free_b[t.module].append(t)
        for ma, mb in pairs:
            for ta in free_a.get(ma, []):
                cands = [tb for tb in free_b.get(mb, []) if tb.name in st.free_b
                         and tb.role == ta.role and ta.role != "?"
                         and _compatible(ta, tb, True) is not None]
                if len(cands) == 1 and ta.name in st.free_a:
                    tb = cands[0]
                    st.take(Match(ta.name, tb.name, "structure", 0.95,
                                  _compatible(ta, tb, True) or Transform(),
                                  note="sibling of a matched tensor"))
                    changed = True


def _score(ta: Tensor, tb: Tensor, qa: float, qb: float) -> float:
    name = name_similarity(ta.tokens, tb.tokens)
    order = 1.0 - abs(qa - qb)
    stat = 0.0
    if ta.rms is not None and tb.rms is not None and max(ta.rms, tb.rms) > 0:
        stat = 1.0 - min(1.0, abs(ta.rms - tb.rms) / max(ta.rms, tb.rms))
    return 0.4 * name + 0.4 * order + 0.2 * stat


def _greedy(st: _State, left: list[Tensor], right: list[Tensor], strict: bool,
            method: str, threshold: float) -> None:
    na, nb = len(left), len(right)
    scored = []
    for i, ta in enumerate(left):
        for j, tb in enumerate(right):
            tr = _compatible(ta, tb, strict)
            if tr is None:
                continue
            if method == "name":
                s = name_similarity(ta.tokens, tb.tokens)
            else:
                s = _score(ta, tb, i / max(na - 1, 1), j / max(nb - 1, 1))
            if s >= threshold:
                scored.append((s, -abs(i / max(na - 1, 1) - j / max(nb - 1, 1)), i, j, tr))
    count_a: dict[int, int] = defaultdict(int)
    count_b: dict[int, int] = defaultdict(int)
    for _, _, i, j, _ in scored:
        count_a[i] += 1
        count_b[j] += 1
    scored.sort(key=lambda x: (x[0], x[1]), reverse=True)
    for s, _, i, j, tr in scored:
        ta, tb = left[i], right[j]
        if ta.name not in st.free_a or tb.name not in st.free_b:
            continue
        if method == "name":
            conf = 0.6 * s
        elif count_a[i] == 1 and count_b[j] == 1:
            conf = 0.9
        else:
            conf = min(0.9, 0.3 + 0.6 * s)
        if ta.tokens == tb.tokens:
            conf = max(conf, 0.95)
        st.take(Match(ta.name, tb.name, method, round(conf, 3), tr))


def _by_size(st: _State, strict: bool, method: str, threshold: float) -> None:
    groups: dict[int, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for t in st.unmatched("a"):
        groups[t.numel][0].append(t)
    for t in st.unmatched("b"):
        groups[t.numel][1].append(t)
    for left, right in groups.values():
        if not left or not right:
            continue
        if len(left) > _MAX_GROUP or len(right) > _MAX_GROUP:  # order only, to stay linear
            for ta, tb in zip(left, right, strict=False):
                tr = _compatible(ta, tb, strict)
                if tr is not None:
                    st.take(Match(ta.name, tb.name, method, 0.5, tr, note="paired by order"))
            continue
        _greedy(st, left, right, strict, method, threshold)


def _relabel(st: _State) -> None:
    out = []
    for m in st.matches:
        ta, tb = st.a[m.a], st.b[m.b]
        if m.method in ("structure", "name") and m.a_rows is None and m.b_rows is None and (
                ta.content == tb.content):
            m = Match(m.a, m.b, "hash", 0.9, m.transform, note="identical content, one of "
                      "several identical tensors")
        out.append(m)
    st.matches = out


def _reasons(st: _State, mine: list[Tensor], theirs: dict[str, Tensor],
             free_theirs: Mapping[str, None]) -> dict[str, str]:
    sizes = {t.numel for t in theirs.values()}
    free_sizes = {theirs[n].numel for n in free_theirs}
    out = {}
    for t in mine:
        other = theirs.get(t.name)
        if (other is not None and other.numel != t.numel) or (
                other is not None and relate(t.shape, t.layout, other.shape, other.layout) is None):
            out[t.name] = (f"shape {list(t.shape)} differs from {list(other.shape)} of the "
                           "same name on the other side")
        elif t.numel not in sizes:
            out[t.name] = f"no tensor of {t.numel} values on the other side"
        elif t.numel not in free_sizes:
            out[t.name] = f"every tensor of {t.numel} values on the other side is matched"
        else:
            out[t.name] = "no compatible tensor of the same size and role left"
    return out


def align(a: Snapshot, b: Snapshot, *, mapping: Mapping[str, str] | None = None) -> Alignment:
    """Pair the tensors of two snapshots (see the module docstring for how).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> s1 = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "a")
        >>> s2 = store.write(RecordsSource([TensorRecord("Dense_0.kernel", w.T.copy(),
        ...                  layout=("in", "out"))]), "b")
        >>> m = align(s1, s2).matches[0]
        >>> (m.a, m.b, m.method, str(m.transform))
        ('fc.weight', 'Dense_0.kernel', 'structure', 'transpose(1, 0)')
    """
    ta, tb = describe(a), describe(b)
    st = _State(ta, tb)
    if mapping:
        _given(st, mapping)
    _hash(st)
    _fused(st)
    _siblings(st)
    _by_size(st, True, "structure", 0.0)
    _siblings(st)
    _by_size(st, False, "name", 0.6)
    _relabel(st)
    order_a = {t.name: t.index for t in ta}
    st.matches.sort(key=lambda m: (order_a[m.a], m.a_rows or (0, 0)))
    return Alignment(st.matches, _reasons(st, st.unmatched("a"), st.b, st.free_b),
                     _reasons(st, st.unmatched("b"), st.a, st.free_a), st.a, st.b)
