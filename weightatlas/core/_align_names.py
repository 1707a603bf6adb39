"""Names, roles, families and shapes: the vocabulary the aligner compares tensors with.

Frameworks name the same thing differently (``fc1.weight``, ``Dense_0.kernel``,
``layers.0.linear1.weight``), so names are compared as token sequences after mapping
synonyms (``kernel``/``scale``/``embedding``/``gamma`` are a ``weight``,
``running_mean`` is a ``mean``, ``query`` is ``q``...). A tensor's **role** is what its
last name component says it is, and its **family** groups kinds that can hold the
same tensor (``linear``, ``attention`` and ``recurrent`` are all matrices).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

__all__ = ["Transform", "family", "name_similarity", "relate", "role", "roles_compatible",
           "tokens"]

_ROLES = {
    "weight": "weight", "kernel": "weight", "embedding": "weight", "scale": "weight",
    "gamma": "weight", "w": "weight", "in_proj_weight": "weight",
    "q_proj_weight": "weight", "k_proj_weight": "weight", "v_proj_weight": "weight",
    "bias": "bias", "beta": "bias", "b": "bias", "in_proj_bias": "bias",
    "running_mean": "mean", "mean": "mean", "moving_mean": "mean",
    "running_var": "var", "var": "var", "moving_variance": "var",
    "num_batches_tracked": "count",
}
_RECURRENT = re.compile(r"(weight|bias)_(ih|hh|hr)(?:_l\d+)?(?:_reverse)?")
_FAMILY = {"linear": "matrix", "attention": "matrix", "recurrent": "matrix"}
_SYNONYMS = {"kernel": "weight", "scale": "weight", "gamma": "weight", "embedding": "weight",
             "beta": "bias", "query": "q", "key": "k", "value": "v", "running": "",
             "moving": "", "variance": "var", "proj": "", "embed": "emb", "embeddings": "emb",
             "layers": "layer", "blocks": "layer", "block": "layer", "h": "layer",
             "dense": "linear", "fc": "linear", "lin": "linear", "ln": "norm",
             "layernorm": "norm", "batchnorm": "norm", "bn": "norm", "attn": "attention",
             "self": "", "module": "", "params": "", "model": ""}
_SPLIT = re.compile(r"[./_\-:\[\]\s]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])")


def role(param: str) -> str:
    """What a tensor is to its module, from its last name component; ``?`` when unknown.

    Example:
        >>> role("kernel"), role("running_var"), role("weight_hh_l1"), role("w_q")
        ('weight', 'var', 'weight_hh', '?')
    """
    low = param.lower()
    if low in _ROLES:
        return _ROLES[low]
    m = _RECURRENT.fullmatch(low)
    if m:
        return f"{m.group(1)}_{m.group(2)}"
    return "?"


def roles_compatible(a: str, b: str) -> bool:
    """Whether two roles can be the same tensor (``?`` matches anything).

    Example:
        >>> roles_compatible("weight", "weight_ih"), roles_compatible("weight", "bias")
        (True, False)
    """
    if a == b or "?" in (a, b):
        return True
    return a.split("_")[0] == b.split("_")[0] and ("_" in a) != ("_" in b)


def family(kind: str) -> str:
    """Kinds that can hold the same tensor share a family; ``other`` is a wildcard ``?``.

    Example:
        >>> family("attention"), family("conv2d"), family("other")
        ('matrix', 'conv2d', '?')
    """
    if kind == "other":
        return "?"
    return _FAMILY.get(kind, kind)


def tokens(name: str) -> list[str]:
    """A name as lowercase tokens with synonyms mapped (numbers kept: layer indices count).

    Example:
        >>> tokens("MultiHeadDotProductAttention_0.query.kernel")
        ['multi', 'head', 'dot', 'product', 'attention', '0', 'q', 'weight']
        >>> tokens("layer1.0.bn1.running_mean")
        ['layer', '1', '0', 'norm', '1', 'mean']
    """
    out = []
    for part in _SPLIT.split(name):
        for piece in _CAMEL.split(part):
            word = piece.lower()
            word = _SYNONYMS.get(word, word)
            if word:
                out.append(word)
    return out


def name_similarity(a: list[str], b: list[str]) -> float:
    """Similarity of two token lists in [0, 1] (1 for equal names after synonyms).

    :class:`difflib.SequenceMatcher`'s ratio (no junk, no autojunk) ``2 M / (|a| + |b|)``,
    ``M`` the tokens in matching blocks (the longest common run, earliest on ties, then
    the same on each side of it), computed without building a matcher: the aligner
    scores every candidate pair of same-size tensors, so this is its inner loop.

    Example:
        >>> name_similarity(tokens("fc1.weight"), tokens("fc1.kernel"))
        1.0
        >>> round(name_similarity(tokens("fc1.weight"), tokens("conv1.bias")), 2)
        0.33
    """
    if a == b:
        return 1.0
    total = len(a) + len(b)
    if not total:
        return 1.0
    where: dict[str, list[int]] = {}
    for j, tok in enumerate(b):
        where.setdefault(tok, []).append(j)
    return 2.0 * _matched(a, where, 0, len(a), 0, len(b)) / total


def _matched(a: list[str], where: dict[str, list[int]], alo: int, ahi: int, blo: int,
             bhi: int) -> int:
    """Tokens matched in ``a[alo:ahi]`` and ``b[blo:bhi]``, as difflib's matching blocks."""
    besti, bestj, best = alo, blo, 0
    run: dict[int, int] = {}
    for i in range(alo, ahi):
        longer = {}
        for j in where.get(a[i], ()):
            if j < blo:
                continue
            if j >= bhi:
                break
            k = longer[j] = run.get(j - 1, 0) + 1
            if k > best:
                besti, bestj, best = i - k + 1, j - k + 1, k
        run = longer
    if not best:
        return 0
    return (best + _matched(a, where, alo, besti, blo, bestj)
            + _matched(a, where, besti + best, ahi, bestj + best, bhi))


