"""The ``weightatlas`` command line: a thin layer over the Python API.

Each command calls one documented function (``weightatlas.ingest``,
``Store.snapshots``, ``Snapshot.read``, ``Store.verify``, ``Store.rm``) and formats
its result. Errors print one line and exit with status 1 (``--debug`` shows the
traceback); listing commands take ``--json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from weightatlas._api import default_model_name, ingest, plot, report
from weightatlas.errors import StoreError, WeightAtlasError
from weightatlas.storage import Snapshot, Store, parse_ref

app = typer.Typer(
    name="weightatlas",
    help="See what a neural network's weights are doing: ingest weights into an Arrow "
    "store, list, show and verify them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: rich markup would eat the brackets of "MODEL[@STEP|@TAG]" and
    # "[default: ...]".
    rich_markup_mode=None,
)
# markup=False: tensor names and paths are printed literally, brackets and all.
# Piped output (files, CI logs) is not cut at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 240
out = Console(highlight=False, soft_wrap=True, markup=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
_state: dict[str, Any] = {"store": None, "debug": False}

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="WEIGHTATLAS_STORE", help="Store directory "
                 "[default: ./weightatlas_store].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _main(
    store: StoreOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["store"] = store
    _state["debug"] = debug


def _store(create: bool = False) -> Store:
    return Store(_state["store"], create=create)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


_STEP_WORDS = re.compile(r"(?:step|checkpoint|ckpt|iter|iteration|epoch|global_step)"
                         r"[-_=]?(\d+)", re.IGNORECASE)


def _step_from_path(path: str) -> int | None:
    """A checkpoint's step, from the path as given (``ckpt/step-1200/model.safetensors``).

    A number after ``step``, ``checkpoint``, ``ckpt``, ``iter`` or ``epoch`` wins, the
    innermost first; otherwise the last number of the innermost folder or file name
    holding one (the file name without its suffix, so ``llama2-7b.safetensors`` -> 7
    only if nothing better is there).
    """
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".", "..")]
    for part in reversed(parts):
        named = _STEP_WORDS.findall(part)
        if named:
            return int(named[-1])
    for part in reversed(parts):
        numbers = re.findall(r"\d+", part.split(".")[0])
        if numbers:
            return int(numbers[-1])
    return None


@app.command("ingest")
def ingest_cmd(
    paths: Annotated[list[str], typer.Argument(help="Weight files or checkpoint folders.",
                                               show_default=False)],
    model: Annotated[str | None, typer.Option(help="Model name [default: from the file "
                                                   "name].", show_default=False)] = None,
    step: Annotated[int | None, typer.Option(help="Training step of the snapshot.",
                                             show_default=False)] = None,
    tag: Annotated[str | None, typer.Option(help="Tag instead of a step (best, final...).",
                                            show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing snapshot.")] = False,
    chunk_mb: Annotated[int, typer.Option(help="Split tensors larger than this (MiB).")] = 512,
    keep_constants: Annotated[bool, typer.Option(
        "--keep-constants", help="ONNX: also keep shape and index constants (marked as "
        "constants).")] = False,
) -> None:
    """Ingest weight files into the store, one snapshot per path.

    With several paths and --model, each path is a snapshot of that model whose step
    is the last number in its path (checkpoint-1200 -> step 1200).
    """
    if step is not None and tag is not None:
        raise StoreError("give --step or --tag, not both")
    if len(paths) > 1 and (step is not None or tag is not None):
        raise StoreError("--step/--tag name one snapshot; give one path, or several paths "
                         "with --model and steps in their names")
    jobs: list[tuple[str, str, int | None, str | None]] = []
    for path in paths:
        if len(paths) > 1 and model is not None:
            found = _step_from_path(path)
            if found is None:
                raise StoreError(f"{path}: no step number in the path; ingest it alone with "
                                 "--step or --tag")
            jobs.append((path, model, found, None))
        else:
            jobs.append((path, model or default_model_name(path), step, tag))
    seen: dict[tuple[str, int | None, str | None], str] = {}
    for path, name, st, tg in jobs:  # refuse duplicates before anything is written
        if (name, st, tg) in seen and st is not None:
            raise StoreError(f"{path}: step {st} of {name} again (also from "
                             f"{seen[(name, st, tg)]}); ingest them one at a time with --step")
        seen[(name, st, tg)] = path
    store = _store(create=True)
    options = {"keep_constants": True} if keep_constants else {}
    for path, name, st, tg in jobs:
        _ingest_one(store, path, name, st, tg, overwrite, chunk_mb * 1024 * 1024, options)


def _ingest_one(store: Store, path: str, model: str, step: int | None, tag: str | None,
                overwrite: bool, chunk_bytes: int, options: dict[str, Any]) -> None:
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, nbytes: int, total: int) -> None:
            if phase not in tasks:
                label = "checking" if phase == "read" else "writing "
                tasks[phase] = bar.add_task(f"{label} {os.path.basename(path)}", total=total)
            bar.advance(tasks[phase], nbytes)

        snap = ingest(path, store=store, model=model, step=step, tag=tag, overwrite=overwrite,
                      chunk_bytes=chunk_bytes, progress=progress, **options)
    seconds = time.perf_counter() - started
    meta = snap.metadata
    out.print(f"ingested {path} -> {snap.ref}: {meta['n_tensors']} tensors, "
              f"{meta['n_params']:,} values, {_human(meta['nbytes'])} in {seconds:.2f} s "
              f"({_human(meta['nbytes'] / max(seconds, 1e-9))}/s)")
    snap.close()


@app.command("ls")
def ls_cmd(
    model: Annotated[str | None, typer.Argument(help="List this model's snapshots.",
                                                show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """List models, or the snapshots of one model."""
    store = _store()
    if model is not None:
        name, _, _ = parse_ref(model)
        infos = store.snapshots(name)
        if not infos:
            store.resolve(model=name)  # raises a NotFoundError that lists the models
        if as_json:
            _print_json([i.as_dict() for i in infos])
            return
        table = Table("snapshot", "tensors", "values", "bytes", "framework", "source",
                      "created", box=None)
        for i in infos:
            if i.problem:
                table.add_row(i.ref, "DAMAGED", "", "", "", "", "")
                continue
            table.add_row(i.ref, str(i.n_tensors), f"{i.n_params:,}", _human(i.nbytes),
                          i.framework, i.source_file, i.created[:16].replace("T", " "))
        out.print(table)
        for i in infos:
            if i.problem:
                err.print(f"damaged: {i.problem}")
        return
    rows: list[dict[str, Any]] = []
    for name in store.models():
        infos = store.snapshots(name)
        latest = store.latest(name)
        rows.append({"model": name, "snapshots": len(infos), "latest": latest.ref,
                     "n_tensors": latest.n_tensors, "n_params": latest.n_params,
                     "nbytes": sum(i.file_size for i in infos)})
    if as_json:
        _print_json(rows)
        return
    if not rows:
        err.print(f"{store.root}: no models yet (weightatlas ingest PATH)")
        return
    table = Table("model", "snapshots", "latest", "tensors", "values", "on disk", box=None)
    for r in rows:
        table.add_row(r["model"], str(r["snapshots"]), r["latest"], str(r["n_tensors"]),
                      f"{r['n_params']:,}", _human(r["nbytes"]))
    out.print(table)


@app.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    tensor: Annotated[str | None, typer.Argument(help="Show this tensor.",
                                                 show_default=False)] = None,
    as_json: JsonOpt = False,
    source_layout: Annotated[bool, typer.Option(
        "--source-layout", help="Show values in the source file's layout.")] = False,
) -> None:
    """Show a snapshot's tensors with their statistics, or one tensor."""
    with _store().snapshot(ref) as snap:
        if tensor is None:
            _show_snapshot(snap, as_json)
        else:
            _show_tensor(snap, tensor, as_json, source_layout)


