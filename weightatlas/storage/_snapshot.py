"""Reading a snapshot: memory-mapped, zero-copy, every tensor read checked.

Opening a snapshot maps its file and reads the Arrow footer and the snapshot
metadata, which lists every row's tensor name (``row_names``); a tensor read fetches
only its own record batches. The small columns of every row (statistics, shapes)
are read together, once, the first time a listing asks for them. No tensor bytes
are touched until a tensor is read. :meth:`Snapshot.read` returns a read-only NumPy
view straight over the mapped file when the tensor is one chunk (it joins the
chunks of a large tensor into one new array), after checking the XXH3-128 checksum
of its bytes; :meth:`Snapshot.iter_chunks` streams a tensor in views of a few hundred
KiB instead, checksumming them as they pass. Every batch read is validated
(``validate(full=True)``) and checked against the metadata, so a damaged file is an
:class:`IntegrityError`, never a crash or a wrong answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from weightatlas.errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    PathEscapeError,
    ShapeError,
    UnsupportedError,
    WeightAtlasError,
)
from weightatlas.storage._blobs import read_blob
from weightatlas.storage._dtypes import dtype_from_name
from weightatlas.storage._format import INFO_COLUMNS, SCHEMA, decode_metadata
from weightatlas.storage._integrity import file_checksum
from weightatlas.storage._mmap import MappedFile
from weightatlas.storage._record import flipped_axes, to_source_layout
from weightatlas.storage._refs import ref

__all__ = ["Snapshot", "TensorInfo"]

_DATA = SCHEMA.get_field_index("data")


@dataclass(frozen=True)
class TensorInfo:
    """What a snapshot knows about one tensor, without its bytes."""

    name: str
    source_name: str
    module: str
    param: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    layout: tuple[str, ...]
    source_layout: tuple[str, ...]
    source_shape: tuple[int, ...]
    n_chunks: int
    nbytes: int
    numel: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    abs_max: float | None
    l2: float | None
    frac_zero: float
    n_nan: int
    n_inf: int
    attrs: str


class Snapshot:
    """One immutable snapshot of a model: tensors by name, with statistics.

    Get one from :meth:`weightatlas.storage.Store.snapshot` or open a file directly.

    Args:
        path: The snapshot file.
        expect: ``(model, step, tag)`` the file must hold (the store passes what its
            path says, so a renamed or copied file is caught).

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> snap = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "mlp", step=1)
        >>> snap.names, snap.read("fc.weight").sum(), snap.info("fc.weight").mean
        (['fc.weight'], np.float32(15.0), 2.5)
    """

    def __init__(self, path: str | os.PathLike[str],
                 expect: tuple[str, int | None, str | None] | None = None) -> None:
        self.path = os.fspath(path)
        try:
            self._file = MappedFile(self.path)
        except FileNotFoundError as e:
            raise NotFoundError(f"{self.path}: snapshot file does not exist") from e
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{self.path}: cannot open snapshot: {e}") from e
        try:
            self._reader = pa.ipc.open_file(pa.BufferReader(self._file.buffer))
            schema = self._reader.schema
        except (pa.ArrowException, ValueError, OSError) as e:
            raise IntegrityError(f"{self.path}: snapshot file is damaged: {e}") from e
        self.metadata: dict[str, Any] = decode_metadata(schema, self.path)
        if schema.remove_metadata() != SCHEMA:
            raise FormatError(f"{self.path}: columns differ from the snapshot schema")
        self._check_identity(expect)
        self._table_cache: pa.Table | None = None
        self._batches: dict[int, pa.RecordBatch] = {}
        names = self.metadata.get("row_names")
        if not (isinstance(names, list) and len(names) == self._reader.num_record_batches
                and all(isinstance(n, str) for n in names)):
            raise IntegrityError(f"{self.path}: snapshot metadata does not list its "
                                 f"{self._reader.num_record_batches} rows")
        self._row_names: list[str] = names
        self._rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            self._rows.setdefault(name, []).append(i)

    def _check_identity(self, expect: tuple[str, int | None, str | None] | None) -> None:
        meta = self.metadata
        for key in ("model", "step", "tag", "n_tensors", "nbytes"):
            if key not in meta:
                raise IntegrityError(f"{self.path}: snapshot metadata lacks {key!r}")
        if expect is not None and (meta["model"], meta["step"], meta["tag"]) != expect:
            held = ref(meta["model"], meta["step"], meta["tag"])
            raise IntegrityError(f"{self.path}: the file holds snapshot {held} but its place "
                                 f"in the store says {ref(*expect)} (renamed or copied?)")

    # ---- identity -------------------------------------------------------------------
    @property
    def model(self) -> str:
        """Model name."""
        return str(self.metadata["model"])

    @property
    def step(self) -> int | None:
        """Training step, or ``None`` for a tagged snapshot."""
        return self.metadata.get("step")

    @property
    def tag(self) -> str | None:
        """Tag, or ``None`` for a snapshot identified by step."""
        return self.metadata.get("tag")

    @property
    def ref(self) -> str:
        """``model@step`` or ``model@tag``."""
        return ref(self.model, self.step, self.tag)

    def __repr__(self) -> str:
        return f"Snapshot({self.ref!r}, tensors={len(self._rows)}, path={self.path!r})"

    def _repr_html_(self, max_rows: int = 50) -> str:
        """A table of the tensors and their statistics, for Jupyter (names escaped)."""
        from weightatlas.storage._html import snapshot_html

        return snapshot_html(self, max_rows)

    # ---- rows -------------------------------------------------------------------------
    def _damaged(self, what: str, e: BaseException | None = None) -> IntegrityError:
        detail = f": {e}" if e is not None else ""
        return IntegrityError(f"{self.path}: snapshot file is damaged ({what}){detail}")

    def _batch(self, i: int) -> pa.RecordBatch:
        """Row ``i``, validated and checked against the metadata."""
        batch = self._batches.get(i)
        if batch is not None:
            return batch
        try:
            batch = self._reader.get_batch(i)
            batch.validate(full=True)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise self._damaged(f"row {i}", e) from e
        self._check_rows(batch, [self._row_names[i]])
        self._batches[i] = batch
        return batch

    def _check_rows(self, rows: pa.RecordBatch | pa.Table, names: list[str]) -> None:
        meta = self.metadata
        if rows.column("name").to_pylist() != names:
            raise self._damaged("row names differ from the metadata's")
        for key in ("model", "step", "tag"):
            if set(rows.column(key).to_pylist()) - {meta[key]}:
                raise self._damaged(f"a row's {key} differs from the metadata's")

    @property
    def _table(self) -> pa.Table:
        """Every row (all columns, zero-copy), read and validated once, on demand."""
        if self._table_cache is None:
            try:
                table = self._reader.read_all()
                table.validate(full=True)
            except (pa.ArrowException, ValueError, OSError) as e:
                raise self._damaged("rows", e) from e
            self._check_rows(table, self._row_names)
            self._table_cache = table
        return self._table_cache

    # ---- listing ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in model order."""
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def rows(self) -> pa.Table:
        """Every row (tensor or chunk) with its metadata and statistics, no tensor bytes."""
        return self._table.select(INFO_COLUMNS)

    def tensors(self) -> pa.Table:
        """One row per tensor (its first chunk's row) with statistics, in model order.

        Statistics are of the whole tensor; ``nbytes`` is the tensor's total.
        """
        first = [rows[0] for rows in self._rows.values()]
        table = self.rows().take(pa.array(first, pa.int64()))
        nbytes = self._table.column("nbytes").to_pylist()
        totals = [sum(nbytes[i] for i in rows) for rows in self._rows.values()]
        idx = table.schema.get_field_index("nbytes")
        return table.set_column(idx, "nbytes", pa.array(totals, pa.int64()))

    def info(self, name: str) -> TensorInfo:
        """Metadata and statistics of one tensor."""
        rows = self._row_indices(name)
        d = {k: v[0] for k, v in self._batch(rows[0]).select(INFO_COLUMNS).to_pydict().items()}
        fields = {k: d[k] for k in TensorInfo.__dataclass_fields__ if k in d}
        for k in ("shape", "layout", "source_layout", "source_shape"):
            fields[k] = tuple(fields[k])
        fields["nbytes"] = sum(self._batch(i).column("nbytes")[0].as_py() for i in rows)
        return TensorInfo(**fields)

    def _row_indices(self, name: str) -> list[int]:
        try:
            return self._rows[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self._rows, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise NotFoundError(f"{self.path}: snapshot {self.ref} has no tensor {name!r}"
                                f"{hint}") from None

    # ---- reading ----------------------------------------------------------------------
    def _row_buffer(self, i: int, name: str, verify: bool) -> pa.Buffer:
        batch = self._batch(i)
        data = batch.column(_DATA)
        offsets = np.frombuffer(data.buffers()[1], np.int64)[data.offset : data.offset + 2]
        buf = data.buffers()[2].slice(int(offsets[0]), int(offsets[1] - offsets[0]))
        expected = batch.column("nbytes")[0].as_py()
        if buf.size != expected:
            raise IntegrityError(f"{self.path}: tensor {name!r}: row {i} holds {buf.size} bytes, "
                                 f"its nbytes column says {expected}")
        if verify:
            self._check_row(i, name, xxhash.xxh3_128(buf).hexdigest())
        return buf

    def _check_row(self, i: int, name: str, actual: str) -> None:
        batch = self._batch(i)
        stored = batch.column("checksum")[0].as_py()
        if actual != stored:
            raise IntegrityError(
                f"{self.path}: tensor {name!r} (chunk {batch.column('chunk')[0]}) is "
                f"damaged: checksum {actual} does not match the stored {stored}; "
                "run `weightatlas verify` and re-ingest the snapshot"
            )

    def read(self, name: str, *, layout: str = "canonical", verify: bool = True) -> np.ndarray:
        """Read one tensor as a NumPy array (read-only, zero-copy when it is one chunk).

        Args:
            name: Canonical tensor name.
            layout: ``"canonical"`` (``[out, in, ...]``) or ``"source"`` for the layout of
                the file it came from, restored exactly.
            verify: Check the checksum of the bytes before returning them.

        Raises:
            NotFoundError: No tensor of that name.
            IntegrityError: The stored bytes do not match their checksum.
        """
        if layout not in ("canonical", "source"):
            raise UnsupportedError(f"layout must be 'canonical' or 'source', got {layout!r}")
        rows = self._row_indices(name)
        first = self._batch(rows[0])
        dtype, shape, expected = self._dtype_shape(name, first)
        if len(rows) == 1:
            buf = self._row_buffer(rows[0], name, verify)
            if buf.size != expected:
                raise IntegrityError(f"{self.path}: tensor {name!r}: {buf.size} bytes stored, "
                                     f"shape {list(shape)} {dtype} needs {expected}")
            array = np.frombuffer(buf, dtype=dtype).reshape(shape)
        else:
            array = self._join(name, rows, shape, dtype, expected, verify)
        if layout == "canonical":
            return array
        try:
            flip = flipped_axes(first.column("attrs")[0].as_py())
            return to_source_layout(
                array,
                first.column("layout")[0].as_py(),
                first.column("source_layout")[0].as_py(),
                first.column("source_shape")[0].as_py(),
                flip,
            )
        except (ValueError, AttributeError) as e:
            raise IntegrityError(f"{self.path}: tensor {name!r}: its source layout cannot be "
                                 f"restored: {e}") from e

    def _dtype_shape(self, name: str, first: pa.RecordBatch
                     ) -> tuple[np.dtype, tuple[int, ...], int]:
        """A tensor's dtype, shape and byte size, from its first row (checked)."""
        try:
            dtype = dtype_from_name(first.column("dtype")[0].as_py())
        except UnsupportedError as e:
            raise IntegrityError(f"{self.path}: tensor {name!r}: {e}") from None
        shape = tuple(first.column("shape")[0].as_py())
        if any(d < 0 for d in shape):
            raise IntegrityError(f"{self.path}: tensor {name!r}: negative shape {list(shape)}")
        return dtype, shape, int(np.prod(shape, dtype=object)) * dtype.itemsize

    def iter_chunks(self, name: str, *, size: int = 1 << 16, start: int = 0,
                    stop: int | None = None, verify: bool = True) -> Iterator[np.ndarray]:
        """Stream a tensor's values in pieces, each checksummed as it passes.

        Yields read-only 1-d views over the mapped file: the tensor's values in C order
        (canonical layout) from element ``start`` to ``stop`` (default: the end), at
        most ``size`` values a piece, a piece never spanning two stored chunks. With
        ``verify``, the XXH3-128 checksum of every stored chunk the range touches
        (all its bytes, also those outside the range) is computed piece by piece and
        checked *before* that chunk's last piece is yielded: a loop that runs to its end
        has seen only verified bytes, and a loop over damaged bytes ends in
        :class:`IntegrityError` (discard what it computed). Each byte is thus read
        once, while it is in the cache, where :meth:`read` followed by a pass over the
        array reads every byte twice.

        Args:
            name: Canonical tensor name.
            size: Values per piece at most (a few hundred KiB keeps a piece in cache).
            start, stop: The range of values (flat C-order indices) to yield.
            verify: Check the checksums.

        Raises:
            NotFoundError: No tensor of that name.
            ShapeError: ``start``/``stop`` outside the tensor, or ``size`` below 1.
            IntegrityError: The stored bytes do not match their checksum or shape.

        Example:
            >>> from weightatlas.storage import RecordsSource, TensorRecord
            >>> w = np.arange(10, dtype=np.float32)
            >>> snap = store.write(RecordsSource([TensorRecord("b", w)]), "chunks")
            >>> [p.tolist() for p in snap.iter_chunks("b", size=4, start=1, stop=8)]
            [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
        """
        rows = self._row_indices(name)
        dtype, shape, expected = self._dtype_shape(name, self._batch(rows[0]))
        numel = expected // dtype.itemsize if dtype.itemsize else 0
        stop = numel if stop is None else stop
        if size < 1 or not 0 <= start <= stop <= numel:
            raise ShapeError(f"{self.path}: tensor {name!r} {list(shape)}: cannot stream values "
                             f"[{start}, {stop}) in pieces of {size}; it holds {numel} values")
        return self._pieces(name, rows, dtype, expected, size, start, stop, verify)

    def _pieces(self, name: str, rows: list[int], dtype: np.dtype, expected: int, size: int,
                start: int, stop: int, verify: bool) -> Iterator[np.ndarray]:
        at = 0  # first value of the current row
        for i in rows:
            buf = self._row_buffer(i, name, verify=False)
            if buf.size % dtype.itemsize:
                raise IntegrityError(f"{self.path}: tensor {name!r}: row {i} holds {buf.size} "
                                     f"bytes, not a whole number of {dtype} values")
            if at * dtype.itemsize + buf.size > expected:
                raise IntegrityError(f"{self.path}: tensor {name!r}: chunks hold more than "
                                     f"its shape needs ({expected} bytes)")
            values = np.frombuffer(buf, dtype=dtype)
            lo, hi = max(start - at, 0), min(stop - at, values.size)
            at += values.size
            if lo >= hi:
                if at > stop:
                    break
                continue
            check = xxhash.xxh3_128() if verify else None
            raw, width = memoryview(buf), dtype.itemsize  # bytes, hashed as they pass
            if check is not None and lo:
                check.update(raw[: lo * width])
            for s in range(lo, hi, size):
                end = min(s + size, hi)
                if check is not None:
                    check.update(raw[s * width : end * width])
                    if end == hi:
                        check.update(raw[hi * width :])
                        self._check_row(i, name, check.hexdigest())
                yield values[s:end]
        else:
            if at * dtype.itemsize != expected:
                raise IntegrityError(f"{self.path}: tensor {name!r}: chunks hold "
                                     f"{at * dtype.itemsize} bytes, its shape needs {expected}")

    def _join(self, name: str, rows: list[int], shape: tuple[int, ...], dtype: np.dtype,
              expected: int, verify: bool) -> np.ndarray:
        array = np.empty(shape, dtype=dtype)
        flat = array.reshape(-1).view(np.uint8)
        at = 0
        for i in rows:
            buf = self._row_buffer(i, name, verify)
            if at + buf.size > expected:
                raise IntegrityError(f"{self.path}: tensor {name!r}: chunks hold more than "
                                     f"shape {list(shape)} {dtype} needs ({expected} bytes)")
            flat[at : at + buf.size] = np.frombuffer(buf, np.uint8)
            at += buf.size
        if at != expected:
            raise IntegrityError(f"{self.path}: tensor {name!r}: chunks hold {at} bytes, "
                                 f"shape {list(shape)} {dtype} needs {expected}")
        array.flags.writeable = False
        return array

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    # ---- attachments ------------------------------------------------------------------
    @property
    def attachments(self) -> dict[str, dict[str, Any]]:
        """Files attached to this snapshot: name -> ``{"sha256", "size"}``."""
        return dict(self.metadata.get("attachments") or {})

    def attachment(self, name: str) -> bytes:
        """The bytes of one attachment (``graph.onnx``...), checked against their sha256."""
        try:
            entry = self.attachments[name]
        except KeyError:
            have = ", ".join(self.attachments) or "none"
            raise NotFoundError(f"{self.path}: snapshot {self.ref} has no attachment {name!r} "
                                f"(attachments: {have})") from None
        return read_blob(os.path.dirname(self.path), str(entry.get("sha256")),
                         int(entry.get("size", -1)),
                         f"attachment {name!r} of {self.ref}")

    # ---- integrity --------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Recompute every checksum (whole file, every row, every attachment).

        Returns the problems found, empty when the snapshot is intact.
        """
        problems = []
        stored, actual = file_checksum(
            self.path, header_last=int(self.metadata.get("format_version", 1)) >= 2)
        if stored != actual:
            problems.append(f"{self.path}: file checksum {actual} does not match the stored "
                            f"{stored}")
        for name in self.attachments:
            try:
                self.attachment(name)
            except (IntegrityError, NotFoundError, PathEscapeError) as e:
                problems.append(str(e))
        base = self._file.buffer.address
        for name, rows in self._rows.items():
            for i in rows:
                try:
                    buf = self._row_buffer(i, name, verify=True)
                except WeightAtlasError as e:
                    problems.append(str(e))
                else:  # keep resident memory flat while checking a large snapshot
                    self._file.release(buf.address - base, buf.address - base + buf.size)
        try:
            self._table  # noqa: B018 - reads and checks the small columns of every row
        except WeightAtlasError as e:
            problems.append(str(e))
        return problems

    def close(self) -> None:
        """Release this snapshot's hold on the file; arrays already read stay valid.

        The memory map is unmapped once no array read from it is alive.
        """
        self._table_cache = None
        self._batches = {}
        self._rows = {}

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
