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

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from weightatlas.core._align_fused import fused
from weightatlas.core._align_names import Transform, name_similarity, relate, roles_compatible
from weightatlas.core._align_tensors import Alignment, Match, State, Tensor, describe
from weightatlas.errors import NotFoundError, ShapeError
from weightatlas.storage import Snapshot

__all__ = ["Alignment", "Match", "Tensor", "align", "describe"]

_MAX_GROUP = 3000


def _given(st: State, mapping: Mapping[str, str]) -> None:
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


def _hash(st: State) -> None:
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


def _compatible(ta: Tensor, tb: Tensor, strict: bool) -> Transform | None:
    if ta.numel != tb.numel:
        return None
    if strict and not (roles_compatible(ta.role, tb.role) and (
            ta.family == tb.family or "?" in (ta.family, tb.family))):
        return None
    return relate(ta.shape, ta.layout, tb.shape, tb.layout)


def _siblings(st: State) -> None:
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


def _greedy(st: State, left: list[Tensor], right: list[Tensor], strict: bool,
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


def _by_size(st: State, strict: bool, method: str, threshold: float) -> None:
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


def _relabel(st: State) -> None:
    out = []
    for m in st.matches:
        ta, tb = st.a[m.a], st.b[m.b]
        if m.method in ("structure", "name") and m.a_rows is None and m.b_rows is None and (
                ta.content == tb.content):
            m = Match(m.a, m.b, "hash", 0.9, m.transform, note="identical content, one of "
                      "several identical tensors")
        out.append(m)
    st.matches = out


def _reasons(st: State, mine: list[Tensor], theirs: dict[str, Tensor],
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
    st = State(ta, tb)
    if mapping:
        _given(st, mapping)
    _hash(st)
    fused(st)
    _siblings(st)
    _by_size(st, True, "structure", 0.0)
    _siblings(st)
    _by_size(st, False, "name", 0.6)
    _relabel(st)
    order_a = {t.name: t.index for t in ta}
    st.matches.sort(key=lambda m: (order_a[m.a], m.a_rows or (0, 0)))
    return Alignment(st.matches, _reasons(st, st.unmatched("a"), st.b, st.free_b),
                     _reasons(st, st.unmatched("b"), st.a, st.free_a), st.a, st.b)
