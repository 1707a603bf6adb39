"""Adapters: files (and, later, live models) in, :class:`TensorSource` out.

Each format has a module with the same verbs (``read``, ``write``...); this package
finds the right one for a path. Frameworks are imported only inside the adapter
functions that need them, never here.

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from weightatlas.adapters import safetensors
    >>> tmp = Path(tempfile.mkdtemp())
    >>> safetensors.write({"fc.weight": np.ones((2, 3), np.float32)}, tmp / "m.safetensors")
    >>> detect_format(tmp / "m.safetensors")
    'safetensors'
    >>> [r.kind for r in open_source(tmp / "m.safetensors").records()]
    ['linear']
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightatlas.errors import NotFoundError, UnsupportedError, WeightAtlasError
from weightatlas.storage import TensorSource

__all__ = [
    # Registry
    "PLANNED_FORMATS",
    "SUPPORTED_SUFFIXES",
    # Verbs
    "detect_format",
    "open_source",
]

#: File name endings weightatlas reads today (a folder holding them works too).
SUPPORTED_SUFFIXES = (".safetensors", ".safetensors.index.json")

#: Formats recognised by name but not readable yet: file name ending -> format.
PLANNED_FORMATS: dict[str, str] = {}

#: ONNX models (read by adapters.onnx); a folder holding one ``.onnx`` file works too.
_ONNX_SUFFIX = ".onnx"

#: PyTorch and Flax file endings -> format (read by adapters.torch and adapters.jax).
_FRAMEWORK_SUFFIXES = {".pt": "torch", ".pth": "torch", ".bin": "torch",
                       ".msgpack": "flax_msgpack"}
#: Files whose presence makes a folder an Orbax checkpoint.
_ORBAX_MARKERS = ("_metadata", "_checkpoint_metadata", "manifest.ocdbt", "orbax.checkpoint")

_ZIP_MAGIC = b"PK\x03\x04"


def _supported() -> str:
    return (", ".join((*SUPPORTED_SUFFIXES, _ONNX_SUFFIX, *_FRAMEWORK_SUFFIXES))
            + ", a folder holding them, or an Orbax checkpoint folder")


def _not_yet(path: Path, fmt: str) -> UnsupportedError:
    return UnsupportedError(
        f"{path}: {fmt} checkpoints are not supported yet; supported: {_supported()}"
    )


def _sniff(path: Path, size: int) -> str | None:
    """Recognise a file by its first bytes (safetensors has no magic, only a shape)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightAtlasError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return "torch"  # zip archive or legacy pickle: the torch reader refuses the latter
    from weightatlas.adapters.onnx import looks_like_onnx

    return "onnx" if looks_like_onnx(head) else None


def detect_format(path: str | os.PathLike[str]) -> str:
    """Name the format of a checkpoint file or folder, by its name, then its bytes.

    Args:
        path: A file, or a folder holding a checkpoint.

    Returns:
        ``"safetensors"``, ``"torch"`` (``.pt``/``.pth``/``.bin``, or a zip by its bytes),
        ``"flax_msgpack"`` (``.msgpack``), ``"orbax"`` (a folder with Orbax metadata, or
        an Orbax ``CheckpointManager`` folder of step folders) or
        ``"onnx"`` (``.onnx``, a folder holding one, or an ONNX protobuf by its bytes).

    Raises:
        NotFoundError: Nothing exists at ``path``.
        UnsupportedError: A known format not read yet, or an unknown one; the
            message lists what is supported.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}      ")
        >>> detect_format(folder)
        'safetensors'
    """
    p = Path(os.fspath(path))
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{p}: no such file or folder") from None
    except OSError as e:
        raise WeightAtlasError(f"{p}: cannot read: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        try:
            names = [n.lower() for n in os.listdir(p)]
        except OSError as e:
            raise WeightAtlasError(f"{p}: cannot list: {e.strerror or e}") from e
        if any(n.endswith(SUPPORTED_SUFFIXES) for n in names):
            return "safetensors"
        if any(n in _ORBAX_MARKERS for n in names):
            return "orbax"
        from weightatlas.adapters._jax_orbax import is_manager_root

        if is_manager_root(str(p)):  # Orbax CheckpointManager: a folder of step folders
            return "orbax"
        if any(n.endswith(_ONNX_SUFFIX) for n in names):
            return "onnx"
        for suffix, fmt in PLANNED_FORMATS.items():
            if any(n.endswith(suffix) for n in names):
                raise _not_yet(p, fmt)
        raise UnsupportedError(
            f"{p}: no checkpoint found in this folder; supported: {_supported()}"
        )
    name = p.name.lower()
    if name.endswith(SUPPORTED_SUFFIXES):
        return "safetensors"
    for suffix, fmt in _FRAMEWORK_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if name.endswith(_ONNX_SUFFIX):
        return "onnx"
    for suffix, fmt in PLANNED_FORMATS.items():
        if name.endswith(suffix):
            raise _not_yet(p, fmt)
    sniffed = _sniff(p, st.st_size) if stat.S_ISREG(st.st_mode) else None
    if sniffed is not None:
        return sniffed
    raise UnsupportedError(f"{p}: unknown format; supported: {_supported()}")


def _read_safetensors(path: Path, **options: Any) -> TensorSource:
    from weightatlas.adapters import safetensors

    return safetensors.read(path, **options)


def _read_onnx(path: Path, **options: Any) -> TensorSource:
    from weightatlas.adapters import onnx

    return onnx.read(path, **options)


def _read_torch(path: Path, **options: Any) -> TensorSource:
    from weightatlas.adapters import torch

    return torch.read(path, **options)


def _read_jax(path: Path, **options: Any) -> TensorSource:
    from weightatlas.adapters import jax

    return jax.read(path, **options)


#: Format name (as :func:`detect_format` returns it) -> reader.
_READERS: dict[str, Callable[..., TensorSource]] = {
    "safetensors": _read_safetensors, "torch": _read_torch, "flax_msgpack": _read_jax,
    "orbax": _read_jax, "onnx": _read_onnx}


def open_source(path: str | os.PathLike[str], **options: Any) -> TensorSource:
    """Open any supported checkpoint as a :class:`~weightatlas.storage.TensorSource`.

    ``options`` go to the format's reader (``keep_constants=True`` for ONNX, say); a
    reader that does not take one raises ``UnsupportedError`` naming it.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from weightatlas.adapters.safetensors import write
        >>> tmp = Path(tempfile.mkdtemp())
        >>> write({"w": np.zeros(3, np.float32)}, tmp / "m.safetensors")
        >>> src = open_source(tmp / "m.safetensors")
        >>> src.framework, src.label
        ('safetensors', 'm.safetensors')
    """
    p = Path(os.fspath(path))
    fmt = detect_format(p)
    try:
        return _READERS[fmt](p, **options)
    except TypeError as e:
        if options and "unexpected keyword argument" in str(e):
            raise UnsupportedError(f"{p}: the {fmt} reader takes no option "
                                   f"{', '.join(map(repr, options))}") from None
        raise
