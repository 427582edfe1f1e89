"""What each stage of the chain computes, as plain functions the Luigi tasks call.

Every stage is one ``Stage`` record in the registry at the end of this module (``STAGES``, in chain
order): its name, a FORMAT version (bumped when the bytes it writes change meaning), a function giving
the resolved parameters that go into its digest, the ``write_*`` function that fills a temporary
directory from its parents' directories, the files it writes (and which are measured) and its
parents. The tasks read it and only wire these together with ``pipeline.artifacts.publish``;
``stage_params`` and ``FORMATS`` are views of it.

``report(fraction, message)`` is the progress callback every long stage calls.

Digests hash resolved parameters: every default is filled in as the stage will apply it (a code
default too, such as a batch size that changes float results), so equal content has one digest and a
changed default gives a new one. Where resolving needs the parent's output (the image size behind
``train.input_size = 0``, the test rows behind a column split's ``n_queries = 0``, the query count
behind ``evaluate.n_queries = 0``, the vectors' dim behind the forest's leaf size), the task reads it
from the published parent (its manifest, or a table's schema or split column) and passes it to
``stage_params``; while the parent is not built, the value stays as written. That provisional
digest never names a published version: the stage is not complete then anyway (its parent is
missing), and it runs, under the resolved digest, only once the parent exists.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import download, layout, learned, snapshot
from .errors import ArtifactError, ChecksumError, ConfigError
from .evaluate import RESULT_KEYS, ROW_ID, directory_bytes, exact_baseline, read_results, sweep_forest  # noqa: F401
from .layout import REPORT_HTML, REPORT_JSON, RESULTS_JSON, RESULTS_PARQUET, TIMINGS_JSON
from .decode import DECODERS
from .exact import exact_neighbors, normalize_rows
from .artifacts import location, read_manifest, ref_from_key, store_of, version_dir
from .vectors import VectorTable, VectorTableWriter, read_vectors

if TYPE_CHECKING:
    from .config import DatasetConfig

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]


EMBED_BLOCK_ROWS = 8192  # rows embed and split handle at a time; embed shards start at multiples of it
EXACT_QUERY_BLOCK = 512  # queries exact search handles at a time; exact shards start at multiples of it


def _quiet(fraction: float, message: str) -> None:
    log.debug("%3.0f%% %s", 100 * fraction, message)


def stage_params(cfg: DatasetConfig, stage: str, **context: Any) -> dict:
    """The resolved parameters of ``stage`` that decide its bytes (and so its digest): the registered
    stage's ``params`` (see ``Stage``). Context a stage does not take is ignored."""
    return stage_of(stage).params(cfg, **context)


# --- each stage's resolved parameters (the digest's payload; see the module docstring) -------------


def _fetch_params(cfg: DatasetConfig, **_: Any) -> dict:
    # URLs and mirrors are where bytes come from, not what they are: the checksums pin them.
    # A mutable source's sha256 is the one its dated snapshot saw (config.apply_pins).
    unpinned = [name for name, s in sorted(cfg.sources.items()) if s.mutable and not s.sha256]
    if unpinned:
        raise ConfigError(
            f"{cfg.path}: sources {', '.join(unpinned)} are mutable and this "
            "run has no snapshot of them: run the dataset with `grove run`, `grove rebuild` or the Chain / "
            "Rebuild tasks, which download them for the date and pin what they saw")
    return {
        name: {"filename": s.filename, "sha256": s.sha256, "md5": s.md5}
        for name, s in sorted(cfg.sources.items())
    }


def _decode_params(cfg: DatasetConfig, **_: Any) -> dict:
    return {"kind": cfg.kind, **cfg.decode.as_dict()}


def _features_params(cfg: DatasetConfig, **_: Any) -> dict:
    return learned.features_params(cfg)


def _train_params(cfg: DatasetConfig, image_shape: tuple[int, ...] | None = None, **_: Any) -> dict:
    # image_shape: the decode stage's (h, w[, c]) (None while it is not built)
    return learned.train_params(cfg, image_shape)


def _embed_params(cfg: DatasetConfig, **_: Any) -> dict:
    if cfg.embed.model == "cnn":
        return learned.embed_params(cfg)  # embed.scale plays no part in a CNN embedding
    return cfg.embed.as_dict()


def _split_params(cfg: DatasetConfig, test_rows: int | None = None, **_: Any) -> dict:
    # test_rows: how many rows the embedded vectors mark "test" (None while they are not built). A
    # column split's n_queries resolves to the queries it keeps: 0 (every test row) and any number >=
    # the test rows all mean every test row, and then the seed plays no part.
    s = cfg.split.as_dict()
    if s["method"] == "column" and test_rows is not None:
        s["n_queries"] = min(s["n_queries"] or test_rows, test_rows)
        if s["n_queries"] == test_rows:
            s["seed"] = None
    return s


def _exact_params(cfg: DatasetConfig, **_: Any) -> dict:
    return {**cfg.exact.as_dict(), "metric": cfg.embed.metric}


