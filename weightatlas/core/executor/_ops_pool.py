"""Pooling: ``MaxPool`` (with indices), ``AveragePool``, ``LpPool`` and the global pools.

Windows are ``lax.reduce_window`` calls over the channels-first tensor, so gradients
flow through them; ``MaxPool``'s maximum is :func:`._conv_impl.max_pool` (for small
windows a reduction over strided slices, whose gradient XLA runs faster than
select-and-scatter). ``ceil_mode`` adds the padding that lets the last partial window
exist, except a window that would start in the right padding, which ONNX (like
PyTorch) drops. ``AveragePool`` divides by the number of input elements in a window, or
by the window with its explicit padding when ``count_include_pad=1``; the ``ceil_mode``
overhang is never counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._conv_impl import max_pool
from ._ops_conv import _check_auto_pad, conv_pads
from ._registry import Call, Tensor, op

__all__: list[str] = []


@dataclass(frozen=True)
class _Window:
    """A pooling window over a channels-first tensor of rank ``2 + n``."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[tuple[int, int]]  # explicit (begin, end) padding per spatial axis
    extra: list[int]  # ceil_mode overhang added after the end padding

    def max(self, x: Tensor) -> Tensor:
        """The maximum over each window (the gradient goes to the first maximal element)."""
        return max_pool(x, self.kernel, self.strides, self.dilations,
                        [(lo, hi + e) for (lo, hi), e in zip(self.pads, self.extra,
                                                             strict=True)])

    def reduce(self, x: Tensor, init: float, fn: Callable[..., Tensor]) -> Tensor:
        import jax

        return jax.lax.reduce_window(
            x, np.asarray(init, dtype=x.dtype), fn, (1, 1, *self.kernel),
            (1, 1, *self.strides),
            ((0, 0), (0, 0), *((lo, hi + e) for (lo, hi), e in zip(self.pads, self.extra,
                                                                   strict=True))),
            window_dilation=(1, 1, *self.dilations))


def _window(c: Call, x: Tensor) -> _Window:
    sizes = list(np.shape(x)[2:])
    n = len(sizes)
    kernel = list(c.attr("kernel_shape", []))
    if len(kernel) != n:
        raise c.shape_error(f"kernel_shape {kernel} does not match the {n} spatial axes of "
                            f"an input of shape {list(np.shape(x))}")
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    pads = conv_pads(c, sizes, kernel, strides, dilations)
    extra = []
    for size, k, s, d, (lo, hi) in zip(sizes, kernel, strides, dilations, pads, strict=True):
        span = (k - 1) * d + 1
        room = size + lo + hi - span
        if room < 0:
            raise c.shape_error(f"a window of {span} does not fit an axis of {size} "
                                f"padded by ({lo}, {hi})")
        out = room // s + 1
        if c.attr("ceil_mode", 0):
            out = -(-room // s) + 1
            if (out - 1) * s >= size + lo:  # the last window would start in the padding
                out -= 1
        extra.append(max((out - 1) * s + span - (size + lo + hi), 0))
    return _Window(kernel, strides, dilations, pads, extra)


def _lowest(dtype: np.dtype) -> float:
    import jax.numpy as jnp

    return -np.inf if jnp.issubdtype(dtype, jnp.floating) else int(jnp.iinfo(dtype).min)


@op("MaxPool", check=_check_auto_pad)
def _max_pool(c: Call, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    win = _window(c, x)
    y = win.max(x)
    if len(c.node.outputs) < 2 or not c.node.outputs[1]:
        return y
    # Indices: flat positions in the input (row-major, or column-major over the spatial
    # axes when storage_order=1); ties keep the first position, as ONNX Runtime does.
    dims = x.shape
    spatial = dims[2:]
    if c.attr("storage_order", 0):
        strides_ = np.cumprod((1, *spatial[:-1]))
        flat = sum(jnp.arange(s).reshape([-1 if i == a else 1 for i in range(len(spatial))])
                   * int(strides_[a]) for a, s in enumerate(spatial))
    else:
        flat = jnp.arange(int(np.prod(spatial))).reshape(spatial)
    base = jnp.arange(dims[0] * dims[1]).reshape(dims[0], dims[1], *([1] * len(spatial)))
    index = jnp.broadcast_to(flat + base * int(np.prod(spatial)), dims).astype(jnp.int32)

    def pick(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        take_b = (b[0] > a[0]) | ((b[0] == a[0]) & (b[1] < a[1]) & (b[1] >= 0))
        take_b = take_b | (a[1] < 0)
        return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

    _, idx = jax.lax.reduce_window(
        (x, index), (np.asarray(_lowest(x.dtype), x.dtype), np.asarray(-1, np.int32)), pick,
        (1, 1, *win.kernel), (1, 1, *win.strides),
        ((0, 0), (0, 0), *((lo, hi + e) for (lo, hi), e in zip(win.pads, win.extra,
                                                               strict=True))),
        window_dilation=(1, 1, *win.dilations))
    return y, idx


@op("AveragePool", check=_check_auto_pad)
def _average_pool(c: Call, x: Tensor) -> Tensor:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    win = _window(c, x)
    total = win.reduce(x, 0.0, jax.lax.add)
    spatial = x.shape[2:]
    if c.attr("count_include_pad", 0):
        ones = jnp.ones([s + lo + hi for s, (lo, hi) in zip(spatial, win.pads, strict=True)],
                        x.dtype)
        counted = _Window(win.kernel, win.strides, win.dilations, [(0, 0)] * len(spatial),
                          win.extra)
    else:
        ones = jnp.ones(spatial, x.dtype)
        counted = win
    count = counted.reduce(ones[None, None], 0.0, jax.lax.add)
    return total / count


@op("LpPool", check=_check_auto_pad)
def _lp_pool(c: Call, x: Tensor) -> Tensor:
    import jax
    import jax.numpy as jnp

    p = c.attr("p", 2)
    x = jnp.asarray(x)
    total = _window(c, x).reduce(jnp.abs(x) ** p, 0.0, jax.lax.add)
    return total ** (1.0 / p)


@op("GlobalAveragePool")
def _global_average_pool(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.mean(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


@op("GlobalMaxPool")
def _global_max_pool(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.max(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


@op("GlobalLpPool")
def _global_lp_pool(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    p = c.attr("p", 2)
    axes = tuple(range(2, np.ndim(x)))
    return jnp.sum(jnp.abs(x) ** p, axis=axes, keepdims=True) ** (1.0 / p)
