"""What a PyTorch checkpoint file holds, found without running it.

Two kinds of zip archive are read (see :mod:`._torch_zip` and :mod:`._torch_pickle`):

- **``torch.save`` checkpoints**: a state dict (``{name: tensor}``), or a wrapper holding
  one under ``state_dict``, ``model``, ``model_state_dict``, ``module`` or
  ``state_dict_ema`` (training checkpoints: the optimizer state beside it is not read;
  the wrapper's other keys and its number/string values go into the metadata). Nested
  dicts of tensors are flattened with ``.``. A non-tensor value inside the state dict
  is an error, never skipped silently.
- **TorchScript archives** (``torch.jit.save``): the pickled module tree, whose
  classes are TorchScript definitions. Each module's ``__parameters__`` and
  ``__buffers__`` lists are read from its class's code (``code/__torch__/...py``, text
  that is parsed, never run) and its tensors are taken in that order, submodules after,
  exactly as ``state_dict()`` orders them; a module's class (``Conv2d``...) gives the
  kind. Constants (``constants.pkl``) and code are not weights and are not read.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from weightatlas.adapters._torch_pickle import ScriptObject, StorageRef, TensorRef, load
from weightatlas.adapters._torch_records import Entry, kind_of_module
from weightatlas.adapters._torch_zip import Archive
from weightatlas.errors import FormatError, UnsupportedError

__all__ = ["WRAPPER_KEYS", "read_entries"]

#: Keys under which training checkpoints keep the model's state dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema")
_CLASS = re.compile(r"^class (\w+)\(", re.M)
_LIST = re.compile(r"^\s+(__parameters__|__buffers__) = \[(.*?)\]", re.M)
_MAX_DEPTH = 100


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, TensorRef | dict) for v in value.values())


def _choose(top: Any, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pick the state dict out of what the pickle holds; return (state, facts)."""
    if isinstance(top, ScriptObject):
        raise UnsupportedError(f"{label}: holds a pickled module object; save its state_dict()")
    if not isinstance(top, dict):
        raise FormatError(f"{label}: holds a {type(top).__name__}, expected a dict of tensors "
                          f"(a state dict) or a dict with one under {WRAPPER_KEYS[:2]}")
    tensors = [k for k, v in top.items() if isinstance(v, TensorRef)]
    facts: dict[str, Any] = {}
    if tensors:
        return top, facts
    for key in WRAPPER_KEYS:
        if key in top and isinstance(top[key], dict):
            facts["wrapper_key"] = key
            facts["other_keys"] = [str(k) for k in top if k != key]
            facts["values"] = {str(k): v for k, v in top.items()
                               if isinstance(v, int | float | str | bool) and k != key}
            return top[key], facts
    if _is_state(top):
        return top, facts
    keys = ", ".join(repr(k) for k in list(top)[:8])
    raise FormatError(f"{label}: no state dict found: no tensor at the top level and none of "
                      f"the keys {list(WRAPPER_KEYS)} holds a dict (keys: {keys})")


def _flatten(state: dict[Any, Any], label: str, prefix: str = "",
             out: list[tuple[str, TensorRef]] | None = None, depth: int = 0
             ) -> list[tuple[str, TensorRef]]:
    out = [] if out is None else out
    if depth > _MAX_DEPTH:
        raise FormatError(f"{label}: state dict nested more than {_MAX_DEPTH} levels")
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise FormatError(f"{label}: state dict key {key!r:.60} is not a non-empty string")
        name = f"{prefix}{key}"
        if isinstance(value, TensorRef):
            out.append((name, value))
        elif isinstance(value, dict):
            _flatten(value, label, f"{name}.", out, depth + 1)
        else:
            raise FormatError(
                f"{label}: entry {name!r} is a {type(value).__name__}, not a tensor; a state "
                "dict must hold only tensors (a checkpoint with other objects is not read)"
            )
    return out