def _forest_params(cfg: DatasetConfig, **context: Any) -> dict:
    # context: n_trees, and dim (the vectors' width, None while they are not built yet). With the dim
    # known, the leaf size and split dimension are resolved as Forest.build resolves them, so
    # `leaf_size = 0` and the default written out give one digest, and a changed code default gives a
    # new one. Without it the digest is provisional: it never names a published index (one is only
    # built, under the resolved digest, once its vectors exist). Every other context value is a
    # parameter of the index (n_trees).
    from .forest import resolved_build_params  # numba: imported only where needed

    f, metric = cfg.forest, cfg.embed.metric
    params = {"leaf_size": f.leaf_size, "seed": f.seed, "metric": metric, **context}
    dim = params.pop("dim", None)
    if dim is not None:
        params.update(resolved_build_params(int(dim), metric, f.leaf_size or None))
    return params


def _part_params(whole: Callable[..., dict]) -> Callable[..., dict]:
    """A part's parameters: the whole stage's (with the context it takes) and the part's range."""
    def params(cfg: DatasetConfig, first: int | None = None, last: int | None = None, **context: Any) -> dict:
        return {**whole(cfg, **context), "first": first, "last": last}

    return params


def _evaluate_params(cfg: DatasetConfig, n_queries_available: int | None = None, n_base: int | None = None,
                     **_: Any) -> dict:
    # n_queries_available, n_base: the split's query and base counts (None while it is not built):
    # n_queries = 0 (time every query) and anything above the count resolve to the count. The code
    # defaults that decide stored results (recall's tolerance, passes per QPS, exact search's timed
    # queries, fewer over a large base) are part of the digest too.
    from .evaluate import RECALL_EPSILON, REPEATS, exact_timed_count

    ev = cfg.evaluate.as_dict()
    available = n_queries_available
    if available is not None:
        ev["n_queries"] = min(ev["n_queries"] or available, available)
    n_timed_exact = None if available is None else exact_timed_count(ev["n_queries"], n_base)
    return {**ev, "recall_epsilon": RECALL_EPSILON, "repeats": REPEATS, "n_timed_exact": n_timed_exact}


# --- fetch ---------------------------------------------------------------------------------------


