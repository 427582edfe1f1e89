"""Vector tables as Arrow IPC files, memory-mapped on read.

A vector table has the columns ``id`` (int64, 0..n-1), ``key`` (string: the dataset's own name of
the item: MNIST index, word, image path), ``label`` (int32, -1 when there is none), ``split``
(string) and ``vector`` (fixed-size list of float32 or uint8 of length ``dim``). The schema
metadata carries ``dim``, ``metric``, ``model`` and anything else the writer adds.

A table is one record batch, so ``read_vectors`` maps the whole vector column as one array.
``write_vectors`` writes a table from arrays in memory; ``VectorTableWriter`` writes the same bytes
from batches of rows (for tables larger than memory should hold, such as 3M word vectors).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
import pyarrow as pa

from .errors import ArtifactError

_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8))
_VALUE_TYPES = {np.dtype(np.float32): pa.float32(), np.dtype(np.uint8): pa.uint8()}
# errno values with which copy_file_range says it cannot copy between these two files
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
_COPY_PIECE = 1 << 23


class VectorTable:
    """vectors: (n, dim) float32 or uint8, a read-only view of the memory-mapped file.

    ``keys`` (list of n str), ``labels`` (int32 (n,)) and ``splits`` (object array of n str) as
    given, or, for a table read from a file, made from its Arrow columns on first use: building
    millions of Python strings is what a query's cold start must not pay for. ``key_of`` and
    ``find`` answer from the Arrow column without building them."""

    def __init__(self, vectors: np.ndarray, keys: Sequence[str] | pa.Array | pa.ChunkedArray,
                 labels: np.ndarray, splits: Any, meta: dict[str, Any] | None = None):
        self.vectors = vectors
        self.labels = labels
        self.meta = {} if meta is None else meta
        self._keys, self._splits = keys, splits

    @property
    def keys(self) -> list[str]:
        if isinstance(self._keys, (pa.Array, pa.ChunkedArray)):
            self._key_column = self._keys
            self._keys = self._keys.to_pylist()
        return self._keys

    @keys.setter
    def keys(self, value: Sequence[str]) -> None:
        self._keys = value

    @property
    def splits(self) -> np.ndarray:
        if isinstance(self._splits, (pa.Array, pa.ChunkedArray)):
            self._splits = np.asarray(self._splits.to_pylist(), dtype=object)
        return self._splits

    @splits.setter
    def splits(self, value: np.ndarray) -> None:
        self._splits = value

    def _column(self) -> pa.Array | pa.ChunkedArray | None:
        if isinstance(self._keys, (pa.Array, pa.ChunkedArray)):
            return self._keys
        return getattr(self, "_key_column", None)

    def key_of(self, i: int) -> str:
        """The key of row ``i``."""
        column = self._column()
        return self._keys[i] if column is None else column[int(i)].as_py()

    def find(self, key: str) -> int | None:
        """The first row whose key is ``key``, None when there is none."""
        column = self._column()
        if column is None:
            try:
                return self._keys.index(key)
            except ValueError:
                return None
        chunk = column.chunk(0) if isinstance(column, pa.ChunkedArray) and column.num_chunks == 1 else column
        if isinstance(chunk, pa.ChunkedArray) or chunk.type != pa.string() or chunk.null_count:
            import pyarrow.compute as pc

            row = pc.index(column, pa.scalar(key, pa.string())).as_py()
            return None if row < 0 else row
        return _find_string(chunk, key.encode("utf-8"))

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __repr__(self) -> str:
        return f"VectorTable(n={len(self)}, dim={self.dim}, dtype={self.vectors.dtype}, meta={self.meta!r})"

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def take(self, rows: np.ndarray) -> "VectorTable":
        rows = np.asarray(rows, dtype=np.int64)
        return VectorTable(
            vectors=np.ascontiguousarray(self.vectors[rows]),
            keys=[self.keys[i] for i in rows],
            labels=self.labels[rows],
            splits=self.splits[rows],
            meta=dict(self.meta),
        )


def _metadata(dim: int, meta: dict[str, Any] | None) -> dict[str, str]:
    return {"dim": str(dim), **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}}


def _table(n: int, dim: int, flat: pa.Array, keys: pa.Array, labels: pa.Array, splits: pa.Array,
           metadata: dict[str, str]) -> pa.Table:
    """The one-batch table both writers serialize; ``flat`` holds the ``n * dim`` vector values."""
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "key": keys,
            "label": labels,
            "split": splits,
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    ).replace_schema_metadata(metadata)


def _write_ipc(sink: Any, table: pa.Table) -> None:
    # One record batch for the whole table: read_vectors then maps the vector column as one array.
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))


def _check_batch(vectors: np.ndarray, keys: Sequence[str], dtypes: tuple, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors)
    if vectors.ndim != 2 or vectors.dtype not in dtypes or (dim is not None and vectors.shape[1] != dim):
        want = " or ".join(str(np.dtype(t)) for t in dtypes)
        shape = "(n, dim)" if dim is None else f"(n, {dim})"
        raise ValueError(f"vectors must be a 2-d {want} array of shape {shape}, got {vectors.dtype} {vectors.shape}")
    if len(keys) != vectors.shape[0]:
        raise ValueError(f"{len(keys)} keys for {vectors.shape[0]} vectors")
    return vectors


def _labels(n: int, labels: np.ndarray | None) -> pa.Array:
    values = np.full(n, -1, dtype=np.int32) if labels is None else np.asarray(labels, dtype=np.int32)
    if values.shape != (n,):
        raise ValueError(f"{values.size} labels for {n} vectors")
    return pa.array(values)


def _splits(n: int, splits: Sequence[str] | None) -> pa.Array:
    values = [""] * n if splits is None else list(splits)
    if len(values) != n:
        raise ValueError(f"{len(values)} splits for {n} vectors")
    return pa.array(values, type=pa.string())


def _find_string(array: pa.StringArray, key: bytes) -> int | None:
    """The first i with ``array[i] == key``, searching the array's bytes in place (no Python string
    per row, no pyarrow.compute import: a one-off key lookup in a command-line query)."""
    import re

    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    if not key:
        empty = np.flatnonzero(np.diff(offsets) == 0)
        return int(empty[0]) if len(empty) else None
    data = array.buffers()[2]
    if data is None:
        return None
    start, end = int(offsets[0]), int(offsets[-1])
    for match in re.finditer(re.escape(key), memoryview(data)[start:end]):
        at = start + match.start()
        i = int(np.searchsorted(offsets, at, side="right")) - 1  # the row whose bytes hold position at
        if offsets[i] == at and offsets[i + 1] - at == len(key):
            return i
    return None


def write_vectors(
    path: str | Path,
    vectors: np.ndarray,
    keys: Sequence[str],
    labels: np.ndarray | None = None,
    splits: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> int:
    """Write one vector table; returns the row count. vectors: (n, dim) float32 or uint8.

    The file holds one record batch; ``VectorTableWriter`` writes the same bytes batch by batch.
    """
    vectors = _check_batch(vectors, keys, _DTYPES)
    n, dim = vectors.shape
    value_type = _VALUE_TYPES[vectors.dtype]
    flat = pa.array(vectors.reshape(-1), type=value_type)
    keys_array = pa.array([str(k) for k in keys], type=pa.string())
    table = _table(n, dim, flat, keys_array, _labels(n, labels), _splits(n, splits), _metadata(dim, meta))
    with pa.OSFile(str(path), "wb") as sink:
        _write_ipc(sink, table)
    return n


class VectorTableWriter:
    """Write a vector table batch by batch, byte-identical to ``write_vectors`` on all the rows at once.

    ``write_vectors`` stores one record batch, so that ``read_vectors`` can map the vector column
    of any table as one array without copying it; a writer that emitted a record batch per call
    would give other bytes and a table that must be copied to be read. This writer therefore
    appends each batch's vectors to a spill file beside ``path`` (``<name>.vectors.part``) and keeps
    only the small columns (keys, labels, splits: tens of bytes a row) in memory. ``close`` writes
    the table through Arrow's IPC writer with the vector column backed by the memory-mapped spill
    file, and copies those bytes file-to-file inside the kernel (``os.copy_file_range``) instead of
    through this process: the writer's memory stays one batch plus the small columns, never the
    vectors. The spill file is removed at the end; disk use peaks at twice the vectors' size.

    Ids are 0..n-1 in the order rows were written. Use it as a context manager: leaving the block
    normally writes the file; an exception removes the spill file and writes nothing.

    Args:
        path: the table to write (a local file).
        dim: the vectors' dimension.
        dtype: ``float32`` or ``uint8``.
        meta: schema metadata, as for ``write_vectors``.
    """

    def __init__(self, path: str | Path, dim: int, dtype: Any = np.float32, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32 or uint8, got {self.dtype}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.metadata = _metadata(self.dim, meta)
        self.n = 0
        self.spliced_bytes = 0  # vector bytes copied file-to-file at close (the rest went through memory)
        self._keys: list[pa.Array] = []
        self._labels: list[pa.Array] = []
        self._splits: list[pa.Array] = []
        self._spill_path = self.path.with_name(self.path.name + ".vectors.part")
        self._spill: IO[bytes] | None = open(self._spill_path, "wb")

    def __enter__(self) -> "VectorTableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write_batch(self, vectors: np.ndarray, keys: Sequence[str], labels: np.ndarray | None = None,
                    splits: Sequence[str] | None = None) -> None:
        """Append rows. vectors: (b, dim) of the writer's dtype; keys: b strings; labels: (b,) int or
        None (-1); splits: b strings or None ("")."""
        if self._spill is None:
            raise ValueError(f"{self.path}: the vector table writer is closed")
        vectors = _check_batch(vectors, keys, (self.dtype,), self.dim)
        b = vectors.shape[0]
        labels_array, splits_array = _labels(b, labels), _splits(b, splits)
        keys_array = pa.array([str(k) for k in keys], type=pa.string())
        if b:
            self._spill.write(memoryview(vectors).cast("B"))
        self._keys.append(keys_array)
        self._labels.append(labels_array)
        self._splits.append(splits_array)
        self.n += b

    def close(self) -> int:
        """Write the table; returns the row count."""
        if self._spill is None:
            raise ValueError(f"{self.path}: the vector table writer is closed")
        try:
            self._spill.close()
            self._spill = None
            self._write()
        finally:
            self.abort()
        return self.n

    def abort(self) -> None:
        """Drop what was written so far; ``path`` is not created."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._spill_path.unlink(missing_ok=True)

    def _write(self) -> None:
        n, dim = self.n, self.dim
        nbytes = n * dim * self.dtype.itemsize
        value_type = _VALUE_TYPES[self.dtype]
        keys = _concat(self._keys, pa.string())
        labels = _concat(self._labels, pa.int32())
        splits = _concat(self._splits, pa.string())
        self._keys, self._labels, self._splits = [], [], []
        mapped = pa.memory_map(str(self._spill_path), "r") if nbytes else None
        try:
            values = mapped.read_buffer(nbytes) if mapped is not None else pa.py_buffer(b"")
            flat = pa.Array.from_buffers(value_type, n * dim, [None, values])
            table = _table(n, dim, flat, keys, labels, splits, self.metadata)
            with open(self._spill_path, "rb") as spill, open(self.path, "wb", buffering=0) as out:
                sink = _SplicingSink(out, spill, values.address, nbytes)
                _write_ipc(pa.PythonFile(sink, mode="w"), table)
                self.spliced_bytes = sink.spliced
        finally:
            if mapped is not None:
                mapped.close()


