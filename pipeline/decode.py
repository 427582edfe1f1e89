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

import contextlib
import logging
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TYPE_CHECKING

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


def decode_vectors(cfg: DatasetConfig, fetched: Path, scratch: Path, report: Report) -> Decoded:
    """A user's own vectors (``pipeline.formats.vectors_file``: Parquet, Arrow IPC, or .npy with an
    ids file) as float32 rows, keys as given (integers as decimal strings), labels int32 (string
    labels numbered in sorted order, listed as ``classes`` in the metadata; -1: none).

    With ``decode.queries`` the base rows are split ``train`` and the query rows ``test`` (a column
    split takes them as the queries); without it the rows have no split (a holdout split). Both
    files are opened and checked (columns, types, dimensions) before any row is read, then streamed
    in batches. A FormatError names the file, the column, the ``decode.*`` key and source, and the fix.
    """
    from .formats.vectors_file import open_vector_file

    d = cfg.decode
    files = {}
    for key, ids_key in (("vectors", "ids"), ("queries", "query_ids")):
        if d[key] is None:
            continue
        ids = d[ids_key]
        with _vectors_context(cfg, key, ids_key):
            files[key] = open_vector_file(
                _source_path(cfg, fetched, d[key]), key_column=d.key_column, vector_column=d.vector_column,
                label_column=d.label_column, ids_path=None if ids is None else _source_path(cfg, fetched, ids),
                need_labels=key == "vectors")
    base, queries = files["vectors"], files.get("queries")
    if queries is not None:
        with _vectors_context(cfg, "queries", "query_ids"):
            if queries.dim != base.dim:
                raise FormatError(f"{queries.path}: the query vectors have dimension {queries.dim} but the vectors "
                                  f"({base.path.name}) have {base.dim}: queries must have the vectors' dimension")
            if queries.label_kind and queries.label_kind != base.label_kind:
                kinds = {"int": "integers", "str": "strings"}
                raise FormatError(f"{queries.keys_path}: the query labels ({d.label_column!r}) are "
                                  f"{kinds[queries.label_kind]} but the vectors' are {kinds[base.label_kind]}: "
                                  "write both the same way")
    classes = None
    if base.label_kind == "str":
        with _vectors_context(cfg, "vectors", "ids"):
            classes = sorted(base.string_labels() | (queries.string_labels() if queries else set()))
    meta: dict = {"source": "vectors", "format": base.format}
    if queries is not None:
        meta["query_format"] = queries.format
    if classes is not None:
        meta["classes"] = classes
    known = [f.n_rows for f in files.values()]
    total = sum(known) if None not in known else None

    def rows() -> Iterable[Batch]:
        done = 0
        base_keys: set[str] = set()
        parts = [("vectors", "ids", base, "train", {})]
        if queries is not None:
            parts.append(("queries", "query_ids", queries, "test", {"other_keys": base_keys,
                                                                  "other_name": str(base.keys_path.name)}))
        for key, ids_key, file, split, other in parts:
            with _vectors_context(cfg, key, ids_key):
                for vectors, keys, labels in file.batches(classes, seen=base_keys if key == "vectors" else None,
                                                          **other):
                    done += len(keys)
                    report(done / total if total else 0.0, f"read {done:,} of {total or '?'} vectors")
                    yield vectors, keys, labels, None if queries is None else [split] * len(keys)
        report(1.0, f"read {done:,} vectors of dimension {base.dim}")

    return Decoded(base.dim, np.dtype(np.float32), meta, rows())


@contextlib.contextmanager
def _vectors_context(cfg: DatasetConfig, key: str, ids_key: str) -> Iterator[None]:
    """A FormatError raised inside completed with where the file comes from in the config."""
    try:
        yield
    except FormatError as exc:
        d = cfg.decode
        names = [(k, d[k]) for k in (key, ids_key) if d[k] is not None]
        where = ", ".join(f"decode.{k} = {name!r}: sources.{name}, {cfg.sources[name].filename}" for k, name in names)
        pinned = [f"sources.{name}.sha256" for _, name in names if not cfg.sources[name].mutable]
        fix = f"; once the file is fixed, put its new sha256 in {' and '.join(pinned)}" if pinned else ""
        raise FormatError(f"{exc} ({where}, in {cfg.path}{fix})") from exc


DECODERS = {"idx": decode_idx, "word2vec": decode_word2vec, "food101": decode_food101,
            "vectors": decode_vectors}
