"""PyTorch tensors into the canonical form: kinds, layouts, fused attention split, gates.

Both the live-module reader and the checkpoint reader describe each tensor as a
:class:`Entry` (its state-dict name, shape, dtype, a loader, and what is known of the
module that owns it); :func:`plan` turns those into :class:`Planned` records.

Decisions, the same for every PyTorch source:

- **Kind** comes from the owning module's class when it is known (a live module, a
  TorchScript archive): ``Linear`` -> ``linear``, ``ConvNd`` -> ``convNd``,
  ``ConvTransposeNd`` -> ``conv_transpose``, ``Embedding`` -> ``embedding``, every
  norm -> ``norm``, ``LSTM``/``GRU``/``RNN`` and their cells -> ``recurrent``, anything
  inside ``MultiheadAttention`` -> ``attention``. A bare state dict falls back to the
  name rules of :mod:`weightatlas.adapters._naming`.
- **MultiheadAttention's fused projection is split**: ``in_proj_weight`` ``[3E, E]``
  becomes ``q_proj.weight``, ``k_proj.weight`` and ``v_proj.weight`` (``[E, E]`` each,
  views of the original rows), ``in_proj_bias`` becomes ``q_proj.bias``...; separate
  ``q_proj_weight``... (``kdim != embed_dim``) are renamed to ``q_proj.weight``... The
  source name and ``attrs["fused"] = {"name", "parts", "index", "axis", "sizes"}`` say
  where each part came from, so the original tensor is rebuilt exactly by
  :func:`weightatlas.adapters.torch.to_state_dict`.
- **Recurrent layers are not split**: ``weight_ih_l0`` ``[4H, in]`` stays one tensor (the
  source layout, gates stacked on axis 0) and ``attrs`` records the gate order
  (``["i", "f", "g", "o"]`` for LSTM, ``["r", "z", "n"]`` for GRU, ``["h"]`` for RNN),
  ``gate_axis`` 0, ``hidden_size``, ``layer`` and ``direction``; a consumer takes gate
  ``g`` as rows ``[g*H, (g+1)*H)``. Keeping the tensor whole keeps it byte-identical to
  the state dict (its content hash matches a safetensors copy) and the comparison
  aligns it with per-gate tensors of another framework from these attrs.
- **Tied tensors** (one storage under two names, e.g. an LM head tied to the
  embedding) are both kept; the second has ``attrs["tied_to"]`` naming the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightatlas.adapters import _naming
from weightatlas.errors import FormatError

__all__ = ["Entry", "Planned", "kind_of_module", "plan"]

_LINEAR = {"Linear", "LazyLinear", "NonDynamicallyQuantizableLinear"}
_CONV = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3, "LazyConv1d": 1, "LazyConv2d": 2,
         "LazyConv3d": 3}
_CONV_T = {"ConvTranspose1d": 1, "ConvTranspose2d": 2, "ConvTranspose3d": 3,
           "LazyConvTranspose1d": 1, "LazyConvTranspose2d": 2, "LazyConvTranspose3d": 3}
_NORM = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
         "LazyBatchNorm2d", "LazyBatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
         "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm"}
_EMBED = {"Embedding", "EmbeddingBag"}
_RECURRENT = {"LSTM": ("lstm", ["i", "f", "g", "o"]), "GRU": ("gru", ["r", "z", "n"]),
              "RNN": ("rnn", ["h"]), "LSTMCell": ("lstm", ["i", "f", "g", "o"]),
              "GRUCell": ("gru", ["r", "z", "n"]), "RNNCell": ("rnn", ["h"])}
_GATES_BY_COUNT = {4: ("lstm", ["i", "f", "g", "o"]), 3: ("gru", ["r", "z", "n"]),
                   1: ("rnn", ["h"])}
_KNOWN = _LINEAR | set(_CONV) | set(_CONV_T) | _NORM | _EMBED | set(_RECURRENT) | {
    "MultiheadAttention", "Bilinear", "PReLU"}
_RECURRENT_PARAM = re.compile(r"(weight|bias)_(ih|hh|hr)(?:_l(\d+))?(_reverse)?")
_SPATIAL = {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}
_QKV = ("q", "k", "v")


def kind_of_module(class_names: list[str]) -> str | None:
    """The first class name (in MRO order) weightatlas knows, e.g. ``Conv2d``.

    Example:
        >>> kind_of_module(["MyConv", "Conv2d", "_ConvNd", "Module"])
        'Conv2d'
    """
    for name in class_names:
        if name in _KNOWN:
            return name
    return None


@dataclass
class Entry:
    """One tensor of a PyTorch source, as read, before canonicalisation."""

    name: str  #: state-dict name
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  #: the values in the source layout (a view when possible)
    module_type: str | None = None  #: owning module's class (see :func:`kind_of_module`)
    parent_type: str | None = None  #: the owner's parent's class (``out_proj`` in an MHA)
    module_attrs: dict[str, Any] = field(default_factory=dict)
    storage: tuple[Any, ...] | None = None  #: identity of the bytes, to spot tied tensors


@dataclass
class Planned:
    """A canonical record, ready to be loaded into a ``TensorRecord``."""

    name: str
    source_name: str
    kind: str
    layout: tuple[str, ...]
    source_layout: tuple[str, ...]
    source_shape: tuple[int, ...]
    attrs: dict[str, Any]
    load: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    storage: Any = None  #: the source's storage identity (to release pages after use)


def _generic(ndim: int) -> tuple[str, ...]:
    return tuple(f"d{i}" for i in range(ndim))


def _vector(ndim: int, first: str) -> tuple[str, ...]:
    return (first, *(f"d{i}" for i in range(1, ndim)))[:ndim]


def _by_type(e: Entry, param: str) -> tuple[str, tuple[str, ...]] | None:
    t, ndim = e.module_type, len(e.shape)
    if t is None:
        return None
    if e.parent_type == "MultiheadAttention" and t in _LINEAR:
        return "attention", ("out", "in")[:ndim] if ndim <= 2 else _generic(ndim)
    if t in _LINEAR and param in ("weight", "bias") and ndim <= 2:
        return "linear", ("out", "in")[:ndim] if param == "weight" else ("out",)
    if t in _CONV and param in ("weight", "bias"):
        n = _CONV[t]
        if param == "bias" or ndim != n + 2:
            return f"conv{n}d", _vector(ndim, "out")
        return f"conv{n}d", ("out", "in", *_SPATIAL[n])
    if t in _CONV_T and param in ("weight", "bias"):
        n = _CONV_T[t]
        if param == "bias" or ndim != n + 2:
            return "conv_transpose", _vector(ndim, "out")
        return "conv_transpose", ("in", "out", *_SPATIAL[n])
    if t in _EMBED and param == "weight" and ndim == 2:
        return "embedding", ("vocab", "dim")
    if t in _NORM:
        return "norm", _vector(ndim, "channel")
    if t == "Bilinear":
        return "linear", ("out", "in", "in2")[:ndim] if param == "weight" else _vector(ndim, "out")
    if t == "PReLU":
        return "other", _vector(ndim, "channel")
    if t == "MultiheadAttention":
        return "attention", ("out", "in")[:ndim] if ndim <= 2 else _generic(ndim)
    if t in _RECURRENT:
        return _naming.infer(e.name, e.shape)
    return None


def _recurrent_attrs(e: Entry, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    module, param = _naming.split(e.name)
    m = _RECURRENT_PARAM.fullmatch(param)
    if m is None or m.group(2) == "hr" or not e.shape:
        return {}
    layer, reverse = m.group(3), m.group(4)
    suffix = (f"_l{layer}" if layer is not None else "") + (reverse or "")
    prefix = f"{module}." if module else ""
    hidden = e.module_attrs.get("hidden_size")
    if e.module_type in _RECURRENT:
        cell, gates = _RECURRENT[e.module_type]
    else:
        hr = shapes.get(f"{prefix}weight_hr{suffix}")
        hh = shapes.get(f"{prefix}weight_hh{suffix}")
        hidden = hr[1] if hr is not None and len(hr) == 2 else (
            hh[1] if hh is not None and len(hh) == 2 else None)
        if not hidden or e.shape[0] % hidden or e.shape[0] // hidden not in _GATES_BY_COUNT:
            return {}
        cell, gates = _GATES_BY_COUNT[e.shape[0] // hidden]
    attrs: dict[str, Any] = {"cell": cell, "gates": gates, "gate_axis": 0}
    if hidden:
        attrs["hidden_size"] = int(hidden)
    if layer is not None:
        attrs["layer"] = int(layer)
    attrs["direction"] = "reverse" if reverse else "forward"
    return attrs


def _split(e: Entry, kind: str, base: dict[str, Any]) -> list[Planned] | None:
    """MultiheadAttention's fused or separate q/k/v projections, in the canonical form."""
    module, param = _naming.split(e.name)
    prefix = f"{module}." if module else ""
    mha = e.module_type == "MultiheadAttention" or e.module_type is None
    if not mha:
        return None
    sep = {"q_proj_weight": "q", "k_proj_weight": "k", "v_proj_weight": "v"}
    if param in sep and len(e.shape) == 2:
        name = f"{prefix}{sep[param]}_proj.weight"
        return [Planned(name, e.name, "attention", ("out", "in"), ("out", "in"), e.shape,
                        dict(base), e.load, e.shape, e.storage)]
    if param not in ("in_proj_weight", "in_proj_bias") or len(e.shape) not in (1, 2):
        return None
    rows = e.shape[0]
    if rows % 3:
        return None
    size = rows // 3
    leaf = "weight" if param == "in_proj_weight" else "bias"
    layout = ("out", "in")[: len(e.shape)]
    parts = []
    for i, part in enumerate(_QKV):
        attrs = dict(base)
        attrs["fused"] = {"name": e.name, "parts": list(_QKV), "index": i, "axis": 0,
                          "sizes": [size] * 3}
        shape = (size, *e.shape[1:])

        def load(e: Entry = e, lo: int = i * size, hi: int = (i + 1) * size) -> np.ndarray:
            return e.load()[lo:hi]

        parts.append(Planned(f"{prefix}{part}_proj.{leaf}", e.name, kind, layout, layout,
                             shape, attrs, load, shape, e.storage))
    return parts


