"""Pairs of tensors of two snapshots: the default alignment by name, and the per-pair numbers
(relative L2 difference, cosine, largest change) behind the agreement chart.

An *alignment* is an Arrow table with columns ``a_name``, ``b_name``, ``method`` and
``confidence`` (``a`` and ``b`` are accepted for the names, as in the pairs table of
``weightatlas.core.compare``). An alignment's ``transform`` column (a transposition between
layouts) is not applied here: pairs are compared as stored, and a pair whose shapes differ is
reported, not compared.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from weightatlas.errors import FormatError
from weightatlas.storage import Snapshot
from weightatlas.viz._reduce import pair_stats

__all__ = ["ALIGNMENT_COLUMNS", "align_by_name", "check_alignment", "compare", "normalize"]

#: Columns of an alignment table.
ALIGNMENT_COLUMNS = ("a_name", "b_name", "method", "confidence")


def align_by_name(a: Snapshot, b: Snapshot) -> pa.Table:
    """The default alignment: every tensor name present in both snapshots, in A's order.

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.ones(3, np.float32)
        >>> a = store.write(RecordsSource([TensorRecord("x", w)]), "m", step=1)
        >>> b = store.write(RecordsSource([TensorRecord("x", w * 2)]), "m", step=2)
        >>> align_by_name(a, b).to_pylist()
        [{'a_name': 'x', 'b_name': 'x', 'method': 'name', 'confidence': 1.0}]
    """
    names = [n for n in a.names if n in b]
    return pa.table({"a_name": pa.array(names, pa.string()), "b_name": pa.array(names, pa.string()),
                     "method": pa.array(["name"] * len(names), pa.string()),
                     "confidence": pa.array([1.0] * len(names), pa.float64())})


def normalize(table: pa.Table) -> pa.Table:
    """The table with ``a``/``b`` columns renamed ``a_name``/``b_name``."""
    names = table.column_names
    if "a_name" not in names and "b_name" not in names and "a" in names and "b" in names:
        table = table.rename_columns(["a_name" if c == "a" else "b_name" if c == "b" else c
                                      for c in names])
    return table


def check_alignment(alignment: pa.Table) -> list[dict[str, Any]]:
    """The alignment's pairs as dicts, after checking its columns.

    Raises:
        FormatError: A column is missing.
    """
    alignment = normalize(alignment)
    missing = [c for c in ALIGNMENT_COLUMNS if c not in alignment.column_names]
    if missing:
        raise FormatError(f"alignment table lacks column(s) {', '.join(missing)}; expected "
                          f"{', '.join(ALIGNMENT_COLUMNS)}")
    return alignment.select(list(ALIGNMENT_COLUMNS)).to_pylist()


def compare(a: Snapshot, b: Snapshot, alignment: pa.Table | None = None) -> pa.Table:
    """Per-pair agreement of two snapshots: relative L2 difference, cosine, max |b - a|.

    Args:
        a: Snapshot A (the reference).
        b: Snapshot B.
        alignment: Pairs to compare (default: :func:`align_by_name`).

    Returns:
        One row per aligned pair, in the alignment's order: the alignment's columns, then
        ``numel``, ``rel_l2`` (``||b-a|| / ||a||``), ``cosine``, ``max_abs_diff``,
        ``n_nonfinite`` and ``status`` (``ok``, or why a pair was not compared).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> a = store.write(RecordsSource([TensorRecord("x", np.array([3., 0.]))]), "m", step=1)
        >>> b = store.write(RecordsSource([TensorRecord("x", np.array([3., 4.]))]), "m", step=2)
        >>> row = compare(a, b).to_pylist()[0]
        >>> round(row["rel_l2"], 4), round(row["cosine"], 4), row["status"]
        (1.3333, 0.6, 'ok')
    """
    pairs = check_alignment(alignment if alignment is not None else align_by_name(a, b))
    out: dict[str, list[Any]] = {k: [] for k in (*ALIGNMENT_COLUMNS, "numel", "rel_l2", "cosine",
                                                 "max_abs_diff", "n_nonfinite", "status")}
    for p in pairs:
        for k in ALIGNMENT_COLUMNS:
            out[k].append(p[k])
        stats: dict[str, Any] = dict.fromkeys(("numel", "rel_l2", "cosine", "max_abs_diff",
                                              "n_nonfinite"))
        if p["a_name"] not in a or p["b_name"] not in b:
            where = "A" if p["a_name"] not in a else "B"
            status = f"missing in {where}"
        else:
            x, y = a.read(p["a_name"]), b.read(p["b_name"])
            if x.shape != y.shape:
                status = f"shape {list(x.shape)} vs {list(y.shape)}"
            else:
                s = pair_stats(x, y, (p["a_name"], p["b_name"]))
                stats = {"numel": s.numel, "rel_l2": _finite(s.rel_l2),
                         "cosine": _finite(s.cosine), "max_abs_diff": _finite(s.max_abs_diff),
                         "n_nonfinite": s.n_nonfinite}
                status = "ok"
        for k, v in stats.items():
            out[k].append(v)
        out["status"].append(status)
    types = {"a_name": pa.string(), "b_name": pa.string(), "method": pa.string(),
             "confidence": pa.float64(), "numel": pa.int64(), "rel_l2": pa.float64(),
             "cosine": pa.float64(), "max_abs_diff": pa.float64(), "n_nonfinite": pa.int64(),
             "status": pa.string()}
    return pa.table({k: pa.array(v, types[k]) for k, v in out.items()})


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
