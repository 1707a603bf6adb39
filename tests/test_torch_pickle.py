"""The PyTorch checkpoint reader never runs pickled code, and refuses bad archives clearly.

Checkpoints are made by torch.save itself, or crafted here with Python's own pickler
(through torch's real rebuild functions, at every protocol) and zipfile, then checked
against torch.load(weights_only=True) as the independent reference.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from weightatlas.adapters import torch as wt
from weightatlas.errors import (
    FormatError,
    PathEscapeError,
    ShapeError,
    UnsafeInputError,
    UnsupportedError,
    WeightAtlasError,
)

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def write_pt(path: Path, data_pkl: bytes, storages: dict[str, bytes], prefix: str = "archive",
             extra: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's (stored entries, one folder)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
        for name, raw in (extra or {}).items():
            z.writestr(name, raw)
    return path


class _Storage:
    def __init__(self, key: str, numel: int, kind: object = None) -> None:
        self.key, self.numel, self.kind = key, numel, kind or torch.FloatStorage


class _Tensor:
    def __init__(self, st: _Storage, offset: int, shape: tuple, stride: tuple) -> None:
        self.args = (st, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def torch_like_pickle(obj: object, protocol: int) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", range(1, 6))  # protocol 0 has only text persistent ids
def test_crafted_checkpoints_read_at_every_protocol_like_torch_load(tmp_path: Path,
                                                                     protocol: int):
    values = np.arange(12, dtype=np.float32)
    st = _Storage("0", 12)
    state = collections.OrderedDict(
        [("fc.weight", _Tensor(st, 0, (3, 4), (4, 1))),
         ("fc.weight_t", _Tensor(st, 0, (4, 3), (1, 4))),  # a transposed view
         ("fc.bias", _Tensor(st, 8, (3,), (1,)))])
    path = write_pt(tmp_path / "m.pt", torch_like_pickle(state, protocol), {"0": values.tobytes()})
    got = {r.name: r.data for r in wt.read(path).records()}
    weight = values.reshape(3, 4)
    expected = {"fc.weight": weight, "fc.weight_t": weight.T, "fc.bias": values[8:11]}
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert np.array_equal(got[name], array), name
    if protocol in (2, 3):  # torch's own reader refuses protocols 1, 4 and 5
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            reference = torch.load(path, weights_only=True, mmap=True)
        assert list(reference) == list(got)
        for name, tensor in reference.items():
            assert np.array_equal(got[name], tensor.numpy()), name
    # zipfile does not align entries as torch.save does: unaligned storages are copied
    assert not got["fc.weight_t"].flags.writeable
    aligned = tmp_path / "aligned.pt"
    torch.save({"w": torch.ones(3, 4).t()}, aligned)
    view = next(wt.read(aligned).records()).data
    assert not view.flags.owndata and not view.flags.writeable  # a view of the mapped file


GADGETS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "compile"), ("builtins", "open"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("__builtin__", "eval"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("subprocess", "run"), ("importlib", "import_module"),
    ("marshal", "loads"), ("types", "FunctionType"), ("types", "CodeType"), ("codecs", "open"),
    ("cProfile", "runctx"), ("cProfile", "run"), ("profile", "run"), ("pdb", "run"),
    ("timeit", "timeit"), ("code", "InteractiveInterpreter"),
    ("idlelib.pyshell", "ModifiedInterpreter"), ("idlelib.run", "Executive"),
    ("pickle", "loads"), ("_pickle", "loads"), ("shutil", "rmtree"), ("webbrowser", "open"),
    ("runpy", "run_path"), ("ctypes", "CDLL"), ("pty", "spawn"), ("numpy", "load"),
    ("numpy.core.multiarray", "_reconstruct"), ("torch", "load"), ("torch.serialization", "load"),
    ("functools", "partial"), ("operator", "attrgetter"), ("sys", "exit"),
    ("collections", "OrderedDict.__init__"), ("__torch__.evil", "Module"),
    ("torch.nn.modules.linear", "Linear"), ("argparse", "Namespace"),
]


def gadget(module: str, name: str, arg: str, protocol: int) -> bytes:
    """A pickle calling module.name(arg) (what a malicious checkpoint holds)."""
    out = b"\x80" + bytes([protocol]) if protocol >= 2 else b""
    if protocol >= 4:
        for text in (module, name):
            raw = text.encode()
            out += b"\x8c" + bytes([len(raw)]) + raw
        out += b"\x93"
    else:
        out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    if protocol == 0:
        out += b"(V" + arg.encode() + b"\nt"
    else:
        raw = arg.encode()
        out += b"(X" + len(raw).to_bytes(4, "little") + raw + b"t"
    return out + b"R."


@pytest.mark.parametrize(("module", "name"), GADGETS, ids=[f"{m}.{n}" for m, n in GADGETS])
def test_every_code_gadget_is_refused_at_every_protocol(tmp_path: Path, module: str, name: str):
    canary = tmp_path / "canary"
    for protocol in range(6):
        path = write_pt(tmp_path / f"evil{protocol}.pt",
                        gadget(module, name, f"touch {canary}", protocol), {})
        wanted = re.escape(f"{module}.{name}")
        with pytest.raises(UnsafeInputError, match=rf"evil{protocol}\.pt.*global {wanted}"):
            wt.read(path)
    assert not canary.exists()


class _Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_canary_payload_in_a_real_torch_save_never_runs(tmp_path: Path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.ones(2, 2), "evil": _Evil(canary)}, path)
    with pytest.raises(UnsafeInputError, match=r"evil\.pt.*global posix\.system"):
        wt.read(path)
    assert not canary.exists()
    import weightatlas as wa

    store = tmp_path / "store"
    with pytest.raises(UnsafeInputError, match=r"posix\.system"):
        wa.ingest(path, store=store)
    assert not canary.exists()
    assert not list((store / "models").glob("*/*.arrow")) if (store / "models").exists() else True
    # The payload is live: unpickling it for real (in a child process) runs it.
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    assert canary.exists()


@pytest.mark.parametrize("op", [b"i", b"o", b"\x82", b"\x83", b"\x84", b"\x92"],
                         ids=["INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEWOBJ_EX"])
def test_opcodes_that_import_or_call_are_refused(tmp_path: Path, op: bytes):
    path = write_pt(tmp_path / "m.pt", b"\x80\x02(" + op + b"os\nsystem\n.", {})
    with pytest.raises(UnsafeInputError, match=r"m\.pt.*opcode"):
        wt.read(path)


def test_a_pickled_module_object_is_refused(tmp_path: Path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(UnsafeInputError, match=r"model\.pt.*torch\.nn\.modules\.linear\.Linear"
                                               r".*state_dict"):
        wt.read(path)


def test_non_tensor_objects_in_a_state_dict_are_errors(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"fc.weight": torch.ones(2), "note": "hello"}, "epoch": 3}, path)
    with pytest.raises(FormatError, match=r"ckpt\.pt: entry 'note' is a str, not a tensor"):
        wt.read(path)
    import argparse

    torch.save({"fc.weight": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeInputError, match=r"argparse\.Namespace"):
        wt.read(path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(FormatError, match=r"no state dict found.*'epoch'"):
        wt.read(path)


def test_legacy_tar_and_foreign_files_are_refused(tmp_path: Path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match=r"legacy\.pt: legacy \(pre-1\.6\) torch\.save format"):
        wt.read(legacy)
    tar = tmp_path / "old.pt"
    tar.write_bytes(bytes(257) + b"ustar" + bytes(300))
    with pytest.raises(FormatError, match=r"old\.pt: a tar archive"):
        wt.read(tar)
    other = tmp_path / "x.bin"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(FormatError, match=r"x\.bin: not a PyTorch checkpoint.*'GGUF'"):
        wt.read(other)


def test_zip_entry_names_that_escape_are_refused(tmp_path: Path):
    for bad in ("../x", "/abs/x", "archive/../../x", "a\\..\\x"):
        path = write_pt(tmp_path / "m.pt", pickle.dumps({}, 2), {}, extra={bad: b"1"})
        with pytest.raises(PathEscapeError, match=r"m\.pt: archive entry .* not a plain"):
            wt.read(path)


def test_overlapping_and_duplicate_zip_entries_are_refused(tmp_path: Path):
    path = write_pt(tmp_path / "m.pt", pickle.dumps({}, 2), {"0": bytes(64)})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        pkl_header = z.getinfo("archive/data.pkl").header_offset
    # Point the central-directory record of data/0 at data.pkl's local header.
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46: at + 46 + 14] != b"archive/data/0":
        at = raw.find(b"PK\x01\x02", at + 1)
    raw[at + 42: at + 46] = pkl_header.to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"m\.pt: entry 'archive/data/0': local header names|"
                                          r"overlap"):
        wt.read(path)
    dup = tmp_path / "dup.pt"
    with zipfile.ZipFile(dup, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, 2))
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("archive/data.pkl", pickle.dumps({}, 2))
    with pytest.raises(FormatError, match=r"dup\.pt: archive entry 'archive/data\.pkl' appears "
                                          "twice"):
        wt.read(dup)


def test_storage_smaller_than_its_tensors_is_a_shape_error(tmp_path: Path):
    st = _Storage("0", 6)
    data = torch_like_pickle({"w": _Tensor(st, 0, (2, 3), (3, 1))}, 2)
    short = write_pt(tmp_path / "short.pt", data, {"0": bytes(8)})
    with pytest.raises(ShapeError, match=r"short\.pt: storage '0' holds 8 bytes, the pickle "
                                         r"declares 6 float32 values \(24 bytes\)"):
        wt.read(short)
    reach = write_pt(tmp_path / "reach.pt",
                     torch_like_pickle({"w": _Tensor(st, 2, (2, 3), (3, 1))}, 2),
                     {"0": bytes(24)})
    with pytest.raises(ShapeError, match=r"reach\.pt: tensor 'w': shape \[2, 3\], stride "
                                         r"\[3, 1\] and offset 2 reach element 7, storage '0' "
                                         "holds 6"):
        wt.read(reach)
    missing = write_pt(tmp_path / "missing.pt", data, {})
    with pytest.raises(FormatError, match=r"missing\.pt: storage '0' is referenced by the "
                                          "pickle, but the archive has no"):
        wt.read(missing)


@pytest.mark.parametrize("raw", [
    b"\x80\x02R.", b"\x80\x02h\x05.", b"\x80\x02}q\x00(X\x01\x00\x00\x00ae.", b"\x80\x02]s.",
    b"\x80\x02(X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x85u.", b"\x80\x02\x8b\xff\xff\xff\x7f",
    b"\x80\x02\xc1.", b"\x80\x02", b"\x80\x02(t", b"\x80\x02I99999999999999999999999x\n.",
], ids=["underflow", "dangling-memo", "append-to-dict", "setitem-on-list", "odd-setitems",
        "huge-long", "bad-opcode", "no-stop", "mark-left", "bad-int"])
def test_malformed_pickles_are_format_errors(tmp_path: Path, raw: bytes):
    path = write_pt(tmp_path / "m.pt", raw, {})
    with pytest.raises(FormatError, match=r"m\.pt"):
        wt.read(path)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_and_complex_tensors_are_unsupported(tmp_path: Path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(UnsupportedError, match=r"c\.pt.*complex"):
        wt.read(path)
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    torch.save({"w": q}, path)
    with pytest.raises(UnsupportedError, match=r"c\.pt.*quantized"):
        wt.read(path)


def test_mutated_checkpoints_raise_only_weightatlas_errors(tmp_path: Path):
    """500 byte flips and truncations of a real checkpoint (fixed seed): never a crash."""
    path = tmp_path / "ok.pt"
    torch.save({"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2),
                "n": torch.tensor(3)}, path)
    good = path.read_bytes()
    rng = np.random.default_rng(7)
    pkl_at = good.find(b"\x80\x02")
    outcomes = collections.Counter()
    for i in range(500):
        raw = bytearray(good)
        if i % 5 == 0:
            raw = raw[: int(rng.integers(0, len(raw)))]
        else:
            lo = pkl_at if i % 2 else 0  # half the flips aim at the pickle
            for _ in range(int(rng.integers(1, 4))):
                raw[int(rng.integers(lo, len(raw)))] ^= int(rng.integers(1, 256))
        bad = tmp_path / "bad.pt"
        bad.write_bytes(bytes(raw))
        try:
            list(wt.read(bad).records())
            outcomes["read"] += 1
        except WeightAtlasError as e:
            outcomes[type(e).__name__] += 1
    assert sum(outcomes.values()) == 500
    assert outcomes["FormatError"] > 100  # the mutants really were damaged
