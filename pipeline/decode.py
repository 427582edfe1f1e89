"""Raw fetched files -> one items table per dataset kind.

Each decoder takes the config, the fetch artifact's directory, a scratch directory and a progress
callback, and returns ``(vectors, keys, labels, splits, meta)``: vectors (n, dim) uint8 or float32,
keys list[str] of the dataset's own names for the items, labels int32 (n,) (-1 when none), splits
list[str] ("train"/"test", or "" when the dataset has no split of its own), meta a dict for the
table's schema metadata.
"""

from __future__ import annotations

import logging
import tempfile
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


def decode_idx(cfg: dict, fetched: Path, scratch: Path, report: Report) -> Decoded:
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


def decode_word2vec(cfg: dict, fetched: Path, scratch: Path, report: Report) -> Decoded:
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


def decode_food101(cfg: dict, fetched: Path, scratch: Path, report: Report) -> Decoded:
    """Food-101 photos (a tar archive in Food-101's layout) as uint8 RGB rows of image_size^2 * 3.

    The archive is extracted safely into ``scratch`` (inside the stage's temporary directory, so a
    killed run leaves nothing behind that the next one does not remove) and deleted after reading.
    Corrupt or non-image files are skipped and listed in the metadata (``bad_files``).
    """
    from .formats.food import extract_archive, load_images, read_classes, read_food101

    d = cfg["decode"]
    archive = _source_path(cfg, fetched, d["archive"])
    with tempfile.TemporaryDirectory(prefix="extract-", dir=scratch) as where:
        report(0.0, f"extracting {archive.name}")
        root = extract_archive(archive, Path(where) / "food")
        classes = read_classes(root)
        chosen = d["classes"] or classes
        parts, keys, labels, splits, bad = [], [], [], [], []
        for n, split in enumerate(("train", "test")):
            items = read_food101(root, chosen, split)
            images, kept, split_bad = load_images(root, items, d["image_size"])
            parts.append(images.reshape(len(kept), -1))
            keys.extend(path for path, _ in kept)
            labels.extend(chosen.index(name) for _, name in kept)
            splits.extend([split] * len(kept))
            bad.extend(split_bad)
            report((n + 1) / 2, f"decoded {split}: {len(kept)} photos, {len(split_bad)} unreadable")
    if bad:
        log.warning("%s: skipped %d unreadable files: %s", archive.name, len(bad),
                    ", ".join(path for path, _ in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    meta = {"image_shape": [d["image_size"], d["image_size"], 3], "classes": list(chosen),
            "bad_files": [{"path": p, "reason": r} for p, r in bad], "source": "food101"}
    return np.concatenate(parts), keys, np.asarray(labels, np.int32), splits, meta


DECODERS = {"idx": decode_idx, "word2vec": decode_word2vec, "food101": decode_food101}
