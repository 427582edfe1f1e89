"""The numpy twins of the compiled kernels (pipeline/_numpy_kernels.py), which answer `grove query`'s
one query without numba: the same ids and the same distance bits as the compiled kernels, on seeded
data with duplicates and all-zero rows, for every metric, with and without a split basis."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import _forest_kernels, _numpy_kernels
from pipeline.exact import exact_neighbors, normalize_rows, rerank
from pipeline.forest import Forest

METRICS = ("angular", "euclidean", "manhattan", "dot")


def seeded_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 with an all-zero row and groups of duplicates."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) * 3
    x[5] = 0.0
    x[8:11] = x[7]
    x[20:24] = x[40]
    return x


def queries_for(x: np.ndarray, seed: int) -> np.ndarray:
    """Random queries, indexed rows (distance 0, a duplicate's twins) and the all-zero query."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal((12, x.shape[1])).astype(np.float32), x[[0, 5, 7, 20, 41]],
                           np.zeros((1, x.shape[1]), np.float32)])


def test_the_layout_constants_are_the_kernels():
    for name in ("ANGULAR", "EUCLIDEAN", "MANHATTAN", "DOT", "METRIC_CODES", "BLOCK", "LANES32"):
        assert getattr(_numpy_kernels, name) == getattr(_forest_kernels, name), name


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [20, 50, 150])  # no split basis (<= 32 columns), a basis of 32, of 64
def test_forest_query_is_the_compiled_kernels_bit_for_bit(metric, dim):
    x = seeded_rows(700, dim, seed=dim)
    forest = Forest.build(x, metric=metric, n_trees=5, leaf_size=12, seed=3)
    assert forest.arrays()["split_basis"].shape[0] == (0 if dim <= 32 else 32 if dim <= 128 else 64)
    compared = 0
    for q in queries_for(x, seed=dim + 1):
        for k, search_k in ((10, None), (1, 0), (3, 40), (30, 700), (2000, None)):
            ids, dists = forest.query(q, k=k, search_k=search_k, include_distances=True)
            twin_ids, twin_dists = forest.query(q, k=k, search_k=search_k, include_distances=True, compiled=False)
            assert twin_ids.dtype == np.int64 and twin_dists.dtype == np.float32
            np.testing.assert_array_equal(twin_ids, ids)
            assert twin_dists.tobytes() == dists.tobytes()  # the same bits, not only close
            compared += len(ids)
    assert compared > 16 * 5 * 10


@pytest.mark.parametrize("metric", METRICS)
def test_exact_search_of_one_query_is_exact_neighbors(metric):
    x = seeded_rows(3000, 40, seed=11)
    bases = [(x, False)] + ([(normalize_rows(x), True)] if metric == "angular" else [])
    for base, normalized in bases:
        for q in queries_for(x, seed=12):
            for k in (1, 10, 25):
                ids, dists = exact_neighbors(base, q[None, :], k, metric, base_normalized=normalized)
                twin_ids, twin_dists = _numpy_kernels.exact_neighbors_one(base, q, k, metric,
                                                                          base_normalized=normalized)
                np.testing.assert_array_equal(twin_ids, ids[0])
                assert twin_dists.tobytes() == dists[0].tobytes()


@pytest.mark.parametrize("metric", METRICS)
def test_rerank_and_normalize_rows_are_the_exact_kernels_bit_for_bit(metric):
    x = seeded_rows(500, 300, seed=5)
    unit = normalize_rows(x)
    assert _numpy_kernels.normalize_rows(x).tobytes() == unit.tobytes()
    assert _numpy_kernels.normalize_rows(x[3]).tobytes() == normalize_rows(x[3]).tobytes()  # one row, (d,)
    base = unit if metric == "angular" else x
    cand = np.random.default_rng(6).integers(0, len(x), 64)
    for q in queries_for(base, seed=7)[[0, 1, 13, 14, -1]]:
        assert _numpy_kernels.distances_to(q, base, cand, metric).tobytes() == rerank(q, base, cand, metric).tobytes()
