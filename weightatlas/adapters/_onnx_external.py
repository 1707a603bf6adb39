"""External data of an ONNX model: containment-checked, bounds-checked, memory-mapped.

ONNX keeps tensors over 2 GB (and any tensor the writer chose) in files beside the
model, named by ``external_data`` entries ``location``, ``offset`` and ``length``.
Those names come from the file, so they are untrusted (CVE-2022-25882,
CVE-2024-27318, CVE-2026-27489, CVE-2026-34445 were all escapes through them). The
checks, all made before any tensor byte is read:

- keys: only ``location``, ``offset``, ``length``, ``checksum`` and ``basepath``, each
  at most once; ``offset`` and ``length`` are decimal integers >= 0;
- ``location``: relative, no NUL byte, no backslash, no ``..`` component, and its
  resolved path (symbolic links followed) inside the model's folder;
- the file is opened without following a final symbolic link (so a link swapped in
  after the check is refused), must be a regular file with one hard link (a hard
  link can make a file from elsewhere appear inside the folder);
- ``length`` equals what the tensor's shape and type need, and ``offset + length``
  fits in the file.

Each file is mapped once; tensors are read as views over the map, and the pages of
a tensor are released (``MADV_DONTNEED``) once the consumer has moved two tensors
past it (the store writes one while it reads the next), so resident memory stays at
about two tensors whatever the model's size. ``checksum`` is not verified (ONNX
does not define over what it is taken, and onnx itself ignores it); ``basepath`` is
ignored.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightatlas.adapters._files import ident, open_regular, sha256_file
from weightatlas.errors import (
    FormatError,
    NotFoundError,
    PathEscapeError,
    ShapeError,
    WeightAtlasError,
)

__all__ = ["ExternalFiles", "Slice", "open_regular", "sha256_file"]

_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class Slice:
    """Where one tensor's bytes are in an external file."""

    file: str  #: location, normalised ("/"-separated, relative)
    offset: int
    length: int


@dataclass
class _File:
    name: str
    real: str
    ident: tuple[int, int, int, int]
    mm: mmap.mmap | None


