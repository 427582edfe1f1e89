"""numpy twins of the compiled kernels that one query runs: the same answers, bit for bit, without numba.

A command-line query (``grove query``) is a new process that answers one query. numba's import and
its type registries cost about 0.5 s of CPU before the first compiled kernel runs (loaded from the
cache, not compiled), while the query itself is a few milliseconds of work. The functions here
compute what ``_forest_kernels.query_one``, ``_exact_kernels.normalize_rows`` and
``_exact_kernels.distances_to`` compute, in the same order, with numpy's float32 and float64
element-wise operations (each one IEEE operation, as in the kernels: no fused multiply-add, no
BLAS for a result), so ids and distances are the same bits (tests/test_numpy_kernels.py compares
them on random data for every metric). They are slower per query (milliseconds instead of tenths of
one; linear in ``search_k``), so a long-running process uses the compiled kernels.

This module imports numpy only. It also holds the constants of the forest layout that
``pipeline.forest`` reads without loading the kernels; they are the same values as
``_forest_kernels``' own (a test checks), which keeps its source, and so numba's cache of every
kernel in it, unchanged.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

# Metric codes of the forest kernels, and the block width of their euclidean/manhattan sums.
ANGULAR, EUCLIDEAN, MANHATTAN, DOT = 0, 1, 2, 3
METRIC_CODES = {"angular": ANGULAR, "euclidean": EUCLIDEAN, "manhattan": MANHATTAN, "dot": DOT}
BLOCK = 64
LANES32 = 16  # float32 elements per lane group of a fixed-order sum (see _forest_kernels)

_F32 = np.float32
_LB_HALF = _F32(0.505)  # the query's lower bound: a little more than half a code step
_LB_MARGIN = _F32(1.0001)


# --- the forest kernels' fixed-order float32 sums ------------------------------------------------


def _vsum(v: np.ndarray) -> np.ndarray:
    """(r, 16) float32 -> (r,): the lanes added in the kernels' halving tree (lane i + lane i+8, ...)."""
    while v.shape[1] > 1:
        h = v.shape[1] // 2
        v = v[:, :h] + v[:, h:]
    return v[:, 0]


def lane_sum(terms: np.ndarray) -> np.ndarray:
    """Row sums of terms (r, n) float32, (r,) float32, in the order of ``_forest_kernels._dot_row``:
    group g of 16 elements goes to accumulator g mod 4, then (acc0 + acc1) + (acc2 + acc3), the lanes
    by ``vsum``, then the elements past the last whole group one by one."""
    r, n = terms.shape
    n1 = n - n % LANES32
    n4 = n - n % (4 * LANES32)
    acc = np.zeros((r, 4, LANES32), _F32)
    for j in range(0, n4, 4 * LANES32):
        acc += terms[:, j:j + 4 * LANES32].reshape(r, 4, LANES32)
    for g in range(3):
        if n1 > n4 + g * LANES32:
            acc[:, g] += terms[:, n4 + g * LANES32:n4 + (g + 1) * LANES32]
    s = _vsum((acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3]))
    for j in range(n1, n):
        s = s + terms[:, j]
    return s


def _lane_sum_one_accumulator(terms: np.ndarray) -> np.ndarray:
    """Row sums of terms (r, n) float32 in the order of ``_angular_sq_row``: every group of 16 into
    one accumulator, ``vsum``, then the tail one by one."""
    r, n = terms.shape
    n1 = n - n % LANES32
    acc = np.zeros((r, LANES32), _F32)
    for j in range(0, n1, LANES32):
        acc += terms[:, j:j + LANES32]
    s = _vsum(acc)
    for j in range(n1, n):
        s = s + terms[:, j]
    return s


