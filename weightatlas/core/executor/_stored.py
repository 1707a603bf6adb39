"""A stored snapshot as an executor function: its attached graph, its tensors as weights.

:func:`from_snapshot` reads the snapshot's ``graph.onnx`` attachment (never a weight
byte: stored tensors are references there) and rewrites it so that every tensor the
model computes with is a graph initializer whose value is the stored tensor, read once
with ``layout="source"`` (a view of the memory-mapped snapshot) and passed to the
executor as a weight. Two conventions are read:

- **The ONNX adapter's** (table ``weightatlas.graph``): initializers refer to their
  snapshot tensor by ``location = weightatlas:<name>``. Rewrites, all in the main graph:
  a *folded* weight (stored as computed from a ``DequantizeLinear``, ``Cast``,
  ``Transpose``... of constants) becomes an initializer named by the graph value it was
  computed as, and the nodes that computed it are dropped, so the executor computes with
  the stored folded tensor and differentiates with respect to it (the quantized
  originals, scales and ``_source`` tensors it was computed from are then unused and
  are not read); a ``Constant`` node holding a stored tensor becomes an initializer
  named by its output (so it is a weight, not a folded constant); a sparse initializer
  becomes the dense stored tensor. Stored tensors inside subgraphs, and tensors the
  store keeps as packed bytes (int4, float8 fnuz...), are written back into the graph
  (a copy, as :func:`~weightatlas.core.load_model` does): the executor folds them.
- **The PyTorch adapter's** (``weightatlas.weights``): initializers whose values were
  cleared take the snapshot tensor whose ``source_name`` is their name. A fused
  ``in_proj_weight``/``in_proj_bias``, stored split into ``q_proj``, ``k_proj`` and
  ``v_proj``, becomes a ``Concat`` of three initializers named by the stored tensors,
  so each part is a weight of its own.

``fn.tensor_of`` maps each executor weight (or integer constant) to its stored tensor,
``fn.weight_of`` the other way; both are one to one.
"""

from __future__ import annotations

import difflib
from typing import Any

from weightatlas.core._onnx_model import GRAPH_ATTACHMENT
from weightatlas.errors import IntegrityError, NotFoundError
from weightatlas.storage import Snapshot

from ._function import OnnxFunction
from ._graph import parse_model
from ._interpret import check_graph
from ._stored_graph import location, read_graph, rewrite

__all__ = ["StoredFunction", "from_snapshot", "layer_output"]

_ROW_COLUMNS = ["name", "source_name", "kind", "dtype", "shape", "layout", "source_layout",
                "source_shape", "module", "param", "attrs"]


class StoredFunction(OnnxFunction):
    """An :class:`OnnxFunction` made from a stored snapshot (see :func:`from_snapshot`).

    Attributes:
        snapshot_ref: The snapshot's reference (``resnet18@100``).
        snapshot_path: Its file.
        convention: ``"onnx"`` (ingested from an ONNX file) or ``"torch"`` (a live module
            exported with its example inputs).
        tensor_of: Executor weight or constant name -> stored tensor name.
        weight_of: Stored tensor name -> executor weight or constant name.
        rows: The stored description of each tensor in ``weight_of``, in the snapshot's
            order (name, source_name, kind, dtype, shape, layout, source_layout,
            source_shape, module, param, attrs as JSON).
        framework: The snapshot's framework.
        snapshot_id: Its ``(model, step, tag)``.
        snapshot_names: Every tensor it holds, in order (some may have no weight).
    """

    snapshot_ref: str
    snapshot_path: str
    convention: str
    tensor_of: dict[str, str]
    weight_of: dict[str, str]
    rows: dict[str, dict[str, Any]]
    framework: str
    snapshot_id: tuple[str, int | None, str | None]
    snapshot_names: list[str]

    def __repr__(self) -> str:
        return (f"StoredFunction({self.snapshot_ref!r}, inputs={list(self.input_names)}, "
                f"weights={len(self.weights)}, nodes={len(self.graph.nodes)})")