def write_fetch(cfg: DatasetConfig, out: Path, cache_dir: Path, mirror: str | None = None, report: Report = _quiet,
                root: str | os.PathLike | None = None) -> dict:
    """Download every source into ``cache_dir`` (this machine's download cache, kept between runs so a
    cut download resumes), verify it, then link it into ``out``.

    A mutable source's pinned bytes wait in the artifact ``root`` (see pipeline/snapshot.py): they are
    copied from there into the cache (any machine finds them) before its URLs are tried."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = cfg.sources
    for i, (name, src) in enumerate(sorted(sources.items())):
        urls = download.candidate_urls(src.filename, src.urls, mirror, subdir=cfg.dataset.mirror_subdir)

        def progress(done: int, total: int | None, i=i, name=name) -> None:
            part = done / total if total else 0.0
            report((i + part) / len(sources), f"fetch {name}: {done / 1e6:.1f} MB")

        stored = None
        if src.mutable:
            dest = snapshot.content_path(cache_dir, src.sha256, src.filename)
            stored = layout.snapshot_bytes_key(cfg.name, src.sha256, src.filename)
            if root is not None and not dest.is_file() and store_of(root).exists(stored):
                store_of(root).download(stored, dest)  # checked against the pin by fetch() below
        else:
            dest = cache_dir / src.filename
        try:
            cached = download.fetch(urls, dest, sha256=src.sha256, md5=src.md5, progress=progress)
        except ChecksumError as exc:
            if not src.mutable:
                raise
            where = "the artifact root" if root is None else location(root, stored)
            raise ChecksumError(f"mutable source {name}: the snapshot pinned sha256 {src.sha256}, its stored copy "
                                f"({where}) is gone or damaged and the publisher now serves other bytes; run a newer "
                                f"date (its snapshot pins the current file). {exc}") from exc
        _link_or_copy(cached, out / src.filename)
    report(1.0, f"fetched {len(sources)} files")
    return {"rows": {"files": len(sources)}}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --- decode --------------------------------------------------------------------------------------


def write_decode(cfg: DatasetConfig, fetched: Path, out: Path, report: Report = _quiet) -> dict:
    """Read the raw files into one items table (``items.arrow``): uint8 pixels, or float32 word vectors,
    written batch by batch as the decoder reads them (the bytes of one ``write_vectors`` call)."""
    decoded = DECODERS[cfg.kind](cfg, fetched, out, report)
    with VectorTableWriter(out / layout.ITEMS, decoded.dim, decoded.dtype, meta=decoded.meta) as writer:
        for vectors, keys, labels, splits in decoded.batches:
            writer.write_batch(vectors, keys, labels, splits)
    return {"rows": {"items": writer.n}, "dim": decoded.dim}


# --- embed ---------------------------------------------------------------------------------------


def write_embed(cfg: DatasetConfig, decoded: Path, out: Path, report: Report = _quiet, trained: Path | None = None,
                features: Path | None = None, threads: int = 1, parts: list[Path] | None = None) -> dict:
    """Turn items into float32 vectors (``vectors.arrow``) with metric and model in the metadata:
    scaled pixels, unit-length word vectors, or a trained CNN's bottleneck (``trained``).

    Written block by block from the memory-mapped items: the vectors are never held whole (a CNN's
    are, as its batches are computed). ``parts``: the directories of ``embed-part`` versions covering
    the items in order (``shards``): their vectors are written instead of computed, the same bytes."""
    from .progress import Rate

    emb = cfg.embed
    items = read_vectors(decoded / layout.ITEMS)
    meta = {k: v for k, v in items.meta.items() if k != "dim"}
    meta.update(metric=emb.metric, model=emb.model)
    if emb.model == "cnn":
        meta["backbone"] = cfg.train.backbone
        meta["item_shape"] = meta.pop("image_shape", None)  # the rows are no longer images
    if parts:
        blocks = (np.load(p / layout.PART_VECTORS, mmap_mode="r") for p in parts)
    else:
        blocks = _embedded(cfg, items, 0, len(items), trained, features, threads, report)
    rate = Rate(len(items), "items")
    dim = None
    with contextlib.ExitStack() as stack:
        done = 0
        for block in blocks:
            if dim is None:
                dim = int(block.shape[1])
                writer = stack.enter_context(VectorTableWriter(out / layout.VECTORS, dim, np.float32, meta=meta))
            for start in range(0, len(block), EMBED_BLOCK_ROWS):
                rows = np.asarray(block[start : start + EMBED_BLOCK_ROWS], dtype=np.float32)
                stop = done + len(rows)
                writer.write_batch(rows, items.keys[done:stop], items.labels[done:stop], list(items.splits[done:stop]))
                done = stop
                if parts:
                    report(0.99 * done / len(items), f"wrote {rate.message(done)}")
        if done != len(items):
            raise ArtifactError(f"{out}: the embedding has {done} vectors for {len(items)} items; build it again")
    report(1.0, f"embedded {done:,} items as {emb.model} vectors of dimension {dim}")
    return {"rows": {"vectors": done}, "dim": dim}


def write_embed_part(cfg: DatasetConfig, decoded: Path, out: Path, first: int, last: int, report: Report = _quiet,
                     trained: Path | None = None, features: Path | None = None, threads: int = 1) -> dict:
    """The vectors of items ``first`` .. ``last - 1`` (``vectors.npy`` float32): one share of an
    embedding that ``shards`` splits into tasks. ``first`` is a multiple of ``EMBED_BLOCK_ROWS`` (and
    so of the CNN's batch), so every row is computed as in the whole embedding."""
    items = read_vectors(decoded / layout.ITEMS)
    blocks = list(_embedded(cfg, items, first, last, trained, features, threads, report))
    vectors = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    np.save(out / layout.PART_VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
    return {"rows": {"vectors": int(vectors.shape[0])}, "dim": int(vectors.shape[1])}


def _embedded(cfg: DatasetConfig, items: VectorTable, first: int, last: int, trained: Path | None,
              features: Path | None, threads: int, report: Report) -> Iterator[np.ndarray]:
    """float32 blocks of the vectors of items ``first`` .. ``last - 1``, in order."""
    from .progress import Rate, scaled

    emb = cfg.embed
    if emb.model == "cnn":
        from .learned import embed_with_model

        part = items if (first, last) == (0, len(items)) else items.take(np.arange(first, last))
        yield embed_with_model(cfg, part, trained / layout.MODEL_DIR, features, threads, scaled(report, 0.0, 0.95))
        return
    rate = Rate(last - first, "items")
    for start in range(first, last, EMBED_BLOCK_ROWS):
        stop = min(start + EMBED_BLOCK_ROWS, last)
        block = items.vectors[start:stop]
        if emb.model == "normalized":
            block = normalize_rows(block)
        yield np.multiply(block, np.float32(emb.scale), dtype=np.float32)
        report(0.95 * (stop - first) / (last - first), f"embedded {rate.message(stop - first)}")


# --- split ---------------------------------------------------------------------------------------


def split_rows(splits: np.ndarray, method: str, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the base and of the queries, int64, each ascending.

    ``column``: rows marked ``train`` are the base and ``test`` the queries (optionally a seeded
    sample of n_queries of them). ``holdout``: a seeded sample of n_queries rows is removed from
    everything and used as queries.
    """
    rng = np.random.default_rng(seed)
    if method == "column":
        base = np.flatnonzero(splits == "train")
        queries = np.flatnonzero(splits == "test")
        if n_queries and n_queries < len(queries):
            queries = np.sort(rng.choice(queries, size=n_queries, replace=False))
    else:
        if not 0 < n_queries < len(splits):
            raise ConfigError(f"split.n_queries must be between 1 and {len(splits) - 1} for a holdout split")
        queries = np.sort(rng.choice(len(splits), size=n_queries, replace=False))
        base = np.setdiff1d(np.arange(len(splits)), queries)
    if len(base) == 0 or len(queries) == 0:
        raise ConfigError(f"the split leaves {len(base)} base rows and {len(queries)} queries; both must be non-empty")
    return base.astype(np.int64), queries.astype(np.int64)


@functools.lru_cache(maxsize=64)
def _test_rows_of(path: str, size: int, mtime_ns: int) -> int:
    column = pa.ipc.open_file(pa.memory_map(path, "r")).read_all().column("split")
    return int(pc.sum(pc.equal(column, "test")).as_py() or 0)


def count_test_rows(embedded: Path) -> int | None:
    """How many rows of the embed stage at ``embedded`` are marked ``test`` (its ``vectors.arrow``,
    memory-mapped: only the split column is read): a column split's queries, for its digest. None if
    the file cannot be read (damaged: the split's run reports it when it verifies its parent)."""
    path = Path(embedded) / layout.VECTORS
    try:
        st = path.stat()
        return _test_rows_of(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, pa.ArrowException, KeyError) as exc:
        log.warning("cannot count the test rows of %s (%s); the split's digest stays provisional", path, exc)
        return None


def write_split(cfg: DatasetConfig, embedded: Path, out: Path, report: Report = _quiet) -> dict:
    table = read_vectors(embedded / layout.VECTORS)
    s = cfg.split
    base, queries = split_rows(table.splits, s.method, s.n_queries, s.seed)
    meta = {k: v for k, v in table.meta.items() if k != "dim"}
    for name, rows, filename in (("base", base, layout.BASE), ("queries", queries, layout.QUERIES)):
        # rows gathered block by block from the memory-mapped table: never a copy of the whole base
        with VectorTableWriter(out / filename, table.dim, table.vectors.dtype, meta=meta) as writer:
            for start in range(0, len(rows), EMBED_BLOCK_ROWS):
                part = rows[start : start + EMBED_BLOCK_ROWS]
                writer.write_batch(table.vectors[part], [table.keys[i] for i in part], table.labels[part],
                                   list(table.splits[part]))
        report(0.5 if name == "base" else 1.0, f"wrote {name}: {len(rows):,} rows")
    return {"rows": {"base": int(len(base)), "queries": int(len(queries))}}


# --- exact ---------------------------------------------------------------------------------------


def write_exact(cfg: DatasetConfig, split: Path, out: Path, report: Report = _quiet,
                parts: list[Path] | None = None) -> dict:
    """Ground truth: ``neighbors.npy`` int64 (nq, k) and ``distances.npy`` float32 (nq, k).

    ``parts``: the directories of ``exact-part`` versions covering the queries in order (``shards``):
    their rows are concatenated instead of searched, the same bytes (``write_exact_part``)."""
    if parts:
        ids = np.concatenate([np.load(p / layout.NEIGHBORS, mmap_mode="r") for p in parts])
        dists = np.concatenate([np.load(p / layout.DISTANCES, mmap_mode="r") for p in parts])
        np.save(out / layout.NEIGHBORS, ids)
        np.save(out / layout.DISTANCES, dists)
        report(1.0, f"exact search: {len(ids):,} queries from {len(parts)} parts")
        return {"rows": {"queries": int(ids.shape[0]), "k": int(ids.shape[1])}, "metrics": {"parts": len(parts)}}
    return write_exact_part(cfg, split, out, 0, None, report)


def write_exact_part(cfg: DatasetConfig, split: Path, out: Path, first: int, last: int | None,
                     report: Report = _quiet) -> dict:
    """Ground truth of queries ``first`` .. ``last - 1`` (None: to the end). Queries are searched in
    blocks of ``EXACT_QUERY_BLOCK`` from ``first`` (a multiple of it, see ``shards``), the blocks a
    whole search makes, so the rows are the same bytes as the whole search's."""
    from .progress import Rate, format_duration

    base = read_vectors(split / layout.BASE).vectors
    queries = read_vectors(split / layout.QUERIES).vectors[first:last]
    k = cfg.exact.k
    started = time.perf_counter()
    rate = Rate(len(queries), "queries")
    report(0.0, f"exact search: {len(queries):,} queries against {len(base):,} vectors, k={k}")
    ids, dists = exact_neighbors(base, queries, k, cfg.embed.metric, query_block=EXACT_QUERY_BLOCK,
                                 progress=lambda d, t: report(0.99 * d / t, f"exact search {rate.message(d)}"))
    np.save(out / layout.NEIGHBORS, ids)
    np.save(out / layout.DISTANCES, dists)
    report(1.0, f"exact search: {len(queries):,} queries in {format_duration(time.perf_counter() - started)}")
    return {"rows": {"queries": int(ids.shape[0]), "k": int(ids.shape[1])},
            "metrics": {"search_seconds": round(time.perf_counter() - started, 3)}}


# --- forest --------------------------------------------------------------------------------------


def write_forest(cfg: DatasetConfig, split: Path, out: Path, n_trees: int, n_threads: int = 1,
                 report: Report = _quiet, parts: list[Path] | None = None) -> dict:
    """Build the index over the base (``index/``) and map its item ids to keys (``items.arrow``).

    The build uses the resolved parameters of ``stage_params`` (the ones the digest hashes).
    ``parts``: the directories of ``forest-part`` versions holding trees 0..n_trees-1 in order
    (``shards``): their trees are assembled instead of built, into the same bytes."""
    from .forest import Forest, load_trees  # numba compiles on first use; import only where it is needed

    # An angular or dot index keeps its own (normalised or widened) copy of the rows: read them into
    # private memory it may change, rather than copying a mapped array (the file's pages and the copy).
    own = cfg.embed.metric in ("angular", "dot")
    base = read_vectors(split / layout.BASE, private=own)
    params = stage_params(cfg, "forest", n_trees=n_trees, dim=base.dim)
    trees = [tree for part in parts for tree in load_trees(part / layout.TREES_DIR)] if parts else None
    report(0.0, f"building {n_trees} trees over {len(base)} vectors" if trees is None
           else f"assembling {n_trees} trees from {len(parts)} parts over {len(base)} vectors")
    started = time.perf_counter()
    forest = Forest.build(base.vectors, metric=params["metric"], n_trees=n_trees, leaf_size=params["leaf_size"],
                          seed=params["seed"], n_threads=n_threads, split_dim=params["split_dim"] or None,
                          progress=lambda done, total: report(done / total, f"built {done}/{total} trees"),
                          trees=trees, overwrite=own)
    build_seconds = time.perf_counter() - started
    forest.save(out / layout.INDEX_DIR)
    table = pa.table({"id": pa.array(np.arange(len(base), dtype=np.int64)),
                      "key": pa.array(base.keys, type=pa.string()), "label": pa.array(base.labels)})
    with pa.OSFile(str(out / layout.ITEMS), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    report(1.0, f"built {n_trees} trees in {build_seconds:.1f} s")
    return {"rows": {"items": len(base)},
            "metrics": {"build_seconds": round(build_seconds, 3), "index_bytes": directory_bytes(out / layout.INDEX_DIR),
                        "leaf_size": int(forest.leaf_size), "build_threads": int(n_threads)}}


def write_forest_part(cfg: DatasetConfig, split: Path, out: Path, first: int, last: int, n_threads: int = 1,
                      report: Report = _quiet) -> dict:
    """Trees ``first`` .. ``last - 1`` of the dataset's forests (``trees/``; ``Forest.build_trees``):
    one share of a forest that ``shards`` splits into tasks. Tree t is the same in a forest of any
    size, so a part serves every forest that holds those trees."""
    from .forest import Forest, save_trees

    base = read_vectors(split / layout.BASE)
    params = stage_params(cfg, "forest", n_trees=last, dim=base.dim)
    report(0.0, f"building trees {first}..{last - 1} over {len(base)} vectors")
    started = time.perf_counter()
    trees = Forest.build_trees(base.vectors, first, last, metric=params["metric"], leaf_size=params["leaf_size"],
                               seed=params["seed"], n_threads=n_threads, split_dim=params["split_dim"] or None,
                               progress=lambda done, total: report(done / total, f"built {done}/{total} trees"))
    save_trees(trees, out / layout.TREES_DIR)
    seconds = time.perf_counter() - started
    report(1.0, f"built trees {first}..{last - 1} in {seconds:.1f} s")
    return {"rows": {"trees": last - first}, "metrics": {"build_seconds": round(seconds, 3)}}


# --- shards: one stage's work split into tasks for several workers --------------------------------


def shard_ranges(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """``[(first, last), ...]``: 0..n split into at most ``shards`` consecutive ranges of near-equal
    size, each starting at a multiple of ``align`` (the block a stage works in, so that a shard
    computes exactly what the whole computes). Fewer ranges when there is too little to split."""
    if n <= 0:
        return []
    units = -(-n // align)
    shards = max(1, min(int(shards), units))
    cuts = [align * (units * i // shards) for i in range(shards)] + [n]
    return [(a, min(b, n)) for a, b in zip(cuts, cuts[1:]) if a < min(b, n)]


# --- evaluate ------------------------------------------------------------------------------------


def embedding_quality(cfg: DatasetConfig, embedded: Path, split: Path, exact: Path,
                      root: str | os.PathLike | None = None) -> dict:
    """How good the embedding itself is: word similarity and analogies for word vectors; for labelled
    items, label precision@10 (the share of each labelled query's 10 exact nearest base items with
    its label) and, for a trained CNN, its classifier's test accuracy (from the train version's
    manifest under the artifact ``root``; default: the root that holds the local directory
    ``embedded``). A measure that does not apply is left out: {} for unlabelled items (a ``vectors``
    dataset without labels, or whose queries have none)."""
    if cfg.kind == "word2vec":
        from .wordeval import evaluate_word_embedding

        table = read_vectors(embedded / layout.VECTORS)
        return evaluate_word_embedding(table.keys, table.vectors)
    base_labels = read_vectors(split / layout.BASE).labels
    query_labels = read_vectors(split / layout.QUERIES).labels
    labelled = query_labels >= 0
    if (base_labels < 0).all() or not labelled.any():
        return {}
    neighbors = np.load(exact / layout.NEIGHBORS, mmap_mode="r")[labelled, :10]
    hits = base_labels[neighbors] == query_labels[labelled, None]
    quality = {"label_precision_at_10": float(hits.mean())}
    train = read_manifest(embedded, verify="none")["parents"].get("train")
    if train:  # a learned embedding: its classifier's accuracy on the test split
        train_ref = ref_from_key(embedded.parents[2] if root is None else root, train)
        quality["classifier_test_accuracy"] = read_manifest(train_ref, verify="none")["metrics"]["test_accuracy"]
    return quality


def write_evaluate(cfg: DatasetConfig, embedded: Path, split: Path, exact: Path, forests: dict[int, Path], out: Path,
                   report: Report = _quiet, root: str | os.PathLike | None = None) -> dict:
    """Recall@k and QPS over the search_k sweep for every forest, plus exact search as a point,
    and the embedding's own quality where the dataset has a measure of it.

    Writes ``results.parquet`` and ``results.json`` (the same rows, plus the settings and quality), both
    strict: a figure that was not measured (exact search's batch QPS) is null, never NaN. Each QPS is the
    median of ``evaluate.REPEATS`` warmed-up passes over the n_timed queries, with its min and max.
    ``evaluate.n_queries`` = 0 times every query. Progress runs to 0.9; the report that follows finishes it.
    """
    from .evaluate import REPEATS, exact_timed_count, finite_or_none
    from .forest import Forest
    from .progress import Rate, format_duration

    ev = cfg.evaluate
    k = ev.k
    queries = read_vectors(split / layout.QUERIES).vectors
    true_dists = np.load(exact / layout.DISTANCES, mmap_mode="r")
    if true_dists.shape[1] < k:
        raise ConfigError(f"{cfg.path}: evaluate.k = {k} exceeds exact.k = {true_dists.shape[1]}")
    if ev.n_queries < 0:
        raise ConfigError(f"{cfg.path}: evaluate.n_queries = {ev.n_queries}; use 0 (time every query) "
                          f"or a positive number of queries")
    n_timed = len(queries) if ev.n_queries == 0 else min(ev.n_queries, len(queries))
    base = read_vectors(split / layout.BASE).vectors  # memory-mapped
    n_timed_exact = exact_timed_count(n_timed, len(base))
    rows: list[dict] = []
    n_cells = len(forests) * len(ev.search_k)
    rate = Rate(n_cells + 1, "settings")
    done = 0

    def cell(d: int, message: str, n_trees: int) -> None:
        report(0.9 * (done + d) / (n_cells + 1), f"n_trees={n_trees} {message}; {done + d}/{n_cells + 1} settings "
                                                 f"done, ETA {format_duration(rate.eta(done + d))}")

    for n_trees, path in sorted(forests.items()):
        forest = Forest.load(path / layout.INDEX_DIR, metric=cfg.embed.metric, dim=queries.shape[1])
        built = read_manifest(path, verify="none")["metrics"]
        report(0.9 * done / (n_cells + 1), f"n_trees={n_trees}: sweeping search_k {list(ev.search_k)}, "
                                          f"{REPEATS} x {n_timed:,} timed queries each")
        for row in sweep_forest(forest, queries, true_dists, k, ev.search_k, n_timed,
                                progress=lambda d, t, m, n_trees=n_trees: cell(d, m, n_trees)):
            rows.append({**row, "build_seconds": built["build_seconds"], "index_bytes": built["index_bytes"]})
        done += len(ev.search_k)
        # Unmap this index before the next: each holds its own rows (3.6 GB at 3M x 300), and the
        # pages a sweep touched would otherwise stay in this process's resident set.
        del forest
        gc.collect()
    report(0.9 * done / (n_cells + 1), f"exact search baseline: {REPEATS} x {n_timed_exact:,} timed queries")
    rows.append({**exact_baseline(base, queries, k, cfg.embed.metric, n_timed_exact),
                 "build_seconds": 0.0, "index_bytes": int(base.nbytes)})
    del base
    gc.collect()
    rows = finite_or_none([{"method": "exact" if r["n_trees"] == 0 else "forest", **r} for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), out / RESULTS_PARQUET)  # every column, for analysis
    quality = embedding_quality(cfg, embedded, split, exact, root)
    # Reproducible (the same bytes on every machine) apart from measured (QPS, seconds): see read_results.
    summary = finite_or_none({"k": k, "n_queries": int(len(queries)), "metric": cfg.embed.metric,
                              "rows": [{key: r[key] for key in RESULT_KEYS} for r in rows], "quality": quality})
    timings = finite_or_none({"n_timed": int(n_timed), "n_timed_exact": int(n_timed_exact), "repeats": REPEATS,
                              "rows": [{key: v for key, v in r.items() if key not in RESULT_KEYS or key in ROW_ID}
                                       for r in rows]})
    (out / RESULTS_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    (out / TIMINGS_JSON).write_text(json.dumps(timings, indent=2, sort_keys=True, allow_nan=False) + "\n")
    report(0.9, f"evaluated {n_cells} settings and exact search in {format_duration(rate.elapsed())}")
    log.info("%s evaluation:\n%s", cfg.name, format_results(rows, k))
    metrics = {"best_recall": max(r["recall"] for r in rows if r["n_trees"])}
    if "label_precision_at_10" in quality:
        metrics["label_precision_at_10"] = round(quality["label_precision_at_10"], 4)
    if "wordsim353" in quality:
        metrics.update(wordsim353_spearman=round(quality["wordsim353"]["spearman"], 4),
                       simlex999_spearman=round(quality["simlex999"]["spearman"], 4),
                       analogy_accuracy=round(quality["analogy"]["accuracy"], 4))
    return {"rows": {"results": len(rows)}, "metrics": finite_or_none(metrics),
            "measured": [TIMINGS_JSON, RESULTS_PARQUET]}



def _item_images(root: str | os.PathLike, manifest: dict) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(query images, base images, image shape) from the decode stage, when the embedded vectors are not
    images themselves (a CNN bottleneck) but the items are."""
    embed_manifest = read_manifest(ref_from_key(root, manifest["parents"]["embed"]), verify="none")
    if embed_manifest["params"].get("model") != "cnn":
        return None  # pixels are their own pictures; words have none: the items need not be read
    items = read_vectors(version_dir(root, embed_manifest["parents"]["decode"]) / layout.ITEMS)
    if "image_shape" not in items.meta:
        return None
    row = {key: i for i, key in enumerate(items.keys)}
    split_dir = version_dir(root, manifest["parents"]["split"])
    picks = [np.array([row[k] for k in read_vectors(split_dir / name).keys], dtype=np.int64)
             for name in (layout.QUERIES, layout.BASE)]
    return items.vectors[picks[0]], items.vectors[picks[1]], json.loads(items.meta["image_shape"])


def write_report(root: str | os.PathLike, evaluate_dir: Path, manifest: dict, report: Report = _quiet) -> list[str]:
    """``report.html`` (and ``report.json``) inside an evaluation being published; ``manifest`` stands
    in for the manifest that is not written yet (dataset, stage, version, params, parents)."""
    from .report import build_evaluation_report

    report(0.95, "writing report.html")
    build_evaluation_report(root, evaluate_dir, manifest=manifest, images=_item_images(root, manifest))
    report(1.0, "wrote report.html")
    return [REPORT_HTML, REPORT_JSON]  # measured: they show QPS and when they were made


def format_results(rows: list[dict], k: int = 10) -> str:
    """A plain-text table of evaluation rows for logs and the terminal. QPS is the median of the timed
    passes; the column after it is their spread (half the min-max range, in percent of the median);
    a figure that was not measured shows as "-"."""
    import math

    from .evaluate import spread_percent

    def num(value, width: int, spec: str) -> str:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return f"{format(value, spec) if ok else '-':>{width}}"

    def pct(row: dict, key: str) -> str:
        p = spread_percent(row, key)
        return f"{'-' if p is None else f'±{p:.1f}%':>7}"

    lines = [f"{'method':>7} {'n_trees':>7} {'search_k':>8} {f'recall@{k}':>9} {'QPS':>10} {'spread':>7} "
             f"{'batch QPS':>10} {'spread':>7}"]
    for r in rows:
        method = "exact" if r["n_trees"] == 0 else "forest"
        lines.append(f"{method:>7} {r['n_trees']:>7} {r['search_k']:>8} {num(r['recall'], 9, '.4f')} "
                     f"{num(r['qps'], 10, ',.0f')} {pct(r, 'qps')} {num(r.get('batch_qps'), 10, ',.0f')} "
                     f"{pct(r, 'batch_qps')}")
    return "\n".join(lines)


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of the chain: everything the digest, the tasks and the commands know about it.

    - ``name``: the stage's directory under ``<root>/<dataset>/`` and its task's ``stage``.
    - ``format``: its FORMAT version (bumped when the bytes it writes change meaning); part of the
      digest and of the version's name ``v<format>-<digest>``.
    - ``params``: ``(cfg, **context) -> dict``, the resolved parameters that decide its bytes (the
      digest's payload). ``context`` holds the task's own parameters (a forest's ``n_trees``) and
      what only a published parent tells (see the module docstring), None while that parent is not
      built; ``context`` names what it takes, and anything else is ignored.
    - ``write``: the function that fills a temporary version directory from the parents' directories
      (its arguments differ per stage; the task calls it).
    - ``files``: the names it writes in its version directory (a directory such as ``index`` stands for
      the files under it). Fetch writes one file per source, named by the config, and lists none.
    - ``measured``: those of ``files`` that hold measurements (timings, QPS, timestamps), which the
      manifest marks measured; every other file is the same bytes on every machine.
    - ``parents``: the stages it may read, in the order its task requires them; ``uses(cfg)`` says
      which of them a dataset's config needs (default: all).
    """

    name: str
    format: int
    params: Callable[..., dict]
    write: Callable[..., dict]
    files: tuple[str, ...]
    measured: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    uses: Callable[[DatasetConfig], Iterable[str]] | None = None

    def parents_for(self, cfg: DatasetConfig) -> tuple[str, ...]:
        """The parents that ``cfg`` needs, in ``parents`` order."""
        if self.uses is None:
            return self.parents
        used = set(self.uses(cfg))
        return tuple(name for name in self.parents if name in used)


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` after the stages registered so far (its parents must be among them)."""
    if stage.name in _REGISTRY:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    missing = [p for p in stage.parents if p not in _REGISTRY]
    if missing or not set(stage.measured) <= set(stage.files):
        raise ValueError(f"stage {stage.name!r}: parents {missing} are not registered before it, or measured "
                         f"{list(stage.measured)} are not among its files {list(stage.files)}")
    _REGISTRY[stage.name] = stage
    return stage


def stage_of(name: str) -> Stage:
    """The registered stage ``name``; KeyError naming the stages when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(_REGISTRY)}") from None


def _late(module: Any, name: str) -> Callable[..., dict]:
    """Calls ``module.<name>`` as it is at call time, so a replaced write function (a test's stall) is
    the one the task runs."""
    def write(*args: Any, **kwargs: Any) -> dict:
        return getattr(module, name)(*args, **kwargs)

    write.__name__ = write.__qualname__ = name
    return write


_here = sys.modules[__name__]


def _embed_uses(cfg: DatasetConfig) -> tuple[str, ...]:
    if cfg.embed.model != "cnn":
        return ("decode",)
    return ("decode", "train", "features") if learned.pretrained(cfg) else ("decode", "train")


# The chain, in order: a stage comes after every stage it may read.
register(Stage("fetch", 1, _fetch_params, _late(_here, 'write_fetch'), files=()))
register(Stage("decode", 1, _decode_params, _late(_here, 'write_decode'), files=(layout.ITEMS,), parents=("fetch",)))
register(Stage("features", 2, _features_params, _late(learned, 'write_features'), files=(layout.FEATURES,),
               parents=("decode",)))
register(Stage("train", 2, _train_params, _late(learned, 'write_train'), files=(layout.MODEL_DIR,),
               parents=("decode", "features"),
               context=("image_shape",),
               uses=lambda cfg: ("decode", "features") if learned.pretrained(cfg) else ("decode",)))
register(Stage("embed", 2, _embed_params, _late(_here, 'write_embed'), files=(layout.VECTORS,),
               parents=("decode", "train", "features"), uses=_embed_uses))
register(Stage("embed-part", 1, _part_params(_embed_params), _late(_here, 'write_embed_part'),
               files=(layout.PART_VECTORS,), parents=("decode", "train", "features"), context=("first", "last"),
               uses=_embed_uses))
register(Stage("split", 2, _split_params, _late(_here, 'write_split'), files=(layout.BASE, layout.QUERIES),
               parents=("embed",), context=("test_rows",)))
register(Stage("exact-part", 1, _part_params(_exact_params), _late(_here, 'write_exact_part'),
               files=(layout.NEIGHBORS, layout.DISTANCES), parents=("split",), context=("first", "last")))
register(Stage("exact", 2, _exact_params, _late(_here, 'write_exact'), files=(layout.NEIGHBORS, layout.DISTANCES),
               parents=("split",)))
register(Stage("forest-part", 1, _part_params(_forest_params), _late(_here, 'write_forest_part'),
               files=(layout.TREES_DIR,), parents=("split",), context=("first", "last", "dim")))
register(Stage("forest", 3, _forest_params, _late(_here, 'write_forest'), files=(layout.INDEX_DIR, layout.ITEMS),
               parents=("split",), context=("n_trees", "dim")))
register(Stage("evaluate", 2, _evaluate_params, _late(_here, 'write_evaluate'),
               files=(RESULTS_JSON, TIMINGS_JSON, RESULTS_PARQUET, REPORT_HTML, REPORT_JSON),
               measured=(TIMINGS_JSON, RESULTS_PARQUET, REPORT_HTML, REPORT_JSON),
               parents=("embed", "split", "exact", "forest"), context=("n_queries_available", "n_base")))

STAGES: Mapping[str, Stage] = MappingProxyType(_REGISTRY)  # every stage, in chain order
STAGE_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# A compatibility view: each stage's FORMAT version.
FORMATS: Mapping[str, int] = MappingProxyType({name: stage.format for name, stage in _REGISTRY.items()})
