"""Compiled kernels of exact search whose results are stored: a fixed summation order, no fastmath.

Every sum runs over the columns in index order in float64, one row per loop iteration, so the
result is the same on any CPU, thread count and BLAS build (``NUMBA_CPU_NAME=generic`` included).
"""

from __future__ import annotations

import numpy as np
from numba import njit

EUCLIDEAN, ANGULAR, DOT, MANHATTAN = 0, 1, 2, 3
METRIC_CODES = {"euclidean": EUCLIDEAN, "angular": ANGULAR, "dot": DOT, "manhattan": MANHATTAN}


@njit(cache=True, nogil=True)
def normalize_rows(x, out):
    """Rows of x (n, d) float32 scaled to unit L2 norm into out (n, d) float32; zero rows stay zero.
    The norm is summed in float64 in column order."""
    n, d = x.shape
    for i in range(n):
        s = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            s += v * v
        if s > 0.0:
            inv = 1.0 / np.sqrt(s)
            for j in range(d):
                out[i, j] = np.float32(np.float64(x[i, j]) * inv)
        else:
            for j in range(d):
                out[i, j] = np.float32(0.0)


@njit(cache=True, nogil=True)
def distances_to(q, base, cand, metric):
    """float64 (m,) distances from q (d,) float32 to base[cand] (cand (m,) int64), in a fixed order.
    For angular, q and base rows must be unit (or zero) vectors."""
    m = cand.shape[0]
    d = q.shape[0]
    out = np.empty(m, dtype=np.float64)
    for r in range(m):
        row = cand[r]
        s = 0.0
        if metric == EUCLIDEAN:
            for j in range(d):
                t = np.float64(q[j]) - np.float64(base[row, j])
                s += t * t
            out[r] = np.sqrt(s)
        elif metric == MANHATTAN:
            for j in range(d):
                s += abs(np.float64(q[j]) - np.float64(base[row, j]))
            out[r] = s
        else:
            for j in range(d):
                s += np.float64(q[j]) * np.float64(base[row, j])
            if metric == DOT:
                out[r] = -s
            else:
                out[r] = np.sqrt(max(2.0 - 2.0 * s, 0.0))
    return out
