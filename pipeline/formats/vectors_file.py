"""Readers for a user's own vectors: Parquet, Arrow IPC, or a ``.npy`` matrix beside an ids file.

The format is read from a file's first bytes, never from its name:

- Parquet (``PAR1``) and Arrow IPC, file (``ARROW1``) or stream format: a table with a key column
  (integers or strings), a vector column (a list or fixed-size list of numbers: float16/32/64 or
  integers, every row the same length) and optionally a label column (integers >= 0, or strings;
  null: no label). Read in record batches (Parquet one row group at a time, Arrow memory-mapped), so
  the input is never held whole nor twice.
- ``.npy`` (``\\x93NUMPY``): an ``(n, dim)`` numeric matrix, memory-mapped, never with pickle, beside
  an ids file with its ``n`` keys in row order: a UTF-8 text file with one key per line (``\\n`` or
  ``\\r\\n``; no header; a final newline optional; no blank lines), or a Parquet/Arrow table with one
  column (or the key column, and then also the label column if one is asked for).

``open_vector_file`` checks what can be checked without reading the rows (the columns exist and
have usable types, the dimension, the row count) and returns a ``VectorFile``; its ``batches``
then yields ``(vectors float32 (b, dim), keys list[str], labels int32 (b,) or None)``, checking
each row as it comes: a null or ragged vector, a non-UTF-8, null, empty or repeated key, a bad
label. Vectors holding NaN or infinity are counted over the whole file and reported together
(how many, and the first key) once the file is read.

Every problem is a ``FormatError`` naming the file, the column and what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import FormatError

log = logging.getLogger(__name__)

PARQUET, ARROW, ARROW_STREAM, NPY, TEXT = "parquet", "arrow", "arrow-stream", "npy", "text"
_PARQUET_MAGIC = b"PAR1"
_ARROW_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the continuation marker every IPC stream message starts with
_NPY_MAGIC = b"\x93NUMPY"
BATCH_BYTES = 1 << 24  # float32 bytes of vectors per batch (16 MiB), whatever the dimension
MAX_BATCH_ROWS = 65536
_INT32_MAX = np.iinfo(np.int32).max

Batch = tuple[np.ndarray, list[str], "np.ndarray | None"]


def sniff_format(path: str | Path) -> str:
    """The format of ``path`` from its first bytes: parquet, arrow, arrow-stream, npy, or text."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PARQUET_MAGIC):
        return PARQUET
    if head.startswith(_ARROW_MAGIC):
        return ARROW
    if head.startswith(_ARROW_STREAM_MAGIC):
        return ARROW_STREAM
    if head.startswith(_NPY_MAGIC):
        return NPY
    return TEXT


