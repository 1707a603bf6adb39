"""Constant folding of the operators that exporters wrap around weights.

Exporters rarely feed an initializer straight into ``Conv`` or ``MatMul``: they
transpose it, cast it, reshape it, dequantize it, or (the ``onnx`` package's light
models) build it with ``ConstantOfShape``. The weight the model computes with is the
result. This module computes that result with NumPy, exactly as onnxruntime does
(the tests compare every folded byte against onnxruntime), for ``Identity``,
``Transpose``, ``Cast``/``CastLike``, ``Reshape``, ``Squeeze``, ``Unsqueeze``,
``Flatten``, ``ConstantOfShape`` and ``DequantizeLinear`` (per tensor, per axis and
blocked, integer and float8 inputs).

:func:`plan` checks a node and computes its output shape and type without touching
weight bytes (so a model is validated before anything is written); :func:`run`
computes the values. :func:`back_layout` works out how a weight reached through a
chain of layout operators maps back to the initializer it came from, so the store
can keep the initializer's exact bytes and still present the weight canonically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from weightatlas.adapters._onnx_tensors import ONNX_TYPES, OnnxType
from weightatlas.errors import FormatError, ShapeError

__all__ = ["FOLDABLE", "LAYOUT_OPS", "PARAM_INPUTS", "VALUE_INPUTS", "Fold", "back_layout",
           "plan", "run"]

#: Operators folded when every input is constant: op -> inputs that carry values.
VALUE_INPUTS: dict[str, frozenset[int]] = {
    "Identity": frozenset({0}), "Transpose": frozenset({0}), "Cast": frozenset({0}),
    "CastLike": frozenset({0}), "Reshape": frozenset({0}), "Squeeze": frozenset({0}),
    "Unsqueeze": frozenset({0}), "Flatten": frozenset({0}), "ConstantOfShape": frozenset(),
    "DequantizeLinear": frozenset({0, 1, 2}),
}
#: Inputs that are parameters (shapes, axes, a type), never weights.
PARAM_INPUTS: dict[str, frozenset[int]] = {
    "CastLike": frozenset({1}), "Reshape": frozenset({1}), "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}), "ConstantOfShape": frozenset({0}),
}
FOLDABLE = frozenset(VALUE_INPUTS)
#: Folds that only move values (the initializer's bytes are the weight's bytes).
LAYOUT_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})

_FLOAT8 = {"FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"}
_CASTABLE = {"FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "INT8", "INT16", "INT32", "INT64",
             "UINT8", "UINT16", "UINT32", "UINT64", "BOOL", *_FLOAT8}
_FLOATS = {"FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", *_FLOAT8}


@dataclass
class Fold:
    """A checked folding step: the operator, its output, and what ``run`` needs."""

    op: str
    shape: tuple[int, ...]  #: output shape
    otype: OnnxType  #: output type
    params: dict[str, Any] = field(default_factory=dict)


def _axes(values: Any, rank: int, where: str) -> list[int]:
    out = []
    for a in values:
        a = int(a)
        if not -rank <= a < rank:
            raise FormatError(f"{where}: axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise FormatError(f"{where}: axes {list(values)} repeat an axis")
    return out


def _param(params: dict[int, np.ndarray], i: int, where: str, what: str) -> np.ndarray:
    value = params[i]
    if value.dtype.kind not in "iu" or value.ndim > 1:
        raise FormatError(f"{where}: {what} must be a 1-d integer tensor, found {value.dtype} "
                          f"of shape {list(value.shape)}")
    return value.reshape(-1)


def _reshape(shape: tuple[int, ...], target: np.ndarray, allowzero: bool,
             where: str) -> tuple[int, ...]:
    dims = [int(d) for d in target]
    out: list[int] = []
    infer = [i for i, d in enumerate(dims) if d == -1]
    if len(infer) > 1 or any(d < -1 for d in dims):
        raise FormatError(f"{where}: Reshape target {dims} is invalid (at most one -1, "
                          "no other negative size)")
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if i >= len(shape):
                raise FormatError(f"{where}: Reshape target {dims} copies dimension {i}, "
                                  f"the input has rank {len(shape)}")
            d = shape[i]
        out.append(d)
    numel = math.prod(shape)
    if infer:
        rest = math.prod(d for i, d in enumerate(out) if i != infer[0])
        if rest == 0 or numel % rest:
            raise ShapeError(f"{where}: cannot reshape {list(shape)} to {dims}")
        out[infer[0]] = numel // rest
    if math.prod(out) != numel:
        raise ShapeError(f"{where}: cannot reshape {list(shape)} ({numel} values) to {out}")
    return tuple(out)


def plan(op: str, attrs: dict[str, Any], shapes: list[tuple[int, ...] | None],
         types: list[OnnxType | None], params: dict[int, np.ndarray],
         where: str) -> Fold | None:
    """Check one foldable node; return its :class:`Fold`, or ``None`` to leave it unfolded.

    ``shapes``/``types`` are those of the node's inputs (``None`` for an absent
    optional input) and ``params`` the values of its parameter inputs. Invalid nodes
    (a reshape that cannot hold the values, an axis out of range...) are
    ``FormatError``/``ShapeError``; nodes folded differently by runtimes (a float to
    integer cast, a string) are left unfolded.
    """
    x, xt = shapes[0] if shapes else None, types[0] if types else None
    if op == "ConstantOfShape":
        dims = _param(params, 0, where, "the shape input")
        if any(int(d) < 0 for d in dims):
            raise ShapeError(f"{where}: ConstantOfShape shape {dims.tolist()} has a negative "
                             "size")
        fill = attrs.get("value")
        if fill is None:
            fill = np.zeros(1, np.float32)
        if fill.size != 1:
            raise FormatError(f"{where}: ConstantOfShape value must hold one element, holds "
                              f"{fill.size}")
        ftype = next((t for t in ONNX_TYPES.values() if t.dtype == fill.dtype and t.bits >= 8),
                     None)
        if ftype is None or not ftype.stored:
            return None
        return Fold(op, tuple(int(d) for d in dims), ftype, {"fill": fill.reshape(())})
    if x is None or xt is None:
        raise FormatError(f"{where}: {op} has no input")
    if op == "Identity":
        return Fold(op, x, xt)
    if op == "Transpose":
        perm = [int(p) for p in attrs.get("perm", range(len(x) - 1, -1, -1))]
        if sorted(perm) != list(range(len(x))):
            raise FormatError(f"{where}: Transpose perm {perm} is not a permutation of the "
                              f"{len(x)} input axes")
        return Fold(op, tuple(x[p] for p in perm), xt, {"perm": perm})
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return Fold(op, _reshaped(op, x, attrs, params, where), xt)
    if op in ("Cast", "CastLike"):
        if op == "Cast":
            to = ONNX_TYPES.get(int(attrs.get("to", 0)))
        else:
            to = types[1] if len(types) > 1 else None
        if to is None or to.name not in _CASTABLE or xt.name not in _CASTABLE:
            return None
        if xt.name in _FLOATS and to.name not in _FLOATS:
            return None  # float -> integer: out-of-range values differ between runtimes
        if not to.stored:
            return None
        return Fold(op, x, to, {"saturate": bool(attrs.get("saturate", 1))})
    if op == "DequantizeLinear":
        return _plan_dequantize(attrs, shapes, types, where)
    raise AssertionError(op)


def _reshaped(op: str, x: tuple[int, ...], attrs: dict[str, Any],
              params: dict[int, np.ndarray], where: str) -> tuple[int, ...]:
    if op == "Reshape":
        return _reshape(x, _param(params, 1, where, "the shape input"),
                        bool(attrs.get("allowzero", 0)), where)
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))
        if not -len(x) <= axis <= len(x):
            raise FormatError(f"{where}: Flatten axis {axis} is out of range for rank {len(x)}")
        axis = axis + len(x) if axis < 0 else axis
        return math.prod(x[:axis]), math.prod(x[axis:])
    raw = attrs["axes"] if "axes" in attrs else (
        _param(params, 1, where, "axes") if 1 in params else None)
    if op == "Squeeze":
        if raw is None:
            return tuple(d for d in x if d != 1)
        axes = _axes(raw, len(x), where)
        bad = [a for a in axes if x[a] != 1]
        if bad:
            raise ShapeError(f"{where}: Squeeze axis {bad[0]} has size {x[bad[0]]}, expected 1")
        return tuple(d for i, d in enumerate(x) if i not in axes)
    if raw is None:
        raise FormatError(f"{where}: Unsqueeze has no axes")
    rank = len(x) + len(raw)
    axes = _axes(raw, rank, where)
    it = iter(x)
    return tuple(1 if i in axes else next(it) for i in range(rank))


def _plan_dequantize(attrs: dict[str, Any], shapes: list[tuple[int, ...] | None],
                     types: list[OnnxType | None], where: str) -> Fold | None:
    x, s = shapes[0], shapes[1] if len(shapes) > 1 else None
    xt, st = types[0], types[1] if len(types) > 1 else None
    if x is None or s is None or xt is None or st is None:
        raise FormatError(f"{where}: DequantizeLinear needs x and x_scale")
    if xt.name not in ("INT8", "UINT8", "INT16", "UINT16", "INT32", "INT4", "UINT4", "INT2",
                       "UINT2", *_FLOAT8):
        return None
    if st.name not in ("FLOAT", "FLOAT16", "BFLOAT16"):
        return None
    out = ONNX_TYPES.get(int(attrs.get("output_dtype", 0)) or st.code, st)
    if not out.stored or out.name not in _FLOATS:
        return None
    zp = shapes[2] if len(shapes) > 2 else None
    if zp is not None and (zp != s or types[2] != xt):
        raise FormatError(f"{where}: x_zero_point has shape {list(zp)} "
                          f"{getattr(types[2], 'name', '?')}, expected {list(s)} {xt.name} "
                          "(the scale's shape and x's type)")
    block = int(attrs.get("block_size", 0))
    axis = int(attrs.get("axis", 1))
    params: dict[str, Any] = {"mode": "tensor", "x_float": xt.name in _FLOAT8}
    if math.prod(s) == 1 and len(s) <= 1 and block == 0:
        pass
    elif len(x) == 0 or not -len(x) <= axis < len(x):
        raise FormatError(f"{where}: DequantizeLinear axis {axis} is out of range for x of "
                          f"shape {list(x)}")
    elif block == 0:
        axis %= len(x)
        if len(s) != 1 or s[0] != x[axis]:
            raise ShapeError(f"{where}: per-axis x_scale has shape {list(s)}, x has "
                             f"{x[axis]} values along axis {axis}")
        params.update(mode="axis", axis=axis)
    else:
        axis %= len(x)
        want = tuple(-(-d // block) if i == axis else d for i, d in enumerate(x))
        if block < 0 or s != want:
            raise ShapeError(f"{where}: blocked x_scale has shape {list(s)}, block_size {block} "
                             f"on axis {axis} of {list(x)} needs {list(want)}")
        params.update(mode="block", axis=axis, block=block)
    return Fold("DequantizeLinear", x, out, params)


def run(fold: Fold, inputs: list[np.ndarray | None]) -> np.ndarray:
    """Compute a planned fold; ``inputs`` are the node's input values."""
    op, p = fold.op, fold.params
    dtype = fold.otype.dtype
    assert dtype is not None
    if op == "ConstantOfShape":
        return np.full(fold.shape, p["fill"], dtype)
    x = inputs[0]
    assert x is not None
    if op == "Identity":
        return x
    if op == "Transpose":
        return x.transpose(p["perm"])
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return x.reshape(fold.shape)
    if op in ("Cast", "CastLike"):
        return _cast(x, fold.otype, p["saturate"])
    return _dequantize(fold, x, inputs[1], inputs[2] if len(inputs) > 2 else None)


