"""VectorTableWriter: a vector table written batch by batch is the file write_vectors writes in one call."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import pipeline.vectors as vectors_module
from pipeline.vectors import VectorTableWriter, read_vectors, write_vectors

META = {"metric": "angular", "model": "normalized", "source": {"n": 3, "limits": [1, 2]}}


def _rows(n: int, dim: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        vectors = rng.integers(0, 256, (n, dim)).astype(np.uint8)
    else:
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
    keys = [f"w{i}" if i % 5 else f"ß_{i}é" for i in range(n)]
    labels = rng.integers(-1, 10, n).astype(np.int32)
    splits = ["base" if i % 3 else "query" for i in range(n)]
    return vectors, keys, labels, splits


def _streamed(path, vectors, keys, labels, splits, sizes, meta=META) -> VectorTableWriter:
    dim = vectors.shape[1]
    with VectorTableWriter(path, dim, vectors.dtype, meta=meta) as writer:
        start = 0
        for size in sizes:
            stop = start + size
            writer.write_batch(vectors[start:stop], keys[start:stop],
                               None if labels is None else labels[start:stop],
                               None if splits is None else splits[start:stop])
            start = stop
    assert start == len(keys)
    return writer


def _cuts(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("with_columns", [True, False])
def test_streamed_table_is_byte_identical(tmp_path, dtype, with_columns):
    n, dim = 1000, 7
    vectors, keys, labels, splits = _rows(n, dim, dtype)
    if not with_columns:
        labels = splits = None
    write_vectors(tmp_path / "one.arrow", vectors, keys, labels, splits, meta=META)
    want = (tmp_path / "one.arrow").read_bytes()
    for sizes in (_cuts(n, 1), _cuts(n, 3), _cuts(n, 64), [n], [0, 500, 0, 1, 499]):
        path = tmp_path / "streamed.arrow"
        writer = _streamed(path, vectors, keys, labels, splits, sizes)
        assert path.read_bytes() == want, sizes
        assert writer.n == n
        # the vectors went file-to-file, not through this process's memory
        assert writer.spliced_bytes == vectors.nbytes
        assert sorted(p.name for p in tmp_path.iterdir()) == ["one.arrow", "streamed.arrow"]  # no spill left

    table = read_vectors(tmp_path / "streamed.arrow")
    np.testing.assert_array_equal(table.vectors, vectors)
    assert table.vectors.dtype == dtype and table.keys == keys
    np.testing.assert_array_equal(table.labels, labels if with_columns else np.full(n, -1, np.int32))
    assert list(table.splits) == (splits if with_columns else [""] * n)
    assert table.meta["dim"] == str(dim) and table.meta["metric"] == "angular"


def test_ids_run_across_batches(tmp_path):
    import pyarrow as pa

    vectors, keys, labels, splits = _rows(10, 3, np.float32)
    _streamed(tmp_path / "t.arrow", vectors, keys, labels, splits, [4, 4, 2])
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / "t.arrow")))
    assert reader.num_record_batches == 1  # one batch: read_vectors maps the vector column without a copy
    assert reader.read_all().column("id").to_pylist() == list(range(10))


def test_empty_table(tmp_path):
    write_vectors(tmp_path / "one.arrow", np.empty((0, 4), np.float32), [], meta=META)
    with VectorTableWriter(tmp_path / "none.arrow", 4, meta=META):
        pass
    assert (tmp_path / "none.arrow").read_bytes() == (tmp_path / "one.arrow").read_bytes()
    assert len(read_vectors(tmp_path / "none.arrow")) == 0


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    # filesystems or systems without copy_file_range: the vectors are copied in pieces instead
    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    monkeypatch.setattr(vectors_module, "_COPY_PIECE", 1000)
    vectors, keys, labels, splits = _rows(500, 9, np.float32, seed=1)
    write_vectors(tmp_path / "one.arrow", vectors, keys, labels, splits, meta=META)
    writer = _streamed(tmp_path / "s.arrow", vectors, keys, labels, splits, _cuts(500, 77))
    assert (tmp_path / "s.arrow").read_bytes() == (tmp_path / "one.arrow").read_bytes()
    assert writer.spliced_bytes == vectors.nbytes


def test_an_error_inside_the_block_writes_nothing(tmp_path):
    vectors, keys, _, _ = _rows(10, 3, np.float32)
    with pytest.raises(RuntimeError, match="stage failed"):
        with VectorTableWriter(tmp_path / "t.arrow", 3) as writer:
            writer.write_batch(vectors, keys)
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []


def test_bad_batches(tmp_path):
    vectors, keys, labels, splits = _rows(4, 3, np.float32)
    with VectorTableWriter(tmp_path / "t.arrow", 3) as writer:
        with pytest.raises(ValueError, match=r"float32 array of shape \(n, 3\), got float32 \(4, 2\)"):
            writer.write_batch(vectors[:, :2], keys)
        with pytest.raises(ValueError, match="got uint8"):
            writer.write_batch(vectors.astype(np.uint8), keys)
        with pytest.raises(ValueError, match="3 keys for 4 vectors"):
            writer.write_batch(vectors, keys[:3])
        with pytest.raises(ValueError, match="2 labels for 4 vectors"):
            writer.write_batch(vectors, keys, labels[:2])
        with pytest.raises(ValueError, match="1 splits for 4 vectors"):
            writer.write_batch(vectors, keys, labels, splits[:1])
        writer.write_batch(vectors, keys)
    assert len(read_vectors(tmp_path / "t.arrow")) == 4  # the refused batches left nothing behind
    with pytest.raises(ValueError, match="closed"):
        writer.write_batch(vectors, keys)
    for dtype, dim in ((np.float64, 3), (np.float32, 0)):
        with pytest.raises(ValueError):
            VectorTableWriter(tmp_path / "u.arrow", dim, dtype)


def test_writer_memory_stays_one_batch(tmp_path):
    import tracemalloc

    n, dim, batch = 20000, 64, 500  # 5 MB of vectors in batches of 128 KB
    vectors, keys, labels, splits = _rows(n, dim, np.float32)
    tracemalloc.start()
    try:
        with VectorTableWriter(tmp_path / "t.arrow", dim) as writer:
            for start in range(0, n, batch):
                writer.write_batch(vectors[start : start + batch], keys[start : start + batch],
                                   labels[start : start + batch], splits[start : start + batch])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert writer.spliced_bytes == vectors.nbytes  # Arrow's own memory (the mapped spill) is never read
    assert peak < 2e6, f"peak {peak / 1e6:.1f} MB of Python/numpy memory writing 5 MB in 128 KB batches"


def test_read_vectors_maps_the_vectors_without_copying(tmp_path):
    import pyarrow as pa

    vectors, keys, labels, splits = _rows(20000, 64, np.float32)  # 5 MB
    _streamed(tmp_path / "t.arrow", vectors, keys, labels, splits, _cuts(20000, 3000))
    before = pa.total_allocated_bytes()
    table = read_vectors(tmp_path / "t.arrow")
    copied = pa.total_allocated_bytes() - before
    assert copied < vectors.nbytes / 10, f"read_vectors allocated {copied} bytes for {vectors.nbytes} of vectors"
    assert not table.vectors.flags.writeable and not table.vectors.flags.owndata  # a view of the mapped file
    np.testing.assert_array_equal(table.vectors, vectors)
