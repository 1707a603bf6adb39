"""Shape and layout operators: ``Shape``, ``Reshape``, ``Transpose``, ``Concat``, ``Split``...

Whatever fixes an output shape (a ``Reshape`` target, ``Unsqueeze`` axes, ``Split``
sizes, ``Range`` bounds) must be static; :meth:`Call.static` reports the node when it is
not. ``Shape`` and ``Size`` always return static values, since shapes are known while
tracing.
"""

from __future__ import annotations

import math

import numpy as np

from ._graph import Node
from ._ops_quant import jax_dtype
from ._registry import Call, Tensor, normalize_axes, normalize_axis, op

__all__: list[str] = []


@op("Identity", numpy=True)
def _identity(c: Call, x: Tensor) -> Tensor:
    return x


@op("Shape", numpy=True)
def _shape(c: Call, x: Tensor) -> Tensor:
    dims = np.asarray(np.shape(x), dtype=np.int64)
    return dims[c.attr("start", 0):c.attr("end", len(dims))]


@op("Size", numpy=True)
def _size(c: Call, x: Tensor) -> Tensor:
    return np.asarray(math.prod(np.shape(x)), dtype=np.int64)


def _check_constant(node: Node) -> str | None:
    for key in ("sparse_value", "value_string", "value_strings"):
        if key in node.attrs:
            return f"Constant with {key} is not supported"
    return None


@op("Constant", check=_check_constant, numpy=True)
def _constant(c: Call) -> Tensor:
    if c.has("value"):
        return np.asarray(c.attr("value"))
    if c.has("value_float"):
        return np.asarray(c.attr("value_float"), dtype=np.float32)
    if c.has("value_floats"):
        return np.asarray(c.attr("value_floats"), dtype=np.float32)
    if c.has("value_int"):
        return np.asarray(c.attr("value_int"), dtype=np.int64)
    if c.has("value_ints"):
        return np.asarray(c.attr("value_ints"), dtype=np.int64)
    raise c.fail("Constant sets none of value, value_float(s), value_int(s)")


@op("ConstantOfShape", static=(0,))
def _constant_of_shape(c: Call, shape: Tensor) -> Tensor:
    import jax.numpy as jnp

    dims = c.static_ints(shape, "the output shape")
    value = c.attr("value")
    fill = np.zeros((1,), np.float32) if value is None else np.asarray(value).reshape(-1)
    return jnp.full(dims, fill[0], dtype=jax_dtype(fill.dtype))


@op("Reshape", static=(1,), numpy=True)
def _reshape(c: Call, x: Tensor, shape: Tensor = None) -> Tensor:
    jnp = c.xp

    target = c.attr("shape") if shape is None else c.static_ints(shape, "the target shape")
    if target is None:
        raise c.fail("Reshape has neither a shape input nor a shape attribute")
    dims = list(np.shape(x))
    allowzero = c.attr("allowzero", 0)
    out = [dims[i] if (d == 0 and not allowzero and i < len(dims)) else int(d)
           for i, d in enumerate(target)]
    if out.count(-1) > 1:
        raise c.shape_error(f"target shape {list(target)} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(dims)
        if known == 0 or total % known:
            raise c.shape_error(f"cannot reshape {dims} to {list(target)}")
        out[out.index(-1)] = total // known
    if math.prod(out) != math.prod(dims):
        raise c.shape_error(f"cannot reshape {dims} ({math.prod(dims)} elements) to "
                            f"{list(target)} ({math.prod(out)} elements)")
    return jnp.reshape(x, out)


@op("Flatten", numpy=True)
def _flatten(c: Call, x: Tensor) -> Tensor:
    jnp = c.xp

    dims = np.shape(x)
    axis = c.attr("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    if not 0 <= axis <= len(dims):
        raise c.shape_error(f"axis {c.attr('axis', 1)} is out of range for rank {len(dims)}")
    return jnp.reshape(x, (math.prod(dims[:axis]), math.prod(dims[axis:])))


@op("Transpose", numpy=True)
def _transpose(c: Call, x: Tensor) -> Tensor:
    jnp = c.xp

    perm = c.attr("perm")
    return jnp.transpose(x, None if perm is None else [int(p) for p in perm])


@op("Squeeze", static=(1,), numpy=True)
def _squeeze(c: Call, x: Tensor, axes: Tensor = None) -> Tensor:
    jnp = c.xp

    dims = np.shape(x)
    found = c.attr("axes") if axes is None else c.static_ints(axes, "the squeezed axes")
    if found is None:
        return jnp.reshape(x, [d for d in dims if d != 1])
    which = normalize_axes(c, found, len(dims))
    bad = [a for a in which if dims[a] != 1]
    if bad:
        raise c.shape_error(f"cannot squeeze axis {bad[0]} of size {dims[bad[0]]}")
    return jnp.reshape(x, [d for i, d in enumerate(dims) if i not in which])


@op("Unsqueeze", static=(1,), numpy=True)
def _unsqueeze(c: Call, x: Tensor, axes: Tensor = None) -> Tensor:
    jnp = c.xp

    found = c.attr("axes") if axes is None else c.static_ints(axes, "the inserted axes")
    if found is None:
        raise c.fail("Unsqueeze has no axes")
    dims = list(np.shape(x))
    which = sorted(normalize_axes(c, found, len(dims) + len(found)))
    for a in which:
        dims.insert(a, 1)
    return jnp.reshape(x, dims)


@op("Expand", static=(1,))
def _expand(c: Call, x: Tensor, shape: Tensor) -> Tensor:
    import jax.numpy as jnp

    dims = c.static_ints(shape, "the expanded shape")
    return jnp.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(dims)))


