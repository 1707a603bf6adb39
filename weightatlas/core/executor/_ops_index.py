"""Indexing operators: ``Slice``, ``Gather*``, ``Scatter*``, ``Pad``, ``OneHot``, ``TopK``...

Indices may depend on the inputs (``Gather`` of token ids works under ``jit``); what
fixes the output shape (``Slice`` bounds, ``Pad`` widths, ``OneHot`` depth, ``TopK``'s
``k``) must be static. Negative indices count from the end, as ONNX specifies.
"""

from __future__ import annotations

import numpy as np

from ._graph import Node
from ._registry import Call, Tensor, normalize_axes, normalize_axis, op

__all__: list[str] = []


def _wrap(index: Tensor, size: int) -> Tensor:
    import jax.numpy as jnp

    if isinstance(index, np.ndarray):
        return np.where(index < 0, index + size, index)
    return jnp.where(index < 0, index + size, index)


@op("Slice", static=(1, 2, 3, 4), numpy=True)
def _slice(c: Call, x: Tensor, starts: Tensor = None, ends: Tensor = None,
           axes: Tensor = None, steps: Tensor = None) -> Tensor:
    if starts is None:  # opset < 10: bounds are attributes
        begin, end, which = c.attr("starts"), c.attr("ends"), c.attr("axes")
        step = None
    else:
        begin = c.static_ints(starts, "the slice starts")
        end = c.static_ints(ends, "the slice ends")
        which = None if axes is None else c.static_ints(axes, "the slice axes")
        step = None if steps is None else c.static_ints(steps, "the slice steps")
    rank = np.ndim(x)
    which = list(range(len(begin))) if which is None else normalize_axes(c, which, rank)
    step = [1] * len(begin) if step is None else step
    if not len(begin) == len(end) == len(which) == len(step):
        raise c.shape_error("starts, ends, axes and steps have different lengths")
    index = [slice(None)] * rank
    for b, e, a, s in zip(begin, end, which, step, strict=True):
        if s == 0:
            raise c.shape_error(f"slice step is 0 on axis {a}")
        index[a] = slice(b, e, s)
    return x[tuple(index)]


@op("Gather", numpy=True)
def _gather(c: Call, x: Tensor, indices: Tensor) -> Tensor:
    jnp = c.xp

    axis = normalize_axis(c, c.attr("axis", 0), np.ndim(x))
    return jnp.take(x, _wrap(indices, np.shape(x)[axis]), axis=axis)


@op("GatherElements", numpy=True)
def _gather_elements(c: Call, x: Tensor, indices: Tensor) -> Tensor:
    jnp = c.xp

    axis = normalize_axis(c, c.attr("axis", 0), np.ndim(x))
    return jnp.take_along_axis(x, _wrap(indices, np.shape(x)[axis]), axis=axis)


@op("GatherND")
def _gather_nd(c: Call, x: Tensor, indices: Tensor) -> Tensor:
    import jax
    import jax.numpy as jnp

    b = c.attr("batch_dims", 0)
    dims, ishape = np.shape(x), np.shape(indices)
    k = ishape[-1]
    batch = int(np.prod(dims[:b]))
    data = jnp.reshape(x, (batch, *dims[b:]))
    idx = jnp.reshape(jnp.asarray(indices), (batch, -1, k))
    idx = jnp.where(idx < 0, idx + jnp.asarray(dims[b:b + k]), idx)
    picked = jax.vmap(lambda d, i: d[tuple(jnp.moveaxis(i, -1, 0))])(data, idx)
    return jnp.reshape(picked, (*ishape[:-1], *dims[b + k:]))


def _check_reduction(node: Node) -> str | None:
    mode = node.attrs.get("reduction", "none")
    ok = ("none", "add", "mul", "max", "min")
    return None if mode in ok else f"reduction={mode!r} is not one of {ok}"


def _scatter(c: Call, x: Tensor, where: tuple[Tensor, ...], updates: Tensor) -> Tensor:
    import jax.numpy as jnp

    at = jnp.asarray(x).at[where]
    mode = c.attr("reduction", "none")
    if mode == "add":
        return at.add(updates)
    if mode == "mul":
        return at.multiply(updates)
    if mode == "max":
        return at.max(updates)
    if mode == "min":
        return at.min(updates)
    return at.set(updates)


