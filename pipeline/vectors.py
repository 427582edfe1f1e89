"""Vector tables as Arrow IPC files, memory-mapped on read.

A vector table has the columns ``id`` (int64, 0..n-1), ``key`` (string: the dataset's own name of
the item: MNIST index, word, image path), ``label`` (int32, -1 when there is none), ``split``
(string) and ``vector`` (fixed-size list of float32 or uint8 of length ``dim``). The schema
metadata carries ``dim``, ``metric``, ``model`` and anything else the writer adds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .errors import ArtifactError


@dataclass
class VectorTable:
    """vectors: (n, dim) float32 or uint8, a read-only view of the memory-mapped file."""

    vectors: np.ndarray
    keys: list[str]
    labels: np.ndarray  # int32 (n,)
    splits: np.ndarray  # object array of str (n,)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.vectors.shape[0]

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


def write_vectors(
    path: str | Path,
    vectors: np.ndarray,
    keys: Sequence[str],
    labels: np.ndarray | None = None,
    splits: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> int:
    """Write one vector table; returns the row count. vectors: (n, dim) float32 or uint8."""
    vectors = np.ascontiguousarray(vectors)
    if vectors.ndim != 2 or vectors.dtype not in (np.float32, np.uint8):
        raise ValueError(f"vectors must be a 2-d float32 or uint8 array, got {vectors.dtype} {vectors.shape}")
    n, dim = vectors.shape
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} vectors")
    labels = np.full(n, -1, dtype=np.int32) if labels is None else np.asarray(labels, dtype=np.int32)
    splits = [""] * n if splits is None else list(splits)
    value_type = pa.float32() if vectors.dtype == np.float32 else pa.uint8()
    flat = pa.array(vectors.reshape(-1), type=value_type)
    metadata = {"dim": str(dim), **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}}
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "key": pa.array([str(k) for k in keys], type=pa.string()),
            "label": pa.array(labels),
            "split": pa.array(splits, type=pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    ).replace_schema_metadata(metadata)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(n, 1))
    return n


def read_vectors(path: str | Path) -> VectorTable:
    """Open a vector table memory-mapped; the vector array is not copied."""
    path = Path(path)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable Arrow IPC vector table ({exc}); rebuild the stage") from exc
    missing = {"id", "key", "label", "split", "vector"} - set(table.column_names)
    if missing:
        raise ArtifactError(f"{path}: vector table lacks column(s) {', '.join(sorted(missing))}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    dim = int(meta["dim"])
    column = table.column("vector").combine_chunks()
    n = len(table)
    values = column.values.to_numpy(zero_copy_only=True) if n else np.empty(0, dtype=np.float32)
    vectors = values[column.offset * dim : (column.offset + n) * dim].reshape(n, dim)
    return VectorTable(
        vectors=vectors,
        keys=table.column("key").to_pylist(),
        labels=table.column("label").to_numpy(),
        splits=np.asarray(table.column("split").to_pylist(), dtype=object),
        meta=meta,
    )
