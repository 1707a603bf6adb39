"""The store never reaches outside itself, and never believes a file's name over its contents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightatlas.errors import IntegrityError, NotFoundError, PathEscapeError
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord


def one(value: float = 1.0, **files: bytes) -> RecordsSource:
    return RecordsSource([TensorRecord("w", np.full(3, value, np.float32))], files=dict(files))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    (d / ("1-" + "0" * 32 + ".arrow.partial")).write_text("looks like staging")
    (d / "step-5.arrow").write_text("not ours")
    return d


def test_symlinked_staging_folder_is_refused(store: Store, outside: Path):
    staging = Path(store.root) / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.symlink(outside, staging)
    with pytest.raises(PathEscapeError, match=r"\.staging: is a symbolic link"):
        store.write(one(), "m")
    with pytest.raises(PathEscapeError):
        store.gc()
    assert sorted(p.name for p in outside.iterdir()) == [
        "1-" + "0" * 32 + ".arrow.partial", "precious.txt", "step-5.arrow"]


def test_symlinked_model_folder_is_refused(store: Store, outside: Path):
    os.symlink(outside, Path(store.root) / "models" / "evil")
    with pytest.raises(PathEscapeError, match=r"models/evil: is a symbolic link"):
        store.models()
    with pytest.raises(PathEscapeError):
        store.rm("evil")
    with pytest.raises(PathEscapeError):
        store.write(one(), "evil", step=9)
    assert (outside / "step-5.arrow").exists()


def test_symlinked_blob_folder_is_refused(store: Store, outside: Path):
    snap = store.write(one(graph=b"g"), "m", step=1)
    blobs = Path(store.root) / "models" / "m" / "_blobs"
    shutil.rmtree(blobs)
    os.symlink(outside, blobs)
    with pytest.raises(PathEscapeError):
        snap.attachment("graph")
    with pytest.raises(PathEscapeError):
        store.gc(blob_grace=0)
    assert (outside / "precious.txt").exists()


def test_foreign_files_in_staging_are_never_touched(store: Store):
    staging = Path(store.root) / ".staging"
    staging.mkdir(exist_ok=True)
    (staging / "notes.txt").write_text("mine")
    os.mkfifo(staging / ("7-" + "a" * 32 + ".arrow.partial"))  # a FIFO must not hang gc
    assert store.gc() == []
    assert (staging / "notes.txt").exists()


def test_a_copied_or_renamed_snapshot_file_is_caught(store: Store):
    store.write(one(1.0), "a", step=1)
    shutil.copy(store.path("a", 1), store.path("a", 7))
    with pytest.raises(IntegrityError, match=r"holds snapshot a@1 but its place in the store "
                       r"says a@7"):
        store.snapshot("a@7")
    infos = {i.ref: i for i in store.snapshots("a")}
    assert infos["a@1"].problem is None
    assert "holds snapshot a@1" in infos["a@7"].problem
    result = store.verify()
    assert result["a@1"] == [] and "holds snapshot a@1" in result["a@7"][0]
    # A damaged original is not masked by its intact copy.
    raw = bytearray(Path(store.path("a", 1)).read_bytes())
    raw[len(raw) // 2] ^= 1
    Path(store.path("a", 1)).write_bytes(bytes(raw))
    result = store.verify()
    assert result["a@1"] and result["a@7"]


def test_a_damaged_snapshot_does_not_break_listings(store: Store):
    store.write(one(1.0), "m", step=1)
    store.write(one(2.0), "m", step=2)
    Path(store.path("m", 1)).write_bytes(b"garbage")
    infos = store.snapshots("m")
    assert [i.ref for i in infos] == ["m@1", "m@2"]
    assert infos[0].problem and infos[1].problem is None
    assert store.tensors("m").column("step").to_pylist() == [2]
    assert store.latest("m").ref == "m@2"


def test_verify_of_something_absent_is_an_error(store: Store):
    store.write(one(), "m", step=1)
    with pytest.raises(NotFoundError, match="no model 'typo'"):
        store.verify("typo")
    with pytest.raises(NotFoundError, match="no snapshot m@3"):
        store.verify("m@3")


def test_rm_twice_and_rm_leaves_blobs_to_gc(store: Store):
    store.write(one(graph=b"g1"), "m", step=1)
    assert len(store.rm("m@1")) == 1
    with pytest.raises(NotFoundError):
        store.rm("m@1")
    assert len(os.listdir(Path(store.root) / "models" / "m" / "_blobs")) == 1
    assert store.models() == []


def test_many_processes_create_one_store_at_once(tmp_path: Path):
    root = tmp_path / "fresh"
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[2]);"
            "from weightatlas.storage import Store, RecordsSource, TensorRecord;"
            "s = Store(sys.argv[1], create=True);"
            "s.write(RecordsSource([TensorRecord('w', np.ones(2))]), 'm', step=int(sys.argv[3]))")
    repo = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), repo, str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert sorted(i.ref for i in Store(root).snapshots()) == ["m@0", "m@1", "m@2", "m@3"]


def test_snapshot_rows_must_agree_with_metadata(store: Store, rng):
    snap = store.write(RecordsSource([TensorRecord("a", rng.standard_normal(8)),
                                      TensorRecord("b", rng.standard_normal(8))]), "m")
    path = snap.path
    snap.close()
    raw = Path(path).read_bytes()
    # Swap the first bytes of a dtype string in a row: "float64" -> "gloat64".
    at = raw.find(b"float64")
    damaged = raw[:at] + b"g" + raw[at + 1 :]
    Path(path).write_bytes(damaged)
    with Snapshot(path) as s:
        with pytest.raises(IntegrityError, match=r"tensor 'a': unknown dtype 'gloat64'"):
            s.read("a")
        assert s.verify()
