"""Helpers for the viz tests (no tests here): data columns, header lines, rendered marks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

DISTILL = ["#0571B0", "#92C5DE", "#F7F7F7", "#F4A582", "#CA0020"]
HOSTILE = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", '"}]}',
           "a\u2028b\u2029c", "datum.x&&alert(3)", "'); alert('x"]


def nodes(spec: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) in a spec, depth first."""
    yield path, spec
    if isinstance(spec, dict):
        for k, v in spec.items():
            yield from nodes(v, (*path, k))
    elif isinstance(spec, list):
        for i, v in enumerate(spec):
            yield from nodes(v, (*path, str(i)))


def dataset(spec: dict[str, Any], node: dict[str, Any]) -> Any:
    """The parsed values of a node's data (inline, or a named top-level dataset)."""
    data = node["data"]
    values = data["values"] if "values" in data else spec["datasets"][data["name"]]
    return json.loads(values) if isinstance(values, str) else values


def columns(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, list[Any]]:
    """The columns of a node's columnar data (``[{"col": [...]}]``)."""
    rows = dataset(spec, node)
    assert isinstance(rows, list) and len(rows) == 1
    return rows[0]


def layers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every unit spec (one with a mark) in a composed spec."""
    return [v for _, v in nodes(spec) if isinstance(v, dict) and "mark" in v]


def mark_type(node: dict[str, Any]) -> str:
    mark = node["mark"]
    return mark["type"] if isinstance(mark, dict) else mark


def main(spec: dict[str, Any], mark: str = "rect") -> dict[str, Any]:
    """The one unit spec with this mark that is not a header line."""
    found = [n for n in layers(spec) if mark_type(n) == mark]
    assert len(found) == 1, [mark_type(n) for n in layers(spec)]
    return found[0]


def header(spec: dict[str, Any]) -> list[str]:
    """The header lines drawn above a chart, top to bottom."""
    texts = [n for n in layers(spec) if mark_type(n) == "text" and "data" in n]
    return [line for n in texts for line in columns(spec, n)["text"][0]]


def meta(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["usermeta"]["weightatlas"]


def strings_outside_data(spec: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Every string of a spec that is not data (``data.values`` or a named dataset)."""
    out = []
    for path, v in nodes(spec):
        if not isinstance(v, str):
            continue
        if "datasets" in path[:1] or "values" in path:
            continue
        out.append((path, v))
    return out


def rendered_marks(spec: dict[str, Any], marktype: str) -> list[dict[str, Any]]:
    """Items of the rendered marks of one type (vl-convert's scenegraph), headers excluded."""
    import vl_convert as vlc

    from weightatlas.viz._export import _vl_version

    graph = vlc.vegalite_to_scenegraph(spec, vl_version=_vl_version())
    items = []
    for _, v in nodes(graph):
        if isinstance(v, dict) and v.get("marktype") == marktype and v.get("role") == "mark":
            items.extend(v.get("items", []))
    return items


def rgb(color: str) -> tuple[int, int, int]:
    """``#ca0020`` or ``rgb(202, 0, 32)`` as a tuple."""
    if color.startswith("#"):
        return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    return tuple(int(p) for p in color[4:-1].split(","))  # type: ignore[return-value]


def distill_rgb(value: float, m: float) -> tuple[int, int, int]:
    """The Distill colour of a value on [-m, m]: linear RGB between the five stops, clamped."""
    t = min(1.0, max(-1.0, value / m))
    stops = np.array([rgb(c) for c in DISTILL], float)
    pos = (t + 1) * 2  # 0..4
    i = min(3, int(np.floor(pos)))
    frac = pos - i
    c = stops[i] * (1 - frac) + stops[i + 1] * frac
    return tuple(round(float(x)) for x in c)  # type: ignore[return-value]
