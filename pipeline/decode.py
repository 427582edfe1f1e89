"""Raw fetched files -> one items table per dataset kind.

Each decoder takes the config, the fetch artifact's directory, a scratch directory and a progress
callback, and returns a ``Decoded``: the rows' dimension, dtype and schema metadata, and the rows
themselves as batches ``(vectors, keys, labels, splits)``: vectors (b, dim) uint8 or float32, keys
list[str] of the dataset's own names for the items, labels int32 (b,) (None: -1, no label), splits
list[str] ("train"/"test"; None: "", the dataset has no split of its own). A decoder that reads a
large file yields many batches (word vectors: streamed, so the input is never held whole); the
others one. ``pipeline.stages.write_decode`` writes the batches as they come.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, TYPE_CHECKING

import numpy as np

from .errors import ConfigError, FormatError
from .formats.idx import read_idx

if TYPE_CHECKING:
    from .config import DatasetConfig

log = logging.getLogger(__name__)

Batch = tuple[np.ndarray, list[str], "np.ndarray | None", "list[str] | None"]
Report = Callable[[float, str], None]


@dataclass
class Decoded:
    """What a decoder read: ``batches`` yields the rows in order (see the module docstring)."""

    dim: int
    dtype: np.dtype
    meta: dict
    batches: Iterable[Batch]


def _whole(vectors: np.ndarray, keys: list[str], labels: np.ndarray, splits: list[str], meta: dict) -> Decoded:
    """All rows as one batch."""
    return Decoded(int(vectors.shape[1]), vectors.dtype, meta, [(vectors, keys, labels, splits)])


def _source_path(cfg: DatasetConfig, fetched: Path, source: str) -> Path:
    return fetched / cfg.sources[source].filename


def decode_idx(cfg: DatasetConfig, fetched: Path, scratch: Path, report: Report) -> Decoded:
    """MNIST-style IDX images and labels; pixels as uint8 rows (n, h*w), keys ``<split>/<i>``.

    ``decode.train_images``/``train_labels`` may both be left out (None): the test files alone are
    then the whole dataset, for a ``holdout`` split (``mnist-small``). A file that fails to decode
    raises a FormatError naming the ``decode.*`` key and the source, and saying whether the fetched
    bytes still have the config's checksum (then fetching again cannot help: the config is wrong).
    """
    d = cfg.decode
    present = [split for split in ("train", "test") if d[f"{split}_images"] is not None]
    for split in ("train", "test"):
        if (d[f"{split}_images"] is None) != (d[f"{split}_labels"] is None) or not present:
            raise ConfigError(f"{cfg.path}: decode.{split}_images and "
                              f"decode.{split}_labels must both name a source (the train pair may both be left out)")
    parts, keys, labels, splits = [], [], [], []
    shape: list[int] = []
    for n, split in enumerate(present):
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        images = _read_idx_source(cfg, fetched, images_key, ndim=3)
        split_labels = _read_idx_source(cfg, fetched, labels_key, ndim=1)
        if images.dtype != np.uint8:
            raise _decode_error(cfg, fetched, images_key, f"{_source_path(cfg, fetched, d[images_key])}: pixels "
                                f"are {images.dtype}, expected uint8 (IDX magic 2051)")
        if images.shape[0] != split_labels.shape[0]:
            raise _decode_error(
                cfg, fetched, labels_key,
                f"{_source_path(cfg, fetched, d[images_key])} has {images.shape[0]} images but "
                f"{_source_path(cfg, fetched, d[labels_key])} has {split_labels.shape[0]} labels; the two files "
                f"must describe the same items (decode.{images_key} and decode.{labels_key})")
        parts.append(images.reshape(images.shape[0], -1))
        keys.extend(f"{split}/{i}" for i in range(images.shape[0]))
        labels.append(split_labels.astype(np.int32))
        splits.extend([split] * images.shape[0])
        shape = list(images.shape[1:])
        report((n + 1) / len(present), f"decoded {split}: {images.shape[0]} images")
    return _whole(np.concatenate(parts), keys, np.concatenate(labels), splits, {"image_shape": shape, "source": "idx"})


def _read_idx_source(cfg: DatasetConfig, fetched: Path, key: str, ndim: int) -> np.ndarray:
    """``read_idx`` of the source ``decode.<key>`` names, its errors completed by ``_decode_error``."""
    path = _source_path(cfg, fetched, cfg.decode[key])
    try:
        return read_idx(path, expect_ndim=ndim)
    except FormatError as exc:
        raise _decode_error(cfg, fetched, key, str(exc)) from exc


def _decode_error(cfg: DatasetConfig, fetched: Path, key: str, problem: str) -> FormatError:
    """A FormatError for the file of ``decode.<key>`` that says what to fix.

    The file was verified when it was fetched. If it still has the config's checksum, fetching it
    again gives the same bytes, so the config is wrong: ``decode.<key>`` names the wrong source, or the
    source's URLs and checksum name the wrong file. If it no longer has it, the stored copy was
    damaged after it was verified, and rebuilding the fetch stage repairs it.
    """
    from .download import file_digest

    config = cfg.path
    name = cfg.decode[key]
    source = cfg.sources[name]
    where = f"decode.{key} = {name!r} (sources.{name}, {source.filename}) in {config}"
    if source.mutable:
        return FormatError(f"{problem}. {where}: this is what the source's URLs served; check decode.{key} and "
                           f"the URLs of sources.{name} (they must serve an IDX file of the expected kind)")
    path = _source_path(cfg, fetched, name)
    algorithm = "sha256" if source.sha256 else "md5"
    want = source[algorithm].lower()
    got = file_digest(path, algorithm) if path.is_file() else "missing"
    if got != want:
        return FormatError(
            f"{problem}. {where}: the fetched copy no longer has its {algorithm} ({got}, expected {want}): it "
            f"was damaged after it was verified; `grove run {cfg.name} --rebuild` fetches it again")
    return FormatError(
        f"{problem}. {where}: this file passed its {algorithm} check, so fetching it again gives the same "
        f"bytes: the config is wrong. Check decode.{key}, and the URLs and {algorithm} of sources.{name} (they "
        f"must name an IDX file of the expected kind)")


def decode_word2vec(cfg: DatasetConfig, fetched: Path, scratch: Path, report: Report) -> Decoded:
    """Word vectors as float32 rows, keys the words. A word2vec binary or text file is streamed in
    batches (``iter_word2vec``: the words and bits gensim reads, never the whole file in memory);
    the npy format (vectors + a Parquet table of words) is read whole."""
    from .formats.word2vec import WORD2VEC_BATCH_ROWS, iter_word2vec, read_vectors_npy, word2vec_header

    d = cfg.decode
    vectors_path = _source_path(cfg, fetched, d.vectors)
    limit = d.limit or None
    meta = {"source": d.format}
    report(0.0, f"reading word vectors from {vectors_path.name}")
    if d.format == "npy":
        words, vectors = read_vectors_npy(vectors_path, _source_path(cfg, fetched, d.words),
                                          column=d.words_column, limit=limit)
        report(1.0, f"read {len(words):,} words of dimension {vectors.shape[1]}")
        return _whole(vectors, words, None, None, meta)
    binary = {"auto": None, "binary": True, "text": False}[d.format]
    n_words, dim = word2vec_header(vectors_path)
    total = min(n_words, limit or n_words)
    batches = iter_word2vec(vectors_path, binary=binary, limit=limit, batch_rows=WORD2VEC_BATCH_ROWS)

    def rows() -> Iterable[Batch]:
        done = 0
        for words, vectors in batches:
            done += len(words)
            report(min(done / max(total, 1), 1.0), f"read {done:,} of {total:,} words")
            yield vectors, words, None, None
        report(1.0, f"read {done:,} words of dimension {dim}")

    return Decoded(dim, np.dtype(np.float32), meta, rows())


def decode_food101(cfg: DatasetConfig, fetched: Path, scratch: Path, report: Report) -> Decoded:
    """Food-101 photos (a tar archive in Food-101's layout) as uint8 RGB rows of image_size^2 * 3.

    The archive is extracted safely into ``scratch`` (inside the stage's temporary directory, so a
    killed run leaves nothing behind that the next one does not remove) and deleted after reading.
    Corrupt or non-image files are skipped and listed in the metadata (``bad_files``).
    """
    from .formats.food import extract_archive, load_images, read_classes, read_food101

    d = cfg.decode
    archive = _source_path(cfg, fetched, d.archive)
    with tempfile.TemporaryDirectory(prefix="extract-", dir=scratch) as where:
        report(0.0, f"extracting {archive.name}")
        root = extract_archive(archive, Path(where) / "food")
        classes = read_classes(root)
        chosen = d.classes or classes
        parts, keys, labels, splits, bad = [], [], [], [], []
        for n, split in enumerate(("train", "test")):
            items = read_food101(root, chosen, split)
            images, kept, split_bad = load_images(root, items, d.image_size)
            parts.append(images.reshape(len(kept), -1))
            keys.extend(path for path, _ in kept)
            labels.extend(chosen.index(name) for _, name in kept)
            splits.extend([split] * len(kept))
            bad.extend(split_bad)
            report((n + 1) / 2, f"decoded {split}: {len(kept)} photos, {len(split_bad)} unreadable")
    if bad:
        log.warning("%s: skipped %d unreadable files: %s", archive.name, len(bad),
                    ", ".join(path for path, _ in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    meta = {"image_shape": [d.image_size, d.image_size, 3], "classes": list(chosen),
            "bad_files": [{"path": p, "reason": r} for p, r in bad], "source": "food101"}
    return _whole(np.concatenate(parts), keys, np.asarray(labels, np.int32), splits, meta)


DECODERS = {"idx": decode_idx, "word2vec": decode_word2vec, "food101": decode_food101}