def plan(entries: list[Entry]) -> list[Planned]:
    """Canonical records for PyTorch tensors, in their order (see the module docstring).

    Example:
        >>> w = np.arange(12.0).reshape(6, 2)
        >>> p = plan([Entry("attn.in_proj_weight", (6, 2), lambda: w)])
        >>> [(r.name, r.shape, r.attrs["fused"]["index"]) for r in p]
        [('attn.q_proj.weight', (2, 2), 0), ('attn.k_proj.weight', (2, 2), 1), \
('attn.v_proj.weight', (2, 2), 2)]
    """
    shapes = {e.name: e.shape for e in entries}
    first_of: dict[tuple[Any, ...], str] = {}
    out: list[Planned] = []
    for e in entries:
        _, param = _naming.split(e.name)
        typed = _by_type(e, param)
        kind, layout = typed if typed is not None else _naming.infer(e.name, e.shape, shapes)
        attrs: dict[str, Any] = {}
        if kind == "recurrent":
            attrs.update(_recurrent_attrs(e, shapes))
        for key in ("groups", "num_heads", "padding_idx"):
            if key in e.module_attrs and e.module_attrs[key] is not None:
                attrs[key] = e.module_attrs[key]
        if e.module_type is not None:
            attrs["module_type"] = e.module_type
        if e.storage is not None:
            if e.storage in first_of:
                attrs["tied_to"] = first_of[e.storage]
            else:
                first_of[e.storage] = e.name
        split = _split(e, kind, attrs) if kind == "attention" else None
        if split is not None:
            out.extend(split)
            continue
        out.append(Planned(e.name, e.name, kind, layout, layout, e.shape, attrs, e.load,
                           e.shape, e.storage))
    seen: dict[str, str] = {}
    for p in out:
        if p.name in seen:
            raise FormatError(f"tensor {p.source_name!r} becomes {p.name!r}, a name "
                              f"{seen[p.name]!r} already has")
        seen[p.name] = p.source_name
    return out
