"""Parse and validate a safetensors header and a sharded checkpoint's index, from bytes.

Pure functions over bytes (no file access), so that every check can be tested and
fuzzed on its own. The checks follow the reference ``safetensors/src/tensor.rs``
(``read_metadata`` and ``Metadata::validate``) and go further where its audit asked
to: duplicate keys are rejected at every level (the Rust parser keeps the last
top-level one, Python's ``json`` too: TOB-SFTN-7), an entry must hold exactly
``dtype``, ``shape`` and ``data_offsets``, and the tensor count is capped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from weightatlas.errors import FormatError, ResourceLimitError, ShapeError, UnsupportedError
from weightatlas.storage import DTYPES, MAX_NDIM

__all__ = [
    "DEFAULT_MAX_TENSORS",
    "DTYPE_CODES",
    "MAX_HEADER_BYTES",
    "Entry",
    "parse_header",
    "parse_index",
]

#: The reference implementation's ``MAX_HEADER_SIZE``.
MAX_HEADER_BYTES = 100_000_000
#: Default cap on tensors per file and per checkpoint. The largest public checkpoints
#: hold about 100,000 (DeepSeek-V3); a 200,000-entry header is a known DoS input.
DEFAULT_MAX_TENSORS = 150_000

#: safetensors dtype code -> canonical dtype name, in the reference ``Dtype`` enum order
#: (increasing alignment), which the writer's sort relies on.
DTYPE_CODES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
_KEYS = ("data_offsets", "dtype", "shape")


@dataclass(frozen=True)
class Entry:
    """One validated header entry; offsets are relative to the data section."""

    name: str
    dtype: str  #: canonical name
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def count(self) -> int:
        """Number of elements (a Python int, never overflowing)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


class _TooManyObjectsError(Exception):
    pass


class _DuplicateKeyError(Exception):
    def __init__(self, key: str, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(key)
        self.key = key
        self.nested = all(k in _KEYS for k, _ in pairs)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key, pairs)
            seen.add(key)
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _load_json(raw: bytes, label: str, what: str, max_objects: int | None = None) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{label}: {what} is not valid UTF-8 (byte {e.start}: {e.reason})") from e
    count = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Counting objects as they are built bounds memory and time whatever the text
        # looks like (a count of the raw bytes misses keys written with JSON escapes).
        nonlocal count
        count += 1
        if max_objects is not None and count > max_objects:
            raise _TooManyObjectsError
        return _no_duplicates(pairs)

    try:
        return json.loads(text, object_pairs_hook=hook, parse_constant=_no_constants)
    except _TooManyObjectsError:
        raise ResourceLimitError(
            f"{label}: {what} holds more than {max_objects} JSON objects; at most one per "
            "tensor is allowed (raise max_tensors)"
        ) from None
    except _DuplicateKeyError as e:
        if e.nested or what != "header":
            raise FormatError(
                f"{label}: {what} repeats the key {e.key!r} in one object; "
                "duplicate keys are not allowed (parsers disagree on which one wins)"
            ) from None
        raise FormatError(
            f"{label}: tensor {e.key!r}: appears twice in the {what}; duplicate keys are "
            "not allowed (parsers disagree on which one wins)"
        ) from None
    except RecursionError:
        raise FormatError(f"{label}: {what} is nested too deeply to be JSON") from None
    except ValueError as e:
        raise FormatError(f"{label}: {what} is not valid JSON: {e}") from e


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_str(s: str, label: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{label}: {what} {s!r} is not valid UTF-8 (lone surrogate)") from None


def _entry(name: str, info: object, label: str) -> Entry:
    where = f"{label}: tensor {name!r}"
    _check_str(name, label, "tensor name")
    if not name or "\x00" in name:
        raise FormatError(f"{where}: expected a non-empty name without NUL characters")
    if not isinstance(info, dict):
        raise FormatError(f"{where}: expected an object, found {type(info).__name__}")
    if tuple(sorted(info)) != _KEYS:
        raise FormatError(
            f"{where}: expected exactly the keys dtype, shape, data_offsets, found "
            f"{', '.join(map(repr, info)) or 'none'}"
        )
    code = info["dtype"]
    if not isinstance(code, str):
        raise FormatError(f"{where}: expected dtype to be a string, found {code!r}")
    if code not in DTYPE_CODES:
        raise UnsupportedError(
            f"{where}: dtype {code!r} is not supported; expected one of {', '.join(DTYPE_CODES)}"
        )
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ShapeError(
            f"{where}: expected shape to be a list of non-negative ints, found {shape!r}"
        )
    if len(shape) > MAX_NDIM:
        raise ShapeError(f"{where}: shape has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise FormatError(
            f"{where}: expected data_offsets to be two non-negative ints [begin, end], "
            f"found {offsets!r}"
        )
    begin, end = offsets
    if begin > end:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}]: expected begin <= end")
    return Entry(name, DTYPE_CODES[code], tuple(shape), begin, end)


