"""Raw fetched files -> one items table per dataset kind.

Each decoder returns ``(vectors, keys, labels, splits, meta)``: vectors (n, dim) uint8 or float32,
keys list[str] of the dataset's own names for the items, labels int32 (n,) (-1 when none), splits
list[str] ("train"/"test", or "" when the dataset has no split of its own), meta a dict for the
table's schema metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import FormatError
from .formats.idx import read_idx

log = logging.getLogger(__name__)

Decoded = tuple[np.ndarray, list[str], np.ndarray, list[str], dict]
Report = Callable[[float, str], None]


def _source_path(cfg: dict, fetched: Path, source: str) -> Path:
    return fetched / cfg["sources"][source]["filename"]


def decode_idx(cfg: dict, fetched: Path, report: Report) -> Decoded:
    """MNIST-style IDX images and labels of the train and test splits; pixels as uint8 rows."""
    parts, keys, labels, splits = [], [], [], []
    shape: list[int] = []
    for split in ("train", "test"):
        images_path = _source_path(cfg, fetched, cfg["decode"][f"{split}_images"])
        labels_path = _source_path(cfg, fetched, cfg["decode"][f"{split}_labels"])
        images = read_idx(images_path, expect_ndim=3)
        split_labels = read_idx(labels_path, expect_ndim=1)
        if images.shape[0] != split_labels.shape[0]:
            raise FormatError(
                f"{images_path}: {images.shape[0]} images but {labels_path} has {split_labels.shape[0]} labels; "
                "the two files must describe the same items"
            )
        parts.append(images.reshape(images.shape[0], -1).astype(np.uint8, copy=False))
        keys.extend(f"{split}/{i}" for i in range(images.shape[0]))
        labels.append(split_labels.astype(np.int32))
        splits.extend([split] * images.shape[0])
        shape = list(images.shape[1:])
        report(0.5 if split == "train" else 1.0, f"decoded {split}: {images.shape[0]} images")
    return np.concatenate(parts), keys, np.concatenate(labels), splits, {"image_shape": shape, "source": "idx"}


def decode_word2vec(cfg: dict, fetched: Path, report: Report) -> Decoded:
    """Word vectors (word2vec binary/text through gensim, or npy + Parquet words) as float32 rows."""
    from .formats.word2vec import read_vectors_npy, read_word2vec

    d = cfg["decode"]
    vectors_path = _source_path(cfg, fetched, d["vectors"])
    limit = d["limit"] or None
    report(0.0, f"reading word vectors from {vectors_path.name}")
    if d["format"] == "npy":
        words, vectors = read_vectors_npy(vectors_path, _source_path(cfg, fetched, d["words"]),
                                          column=d["words_column"], limit=limit)
    else:
        binary = {"auto": None, "binary": True, "text": False}[d["format"]]
        words, vectors = read_word2vec(vectors_path, binary=binary, limit=limit)
    report(1.0, f"read {len(words)} words of dimension {vectors.shape[1]}")
    return vectors, words, np.full(len(words), -1, np.int32), [""] * len(words), {"source": d["format"]}


DECODERS = {"idx": decode_idx, "word2vec": decode_word2vec}
