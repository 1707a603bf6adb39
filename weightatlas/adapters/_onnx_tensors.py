"""ONNX tensors: element types, shape checks, and where each tensor's bytes live.

A ``TensorProto`` holds its values in one of three places: ``raw_data`` (little-endian
bytes), a typed field (``float_data``, ``int32_data``...) or an external file
(``data_location = EXTERNAL``). :func:`payload` checks every fact about a tensor
before a byte of it is read (known type, non-negative dims, rank, exactly one place
holding the values, a byte count that matches the shape, computed in Python
integers) and returns a :class:`Payload` that can hand out the values as a NumPy
array later. External files are checked and mapped by :mod:`._onnx_external`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from weightatlas.errors import FormatError, ShapeError, UnsupportedError
from weightatlas.storage import DTYPES, MAX_NDIM

if TYPE_CHECKING:
    from weightatlas.adapters._onnx_external import ExternalFiles, Slice

__all__ = ["ONNX_TYPES", "OnnxType", "Payload", "check_dims", "onnx_type", "payload"]


@dataclass(frozen=True)
class OnnxType:
    """One ONNX element type and how weightatlas holds it."""

    code: int  #: ``TensorProto.DataType`` value
    name: str  #: ONNX name (``FLOAT``, ``BFLOAT16``...)
    dtype: np.dtype | None  #: NumPy type of the values; None for strings
    bits: int  #: bits per element (4 for INT4), 0 for strings
    field: str  #: the typed field that may hold the values
    stored: bool  #: the store holds this type as is (else: packed bytes)

    def nbytes(self, numel: int) -> int:
        """Bytes that ``numel`` values take in ``raw_data`` (sub-byte types packed)."""
        return (numel * self.bits + 7) // 8


def _t(code: int, name: str, dtype: Any, bits: int, field: str) -> OnnxType:
    dt = None if dtype is None else np.dtype(dtype)
    stored = dt is not None and any(dt == v for v in DTYPES.values()) and bits == 8 * dt.itemsize
    return OnnxType(code, name, dt, bits, field, stored)


#: ``TensorProto.DataType`` -> type facts (codes from onnx/onnx.proto).
ONNX_TYPES: dict[int, OnnxType] = {
    t.code: t
    for t in (
        _t(1, "FLOAT", "<f4", 32, "float_data"),
        _t(2, "UINT8", "u1", 8, "int32_data"),
        _t(3, "INT8", "i1", 8, "int32_data"),
        _t(4, "UINT16", "<u2", 16, "int32_data"),
        _t(5, "INT16", "<i2", 16, "int32_data"),
        _t(6, "INT32", "<i4", 32, "int32_data"),
        _t(7, "INT64", "<i8", 64, "int64_data"),
        _t(8, "STRING", None, 0, "string_data"),
        _t(9, "BOOL", "?", 8, "int32_data"),
        _t(10, "FLOAT16", "<f2", 16, "int32_data"),
        _t(11, "DOUBLE", "<f8", 64, "double_data"),
        _t(12, "UINT32", "<u4", 32, "uint64_data"),
        _t(13, "UINT64", "<u8", 64, "uint64_data"),
        _t(14, "COMPLEX64", "<c8", 64, "float_data"),
        _t(15, "COMPLEX128", "<c16", 128, "double_data"),
        _t(16, "BFLOAT16", ml_dtypes.bfloat16, 16, "int32_data"),
        _t(17, "FLOAT8E4M3FN", ml_dtypes.float8_e4m3fn, 8, "int32_data"),
        _t(18, "FLOAT8E4M3FNUZ", ml_dtypes.float8_e4m3fnuz, 8, "int32_data"),
        _t(19, "FLOAT8E5M2", ml_dtypes.float8_e5m2, 8, "int32_data"),
        _t(20, "FLOAT8E5M2FNUZ", ml_dtypes.float8_e5m2fnuz, 8, "int32_data"),
        _t(21, "UINT4", ml_dtypes.uint4, 4, "int32_data"),
        _t(22, "INT4", ml_dtypes.int4, 4, "int32_data"),
        _t(23, "FLOAT4E2M1", ml_dtypes.float4_e2m1fn, 4, "int32_data"),
        _t(24, "FLOAT8E8M0", ml_dtypes.float8_e8m0fnu, 8, "int32_data"),
        _t(25, "UINT2", ml_dtypes.uint2, 2, "int32_data"),
        _t(26, "INT2", ml_dtypes.int2, 2, "int32_data"),
    )
}
_BY_DTYPE = {t.dtype: t for t in ONNX_TYPES.values() if t.dtype is not None and t.bits >= 8}
TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                "uint64_data")


def onnx_type(code: int, where: str) -> OnnxType:
    """The type facts of a ``data_type`` code, or ``UnsupportedError`` naming it."""
    try:
        return ONNX_TYPES[code]
    except KeyError:
        raise UnsupportedError(f"{where}: element type {code} is not one weightatlas knows "
                               f"(known: {', '.join(t.name for t in ONNX_TYPES.values())})"
                               ) from None


def type_of(dtype: np.dtype) -> OnnxType:
    """The ONNX type of a NumPy dtype (for folded values)."""
    return _BY_DTYPE[np.dtype(dtype)]


def check_dims(dims: Any, where: str) -> tuple[int, ...]:
    """Validate a shape: at most 64 non-negative dims (Python ints, no overflow)."""
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_NDIM:
        raise ShapeError(f"{where}: {len(shape)} dimensions, at most {MAX_NDIM}")
    bad = [d for d in shape if d < 0]
    if bad:
        raise ShapeError(f"{where}: shape {list(shape)} has a negative dimension ({bad[0]}); "
                         "expected sizes >= 0")
    return shape


@dataclass
class Payload:
    """Where one tensor's values are: extracted bytes, a typed array, or an external slice."""

    otype: OnnxType
    shape: tuple[int, ...]
    field: str  #: raw_data, a typed field name, "external" or "none" (no values)
    raw: bytes | None = None
    typed: np.ndarray | None = None
    external: Slice | None = None
    proto: Any = None  #: the TensorProto whose raw_data holds the values (until extracted)

    def extract(self) -> None:
        """Move the values out of the message (it is then attached without them)."""
        if self.proto is not None:
            if self.field == "raw_data":
                self.raw = self.proto.raw_data
            self.proto.ClearField(self.field)
            self.proto = None

    def _raw(self) -> bytes | None:
        return self.proto.raw_data if self.proto is not None and self.raw is None else self.raw

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.otype.nbytes(self.numel)

    def packed(self, files: ExternalFiles | None) -> np.ndarray:
        """The values as little-endian bytes, sub-byte types packed (uint8, 1-d)."""
        if self.external is not None:
            assert files is not None  # an external payload is only made with its files
            return files.bytes_view(self.external)
        raw = self._raw()
        if raw is not None:
            return np.frombuffer(raw, np.uint8)
        if self.typed is not None:
            return self.typed.reshape(-1).view(np.uint8)
        return np.zeros(0, np.uint8)

    def array(self, files: ExternalFiles | None) -> np.ndarray:
        """The values as an array of the ONNX type with the tensor's shape (read-only)."""
        dtype = self.otype.dtype
        assert dtype is not None
        if self.typed is not None:
            return self.typed
        if self.otype.bits < 8:
            return _unpack(self.packed(files), self.otype, self.shape)
        if self.external is not None:
            assert files is not None
            return files.array(self.external, dtype, self.shape)
        raw = self._raw()
        if raw is None:
            out = np.zeros(self.shape, dtype)
            out.flags.writeable = False
            return out
        flat = np.frombuffer(raw, dtype, self.numel)
        if not flat.flags.aligned:
            flat = flat.copy()
            flat.flags.writeable = False
        return flat.reshape(self.shape)


