"""Guess a tensor's kind and canonical axis names from its dotted name and shape.

Used when a file says nothing but names and shapes (safetensors, a bare state dict).
The rules follow PyTorch's ``state_dict`` conventions, which is what nearly every
safetensors file holds. They are applied in order, first match wins; ``module`` is
the name without its last dotted component and ``param`` is that component:

1. **Recurrent**: ``param`` is ``weight_ih_l0``, ``weight_hh_l1_reverse``,
   ``bias_ih``, ``weight_hr_l0``... (``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their
   cells): kind ``recurrent``, layout ``(gates_out, in)`` or ``(gates_out,)``
   (``weight_hr``, the LSTM projection, is ``(out, in)``).
2. **Norm** (rank 0 or 1): ``param`` is ``running_mean``, ``running_var`` or
   ``num_batches_tracked``, or a component of ``module`` says norm (``norm``,
   ``layernorm``, ``batchnorm``, ``ln_f``, ``ln_1``, ``bn1``, ``attn_ln``...): kind
   ``norm``, layout ``(channel,)``, or ``()`` for a scalar.
3. **Attention projections**: ``param`` is ``in_proj_weight``/``in_proj_bias`` or
   ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (``nn.MultiheadAttention``):
   kind ``attention``, layout ``(out, in)`` or ``(out,)``.
4. **Bias** (rank 1, ``param == "bias"``): the kind of the sibling ``module.weight``
   when ``siblings`` knows it (layout ``(out,)``; ``(channel,)`` for a norm,
   ``(dim,)`` for an embedding); without a sibling, ``attention`` if the module name
   says so, else ``other``.
5. **Weight** (``param == "weight"`` or ends in ``_weight``), by rank: 1 -> ``norm``
   ``(channel,)`` (linear and conv weights are never 1-d; a PReLU slope lands here
   too); 3/4/5 -> ``conv1d`` ``(out, in, w)``, ``conv2d`` ``(out, in, h, w)``,
   ``conv3d`` ``(out, in, d, h, w)``, or ``conv_transpose`` ``(in, out, *spatial)``
   when the module says ``deconv``/``conv_transpose``/``upconv``; 2 -> ``embedding``
   ``(vocab, dim)`` when the module says ``embed``, ``embeddings``, ``wte``,
   ``wpe``, ``shared``..., ``attention`` ``(out, in)`` when it says ``attn``,
   ``attention``, ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``qkv`` (or is the
   ``out_proj`` next to an ``in_proj_weight``), else ``linear`` ``(out, in)``
   (``lm_head`` stays linear).
6. A rank-2 ``param`` whose own name says ``embed`` (``positional_embedding``) ->
   ``embedding`` ``(vocab, dim)``.
7. Anything else: ``other``, layout ``(d0, d1, ...)``.

Names are guesses: GPT-2's ``Conv1D`` stores ``[in, out]`` under names that look like
any linear layer, and nothing in the name tells them apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from weightatlas.storage import split_name

__all__ = ["infer", "is_norm_module", "split"]

Shape = tuple[int, ...]

_RECURRENT = re.compile(r"(weight|bias)_(ih|hh|hr)(_l\d+)?(_reverse)?")
_NORM_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_NORM_ABBREV = re.compile(r"(ln|bn|gn)\d*")
_ATTN_PARAMS = frozenset(
    {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
)
_ATTN_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "qkv_proj", "mha"})
_EMBED_PARTS = frozenset({"wte", "wpe", "shared"})
_TRANSPOSE_HINTS = ("deconv", "conv_transpose", "convtranspose", "upconv")
_CONV_KINDS = {3: "conv1d", 4: "conv2d", 5: "conv3d"}
_SPATIAL = {3: ("w",), 4: ("h", "w"), 5: ("d", "h", "w")}


def split(name: str) -> tuple[str, str]:
    """Split a dotted tensor name into ``(module, param)``.

    Example:
        >>> split("encoder.layers.0.self_attn.in_proj_weight")
        ('encoder.layers.0.self_attn', 'in_proj_weight')
    """
    return split_name(name)


def _parts(module: str) -> list[str]:
    return [p.lower() for p in module.split(".") if p]


def is_norm_module(module: str) -> bool:
    """Whether a module path names a normalization layer.

    Example:
        >>> is_norm_module("transformer.h.0.ln_1"), is_norm_module("layer1.0.conv1")
        (True, False)
    """
    for part in _parts(module):
        if "norm" in part:
            return True
        if any(_NORM_ABBREV.fullmatch(word) for word in part.split("_")):
            return True
    return False


def _is_attention_module(module: str, siblings: Mapping[str, Shape] | None) -> bool:
    parts = _parts(module)
    if any(p in _ATTN_PARTS or "attn" in p or "attention" in p for p in parts):
        return True
    if parts and parts[-1] == "out_proj" and siblings is not None:
        parent = module.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        return any(f"{prefix}{p}" in siblings for p in ("in_proj_weight", "q_proj_weight"))
    return False


def _is_embedding_module(module: str) -> bool:
    return any("embed" in p or p in _EMBED_PARTS for p in _parts(module))


def _other(ndim: int) -> tuple[str, tuple[str, ...]]:
    return "other", tuple(f"d{i}" for i in range(ndim))


def _weight(
    module: str, ndim: int, siblings: Mapping[str, Shape] | None
) -> tuple[str, tuple[str, ...]]:
    if ndim == 1:
        return "norm", ("channel",)
    if ndim in _CONV_KINDS:
        low = module.lower()
        if any(hint in low for hint in _TRANSPOSE_HINTS):
            return "conv_transpose", ("in", "out", *_SPATIAL[ndim])
        return _CONV_KINDS[ndim], ("out", "in", *_SPATIAL[ndim])
    if ndim == 2:
        if _is_embedding_module(module):
            return "embedding", ("vocab", "dim")
        if _is_attention_module(module, siblings):
            return "attention", ("out", "in")
        return "linear", ("out", "in")
    return _other(ndim)


def _bias(module: str, siblings: Mapping[str, Shape] | None) -> tuple[str, tuple[str, ...]]:
    weight = f"{module}.weight" if module else "weight"
    if siblings is not None and weight in siblings:
        kind, _ = infer(weight, siblings[weight], siblings)
        if kind == "norm":
            return kind, ("channel",)
        if kind == "embedding":
            return kind, ("dim",)
        if kind != "other":
            return kind, ("out",)
        return _other(1)
    if _is_attention_module(module, siblings):
        return "attention", ("out",)
    return _other(1)


def infer(
    name: str, shape: Shape | list[int], siblings: Mapping[str, Shape] | None = None
) -> tuple[str, tuple[str, ...]]:
    """Guess ``(kind, layout)`` for a PyTorch-style tensor name and shape.

    Args:
        name: Dotted tensor name, e.g. ``layer1.0.conv1.weight``.
        shape: The tensor's shape; only its rank matters to the rules.
        siblings: Every tensor of the same file, name to shape, so that a bias can take
            its weight's kind and ``out_proj`` can find its ``in_proj_weight``.

    Returns:
        A kind from :data:`weightatlas.storage._record.KINDS` and one axis name per
        dimension (see the module docstring for the rules).

    Example:
        >>> infer("features.0.weight", (64, 3, 7, 7))
        ('conv2d', ('out', 'in', 'h', 'w'))
        >>> infer("fc.bias", (10,), {"fc.weight": (10, 512), "fc.bias": (10,)})
        ('linear', ('out',))
        >>> infer("bn1.num_batches_tracked", ())
        ('norm', ())
    """
    module, param = split(name)
    ndim = len(shape)
    low = param.lower()
    match = _RECURRENT.fullmatch(low)
    if match and ndim in (1, 2):
        rows = "out" if match.group(2) == "hr" else "gates_out"
        return "recurrent", (rows, "in")[:ndim]
    if ndim <= 1 and (low in _NORM_STATS or is_norm_module(module)):
        return "norm", ("channel",)[:ndim]
    if low in _ATTN_PARAMS and ndim in (1, 2):
        return "attention", ("out", "in")[:ndim]
    if ndim == 1 and low == "bias":
        return _bias(module, siblings)
    if low == "weight" or low.endswith("_weight"):
        return _weight(module, ndim, siblings)
    if ndim == 2 and "embed" in low:
        return "embedding", ("vocab", "dim")
    return _other(ndim)
