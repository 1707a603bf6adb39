"""The notebook view of a snapshot: an HTML table of its tensors (names escaped)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightatlas.storage._snapshot import Snapshot

__all__ = ["snapshot_html"]

_COLUMNS = ("name", "kind", "dtype", "shape", "mean", "std", "abs_max", "frac_zero", "n_nan",
            "n_inf")


def _cell(column: str, value: Any) -> str:
    if column == "shape":
        text = "×".join(map(str, value))
    elif value is None:
        text = ""
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return f"<td>{html.escape(text)}</td>"


def snapshot_html(snap: Snapshot, max_rows: int = 50) -> str:
    """HTML for Jupyter: a heading and the first ``max_rows`` tensors with statistics."""
    rows = snap.tensors().select(list(_COLUMNS)).slice(0, max_rows).to_pylist()
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(_cell(c, r[c]) for c in _COLUMNS) + "</tr>" for r in rows)
    meta = snap.metadata
    more = f"<p>… {len(snap) - max_rows} more tensors</p>" if len(snap) > max_rows else ""
    return (f"<p><b>{html.escape(snap.ref)}</b>: {meta['n_tensors']} tensors, "
            f"{meta['n_params']:,} values, {html.escape(str(meta['framework']))} from "
            f"{html.escape(str(meta['source_file']))}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")
