"""Element types the store holds, by canonical name.

NumPy has no bfloat16 or float8; ml_dtypes supplies them as real NumPy dtypes, so
every stored tensor comes back as a NumPy array of its exact type, bit for bit.
The canonical names are NumPy's (``float32``, ``bfloat16``, ``float8_e4m3fn``) and
are what the ``dtype`` column of a snapshot holds.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from weightatlas.errors import UnsupportedError

__all__ = ["DTYPES", "FLOAT_DTYPES", "dtype_from_name", "dtype_name"]

#: Canonical name -> NumPy dtype (always little-endian).
DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

#: Names of the floating-point types (the ones that can hold NaN and Inf).
FLOAT_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
)

_BY_DTYPE = {dt: name for name, dt in DTYPES.items()}


def dtype_from_name(name: str) -> np.dtype:
    """Return the NumPy dtype for a canonical dtype name.

    Example:
        >>> dtype_from_name("bfloat16").itemsize
        2
    """
    try:
        return DTYPES[name]
    except KeyError:
        known = ", ".join(DTYPES)
        raise UnsupportedError(f"unknown dtype {name!r}; known dtypes: {known}") from None


def dtype_name(dtype: np.dtype | type) -> str:
    """Return the canonical name of a NumPy dtype, whatever its byte order.

    Example:
        >>> dtype_name(np.dtype(">f4"))
        'float32'
    """
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _BY_DTYPE[dt]
    except KeyError:
        known = ", ".join(DTYPES)
        raise UnsupportedError(
            f"dtype {dt} cannot be stored; supported dtypes: {known}"
        ) from None