def _cast(x: np.ndarray, to: OnnxType, saturate: bool) -> np.ndarray:
    assert to.dtype is not None
    if to.name in _FLOAT8 and saturate and x.dtype.kind in "fV":
        top = float(ml_dtypes.finfo(to.dtype).max)
        x = np.clip(x.astype(np.float32), -top, top)  # NaN stays NaN; +-Inf -> +-max
    if to.dtype == np.bool_:
        return x != 0
    with np.errstate(over="ignore"):  # overflow to +-Inf is what a cast does
        return x.astype(to.dtype)


def _expand(v: np.ndarray, fold: Fold, ndim: int, length: int) -> np.ndarray:
    p = fold.params
    if p["mode"] == "tensor":
        return v.reshape(())
    axis = p["axis"]
    if p["mode"] == "axis":
        return v.reshape((-1,) + (1,) * (ndim - axis - 1))
    return np.repeat(v, p["block"], axis=axis).take(np.arange(length), axis=axis)


def _dequantize(fold: Fold, x: np.ndarray, scale: np.ndarray | None,
                zero: np.ndarray | None) -> np.ndarray:
    """``(x - zero_point) * scale`` in float32, then the output type (onnxruntime's order)."""
    assert scale is not None and fold.otype.dtype is not None
    length = x.shape[fold.params.get("axis", 0)] if x.ndim else 1
    s = _expand(scale.astype(np.float32), fold, x.ndim, length)
    if fold.params["x_float"]:
        values = x.astype(np.float32) * s
    else:
        shifted = x.astype(np.int32)
        if zero is not None:
            shifted = shifted - _expand(zero.astype(np.int32), fold, x.ndim, length)
        values = shifted.astype(np.float32) * s
    with np.errstate(over="ignore"):
        return values.astype(fold.otype.dtype)


