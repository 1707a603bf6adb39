"""Reader options pass through the registry, ingest and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import weightatlas as wa
from weightatlas.adapters import open_source
from weightatlas.cli import main
from weightatlas.errors import UnsupportedError


def reshaping_model(path: Path) -> None:
    """y = reshape(x @ W, shape): W is a weight, shape an int64 constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    shape = numpy_helper.from_array(np.array([3, 2], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_keep_constants_through_every_entry_point(tmp_path: Path, capsys):
    path = tmp_path / "m.onnx"
    reshaping_model(path)
    assert len(list(open_source(path).records())) == 1
    assert len(list(open_source(path, keep_constants=True).records())) == 2
    snap = wa.ingest(path, store=tmp_path / "a", keep_constants=True)
    assert len(snap) == 2
    with pytest.raises(SystemExit) as code:
        main(["--store", str(tmp_path / "b"), "ingest", str(path), "--keep-constants"])
    assert code.value.code in (0, None)
    assert len(wa.open_store(tmp_path / "b").snapshot("m")) == 2
    capsys.readouterr()


def test_an_option_a_reader_does_not_take_is_refused(tmp_path: Path):
    from weightatlas.adapters.safetensors import write

    write({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
    with pytest.raises(UnsupportedError, match=r"the safetensors reader takes no option "
                       r"'keep_constants'"):
        open_source(tmp_path / "m.safetensors", keep_constants=True)
