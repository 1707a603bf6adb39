"""The executor as an ``onnx.backend.base.Backend``, for ONNX's conformance test cases.

The class is built on first use (:func:`onnx_backend`), since ``onnx`` may only be
imported inside functions. Graph inputs that fix shapes are found and made static (in
ONNX's node tests, ``Reshape`` targets and ``Slice`` bounds arrive as graph inputs), and
outputs are cast to the dtypes the graph declares (JAX computes 64-bit types in 32 bits
by default).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._function import OnnxFunction, from_onnx

__all__ = ["onnx_backend"]


@functools.cache
def onnx_backend() -> type:
    """The ``onnx.backend.base.Backend`` subclass that runs models with the executor.

    ``prepare(model, jit=False, static_inputs=None, compiler_options=None)`` returns a
    ``BackendRep`` whose ``run(inputs)`` returns numpy arrays. With ``jit=False`` (the
    default) the graph runs op by op, after one abstract trace that reports every error
    before anything is computed; with ``jit=True`` it is compiled whole, with
    ``compiler_options`` passed to XLA.

    Example:
        >>> from onnx import TensorProto, helper
        >>> g = helper.make_graph(
        ...     [helper.make_node("Relu", ["x"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        >>> rep = onnx_backend().prepare(helper.make_model(g))
        >>> rep.run([np.array([-1.0, 2.0], np.float32)])[0].tolist()
        [0.0, 2.0]
    """
    import onnx
    from onnx.backend.base import Backend, BackendRep

    class WeightAtlasBackendRep(BackendRep):
        """A prepared model: runs the executor and returns numpy arrays."""

        def __init__(self, fn: OnnxFunction, jit: bool) -> None:
            self.fn = fn
            self.jit = jit

        def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
            if isinstance(inputs, Mapping):
                args = [inputs[name] for name in self.fn.input_names]
            elif isinstance(inputs, Sequence) and not isinstance(inputs, np.ndarray):
                args = list(inputs)
            else:
                args = [inputs]
            outs = self.fn(*args) if self.jit else self.fn.apply(self.fn.weights, *args)
            return tuple(_as_declared(out, spec.dtype)
                         for out, spec in zip(outs, self.fn.outputs, strict=True))

    class WeightAtlasBackend(Backend):
        """Runs ONNX models through :func:`weightatlas.core.executor.from_onnx`."""

        @classmethod
        def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any
                    ) -> WeightAtlasBackendRep:
            static = kwargs.get("static_inputs")
            fn = from_onnx(model, static_inputs=static, validate=False)
            fn.compiler_options = kwargs.get("compiler_options")
            return WeightAtlasBackendRep(fn, bool(kwargs.get("jit", False)))

        @classmethod
        def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                     outputs_info: Any = None, **kwargs: Any) -> tuple[np.ndarray, ...]:
            from onnx import helper

            arrays = [np.asarray(x) for x in inputs]
            ins = [helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for name, a in zip(node.input, arrays, strict=False) if name]
            outs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
            graph = helper.make_graph([node], "run_node", ins, outs)
            opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            present = [a for name, a in zip(node.input, arrays, strict=False) if name]
            return cls.prepare(model, device).run(present)

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device.upper() in ("CPU", "GPU", "CUDA")

    return WeightAtlasBackend


def _as_declared(value: Any, dtype: np.dtype | None) -> np.ndarray:
    out = np.asarray(value)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)
