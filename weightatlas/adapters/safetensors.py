"""Read and write safetensors files, one file or a sharded checkpoint.

The header is parsed here, in Python, and checked the way the reference Rust
implementation (``safetensors/src/tensor.rs``) checks it, plus what its audit asked
for: header size cap, duplicate keys rejected (TOB-SFTN-7), tensor-count cap,
shape products and byte sizes in Python ints (no overflow), offsets contiguous from
0 with no gap or overlap, and header plus data filling the file exactly. Every check
runs before any tensor byte is read, and each failure is a
:class:`~weightatlas.errors.WeightAtlasError` naming the file and the tensor.

Tensors are handed out as read-only NumPy views over one memory map per file. Pages
of a tensor are released with ``MADV_DONTNEED`` (the page cache keeps them) once the
consumer has moved two tensors past it (the store writes one tensor while it reads
the next), so reading a many-GB file keeps the process RSS flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightatlas.adapters import _naming
from weightatlas.adapters._files import (
    check_unchanged,
    ident,
    open_regular,
    os_error,
    read_at,
    sha256_file,
)
from weightatlas.adapters._safetensors_header import (
    DEFAULT_MAX_TENSORS,
    DTYPE_CODES,
    MAX_HEADER_BYTES,
    Entry,
    parse_header,
    parse_index,
)
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    PathEscapeError,
    ResourceLimitError,
    UnsupportedError,
    WeightAtlasError,
)
from weightatlas.storage import DTYPES, SourceFile, TensorRecord, dtype_name

__all__ = ["DEFAULT_MAX_TENSORS", "MAX_HEADER_BYTES", "SafetensorsSource", "read", "write"]

_HASH_CHUNK = 8 << 20
#: Reference dtype order (``Dtype`` enum): the writer sorts by it, descending.
_RANK = {code: i for i, code in enumerate(DTYPE_CODES)}
_CANONICAL_TO_CODE = {name: code for code, name in DTYPE_CODES.items()}


@dataclass
class _Shard:
    label: str  #: the path as given or joined, for messages
    name: str  #: path relative to the checkpoint folder, "/"-separated
    real: str  #: resolved path, re-opened for hashing
    ident: tuple[int, int, int, int]  #: (st_dev, st_ino, st_size, st_mtime_ns) when read
    data_start: int
    entries: list[Entry]
    metadata: dict[str, str] | None
    mm: mmap.mmap | None


def _load_shard(
    path: str, label: str, name: str, *, nofollow: bool, max_header_bytes: int, max_tensors: int
) -> _Shard:
    """Open, validate and memory-map one safetensors file."""
    fd, st = open_regular(path, label, nofollow=nofollow)
    try:
        size = st.st_size
        if size < 8:
            raise FormatError(
                f"{label}: file has {size} bytes, a safetensors file needs at least 8 "
                "(the header length)"
            )
        n = int.from_bytes(read_at(fd, 0, 8, label), "little")
        if n > max_header_bytes:
            raise ResourceLimitError(
                f"{label}: header length {n} bytes exceeds the limit of {max_header_bytes} "
                "(raise max_header_bytes if the file is trusted)"
            )
        if n > size - 8:
            raise FormatError(
                f"{label}: header length {n} bytes runs past the end of the file: expected "
                f"at most {size - 8}, found {n} (file truncated?)"
            )
        metadata, entries = parse_header(read_at(fd, 8, n, label), label, max_tensors)
        data_len = size - 8 - n
        end = entries[-1].end if entries else 0
        if end != data_len:
            what = "trailing bytes after the last tensor" if end < data_len else "truncated"
            raise FormatError(
                f"{label}: tensor data ends at byte {end} of the data section, the file holds "
                f"{data_len} bytes after the header: expected {end}, found {data_len} ({what})"
            )
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if data_len else None
        except (OSError, ValueError) as e:
            raise WeightAtlasError(f"{label}: cannot memory-map: {e}") from e
        if mm is not None and len(mm) != size:
            mm.close()
            raise FormatError(f"{label}: file changed size while being read")
    finally:
        os.close(fd)
    real = os.path.realpath(path)
    return _Shard(label, name, real, ident(st), 8 + n, entries, metadata, mm)


def _sha256(shard: _Shard, buf: bytearray) -> str:
    """Stream a shard through sha256 in chunks of ``buf``, checking it did not change."""
    return sha256_file(shard.real, shard.label, shard.ident, buf)


def _drop(mm: mmap.mmap, start: int, stop: int) -> None:
    """Release mapped pages in [start, stop) from this process (the page cache keeps them)."""
    if stop > start and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        # Advice only: a closed map or an odd platform loses nothing.
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


class SafetensorsSource:
    """A validated safetensors file or sharded checkpoint, read as a ``TensorSource``.

    Made by :func:`read`. Iterating :meth:`records` yields read-only views over the
    memory-mapped files, in file order; it may be iterated again. :meth:`source_files`
    hashes the files through their own handles, so it can run in another thread while
    :meth:`records` is being consumed.
    """

    framework = "safetensors"

    def __init__(
        self, label: str, shards: list[_Shard], index: tuple[str, bytes, Any] | None = None
    ) -> None:
        self.label = label
        self._shards = shards
        self._index = index  # (name, bytes read, parsed "metadata" or None)
        self._shapes = {e.name: e.shape for s in shards for e in s.entries}
        self._lock = threading.Lock()
        self._files: list[SourceFile] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SafetensorsSource({self.label!r}, tensors={len(self._shapes)}, "
            f"shards={len(self._shards)})"
        )

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the files (maps still viewed by live arrays are left to the GC)."""
        self._closed = True
        for shard in self._shards:
            if shard.mm is not None:
                with contextlib.suppress(BufferError):  # arrays handed out still use it
                    shard.mm.close()

    def names(self) -> list[str]:
        """Tensor names in the order :meth:`records` yields them."""
        return [e.name for s in self._shards for e in s.entries]

    def records(self) -> Iterator[TensorRecord]:
        """Yield one :class:`TensorRecord` per tensor, shard by shard, in offset order.

        A record stays valid until the record after next is asked for (the store writes
        one while it reads the next); its pages are released then, the last ones when
        the source is closed.
        """
        if self._closed:
            raise WeightAtlasError(f"{self.label}: source is closed")
        page = mmap.PAGESIZE
        tail: tuple[mmap.mmap, int, int] | None = None  # the previous shard's last pages
        for shard in self._shards:
            mm = shard.mm
            released = 0
            for entry in shard.entries:
                start = shard.data_start + entry.begin
                yield self._record(shard, entry, mm)
                # The next record is asked for: release every record before this one.
                if tail is not None:
                    _drop(*tail)
                    tail = None
                if mm is not None:
                    floor = start - start % page
                    _drop(mm, released, floor)
                    released = max(released, floor)
            if mm is not None:
                tail = (mm, released, len(mm))

    keeps_previous = True  #: (see records)

    def _record(self, shard: _Shard, entry: Entry, mm: mmap.mmap | None) -> TensorRecord:
        dtype = DTYPES[entry.dtype]
        count = entry.count
        if count == 0 or mm is None:
            data = np.zeros(entry.shape, dtype)
            data.flags.writeable = False
        else:
            try:
                flat = np.frombuffer(mm, dtype, count, shard.data_start + entry.begin)
                data = flat.reshape(entry.shape)
            except ValueError as e:  # a closed map, or a rank numpy cannot hold
                raise FormatError(
                    f"{shard.label}: tensor {entry.name!r}: cannot view the data: {e}"
                ) from e
            if not data.flags.aligned:
                data = data.copy()  # 1-aligned writers exist; keep every array aligned
        kind, layout = _naming.infer(entry.name, entry.shape, self._shapes)
        source_layout = layout
        if kind == "conv_transpose" and data.ndim >= 3:
            # PyTorch keeps ConvTranspose weights [in, out, *spatial]; the canonical conv
            # layout is [out, in, *spatial]: a transposed view, restored on request.
            data = data.swapaxes(0, 1)
            layout = (layout[1], layout[0], *layout[2:])
        try:
            return TensorRecord(entry.name, data, kind=kind, layout=layout,
                                source_layout=source_layout)
        except WeightAtlasError as e:
            raise type(e)(f"{shard.label}: {e}") from e

    def source_file_list(self) -> list[tuple[str, int]]:
        """The files :meth:`source_files` hashes, as ``(name, size)``, without hashing."""
        files = [(self._index[0], len(self._index[1]))] if self._index is not None else []
        return files + [(shard.name, shard.ident[2]) for shard in self._shards]

    def check_files_unchanged(self) -> None:
        """Refuse a shard that changed since it was read (the index was read whole)."""
        check_unchanged([(shard.real, shard.label, shard.ident) for shard in self._shards])

    def source_files(self) -> list[SourceFile]:
        """Every file read (the index first, then each shard), with size and sha256."""
        with self._lock:
            if self._files is None:
                files: list[SourceFile] = []
                if self._index is not None:
                    name, raw, _ = self._index
                    files.append(SourceFile(name, len(raw), hashlib.sha256(raw).hexdigest()))
                buf = bytearray(_HASH_CHUNK)  # one buffer for every file: flat RSS
                for shard in self._shards:
                    files.append(SourceFile(shard.name, shard.ident[2], _sha256(shard, buf)))
                self._files = files
            return list(self._files)

    def metadata(self) -> Mapping[str, Any]:
        """JSON-safe facts: the format, the shard count and the ``__metadata__`` strings."""
        facts: dict[str, Any] = {"format": "safetensors", "shards": len(self._shards)}
        per_shard = {s.name: dict(s.metadata or {}) for s in self._shards}
        values = list(per_shard.values())
        if all(v == values[0] for v in values[1:]):
            facts["metadata"] = values[0] if values else {}
        else:
            facts["metadata"] = {}
            facts["shard_metadata"] = per_shard
        if self._index is not None:
            facts["index"] = self._index[0]
            if isinstance(self._index[2], dict):
                facts["index_metadata"] = self._index[2]
        return facts

    def attachments(self) -> Mapping[str, bytes]:
        """safetensors files carry no graph: nothing is attached."""
        return {}

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(e.end - e.begin for s in self._shards for e in s.entries)


