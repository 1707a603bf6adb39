"""Element-wise operators: arithmetic, activations, comparisons, logic, ``Where``, ``Clip``.

Binary operators broadcast numpy-style (ONNX multidirectional broadcasting is the same
rule). Integer ``Div`` truncates toward zero and ``Mod`` follows the sign of the divisor
unless ``fmod=1``, as the ONNX reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._graph import Node
from ._registry import Call, Tensor, op

__all__: list[str] = []


def _register_unary(name: str, fn: Callable[[Any, Tensor], Tensor]) -> None:
    def unary(c: Call, x: Tensor) -> Tensor:
        import jax.numpy as jnp

        return fn(jnp, x)

    op(name)(unary)


_UNARY: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "Abs": lambda jnp, x: jnp.abs(x),
    "Neg": lambda jnp, x: jnp.negative(x),
    "Sqrt": lambda jnp, x: jnp.sqrt(x),
    "Exp": lambda jnp, x: jnp.exp(x),
    "Log": lambda jnp, x: jnp.log(x),
    "Reciprocal": lambda jnp, x: jnp.reciprocal(x),
    "Relu": lambda jnp, x: jnp.maximum(x, jnp.zeros((), x.dtype)),
    "Sigmoid": lambda jnp, x: _sigmoid(x),
    "Tanh": lambda jnp, x: jnp.tanh(x),
    "Erf": lambda jnp, x: _erf(x),
    "Floor": lambda jnp, x: jnp.floor(x),
    "Ceil": lambda jnp, x: jnp.ceil(x),
    "Round": lambda jnp, x: jnp.round(x),
    "Sign": lambda jnp, x: jnp.sign(x),
    "Sin": lambda jnp, x: jnp.sin(x),
    "Cos": lambda jnp, x: jnp.cos(x),
    "Tan": lambda jnp, x: jnp.tan(x),
    "Asin": lambda jnp, x: jnp.arcsin(x),
    "Acos": lambda jnp, x: jnp.arccos(x),
    "Atan": lambda jnp, x: jnp.arctan(x),
    "Sinh": lambda jnp, x: jnp.sinh(x),
    "Cosh": lambda jnp, x: jnp.cosh(x),
    "Asinh": lambda jnp, x: jnp.arcsinh(x),
    "Acosh": lambda jnp, x: jnp.arccosh(x),
    "Atanh": lambda jnp, x: jnp.arctanh(x),
    "Softplus": lambda jnp, x: jnp.logaddexp(x, jnp.zeros((), x.dtype)),
    "Softsign": lambda jnp, x: x / (1 + jnp.abs(x)),
    "Mish": lambda jnp, x: x * jnp.tanh(jnp.logaddexp(x, jnp.zeros((), x.dtype))),
    "IsNaN": lambda jnp, x: jnp.isnan(x),
    "Not": lambda jnp, x: jnp.logical_not(x),
    "BitwiseNot": lambda jnp, x: jnp.bitwise_not(x),
}
for _name, _fn in _UNARY.items():
    _register_unary(_name, _fn)


def _sigmoid(x: Tensor) -> Tensor:
    import jax

    return jax.nn.sigmoid(x)


def _erf(x: Tensor) -> Tensor:
    import jax

    return jax.scipy.special.erf(x)


@op("IsInf")
def _isinf(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    pos, neg = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    return jnp.logical_or(jnp.logical_and(jnp.isposinf(x), bool(pos)),
                          jnp.logical_and(jnp.isneginf(x), bool(neg)))


# Activations with attributes


@op("LeakyRelu")
def _leaky_relu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.where(x >= 0, x, x * c.attr("alpha", 0.01))


@op("PRelu")
def _prelu(c: Call, x: Tensor, slope: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.where(x >= 0, x, jnp.multiply(x, slope))


@op("HardSigmoid")
def _hard_sigmoid(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.clip(x * c.attr("alpha", 0.2) + c.attr("beta", 0.5), 0, 1).astype(x.dtype)


@op("HardSwish")
def _hard_swish(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return x * jnp.clip(x * (1 / 6) + 0.5, 0, 1).astype(x.dtype)


@op("Elu")
def _elu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.where(x > 0, x, c.attr("alpha", 1.0) * jnp.expm1(jnp.minimum(x, 0)))


@op("Celu")
def _celu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    alpha = c.attr("alpha", 1.0)
    return jnp.maximum(x, 0) + jnp.minimum(0, alpha * jnp.expm1(x / alpha))


@op("Selu")
def _selu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    alpha = c.attr("alpha", 1.67326319217681884765625)
    gamma = c.attr("gamma", 1.05070102214813232421875)
    return gamma * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


@op("ThresholdedRelu")
def _thresholded_relu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.where(x > c.attr("alpha", 1.0), x, jnp.zeros((), x.dtype))


@op("Shrink")
def _shrink(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    bias, lambd = c.attr("bias", 0.0), c.attr("lambd", 0.5)
    out = jnp.where(x < -lambd, x + bias, jnp.where(x > lambd, x - bias, 0))
    return out.astype(x.dtype)


def _check_gelu(node: Node) -> str | None:
    mode = node.attrs.get("approximate", "none")
    return None if mode in ("none", "tanh") else f"approximate={mode!r} is not a Gelu mode"


@op("Gelu", check=_check_gelu)
def _gelu(c: Call, x: Tensor) -> Tensor:
    import jax.numpy as jnp

    if c.attr("approximate", "none") == "tanh":
        inner = float(np.sqrt(2 / np.pi)) * (x + 0.044715 * x * x * x)
        return (0.5 * x * (1 + jnp.tanh(inner))).astype(x.dtype)
    return (0.5 * x * (1 + _erf(x * float(1 / np.sqrt(2))))).astype(x.dtype)


@op("Swish")
def _swish(c: Call, x: Tensor) -> Tensor:
    return x * _sigmoid(x * c.attr("alpha", 1.0))


# Binary arithmetic


def _register_binary(name: str, fn: Callable[[Any, Tensor, Tensor], Tensor]) -> None:
    def binary(c: Call, a: Tensor, b: Tensor) -> Tensor:
        import jax.numpy as jnp

        return fn(jnp, a, b)

    op(name)(binary)


_BINARY: dict[str, Callable[[Any, Tensor, Tensor], Tensor]] = {
    "Add": lambda jnp, a, b: jnp.add(a, b),
    "Sub": lambda jnp, a, b: jnp.subtract(a, b),
    "Mul": lambda jnp, a, b: jnp.multiply(a, b),
    "Equal": lambda jnp, a, b: jnp.equal(a, b),
    "Less": lambda jnp, a, b: jnp.less(a, b),
    "LessOrEqual": lambda jnp, a, b: jnp.less_equal(a, b),
    "Greater": lambda jnp, a, b: jnp.greater(a, b),
    "GreaterOrEqual": lambda jnp, a, b: jnp.greater_equal(a, b),
    "And": lambda jnp, a, b: jnp.logical_and(a, b),
    "Or": lambda jnp, a, b: jnp.logical_or(a, b),
    "Xor": lambda jnp, a, b: jnp.logical_xor(a, b),
    "BitwiseAnd": lambda jnp, a, b: jnp.bitwise_and(a, b),
    "BitwiseOr": lambda jnp, a, b: jnp.bitwise_or(a, b),
    "BitwiseXor": lambda jnp, a, b: jnp.bitwise_xor(a, b),
}
for _name, _fn2 in _BINARY.items():
    _register_binary(_name, _fn2)


@op("Div", numpy=True)
def _div(c: Call, a: Tensor, b: Tensor) -> Tensor:
    jnp = c.xp

    if jnp.issubdtype(a.dtype, jnp.integer):
        q = jnp.floor_divide(a, b)
        adjust = (jnp.remainder(a, b) != 0) & ((a < 0) ^ (b < 0))
        return q + adjust.astype(q.dtype)
    return jnp.divide(a, b)


@op("Pow")
def _pow(c: Call, a: Tensor, b: Tensor) -> Tensor:
    import jax.numpy as jnp

    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.power(a, jnp.asarray(b).astype(a.dtype))
    if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
        return jnp.power(a.astype(b.dtype), b).astype(a.dtype)
    return jnp.power(a, jnp.asarray(b).astype(a.dtype))


@op("Mod", numpy=True)
def _mod(c: Call, a: Tensor, b: Tensor) -> Tensor:
    jnp = c.xp

    return jnp.fmod(a, b) if c.attr("fmod", 0) else jnp.remainder(a, b)


@op("BitShift", numpy=True)
def _bit_shift(c: Call, a: Tensor, b: Tensor) -> Tensor:
    jnp = c.xp

    if c.attr("direction") == "LEFT":
        return jnp.left_shift(a, b)
    return jnp.right_shift(a, b)


def _variadic(fn: Callable[[Any, Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def combine(c: Call, *xs: Tensor) -> Tensor:
        import jax.numpy as jnp

        out = xs[0]
        for x in xs[1:]:
            out = fn(jnp, out, x)
        return out

    return combine


op("Sum")(_variadic(lambda jnp, a, b: jnp.add(a, b)))
op("Max")(_variadic(lambda jnp, a, b: jnp.maximum(a, b)))
op("Min")(_variadic(lambda jnp, a, b: jnp.minimum(a, b)))


@op("Mean", numpy=True)
def _mean(c: Call, *xs: Tensor) -> Tensor:
    jnp = c.xp

    total = _variadic(lambda jnp, a, b: jnp.add(a, b))(c, *xs)
    return jnp.divide(total, len(xs)).astype(jnp.result_type(total))


# Selection and clipping


@op("Where", numpy=True)
def _where(c: Call, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    jnp = c.xp

    return jnp.where(cond, a, b)


@op("Clip", numpy=True)
def _clip(c: Call, x: Tensor, lo: Tensor = None, hi: Tensor = None) -> Tensor:
    jnp = c.xp

    if c.opset < 11:
        lo = c.attr("min", -np.inf)
        hi = c.attr("max", np.inf)
    if lo is not None:
        x = jnp.maximum(x, jnp.asarray(lo).astype(x.dtype))
    if hi is not None:
        x = jnp.minimum(x, jnp.asarray(hi).astype(x.dtype))
    return x
