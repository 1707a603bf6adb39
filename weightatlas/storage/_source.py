"""The source protocol: what the store needs from an adapter to write a snapshot.

An adapter opens a file (or a live model) and returns a :class:`TensorSource`. The
store iterates it twice: once for the names, shapes and dtypes only (so the
snapshot's metadata, which Arrow writes first, can be laid out), once to read every
tensor and write it. A source must therefore be re-iterable, and should hand out one
tensor at a time as views (over a memory map, say) so that memory stays flat. A
record's memory must stay valid until the next record is asked for. A source whose
records stay valid one record longer, until the record after next is asked for, says
so with ``keeps_previous = True``: the store then writes one tensor while it reads
the next (the file adapters do, and :class:`RecordsSource` unless a subclass hands out
records of its own).

A source read from files may also offer ``source_file_list()``: the ``(name, size)``
of each file :meth:`~TensorSource.source_files` will hash, in the same order, without
hashing them. The store then hashes them while it writes, instead of before. And
``check_files_unchanged()``, which the store calls once every row is written: it
raises if a file changed since it was read, so that the sha256 recorded and the
bytes written describe the same file.

It is a ``Protocol``, not a base class, so that an adapter needs no import from the
store beyond :class:`~weightatlas.storage.TensorRecord` to implement it (onnx-ir
explains the same choice in its ``_protocols.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from weightatlas.storage._record import TensorRecord

__all__ = ["RecordsSource", "SourceFile", "TensorSource"]


@dataclass(frozen=True)
class SourceFile:
    """One file a source was read from, as recorded in snapshot metadata."""

    name: str  #: path relative to the source's folder (never absolute)
    size: int
    sha256: str


@runtime_checkable
class TensorSource(Protocol):
    """A re-iterable collection of tensor records plus facts about where they came from."""

    #: Short description of the source for messages and metadata, e.g. ``model.safetensors``.
    label: str
    #: ``safetensors``, ``onnx``, ``torch``, ``jax``...
    framework: str

    def records(self) -> Iterator[TensorRecord]:
        """Yield every tensor once, in model order. May be called more than once."""
        ...

    def source_files(self) -> list[SourceFile]:
        """The files read (with their sha256), or an empty list for a live model."""
        ...

    def metadata(self) -> Mapping[str, Any]:
        """Extra JSON-serialisable facts stored in the snapshot metadata under ``source``."""
        ...

    def nbytes(self) -> int:
        """Total bytes of tensor data (the store computes its own from the records)."""
        ...

    def attachments(self) -> Mapping[str, bytes]:
        """Named files that travel with the snapshot (e.g. ``graph.onnx``); often empty."""
        ...


@dataclass
class RecordsSource:
    """A :class:`TensorSource` over records already in memory (live models, tests).

    Example:
        >>> import numpy as np
        >>> src = RecordsSource([TensorRecord("w", np.ones(3, np.float32))])
        >>> [r.name for r in src.records()]
        ['w']
    """

    items: list[TensorRecord]
    label: str = "<memory>"
    framework: str = "numpy"
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def keeps_previous(self) -> bool:
        """The records are the arrays given, valid as long as they live (unless a
        subclass hands out records of its own)."""
        return type(self).records is RecordsSource.records

    def records(self) -> Iterator[TensorRecord]:
        return iter(self.items)

    def source_files(self) -> list[SourceFile]:
        return []

    def metadata(self) -> Mapping[str, Any]:
        return self.extra

    def nbytes(self) -> int:
        return sum(r.data.nbytes for r in self.items)

    def attachments(self) -> Mapping[str, bytes]:
        return self.files
