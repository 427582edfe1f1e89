"""Quality and speed of an index against exact search, the way ann-benchmarks measures them.

Speed figures are honest about noise and one-time costs: every setting is warmed up before it is timed
(compiling a kernel is not a served query's cost), and each QPS is the median of ``REPEATS`` timed passes,
stored with the passes' min and max so a report can show how noisy it is.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .exact import exact_neighbors, normalize_rows, unit_rows
from .layout import RESULTS_JSON, TIMINGS_JSON

log = logging.getLogger(__name__)

# ann-benchmarks counts a returned neighbour as correct when its distance is within this much of
# the k-th true distance, so ties at the boundary are not punished.
RECALL_EPSILON = 1e-3
# Each QPS figure is the median of this many timed passes; the passes' min and max are its spread.
REPEATS = 5
# Single queries (and one batch of as many) answered per setting before timing: compiling a kernel or
# faulting in an index's pages happens once per process and is not what a served query costs.
WARMUP_QUERIES = 3
# Exact search is timed on at most this many queries (brute force over the whole base is slow), and
# on fewer over a large base: a timed pass scans at most EXACT_TIMED_ROWS base rows (200 queries up to
# a 400,000-row base; 26 over 3M, where one exhaustive query takes about half a second), never fewer
# than EXACT_TIMED_MIN queries. A function of the base's size, so it is part of the digest.
EXACT_TIMED_MAX = 200
EXACT_TIMED_MIN = 10
EXACT_TIMED_ROWS = 80_000_000


def exact_timed_count(n_timed: int, n_base: int | None) -> int:
    """How many queries exact search's QPS is timed on: at most ``n_timed``, ``EXACT_TIMED_MAX`` and
    (over a large base) ``EXACT_TIMED_ROWS / n_base``, at least ``EXACT_TIMED_MIN`` where there are
    that many. ``n_base`` None (not built yet) counts as a small base."""
    by_work = EXACT_TIMED_MAX if not n_base else max(EXACT_TIMED_MIN, EXACT_TIMED_ROWS // int(n_base))
    return max(1, min(int(n_timed), EXACT_TIMED_MAX, by_work))


def recall_at_k(found_dists: np.ndarray, true_dists: np.ndarray, k: int, epsilon: float = RECALL_EPSILON) -> np.ndarray:
    """Per-query recall@k by ann-benchmarks' definition.

    found_dists: (nq, >=k) distances of the returned neighbours (padding may be +inf);
    true_dists: (nq, >=k) exact distances, nearest first. Returns float64 (nq,) in [0, 1].
    """
    found = np.asarray(found_dists, dtype=np.float64)[:, :k]
    threshold = np.asarray(true_dists, dtype=np.float64)[:, k - 1 : k] + epsilon
    return (found <= threshold).sum(axis=1) / float(k)


def spread(rates: Sequence[float]) -> dict:
    """``{"median", "min", "max"}`` of repeated measurements of one rate."""
    return {"median": float(statistics.median(rates)), "min": float(min(rates)), "max": float(max(rates))}


def spread_percent(row: Mapping, key: str = "qps") -> float | None:
    """Half the range of a row's repeated measurements of ``key``, in percent of its median
    (``qps_min``/``qps_max`` around ``qps``): ``None`` when the row has no spread (older results)."""
    mid, lo, hi = row.get(key), row.get(f"{key}_min"), row.get(f"{key}_max")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mid, lo, hi)) or mid <= 0:
        return None
    return 100.0 * (hi - lo) / (2.0 * mid)


def _rate(count: int, seconds: float) -> float:
    # A pass too short for the clock (never seen: one query takes microseconds) has no measurable rate.
    return count / seconds if seconds > 0 else float("inf")


def single_query_rates(query_one: Callable[[np.ndarray], object], queries: np.ndarray, repeats: int) -> list[float]:
    """Queries per second of ``query_one`` called once per query row (nq, dim), one figure per pass."""
    rates = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for q in queries:
            query_one(q)
        rates.append(_rate(len(queries), time.perf_counter() - started))
    return rates


def batch_rates(query_all: Callable[[np.ndarray], object], queries: np.ndarray, repeats: int) -> list[float]:
    """Queries per second of ``query_all`` answering every row of ``queries`` in one call, one figure per call."""
    rates = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        query_all(queries)
        rates.append(_rate(len(queries), time.perf_counter() - started))
    return rates


def _with_spread(row: dict, key: str, rates: Sequence[float] | None) -> dict:
    s = spread(rates) if rates else {"median": None, "min": None, "max": None}
    row.update({key: s["median"], f"{key}_min": s["min"], f"{key}_max": s["max"]})
    return row


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sweep_forest(
    forest,
    queries: np.ndarray,
    true_dists: np.ndarray,
    k: int,
    search_ks: Iterable[int],
    n_timed: int,
    repeats: int = REPEATS,
    progress: Callable[[int, int, str], None] | None = None,
    warmup: int = WARMUP_QUERIES,
) -> list[dict]:
    """One row per search_k: recall@k over all queries, and single-query and batch QPS on the first n_timed.

    queries: (nq, dim) float32; true_dists: (nq, >=k) exact distances. Before anything is timed, each
    search_k answers ``warmup`` single queries and one small batch, so one-time costs (compiling, first
    touches of the index's pages) are not counted. Each QPS is then measured ``repeats`` times (passes
    over the n_timed queries, one at a time and as one batch): the row holds the median as ``qps`` /
    ``batch_qps``, the spread as ``qps_min``, ``qps_max``, ``batch_qps_min``, ``batch_qps_max``, and
    ``repeats``. ``progress(done, total, message)`` is called before and after each search_k.
    """
    rows = []
    search_ks = list(search_ks)
    timed = queries[: max(1, min(n_timed, len(queries)))]
    repeats = max(1, int(repeats))
    for i, search_k in enumerate(search_ks):
        if progress is not None:
            progress(i, len(search_ks), f"search_k={search_k}: recall over {len(queries):,} queries, "
                                        f"{repeats} x {len(timed):,} timed")

        def one(q: np.ndarray, search_k: int = search_k) -> object:
            return forest.query(q, k=k, search_k=search_k)

        def batch(qs: np.ndarray, search_k: int = search_k) -> object:
            return forest.query_batch(qs, k=k, search_k=search_k)

        for q in timed[: max(1, warmup)]:
            one(q)
        batch(timed[: max(1, warmup)])
        _, dists = forest.query_batch(queries, k=k, search_k=search_k, include_distances=True)
        recall = float(recall_at_k(dists, true_dists, k).mean())
        row = {"n_trees": int(forest.n_trees), "search_k": int(search_k), "recall": recall}
        _with_spread(row, "qps", single_query_rates(one, timed, repeats))
        _with_spread(row, "batch_qps", batch_rates(batch, timed, repeats))
        row["repeats"] = repeats
        rows.append(row)
        log.info("n_trees=%d search_k=%d recall@%d=%.4f qps=%.0f (%.0f-%.0f over %d passes)", forest.n_trees,
                 search_k, k, recall, row["qps"], row["qps_min"], row["qps_max"], repeats)
        if progress is not None:
            progress(i + 1, len(search_ks), f"search_k={search_k} recall@{k} {recall:.3f}, {row['qps']:,.0f} QPS")
    return rows


def exact_baseline(base: np.ndarray, queries: np.ndarray, k: int, metric: str, n_timed: int,
                   repeats: int = REPEATS, warmup: int = WARMUP_QUERIES) -> dict:
    """Single-query QPS of brute-force search (recall 1 by definition) on the first n_timed queries,
    warmed up and measured ``repeats`` times like ``sweep_forest``; batch QPS is not measured (None).

    An angular base is searched as unit rows, as an exact-search service would keep them: a base that
    already has them (the ``normalized`` embedding's) is searched where it lies, memory-mapped, and
    only another is normalised into a copy once. Only speed is measured here: no stored figure
    depends on the rows' last bits."""
    timed = queries[: max(1, min(n_timed, len(queries)))]
    if metric == "angular" and not unit_rows(base):
        base = normalize_rows(base)

    def one(q: np.ndarray) -> object:
        return exact_neighbors(base, q[None, :], k, metric, base_normalized=True)

    for q in timed[: max(1, warmup)]:
        one(q)
    row = {"n_trees": 0, "search_k": 0, "recall": 1.0}
    _with_spread(row, "qps", single_query_rates(one, timed, repeats))
    _with_spread(row, "batch_qps", None)
    row["repeats"] = max(1, int(repeats))
    return row


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) inside it replaced by None, for strict JSON
    and for Parquet nulls. Walks dicts, lists and tuples; numpy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {key: finite_or_none(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


ROW_ID = ("n_trees", "search_k")
RESULT_KEYS = ("method", "n_trees", "search_k", "recall", "index_bytes")


def read_results(evaluate_dir: Path) -> dict:
    """An evaluation's results as one dict: ``k``, ``n_queries``, ``metric``, ``quality`` and ``rows``
    (one per n_trees and search_k, exact search last, with ``recall`` and ``index_bytes`` from the
    reproducible ``results.json`` and ``qps``, ``batch_qps`` (median, min, max), ``build_seconds``
    from the measured ``timings.json``), plus the timing settings ``n_timed``, ``n_timed_exact``, ``repeats``.
    Evaluations of format 1 kept everything in results.json; they read the same way."""
    results = json.loads((Path(evaluate_dir) / RESULTS_JSON).read_text(encoding="utf-8"))
    timings_path = Path(evaluate_dir) / TIMINGS_JSON
    if timings_path.is_file():
        timings = json.loads(timings_path.read_text(encoding="utf-8"))
        measured = {tuple(r[key] for key in ROW_ID): r for r in timings.pop("rows", [])}
        results["rows"] = [{**measured.get(tuple(r[key] for key in ROW_ID), {}), **r} for r in results["rows"]]
        results.update({key: v for key, v in timings.items() if key not in results})
    return results
