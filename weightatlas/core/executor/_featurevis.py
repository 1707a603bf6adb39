"""Feature visualization: images optimized to excite one channel or neuron of any value of
a graph the executor runs, in the manner of Lucid (Olah et al., "Feature Visualization",
Distill 2017).

Several channels are visualized at once: image ``i`` maximizes channel ``channels[i]``,
all images in one batch, one jitted step (parametrization, random transformations, the
model up to the value, the objective, its gradient and an Adam update). The images are
parametrized in a decorrelated Fourier basis (``_fv_param``), squashed into [0, 1] by a
sigmoid, and randomly translated, scaled and rotated at each step (``_fv_transforms``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightatlas.errors import NotFoundError, ShapeError, UnsupportedError

from ._bind import suggest
from ._errors import InputMismatchError
from ._function import OnnxFunction
from ._fv_param import (
    adam_init,
    adam_update,
    color_matrix,
    fourier_image,
    spectrum_scale,
    to_rgb,
)
from ._fv_transforms import Transforms
from ._saliency import compiled_cache

__all__ = ["OBJECTIVES", "PARAMETRIZATIONS", "FeatureVisResult", "feature_visualization"]

#: What image ``i`` maximizes: the mean of channel ``c`` over its positions, or the
#: activation at its centre position (Lucid's ``channel`` and ``neuron`` objectives).
OBJECTIVES = ("channel", "neuron")
#: How the image is parametrized.
PARAMETRIZATIONS = ("fourier", "pixel")



@dataclass(frozen=True)
class FeatureVisResult:
    """The optimized images and how the objective went.

    Attributes:
        images: ``[n, c, h, w]`` float32 in [0, 1], before ``normalize``; image ``i``
            visualizes ``channels[i]``.
        objective: ``[steps, n]``: each image's objective at each step (on the randomly
            transformed image the step saw).
        final: ``[n]``: each image's objective on the final image, untransformed.
        channels: The channels visualized (with ``directions``: ``0..n-1``).
        value: The graph value they belong to.
        kind: ``"channel"`` or ``"neuron"``.
    """

    images: np.ndarray
    objective: np.ndarray
    final: np.ndarray
    channels: tuple[int, ...]
    value: str
    kind: str

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.asarray(result)``: the images."""
        return self.images if dtype is None else self.images.astype(dtype)


@dataclass(frozen=True)
class _Plan:
    """Everything checked before optimizing."""

    c: int
    h: int
    w: int
    per_image: bool        # the graph's batch is fixed at 1: vmap over the images
    center: tuple[int, ...]


