"""Runs a parsed graph node by node, with JAX for traced values and folding for static ones.

:func:`run_graph` is called inside a trace (``jax.jit``, ``jax.grad``, ``jax.eval_shape``)
or eagerly; either way it is plain Python over the nodes, so the JAX program it builds
holds nothing but the operators' own JAX calls.

A node whose inputs are all static is *folded*: computed at trace time and kept as a
numpy array, so that shape computations such as ``Shape -> Gather -> Concat -> Reshape``
resolve to Python ints. Operators registered with ``numpy=True`` (the shape-arithmetic
ones) fold with numpy: exact int64 and no XLA compilation. The others fold with JAX in
64-bit mode, and only when their outputs hold at most :data:`FOLD_LIMIT` elements; a
larger result (a ``ConstantOfShape`` that builds a weight) stays in the JAX program
instead of being baked into it as a literal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from weightatlas.errors import ShapeError, WeightAtlasError

from . import (  # noqa: F401  (each module registers its operators)
    _ops_control,
    _ops_conv,
    _ops_elementwise,
    _ops_index,
    _ops_linalg,
    _ops_norm,
    _ops_pool,
    _ops_quant,
    _ops_reduce,
    _ops_resize,
    _ops_rnn,
    _ops_shape,
)
from ._graph import Graph
from ._registry import OPS, Call, OpDef, Tensor, lookup

__all__ = ["FOLD_LIMIT", "check_graph", "run_graph", "static_names"]

#: Largest number of output elements a static node is folded into (computed at trace time).
FOLD_LIMIT = 1 << 16


def check_graph(graph: Graph, where: str) -> None:
    """Raises :class:`UnsupportedOperatorError` for the first node the executor cannot run.

    Walks the graph and every subgraph, so that an unsupported operator deep inside an
    ``If`` branch is reported before anything is traced.
    """
    for node in graph.walk():
        lookup(node, where)


def static_names(graph: Graph) -> set[str]:
    """Names whose values must be known at trace time.

    A value is needed statically when it feeds an operator input that fixes a shape
    (a ``Reshape`` target, ``Slice`` bounds, an ``If`` condition...), or when it feeds
    any operator (other than ``Shape``/``Size``, which read shapes only) whose output is.
    """
    nodes = graph.walk()
    needed: set[str] = set()
    while True:
        before = len(needed)
        for node in nodes:
            opdef = OPS.get(node.op_type)
            for i in opdef.static if opdef else ():
                if i < len(node.inputs) and node.inputs[i]:
                    needed.add(node.inputs[i])
            if node.op_type not in ("Shape", "Size") and needed.intersection(node.outputs):
                needed.update(n for n in node.inputs if n)
                for sub in node.subgraphs():  # a needed If output needs the branch outputs
                    needed.update(out.name for out, name in zip(sub.outputs, node.outputs,
                                                                strict=False)
                                  if name in needed)
        if len(needed) == before:
            return needed


def run_graph(graph: Graph, env: Mapping[str, Tensor], where: str,
              add: Mapping[str, Tensor] | None = None,
              read: dict[str, Tensor] | None = None) -> list[Tensor]:
    """Computes ``graph``'s outputs from ``env`` (inputs, weights, constants, outer scope).

    Args:
        graph: The graph.
        env: Values by name.
        where: How messages name the model.
        add: Values added to named values of the main graph as soon as they are computed
            (an intervention: the gradient with respect to a zero ``add`` is the gradient
            with respect to that activation).
        read: A dict whose keys name values to record; filled with their values (after
            ``add``).
    """
    scope: dict[str, Any] = dict(env)
    add = add or {}

    def run_subgraph(sub: Graph, outer: Mapping[str, Any]) -> list[Tensor]:
        return run_graph(sub, outer, where)

    def record(name: str) -> None:
        if name in add:
            import jax.numpy as jnp

            scope[name] = jnp.add(scope[name], add[name])
        if read is not None and name in read:
            read[name] = scope[name]

    for name in list(scope):
        if name in add or (read is not None and name in read):
            record(name)
    for node in graph.nodes:
        opdef = lookup(node, where)
        args = [scope[name] if name else None for name in node.inputs]
        call = Call(node, scope, where, run_subgraph)
        outs = _apply(opdef, call, args)
        wanted = [i for i, name in enumerate(node.outputs) if name]
        if wanted and wanted[-1] >= len(outs):
            raise call.fail(f"output #{wanted[-1]} ({node.outputs[wanted[-1]]!r}) is not "
                            f"computed by the executor ({len(outs)} outputs supported)")
        for i in wanted:
            scope[node.outputs[i]] = outs[i]
            record(node.outputs[i])
    return [scope[out.name] for out in graph.outputs]


def _as_tuple(result: Any) -> tuple[Any, ...]:
    return tuple(result) if isinstance(result, tuple | list) else (result,)


def _is_static(value: Any) -> bool:
    return value is None or isinstance(value, np.ndarray)


def _apply(opdef: OpDef, call: Call, args: list[Any]) -> tuple[Any, ...]:
    import jax

    try:
        if not call.node.subgraphs() and all(_is_static(a) for a in args):
            return _fold(opdef, call, args)
        return _as_tuple(opdef.fn(call, *args))
    except WeightAtlasError:
        raise
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError
            ) as e:
        raise ShapeError(
            f"{call.where}: {call.node.label}: a value that fixes a shape or a branch depends "
            "on the graph inputs or weights, so it cannot be resolved when the graph is "
            f"traced ({type(e).__name__})") from e
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        found = ", ".join(_describe(a) for a in args)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShapeError(f"{call.where}: {call.node.label}: cannot be computed for inputs "
                         f"({found}): {first}") from e


def _fold(opdef: OpDef, call: Call, args: list[Any]) -> tuple[Any, ...]:
    import jax

    if opdef.numpy:
        call.xp = np
        with np.errstate(all="ignore"):
            return tuple(np.asarray(o) for o in _as_tuple(opdef.fn(call, *args)))

    def compute(values: list[Any]) -> tuple[Any, ...]:
        return _as_tuple(opdef.fn(call, *values))

    with jax.enable_x64(True):
        shapes = jax.eval_shape(lambda: compute(args))
        size = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
        if size <= FOLD_LIMIT:
            # Fresh copies: an enclosing trace caches numpy constants by id(), with the
            # 32-bit type it first saw them with, which a 64-bit computation cannot take.
            fresh = [None if a is None else np.array(a, copy=True) for a in args]
            with jax.ensure_compile_time_eval():
                return tuple(np.asarray(o) for o in compute(fresh))
    return compute(args)


def _describe(value: Any) -> str:
    if value is None:
        return "absent"
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None:
        return type(value).__name__
    return f"{dtype}[{', '.join(map(str, shape))}]"
