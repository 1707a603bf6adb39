"""A live ``torch.nn.Module``: its parameters and persistent buffers, as ``state_dict`` has them.

The module tree is walked the way ``Module.state_dict`` walks it (own parameters,
own persistent buffers, then children, recursively), so the names and their order
are exactly the state dict's, and nothing is copied: each tensor is handed out as a
NumPy view of its memory (``bfloat16`` and ``float8`` through an integer view). The
class of each owning module (through its MRO, so subclasses count) gives the kind.
torch is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weightatlas.adapters._torch_records import Entry, kind_of_module
from weightatlas.errors import UnsupportedError

__all__ = ["module_entries", "tensor_to_numpy"]

_ATTRS = ("groups", "num_heads", "padding_idx", "hidden_size")


def tensor_to_numpy(tensor: Any, name: str) -> np.ndarray:
    """A read-only NumPy view of a CPU tensor (a host copy for other devices).

    Example:
        >>> import torch
        >>> tensor_to_numpy(torch.ones(2, dtype=torch.bfloat16), "w").dtype
        dtype(bfloat16)
    """
    import ml_dtypes
    import torch

    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    plain = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
             torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64}
    lazy = getattr(torch.nn.parameter, "UninitializedTensorMixin", ())
    if isinstance(tensor, lazy):
        raise UnsupportedError(f"tensor {name!r} is not initialised yet (a lazy module); run "
                               "one forward pass first")
    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_meta:
        raise UnsupportedError(f"tensor {name!r} is on the meta device: it has no values")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise UnsupportedError(f"tensor {name!r}: {tensor.layout} / quantized tensors are not "
                               "supported")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in special:
        as_int, dtype = special[t.dtype]
        array = t.view(as_int).numpy().view(dtype)
    elif t.dtype in plain:
        array = t.numpy()
    else:
        raise UnsupportedError(f"tensor {name!r}: dtype {t.dtype} is not supported")
    array = array.view()
    array.flags.writeable = False
    return array


def _class_names(module: Any) -> list[str]:
    return [c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn")]


def module_entries(module: Any) -> list[Entry]:
    """One :class:`Entry` per ``state_dict`` tensor of a live module, in its order."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UnsupportedError(f"expected a torch.nn.Module, got {type(module).__name__}")
    entries: list[Entry] = []

    def walk(m: Any, prefix: str, parent: str | None) -> None:
        mtype = kind_of_module(_class_names(m))
        attrs = {k: getattr(m, k) for k in _ATTRS if isinstance(getattr(m, k, None), int)}
        persistent = [(n, b) for n, b in m._buffers.items()
                      if n not in m._non_persistent_buffers_set]
        for attr, tensor in [*m._parameters.items(), *persistent]:
            if tensor is None:
                continue
            name = f"{prefix}{attr}"

            def load(tensor: Any = tensor, name: str = name) -> np.ndarray:
                return tensor_to_numpy(tensor, name)

            load()  # refuse unusable tensors now, not halfway through a write
            storage = None if tensor.numel() == 0 else (
                tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype))
            entries.append(Entry(name, tuple(int(d) for d in tensor.shape), load, mtype,
                                 parent, dict(attrs), storage))
        for child_name, child in m._modules.items():
            if child is not None:
                walk(child, f"{prefix}{child_name}.", mtype)

    walk(module, "", None)
    return entries
