"""Convolutions: ``Conv`` and ``ConvTranspose`` in 1, 2 or 3 spatial dimensions.

Both lower to ``lax.conv_general_dilated`` in ONNX's channels-first layout, so JAX
differentiates them natively; ``Conv`` goes through :func:`._conv_impl.conv`, which
gives strided convolutions over few channels a faster input gradient. ``ConvTranspose``
is the fractionally strided convolution: input dilated by the strides, kernel flipped
and its channel axes swapped per group, padding ``dilation * (k - 1) - pad`` on each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._conv_impl import conv
from ._graph import Node
from ._registry import Call, Tensor, op

__all__ = ["same_pads"]

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _check_auto_pad(node: Node) -> str | None:
    mode = node.attrs.get("auto_pad", "NOTSET")
    return None if mode in _AUTO_PADS else f"auto_pad={mode!r} is not one of {_AUTO_PADS}"


def same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], upper: bool) -> list[tuple[int, int]]:
    """Padding for ``auto_pad=SAME_*``: output size ``ceil(in / stride)`` on each axis."""
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if upper else (big, small))
    return pads


def conv_pads(c: Call, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (begin, end) padding of each spatial axis from ``pads`` or ``auto_pad``."""
    mode = c.attr("auto_pad", "NOTSET")
    n = len(sizes)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(sizes, kernel, strides, dilations, mode == "SAME_UPPER")
    if mode == "VALID":
        return [(0, 0)] * n
    pads = list(c.attr("pads", [0] * (2 * n)))
    if len(pads) != 2 * n:
        raise c.shape_error(f"pads {pads} should hold 2 values per spatial axis ({n})")
    return [(pads[i], pads[i + n]) for i in range(n)]


def _numbers(n: int) -> Any:
    import jax

    spec = tuple(range(n + 2))
    return jax.lax.ConvDimensionNumbers(spec, spec, spec)


@op("Conv", check=_check_auto_pad)
def _conv(c: Call, x: Tensor, w: Tensor, bias: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    w = jnp.asarray(w)
    n = x.ndim - 2
    if n < 1 or w.ndim != x.ndim:
        raise c.shape_error(f"input of shape {list(x.shape)} and kernel of shape "
                            f"{list(w.shape)} are not a channels-first convolution")
    kernel = list(w.shape[2:])
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    group = c.attr("group", 1)
    if x.shape[1] != w.shape[1] * group:
        raise c.shape_error(f"input has {x.shape[1]} channels, kernel {list(w.shape)} with "
                            f"group={group} expects {w.shape[1] * group}")
    pads = conv_pads(c, x.shape[2:], kernel, strides, dilations)
    y = conv(x, w.astype(x.dtype), strides, pads, dilations, group)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias), (-1,) + (1,) * n).astype(y.dtype)
    return y


@op("ConvTranspose", check=_check_auto_pad)
def _conv_transpose(c: Call, x: Tensor, w: Tensor, bias: Tensor = None) -> Tensor:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    w = jnp.asarray(w)
    n = x.ndim - 2
    group = c.attr("group", 1)
    cin, cout_g, kernel = w.shape[0], w.shape[1], list(w.shape[2:])
    if x.shape[1] != cin:
        raise c.shape_error(f"input has {x.shape[1]} channels, kernel {list(w.shape)} "
                            f"expects {cin}")
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    extra = list(c.attr("output_padding", [0] * n))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    full = [s * (i - 1) + e + sp
            for s, i, e, sp in zip(strides, x.shape[2:], extra, span, strict=True)]
    mode = c.attr("auto_pad", "NOTSET")
    target = c.attr("output_shape")
    if c.has("pads") and mode in ("NOTSET", "VALID"):
        raw = list(c.attr("pads"))
        pads = [(raw[i], raw[i + n]) for i in range(n)]
    elif target is not None or mode in ("SAME_UPPER", "SAME_LOWER"):
        out = list(target)[-n:] if target is not None else [
            i * s for i, s in zip(x.shape[2:], strides, strict=True)]
        totals = [f - o for f, o in zip(full, out, strict=True)]
        pads = [(t // 2, t - t // 2) if mode == "SAME_UPPER" else (t - t // 2, t // 2)
                for t in totals]
    else:
        pads = [(0, 0)] * n
    # Kernel [Cin, Cout/g, k...] -> [Cout, Cin/g, k...], spatially flipped.
    k = jnp.reshape(w, (group, cin // group, cout_g, *kernel))
    k = jnp.swapaxes(k, 1, 2).reshape(group * cout_g, cin // group, *kernel)
    k = jnp.flip(k, axis=tuple(range(2, n + 2)))
    padding = [(sp - 1 - lo, sp - 1 - hi + e)
               for sp, (lo, hi), e in zip(span, pads, extra, strict=True)]
    y = jax.lax.conv_general_dilated(
        x, k.astype(x.dtype), window_strides=[1] * n, padding=padding, lhs_dilation=strides,
        rhs_dilation=dilations, dimension_numbers=_numbers(n), feature_group_count=group)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias), (-1,) + (1,) * n).astype(y.dtype)
    return y
