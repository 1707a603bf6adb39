"""Occlusion on onnxruntime: attributions for any model, even one the executor cannot trace.

A window slides over the input (Captum's ``Occlusion``: window shapes and strides per
non-batch axis, the last window clipped at the border); each position's attribution is
the drop of the target score when a window covering it is replaced by the baseline,
averaged over the windows that cover it. Every evaluation is an onnxruntime run of the
model with its weights, so no gradient and no JAX tracing is involved.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import ShapeError

from ._errors import InputMismatchError
from ._function import OnnxFunction

if TYPE_CHECKING:
    import onnx

__all__ = ["occlusion"]


def occlusion(model: OnnxFunction | onnx.ModelProto, inputs: Any, target: Any, *,
              window: Sequence[int], strides: int | Sequence[int] = 1, baseline: Any = 0.0,
              output: int = 0, others: Sequence[Any] = (), input_index: int = 0,
              weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """Occlusion attributions, computed with onnxruntime.

    Args:
        model: An :class:`OnnxFunction` (its model runs with its weights) or an ONNX model.
        inputs: The attributed input, batch first.
        target: A class index, or one per example, of the ``[batch, classes]`` output.
        window: The occluding window's shape over the non-batch axes, e.g. ``(3, 8, 8)``.
        strides: The window's step on each of those axes (one int for all).
        baseline: The value written into the window (scalar or broadcastable array).
        output: Which graph output holds the scores.
        others: The model's other inputs, in graph order.
        input_index: Position of the attributed input among the graph inputs.
        weights: Initializer values to run with, by name (default: the function's).

    Returns:
        An array shaped like ``inputs``.

    Example:
        >>> from weightatlas.core.executor._saliency import _doc_model
        >>> occlusion(_doc_model(), np.ones((1, 2), np.float32), 1, window=[1]).tolist()
        [[-2.0, 4.0]]
    """
    x = np.asarray(inputs)
    where = model.where if isinstance(model, OnnxFunction) else (model.graph.name or "model")
    dims = x.shape[1:]
    window = [int(w) for w in window]
    steps = [int(strides)] * len(dims) if isinstance(strides, int) else [int(s) for s in strides]
    if len(window) != len(dims) or len(steps) != len(dims):
        raise ShapeError(f"{where}: window {window} and strides {steps} need one entry per "
                         f"non-batch axis of an input of shape {list(x.shape)}")
    if any(w < 1 or w > d for w, d in zip(window, dims, strict=True)) or min(steps) < 1:
        raise ShapeError(f"{where}: window {window} with strides {steps} does not fit an "
                         f"input of shape {list(x.shape)}")
    session, names = _session(model, weights)
    feeds = {name: np.asarray(v) for name, v in zip(names, _full(x, others, input_index),
                                                     strict=True)}
    attributed = names[input_index]

    def score(values: np.ndarray) -> np.ndarray:
        out = session.run(None, {**feeds, attributed: values})[output]
        if out.ndim != 2:
            raise ShapeError(f"{where}: target selects a class of a 2-d [batch, classes] "
                             f"output; output #{output} has shape {list(out.shape)}")
        return np.asarray(out, np.float64)

    reference = score(x)
    targets = np.broadcast_to(np.asarray(target), (x.shape[0],))
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or \
            targets.max() >= reference.shape[1]:
        raise InputMismatchError(f"{where}: target {target!r} is not a class index of an "
                                 f"output with {reference.shape[1]} classes")
    rows = np.arange(x.shape[0])
    base = np.broadcast_to(np.asarray(baseline, dtype=x.dtype), x.shape)
    total = np.zeros(x.shape, np.float64)
    count = np.zeros(dims, np.float64)
    counts = [math.ceil((d - w) / s) + 1 for d, w, s in zip(dims, window, steps, strict=True)]
    for corner in itertools.product(*(range(c) for c in counts)):
        region = tuple(slice(i * s, i * s + w) for i, s, w in zip(corner, steps, window,
                                                                  strict=True))
        occluded = x.copy()
        occluded[(slice(None), *region)] = base[(slice(None), *region)]
        drop = reference[rows, targets] - score(occluded)[rows, targets]
        total[(slice(None), *region)] += drop.reshape((-1,) + (1,) * len(dims))
        count[region] += 1
    return (total / count).astype(x.dtype)


def _full(x: np.ndarray, others: Sequence[Any], index: int) -> list[Any]:
    rest = list(others)
    return [*rest[:index], x, *rest[index:]]


def _session(model: OnnxFunction | onnx.ModelProto, weights: Mapping[str, Any] | None
             ) -> tuple[Any, list[str]]:
    """An onnxruntime session of the model with the given weights, and its input names."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    if isinstance(model, OnnxFunction):
        if model.model is None:
            raise InputMismatchError(f"{model.where}: this function was built without its "
                                     "ONNX model, which occlusion runs on onnxruntime")
        values = {**model.constants, **model.weights, **dict(weights or {})}
        proto = model.model
    else:
        values = dict(weights or {})
        proto = model
    if values:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        held = {t.name: t for t in proto.graph.initializer}
        for name, value in values.items():
            tensor = numpy_helper.from_array(np.asarray(value), name)
            if name in held:
                held[name].CopyFrom(tensor)
            else:
                proto.graph.initializer.append(tensor)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    inits = {t.name for t in proto.graph.initializer}
    names = [i.name for i in session.get_inputs() if i.name not in inits]
    return session, names