def _ranking_distances(qbuf: np.ndarray, rows: np.ndarray, metric: int, block_order: np.ndarray,
                       q_zero: bool) -> np.ndarray:
    """``_forest_kernels._distance`` of qbuf (dv,) float32 to each of rows (m, dv) float32, summed in
    full (the kernel's early exit only ever rejects a row whose full sum is larger still): (m,) float32,
    squared for euclidean/angular, negated for dot."""
    if metric == EUCLIDEAN or metric == MANHATTAN:
        dv = qbuf.shape[0]
        total = np.zeros(rows.shape[0], _F32)
        for b in block_order.tolist():
            j0, j1 = b * BLOCK, min(b * BLOCK + BLOCK, dv)
            t = qbuf[j0:j1] - rows[:, j0:j1]
            total = total + lane_sum(t * t if metric == EUCLIDEAN else np.abs(t))
        return total
    if metric == ANGULAR:
        t = qbuf - rows
        s = _lane_sum_one_accumulator(t * t)
        xx = _lane_sum_one_accumulator(rows * rows)
        return np.where(q_zero | (xx < 0.5), _F32(2.0), s)  # an all-zero row (or query): cosine 0
    return -lane_sum(qbuf * rows)


def _lb_limit(bound: np.float32, metric: int) -> np.float32:
    if metric == MANHATTAN:
        bound = bound * bound  # |q - x|_1 >= |q - x|_2
    return bound * _LB_MARGIN


def _heap_push(pri: list, node: list, size: int, p: float, c: int) -> None:
    """``_forest_kernels._heap_push`` on Python lists (grown as needed)."""
    if size == len(pri):
        pri.append(0.0)
        node.append(0)
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if pri[parent] >= p:
            break
        pri[i] = pri[parent]
        node[i] = node[parent]
        i = parent
    pri[i] = p
    node[i] = c


