"""Matrix products: ``MatMul``, ``Gemm``, ``Einsum``.

``MatMul`` follows numpy's ``matmul`` (1-d operands are promoted and the added axis
removed; leading axes broadcast), which is what ONNX specifies.
"""

from __future__ import annotations

from ._registry import Call, Tensor, op

__all__: list[str] = []


@op("MatMul")
def _matmul(c: Call, a: Tensor, b: Tensor) -> Tensor:
    import jax.numpy as jnp

    return jnp.matmul(a, b)


@op("Gemm")
def _gemm(c: Call, a: Tensor, b: Tensor, bias: Tensor = None) -> Tensor:
    import jax.numpy as jnp

    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if c.attr("transA", 0):
        a = a.T
    if c.attr("transB", 0):
        b = b.T
    y = jnp.matmul(a, b)
    alpha, beta = c.attr("alpha", 1.0), c.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * jnp.asarray(alpha, dtype=y.dtype)
    if bias is not None and beta != 0.0:
        bias = jnp.asarray(bias)
        y = y + (bias if beta == 1.0 else bias * jnp.asarray(beta, dtype=bias.dtype))
    return y


@op("Einsum")
def _einsum(c: Call, *xs: Tensor) -> Tensor:
    import jax.numpy as jnp

    equation = str(c.attr("equation", "")).replace(" ", "")
    return jnp.einsum(equation, *xs)