def parse_header(
    raw: bytes, label: str, max_tensors: int = DEFAULT_MAX_TENSORS
) -> tuple[dict[str, str] | None, list[Entry]]:
    """Validate the JSON header of a safetensors file.

    Args:
        raw: The header bytes (after the 8-byte length).
        label: The file, for messages.
        max_tensors: Most entries accepted.

    Returns:
        ``(__metadata__ or None, entries sorted by offset)``. The caller still checks
        that the last ``end`` equals the size of the data section.

    Example:
        >>> parse_header(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "m")
        (None, [Entry(name='w', dtype='float32', shape=(2,), begin=0, end=8)])
    """
    # Cheap upper bound first, so a 200,000-entry header is refused before json parses it.
    if raw.count(b'"data_offsets"') > max_tensors:
        raise ResourceLimitError(
            f"{label}: header lists more than {max_tensors} tensors (raise max_tensors)"
        )
    # One object per tensor, plus the header itself and __metadata__.
    header = _load_json(raw, label, "header", max_objects=max_tensors + 2)
    if not isinstance(header, dict):
        raise FormatError(
            f"{label}: expected the header to be a JSON object, found {type(header).__name__}"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FormatError(
                f"{label}: expected __metadata__ to map strings to strings, found {metadata!r:.200}"
            )
        for k, v in metadata.items():
            _check_str(k, label, "metadata key")
            _check_str(v, label, "metadata value")
    if len(header) > max_tensors:
        raise ResourceLimitError(
            f"{label}: header lists {len(header)} tensors, the limit is {max_tensors}"
        )
    entries = sorted(
        (_entry(name, info, label) for name, info in header.items()),
        key=lambda e: (e.begin, e.end, e.name),
    )
    position = 0
    previous: Entry | None = None
    for e in entries:
        if e.begin != position:
            if previous is None:
                problem = "expected the first tensor to begin at 0"
            elif e.begin > position:
                problem = (
                    f"gap of {e.begin - position} bytes after tensor {previous.name!r} "
                    f"(which ends at {position}): expected begin {position}"
                )
            else:
                problem = (
                    f"overlap with tensor {previous.name!r} (which ends at {position}): "
                    f"expected begin {position}"
                )
            raise FormatError(
                f"{label}: tensor {e.name!r}: data_offsets [{e.begin}, {e.end}]: {problem}, "
                f"found {e.begin}"
            )
        itemsize = DTYPES[e.dtype].itemsize
        need = e.count * itemsize
        if e.end - e.begin != need:
            raise ShapeError(
                f"{label}: tensor {e.name!r}: data_offsets [{e.begin}, {e.end}] hold "
                f"{e.end - e.begin} bytes, shape {list(e.shape)} {e.dtype} needs {need}"
            )
        position = e.end
        previous = e
    return metadata, entries


def parse_index(
    raw: bytes, label: str, max_tensors: int = DEFAULT_MAX_TENSORS
) -> tuple[dict[str, str], Any]:
    """Validate a sharded checkpoint's ``*.safetensors.index.json``.

    Returns:
        ``(weight_map, the "metadata" member or None)``; shard names are checked by
        the caller, which knows the folder.

    Example:
        >>> parse_index(b'{"weight_map": {"w": "a.safetensors"}}', "i.json")
        ({'w': 'a.safetensors'}, None)
    """
    index = _load_json(raw, label, "index")
    if not isinstance(index, dict):
        raise FormatError(f"{label}: expected a JSON object, found {type(index).__name__}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(
            f"{label}: expected a 'weight_map' object of tensor -> shard file, found "
            f"{type(weight_map).__name__}"
        )
    if len(weight_map) > max_tensors:
        raise ResourceLimitError(
            f"{label}: weight_map lists {len(weight_map)} tensors, the limit is {max_tensors}"
        )
    for tensor, shard in weight_map.items():
        _check_str(tensor, label, "tensor name")
        if not isinstance(shard, str):
            raise FormatError(
                f"{label}: tensor {tensor!r}: expected a shard file name, found {shard!r:.100}"
            )
    return weight_map, index.get("metadata")
