"""Dtype conversions: ``Cast``, ``CastLike``, ``QuantizeLinear``, ``DequantizeLinear``.

64-bit ONNX types map to JAX's canonical types: with JAX's default 32-bit mode an
``int64`` cast gives ``int32`` and a ``double`` cast gives ``float32`` (static values are
folded in 64-bit, so shape arithmetic stays exact). Casts to the float8 types saturate
to the largest finite value unless ``saturate=0``, as ONNX specifies.
"""

from __future__ import annotations

import numpy as np

from ._graph import Node
from ._registry import Call, Tensor, op

__all__ = ["jax_dtype", "onnx_dtype"]

# ONNX TensorProto element types the executor cannot represent in JAX.
_STRING, _FLOAT8E8M0 = 8, 24
_NARROW_INTS = ("int4", "uint4", "int2", "uint2")
_SATURATING = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


def onnx_dtype(elem_type: int) -> np.dtype:
    """The numpy (or ml_dtypes) dtype of an ONNX element type."""
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def jax_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype JAX computes ``dtype`` in under the current 32/64-bit mode."""
    import jax

    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _check_cast(node: Node) -> str | None:
    to = node.attrs.get("to")
    if to == _STRING:
        return "casting to string tensors is not supported"
    if to == _FLOAT8E8M0:
        return "casting to float8e8m0 is not supported"
    return None


def _cast(c: Call, x: Tensor, target: np.dtype, saturate: bool) -> Tensor:
    jnp = c.xp
    if isinstance(x, np.ndarray) and x.dtype.kind in "OSU":
        raise c.fail("casting from string tensors is not supported")
    dtype = c.dtype(target)
    x = jnp.asarray(x)
    if saturate and dtype.name in _SATURATING and jnp.issubdtype(x.dtype, jnp.floating):
        import ml_dtypes

        info = ml_dtypes.finfo(dtype)
        x = jnp.clip(x, float(info.min), float(info.max))
    if dtype.name in _NARROW_INTS and not jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.int32)  # then wrap to the narrow type's bits, as ONNX does
    return x.astype(dtype)


@op("Cast", check=_check_cast, numpy=True)
def _cast_op(c: Call, x: Tensor) -> Tensor:
    return _cast(c, x, onnx_dtype(c.attr("to")), bool(c.attr("saturate", 1)))


@op("CastLike", numpy=True)
def _cast_like(c: Call, x: Tensor, like: Tensor) -> Tensor:
    return _cast(c, x, np.dtype(like.dtype), bool(c.attr("saturate", 1)))


def _per_axis(c: Call, value: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Reshapes a scale or zero point to broadcast against ``shape`` (ONNX rules)."""
    import jax.numpy as jnp

    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    if value.size == 1 and value.ndim == 1:
        return value[0]
    axis = c.attr("axis", 1) % len(shape)
    block = c.attr("block_size", 0)
    if not block:
        if value.ndim != 1 or value.shape[0] != shape[axis]:
            raise c.shape_error(f"a per-axis scale of shape {list(value.shape)} does not "
                                f"match axis {axis} of an input of shape {list(shape)}")
        dims = [1] * len(shape)
        dims[axis] = value.shape[0]
        return value.reshape(dims)
    value = jnp.repeat(value, block, axis=axis)
    return jnp.take(value, jnp.arange(shape[axis]), axis=axis)


_INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535),
               "int16": (-32768, 32767), "uint4": (0, 15), "int4": (-8, 7),
               "uint2": (0, 3), "int2": (-2, 1)}


@op("QuantizeLinear")
def _quantize(c: Call, x: Tensor, scale: Tensor, zero: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    if zero is not None:
        target = np.dtype(zero.dtype)
    elif c.attr("output_dtype"):
        target = onnx_dtype(c.attr("output_dtype"))
    else:
        target = np.dtype(np.uint8)
    x = jnp.asarray(x)
    if c.attr("precision"):
        precision = jax_dtype(onnx_dtype(c.attr("precision")))
        y = x.astype(precision) / _per_axis(c, scale, x.shape).astype(precision)
    else:
        y = x / _per_axis(c, scale, x.shape)
    if target.name in _INT_RANGES:
        lo, hi = _INT_RANGES[target.name]
        q = jnp.round(y).astype(jnp.int32)
        if zero is not None:
            q = q + _per_axis(c, zero, x.shape).astype(jnp.int32)
        return jnp.clip(q, lo, hi).astype(jax_dtype(target))
    if target.name in _SATURATING:
        return _cast(c, y, target, bool(c.attr("saturate", 1)))
    if zero is not None:
        y = y + _per_axis(c, zero, x.shape).astype(y.dtype)
    return y.astype(jax_dtype(target))


@op("DequantizeLinear")
def _dequantize(c: Call, x: Tensor, scale: Tensor, zero: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    dx = x.astype(jnp.float32)
    if zero is not None and jnp.issubdtype(x.dtype, jnp.integer):
        dx = dx - _per_axis(c, zero, x.shape).astype(jnp.float32)
    y = dx * _per_axis(c, scale, x.shape)
    out = onnx_dtype(c.attr("output_dtype")) if c.attr("output_dtype") else scale.dtype
    return y.astype(jax_dtype(np.dtype(out)))
