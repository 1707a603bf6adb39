"""Readable names for ONNX weights, from the names and scopes exporters write.

A weight's canonical name is ``module.param``, as a person names it
(``layer1.0.conv2.weight``). The module comes from the first of these that exists:

1. the tensor's own name, when it already is a dotted path (PyTorch's exporters keep
   ``state_dict`` keys such as ``fc.weight``; Paddle writes ``conv2d_0.w_0``); its last
   component is kept when it fits the role (``weight_ih_l0`` for a weight), else the
   role names the parameter (``conv1.weight_bias`` feeding a bias is ``conv1.bias``);
2. the consuming node's scope: the dynamo exporter's ``pkg.torch.onnx.name_scopes``
   metadata, or a ``/``-separated node name as the TorchScript exporter
   (``/encoder/layer.0/attention/self/query/MatMul``) and tf2onnx
   (``model/dense/MatMul``) write, without its last component (the operator); then
   the dotted name of a tensor it was folded from;
3. the tensor's name cleaned the way Caffe/Caffe2 and TensorFlow name blobs
   (``gpu_0/res2_0_branch2a_bn_s_0`` -> ``res2_0_branch2a_bn``,
   ``inception_3a/1x1_w_0`` -> ``inception_3a.1x1``,
   ``sequential/dense/MatMul/ReadVariableOp:0`` -> ``sequential.dense``);
4. a plain node name (``conv1``) that is not an operator's default name, else the
   node's name or its operator.

A bias added after its layer (``Add`` of a constant to a ``MatMul`` output) takes the
layer's module unless its own name is a dotted ``...bias``; tensors a folded weight is
computed from take the weight's name plus a suffix (``_quantized``, ``_scale``...); names
derived inside a subgraph are prefixed by its path (``gate.then_branch.``);
:func:`unique` settles repeats. The raw ONNX name is always kept as ``source_name``.
"""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING, Any

from weightatlas.storage import split_name

if TYPE_CHECKING:
    from weightatlas.adapters._onnx_plan import Item

__all__ = ["accepts", "is_dotted", "name_items", "sanitize", "scope_module", "unique",
           "value_module"]

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")
_NUM = re.compile(r"\d+")
_TF_WRAPPERS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})
_TF_TAIL = frozenset({"ReadVariableOp", "Read", "read", "MatMul", "BiasAdd", "Conv2D",
                      "Conv2D_bias", "kernel", "bias", "weights", "biases", "gamma", "beta",
                      "moving_mean", "moving_variance", "Const", "embeddings",
                      "depthwise_kernel", "Identity", "Cast"})
_ROLE_SUFFIX = re.compile(r"(.+?)[_.](w|b|s|weight|weights|bias|biases|scale|mean|var|rm|riv|"
                          r"gamma|beta|kernel)$")
_GENERIC = frozenset({"w", "b", "weight", "weights", "bias", "kernel", "scale", "x", "y"})
_AUTO = re.compile(r"(val|onnx|const|Constant|initializer|_v|tmp)_?\d*", re.IGNORECASE)


def sanitize(text: str) -> str:
    """A name with scope separators as dots and nothing else odd.

    Example:
        >>> sanitize("/encoder/layer.0//query:0")
        'encoder.layer.0.query.0'
    """
    out = re.sub(r"[/:\\\s]+", ".", text)
    out = re.sub(r"\.{2,}", ".", out).strip(".")
    return out or "tensor"


def is_dotted(name: str) -> bool:
    """Whether a tensor name already is a dotted module path (``fc.weight``).

    Example:
        >>> is_dotted("layer1.0.conv1.weight"), is_dotted("onnx::Conv_193")
        (True, False)
    """
    return bool(_DOTTED.fullmatch(name))


def accepts(last: str, role: str) -> bool:
    """Whether a name's last component fits a role (``weight_ih_l0`` fits a weight).

    Example:
        >>> accepts("weight_bias", "bias"), accepts("running_var", "running_var")
        (False, True)
    """
    low = last.lower()
    if role in ("bias",):
        return ("bias" in low and "weight" not in low) or low in ("beta", "b")
    if role in ("weight", "embedding"):
        return ("weight" in low or low in ("kernel", "gamma", "scale", "embedding", "w")
                ) and "bias" not in low
    if role == "running_mean":
        return "mean" in low
    if role == "running_var":
        return "var" in low
    if role in ("scale", "zero_point"):
        return role in low
    return True


