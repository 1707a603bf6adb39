"""Walking JAX parameter trees into named leaves, with what is known of their owners.

Four kinds of tree are recognised:

- **Mappings** (Flax Linen ``variables``/``params`` dicts, ``FrozenDict``, a checkpoint
  restored as dicts): walked in insertion order, which for Linen is the order modules
  were first called (``jax.tree_util`` would sort the keys: ``Dense_10`` before
  ``Dense_2``). A top level of Flax collections (``params``, ``batch_stats``...) is
  recognised: the collection is kept in ``attrs`` and left out of the canonical name,
  so ``batch_stats/BatchNorm_0/mean`` sits beside ``params/BatchNorm_0/scale`` as
  ``BatchNorm_0.mean``. ``intermediates`` and ``cache`` are not weights and are skipped.
- **Flax NNX modules**: every ``nnx.Variable`` (``Param``, ``BatchStat``...; RNG state
  is skipped) from ``nnx.iter_graph``, with the class of the module that owns it.
- **Equinox modules**: ``jax.tree_util`` key paths; the owner of each leaf is found by
  following the path, and its class gives the kind (Equinox keeps PyTorch layouts).
- **Any other pytree**: ``jax.tree_util.tree_flatten_with_path``.

Names join the key path with ``.`` (``Dense_0.kernel``, ``layers.0.weight``); the
source name joins the full path, collection included, with ``/``. Leaves that are not
arrays (an activation function in an Equinox module, a step counter) are not tensors:
they are skipped and counted in the source metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightatlas.errors import FormatError, UnsupportedError

__all__ = ["COLLECTIONS", "Leaf", "walk"]

#: Flax variable collections recognised at the top of a variables dict.
COLLECTIONS = frozenset({"params", "batch_stats", "cache", "intermediates", "constants",
                         "losses", "perturbations", "spectral_norm_stats", "state"})
_SKIPPED_COLLECTIONS = frozenset({"intermediates", "cache"})
_MAX_DEPTH = 200
_OWNER_ATTRS = ("feature_group_count", "num_heads", "groups", "hidden_size")


@dataclass
class Leaf:
    """One array of a tree and what is known about where it sits."""

    path: tuple[str, ...]  #: components without the collection
    value: Any  #: the array (jax.Array or numpy)
    collection: str | None = None
    owner: str | None = None  #: class name of the owning module (NNX, Equinox)
    parent_owner: str | None = None  #: class name of the owner's parent module
    convention: str = "auto"  #: "flax" (kernel [in, out]), "torch" (Equinox), "auto"
    owner_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def source_path(self) -> tuple[str, ...]:
        return (self.collection, *self.path) if self.collection else self.path


def _is_array(value: Any) -> bool:
    if isinstance(value, np.ndarray | np.generic):
        return True
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _owner_attrs(obj: Any) -> dict[str, Any]:
    out = {a: getattr(obj, a) for a in _OWNER_ATTRS
           if isinstance(getattr(obj, a, None), int) and not isinstance(getattr(obj, a), bool)}
    if "ConvTranspose" in type(obj).__name__ and isinstance(getattr(obj, "transpose_kernel",
                                                                    None), bool):
        out["transpose_kernel"] = obj.transpose_kernel
    return out


def _walk_mapping(tree: Mapping[Any, Any], collection: str | None, prefix: tuple[str, ...],
                  out: list[Leaf], skipped: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise FormatError(f"tree nested more than {_MAX_DEPTH} levels at {'/'.join(prefix)}")
    for k, v in tree.items():
        if not isinstance(k, str | int) or isinstance(k, bool):
            raise FormatError(f"key {k!r:.60} at {'/'.join(prefix) or '<root>'} is not a "
                              "string or an integer")
        path = (*prefix, str(k))
        if isinstance(v, Mapping):
            _walk_mapping(v, collection, path, out, skipped, depth + 1)
        elif isinstance(v, list | tuple):
            _walk_mapping(dict(enumerate(v)), collection, path, out, skipped, depth + 1)
        elif _is_array(v):
            out.append(Leaf(path, v, collection))
        else:
            skipped.append("/".join((collection, *path) if collection else path))


def _is_variables(tree: Mapping[Any, Any]) -> bool:
    keys = list(tree)
    return bool(keys) and "params" in keys and all(
        isinstance(k, str) and k in COLLECTIONS and isinstance(tree[k], Mapping) for k in keys)


def _walk_nnx(module: Any, out: list[Leaf], skipped: list[str]) -> None:
    from flax import nnx

    modules: dict[tuple[Any, ...], Any] = {}
    variables = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            modules[tuple(path)] = node
        elif isinstance(node, nnx.Variable):
            variables.append((tuple(path), node))
    for path, var in variables:
        names = tuple(str(p) for p in path)
        if isinstance(var, nnx.RngState):
            skipped.append("/".join(names))
            continue
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if not _is_array(value):
            skipped.append("/".join(names))
            continue
        owner = modules.get(path[:-1])
        parent = modules.get(path[:-2]) if len(path) > 1 else None
        collection = {"Param": "params", "BatchStat": "batch_stats"}.get(
            type(var).__name__, type(var).__name__.lower())
        out.append(Leaf(names, value, collection,
                        type(owner).__name__ if owner is not None else None,
                        type(parent).__name__ if parent is not None else None, "flax",
                        _owner_attrs(owner)))


def _walk_equinox(module: Any, out: list[Leaf], skipped: list[str]) -> None:
    import equinox as eqx
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(module)
    for keys, value in flat:
        names = tuple(_key(k) for k in keys)
        if not _is_array(value):
            skipped.append(".".join(names))
            continue
        chain = [module]
        for k in keys[:-1]:
            node = chain[-1]
            try:
                if hasattr(k, "name"):
                    chain.append(getattr(node, k.name))
                elif hasattr(k, "idx"):
                    chain.append(node[k.idx])
                else:
                    chain.append(node[k.key])
            except (AttributeError, IndexError, KeyError, TypeError):
                break
        mods = [m for m in chain if isinstance(m, eqx.Module)]
        owner = type(chain[-1]).__name__ if isinstance(chain[-1], eqx.Module) else None
        parent = type(mods[-2]).__name__ if len(mods) > 1 else None
        attrs = _owner_attrs(chain[-1]) if owner else {}
        out.append(Leaf(names, value, None, owner, parent, "torch", attrs))


def walk(tree: Any) -> tuple[list[Leaf], list[str], str]:
    """Every array leaf of a tree, the paths of non-array leaves skipped, and the tree kind.

    Example:
        >>> leaves, skipped, kind = walk({"params": {"Dense_0": {"kernel": np.ones((3, 2)),
        ...                                                      "bias": np.zeros(2)}},
        ...                               "step": 3})
        >>> [(leaf.path, leaf.collection) for leaf in leaves], skipped, kind
        ([(('params', 'Dense_0', 'kernel'), None), (('params', 'Dense_0', 'bias'), None)], \
['step'], 'dict')
    """
    out: list[Leaf] = []
    skipped: list[str] = []
    nnx = sys.modules.get("flax.nnx")
    eqx = sys.modules.get("equinox")
    if nnx is not None and isinstance(tree, nnx.Module):
        _walk_nnx(tree, out, skipped)
        return out, skipped, "flax.nnx"
    if eqx is not None and isinstance(tree, eqx.Module):
        _walk_equinox(tree, out, skipped)
        return out, skipped, "equinox"
    if isinstance(tree, Mapping):
        if _is_variables(tree):
            for collection, sub in tree.items():
                if collection in _SKIPPED_COLLECTIONS:
                    skipped.append(collection)
                    continue
                _walk_mapping(sub, collection, (), out, skipped, 1)
            return out, skipped, "flax.variables"
        _walk_mapping(tree, None, (), out, skipped, 0)
        return out, skipped, "dict"
    if _is_array(tree):
        raise UnsupportedError("expected a tree of arrays (a dict, a module...), got one array; "
                               "wrap it as {'name': array}")
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keys, value in flat:
        names = tuple(_key(k) for k in keys)
        if _is_array(value):
            out.append(Leaf(names, value))
        else:
            skipped.append(".".join(names))
    return out, skipped, "pytree"
