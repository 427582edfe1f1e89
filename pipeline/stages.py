"""What each stage of the chain computes, as plain functions the Luigi tasks call.

Every stage has a name, a FORMAT version (bumped when the bytes it writes change meaning), a
function giving the resolved parameters that go into its digest, and a ``write_*`` function that
fills a temporary directory from its parents' directories. The tasks only wire these together with
``pipeline.artifacts.publish``.

``report(fraction, message)`` is the progress callback every long stage calls.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import download, snapshot
from .errors import ChecksumError, ConfigError
from .evaluate import directory_bytes, exact_baseline, sweep_forest
from .decode import DECODERS
from .exact import exact_neighbors, normalize_rows
from .artifacts import read_manifest
from .vectors import read_vectors, write_vectors

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]

FORMATS = {"fetch": 1, "decode": 1, "features": 1, "train": 1, "embed": 1, "split": 1, "exact": 1, "forest": 2,
           "evaluate": 1}


def _quiet(fraction: float, message: str) -> None:
    log.debug("%3.0f%% %s", 100 * fraction, message)


def stage_params(cfg: dict, stage: str, **extra: Any) -> dict:
    """The resolved parameters of ``stage`` that decide its bytes (and so its digest)."""
    if stage == "fetch":
        # URLs and mirrors are where bytes come from, not what they are: the checksums pin them.
        # A mutable source's sha256 is the one its dated snapshot saw (config.apply_pins).
        unpinned = [name for name, s in sorted(cfg["sources"].items()) if s["mutable"] and not s["sha256"]]
        if unpinned:
            raise ConfigError(
                f"{cfg.get('_path', cfg['dataset']['name'])}: sources {', '.join(unpinned)} are mutable and this "
                "run has no snapshot of them: run the dataset with `grove run`, `grove rebuild` or the Chain / "
                "Rebuild tasks, which download them for the date and pin what they saw")
        return {
            name: {"filename": s["filename"], "sha256": s["sha256"], "md5": s["md5"]}
            for name, s in sorted(cfg["sources"].items())
        }
    if stage == "decode":
        return {"kind": cfg["dataset"]["kind"], **cfg["decode"]}
    if stage == "features":
        t = cfg["train"]
        return {"backbone": t["backbone"], "input_size": t["input_size"], "weights_path": t["weights_path"]}
    if stage == "train":
        return dict(cfg["train"])
    if stage == "exact":
        return {**cfg["exact"], "metric": cfg["embed"]["metric"]}
    if stage == "forest":
        return {"leaf_size": cfg["forest"]["leaf_size"], "seed": cfg["forest"]["seed"],
                "metric": cfg["embed"]["metric"], **extra}
    return dict(cfg[stage], **extra)


# --- fetch ---------------------------------------------------------------------------------------


def write_fetch(cfg: dict, out: Path, cache_dir: Path, mirror: str | None = None, report: Report = _quiet) -> dict:
    """Download every source into ``cache_dir`` (kept between runs so a cut download resumes),
    verify it, then link it into ``out``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = cfg["sources"]
    for i, (name, src) in enumerate(sorted(sources.items())):
        urls = download.candidate_urls(src["filename"], src["urls"], mirror, subdir=cfg["dataset"]["mirror_subdir"])

        def progress(done: int, total: int | None, i=i, name=name) -> None:
            part = done / total if total else 0.0
            report((i + part) / len(sources), f"fetch {name}: {done / 1e6:.1f} MB")

        # A mutable source's pinned bytes wait content-addressed in the cache (see pipeline/snapshot.py).
        dest = (snapshot.content_path(cache_dir, src["sha256"], src["filename"]) if src["mutable"]
                else cache_dir / src["filename"])
        try:
            cached = download.fetch(urls, dest, sha256=src["sha256"], md5=src["md5"], progress=progress)
        except ChecksumError as exc:
            if not src["mutable"]:
                raise
            raise ChecksumError(f"mutable source {name}: the snapshot pinned sha256 {src['sha256']}, its cached copy "
                                f"{dest} is gone and the publisher now serves other bytes; run a newer date "
                                f"(its snapshot pins the current file). {exc}") from exc
        _link_or_copy(cached, out / src["filename"])
    report(1.0, f"fetched {len(sources)} files")
    return {"rows": {"files": len(sources)}}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --- decode --------------------------------------------------------------------------------------