def _integer(text: str, key: str, where: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise FormatError(f"{where}: external_data {key} {text!r} is not a non-negative integer")
    return int(text)


class ExternalFiles:
    """The external data files of one model, opened lazily, each checked and mapped once."""

    def __init__(self, folder: str, model_label: str) -> None:
        self.folder = os.path.realpath(folder)
        self.model_label = model_label
        self.files: dict[str, _File] = {}

    def _check_location(self, location: str, where: str) -> tuple[str, str]:
        """A location's normalised name and resolved path, or ``PathEscapeError``."""
        if not location:
            raise FormatError(f"{where}: external_data location is empty")
        if "\x00" in location:
            raise PathEscapeError(f"{where}: external_data location {location!r} contains a "
                                  "NUL byte")
        drive = len(location) > 1 and location[1] == ":" and location[0].isalpha()
        if location.startswith(("/", "\\")) or drive or os.path.isabs(location):
            raise PathEscapeError(f"{where}: external_data location {location!r} is absolute; "
                                  "expected a path relative to the model's folder")
        if "\\" in location:
            raise PathEscapeError(f"{where}: external_data location {location!r} contains a "
                                  "backslash; expected '/'-separated names")
        parts = [p for p in location.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PathEscapeError(f"{where}: external_data location {location!r} uses '..', "
                                  "which leaves the model's folder")
        if not parts:
            raise FormatError(f"{where}: external_data location {location!r} names no file")
        joined = os.path.join(self.folder, *parts)
        real = os.path.realpath(joined)
        if os.path.commonpath([real, self.folder]) != self.folder or real == self.folder:
            raise PathEscapeError(f"{where}: external_data location {location!r} resolves to "
                                  f"{real}, outside the model's folder {self.folder} (a "
                                  "symbolic link leaving the folder)")
        return "/".join(parts), real

    def _open(self, name: str, real: str, where: str) -> _File:
        label = f"{self.model_label}: external data {name!r}"
        if not os.path.lexists(real):
            raise NotFoundError(f"{where}: external data file {name!r} does not exist in "
                                f"{self.folder}")
        fd, st = open_regular(real, label, nofollow=True)
        try:
            if st.st_nlink > 1:
                raise PathEscapeError(f"{label}: has {st.st_nlink} hard links; a hard link can "
                                      "bring a file from outside the model's folder, so it is "
                                      "refused (copy the file to read it)")
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
            except (OSError, ValueError) as e:
                raise WeightAtlasError(f"{label}: cannot memory-map: {e}") from e
        finally:
            os.close(fd)
        return _File(name, real, ident(st), mm)

    def locate(self, t: Any, where: str, need: int) -> Slice:
        """Check a tensor's ``external_data`` entries; return where its bytes are."""
        entries: dict[str, str] = {}
        for entry in t.external_data:
            key, value = entry.key, entry.value
            if key not in _KEYS:
                raise FormatError(f"{where}: unknown external_data key {key!r}; expected "
                                  f"{', '.join(sorted(_KEYS))}")
            if key in entries:
                raise FormatError(f"{where}: external_data key {key!r} appears twice")
            entries[key] = value
        if "location" not in entries:
            raise FormatError(f"{where}: external_data has no location")
        name, real = self._check_location(entries["location"], where)
        offset = _integer(entries.get("offset", "0"), "offset", where)
        length = need
        if "length" in entries:
            length = _integer(entries["length"], "length", where)
            if length != need:
                raise ShapeError(f"{where}: external_data length is {length} bytes, shape "
                                 f"{list(t.dims)} needs {need}")
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = self._open(name, real, where)
        size = f.ident[2]
        if offset + length > size:
            raise FormatError(f"{where}: external data {name!r} has {size} bytes, the tensor "
                              f"needs bytes {offset} to {offset + length} (file short or "
                              "truncated?)")
        return Slice(name, offset, length)

    def bytes_view(self, s: Slice) -> np.ndarray:
        """The slice's bytes as a read-only uint8 view over the map."""
        mm = self.files[s.file].mm
        if mm is None or s.length == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(mm, np.uint8, s.length, s.offset)

    def array(self, s: Slice, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The slice as an array (a view, or an aligned copy when the offset is odd)."""
        mm = self.files[s.file].mm
        count = s.length // dtype.itemsize if dtype.itemsize else 0
        if mm is None or count == 0:
            out = np.zeros(shape, dtype)
            out.flags.writeable = False
            return out
        flat = np.frombuffer(mm, dtype, count, s.offset)
        if not flat.flags.aligned:
            flat = flat.copy()
            flat.flags.writeable = False
        return flat.reshape(shape)

    def release(self, s: Slice) -> None:
        """Drop the slice's pages from this process (the page cache keeps them)."""
        mm = self.files[s.file].mm
        if mm is None or mm.closed or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = s.offset - s.offset % page
        stop = min(len(mm), s.offset + s.length)
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def sizes(self) -> list[tuple[str, int]]:
        """``(name, size)`` of every file, in the order of :meth:`hashes`."""
        return [(f.name, f.ident[2]) for f in sorted(self.files.values(), key=lambda f: f.name)]

    def identities(self) -> list[tuple[str, str, tuple[int, int, int, int]]]:
        """``(path, label, identity when read)`` of every file, for ``check_unchanged``."""
        return [(f.real, f"{self.model_label}: external data {f.name!r}", f.ident)
                for f in sorted(self.files.values(), key=lambda f: f.name)]

    def hashes(self, buf: bytearray) -> list[tuple[str, int, str]]:
        """``(name, size, sha256)`` of every file, in location order."""
        return [(f.name, f.ident[2],
                 sha256_file(f.real, f"{self.model_label}: external data {f.name!r}", f.ident,
                             buf))
                for f in sorted(self.files.values(), key=lambda f: f.name)]

    def close(self) -> None:
        """Unmap the files (maps still viewed by live arrays are left to the GC)."""
        for f in self.files.values():
            if f.mm is not None:
                with contextlib.suppress(BufferError):
                    f.mm.close()
