"""The weight store: a directory of models, each a directory of snapshot files.

Layout (docs/architecture.md has the full specification)::

    <store>/
      weightatlas-store.json           marker: {"format": "weightatlas.store", "version": 1}
      models/<model>/step-<N>.arrow    one immutable snapshot per file
      models/<model>/tag-<T>.arrow
      .staging/                        files being written (see _commit.py)

Everything about a snapshot is inside its one file, so the ``models/`` folder can be
read as one Arrow dataset by other engines.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
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
    GRACE_SECONDS,
    check_attachment_name,
    clean_blobs,
    write_blob,
)
from weightatlas.storage._commit import clean_staging, fsync_dir, publish, staging_file
from weightatlas.storage._format import (
    DEFAULT_CHUNK_BYTES,
    INFO_COLUMNS,
    check_name,
    decode_metadata,
)
from weightatlas.storage._integrity import PLACEHOLDER, finalize_file_checksum
from weightatlas.storage._mmap import map_file
from weightatlas.storage._snapshot import Snapshot
from weightatlas.storage._source import TensorSource
from weightatlas.storage._writer import (
    Progress,
    plan_snapshot,
    snapshot_metadata,
    write_snapshot_file,
)

__all__ = ["DEFAULT_STORE", "SnapshotInfo", "Store", "parse_ref"]

#: Store directory used when neither an argument nor ``WEIGHTATLAS_STORE`` names one.
DEFAULT_STORE = "weightatlas_store"
MARKER = "weightatlas-store.json"
_MARKER_DOC = {"format": "weightatlas.store", "version": 1}
_FILE = re.compile(r"^(step-(?P<step>0|[1-9][0-9]{0,18})"
                   r"|tag-(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.+\-]*))\.arrow$")
_MAX_STEP = 2**63 - 1


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``MODEL[@STEP|@TAG]`` into ``(model, step, tag)``.

    ``@step:N`` and ``@tag:T`` force the reading; a bare ``@123`` is a step.

    Example:
        >>> parse_ref("mlp@100"), parse_ref("mlp@best"), parse_ref("mlp")
        (('mlp', 100, None), ('mlp', None, 'best'), ('mlp', None, None))
    """
    model, at, what = ref.partition("@")
    check_name(model, "model name")
    if not at:
        return model, None, None
    if what.startswith("tag:"):
        return model, None, check_name(what[4:], "tag")
    if what.startswith("step:") or what.isdigit():
        digits = what.removeprefix("step:")
        if not digits.isdigit() or int(digits) > _MAX_STEP:
            raise StoreError(f"{ref!r}: step must be an integer from 0 to {_MAX_STEP}")
        return model, int(digits), None
    return model, None, check_name(what, "tag")


