"""weightatlas: see what a neural network's weights are doing, whatever framework it came from.

The layers, in the direction data flows:

- :mod:`weightatlas.adapters` read model files into tensor records;
- :mod:`weightatlas.storage` keeps them as immutable, memory-mapped Arrow snapshots;
- :mod:`weightatlas.core` computes against the store;
- :mod:`weightatlas.viz` turns results into Altair charts.

Importing this package imports no framework (torch, jax, onnx): adapters import
theirs when they are used.

Example:
    >>> import weightatlas as wa
    >>> store = wa.open_store(tmp / "store")
    >>> sorted(store.models()) == store.models()
    True
"""

from __future__ import annotations

# Analyses and charts as namespaces: ``wa.core.spectrum(...)``, ``wa.viz.heatmap(...)``
# (frameworks and altair are imported only when a function needs them)
from weightatlas import core as core
from weightatlas import viz as viz
from weightatlas._api import (
    default_model_name,
    expand,
    feature_visualization,
    ingest,
    open_store,
    plot,
    read_alignment,
    report,
)
from weightatlas._attribution import Attribution, attribute, stored_function, weight_gradients
from weightatlas._track import Tracker, track
from weightatlas._version import __version__
from weightatlas.core import compare
from weightatlas.errors import (
    FormatError,
    InputMismatchError,
    IntegrityError,
    NotFoundError,
    PathEscapeError,
    ResourceLimitError,
    ShapeError,
    SnapshotExistsError,
    StoreError,
    UnsafeInputError,
    UnsupportedError,
    UnsupportedOperatorError,
    WeightAtlasError,
)
from weightatlas.storage import Snapshot, SnapshotInfo, Store, TensorInfo, TensorRecord

__all__ = [
    "__version__",
    # Entry points
    "default_model_name",
    "ingest",
    "open_store",
    # Attributions and weight gradients of a stored model (through the executor)
    "Attribution",
    "attribute",
    "stored_function",
    "weight_gradients",
    # Expanded weights of a stored model (through the executor)
    "expand",
    # Feature visualization of a stored model's channels (through the executor)
    "feature_visualization",
    # Comparing snapshots and capturing training runs
    "Tracker",
    "compare",
    "track",
    # Charts
    "plot",
    "read_alignment",
    "report",
    # Store
    "Snapshot",
    "SnapshotInfo",
    "Store",
    "TensorInfo",
    "TensorRecord",
    # Errors
    "FormatError",
    "InputMismatchError",
    "IntegrityError",
    "NotFoundError",
    "PathEscapeError",
    "ResourceLimitError",
    "ShapeError",
    "SnapshotExistsError",
    "StoreError",
    "UnsafeInputError",
    "UnsupportedError",
    "UnsupportedOperatorError",
    "WeightAtlasError",
]
