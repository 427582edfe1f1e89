import numpy as np
import pytest

from pipeline.errors import IndexMismatchError
from pipeline.exact import METRICS, exact_neighbors, normalize_rows, pairwise_distances


def _reference(base, queries, k, metric):
    if metric == "angular":
        base, queries = normalize_rows(base), normalize_rows(queries)
    d = pairwise_distances(queries, base, metric)
    ids = np.array([np.lexsort((np.arange(len(base)), row))[:k] for row in d])
    return ids, np.take_along_axis(d, ids, 1)


@pytest.mark.parametrize("metric", METRICS)
def test_blocked_search_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1000, 12)).astype(np.float32)
    base[10] = 0.0  # an all-zero row
    base[20] = base[21]  # a duplicate: ties must come out by id
    queries = rng.normal(size=(37, 12)).astype(np.float32)
    queries[3] = base[20]
    ids, dists = exact_neighbors(base, queries, 15, metric, query_block=8, base_block=130)
    ref_ids, ref_dists = _reference(base, queries, 15, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-5, atol=1e-5)
    assert ids.dtype == np.int64 and dists.dtype == np.float32


def test_hand_placed_points():
    base = np.array([[0, 0], [1, 0], [3, 0], [0, 2], [-1, -1]], dtype=np.float32)
    ids, dists = exact_neighbors(base, np.array([[1.0, 0.2]], dtype=np.float32), 5, "euclidean")
    assert ids[0].tolist() == [1, 0, 2, 3, 4]
    ids, _ = exact_neighbors(base, np.array([[1, 0]], dtype=np.float32), 5, "angular")
    # (1,0) and (3,0) are at angle 0; ties by id; the zero vector is at sqrt(2) like (0,2)
    assert ids[0].tolist() == [1, 2, 0, 3, 4]
    ids, dists = exact_neighbors(base, np.array([[1, 1]], dtype=np.float32), 2, "dot")
    assert ids[0].tolist() == [2, 3] and dists[0].tolist() == [-3.0, -2.0]


def test_k_larger_than_base_is_clipped():
    base = np.eye(3, dtype=np.float32)
    ids, _ = exact_neighbors(base, base, 10, "euclidean")
    assert ids.shape == (3, 3) and ids[:, 0].tolist() == [0, 1, 2]


def test_mismatched_dimensions_and_metric():
    with pytest.raises(IndexMismatchError, match="one dimension"):
        exact_neighbors(np.zeros((3, 4), np.float32), np.zeros((1, 5), np.float32), 1)
    with pytest.raises(IndexMismatchError, match="unknown metric 'cosine'"):
        exact_neighbors(np.zeros((3, 4), np.float32), np.zeros((1, 4), np.float32), 1, "cosine")


_REPRO_SCRIPT = """
import hashlib, sys
import numpy as np
from pipeline.exact import exact_neighbors, normalize_rows
rng = np.random.default_rng(7)
base = rng.normal(size=(3000, 200)).astype(np.float32)
base[:50] = base[50:100]  # duplicates: ties broken by id
base[100:110] = 0.0       # zero rows
queries = rng.normal(size=(64, 200)).astype(np.float32)
digest = hashlib.sha256()
for metric in ("euclidean", "angular", "dot", "manhattan"):
    ids, dists = exact_neighbors(base, queries, 25, metric, query_block=16, base_block=1000)
    digest.update(ids.tobytes()); digest.update(dists.tobytes())
digest.update(normalize_rows(base).tobytes())
print(digest.hexdigest())
"""


def test_stored_results_do_not_depend_on_blas_or_cpu(tmp_path):
    """Ground truth is stored: the same bytes with OpenBLAS on 1 or 2 threads, another OpenBLAS
    kernel (Prescott: its float64 products differ in the last bits from this machine's SkylakeX kernel,
    which changed the old BLAS re-rank's distances), and numba compiling for a generic CPU."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    def run(**env):
        full = {**os.environ, "PYTHONPATH": str(REPO), **env}
        out = subprocess.run([sys.executable, "-c", _REPRO_SCRIPT], env=full, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first = run(OPENBLAS_NUM_THREADS="1")
    second = run(OPENBLAS_NUM_THREADS="2", OPENBLAS_CORETYPE="Prescott", NUMBA_CPU_NAME="generic",
                 NUMBA_CACHE_DIR=str(tmp_path / "numba-generic"))
    assert first == second


def test_unit_rows_reads_in_blocks_and_allows_zero_rows():
    from pipeline.exact import normalize_rows, unit_rows

    rng = np.random.default_rng(4)
    unit = normalize_rows(rng.normal(size=(1000, 12)).astype(np.float32))
    unit[5] = 0.0
    assert unit_rows(unit, block=64)
    off = unit.copy()
    off[999] *= 1.01  # the last block's last row
    assert not unit_rows(off, block=64)
    assert not unit_rows(rng.normal(size=(10, 12)).astype(np.float32))