def back_layout(steps: list[tuple[str, Fold, tuple[int, ...]]], names: tuple[str | None, ...],
                shape: tuple[int, ...]) -> tuple[str, ...] | None:
    """The source's axis order for a weight reached through layout-only steps, or ``None``.

    Args:
        steps: From the weight back towards the source: ``(op, fold, input_shape)`` for
            each step (value-preserving steps such as ``Cast`` move no axes).
        names: The weight's axis names as its consumer sees them (``None``: a size-1 axis
            that is not part of the canonical layout).
        shape: The weight's shape.

    Returns:
        ``source_layout``: a permutation of the named axes such that the source equals
        the canonical array transposed into that order and reshaped to the source's
        shape; ``None`` when no such permutation exists (a transpose after a reshape
        that merged axes).

    Example:
        >>> t = Fold("Transpose", (3, 2), ONNX_TYPES[1], {"perm": [1, 0]})
        >>> back_layout([("Transpose", t, (2, 3))], ("in", "out"), (3, 2))
        ('out', 'in')
    """
    found = back_names(steps, names, shape)
    if found is None:
        return None
    axes, order = found
    if axes is not None:  # every axis still known: keep size-1 axes where they are
        order = [a for a in axes if a is not None]
    return tuple(order + [n for n in names if n is not None and n not in order])


