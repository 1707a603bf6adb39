"""Snapshot.iter_chunks: a tensor streamed in pieces, every stored chunk checksummed once.

The reference is Snapshot.read (itself checked against the written arrays by the
round-trip tests): the pieces, joined, must be exactly its values, for every range,
piece size and storage chunking; a flipped byte must end the stream with an
IntegrityError before the damaged chunk's last piece is handed out.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._damage import flip_byte
from weightatlas.errors import IntegrityError, NotFoundError, ShapeError
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64]


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    store = Store(tmp_path_factory.mktemp("chunks") / "store", create=True)
    rng = np.random.default_rng(7)
    records = [TensorRecord(f"t{i}", (rng.standard_normal((97, 13)) * 100).astype(dt))
               for i, dt in enumerate(DTYPES)]
    records.append(TensorRecord("scalar", np.array(3.5, np.float32)))
    records.append(TensorRecord("empty", np.zeros((0, 4), np.float32)))
    # 13 values a row: chunks of 10 rows (520 bytes of float32), the last one shorter
    return store.write(RecordsSource(records), "m", chunk_bytes=13 * 4 * 10)


@settings(max_examples=60, deadline=None)
@given(i=st.integers(0, len(DTYPES) - 1), size=st.integers(1, 2000),
       bounds=st.tuples(st.integers(0, 97 * 13), st.integers(0, 97 * 13)))
def test_pieces_join_to_the_read_values(snap, i, size, bounds):
    start, stop = sorted(bounds)
    whole = snap.read(f"t{i}").reshape(-1)
    pieces = list(snap.iter_chunks(f"t{i}", size=size, start=start, stop=stop))
    assert all(0 < p.size <= size and p.dtype == whole.dtype for p in pieces)
    assert all(not p.flags.writeable for p in pieces)
    got = np.concatenate(pieces) if pieces else whole[:0]
    np.testing.assert_array_equal(got.view(np.uint8), whole[start:stop].view(np.uint8))


def test_pieces_never_span_two_stored_chunks_and_are_views_of_the_file(snap):
    rows = [r for r in snap.rows().to_pylist() if r["name"] == "t0"]
    assert len(rows) == 10  # 97 rows of 13 values, 10 per chunk
    pieces = list(snap.iter_chunks("t0", size=1000))
    assert [p.size for p in pieces] == [130] * 9 + [7 * 13]
    assert all(not p.flags.owndata for p in pieces)
    assert [p.tolist() for p in snap.iter_chunks("scalar")] == [[3.5]]
    assert list(snap.iter_chunks("empty")) == []


def test_bad_ranges_and_names_are_refused(snap):
    with pytest.raises(ShapeError, match=r"tensor 't0' \[97, 13\]: cannot stream values "
                                         r"\[5, 2000\) in pieces of 10; it holds 1261"):
        snap.iter_chunks("t0", size=10, start=5, stop=2000)
    with pytest.raises(ShapeError, match="in pieces of 0"):
        snap.iter_chunks("t0", size=0)
    with pytest.raises(ShapeError, match=r"\[9, 3\)"):
        snap.iter_chunks("t0", start=9, stop=3)
    with pytest.raises(NotFoundError, match="did you mean 't0'"):
        snap.iter_chunks("t00")


def test_a_flipped_byte_ends_the_stream_before_its_chunk_is_handed_out(store: Store):
    data = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    snap = store.write(RecordsSource([TensorRecord("w", data)]), "m",
                       chunk_bytes=16 * 4 * 16)  # four stored chunks of 256 values
    path = snap.path
    snap.close()
    raw = Path(path).read_bytes()
    flip_byte(path, raw.find(data[40].tobytes()) + 5)  # in the third chunk (rows 32-47)
    with Snapshot(path) as damaged:
        seen = []
        with pytest.raises(IntegrityError, match=r"tensor 'w' \(chunk 2\) is damaged: "
                                                 r"checksum [0-9a-f]{32} does not match"):
            for piece in damaged.iter_chunks("w", size=100):
                seen.append(piece.copy())
        # chunks 0 and 1 whole, then the pieces of chunk 2 before its last one
        assert sum(p.size for p in seen) == 512 + 200
        # a range that does not touch the damaged chunk streams fine; verify=False all
        assert sum(p.size for p in damaged.iter_chunks("w", stop=512)) == 512
        flipped = np.concatenate(list(damaged.iter_chunks("w", verify=False)))
        assert np.count_nonzero(flipped != data.reshape(-1)) == 1
        with pytest.raises(IntegrityError, match=r"\(chunk 2\)"):
            list(damaged.iter_chunks("w", start=600, stop=601))  # the whole chunk is checked
