"""The operator table and the context an operator implementation runs in.

An operator is a plain function ``fn(c: Call, *inputs) -> output | tuple[outputs]``
registered with :func:`op`. Inputs arrive positionally, absent optional inputs as
None. A value is either a ``numpy.ndarray`` -- *static*: known while the graph is
traced (initializers that are not weights, ``Constant`` nodes, shapes and what is
computed from them) -- or a ``jax.Array``/tracer that depends on the inputs or weights.
Operators whose outputs fix a shape (``Reshape`` targets, ``Slice`` bounds, ``Pad``
widths) read those inputs with :meth:`Call.static`, which reports a clear error when
the value depends on the inputs instead of failing deep inside JAX.

Each operator can carry a ``check(node) -> reason | None`` run on every node of a
graph before anything is traced, so that unsupported attribute values are reported up
front, with the node's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from weightatlas.errors import ShapeError

from ._errors import UnsupportedOperatorError
from ._graph import Graph, Node

__all__ = ["OPS", "UNSUPPORTED", "Call", "OpDef", "Tensor", "lookup", "normalize_axes",
           "normalize_axis", "op", "supported_operators"]

#: A value flowing along a graph edge: ``numpy.ndarray`` when static, else a JAX array or
#: tracer. Typed loosely on purpose: operators mix both and JAX's stubs would reject the
#: numpy side.
Tensor: TypeAlias = Any

OpFn: TypeAlias = Callable[..., Any]
Check: TypeAlias = Callable[[Node], "str | None"]
SubgraphRunner: TypeAlias = Callable[[Graph, Mapping[str, Any]], list[Any]]


@dataclass(frozen=True)
class OpDef:
    """A registered operator: its implementation and its up-front attribute check."""

    name: str
    fn: OpFn
    check: Check | None = None
    since: int = 1
    static: tuple[int, ...] = ()  # input positions whose values must be known when tracing
    numpy: bool = False  # the implementation also runs with numpy as ``c.xp`` (for folding)


#: Operator type -> definition, for the default (``ai.onnx``) domain.
OPS: dict[str, OpDef] = {}

#: Operator type -> why the executor does not implement it, for the ones it knows about.
UNSUPPORTED: dict[str, str] = {}


def op(*names: str, check: Check | None = None, since: int = 1, static: tuple[int, ...] = (),
       numpy: bool = False) -> Callable[[OpFn], OpFn]:
    """Registers ``fn`` as the implementation of the operators ``names``.

    ``static`` lists the input positions read with :meth:`Call.static` (shape targets,
    axes, bounds), which :func:`~._interpret.static_names` traces back to graph inputs.
    ``numpy`` says that ``fn`` computes with ``c.xp`` only, so that static values can be
    folded with numpy (exact 64-bit integers, no XLA compilation).
    """

    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = OpDef(name, fn, check, since, static, numpy)
        return fn

    return register


def supported_operators() -> list[str]:
    """The operator types the executor implements (default ONNX domain), sorted.

    Example:
        >>> from weightatlas.core.executor import supported_operators
        >>> {"Conv", "LSTM", "Resize"} <= set(supported_operators())
        True
    """
    from . import _interpret  # noqa: F401  (imports every operator module)

    return sorted(OPS)


def lookup(node: Node, where: str) -> OpDef:
    """The definition for ``node``, after its attribute check; raises if it has none."""
    if node.domain:
        raise UnsupportedOperatorError(
            f"{where}: {node.label}: operator domain {node.domain!r} is not supported; "
            "the executor implements the default ONNX domain only")
    found = OPS.get(node.op_type)
    if found is None and node.op_type in UNSUPPORTED:
        raise UnsupportedOperatorError(f"{where}: {node.label}: {UNSUPPORTED[node.op_type]}")
    if found is None:
        raise UnsupportedOperatorError(
            f"{where}: {node.label}: operator {node.op_type!r} is not supported by the "
            "executor (docs/executor.md lists the operators it covers)")
    if node.opset < found.since:
        raise UnsupportedOperatorError(
            f"{where}: {node.label}: {node.op_type} at opset {node.opset} is not supported "
            f"(the executor implements it from opset {found.since})")
    if found.check is not None:
        reason = found.check(node)
        if reason:
            raise UnsupportedOperatorError(f"{where}: {node.label}: {reason}")
    return found


class Call:
    """What an operator sees of the node it computes: attributes, opset, subgraphs."""

    __slots__ = ("env", "node", "run_subgraph", "where", "xp")

    def __init__(self, node: Node, env: Mapping[str, Any], where: str,
                 run_subgraph: SubgraphRunner, xp: Any = None) -> None:
        self.node = node
        self.env = env
        self.where = where
        self.run_subgraph = run_subgraph
        if xp is None:
            import jax.numpy as xp
        #: The array namespace to compute with: ``jax.numpy``, or ``numpy`` while folding.
        self.xp = xp

    @property
    def folding(self) -> bool:
        """Whether the node is being computed with numpy, on static values."""
        return self.xp is np

    def dtype(self, dtype: Any) -> np.dtype:
        """``dtype`` as computed: exact with numpy, JAX's canonical type otherwise."""
        if self.folding:
            return np.dtype(dtype)
        import jax

        return np.dtype(jax.dtypes.canonicalize_dtype(dtype))

    @property
    def opset(self) -> int:
        """The default-domain opset version of the model."""
        return self.node.opset

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute's decoded value, or ``default`` when the node does not set it."""
        return self.node.attrs.get(name, default)

    def has(self, name: str) -> bool:
        """Whether the node sets attribute ``name``."""
        return name in self.node.attrs

    def static(self, value: Tensor, what: str) -> np.ndarray:
        """``value`` as a numpy array, known at trace time; raises if it depends on inputs.

        Args:
            value: An operator input.
            what: What the value is, for the message (``"the target shape"``).
        """
        if isinstance(value, np.ndarray):
            return value
        import jax

        try:
            return np.asarray(value)
        except (jax.errors.TracerArrayConversionError,
                jax.errors.ConcretizationTypeError) as e:
            raise ShapeError(
                f"{self.where}: {self.node.label}: {what} depends on the values of the "
                "graph inputs or weights, so the output shape cannot be resolved when the "
                "graph is traced; pass that input as a static input (static_inputs=...) or "
                "fold it into a constant") from e

    def static_ints(self, value: Tensor, what: str) -> list[int]:
        """A static integer tensor as a flat list of Python ints."""
        arr = self.static(value, what)
        return [int(v) for v in np.asarray(arr).reshape(-1)]

    def fail(self, reason: str) -> UnsupportedOperatorError:
        """An error naming this node, for a case found only while tracing."""
        return UnsupportedOperatorError(f"{self.where}: {self.node.label}: {reason}")

    def shape_error(self, reason: str) -> ShapeError:
        """A shape error naming this node."""
        return ShapeError(f"{self.where}: {self.node.label}: {reason}")

    def run(self, graph: Graph) -> list[Tensor]:
        """Runs a subgraph of this node (an ``If`` branch) in the current scope."""
        return self.run_subgraph(graph, self.env)


def normalize_axis(c: Call, axis: int, rank: int) -> int:
    """A possibly negative axis in ``[-rank, rank)`` as a non-negative one."""
    if not -rank <= axis < rank:
        raise c.shape_error(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def normalize_axes(c: Call, axes: Sequence[int], rank: int) -> list[int]:
    """Several axes, normalized; raises on a repeated axis."""
    out = [normalize_axis(c, int(a), rank) for a in axes]
    if len(set(out)) != len(out):
        raise c.shape_error(f"axes {list(axes)} repeat an axis")
    return out