def _resolve(path: Path) -> Path:
    """A folder becomes the checkpoint it holds: the index first, then a single file."""
    if not path.is_dir():
        return path
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (path / name).is_file():
            return path / name
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise os_error(str(path), e) from e
    for suffix in (".safetensors.index.json", ".safetensors"):
        found = [n for n in names if n.endswith(suffix)]
        if len(found) == 1:
            return path / found[0]
        if found:
            raise NotFoundError(
                f"{path}: expected model.safetensors or model.safetensors.index.json, found "
                f"{len(found)} candidates ({', '.join(found[:5])}); pass one of them"
            )
    raise NotFoundError(
        f"{path}: expected model.safetensors or model.safetensors.index.json in this folder"
    )


def _shard_path(folder: str, name: object, index_label: str, tensor: str) -> tuple[str, str, str]:
    """Check one weight_map file name; return (joined path, resolved path, relative name)."""
    where = f"{index_label}: tensor {tensor!r}: shard {name!r}"
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: expected a file name, found {type(name).__name__}")
    if "\x00" in name:
        raise PathEscapeError(f"{where}: contains a NUL byte")
    drive = len(name) > 1 and name[1] == ":" and name[0].isalpha()
    if os.path.isabs(name) or name.startswith(("/", "\\")) or drive:
        raise PathEscapeError(f"{where}: expected a path relative to the index's folder")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathEscapeError(f"{where}: '..' leaves the index's folder")
    joined = os.path.join(folder, *[p for p in parts if p not in ("", ".")])
    real = os.path.realpath(joined)
    if os.path.commonpath([real, folder]) != folder or real == folder:
        raise PathEscapeError(
            f"{where}: resolves to {real}, outside {folder} (a symbolic link leaving the folder)"
        )
    return joined, real, "/".join(p for p in parts if p not in ("", "."))