def write_decode(cfg: dict, fetched: Path, out: Path, report: Report = _quiet) -> dict:
    """Read the raw files into one items table (``items.arrow``): uint8 pixels, or float32 word vectors."""
    vectors, keys, labels, splits, meta = DECODERS[cfg["dataset"]["kind"]](cfg, fetched, out, report)
    n = write_vectors(out / "items.arrow", vectors, keys, labels, splits, meta=meta)
    return {"rows": {"items": n}, "dim": int(vectors.shape[1])}


# --- embed ---------------------------------------------------------------------------------------


def write_embed(cfg: dict, decoded: Path, out: Path, report: Report = _quiet, trained: Path | None = None,
                features: Path | None = None, threads: int = 1) -> dict:
    """Turn items into float32 vectors (``vectors.arrow``) with metric and model in the metadata:
    scaled pixels, unit-length word vectors, or a trained CNN's bottleneck (``trained``)."""
    emb = cfg["embed"]
    items = read_vectors(decoded / "items.arrow")
    meta = {k: v for k, v in items.meta.items() if k != "dim"}
    meta.update(metric=emb["metric"], model=emb["model"])
    if emb["model"] == "cnn":
        from .learned import embed_with_model

        vectors = embed_with_model(cfg, items, trained / "model", features, threads, report)
        meta["backbone"] = cfg["train"]["backbone"]
        meta["item_shape"] = meta.pop("image_shape", None)  # the rows are no longer images
    else:
        vectors = np.empty(items.vectors.shape, dtype=np.float32)
        step = 8192
        for start in range(0, len(items), step):
            block = items.vectors[start : start + step]
            if emb["model"] == "normalized":
                block = normalize_rows(block)
            np.multiply(block, np.float32(emb["scale"]), out=vectors[start : start + step])
            report(min(1.0, (start + step) / len(items)), f"embedded {min(start + step, len(items))} items")
    n = write_vectors(out / "vectors.arrow", vectors, items.keys, items.labels, list(items.splits), meta=meta)
    return {"rows": {"vectors": n}, "dim": int(vectors.shape[1])}


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


def write_split(cfg: dict, embedded: Path, out: Path, report: Report = _quiet) -> dict:
    table = read_vectors(embedded / "vectors.arrow")
    s = cfg["split"]
    base, queries = split_rows(table.splits, s["method"], s["n_queries"], s["seed"])
    meta = {k: v for k, v in table.meta.items() if k != "dim"}
    for name, rows in (("base", base), ("queries", queries)):
        part = table.take(rows)
        write_vectors(out / f"{name}.arrow", part.vectors, part.keys, part.labels, list(part.splits), meta=meta)
        report(0.5 if name == "base" else 1.0, f"wrote {name}: {len(rows)} rows")
    return {"rows": {"base": int(len(base)), "queries": int(len(queries))}}


# --- exact ---------------------------------------------------------------------------------------


def write_exact(cfg: dict, split: Path, out: Path, report: Report = _quiet) -> dict:
    """Ground truth: ``neighbors.npy`` int64 (nq, k) and ``distances.npy`` float32 (nq, k)."""
    base = read_vectors(split / "base.arrow").vectors
    queries = read_vectors(split / "queries.arrow").vectors
    k = cfg["exact"]["k"]
    started = time.perf_counter()
    ids, dists = exact_neighbors(base, queries, k, cfg["embed"]["metric"],
                                 progress=lambda d, t: report(d / t, f"exact search {d}/{t} queries"))
    np.save(out / "neighbors.npy", ids)
    np.save(out / "distances.npy", dists)
    return {"rows": {"queries": int(ids.shape[0]), "k": int(ids.shape[1])},
            "metrics": {"search_seconds": round(time.perf_counter() - started, 3)}}


