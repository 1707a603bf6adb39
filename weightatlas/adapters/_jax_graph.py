"""A JAX model's graph, traced to a jaxpr and converted to ONNX without its weights.

``jax.make_jaxpr`` traces ``apply(tree, *example_inputs)``; every equation becomes one or
a few ONNX nodes (opset 18), named after its primitive and index (``dot_general_7``,
``conv_general_dilated_0/Transpose_1``). Calls (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``) are inlined; their custom derivative
rules are not kept (the executor differentiates the primal computation).

The tree's array leaves that are stored tensors become initializers named by the
record's ``source_name``, values cleared (dims and type kept), with the PyTorch adapter's
note ``weightatlas.weights``, so :func:`~weightatlas.core.executor.from_snapshot` reads
each from the stored tensor in its source layout (Flax's own ``[in, out]`` kernel, HWIO
convolution); the example inputs become graph inputs ``input_0``...; constants of the
trace become initializers with their values. A primitive outside the table is an
:class:`~weightatlas.errors.UnsupportedError` naming it, raised before anything is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from weightatlas.adapters._jax_tree import _is_array, _key
from weightatlas.errors import UnsupportedError, WeightAtlasError

__all__ = ["OPSET", "SUPPORTED", "export_graph"]

OPSET = 18
_NOTE_KEY = "weightatlas.weights"  # the PyTorch adapter's note (core.executor._stored_graph)

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "gt": "Greater", "lt": "Less", "ge": "GreaterOrEqual",
           "le": "LessOrEqual", "eq": "Equal", "and": "And", "or": "Or"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "erf": "Erf", "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor",
          "ceil": "Ceil", "sin": "Sin", "cos": "Cos", "not": "Not"}
_IDENTITY = frozenset({"stop_gradient", "copy", "copy_p", "sharding_constraint"})
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint"})


def _prod(xs: Sequence[int]) -> int:
    return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


def _inverse(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


class _Refused(Exception):
    """A primitive or parameter the converter does not handle (becomes UnsupportedError)."""


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.env: dict[Any, str] = {}
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}
        self.base = ""
        self._sub = 0

    # -- values ---------------------------------------------------------------------
    def const(self, value: Any, dtype: Any = None) -> str:
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = f"const_{len(self.initializers)}"
        # np.require, not np.ascontiguousarray, which makes a scalar [1] (and so a scalar
        # result, a loss, would come out as [1])
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"),
                                                         name))
        if key is not None:
            self._consts[key] = name
        return name

    def i64(self, values: Sequence[int]) -> str:
        return self.const(np.asarray([int(v) for v in values], np.int64))

    def read(self, v: Any) -> str:
        if hasattr(v, "val"):  # a Literal
            return self.const(np.asarray(v.val, dtype=v.aval.dtype))
        return self.env[v]

    # -- nodes ----------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> list[str]:
        from onnx import helper

        self._sub += 1
        name = f"{self.base}/{op}_{self._sub}"
        outs = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs

    def one(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.node(op, inputs, **attrs)[0]

    def reshape(self, x: str, shape: Sequence[int], current: Sequence[int]) -> str:
        if tuple(shape) == tuple(current):
            return x
        return self.one("Reshape", [x, self.i64(shape)])

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        if list(perm) == list(range(len(perm))):
            return x
        return self.one("Transpose", [x], perm=[int(p) for p in perm])

    def cast(self, x: str, src: Any, dst: Any) -> str:
        from onnx import helper

        if np.dtype(src) == np.dtype(dst):
            return x
        return self.one("Cast", [x], to=int(helper.np_dtype_to_tensor_dtype(np.dtype(dst))))

    # -- jaxprs ---------------------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[Any], inputs: Sequence[str]) -> list[str]:
        """Emits ``jaxpr``'s equations; its invars read ``inputs``; returns its outvars."""
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            self.env[var] = self.const(np.asarray(value))
        for var, name in zip(jaxpr.invars, inputs, strict=True):
            self.env[var] = name
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            ins = [self.read(v) for v in eqn.invars]
            if prim in _CALLS:
                inner = _inner(eqn)
                if inner is None:
                    raise _Refused(f"{prim}: no inner jaxpr found")
                jx, cs = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
                outs = self.run(jx, cs, ins)
            else:
                self._count += 1
                self.base = f"{prim}_{self._count - 1}"
                self._sub = 0
                rule = _RULES.get(prim)
                if rule is None:
                    raise _Refused(f"JAX primitive {prim!r} is not supported")
                try:
                    outs = rule(self, eqn, ins)
                except _Refused as e:
                    raise _Refused(f"JAX primitive {prim!r} ({self.base}): {e}") from None
            for var, name in zip(eqn.outvars, outs, strict=True):
                self.env[var] = name
        return [self.read(v) for v in jaxpr.outvars]