def _read_sharded(index: Path, max_header_bytes: int, max_tensors: int) -> SafetensorsSource:
    label = str(index)
    fd, st = open_regular(label, label, nofollow=False)
    try:
        if st.st_size > max_header_bytes:
            raise ResourceLimitError(
                f"{label}: index has {st.st_size} bytes, the limit is {max_header_bytes}"
            )
        raw = read_at(fd, 0, st.st_size, label)
    finally:
        os.close(fd)
    weight_map, index_meta = parse_index(raw, label, max_tensors)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(index)))
    by_shard: dict[str, tuple[str, str, set[str]]] = {}
    for tensor, shard_name in weight_map.items():
        joined, real, rel = _shard_path(folder, shard_name, label, tensor)
        by_shard.setdefault(rel, (joined, real, set()))[2].add(tensor)
    shards: list[_Shard] = []
    try:
        _load_shards(label, weight_map, by_shard, shards, max_header_bytes, max_tensors)
    except BaseException:
        SafetensorsSource(index.name, shards).close()  # unmap what was opened
        raise
    return SafetensorsSource(index.name, shards, (index.name, raw, index_meta))


def _load_shards(
    label: str,
    weight_map: Mapping[str, str],
    by_shard: Mapping[str, tuple[str, str, set[str]]],
    shards: list[_Shard],
    max_header_bytes: int,
    max_tensors: int,
) -> None:
    """Validate every shard against its header and the weight_map, appending to shards."""
    owner: dict[str, str] = {}
    total = 0
    for rel in sorted(by_shard):
        joined, real, listed = by_shard[rel]
        # Open the checked, resolved path without following links: a link swapped in
        # after the check is refused instead of followed out of the folder.
        shard = _load_shard(
            real,
            joined,
            rel,
            nofollow=True,
            max_header_bytes=max_header_bytes,
            max_tensors=max_tensors,
        )
        shards.append(shard)
        total += len(shard.entries)
        if total > max_tensors:
            raise ResourceLimitError(
                f"{label}: shards hold more than {max_tensors} tensors (raise max_tensors)"
            )
        for entry in shard.entries:
            if entry.name in owner:
                raise FormatError(
                    f"{label}: tensor {entry.name!r}: found in shard {owner[entry.name]!r} and "
                    f"again in {rel!r}; expected it in exactly one shard"
                )
            owner[entry.name] = rel
            if entry.name not in listed:
                raise FormatError(
                    f"{label}: tensor {entry.name!r}: present in shard {rel!r} but the "
                    f"weight_map lists it in {weight_map.get(entry.name, 'no shard')!r}"
                )
        missing = listed.difference(e.name for e in shard.entries)
        if missing:
            first = sorted(missing)[0]
            raise FormatError(
                f"{label}: tensor {first!r}: listed in the weight_map for shard {rel!r}, "
                f"not found in that shard ({len(missing)} missing)"
            )


