"""Flax msgpack and Orbax checkpoints: real files read exactly, hostile ones refused.

Orbax checkpoints are written by Orbax itself (StandardCheckpointer); msgpack files by
flax.serialization; hostile variants are made from them (symlinks, FIFOs, hard links,
object-dtype leaves, damaged bytes).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.adapters import detect_format, open_source
from weightatlas.adapters import jax as wj
from weightatlas.adapters._jax_msgpack import parse
from weightatlas.errors import (
    FormatError,
    PathEscapeError,
    ResourceLimitError,
    ShapeError,
    UnsafeInputError,
    UnsupportedError,
    WeightAtlasError,
)

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
serialization = pytest.importorskip("flax.serialization")

PARAMS = {"params": {"Dense_0": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
                                 "bias": np.linspace(0, 1, 4, dtype=np.float32)},
                     "Embed_0": {"embedding": np.ones((5, 3), np.float32)}},
          "batch_stats": {"BatchNorm_0": {"mean": np.zeros(4, np.float32),
                                          "var": np.ones(4, np.float32)}}}


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(path), jax.tree_util.tree_map(jax.numpy.asarray, PARAMS))
    ckpt.wait_until_finished()
    ckpt.close()
    return path


def fresh(orbax_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(orbax_dir, target)
    return target


def test_orbax_checkpoint_restores_exactly(tmp_path: Path, orbax_dir: Path):
    path = fresh(orbax_dir, tmp_path)
    assert detect_format(path) == "orbax"
    snap = wa.ingest(path, store=tmp_path / "store", model="orb")
    reference = ocp.StandardCheckpointer().restore(str(path))
    assert snap.metadata["framework"] == "jax" and snap.metadata["source"]["format"] == "orbax"
    kernel = np.asarray(reference["params"]["Dense_0"]["kernel"])
    assert np.array_equal(snap.read("Dense_0.kernel"), kernel.T)
    assert np.array_equal(snap.read("Dense_0.kernel", layout="source"), kernel)
    assert snap.info("BatchNorm_0.var").kind == "norm"
    back = wj.to_pytree(snap)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(reference),
                    strict=True):
        assert np.array_equal(x, np.asarray(y))
    names = {f["name"] for f in snap.metadata["source_files"]}
    assert "_METADATA" in names and len(names) == len(
        [p for p in path.rglob("*") if p.is_file()])


def test_orbax_symlink_leaving_the_folder_is_refused(tmp_path: Path, orbax_dir: Path):
    path = fresh(orbax_dir, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("CANARY-SECRET-7731")
    chunk = next(p for p in (path / "d").iterdir())
    chunk.unlink()
    chunk.symlink_to(secret)
    store = tmp_path / "store"
    with pytest.raises(PathEscapeError, match=rf"d/{chunk.name} is a symbolic link to "
                                              rf".*secret\.txt, outside the checkpoint folder"):
        wa.ingest(path, store=store, model="orb")
    assert not list(store.rglob("*.arrow"))  # nothing partial written
    inner = fresh(orbax_dir, tmp_path / "b")
    (inner / "alias").symlink_to(inner / "_METADATA")
    with pytest.raises(UnsafeInputError, match="alias is a symbolic link"):
        wj.read(inner)


def test_orbax_fifo_hardlink_and_limits(tmp_path: Path, orbax_dir: Path):
    path = fresh(orbax_dir, tmp_path)
    os.mkfifo(path / "d" / "pipe")
    with pytest.raises(UnsafeInputError, match=r"d/pipe is a FIFO, not a regular file"):
        wj.read(path)  # and does not block on it
    (path / "d" / "pipe").unlink()
    os.link(path / "_METADATA", tmp_path / "elsewhere")
    with pytest.raises(UnsafeInputError, match="_METADATA has 2 hard links"):
        wj.read(path)
    (tmp_path / "elsewhere").unlink()
    with pytest.raises(ResourceLimitError, match="more than 3 files"):
        wj.read(path, max_files=3)
    with pytest.raises(ResourceLimitError, match="bytes"):
        wj.read(path, max_bytes=100)


def test_orbax_tree_keys_that_are_paths_are_refused(tmp_path: Path):
    path = tmp_path / "evil"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(path), {"a..b": jax.numpy.ones(2)})
    ckpt.wait_until_finished()
    ckpt.close()
    with pytest.raises(PathEscapeError, match=r"tree key 'a\.\.b' under <root> is not a plain"):
        wj.read(path)


def test_orbax_damaged_and_foreign_folders(tmp_path: Path, orbax_dir: Path):
    path = fresh(orbax_dir, tmp_path)
    (path / "_METADATA").write_text("{not json")
    with pytest.raises(FormatError, match="cannot restore this Orbax checkpoint"):
        wj.read(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsupportedError, match="not an Orbax checkpoint folder"):
        wj.read(empty)
    legacy = fresh(orbax_dir, tmp_path / "c")
    (legacy / "checkpoint").write_bytes(ext_array([2], "object", b"\x00" * 16))
    with pytest.raises(UnsafeInputError, match="dtype 'object'"):
        wj.read(legacy)


def ext_array(shape: list[int], dtype: str, data: bytes) -> bytes:
    """A Flax ndarray extension value, packed by hand."""
    import msgpack

    payload = msgpack.packb([shape, dtype, data], use_bin_type=True)
    return b"\xc9" + struct.pack(">I", len(payload)) + b"\x01" + payload


def packed(tree: dict) -> bytes:
    import msgpack

    return msgpack.packb(tree, use_bin_type=True)


def test_msgpack_object_leaves_and_bad_shapes_are_refused(tmp_path: Path):
    import msgpack

    path = tmp_path / "evil.msgpack"
    for dtype in ("object", "O", "|O", "V8"):
        body = msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb([[2], dtype, b"\x00" * 16],
                                                                    use_bin_type=True))},
                             use_bin_type=True)
        path.write_bytes(body)
        with pytest.raises(UnsafeInputError, match=rf"evil\.msgpack: array at byte \d+ has "
                                                   rf"dtype '{dtype}'"):
            wj.read(path)
    body = msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb([[3, 2], "float32", bytes(20)],
                                                                use_bin_type=True))},
                         use_bin_type=True)
    path.write_bytes(body)
    with pytest.raises(ShapeError, match=r"shape \[3, 2\] float32 needs 24 bytes, found 20"):
        wj.read(path)
    body = msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb([[2], "complex64", bytes(16)],
                                                                use_bin_type=True))},
                         use_bin_type=True)
    path.write_bytes(body)
    with pytest.raises(UnsupportedError, match="dtype 'complex64'"):
        wj.read(path)


@pytest.mark.parametrize(("raw", "error", "message"), [
    (b"\x81\xa1w\xc1", FormatError, "0xc1, which msgpack never uses"),
    (b"\x82\xa1w\x01\xa1w\x02", FormatError, "map key 'w' appears twice"),
    (b"\x81\xa1w\x01\x00", FormatError, "1 trailing bytes"),
    (b"\xdf\xff\xff\xff\xff", FormatError, "claims 4294967295 elements"),
    (b"\x91" * 600 + b"\x00", FormatError, "nested more than 128"),
    (b"\x81\x91\x01\x01", FormatError, "map key at byte 1 is a list"),
    (b"\x81\xa1w\xc4\x05ab", FormatError, r"needs 5 bytes, 2 left \(file truncated\?\)"),
    (b"\x81\xa1w\xd4\x05\x00", UnsupportedError, "extension type 5"),
], ids=["reserved", "duplicate", "trailing", "huge-map", "deep", "list-key", "truncated",
        "ext-type"])
def test_malformed_msgpack(tmp_path: Path, raw: bytes, error: type, message: str):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(raw)
    with pytest.raises(error, match=message):
        wj.read(path)


def test_msgpack_parser_matches_flax_and_survives_mutations(tmp_path: Path):
    raw = serialization.to_bytes(PARAMS)
    ours = parse(raw, "m.msgpack")
    theirs = serialization.msgpack_restore(raw)
    for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs),
                    strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    rng = np.random.default_rng(11)
    failures = 0
    for i in range(400):
        bad = bytearray(raw)
        if i % 4 == 0:
            bad = bad[: int(rng.integers(0, len(bad)))]
        else:
            bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
        try:
            parse(bytes(bad), "m.msgpack")
        except WeightAtlasError:
            failures += 1
    assert failures > 100


def test_open_source_and_ingest_msgpack(tmp_path: Path):
    path = tmp_path / "model.msgpack"
    path.write_bytes(serialization.to_bytes(PARAMS))
    src = open_source(path)
    assert src.framework == "jax"
    snap = wa.ingest(path, store=tmp_path / "store")
    assert snap.ref == "model@0"
    assert snap.info("Embed_0.embedding").kind == "embedding"
