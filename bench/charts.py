"""Charts benchmark: weightatlas's heatmap against the plain Altair heatmap a user would write,
side by side in one run, and the time of full reports.

For a 1536 x 384 and a 30522 x 384 float32 matrix: spec bytes, time to build the spec
(``chart.to_dict()``, validation included) and time to render a PNG (vl-convert, scale 1).
The plain version is a DataFrame of every cell with ``alt.data_transformers.disable_max_rows()``
and ``mark_rect`` with ``x="col:O", y="row:O", color="value:Q"``; for the 30522 x 384 matrix
(11.7 M rows, a spec of about 0.7 GB) it is not run unless ``--plain-large`` is given.

Then the report of a synthetic 20-million-parameter transformer (BERT-like, 6 layers,
d=384, vocab 30522) and of a 1000-tensor model: time and HTML size.

    .venv/bin/python bench/charts.py [--plain-large] [--json OUT]

Targets (issue 5): weightatlas spec <= 1 MB and render <= 2 s for both matrices; report of
a 20 M-parameter transformer <= 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import weightatlas.viz as viz  # noqa: E402
from weightatlas.storage import RecordsSource, Store, TensorRecord  # noqa: E402


def machine() -> str:
    import altair as alt
    import vl_convert as vlc

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith(
                "model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python "
            f"{platform.python_version()}, altair {alt.__version__}, vl-convert "
            f"{vlc.__version__ if hasattr(vlc, '__version__') else '?'} "
            f"(vega {vlc.get_vega_version()})")


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def plain(matrix: np.ndarray) -> dict[str, float]:
    import altair as alt
    import vl_convert as vlc

    try:
        import pandas as pd
    except ImportError:  # Altair takes Arrow tables too
        pd = None
    rows, cols = np.indices(matrix.shape)

    def build() -> dict[str, Any]:
        data: Any = {"row": rows.ravel(), "col": cols.ravel(), "value": matrix.ravel()}
        if pd is not None:
            data = pd.DataFrame(data)
        else:
            import pyarrow as pa
            data = pa.table(data)
        alt.data_transformers.disable_max_rows()
        chart = alt.Chart(data).mark_rect().encode(x="col:O", y="row:O", color="value:Q")
        return chart.to_dict()

    spec, build_s = timed(build)
    size = len(json.dumps(spec))
    _, render_s = timed(lambda: vlc.vegalite_to_png(spec, scale=1))
    alt.data_transformers.enable("default")
    return {"bytes": size, "build_s": build_s, "render_s": render_s}


def ours(matrix: np.ndarray) -> dict[str, float]:
    import vl_convert as vlc

    spec, build_s = timed(lambda: viz.heatmap(matrix, "weight").to_dict())
    _, render_s = timed(lambda: vlc.vegalite_to_png(spec, scale=1))
    return {"bytes": len(json.dumps(spec)), "build_s": build_s, "render_s": render_s,
            "cells": spec["usermeta"]["weightatlas"]["cells"]}


def transformer(rng: np.random.Generator, layers: int, d: int, ff: int, vocab: int,
                ) -> list[TensorRecord]:
    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    lin = ("out", "in")
    recs = [TensorRecord("embeddings.word.weight", w(vocab, d), kind="embedding",
                         layout=("vocab", "dim")),
            TensorRecord("embeddings.position.weight", w(512, d), kind="embedding",
                         layout=("vocab", "dim")),
            TensorRecord("embeddings.norm.weight", np.ones(d, np.float32), kind="norm")]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value", "output"):
            recs += [TensorRecord(f"{p}.attention.{name}.weight", w(d, d), kind="attention",
                                  layout=lin),
                     TensorRecord(f"{p}.attention.{name}.bias", w(d), kind="attention")]
        recs += [TensorRecord(f"{p}.ffn.up.weight", w(ff, d), kind="linear", layout=lin),
                 TensorRecord(f"{p}.ffn.up.bias", w(ff), kind="linear"),
                 TensorRecord(f"{p}.ffn.down.weight", w(d, ff), kind="linear", layout=lin),
                 TensorRecord(f"{p}.ffn.down.bias", w(d), kind="linear"),
                 TensorRecord(f"{p}.norm1.weight", np.ones(d, np.float32), kind="norm"),
                 TensorRecord(f"{p}.norm2.weight", np.ones(d, np.float32), kind="norm")]
    return recs


def first_paint(path: Path, tmp: Path) -> float | None:
    """Seconds from navigation until the report's overview is drawn in headless chromium."""
    try:
        from tests.test_report_browser import CHROMIUM, Browser
    except ImportError:
        return None
    if CHROMIUM is None:
        return None
    browser = Browser(tmp / "profile")
    try:
        start = time.perf_counter()
        session = browser.open(path.as_uri())
        browser.wait_for(session, "window.weightatlas && window.weightatlas.ok >= 1", 120)
        return time.perf_counter() - start
    finally:
        browser.close()


def report(tmp: Path, name: str, recs: list[TensorRecord]) -> dict[str, Any]:
    snap = Store(tmp / "store", create=True).write(RecordsSource(recs), name, step=0)
    out, seconds = timed(lambda: viz.save_report(snap, tmp / f"{name}.html"))
    return {"tensors": len(snap), "params": snap.metadata["n_params"], "seconds": seconds,
            "html_bytes": out.stat().st_size, "first_chart_s": first_paint(out, tmp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain-large", action="store_true",
                        help="also run the plain Altair heatmap on 30522 x 384 (very slow)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(machine())
    viz.to_png(viz.heatmap(np.eye(2), "warm-up"))  # start vl-convert's engine once
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"machine": machine()}
    print(f"{'matrix':>12} {'':>12} {'spec':>12} {'build':>9} {'render':>9}")
    for shape in ((1536, 384), (30522, 384)):
        m = rng.standard_normal(shape, dtype=np.float32) * 0.02
        key = f"{shape[0]}x{shape[1]}"
        ours_r = ours(m)
        plain_r = plain(m) if shape[0] <= 1536 or args.plain_large else None
        results[key] = {"weightatlas": ours_r, "plain": plain_r}
        for who, r in (("plain Altair", plain_r), ("weightatlas", ours_r)):
            if r is None:
                print(f"{key:>12} {who:>12} {'(not run: ~0.7 GB spec; --plain-large)':>33}")
                continue
            print(f"{key:>12} {who:>12} {r['bytes'] / 1e6:>9.3f} MB {r['build_s']:>7.2f} s "
                  f"{r['render_s']:>7.2f} s")
        if plain_r:
            print(f"{'':>12} {'ratio':>12} {plain_r['bytes'] / ours_r['bytes']:>10.0f}x "
                  f"{plain_r['build_s'] / ours_r['build_s']:>8.0f}x "
                  f"{plain_r['render_s'] / ours_r['render_s']:>8.0f}x")
    with tempfile.TemporaryDirectory() as tmp:
        big = report(Path(tmp), "transformer", transformer(rng, 6, 384, 1536, 30522))
        many = report(Path(tmp), "deep", transformer(rng, 71, 64, 128, 1000))
    results["report_20M"], results["report_1000"] = big, many
    for label, r in (("20 M-parameter transformer", big), ("1000-tensor model", many)):
        paint = (f", overview drawn {r['first_chart_s']:.1f} s after opening it in chromium"
                 if r["first_chart_s"] is not None else "")
        print(f"report of a {label}: {r['tensors']} tensors, {r['params'] / 1e6:.1f} M values, "
              f"written in {r['seconds']:.1f} s, {r['html_bytes'] / 1e6:.1f} MB of HTML{paint}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
