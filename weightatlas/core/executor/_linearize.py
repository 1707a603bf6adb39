"""The linearized network of the Distill article "Visualizing Weights": ReLUs pass their
input, max pooling averages.

:func:`linearized` rewrites an :class:`OnnxFunction`'s ONNX graph and builds a new function
with the same weights, value names and inputs. What it replaces (:data:`REPLACED`):

- **ReLU-like units become the identity**: ``Relu``, ``LeakyRelu``, ``PRelu``,
  ``ThresholdedRelu``, ``Elu``, ``Celu``, ``Clip`` (ReLU6 and any other clipping),
  ``Softplus``, ``Gelu``, ``Swish``, ``HardSwish`` and ``Mish``: each is ``x`` (slope 1)
  where the unit fires, which is what the article's gradient of 1 through a ReLU means.
  ``Selu`` becomes ``x * gamma`` (its slope where it fires).
- **Max pooling becomes average pooling** with the same window, strides, pads, dilations,
  ``auto_pad`` and ``ceil_mode``, with ``count_include_pad=1``: every window divides by
  its full size, so the pool is one fixed linear filter (PyTorch's ``AvgPool2d`` default,
  which Captum's linearized InceptionV1 uses). ``GlobalMaxPool`` becomes
  ``GlobalAveragePool``. A ``MaxPool`` whose indices output is used cannot be replaced
  and is refused.
- **LRN becomes the identity.** Lucid and Captum keep it, which makes their expanded weights
  depend slightly on the input; removing it keeps the network affine.

Kept as they are: everything affine (convolutions, matrix products, batch norm in inference
mode, average pooling, additions, concatenations, reshapes, padding, resizing) and the
saturating or normalizing nonlinearities (``Sigmoid``, ``Tanh``, ``HardSigmoid``,
``Softsign``, ``Softmax``, layer and instance norm): identity would be meaningless for a gate
(squeeze-and-excitation, LSTM), so they stay, and :func:`nonaffine_nodes` names them when
they lie between two layers whose expanded weights are asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from weightatlas.errors import UnsupportedError

from ._function import OnnxFunction, from_onnx

if TYPE_CHECKING:
    import onnx

    from ._graph import Graph, Node

__all__ = ["REPLACED", "linearized", "nonaffine_nodes"]

_IDENTITY = ("Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Celu", "Clip",
             "Softplus", "Gelu", "Swish", "HardSwish", "Mish", "LRN")

#: Operator -> what :func:`linearized` puts in its place.
REPLACED: dict[str, str] = {
    **dict.fromkeys(_IDENTITY, "Identity"),
    "Selu": "Mul (by its gamma)",
    "MaxPool": "AveragePool (count_include_pad=1)",
    "GlobalMaxPool": "GlobalAveragePool",
}

_POOL_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad", "ceil_mode")


def linearized(fn: OnnxFunction) -> OnnxFunction:
    """The function with ReLU-like units replaced by the identity and max pooling by
    average pooling (module docstring: exactly what is replaced and why).

    Value names, inputs, outputs and weights are those of ``fn``, so a value named in ``fn``
    names the same activation here, and ``fn.weights`` (or a replacement of them) can be
    passed to the result's ``apply``.

    Args:
        fn: A function made by :func:`from_onnx` (it must hold its ONNX model).

    Returns:
        A new function; ``fn`` is not changed.

    Raises:
        UnsupportedError: ``fn`` has no ONNX model, or a ``MaxPool``'s indices are used.

    Example:
        >>> from onnx import TensorProto, helper
        >>> g = helper.make_graph(
        ...     [helper.make_node("Relu", ["x"], ["h"]),
        ...      helper.make_node("MaxPool", ["h"], ["y"], kernel_shape=[2])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])])
        >>> fn = wa.core.executor.from_onnx(helper.make_model(g))
        >>> lin = linearized(fn)
        >>> [n.op_type for n in lin.graph.nodes]
        ['Identity', 'AveragePool']
        >>> x = np.array([[[-2.0, 4.0, 0.0, 6.0]]], np.float32)
        >>> np.asarray(fn(x)[0]).tolist(), np.asarray(lin(x)[0]).tolist()
        ([[[4.0, 4.0, 6.0]]], [[[1.0, 2.0, 3.0]]])
    """
    import onnx

    if fn.model is None:
        raise UnsupportedError(f"{fn.where}: the function holds no ONNX model to linearize; "
                               "build it with from_onnx")
    model = onnx.ModelProto()
    model.CopyFrom(fn.model)
    _rewrite(model.graph, fn.where, _Names(model.graph))
    return from_onnx(model, weights=fn.weights, where=f"{fn.where} (linearized)",
                     validate=False)


class _Names:
    """Fresh value names that no value of the model uses."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = set()
        self._collect(graph)
        self.count = 0

    def _collect(self, graph: onnx.GraphProto) -> None:
        self.used.update(v.name for v in (*graph.input, *graph.output, *graph.initializer))
        for node in graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            for sub in _subgraphs(node):
                self._collect(sub)

    def fresh(self, stem: str) -> str:
        while True:
            self.count += 1
            name = f"{stem}__linearized_{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append(attr.g)
        found.extend(attr.graphs)
    return found