def _heap_pop(pri: list, node: list, size: int) -> None:
    """``_forest_kernels._heap_pop``: remove the top; ``size`` is the count before the pop."""
    size -= 1
    p = pri[size]
    c = node[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        right = left + 1
        child = left
        if right < size and pri[right] > pri[left]:
            child = right
        if pri[child] <= p:
            break
        pri[i] = pri[child]
        node[i] = node[child]
        i = child
    pri[i] = p
    node[i] = c


def query_one(qraw, vectors, basis, item_codes, code_coefs, planes, coefs, children, roots, leaf_offsets,
              leaf_items, block_order, metric, k, search_k):
    """``_forest_kernels.query_one`` (the same arguments, without the scratch): (ids (found,) int64,
    dists (found,) float32), nearest first, the same bits.

    The walk is the kernel's, step by step (its heap, its margins in its summation order), so the
    same leaves are read in the same order; the candidates a leaf brings are screened by the same
    lower bound against the same current k-th distance, and ranked (in full, vectorised) one leaf
    later, as the kernel does.
    """
    n, dv = vectors.shape
    d_in = qraw.shape[0]
    qbuf = np.zeros(dv, _F32)
    qbuf[:d_in] = qraw
    q_zero = False
    if metric == ANGULAR:
        nrm = np.sqrt(lane_sum((qbuf * qbuf)[None, :])[0])  # _normalize_inplace: float32 throughout
        q_zero = bool(nrm <= 0)
        if nrm > 0:
            qbuf = qbuf / nrm
    n_basis = basis.shape[0]
    qsplit = lane_sum(qbuf[None, :] * np.asarray(basis)) if n_basis > 0 else None
    qw = qsplit if n_basis > 0 else qbuf
    use_lb = n_basis > 0 and item_codes.shape[0] == n and n > 0 and metric != DOT
    if use_lb:
        n_code = item_codes.shape[1]
        code_scale = np.asarray(code_coefs[0], _F32)
        lb_q = qsplit[:n_code] - np.asarray(code_coefs[1], _F32)
        lb_half = _LB_HALF * code_scale

    pri: list = []
    node: list = []
    hsize = 0
    inf = math.inf
    for root in np.asarray(roots).tolist():
        _heap_push(pri, node, hsize, inf, root)
        hsize += 1
    visited: set = set()
    todo: list = []  # item ids whose rows are to be ranked, in the kernel's order
    todo_lb: list = []
    n_cand = 0
    ranked = 0
    seen = 0
    best: list = []  # the k best so far: a heap of (-distance, -id), so best[0] is the k-th
    bound = _F32(np.inf)

    def rank(a: int, b: int) -> None:
        """``_forest_kernels._rank`` of todo[a:b] into ``best``."""
        nonlocal bound
        if a >= b:
            return
        items = np.array(todo[a:b], dtype=np.int64)
        dists = _ranking_distances(qbuf, np.asarray(vectors[items], _F32), metric, block_order, q_zero)
        for item, dist, lb in zip(items.tolist(), dists.tolist(), todo_lb[a:b]):
            full = len(best) == k
            if use_lb and full and lb > _lb_limit(bound, metric):
                continue
            if full and dist > bound:
                continue
            if not full:
                heapq.heappush(best, (-dist, -item))
            elif dist < -best[0][0] or (dist == -best[0][0] and item < -best[0][1]):
                heapq.heapreplace(best, (-dist, -item))
            if len(best) == k:
                bound = _F32(-best[0][0])

    while hsize > 0 and (seen < search_k or n_cand < k):
        p = pri[0]
        c = node[0]
        _heap_pop(pri, node, hsize)
        hsize -= 1
        while c >= 0:
            c0, c1 = (int(x) for x in children[c])
            m = float(coefs[c, 0] * lane_sum(qw[None, :] * planes[c])[0] + coefs[c, 1])
            near, far = (c1, c0) if m > 0 else (c0, c1)
            am = abs(m)
            _heap_push(pri, node, hsize, p if p < -am else -am, far)
            hsize += 1
            if am < p:
                p = am
            if pri[0] > p:
                _heap_push(pri, node, hsize, p, near)
                hsize += 1
                break
            c = near
        if c >= 0:
            continue
        leaf = -c - 1
        a, b = int(leaf_offsets[leaf]), int(leaf_offsets[leaf + 1])
        seen += b - a
        new = []
        for item in np.asarray(leaf_items[a:b]).tolist():
            if item < 0 or item >= n or item in visited:
                continue
            visited.add(item)
            new.append(item)
        n_cand += len(new)
        before = len(todo)
        if new:
            if use_lb:
                t = np.abs(lb_q - np.asarray(item_codes[np.array(new, np.int64)], _F32) * code_scale) - lb_half
                t = np.where(t > 0, t, _F32(0.0))
                lbs = lane_sum(t * t).tolist()
                limit = _lb_limit(bound, metric)
                full = len(best) == k
                for item, lb in zip(new, lbs):
                    if full and lb > limit:
                        continue  # farther than the current k-th best: its row is never read
                    todo.append(item)
                    todo_lb.append(lb)
            else:
                todo.extend(new)
                todo_lb.extend([0.0] * len(new))
        rank(ranked, before)
        ranked = before
    rank(ranked, len(todo))

    order = sorted((-d, -i) for d, i in best)  # (distance, id), nearest first
    ids = np.array([i for _, i in order], dtype=np.int64)
    dists = np.array([d for d, _ in order], dtype=_F32)
    if metric == EUCLIDEAN or metric == ANGULAR:
        dists = np.sqrt(dists)
    return ids, dists


# --- the exact kernels' fixed-order float64 sums -------------------------------------------------


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """``pipeline.exact.normalize_rows`` (its kernel ``_exact_kernels.normalize_rows``): rows of x (n, d)
    scaled to unit L2 norm, all-zero rows left zero; the norm summed in float64 in column order.
    (n, d) float32, the same bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for start in range(0, flat.shape[0], 65536):
        rows = flat[start:start + 65536].astype(np.float64)
        s = np.zeros(rows.shape[0], np.float64)
        for j in range(rows.shape[1]):
            s += rows[:, j] * rows[:, j]
        nonzero = s > 0.0
        inv = np.zeros_like(s)
        inv[nonzero] = 1.0 / np.sqrt(s[nonzero])
        out[start:start + 65536] = (rows * inv[:, None]).astype(np.float32)
    return out.reshape(x.shape)


def distances_to(q: np.ndarray, base: np.ndarray, cand: np.ndarray, metric: str) -> np.ndarray:
    """``pipeline.exact.rerank`` (its kernel ``_exact_kernels.distances_to``): float64 (m,) distances
    from q (d,) float32 to base[cand] (cand (m,) int64), each summed over the columns in order.
    For angular, q and the rows must be unit (or zero) vectors."""
    qd = np.asarray(q, dtype=np.float32).astype(np.float64)
    rows = np.asarray(base[np.asarray(cand, dtype=np.int64)], dtype=np.float32).astype(np.float64)
    s = np.zeros(rows.shape[0], np.float64)
    if metric == "euclidean":
        for j in range(qd.shape[0]):
            t = qd[j] - rows[:, j]
            s += t * t
        return np.sqrt(s)
    if metric == "manhattan":
        for j in range(qd.shape[0]):
            s += np.abs(qd[j] - rows[:, j])
        return s
    for j in range(qd.shape[0]):
        s += qd[j] * rows[:, j]
    if metric == "dot":
        return -s
    return np.sqrt(np.maximum(2.0 - 2.0 * s, 0.0))


def exact_neighbors_one(base: np.ndarray, q: np.ndarray, k: int, metric: str,
                        base_normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``pipeline.exact.exact_neighbors`` of one query q (d,) float32 over base (n, d) float32:
    (ids (k,) int64, dists (k,) float32), nearest first, ties by the smaller id.

    The same method (a float32 shortlist of k + 16 rows, re-ranked by the fixed-order float64 sums
    of ``distances_to``), shaped for one query in a fresh process: the shortlist scores come from one
    matrix-vector product and a row norm per row (no temporary of the base's size), and for an
    angular base that is not stored unit-length only the shortlisted rows are normalised (row by row,
    the same bits as normalising the whole base). The answer is the base's true k nearest, as
    there, whenever the k-th distance is not tied with more than 16 other rows.
    """
    from .exact import _SHORTLIST_MARGIN, check_metric

    check_metric(metric)
    base = np.asarray(base)
    n = base.shape[0]
    k = min(int(k), n)
    q = np.asarray(q, dtype=np.float32)
    if metric == "angular":
        q = normalize_rows(q[None, :])[0]
    m = min(k + _SHORTLIST_MARGIN, n)
    scores = np.empty(n, _F32)
    for start in range(0, n, 65536):  # bounded temporaries for manhattan; one pass over the rows
        b = np.asarray(base[start:start + 65536], dtype=np.float32)
        if metric == "manhattan":
            scores[start:start + b.shape[0]] = np.abs(b - q).sum(axis=1)
            continue
        dots = b @ q
        if metric == "euclidean":
            scores[start:start + b.shape[0]] = np.einsum("ij,ij->i", b, b) - 2.0 * dots
        elif metric == "angular" and not base_normalized:
            norms = np.sqrt(np.einsum("ij,ij->i", b, b))
            scores[start:start + b.shape[0]] = -np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
        else:
            scores[start:start + b.shape[0]] = -dots
    cand = np.argpartition(scores, m - 1)[:m].astype(np.int64)
    if metric == "angular" and not base_normalized:
        d = distances_to(q, normalize_rows(np.asarray(base[cand], dtype=np.float32)), np.arange(m), metric)
    else:
        d = distances_to(q, base, cand, metric)
    order = np.lexsort((cand, d))[:k]
    return cand[order], d[order].astype(np.float32)
