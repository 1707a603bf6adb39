"""JAX layouts into the canonical form, keeping the source layout so it comes back exactly.

Flax (Linen and NNX) stores kernels input-first; the canonical form is output-first:

- ``Dense``/``Linear`` ``kernel``: ``[in, out]`` -> ``[out, in]``, kind ``linear``;
- ``Conv`` ``kernel`` (1-3 spatial axes): ``[*spatial, in, out]`` (HWIO) ->
  ``[out, in, *spatial]`` (OIHW), kind ``convNd``;
- ``ConvTranspose`` ``kernel``: -> ``[in, out, *spatial]`` (PyTorch's order and
  orientation, below), kind ``conv_transpose``;
- attention ``query``/``key``/``value`` ``kernel``: ``[in, heads, head_dim]`` ->
  ``[heads, head_dim, in]``; ``out`` ``kernel``: ``[heads, head_dim, out]`` ->
  ``[out, heads, head_dim]``; ``query``... ``bias`` ``[heads, head_dim]`` unchanged;
  kind ``attention``;
- ``Embed`` ``embedding`` ``[vocab, dim]``: unchanged, kind ``embedding``;
- norm ``scale``/``bias`` and ``batch_stats`` ``mean``/``var`` ``[channel]``: unchanged,
  kind ``norm``.

Attention kernels keep their head axes: ``[heads, head_dim, in]`` is, byte for byte,
PyTorch's ``q_proj.weight`` ``[heads*head_dim, in]`` (heads outer), so the two compare
without a copy. A conv kernel's grouped input axis (``in / feature_group_count``)
maps like PyTorch's. The module type comes from the owner's class when known (NNX),
else from the Linen auto-name (``Conv_0`` -> ``Conv``) and the siblings (a module
whose children are ``query``, ``key``, ``value`` is attention). Recurrent cells
(``LSTMCell``...) are recognised by :mod:`._jax_recurrent`: each gate kernel is an
``[out, in]`` record of kind ``recurrent`` with its gate in ``attrs``.

``ConvTranspose`` kernels follow ``transpose_kernel``. With ``transpose_kernel=True``
the kernel is ``[*spatial, out, in]`` and Flax applies it as the gradient of a
convolution, as PyTorch does: the canonical ``[in, out, *spatial]`` is a transpose.
By default (``False``) the kernel is ``[*spatial, in, out]`` and Flax correlates the
dilated input with it unflipped, where PyTorch flips: the canonical kernel is the
source transposed *and reversed on its spatial axes* (``attrs["flip"]`` names them;
:func:`weightatlas.adapters.jax.to_pytree` undoes it). NNX modules say which they are;
for a Linen dict the caller's ``transposed`` names decide, else the bias (``[out]``: a
kernel ending in ``out`` is the default, one ending in ``in`` is transposed), else the
default is assumed (``attrs["transpose_kernel_known"]`` is then false).

Equinox modules and any tree whose leaves are named ``weight`` use PyTorch's layouts
already and go through :mod:`weightatlas.adapters._naming`'s rules (Equinox's conv
bias ``[out, 1, 1]`` becomes ``[out]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weightatlas.adapters import _naming
from weightatlas.adapters._jax_recurrent import Cell, find_cells, gate_attrs
from weightatlas.adapters._jax_tree import Leaf

__all__ = ["LeafPlan", "canonical"]

_FLAX_PARAMS = frozenset({"kernel", "embedding", "scale"})
_ATTN_ROLES = frozenset({"query", "key", "value", "out"})
_NORMS = ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm", "InstanceNorm")
_SPATIAL = {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}
_EQX = {"Linear": "linear", "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d",
        "Conv": "conv", "Embedding": "embedding", "LayerNorm": "norm", "GroupNorm": "norm",
        "RMSNorm": "norm", "BatchNorm": "norm"}


@dataclass
class LeafPlan:
    """How one leaf becomes a canonical record."""

    name: str
    source_name: str
    kind: str
    layout: tuple[str, ...]
    source_layout: tuple[str, ...]
    perm: tuple[int, ...] | None  #: canonical = source.transpose(perm)
    shape: tuple[int, ...]  #: canonical shape
    source_shape: tuple[int, ...]
    attrs: dict[str, Any]
    flip: tuple[int, ...] = ()  #: source axes reversed before the transpose


def _base(component: str) -> str:
    return re.sub(r"_\d+$", "", component)


def _generic(ndim: int) -> tuple[str, ...]:
    return tuple(f"d{i}" for i in range(ndim))


def _hint(leaf: Leaf, level: int) -> str:
    """The module type at ``level`` above the leaf: the owner's class, else the auto-name."""
    if level == 1 and leaf.owner:
        return leaf.owner
    if level == 2 and leaf.parent_owner:
        return leaf.parent_owner
    return _base(leaf.path[-1 - level]) if len(leaf.path) > level else ""


def _attention_role(leaf: Leaf, children: Mapping[tuple[str, ...], set[str]]) -> str | None:
    if len(leaf.path) < 2 or leaf.path[-2] not in _ATTN_ROLES:
        return None
    parent = _hint(leaf, 2).lower()
    siblings = children.get(leaf.path[:-2], set())
    if "attention" in parent or "attn" in parent or {"query", "key", "value"} <= siblings:
        return leaf.path[-2]
    return None


