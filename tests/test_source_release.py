"""File adapters hand out views of a memory map and release each tensor's pages one
record late: a record stays mapped until the record after next is asked for (the
store writes one tensor while it reads the next), and no longer, so memory stays at
about two tensors whatever the file's size.

Residency is read from the kernel (``/proc/self/smaps``: the resident bytes of the
mappings of the source's files) while real files written by safetensors, onnx and
torch are iterated.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from weightatlas.adapters import onnx as onnx_adapter
from weightatlas.adapters import safetensors as sft
from weightatlas.adapters import torch as torch_adapter
from weightatlas.errors import FormatError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="residency is read from /proc/self/smaps (Linux)")

N = 1 << 20  # values per tensor
T = 4 * N  # bytes per float32 tensor
SLACK = 512 << 10  # partial pages at tensor edges and the kernel's fault-around


def resident(paths: list[Path]) -> int:
    """Resident bytes of this process's mappings of ``paths``."""
    names = {str(p.resolve()) for p in paths}
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping: range perms ... path
                head = line.split(maxsplit=5)
                inside = len(head) == 6 and head[5].strip() in names
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def check_one_record_late(records: Callable[[], object], paths: list[Path], n: int) -> None:
    """Touch every page of each record as it comes: the previous one is still mapped,
    the ones before it are released."""
    seen = 0
    for j, rec in enumerate(records()):  # type: ignore[call-overload]
        data = rec.data
        assert float(data.reshape(-1)[:: 1024].astype(np.float64).sum()) == pytest.approx(
            float(j) * (N // 1024), abs=1e-6)  # every page read, values right
        held = resident(paths)
        want = T if j == 0 else 2 * T
        assert want - SLACK <= held <= want + SLACK, (j, held / T)
        seen += 1
    assert seen == n


def values(n: int) -> dict[str, np.ndarray]:
    return {f"t{j:02d}": np.full(N, j, np.float32) for j in range(n)}


def test_safetensors_releases_one_record_late(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    sft.write(values(8), path)
    source = sft.read(path)
    check_one_record_late(source.records, [path], 8)
    assert source.keeps_previous
    source.close()


def test_sharded_safetensors_releases_across_shards_one_record_late(tmp_path: Path) -> None:
    tensors = values(9)
    names = sorted(tensors)
    shards = []
    for k in range(3):  # shard boundaries after records 2 and 5
        shard = tmp_path / f"model-{k + 1:05d}-of-00003.safetensors"
        sft.write({n: tensors[n] for n in names[3 * k : 3 * k + 3]}, shard)
        shards.append(shard)
    weight_map = {n: f"model-{names.index(n) // 3 + 1:05d}-of-00003.safetensors" for n in names}
    import json

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    source = sft.read(tmp_path)
    check_one_record_late(source.records, shards, 9)
    source.close()


def test_onnx_external_data_is_released_one_record_late(tmp_path: Path) -> None:
    tensors = values(6)
    inits = [numpy_helper.from_array(v, name) for name, v in tensors.items()]
    nodes, x = [], "x"
    for name in tensors:
        nodes.append(helper.make_node("Add", [x, name], [f"{name}_out"]))
        x = f"{name}_out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [N])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    source = onnx_adapter.read(path)
    assert [r.name for r in source.records()] == [f"{n}.weight" for n in tensors]
    check_one_record_late(source.records, [tmp_path / "w.bin"], 6)
    assert source.keeps_previous
    # And the store's last check: the external data file is the one that was read.
    source.check_files_unchanged()
    st = (tmp_path / "w.bin").stat()
    os.utime(tmp_path / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(FormatError, match=r"external data 'w\.bin': file changed while it "
                                          "was being ingested"):
        source.check_files_unchanged()
    source.close()


def test_torch_checkpoint_is_released_one_record_late(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({name: torch.from_numpy(v) for name, v in values(6).items()}, path)
    source = torch_adapter.read(path)
    check_one_record_late(source.records, [path], 6)
    assert source.keeps_previous