def _merge(parts: list[str]) -> list[str]:
    """Join TorchScript scope components: ``layer1``, ``layer1.0`` -> ``layer1.0``.

    The exporter names a scope by the module's name from its last non-numeric atom
    (``layer1.0`` for ``model.layer1.0``), so a numbered component repeats the tail of
    the path before it.
    """
    path: list[str] = []
    for comp in parts:
        atoms = comp.split(".")
        if len(atoms) > 1 and all(_NUM.fullmatch(a) for a in atoms[1:]):
            for k in range(min(len(path), len(atoms) - 1), 0, -1):
                if path[-k:] == atoms[:k]:
                    atoms = atoms[k:]
                    break
        path.extend(a for a in atoms if a)
    return path


def _auto_node_name(name: str, op: str) -> bool:
    """An exporter's generated node name (``node_Conv_3``, ``Gemm_12``, onnxscript's ``n0``)."""
    return name.startswith("node_") or bool(
        re.fullmatch(rf"{re.escape(op)}(_?\d+)?", name, re.IGNORECASE)
        or re.fullmatch(r"[A-Za-z]\d+", name))


def scope_module(node: Any, *, plain: bool = True) -> str | None:
    """The module a node belongs to, from its exporter's scope information.

    ``plain=False`` ignores plain node names (no scope), which say less than a
    blob-style tensor name.

    Example:
        >>> from types import SimpleNamespace as N
        >>> scope_module(N(name="/layer2/layer2.0/downsample/downsample.0/Conv",
        ...                op_type="Conv", metadata_props=[]))
        'layer2.0.downsample.0'
    """
    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "pkg.torch.onnx.name_scopes" and len(prop.value) < 8192:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                scopes = None
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) \
                    and scopes[-2]:
                return sanitize(scopes[-2])
    name = node.name
    if "/" in name:
        parts = [p for p in name.split("/") if p and p not in _TF_WRAPPERS]
        path = _merge(parts[:-1])
        return sanitize(".".join(path)) if path else None
    if plain and name and not _auto_node_name(name, node.op_type):
        return sanitize(name)
    return None


_HINTS = {"w": "weight", "weight": "weight", "weights": "weight", "kernel": "weight",
          "b": "bias", "bias": "bias", "biases": "bias", "beta": "bias", "s": "scale",
          "scale": "scale", "gamma": "scale", "mean": "mean", "rm": "mean", "var": "var",
          "riv": "var"}


def value_module(name: str) -> tuple[str, str | None] | None:
    """``(module, parameter hint)`` from a blob-style tensor name (Caffe, Caffe2, TensorFlow).

    Example:
        >>> value_module("gpu_0/res2_0_branch2a_bn_s_0"), value_module("conv1/7x7_s2_w_0")
        (('res2_0_branch2a_bn', 'scale'), ('conv1.7x7_s2', 'weight'))
    """
    if "::" in name or _AUTO.fullmatch(name):
        return None
    hint = None
    s = re.sub(r":\d+$", "", name)
    parts = [p for p in s.split("/") if p and p not in _TF_WRAPPERS]
    while parts and re.fullmatch(r"gpu_\d+", parts[0]):
        parts.pop(0)
    if parts:
        parts[-1] = re.sub(r"(?<=[A-Za-z])_\d+$", "", parts[-1])
    while len(parts) > 1 and parts[-1] in _TF_TAIL:
        hint = hint or _HINTS.get(parts[-1].lower())
        parts.pop()
    if parts:
        m = _ROLE_SUFFIX.fullmatch(parts[-1])
        if m:
            parts[-1] = m.group(1)
            hint = _HINTS.get(m.group(2).lower())
    if not parts or (len(parts) == 1 and parts[0].lower() in _GENERIC):
        return None
    return sanitize(".".join(parts)), hint