def _show_snapshot(snap: Snapshot, as_json: bool) -> None:
    rows = snap.tensors().to_pylist()
    if as_json:
        _print_json({"snapshot": snap.ref, "metadata": snap.metadata, "tensors": rows})
        return
    meta = snap.metadata
    out.print(f"{snap.ref}  {meta['framework']} from {meta['source_file']}  "
              f"{meta['n_tensors']} tensors, {meta['n_params']:,} values, "
              f"{_human(meta['nbytes'])}")
    table = Table("tensor", "kind", "dtype", "shape", "mean", "std", "abs max", "zero",
                  "nan/inf", box=None)
    for r in rows:
        bad = f"{r['n_nan']}/{r['n_inf']}" if r["n_nan"] or r["n_inf"] else ""
        table.add_row(r["name"], r["kind"], r["dtype"], "×".join(map(str, r["shape"])) or "()",
                      _fmt(r["mean"]), _fmt(r["std"]), _fmt(r["abs_max"]),
                      f"{r['frac_zero']:.0%}" if r["frac_zero"] else "", bad)
    out.print(table)


def _show_tensor(snap: Snapshot, name: str, as_json: bool, source_layout: bool) -> None:
    info = snap.info(name)
    if as_json:
        doc = dict(info.__dict__)
        doc["attrs"] = json.loads(info.attrs)
        doc["snapshot"] = snap.ref
        _print_json(doc)
        return
    out.print(f"{info.name} in {snap.ref} ({info.source_name} in the source)")
    out.print(f"  kind {info.kind}, dtype {info.dtype}, shape {list(info.shape)} "
              f"[{', '.join(info.layout)}], source layout [{', '.join(info.source_layout)}]")
    out.print(f"  mean {_fmt(info.mean)}  std {_fmt(info.std)}  min {_fmt(info.min)}  "
              f"max {_fmt(info.max)}  abs max {_fmt(info.abs_max)}  l2 {_fmt(info.l2)}")
    values = snap.read(name, layout="source" if source_layout else "canonical")
    out.print(f"  zeros {info.frac_zero:.2%}  NaN {info.n_nan}  Inf {info.n_inf}  "
              f"{info.n_chunks} chunk(s), {_human(info.nbytes)}")
    shown = values if values.dtype.kind in "fiub" else values.astype(np.float32)
    out.print(np.array2string(shown, threshold=64, edgeitems=3, precision=4))


