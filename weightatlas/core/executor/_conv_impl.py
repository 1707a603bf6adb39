"""How convolutions and max pooling are computed: formulations XLA's CPU backend runs fast.

Each function here computes what the plain ``lax`` call would (max pooling: the same
values and gradients exactly; convolution: the same up to float rounding), in a form
whose gradient XLA compiles to faster code on CPUs. The fast forms are
``jax.custom_jvp`` functions, so ``jit``, ``grad``, ``jvp`` and ``vmap`` apply as before,
and gradients with respect to weights flow as they did.

- :func:`conv`: a strided convolution over few input channels (fewer than
  :data:`SMALL_CHANNELS` per group: an image model's stem, ResNet's 7x7 stride-2
  convolution over RGB) computes its *input* gradient as a stride-1 convolution over
  the space-to-depth rearrangement of its input. The plain gradient convolves the
  output gradient dilated by the strides, which XLA's CPU backend runs on its slow
  generic path (about 3x slower for ResNet-18's stem), while stride-1 convolutions go
  to its fast library. The forward pass and every other convolution are one
  ``lax.conv_general_dilated``.
- :func:`max_pool`: for a floating-point window of at most :data:`MAX_UNROLLED`
  elements, the gradient is the sum of the tangents of the window's strided slices,
  masked by the offset of each window's first maximum (a NaN counts as the maximum;
  found by a running maximum along the inner axes, then one reduction over the first
  axis' offsets, which XLA materializes once), which routes it as XLA's
  select-and-scatter and PyTorch do. Without a gradient it is the plain
  ``lax.reduce_window``, whose gradient XLA's CPU backend lowers to iotas, a
  tuple-valued window reduction and a scatter: on ResNet-18's pooling layer the form
  here needs about half the time.

Example:
    >>> import jax
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> y = max_pool(x, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)))
    >>> np.asarray(y).ravel().tolist()
    [5.0, 7.0, 13.0, 15.0]
    >>> g = jax.grad(lambda x: max_pool(x, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))).sum())(x)
    >>> np.asarray(g)[0, 0].astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_UNROLLED", "SMALL_CHANNELS", "conv", "max_pool"]

#: Input channels (per group) below which a strided convolution's input gradient is
#: computed by space-to-depth (measured on ResNet-18's shapes: faster below 16).
SMALL_CHANNELS = 16

#: Largest pooling window (in elements) whose gradient is computed from its slices.
MAX_UNROLLED = 32

Pads = tuple[tuple[int, int], ...]


def _numbers(n: int) -> Any:
    import jax

    spec = tuple(range(n + 2))
    return jax.lax.ConvDimensionNumbers(spec, spec, spec)


def _direct(x: Any, w: Any, strides: tuple[int, ...], pads: Pads, dilations: tuple[int, ...],
            group: int) -> Any:
    import jax

    return jax.lax.conv_general_dilated(
        x, w, window_strides=strides, padding=pads, rhs_dilation=dilations,
        dimension_numbers=_numbers(len(strides)), feature_group_count=group)


def conv(x: Any, w: Any, strides: Sequence[int], pads: Sequence[tuple[int, int]],
         dilations: Sequence[int], group: int) -> Any:
    """``lax.conv_general_dilated`` in channels-first layout (``x`` [N, C, ...], ``w``
    [O, C/group, ...]; ``pads``: begin and end per spatial axis), with the fast input
    gradient for strided convolutions over few channels.

    Example:
        >>> import jax
        >>> x, w = np.ones((1, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float32)
        >>> y = conv(x, w, (2, 2), ((1, 1), (1, 1)), (1, 1), 1)
        >>> y.shape, float(y[0, 0, 1, 1])
        ((1, 4, 4, 4), 27.0)
        >>> g = jax.grad(lambda x: conv(x, w, (2, 2), ((1, 1), (1, 1)), (1, 1), 1).sum())(x)
        >>> g[0, 0, :3, :3].astype(int).tolist()
        [[4, 8, 4], [8, 16, 8], [4, 8, 4]]
    """
    strides_, dilations_ = tuple(strides), tuple(dilations)
    pads_ = tuple((int(lo), int(hi)) for lo, hi in pads)
    if (max(strides_) > 1 and max(dilations_) == 1 and w.shape[1] < SMALL_CHANNELS
            and all(lo >= 0 and hi >= 0 for lo, hi in pads_)
            and any(k > s for k, s in zip(w.shape[2:], strides_, strict=True))):
        return _strided(strides_, pads_, group)(x, w)
    return _direct(x, w, strides_, pads_, dilations_, group)


def _space_to_depth_conv(x: Any, w: Any, strides: tuple[int, ...], pads: Pads,
                         group: int) -> Any:
    """The same strided convolution as a stride-1 one over the space-to-depth input.

    With ``j = q * s + r`` on each axis, ``y[o] = sum_j x[o * s + j] w[j]`` becomes
    ``sum_{q, r} X_r[o + q] W_r[q]``, where ``X_r[m] = x[m * s + r]`` (the input split
    into ``s`` phases, stacked as channels) and ``W_r[q] = w[q * s + r]`` (the kernel
    zero-padded to a multiple of the stride).
    """
    import jax
    import jax.numpy as jnp

    n = len(strides)
    batch, channels = x.shape[:2]
    out_ch, in_g = w.shape[:2]
    kernel = w.shape[2:]
    taps = [-(-k // s) for k, s in zip(kernel, strides, strict=True)]
    lengths = []
    config = [(0, 0, 0), (0, 0, 0)]
    for size, k, s, q, (lo, hi) in zip(x.shape[2:], kernel, strides, taps, pads, strict=True):
        out = (size + lo + hi - k) // s + 1
        length = (out - 1 + q) * s
        lengths.append(length)
        config.append((lo, length - size - lo, 0))  # a negative end crops
    xp = jax.lax.pad(x, np.asarray(0, x.dtype), config)
    split = [v for length, s in zip(lengths, strides, strict=True) for v in (length // s, s)]
    phases = (0, 1, *(3 + 2 * i for i in range(n)), *(2 + 2 * i for i in range(n)))
    xs = jnp.transpose(xp.reshape(batch, channels, *split), phases)
    xs = xs.reshape(batch, channels * math.prod(strides), *(ln // s for ln, s in
                                                            zip(lengths, strides, strict=True)))
    wp = jnp.pad(w, ((0, 0), (0, 0), *((0, q * s - k) for k, s, q in
                                       zip(kernel, strides, taps, strict=True))))
    wsplit = [v for q, s in zip(taps, strides, strict=True) for v in (q, s)]
    ws = jnp.transpose(wp.reshape(out_ch, in_g, *wsplit), phases)
    ws = ws.reshape(out_ch, in_g * math.prod(strides), *taps)
    return _direct(xs, ws, (1,) * n, ((0, 0),) * n, (1,) * n, group)


@functools.cache
def _strided(strides: tuple[int, ...], pads: Pads, group: int) -> Any:
    """The strided convolution whose input tangent is the space-to-depth form."""
    import jax
    from jax.custom_derivatives import SymbolicZero

    ones = (1,) * len(strides)

    @jax.custom_jvp
    def f(x: Any, w: Any) -> Any:
        return _direct(x, w, strides, pads, ones, group)

    def rule(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
        x, w = primals
        tx, tw = tangents
        y = f(x, w)
        parts = []
        if not isinstance(tx, SymbolicZero):
            parts.append(_space_to_depth_conv(tx, w, strides, pads, group))
        if not isinstance(tw, SymbolicZero):
            parts.append(_direct(x, tw, strides, pads, ones, group))
        if not parts:
            return y, jax.numpy.zeros_like(y)
        return y, parts[0] if len(parts) == 1 else parts[0] + parts[1]

    f.defjvp(rule, symbolic_zeros=True)
    return f


def max_pool(x: Any, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             pads: Sequence[tuple[int, int]]) -> Any:
    """Max pooling of a channels-first ``x`` (``pads``: begin and end per spatial axis,
    padding with -inf); the gradient goes to the first maximal element of each window."""
    import jax
    import jax.numpy as jnp

    kernel_, strides_, dilations_ = tuple(kernel), tuple(strides), tuple(dilations)
    pads_ = tuple((int(lo), int(hi)) for lo, hi in pads)
    if not jnp.issubdtype(x.dtype, jnp.floating) or math.prod(kernel_) > MAX_UNROLLED:
        lowest = (-np.inf if jnp.issubdtype(x.dtype, jnp.floating)
                  else int(jnp.iinfo(x.dtype).min))
        return jax.lax.reduce_window(x, np.asarray(lowest, x.dtype), jax.lax.max,
                                     (1, 1, *kernel_), (1, 1, *strides_),
                                     ((0, 0), (0, 0), *pads_),
                                     window_dilation=(1, 1, *dilations_))
    return _pool(kernel_, strides_, dilations_, pads_)(x)


def _windows(x: Any, fill: float, kernel: tuple[int, ...], strides: tuple[int, ...],
             dilations: tuple[int, ...], pads: Pads) -> list[Any]:
    """The strided slice of the padded ``x`` at each window offset, in row-major order."""
    import jax

    xp = jax.lax.pad(x, np.asarray(fill, x.dtype),
                     [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in pads)])
    outs = [(size + lo + hi - (k - 1) * d - 1) // s + 1 for size, k, s, d, (lo, hi)
            in zip(x.shape[2:], kernel, strides, dilations, pads, strict=True)]
    found = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        start = [j * d for j, d in zip(offset, dilations, strict=True)]
        limit = [b + (o - 1) * s + 1 for b, o, s in zip(start, outs, strides, strict=True)]
        found.append(jax.lax.slice(xp, (0, 0, *start), (*x.shape[:2], *limit),
                                   (1, 1, *strides)))
    return found


def _first_max(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """Reducer of (value, offset) pairs: the larger value, a NaN before a number, and
    the lower offset among equals (so the result does not depend on the order)."""
    import jax.numpy as jnp

    (va, ia), (vb, ib) = a, b
    nan_a, nan_b = jnp.isnan(va), jnp.isnan(vb)
    take_b = ((vb > va) | (nan_b & ~nan_a)
              | (((va == vb) | (nan_a & nan_b)) & (ib < ia)))
    return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)


@functools.cache
def _pool(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...],
          pads: Pads) -> Any:
    import jax
    import jax.numpy as jnp

    inner = math.prod(kernel[1:])

    def first_max(x: Any) -> tuple[Any, Any]:
        """(each window's maximum, the row-major offset of its first maximum)."""
        # Over the inner axes: a running maximum over their strided slices, each row of
        # the first axis kept (fused by XLA into the slices below) ...
        part = kernel[:1] + (1,) * (len(kernel) - 1)
        rows = _windows(x, -np.inf, (1, *kernel[1:]), (1, *strides[1:]),
                        (1, *dilations[1:]), pads)
        value, offset = rows[0], jnp.zeros(rows[0].shape, np.int8)
        for k, xk in enumerate(rows[1:], 1):
            take = (xk > value) | (jnp.isnan(xk) & ~jnp.isnan(value))
            value, offset = jnp.where(take, xk, value), jnp.where(take, np.int8(k), offset)
        # ... then over the first axis: one reduction over its offsets' slices.
        ones = (1,) * (len(kernel) - 1)
        across = (part, strides[:1] + ones, dilations[:1] + ones, ((0, 0),) * len(kernel))
        values = jnp.stack(_windows(value, -np.inf, *across))
        offsets = jnp.stack([o + np.int8(j * inner)
                             for j, o in enumerate(_windows(offset, 0, *across))])
        return jax.lax.reduce((values, offsets), (np.asarray(-np.inf, values.dtype),
                                                  np.int8(0)), _first_max, (0,))

    @jax.custom_jvp
    def f(x: Any) -> Any:  # without a gradient, the plain window reduction
        return jax.lax.reduce_window(x, np.asarray(-np.inf, x.dtype), jax.lax.max,
                                     (1, 1, *kernel), (1, 1, *strides),
                                     ((0, 0), (0, 0), *pads),
                                     window_dilation=(1, 1, *dilations))

    @f.defjvp
    def rule(primals: tuple[Any], tangents: tuple[Any]) -> tuple[Any, Any]:
        # The offset of each window's first maximum (or first NaN) comes out of a
        # reduction, which XLA materializes once instead of recomputing it in every
        # term below (as it does with an element-wise index).
        y, index = first_max(primals[0])
        slices = _windows(tangents[0], 0.0, kernel, strides, dilations, pads)
        tangent = jnp.where(index == 0, slices[0], 0)
        for k, tk in enumerate(slices[1:], 1):
            tangent = tangent + jnp.where(index == k, tk, 0)
        return y, tangent

    return f