def unique(names: list[str], recurrent: list[bool]) -> list[str]:
    """Make names unique: repeated recurrent weights get ``_l0``, ``_l1`` (PyTorch's
    layer suffix), any other repeat ``_1``, ``_2`` on its parameter.

    Example:
        >>> unique(["lstm.weight_ih", "lstm.weight_ih", "fc.weight", "fc.weight"],
        ...        [True, True, False, False])
        ['lstm.weight_ih_l0', 'lstm.weight_ih_l1', 'fc.weight', 'fc.weight_1']
    """
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    out = list(names)
    taken = set(names)
    for name, idx in groups.items():
        if len(idx) == 1:
            continue
        layered = all(recurrent[i] for i in idx)
        for k, i in enumerate(idx):
            if k == 0 and not layered:
                continue
            j = k
            while True:
                candidate = f"{name}_l{j}" if layered else f"{name}_{j}"
                if candidate not in taken:
                    break
                j += len(idx)
            out[i] = candidate
            taken.add(candidate)
    return out


def _within(prefix: str, module: str) -> str:
    return f"{prefix}.{module}" if prefix else module


def _module(it: Item) -> tuple[str, str | None]:
    """``(module, param)`` by the rules of the module doc; ``param`` None: the role's."""
    r = it.role
    if it.attrs.get("constant"):
        mod, _, last = f"constants.{sanitize(it.value.name)}".rpartition(".")
        return mod, last
    own = [it.value.name] + ([it.attrs["value"]] if "value" in it.attrs else [])
    chain = it.attrs.get("chain", []) + it.attrs.get("folded_from", [])
    node = it.use.node if it.use is not None else None
    prefix = it.value.graph.prefix
    where = it.use.graph.prefix if it.use is not None else prefix
    own_param = None if r is not None else sanitize(it.value.name).replace(".", "_")
    dotted = next((n for n in own if is_dotted(n)), None)
    if dotted:  # 1. the tensor's own dotted name
        mod, last = dotted.rsplit(".", 1)
        return mod, (last if r is None or accepts(last, r.role) else None)
    scope = scope_module(node, plain=False) if node is not None else None
    if scope:  # 2. the consumer's scope
        return _within(where, scope), own_param
    dotted = next((n for n in chain if is_dotted(n)), None)
    if dotted:  # ... or the dotted name of what it was computed from
        mod, last = dotted.rsplit(".", 1)
        return mod, (last if r is None else None)
    modules = [m for n in own + chain if (m := value_module(n))]
    found = next((m for m in modules if m[1]), modules[0] if modules else None)
    if found:  # 3. blob-style names
        module, hint = found
        return _within(prefix, module), (None if r is not None else
                                          {"scale": "weight"}.get(hint or "", hint))
    scope = scope_module(node, plain=True) if node is not None else None
    if scope:  # a plain node name
        return _within(where, scope), own_param
    if r is None:  # 4. the raw name, or the operator
        mod, _, last = _within(prefix, sanitize(it.value.name)).rpartition(".")
        return mod, last
    return _within(where, node.op_type.lower() if node is not None else "tensor"), None


def name_items(items: list[Item]) -> None:
    """Give every item its canonical name (see the module doc), unique in the model."""
    by_value = {it.value.name: it for it in items}
    by_value.update({it.attrs["value"]: it for it in items if "value" in it.attrs})
    children = [it for it in items if "feeds" in it.attrs and it.attrs["feeds"] in by_value]
    parents = [it for it in items if it not in children]
    biases = [it for it in parents if it.bias_of is not None and it.bias_of.name in by_value]
    for it in parents:
        module, param = _module(it)
        it.module = module
        it.param = param or (it.role.param if it.role is not None else "weight")
    for it in biases:  # a bias added after its layer takes the layer's name
        if not (is_dotted(it.value.name) and accepts(it.value.name.rsplit(".", 1)[1], "bias")):
            assert it.bias_of is not None
            it.module, it.param = by_value[it.bias_of.name].module, "bias"
    full = unique([f"{it.module}.{it.param}" if it.module else it.param for it in parents],
                        [it.kind == "recurrent" for it in parents])
    for it, n in zip(parents, full, strict=True):
        it.name = n
    for it in children:
        it.name = by_value[it.attrs["feeds"]].name + it.param
    final = unique([it.name for it in items], [False] * len(items))
    for it, n in zip(items, final, strict=True):
        it.name = n
        it.module, it.param = split_name(n)
