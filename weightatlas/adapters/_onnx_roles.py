"""What a constant is, from the operator that consumes it.

ONNX names tell little (``onnx::MatMul_123``, ``val_8``), but every consumer's
operator schema says what an input is: ``Conv`` input 1 is ``W`` laid out
``[M, C/group, kH, kW]``, ``Gemm`` input 1 is ``B``, ``[K, N]`` or ``[N, K]`` with
``transB``, ``LSTM`` input 1 is ``W`` ``[num_directions, 4*hidden, input]`` with the
gates in the order ``i, o, f, c``... :func:`role` turns (operator, input index,
attributes, shape) into a :class:`Role`: the parameter name, the store's kind, the
axis names as the operator sees the tensor and the canonical order of those axes
(linear ``[out, in]``, convolution ``[out, in, *spatial]``, embedding
``[vocab, dim]``). :data:`PARAMETER_INPUTS` lists the inputs that are shapes,
indices or activation quantization parameters: constants, never weights.
:func:`attention_labels` finds the query, key, value and output projections of
attention blocks from the graph's structure, whatever the names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PARAMETER_INPUTS", "Role", "attention_labels", "role"]

Shape = tuple[int, ...]
Names = tuple[str | None, ...]


@dataclass(frozen=True)
class Role:
    """What one consumer input makes of a constant."""

    input: str  #: the operator's input name (``W``, ``B``, ``input_mean``...)
    role: str  #: weight, bias, running_mean, running_var, embedding, scale, zero_point...
    param: str  #: the parameter name used for naming (``weight``, ``weight_ih``...)
    kind: str  #: a store kind
    names: Names  #: axis names as the operator sees the tensor (None: a size-1 axis)
    canonical: tuple[str, ...]  #: the canonical order of the named axes
    attrs: dict[str, Any] = field(default_factory=dict)


def _d(shape: Shape) -> tuple[str, ...]:
    return tuple(f"d{i}" for i in range(len(shape)))


def _r(inp: str, role: str, param: str, kind: str, names: Names,
       canonical: tuple[str, ...] | None = None, **attrs: Any) -> Role:
    canon = canonical if canonical is not None else tuple(n for n in names if n is not None)
    return Role(inp, role, param, kind, names, canon, {k: v for k, v in attrs.items()
                                                        if v is not None})


_SPATIAL = {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}
_CONV_KIND = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
_LINEAR_IN_OUT = ("in", "out")


def _spatial(n: int) -> tuple[str, ...]:
    return _SPATIAL.get(n, tuple(f"s{i}" for i in range(n)))


def _conv(inp: str, index: int, shape: Shape, a: Mapping[str, Any], w: Shape | None,
          transpose: bool, quantized: bool = False) -> Role | None:
    groups = int(a.get("group", 1))
    ks = a.get("kernel_shape")
    n = len(ks) if ks else (len(w) - 2 if w is not None and len(w) > 2 else 2)
    kind = "conv_transpose" if transpose else _CONV_KIND.get(n, "other")
    if index == 0:  # the weight
        if len(shape) < 3:
            return None
        sp = _spatial(len(shape) - 2)
        names = ("in", "out", *sp) if transpose else ("out", "in", *sp)
        depthwise = (groups > 1 and not transpose and shape[1] == 1) or None
        return _r(inp, "weight", "weight", kind, names, groups=groups,
                  depthwise=depthwise, quantized=quantized or None)
    if len(shape) != 1:
        return None
    return _r(inp, "bias", "bias", kind, ("out",))


def _linear(inp: str, shape: Shape, out_in: bool, **attrs: Any) -> Role | None:
    if len(shape) == 1:
        return _r(inp, "weight", "weight", "linear", ("in",), **attrs)
    if len(shape) < 2:
        return None
    lead = tuple(f"g{i}" for i in range(len(shape) - 2))
    names = (*lead, "out", "in") if out_in else (*lead, "in", "out")
    return _r(inp, "weight", "weight", "linear", names, (*lead, "out", "in"), **attrs)


def _norm(inp: str, role: str, shape: Shape, **attrs: Any) -> Role:
    param = {"scale": "weight", "bias": "bias"}.get(role, role)
    names: Names = ("channel",) if len(shape) == 1 else _d(shape)
    return _r(inp, "weight" if role == "scale" else role, param, "norm", names, **attrs)


def _gemm(index: int, shape: Shape, a: Mapping[str, Any], consts: list[bool]) -> Role | None:
    extra = {k: a[k] for k in ("alpha", "beta") if k in a and float(a[k]) != 1.0}
    if index == 1 and len(shape) == 2:
        return _linear("B", shape, bool(a.get("transB", 0)), transB=int(a.get("transB", 0)),
                       **extra)
    if index == 0 and len(shape) == 2 and not (len(consts) > 1 and consts[1]):
        return _linear("A", shape, not a.get("transA", 0), transA=int(a.get("transA", 0)),
                       **extra)
    if index == 2:
        names: dict[int, Names] = {0: (), 1: ("out",)}
        if len(shape) == 2:
            names[2] = (None, "out") if shape[0] == 1 else ("batch", "out")
        if len(shape) in names:
            return _r("C", "bias", "bias", "linear", names[len(shape)], **extra)
    return None


def _matmul(index: int, shape: Shape, consts: list[bool], **attrs: Any) -> Role | None:
    other = consts[1 - index] if len(consts) == 2 else False
    if other or not shape:
        return None
    if index == 1:
        return _linear("B", shape, bool(attrs.pop("transB", 0)), **attrs)
    if len(shape) == 1:
        return None
    return _linear("A", shape, not attrs.pop("transA", 0), **attrs)


_GATES = {"LSTM": ["i", "o", "f", "c"], "GRU": ["z", "r", "h"], "RNN": ["h"]}
_RNN_PARAMS = {1: ("W", "weight_ih"), 2: ("R", "weight_hh"), 3: ("B", "bias"),
               7: ("P", "weight_peephole")}


def _recurrent(op: str, index: int, shape: Shape, a: Mapping[str, Any]) -> Role | None:
    if index not in _RNN_PARAMS or (index == 7 and op != "LSTM"):
        return None
    inp, param = _RNN_PARAMS[index]
    names: Names = ("direction", "gates_out", "in") if index in (1, 2) else (
        "direction", "gates_out")
    if len(shape) != len(names):
        return None
    attrs: dict[str, Any] = {"gates": _GATES[op], "direction": a.get("direction", "forward")}
    if "hidden_size" in a:
        attrs["hidden_size"] = int(a["hidden_size"])
    if index == 3:
        attrs["halves"] = ["W", "R"]  # B = [Wb | Rb] along gates_out
    if op == "GRU" and a.get("linear_before_reset"):
        attrs["linear_before_reset"] = 1
    return _r(inp, "bias" if index == 3 else "weight", param, "recurrent", names, **attrs)


def _gather(shape: Shape, a: Mapping[str, Any], is_float: bool) -> Role | None:
    if not is_float or len(shape) != 2:
        return None
    axis = int(a.get("axis", 0)) % 2
    names: Names = ("vocab", "dim") if axis == 0 else ("dim", "vocab")
    return _r("data", "embedding", "weight", "embedding", names, ("vocab", "dim"))


def _channel(inp: str, role: str, param: str, kind: str, shape: Shape) -> Role:
    nonunit = [i for i, d in enumerate(shape) if d != 1]
    if len(shape) >= 1 and len(nonunit) <= 1:
        at = nonunit[0] if nonunit else 0
        names = tuple("channel" if i == at else None for i in range(len(shape)))
        return _r(inp, role, param, kind, names)
    return _r(inp, role, param, kind, _d(shape))


Handler = Callable[[int, Shape, Mapping[str, Any], list[bool], list["Shape | None"], bool],
                   "Role | None"]


def _std(op: str) -> Handler | None:
    """Handlers for the default (``ai.onnx``) domain."""
    if op in ("Conv", "ConvTranspose", "ConvInteger", "DeformConv"):
        t = op == "ConvTranspose"
        wi, bi = {"ConvInteger": (1, -1), "DeformConv": (1, 3)}.get(op, (1, 2))
        return lambda i, s, a, c, sh, f: (
            _conv("W" if i == wi else "B", 0 if i == wi else 1, s, a,
                  sh[wi] if len(sh) > wi else None, t, op == "ConvInteger")
            if i in (wi, bi) else (_r("w_zero_point", "zero_point", "weight_zero_point", "other",
                                      _d(s)) if op == "ConvInteger" and i == 3 else None))
    if op == "Gemm":
        return lambda i, s, a, c, sh, f: _gemm(i, s, a, c)
    if op in ("MatMul", "MatMulInteger"):
        return lambda i, s, a, c, sh, f: (
            _matmul(i, s, c[:2], quantized=op == "MatMulInteger" or None) if i < 2 else
            (_r("b_zero_point", "zero_point", "weight_zero_point", "other", _d(s))
             if i == 3 else None))
    if op == "BatchNormalization":
        roles = {1: ("scale", "scale"), 2: ("B", "bias"), 3: ("input_mean", "running_mean"),
                 4: ("input_var", "running_var")}
        return lambda i, s, a, c, sh, f: (
            _norm(roles[i][0], roles[i][1], s, epsilon=a.get("epsilon")) if i in roles else None)
    if op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization",
              "RMSNormalization"):
        names = {"LayerNormalization": ("Scale", "B"), "InstanceNormalization": ("scale", "B"),
                 "GroupNormalization": ("scale", "bias"), "RMSNormalization": ("scale", "")}[op]
        return lambda i, s, a, c, sh, f: (
            _norm(names[i - 1], "scale" if i == 1 else "bias", s, epsilon=a.get("epsilon"),
                  axis=a.get("axis"), num_groups=a.get("num_groups"))
            if i in (1, 2) and names[i - 1] else None)
    if op in _GATES:
        return lambda i, s, a, c, sh, f: _recurrent(op, i, s, a)
    if op == "Gather":
        return lambda i, s, a, c, sh, f: _gather(s, a, f) if i == 0 else None
    if op == "PRelu":
        return lambda i, s, a, c, sh, f: (_channel("slope", "weight", "weight", "other", s)
                                          if i == 1 else None)
    if op == "QLinearConv":
        return lambda i, s, a, c, sh, f: _qlinear(i, s, a, sh, conv=True)
    if op == "QLinearMatMul":
        return lambda i, s, a, c, sh, f: _qlinear(i, s, a, sh, conv=False)
    return None


def _qlinear(i: int, s: Shape, a: Mapping[str, Any], sh: list[Shape | None],
             conv: bool) -> Role | None:
    if i == 3:
        if conv:
            return _conv("w", 0, s, a, s, False, quantized=True)
        return _linear("b", s, False, quantized=True)
    if i in (4, 5):
        names: Names = ("out",) if len(s) == 1 else _d(s)
        what = "scale" if i == 4 else "zero_point"
        return _r(f"w_{what}" if conv else f"b_{what}", what, f"weight_{what}",
                  "conv2d" if conv else "linear", names)
    if i == 8 and conv and len(s) == 1:
        return _r("B", "bias", "bias", "conv2d", ("out",))
    return None


def _ms(op: str) -> Handler | None:
    """Handlers for onnxruntime's ``com.microsoft`` operators."""
    if op == "FusedConv":
        return _std("Conv")
    if op == "FusedGemm":
        return _std("Gemm")
    if op == "FusedMatMul":
        return lambda i, s, a, c, sh, f: (
            _matmul(i, s, c[:2], transA=a.get("transA", 0), transB=a.get("transB", 0))
            if i < 2 else None)
    if op == "Attention":
        return lambda i, s, a, c, sh, f: (
            _r("weights", "weight", "weight", "attention", ("in", "out"), ("out", "in"),
               attention="qkv") if i == 1 and len(s) == 2 else
            _r("bias", "bias", "bias", "attention", ("out",), attention="qkv")
            if i == 2 and len(s) == 1 else None)
    norms = {"SkipLayerNormalization": (2, 3, 4), "SkipSimplifiedLayerNormalization": (2, -1, 4),
             "SimplifiedLayerNormalization": (1, -1, -1), "LayerNormalization": (1, 2, -1)}
    if op in norms:
        g, b, extra = norms[op]
        return lambda i, s, a, c, sh, f: (
            _norm("gamma", "scale", s, epsilon=a.get("epsilon")) if i == g else
            _norm("beta", "bias", s, epsilon=a.get("epsilon")) if i == b else
            _r("bias", "bias", "skip_bias", "other", ("channel",)) if i == extra
            and len(s) == 1 else None)
    if op == "EmbedLayerNormalization":
        emb = {2: "word_embedding", 3: "position_embedding", 4: "segment_embedding"}
        return lambda i, s, a, c, sh, f: (
            _r(emb[i], "embedding", emb[i], "embedding", ("vocab", "dim"))
            if i in emb and len(s) == 2 else
            _norm("gamma", "scale", s) if i == 5 else _norm("beta", "bias", s) if i == 6
            else None)
    if op in ("BiasGelu", "FastGelu"):
        return lambda i, s, a, c, sh, f: (_r("bias", "bias", "bias", "other", ("channel",))
                                          if i == 1 and len(s) == 1 else None)
    return None


