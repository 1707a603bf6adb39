"""Flax recurrent cells: which modules are cells, and which gate each tensor holds.

Flax keeps recurrent weights in two ways:

- **one Dense per gate and input** (Linen ``LSTMCell``, ``OptimizedLSTMCell``,
  ``GRUCell``, ``MGUCell``, ``SimpleCell``; NNX ``LSTMCell``): the children are named
  by the input they read (``i`` the input, ``h`` the hidden state) and the gate letter:
  ``ii if ig io hi hf hg ho`` (LSTM; NNX writes ``if_``, ``if`` being a keyword),
  ``ir iz in hr hz hn`` (GRU), ``if in hf hn`` (MGU), ``i h`` (simple RNN). A cell is
  recognised by this set of children, whatever the cell module is called (``nn.RNN``
  names it ``cell``). Each gate kernel ``[in, hidden]`` becomes an ``[out, in]`` record
  of kind ``recurrent`` with ``attrs`` ``cell``, ``gate``, ``from`` (``input`` or
  ``hidden``) and ``hidden_size``, which is how the comparison lines a gate up with the
  rows of PyTorch's stacked ``weight_ih``/``weight_hh``.
- **gates fused on the output axis** (NNX ``OptimizedLSTMCell`` ``i f g o``, ``GRUCell``
  ``r z n``, ``SimpleCell``): ``dense_i`` ``[in, k*hidden]`` and ``dense_h``
  ``[hidden, k*hidden]``. They are kept whole like PyTorch's (canonical
  ``[gates_out, in]``), with ``attrs`` ``cell``, ``gates`` (the order), ``gate_axis`` 0,
  ``from`` and ``hidden_size``.

Gate orders are the ones Flax computes with: LSTM ``i f g o`` (PyTorch's order too),
GRU ``r z n`` (PyTorch's too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Cell", "find_cells", "gate_attrs"]

#: Children of a per-gate cell -> (cell, gate order).
_PER_GATE = {
    frozenset({"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}): ("lstm", ("i", "f", "g", "o")),
    frozenset({"ir", "iz", "in", "hr", "hz", "hn"}): ("gru", ("r", "z", "n")),
    frozenset({"if", "in", "hf", "hn"}): ("mgu", ("f", "n")),
    frozenset({"i", "h"}): ("rnn", ("h",)),
}
#: NNX cells whose gates are fused into ``dense_i``/``dense_h``.
_FUSED = {"OptimizedLSTMCell": ("lstm", ("i", "f", "g", "o")), "GRUCell": ("gru", ("r", "z", "n")),
          "SimpleCell": ("rnn", ("h",))}
_FUSED_CHILDREN = {"dense_i": "input", "dense_h": "hidden"}
_CELL_WORDS = ("cell", "rnn", "lstm", "gru", "recurrent")


@dataclass(frozen=True)
class Cell:
    """A recurrent cell found in a tree."""

    cell: str  #: ``lstm``, ``gru``, ``mgu`` or ``rnn``
    gates: tuple[str, ...]  #: gate order
    fused: bool  #: gates side by side in ``dense_i``/``dense_h`` (NNX)


def _child(name: str) -> str:
    return name.removesuffix("_")  # NNX: ``if_``


def find_cells(children: Mapping[tuple[str, ...], set[str]],
               owners: Mapping[tuple[str, ...], str]) -> dict[tuple[str, ...], Cell]:
    """The recurrent cells of a tree, by module path.

    Args:
        children: Module path -> names of its children (modules and tensors).
        owners: Module path -> class name, where known (NNX).

    Example:
        >>> gates = ("ir", "iz", "in", "hr", "hz", "hn")
        >>> kids = {("cell",): set(gates), **{("cell", g): {"kernel"} for g in gates}}
        >>> find_cells(kids, {})[("cell",)]
        Cell(cell='gru', gates=('r', 'z', 'n'), fused=False)
    """
    out: dict[tuple[str, ...], Cell] = {}
    for path, names in children.items():
        owner = owners.get(path, "")
        if owner in _FUSED and set(_FUSED_CHILDREN) & names:
            cell, gates = _FUSED[owner]
            out[path] = Cell(cell, gates, True)
            continue
        key = frozenset(_child(n) for n in names)
        if key not in _PER_GATE or len(key) != len(names):
            continue
        if not all("kernel" in children.get((*path, n), set()) for n in names):
            continue
        if key == frozenset({"i", "h"}) and not (
                "Cell" in owner or any(w in ".".join(path).lower() for w in _CELL_WORDS)):
            continue  # two Dense layers called i and h are not necessarily a cell
        cell, gates = _PER_GATE[key]
        out[path] = Cell(cell, gates, False)
    return out


def gate_attrs(path: tuple[str, ...], source_shape: tuple[int, ...],
               cells: Mapping[tuple[str, ...], Cell]) -> dict[str, Any] | None:
    """The ``attrs`` of a gate ``kernel`` or ``bias`` at ``path``; None if it is not one.

    Example:
        >>> cells = {("rnn", "cell"): Cell("lstm", ("i", "f", "g", "o"), False)}
        >>> gate_attrs(("rnn", "cell", "hf", "kernel"), (8, 8), cells)
        {'cell': 'lstm', 'gate': 'f', 'from': 'hidden', 'hidden_size': 8}
    """
    if len(path) < 3 or path[-1] not in ("kernel", "bias") or not source_shape:
        return None
    cell = cells.get(path[:-2])
    if cell is None:
        return None
    child, out_size = _child(path[-2]), int(source_shape[-1])
    if cell.fused:
        source = _FUSED_CHILDREN.get(child)
        if source is None or out_size % len(cell.gates):
            return None
        return {"cell": cell.cell, "gates": list(cell.gates), "gate_axis": 0, "from": source,
                "hidden_size": out_size // len(cell.gates)}
    source, gate = ("input" if child[0] == "i" else "hidden"), child[1:] or "h"
    return {"cell": cell.cell, "gate": gate, "from": source, "hidden_size": out_size}
