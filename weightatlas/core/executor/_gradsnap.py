"""Weight gradients of a stored model, as a snapshot laid out exactly like its weights.

:func:`stored_gradients` differentiates a :class:`~._stored.StoredFunction` with respect
to every weight and names each gradient by its stored tensor, in that tensor's canonical
layout (the executor differentiates initializers in the graph's own layout: a ``Gemm``
``transB=0`` or ``MatMul`` weight is ``[in, out]`` there, ``[out, in]`` in the store).
:func:`weight_gradient_snapshot` writes them as a snapshot whose records carry the
weights' name, kind, layout, source layout, module, param and attrs, so every weight
chart and comparison works on them unchanged.

Naming: the gradients of ``resnet18@100`` are the snapshot ``resnet18.grad@100`` (the
same step or tag, model name ``<model>.grad``); its metadata (``source.gradient``) names
the weights' snapshot, the objective (target logit or cross-entropy, and the targets),
the output, and the sha256 of the inputs, and lists the stored tensors that have no
gradient (integer tensors, and tensors the graph does not compute with: the quantized
originals of a folded weight, whose gradient is the folded weight's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from weightatlas.errors import ShapeError
from weightatlas.storage import (
    RecordsSource,
    Snapshot,
    Store,
    TensorRecord,
    flipped_axes,
    to_canonical_layout,
)

from ._errors import InputMismatchError
from ._saliency import _targets, weight_gradients
from ._stored import StoredFunction, from_snapshot

__all__ = ["GRADIENT_SUFFIX", "LOSSES", "stored_gradients", "weight_gradient_snapshot"]

#: Model-name suffix of a gradient snapshot (``resnet18`` -> ``resnet18.grad``).
GRADIENT_SUFFIX = ".grad"
#: Objectives by name: the sum over the batch of each example's target logit, or the
#: mean softmax cross-entropy against the targets (``torch.nn.functional.cross_entropy``).
LOSSES = ("target", "cross_entropy")


def _objective(fn: StoredFunction, inputs: list[Any], target: Any,
               loss: str | Callable[..., Any] | None, output: int
               ) -> tuple[Any, Callable[..., Any] | None, str]:
    """(target for weight_gradients, loss for weight_gradients, the objective's name)."""
    import jax
    import jax.numpy as jnp

    if loss is None or loss == "target":
        if target is None:
            raise InputMismatchError(f"{fn.where}: give a target (a class index or one per "
                                     "example), or a loss")
        return target, None, "target"
    if callable(loss):
        return None, loss, getattr(loss, "__name__", type(loss).__name__)
    if loss != "cross_entropy":
        raise InputMismatchError(f"{fn.where}: loss {loss!r} is not one of {LOSSES} or a "
                                 "function of the outputs")
    shapes = jax.eval_shape(lambda: fn.apply(fn.weights, *inputs))
    if not 0 <= output < len(shapes) or len(shapes[output].shape) != 2:
        raise ShapeError(f"{fn.where}: cross_entropy needs a [batch, classes] output; output "
                         f"#{output} of {[list(s.shape) for s in shapes]} is not one")
    labels = _targets(fn.where, target, *shapes[output].shape)

    def cross_entropy(*outs: Any) -> Any:
        logits = outs[output]
        picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    return None, cross_entropy, "cross_entropy"


def _as_inputs(fn: StoredFunction, inputs: Any) -> list[Any]:
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
        inputs = [inputs]
    found = [np.asarray(x) for x in inputs]
    if len(found) != len(fn.inputs):
        raise InputMismatchError(f"{fn.where}: expects {len(fn.inputs)} inputs "
                                 f"{list(fn.input_names)}, got {len(found)}")
    return found


def stored_gradients(fn: StoredFunction, inputs: Any, target: Any = None, *,
                     loss: str | Callable[..., Any] | None = None, output: int = 0
                     ) -> dict[str, np.ndarray]:
    """The gradient of the objective with respect to every stored weight, by stored name,
    in each tensor's canonical layout.

    Args:
        fn: The model (:func:`~._stored.from_snapshot`).
        inputs: All graph inputs in order, or the one input array.
        target: A class index, or one per example, of the ``[batch, classes]`` output.
        loss: ``None``/``"target"``: the sum over the batch of each example's target
            output; ``"cross_entropy"``: the mean softmax cross-entropy with the targets
            as labels; or a function ``loss(*outputs) -> scalar`` in JAX.
        output: Which graph output ``target`` indexes.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
        ...                             "fc.weight")          # [in, out]: a MatMul operand
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"],
        ...                                         name="/fc/MatMul")], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 2])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "mm.onnx")
        >>> fn = from_snapshot(wa.ingest(tmp / "mm.onnx", store=store))
        >>> stored_gradients(fn, np.array([[5.0, 7.0]], np.float32), 1)["fc.weight"].tolist()
        [[0.0, 0.0], [5.0, 7.0]]
    """
    args = _as_inputs(fn, inputs)
    tgt, objective, _ = _objective(fn, args, target, loss, output)
    grads = weight_gradients(fn, args, tgt, loss=objective, output=output,
                             weights=fn.device_weights())
    found: dict[str, np.ndarray] = {}
    for name, row in fn.rows.items():
        grad = grads.get(fn.weight_of[name])
        if grad is not None:
            found[name] = to_canonical_layout(grad, row["layout"], row["source_layout"],
                                              row["shape"], flipped_axes(row["attrs"]))
    return found


def weight_gradient_snapshot(source: StoredFunction | Snapshot, inputs: Any,
                             target: Any = None, *, store: Store,
                             loss: str | Callable[..., Any] | None = None, output: int = 0,
                             model: str | None = None, step: int | None = None,
                             tag: str | None = None, overwrite: bool = False) -> Snapshot:
    """Computes the weight gradients of a stored model and writes them as a snapshot.

    Each gradient is a record with its weight's name, kind, layout, source layout, source
    shape, module, param and attrs, so ``wa.viz.heatmap(grads, "fc.weight")`` and every
    other weight chart show it.

    Args:
        source: The weights' snapshot, or a function made from it.
        inputs, target, loss, output: As :func:`stored_gradients`.
        store: Where to write.
        model: The gradient snapshot's model name (default ``<model>.grad``).
        step, tag: Its step or tag (default: the weights' own).
        overwrite: Replace an existing gradient snapshot of other inputs or targets.

    Returns:
        The gradient snapshot, opened.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"],
        ...                                         transB=1, name="/fc/Gemm")], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 3])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "fc.onnx")
        >>> snap = wa.ingest(tmp / "fc.onnx", store=store, step=5)
        >>> grads = weight_gradient_snapshot(snap, np.ones((1, 3), np.float32), 0, store=store)
        >>> grads.ref, grads.read("fc.weight").tolist()
        ('fc.grad@5', [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    """
    fn = source if isinstance(source, StoredFunction) else from_snapshot(source)
    args = _as_inputs(fn, inputs)
    tgt, objective, loss_name = _objective(fn, args, target, loss, output)
    grads = stored_gradients(fn, args, tgt, loss=objective, output=output)
    records = []
    for name, grad in grads.items():
        row = fn.rows[name]
        records.append(TensorRecord(
            name, grad, source_name=row["source_name"], kind=row["kind"],
            layout=tuple(row["layout"]), source_layout=tuple(row["source_layout"]),
            source_shape=tuple(row["source_shape"]), module=row["module"],
            param=row["param"], attrs=json.loads(row["attrs"] or "{}")))
    base, weights_step, weights_tag = fn.snapshot_id
    meta = {"gradient": {
        "of": fn.snapshot_ref, "objective": loss_name, "output": fn.output_names[output],
        "target": None if target is None else np.asarray(target).tolist(),
        "inputs": [{"name": s.name, "shape": list(x.shape), "dtype": x.dtype.name}
                   for s, x in zip(fn.inputs, args, strict=True)],
        "inputs_sha256": _digest(args),
        "no_gradient": _missing(fn, grads),
    }}
    src = RecordsSource(records, label=f"gradients of {fn.snapshot_ref}",
                        framework=fn.framework or "numpy", extra=meta)
    if step is None and tag is None:
        step, tag = weights_step, weights_tag
    return store.write(src, model or f"{base}{GRADIENT_SUFFIX}", step=step, tag=tag,
                       overwrite=overwrite)


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for x in arrays:
        h.update(f"{x.dtype.str}{list(x.shape)}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _missing(fn: StoredFunction, grads: Mapping[str, Any]) -> dict[str, str]:
    """Stored tensors without a gradient, with the reason."""
    out = {}
    for name in fn.snapshot_names:
        if name in grads:
            continue
        if name in fn.weight_of:
            out[name] = "an integer or boolean constant of the graph"
        else:
            out[name] = ("not a weight of the executor: the graph does not compute with it "
                         "(an original of a folded weight, a counter), or holds it as a "
                         "constant (packed types, tensors inside subgraphs)")
    return out