#: Inputs that are shapes, indices, axes, states or activation quantization
#: parameters: op -> input indices. A constant used only there is not a weight.
PARAMETER_INPUTS: dict[str, frozenset[int]] = {k: frozenset(v) for k, v in {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3},
    "Resize": {1, 2, 3}, "Upsample": {1}, "Squeeze": {1}, "Unsqueeze": {1},
    "ConstantOfShape": {0}, "Range": {0, 1, 2}, "TopK": {1}, "Split": {1}, "Clip": {1, 2},
    "OneHot": {1, 2}, "Gather": {1}, "GatherElements": {1}, "GatherND": {1},
    "ScatterND": {1}, "ScatterElements": {1}, "Trilu": {1}, "CumSum": {1},
    "NonMaxSuppression": {2, 3, 4}, "Loop": {0, 1}, "If": {0}, "LSTM": {4, 5, 6},
    "GRU": {4, 5}, "RNN": {4, 5}, "Dropout": {1, 2}, "QuantizeLinear": {1, 2},
    "DequantizeLinear": {1, 2}, "QLinearConv": {1, 2, 6, 7}, "QLinearMatMul": {1, 2, 6, 7},
    "ConvInteger": {2}, "MatMulInteger": {2}, "CenterCropPad": {1}, "RoiAlign": {2},
    "Compress": {1}, "STFT": {1, 3}, "DFT": {1, 2}, "ReduceSum": {1}, "ReduceMean": {1},
    "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1}, "ReduceL1": {1}, "ReduceL2": {1},
    "ReduceLogSum": {1}, "ReduceLogSumExp": {1}, "ReduceSumSquare": {1}, "CastLike": {1},
    "Shape": {0}, "Size": {0}, "Mod": set(), "Col2Im": {1, 2},
}.items()}