@op("Tile", static=(1,))
def _tile(c: Call, x: Tensor, repeats: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.tile(x, c.static_ints(repeats, "the repeats"))


@op("Concat", numpy=True)
def _concat(c: Call, *xs: Tensor) -> Tensor:
    jnp = c.xp

    parts = [x for x in xs if x is not None]
    axis = normalize_axis(c, c.attr("axis", 0), np.ndim(parts[0]))
    return jnp.concatenate(parts, axis=axis)


@op("Split", static=(1,), numpy=True)
def _split(c: Call, x: Tensor, split: Tensor = None) -> tuple[Tensor, ...]:
    dims = np.shape(x)
    axis = normalize_axis(c, c.attr("axis", 0), len(dims))
    n = c.attr("num_outputs") or len(c.node.outputs)
    sizes = c.attr("split") if split is None else c.static_ints(split, "the split sizes")
    if sizes is None:
        each = -(-dims[axis] // n)
        sizes = [each] * (n - 1) + [dims[axis] - each * (n - 1)]
    if sum(sizes) != dims[axis] or min(sizes) < 0:
        raise c.shape_error(f"split sizes {list(sizes)} do not add up to dimension "
                            f"{axis} of size {dims[axis]}")
    start, out = 0, []
    for size in sizes:
        index = [slice(None)] * len(dims)
        index[axis] = slice(start, start + size)
        out.append(x[tuple(index)])
        start += size
    return tuple(out)


@op("Range", static=(0, 1, 2), numpy=True)
def _range(c: Call, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    s, lim, d = (c.static(v, "a Range bound").reshape(-1)[0] for v in (start, limit, delta))
    if d == 0:
        raise c.shape_error("Range delta is 0")
    count = max(math.ceil((float(lim) - float(s)) / float(d)), 0)
    dtype = np.asarray(s).dtype
    wide = np.dtype(np.float64 if dtype.kind == "f" else np.int64)
    steps: np.ndarray = np.arange(count, dtype=wide)
    first: np.ndarray = np.asarray(s, dtype=wide)
    return (first + steps * np.asarray(d, dtype=wide)).astype(dtype)


@op("Dropout", static=(1, 2))
def _dropout(c: Call, x: Tensor, ratio: Tensor = None, training: Tensor = None
             ) -> tuple[Tensor, Tensor]:
    import jax.numpy as jnp

    if training is not None:
        train = bool(c.static(training, "training_mode"))
    else:
        train = c.opset < 7 and c.attr("is_test", 0) == 0
    rate = c.attr("ratio", 0.5) if ratio is None else float(c.static(ratio, "the ratio"))
    if train and rate > 0:
        raise c.fail("Dropout in training mode is random; the executor runs inference only")
    return x, jnp.ones(np.shape(x), dtype=bool)


@op("DepthToSpace")
def _depth_to_space(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    b = c.attr("blocksize")
    n, ch, h, w = np.shape(x)
    if c.attr("mode", "DCR") == "DCR":
        y = jnp.reshape(x, (n, b, b, ch // (b * b), h, w)).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = jnp.reshape(x, (n, ch // (b * b), b, b, h, w)).transpose(0, 1, 4, 2, 5, 3)
    return jnp.reshape(y, (n, ch // (b * b), h * b, w * b))


@op("SpaceToDepth")
def _space_to_depth(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    b = c.attr("blocksize")
    n, ch, h, w = np.shape(x)
    y = jnp.reshape(x, (n, ch, h // b, b, w // b, b))
    if c.attr("mode", "DCR") == "DCR":
        y = y.transpose(0, 3, 5, 1, 2, 4)
    else:
        y = y.transpose(0, 1, 3, 5, 2, 4)
    return jnp.reshape(y, (n, ch * b * b, h // b, w // b))


@op("EyeLike")
def _eye_like(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    from ._ops_quant import onnx_dtype

    dtype = onnx_dtype(c.attr("dtype")) if c.has("dtype") else np.dtype(x.dtype)
    rows, cols = np.shape(x)
    return jnp.eye(rows, cols, k=c.attr("k", 0), dtype=jax_dtype(dtype))
