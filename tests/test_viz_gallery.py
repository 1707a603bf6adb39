"""docs/gallery.md is what the code draws: same prose and code, same specs (numbers to 1e-9;
regenerate with ``python -m weightatlas.viz._gallery docs/gallery.md``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import weightatlas.viz as viz
from weightatlas.viz._gallery import EXAMPLES, build_gallery

GALLERY = Path(__file__).resolve().parent.parent / "docs" / "gallery.md"
FENCE = re.compile(r"```vegalite\n(.*?)\n```", re.S)


def normalized(spec: dict[str, Any]) -> Any:
    """The spec with named datasets inlined and JSON data texts parsed (their names are
    hashes of the data, which may differ in the last digit across machines)."""
    datasets = spec.get("datasets", {})

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            out = {k: walk(x) for k, x in v.items() if k != "datasets"}
            if isinstance(v.get("name"), str) and v["name"] in datasets:
                out = {k: x for k, x in out.items() if k != "name"}
                out["values"] = walk(datasets[v["name"]])
            return out
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and v.startswith("[{"):
            return walk(json.loads(v))
        return v

    return walk(spec)


def assert_close(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), path
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (path, sorted(a), sorted(b))
        for k in a:
            assert_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def test_gallery_is_up_to_date():
    text, specs = build_gallery()
    committed = GALLERY.read_text(encoding="utf-8")
    assert FENCE.sub("SPEC", committed) == FENCE.sub("SPEC", text), \
        "docs/gallery.md is stale: python -m weightatlas.viz._gallery docs/gallery.md"
    saved = [json.loads(m) for m in FENCE.findall(committed)]
    assert len(saved) == len(specs) == len(EXAMPLES)
    for old, new in zip(saved, specs, strict=True):
        assert_close(normalized(old), normalized(new))


def test_gallery_shows_every_view_and_each_renders():
    _, specs = build_gallery()
    shown = {s["usermeta"]["weightatlas"]["view"] for s in specs}
    # every tensor view of ``weightatlas plot``, and the views of analyses that are not
    # drawn from one stored tensor (expanded weights, attributions, contextualized weights)
    assert set(viz.VIEWS) <= shown
    for extra in shown - set(viz.VIEWS):
        assert extra in viz.__all__ and callable(getattr(viz, extra)), extra
    for spec in specs:
        assert viz.to_svg(spec).startswith("<svg")
