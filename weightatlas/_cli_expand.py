"""``weightatlas expand``: expanded weights between two layers of a stored model.

Registered on the command line's app when :mod:`weightatlas.cli` is imported (it imports
this module last). Calls :func:`weightatlas.expand` and formats its result.
"""

from __future__ import annotations

import os
import time
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from weightatlas.cli import _chart_to, _human, _print_json, _store, app, err, out
from weightatlas.errors import InputMismatchError

__all__ = ["expand_cmd"]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise InputMismatchError(f"expand: {what} {text!r}; expected integers separated by "
                                 "commas (0,1,2)") from None


@app.command("expand")
def expand_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step); the "
                                            "snapshot must hold a graph.", show_default=False)],
    source: Annotated[str, typer.Argument(help="The earlier layer: a module "
                                               "(layer1.0.conv1), a stored tensor or a graph "
                                               "value.", show_default=False)],
    target: Annotated[str, typer.Argument(help="The later layer, named the same ways.",
                                          show_default=False)],
    channels: Annotated[str, typer.Option(help="Target channels, e.g. 0,1,2 [default: all].",
                                          show_default=False)] = "",
    top: Annotated[int, typer.Option(help="Strongest source channels shown per target "
                                          "channel.")] = 8,
    size: Annotated[int | None, typer.Option(help="Crop every expanded kernel to K×K "
                                                  "[default: its support].",
                                             show_default=False)] = None,
    input_shape: Annotated[str, typer.Option(
        "--input-shape", help="The input shape when the graph's is not fixed, e.g. "
        "1,3,224,224.", show_default=False)] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result's description "
                                          "and each channel's strongest sources as JSON."
                                          )] = False,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Also write the chart (.vl.json, .vg.json, .html, .svg, .png) "
        "or the array (.npy) to this file.", show_default=False)] = "",
) -> None:
    """Expanded weights (Distill, "Visualizing Weights"): how each channel of SOURCE acts on
    each channel of TARGET through every layer between them, ReLUs passing their input and
    max pooling averaging. -o writes the chart, or the array with .npy."""
    from weightatlas import expand

    if top < 1:
        raise InputMismatchError(f"expand: --top {top}; show at least 1 source channel")
    if output and not output.lower().endswith(".npy"):
        from weightatlas import viz

        viz.format_of(output)  # an unknown suffix fails before any work
    started = time.perf_counter()
    chosen = _ints(channels, "--channels") if channels else None
    shape = _ints(input_shape, "--input-shape") if input_shape else None
    with _store().snapshot(ref) as snap:
        result = expand(snap, source, target, channels=chosen, input_shape=shape, size=size)
        snap_ref = snap.ref
    strongest = {c: result.strongest(c, top) for c in result.channels}
    if as_json:
        _print_json({"snapshot": snap_ref, **result.to_dict(), "strongest": [
            {"channel": c, "sources": [{"channel": s, "norm": n} for s, n in pairs]}
            for c, pairs in strongest.items()]})
    else:
        kernel = "×".join(map(str, result.kernel)) or "1 (dense)"
        out.print(f"{snap_ref}: expanded weights {source} ({result.source}, "
                  f"{list(result.source_shape)}) → {target} ({result.target}, "
                  f"{list(result.target_shape)}): {len(result.channels)} target × "
                  f"{result.array.shape[1]} source channels, kernel {kernel}, offsets "
                  f"{list(result.offsets)}")
        if result.nonaffine:
            out.print("not affine between the layers (evaluated at a zero input): "
                      + ", ".join(result.nonaffine))
        if result.at_border:
            out.print("the kernels reach the edge of the source activation; a larger "
                      "--input-shape may show more of them")
        grid = Table("target channel", f"strongest {top} source channels (L2 norm)", box=None)
        for c, pairs in strongest.items():
            grid.add_row(str(c), ", ".join(f"{s}: {n:.4g}" for s, n in pairs))
        out.print(grid)
    if output.lower().endswith(".npy"):
        with open(output, "wb") as f:
            np.save(f, result.array)
        err.print(f"wrote {output}: expanded weights {list(result.array.shape)}, "
                  f"{_human(os.path.getsize(output))} in "
                  f"{time.perf_counter() - started:.2f} s")
    elif output:
        from weightatlas import viz

        rows = list(result.channels)[:64] if chosen else None  # default: the first 8
        chart = viz.expanded(result, top=top, targets=rows)
        _chart_to(output, chart, f"expanded weights of {len(rows or result.channels[:8])} "
                  "target channels", started)
