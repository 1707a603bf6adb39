"""Expanded weights (Distill, "Visualizing Weights"): how an earlier layer's channels act on a
later layer's, through all the layers between them.

``E[j, i, dy, dx]`` is the gradient of target channel ``j`` at the centre position of the
target activation with respect to source channel ``i`` at each position, in the
:func:`linearized` network (ReLUs pass their input, max pooling averages). That network is
affine between the two layers, so the gradient does not depend on the input: it is the
product of the weight tensors along every path, summed over paths (adjacent layers give the
weights themselves; two 3x3 convolutions the full convolution of their kernels, 5x5; a
residual block the identity plus its branch). It is computed for every source channel at
once, by reverse mode, batched over target channels with ``jax.jacrev`` in one jitted
program per model and shapes, and cropped to its non-zero support.

Axis 1 of both activations is the channel axis (ONNX's ``[batch, channels, *spatial]``);
the others after it are spatial. Dense layers (``[batch, features]``) have no spatial axes:
their expanded weights are ``[out, in]`` matrices, the product of the matrices between them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightatlas.errors import NotFoundError, ShapeError

from ._bind import suggest
from ._errors import InputMismatchError
from ._function import OnnxFunction
from ._linearize import linearized, nonaffine_nodes
from ._stored import StoredFunction, layer_output

__all__ = ["ExpandedWeights", "expanded_weights", "layer_value"]

#: Floats of the gradient computed at once (target channels per evaluation follow from it).
BATCH_ELEMENTS = 1 << 25

# Per model: its linearized function and the compiled gradients (which hold the linearized
# function, never the model, so that the entry dies with the model).
_LINEAR: weakref.WeakKeyDictionary[OnnxFunction, tuple[OnnxFunction, dict[Any, Any]]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class ExpandedWeights:
    """Expanded weights between two layers, with what they were computed from.

    Attributes:
        array: ``[n_target, n_source, *kernel]`` float32: row ``r`` is target channel
            ``channels[r]``, column ``i`` source channel ``i``; ``kernel`` has one axis per
            spatial axis of the source (none for dense layers), row = relative y.
        source, target: The executor value names of the two activations.
        source_layer, target_layer: The names they were asked by (a layer, a weight or
            the value name itself).
        channels: The target channels, in the order of ``array``'s rows.
        offsets: Per spatial axis, the source position of kernel index 0 relative to the
            source activation's centre ``(size - 1) // 2``: ``-2`` for a centred 5x5.
            Where source and target have the same resolution this is the article's
            relative position ``(dy, dx)`` of the kernel's first row and column.
        centre: The target position differentiated, ``(size - 1) // 2`` per spatial axis.
        source_shape, target_shape: The activations' shapes for the input used.
        model: How messages name the model.
        nonaffine: Nodes between the layers that stay nonlinear after linearization
            (a sigmoid gate, a layer norm), by label; empty when the result does not
            depend on the input.
        at_border: The support reaches the edge of the source activation, so the input
            may have been too small to hold all of it (or the target sees the whole map).
    """

    array: np.ndarray
    source: str
    target: str
    source_layer: str
    target_layer: str
    channels: tuple[int, ...]
    offsets: tuple[int, ...]
    centre: tuple[int, ...]
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    model: str = ""
    nonaffine: tuple[str, ...] = field(default=())
    at_border: bool = False

    @property
    def affine(self) -> bool:
        """Whether the network between the layers is affine (the result is exact for any
        input)."""
        return not self.nonaffine

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.asarray(result)``: the expanded weights ``[n_target, n_source, *kernel]``."""
        return self.array if dtype is None else self.array.astype(dtype)

    @property
    def kernel(self) -> tuple[int, ...]:
        """The spatial size of each expanded kernel (``()`` for dense layers)."""
        return tuple(self.array.shape[2:])

    def norms(self) -> np.ndarray:
        """``[n_target, n_source]``: the L2 norm of each expanded kernel (float64)."""
        flat = self.array.reshape(self.array.shape[0], self.array.shape[1], -1)
        return np.sqrt(np.einsum("tsk,tsk->ts", flat, flat, dtype=np.float64))

    def strongest(self, channel: int, top: int = 8) -> list[tuple[int, float]]:
        """Target ``channel``'s ``top`` strongest source channels by kernel L2 norm, as
        ``(source channel, norm)``, strongest first (ties: lower channel first)."""
        if channel not in self.channels:
            raise NotFoundError(f"{self.model}: target channel {channel} of {self.target_layer!r}"
                                f" was not computed (channels: {list(self.channels)})")
        norms = self.norms()[self.channels.index(channel)]
        order = np.lexsort((np.arange(norms.size), -norms))[:top]
        return [(int(i), float(norms[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        """The metadata as JSON-ready values (the array as ``shape``, not values)."""
        return {"model": self.model, "source": self.source, "target": self.target,
                "source_layer": self.source_layer, "target_layer": self.target_layer,
                "shape": list(self.array.shape), "channels": list(self.channels),
                "offsets": list(self.offsets), "centre": list(self.centre),
                "source_shape": list(self.source_shape),
                "target_shape": list(self.target_shape), "affine": self.affine,
                "nonaffine": list(self.nonaffine), "at_border": self.at_border}


def layer_value(fn: OnnxFunction, name: str, role: str = "layer") -> str:
    """The executor value a name stands for: a value name as is; a layer or weight name
    (``layer1.0.conv2``, ``layer1.0.conv2.weight``) as the output of the first node that
    computes with that weight and the graph inputs (a stored model's names through
    :func:`~weightatlas.core.executor.layer_output`).

    Raises:
        NotFoundError: No value, weight or layer has that name (close names listed).

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())
        >>> layer_value(fn, "h"), layer_value(fn, "conv2"), layer_value(fn, "conv1.weight")
        ('h', 'y', 'h')
    """
    if isinstance(fn, StoredFunction):
        try:
            return layer_output(fn, name)
        except NotFoundError as e:
            raise NotFoundError(f"{e} (the {role} of the expanded weights)") from e
    for weight in (name, f"{name}.weight", f"{name}.kernel"):
        if weight in fn.weights:
            return _consumer(fn, weight)
        if weight == name and name in fn.value_names():
            return name
    layers = {w.rpartition(".")[0] for w in fn.weights} - {""}
    raise NotFoundError(f"{fn.where}: {role} {name!r} is neither a value of the graph nor a "
                        f"layer or weight{suggest(name, [*fn.value_names(), *layers])}")


def _consumer(fn: OnnxFunction, weight: str) -> str:
    """The first output of the first node reading ``weight`` (or values computed from
    weights alone, such as its transpose) together with a value computed from the inputs."""
    fixed = set(fn.weights) | set(fn.constants)
    derived = {weight}
    for node in fn.graph.nodes:
        reads = [i for i in node.inputs if i]
        if derived.intersection(reads) and not all(i in fixed for i in reads):
            return node.outputs[0]
        if all(i in fixed for i in reads) and not node.subgraphs():
            fixed.update(o for o in node.outputs if o)
            if derived.intersection(reads):
                derived.update(o for o in node.outputs if o)
    return fn.output_of(weight)


def expanded_weights(fn: OnnxFunction, source: str, target: str, *,
                     input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                     inputs: Sequence[Any] | None = None,
                     channels: Sequence[int] | None = None,
                     size: int | Sequence[int] | None = None,
                     batch: int | None = None) -> ExpandedWeights:
    """Expanded weights from the activation ``source`` to the activation ``target``.

    Args:
        fn: The model.
        source: The earlier activation: a value name, or a layer or weight name whose
            node's output it is (``fn.output_of``; stored layer names for stored models).
        target: The later activation, named the same ways.
        input_shape: The input's shape (a mapping by input name for several inputs).
            Needed when the graph's input has symbolic dimensions other than the batch
            (which becomes 1); large enough that the receptive field fits in the
            activations.
        inputs: The point to evaluate at instead of zeros; matters only when the network
            between the layers stays nonlinear (``result.nonaffine``).
        channels: Target channels (default: all).
        size: Crop every kernel to this size (an int for every spatial axis), centred on
            the source's centre (zeros beyond the activation). Default: the smallest box
            holding every non-zero entry (the receptive field).
        batch: Target channels per evaluation (default: as many as
            :data:`BATCH_ELEMENTS` floats of gradient allow).

    Returns:
        The expanded weights, ``[len(channels), source channels, *kernel]``.

    Raises:
        NotFoundError: An unknown value or layer name (close names listed).
        InputMismatchError: ``source`` is not upstream of ``target``, a channel is out of
            range, the source is not floating-point.
        ShapeError: An activation without a channel axis, ``size`` for an activation
            without spatial axes, an input shape that is not fixed.

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())  # conv 1x1 (3 -> 2), relu, conv 3x3
        >>> e = expanded_weights(fn, "x", "y")
        >>> e.array.shape, e.offsets
        ((2, 3, 3, 3), (-1, -1))
        >>> w1, w2 = fn.weights["conv1.weight"], fn.weights["conv2.weight"]
        >>> bool(np.allclose(e.array, np.einsum("jbyx,bi->jiyx", w2, w1[:, :, 0, 0])))
        True
    """
    import jax

    src = layer_value(fn, source, "source")
    tgt = layer_value(fn, target, "target")
    if fn not in _LINEAR:
        _LINEAR[fn] = (linearized(fn), {})
    lin, cache = _LINEAR[fn]
    bad, connected = nonaffine_nodes(lin.graph, src, tgt)
    if not connected:
        names = f"{source!r}" + (f" (value {src!r})" if src != source else "")
        namet = f"{target!r}" + (f" (value {tgt!r})" if tgt != target else "")
        why = "they are the same value" if src == tgt else "no path of the graph leads from it"
        raise InputMismatchError(f"{fn.where}: source {names} is not upstream of target "
                                 f"{namet}: {why}; give an earlier source or a later target")
    xs, fixed = _inputs(lin, input_shape, inputs)
    weights = fn.device_weights()

    def values(w: Any, dyn: tuple[Any, ...]) -> Any:
        return lin.apply_with(w, *_merge(fixed, dyn), read=[src, tgt])[1]

    shapes = jax.eval_shape(values, weights, xs)
    s_shape, t_shape = tuple(shapes[src].shape), tuple(shapes[tgt].shape)
    for role, name, shape in (("source", source, s_shape), ("target", target, t_shape)):
        if len(shape) < 2:
            raise ShapeError(f"{fn.where}: {role} {name!r} has shape {list(shape)}; expanded "
                             "weights need a [batch, channels, ...] activation")
    if not np.issubdtype(np.dtype(shapes[src].dtype), np.floating):
        raise InputMismatchError(f"{fn.where}: source {source!r} holds {shapes[src].dtype} "
                                 "values; gradients need a floating-point activation")
    n_target = t_shape[1]
    chosen = list(range(n_target)) if channels is None else [int(c) for c in channels]
    wrong = [c for c in chosen if not 0 <= c < n_target]
    if wrong or not chosen:
        raise InputMismatchError(f"{fn.where}: target {target!r} has {n_target} channels; "
                                 f"channels {wrong or chosen} are not in 0..{n_target - 1}")
    spatial = s_shape[2:]
    window = _window(fn.where, source, spatial, size)
    centre = tuple((d - 1) // 2 for d in t_shape[2:])
    per_channel = max(1, math.prod(s_shape[1:]))
    per = batch if batch is not None else max(1, BATCH_ELEMENTS // per_channel)
    if per < 1:
        raise InputMismatchError(f"{fn.where}: batch={batch}; give at least 1")
    per = min(per, len(chosen))
    per = -(-len(chosen) // -(-len(chosen) // per))  # balanced chunks, the last barely padded
    key = (src, tgt, per, tuple((np.shape(x), str(np.asarray(x).dtype)) for x in xs),
           tuple((i, v.tobytes()) for i, v in fixed.items()))
    if key not in cache:
        cache[key] = jax.jit(_gradient(lin, src, tgt, fixed, s_shape, shapes[src].dtype, centre))
    run = cache[key]
    parts = []
    with jax.default_matmul_precision("highest"):
        for start in range(0, len(chosen), per):
            idx = chosen[start:start + per]
            padded = np.asarray(idx + [idx[-1]] * (per - len(idx)), np.int32)
            jac = np.asarray(run(weights, xs, padded), np.float32)[:len(idx)]
            parts.append(_crop(jac, window) if window else _support(jac))
    array, origin = _assemble(parts, spatial, window)
    s_centre = tuple((d - 1) // 2 for d in spatial)
    edge = any(o <= 0 or o + k >= d for o, k, d in zip(origin, array.shape[2:], spatial,
                                                        strict=True))
    return ExpandedWeights(
        array=array, source=src, target=tgt, source_layer=source, target_layer=target,
        channels=tuple(chosen), offsets=tuple(o - c for o, c in zip(origin, s_centre,
                                                                     strict=True)),
        centre=centre, source_shape=s_shape, target_shape=t_shape, model=fn.where,
        # A target without spatial axes (a dense layer) sees the whole source at any input
        # size: reaching the edge says nothing about the input being too small.
        nonaffine=tuple(bad), at_border=bool(spatial) and bool(t_shape[2:]) and edge
        and window is None)


def _gradient(lin: OnnxFunction, src: str, tgt: str, fixed: dict[int, np.ndarray],
              s_shape: tuple[int, ...], dtype: Any, centre: tuple[int, ...]) -> Any:
    """``run(weights, dynamic inputs, target channels) -> [channels, *source[1:]]``."""
    import jax
    import jax.numpy as jnp

    def run(w: Any, dyn: tuple[Any, ...], idx: Any) -> Any:
        def at_centre(delta: Any) -> Any:
            _, vals = lin.apply_with(w, *_merge(fixed, dyn), add={src: delta}, read=[tgt])
            return vals[tgt][(0, slice(None), *centre)][idx]

        return jax.jacrev(at_centre)(jnp.zeros(s_shape, dtype))[:, 0]

    return run


def _merge(fixed: dict[int, np.ndarray], dyn: tuple[Any, ...]) -> list[Any]:
    it = iter(dyn)
    return [fixed[i] if i in fixed else next(it) for i in range(len(fixed) + len(dyn))]


def _inputs(fn: OnnxFunction, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None,
            given: Sequence[Any] | None) -> tuple[tuple[np.ndarray, ...], dict[int, np.ndarray]]:
    """(the dynamic inputs, the static ones by position): ``given``, or zeros."""
    if given is not None:
        arrays = [np.asarray(x) for x in given]
        if len(arrays) != len(fn.inputs):
            raise InputMismatchError(f"{fn.where}: expects {len(fn.inputs)} inputs "
                                     f"{list(fn.input_names)}, got {len(arrays)}")
    else:
        if fn.static_inputs:
            raise InputMismatchError(
                f"{fn.where}: inputs {sorted(fn.static_inputs)} fix shapes, so zeros cannot "
                "stand for them; give every input in inputs=")
        shapes: dict[str, Sequence[int]] = {}
        if isinstance(input_shape, Mapping):
            shapes = dict(input_shape)
            unknown = sorted(set(shapes) - set(fn.input_names))
            if unknown:
                raise InputMismatchError(f"{fn.where}: input_shape names {unknown[0]!r}, not "
                                         f"an input (inputs: {list(fn.input_names)})")
        elif input_shape is not None:
            if len(fn.inputs) != 1:
                raise InputMismatchError(f"{fn.where}: the model has inputs "
                                         f"{list(fn.input_names)}; give input_shape as a "
                                         "mapping {name: shape}")
            shapes = {fn.inputs[0].name: input_shape}
        arrays = []
        for spec in fn.inputs:
            shape = shapes.get(spec.name)
            if shape is None:
                declared = list(spec.shape or [])
                if spec.shape is None or any(not isinstance(d, int)
                                             for d in declared[1:]):
                    raise ShapeError(f"{fn.where}: input {spec.name!r} has shape {declared} "
                                     "with dimensions fixed only at run time; give "
                                     "input_shape=(1, 3, 224, 224) or the like")
                shape = [d if isinstance(d, int) else 1 for d in declared]
            arrays.append(np.zeros(tuple(int(d) for d in shape), spec.dtype or np.float32))
    fixed = {i: x for i, (x, s) in enumerate(zip(arrays, fn.inputs, strict=True))
             if s.name in fn.static_inputs}
    return tuple(x for i, x in enumerate(arrays) if i not in fixed), fixed


def _window(where: str, source: str, spatial: tuple[int, ...],
            size: int | Sequence[int] | None) -> list[tuple[int, int]] | None:
    """``[(start, stop)]`` per spatial axis for a forced ``size``; None for the support."""
    if size is None:
        return None
    if not spatial:
        raise ShapeError(f"{where}: size={size!r} crops spatial axes, and source {source!r} "
                         "has none (a [batch, features] activation); leave size out")
    sizes = [int(size)] * len(spatial) if isinstance(size, int) else [int(s) for s in size]
    if len(sizes) != len(spatial) or min(sizes) < 1:
        raise ShapeError(f"{where}: size={size!r}; expected a positive int or one per "
                         f"spatial axis of source {source!r} ({len(spatial)})")
    return [((d - 1) // 2 - (k - 1) // 2, (d - 1) // 2 - (k - 1) // 2 + k)
            for d, k in zip(spatial, sizes, strict=True)]


def _crop(jac: np.ndarray, window: list[tuple[int, int]]) -> tuple[np.ndarray, list[int]]:
    """The window of ``jac``'s spatial axes, zero where it leaves the activation."""
    out = np.zeros((*jac.shape[:2], *(b - a for a, b in window)), np.float32)
    src, dst = [slice(None)] * 2, [slice(None)] * 2
    for (a, b), d in zip(window, jac.shape[2:], strict=True):
        lo, hi = max(a, 0), min(b, d)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - a, max(hi, lo) - a))
    out[tuple(dst)] = jac[tuple(src)]
    return out, [a for a, _ in window]


def _support(jac: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The smallest box of ``jac``'s spatial axes holding its non-zero entries."""
    spatial = jac.shape[2:]
    if not spatial:
        return jac, []
    mask = np.any(jac != 0, axis=(0, 1))
    box = []
    for axis, d in enumerate(spatial):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(len(spatial))
                                                     if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else ((d - 1) // 2,
                                                                     (d - 1) // 2 + 1))
    return jac[(slice(None), slice(None), *(slice(a, b) for a, b in box))], [a for a, _ in box]


def _assemble(parts: list[tuple[np.ndarray, list[int]]], spatial: tuple[int, ...],
              window: list[tuple[int, int]] | None) -> tuple[np.ndarray, list[int]]:
    """One array from the chunks, on the union of their boxes."""
    if window is not None or not spatial or len(parts) == 1:
        return np.concatenate([p for p, _ in parts]), parts[0][1]
    lo = [min(o[a] for _, o in parts) for a in range(len(spatial))]
    hi = [max(o[a] + p.shape[2 + a] for p, o in parts) for a in range(len(spatial))]
    n_source = parts[0][0].shape[1]
    out = np.zeros((sum(p.shape[0] for p, _ in parts), n_source,
                    *(h - lo_ for lo_, h in zip(lo, hi, strict=True))), np.float32)
    row = 0
    for p, o in parts:
        where = (slice(row, row + p.shape[0]), slice(None),
                 *(slice(o[a] - lo[a], o[a] - lo[a] + p.shape[2 + a])
                   for a in range(len(spatial))))
        out[where] = p
        row += p.shape[0]
    return out, lo


def _doc_model() -> Any:
    """x [1, 3, 7, 7] -> 1x1 conv (3 -> 4) -> ReLU -> 3x3 conv (4 -> 2, pad 1) -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
                                 "conv1.weight")
    w2 = numpy_helper.from_array(rng.normal(size=(2, 4, 3, 3)).astype(np.float32),
                                 "conv2.weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv1.weight"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "conv2.weight"], ["y"], pads=[1, 1, 1, 1])], "doc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 7, 7])], [w1, w2])
    return helper.make_model(graph)