def back_names(steps: list[tuple[str, Fold, tuple[int, ...]]], names: tuple[str | None, ...],
               shape: tuple[int, ...]) -> tuple[list[str | None] | None, list[str]] | None:
    """Follow axis names back through ``steps`` (see :func:`back_layout`).

    Returns ``(axes, order)``: the source's axis names (``None`` once a reshape merged
    axes) and the C order of its named axes; ``None`` when the order is lost.
    """
    axes: list[str | None] | None = list(names)
    order = [n for n, d in zip(names, shape, strict=True) if n is not None and d != 1]
    cur = shape
    for op, fold, in_shape in steps:
        if op == "Transpose":
            perm = fold.params["perm"]
            if axes is not None:
                new: list[str | None] = [None] * len(perm)
                for j, p in enumerate(perm):
                    new[p] = axes[j]
                axes = new
                order = [n for n, d in zip(axes, in_shape, strict=True)
                         if n is not None and d != 1]
            else:
                moved = [perm[j] for j, d in enumerate(cur) if d != 1]
                if moved != sorted(moved):
                    return None
        elif op in LAYOUT_OPS - {"Identity"}:
            if axes is not None and [d for d in cur if d != 1] == [d for d in in_shape if d != 1]:
                it = iter([n for n, d in zip(axes, cur, strict=True) if d != 1])
                axes = [next(it) if d != 1 else None for d in in_shape]
            else:
                axes = None
        elif op not in ("Identity", "Cast", "CastLike", "DequantizeLinear"):
            return None
        cur = in_shape
    return axes, order
