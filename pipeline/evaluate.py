"""Quality and speed of an index against exact search, the way ann-benchmarks measures them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .exact import exact_neighbors, normalize_rows

log = logging.getLogger(__name__)

# ann-benchmarks counts a returned neighbour as correct when its distance is within this much of
# the k-th true distance, so ties at the boundary are not punished.
RECALL_EPSILON = 1e-3


def recall_at_k(found_dists: np.ndarray, true_dists: np.ndarray, k: int, epsilon: float = RECALL_EPSILON) -> np.ndarray:
    """Per-query recall@k by ann-benchmarks' definition.

    found_dists: (nq, >=k) distances of the returned neighbours (padding may be +inf);
    true_dists: (nq, >=k) exact distances, nearest first. Returns float64 (nq,) in [0, 1].
    """
    found = np.asarray(found_dists, dtype=np.float64)[:, :k]
    threshold = np.asarray(true_dists, dtype=np.float64)[:, k - 1 : k] + epsilon
    return (found <= threshold).sum(axis=1) / float(k)


def time_single_queries(query_one: Callable[[np.ndarray], object], queries: np.ndarray, repeats: int = 1) -> float:
    """Queries per second of ``query_one`` called once per query row, best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for q in queries:
            query_one(q)
        best = min(best, time.perf_counter() - started)
    return len(queries) / best if best > 0 else float("inf")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sweep_forest(
    forest,
    queries: np.ndarray,
    true_dists: np.ndarray,
    k: int,
    search_ks: Iterable[int],
    n_timed: int,
    repeats: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """One row per search_k: recall@k over all queries (batch) and single-thread QPS on the first n_timed.

    queries: (nq, dim) float32; true_dists: (nq, >=k) exact distances.
    """
    rows = []
    search_ks = list(search_ks)
    timed = queries[: max(1, min(n_timed, len(queries)))]
    for i, search_k in enumerate(search_ks):
        started = time.perf_counter()
        _, dists = forest.query_batch(queries, k=k, search_k=search_k, include_distances=True)
        batch_seconds = time.perf_counter() - started
        recall = recall_at_k(dists, true_dists, k)
        qps = time_single_queries(lambda q: forest.query(q, k=k, search_k=search_k), timed, repeats)
        rows.append(
            {
                "n_trees": int(forest.n_trees),
                "search_k": int(search_k),
                "recall": float(recall.mean()),
                "qps": float(qps),
                "batch_qps": float(len(queries) / batch_seconds) if batch_seconds > 0 else float("inf"),
            }
        )
        log.info("n_trees=%d search_k=%d recall@%d=%.4f qps=%.0f", forest.n_trees, search_k, k, recall.mean(), qps)
        if progress is not None:
            progress(i + 1, len(search_ks))
    return rows


def exact_baseline(base: np.ndarray, queries: np.ndarray, k: int, metric: str, n_timed: int) -> dict:
    """Single-query QPS of brute-force search (recall 1 by definition), on the first n_timed queries."""
    timed = queries[: max(1, min(n_timed, len(queries)))]
    if metric == "angular":
        base = normalize_rows(base)  # once, as an exact-search service would keep it
    qps = time_single_queries(lambda q: exact_neighbors(base, q[None, :], k, metric, base_normalized=True), timed)
    return {"n_trees": 0, "search_k": 0, "recall": 1.0, "qps": float(qps), "batch_qps": float("nan")}