# --- forest --------------------------------------------------------------------------------------


def write_forest(cfg: dict, split: Path, out: Path, n_trees: int, n_threads: int = 1,
                 report: Report = _quiet) -> dict:
    """Build the index over the base (``index/``) and map its item ids to keys (``items.arrow``)."""
    from .forest import Forest  # numba compiles on first use; import only where it is needed

    base = read_vectors(split / "base.arrow")
    f = cfg["forest"]
    report(0.0, f"building {n_trees} trees over {len(base)} vectors")
    started = time.perf_counter()
    forest = Forest.build(base.vectors, metric=cfg["embed"]["metric"], n_trees=n_trees,
                          leaf_size=f["leaf_size"] or None, seed=f["seed"], n_threads=n_threads)
    build_seconds = time.perf_counter() - started
    forest.save(out / "index")
    table = pa.table({"id": pa.array(np.arange(len(base), dtype=np.int64)),
                      "key": pa.array(base.keys, type=pa.string()), "label": pa.array(base.labels)})
    with pa.OSFile(str(out / "items.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    report(1.0, f"built {n_trees} trees in {build_seconds:.1f} s")
    return {"rows": {"items": len(base)},
            "metrics": {"build_seconds": round(build_seconds, 3), "index_bytes": directory_bytes(out / "index"),
                        "leaf_size": int(forest.leaf_size), "build_threads": int(n_threads)}}


# --- evaluate ------------------------------------------------------------------------------------


def embedding_quality(cfg: dict, embedded: Path, split: Path, exact: Path) -> dict:
    """How good the embedding itself is: word similarity and analogies for word vectors; for labelled
    items, label precision@10 (the share of each query's 10 exact nearest base items with its label)
    and, for a trained CNN, its classifier's test accuracy."""
    if cfg["dataset"]["kind"] == "word2vec":
        from .wordeval import evaluate_word_embedding

        table = read_vectors(embedded / "vectors.arrow")
        return evaluate_word_embedding(table.keys, table.vectors)
    base_labels = read_vectors(split / "base.arrow").labels
    query_labels = read_vectors(split / "queries.arrow").labels
    if (base_labels < 0).all():
        return {}
    neighbors = np.load(exact / "neighbors.npy", mmap_mode="r")[:, :10]
    quality = {"label_precision_at_10": float((base_labels[neighbors] == query_labels[:, None]).mean())}
    train = read_manifest(embedded, verify="none")["parents"].get("train")
    if train:  # a learned embedding: its classifier's accuracy on the test split
        quality["classifier_test_accuracy"] = read_manifest(embedded.parents[2] / train, verify="none")["metrics"][
            "test_accuracy"]
    return quality


def write_evaluate(cfg: dict, embedded: Path, split: Path, exact: Path, forests: dict[int, Path], out: Path,
                   report: Report = _quiet) -> dict:
    """Recall@k and QPS over the search_k sweep for every forest, plus exact search as a point,
    and the embedding's own quality where the dataset has a measure of it.

    Writes ``results.parquet`` and ``results.json`` (the same rows, plus the settings and quality).
    """
    from .forest import Forest

    ev = cfg["evaluate"]
    k = ev["k"]
    queries = read_vectors(split / "queries.arrow").vectors
    true_dists = np.load(exact / "distances.npy", mmap_mode="r")
    if true_dists.shape[1] < k:
        raise ConfigError(f"{cfg['_path']}: evaluate.k = {k} exceeds exact.k = {true_dists.shape[1]}")
    rows: list[dict] = []
    total = len(forests) + 1
    for i, (n_trees, path) in enumerate(sorted(forests.items())):
        forest = Forest.load(path / "index", metric=cfg["embed"]["metric"], dim=queries.shape[1])
        built = json.loads((path / "manifest.json").read_text())["metrics"]
        for row in sweep_forest(forest, queries, true_dists, k, ev["search_k"], ev["n_queries"],
                                progress=lambda d, t, i=i: report((i + d / t) / total, f"n_trees={n_trees}: {d}/{t}")):
            rows.append({**row, "build_seconds": built["build_seconds"], "index_bytes": built["index_bytes"]})
    base = read_vectors(split / "base.arrow").vectors
    rows.append({**exact_baseline(base, queries, k, cfg["embed"]["metric"], min(ev["n_queries"], 200)),
                 "build_seconds": 0.0, "index_bytes": int(base.nbytes)})
    report(1.0, "evaluation done")
    table = pa.Table.from_pylist([{"method": "exact" if r["n_trees"] == 0 else "forest", **r} for r in rows])
    pq.write_table(table, out / "results.parquet")
    quality = embedding_quality(cfg, embedded, split, exact)
    summary = {"k": k, "n_queries": int(len(queries)), "n_timed": int(min(ev["n_queries"], len(queries))),
               "metric": cfg["embed"]["metric"], "rows": table.to_pylist(), "quality": quality}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s evaluation:\n%s", cfg["dataset"]["name"], format_results(summary["rows"], k))
    metrics = {"best_recall": max(r["recall"] for r in rows if r["n_trees"])}
    if "label_precision_at_10" in quality:
        metrics["label_precision_at_10"] = round(quality["label_precision_at_10"], 4)
    if "wordsim353" in quality:
        metrics.update(wordsim353_spearman=round(quality["wordsim353"]["spearman"], 4),
                       simlex999_spearman=round(quality["simlex999"]["spearman"], 4),
                       analogy_accuracy=round(quality["analogy"]["accuracy"], 4))
    return {"rows": {"results": len(rows)}, "metrics": metrics}


def _item_images(root: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(query images, base images, image shape) from the decode stage, when the embedded vectors are not
    images themselves (a CNN bottleneck) but the items are."""
    embed_manifest = read_manifest(root / manifest["parents"]["embed"], verify="none")
    if embed_manifest["params"].get("model") != "cnn":
        return None  # pixels are their own pictures; words have none: the items need not be read
    items = read_vectors(root / embed_manifest["parents"]["decode"] / "items.arrow")
    if "image_shape" not in items.meta:
        return None
    row = {key: i for i, key in enumerate(items.keys)}
    split_dir = root / manifest["parents"]["split"]
    picks = [np.array([row[k] for k in read_vectors(split_dir / f"{name}.arrow").keys], dtype=np.int64)
             for name in ("queries", "base")]
    return items.vectors[picks[0]], items.vectors[picks[1]], json.loads(items.meta["image_shape"])


def write_report(root: Path, evaluate_dir: Path, manifest: dict, report: Report = _quiet) -> None:
    """``report.html`` (and ``report.json``) inside an evaluation being published; ``manifest`` stands
    in for the manifest that is not written yet (dataset, stage, version, params, parents)."""
    from .report import build_evaluation_report

    report(0.95, "writing report.html")
    build_evaluation_report(root, evaluate_dir, manifest=manifest, images=_item_images(root, manifest))


def format_results(rows: list[dict], k: int = 10) -> str:
    """A plain-text table of evaluation rows for logs and the terminal."""
    lines = [f"{'method':>7} {'n_trees':>7} {'search_k':>8} {f'recall@{k}':>9} {'QPS':>9} {'batch QPS':>9}"]
    for r in rows:
        method = "exact" if r["n_trees"] == 0 else "forest"
        lines.append(f"{method:>7} {r['n_trees']:>7} {r['search_k']:>8} {r['recall']:>9.4f} {r['qps']:>9.0f} "
                     f"{r['batch_qps']:>9.0f}")
    return "\n".join(lines)