@app.command("verify")
def verify_cmd(
    ref: Annotated[str | None, typer.Argument(help="MODEL[@STEP] (default: everything).",
                                              show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute every checksum; exit 1 if any snapshot is damaged."""
    results = _store().verify(ref)
    if as_json:
        _print_json([{"snapshot": k, "ok": not v, "problems": v} for k, v in results.items()])
    else:
        for key, problems in results.items():
            out.print(f"{key}: " + ("ok" if not problems else "DAMAGED"))
            for p in problems:
                out.print(f"  {p}")
        if not results:
            err.print("no snapshots to verify")
    if any(results.values()):
        raise typer.Exit(1)


@app.command("rm")
def rm_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL@STEP for one snapshot, MODEL for all.",
                                       show_default=False)],
) -> None:
    """Remove a snapshot, or a model with all its snapshots."""
    for path in _store().rm(ref):
        out.print(f"removed {path}")


@app.command("gc")
def gc_cmd() -> None:
    """Remove leftovers: staging files of killed writers and unused attachments."""
    removed = _store().gc()
    for path in removed:
        out.print(f"removed {path}")
    out.print(f"removed {len(removed)} leftover file(s)")


@app.command("compare")
def compare_cmd(
    a: Annotated[str, typer.Argument(help="First snapshot: MODEL[@STEP|@TAG].",
                                     show_default=False)],
    b: Annotated[str, typer.Argument(help="Second snapshot: MODEL[@STEP|@TAG].",
                                     show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record per pair "
                                                         "and the unmatched names.")] = False,
    rows: Annotated[int, typer.Option(help="Pairs shown in the summary.")] = 20,
) -> None:
    """Align two snapshots tensor by tensor (any frameworks) and show their differences."""
    from weightatlas.core.compare import compare

    store = _store()
    with store.snapshot(a) as sa, store.snapshot(b) as sb:
        result = compare(sa, sb)
    if as_json:
        _print_json(result.to_json())
    else:
        out.print(result.summary(max_rows=rows))


OutputOpt = Annotated[str, typer.Option(
    "--output", "-o", help="File to write; the format comes from its suffix: .vl.json, "
    ".vg.json, .html, .svg, .png.", show_default=False)]


@app.command("plot")
def plot_cmd(
    view: Annotated[str, typer.Argument(
        help="heatmap, kernels, histogram, ridgeline, overview, agreement, diff, scatter, esd, "
        "alphas, projection, trajectory, trajectory_path, nmf_rgb or factors.",
        show_default=False)],
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    tensor: Annotated[str | None, typer.Argument(
        help="The tensor (heatmap, kernels, histogram, diff, scatter, esd, projection, "
        "nmf_rgb, factors).",
        show_default=False)] = None,
    output: OutputOpt = "",
    against: Annotated[str | None, typer.Option(
        help="The second snapshot B (agreement, diff, scatter).", show_default=False)] = None,
    alignment: Annotated[str | None, typer.Option(
        help="Arrow or Parquet table pairing A's tensors with B's (columns a_name, b_name, "
        "method, confidence) [default: equal names].", show_default=False)] = None,
    neuron: Annotated[int | None, typer.Option(
        help="heatmap: show this output neuron's kernels.", show_default=False)] = None,
    neurons: Annotated[str | None, typer.Option(
        help="kernels, nmf_rgb: output neurons, e.g. 0,1,5 [default: the first 8, 16].",
        show_default=False)] = None,
    top: Annotated[int | None, typer.Option(
        help="kernels: inputs per neuron [default: 8].", show_default=False)] = None,
    agg: Annotated[str | None, typer.Option(
        help="heatmap, diff: what a pooled cell shows, maxabs or mean [default: maxabs].",
        show_default=False)] = None,
    bins: Annotated[int | None, typer.Option(
        help="histogram, ridgeline, esd: bins [default: 60, 40, 60].",
        show_default=False)] = None,
    log: Annotated[bool, typer.Option("--log", help="histogram: counts on a log axis.")]
    = False,
    max_cells: Annotated[int | None, typer.Option(
        help="heatmap, diff: cells before pooling [default: 4096].", show_default=False)] = None,
    max_kb: Annotated[int | None, typer.Option(
        help="Budget of the chart spec in kB [default: 1000].", show_default=False)] = None,
) -> None:
    """Draw one chart of a snapshot and write it as Vega-Lite, Vega, HTML, SVG or PNG."""
    if not output:
        raise StoreError("plot: give the file to write with -o FILE (.vl.json, .vg.json, "
                         ".html, .svg, .png)")
    options: dict[str, Any] = {
        "neuron": neuron, "top": top, "agg": agg, "bins": bins, "max_cells": max_cells,
        "log": True if log else None,
        "max_bytes": max_kb * 1000 if max_kb is not None else None,
        "neurons": [int(n) for n in neurons.split(",") if n.strip()] if neurons else None,
    }
    started = time.perf_counter()
    plot(view, ref, tensor, store=_store(), against=against, alignment=alignment, out=output,
         **{k: v for k, v in options.items() if v is not None})
    what = f"{view} of {tensor}" if tensor else view
    out.print(f"wrote {output}: {what} in {ref}, {_human(os.path.getsize(output))} in "
              f"{time.perf_counter() - started:.2f} s")


@app.command("report")
def report_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    output: OutputOpt = "report.html",
    max_mb: Annotated[int, typer.Option(help="Budget of all the chart specs, in MB.")] = 24,
) -> None:
    """Write one self-contained, offline HTML page about a snapshot: overview,
    distributions and a section per tensor."""
    started = time.perf_counter()
    path = report(ref, output, store=_store(), max_bytes=max_mb * 1_000_000)
    out.print(f"wrote {path}: report of {ref}, {_human(path.stat().st_size)} in "
              f"{time.perf_counter() - started:.2f} s")


# ---- analyses (weightatlas.core) -----------------------------------------------------------


def _finite(v: Any) -> Any:
    """JSON-safe: NaN and ±Inf become null (JSON has no NaN), lists and dicts recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _table_meta(table: Any) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"weightatlas")
    return json.loads(raw) if raw else {}


def _chart_to(output: str, chart: Any, what: str, started: float) -> None:
    from weightatlas import viz

    viz.save(chart, output)
    err.print(f"wrote {output}: {what}, {_human(os.path.getsize(output))} in "
              f"{time.perf_counter() - started:.2f} s")


def _check_output(output: str) -> None:
    if output:
        from weightatlas import viz

        viz.format_of(output)  # an unknown suffix fails before any work


ChartOpt = Annotated[str, typer.Option(
    "--output", "-o", help="Also write the chart to this file (.vl.json, .vg.json, .html, "
    ".svg, .png).", show_default=False)]


@app.command("spectrum")
def spectrum_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record per matrix."
                                          )] = False,
    conv: Annotated[str, typer.Option(help="Convolutions as one [out, in*h*w] matrix "
                                           "(flatten) or one [out, in] matrix per kernel "
                                           "position, pooled (per_position).")] = "flatten",
    output: ChartOpt = "",
) -> None:
    """Spectral analysis of every weight matrix: power-law alpha of the eigenvalue spectrum,
    spectral norm, stable and effective rank, Marchenko-Pastur edge (docs/analyses.md)."""
    from weightatlas.core import spectrum

    if conv not in ("flatten", "per_position"):
        raise StoreError(f"spectrum: --conv {conv!r}; expected flatten or per_position")
    _check_output(output)
    started = time.perf_counter()
    with _store().snapshot(ref) as snap:
        table = spectrum(snap, conv=conv)
        snap_ref = snap.ref
    rows = table.to_pylist()
    if as_json:
        _print_json(_finite({"snapshot": snap_ref, "conv": conv, "matrices": rows}))
    else:
        grid = Table("tensor", "kind", "matrix", "evals", "alpha", "± sigma", "xmin", "KS",
                     "tail", "spectral norm", "stable rank", "eff. rank", "MP λ+", "spikes",
                     "status", box=None)
        for r in rows:
            shape = f"{r['rows']}×{r['cols']}" + (" per position" if r["matrix"] ==
                                                  "per_position" else "")
            grid.add_row(r["name"], r["kind"], shape, _fmt(r["n_evals"]), _fmt(r["alpha"]),
                         _fmt(r["sigma"]), _fmt(r["xmin"]), _fmt(r["ks_distance"]),
                         _fmt(r["n_tail"]), _fmt(r["spectral_norm"]), _fmt(r["stable_rank"]),
                         _fmt(r["effective_rank"]), _fmt(r["mp_lambda_plus"]),
                         _fmt(r["n_spikes"]), r["status"])
        out.print(f"{snap_ref}: {len(rows)} weight matrices (conv={conv})")
        out.print(grid)
    if output and rows:
        from weightatlas import viz

        _chart_to(output, viz.alphas(table), "alpha of every weight matrix", started)


