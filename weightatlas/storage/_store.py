"""The weight store: a directory of models, each a directory of snapshot files.

Layout (docs/architecture.md has the full specification)::

    <store>/
      weightatlas-store.json           marker: {"format": "weightatlas.store", "version": 1}
      models/<model>/step-<N>.arrow    one immutable snapshot per file
      models/<model>/tag-<T>.arrow
      models/<model>/_blobs/<sha256>   attachments, shared by the model's snapshots
      .staging/                        files being written (see _commit.py)

Everything about a snapshot is inside its one file, so the ``models/`` folder can be
read as one Arrow dataset by other engines. The store never follows a symbolic link
inside itself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from contextlib import suppress
from typing import Any

import pyarrow as pa

from weightatlas.errors import (
    IntegrityError,
    NotFoundError,
    SnapshotExistsError,
    StoreError,
    WeightAtlasError,
)
from weightatlas.storage._blobs import (
    BLOBS,
    GRACE_SECONDS,
    LOCK,
    check_attachment_name,
    clean_blobs,
    write_blob,
)
from weightatlas.storage._commit import (
    STAGING,
    clean_staging,
    fsync_dir,
    locked,
    make_dirs,
    publish,
    real_dir,
    staging_file,
)
from weightatlas.storage._format import (
    DEFAULT_CHUNK_BYTES,
    INFO_COLUMNS,
    SCHEMA,
    check_name,
    decode_metadata,
)
from weightatlas.storage._mmap import map_file
from weightatlas.storage._refs import SnapshotInfo, file_name, parse_file_name, parse_ref, ref
from weightatlas.storage._snapshot import Snapshot
from weightatlas.storage._source import TensorSource
from weightatlas.storage._writer import (
    Progress,
    layout_of,
    scan_digest,
    write_snapshot_file,
)

__all__ = ["DEFAULT_STORE", "Store"]

#: Store directory used when neither an argument nor ``WEIGHTATLAS_STORE`` names one.
DEFAULT_STORE = "weightatlas_store"
MARKER = "weightatlas-store.json"
_MARKER_DOC = {"format": "weightatlas.store", "version": 1}
#: What a store holds at its top level (a folder holding only these is a store being made).
_OWN = {MARKER, "models", STAGING}


def _footer_metadata(path: str) -> dict[str, Any]:
    try:
        schema = pa.ipc.open_file(pa.BufferReader(map_file(path))).schema
    except (pa.ArrowException, OSError, ValueError) as e:
        raise IntegrityError(f"{path}: snapshot file is damaged: {e}") from e
    return decode_metadata(schema, path)


class Store:
    """A weight store on disk.

    Args:
        root: Store directory. ``None`` means ``$WEIGHTATLAS_STORE`` or ``./weightatlas_store``.
        create: Create the directory if it does not exist (otherwise it must).

    Example:
        >>> store = Store(tmp / "my_store", create=True)
        >>> store.models()
        []
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, create: bool = False):
        if root is None:
            root = os.environ.get("WEIGHTATLAS_STORE") or DEFAULT_STORE
        self.root = os.path.abspath(os.fspath(root))
        marker = os.path.join(self.root, MARKER)
        if not os.path.isfile(marker):
            if not create:
                raise NotFoundError(f"{self.root}: no weightatlas store here (ingest something "
                                    "first, or pass --store / set WEIGHTATLAS_STORE)")
            try:
                self._create(marker)
            except OSError as e:
                raise StoreError(f"{self.root}: cannot create a store: {e.strerror or e}") from e
        self._check_marker(marker)

    def _create(self, marker: str) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"{self.root}: exists and is not a directory")
        if os.path.isdir(self.root):
            foreign = [n for n in os.listdir(self.root)
                       if n not in _OWN and not n.startswith(MARKER + ".")]
            if foreign:
                raise StoreError(f"{self.root}: directory is not empty and is not a weightatlas "
                                 f"store (it holds {foreign[0]!r}); choose another --store")
        os.makedirs(self.root, exist_ok=True)
        make_dirs(os.path.join(self.root, "models"), self.root)
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_MARKER_DOC, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, marker)  # two creators at once: the first marker wins, both agree
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        fsync_dir(self.root)

    def _check_marker(self, marker: str) -> None:
        try:
            with open(marker) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise StoreError(f"{marker}: store marker is unreadable: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != _MARKER_DOC["format"]:
            raise StoreError(f"{marker}: not a weightatlas store marker")
        if not isinstance(doc.get("version"), int) or doc["version"] > _MARKER_DOC["version"]:
            raise StoreError(f"{marker}: store version {doc.get('version')!r} is newer than this "
                             "weightatlas understands (upgrade weightatlas)")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ---- paths ------------------------------------------------------------------------
    def _model_dir(self, model: str) -> str:
        return os.path.join(self.root, "models", check_name(model, "model name"))

    def path(self, model: str, step: int | None = None, tag: str | None = None) -> str:
        """Path of the snapshot file for ``(model, step | tag)`` (it may not exist)."""
        return os.path.join(self._model_dir(model), file_name(step, tag))

    # ---- listing ----------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of the models that have at least one snapshot, sorted."""
        base = os.path.join(self.root, "models")
        if not real_dir(base):
            return []
        return [n for n in sorted(os.listdir(base)) if self._snapshot_files(n)]

    def _snapshot_files(self, model: str) -> list[tuple[int | None, str | None, str]]:
        directory = self._model_dir(model)
        if not real_dir(directory):
            return []
        found = []
        for name in os.listdir(directory):
            parsed = parse_file_name(name)
            path = os.path.join(directory, name)
            if parsed and not os.path.islink(path):
                found.append((parsed[0], parsed[1], path))
        # steps ascending, then tags by name
        return sorted(found, key=lambda t: (t[0] is None, t[0] or 0, t[1] or ""))

    def snapshots(self, model: str | None = None) -> list[SnapshotInfo]:
        """Every snapshot (of one model, or of all), read from file footers only.

        A file that cannot be read is still listed, with ``problem`` set.
        """
        models = [model] if model is not None else self.models()
        return [self._info(m, step, tag, path)
                for m in models for step, tag, path in self._snapshot_files(m)]

    def _info(self, model: str, step: int | None, tag: str | None, path: str) -> SnapshotInfo:
        try:
            meta = _footer_metadata(path)
            if (meta.get("model"), meta.get("step"), meta.get("tag")) != (model, step, tag):
                held = ref(str(meta.get("model")), meta.get("step"), meta.get("tag"))
                raise IntegrityError(f"{path}: the file holds snapshot {held} but its place in "
                                     f"the store says {ref(model, step, tag)}")
            return SnapshotInfo(
                model=model, step=step, tag=tag, path=path, created=meta["created"],
                framework=meta["framework"], source_file=meta["source_file"],
                source_sha256=meta["source_sha256"], n_tensors=meta["n_tensors"],
                n_params=meta["n_params"], nbytes=meta["nbytes"],
                file_size=os.path.getsize(path),
            )
        except (WeightAtlasError, KeyError, OSError) as e:
            problem = str(e) if isinstance(e, WeightAtlasError) else f"{path}: unreadable: {e}"
            return SnapshotInfo(model, step, tag, path, "", "", "", None, 0, 0, 0,
                                os.path.getsize(path) if os.path.exists(path) else 0, problem)

    def tensors(self, model: str | None = None) -> pa.Table:
        """All rows of all snapshots (of one model or all) with statistics, no tensor bytes.

        Damaged snapshots are left out (``verify`` reports them).
        """
        tables = []
        for info in self.snapshots(model):
            if info.problem is None:
                with Snapshot(info.path, (info.model, info.step, info.tag)) as snap:
                    tables.append(snap.rows().combine_chunks())
        if not tables:
            return pa.schema([SCHEMA.field(c) for c in INFO_COLUMNS]).empty_table()
        return pa.concat_tables(tables)

    # ---- opening ----------------------------------------------------------------------
    def resolve(self, text: str | None = None, *, model: str | None = None,
                step: int | None = None, tag: str | None = None) -> str:
        """Path of an existing snapshot. A model alone means its latest snapshot.

        The latest snapshot is the highest step, or, for a model with tags only, the
        most recently created tag.
        """
        model, step, tag = self._identity(text, model, step, tag)
        return self.path(model, step, tag)

    def latest(self, model: str) -> SnapshotInfo:
        """The latest snapshot of a model (highest step, else the newest tag)."""
        infos = self.snapshots(model)
        if not infos:
            models = ", ".join(self.models()) or "none"
            raise NotFoundError(f"{self.root}: no model {model!r} (models: {models})")
        steps = [i for i in infos if i.step is not None]
        if steps:
            return steps[-1]
        return max(infos, key=lambda i: i.created)

    def _identity(self, text: str | None, model: str | None, step: int | None,
                  tag: str | None) -> tuple[str, int | None, str | None]:
        if text is not None:
            model, step, tag = parse_ref(text)
        if model is None:
            raise StoreError("name a model (MODEL[@STEP])")
        if step is None and tag is None:
            info = self.latest(model)
            return info.model, info.step, info.tag
        path = self.path(model, step, tag)
        if not os.path.isfile(path) or os.path.islink(path):
            have = ", ".join(i.ref for i in self.snapshots(model)) or "none"
            raise NotFoundError(f"{self.root}: no snapshot {ref(model, step, tag)} (snapshots "
                                f"of {model}: {have})")
        return model, step, tag

    def snapshot(self, text: str | None = None, *, model: str | None = None,
                 step: int | None = None, tag: str | None = None) -> Snapshot:
        """Open a snapshot by reference (``"mlp@100"``) or by ``model=``, ``step=``/``tag=``."""
        identity = self._identity(text, model, step, tag)
        return Snapshot(self.path(*identity), identity)

    # ---- writing ----------------------------------------------------------------------
    def write(
        self,
        source: TensorSource,
        model: str,
        *,
        step: int | None = None,
        tag: str | None = None,
        overwrite: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Progress | None = None,
    ) -> Snapshot:
        """Write a snapshot of ``model`` from a tensor source, atomically.

        Without ``step`` or ``tag`` the snapshot is step 0. Writing an existing
        (model, step|tag) again with the same tensors is a no-op that returns the
        existing snapshot; with different tensors it raises
        :class:`~weightatlas.errors.SnapshotExistsError` unless ``overwrite``.
        """
        if step is None and tag is None:
            step = 0
        final = self.path(model, step, tag)
        label = ref(model, step, tag)
        if chunk_bytes < 1:
            raise StoreError(f"chunk_bytes must be positive, got {chunk_bytes}")
        try:
            return self._write(source, model, step, tag, final, label, overwrite, chunk_bytes,
                               progress or (lambda phase, n, total: None))
        except OSError as e:
            where = e.filename or self.root
            raise StoreError(f"{where}: writing snapshot {label} failed: "
                             f"{e.strerror or e}") from e

    def _write(self, source: TensorSource, model: str, step: int | None, tag: str | None,
               final: str, label: str, overwrite: bool, chunk_bytes: int,
               report: Progress) -> Snapshot:
        identity = (model, step, tag)
        clean_staging(self.root)
        layout = layout_of(source, chunk_bytes)
        attachments = {check_attachment_name(k): bytes(v)
                       for k, v in dict(source.attachments()).items()}
        attached = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)}
                    for k, v in sorted(attachments.items())}
        existing = self._existing_digest(final)
        if existing is not None and not overwrite:
            # The same tensors again are a no-op, others an error: read, write nothing.
            if existing != "<unreadable>" and existing == scan_digest(
                    source, layout, model, step, tag, attached, report):
                return Snapshot(final, identity)
            raise SnapshotExistsError(
                self._conflict(final, label, source.label, existing, chunk_bytes))
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")
        model_dir = os.path.dirname(final)
        make_dirs(model_dir, self.root)
        # Blobs first, and the blob lock held shared until the snapshot is published, so
        # gc never removes a blob between the two and a visible snapshot names no missing blob.
        with locked(os.path.join(model_dir, LOCK), shared=True):
            for data in attachments.values():
                write_blob(self.root, model_dir, data)
            with staging_file(self.root) as staging:
                digest = write_snapshot_file(staging, source, layout, model, step, tag,
                                             created, attached, report)
                if not publish(staging, final, overwrite=overwrite):
                    # Another writer created it between our check and our commit.
                    existing = self._existing_digest(final)
                    if existing == digest:
                        return Snapshot(final, identity)
                    raise SnapshotExistsError(
                        self._conflict(final, label, source.label, existing, chunk_bytes))
        return Snapshot(final, identity)

    def _existing_digest(self, path: str) -> str | None:
        if not os.path.lexists(path):
            return None
        try:
            return str(_footer_metadata(path).get("content_digest"))
        except WeightAtlasError:
            return "<unreadable>"

    @staticmethod
    def _conflict(path: str, label: str, source: str, existing: str | None,
                  chunk_bytes: int | None = None) -> str:
        if existing == "<unreadable>":
            return (f"{path}: snapshot {label} already exists and is damaged; run "
                    "`weightatlas verify`, then --overwrite to replace it")
        hint = ""
        with suppress(WeightAtlasError, OSError, TypeError, ValueError):
            held = _footer_metadata(path).get("chunk_bytes")
            if chunk_bytes is not None and held is not None and int(held) != chunk_bytes:
                hint = (f" (or the same tensors chunked differently: it was written with chunks "
                        f"of {int(held)} bytes, this write uses {chunk_bytes})")
        return (f"{path}: snapshot {label} already exists with different tensors than {source}"
                f"{hint}; use another --step/--tag, or --overwrite to replace it")

    # ---- removing and checking --------------------------------------------------------
    def rm(self, text: str) -> list[str]:
        """Remove one snapshot (``MODEL@STEP``) or a whole model (``MODEL``); return paths.

        Only snapshot files are removed; attachments no snapshot names any more are left
        to :meth:`gc` (after its grace period), so a writer publishing at the same time
        never loses its blobs.
        """
        model, step, tag = parse_ref(text)
        if step is None and tag is None:
            files = [p for _, _, p in self._snapshot_files(model)]
            if not files:
                raise NotFoundError(f"{self.root}: no model {model!r}")
        else:
            files = [self.resolve(model=model, step=step, tag=tag)]
        removed = []
        for path in files:
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            except OSError as e:
                raise StoreError(f"{path}: cannot remove: {e.strerror or e}") from e
        if not removed:
            raise NotFoundError(f"{self.root}: {text} was already removed")
        fsync_dir(self._model_dir(model))
        return removed

    def verify(self, text: str | None = None) -> dict[str, list[str]]:
        """Recompute every checksum of every snapshot (or of one model, or one snapshot).

        Returns a map from each snapshot's reference (as its place in the store names it)
        to the problems found; an empty list means intact.

        Raises:
            NotFoundError: ``text`` names no model or snapshot.
        """
        if text is not None:
            model, step, tag = parse_ref(text)
            if step is not None or tag is not None:
                self.resolve(model=model, step=step, tag=tag)  # NotFoundError if absent
                files = [(step, tag, self.path(model, step, tag))]
            else:
                files = self._snapshot_files(model)
                if not files:
                    raise NotFoundError(f"{self.root}: no model {model!r} (models: "
                                        f"{', '.join(self.models()) or 'none'})")
            targets = [(model, s, t, p) for s, t, p in files]
        else:
            targets = [(m, s, t, p) for m in self.models() for s, t, p in self._snapshot_files(m)]
        results: dict[str, list[str]] = {}
        for model, step, tag, path in targets:
            try:
                with Snapshot(path, (model, step, tag)) as snap:
                    results[ref(model, step, tag)] = snap.verify()
            except WeightAtlasError as e:
                results[ref(model, step, tag)] = [str(e)]
        return results

    def gc(self, *, blob_grace: float = GRACE_SECONDS) -> list[str]:
        """Remove leftovers: staging files of killed writers, and attachments (blobs)
        that no snapshot names any more and that are older than ``blob_grace`` seconds.
        """
        try:
            removed = clean_staging(self.root)
            base = os.path.join(self.root, "models")
            for model in sorted(os.listdir(base)) if real_dir(base) else []:
                model_dir = self._model_dir(model)
                if not real_dir(model_dir):
                    continue
                removed += self._gc_model(model, model_dir, blob_grace)
        except OSError as e:
            raise StoreError(f"{e.filename or self.root}: gc failed: {e.strerror or e}") from e
        return removed

    def _gc_model(self, model: str, model_dir: str, grace: float) -> list[str]:
        with locked(os.path.join(model_dir, LOCK), shared=False, wait=False) as free:
            if not free:  # a writer is storing blobs and publishing: leave them be
                return []
            referenced: set[str] = set()
            for _, _, path in self._snapshot_files(model):
                try:
                    attachments = _footer_metadata(path).get("attachments") or {}
                except WeightAtlasError:
                    return []  # a damaged snapshot may name blobs: remove nothing
                referenced |= {a.get("sha256") for a in attachments.values()}
            removed = clean_blobs(model_dir, referenced, grace)
            if not self._snapshot_files(model):
                with suppress(OSError):  # only if empty
                    os.rmdir(os.path.join(model_dir, BLOBS))
        # The model folder and its lock file stay: removing a lock file another process
        # may be opening would break the lock. models() lists only folders with snapshots.
        return removed
