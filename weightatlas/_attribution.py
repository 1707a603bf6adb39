"""Attributions and weight gradients of stored models (store -> executor), by reference.

``wa.attribute("resnet18@100", x, target=3, method="integrated_gradients")`` opens the
snapshot, runs its attached graph with its stored weights through the executor
(:func:`weightatlas.core.executor.from_snapshot`) and returns an :class:`Attribution`;
``wa.weight_gradients(...)`` writes the weight gradients as a snapshot laid out like the
weights (:func:`weightatlas.core.executor.weight_gradient_snapshot`). Only the package
root and the CLI combine layers; this module is the root's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weightatlas.errors import InputMismatchError, NotFoundError
from weightatlas.storage import Snapshot, Store

if TYPE_CHECKING:
    from weightatlas.core.executor import StoredFunction

__all__ = ["METHODS", "Attribution", "attribute", "stored_function", "weight_gradients"]

#: Attribution methods of :func:`attribute`, and the options each takes.
METHODS: dict[str, tuple[str, ...]] = {
    "saliency": (),
    "gradient": (),
    "gradient_x_input": (),
    "integrated_gradients": ("baseline", "steps", "rule", "internal_batch_size"),
    "smoothgrad": ("samples", "stdev", "seed", "squared", "absolute", "internal_batch_size"),
    "grad_cam": ("layer", "relu", "upsample", "mode"),
    "occlusion": ("window", "strides", "baseline"),
}
#: Short names accepted for ``method``.
ALIASES = {"ig": "integrated_gradients", "integrated-gradients": "integrated_gradients",
           "gradcam": "grad_cam", "grad-cam": "grad_cam", "input_x_gradient": "gradient_x_input",
           "gradient-x-input": "gradient_x_input", "sg": "smoothgrad"}

_LAST: dict[tuple[str, str, str], StoredFunction] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Attribution:
    """An attribution of a stored model's output to its input.

    ``np.asarray(result)`` is :attr:`values`.

    Attributes:
        values: Shaped like the input (``[batch, 1, *layer spatial]`` for Grad-CAM, or
            the input's spatial size with ``upsample``).
        method: The method's full name (``integrated_gradients``...).
        snapshot: The snapshot's reference.
        target: The class index, or one per example.
        options: The method's options, as given.
        layer: For Grad-CAM, the graph value attributed to.
    """

    values: np.ndarray
    method: str
    snapshot: str
    target: Any
    options: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)


def stored_function(snapshot: Snapshot | str | StoredFunction,
                    store: Store | str | os.PathLike[str] | None = None) -> StoredFunction:
    """The executor function of a stored snapshot (a reference ``MODEL[@STEP]`` in
    ``store``), reused while the snapshot stays the same, so that repeated attributions
    compile once.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"],
        ...                                         transB=1)], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 3])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "fc.onnx")
        >>> _ = wa.ingest(tmp / "fc.onnx", store=tmp / "s")
        >>> stored_function("fc", tmp / "s") is stored_function("fc@0", tmp / "s")
        True
    """
    from weightatlas.core.executor import StoredFunction, from_snapshot

    if isinstance(snapshot, StoredFunction):
        return snapshot
    if isinstance(snapshot, Snapshot):
        key = (snapshot.path, str(snapshot.metadata.get("content_digest")),
               str(snapshot.metadata.get("created")))
        with _LOCK:
            found = _LAST.get(key)
        if found is None:
            found = from_snapshot(snapshot)
            with _LOCK:
                _LAST.clear()  # one model at a time: its weights live on the device
                _LAST[key] = found
        return found
    st = store if isinstance(store, Store) else Store(store)
    with st.snapshot(snapshot) as snap:
        return stored_function(snap)


def attribute(snapshot: Snapshot | str | StoredFunction, inputs: Any, target: Any, *,
              method: str = "saliency", store: Store | str | os.PathLike[str] | None = None,
              others: Sequence[Any] = (), output: int = 0, **options: Any) -> Attribution:
    """Attributes a stored model's output ``target`` to its input.

    Args:
        snapshot: A snapshot with a graph, its reference ``MODEL[@STEP]`` in ``store``, or
            a function from :func:`stored_function`.
        inputs: The attributed input, batch first (the model's first input).
        target: A class index, or one per example, of the ``[batch, classes]`` output.
        method: ``saliency`` (absolute input gradient), ``gradient``,
            ``gradient_x_input``, ``integrated_gradients`` (``ig``), ``smoothgrad``,
            ``grad_cam`` or ``occlusion``.
        store: The store holding ``snapshot`` when it is a reference.
        others: The model's other inputs, in graph order.
        output: Which graph output holds the class scores.
        **options: The method's options (:data:`METHODS`): integrated gradients
            ``baseline``, ``steps`` (50), ``rule`` (the quadrature, ``gausslegendre``),
            ``internal_batch_size``; SmoothGrad ``samples``, ``stdev``, ``seed``,
            ``squared``, ``absolute``; Grad-CAM ``layer`` (a stored layer or tensor name,
            or a graph value; required), ``relu``, ``upsample`` (resize the map to the
            input's spatial size, bilinearly as Captum's ``LayerAttribution.interpolate``)
            and ``mode`` (``bilinear`` or ``nearest``); occlusion ``window``, ``strides``,
            ``baseline``.

    Returns:
        The :class:`Attribution`.

    Raises:
        NotFoundError: No such snapshot, or it has no graph; no such Grad-CAM layer.
        InputMismatchError: An unknown method or option, a bad target or input.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.array([[1.0, -2.0]], np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"],
        ...                                         transB=1)], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 2])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 1])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "lin.onnx")
        >>> _ = wa.ingest(tmp / "lin.onnx", store=tmp / "s")
        >>> a = wa.attribute("lin", np.full((1, 2), 3.0, np.float32), 0,
        ...                  method="gradient_x_input", store=tmp / "s")
        >>> a.method, a.values.tolist()
        ('gradient_x_input', [[3.0, -6.0]])
    """
    from weightatlas.core import executor as ex

    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise InputMismatchError(f"attribution method {method!r} is not one of "
                                 f"{', '.join(METHODS)} (or {', '.join(ALIASES)})")
    unknown = sorted(set(options) - set(METHODS[name]))
    if unknown:
        allowed = ", ".join(METHODS[name]) or "none"
        raise InputMismatchError(f"{name} takes no option {unknown[0]!r} (its options: "
                                 f"{allowed})")
    fn = stored_function(snapshot, store)
    x = np.asarray(inputs)
    common: dict[str, Any] = {"others": others, "output": output}
    layer = None
    calls: dict[str, Callable[[], np.ndarray]] = {
        "saliency": lambda: ex.saliency(fn, x, target, **common),
        "gradient": lambda: ex.gradient(fn, x, target, **common),
        "gradient_x_input": lambda: ex.gradient_x_input(fn, x, target, **common),
        "smoothgrad": lambda: ex.smoothgrad(fn, x, target, **options, **common),
        "occlusion": lambda: ex.occlusion(fn, x, target, **options, **common),
    }
    if name == "integrated_gradients":
        ig = {k: v for k, v in options.items() if k != "rule"}
        if "rule" in options:
            ig["method"] = options["rule"]
        values = ex.integrated_gradients(fn, x, target, **ig, **common)
    elif name == "grad_cam":
        if options.get("layer") is None:
            raise InputMismatchError(f"{fn.snapshot_ref}: grad_cam needs a layer (a stored "
                                     "layer such as 'layer4.1.conv2', or a graph value)")
        layer = ex.layer_output(fn, str(options["layer"]))
        values = ex.grad_cam(fn, x, target, layer, relu=bool(options.get("relu", False)),
                             **common)
        if options.get("upsample"):
            values = ex.interpolate(values, x.shape[2:], options.get("mode", "bilinear"))
        elif options.get("mode") is not None:
            raise InputMismatchError(f"{fn.snapshot_ref}: grad_cam mode="
                                     f"{options['mode']!r} resizes the map; it needs "
                                     "upsample=True")
    else:
        values = calls[name]()
    return Attribution(np.asarray(values), name, fn.snapshot_ref, _jsonable(target),
                       dict(options), layer)


def weight_gradients(snapshot: Snapshot | str | StoredFunction, inputs: Any,
                     target: Any = None, *, loss: str | Callable[..., Any] | None = None,
                     store: Store | str | os.PathLike[str] | None = None, output: int = 0,
                     model: str | None = None, step: int | None = None,
                     tag: str | None = None, overwrite: bool = False) -> Snapshot:
    """Writes the weight gradients of a stored model as a snapshot laid out like its weights.

    The gradients of ``MODEL@STEP`` are ``MODEL.grad@STEP`` in the same store (docs:
    *Running stored models* in docs/executor.md); every weight chart draws them.

    Args:
        snapshot: A snapshot with a graph, its reference in ``store``, or a function from
            :func:`stored_function`.
        inputs: All the model's inputs in order, or its one input.
        target: A class index, or one per example.
        loss: ``None`` (the sum of the target scores), ``"cross_entropy"``, or a JAX
            function of the outputs.
        store: The store to read ``snapshot`` from and write the gradients to (default:
            the snapshot's own store when a snapshot or function is given).
        output: Which output ``target`` indexes.
        model, step, tag: Name the gradient snapshot otherwise.
        overwrite: Replace an existing gradient snapshot.

    Example:
        >>> from onnx import helper, numpy_helper
        >>> w = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")
        >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"],
        ...                                         transB=1)], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 3])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2])], [w])
        >>> import onnx; onnx.save(helper.make_model(g), tmp / "fc.onnx")
        >>> _ = wa.ingest(tmp / "fc.onnx", store=tmp / "s", step=7)
        >>> grads = wa.weight_gradients("fc@7", np.ones((1, 3), np.float32), 1,
        ...                             store=tmp / "s")
        >>> grads.ref, grads.read("fc.weight").tolist()
        ('fc.grad@7', [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    """
    from weightatlas.core.executor import StoredFunction, weight_gradient_snapshot

    if store is None and isinstance(snapshot, Snapshot | StoredFunction):
        path = snapshot.path if isinstance(snapshot, Snapshot) else snapshot.snapshot_path
        root = Path(path).parents[2]  # <store>/models/<model>/<file>
        try:
            store = Store(root)
        except NotFoundError:
            raise NotFoundError(f"{path}: this snapshot is not inside a store (no store at "
                                f"{root}); pass store= to say where the gradients go") from None
    st = store if isinstance(store, Store) else Store(store)
    fn = stored_function(snapshot, st)
    return weight_gradient_snapshot(fn, inputs, target, store=st, loss=loss, output=output,
                                    model=model, step=step, tag=tag, overwrite=overwrite)


def _jsonable(target: Any) -> Any:
    found = np.asarray(target)
    return found.tolist() if found.ndim else found.item()