def role(domain: str, op: str, index: int, attrs: Mapping[str, Any], shape: Shape,
         consts: list[bool], shapes: list[Shape | None], is_float: bool) -> Role | None:
    """The role a constant plays as input ``index`` of an operator, if the table knows it.

    Example:
        >>> r = role("", "Gemm", 1, {"transB": 0}, (512, 10), [False, True], [], True)
        >>> r.kind, r.names, r.canonical
        ('linear', ('in', 'out'), ('out', 'in'))
    """
    if domain in ("", "ai.onnx"):
        handler = _std(op)
    elif domain == "com.microsoft":
        handler = _ms(op)
    else:
        handler = None
    return None if handler is None else handler(index, shape, attrs, consts, shapes, is_float)


_THROUGH_UP = frozenset({"Reshape", "Transpose", "Add", "Mul", "Div", "Sub", "Split", "Slice",
                         "Squeeze", "Unsqueeze", "Gather", "Identity", "Cast", "Concat",
                         "Neg", "RotaryEmbedding", "Softmax", "Where", "Expand", "Sqrt"})
_THROUGH_SCORES = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape",
                             "Transpose", "Identity", "Squeeze", "Unsqueeze"})
_THROUGH_DOWN = frozenset({"Cast", "Dropout", "Where", "Identity", "Transpose", "Reshape"})