def _plan(fn: OnnxFunction, value: str, channels: list[int], objective: str,
          size: int | Sequence[int] | None, weights: Mapping[str, Any], chunk: int,
          directions: np.ndarray | None) -> _Plan:
    import jax

    where = fn.where
    if objective not in OBJECTIVES:
        raise UnsupportedError(f"{where}: objective={objective!r}; expected one of "
                               f"{', '.join(OBJECTIVES)}")
    known = fn.value_names()
    if value not in known:
        raise NotFoundError(f"{where}: the graph has no value named {value!r}"
                            f"{suggest(value, known)}")
    if len(fn.inputs) != 1:
        raise UnsupportedError(f"{where}: feature visualization optimizes the one image input "
                               f"of a model; this one has inputs {list(fn.input_names)}")
    spec = fn.inputs[0]
    ishape = spec.shape
    if ishape is None or len(ishape) != 4 or not isinstance(ishape[1], int):
        raise ShapeError(f"{where}: input {spec.name!r} has shape {list(ishape or ())}; feature "
                         "visualization needs an image input [batch, channels, height, width] "
                         "with a fixed number of channels")
    if np.dtype(spec.dtype).kind != "f":
        raise InputMismatchError(f"{where}: input {spec.name!r} holds {spec.dtype} values; "
                                 "feature visualization needs a floating-point image input")
    n_channels = int(ishape[1])
    hw: list[Any] = list(ishape[2:])
    if size is not None:
        want = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
        if len(want) != 2 or min(want) < 1:
            raise ShapeError(f"{where}: size={size!r}; expected an int or (height, width)")
        fixed = [d for d, s in zip(hw, want, strict=True) if isinstance(d, int) and d != s]
        if fixed:
            raise InputMismatchError(f"{where}: input {spec.name!r} has shape "
                                     f"{list(ishape or ())}; size={size!r} does not fit it")
        hw = want
    if not all(isinstance(d, int) for d in hw):
        raise ShapeError(f"{where}: input {spec.name!r} has shape {list(ishape or ())}; give "
                         "the image size (size=...)")
    h, w = int(hw[0]), int(hw[1])
    batch = ishape[0]
    per_image = batch == 1 and chunk != 1
    if isinstance(batch, int) and batch not in (1, chunk):
        raise ShapeError(f"{where}: input {spec.name!r} has a fixed batch of {batch}; "
                         f"optimize {batch} images at a time (batch={batch}), or export the "
                         "model with a batch of 1 or a symbolic batch")
    probe = 1 if per_image or batch == 1 else chunk
    x = jax.ShapeDtypeStruct((probe, n_channels, h, w), np.float32)
    shape = jax.eval_shape(lambda w_, x_: fn.apply_with(w_, x_, read=[value])[1][value],
                           dict(weights), x).shape
    if len(shape) < 2 or shape[0] != probe:
        raise ShapeError(f"{where}: value {value!r} has shape {list(shape)} for an input of "
                         f"shape {[probe, n_channels, h, w]}; feature visualization needs "
                         "an activation [batch, channels, ...]")
    if objective == "neuron" and len(shape) != 4:
        raise ShapeError(f"{where}: objective='neuron' takes the centre position of a 4-d "
                         f"activation [batch, channels, height, width]; value {value!r} has "
                         f"shape {list(shape)} (use objective='channel')")
    if directions is not None:
        if directions.ndim != 2 or directions.shape[1] != shape[1] or not len(directions):
            raise InputMismatchError(f"{where}: value {value!r} has {shape[1]} channels (shape "
                                     f"{list(shape)}); directions must be [n, {shape[1]}], got "
                                     f"{list(directions.shape)}")
        if not np.isfinite(directions).all():
            raise InputMismatchError(f"{where}: directions hold NaN or Inf values")
        return _Plan(n_channels, h, w, per_image, tuple((d - 1) // 2 for d in shape[2:]))
    bad = [c for c in channels if not 0 <= c < shape[1]]
    if bad or not channels:
        raise InputMismatchError(f"{where}: value {value!r} has {shape[1]} channels (shape "
                                 f"{list(shape)}); channels {bad or channels} are not in "
                                 f"0..{shape[1] - 1}")
    center = tuple((d - 1) // 2 for d in shape[2:])
    return _Plan(n_channels, h, w, per_image, center)


def feature_visualization(
    fn: OnnxFunction,
    value: str,
    channels: int | Sequence[int] | None,
    *,
    objective: str = "channel",
    directions: Any = None,
    size: int | Sequence[int] | None = None,
    steps: int = 256,
    lr: float = 0.05,
    jitter: int = 8,
    scales: Sequence[float] = (1, 0.975, 1.025, 0.95, 1.05),
    rotate: Sequence[float] = (-10, -5, 0, 5, 10),
    parametrization: str = "fourier",
    decorrelate: bool = True,
    decay_power: float = 1.0,
    sd: float = 0.01,
    normalize: tuple[Any, Any] | None = None,
    seed: int = 0,
    batch: int | None = None,
    weights: Mapping[str, Any] | None = None,
) -> FeatureVisResult:
    """Images that maximize channels (or centre neurons) of the graph value ``value``.

    Image ``i`` maximizes ``channels[i]`` by gradient ascent on its parameters; all the
    images are optimized together, ``batch`` at a time, each from its own random start
    (so an image does not depend on ``batch``).

    Args:
        fn: The model; its one input must be an image ``[batch, channels, h, w]``.
        value: A value of the graph (``fn.value_names()``; ``fn.output_of(weight)`` names
            the output of the layer that reads a weight).
        channels: The channels of ``value`` to visualize (None with ``directions``).
        objective: ``"channel"``: the channel's mean over positions; ``"neuron"``: its
            value at the centre position ``((h - 1) // 2, (w - 1) // 2)`` of a 4-d activation
            (the position :func:`expanded_weights` differentiates; Lucid uses ``h // 2``,
            the same for odd sizes).
        directions: Instead of channels, ``[n, channels]`` directions in the channel space
            of ``value``: image ``i`` maximizes the dot product of the activation with
            ``directions[i]``, averaged over positions (``"channel"``: Lucid's
            ``direction``) or at the centre (``"neuron"``: ``direction_neuron``, the
            article's visualization of a kernel position or of an NMF factor).
        size: Image size ``h`` or ``(h, w)``, required when the input's is symbolic.
        steps: Optimization steps.
        lr: Adam's learning rate.
        jitter: Largest random translation in pixels (0: none).
        scales: Random scale factors.
        rotate: Random rotation angles in degrees.
        parametrization: ``"fourier"`` (decorrelated spectrum scaled by 1/frequency) or
            ``"pixel"``.
        decorrelate: Map 3 channels through Lucid's colour decorrelation (identity for
            other channel counts).
        decay_power: Exponent of the 1/frequency scaling of the spectrum.
        sd: Standard deviation of the random start.
        normalize: ``(mean, std)`` (scalars or one per channel): the model sees
            ``(image - mean) / std``.
        seed: Seed of the random starts and transformations.
        batch: Images optimized at once (default: all; for a graph exported with a fixed
            batch ``k > 1``, ``k``).
        weights: Weights to use instead of the model's.

    Returns:
        A :class:`FeatureVisResult`.

    Raises:
        NotFoundError: No value named ``value`` (close names are suggested).
        InputMismatchError: A channel out of range, or an image size that does not fit.
        ShapeError: A model input that is not an image, or a value that is not an
            activation (not 4-d, for ``objective="neuron"``).
        UnsupportedError: An unknown objective or parametrization, or bad settings.

    Everything is checked before the first step.

    Example:
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> k = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "k")
        >>> g = helper.make_graph(
        ...     [helper.make_node("Conv", ["x", "k"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [k])
        >>> from weightatlas.core.executor import from_onnx
        >>> fn = from_onnx(helper.make_model(g))
        >>> r = feature_visualization(fn, "y", [0, 1], steps=8)
        >>> r.images.shape, bool(r.final[0] > r.objective[0, 0])
        ((2, 1, 8, 8), True)
    """
    import jax
    import jax.numpy as jnp

    if (channels is None) == (directions is None):
        raise UnsupportedError(f"{fn.where}: give either channels or directions (got "
                               f"{'both' if channels is not None else 'neither'})")
    dirs = None if directions is None else np.asarray(directions, np.float32)
    if channels is None:
        chans = list(range(len(dirs) if dirs is not None and dirs.ndim else 0))
    elif isinstance(channels, str | bytes) or not (
            isinstance(channels, int | np.integer)
            or all(isinstance(c, int | np.integer) for c in channels)):
        raise UnsupportedError(f"{fn.where}: channels={channels!r}; expected a channel "
                               "index or a sequence of them")
    else:
        chans = [int(channels)] if isinstance(channels, int | np.integer) else [
            int(c) for c in channels]
    if parametrization not in PARAMETRIZATIONS:
        raise UnsupportedError(f"{fn.where}: parametrization={parametrization!r}; expected "
                               f"one of {', '.join(PARAMETRIZATIONS)}")
    whole = isinstance(steps, int | np.integer)
    if not whole or steps < 1 or not lr > 0 or jitter < 0 or sd < 0 or any(
            s <= 0 for s in scales):
        raise UnsupportedError(f"{fn.where}: steps={steps}, lr={lr}, jitter={jitter}, sd={sd}"
                               f", scales={tuple(scales)}; expected steps >= 1, lr > 0, "
                               "jitter >= 0, sd >= 0 and positive scales")
    if batch is not None and batch < 1:
        raise UnsupportedError(f"{fn.where}: batch={batch}; expected at least 1")
    w_ = fn.device_weights() if weights is None else dict(weights)
    n = len(chans)
    chunk = max(1, n if batch is None else min(batch, n))
    fixed = fn.inputs[0].shape[0] if fn.inputs and fn.inputs[0].shape else None
    if batch is None and isinstance(fixed, int) and fixed > 1:
        chunk = fixed  # a graph exported with a fixed batch: that many images at a time
    plan = _plan(fn, value, chans, objective, size, w_, chunk, dirs)
    mean, std = _normalization(fn.where, normalize, plan.c)
    tf = Transforms.of(jitter, scales, rotate)
    settings = (value, objective, dirs is not None, plan, parametrization, decorrelate,
                float(decay_power), float(lr), tf, mean.tobytes(), std.tobytes(), chunk,
                tuple(sorted((k, np.shape(v)) for k, v in w_.items())))
    cache = compiled_cache(fn, "_feature_vis_programs")
    if settings not in cache:
        cache[settings] = _compile(fn, value, objective, dirs is not None, plan,
                                   parametrization, decorrelate, decay_power, float(lr), tf,
                                   mean, std)
    init, step, render = cache[settings]
    base = jax.random.key(seed)
    images, curves, finals = [], [], []
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        pad = idx + [idx[-1]] * (chunk - len(idx))  # one compiled shape for every chunk
        index = jnp.asarray(pad, jnp.int32)
        target = (jnp.asarray(dirs[pad]) if dirs is not None
                  else jnp.asarray([chans[i] for i in pad], jnp.int32))
        params = init(base, index, float(sd))
        state = adam_init(params)
        trace = []
        for t in range(steps):
            params, state, obj = step(w_, params, state, base, index, target, t)
            trace.append(obj)
        image, final = render(w_, params, target)
        keep = len(idx)
        images.append(np.asarray(image)[:keep])
        curves.append(np.asarray(jnp.stack(trace))[:, :keep])
        finals.append(np.asarray(final)[:keep])
    return FeatureVisResult(
        images=np.concatenate(images).astype(np.float32),
        objective=np.concatenate(curves, axis=1).astype(np.float32),
        final=np.concatenate(finals).astype(np.float32), channels=tuple(chans),
        value=value, kind=objective)


def _normalization(where: str, normalize: tuple[Any, Any] | None, c: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    if normalize is None:
        return np.zeros((1, 1, 1), np.float32), np.ones((1, 1, 1), np.float32)
    try:
        mean, std = (np.asarray(v, np.float32).reshape(-1) for v in normalize)
    except (TypeError, ValueError) as e:
        raise UnsupportedError(f"{where}: normalize={normalize!r}; expected (mean, std)") from e
    if mean.size not in (1, c) or std.size not in (1, c) or not (std > 0).all():
        raise UnsupportedError(f"{where}: normalize={normalize!r}; expected a mean and a "
                               f"positive std, each a number or one per channel ({c})")
    return (np.broadcast_to(mean, (c,)).reshape(c, 1, 1).copy(),
            np.broadcast_to(std, (c,)).reshape(c, 1, 1).copy())


def _compile(fn: OnnxFunction, value: str, objective: str, direction: bool, plan: _Plan,
             parametrization: str, decorrelate: bool, decay_power: float, lr: float,
             tf: Transforms, mean: np.ndarray, std: np.ndarray) -> tuple[Any, Any, Any]:
    """The jitted ``init``, ``step`` and ``render`` functions for one setting."""
    import jax
    import jax.numpy as jnp

    c, h, w = plan.c, plan.h, plan.w
    matrix = jnp.asarray(color_matrix(c, decorrelate))
    scale = jnp.asarray(spectrum_scale(h, w, decay_power))
    shape = (c, h, w // 2 + 1, 2) if parametrization == "fourier" else (c, h, w)

    def init(base: Any, index: Any, sd: float) -> Any:
        def one(i: Any) -> Any:
            return jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32) * sd
        return jax.vmap(one)(index)

    def image(params: Any) -> Any:
        raw = fourier_image(params, scale, h, w) if parametrization == "fourier" else params
        return to_rgb(raw, matrix)

    def select(act: Any, channel: Any) -> Any:
        a = jnp.tensordot(channel, act, axes=(0, 0)) if direction else jnp.take(
            act, channel, axis=0)
        if objective == "neuron":
            return a[plan.center]
        return jnp.mean(a)

    def activation(weights: Any, x: Any) -> Any:
        return fn.apply_with(weights, x, read=[value])[1][value]

    def objectives(weights: Any, x: Any, target: Any) -> Any:
        x = (x - mean) / std
        if plan.per_image:
            acts = jax.vmap(lambda xi: activation(weights, xi[None])[0])(x)
        else:
            acts = activation(weights, x)
        return jax.vmap(select)(acts, target)

    def loss(params: Any, weights: Any, moves: Any, target: Any) -> tuple[Any, Any]:
        x = image(params)
        if not tf.identity:
            x = jax.vmap(tf.apply)(x, moves)
        obj = objectives(weights, x, target)
        return -jnp.sum(obj), obj

    def step(weights: Any, params: Any, state: Any, base: Any, index: Any, target: Any,
             t: Any) -> tuple[Any, Any, Any]:
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), t + 1))(index)
        moves = jax.vmap(tf.sample)(keys)
        grads, obj = jax.grad(loss, has_aux=True)(params, weights, moves, target)
        params, state = adam_update(params, grads, state, lr)
        return params, state, obj

    def render(weights: Any, params: Any, target: Any) -> tuple[Any, Any]:
        x = image(params)
        return x, objectives(weights, x, target)

    return (jax.jit(init, static_argnums=2), jax.jit(step), jax.jit(render))
