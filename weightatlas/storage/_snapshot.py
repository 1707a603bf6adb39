"""Reading a snapshot: memory-mapped, zero-copy, every tensor read checked.

Opening a snapshot maps its file and reads the Arrow footer and the small columns
(names, shapes, statistics); no tensor bytes are touched until a tensor is read.
:meth:`Snapshot.read` returns a read-only NumPy view straight over the mapped file
when the tensor is one chunk (it joins the chunks of a large tensor into one new
array), after checking the XXH3-128 checksum of its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from weightatlas.errors import FormatError, IntegrityError, NotFoundError
from weightatlas.storage._blobs import read_blob
from weightatlas.storage._dtypes import dtype_from_name
from weightatlas.storage._format import INFO_COLUMNS, SCHEMA, decode_metadata
from weightatlas.storage._integrity import file_checksum
from weightatlas.storage._mmap import MappedFile
from weightatlas.storage._record import to_source_layout

__all__ = ["Snapshot", "TensorInfo"]


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

    Example:
        >>> from weightatlas.storage import RecordsSource, TensorRecord
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> snap = store.write(RecordsSource([TensorRecord("fc.weight", w)]), "mlp", step=1)
        >>> snap.names, snap.read("fc.weight").sum(), snap.info("fc.weight").mean
        (['fc.weight'], np.float32(15.0), 2.5)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._file = MappedFile(self.path)
            mapped = self._file.buffer
        except FileNotFoundError as e:
            raise NotFoundError(f"{self.path}: snapshot file does not exist") from e
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{self.path}: cannot open snapshot: {e}") from e
        try:
            reader = pa.ipc.open_file(pa.BufferReader(mapped))
            self.metadata: dict[str, Any] = decode_metadata(reader.schema, self.path)
            if reader.schema.remove_metadata() != SCHEMA:
                raise FormatError(f"{self.path}: columns differ from the snapshot schema")
            self._table = reader.read_all()
            self._table.validate(full=True)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise IntegrityError(f"{self.path}: snapshot file is damaged: {e}") from e
        self._data_loc = [
            (c, j) for c, chunk in enumerate(self._table.column("data").chunks)
            for j in range(len(chunk))
        ]
        names = self._table.column("name").to_pylist()
        self._rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            self._rows.setdefault(name, []).append(i)

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
        return f"{self.model}@{self.step if self.step is not None else self.tag}"

    def __repr__(self) -> str:
        return f"Snapshot({self.ref!r}, tensors={len(self._rows)}, path={self.path!r})"

    def _repr_html_(self, max_rows: int = 50) -> str:
        """A table of the tensors and their statistics, for Jupyter (names escaped)."""
        import html

        def num(v: Any) -> str:
            return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

        cols = ("name", "kind", "dtype", "shape", "mean", "std", "abs_max", "frac_zero",
                "n_nan", "n_inf")
        rows = self.tensors().select(list(cols)).slice(0, max_rows).to_pylist()
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape('×'.join(map(str, r[c])) if c == 'shape' else num(r[c]))}</td>"
                for c in cols) + "</tr>"
            for r in rows
        )
        meta = self.metadata
        more = (f"<p>… {len(self) - max_rows} more tensors</p>" if len(self) > max_rows else "")
        return (f"<p><b>{html.escape(self.ref)}</b>: {meta['n_tensors']} tensors, "
                f"{meta['n_params']:,} values, {html.escape(str(meta['framework']))} from "
                f"{html.escape(str(meta['source_file']))}</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")

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
        totals = [self._nbytes(name) for name in self._rows]
        idx = table.schema.get_field_index("nbytes")
        return table.set_column(idx, "nbytes", pa.array(totals, pa.int64()))

    def _nbytes(self, name: str) -> int:
        col = self._table.column("nbytes")
        return sum(col[i].as_py() for i in self._rows[name])

    def info(self, name: str) -> TensorInfo:
        """Metadata and statistics of one tensor."""
        row = self._table.slice(self._row_indices(name)[0], 1).select(INFO_COLUMNS)
        d = {k: v[0] for k, v in row.to_pydict().items()}
        fields = {k: d[k] for k in TensorInfo.__dataclass_fields__ if k in d}
        for k in ("shape", "layout", "source_layout", "source_shape"):
            fields[k] = tuple(fields[k])
        fields["nbytes"] = self._nbytes(name)
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
        c, j = self._data_loc[i]
        data = self._table.column("data").chunk(c)
        at = data.offset + j
        offsets = np.frombuffer(data.buffers()[1], np.int64)[at : at + 2]
        buf = data.buffers()[2].slice(int(offsets[0]), int(offsets[1] - offsets[0]))
        expected = self._table.column("nbytes")[i].as_py()
        if buf.size != expected:
            raise IntegrityError(f"{self.path}: tensor {name!r}: row {i} holds {buf.size} bytes, "
                                 f"its nbytes column says {expected}")
        if verify:
            actual = xxhash.xxh3_128(buf).hexdigest()
            stored = self._table.column("checksum")[i].as_py()
            if actual != stored:
                raise IntegrityError(
                    f"{self.path}: tensor {name!r} (chunk {self._table.column('chunk')[i]}) is "
                    f"damaged: checksum {actual} does not match the stored {stored}; "
                    "run `weightatlas verify` and re-ingest the snapshot"
                )
        return buf

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
        rows = self._row_indices(name)
        info = self._table.slice(rows[0], 1)
        dtype = dtype_from_name(info.column("dtype")[0].as_py())
        shape = tuple(info.column("shape")[0].as_py())
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if len(rows) == 1:
            buf = self._row_buffer(rows[0], name, verify)
            if buf.size != expected:
                raise IntegrityError(f"{self.path}: tensor {name!r}: {buf.size} bytes stored, "
                                     f"shape {list(shape)} {dtype} needs {expected}")
            array = np.frombuffer(buf, dtype=dtype).reshape(shape)
        else:
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
        if layout == "canonical":
            return array
        if layout == "source":
            return to_source_layout(
                array,
                info.column("layout")[0].as_py(),
                info.column("source_layout")[0].as_py(),
                info.column("source_shape")[0].as_py(),
            )
        raise ValueError(f"layout must be 'canonical' or 'source', got {layout!r}")

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
        """Recompute every checksum; return the problems found (empty when intact)."""
        problems = []
        stored, actual = file_checksum(self.path)
        if stored != actual:
            problems.append(f"{self.path}: file checksum {actual} does not match the stored "
                            f"{stored}")
        for name in self.attachments:
            try:
                self.attachment(name)
            except (IntegrityError, NotFoundError) as e:
                problems.append(str(e))
        base = self._file.buffer.address
        for name, rows in self._rows.items():
            for i in rows:
                try:
                    buf = self._row_buffer(i, name, verify=True)
                except IntegrityError as e:
                    problems.append(str(e))
                else:  # keep resident memory flat while checking a large snapshot
                    self._file.release(buf.address - base, buf.address - base + buf.size)
        return problems

    def close(self) -> None:
        """Release this snapshot's hold on the file; arrays already read stay valid.

        The memory map is unmapped once no array read from it is alive.
        """
        self._table = self._table.slice(0, 0)
        self._rows = {}

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