def batch_rows_for(dim: int) -> int:
    """Rows per batch: ``BATCH_BYTES`` of float32 vectors, at least 1 and at most ``MAX_BATCH_ROWS``."""
    return int(max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // (4 * max(dim, 1)))))


# --- Arrow tables: Parquet and IPC ---------------------------------------------------------------


class _Table:
    """A Parquet or Arrow IPC file read batch by batch: its schema, row count (None for an IPC
    stream) and ``batches(columns, rows)``, an iterator of record batches of at most ``rows`` rows."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.format = path, fmt
        try:
            if fmt == PARQUET:
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetFile(str(path), memory_map=True)
                self.schema = self._parquet.schema_arrow
                self.n_rows: int | None = self._parquet.metadata.num_rows
            else:
                reader = self._open_ipc()
                self.schema = reader.schema
                self.n_rows = (sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                               if fmt == ARROW else None)
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{path}: not a readable {_FORMAT_NAMES[fmt]} file ({exc}): the file is damaged or "
                              "truncated; write it again") from exc

    def _open_ipc(self) -> Any:
        source = pa.memory_map(str(self.path), "r")
        return pa.ipc.open_file(source) if self.format == ARROW else pa.ipc.open_stream(source)

    def batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        try:
            if self.format == PARQUET:
                yield from self._parquet.iter_batches(batch_size=rows, columns=columns, use_threads=False)
                return
            reader = self._open_ipc()
            parts = (reader.get_batch(i) for i in range(reader.num_record_batches)) if self.format == ARROW \
                else reader
            for part in parts:
                part = part.select(columns)
                for start in range(0, part.num_rows, rows):  # zero-copy slices of the mapped batch
                    yield part.slice(start, rows)
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{self.path}: cannot read its rows ({exc}): the file is damaged or truncated; "
                              "write it again") from exc


_FORMAT_NAMES = {PARQUET: "Parquet", ARROW: "Arrow IPC", ARROW_STREAM: "Arrow IPC stream", NPY: ".npy", TEXT: "text"}


def _column_type(table: _Table, column: str, what: str) -> pa.DataType:
    if column not in table.schema.names:
        raise FormatError(f"{table.path}: no column {column!r} ({what}); its columns are "
                          f"{', '.join(map(repr, table.schema.names))}: name the right one in decode.{_KEYS[what]}")
    return table.schema.field(column).type


_KEYS = {"the keys": "key_column", "the vectors": "vector_column", "the labels": "label_column"}


def _check_key_type(path: Path, column: str, t: pa.DataType) -> None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise FormatError(f"{path}: the key column {column!r} has type {t}, expected integers or strings: "
                          "write the keys as int64 or UTF-8 strings")


def _check_label_type(path: Path, column: str, t: pa.DataType) -> str:
    """'int' or 'str': how the labels of ``column`` are read."""
    value = t.value_type if pa.types.is_dictionary(t) else t
    if pa.types.is_integer(value):
        return "int"
    if pa.types.is_string(value) or pa.types.is_large_string(value):
        return "str"
    raise FormatError(f"{path}: the label column {column!r} has type {t}, expected integers >= 0 or strings: "
                      "write the labels as int64 (null where an item has none) or as strings")


def _vector_value_type(path: Path, column: str, t: pa.DataType) -> pa.DataType:
    """The value type of a vector column, checked: a (fixed-size, large) list of numbers."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise FormatError(f"{path}: the vector column {column!r} has type {t}, expected a list or fixed-size list of "
                          "numbers per row (e.g. list<float32>): write each vector as one list value")
    value = t.value_type
    if not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise FormatError(f"{path}: the vector column {column!r} holds {value} values, which are not numeric; "
                          "expected float16/32/64 or integers: write the vectors as lists of floats")
    return value


def _keys_of(path: Path, column: str, array: pa.Array, first_row: int) -> list[str]:
    """The keys in ``array`` as str (integers written in decimal), checked: no null, valid UTF-8."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if array.null_count:
        row = first_row + int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise FormatError(f"{path}: the key column {column!r} is null at row {row} (counting from 0): every "
                          "item needs a key; fill it in or drop the row")
    t = array.type
    if pa.types.is_integer(t):
        return array.cast(pa.string()).to_pylist()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            array.validate(full=True)
        except pa.ArrowInvalid:  # Arrow strings are meant to be UTF-8, but a writer need not check it
            array = array.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary())
        else:
            return array.to_pylist()
    keys = []
    for i, raw in enumerate(array.to_pylist()):
        try:
            keys.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: the key at row {first_row + i} of column {column!r} ({raw[:40]!r}) is not "
                              f"valid UTF-8 ({exc.reason}): write the keys as UTF-8 text") from None
    return keys


def _labels_of(path: Path, column: str, array: pa.Array, keys: list[str], classes: dict[str, int] | None
               ) -> np.ndarray:
    """int32 (b,) labels: integers as they are, strings numbered by ``classes``; null -> -1."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    missing = array.is_null().to_numpy(zero_copy_only=False)
    if classes is not None:
        values = array.to_pylist()
        return np.array([-1 if v is None else classes[v] for v in values], dtype=np.int32)
    values = array.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
    bad = ((values < 0) & ~missing) | (values > _INT32_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FormatError(f"{path}: the label of key {keys[i]!r} in column {column!r} is {values[i]}, expected an "
                          f"integer in 0..{_INT32_MAX} (null: no label): number the labels from 0, or write them "
                          "as strings")
    return values.astype(np.int32)


def _vectors_of(path: Path, column: str, array: pa.Array, dim: int, keys: list[str]) -> np.ndarray:
    """float32 (b, dim) from a list column chunk, checked: no null vector, no null value, every length dim."""
    if array.null_count:
        i = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise FormatError(f"{path}: the vector of key {keys[i]!r} in column {column!r} is null: every item needs "
                          "a vector; drop the row or fill it in")
    if not pa.types.is_fixed_size_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        ragged = lengths != dim
        if ragged.any():
            i = int(np.flatnonzero(ragged)[0])
            raise FormatError(f"{path}: the vectors in column {column!r} are ragged: key {keys[i]!r} has "
                              f"{lengths[i]} values, the first vector {dim}; every vector must have the same "
                              "length: fix or drop the rows of another length")
    elif array.type.list_size != dim:  # an IPC stream's batches could disagree with its schema
        raise FormatError(f"{path}: the vector column {column!r} changes length to {array.type.list_size} "
                          f"(was {dim}); every vector must have the same length")
    values = array.flatten()
    if values.null_count:
        i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // dim
        raise FormatError(f"{path}: the vector of key {keys[i]!r} in column {column!r} holds a null value: every "
                          "value must be a number; fill it in or drop the row")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: counted as not finite
        return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(array), dim)


