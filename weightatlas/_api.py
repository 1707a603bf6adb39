"""Functions that combine layers (file -> adapter -> store): the notebook entry points.

Only the package root and the CLI may combine layers; this module is the root's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from weightatlas.errors import FormatError, StoreError
from weightatlas.storage import DEFAULT_CHUNK_BYTES, Snapshot, Store

__all__ = ["default_model_name", "ingest", "open_store", "plot", "read_alignment", "report"]


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
    **options: Any,
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
        **options: Passed to the format's reader (``keep_constants=True`` keeps an ONNX
            model's shape and index constants, marked as constants).

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
    source = open_source(path, **options)
    return st.write(
        source,
        model or default_model_name(path),
        step=step,
        tag=tag,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )


# ---- charts (store + viz) ----------------------------------------------------------------------


def _snapshot(ref: Snapshot | str, store: Store | str | os.PathLike[str] | None) -> Snapshot:
    if isinstance(ref, Snapshot):
        return ref
    st = store if isinstance(store, Store) else Store(store)
    return st.snapshot(ref)


def read_alignment(path: str | os.PathLike[str]) -> pa.Table:
    """Read an alignment table (columns ``a_name``, ``b_name``, ``method``, ``confidence``)
    from an Arrow IPC (``.arrow``, ``.feather``) or Parquet file.

    Raises:
        FormatError: The file cannot be read as a table, or lacks a column.

    Example:
        >>> t = pa.table({"a_name": ["x"], "b_name": ["y"], "method": ["given"],
        ...               "confidence": [1.0]})
        >>> import pyarrow.feather as feather
        >>> feather.write_feather(t, tmp / "align.arrow")
        >>> read_alignment(tmp / "align.arrow").column_names[:2]
        ['a_name', 'b_name']
    """
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    name = os.fspath(path)
    try:
        table = pq.read_table(name) if name.endswith(".parquet") else feather.read_table(name)
    except (OSError, pa.ArrowException) as e:
        raise FormatError(f"{name}: cannot read an alignment table (Arrow IPC or Parquet): "
                          f"{e}") from e
    names = set(table.column_names)
    if not ({"a_name", "b_name"} <= names or {"a", "b"} <= names) or not (
            {"method", "confidence"} <= names):
        raise FormatError(f"{name}: an alignment table needs columns a_name, b_name, method, "
                          f"confidence; found {', '.join(table.column_names)}")
    return table


def plot(
    view: str,
    snapshot: Snapshot | str,
    tensor: str | None = None,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    against: Snapshot | str | None = None,
    alignment: pa.Table | str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Any:
    """Build a chart of a stored snapshot by view name, and write it to ``out`` if given.

    Args:
        view: ``heatmap``, ``kernels``, ``histogram``, ``ridgeline``, ``overview``,
            ``agreement``, ``diff``, ``scatter``, ``esd``, ``alphas``, ``projection``,
            ``trajectory``, ``trajectory_path``, ``nmf_rgb`` or ``factors``
            (:data:`weightatlas.viz.VIEWS`).
        snapshot: A snapshot, or its reference ``MODEL[@STEP]`` in ``store``.
        tensor: The tensor, for views of one tensor.
        store: The store (default: ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``).
        against: The second snapshot (B), for ``agreement``, ``diff`` and ``scatter``.
        alignment: Pairs of A's and B's tensors (a table or an Arrow/Parquet file; default:
            equal names).
        out: Write the chart here, in the format its suffix names (``.vl.json``,
            ``.vg.json``, ``.html``, ``.svg``, ``.png``).
        **options: The view's options (``agg``, ``max_bytes``, ``out`` for a neuron is
            ``neuron``...).

    Returns:
        The Altair chart.

    Example:
        >>> from weightatlas.adapters import safetensors
        >>> safetensors.write({"fc.weight": np.eye(3, dtype=np.float32)}, tmp / "m.safetensors")
        >>> _ = wa.ingest(tmp / "m.safetensors", store=tmp / "store", step=1)
        >>> chart = wa.plot("heatmap", "m@1", "fc.weight", store=tmp / "store",
        ...                 out=tmp / "w.svg")
        >>> (tmp / "w.svg").read_text().startswith("<svg")
        True
    """
    from weightatlas import viz

    if out is not None:
        viz.format_of(out)  # an unknown suffix fails before any work
    snap = _snapshot(snapshot, store)
    other = _snapshot(against, store) if against is not None else None
    table = read_alignment(alignment) if isinstance(alignment, (str, os.PathLike)) \
        else alignment
    if view == "heatmap" and "neuron" in options:
        options["out"] = options.pop("neuron")
    chart = viz.chart(view, snap, tensor, against=other, alignment=table, **options)
    if out is not None:
        viz.save(chart, out)
    return chart


def report(
    snapshot: Snapshot | str,
    out: str | os.PathLike[str],
    *,
    store: Store | str | os.PathLike[str] | None = None,
    **options: Any,
) -> Path:
    """Write the HTML report of a stored snapshot: one offline page with the overview,
    the distributions and a section per tensor (:func:`weightatlas.viz.report_html`).

    Args:
        snapshot: A snapshot, or its reference ``MODEL[@STEP]`` in ``store``.
        out: The HTML file to write.
        store: The store (default: ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``).
        **options: Options of :func:`weightatlas.viz.report_html`.

    Example:
        >>> from weightatlas.adapters import safetensors
        >>> safetensors.write({"fc.weight": np.eye(3, dtype=np.float32)}, tmp / "m.safetensors")
        >>> _ = wa.ingest(tmp / "m.safetensors", store=tmp / "store", step=1)
        >>> wa.report("m@1", tmp / "report.html", store=tmp / "store").name
        'report.html'
    """
    from weightatlas import viz

    return viz.save_report(_snapshot(snapshot, store), out, **options)