def _unpack(packed: np.ndarray, otype: OnnxType, shape: tuple[int, ...]) -> np.ndarray:
    """Unpack 4- or 2-bit values (lowest bits first, as ONNX packs them)."""
    per = 8 // otype.bits
    mask = (1 << otype.bits) - 1
    parts = [(packed >> (otype.bits * k)) & mask for k in range(per)]
    codes = np.stack(parts, axis=-1).reshape(-1)[: math.prod(shape)].astype(np.uint8)
    assert otype.dtype is not None
    out = codes.view(otype.dtype).reshape(shape)  # ml_dtypes keeps one code per byte
    out.flags.writeable = False
    return out


def _typed(t: Any, otype: OnnxType, numel: int, where: str) -> np.ndarray:
    """Values from a typed field, converted exactly (out-of-range codes refused)."""
    values = getattr(t, otype.field)
    count = numel * (2 if otype.name.startswith("COMPLEX") else 1)
    if otype.bits < 8:  # packed, one byte of codes per int32 (onnx.helper.make_tensor)
        count = otype.nbytes(numel)
    if len(values) != count:
        raise ShapeError(f"{where}: {otype.field} holds {len(values)} values, shape "
                         f"{list(t.dims)} {otype.name} needs {count}")
    assert otype.dtype is not None
    name = otype.name
    if otype.field in ("float_data", "double_data", "int64_data") or name == "INT32":
        base = {"float_data": np.float32, "double_data": np.float64, "int64_data": np.int64,
                "int32_data": np.int32}[otype.field]
        arr = np.asarray(values, dtype=base)
        out = arr.view(otype.dtype) if name.startswith("COMPLEX") else arr
    elif otype.field == "uint64_data":
        arr = np.asarray(values, dtype=np.uint64)
        if name == "UINT32" and arr.size and int(arr.max()) > 0xFFFFFFFF:
            raise FormatError(f"{where}: uint64_data holds {int(arr.max())}, above UINT32's range")
        out = arr.astype(otype.dtype)
    else:  # int32_data holding narrower codes
        arr = np.asarray(values, dtype=np.int64)
        if otype.bits < 8:
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
                raise FormatError(f"{where}: int32_data holds a packed byte outside [0, 255]")
            return arr.astype(np.uint8)  # still packed: the Payload keeps the bytes
        else:
            lo, hi = _RANGES.get(name, (0, (1 << otype.bits) - 1))
            if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
                bad = int(arr.min()) if int(arr.min()) < lo else int(arr.max())
                raise FormatError(f"{where}: int32_data holds {bad}, outside {name}'s range "
                                  f"[{lo}, {hi}]")
            if name in ("INT8", "INT16", "UINT8", "UINT16", "BOOL"):
                out = arr.astype(otype.dtype)
            else:  # float16/bfloat16/float8 bit patterns
                out = arr.astype(np.uint16 if otype.bits == 16 else np.uint8).view(otype.dtype)
    out = np.ascontiguousarray(out).reshape(tuple(t.dims))
    out.flags.writeable = False
    return out