def read(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> SafetensorsSource:
    """Open and validate a safetensors checkpoint without reading its tensor data.

    Args:
        path: A ``.safetensors`` file, a sharded checkpoint's ``*.safetensors.index.json``,
            or a folder holding ``model.safetensors.index.json`` or ``model.safetensors``.
        max_header_bytes: Largest header (and index file) accepted, in bytes.
        max_tensors: Most tensors accepted, per file and in all shards together.

    Returns:
        A :class:`SafetensorsSource` whose every header has been checked.

    Raises:
        NotFoundError: The path does not exist.
        FormatError: The file breaks the format (``ShapeError`` for shape vs bytes).
        ResourceLimitError: A header or the tensor count exceeds its limit.
        UnsupportedError: A dtype weightatlas cannot hold.
        PathEscapeError: A shard name points outside the index's folder.

    Example:
        >>> tmp = Path(tempfile.mkdtemp())
        >>> write({"fc.weight": np.ones((2, 3), np.float32)}, tmp / "m.safetensors")
        >>> src = read(tmp / "m.safetensors")
        >>> [(r.name, r.kind, r.layout) for r in src.records()]
        [('fc.weight', 'linear', ('out', 'in'))]
    """
    target = Path(os.fspath(path))
    if not os.path.lexists(target):
        raise NotFoundError(f"{target}: no such file or folder")
    try:
        target = _resolve(target)
    except OSError as e:
        raise os_error(str(target), e) from e
    if target.name.endswith(".json"):
        return _read_sharded(target, max_header_bytes, max_tensors)
    label = str(target)
    shard = _load_shard(
        label,
        label,
        target.name,
        nofollow=False,
        max_header_bytes=max_header_bytes,
        max_tensors=max_tensors,
    )
    return SafetensorsSource(target.name, [shard])


def write(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors as a safetensors file the reference implementation would produce.

    Tensors are sorted by descending dtype alignment, then by name; the header JSON is
    padded with spaces to a multiple of 8 bytes, so every tensor is aligned. Data is
    little-endian in C order. The file is written beside ``path`` and renamed into place.

    Example:
        >>> import ml_dtypes
        >>> tmp = Path(tempfile.mkdtemp())
        >>> write({"w": np.zeros((2, 2), ml_dtypes.bfloat16)}, tmp / "w.safetensors",
        ...       metadata={"format": "pt"})
        >>> read(tmp / "w.safetensors").metadata()["metadata"]
        {'format': 'pt'}
    """
    target = Path(os.fspath(path))
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise UnsupportedError(f"{target}: metadata must map str to str, found key {bad[0]!r}")
    items: list[tuple[int, str, str, np.ndarray]] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__" or "\x00" in name:
            raise UnsupportedError(f"{target}: tensor {name!r}: not a usable tensor name")
        array = np.asarray(value)
        code = _CANONICAL_TO_CODE[dtype_name(array.dtype)]  # UnsupportedError if unknown
        array = np.asarray(array, dtype=DTYPES[dtype_name(array.dtype)])  # little-endian
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-d)
        items.append((_RANK[code], name, code, array))
    items.sort(key=lambda item: (-item[0], item[1]))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for _, name, code, array in items:
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a model file is meant to be shared
        with open(fd, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for _, _, _, array in items:
                f.write(array.reshape(-1).view(np.uint8).data)
        os.replace(tmp, target)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise os_error(str(target), e) from e
