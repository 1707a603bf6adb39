"""Attachments: content-addressed files (an ONNX graph, say) that travel with snapshots."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from weightatlas.errors import IntegrityError, NotFoundError, StoreError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def source(value: float, graph: bytes) -> RecordsSource:
    return RecordsSource([TensorRecord("w", np.full(4, value, np.float32))],
                         files={"graph.onnx": graph})


def test_attachment_round_trip_and_sharing(store: Store):
    graph = b"\x08\x07" + os.urandom(1000)
    a = store.write(source(1.0, graph), "m", step=1)
    b = store.write(source(2.0, graph), "m", step=2)
    digest = hashlib.sha256(graph).hexdigest()
    assert a.attachments == {"graph.onnx": {"sha256": digest, "size": len(graph)}}
    assert a.attachment("graph.onnx") == b.attachment("graph.onnx") == graph
    blobs = Path(store.root) / "models" / "m" / "_blobs"
    assert os.listdir(blobs) == [digest]  # stored once for both snapshots
    assert store.verify() == {"m@1": [], "m@2": []}
    with pytest.raises(NotFoundError, match=r"has no attachment 'model\.onnx' \(attachments: "
                       r"graph\.onnx\)"):
        a.attachment("model.onnx")


def test_attachments_are_content(store: Store):
    store.write(source(1.0, b"graph-a"), "m", step=1)
    assert store.write(source(1.0, b"graph-a"), "m", step=1).attachment("graph.onnx") == b"graph-a"
    with pytest.raises(StoreError, match="already exists with different tensors"):
        store.write(source(1.0, b"graph-b"), "m", step=1)


def test_damaged_or_missing_blob_is_reported(store: Store):
    snap = store.write(source(1.0, b"the graph"), "m", step=1)
    blob = Path(store.root) / "models" / "m" / "_blobs" / snap.attachments["graph.onnx"]["sha256"]
    blob.write_bytes(b"the graph!")
    with pytest.raises(IntegrityError, match=r"attachment 'graph\.onnx' of m@1 is damaged"):
        snap.attachment("graph.onnx")
    assert any("damaged" in p for p in store.verify()["m@1"])
    blob.unlink()
    with pytest.raises(NotFoundError, match="is missing from the store"):
        snap.attachment("graph.onnx")


def test_gc_removes_only_unreferenced_old_blobs(store: Store):
    store.write(source(1.0, b"old graph"), "m", step=1)
    store.write(source(2.0, b"new graph"), "m", step=2)
    store.rm("m@1")
    blobs = Path(store.root) / "models" / "m" / "_blobs"
    assert len(os.listdir(blobs)) == 2
    assert store.gc() == []  # within the grace period: kept
    removed = store.gc(blob_grace=0)
    assert [Path(p).name for p in removed] == [hashlib.sha256(b"old graph").hexdigest()]
    assert store.snapshot("m@2").attachment("graph.onnx") == b"new graph"


def test_bad_attachment_names(store: Store):
    bad = RecordsSource([TensorRecord("w", np.ones(2))], files={"../x": b"1"})
    with pytest.raises(StoreError, match=r"attachment name '\.\./x' is not allowed"):
        store.write(bad, "m")
    assert store.snapshots() == []


def test_a_damaged_blob_is_replaced_when_attached_again(store: Store):
    snap = store.write(source(1.0, b"graph bytes"), "m", step=1)
    blob = Path(store.root) / "models" / "m" / "_blobs" / snap.attachments["graph.onnx"]["sha256"]
    blob.write_bytes(b"graph bytez")  # same size, other bytes
    again = store.write(source(2.0, b"graph bytes"), "m", step=2)
    assert again.attachment("graph.onnx") == b"graph bytes"
    assert snap.attachment("graph.onnx") == b"graph bytes"  # repaired for both


def test_gc_leaves_blobs_of_a_writer_that_holds_the_lock(store: Store):
    from weightatlas.storage._commit import locked

    store.write(source(1.0, b"old"), "m", step=1)
    store.rm("m@1")
    lock = Path(store.root) / "models" / "m" / ".blobs.lock"
    with locked(str(lock), shared=True):  # a writer between its blob and its snapshot
        assert store.gc(blob_grace=0) == []
    assert len(store.gc(blob_grace=0)) == 1
