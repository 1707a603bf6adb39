"""The snapshot file format: Arrow schema, metadata keys and constants.

A snapshot is one uncompressed Arrow IPC *file* with the schema below and one
record batch per row, a row being one tensor or one chunk of a large tensor. Every
``data`` value starts on a 64-byte boundary of the file (the ``pad`` column, which
precedes it, absorbs the difference), so a memory-mapped reader gets aligned,
zero-copy NumPy views. docs/architecture.md is the full specification.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from weightatlas.errors import FormatError, StoreError

__all__ = [
    "ALIGNMENT",
    "CHECKSUM_ALGORITHM",
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INFO_COLUMNS",
    "MAX_CHUNK_ELEMENTS",
    "METADATA_KEY",
    "SCHEMA",
    "STAT_COLUMNS",
    "check_name",
    "decode_metadata",
    "encode_metadata",
]

FORMAT_NAME = "weightatlas.snapshot"
#: 2: the whole-file checksum hashes the header last (1: in file order).
FORMAT_VERSION = 2
#: Schema metadata key whose value is the snapshot's JSON metadata.
METADATA_KEY = b"weightatlas"
#: Byte boundary every ``data`` value starts on.
ALIGNMENT = 64
#: Tensors larger than this are split into chunks along their first axis.
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024
#: No chunk holds more elements than this (Arrow's 32-bit list and tensor sizes).
MAX_CHUNK_ELEMENTS = 2**31 - 1
CHECKSUM_ALGORITHM = "xxh3_128"

STAT_COLUMNS = (
    ("numel", pa.int64()),
    ("mean", pa.float64()),
    ("std", pa.float64()),
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("abs_max", pa.float64()),
    ("l2", pa.float64()),
    ("frac_zero", pa.float64()),
    ("n_nan", pa.int64()),
    ("n_inf", pa.int64()),
)

_COUNTS = ("numel", "frac_zero", "n_nan", "n_inf")

SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("tag", pa.string()),
        pa.field("name", pa.string(), nullable=False),
        pa.field("source_name", pa.string(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("layout", pa.list_(pa.string()), nullable=False),
        pa.field("source_layout", pa.list_(pa.string()), nullable=False),
        pa.field("source_shape", pa.list_(pa.int64()), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("n_chunks", pa.int32(), nullable=False),
        pa.field("row_start", pa.int64(), nullable=False),
        pa.field("row_count", pa.int64(), nullable=False),
        pa.field("nbytes", pa.int64(), nullable=False),
        # Moments are null when a tensor has no finite value; counts are never null.
        *(pa.field(n, t, nullable=n not in _COUNTS) for n, t in STAT_COLUMNS),
        pa.field("attrs", pa.string(), nullable=False),
        pa.field("checksum", pa.string(), nullable=False),
        pa.field("pad", pa.binary(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)

#: Columns that describe tensors without their bytes (what listings read).
INFO_COLUMNS = [f.name for f in SCHEMA if f.name not in ("pad", "data")]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,199}$")


def check_name(value: str, what: str) -> str:
    """Check a model name or tag is a safe, portable file-name component.

    Example:
        >>> check_name("resnet18-v1.5", "model name")
        'resnet18-v1.5'
    """
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise StoreError(
            f"{what} {value!r} is not allowed: use 1-200 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter, digit or '_' (for 'org/name' write 'org--name')"
        )
    return value


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata for a snapshot: one JSON document under :data:`METADATA_KEY`."""
    return {METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=False).encode()}


def decode_metadata(schema: pa.Schema, path: str) -> dict[str, Any]:
    """Read and check a snapshot's JSON metadata (never pickle)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise FormatError(f"{path}: not a weightatlas snapshot (no {METADATA_KEY.decode()!r} "
                          "schema metadata)")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: snapshot metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: snapshot metadata does not declare format {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(
            f"{path}: snapshot format version {version!r}; this weightatlas reads versions up to "
            f"{FORMAT_VERSION} (upgrade weightatlas)"
        )
    return meta
