"""Normalizations: batch (inference and training statistics), layer, instance, group, RMS,
LRN, Lp and mean-variance.

Statistics of half-precision inputs are computed in float32 (ONNX's ``stash_type=1``)
and the result cast back to the input dtype.
"""

from __future__ import annotations

import numpy as np

from ._registry import Call, Tensor, normalize_axis, op

__all__: list[str] = []


def _channel(v: Tensor, rank: int) -> Tensor:
    """A per-channel vector shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    import jax.numpy as jnp

    return jnp.reshape(jnp.asarray(v), (-1,) + (1,) * (rank - 2))


def _stash(x: Tensor) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    return x.astype(jnp.float32) if x.dtype.itemsize < 4 else x


@op("BatchNormalization")
def _batch_norm(c: Call, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor
                ) -> Tensor | tuple[Tensor, ...]:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    rank = x.ndim
    eps = c.attr("epsilon", 1e-5)
    training = bool(c.attr("training_mode", 0)) or (c.opset < 7 and not c.attr("is_test", 0))
    if not training:
        y = ((x - _channel(mean, rank)) * jax.lax.rsqrt(_channel(var, rank) + eps)
             * _channel(scale, rank) + _channel(bias, rank))
        return y.astype(x.dtype)
    axes = tuple(i for i in range(rank) if i != 1)
    batch_mean = jnp.mean(x, axis=axes)
    batch_var = jnp.var(x, axis=axes)
    momentum = c.attr("momentum", 0.9)
    y = ((x - _channel(batch_mean, rank)) * jax.lax.rsqrt(_channel(batch_var, rank) + eps)
         * _channel(scale, rank) + _channel(bias, rank)).astype(x.dtype)
    running_mean = (jnp.asarray(mean) * momentum + batch_mean * (1 - momentum)).astype(x.dtype)
    running_var = (jnp.asarray(var) * momentum + batch_var * (1 - momentum)).astype(x.dtype)
    return y, running_mean, running_var


def _normalize(x: Tensor, axes: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(normalized x, mean, 1/std) over ``axes``, computed in float32 or wider."""
    import jax
    import jax.numpy as jnp

    xs = _stash(x)
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    centered = xs - mean
    inv = jax.lax.rsqrt(jnp.mean(centered * centered, axis=axes, keepdims=True) + eps)
    return centered * inv, mean, inv


@op("LayerNormalization")
def _layer_norm(c: Call, x: Tensor, scale: Tensor, bias: Tensor = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    axis = normalize_axis(c, c.attr("axis", -1), x.ndim)
    y, mean, inv = _normalize(x, tuple(range(axis, x.ndim)), c.attr("epsilon", 1e-5))
    y = y * jnp.asarray(scale)
    if bias is not None:
        y = y + jnp.asarray(bias)
    return y.astype(x.dtype), mean.astype(x.dtype), inv.astype(x.dtype)


@op("RMSNormalization")
def _rms_norm(c: Call, x: Tensor, scale: Tensor) -> Tensor:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    axis = normalize_axis(c, c.attr("axis", -1), x.ndim)
    xs = _stash(x)
    ms = jnp.mean(xs * xs, axis=tuple(range(axis, x.ndim)), keepdims=True)
    y = xs * jax.lax.rsqrt(ms + c.attr("epsilon", 1e-5)) * jnp.asarray(scale)
    return y.astype(x.dtype)


@op("InstanceNormalization")
def _instance_norm(c: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    y, _, _ = _normalize(x, tuple(range(2, x.ndim)), c.attr("epsilon", 1e-5))
    y = y * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    return y.astype(x.dtype)


@op("GroupNormalization")
def _group_norm(c: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    groups = c.attr("num_groups")
    n, ch = x.shape[:2]
    if not groups or ch % groups:
        raise c.shape_error(f"{ch} channels cannot be split into num_groups={groups}")
    grouped = jnp.reshape(x, (n, groups, -1))
    y, _, _ = _normalize(grouped, (2,), c.attr("epsilon", 1e-5))
    y = jnp.reshape(y, x.shape)
    scale, bias = jnp.asarray(scale), jnp.asarray(bias)
    if scale.shape[0] == groups and groups != ch:  # opset 18: one scale per group
        scale, bias = jnp.repeat(scale, ch // groups), jnp.repeat(bias, ch // groups)
    y = y * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    return y.astype(x.dtype)


@op("LRN")
def _lrn(c: Call, x: Tensor) -> Tensor:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    size = c.attr("size")
    alpha, beta, bias = c.attr("alpha", 1e-4), c.attr("beta", 0.75), c.attr("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    window = (1, size) + (1,) * (x.ndim - 2)
    pads = ((0, 0), (before, after)) + ((0, 0),) * (x.ndim - 2)
    square_sum = jax.lax.reduce_window(x * x, np.asarray(0, x.dtype), jax.lax.add, window,
                                       (1,) * x.ndim, pads)
    return (x / (bias + (alpha / size) * square_sum) ** beta).astype(x.dtype)


@op("LpNormalization")
def _lp_norm(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    axis = normalize_axis(c, c.attr("axis", -1), x.ndim)
    p = c.attr("p", 2)
    norm = jnp.sum(jnp.abs(x) ** p, axis=axis, keepdims=True) ** (1.0 / p)
    return jnp.where(norm == 0, 0, x / jnp.where(norm == 0, 1, norm)).astype(x.dtype)


@op("MeanVarianceNormalization")
def _mvn(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    axes = tuple(int(a) % x.ndim for a in c.attr("axes", [0, 2, 3]))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(x * x, axis=axes, keepdims=True) - mean * mean
    return ((x - mean) / (jnp.sqrt(var) + 1e-9)).astype(x.dtype)
