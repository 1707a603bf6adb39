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
    NotFoundError,
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


# ---- Orbax CheckpointManager: a folder of step folders -------------------------------------

MANAGER_STEPS = (0, 2, 5, 9)


@pytest.fixture(scope="module")
def manager_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    """A Flax MLP trained 9 SGD steps on digits, saved by a CheckpointManager at 0, 2, 5, 9
    as a training state; returns the root and the params saved at each step."""
    import flax.linen as fnn
    import optax

    from tests.framework_models import digits_data

    x, y = digits_data()
    x = x.reshape(len(x), -1)

    class MLP(fnn.Module):
        @fnn.compact
        def __call__(self, h):  # type: ignore[no-untyped-def]
            return fnn.Dense(10)(fnn.relu(fnn.Dense(16)(h)))

    model, tx = MLP(), optax.sgd(0.5)
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = tx.init(params)

    def loss(p):  # type: ignore[no-untyped-def]
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    root = tmp_path_factory.mktemp("manager") / "ckpts"
    saved, losses = {}, []
    with ocp.CheckpointManager(root) as manager:
        for step in range(max(MANAGER_STEPS) + 1):
            if step in MANAGER_STEPS:
                state = {"step": step, "params": params, "opt_state": opt}
                manager.save(step, args=ocp.args.StandardSave(state))
                saved[step] = jax.tree_util.tree_map(np.asarray, params)
            value, grads = jax.value_and_grad(loss)(params)
            losses.append(float(value))
            updates, opt = tx.update(grads, opt)
            params = optax.apply_updates(params, updates)
        manager.wait_until_finished()
    assert losses[-1] < losses[0]  # it learnt
    return root, saved


def fresh_root(manager_root: tuple[Path, dict], tmp_path: Path) -> Path:
    return Path(shutil.copytree(manager_root[0], tmp_path / "ckpts"))


def test_manager_root_reads_the_latest_step_and_each_step(tmp_path: Path, manager_root):
    root, saved = fresh_root(manager_root, tmp_path), manager_root[1]
    assert detect_format(root) == "orbax" and wj.steps(root) == list(MANAGER_STEPS)
    store = wa.open_store(tmp_path / "store")
    latest = wa.ingest(root, store=store, model="mlp")
    assert latest.ref == "mlp@9"  # the checkpoint's step, not 0
    meta = latest.metadata["source"]
    assert (meta["step"], meta["manager_steps"], meta["items"]) == (9, [0, 2, 5, 9], ["default"])
    assert sorted(meta["other_keys"]) == ["opt_state", "step"]
    kernel = saved[9]["Dense_0"]["kernel"]
    assert np.array_equal(latest.read("Dense_0.kernel"), kernel.T)
    assert np.array_equal(latest.read("Dense_0.kernel", layout="source"), kernel)
    assert latest.metadata["n_params"] == sum(a.size for a in jax.tree_util.tree_leaves(saved[9]))
    for step in MANAGER_STEPS:  # every step, as the steps of one model
        snap = wa.ingest(root, store=store, model="all", step=step)
        assert snap.metadata["source"]["step"] == step
        back = wj.to_pytree(snap)["params"]
        for got, want in zip(jax.tree_util.tree_leaves(back),
                             jax.tree_util.tree_leaves(saved[step]), strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want)
    assert [i.step for i in store.snapshots("all")] == list(MANAGER_STEPS)
    assert not np.array_equal(store.snapshot("all@0").read("Dense_1.kernel"),
                              store.snapshot("all@9").read("Dense_1.kernel"))
    names = {f["name"] for f in latest.metadata["source_files"]}
    assert "_CHECKPOINT_METADATA" in names and "default/_METADATA" in names
    with pytest.raises(NotFoundError, match=r"ckpts: no step 4 \(steps: \[0, 2, 5, 9\]\)"):
        wj.read(root, step=4)


def test_manager_step_folders_ingest_from_the_cli(tmp_path: Path, manager_root, capsys):
    from weightatlas.cli import main

    root = fresh_root(manager_root, tmp_path)
    folders = [str(root / str(s)) for s in MANAGER_STEPS]
    assert wj.read(folders[1]).metadata()["step"] == 2  # a step folder is named by its step
    try:
        main(["--store", str(tmp_path / "store"), "ingest", "--model", "mlp", *folders])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    assert capsys.readouterr().out.count("ingested") == len(MANAGER_STEPS)
    store = wa.open_store(tmp_path / "store")
    assert [i.step for i in store.snapshots("mlp")] == list(MANAGER_STEPS)
    saved = manager_root[1][5]["Dense_1"]["bias"]
    assert np.array_equal(store.snapshot("mlp@5").read("Dense_1.bias"), saved)


def test_manager_root_links_and_broken_steps_are_refused(tmp_path: Path, manager_root):
    secret = tmp_path / "outside"
    shutil.copytree(manager_root[0] / "2", secret)
    root = fresh_root(manager_root, tmp_path)
    (root / "12").symlink_to(secret, target_is_directory=True)  # a step folder elsewhere
    with pytest.raises(PathEscapeError, match=r"ckpts: 12 is a symbolic link to .*outside, "
                                              r"outside the checkpoint folder"):
        wa.ingest(root, store=tmp_path / "store")
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.arrow"))
    (root / "12").unlink()
    chunk = next((root / "9" / "default" / "d").iterdir())
    chunk.unlink()
    chunk.symlink_to(tmp_path / "secret.txt")  # inside the step read
    with pytest.raises(PathEscapeError, match=rf"9: default/d/{chunk.name} is a symbolic link"):
        wj.read(root)
    wj.read(root, step=5)  # the other steps are fine
    shutil.rmtree(root / "9")
    (root / "9").mkdir()  # a step folder with no checkpoint in it (an unfinished save)
    (root / "9" / "notes.txt").write_text("x")
    with pytest.raises(FormatError, match=r"ckpts/9: not an Orbax checkpoint step \(no "
                                          r"_CHECKPOINT_METADATA"):
        wj.read(root)
    assert wj.read(root, step=5).metadata()["step"] == 5
    (root / "9" / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(FormatError, match=r"9: no array item in this checkpoint step"):
        wj.read(root)
    with pytest.raises(UnsupportedError, match=r"step=3 needs an Orbax CheckpointManager "
                                               r"folder"):
        wj.read(root / "5" / "default", step=3)
    with pytest.raises(UnsupportedError, match="not an Orbax CheckpointManager folder"):
        wj.steps(root / "5")


def test_manager_step_with_several_items_reads_the_array_items(tmp_path: Path):
    root = tmp_path / "multi"
    with ocp.CheckpointManager(root, item_names=("state", "meta")) as manager:
        manager.save(3, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree_util.tree_map(jax.numpy.asarray, PARAMS)),
            meta=ocp.args.JsonSave({"lr": 0.1})))
        manager.wait_until_finished()
    src = wj.read(root)
    meta = src.metadata()
    assert (meta["step"], meta["items"], meta["items_skipped"]) == (3, ["state"], ["meta"])
    rec = {r.name: r for r in src.records()}
    assert np.array_equal(rec["Dense_0.kernel"].data, PARAMS["params"]["Dense_0"]["kernel"].T)
