"""``weightatlas saliency`` and ``weightatlas gradients``: attributions and weight gradients
of a stored model, from inputs saved with ``numpy.save``.

Registered on the command line's app when :mod:`weightatlas.cli` is imported (it imports
this module last). Each command calls one function of the package root
(:func:`weightatlas.attribute`, :func:`weightatlas.weight_gradients`) and formats its result.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.table import Table

from weightatlas._attribution import ALIASES, METHODS, attribute, stored_function, weight_gradients
from weightatlas.cli import _fmt, _human, _print_json, _store, app, err, out
from weightatlas.errors import FormatError, InputMismatchError, NotFoundError, ShapeError

if TYPE_CHECKING:
    from weightatlas._attribution import Attribution
    from weightatlas.core.executor import StoredFunction, ValueSpec

__all__ = ["gradients_cmd", "read_inputs", "saliency_cmd"]

_CHARTS = (".vl.json", ".vg.json", ".html", ".svg", ".png")

RefArg = Annotated[str, typer.Argument(help="MODEL, MODEL@STEP or MODEL@TAG (latest when no "
                                            "step); the snapshot must hold a graph.",
                                       show_default=False)]
InputOpt = Annotated[list[str], typer.Option(
    "--input", "-i", help="A .npy file per model input, in graph order (batch first; a "
    "single example may leave the batch axis out).", show_default=False)]
TargetOpt = Annotated[str, typer.Option(
    help="Class index, or one per example (3,1,4); by default each example's "
    "predicted class.", show_default=False)]


def read_inputs(fn: StoredFunction, paths: list[str]) -> list[np.ndarray]:
    """The model's inputs from ``.npy`` files, checked against the graph's inputs.

    Floating-point files are converted to the input's floating type and integer files to
    its integer type; a single example without its batch axis gets one.

    Raises:
        NotFoundError: A file is missing.
        FormatError: A file is not a ``.npy`` array.
        InputMismatchError: Too few or too many files, or a dtype of another kind.
        ShapeError: A shape the graph's input does not accept.
    """
    if len(paths) != len(fn.inputs):
        raise InputMismatchError(
            f"{fn.snapshot_ref} takes {len(fn.inputs)} input(s) "
            f"({', '.join(s.name + ': ' + s.describe() for s in fn.inputs)}); "
            f"got {len(paths)} --input file(s)")
    return [_read_one(fn, spec, path) for spec, path in zip(fn.inputs, paths, strict=True)]


def _read_one(fn: StoredFunction, spec: ValueSpec, path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise NotFoundError(f"{path}: no such file (input {spec.name!r} of {fn.snapshot_ref})")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a .npy array written by numpy.save: {e}") from e
    if not isinstance(array, np.ndarray):
        raise FormatError(f"{path}: holds several arrays (.npz); save input {spec.name!r} "
                          "alone with numpy.save")
    want = f"{spec.describe()}"
    found = f"{array.dtype.name}{list(array.shape)}"
    if spec.dtype is not None:
        kind = {"f": "floating-point", "i": "integer", "u": "integer", "b": "boolean"}
        same = array.dtype.kind == spec.dtype.kind or {array.dtype.kind, spec.dtype.kind} <= {
            "i", "u"}
        if not same:
            raise InputMismatchError(
                f"{path}: input {spec.name!r} of {fn.snapshot_ref} is {want} "
                f"({kind.get(spec.dtype.kind, spec.dtype.name)}); the file holds {found}")
        array = array.astype(spec.dtype, copy=False)
    if spec.shape is not None:
        dims = list(spec.shape)
        if array.ndim == len(dims) - 1:
            array = array[None]
        ok = array.ndim == len(dims) and all(
            not isinstance(d, int) or d == n for d, n in zip(dims, array.shape, strict=True))
        if not ok:
            raise ShapeError(f"{path}: input {spec.name!r} of {fn.snapshot_ref} must have "
                             f"shape {want}; the file holds {found}")
    return np.ascontiguousarray(array)


def _target(fn: StoredFunction, text: str, inputs: list[np.ndarray]) -> Any:
    if text:
        try:
            values = [int(p) for p in text.replace(" ", "").split(",") if p]
        except ValueError:
            raise InputMismatchError(f"--target {text!r}: expected a class index or one per "
                                     "example, separated by commas (3 or 3,1,4)") from None
        return values[0] if len(values) == 1 else np.array(values)
    scores = np.asarray(fn(*inputs)[0])
    if scores.ndim != 2:
        raise ShapeError(f"{fn.snapshot_ref}: output {fn.output_names[0]!r} has shape "
                         f"{list(scores.shape)}, not [batch, classes]; give --target")
    return scores.argmax(axis=1)


def _chart(result: Attribution, x: np.ndarray, output: str) -> Any:
    from weightatlas import viz

    values = np.asarray(result)
    target = np.asarray(result.target).reshape(-1).tolist()
    name = f"{result.method} of {result.snapshot}, target {', '.join(map(str, target))}"
    if x.ndim == 4 and values.shape[0] == x.shape[0] and values.shape[2:] == x.shape[2:]:
        return viz.saliency_overlay(x, values, name=name)
    if values.ndim in (2, 3):
        # [n, t, d] (token embeddings) sum over the features; [n, c, t] with a few
        # channels (a Conv1d signal, as images have 1-4) over the channels.
        axis = 1 if values.ndim == 3 and values.shape[1] <= 4 < values.shape[2] else 2
        rows = values if values.ndim == 2 else values.sum(axis=axis)
        return viz.saliency_strip(rows, rows=[f"example {i}" for i in range(len(rows))],
                                  name=name)
    raise ShapeError(f"{output}: no chart for an attribution of shape {list(values.shape)} "
                     f"over an input of shape {list(x.shape)} (images [n, c, h, w] and "
                     "sequences [n, t] or [n, t, d] are drawn; Grad-CAM needs --upsample); "
                     "write it as .npy")


def _check_outputs(outputs: list[str]) -> None:
    from weightatlas import viz

    for path in outputs:
        if not path.lower().endswith(".npy"):
            if not path.lower().endswith(_CHARTS):
                raise InputMismatchError(f"{path}: write .npy (the array) or a chart "
                                         f"({', '.join(_CHARTS)})")
            viz.format_of(path)


@app.command("saliency")
def saliency_cmd(
    ref: RefArg,
    inputs: InputOpt,
    target: TargetOpt = "",
    method: Annotated[str, typer.Option(
        help=f"{', '.join(METHODS)} (or {', '.join(sorted(ALIASES))}).")] = "saliency",
    steps: Annotated[int, typer.Option(help="Integrated gradients: points on the path.")] = 50,
    baseline: Annotated[float, typer.Option(help="Integrated gradients and occlusion: the "
                                                 "baseline value.")] = 0.0,
    samples: Annotated[int, typer.Option(help="SmoothGrad: noisy samples.")] = 25,
    stdev: Annotated[float, typer.Option(help="SmoothGrad: noise standard deviation, in "
                                              "input units.")] = 0.15,
    layer: Annotated[str, typer.Option(help="Grad-CAM: a stored layer (layer4.1.conv2), "
                                            "tensor or graph value.", show_default=False)] = "",
    upsample: Annotated[bool, typer.Option(help="Grad-CAM: resize the map to the input "
                                                "bilinearly.")] = True,
    window: Annotated[str, typer.Option(help="Occlusion: the window, e.g. 3,8,8.")] = "",
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Integrated gradients, SmoothGrad: examples per batched "
        "evaluation (by default all steps at once).", show_default=False)] = None,
    output: Annotated[list[str] | None, typer.Option(
        "--output", "-o", help="Write the attribution: .npy (the array) or a chart (.svg, "
        ".png, .html, .vl.json, .vg.json); repeat for several.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (the array "
                                                         "goes to -o x.npy).")] = False,
) -> None:
    """Attribute a stored model's prediction to its input: saliency, gradient x input,
    integrated gradients, SmoothGrad, Grad-CAM or occlusion, through the executor."""
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise InputMismatchError(f"saliency: --method {method!r}; expected one of "
                                 f"{', '.join(METHODS)} (or {', '.join(sorted(ALIASES))})")
    outputs = list(output or [])
    _check_outputs(outputs)
    by_method: dict[str, dict[str, Any]] = {
        "integrated_gradients": {"steps": steps, "baseline": baseline,
                                 "internal_batch_size": batch_size},
        "smoothgrad": {"samples": samples, "stdev": stdev, "internal_batch_size": batch_size},
        "grad_cam": {"layer": layer or None, "upsample": upsample},
        "occlusion": {"baseline": baseline},
    }
    options = dict(by_method.get(name, {}))
    if name == "occlusion" and window:
        try:
            options["window"] = tuple(int(p) for p in window.split(","))
        except ValueError:
            raise InputMismatchError(f"saliency: --window {window!r}; expected integers "
                                     "separated by commas (3,8,8)") from None
    started = time.perf_counter()
    with _store().snapshot(ref) as snap:
        fn = stored_function(snap)
    arrays = read_inputs(fn, inputs)
    tgt = _target(fn, target, arrays)
    result = attribute(fn, arrays[0], tgt, method=name, others=arrays[1:], **options)
    values = np.asarray(result)
    written = []
    for path in outputs:
        if path.lower().endswith(".npy"):
            np.save(path, values)
        else:
            from weightatlas import viz

            viz.save(_chart(result, arrays[0], path), path)
        written.append(path)
    seconds = time.perf_counter() - started
    per = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
    if as_json:
        _print_json({"snapshot": result.snapshot, "method": result.method,
                     "target": result.target, "layer": result.layer,
                     "options": {k: v for k, v in options.items() if v is not None},
                     "shape": list(values.shape), "dtype": values.dtype.name,
                     "examples": [{"sum": float(r.sum()), "abs_max": float(np.abs(r).max())}
                                  for r in per], "written": written, "seconds": seconds})
        return
    what = f" on {result.layer}" if result.layer else ""
    out.print(f"{result.snapshot}: {result.method}{what}, {list(values.shape)} "
              f"{values.dtype.name} in {seconds:.2f} s")
    grid = Table("example", "target", "sum", "abs max", box=None)
    targets = np.broadcast_to(np.asarray(result.target), (per.shape[0],))
    for i, row in enumerate(per):
        grid.add_row(str(i), str(targets[i]), _fmt(float(row.sum())),
                     _fmt(float(np.abs(row).max())))
    out.print(grid)
    for path in written:
        err.print(f"wrote {path}, {_human(os.path.getsize(path))}")


@app.command("gradients")
def gradients_cmd(
    ref: RefArg,
    inputs: InputOpt,
    target: TargetOpt = "",
    loss: Annotated[str, typer.Option(help="target: the sum of the target scores; "
                                           "cross_entropy: their mean cross-entropy.")
                    ] = "target",
    model: Annotated[str | None, typer.Option(help="Name of the gradient snapshot's model "
                                                   "(by default MODEL.grad).",
                                              show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing gradient snapshot."
                                            )] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the gradient snapshot's "
                                                         "description as JSON.")] = False,
) -> None:
    """Compute the gradients of a stored model's weights for the inputs and write them as
    the snapshot MODEL.grad@STEP, laid out like the weights (every chart draws them)."""
    if loss not in ("target", "cross_entropy"):
        raise InputMismatchError(f"gradients: --loss {loss!r}; expected target or "
                                 "cross_entropy")
    started = time.perf_counter()
    store = _store()
    with store.snapshot(ref) as snap:
        fn = stored_function(snap)
    arrays = read_inputs(fn, inputs)
    tgt = _target(fn, target, arrays)
    grads = weight_gradients(fn, arrays, tgt, loss=loss, store=store, model=model,
                             overwrite=overwrite)
    meta = grads.metadata["source"]["gradient"]
    if as_json:
        _print_json({"snapshot": grads.ref, "of": meta["of"], "objective": meta["objective"],
                     "target": meta["target"], "n_tensors": grads.metadata["n_tensors"],
                     "no_gradient": meta["no_gradient"]})
    else:
        out.print(f"wrote {grads.ref}: gradients of {len(grads.names)} tensors of {meta['of']}"
                  f" (objective {meta['objective']}, target {meta['target']}), "
                  f"{_human(grads.metadata['nbytes'])} in {time.perf_counter() - started:.2f} s")
        if meta["no_gradient"]:
            err.print(f"no gradient: {len(meta['no_gradient'])} tensors (integer, or not "
                      "used by the graph), e.g. " + next(iter(meta["no_gradient"])))
    grads.close()
