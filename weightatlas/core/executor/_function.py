"""An ONNX graph as a pure JAX function of its inputs and weights.

:func:`from_onnx` parses and checks the whole graph up front (every operator, every
attribute, every weight) and returns an :class:`OnnxFunction`. Its
:meth:`~OnnxFunction.apply` is pure: ``apply(weights, *inputs) -> outputs``, so
``jax.jit``, ``jax.grad`` (with respect to inputs or weights) and ``jax.vmap`` apply to
it directly, and the program it traces holds only the operators' JAX calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import UnsupportedError

from ._bind import (
    abstract,
    abstract_of,
    check_value,
    dynamic,
    split_weights,
    suggest,
    traced,
)
from ._errors import InputMismatchError
from ._graph import Graph, ValueSpec, parse_model
from ._interpret import check_graph, run_graph, static_names
from ._ops_quant import jax_dtype

if TYPE_CHECKING:
    import onnx

__all__ = ["OnnxFunction", "from_onnx"]


def from_onnx(model: onnx.ModelProto | str | os.PathLike[str],
              weights: Mapping[str, Any] | None = None, *,
              static_inputs: Iterable[str] | None = None, where: str | None = None,
              validate: bool = True) -> OnnxFunction:
    """Turns an ONNX model into a pure JAX function of its inputs and weights.

    Floating-point initializers become *weights*: arguments of
    :meth:`OnnxFunction.apply`, differentiable and replaceable. Integer and boolean
    initializers are *constants*, folded while tracing (shape targets, indices).

    Args:
        model: The model, or the path of an ``.onnx`` file. External data files are
            never opened: tensors stored there must be given in ``weights``.
        weights: Values that replace initializers, or give graph inputs that hold
            weights in models where weights are inputs, by name.
        static_inputs: Graph inputs whose values fix shapes (a ``Reshape`` target given
            as an input); they must be concrete arrays at every call, and ``__call__``
            compiles once per distinct value. None (the default) finds them: the inputs
            that feed, directly or through other operators, an operator input that fixes
            a shape or selects an ``If`` branch.
        where: How error messages name the model (defaults to the file name or graph name).
        validate: Trace the graph abstractly now (when all input shapes are fixed), so
            that shape errors surface here rather than at the first call.

    Returns:
        The function.

    Raises:
        UnsupportedOperatorError: An operator, attribute or control flow is not covered.
        ShapeError: A weight has the wrong shape, or the graph's shapes do not resolve.
        InputMismatchError: A weight name is unknown or its dtype is wrong.
        FormatError: The model is malformed (a value used before it is defined).

    Example:
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), "w")
        >>> g = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
        >>> fn = from_onnx(helper.make_model(g))
        >>> fn.input_names, sorted(fn.weights)
        (('x',), ['w'])
        >>> np.asarray(fn(np.ones((1, 3), np.float32))[0]).tolist()
        [[1.5, 1.5]]
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        path = os.fspath(model)
        where = where or os.path.basename(path)
        try:
            model = onnx.load(path, load_external_data=False)
        except OSError as e:
            raise InputMismatchError(f"{path}: cannot be read: {e}") from e
        except Exception as e:  # protobuf's DecodeError has no common base to name
            raise UnsupportedError(f"{path}: is not an ONNX model: {e}") from e
    where = where or (model.graph.name or "model")
    graph, opset = parse_model(model, where=where)
    check_graph(graph, where)
    static = None if static_inputs is None else frozenset(static_inputs)
    return OnnxFunction(graph, opset, dict(weights or {}), static, where, validate=validate,
                        model=model)


