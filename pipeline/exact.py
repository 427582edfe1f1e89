"""Exact (brute-force) k-nearest-neighbour search: the ground truth and the baseline.

Distances, smaller is nearer, shared with the forest index:

- ``euclidean``: ``||q - x||``
- ``manhattan``: ``sum |q - x|``
- ``angular``: ``sqrt(2 - 2 cos(q, x))``, the Euclidean distance of the normalised vectors
  (Annoy's definition); an all-zero vector has cosine 0 with everything, so distance ``sqrt(2)``.
- ``dot``: ``-<q, x>`` (maximum inner product search; negated so that smaller is nearer).

Ties are broken by the smaller item id, so the answer is fully determined by the data.

Memory stays bounded: queries are processed ``query_block`` at a time against ``base_block`` rows of
the base at a time, keeping a running shortlist per query. The shortlist is chosen with float32
matrix products (BLAS: fast, and only a choice of candidates) and then re-ranked in float64 by a
compiled kernel that sums in a fixed order, so the stored distances and their order are the same
bytes on any CPU, thread count and BLAS build.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .errors import IndexMismatchError

log = logging.getLogger(__name__)

METRICS = ("angular", "euclidean", "dot", "manhattan")

# Extra shortlist entries kept beyond k so that float32 rounding at the boundary cannot evict
# a true neighbour before the float64 re-rank.
_SHORTLIST_MARGIN = 16


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise IndexMismatchError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
    return metric


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero. (n, d) float32 -> (n, d) float32.
    The same bytes on every machine (a fixed-order float64 sum; see ``_exact_kernels``)."""
    from . import _exact_kernels

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _exact_kernels.normalize_rows(x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x,
                                  out.reshape(-1, x.shape[-1]) if x.ndim != 2 else out)
    return out


def unit_rows(x: np.ndarray, tol: float = 1e-4, block: int = 65536) -> bool:
    """Whether every row of ``x`` (n, d) has unit L2 norm within ``tol`` (all-zero rows allowed), read
    block by block: a memory-mapped array is checked without a copy of it."""
    for start in range(0, x.shape[0], block):
        b = np.asarray(x[start : start + block], dtype=np.float32)
        sq = np.einsum("ij,ij->i", b, b, dtype=np.float64)
        if not np.all((np.abs(sq - 1.0) <= tol) | (sq == 0.0)):
            return False
    return True


def rerank(query: np.ndarray, base: np.ndarray, cand: np.ndarray, metric: str) -> np.ndarray:
    """float64 (m,) distances from ``query`` (d,) to ``base[cand]``, summed in a fixed order.
    For angular, both must already be normalised (see ``normalize_rows``)."""
    from . import _exact_kernels

    return _exact_kernels.distances_to(np.ascontiguousarray(query, dtype=np.float32), base,
                                       np.ascontiguousarray(cand, dtype=np.int64),
                                       _exact_kernels.METRIC_CODES[metric])


def pairwise_distances(queries: np.ndarray, base: np.ndarray, metric: str) -> np.ndarray:
    """Distances between every query and every base row, float64 (nq, nb), through BLAS: for speed
    only, never for a stored result (``rerank`` is the reproducible form).

    For angular, both inputs must already be normalised (see ``normalize_rows``).
    """
    q = np.asarray(queries, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if metric == "manhattan":
        return np.abs(q[:, None, :] - b[None, :, :]).sum(axis=2)
    dots = q @ b.T
    if metric == "dot":
        return -dots
    if metric == "angular":
        return np.sqrt(np.maximum(2.0 - 2.0 * dots, 0.0))
    sq = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * dots
    return np.sqrt(np.maximum(sq, 0.0))


def _approx_block(q: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None, metric: str) -> np.ndarray:
    """float32 scores used only to choose the shortlist (monotone in the true distance)."""
    if metric == "manhattan":
        out = np.empty((q.shape[0], b.shape[0]), dtype=np.float32)
        for i in range(q.shape[0]):
            out[i] = np.abs(b - q[i]).sum(axis=1)
        return out
    dots = q @ b.T
    if metric in ("dot", "angular"):
        return -dots
    return b_sq[None, :] - 2.0 * dots  # ||q||^2 is constant per row


def exact_neighbors(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str = "euclidean",
    query_block: int = 512,
    base_block: int = 65536,
    progress: Callable[[int, int], None] | None = None,
    base_normalized: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The true ``k`` nearest base rows of each query.

    base: (n, d) float32; queries: (nq, d) float32. Returns ``(ids, dists)``: ids int64 (nq, k),
    dists float32 (nq, k), nearest first. ``k`` larger than n is clipped to n.
    ``progress(done_queries, total_queries)`` is called after each query block.
    ``base_normalized=True`` promises that an angular base already has unit rows (or zero rows), which
    saves normalising a copy of it on every call (many single queries against one base).
    """
    check_metric(metric)
    base = np.asarray(base, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if base.ndim != 2 or queries.ndim != 2 or base.shape[1] != queries.shape[1]:
        raise IndexMismatchError(
            f"exact search needs 2-d arrays of one dimension; got base {base.shape} and queries {queries.shape}"
        )
    n, nq = base.shape[0], queries.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be at least 1 and the base non-empty; got k={k}, n={n}")
    if metric == "angular":
        base = base if base_normalized else normalize_rows(base)
        queries = normalize_rows(queries)
    m = min(k + _SHORTLIST_MARGIN, n)
    ids_out = np.empty((nq, k), dtype=np.int64)
    dists_out = np.empty((nq, k), dtype=np.float32)
    for q0 in range(0, nq, query_block):
        q = queries[q0 : q0 + query_block]
        best_ids = np.empty((q.shape[0], 0), dtype=np.int64)
        best_scores = np.empty((q.shape[0], 0), dtype=np.float32)
        for b0 in range(0, n, base_block):
            b = base[b0 : b0 + base_block]
            b_sq = (b * b).sum(1) if metric == "euclidean" else None
            scores = _approx_block(q, b, b_sq, metric)
            take = min(m, b.shape[0])
            part = np.argpartition(scores, take - 1, axis=1)[:, :take]
            cand_ids = np.concatenate([best_ids, part + b0], axis=1)
            cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
            keep = np.argpartition(cand_scores, min(m, cand_ids.shape[1]) - 1, axis=1)[:, :m]
            best_ids = np.take_along_axis(cand_ids, keep, 1)
            best_scores = np.take_along_axis(cand_scores, keep, 1)
        for row in range(q.shape[0]):
            cand = best_ids[row]
            d = rerank(q[row], base, cand, metric)
            order = np.lexsort((cand, d))[:k]
            ids_out[q0 + row] = cand[order]
            dists_out[q0 + row] = d[order]
        if progress is not None:
            progress(min(q0 + query_block, nq), nq)
    return ids_out, dists_out