@app.command("project")
def project_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    tensors: Annotated[list[str], typer.Argument(
        help="Tensors whose rows (neurons) to project; several must have rows of one length.",
        show_default=False)],
    method: Annotated[str, typer.Option(help="pca, tsne or umap.")] = "pca",
    clusters: Annotated[int | None, typer.Option(
        help="Also label the neurons with K k-means clusters (the chart colours by them).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of t-SNE, UMAP and k-means.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record per neuron "
                                                         "and the method's facts.")] = False,
    output: ChartOpt = "",
) -> None:
    """Project the neurons (rows) of weight tensors with PCA, t-SNE or UMAP."""
    from weightatlas.core import projection

    if clusters is not None and clusters < 1:
        raise StoreError(f"project: --clusters {clusters}; give at least 1")
    _check_output(output)
    started = time.perf_counter()
    with _store().snapshot(ref) as snap:
        table = projection(snap, tensors, method, clusters=clusters, seed=seed)
        snap_ref = snap.ref
    meta = _table_meta(table)
    if as_json:
        _print_json(_finite({"snapshot": snap_ref, "tensors": tensors, "method": method,
                             "meta": meta, "points": table.to_pylist()}))
    else:
        facts = " · ".join(f"{k} {_fmt(v)}" for k, v in meta.items() if k != "method")
        out.print(f"{snap_ref}: {method} of {table.num_rows} neurons of {', '.join(tensors)}"
                  f" ({facts})")
        grid = Table("tensor", "neurons", "mean norm", *(["clusters"] if clusters else []),
                     box=None)
        cols = table.to_pydict()
        for name in dict.fromkeys(cols["tensor"]):
            pick = [i for i, t in enumerate(cols["tensor"]) if t == name]
            norms = [cols["norm"][i] for i in pick]
            extra = []
            if clusters:
                sizes = {c: sum(cols["cluster"][i] == c for i in pick) for c in range(clusters)}
                extra = [" ".join(f"{c}:{n}" for c, n in sizes.items() if n)]
            grid.add_row(name, str(len(pick)), _fmt(sum(norms) / len(norms)), *extra)
        out.print(grid)
    if output:
        from weightatlas import viz

        chart = viz.projection_chart(table, color="cluster" if clusters else "tensor")
        _chart_to(output, chart, f"{method} of {table.num_rows} neurons", started)


