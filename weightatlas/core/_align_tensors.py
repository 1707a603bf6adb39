"""The aligner's view of a snapshot: tensors without bytes, matches, the working state.

:func:`describe` reads a snapshot's small columns only (names, kinds, dtypes, shapes,
layouts, checksums, norms) into :class:`Tensor` records; every alignment stage works on
them and records :class:`Match` es in a :class:`State` that tracks what each side has
left unmatched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from weightatlas.core._align_names import Transform, family, role, tokens
from weightatlas.storage import Snapshot

__all__ = ["Alignment", "Match", "State", "Tensor", "describe"]


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


class State:
    """Both sides' tensors by name, what is still free on each, the matches so far."""

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
