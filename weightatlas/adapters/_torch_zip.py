"""The zip archive of ``torch.save`` (and ``torch.jit.save``), checked and memory-mapped.

Since PyTorch 1.6 a checkpoint is a zip file: ``<prefix>/data.pkl`` (the pickle),
``<prefix>/data/<key>`` (one uncompressed entry per storage, aligned to 64 bytes),
``<prefix>/byteorder``, ``<prefix>/version``; TorchScript adds ``constants.pkl`` and
``code/``. Before anything is read, the central directory is checked: one top-level
folder, no absolute or ``..`` names (:class:`~weightatlas.errors.PathEscapeError`), no
duplicate names, every local header where the directory says and matching it, and
no two entries overlapping (CVE-2024-0450's zip quines). Storages are handed out as
NumPy views over one read-only memory map, after checking that each tensor's shape,
stride and offset stay inside its storage (the CVE-2026-24747 class of bugs).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from weightatlas.adapters._torch_pickle import StorageRef, TensorRef
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    PathEscapeError,
    ResourceLimitError,
    ShapeError,
    UnsafeInputError,
    UnsupportedError,
    WeightAtlasError,
)
from weightatlas.storage import DTYPES

__all__ = ["MAX_MEMBER_BYTES", "Archive", "Member"]

#: Largest compressed member (pickle, code) decompressed into memory.
MAX_MEMBER_BYTES = 1 << 30
_MAX_RATIO = 1000
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


@dataclass(frozen=True)
class Member:
    """One zip entry: where its bytes start in the file and how they are stored."""

    name: str
    start: int  #: first data byte (after the local header)
    size: int  #: stored (compressed) size
    file_size: int  #: uncompressed size
    method: int


def _check_name(label: str, name: str) -> None:
    parts = name.split("/")
    if "\x00" in name or "\\" in name or name.startswith("/") or ".." in parts or (
        len(name) > 1 and name[1] == ":"
    ):
        raise PathEscapeError(f"{label}: archive entry {name!r} is not a plain relative path")


class Archive:
    """A checked, memory-mapped PyTorch zip archive."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{path}: no such file") from None
        except OSError as e:
            raise WeightAtlasError(f"{path}: cannot read: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO or special file"
                raise UnsafeInputError(f"{path}: expected a regular file, found {kind}")
            self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self.size = st.st_size
            if self.size < 22:
                raise FormatError(f"{path}: {self.size} bytes, too short for a PyTorch "
                                  "checkpoint (a zip archive)")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise WeightAtlasError(f"{path}: cannot map: {e.strerror or e}") from e
        finally:
            os.close(fd)
        try:
            self._check_magic()
            self.members = self._directory()
        except BaseException:
            self.close()
            raise
        first = next(iter(self.members))
        self.prefix = first.split("/", 1)[0]

    def close(self) -> None:
        """Unmap the file (arrays still viewing it keep the map alive)."""
        with contextlib.suppress(BufferError):
            self.mm.close()

    # ---- validation --------------------------------------------------------------------
    def _check_magic(self) -> None:
        head = self.mm[:512]
        if head.startswith(b"PK\x03\x04"):
            return
        if head.startswith(_LEGACY_MAGIC) or head[:1] == b"\x80":
            raise FormatError(
                f"{self.label}: legacy (pre-1.6) torch.save format; it can only be read by "
                "unpickling it with PyTorch, which weightatlas refuses; re-save it with "
                "torch >= 1.6 (or as safetensors) in a trusted environment"
            )
        if head[257:262] == b"ustar":
            raise FormatError(f"{self.label}: a tar archive (the oldest torch.save format); "
                              "re-save it with torch >= 1.6 or as safetensors")
        raise FormatError(f"{self.label}: not a PyTorch checkpoint: expected a zip archive "
                          f"(bytes 'PK\\x03\\x04'), found {bytes(head[:4])!r}")

    def _directory(self) -> dict[str, Member]:
        try:
            with zipfile.ZipFile(_MapReader(self.mm)) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
                struct.error, NotImplementedError) as e:
            raise FormatError(f"{self.label}: damaged zip archive: {e}") from e
        if not infos:
            raise FormatError(f"{self.label}: empty zip archive")
        members: dict[str, Member] = {}
        spans: list[tuple[int, int, str]] = []
        prefixes = set()
        for info in infos:
            name = info.filename
            _check_name(self.label, name)
            if name in members:
                raise FormatError(f"{self.label}: archive entry {name!r} appears twice")
            prefixes.add(name.split("/", 1)[0] if "/" in name else "")
            if info.flag_bits & 0x1:
                raise UnsupportedError(f"{self.label}: entry {name!r} is encrypted")
            start = self._local_header(info)
            end = start + info.compress_size
            if end > self.size:
                raise FormatError(f"{self.label}: entry {name!r} runs past the end of the file "
                                  f"(ends at {end}, file has {self.size} bytes; truncated?)")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise FormatError(f"{self.label}: stored entry {name!r} has compressed size "
                                  f"{info.compress_size} != size {info.file_size}")
            members[name] = Member(name, start, info.compress_size, info.file_size,
                                   info.compress_type)
            spans.append((info.header_offset, end, name))
        if len(prefixes) != 1 or "" in prefixes:
            raise FormatError(f"{self.label}: expected every entry in one top-level folder, "
                              f"found {sorted(prefixes)[:5]}")
        spans.sort()
        for (_, end, name), (start, _, other) in itertools.pairwise(spans):
            if start < end:
                raise FormatError(f"{self.label}: archive entries {name!r} and {other!r} "
                                  "overlap (a crafted zip)")
        return members

    def _local_header(self, info: zipfile.ZipInfo) -> int:
        at = info.header_offset
        if at < 0 or at + _LOCAL.size > self.size:
            raise FormatError(f"{self.label}: entry {info.filename!r}: local header at {at} "
                              "is outside the file")
        fields = _LOCAL.unpack_from(self.mm, at)
        if fields[0] != b"PK\x03\x04":
            raise FormatError(f"{self.label}: entry {info.filename!r}: no local header at {at}")
        name_len, extra_len = fields[9], fields[10]
        raw = self.mm[at + _LOCAL.size : at + _LOCAL.size + name_len]
        if raw.decode("utf-8", "replace") != info.filename and raw != info.orig_filename.encode(
            "cp437", "replace"
        ):
            raise FormatError(f"{self.label}: entry {info.filename!r}: local header names "
                              f"{raw[:80]!r}")
        return at + _LOCAL.size + name_len + extra_len

    # ---- reading -----------------------------------------------------------------------
    def has(self, rel: str) -> bool:
        return f"{self.prefix}/{rel}" in self.members

    def names(self, under: str) -> list[str]:
        """Entry names (relative to the prefix) that start with ``under``."""
        cut = len(self.prefix) + 1
        return [n[cut:] for n in self.members if n[cut:].startswith(under)]

    def read(self, rel: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
        """The bytes of ``<prefix>/<rel>``, decompressed if needed, within ``limit``."""
        name = f"{self.prefix}/{rel}"
        m = self.members.get(name)
        if m is None:
            raise FormatError(f"{self.label}: archive has no {name!r}")
        if m.file_size > limit:
            raise ResourceLimitError(f"{self.label}: entry {name!r} holds {m.file_size} bytes, "
                                     f"the limit is {limit}")
        raw = self.mm[m.start : m.start + m.size]
        if m.method == zipfile.ZIP_STORED:
            return raw
        if m.method != zipfile.ZIP_DEFLATED:
            raise UnsupportedError(f"{self.label}: entry {name!r} uses compression {m.method}")
        if m.file_size > max(m.size, 1) * _MAX_RATIO:
            raise ResourceLimitError(f"{self.label}: entry {name!r} claims a compression ratio "
                                     f"above {_MAX_RATIO}:1")
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw, m.file_size + 1)
        except zlib.error as e:
            raise FormatError(f"{self.label}: entry {name!r}: cannot decompress: {e}") from e
        if len(out) != m.file_size:
            raise FormatError(f"{self.label}: entry {name!r} decompresses to {len(out)}+ bytes, "
                              f"its header says {m.file_size}")
        return out

    def byteorder(self) -> str:
        if not self.has("byteorder"):
            return "little"
        order = self.read("byteorder", 16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise FormatError(f"{self.label}: byteorder says {order!r}, expected little or big")
        return order

    def storage(self, ref: StorageRef, dtype: str) -> tuple[int, int]:
        """Validate a storage entry; return (first byte in the file, size in bytes)."""
        name = f"{self.prefix}/data/{ref.key}"
        m = self.members.get(name)
        if m is None:
            raise FormatError(f"{self.label}: storage {ref.key!r} is referenced by the pickle, "
                              f"but the archive has no {name!r}")
        if m.method != zipfile.ZIP_STORED:
            raise UnsupportedError(f"{self.label}: storage {name!r} is compressed; PyTorch "
                                   "writes storages uncompressed")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        declared = ref.numel * (itemsize if ref.dtype is not None else 1)
        if m.size < declared:
            unit = f"{ref.dtype} values" if ref.dtype else "bytes"
            raise ShapeError(f"{self.label}: storage {ref.key!r} holds {m.size} bytes, the "
                             f"pickle declares {ref.numel} {unit} ({declared} bytes)")
        return m.start, m.size

    def tensor(self, ref: TensorRef, name: str, big_endian: bool) -> np.ndarray:
        """A read-only view of one tensor (a copy only when unaligned or big-endian)."""
        start, nbytes = self.storage(ref.storage, ref.dtype)
        dtype = np.dtype(DTYPES[ref.dtype])
        if big_endian:
            dtype = dtype.newbyteorder(">")
        itemsize = dtype.itemsize
        count = nbytes // itemsize
        numel = 1
        for d in ref.shape:
            if d < 0:
                raise ShapeError(
                    f"{self.label}: tensor {name!r}: negative size {list(ref.shape)}")
            numel *= d
        if any(s < 0 for s in ref.stride):
            raise ShapeError(
                f"{self.label}: tensor {name!r}: negative stride {list(ref.stride)}")
        if numel:
            reach = ref.offset + sum(
                (d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))
            if reach >= count:
                raise ShapeError(
                    f"{self.label}: tensor {name!r}: shape {list(ref.shape)}, stride "
                    f"{list(ref.stride)} and offset {ref.offset} reach element {reach}, storage "
                    f"{ref.storage.key!r} holds {count} {ref.dtype} values"
                )
        else:
            return np.zeros(ref.shape, dtype.newbyteorder("<"))
        flat = np.frombuffer(self.mm, dtype, count, start)
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], ref.shape, tuple(s * itemsize for s in ref.stride), writeable=False
        )
        if big_endian or not view.flags.aligned:
            view = view.astype(dtype.newbyteorder("<"))  # a copy, aligned and little-endian
            view.flags.writeable = False
        return view

    def release(self, ref: StorageRef) -> None:
        """Drop a storage's mapped pages from this process (the page cache keeps them)."""
        m = self.members.get(f"{self.prefix}/data/{ref.key}")
        if m is None or self.mm.closed or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = (m.start + page - 1) // page * page
        hi = (m.start + m.size) // page * page
        if hi > lo:
            with contextlib.suppress(OSError, ValueError):
                self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _MapReader:
    """A minimal seekable file over a memory map, for ``zipfile`` (no copy of the file)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.mm)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.mm) if n is None or n < 0 else min(len(self.mm), self.pos + n)
        out = self.mm[self.pos : end]
        self.pos = max(self.pos, end)
        return out

    def seekable(self) -> bool:
        return True
