"""Gradient attributions for any model the executor runs: saliency, gradient x input,
integrated gradients, SmoothGrad, Grad-CAM, and gradients with respect to weights.

Each attribution is one jitted JAX function of (weights, input, targets, ...), compiled
once per model, input signature and settings, and cached for the model's lifetime:
repeated calls run the compiled program and nothing else. Integrated gradients and
SmoothGrad evaluate their steps or samples as one batched (``vmap``) gradient; with
``internal_batch_size`` (Captum's memory bound, in examples) the steps are split into
equal chunks, each one batched evaluation, run one after another. Conventions follow Captum's
(``Saliency``, ``InputXGradient``, ``IntegratedGradients``, ``NoiseTunnel``,
``LayerGradCam``), so that results can be compared with it directly.

The attributed input is ``inputs`` (the first graph input, or ``input_index``); the
other graph inputs come in ``others``. ``target`` picks, for each example ``n``, the
scalar ``outputs[output][n, target[n]]`` whose gradient is taken (one int for all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from weightatlas.errors import ShapeError

from ._errors import InputMismatchError
from ._function import OnnxFunction

__all__ = ["grad_cam", "gradient", "gradient_x_input", "ig_steps", "integrated_gradients",
           "saliency", "smoothgrad", "smoothgrad_noise", "weight_gradients"]

_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
            "riemann_middle")



def compiled_cache(fn: OnnxFunction, key: str) -> dict[Any, Any]:
    """The compiled programs of one kind kept for ``fn``, on ``fn`` itself.

    The programs close over ``fn`` (its ``apply``), so a cache keyed by ``fn`` outside it
    would keep every model alive; stored on the function, the two form a cycle that the
    garbage collector frees with the model.
    """
    cache: dict[Any, Any] = fn.__dict__.setdefault(key, {})
    return cache


class _Setup:
    """The pieces every attribution needs: input layout, targets, cache."""

    def __init__(self, fn: OnnxFunction, inputs: Any, target: Any, output: int,
                 others: Sequence[Any], input_index: int, weights: Mapping[str, Any] | None,
                 kind: str, settings: tuple[Any, ...]) -> None:
        import jax

        self.fn = fn
        if len(others) != len(fn.inputs) - 1:
            raise InputMismatchError(
                f"{fn.where}: the model has {len(fn.inputs)} inputs {list(fn.input_names)}; "
                f"give the {len(fn.inputs) - 1} besides the attributed one in others=")
        self.x = np.asarray(inputs)
        spec = fn.inputs[input_index]
        if not np.issubdtype(self.x.dtype, np.floating):
            raise InputMismatchError(f"{fn.where}: input {spec.name!r} holds "
                                     f"{self.x.dtype.name} values; gradients need a "
                                     "floating-point input")
        self.index = input_index
        # The other inputs: static ones (shape-fixing) are closed over and part of the
        # cache key; the rest are arguments of the compiled function.
        others = [np.asarray(o) for o in others]
        positions = [i + (i >= input_index) for i in range(len(others))]
        self.static = {p: o for p, o in zip(positions, others, strict=True)
                       if fn.inputs[p].name in fn.static_inputs}
        self.others = tuple(o for p, o in zip(positions, others, strict=True)
                            if p not in self.static)
        cache = compiled_cache(fn, "_attribution_programs")
        self.weights = fn.device_weights() if weights is None else dict(weights)
        # The model's own weights are constants of the compiled program (XLA lays out
        # and flips convolution kernels once, at compile time, instead of at each
        # call); given weights are arguments.
        self.held = (tuple((k, id(v)) for k, v in self.weights.items())
                     if weights is None else None)
        signature = (kind, settings, output, input_index, self.x.shape, str(self.x.dtype),
                     tuple((o.shape, str(o.dtype)) for o in others),
                     tuple((p, o.tobytes()) for p, o in self.static.items()),
                     tuple(sorted((k, np.shape(v)) for k, v in self.weights.items())),
                     weights is None)
        if signature not in cache:
            shapes = jax.eval_shape(lambda: fn.apply(self.weights,
                                                     *self.full(self.x, self.others)))
            if not 0 <= output < len(shapes) or len(shapes[output].shape) != 2:
                found = [list(s.shape) for s in shapes]
                raise ShapeError(f"{fn.where}: target selects a class of a 2-d [batch, "
                                 f"classes] output; output #{output} of {found} is not one")
            cache[signature] = [None, shapes[output].shape, None]
        self.entry = cache[signature]
        batch, classes = self.entry[1]
        self.targets = _targets(fn.where, target, batch, classes)

    def full(self, x: Any, others: tuple[Any, ...]) -> list[Any]:
        """All graph inputs: ``x`` at the attributed position, the static inputs, and
        ``others`` (the dynamic ones) in the remaining positions."""
        static = dict(self.static)  # closed over by the compiled function
        rest = iter(others)
        return [x if p == self.index else static[p] if p in static else next(rest)
                for p in range(len(self.fn.inputs))]

    def objective(self, output: int) -> Callable[[Any, Any, Any, Any], Any]:
        """``(weights, x, targets, others) -> sum_n outputs[output][n, targets[n]]``."""
        import jax.numpy as jnp

        def value(weights: Any, x: Any, targets: Any, others: Any) -> Any:
            logits = self.fn.apply(weights, *self.full(x, others))[output]
            return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=1))

        return value

    def compiled(self, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        """The jitted attribution for this signature, built on first use."""
        import jax

        if self.entry[0] is None or self.entry[2] != self.held:
            built = build()
            if self.held is None:
                self.entry[0] = jax.jit(built)
            else:  # a program per identity of the weights, replaced when they change
                held = self.weights
                self.entry[0] = jax.jit(lambda _, *args: built(held, *args))
            self.entry[2] = self.held
        return self.entry[0]


def _targets(where: str, target: Any, batch: int, classes: int) -> np.ndarray:
    found = np.asarray(target)
    if not np.issubdtype(found.dtype, np.integer) or found.ndim > 1:
        raise InputMismatchError(f"{where}: target must be a class index or one per "
                                 f"example, got {target!r}")
    found = np.broadcast_to(found, (batch,)) if found.ndim == 0 else found
    if found.shape != (batch,):
        raise InputMismatchError(f"{where}: {found.shape[0]} targets for a batch of {batch}")
    bad = found[(found < 0) | (found >= classes)]
    if bad.size:
        raise InputMismatchError(f"{where}: target {int(bad[0])} is out of range for an "
                                 f"output with {classes} classes")
    return found.astype(np.int32)


def gradient(fn: OnnxFunction, inputs: Any, target: Any, *, output: int = 0,
             others: Sequence[Any] = (), input_index: int = 0,
             weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """The gradient of each example's target output with respect to its input.

    Args:
        fn: The model.
        inputs: The attributed input, batch first.
        target: A class index, or one per example.
        output: Which graph output holds the ``[batch, classes]`` scores.
        others: The model's other inputs, in graph order.
        input_index: Position of the attributed input among the graph inputs.
        weights: Weights to use instead of ``fn.weights``.

    Returns:
        An array shaped like ``inputs``.

    Example:
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> w = numpy_helper.from_array(np.array([[1.0, -2.0], [3.0, 4.0]], np.float32), "w")
        >>> g = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
        >>> fn = wa.core.executor.from_onnx(helper.make_model(g))
        >>> gradient(fn, np.ones((1, 2), np.float32), target=1).tolist()
        [[-2.0, 4.0]]
    """
    import jax

    s = _Setup(fn, inputs, target, output, others, input_index, weights, "gradient", ())
    run = s.compiled(lambda: jax.grad(s.objective(output), argnums=1))
    return np.asarray(run(s.weights, s.x, s.targets, s.others))


def saliency(fn: OnnxFunction, inputs: Any, target: Any, *, absolute: bool = True,
             **kwargs: Any) -> np.ndarray:
    """Captum's ``Saliency``: the input gradient, in absolute value by default.

    Takes the arguments of :func:`gradient`.

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())
        >>> saliency(fn, np.ones((1, 2), np.float32), target=1).tolist()
        [[2.0, 4.0]]
    """
    found = gradient(fn, inputs, target, **kwargs)
    return np.abs(found) if absolute else found


def gradient_x_input(fn: OnnxFunction, inputs: Any, target: Any, **kwargs: Any
                     ) -> np.ndarray:
    """Captum's ``InputXGradient``: the input gradient times the input.

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())
        >>> gradient_x_input(fn, np.full((1, 2), 2.0, np.float32), target=1).tolist()
        [[-4.0, 8.0]]
    """
    return gradient(fn, inputs, target, **kwargs) * np.asarray(inputs)


def ig_steps(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step sizes) of an integrated-gradients quadrature, as Captum defines them.

    Example:
        >>> alphas, sizes = ig_steps(4, "riemann_trapezoid")
        >>> alphas.round(3).tolist(), sizes.tolist()
        ([0.0, 0.333, 0.667, 1.0], [0.125, 0.25, 0.25, 0.125])
    """
    if method not in _METHODS:
        raise InputMismatchError(f"integration method {method!r} is not one of {_METHODS}")
    if not isinstance(steps, int | np.integer) or steps < (1 if method == "gausslegendre"
                                                             else 2):
        raise InputMismatchError(f"{method} needs at least "
                                 f"{1 if method == 'gausslegendre' else 2} steps, got {steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    sizes = np.full(steps, 1 / steps)
    kind = method.split("_")[1]
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        return np.linspace(0, 1, steps), sizes
    start = {"left": 0.0, "right": 1 / steps, "middle": 1 / (2 * steps)}[kind]
    return start + np.arange(steps) / steps, sizes


def integrated_gradients(fn: OnnxFunction, inputs: Any, target: Any, *,
                         baseline: Any = 0.0, steps: int = 50, method: str = "gausslegendre",
                         internal_batch_size: int | None = None, output: int = 0,
                         others: Sequence[Any] = (), input_index: int = 0,
                         weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """Integrated gradients: ``(x - baseline) * integral of the gradient along the path``.

    The path integral uses Captum's quadratures (``ig_steps``); all steps run as one
    batched (``vmap``) gradient, or ``internal_batch_size`` examples at a time (whole
    steps of the batch each), as Captum's argument of that name.

    Args:
        baseline: A scalar or an array broadcastable to ``inputs``.
        steps: Number of points on the path.
        method: ``gausslegendre`` (Captum's default) or ``riemann_*``.
        internal_batch_size: Examples per batched evaluation; None: all steps at once.

    Returns:
        An array shaped like ``inputs``; summed over an example, it approximates
        ``F(x) - F(baseline)`` (completeness).

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())   # linear: IG = x * w exactly
        >>> integrated_gradients(fn, np.ones((1, 2), np.float32), 1, steps=5).round(4).tolist()
        [[-2.0, 4.0]]
    """
    import jax
    import jax.numpy as jnp

    alphas, sizes = ig_steps(steps, method)
    x = np.asarray(inputs)
    base = np.broadcast_to(np.asarray(baseline, dtype=x.dtype), x.shape)
    chunk = _chunk(internal_batch_size, x.shape[0], steps)
    s = _Setup(fn, x, target, output, others, input_index, weights, "ig", (chunk,))

    def build() -> Callable[..., Any]:
        grad = jax.grad(s.objective(output), argnums=1)

        def part(w: Any, x: Any, targets: Any, others: Any, base: Any, alphas: Any,
                 sizes: Any) -> Any:
            grads = jax.vmap(lambda a: grad(w, base + a * (x - base), targets, others))(alphas)
            return jnp.tensordot(sizes, grads, axes=1)

        return part

    run = s.compiled(build)
    total = _weighted_sum(lambda a, z: run(s.weights, s.x, s.targets, s.others, base, a, z),
                          alphas.astype(x.dtype), sizes.astype(x.dtype), chunk)
    return np.asarray(total) * (x - base)


def smoothgrad(fn: OnnxFunction, inputs: Any, target: Any, *, samples: int = 25,
               stdev: float = 0.15, seed: int = 0, squared: bool = False,
               absolute: bool = False, internal_batch_size: int | None = None,
               output: int = 0, others: Sequence[Any] = (), input_index: int = 0,
               weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """SmoothGrad: the input gradient averaged over noisy copies ``x + N(0, stdev^2)``.

    ``stdev`` is absolute (in input units, as Captum's ``stdevs``); the noise comes from
    ``jax.random`` with ``seed``. ``squared`` averages squared gradients (Captum's
    ``smoothgrad_sq``), ``absolute`` their absolute values (``NoiseTunnel(Saliency)``).
    Samples are batched with ``vmap`` like integrated-gradient steps.

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())   # linear: every gradient is w
        >>> smoothgrad(fn, np.ones((1, 2), np.float32), 1, samples=3).round(4).tolist()
        [[-2.0, 4.0]]
    """
    import jax
    import jax.numpy as jnp

    if not isinstance(samples, int | np.integer) or samples < 1:
        raise InputMismatchError(f"{fn.where}: smoothgrad samples={samples!r}; expected a "
                                 "whole number >= 1")
    x = np.asarray(inputs)
    chunk = _chunk(internal_batch_size, x.shape[0], samples)
    s = _Setup(fn, x, target, output, others, input_index, weights, "smoothgrad",
               (chunk, squared, absolute))

    def build() -> Callable[..., Any]:
        grad = jax.grad(s.objective(output), argnums=1)

        def part(w: Any, x: Any, targets: Any, others: Any, noise: Any, sizes: Any) -> Any:
            def at(eps: Any) -> Any:
                g = grad(w, x + eps, targets, others)
                return g * g if squared else jnp.abs(g) if absolute else g

            return jnp.tensordot(sizes, jax.vmap(at)(noise), axes=1)

        return part

    run = s.compiled(build)
    noise = smoothgrad_noise(x.shape, samples, stdev, seed, x.dtype)
    sizes = np.full(samples, 1 / samples, x.dtype)
    total = _weighted_sum(lambda e, z: run(s.weights, s.x, s.targets, s.others, e, z), noise,
                          sizes, chunk)
    return np.asarray(total)


def smoothgrad_noise(shape: tuple[int, ...], samples: int, stdev: float, seed: int,
                     dtype: Any = np.float32) -> np.ndarray:
    """The noise :func:`smoothgrad` adds: ``samples`` arrays of ``shape``."""
    import jax

    key = jax.random.PRNGKey(seed)
    return np.asarray(jax.random.normal(key, (samples, *shape), dtype) * stdev)


def grad_cam(fn: OnnxFunction, inputs: Any, target: Any, layer: str, *, relu: bool = False,
             output: int = 0, others: Sequence[Any] = (), input_index: int = 0,
             weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """Grad-CAM on the activation ``layer`` (a value name, e.g. ``fn.output_of(weight)``).

    Each channel of the activation is weighted by its gradient averaged over positions,
    and the channels summed: ``sum_c mean_hw(dy/dA_c) * A_c``, as Captum's
    ``LayerGradCam`` (whose default, too, is no ReLU).

    Returns:
        ``[batch, 1, *activation spatial shape]``.
    """
    import jax
    import jax.numpy as jnp

    x = np.asarray(inputs)
    s = _Setup(fn, x, target, output, others, input_index, weights, "grad_cam", (layer, relu))
    if layer not in fn.value_names():
        fn.output_of(layer)  # raises, suggesting close names

    def build() -> Callable[..., Any]:
        def activation(w: Any, x: Any, others: Any) -> Any:
            return fn.apply_with(w, *s.full(x, others), read=[layer])[1][layer]

        def attribute(w: Any, x: Any, targets: Any, others: Any) -> Any:
            shape = jax.eval_shape(activation, w, x, others)

            def scored(delta: Any) -> tuple[Any, Any]:
                outs, values = fn.apply_with(w, *s.full(x, others), add={layer: delta},
                                             read=[layer])
                logits = outs[output]
                picked = jnp.take_along_axis(logits, targets[:, None], axis=1)
                return jnp.sum(picked), values[layer]

            grads, acts = jax.grad(scored, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
            if grads.ndim < 3:
                raise ShapeError(f"{fn.where}: Grad-CAM needs a [batch, channels, ...] "
                                 f"activation; {layer!r} has shape {list(grads.shape)}")
            alpha = jnp.mean(grads, axis=tuple(range(2, grads.ndim)), keepdims=True)
            cam = jnp.sum(alpha * acts, axis=1, keepdims=True)
            return jnp.maximum(cam, 0) if relu else cam

        return attribute

    return np.asarray(s.compiled(build)(s.weights, s.x, s.targets, s.others))


def weight_gradients(fn: OnnxFunction, inputs: Sequence[Any], target: Any = None, *,
                     loss: Callable[..., Any] | None = None, output: int = 0,
                     weights: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Gradients with respect to every weight, keyed like ``fn.weights``.

    Args:
        fn: The model.
        inputs: All graph inputs, in order.
        target: A class index (or one per example): the objective is the sum over the
            batch of ``outputs[output][n, target[n]]``.
        loss: Instead of ``target``, ``loss(*outputs) -> scalar`` in JAX.
        output: Which output ``target`` indexes.
        weights: Weights to differentiate at instead of ``fn.weights``.

    Example:
        >>> fn = wa.core.executor.from_onnx(_doc_model())
        >>> g = weight_gradients(fn, [np.array([[1.0, 2.0]], np.float32)], target=0)
        >>> g["w"].tolist()
        [[1.0, 0.0], [2.0, 0.0]]
    """
    import jax
    import jax.numpy as jnp

    if (target is None) == (loss is None):
        raise InputMismatchError(f"{fn.where}: give either target or loss")
    w = dict(fn.weights if weights is None else weights)
    args = list(inputs)
    if loss is None:
        shapes = jax.eval_shape(lambda: fn.apply(w, *args))
        batch, classes = shapes[output].shape
        targets = _targets(fn.where, target, batch, classes)

        def objective(w: Any) -> Any:
            logits = fn.apply(w, *args)[output]
            return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=1))
    else:
        def objective(w: Any) -> Any:
            return loss(*fn.apply(w, *args))

    grads = jax.jit(jax.grad(objective))(w)
    return {k: np.asarray(v) for k, v in grads.items()}


def _chunk(internal_batch_size: int | None, batch: int, count: int) -> int:
    """Steps (or samples) per batched evaluation, from Captum's examples-per-batch.

    All ``count`` at once without a limit; else as many as fit, balanced over the
    chunks so that the last one is barely padded.
    """
    if internal_batch_size is None:
        return count
    if internal_batch_size < 1:
        raise InputMismatchError(f"internal_batch_size must be positive, got "
                                 f"{internal_batch_size}")
    per = min(max(internal_batch_size // max(batch, 1), 1), count)
    chunks = -(-count // per)
    return -(-count // chunks)


def _weighted_sum(part: Callable[[Any, Any], Any], points: np.ndarray, sizes: np.ndarray,
                  chunk: int) -> Any:
    """``sum_i sizes[i] * f(points[i])`` with ``part`` evaluating ``chunk`` points at once.

    The points of one chunk are one batched (``vmap``) evaluation; chunks run one after
    the other (XLA's CPU loops are slower than these calls), the last padded with
    zero-weight copies so that one compiled program serves all.
    """
    total = None
    for start in range(0, len(points), chunk):
        p, z = points[start:start + chunk], sizes[start:start + chunk]
        if len(p) < chunk:
            pad = chunk - len(p)
            p = np.concatenate([p, np.repeat(p[-1:], pad, axis=0)])
            z = np.concatenate([z, np.zeros(pad, z.dtype)])
        found = part(p, z)
        total = found if total is None else total + found
    return total


def _doc_model() -> Any:
    """y = x @ [[1, -2], [3, 4]] for the examples above."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0, -2.0], [3.0, 4.0]], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "doc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    return helper.make_model(graph)
