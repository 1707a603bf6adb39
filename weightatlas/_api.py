"""Functions that combine layers (file -> adapter -> store): the notebook entry points.

Only the package root and the CLI may combine layers; this module is the root's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from weightatlas.errors import StoreError
from weightatlas.storage import DEFAULT_CHUNK_BYTES, Snapshot, Store

__all__ = ["default_model_name", "ingest", "open_store"]


def open_store(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> Store:
    """Open (and by default create) a weight store.

    Args:
        path: Store directory; ``None`` means ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``.
        create: Create the store if it does not exist yet.

    Example:
        >>> import weightatlas as wa
        >>> store = wa.open_store(tmp / "store")
        >>> isinstance(store.models(), list)
        True
    """
    return Store(path, create=create)


def default_model_name(path: str | os.PathLike[str]) -> str:
    """A model name derived from a file or folder name (``model.safetensors`` -> ``model``).

    Example:
        >>> default_model_name("/ckpt/Llama 2 (7B).safetensors")
        'Llama-2-7B'
    """
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    for suffix in (".safetensors.index.json", ".index.json", ".safetensors", ".onnx", ".pt",
                   ".pth", ".bin", ".msgpack"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.+\-]+", "-", base).strip("-.") or "model"
    if not re.match(r"[A-Za-z0-9_]", name[0]):
        name = "m" + name
    return name[:200]


def ingest(
    path: str | os.PathLike[str],
    *,
    store: Store | str | os.PathLike[str] | None = None,
    model: str | None = None,
    step: int | None = None,
    tag: str | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
) -> Snapshot:
    """Read a weights file and write it into the store as one snapshot.

    Args:
        path: A ``.safetensors`` file, a sharded checkpoint's ``.index.json``, or a folder.
        store: A :class:`Store` or its directory (created if missing).
        model: Model name; defaults to the file name without its suffix.
        step: Training step of this snapshot (default 0 when no tag is given).
        tag: A name instead of a step (``best``, ``final``...).
        overwrite: Replace an existing snapshot with different content.
        chunk_bytes: Tensors larger than this are stored in chunks.
        progress: Called as ``progress(phase, nbytes, total)`` as bytes are read and written.

    Returns:
        The snapshot, opened.

    Example:
        >>> from weightatlas.adapters import safetensors
        >>> safetensors.write({"fc1.weight": np.ones((4, 3), np.float32)}, tmp / "mlp.safetensors")
        >>> snap = wa.ingest(tmp / "mlp.safetensors", store=tmp / "store", step=100)
        >>> snap.ref, snap.read("fc1.weight").shape
        ('mlp@100', (4, 3))
    """
    if step is not None and tag is not None:
        raise StoreError("give a step or a tag, not both")
    from weightatlas.adapters import open_source

    st = store if isinstance(store, Store) else Store(store, create=True)
    source = open_source(path)
    return st.write(
        source,
        model or default_model_name(path),
        step=step,
        tag=tag,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
