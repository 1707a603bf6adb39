"""Control flow: ``If`` (resolved when its condition is static, ``lax.cond`` otherwise).

A condition known at trace time (a constant, or computed from shapes) selects its
branch, which is inlined: the other branch is never traced, so it may even hold
operators the executor lacks. A condition that depends on the inputs becomes a
``lax.cond`` when both branches give outputs of the same shapes and dtypes; otherwise
the node is reported. ``Loop`` and ``Scan`` are reported as untraceable up front.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import UNSUPPORTED, Call, Tensor, op

__all__: list[str] = []


def _is_traced(value: Any) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


@op("If", static=(0,))
def _if(c: Call, cond: Tensor) -> tuple[Tensor, ...]:
    import jax
    import jax.numpy as jnp

    then_branch, else_branch = c.attr("then_branch"), c.attr("else_branch")
    if not _is_traced(cond):
        chosen = then_branch if bool(np.asarray(cond).reshape(-1)[0]) else else_branch
        return tuple(c.run(chosen))
    shapes = [jax.eval_shape(lambda g=g: [jnp.asarray(v) for v in c.run(g)])
              for g in (then_branch, else_branch)]
    if shapes[0] != shapes[1]:
        describe = [", ".join(f"{s.dtype}{list(s.shape)}" for s in branch) for branch in shapes]
        raise c.fail(f"the condition depends on the graph inputs and the branches give "
                     f"different outputs (then: {describe[0]}; else: {describe[1]}), so the "
                     "graph cannot be traced; make the condition a constant")
    out = jax.lax.cond(jnp.reshape(cond, (-1,))[0],
                       lambda: [jnp.asarray(v) for v in c.run(then_branch)],
                       lambda: [jnp.asarray(v) for v in c.run(else_branch)])
    return tuple(out)


_LOOPS = ("a data-dependent number of times; the executor traces straight-line graphs and "
          "If only (re-export the model with the loop unrolled)")
for _name in ("Loop", "Scan", "SequenceMap"):
    UNSUPPORTED[_name] = f"{_name} runs a subgraph {_LOOPS}"
for _name in ("SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceEmpty",
              "SequenceLength", "SequenceErase", "SplitToSequence", "ConcatFromSequence",
              "Optional", "OptionalGetElement", "OptionalHasElement"):
    UNSUPPORTED[_name] = f"{_name} works on sequence or optional values; the executor " \
                         "handles tensors only"
for _name in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Multinomial", "Bernoulli"):
    UNSUPPORTED[_name] = f"{_name} draws random numbers; the executor computes " \
                         "deterministic functions only"