def _script_lists(archive: Archive) -> dict[str, tuple[list[str], list[str]]]:
    """Class qualname -> (__parameters__, __buffers__), from the archive's code files."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for rel in archive.names("code/"):
        if not rel.endswith(".py"):
            continue
        module = rel[len("code/"):-3].replace("/", ".")
        text = archive.read(rel, 64 << 20).decode("utf-8", "replace")
        classes = list(_CLASS.finditer(text))
        for i, m in enumerate(classes):
            end = classes[i + 1].start() if i + 1 < len(classes) else len(text)
            body = text[m.end():end]
            lists: dict[str, list[str]] = {"__parameters__": [], "__buffers__": []}
            for lm in _LIST.finditer(body):
                lists[lm.group(1)] = re.findall(r'"([^"]+)"', lm.group(2))
            found[f"{module}.{m.group(1)}"] = (lists["__parameters__"], lists["__buffers__"])
    return found


def _type_name(obj: ScriptObject) -> str | None:
    module = obj.cls.module
    if module.startswith("__torch__.torch.nn."):
        return kind_of_module([obj.cls.name])
    return None


def _walk_script(obj: ScriptObject, lists: dict[str, tuple[list[str], list[str]]], label: str,
                 prefix: str, parent: str | None, out: list[tuple[str, TensorRef, Any]],
                 depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise FormatError(f"{label}: modules nested more than {_MAX_DEPTH} levels")
    state = obj.state
    if not isinstance(state, dict):
        raise UnsupportedError(f"{label}: module {prefix.rstrip('.') or '<root>'} "
                               f"({obj.cls.qualname}) has custom state; not supported")
    qual = obj.cls.qualname
    params, buffers = lists.get(qual, ([], []))
    mtype = _type_name(obj)
    for attr in [*params, *buffers]:
        value = state.get(attr)
        if isinstance(value, TensorRef):
            out.append((f"{prefix}{attr}", value, (mtype, parent)))
        elif value is not None:
            raise FormatError(f"{label}: {prefix}{attr} is listed as a parameter or buffer of "
                              f"{qual} but is a {type(value).__name__}")
    for attr, value in state.items():
        if isinstance(value, ScriptObject):
            _walk_script(value, lists, label, f"{prefix}{attr}.", mtype, out, depth + 1)


def read_entries(archive: Archive) -> tuple[list[Entry], dict[str, Any], dict[int, StorageRef]]:
    """Every tensor of a checkpoint archive as an :class:`Entry`, facts, and the storages.

    The storages are keyed by the first element of each entry's ``storage`` identity.

    Raises:
        UnsafeInputError: The pickle names a global outside the allowlist.
        FormatError: A malformed archive or pickle, or no state dict in it.
        ShapeError: A tensor reaching outside its storage.
    """
    label = archive.label
    script = archive.has("constants.pkl") and bool(archive.names("code/"))
    top, _ = load(archive.read("data.pkl"), f"{label}:{archive.prefix}/data.pkl",
                  script_classes=script)
    big = archive.byteorder() == "big"
    facts: dict[str, Any] = {"format": "torchscript" if script else "torch.save",
                             "byteorder": "big" if big else "little"}
    found: list[tuple[str, TensorRef, Any]] = []
    if script:
        if not isinstance(top, ScriptObject):
            raise FormatError(f"{label}: TorchScript archive without a module at its root")
        facts["root_class"] = top.cls.qualname
        _walk_script(top, _script_lists(archive), label, "", None, found)
    else:
        state, more = _choose(top, label)
        facts.update(more)
        found = [(n, r, (None, None)) for n, r in _flatten(state, label)]
    entries = []
    storages: dict[int, StorageRef] = {}
    for name, ref, (mtype, parent) in found:
        storages[id(ref.storage)] = ref.storage
        numel = int(np.prod(ref.shape, dtype=object))
        if numel:
            archive.storage(ref.storage, ref.dtype)  # validated now, not on first read

        def loader(ref: TensorRef = ref, name: str = name) -> np.ndarray:
            return archive.tensor(ref, name, big)

        loader()  # checks shape, stride and offset against the storage now (reads no byte)
        entries.append(Entry(name, ref.shape, loader, mtype, parent, {},
                             (id(ref.storage), ref.offset, ref.shape, ref.stride)))
    return entries, facts, storages