@app.command("nmf")
def nmf_cmd(
    ref: Annotated[str, typer.Argument(help="MODEL[@STEP|@TAG] (latest when no step).",
                                       show_default=False)],
    tensor: Annotated[str, typer.Argument(help="The weight tensor.", show_default=False)],
    factors: Annotated[int | None, typer.Option(
        help="One-sided NMF of the tensor's units with K factors [default: 3].",
        show_default=False)] = None,
    neuron: Annotated[list[int] | None, typer.Option(
        help="Per-neuron 3-factor NMF as RGB (a conv [out, in, h, w]); repeat for several.",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="NMF's random seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the factors as JSON.")] = False,
    output: ChartOpt = "",
) -> None:
    """NMF of weights, as in Distill's "Visualizing Weights": a one-sided factorisation of a
    family (--factors K) or each neuron's kernel as an RGB image (--neuron N ...)."""
    if factors is not None and neuron:
        raise StoreError("nmf: give --factors K or --neuron N, not both")
    _check_output(output)
    with _store().snapshot(ref) as snap:
        _nmf(snap, tensor, factors, neuron, seed, as_json, output)


def _nmf(snap: Snapshot, tensor: str, factors: int | None, neuron: list[int] | None,
         seed: int, as_json: bool, output: str) -> None:
    from weightatlas.core import neuron_rgb, one_sided_nmf

    started = time.perf_counter()
    weight = snap.read(tensor)
    snap_ref = snap.ref
    if neuron:
        images = {n: neuron_rgb(weight, n, seed=seed, name=tensor) for n in neuron}
        if as_json:
            _print_json({"snapshot": snap_ref, "tensor": tensor, "seed": seed, "neurons": [
                {"neuron": n, "rgb": rgb.tolist()} for n, rgb in images.items()]})
        else:
            out.print(f"{tensor} in {snap_ref}: 3-factor NMF of {len(images)} neuron(s)' "
                      "kernels (rows of RGB in [0, 1])")
            for n, rgb in images.items():
                out.print(f"neuron {n}: kernel {rgb.shape[0]}×{rgb.shape[1]}, mean RGB "
                          + " ".join(f"{v:.3f}" for v in rgb.reshape(-1, 3).mean(axis=0)))
        if output:
            from weightatlas import viz

            chart = viz.nmf_rgb(snap, tensor, neurons=neuron, seed=seed)
            _chart_to(output, chart, f"NMF colours of {len(images)} neuron(s)", started)
        return
    k = factors if factors is not None else 3
    result = one_sided_nmf(weight, k, seed=seed, name=tensor)
    if as_json:
        _print_json(_finite({"snapshot": snap_ref, "tensor": tensor, "n_factors": k,
                             "seed": seed, "relative_error": result.relative_error,
                             "channel": result.channel.tolist(),
                             "spatial": result.spatial.tolist()}))
    else:
        units, _, kh, kw = result.spatial.shape
        out.print(f"{tensor} in {snap_ref}: one-sided NMF, {k} factors: channel factors "
                  f"{k}×{result.channel.shape[1]}, spatial factors {units}×{k}×{kh}×{kw}; "
                  f"relative reconstruction error {result.relative_error:.4g}")
        grid = Table("factor", "largest channel loadings", box=None)
        for f, row in enumerate(result.channel):
            top = np.argsort(-row, kind="stable")[:5]
            grid.add_row(str(f), ", ".join(f"{c}: {row[c]:.3g}" for c in top.tolist()))
        out.print(grid)
    if output:
        from weightatlas import viz

        chart = viz.factors_chart(result, tensor)
        _chart_to(output, chart, f"one-sided NMF with {k} factors", started)