def from_snapshot(snapshot: Snapshot, *, validate: bool = True) -> StoredFunction:
    """The executor function of a stored model: its attached graph, its stored weights.

    Args:
        snapshot: A snapshot with a ``graph.onnx`` attachment (ingested from ONNX, or from
            a live PyTorch module with ``example_inputs``).
        validate: Trace the graph abstractly now (when input shapes are fixed), so that
            shape errors surface here.

    Returns:
        The function; ``fn.weights`` are views of the snapshot's tensors.

    Raises:
        NotFoundError: The snapshot has no graph (safetensors, JAX, a checkpoint file).
        IntegrityError: The attachment is damaged, or refers to a tensor the snapshot does
            not hold.
        UnsupportedOperatorError: The graph uses an operator the executor does not cover.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.array([[1.0, 2.0]], np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"],
        ...                                         transB=1)], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 2])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 1])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "fc.onnx")
        >>> fn = from_snapshot(wa.ingest(tmp / "fc.onnx", store=store))
        >>> fn.tensor_of, np.asarray(fn(np.ones((1, 2), np.float32))[0]).tolist()
        ({'fc.weight': 'fc.weight'}, [[3.0]])
    """
    model, convention, table = read_graph(snapshot)
    rows = {r["name"]: r for r in snapshot.tensors().select(_ROW_COLUMNS).to_pylist()}
    where = snapshot.ref
    rewrite(model, convention, table, rows, snapshot)
    weights: dict[str, Any] = {}
    tensor_of: dict[str, str] = {}
    for t in model.graph.initializer:
        name = location(t)
        if name is None:
            continue
        if name not in rows:
            raise IntegrityError(f"{snapshot.path}: {GRAPH_ATTACHMENT} of {where} refers to "
                                 f"tensor {name!r} (initializer {t.name!r}), which the "
                                 f"snapshot does not hold; re-ingest the model")
        weights[t.name] = snapshot.read(name, layout="source")
        tensor_of[t.name] = name
    graph, opset = parse_model(model, where=where)
    check_graph(graph, where)
    fn = StoredFunction(graph, opset, weights, None, where, validate=validate, model=model)
    fn.snapshot_ref = where
    fn.snapshot_path = snapshot.path
    fn.convention = convention
    fn.tensor_of = tensor_of
    fn.weight_of = {v: k for k, v in tensor_of.items()}
    fn.rows = {n: row for n, row in rows.items() if n in fn.weight_of}
    fn.snapshot_id = (snapshot.model, snapshot.step, snapshot.tag)
    fn.snapshot_names = list(rows)
    fn.framework = str(snapshot.metadata.get("framework", ""))
    return fn


# ---- layers ----------------------------------------------------------------------------


def layer_output(fn: StoredFunction, layer: str) -> str:
    """The activation of a stored layer: the output of the node that computes with it.

    ``layer`` is a stored tensor (``layer1.0.conv2.weight``), a module (``layer1.0.conv2``:
    its ``weight`` or Flax ``kernel``, else its first tensor) or already a value of the
    graph. Operators that only prepare the weight (``Transpose``, ``Concat`` of q/k/v,
    ``DequantizeLinear``...) are followed to the first node that also reads the graph
    inputs.

    Raises:
        NotFoundError: No such tensor, module or value; the message lists close names.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")
        >>> g = helper.make_graph(
        ...     [helper.make_node("Transpose", ["fc.weight"], ["wt"], perm=[1, 0]),
        ...      helper.make_node("MatMul", ["x", "wt"], ["h"]),
        ...      helper.make_node("Relu", ["h"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 3])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "t.onnx")
        >>> fn = from_snapshot(wa.ingest(tmp / "t.onnx", store=store))
        >>> layer_output(fn, "fc"), layer_output(fn, "fc.weight")
        ('h', 'h')
    """
    tensor = None
    if layer in fn.weight_of:
        tensor = layer
    else:
        members = [n for n in fn.weight_of if n.rpartition(".")[0] == layer]
        if members:
            tensor = next((n for n in members if n.rpartition(".")[2] in ("weight", "kernel")),
                          members[0])
    if tensor is not None:
        return _consumer(fn, fn.weight_of[tensor], tensor)
    if layer in set(fn.value_names()) - set(fn.weights) - set(fn.constants):
        return layer
    modules = {n.rpartition(".")[0] for n in fn.weight_of} - {""}
    close = difflib.get_close_matches(layer, [*modules, *fn.weight_of], n=5)
    hint = f"; close names: {', '.join(map(repr, close))}" if close else \
        f"; its layers include {', '.join(map(repr, sorted(modules)[:5]))}"
    raise NotFoundError(f"{fn.snapshot_ref}: no layer, stored tensor or graph value named "
                        f"{layer!r}{hint}")


def _consumer(fn: StoredFunction, weight: str, tensor: str) -> str:
    """The first output of the first node reading ``weight`` (or values made from weights
    alone) together with something computed from the graph inputs."""
    fixed = set(fn.weights) | set(fn.constants)
    derived = {weight}
    for node in fn.graph.nodes:
        if not derived.intersection(node.inputs):
            if all(not i or i in fixed for i in node.inputs) and not node.subgraphs():
                fixed.update(o for o in node.outputs if o)
            continue
        if all(not i or i in fixed or i in derived for i in node.inputs) and \
                not node.subgraphs():
            derived.update(o for o in node.outputs if o)
            fixed.update(o for o in node.outputs if o)
            continue
        return str(node.outputs[0])
    raise NotFoundError(f"{fn.snapshot_ref}: no node computes with stored tensor {tensor!r} "
                        f"(executor weight {weight!r}) and the graph inputs")