def _file_name(step: int | None, tag: str | None) -> str:
    if (step is None) == (tag is None):
        raise StoreError("a snapshot has either a step or a tag (exactly one)")
    if step is not None:
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= _MAX_STEP:
            raise StoreError(f"step must be an integer from 0 to {_MAX_STEP}, got {step!r}")
        return f"step-{step}.arrow"
    return f"tag-{check_name(str(tag), 'tag')}.arrow"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as listed: identity and totals, read from the file's footer only."""

    model: str
    step: int | None
    tag: str | None
    path: str
    created: str
    framework: str
    source_file: str
    source_sha256: str | None
    n_tensors: int
    n_params: int
    nbytes: int
    file_size: int

    @property
    def ref(self) -> str:
        """``model@step`` or ``model@tag``."""
        return f"{self.model}@{self.step if self.step is not None else self.tag}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``--json`` output)."""
        return {"ref": self.ref, **self.__dict__}


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
        if os.path.isfile(marker):
            self._check_marker(marker)
        elif create:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StoreError(f"{self.root}: exists and is not a directory")
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise StoreError(f"{self.root}: directory is not empty and is not a weightatlas "
                                 "store; choose another --store")
            os.makedirs(os.path.join(self.root, "models"), exist_ok=True)
            tmp = marker + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(_MARKER_DOC, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
            fsync_dir(self.root)
        else:
            raise NotFoundError(f"{self.root}: no weightatlas store here (ingest something first, "
                                "or pass --store / set WEIGHTATLAS_STORE)")

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
        return os.path.join(self._model_dir(model), _file_name(step, tag))

    # ---- listing ----------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of the models that have at least one snapshot, sorted."""
        base = os.path.join(self.root, "models")
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        return [n for n in names if self._snapshot_files(n)]

    def _snapshot_files(self, model: str) -> list[tuple[int | None, str | None, str]]:
        directory = self._model_dir(model)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for name in names:
            m = _FILE.match(name)
            path = os.path.join(directory, name)
            if m and not os.path.islink(path):
                step = int(m["step"]) if m["step"] is not None else None
                found.append((step, m["tag"], path))
        # steps ascending, then tags by name
        return sorted(found, key=lambda t: (t[0] is None, t[0] or 0, t[1] or ""))

    def snapshots(self, model: str | None = None) -> list[SnapshotInfo]:
        """Every snapshot (of one model, or of all), read from file footers only."""
        models = [model] if model is not None else self.models()
        out = []
        for m in models:
            for _step, _tag, path in self._snapshot_files(m):
                out.append(self._info(path))
        return out

    def _info(self, path: str) -> SnapshotInfo:
        try:
            schema = pa.ipc.open_file(pa.BufferReader(map_file(path))).schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise IntegrityError(f"{path}: snapshot file is damaged: {e}") from e
        meta = decode_metadata(schema, path)
        try:
            return SnapshotInfo(
                model=meta["model"], step=meta["step"], tag=meta["tag"], path=path,
                created=meta["created"], framework=meta["framework"],
                source_file=meta["source_file"], source_sha256=meta["source_sha256"],
                n_tensors=meta["n_tensors"], n_params=meta["n_params"], nbytes=meta["nbytes"],
                file_size=os.path.getsize(path),
            )
        except KeyError as e:
            raise IntegrityError(f"{path}: snapshot metadata lacks {e}") from None

    def tensors(self, model: str | None = None) -> pa.Table:
        """All rows of all snapshots (of one model or all) with statistics, no tensor bytes."""
        tables = []
        for info in self.snapshots(model):
            with Snapshot(info.path) as snap:
                tables.append(snap.rows().combine_chunks())
        if not tables:
            from weightatlas.storage._format import SCHEMA

            return pa.schema([SCHEMA.field(c) for c in INFO_COLUMNS]).empty_table()
        return pa.concat_tables(tables)

    # ---- opening ----------------------------------------------------------------------
    def resolve(self, ref: str | None = None, *, model: str | None = None,
                step: int | None = None, tag: str | None = None) -> str:
        """Path of an existing snapshot. A model alone means its latest snapshot.

        The latest snapshot is the highest step, or, for a model with tags only, the
        most recently created tag.
        """
        if ref is not None:
            model, step, tag = parse_ref(ref)
        if model is None:
            raise StoreError("name a model (MODEL[@STEP])")
        label = f"{model}@{step if step is not None else tag}"
        if step is not None or tag is not None:
            path = self.path(model, step, tag)
            if not os.path.isfile(path) or os.path.islink(path):
                have = ", ".join(i.ref for i in self.snapshots(model)) or "none"
                raise NotFoundError(f"{self.root}: no snapshot {label} (snapshots of {model}: "
                                    f"{have})")
            return path
        files = self._snapshot_files(model)
        if not files:
            models = ", ".join(self.models()) or "none"
            raise NotFoundError(f"{self.root}: no model {model!r} (models: {models})")
        steps = [f for f in files if f[0] is not None]
        if steps:
            return steps[-1][2]
        return max((f[2] for f in files), key=lambda p: self._info(p).created)

    def snapshot(self, ref: str | None = None, *, model: str | None = None,
                 step: int | None = None, tag: str | None = None) -> Snapshot:
        """Open a snapshot by reference (``"mlp@100"``) or by ``model=``, ``step=``/``tag=``."""
        return Snapshot(self.resolve(ref, model=model, step=step, tag=tag))

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
        if chunk_bytes < 1:
            raise StoreError(f"chunk_bytes must be positive, got {chunk_bytes}")
        clean_staging(self.root)
        report = progress or (lambda phase, n, total: None)
        plan = plan_snapshot(source, model, step, tag, chunk_bytes, report)
        attachments = {check_attachment_name(k): bytes(v)
                       for k, v in dict(source.attachments()).items()}
        attached = {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)}
                    for k, v in sorted(attachments.items())}
        if attached:  # attachments are content too
            plan.content_digest = hashlib.sha256(
                (plan.content_digest + json.dumps(attached, sort_keys=True)).encode()
            ).hexdigest()
        label = f"{model}@{step if step is not None else tag}"
        existing = self._existing_digest(final)
        if existing is not None and not overwrite:
            if existing == plan.content_digest:
                return Snapshot(final)
            raise SnapshotExistsError(self._conflict(final, label, source.label))
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")
        meta = snapshot_metadata(plan, source, model, step, tag, created, chunk_bytes)
        meta["file_checksum"] = PLACEHOLDER
        meta["attachments"] = attached
        os.makedirs(os.path.dirname(final), exist_ok=True)
        for data in attachments.values():  # blobs first: a visible snapshot names no missing blob
            write_blob(self.root, os.path.dirname(final), data)
        with staging_file(self.root) as staging:
            try:
                write_snapshot_file(staging, source, plan, meta, report)
                finalize_file_checksum(staging)
            except OSError as e:
                raise StoreError(f"{self.root}: writing snapshot {label} failed: {e}") from e
            if not publish(staging, final, overwrite=overwrite):
                # Another writer created it between our check and our commit.
                if self._existing_digest(final) == plan.content_digest:
                    return Snapshot(final)
                raise SnapshotExistsError(self._conflict(final, label, source.label))
        return Snapshot(final)

    def _existing_digest(self, path: str) -> str | None:
        if not os.path.exists(path):
            return None
        try:
            meta = decode_metadata(pa.ipc.open_file(pa.BufferReader(map_file(path))).schema, path)
        except (pa.ArrowException, OSError, ValueError, WeightAtlasError):
            return "<unreadable>"
        return str(meta.get("content_digest"))

    @staticmethod
    def _conflict(path: str, label: str, source: str) -> str:
        return (f"{path}: snapshot {label} already exists with different tensors than {source}; "
                "use another --step/--tag, or --overwrite to replace it")

    # ---- removing and checking --------------------------------------------------------
    def rm(self, ref: str) -> list[str]:
        """Remove one snapshot (``MODEL@STEP``) or a whole model (``MODEL``); return paths."""
        model, step, tag = parse_ref(ref)
        if step is None and tag is None:
            files = [p for _, _, p in self._snapshot_files(model)]
            if not files:
                raise NotFoundError(f"{self.root}: no model {model!r}")
        else:
            files = [self.resolve(model=model, step=step, tag=tag)]
        for path in files:
            os.unlink(path)
        directory = self._model_dir(model)
        fsync_dir(directory)
        if not self._snapshot_files(model):
            shutil.rmtree(directory, ignore_errors=True)
            fsync_dir(os.path.join(self.root, "models"))
        return files

    def verify(self, ref: str | None = None) -> dict[str, list[str]]:
        """Recompute every checksum of every snapshot (or of one); map ref -> problems."""
        if ref is not None:
            model, step, tag = parse_ref(ref)
            paths = ([self.resolve(ref)] if step is not None or tag is not None
                     else [p for _, _, p in self._snapshot_files(model)])
        else:
            paths = [p for m in self.models() for _, _, p in self._snapshot_files(m)]
        results: dict[str, list[str]] = {}
        for path in paths:
            key = os.path.relpath(path, self.root)
            try:
                with Snapshot(path) as snap:
                    key = snap.ref
                    results[key] = snap.verify()
            except WeightAtlasError as e:
                results[key] = [str(e)]
        return results

    def gc(self, *, blob_grace: float = GRACE_SECONDS) -> list[str]:
        """Remove leftovers: staging files of killed writers, and attachments (blobs)
        that no snapshot names any more and that are older than ``blob_grace`` seconds.
        """
        removed = clean_staging(self.root)
        for model in self.models():
            referenced = set()
            for info in self.snapshots(model):
                with Snapshot(info.path) as snap:
                    referenced |= {a["sha256"] for a in snap.attachments.values()}
            removed += clean_blobs(self._model_dir(model), referenced, blob_grace)
        return removed