@app.command("trajectory")
def trajectory_cmd(
    model: Annotated[str, typer.Argument(help="MODEL: all its step-numbered snapshots.",
                                         show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record per tensor "
                                                         "and step.")] = False,
    metric: Annotated[str, typer.Option(
        help="The chart's figure: relative_update, update_norm, update_cosine, norm, "
        "distance_from_init or relative_distance.")] = "relative_update",
    pca: Annotated[bool, typer.Option("--pca", help="The PCA of every snapshot's flattened "
                                                    "weights (the path) instead.")] = False,
    output: ChartOpt = "",
) -> None:
    """How each tensor moves over training: update norms, relative updates, cosine between
    successive updates, distance from initialisation; or the model's path (--pca)."""
    from weightatlas import viz
    from weightatlas.core import trajectory, trajectory_pca

    name, step, tag = parse_ref(model)
    if step is not None or tag is not None:
        raise StoreError(f"trajectory: give the model name alone ({name!r}), not "
                         f"{model!r}: the trajectory covers all its snapshots")
    if metric not in viz.TRAJECTORY_METRICS:
        raise StoreError(f"trajectory: --metric {metric!r}; expected one of "
                         f"{', '.join(viz.TRAJECTORY_METRICS)}")
    _check_output(output)
    started = time.perf_counter()
    store = _store()
    store.resolve(model=name)  # a NotFoundError that lists the models
    if pca:
        table = trajectory_pca(store, name)
        meta = _table_meta(table)
        if as_json:
            _print_json(_finite({"model": name, "meta": meta, "points": table.to_pylist()}))
        else:
            ratio = meta.get("explained_variance_ratio", [])
            out.print(f"{name}: PCA of {table.num_rows} snapshots' weights "
                      f"({len(meta.get('tensors', []))} tensors; explained variance "
                      + ", ".join(f"{r:.1%}" for r in ratio) + ")")
            for t, why in meta.get("excluded", {}).items():
                err.print(f"left out: {t}: {why}")
            grid = Table("snapshot", "pc1", "pc2", box=None)
            for r in table.to_pylist():
                grid.add_row(r["ref"], _fmt(r["pc1"]), _fmt(r.get("pc2")))
            out.print(grid)
        if output:
            _chart_to(output, viz.trajectory_path(table), "path through weight space", started)
        return
    table = trajectory(store, name)
    if as_json:
        _print_json(_finite({"model": name, "rows": table.to_pylist()}))
    else:
        grid = Table("tensor", "step", "norm", "update norm", "relative update", "cosine",
                     "from init", "relative from init", "status", box=None)
        for r in table.to_pylist():
            grid.add_row(r["tensor"], str(r["step"]), _fmt(r["norm"]), _fmt(r["update_norm"]),
                         _fmt(r["relative_update"]), _fmt(r["update_cosine"]),
                         _fmt(r["distance_from_init"]), _fmt(r["relative_distance"]),
                         r["status"])
        out.print(grid)
    if output:
        _chart_to(output, viz.trajectory_chart(table, metric=metric), f"{metric} over steps",
                  started)


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}")
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``weightatlas`` command."""
    try:
        app(args=argv, standalone_mode=True)
    except WeightAtlasError as e:
        if _state["debug"]:
            raise
        _fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None


# Commands defined in their own modules register themselves on ``app`` when imported.
from weightatlas import (  # noqa: E402
    _cli_attribution,  # noqa: F401  (saliency, gradients)
    _cli_expand,  # noqa: F401  (weightatlas expand)
)

if __name__ == "__main__":
    # ``python -m weightatlas.cli``: run the importable module's app, on which the command
    # modules above registered (this file, run as __main__, holds a second app).
    from weightatlas.cli import main as _importable_main

    _importable_main()
