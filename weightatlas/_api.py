"""Functions that combine layers (file -> adapter -> store): the notebook entry points.

Only the package root and the CLI may combine layers; this module is the root's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from weightatlas.errors import FormatError, InputMismatchError, StoreError
from weightatlas.storage import DEFAULT_CHUNK_BYTES, Snapshot, Store

if TYPE_CHECKING:
    from collections.abc import Sequence

    from weightatlas.core.executor import ExpandedWeights, FeatureVisResult, StoredFunction

__all__ = ["default_model_name", "expand", "feature_visualization", "ingest", "open_store",
           "plot", "read_alignment", "report"]


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
        step: Training step of this snapshot (default: the step the checkpoint records,
            as a JAX training state or an Orbax ``CheckpointManager`` step does, else 0
            when no tag is given). For an Orbax ``CheckpointManager`` folder, also which
            step is read (default: the latest).
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
    from weightatlas.adapters._jax_orbax import is_manager_root

    st = store if isinstance(store, Store) else Store(store, create=True)
    if step is not None and os.path.isdir(path) and is_manager_root(os.fspath(path)):
        options.setdefault("step", step)  # a folder of steps: read the one asked for
    source = open_source(path, **options)
    recorded = source.metadata().get("step")
    if step is None and tag is None and isinstance(recorded, int) and recorded >= 0:
        step = recorded
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


# ---- expanded weights (store + executor) ------------------------------------------------------


def expand(
    snapshot: Snapshot | str | StoredFunction,
    source: str,
    target: str,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    channels: Sequence[int] | None = None,
    input_shape: Sequence[int] | None = None,
    size: int | Sequence[int] | None = None,
) -> ExpandedWeights:
    """Expanded weights between two layers of a stored model (Distill, "Visualizing
    Weights"): how each channel of ``source`` acts on each channel of ``target`` through
    every layer between them, with ReLUs passing their input and max pooling averaging.

    The model is run by the executor from the snapshot's attached graph and its stored
    tensors (:func:`weightatlas.core.executor.from_snapshot`); docs/executor.md, section
    *Expanded weights*, describes the computation.

    Args:
        snapshot: A snapshot with a graph (ingested from ONNX, or from a PyTorch module
            with example inputs), its reference ``MODEL[@STEP]`` in ``store``, or a
            function from :func:`weightatlas.stored_function` (kept compiled between calls).
        source: The earlier layer: a module (``layer1.0.conv1``), a stored tensor
            (``layer1.0.conv1.weight``) or a graph value name.
        target: The later layer, named the same ways.
        store: The store (default: ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``).
        channels: Target channels (default: all).
        input_shape: The input shape, when the graph's is not fixed.
        size: Crop every expanded kernel to this size (default: its support).

    Returns:
        The expanded weights (``.array`` is ``[channels, source channels, *kernel]``).

    Raises:
        NotFoundError: No such snapshot or layer, or the snapshot has no graph.
        InputMismatchError: ``source`` is not upstream of ``target``.

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> w1 = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "conv1.weight")
        >>> w2 = numpy_helper.from_array(np.ones((1, 2, 3, 3), np.float32), "conv2.weight")
        >>> g = helper.make_graph(
        ...     [helper.make_node("Conv", ["x", "conv1.weight"], ["h"], pads=[1, 1, 1, 1]),
        ...      helper.make_node("Relu", ["h"], ["r"]),
        ...      helper.make_node("Conv", ["r", "conv2.weight"], ["y"], pads=[1, 1, 1, 1])],
        ...     "g", [helper.make_tensor_value_info("x", 1, [1, 1, 9, 9])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 1, 9, 9])], [w1, w2])
        >>> onnx.save(helper.make_model(g), tmp / "two.onnx")
        >>> _ = wa.ingest(tmp / "two.onnx", store=store, step=1)
        >>> wa.expand("two@1", "conv1", "conv2", store=store).array.shape  # the weights
        (1, 2, 3, 3)
        >>> e = wa.expand("two@1", "x", "conv2", store=store)  # two 3x3 convolutions: 5x5
        >>> e.array.shape, e.array[0, 0, 2].tolist()
        ((1, 1, 5, 5), [6.0, 12.0, 18.0, 12.0, 6.0])
    """
    from weightatlas._attribution import stored_function
    from weightatlas.core.executor import expanded_weights

    fn = stored_function(snapshot, store)  # reused: repeated calls compile once
    return expanded_weights(fn, source, target, channels=channels, input_shape=input_shape,
                            size=size)


# ---- feature visualization (store + executor) -------------------------------------------------


def feature_visualization(
    snapshot: Snapshot | str | StoredFunction,
    layer: str,
    channels: int | Sequence[int] | None,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    **options: Any,
) -> FeatureVisResult:
    """Feature visualizations of channels of a stored model's layer: images optimized to
    excite each channel (Lucid's method; docs/executor.md, section *Feature visualization*).

    The model is run by the executor from the snapshot's attached graph and its stored
    tensors (:func:`weightatlas.core.executor.from_snapshot`).

    Args:
        snapshot: A snapshot with a graph, its reference ``MODEL[@STEP]`` in ``store``, or a
            function from :func:`weightatlas.stored_function`.
        layer: A module (``features.3``), a stored tensor (``features.3.weight``: the
            output of the layer that reads it) or a graph value name.
        channels: The channels to visualize (None with ``directions=``).
        store: The store (default: ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``).
        **options: Passed to :func:`weightatlas.core.executor.feature_visualization`
            (``objective``, ``directions``, ``steps``, ``size``, ``normalize``, ``seed``...).

    Returns:
        The images ``[n, c, h, w]`` in [0, 1] and the objective's history.

    Raises:
        NotFoundError: No such snapshot or layer, or the snapshot has no graph.

    Example:
        >>> import onnx
        >>> from onnx import helper, numpy_helper
        >>> k = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "conv.weight")
        >>> g = helper.make_graph(
        ...     [helper.make_node("Conv", ["x", "conv.weight"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", 1, [1, 1, 8, 8])],
        ...     [helper.make_tensor_value_info("y", 1, [1, 2, 6, 6])], [k])
        >>> onnx.save(helper.make_model(g), tmp / "conv.onnx")
        >>> _ = wa.ingest(tmp / "conv.onnx", store=store, step=1)
        >>> r = wa.feature_visualization("conv@1", "conv", [0, 1], store=store, steps=4)
        >>> r.images.shape, r.value
        ((2, 1, 8, 8), 'y')
    """
    import inspect

    from weightatlas._attribution import stored_function
    from weightatlas.core.executor import feature_visualization as visualize
    from weightatlas.core.executor import layer_output

    allowed = [p for p in inspect.signature(visualize).parameters
               if p not in ("fn", "value", "channels")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputMismatchError(f"feature_visualization: unknown options {unknown}; "
                                 f"options: {', '.join(allowed)}")
    fn = stored_function(snapshot, store)  # reused: repeated calls compile once
    return visualize(fn, layer_output(fn, layer), channels, **options)
