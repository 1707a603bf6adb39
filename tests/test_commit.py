"""The commit protocol under faults: kill -9, concurrent writers, flipped bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests._damage import flip_byte
from weightatlas.errors import IntegrityError, SnapshotExistsError, StoreError
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord
from weightatlas.storage._commit import STAGING

CHILD = str(Path(__file__).with_name("_writer_child.py"))


def spawn(root: Path, model: str, step: int, seed: int, mb: float, *extra: str):
    return subprocess.Popen([sys.executable, CHILD, str(root), model, str(step), str(seed),
                             str(mb), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, kill: bool = False, timeout: float = 120) -> tuple[int, str]:
    """Wait for (or kill) a child; return its exit code and all its output."""
    if kill:
        os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def staging_files(root: Path) -> list[str]:
    d = root / STAGING
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("pause_bytes", [1, 3 << 20, 7 << 20], ids=["start", "middle", "end"])
def test_kill_9_during_ingest_leaves_no_partial_snapshot(tmp_path: Path, pause_bytes: int):
    root = tmp_path / "store"
    store = Store(root, create=True)
    store.write(RecordsSource([TensorRecord("w", np.ones(3, np.float32))]), "other", step=1)
    proc = spawn(root, "m", 5, 0, 8, "--pause-after-write-bytes", str(pause_bytes))
    line = proc.stdout.readline()
    assert line.strip() == "READY", finish(proc)
    # Mid-write: the staging file exists, the snapshot is not visible.
    assert len(staging_files(root)) == 1
    assert [i.ref for i in store.snapshots()] == ["other@1"]
    finish(proc, kill=True)
    store = Store(root)
    assert [i.ref for i in store.snapshots()] == ["other@1"]
    assert store.verify() == {"other@1": []}
    # The dead writer's staging file is cleaned; nothing else is touched.
    removed = store.gc()
    assert len(removed) == 1 and staging_files(root) == []
    # And the snapshot can be written afterwards.
    code, output = finish(spawn(root, "m", 5, 0, 8))
    assert code == 0, output
    assert [i.ref for i in store.snapshots()] == ["m@5", "other@1"]
    assert store.verify()["m@5"] == []


@pytest.mark.slow
def test_kill_9_at_random_instants(tmp_path: Path):
    root = tmp_path / "store"
    Store(root, create=True)
    rng = np.random.default_rng(7)
    for i in range(6):
        proc = spawn(root, "m", i, i, 6)
        time.sleep(float(rng.uniform(0.0, 1.2)))
        finish(proc, kill=True)
    store = Store(root)
    # Whatever got committed is whole and verifies; nothing partial is visible.
    for ref, problems in store.verify().items():
        assert problems == [], ref
    for info in store.snapshots():
        with store.snapshot(info.ref) as snap:
            assert len(snap) == 8
    store.gc()
    assert staging_files(root) == []


def test_a_live_writer_staging_file_is_not_cleaned(tmp_path: Path):
    root = tmp_path / "store"
    Store(root, create=True)
    proc = spawn(root, "m", 1, 0, 2, "--pause-after-write-bytes", "1")
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert Store(root).gc() == []
        assert len(staging_files(root)) == 1
    finally:
        finish(proc, kill=True)


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path: Path):
    root = tmp_path / "store"
    Store(root, create=True)
    go = tmp_path / "go"
    procs = [spawn(root, f"model{i % 2}", i, i, 2, "--go-file", str(go)) for i in range(6)]
    time.sleep(1.0)
    go.touch()
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0] * 6, results
    store = Store(root)
    assert sorted(i.ref for i in store.snapshots()) == sorted(
        f"model{i % 2}@{i}" for i in range(6))
    assert all(v == [] for v in store.verify().values())
    assert staging_files(root) == []


@pytest.mark.slow
def test_two_writers_of_one_snapshot(tmp_path: Path):
    root = tmp_path / "store"
    Store(root, create=True)
    go = tmp_path / "go"
    # Different content for the same (model, step): exactly one wins.
    procs = [spawn(root, "m", 3, seed, 2, "--go-file", str(go)) for seed in (1, 2)]
    time.sleep(1.0)
    go.touch()
    results = [finish(p) for p in procs]
    assert sorted(code for code, _ in results) == [0, 3], results
    assert any("already exists with different tensors" in out for _, out in results)
    store = Store(root)
    assert [i.ref for i in store.snapshots()] == ["m@3"]
    assert store.verify() == {"m@3": []}
    # Same content from two writers: both succeed, one snapshot.
    go2 = tmp_path / "go2"
    procs = [spawn(root, "m", 4, 9, 2, "--go-file", str(go2)) for _ in range(2)]
    time.sleep(1.0)
    go2.touch()
    assert [finish(p)[0] for p in procs] == [0, 0]
    assert [i.ref for i in store.snapshots()] == ["m@3", "m@4"]


def test_same_step_twice(store: Store, rng):
    a = [TensorRecord("w", rng.standard_normal(10).astype(np.float32))]
    b = [TensorRecord("w", rng.standard_normal(10).astype(np.float32))]
    first = store.write(RecordsSource(a), "m", step=1)
    again = store.write(RecordsSource(a), "m", step=1)  # same content: no-op
    assert again.metadata["created"] == first.metadata["created"]
    with pytest.raises(SnapshotExistsError, match=r"step-1.arrow: snapshot m@1 already exists "
                       r"with different tensors than <memory>; use another --step/--tag, or "
                       r"--overwrite"):
        store.write(RecordsSource(b), "m", step=1)
    np.testing.assert_array_equal(store.snapshot("m@1").read("w"), a[0].data)
    replaced = store.write(RecordsSource(b), "m", step=1, overwrite=True)
    np.testing.assert_array_equal(replaced.read("w"), b[0].data)
    # A reader that opened the old snapshot still reads the old bytes.
    np.testing.assert_array_equal(first.read("w"), a[0].data)


def test_every_flipped_byte_is_caught_by_verify(tmp_path: Path, rng):
    root = tmp_path / "store"
    store = Store(root, create=True)
    records = [TensorRecord(f"l{i}.weight", rng.standard_normal((16, 8)).astype(np.float32))
               for i in range(3)]
    records.append(TensorRecord("l3.bias", np.arange(5, dtype=np.int64)))
    snap = store.write(RecordsSource(records), "m", step=1)
    store.write(RecordsSource(records[:1]), "other", step=1)
    pristine = Path(snap.path).read_bytes()
    size = len(pristine)
    positions = sorted(set(np.linspace(0, size - 1, 150).astype(int)) | set(range(0, 64))
                       | set(range(size - 64, size)))
    caught = 0
    for pos in positions:
        Path(snap.path).write_bytes(pristine)
        flip_byte(snap.path, int(pos))
        result = store.verify()
        assert result["other@1"] == []
        damaged = [k for k, v in result.items() if v and k != "other@1"]
        caught += bool(damaged)
    assert caught == len(positions)


def test_flipped_data_byte_raises_on_read_naming_snapshot_and_tensor(store: Store, rng):
    data = rng.standard_normal((64, 64)).astype(np.float32)
    snap = store.write(RecordsSource([TensorRecord("fc.weight", data),
                                      TensorRecord("fc.bias", np.zeros(64, np.float32))]), "m")
    path = snap.path
    snap.close()
    raw = Path(path).read_bytes()
    at = raw.find(data.tobytes()[:64])
    flip_byte(path, at + 1000)
    with Snapshot(path) as snap:
        with pytest.raises(IntegrityError, match=r"step-0.arrow: tensor 'fc.weight' \(chunk 0\) "
                           r"is damaged: checksum [0-9a-f]{32} does not match the stored"):
            snap.read("fc.weight")
        np.testing.assert_array_equal(snap.read("fc.bias"), 0)  # the rest still reads
        assert snap.read("fc.weight", verify=False).shape == (64, 64)
        assert any("fc.weight" in p for p in snap.verify())


def test_truncated_and_garbage_snapshot_files(store: Store):
    snap = store.write(RecordsSource([TensorRecord("w", np.ones(100, np.float32))]), "m")
    path = snap.path
    snap.close()
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match=r"step-0\.arrow"):
        Snapshot(path)
    assert store.verify()["m@0"][0].startswith(path)
    Path(path).write_bytes(b"not arrow at all")
    with pytest.raises(IntegrityError, match=r"step-0\.arrow: snapshot file is damaged"):
        store.snapshot("m")


def test_symlinked_snapshot_files_are_ignored(store: Store, tmp_path: Path):
    store.write(RecordsSource([TensorRecord("w", np.ones(3, np.float32))]), "m", step=1)
    outside = tmp_path / "outside.arrow"
    shutil.copy(store.path("m", 1), outside)
    os.symlink(outside, store.path("m", 2))
    assert [i.ref for i in store.snapshots()] == ["m@1"]
    with pytest.raises(StoreError, match="no snapshot m@2"):
        store.snapshot("m@2")
