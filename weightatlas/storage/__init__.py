"""The weight store: immutable, memory-mapped Arrow snapshots of model weights.

This layer imports no other weightatlas layer. Adapters hand it
:class:`TensorRecord` objects through a :class:`TensorSource`; everything else reads
:class:`Snapshot` objects from a :class:`Store`.
"""

from __future__ import annotations

# Format facts
from weightatlas.storage._dtypes import DTYPES, dtype_from_name, dtype_name
from weightatlas.storage._format import (
    ALIGNMENT,
    DEFAULT_CHUNK_BYTES,
    FORMAT_VERSION,
    INFO_COLUMNS,
    SCHEMA,
)

# What adapters produce
from weightatlas.storage._record import (
    KINDS,
    MAX_NDIM,
    TensorRecord,
    flipped_axes,
    split_name,
    to_canonical_layout,
    to_source_layout,
)
from weightatlas.storage._refs import SnapshotInfo, parse_ref

# Store and snapshots
from weightatlas.storage._snapshot import Snapshot, TensorInfo
from weightatlas.storage._source import RecordsSource, SourceFile, TensorSource
from weightatlas.storage._stats import TensorStats, tensor_stats
from weightatlas.storage._store import DEFAULT_STORE, Store

__all__ = [
    # Store and snapshots
    "DEFAULT_STORE",
    "Snapshot",
    "SnapshotInfo",
    "Store",
    "TensorInfo",
    "parse_ref",
    # What adapters produce
    "KINDS",
    "MAX_NDIM",
    "RecordsSource",
    "SourceFile",
    "TensorRecord",
    "TensorSource",
    "flipped_axes",
    "split_name",
    "to_canonical_layout",
    "to_source_layout",
    # Format facts
    "ALIGNMENT",
    "DEFAULT_CHUNK_BYTES",
    "DTYPES",
    "FORMAT_VERSION",
    "INFO_COLUMNS",
    "SCHEMA",
    "TensorStats",
    "dtype_from_name",
    "dtype_name",
    "tensor_stats",
]