def attention_labels(nodes: list[Any], linear: Mapping[int, Any],
                     constant: Callable[[str], bool]) -> dict[int, str]:
    """Label the linear nodes of attention blocks ``q``, ``k``, ``v``, ``o`` (or ``qkv``).

    Args:
        nodes: The graph's nodes.
        linear: ``id(node)`` of every MatMul/Gemm with a constant weight.
        constant: Whether a value name is a constant.

    The pattern: a ``Softmax`` fed (through scaling, masking and reshapes) by a
    ``MatMul`` of two computed operands, whose inputs come from the query and key
    projections; the probabilities multiply (``MatMul``) the value projection, and
    the result feeds the output projection.
    """
    producer = {out: n for n in nodes for out in n.output if out}
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)

    def up(name: str, through: frozenset[str], stop: Callable[[Any], bool],
           hops: int = 8) -> Any | None:
        queue, seen = deque([(name, 0)]), set()
        while queue:
            value, depth = queue.popleft()
            node = producer.get(value)
            if node is None or id(node) in seen or depth > hops:
                continue
            seen.add(id(node))
            if stop(node):
                return node
            if node.op_type in through:
                queue.extend((i, depth + 1) for i in node.input if i and not constant(i))
        return None

    def is_scores(n: Any) -> bool:
        return n.op_type == "MatMul" and id(n) not in linear and len(n.input) == 2 and not any(
            constant(i) for i in n.input)

    labels: dict[int, set[str]] = {}
    for softmax in (n for n in nodes if n.op_type == "Softmax" and n.input):
        scores = up(softmax.input[0], _THROUGH_SCORES, is_scores)
        if scores is None:
            continue
        found = [(up(scores.input[0], _THROUGH_UP, lambda n: id(n) in linear), "q"),
                 (up(scores.input[1], _THROUGH_UP, lambda n: id(n) in linear), "k")]
        probs, mix = softmax.output[0], None
        for _ in range(4):
            nxt = users.get(probs, [])
            mix = next((n for n in nxt if n.op_type == "MatMul" and n.input[0] == probs), None)
            step = next((n for n in nxt if n.op_type in _THROUGH_DOWN), None)
            if mix is not None or step is None:
                break
            probs = step.output[0]
        if mix is not None:
            found.append((up(mix.input[1], _THROUGH_UP, lambda n: id(n) in linear), "v"))
            out, proj = mix.output[0], None
            for _ in range(4):
                nxt = users.get(out, [])
                proj = next((n for n in nxt if id(n) in linear and n.input[0] == out), None)
                step = next((n for n in nxt if n.op_type in _THROUGH_DOWN), None)
                if proj is not None or step is None:
                    break
                out = step.output[0]
            found.append((proj, "o"))
        for node, label in found:
            if node is not None:
                labels.setdefault(id(node), set()).add(label)
    return {k: "".join(x for x in "qkvo" if x in v) if len(v) > 1 else next(iter(v))
            for k, v in labels.items()}
