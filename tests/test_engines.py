"""Other Arrow engines read the store directly, as docs/architecture.md shows."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import xxhash

from weightatlas.storage import DTYPES, RecordsSource, Store, TensorRecord


@pytest.fixture
def filled(store: Store, rng) -> Store:
    for step in (0, 10, 20):
        recs = [
            TensorRecord("fc1.weight", rng.standard_normal((8, 4)).astype(np.float32),
                         kind="linear", layout=("out", "in")),
            TensorRecord("fc1.bias", np.full(8, step, np.float32), kind="linear",
                         layout=("out",)),
            TensorRecord("emb.weight", rng.standard_normal((6, 3)).astype(ml_dtypes.bfloat16),
                         kind="embedding", layout=("vocab", "dim")),
        ]
        # An attachment, as ONNX snapshots carry their graph: blobs must not confuse engines.
        store.write(RecordsSource(recs, files={"graph.onnx": b"graph bytes"}), "mlp", step=step)
    store.write(RecordsSource([TensorRecord("w", np.ones(2))]), "other", tag="best")
    return store


def test_pyarrow_dataset_lists_statistics_of_every_snapshot(filled: Store):
    dataset = ds.dataset(f"{filled.root}/models", format="ipc")
    table = dataset.to_table(columns=["model", "step", "tag", "name", "mean", "numel"],
                             filter=ds.field("name") == "fc1.bias")
    rows = sorted(table.to_pylist(), key=lambda r: r["step"])
    assert [(r["step"], r["mean"], r["numel"]) for r in rows] == [(0, 0.0, 8), (10, 10.0, 8),
                                                                    (20, 20.0, 8)]
    assert filled.tensors().num_rows == dataset.count_rows() == 10


def test_polars_reads_the_store(filled: Store):
    pl = pytest.importorskip("polars")
    df = (pl.scan_ipc(f"{filled.root}/models/*/*.arrow")
          .filter(pl.col("model") == "mlp")
          .group_by("step").agg(pl.col("numel").sum()).sort("step").collect())
    assert df["step"].to_list() == [0, 10, 20]
    assert df["numel"].to_list() == [8 * 4 + 8 + 18] * 3


def test_duckdb_queries_the_store_through_pyarrow(filled: Store):
    duckdb = pytest.importorskip("duckdb")
    dataset = ds.dataset(f"{filled.root}/models", format="ipc")  # noqa: F841 (used by SQL)
    rows = duckdb.sql("SELECT step, l2 FROM dataset WHERE name = 'fc1.bias' ORDER BY step"
                      ).fetchall()
    assert rows == [(0, 0.0), (10, pytest.approx(10 * np.sqrt(8))),
                    (20, pytest.approx(20 * np.sqrt(8)))]


def test_tensor_bytes_read_without_weightatlas(filled: Store):
    """What another tool does: read the IPC file, check the checksum, view the bytes."""
    path = filled.path("mlp", 10)
    with pa.memory_map(path) as mm:
        table = pa.ipc.open_file(mm).read_all()
    expected = filled.snapshot("mlp@10")
    for row in table.to_pylist():
        assert xxhash.xxh3_128(row["data"]).hexdigest() == row["checksum"]
        array = np.frombuffer(row["data"], DTYPES[row["dtype"]]).reshape(row["shape"])
        np.testing.assert_array_equal(array, expected.read(row["name"]))