def _concat(arrays: list[pa.Array], type_: pa.DataType) -> pa.Array:
    return pa.concat_arrays(arrays) if arrays else pa.array([], type=type_)


class _SplicingSink:
    """A file-like sink for ``pa.PythonFile`` that writes Arrow's output to ``out``, except the
    bytes of the memory-mapped spill file, which it copies from ``spill`` in the kernel.

    Arrow hands each body buffer over as a ``pa.Buffer`` (zero-copy); one that lies inside the
    mapping ``[base, base + size)`` is copied from the same offsets of the spill file, so its pages
    are never read through the mapping (they would count as this process's resident memory).
    """

    def __init__(self, out: IO[bytes], spill: IO[bytes], base: int, size: int):
        self._out, self._spill = out, spill
        self._base, self._size = base, size
        self._pos = 0
        self.spliced = 0
        self.closed = False

    def write(self, data: Any) -> int:
        if isinstance(data, pa.Buffer) and data.size and self._base <= data.address \
                and data.address + data.size <= self._base + self._size:
            n = data.size
            self._copy_range(data.address - self._base, n)
            self.spliced += n
        else:
            view = memoryview(data).cast("B")
            n = view.nbytes
            written = 0
            while written < n:
                written += self._out.write(view[written:])
        self._pos += n
        return n

    def _copy_range(self, offset: int, count: int) -> None:
        out_fd, in_fd = self._out.fileno(), self._spill.fileno()
        end = offset + count
        try:
            while offset < end:
                copied = os.copy_file_range(in_fd, out_fd, end - offset, offset)
                if copied == 0:
                    raise OSError(f"{self._spill.name}: ends {end - offset} bytes early")
                offset += copied
            return
        except (AttributeError, OSError) as exc:
            # no copy_file_range here (another OS, or filesystems it cannot span): copy in pieces
            if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
                raise
        while offset < end:
            piece = os.pread(in_fd, min(_COPY_PIECE, end - offset), offset)
            if not piece:
                raise OSError(f"{self._spill.name}: ends {end - offset} bytes early")
            view = memoryview(piece)
            while view:
                view = view[self._out.write(view):]
            offset += len(piece)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def read_vectors(path: str | Path, private: bool = False) -> VectorTable:
    """Open a vector table memory-mapped; the vector array is not copied.

    ``private=True``: the vector array is instead read from the file into this process's own
    writable memory (the other columns stay mapped). For a caller that transforms the vectors in
    place (an angular forest normalises them): a copy of a mapped array would hold the file's pages
    and the copy at once, twice the memory."""
    path = Path(path)
    try:
        mapped = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(mapped).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable Arrow IPC vector table ({exc}); rebuild the stage") from exc
    missing = {"id", "key", "label", "split", "vector"} - set(table.column_names)
    if missing:
        raise ArtifactError(f"{path}: vector table lacks column(s) {', '.join(sorted(missing))}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    dim = int(meta["dim"])
    column = table.column("vector")
    # combine_chunks copies even a single chunk (3.6 GB for 3M x 300 float32): take the chunk itself
    column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    n = len(table)
    values = column.values.to_numpy(zero_copy_only=True) if n else np.empty(0, dtype=np.float32)
    vectors = values[column.offset * dim : (column.offset + n) * dim].reshape(n, dim)
    if private and n:
        mapped.seek(0)
        start = vectors.__array_interface__["data"][0] - mapped.read_buffer(1).address  # the rows' file offset
        vectors = np.fromfile(path, dtype=vectors.dtype, count=n * dim, offset=start).reshape(n, dim)
    return VectorTable(
        vectors=vectors,
        keys=table.column("key"),  # Python strings only when .keys is used (see VectorTable)
        labels=table.column("label").to_numpy(),
        splits=table.column("split"),
        meta=meta,
    )