@dataclass(frozen=True)
class Transform:
    """How B's tensor is brought to A's canonical shape: a transpose, then a reshape."""

    perm: tuple[int, ...] | None = None
    reshape: bool = False

    def __str__(self) -> str:
        parts = []
        if self.perm is not None:
            parts.append(f"transpose({', '.join(map(str, self.perm))})")
        if self.reshape:
            parts.append("reshape")
        return "+".join(parts) or "identity"


def _refines(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Whether ``fine`` splits the axes of ``coarse`` (C order), ignoring size-1 axes."""
    f = [d for d in fine if d != 1]
    c = [d for d in coarse if d != 1]
    i = 0
    for d in c:
        prod = 1
        while prod < d and i < len(f):
            prod *= f[i]
            i += 1
        if prod != d:
            return False
    return i == len(f)


def relate(a_shape: tuple[int, ...], a_layout: tuple[str, ...], b_shape: tuple[int, ...],
           b_layout: tuple[str, ...]) -> Transform | None:
    """The transform that brings B's canonical tensor to A's shape, or ``None``.

    Equal shapes need none; named axes are matched by name; a reshape that only splits
    or merges neighbouring axes (``[heads, head_dim, in]`` and ``[heads*head_dim, in]``)
    is a reshape; otherwise a unique permutation of the axes is looked for.

    Example:
        >>> str(relate((8, 4), ("out", "in"), (2, 4, 4), ("heads", "head_dim", "in")))
        'reshape'
        >>> str(relate((8, 4), ("out", "in"), (4, 8), ("in", "out")))
        'transpose(1, 0)'
        >>> relate((8, 4), ("out", "in"), (8, 3), ("out", "in")) is None
        True
    """
    numel_a = numel_b = 1
    for d in a_shape:
        numel_a *= d
    for d in b_shape:
        numel_b *= d
    if numel_a != numel_b:
        return None
    if a_shape == b_shape:
        return Transform()
    named = not any(re.fullmatch(r"d\d+", x) for x in (*a_layout, *b_layout))
    if named and sorted(a_layout) == sorted(b_layout) and len(set(a_layout)) == len(a_layout):
        perm = tuple(b_layout.index(x) for x in a_layout)
        if tuple(b_shape[p] for p in perm) == a_shape:
            return Transform(perm)
    if _refines(a_shape, b_shape) or _refines(b_shape, a_shape):
        return Transform(None, True)
    if len(b_shape) <= 6 and len(a_shape) == len(b_shape):
        for perm in itertools.permutations(range(len(b_shape))):
            if tuple(b_shape[p] for p in perm) == a_shape:
                return Transform(perm)
    return None