def _is_norm(leaf: Leaf) -> bool:
    owner = _hint(leaf, 1)
    module = ".".join(leaf.path[:-1])
    return owner.startswith(_NORMS) or _naming.is_norm_module(module) or (
        leaf.collection == "batch_stats")


def _kernel(leaf: Leaf, ndim: int, role: str | None, recurrent: bool = False,
            transposed: bool = False) -> tuple[str, tuple[str, ...], tuple[str, ...],
                                               tuple[int, ...], tuple[int, ...]]:
    """(kind, canonical layout, source layout, perm, flipped source axes) of a Flax kernel."""
    owner = _hint(leaf, 1)
    if ndim == 2:
        recurrent = recurrent or any(x in _hint(leaf, 2) for x in ("LSTM", "GRU", "RNN"))
        kind = "attention" if role else "recurrent" if recurrent else "linear"
        return kind, ("out", "in"), ("in", "out"), (1, 0), ()
    if ndim == 3 and role in ("query", "key", "value"):
        return ("attention", ("heads", "head_dim", "in"), ("in", "heads", "head_dim"), (1, 2, 0),
                ())
    if ndim == 3 and role == "out":
        return ("attention", ("out", "heads", "head_dim"), ("heads", "head_dim", "out"),
                (2, 0, 1), ())
    n = ndim - 2
    if n in _SPATIAL and "General" not in owner:
        spatial = _SPATIAL[n]
        if "ConvTranspose" in owner and transposed:  # [*spatial, out, in], applied as PyTorch
            return ("conv_transpose", ("in", "out", *spatial), (*spatial, "out", "in"),
                    (n + 1, n, *range(n)), ())
        src = (*spatial, "in", "out")
        if "ConvTranspose" in owner:  # applied unflipped: PyTorch's kernel is reversed
            return ("conv_transpose", ("in", "out", *spatial), src, (n, n + 1, *range(n)),
                    tuple(range(n)))
        return f"conv{n}d", ("out", "in", *spatial), src, (n + 1, n, *range(n)), ()
    return "other", _generic(ndim), _generic(ndim), tuple(range(ndim)), ()


def _flax(leaf: Leaf, shape: tuple[int, ...], children: Mapping[tuple[str, ...], set[str]],
          module_kind: Mapping[tuple[str, ...], str], gate: Mapping[str, Any] | None,
          transposed: bool) -> tuple[str, tuple[str, ...], tuple[str, ...],
                                     tuple[int, ...] | None, tuple[int, ...]]:
    param, ndim = leaf.path[-1], len(shape)
    if gate is not None and ndim in (1, 2):
        rows = "gates_out" if "gates" in gate else "out"
        if ndim == 2:
            return "recurrent", (rows, "in"), ("in", rows), (1, 0), ()
        return "recurrent", (rows,), (rows,), None, ()
    role = _attention_role(leaf, children)
    if param == "kernel" and ndim >= 2:
        return _kernel(leaf, ndim, role, transposed=transposed)
    if param == "bias" and role in ("query", "key", "value") and ndim == 2:
        return "attention", ("heads", "head_dim"), ("heads", "head_dim"), None, ()
    if param == "embedding" and ndim == 2:
        return "embedding", ("vocab", "dim"), ("vocab", "dim"), None, ()
    if _is_norm(leaf) and param in ("scale", "bias", "mean", "var"):
        layout = ("channel", *_generic(ndim)[1:])[:ndim]
        return "norm", layout, layout, None, ()
    if param == "bias" and ndim == 1:
        if leaf.path[:-1] in module_kind:
            return module_kind[leaf.path[:-1]], ("out",), ("out",), None, ()
        if "embedding" in children.get(leaf.path[:-1], set()):
            return "embedding", ("dim",), ("dim",), None, ()
    return "other", _generic(ndim), _generic(ndim), None, ()


def _torch_style(leaf: Leaf, name: str, shape: tuple[int, ...],
                 shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, tuple[str, ...],
                                                                tuple[int, ...]]:
    """(kind, layout, canonical shape) for PyTorch-layout leaves (Equinox, ``weight`` dicts)."""
    owner = leaf.owner or ""
    kind, layout = _naming.infer(name, shape, shapes)
    parent = (leaf.parent_owner or "").lower()
    if (owner in _EQX and kind == "other") or (owner in _EQX and _EQX[owner] != kind):
        mapped = _EQX[owner]
        if mapped == "conv":
            mapped = f"conv{max(len(shape) - 2, 1)}d"
        kind = mapped
    if "attention" in parent and owner == "Linear":
        kind = "attention"
    param = leaf.path[-1]
    if param == "bias" and len(shape) > 1 and all(d == 1 for d in shape[1:]):
        return kind, ("out",), shape[:1]  # Equinox conv bias [out, 1, 1]
    if param == "bias" and kind not in ("norm", "other", "embedding"):
        layout = ("out",) if len(shape) == 1 else layout
    if kind.startswith("conv") and param == "weight" and len(shape) >= 3:
        layout = ("out", "in", *_SPATIAL.get(len(shape) - 2, _generic(len(shape))[2:]))
    if kind == "norm" and len(shape) != len(layout):
        layout = ("channel", *_generic(len(shape))[1:])[: len(shape)]
    if len(layout) != len(shape):
        layout = _generic(len(shape))
    return kind, layout, shape