def _rewrite(graph: onnx.GraphProto, where: str, names: _Names) -> None:
    """Replaces the nodes of ``graph`` (and of its subgraphs) in place."""
    from onnx import helper

    used = {name for node in graph.node for name in node.input}
    used.update(v.name for v in graph.output)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for sub in _subgraphs(node):
            _rewrite(sub, where, names)
        kind = node.op_type if node.domain in ("", "ai.onnx") else ""
        if kind in _IDENTITY:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                          name=node.name))
        elif kind == "Selu":
            gamma = next((a.f for a in node.attribute if a.name == "gamma"), 1.0507010)
            const = names.fresh(node.output[0])
            nodes.append(helper.make_node("Constant", [], [const], value_float=gamma))
            nodes.append(helper.make_node("Mul", [node.input[0], const], [node.output[0]],
                                          name=node.name))
        elif kind == "MaxPool":
            if len(node.output) > 1 and node.output[1] and node.output[1] in used:
                who = repr(node.name) if node.name else f"writing {node.output[0]!r}"
                raise UnsupportedError(
                    f"{where}: node {who} (MaxPool): its indices output {node.output[1]!r} "
                    "is used, so it cannot be replaced by average pooling for expanded "
                    "weights")
            pool = helper.make_node("AveragePool", [node.input[0]], [node.output[0]],
                                    name=node.name, count_include_pad=1)
            pool.attribute.extend(a for a in node.attribute if a.name in _POOL_ATTRS)
            nodes.append(pool)
        elif kind == "GlobalMaxPool":
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]],
                                          [node.output[0]], name=node.name))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


# Which inputs of an operator may depend on the source for the node to stay affine in it;
# None: any (sums, concatenations). Operators not listed are not affine.
_AFFINE_IN: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(("Add", "Sub", "Sum", "Mean", "Concat", "Identity", "Neg"), None),
    **dict.fromkeys(("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Expand",
                     "Tile", "Slice", "Gather", "Split", "Pad", "DepthToSpace",
                     "SpaceToDepth", "Resize", "Upsample", "AveragePool",
                     "GlobalAveragePool", "ReduceMean", "ReduceSum", "CumSum", "Dropout",
                     "Div", "BatchNormalization", "Cast", "CastLike"), (0,)),
    "Where": (1, 2),
}
# Products: affine when at most one input depends on the source.
_PRODUCTS = frozenset({"Mul", "MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose"})
_FLOATS = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def nonaffine_nodes(graph: Graph, source: str, target: str) -> tuple[list[str], bool]:
    """The nodes between ``source`` and ``target`` that are not affine in ``source``.

    Returns:
        (``node 'name' (Op)`` labels of those nodes, whether ``target`` depends on
        ``source`` at all).
    """
    downstream = {source}
    on_path = []
    for node in graph.nodes:
        inner = _reads(node)
        if downstream.intersection(inner):
            downstream.update(o for o in node.outputs if o)
            on_path.append(node)
    if target not in downstream or target == source:
        return [], False
    upstream = {target}
    for node in reversed(graph.nodes):
        if upstream.intersection(node.outputs):
            upstream.update(_reads(node))
    bad = []
    for node in on_path:
        if not upstream.intersection(node.outputs):
            continue
        dependent = [i for i, name in enumerate(node.inputs) if name in downstream]
        if not _affine(node, dependent) or (node.subgraphs() and
                                            downstream.intersection(_reads(node))):
            bad.append(node.label)
    return bad, True


def _reads(node: Node) -> set[str]:
    """Every value a node reads, its subgraphs' outer-scope reads included."""
    reads = {n for n in node.inputs if n}
    for sub in node.subgraphs():
        for inner in sub.walk():
            reads.update(n for n in inner.inputs if n)
    return reads


def _affine(node: Node, dependent: Iterable[int]) -> bool:
    op, attrs, dependent = node.op_type, node.attrs, list(dependent)
    if op in _PRODUCTS:
        return len(dependent) <= 1
    if op not in _AFFINE_IN:
        return False
    if op == "BatchNormalization" and attrs.get("training_mode", 0):
        return False
    if op == "Cast" and attrs.get("to") not in _FLOATS:
        return False
    allowed = _AFFINE_IN[op]
    return allowed is None or all(i in allowed for i in dependent)
