"""Build safetensors files by hand, valid or broken, for the adapter tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

#: safetensors code -> NumPy dtype, every dtype the format and weightatlas share.
CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    """One header entry."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def pack(header: dict[str, Any] | str | bytes, data: bytes = b"", *, n: int | None = None) -> bytes:
    """A file: 8-byte length (``n`` overrides it), header padded to 8 bytes, then data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    blob = header.encode("utf-8") if isinstance(header, str) else header
    blob += b" " * (-len(blob) % 8)
    return (len(blob) if n is None else n).to_bytes(8, "little") + blob + data


def put(folder: Path, name: str, raw: bytes) -> Path:
    """Write ``raw`` to ``folder/name`` and return the path."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def valid_file() -> bytes:
    """A small valid file with three dtypes, a scalar and an empty tensor."""
    w = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1, -2], dtype="<i2")
    s = np.array(7, dtype="u1")
    header = {
        "__metadata__": {"format": "pt"},
        "fc.weight": entry("F32", [2, 3], 0, 24),
        "fc.bias": entry("I16", [2], 24, 28),
        "empty": entry("F64", [0, 4], 28, 28),
        "step": entry("U8", [], 28, 29),
    }
    return pack(header, w.tobytes() + b.tobytes() + s.tobytes())


def raw_bytes(array: np.ndarray) -> bytes:
    """The little-endian C-order bytes of an array, whatever its dtype or rank."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
