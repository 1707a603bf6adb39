"""Recurrent layers: ``LSTM``, ``GRU`` and ``RNN``, forward, reverse or bidirectional.

The input projection of every time step is one matrix product before the loop; the
recurrence is a ``lax.scan`` (differentiable, compiled once whatever the length).
``sequence_lens`` masks the steps past each sequence's end: outputs there are zero and
the state is held, so the final state is the one at the sequence's last step; reverse
directions start from each sequence's own last step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._graph import Node
from ._registry import Call, Tensor, op

__all__: list[str] = []

_DIRECTIONS = ("forward", "reverse", "bidirectional")
_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu",
                "ScaledTanh", "HardSigmoid", "Elu", "Softsign", "Softplus")


def _check_rnn(node: Node) -> str | None:
    direction = node.attrs.get("direction", "forward")
    if direction not in _DIRECTIONS:
        return f"direction={direction!r} is not one of {_DIRECTIONS}"
    unknown = [a for a in node.attrs.get("activations", []) if a not in _ACTIVATIONS]
    if unknown:
        return f"activation {unknown[0]!r} is not one of {_ACTIVATIONS}"
    if node.attrs.get("input_forget", 0):
        return "input_forget=1 (coupled input and forget gates) is not supported"
    return None


def _activation(name: str, alpha: float | None, beta: float | None
                ) -> Callable[[Tensor], Tensor]:
    import jax
    import jax.numpy as jnp

    table: dict[str, Callable[[Tensor], Tensor]] = {
        "Relu": lambda x: jnp.maximum(x, 0),
        "Tanh": jnp.tanh,
        "Sigmoid": jax.nn.sigmoid,
        "Affine": lambda x: (1.0 if alpha is None else alpha) * x + (beta or 0.0),
        "LeakyRelu": lambda x: jnp.where(x >= 0, x, (0.01 if alpha is None else alpha) * x),
        "ThresholdedRelu": lambda x: jnp.where(x > (1.0 if alpha is None else alpha), x, 0),
        "ScaledTanh": lambda x: ((1.0 if alpha is None else alpha)
                                 * jnp.tanh((1.0 if beta is None else beta) * x)),
        "HardSigmoid": lambda x: jnp.clip((0.2 if alpha is None else alpha) * x
                                          + (0.5 if beta is None else beta), 0, 1),
        "Elu": lambda x: jnp.where(x > 0, x, (1.0 if alpha is None else alpha)
                                   * jnp.expm1(jnp.minimum(x, 0))),
        "Softsign": lambda x: x / (1 + jnp.abs(x)),
        "Softplus": lambda x: jnp.logaddexp(x, 0.0),
    }
    return table[name]


def _activations(c: Call, defaults: list[str], directions: int
                 ) -> list[list[Callable[[Tensor], Tensor]]]:
    names = list(c.attr("activations", defaults * directions))
    alphas = list(c.attr("activation_alpha", []))
    betas = list(c.attr("activation_beta", []))
    fns = [_activation(n, alphas[i] if i < len(alphas) else None,
                       betas[i] if i < len(betas) else None) for i, n in enumerate(names)]
    per = len(defaults)
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def _reverse_within(seq: Tensor, lens: Tensor | None) -> Tensor:
    """Reverses each batch column of ``seq`` [T, B, ...] within its own length."""
    import jax.numpy as jnp

    if lens is None:
        return jnp.flip(seq, axis=0)
    steps = seq.shape[0]
    t = jnp.arange(steps)[:, None]
    n = jnp.asarray(lens).astype(jnp.int32)[None, :]
    index = jnp.where(t < n, n - 1 - t, t)
    return jnp.take_along_axis(seq, index.reshape(*index.shape, *([1] * (seq.ndim - 2))),
                               axis=0)


def _scan(step: Callable[[Any, Tensor], tuple[Any, Tensor]], state: Any, inputs: Tensor,
          lens: Tensor | None, reverse: bool) -> tuple[Any, Tensor]:
    """Runs ``step`` over time; returns (final state, outputs [T, B, H])."""
    import jax
    import jax.numpy as jnp

    steps = inputs.shape[0]
    xs = _reverse_within(inputs, lens) if reverse else inputs
    alive = (jnp.ones((steps, inputs.shape[1]), bool) if lens is None else
             jnp.arange(steps)[:, None] < jnp.asarray(lens)[None, :])

    def body(carry: Any, item: tuple[Tensor, Tensor]) -> tuple[Any, Tensor]:
        x_t, ok = item
        new, h = step(carry, x_t)
        keep = ok[:, None]
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, carry)
        return new, jnp.where(keep, h, 0)

    final, ys = jax.lax.scan(body, state, (xs, alive))
    return final, (_reverse_within(ys, lens) if reverse else ys)


def _prepare(c: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor, gates: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if c.attr("layout", 0):
        x = jnp.swapaxes(x, 0, 1)
    w, r = jnp.asarray(w), jnp.asarray(r)
    directions, hidden = w.shape[0], r.shape[-1]
    if c.has("hidden_size") and c.attr("hidden_size") != hidden:
        raise c.shape_error(f"hidden_size={c.attr('hidden_size')} but R has shape "
                            f"{list(r.shape)}")
    if b is None:
        b = jnp.zeros((directions, 2 * gates * hidden), x.dtype)
    b = jnp.asarray(b)
    return x, w, r, b, directions, hidden


def _initial(c: Call, value: Tensor, directions: int, batch: int, hidden: int, dtype: Any
             ) -> Tensor:
    import jax.numpy as jnp

    if value is None:
        return jnp.zeros((directions, batch, hidden), dtype)
    value = jnp.asarray(value)
    return jnp.swapaxes(value, 0, 1) if c.attr("layout", 0) else value


def _outputs(c: Call, ys: list[Tensor], finals: list[Tensor]) -> list[Tensor]:
    import jax.numpy as jnp

    y = jnp.stack(ys, axis=1)  # [T, D, B, H]
    states = [jnp.stack(f, axis=0) for f in finals]  # [D, B, H]
    if c.attr("layout", 0):
        return [jnp.transpose(y, (2, 0, 1, 3))] + [jnp.swapaxes(s, 0, 1) for s in states]
    return [y, *states]


def _clip(c: Call, v: Tensor) -> Tensor:
    import jax.numpy as jnp

    limit = c.attr("clip")
    return v if limit is None else jnp.clip(v, -limit, limit)


@op("LSTM", check=_check_rnn)
def _lstm(c: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor = None, lens: Tensor = None,
          h0: Tensor = None, c0: Tensor = None, p: Tensor = None) -> list[Tensor]:
    import jax.numpy as jnp

    x, w, r, b, dirs, hidden = _prepare(c, x, w, r, b, 4)
    batch = x.shape[1]
    h0 = _initial(c, h0, dirs, batch, hidden, x.dtype)
    c0 = _initial(c, c0, dirs, batch, hidden, x.dtype)
    p = jnp.zeros((dirs, 3 * hidden), x.dtype) if p is None else jnp.asarray(p)
    acts = _activations(c, ["Sigmoid", "Tanh", "Tanh"], dirs)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        f, g, h = acts[d]
        pi, po, pf = jnp.split(p[d], 3)
        proj = jnp.einsum("tbi,gi->tbg", x, w[d]) + b[d, :4 * hidden] + b[d, 4 * hidden:]

        def step(state: tuple[Tensor, Tensor], xw: Tensor, d: int = d, f: Any = f,
                 g: Any = g, h: Any = h, pi: Any = pi, po: Any = po, pf: Any = pf
                 ) -> tuple[tuple[Tensor, Tensor], Tensor]:
            h_prev, c_prev = state
            z = xw + h_prev @ r[d].T
            zi, zo, zf, zc = jnp.split(z, 4, axis=-1)
            i_t = f(_clip(c, zi + pi * c_prev))
            f_t = f(_clip(c, zf + pf * c_prev))
            c_t = f_t * c_prev + i_t * g(_clip(c, zc))
            o_t = f(_clip(c, zo + po * c_t))
            h_t = o_t * h(c_t)
            return (h_t, c_t), h_t

        reverse = c.attr("direction", "forward") == "reverse" or d == 1
        (h_n, c_n), y = _scan(step, (h0[d], c0[d]), proj, lens, reverse)
        ys.append(y)
        hs.append(h_n)
        cs.append(c_n)
    return _outputs(c, ys, [hs, cs])


@op("GRU", check=_check_rnn)
def _gru(c: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor = None, lens: Tensor = None,
         h0: Tensor = None) -> list[Tensor]:
    import jax.numpy as jnp

    x, w, r, b, dirs, hidden = _prepare(c, x, w, r, b, 3)
    h0 = _initial(c, h0, dirs, x.shape[1], hidden, x.dtype)
    acts = _activations(c, ["Sigmoid", "Tanh"], dirs)
    linear_before_reset = bool(c.attr("linear_before_reset", 0))
    ys, hs = [], []
    for d in range(dirs):
        f, g = acts[d]
        wb, rb = b[d, :3 * hidden], b[d, 3 * hidden:]
        proj = jnp.einsum("tbi,gi->tbg", x, w[d]) + wb

        def step(h_prev: Tensor, xw: Tensor, d: int = d, f: Any = f, g: Any = g,
                 rb: Any = rb) -> tuple[Tensor, Tensor]:
            xz, xr, xh = jnp.split(xw, 3, axis=-1)
            rz, rr, rh = jnp.split(r[d], 3, axis=0)
            bz, br, bh = jnp.split(rb, 3)
            z_t = f(_clip(c, xz + h_prev @ rz.T + bz))
            r_t = f(_clip(c, xr + h_prev @ rr.T + br))
            if linear_before_reset:
                cand = g(_clip(c, xh + r_t * (h_prev @ rh.T + bh)))
            else:
                cand = g(_clip(c, xh + (r_t * h_prev) @ rh.T + bh))
            h_t = (1 - z_t) * cand + z_t * h_prev
            return h_t, h_t

        reverse = c.attr("direction", "forward") == "reverse" or d == 1
        h_n, y = _scan(step, h0[d], proj, lens, reverse)
        ys.append(y)
        hs.append(h_n)
    return _outputs(c, ys, [hs])


@op("RNN", check=_check_rnn)
def _rnn(c: Call, x: Tensor, w: Tensor, r: Tensor, b: Tensor = None, lens: Tensor = None,
         h0: Tensor = None) -> list[Tensor]:
    import jax.numpy as jnp

    x, w, r, b, dirs, hidden = _prepare(c, x, w, r, b, 1)
    h0 = _initial(c, h0, dirs, x.shape[1], hidden, x.dtype)
    acts = _activations(c, ["Tanh"], dirs)
    ys, hs = [], []
    for d in range(dirs):
        (f,) = acts[d]
        proj = jnp.einsum("tbi,gi->tbg", x, w[d]) + b[d, :hidden] + b[d, hidden:]

        def step(h_prev: Tensor, xw: Tensor, d: int = d, f: Any = f
                 ) -> tuple[Tensor, Tensor]:
            h_t = f(_clip(c, xw + h_prev @ r[d].T))
            return h_t, h_t

        reverse = c.attr("direction", "forward") == "reverse" or d == 1
        h_n, y = _scan(step, h0[d], proj, lens, reverse)
        ys.append(y)
        hs.append(h_n)
    return _outputs(c, ys, [hs])