@op("ScatterElements", "Scatter", check=_check_reduction)
def _scatter_elements(c: Call, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    import jax.numpy as jnp

    axis = normalize_axis(c, c.attr("axis", 0), np.ndim(x))
    grid = list(jnp.meshgrid(*(jnp.arange(n) for n in np.shape(indices)), indexing="ij"))
    grid[axis] = _wrap(jnp.asarray(indices), np.shape(x)[axis])
    return _scatter(c, x, tuple(grid), updates)


@op("ScatterND", check=_check_reduction)
def _scatter_nd(c: Call, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    import jax.numpy as jnp

    idx = jnp.asarray(indices)
    k = idx.shape[-1]
    idx = jnp.where(idx < 0, idx + jnp.asarray(np.shape(x)[:k]), idx)
    return _scatter(c, x, tuple(jnp.moveaxis(idx, -1, 0)), updates)


def _check_pad(node: Node) -> str | None:
    mode = node.attrs.get("mode", "constant")
    ok = ("constant", "reflect", "edge", "wrap")
    return None if mode in ok else f"mode={mode!r} is not one of {ok}"


@op("Pad", check=_check_pad, static=(1, 3))
def _pad(c: Call, x: Tensor, pads: Tensor = None, value: Tensor = None,
         axes: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    rank = np.ndim(x)
    if pads is None:  # opset < 11: pads and value are attributes
        widths = list(c.attr("pads", c.attr("paddings", [])))
        fill: Tensor = c.attr("value", 0.0)
    else:
        widths = c.static_ints(pads, "the pads")
        fill = 0 if value is None else jnp.reshape(jnp.asarray(value), ())
    which = list(range(rank)) if axes is None else normalize_axes(
        c, c.static_ints(axes, "the padded axes"), rank)
    if len(widths) != 2 * len(which):
        raise c.shape_error(f"{len(widths)} pads for {len(which)} axes (need 2 per axis)")
    full = [[0, 0] for _ in range(rank)]
    for i, a in enumerate(which):
        full[a] = [widths[i], widths[i + len(which)]]
    crop = tuple(slice(-lo if lo < 0 else 0, hi if hi < 0 else None) for lo, hi in full)
    x = x[crop]
    width = [(max(lo, 0), max(hi, 0)) for lo, hi in full]
    mode = c.attr("mode", "constant")
    if mode == "constant":
        return jnp.pad(x, width, constant_values=jnp.asarray(fill).astype(x.dtype))
    return jnp.pad(x, width, mode=mode)


@op("OneHot", static=(1,))
def _one_hot(c: Call, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
    import jax.numpy as jnp

    d = int(c.static(depth, "the depth").reshape(-1)[0])
    rank = np.ndim(indices) + 1
    axis = normalize_axis(c, c.attr("axis", -1), rank)
    idx = jnp.expand_dims(_wrap(jnp.asarray(indices), d), axis)
    shape = [1] * rank
    shape[axis] = d
    hot = idx == jnp.arange(d).reshape(shape).astype(idx.dtype)
    return jnp.where(hot, values[1], values[0])


@op("Trilu", static=(1,))
def _trilu(c: Call, x: Tensor, k: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    shift = 0 if k is None else int(c.static(k, "k").reshape(-1)[0])
    return jnp.triu(x, shift) if c.attr("upper", 1) else jnp.tril(x, shift)


@op("TopK", static=(1,))
def _top_k(c: Call, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    import jax
    import jax.numpy as jnp

    count = int(c.static(k, "k").reshape(-1)[0])
    axis = normalize_axis(c, c.attr("axis", -1), np.ndim(x))
    moved = jnp.moveaxis(jnp.asarray(x), axis, -1)
    if c.attr("largest", 1):
        values, index = jax.lax.top_k(moved, count)
    else:
        # Smallest first, ties broken by the lower index, as ONNX asks.
        order = jnp.argsort(moved, axis=-1, stable=True)[..., :count]
        values, index = jnp.take_along_axis(moved, order, axis=-1), order
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(index, -1, axis)


@op("NonZero", static=(0,), numpy=True)
def _non_zero(c: Call, x: Tensor) -> Tensor:
    return np.asarray(np.nonzero(c.static(x, "the NonZero input")), dtype=np.int64)