def _inner(eqn: Any) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in v.aval.shape)


# ---- rules: each returns the ONNX names of the equation's outputs --------------------


def _binary(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    prim = eqn.primitive.name
    if prim in ("and", "or") and any(np.dtype(v.aval.dtype) != np.bool_ for v in eqn.invars):
        raise _Refused("bitwise and/or of integers")
    if prim == "max":  # relu: max(x, 0) with a literal zero
        for i, v in enumerate(eqn.invars):
            other = eqn.invars[1 - i]
            if hasattr(v, "val") and np.all(np.asarray(v.val) == 0) and \
                    _shape(other) == _shape(eqn.outvars[0]) and \
                    np.issubdtype(np.dtype(other.aval.dtype), np.floating):
                return [b.one("Relu", [ins[1 - i]])]
    return [b.one(_BINARY[prim], ins)]


def _ne(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Not", [b.one("Equal", ins)])]


def _unary(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    if eqn.primitive.name == "not" and np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
        raise _Refused("bitwise not of integers")  # ONNX Not takes booleans only
    return [b.one(_UNARY[eqn.primitive.name], ins)]


def _identity(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Identity", [x]) for x in ins]


def _rsqrt(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Reciprocal", [b.one("Sqrt", ins)])]


def _square(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Mul", [ins[0], ins[0]])]


def _log1p(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    """``log(u) * x / (u - 1)`` with ``u = 1 + x`` (exact for small ``x``, where
    ``log(1 + x)`` is 0), ``x`` where ``u == 1``; the unused branch's denominator is kept
    away from 0 so that gradients stay finite."""
    x = ins[0]
    one = b.const(np.asarray(1, eqn.invars[0].aval.dtype))
    u = b.one("Add", [x, one])
    at_one = b.one("Equal", [u, one])
    den = b.one("Where", [at_one, one, b.one("Sub", [u, one])])
    val = b.one("Div", [b.one("Mul", [b.one("Log", [u]), x]), den])
    return [b.one("Where", [at_one, x, val])]


def _expm1(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    """``(u - 1) * x / log(u)`` with ``u = exp(x)`` (Kahan's form, exact for small ``x``),
    ``x`` where ``u == 1`` and ``-1`` where ``u == 0``, with the unused branch's
    denominator kept away from 0 and infinity."""
    x = ins[0]
    dtype = eqn.invars[0].aval.dtype
    one, zero = b.const(np.asarray(1, dtype)), b.const(np.asarray(0, dtype))
    u = b.one("Exp", [x])
    at_one, at_zero = b.one("Equal", [u, one]), b.one("Equal", [u, zero])
    safe_u = b.one("Where", [b.one("Or", [at_one, at_zero]), b.const(np.asarray(2, dtype)), u])
    val = b.one("Div", [b.one("Mul", [b.one("Sub", [u, one]), x]), b.one("Log", [safe_u])])
    val = b.one("Where", [at_zero, b.const(np.asarray(-1, dtype)), val])
    return [b.one("Where", [at_one, x, val])]


def _exp2(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Pow", [b.const(np.asarray(2, eqn.invars[0].aval.dtype)), ins[0]])]


def _integer_pow(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    y = int(eqn.params["y"])
    x = ins[0]
    dtype = eqn.invars[0].aval.dtype
    if y == 0:
        return [b.one("Expand", [b.const(np.asarray(1, dtype)), b.i64(_shape(eqn.outvars[0]))])]
    if 1 <= abs(y) <= 4:
        out = x
        for _ in range(abs(y) - 1):
            out = b.one("Mul", [out, x])
        if abs(y) == 1:
            out = b.one("Identity", [x])
    else:
        out = b.one("Pow", [x, b.const(np.asarray(abs(y), dtype))])
    return [b.one("Reciprocal", [out]) if y < 0 else out]


def _convert(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    src, dst = eqn.invars[0].aval.dtype, eqn.params["new_dtype"]
    out = b.cast(ins[0], src, dst)
    return [out if out != ins[0] else b.one("Identity", ins)]


def _reshape(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    if eqn.params.get("dimensions") is not None:
        raise _Refused("reshape with dimensions (a transpose first) is not supported")
    return [b.one("Reshape", [ins[0], b.i64(_shape(eqn.outvars[0]))])]


def _squeeze(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Reshape", [ins[0], b.i64(_shape(eqn.outvars[0]))])]


def _broadcast_in_dim(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    if len(ins) != 1:
        raise _Refused("dynamic shapes are not supported")
    src, out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    inter = [1] * len(out)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        inter[d] = src[i]
    x = b.reshape(ins[0], inter, src)
    if tuple(inter) != out:
        x = b.one("Expand", [x, b.i64(out)])
    return [x if x != ins[0] else b.one("Identity", ins)]


def _transpose(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Transpose", ins, perm=[int(p) for p in eqn.params["permutation"]])]


def _reduce(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    axes = [int(a) for a in eqn.params["axes"]]
    if not axes:
        return [b.one("Identity", ins)]
    return [b.one(_REDUCE[eqn.primitive.name], [ins[0], b.i64(axes)], keepdims=0)]


def _arg(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    axes = eqn.params["axes"]
    op = "ArgMax" if eqn.primitive.name == "argmax" else "ArgMin"
    out = b.one(op, ins, axis=int(axes[0]), keepdims=0)
    return [b.cast(out, np.int64, eqn.params["index_dtype"])]


def _select_n(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    pred, cases = ins[0], ins[1:]
    if len(cases) == 1:
        return [b.one("Identity", cases)]
    if len(cases) != 2:
        raise _Refused(f"select_n of {len(cases)} cases (only 2 are supported)")
    pred = b.cast(pred, eqn.invars[0].aval.dtype, np.bool_)
    return [b.one("Where", [pred, cases[1], cases[0]])]


def _clamp(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    lo, x, hi = ins
    return [b.one("Min", [b.one("Max", [x, lo]), hi])]


def _concatenate(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    return [b.one("Concat", ins, axis=int(eqn.params["dimension"]))]


def _slice(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    p = eqn.params
    n = len(p["start_indices"])
    steps = p["strides"] if p["strides"] is not None else (1,) * n
    return [b.one("Slice", [ins[0], b.i64(p["start_indices"]), b.i64(p["limit_indices"]),
                            b.i64(range(n)), b.i64(steps)])]


def _pad(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    config = eqn.params["padding_config"]
    if any(int(i) != 0 or int(lo) < 0 or int(hi) < 0 for lo, hi, i in config):
        raise _Refused(f"padding {list(config)} (interior or negative padding)")
    pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
    return [b.one("Pad", [ins[0], b.i64(pads), ins[1]], mode="constant")]


def _split(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    sizes = eqn.params["sizes"]
    return b.node("Split", [ins[0], b.i64(sizes)], outputs=len(sizes),
                  axis=int(eqn.params["axis"]))


def _iota(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    if ins:
        raise _Refused("dynamic shapes are not supported")
    p = eqn.params
    shape = tuple(int(d) for d in p["shape"])
    view = [1] * len(shape)
    view[p["dimension"]] = shape[p["dimension"]]
    values = np.broadcast_to(np.arange(shape[p["dimension"]]).reshape(view), shape)
    return [b.one("Identity", [b.const(values.astype(p["dtype"]))])]


def _dot_general(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    out_dtype = eqn.outvars[0].aval.dtype
    x = b.cast(ins[0], lhs.aval.dtype, out_dtype)
    w = b.cast(ins[1], rhs.aval.dtype, out_dtype)
    ls, rs = _shape(lhs), _shape(rhs)
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
    if not lb and len(rs) == 2 and lc == (len(ls) - 1,) and len(ls) >= 1:
        if rc == (1,):
            w = b.transpose(w, [1, 0])
        return [b.one("MatMul", [x, w])]
    lf = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rs)) if d not in rc and d not in rb]
    batch = [ls[d] for d in lb]
    m, k, n = _prod([ls[d] for d in lf]), _prod([ls[d] for d in lc]), _prod([rs[d] for d in rf])
    lperm = [*lb, *lf, *lc]
    rperm = [*rb, *rc, *rf]
    x = b.reshape(b.transpose(x, lperm), [*batch, m, k], [ls[d] for d in lperm])
    w = b.reshape(b.transpose(w, rperm), [*batch, k, n], [rs[d] for d in rperm])
    y = b.one("MatMul", [x, w])
    return [b.reshape(y, _shape(eqn.outvars[0]), [*batch, m, n])]


def _pairs(padding: Any) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        raise _Refused(f"padding {padding!r} (expected explicit pairs)")
    return [(int(lo), int(hi)) for lo, hi in padding]


def _conv(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    p = eqn.params
    if any(int(d) != 1 for d in p["lhs_dilation"]):
        raise _Refused(f"lhs_dilation {tuple(p['lhs_dilation'])} (a transposed convolution)")
    if int(p["batch_group_count"]) != 1:
        raise _Refused(f"batch_group_count {p['batch_group_count']}")
    pads = _pairs(p["padding"])
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise _Refused(f"negative padding {pads}")
    lhs_spec, rhs_spec, out_spec = (list(s) for s in p["dimension_numbers"])
    out_dtype = eqn.outvars[0].aval.dtype
    x = b.transpose(b.cast(ins[0], eqn.invars[0].aval.dtype, out_dtype), lhs_spec)
    w = b.transpose(b.cast(ins[1], eqn.invars[1].aval.dtype, out_dtype), rhs_spec)
    y = b.one("Conv", [x, w], strides=[int(s) for s in p["window_strides"]],
              pads=[lo for lo, _ in pads] + [hi for _, hi in pads],
              dilations=[int(d) for d in p["rhs_dilation"]],
              group=int(p["feature_group_count"]))
    out = b.transpose(y, _inverse(out_spec))
    return [out]


def _reduce_window(b: _Builder, eqn: Any, ins: list[str]) -> list[str]:
    p = eqn.params
    prim = eqn.primitive.name
    shape = _shape(eqn.invars[0])
    window, strides = [int(d) for d in p["window_dimensions"]], [int(d) for d in
                                                                  p["window_strides"]]
    pads, wdil = _pairs(p["padding"]), [int(d) for d in p["window_dilation"]]
    if any(int(d) != 1 for d in p["base_dilation"]):
        raise _Refused(f"base_dilation {tuple(p['base_dilation'])}")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise _Refused(f"negative padding {pads}")
    pooled = [d for d in range(len(shape))
              if window[d] != 1 or strides[d] != 1 or pads[d] != (0, 0)]
    kept = [d for d in range(len(shape)) if d not in pooled]
    if not pooled:
        return [b.one("Identity", ins)]
    if len(pooled) > 3:
        raise _Refused(f"a window over {len(pooled)} axes (at most 3 are supported)")
    if not np.issubdtype(np.dtype(eqn.invars[0].aval.dtype), np.floating):
        raise _Refused(f"a window reduction of {np.dtype(eqn.invars[0].aval.dtype).name} "
                       "values (ONNX pooling takes floating point)")
    if any(max(pads[d]) >= window[d] for d in pooled):
        raise _Refused(f"padding {pads} as large as the window {tuple(window)} (ONNX pooling "
                       "needs it smaller)")
    if prim == "reduce_window_sum" and any(wdil[d] != 1 for d in pooled):
        raise _Refused(f"window_dilation {tuple(wdil)} of a sum")
    perm = [*kept, *pooled]
    flat = [_prod([shape[d] for d in kept]), 1, *(shape[d] for d in pooled)]
    x = b.reshape(b.transpose(ins[0], perm), flat, [shape[d] for d in perm])
    attrs: dict[str, Any] = {
        "kernel_shape": [window[d] for d in pooled], "strides": [strides[d] for d in pooled],
        "pads": [pads[d][0] for d in pooled] + [pads[d][1] for d in pooled]}
    if prim == "reduce_window_max":
        y = b.one("MaxPool", [x], dilations=[wdil[d] for d in pooled], **attrs)
    else:
        y = b.one("AveragePool", [x], count_include_pad=1, **attrs)
        size = b.const(np.asarray(_prod([window[d] for d in pooled]),
                                  eqn.invars[0].aval.dtype))
        y = b.one("Mul", [y, size])
    out = _shape(eqn.outvars[0])
    y = b.reshape(y, [*(out[d] for d in kept), *(out[d] for d in pooled)],
                  [flat[0], 1, *(out[d] for d in pooled)])
    return [b.transpose(y, _inverse(perm))]


_RULES: dict[str, Callable[[_Builder, Any, list[str]], list[str]]] = {
    **{k: _binary for k in _BINARY}, **{k: _unary for k in _UNARY},
    **{k: _identity for k in _IDENTITY}, **{k: _reduce for k in _REDUCE},
    "ne": _ne, "rsqrt": _rsqrt, "square": _square, "log1p": _log1p, "expm1": _expm1, "exp2": _exp2,
    "integer_pow": _integer_pow, "convert_element_type": _convert, "reshape": _reshape,
    "squeeze": _squeeze, "expand_dims": _squeeze, "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose, "argmax": _arg, "argmin": _arg, "select_n": _select_n,
    "clamp": _clamp, "concatenate": _concatenate, "slice": _slice, "pad": _pad,
    "split": _split, "iota": _iota, "dot_general": _dot_general,
    "conv_general_dilated": _conv, "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
}

#: Every JAX primitive the converter handles (calls are inlined).
SUPPORTED = frozenset(_RULES) | _CALLS


# ---- the export ----------------------------------------------------------------------


def _value_info(name: str, aval: Any) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(
        name, int(helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))),
        [int(d) for d in aval.shape])


def export_graph(apply: Callable[..., Any], tree: Any, example_inputs: Sequence[Any],
                 stored: Collection[str], label: str) -> bytes:
    """``apply(tree, *example_inputs)`` as ONNX bytes; the leaves whose source names are
    in ``stored`` are initializers with their values cleared."""
    import jax
    from onnx import TensorProto, helper

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [value for _, value in flat]
    traced = [i for i, value in enumerate(leaves) if _is_array(value)]
    names = ["/".join(_key(k) for k in keys) for keys, _ in flat]
    inputs = []
    for i, x in enumerate(example_inputs):
        if not _is_array(x):
            raise UnsupportedError(f"{label}: example input {i} is a {type(x).__name__}; "
                                   "expected an array (NumPy or jax.Array)")
        inputs.append(x)

    def fn(arrays: list[Any], *xs: Any) -> Any:
        full = list(leaves)
        for i, a in zip(traced, arrays, strict=True):
            full[i] = a
        return apply(jax.tree_util.tree_unflatten(treedef, full), *xs)

    try:
        closed = jax.make_jaxpr(fn)([leaves[i] for i in traced], *inputs)
    except WeightAtlasError:
        raise
    except Exception as e:  # whatever the model raises on these inputs
        raise UnsupportedError(f"{label}: cannot trace apply(params, *example_inputs): "
                               f"{type(e).__name__}: {str(e)[:300]}") from e
    jaxpr = closed.jaxpr
    b = _Builder()
    param_names = []
    graph_inputs = []
    initializers = []
    for i, var in zip(traced, jaxpr.invars[:len(traced)], strict=True):
        name = names[i]
        if name in stored:
            t = TensorProto()
            t.name = name
            t.dims.extend(_shape(var))
            t.data_type = int(helper.np_dtype_to_tensor_dtype(np.dtype(var.aval.dtype)))
            initializers.append(t)
            param_names.append(name)
        else:  # an array leaf that is not stored (a skipped collection): a constant
            param_names.append(b.const(np.asarray(leaves[i])))
    for i, var in enumerate(jaxpr.invars[len(traced):]):
        graph_inputs.append(_value_info(f"input_{i}", var.aval))
    try:
        outs = b.run(jaxpr, closed.consts,
                     [*param_names, *(f"input_{i}" for i in range(len(inputs)))])
    except _Refused as e:
        raise UnsupportedError(f"{label}: cannot export the graph to ONNX: {e} (the "
                               "primitives covered are listed in docs/formats/jax.md, and "
                               "in weightatlas.adapters._jax_graph.SUPPORTED)") from None
    outputs = []
    for i, (name, var) in enumerate(zip(outs, jaxpr.outvars, strict=True)):
        b.nodes.append(helper.make_node("Identity", [name], [f"output_{i}"],
                                        name=f"output_{i}"))
        outputs.append(_value_info(f"output_{i}", var.aval))
    read = {name for node in b.nodes for name in node.input}
    graph = helper.make_graph(b.nodes, label, graph_inputs, outputs,
                              [*initializers, *(t for t in b.initializers if t.name in read)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="weightatlas.jax")
    model.ir_version = 9
    meta = model.metadata_props.add()
    meta.key = _NOTE_KEY
    meta.value = "initializer values cleared; read each from the snapshot tensor whose " \
                 "source_name is the initializer's name"
    return bytes(model.SerializeToString())
