"""Reductions and scans: ``Reduce*``, ``ArgMax``/``ArgMin``, ``CumSum``, ``Softmax``...

Reduction axes are an attribute before opset 18 (13 for ``ReduceSum``) and an input
after; either way they must be static. Reducing an empty set gives the identity of
the reduction (``-inf`` for ``ReduceMax``, 0 for ``ReduceSum``), as ONNX specifies.
``Softmax``, ``LogSoftmax`` and ``Hardmax`` before opset 13 flatten the axes from
``axis`` on into one, as those versions define.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._registry import Call, Tensor, normalize_axes, normalize_axis, op

__all__: list[str] = []


def _axes(c: Call, x: Tensor, axes: Tensor) -> tuple[int, ...] | None:
    """The reduced axes, or None for 'return the input unchanged' (noop_with_empty_axes)."""
    found = c.attr("axes") if axes is None else c.static_ints(axes, "the reduced axes")
    rank = np.ndim(x)
    if not found:
        return None if c.attr("noop_with_empty_axes", 0) else tuple(range(rank))
    return tuple(normalize_axes(c, found, rank))


def _lowest(dtype: Any) -> float:
    import jax.numpy as jnp

    return -np.inf if jnp.issubdtype(dtype, jnp.floating) else int(jnp.iinfo(dtype).min)


def _highest(dtype: Any) -> float:
    import jax.numpy as jnp

    return np.inf if jnp.issubdtype(dtype, jnp.floating) else int(jnp.iinfo(dtype).max)


_REDUCERS: dict[str, Callable[[Any, Tensor, tuple[int, ...], bool], Tensor]] = {
    "ReduceSum": lambda jnp, x, a, k: jnp.sum(x, axis=a, keepdims=k),
    "ReduceMean": lambda jnp, x, a, k: jnp.mean(x, axis=a, keepdims=k),
    "ReduceMax": lambda jnp, x, a, k: jnp.max(x, axis=a, keepdims=k,
                                              initial=_lowest(x.dtype)),
    "ReduceMin": lambda jnp, x, a, k: jnp.min(x, axis=a, keepdims=k,
                                              initial=_highest(x.dtype)),
    "ReduceProd": lambda jnp, x, a, k: jnp.prod(x, axis=a, keepdims=k),
    "ReduceL1": lambda jnp, x, a, k: jnp.sum(jnp.abs(x), axis=a, keepdims=k),
    "ReduceL2": lambda jnp, x, a, k: jnp.sqrt(jnp.sum(x * x, axis=a, keepdims=k)),
    "ReduceSumSquare": lambda jnp, x, a, k: jnp.sum(x * x, axis=a, keepdims=k),
    "ReduceLogSum": lambda jnp, x, a, k: jnp.log(jnp.sum(x, axis=a, keepdims=k)),
    "ReduceLogSumExp": lambda jnp, x, a, k: _logsumexp(x, a, k),
}


def _logsumexp(x: Tensor, axes: tuple[int, ...], keepdims: bool) -> Tensor:
    import jax

    if 0 in np.shape(x):
        import jax.numpy as jnp

        return jnp.log(jnp.sum(jnp.exp(x), axis=axes, keepdims=keepdims))
    return jax.scipy.special.logsumexp(x, axis=axes, keepdims=keepdims)


def _register_reduce(name: str, fn: Callable[[Any, Tensor, tuple[int, ...], bool], Tensor]
                     ) -> None:
    def reduce(c: Call, x: Tensor, axes: Tensor = None) -> Tensor:
        jnp = c.xp

        which = _axes(c, x, axes)
        if which is None:
            return x
        x = jnp.asarray(x)
        keep = bool(c.attr("keepdims", 1))
        if x.dtype == bool and name in ("ReduceMax", "ReduceMin"):
            pick = jnp.any if name == "ReduceMax" else jnp.all
            return pick(x, axis=which, keepdims=keep)
        return fn(jnp, x, which, keep).astype(x.dtype)

    op(name, static=(1,), numpy=name != "ReduceLogSumExp")(reduce)


for _name, _fn in _REDUCERS.items():
    _register_reduce(_name, _fn)


def _arg(c: Call, x: Tensor, largest: bool) -> Tensor:
    jnp = c.xp

    x = jnp.asarray(x)
    axis = normalize_axis(c, c.attr("axis", 0), x.ndim)
    keep = bool(c.attr("keepdims", 1))
    pick = jnp.argmax if largest else jnp.argmin
    if c.attr("select_last_index", 0):
        found = x.shape[axis] - 1 - pick(jnp.flip(x, axis=axis), axis=axis, keepdims=keep)
    else:
        found = pick(x, axis=axis, keepdims=keep)
    return found


@op("ArgMax", numpy=True)
def _argmax(c: Call, x: Tensor) -> Tensor:
    return _arg(c, x, largest=True)


@op("ArgMin", numpy=True)
def _argmin(c: Call, x: Tensor) -> Tensor:
    return _arg(c, x, largest=False)


def _scan(c: Call, x: Tensor, axis: Tensor, fn: Callable[..., Tensor], unit: int) -> Tensor:
    jnp = c.xp

    x = jnp.asarray(x)
    a = normalize_axis(c, int(c.static(axis, "the scan axis").reshape(-1)[0]), x.ndim)
    if c.attr("reverse", 0):
        x = jnp.flip(x, axis=a)
    out = fn(x, axis=a)
    if c.attr("exclusive", 0):
        first = jnp.full_like(jnp.take(out, jnp.arange(1), axis=a), unit)
        rest = jnp.take(out, jnp.arange(x.shape[a] - 1), axis=a)
        out = jnp.concatenate([first, rest], axis=a)
    if c.attr("reverse", 0):
        out = jnp.flip(out, axis=a)
    return out.astype(x.dtype)


@op("CumSum", static=(1,), numpy=True)
def _cumsum(c: Call, x: Tensor, axis: Tensor) -> Tensor:
    return _scan(c, x, axis, c.xp.cumsum, 0)


@op("CumProd", static=(1,), numpy=True)
def _cumprod(c: Call, x: Tensor, axis: Tensor) -> Tensor:
    return _scan(c, x, axis, c.xp.cumprod, 1)


def _softmax_like(c: Call, x: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if c.opset >= 13:
        return fn(x, normalize_axis(c, c.attr("axis", -1), x.ndim))
    axis = normalize_axis(c, c.attr("axis", 1), x.ndim)
    flat = jnp.reshape(x, (int(np.prod(x.shape[:axis])), -1))
    return jnp.reshape(fn(flat, 1), x.shape)


@op("Softmax")
def _softmax(c: Call, x: Tensor) -> Tensor:
    import jax

    return _softmax_like(c, x, lambda v, a: jax.nn.softmax(v, axis=a))


@op("LogSoftmax")
def _log_softmax(c: Call, x: Tensor) -> Tensor:
    import jax

    return _softmax_like(c, x, lambda v, a: jax.nn.log_softmax(v, axis=a))


@op("Hardmax")
def _hardmax(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    def hard(v: Tensor, a: int) -> Tensor:
        first = jnp.argmax(v, axis=a, keepdims=True)
        positions = jnp.arange(v.shape[a]).reshape([-1 if i == a else 1
                                                    for i in range(v.ndim)])
        return (positions == first).astype(v.dtype)

    return _softmax_like(c, x, hard)