class OnnxFunction:
    """A parsed ONNX graph as ``apply(weights, *inputs) -> tuple of outputs``.

    Attributes:
        graph: The parsed graph.
        opset: The model's default-domain opset version.
        weights: Floating-point tensors, by name: the differentiable arguments.
        constants: Integer and boolean initializers, folded while tracing.
        inputs: Specs of the function's inputs (graph inputs that are not weights).
        outputs: Specs of the graph outputs.
        static_inputs: Names of the inputs read at trace time.
        compiler_options: XLA options for :meth:`__call__`'s compilations (None: defaults).
        model: The ONNX model the function was made from (for onnxruntime-based methods).
    """

    def __init__(self, graph: Graph, opset: int, overrides: dict[str, Any],
                 static_inputs: frozenset[str] | None, where: str, *, validate: bool = True,
                 compiler_options: dict[str, Any] | None = None,
                 model: onnx.ModelProto | None = None) -> None:
        self.model = model
        self.graph = graph
        self.opset = opset
        self.where = where
        self.weights, self.constants = split_weights(graph, overrides, where)
        held = set(self.weights) | set(self.constants)
        self.inputs: tuple[ValueSpec, ...] = tuple(v for v in graph.inputs
                                                   if v.name not in held)
        self.outputs: tuple[ValueSpec, ...] = graph.outputs
        for spec in (*self.inputs, *self.outputs):
            if spec.kind != "tensor":
                raise UnsupportedError(f"{where}: graph value {spec.name!r} is of {spec.kind} "
                                       "type; the executor handles tensors only")
        if static_inputs is None:
            static_inputs = frozenset(static_names(graph) & set(self.input_names))
        unknown = sorted(set(static_inputs) - set(self.input_names))
        if unknown:
            raise InputMismatchError(f"{where}: static input {unknown[0]!r} is not a graph "
                                     f"input (inputs: {list(self.input_names)})")
        self.static_inputs = static_inputs
        self.compiler_options = compiler_options
        self._checked: set[Any] = set()
        self._jitted: dict[Any, Any] = {}
        self._on_device: tuple[Any, dict[str, Any]] = ((), {})
        fixed = all(s.shape is not None and all(isinstance(d, int) for d in s.shape)
                    and s.dtype is not None for s in self.inputs)
        if validate and fixed and not static_inputs:
            self.eval_shape(*(abstract(s) for s in self.inputs))

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the function's inputs, in the order :meth:`apply` takes them."""
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the graph outputs, in the order :meth:`apply` returns them."""
        return tuple(s.name for s in self.outputs)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.describe()}" for s in self.inputs)
        return (f"OnnxFunction({self.where!r}, inputs=({ins}), weights={len(self.weights)}, "
                f"nodes={len(self.graph.nodes)})")

    def apply(self, weights: Mapping[str, Any], *inputs: Any) -> tuple[Any, ...]:
        """Computes the graph outputs; pure, so ``jit``, ``grad`` and ``vmap`` apply.

        Args:
            weights: Values for (some of) :attr:`weights`, by name; missing ones take
                the model's values as constants. Pass ``fn.weights`` for all of them.
            *inputs: One array per entry of :attr:`inputs`, in order.

        Returns:
            The outputs, in the order of :attr:`output_names`.

        Raises:
            InputMismatchError: Wrong number of inputs, unknown weight, wrong dtype.
            ShapeError: An input or weight has the wrong shape, or a shape does not
                resolve; raised while tracing, before anything is computed.

        Example:
            >>> import jax
            >>> from onnx import TensorProto, helper, numpy_helper
            >>> w = numpy_helper.from_array(np.array([2.0], np.float32), "w")
            >>> g = helper.make_graph(
            ...     [helper.make_node("Mul", ["x", "w"], ["y"])], "g",
            ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
            >>> fn = from_onnx(helper.make_model(g))
            >>> x = np.array([3.0], np.float32)
            >>> grad = jax.grad(lambda w: fn.apply(w, x)[0].sum())(fn.weights)
            >>> float(grad["w"][0])
            3.0
        """
        env = self._bind(weights, inputs)
        if not any(traced(v) for v in env.values()):
            self._precheck(weights, inputs)
        return tuple(run_graph(self.graph, env, self.where))

    def apply_with(self, weights: Mapping[str, Any], *inputs: Any,
                   add: Mapping[str, Any] | None = None, read: Iterable[str] = ()
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """:meth:`apply`, with values added to named activations and others read out.

        The gradient with respect to a zero ``add[name]`` is the gradient with respect to
        the activation ``name`` (Grad-CAM, expanded weights); ``read`` returns
        intermediate values. Pure, like :meth:`apply`.

        Returns:
            (the outputs, the values named in ``read``).

        Raises:
            InputMismatchError: A name in ``add`` or ``read`` is not a value of the graph.
        """
        read = list(read)
        known = self.value_names()
        for name in [*(add or {}), *read]:
            if name not in known:
                raise InputMismatchError(f"{self.where}: the graph has no value named "
                                         f"{name!r}{suggest(name, known)}")
        values: dict[str, Any] = dict.fromkeys(read)
        outs = run_graph(self.graph, self._bind(weights, inputs), self.where, add=add,
                         read=values)
        return tuple(outs), values

    def value_names(self) -> list[str]:
        """Names of the graph's inputs, weights and node outputs, in graph order."""
        names = [*self.input_names, *self.weights, *self.constants]
        names += [out for node in self.graph.nodes for out in node.outputs if out]
        return names

    def output_of(self, tensor: str) -> str:
        """The first output of the first node that reads ``tensor`` (a weight's layer).

        ``fn.output_of("features.8.weight")`` names the activation of the convolution
        whose kernel that is: a Grad-CAM layer chosen by its weights' name.
        """
        for node in self.graph.nodes:
            if tensor in node.inputs:
                return node.outputs[0]
        raise InputMismatchError(f"{self.where}: no node reads {tensor!r}"
                                 f"{suggest(tensor, self.value_names())}")

    def _apply_traced(self, weights: Mapping[str, Any], *inputs: Any) -> tuple[Any, ...]:
        """:meth:`apply` without the eager pre-check (called while tracing)."""
        return tuple(run_graph(self.graph, self._bind(weights, inputs), self.where))

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        """Runs the graph with its own weights, compiled with ``jax.jit``.

        One compilation per input signature (shapes, dtypes and the values of static
        inputs) is cached; :attr:`compiler_options` are passed to XLA.
        """
        import jax

        self._bind({}, inputs)
        fixed, dynamic = self._split_static(inputs)
        key = (tuple((i, v.dtype.str, v.shape, v.tobytes()) for i, v in fixed.items()),
               tuple((np.shape(x), str(x.dtype)) for x in dynamic))
        compiled = self._jitted.get(key)
        weights = self.device_weights()
        if compiled is None:
            lowered = jax.jit(self._closed(fixed)).lower(weights, dynamic)
            compiled = lowered.compile(compiler_options=self.compiler_options)
            self._jitted[key] = compiled
        return tuple(compiled(weights, dynamic))

    def device_weights(self) -> dict[str, Any]:
        """:attr:`weights` as JAX arrays, transferred once (again if an entry is replaced)."""
        import jax

        # The cache holds the arrays it was made from, so their ids cannot be reused.
        held = tuple(self.weights.items())
        if [(k, id(v)) for k, v in self._on_device[0]] != [(k, id(v)) for k, v in held]:
            self._on_device = (held, jax.device_put(dict(held)))
        return dict(self._on_device[1])

    def eval_shape(self, *inputs: Any) -> tuple[Any, ...]:
        """Output shapes and dtypes (``jax.ShapeDtypeStruct``) for inputs or their specs.

        Traces the graph abstractly: nothing is computed, and every shape error
        surfaces, naming its node. Static inputs must be given as arrays.
        """
        import jax

        fixed, dynamic = self._split_static(inputs)
        weights = {k: jax.ShapeDtypeStruct(v.shape, jax_dtype(v.dtype))
                   for k, v in self.weights.items()}
        return tuple(jax.eval_shape(self._closed(fixed), weights,
                                    tuple(abstract_of(x) for x in dynamic)))

    # Binding and checks

    def _split_static(self, inputs: tuple[Any, ...]
                      ) -> tuple[dict[int, np.ndarray], tuple[Any, ...]]:
        """(static inputs by position as numpy arrays, the other inputs in order)."""
        if len(inputs) != len(self.inputs):
            raise InputMismatchError(
                f"{self.where}: expects {len(self.inputs)} inputs {list(self.input_names)}, "
                f"got {len(inputs)}")
        fixed = {i: np.asarray(x) for i, (x, s) in enumerate(zip(inputs, self.inputs,
                                                                    strict=True))
                 if s.name in self.static_inputs}
        return fixed, tuple(x for i, x in enumerate(inputs) if i not in fixed)

    def _closed(self, fixed: dict[int, np.ndarray]) -> Any:
        """``run(weights, dynamic_inputs)`` with the static inputs closed over."""

        def run(weights: Mapping[str, Any], dynamic: tuple[Any, ...]) -> tuple[Any, ...]:
            it = iter(dynamic)
            full = [fixed[i] if i in fixed else next(it) for i in range(len(self.inputs))]
            return self._apply_traced(weights, *full)

        return run

    def _precheck(self, weights: Mapping[str, Any], inputs: tuple[Any, ...]) -> None:
        """Before an eager call, trace once abstractly so errors come before compute."""
        import jax

        fixed, dynamic = self._split_static(inputs)
        key = (tuple((k, np.shape(v), str(v.dtype)) for k, v in sorted(weights.items())),
               tuple((np.shape(x), str(x.dtype)) for x in dynamic),
               tuple((i, v.tobytes()) for i, v in fixed.items()))
        if key in self._checked:
            return
        jax.eval_shape(self._closed(fixed), {k: abstract_of(v) for k, v in weights.items()},
                       tuple(abstract_of(x) for x in dynamic))
        self._checked.add(key)

    def _bind(self, weights: Mapping[str, Any], inputs: tuple[Any, ...]) -> dict[str, Any]:
        if len(inputs) != len(self.inputs):
            raise InputMismatchError(
                f"{self.where}: expects {len(self.inputs)} inputs {list(self.input_names)}, "
                f"got {len(inputs)}")
        env: dict[str, Any] = dict(self.constants)
        env.update(self.weights)
        for name, value in weights.items():
            known = self.weights.get(name)
            if known is None:
                raise InputMismatchError(self._unknown_weight(name))
            check_value(self.where, f"weight {name!r}",
                         ValueSpec(name, known.dtype, known.shape), value)
            env[name] = dynamic(value)
        dims: dict[str, int] = {}
        for spec, value in zip(self.inputs, inputs, strict=True):
            if not hasattr(value, "dtype"):
                value = np.asarray(value, dtype=spec.dtype)
            check_value(self.where, f"input {spec.name!r}", spec, value, dims)
            if spec.name in self.static_inputs:
                if traced(value):
                    raise InputMismatchError(
                        f"{self.where}: input {spec.name!r} is static (it fixes shapes) and "
                        "must be a concrete array, not a traced value; close over it "
                        "instead of passing it through jit/vmap")
                value = np.asarray(value)
            else:
                value = dynamic(value)
            env[spec.name] = value
        return env

    def _unknown_weight(self, name: str) -> str:
        if name in self.constants:
            return (f"{self.where}: {name!r} is an integer constant read while tracing, not "
                    "a weight; give its value to from_onnx(weights=...) instead")
        return f"{self.where}: no weight named {name!r}{suggest(name, self.weights)}"
