"""A live module's graph, exported to ONNX and attached to its snapshot without its weights.

``torch.onnx.export`` (the TorchScript-based exporter, which keeps parameter names)
traces the module on the example inputs. Every initializer named like a state-dict
tensor has its values cleared (dims and type stay): its values are the snapshot's
tensor whose ``source_name`` is that name (``to_state_dict`` gives them back in that
layout, fused q/k/v rebuilt). Initializers the exporter made itself (folded constants,
shape tensors) keep their values. The graph of a model is the same at every training
step, so all its snapshots share one stored blob.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from weightatlas.errors import UnsupportedError

__all__ = ["export_graph"]


def export_graph(module: Any, example_inputs: tuple[Any, ...], names: list[str]) -> bytes:
    """The module's ONNX graph with the values of its state-dict initializers removed."""
    import onnx
    import torch

    buf = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # Tracing warns about Python control flow it froze (data-dependent
            # branches in nn.TransformerEncoderLayer's fast path): not the user's error.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            sink: Any = buf
            # keep_initializers_as_inputs=True turns off the exporter's pass that merges
            # initializers with equal values (fresh biases, batch-norm scales of 1) into
            # one, which would give several parameters one stored tensor and one gradient.
            # The extra graph inputs it adds are removed below.
            torch.onnx.export(module, tuple(example_inputs), sink, dynamo=False,
                              do_constant_folding=False, keep_initializers_as_inputs=True)
    except Exception as e:  # the exporter raises many types for unsupported modules
        raise UnsupportedError(f"{type(module).__name__}: cannot export the graph to ONNX: "
                               f"{type(e).__name__}: {str(e)[:300]}") from e
    finally:
        module.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    wanted = set(names)
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data"):
                tensor.ClearField(field)
    meta = model.metadata_props.add()
    meta.key = "weightatlas.weights"
    meta.value = "initializer values cleared; read each from the snapshot tensor whose " \
                 "source_name is the initializer's name"
    return bytes(model.SerializeToString())