_RANGES = {"INT8": (-128, 127), "INT16": (-32768, 32767), "BOOL": (0, 1)}


def payload(t: Any, where: str, files: ExternalFiles | None) -> Payload | None:
    """Check a ``TensorProto`` and locate its values; ``None`` for string tensors.

    Args:
        t: The tensor.
        where: ``file: tensor 'name'`` for messages.
        files: The model's external data files (``None``: external data is refused).

    Inline values stay in the message until :meth:`Payload.extract` moves them out.
    """
    otype = onnx_type(t.data_type, where)
    shape = check_dims(t.dims, where)
    if otype.dtype is None:
        return None
    if t.HasField("segment"):
        raise UnsupportedError(f"{where}: segmented tensors are not supported")
    numel = math.prod(shape)
    need = otype.nbytes(numel)
    typed = [f for f in TYPED_FIELDS if len(getattr(t, f))]
    has_raw = t.HasField("raw_data")
    if t.data_location == 1:  # EXTERNAL
        if has_raw or typed:
            raise FormatError(f"{where}: data_location is EXTERNAL but the tensor also holds "
                              f"{'raw_data' if has_raw else typed[0]}; expected one place")
        if files is None:
            raise FormatError(f"{where}: refers to external data, which cannot be read here")
        return Payload(otype, shape, "external", external=files.locate(t, where, need))
    if t.external_data:
        raise FormatError(f"{where}: has external_data entries but data_location is not EXTERNAL")
    if has_raw and typed:
        raise FormatError(f"{where}: holds both raw_data and {typed[0]}; expected one of them")
    if len(typed) > 1:
        raise FormatError(f"{where}: holds {typed[0]} and {typed[1]}; expected one of them")
    if typed:
        field = typed[0]
        if field != otype.field:
            raise FormatError(f"{where}: {otype.name} values belong in {otype.field}, "
                              f"found {field}")
        values = _typed(t, otype, numel, where)
        if otype.bits < 8:  # packed codes, one byte per int32: keep them as bytes
            return Payload(otype, shape, field, raw=values.tobytes(), proto=t)
        return Payload(otype, shape, field, typed=values, proto=t)
    if has_raw:
        size = len(t.raw_data)  # (a transient copy: upb hands out bytes)
        if size != need:
            raise ShapeError(f"{where}: raw_data has {size} bytes, shape {list(shape)} "
                             f"{otype.name} needs {need}")
        return Payload(otype, shape, "raw_data", proto=t)
    if numel:
        raise ShapeError(f"{where}: holds no values, shape {list(shape)} needs {numel}")
    return Payload(otype, shape, "none")