# --- ids files ---------------------------------------------------------------------------------


def _read_text_ids(path: Path) -> list[str]:
    """One key per line, UTF-8; a final newline is optional, a blank line is an error."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    keys = []
    for i, line in enumerate(lines):
        line = line[:-1] if line.endswith(b"\r") else line
        try:
            key = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: the key on line {i + 1} ({line[:40]!r}) is not valid UTF-8 ({exc.reason}): "
                              "write the ids file as UTF-8 text") from None
        if not key:
            raise FormatError(f"{path}: line {i + 1} is blank; an ids text file holds one key per line, "
                              "with no blank lines: remove it or put the row's key there")
        keys.append(key)
    return keys


def _read_table_ids(path: Path, fmt: str, key_column: str, label_column: str | None, need_labels: bool
                    ) -> tuple[list[str], pa.ChunkedArray | None, str | None, str]:
    """(keys, label array or None, label kind, the key column's name) of an ids table."""
    table = _Table(path, fmt)
    names = table.schema.names
    column = key_column if key_column in names else (names[0] if len(names) == 1 else None)
    if column is None:
        raise FormatError(f"{path}: an ids table needs one column, or a column {key_column!r} (decode.key_column); "
                          f"it has {', '.join(map(repr, names))}: name the key column in decode.key_column")
    _check_key_type(path, column, table.schema.field(column).type)
    label_kind = None
    columns = [column]
    if label_column is not None and (need_labels or label_column in names):
        label_kind = _check_label_type(path, label_column, _column_type(table, label_column, "the labels"))
        columns.append(label_column)
    keys: list[str] = []
    labels: list[pa.Array] = []
    for batch in table.batches(columns, MAX_BATCH_ROWS):
        keys.extend(_keys_of(path, column, batch.column(0), len(keys)))
        if label_kind is not None:
            labels.append(batch.column(1))
    label_array = pa.chunked_array(labels, type=table.schema.field(label_column).type) if label_kind else None
    return keys, label_array, label_kind, column


# --- the opened file ----------------------------------------------------------------------------


@dataclass
class VectorFile:
    """A vectors file opened and checked by ``open_vector_file``: its format, row count (None for an
    Arrow IPC stream, known once read), dim, and whether it has labels (``label_kind``: 'int',
    'str' or None). ``keys_path`` is the file holding the keys and labels (the ids file of a .npy);
    ``key_column`` is None for a text ids file, ``vector_column`` None for a .npy."""

    path: Path
    format: str
    n_rows: int | None
    dim: int
    label_kind: str | None
    keys_path: Path
    key_column: str | None
    vector_column: str | None
    label_column: str | None
    _read: Callable[[int], Iterator[tuple[np.ndarray, list[str], Any]]] = field(repr=False)
    _string_labels: Callable[[], set[str]] = field(repr=False)

    def string_labels(self) -> set[str]:
        """The distinct string labels (an empty set when the labels are integers or absent); reads
        only the label column."""
        return self._string_labels() if self.label_kind == "str" else set()

    def batches(self, classes: list[str] | None = None, seen: set[str] | None = None,
                other_keys: set[str] | frozenset = frozenset(), other_name: str = "",
                batch_rows: int | None = None) -> Iterator[Batch]:
        """The rows as ``(vectors float32 (b, dim), keys, labels int32 (b,) or None)``, checked.

        ``classes``: the sorted string labels (of this and any other file read together) that string
        labels are numbered by. ``seen``: a set this file's keys are added to (default: a new one).
        ``other_keys``: keys another file (``other_name``) already holds: one of them here is a
        FormatError. A repeated key is one at once; NaN or infinity is reported
        after the whole file was read, with the count of such vectors and the first key.
        """
        number = {name: i for i, name in enumerate(classes)} if classes is not None else None
        if self.label_kind == "str" and number is None:
            raise ValueError("string labels need classes (see string_labels)")
        seen = set() if seen is None else seen
        n_rows = n_bad = 0
        first_bad = None
        rows = batch_rows or batch_rows_for(self.dim)
        for vectors, keys, raw_labels in self._read(rows):
            for key in keys:
                if key in seen:
                    raise FormatError(f"{self.keys_path}: the key {key!r} occurs twice{self._in_keys} (the first "
                                      "repeated key); keys must be unique: drop or rename the repeats")
                if key in other_keys:
                    raise FormatError(f"{self.keys_path}: the key {key!r}{self._in_keys} is also a key of "
                                      f"{other_name}; keys must be unique across the vectors and the queries: rename "
                                      "the query's key (for example with a prefix such as 'q:')")
                if not key:
                    raise FormatError(f"{self.keys_path}: an empty key{self._in_keys} at row {n_rows} (counting "
                                      "from 0); every key must be a non-empty string")
                seen.add(key)
                n_rows += 1
            finite = np.isfinite(vectors).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                n_bad += int(bad.size)
                first_bad = first_bad if first_bad is not None else keys[int(bad[0])]
            labels = None
            if raw_labels is not None:
                labels = _labels_of(self.keys_path, self.label_column, raw_labels, keys, number)
            yield vectors, keys, labels
        if n_bad:
            where = f" in column {self.vector_column!r}" if self.vector_column else ""
            raise FormatError(f"{self.path}: {n_bad} vector(s){where} hold NaN or infinity (the first: key "
                              f"{first_bad!r}); every value must be finite: fix or drop those rows")
        if not n_rows:
            raise FormatError(f"{self.path}: holds no rows; expected at least one vector")

    @property
    def _in_keys(self) -> str:
        return f" in column {self.key_column!r}" if self.key_column else ""


def open_vector_file(path: str | Path, *, key_column: str = "key", vector_column: str = "vector",
                     label_column: str | None = None, ids_path: str | Path | None = None,
                     need_labels: bool = True) -> VectorFile:
    """Open a vectors file (Parquet, Arrow IPC, or ``.npy`` with ``ids_path``) and check its columns.

    ``label_column``: None for no labels; with ``need_labels`` False, a file without that column
    reads as unlabelled (queries need not carry labels). Raises FormatError for an unreadable or
    empty file, a missing column, a column of the wrong type, a .npy without ids (or ids with a
    table), ids that do not match the rows, or vectors of length 0.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == NPY:
        if ids_path is None:
            raise FormatError(f"{path}: is a .npy matrix, which holds no keys: name its ids file in decode.ids "
                              "(decode.query_ids for queries), and give the source a filename ending in .npy")
        return _open_npy(path, Path(ids_path), key_column, label_column, need_labels)
    if ids_path is not None:
        raise FormatError(f"{path}: is a {_FORMAT_NAMES[fmt]} file, not a .npy matrix, so it carries its own keys "
                          "(decode.key_column): remove decode.ids / decode.query_ids, or give the vectors as .npy")
    if fmt == TEXT:
        raise FormatError(f"{path}: is not a Parquet, Arrow IPC or .npy file (its first bytes are none of theirs): "
                          "write the vectors with pyarrow.parquet.write_table, pyarrow.ipc or numpy.save")
    table = _Table(path, fmt)
    _check_key_type(path, key_column, _column_type(table, key_column, "the keys"))
    _vector_value_type(path, vector_column, _column_type(table, vector_column, "the vectors"))
    label_kind = None
    if label_column is not None and (need_labels or label_column in table.schema.names):
        label_kind = _check_label_type(path, label_column, _column_type(table, label_column, "the labels"))
    elif label_column is not None:
        log.info("%s: no label column %r: its rows are unlabelled", path, label_column)
    if table.n_rows == 0:
        raise FormatError(f"{path}: holds no rows; expected at least one vector")
    columns = [key_column, vector_column] + ([label_column] if label_kind else [])
    dim = _first_dim(table, key_column, vector_column)

    def read(rows: int) -> Iterator[tuple[np.ndarray, list[str], Any]]:
        done = 0
        for batch in table.batches(columns, rows):
            keys = _keys_of(path, key_column, batch.column(0), done)
            vectors = _vectors_of(path, vector_column, batch.column(1), dim, keys)
            done += batch.num_rows
            yield vectors, keys, batch.column(2) if label_kind else None

    def string_labels() -> set[str]:
        values: set[str] = set()
        for batch in table.batches([label_column], MAX_BATCH_ROWS):
            column = batch.column(0)
            column = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
            values.update(pc.unique(column.drop_null()).to_pylist())
        return values

    return VectorFile(path, fmt, table.n_rows, dim, label_kind, path, key_column, vector_column,
                      label_column if label_kind else None, read, string_labels)


def _first_dim(table: _Table, key_column: str, vector_column: str) -> int:
    """The length of the first vector (a fixed-size list's from the schema)."""
    t = table.schema.field(vector_column).type
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
    else:
        dim = None
        for batch in table.batches([key_column, vector_column], 1):
            if batch.num_rows:
                vector = batch.column(1)
                if vector.null_count:
                    key = _keys_of(table.path, key_column, batch.column(0), 0)[0]
                    raise FormatError(f"{table.path}: the vector of key {key!r} in column {vector_column!r} is null: "
                                      "every item needs a vector; drop the row or fill it in")
                dim = len(vector[0].values)
                break
        if dim is None:
            raise FormatError(f"{table.path}: holds no rows; expected at least one vector")
    if dim < 1:
        raise FormatError(f"{table.path}: the vectors in column {vector_column!r} have length 0; expected at least "
                          "one value per vector")
    return dim


def _open_npy(path: Path, ids_path: Path, key_column: str, label_column: str | None, need_labels: bool
              ) -> VectorFile:
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise FormatError(f"{path}: not a readable .npy matrix ({exc}); expected an (n, dim) float array saved "
                          "with numpy.save: write it again") from exc
    if matrix.dtype.kind not in "fiu" or matrix.dtype.kind == "f" and matrix.dtype.itemsize > 8:
        raise FormatError(f"{path}: holds {matrix.dtype} values, which are not numeric vectors; expected float16/32/64 "
                          "(or integers): save the matrix as float32")
    if matrix.ndim != 2:
        raise FormatError(f"{path}: holds an array of shape {matrix.shape}, expected a 2-D (n, dim) matrix: one "
                          "vector per row")
    n, dim = matrix.shape
    if n == 0:
        raise FormatError(f"{path}: holds no rows; expected at least one vector")
    if dim == 0:
        raise FormatError(f"{path}: the vectors have length 0 (shape {matrix.shape}); expected at least one value")
    ids_format = sniff_format(ids_path)
    label_kind, labels = None, None
    if ids_format == TEXT:
        if label_column is not None and need_labels:
            raise FormatError(f"{ids_path}: a text ids file holds keys only, but decode.label_column = "
                              f"{label_column!r}: give the ids as a Parquet/Arrow table with columns "
                              f"{key_column!r} and {label_column!r}, or remove decode.label_column")
        keys = _read_text_ids(ids_path)
        column = None
    elif ids_format == NPY:
        raise FormatError(f"{ids_path}: the ids file is a .npy matrix; expected a text file with one key per line "
                          "or a Parquet/Arrow table of keys")
    else:
        keys, labels, label_kind, column = _read_table_ids(ids_path, ids_format, key_column, label_column,
                                                           need_labels)
    if len(keys) != n:
        raise FormatError(f"{ids_path} holds {len(keys)} keys but {path} has {n} vectors; expected one key per "
                          "row, in row order: the two files do not belong together")
    log.info("reading %d vectors of dimension %d (%s) from %s, keys from %s", n, dim, matrix.dtype, path, ids_path)

    def read(rows: int) -> Iterator[tuple[np.ndarray, list[str], Any]]:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            with np.errstate(over="ignore"):
                vectors = np.array(matrix[start:stop], dtype=np.float32, order="C")
            yield vectors, keys[start:stop], labels.slice(start, stop - start).combine_chunks() if label_kind else None

    def string_labels() -> set[str]:
        column = labels.combine_chunks()
        column = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
        return set(pc.unique(column.drop_null()).to_pylist())

    return VectorFile(path, NPY, n, dim, label_kind, ids_path, column, None, label_column if label_kind else None,
                      read, string_labels)