def _transposed(leaf: Leaf, shape: tuple[int, ...], bias: tuple[int, ...] | None,
                names: frozenset[str]) -> tuple[bool, bool]:
    """(transpose_kernel, known) of a ``ConvTranspose`` kernel: the module, the caller,
    the bias, else the default."""
    if isinstance(leaf.owner_attrs.get("transpose_kernel"), bool):
        return bool(leaf.owner_attrs["transpose_kernel"]), True
    if ".".join(leaf.path[:-1]) in names:
        return True, True
    if bias is not None and len(bias) == 1 and shape[-1] != shape[-2]:
        if bias[0] == shape[-2]:
            return True, True
        if bias[0] == shape[-1]:
            return False, True
    return False, False


def canonical(leaves: list[Leaf], shapes: list[tuple[int, ...]],
              transposed: frozenset[str] = frozenset()) -> list[LeafPlan]:
    """Plan the canonical record of each leaf (see the module docstring for the rules).

    Args:
        leaves: The tree's array leaves.
        shapes: Their shapes.
        transposed: Module names (``decoder.ConvTranspose_0``) of Linen ``ConvTranspose``
            layers built with ``transpose_kernel=True``, where the shapes cannot tell.

    Example:
        >>> leaf = Leaf(("Dense_0", "kernel"), None)
        >>> p = canonical([leaf], [(3, 2)])[0]
        >>> p.name, p.kind, p.layout, p.shape, p.source_layout
        ('Dense_0.kernel', 'linear', ('out', 'in'), (2, 3), ('in', 'out'))
    """
    children: dict[tuple[str, ...], set[str]] = {}
    owners: dict[tuple[str, ...], str] = {}
    for leaf in leaves:
        for i in range(len(leaf.path)):
            children.setdefault(leaf.path[:i], set()).add(leaf.path[i])
        if leaf.owner and len(leaf.path) > 1:
            owners[leaf.path[:-1]] = leaf.owner
        if leaf.parent_owner and len(leaf.path) > 2:
            owners[leaf.path[:-2]] = leaf.parent_owner
    cells: dict[tuple[str, ...], Cell] = find_cells(children, owners)
    dotted = {".".join(leaf.path): shape for leaf, shape in zip(leaves, shapes, strict=True)}
    by_path = {leaf.path: shape for leaf, shape in zip(leaves, shapes, strict=True)}
    module_kind: dict[tuple[str, ...], str] = {}
    for leaf, shape in zip(leaves, shapes, strict=True):
        if leaf.path and leaf.path[-1] == "kernel" and len(shape) >= 2:
            gated = gate_attrs(leaf.path, shape, cells) is not None
            module_kind[leaf.path[:-1]] = _kernel(leaf, len(shape),
                                                  _attention_role(leaf, children), gated)[0]
    out = []
    for leaf, shape in zip(leaves, shapes, strict=True):
        name = ".".join(leaf.path)
        source_name = "/".join(leaf.source_path)
        param = leaf.path[-1] if leaf.path else ""
        siblings = children.get(leaf.path[:-1], set())
        flax_like = leaf.convention == "flax" or (
            leaf.convention == "auto" and (param in _FLAX_PARAMS or param in ("mean", "var")
                                           or (param == "bias" and siblings & _FLAX_PARAMS)))
        attrs: dict[str, Any] = dict(leaf.owner_attrs)
        if leaf.collection:
            attrs["collection"] = leaf.collection
        if leaf.owner:
            attrs["module_type"] = leaf.owner
        if flax_like and leaf.convention != "torch":
            gate = gate_attrs(leaf.path, shape, cells) if leaf.collection in (
                None, "params") else None
            if gate is not None:
                attrs.update(gate)
            is_t, known = False, True
            if param == "kernel" and module_kind.get(leaf.path[:-1]) == "conv_transpose":
                is_t, known = _transposed(leaf, shape, by_path.get((*leaf.path[:-1], "bias")),
                                          transposed)
                attrs["transpose_kernel"] = is_t
                if not known:
                    attrs["transpose_kernel_known"] = False
            kind, layout, src, perm, flip = _flax(leaf, shape, children, module_kind, gate, is_t)
            if flip:
                attrs["flip"] = [src[i] for i in flip]
            canon = tuple(shape[i] for i in perm) if perm else shape
            out.append(LeafPlan(name, source_name, kind, layout, src,
                                perm if perm and perm != tuple(range(len(shape))) else None,
                                canon, shape, attrs, flip))
        else:
            kind, layout, canon = _torch_style(leaf, name, shape, dotted)
            out.append(LeafPlan(name, source_name, kind, layout, layout, None, canon, shape,
                                attrs))
    return out
