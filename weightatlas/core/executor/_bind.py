"""Binding values to a graph: weights split from constants, inputs checked against specs.

Everything here runs before a graph is traced or while it is, never on the hot path of a
compiled function.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import numpy as np

from weightatlas.errors import ShapeError, UnsupportedError

from ._errors import InputMismatchError
from ._graph import Graph, ValueSpec
from ._ops_quant import jax_dtype

__all__ = ["NUMERIC_VOID", "abstract", "abstract_of", "check_value", "dynamic", "split_weights",
           "suggest", "traced"]


def suggest(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'a', 'b'?"`` for the known names closest to ``name``, or ``""``."""
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(k.lower(), k)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3)
    return f"; did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else ""


def split_weights(graph: Graph, overrides: dict[str, Any], where: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    import jax.numpy as jnp

    values: dict[str, np.ndarray] = dict(graph.initializers)
    declared = {**{s.name: s for s in graph.inputs}, **graph.external}
    for name, value in overrides.items():
        spec = declared.get(name)
        if spec is None and name not in values:
            raise InputMismatchError(f"{where}: the graph has no initializer or input named "
                                     f"{name!r}{suggest(name, set(values) | set(declared))}")
        array = np.asarray(value)
        if name in values:
            spec = ValueSpec(name, values[name].dtype, values[name].shape)
        if spec is not None:
            check_value(where, f"weight {name!r}", spec, array)
        values[name] = array
    missing = sorted(set(graph.external) - set(values))
    if missing:
        raise InputMismatchError(
            f"{where}: tensor {missing[0]!r} is stored as external data, which the executor "
            f"never opens; pass its values in weights= ({len(missing)} such tensors)")
    weights = {k: v for k, v in values.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    constants = {k: v for k, v in values.items() if k not in weights}
    return weights, constants


# ml_dtypes types numpy reports as kind 'V'.
NUMERIC_VOID = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2",
                 "uint2", "float6_e2m3fn", "float6_e3m2fn", "float8_e3m4", "float8_e4m3",
                 "float8_e4m3b11fnuz")


def check_value(where: str, what: str, spec: ValueSpec, value: Any,
                 dims: dict[str, int] | None = None) -> None:
    """Raises when ``value``'s dtype or shape disagrees with ``spec``."""
    dtype = np.dtype(value.dtype)
    if dtype.kind in "OSUV" and dtype.name not in NUMERIC_VOID:
        raise UnsupportedError(f"{where}: {what} holds {dtype.name} values; the executor "
                               "computes numeric tensors only")
    if spec.dtype is not None:
        exact = isinstance(value, np.ndarray)
        ok = dtype == spec.dtype if exact else dtype == jax_dtype(spec.dtype)
        if not ok:
            raise InputMismatchError(
                f"{where}: {what} must be {spec.dtype.name}, got {dtype.name} "
                f"(convert it with .astype(np.{spec.dtype.name}))")
    if spec.shape is None:
        return
    shape = tuple(np.shape(value))
    if len(shape) != len(spec.shape):
        raise ShapeError(f"{where}: {what} must have shape {spec.describe()} "
                         f"(rank {len(spec.shape)}), got {list(shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise ShapeError(f"{where}: {what} must have shape {spec.describe()}, got "
                             f"{list(shape)} (axis {axis})")
        if isinstance(want, str) and dims is not None and dims.setdefault(want, got) != got:
            raise ShapeError(f"{where}: {what} has {want}={got} on axis {axis}, but an "
                             f"earlier input has {want}={dims[want]}")


def dynamic(value: Any) -> Any:
    """A value that depends on the inputs as a JAX array (numpy arrays would be folded)."""
    import jax.numpy as jnp

    return jnp.asarray(value) if isinstance(value, np.ndarray) else value


def traced(value: Any) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


def abstract(spec: ValueSpec) -> Any:
    import jax

    shape = tuple(d for d in spec.shape or () if isinstance(d, int))
    return jax.ShapeDtypeStruct(shape, jax_dtype(np.dtype(spec.dtype)))


def abstract_of(value: Any) -> Any:
    import jax

    return jax.ShapeDtypeStruct(np.shape(value), jax_dtype(np.dtype(value.dtype)))
