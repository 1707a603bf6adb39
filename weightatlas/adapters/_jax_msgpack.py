"""Flax msgpack checkpoints (``flax.serialization.to_bytes``), parsed without trusting them.

A small msgpack parser written for the subset Flax writes (maps, arrays, strings,
binary, numbers, booleans, nil, and Flax's extension types), reading straight from a
memory map: an array leaf becomes a read-only NumPy view of the file, not a copy.
Flax's extensions are ``1`` (an ndarray: ``[shape, dtype name, bytes]``), ``2`` (a
complex number) and ``3`` (a NumPy scalar, packed as a 0-d ndarray); large arrays are
split by Flax into ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}``
maps, joined here after checking that the chunks add up to the shape.

What is refused, before any array is built: an ``object`` (or other non-numeric)
dtype (:class:`~weightatlas.errors.UnsafeInputError`: msgpack-numpy unpickles such
leaves), a shape that disagrees with its bytes (:class:`~weightatlas.errors.ShapeError`),
a length running past the end, nesting deeper than 128 levels, duplicate map keys, a
reserved byte, trailing bytes (:class:`~weightatlas.errors.FormatError`).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from weightatlas.errors import FormatError, ShapeError, UnsafeInputError, UnsupportedError
from weightatlas.storage import DTYPES

__all__ = ["CHUNKED", "parse"]

#: The marker key of an array Flax split into chunks.
CHUNKED = "__msgpack_chunked_array__"
_MAX_DEPTH = 128
_UNSAFE_DTYPES = ("object", "O", "|O", "V", "void")


class _Reader:
    def __init__(self, buf: Any, label: str) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.label = label
        self.pos = 0
        self.end = len(self.view)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise FormatError(f"{self.label}: value at byte {self.pos} needs {n} bytes, "
                              f"{self.end - self.pos} left (file truncated?)")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, n: int, what: str) -> int:
        if n > self.end - self.pos:  # every element takes at least one byte
            raise FormatError(f"{self.label}: {what} at byte {self.pos} claims {n} elements, "
                              f"only {self.end - self.pos} bytes left")
        return n

    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise FormatError(f"{self.label}: values nested more than {_MAX_DEPTH} deep")
        at = self.pos
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sized = {0xC4: "<B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I",
                 0xDC: ">H", 0xDD: ">I", 0xDE: ">H", 0xDF: ">I"}
        if b in sized:
            n = self.unpack(sized[b])
            if b <= 0xC6:
                return self.take(n)
            if b <= 0xDB:
                return self.text(n)
            if b <= 0xDD:
                return self.array(n, depth)
            return self.map(n, depth)
        numbers = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in numbers:
            return self.unpack(numbers[b])
        if 0xD4 <= b <= 0xD8:
            return self.ext(1 << (b - 0xD4), depth)
        if 0xC7 <= b <= 0xC9:
            return self.ext(self.unpack({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b]), depth)
        raise FormatError(f"{self.label}: byte {at} holds 0x{b:02x}, which msgpack never uses")

    def text(self, n: int) -> str:
        raw = self.take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.label}: string at byte {self.pos - n} is not UTF-8") from e

    def array(self, n: int, depth: int) -> list[Any]:
        return [self.value(depth + 1) for _ in range(self.count(n, "array"))]

    def map(self, n: int, depth: int) -> Any:
        out: dict[Any, Any] = {}
        for _ in range(self.count(n, "map")):
            at = self.pos
            key = self.value(depth + 1)
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise FormatError(f"{self.label}: map key at byte {at} is a "
                                  f"{type(key).__name__}, expected a string")
            if key in out:
                raise FormatError(f"{self.label}: map key {key!r} appears twice (byte {at})")
            out[key] = self.value(depth + 1)
        if out.get(CHUNKED) is True:
            return _unchunk(out, self.label)
        return out

    def ext(self, n: int, depth: int) -> Any:
        code = self.unpack("b")
        start = self.pos
        self.take(n)
        sub = _Reader(self.buf, self.label)
        sub.pos, sub.end = start, start + n
        payload = sub.value(depth + 1)
        if sub.pos != sub.end:
            raise FormatError(f"{self.label}: extension at byte {start} has trailing bytes")
        if code in (1, 3):  # an array, or a NumPy scalar packed as a 0-d array
            return _ndarray(payload, self.label, start)
        if code == 2:
            raise UnsupportedError(f"{self.label}: complex number at byte {start}: complex "
                                   "values are not supported")
        raise UnsupportedError(f"{self.label}: msgpack extension type {code} at byte {start} "
                               "is not one Flax writes")


def _dtype(name: Any, label: str, at: int) -> np.dtype[Any]:
    if not isinstance(name, str):
        raise FormatError(f"{label}: array at byte {at}: dtype is a {type(name).__name__}")
    if name in _UNSAFE_DTYPES or name.lstrip("<>|=").startswith(("O", "V", "object")):
        raise UnsafeInputError(f"{label}: array at byte {at} has dtype {name!r}: object arrays "
                               "would be unpickled, which weightatlas never does")
    if name not in DTYPES:
        raise UnsupportedError(f"{label}: array at byte {at} has dtype {name!r}, not one of "
                               f"{', '.join(DTYPES)}")
    return np.dtype(DTYPES[name])


def _ndarray(payload: Any, label: str, at: int) -> np.ndarray:
    if not (isinstance(payload, list) and len(payload) == 3):
        raise FormatError(f"{label}: array at byte {at}: expected [shape, dtype, bytes]")
    shape, name, data = payload
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ShapeError(f"{label}: array at byte {at}: shape {shape!r:.80} is not a list of "
                         "non-negative integers")
    dtype = _dtype(name, label, at)
    if not isinstance(data, memoryview):
        raise FormatError(f"{label}: array at byte {at}: data is not binary")
    numel = int(np.prod(shape, dtype=object))
    if numel * dtype.itemsize != len(data):
        raise ShapeError(f"{label}: array at byte {at}: shape {shape} {name} needs "
                         f"{numel * dtype.itemsize} bytes, found {len(data)}")
    array = np.frombuffer(data, dtype).reshape(shape) if numel else np.zeros(shape, dtype)
    if not array.flags.aligned:
        array = array.copy()
    array.flags.writeable = False
    return array


def _unchunk(value: dict[Any, Any], label: str) -> np.ndarray:
    shape_d, chunks_d = value.get("shape"), value.get("chunks")
    if not isinstance(shape_d, dict) or not isinstance(chunks_d, dict):
        raise FormatError(f"{label}: chunked array without 'shape' and 'chunks' maps")
    try:
        shape = [shape_d[str(i)] for i in range(len(shape_d))]
        chunks = [chunks_d[str(i)] for i in range(len(chunks_d))]
    except KeyError as e:
        raise FormatError(f"{label}: chunked array: index {e} missing") from e
    if not all(isinstance(c, np.ndarray) for c in chunks) or not chunks:
        raise FormatError(f"{label}: chunked array: chunks must be arrays")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ShapeError(f"{label}: chunked array: shape {shape!r:.80} is not a list of sizes")
    dtypes = {c.dtype for c in chunks}
    numel = int(np.prod(shape, dtype=object))
    total = sum(c.size for c in chunks)
    if len(dtypes) != 1 or total != numel:
        raise ShapeError(f"{label}: chunked array: chunks hold {total} values of "
                         f"{sorted(map(str, dtypes))}, shape {shape} needs {numel} of one dtype")
    out = np.concatenate([c.reshape(-1) for c in chunks]).reshape(shape)
    out.flags.writeable = False
    return out


def parse(buf: Any, label: str) -> Any:
    """Parse one msgpack value filling ``buf`` (bytes or a memory map).

    Example:
        >>> import flax.serialization
        >>> raw = flax.serialization.to_bytes({"Dense_0": {"kernel": np.ones((2, 3))}})
        >>> parse(raw, "m.msgpack")["Dense_0"]["kernel"].shape
        (2, 3)
    """
    reader = _Reader(buf, label)
    try:
        value = reader.value()
    except RecursionError as e:  # a deep tree on a small stack: still a malformed input
        raise FormatError(f"{label}: values nested too deeply") from e
    if reader.pos != reader.end:
        raise FormatError(f"{label}: {reader.end - reader.pos} trailing bytes after the value "
                          f"(byte {reader.pos})")
    return value
