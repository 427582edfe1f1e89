"""Tests of the tree-forest index (pipeline/forest.py).

The golden indexes under tests/data/ are committed: golden_forest/ was written by format version 1
(grove 0.1, no split basis) and must keep loading with the same answers; golden_forest_v2/ is the
current format. Regenerate the current one only on purpose (a format change) with
``python tests/test_forest.py --write-golden`` and say so in the commit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, IndexFormatError, IndexMismatchError
from pipeline.exact import exact_neighbors, normalize_rows, pairwise_distances
from pipeline.forest import Forest

GOLDEN_V1 = Path(__file__).parent / "data" / "golden_forest"
GOLDEN = Path(__file__).parent / "data" / "golden_forest_v2"
METRICS = ("angular", "euclidean", "manhattan", "dot")


def exhaustive(forest: Forest, k: int) -> int:
    """A search_k that visits every leaf of every tree (the answer is then exact)."""
    return forest.n_items * forest.n_trees * 4 + k


def recall_at_k(found_dists: np.ndarray, true_dists: np.ndarray, k: int, eps: float = 1e-3) -> float:
    """ann-benchmarks' recall: share of returned items no farther than the true k-th + eps."""
    threshold = true_dists[:, k - 1 : k] + eps
    return float((found_dists[:, :k] <= threshold).sum() / (k * found_dists.shape[0]))


def true_distances(base, queries, ids, metric):
    b, q = (normalize_rows(base), normalize_rows(queries)) if metric == "angular" else (base, queries)
    return np.stack([pairwise_distances(q[i : i + 1], b[ids[i]], metric)[0] for i in range(len(ids))])


def seeded_data(n=2000, dim=12, seed=7):
    """Clustered gaussian rows with exact duplicates and all-zero rows, float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(20, dim))
    x = centers[rng.integers(0, 20, n)] + rng.normal(0, 1, size=(n, dim))
    if n >= 600:
        x[100:160] = x[10]  # 60 copies of one row: more than a leaf, forces random splits
        x[200:240] = x[rng.integers(300, n, 40)]  # scattered duplicates
        x[500:530] = 0.0  # all-zero rows
    else:
        x[1:4] = x[0]
        x[5] = 0.0
    return x.astype(np.float32)


# ------------------------------------------------------------------------------ exact order


HAND = {
    # metric: (points, query, expected order of all ids)
    "euclidean": ([[0, 0], [1, 0], [3, 0], [6, 0], [10, 0], [2, 2.5]], [2.1, 0], [2, 1, 0, 5, 3, 4]),
    # L1 and L2 disagree here: (2, 2) is nearer than (3, 0) in L2 but farther in L1
    "manhattan": ([[3, 0], [2, 2], [0, 2.5], [5, 5], [-0.5, 0]], [0, 0], [4, 2, 0, 1, 3]),
    # (2, 2) has the angle of (1, 1) (and normalises to the same floats): a tie broken by the
    # smaller id; the zero row has cos 0
    "angular": ([[1, 0], [1, 1], [0, 1], [-1, 0], [0, 0], [2, 2], [1, -0.2]], [2, 0.1], [0, 6, 1, 5, 2, 4, 3]),
    "dot": ([[1, 0], [2, 0], [0, 3], [-1, 0], [0, 0], [1, 1]], [1, 1], [2, 1, 5, 0, 4, 3]),
}


@pytest.mark.parametrize("metric", METRICS)
def test_hand_placed_points_exact_order(metric):
    points, query, expected = HAND[metric]
    x = np.array(points, dtype=np.float32)
    q = np.array(query, dtype=np.float32)
    forest = Forest.build(x, metric=metric, n_trees=3, leaf_size=2, seed=1)
    k = len(points)
    ids, dists = forest.query(q, k=k, search_k=exhaustive(forest, k), include_distances=True)
    assert ids.tolist() == expected
    assert ids.dtype == np.int64 and dists.dtype == np.float32
    truth_ids, truth_d = exact_neighbors(x, q[None], k, metric)
    assert truth_ids[0].tolist() == expected
    np.testing.assert_allclose(dists, truth_d[0], rtol=1e-5, atol=1e-5)


def test_distance_definitions_by_hand():
    x = np.array([[3, 4], [0, 0]], dtype=np.float32)
    q = np.array([0, 0], dtype=np.float32)
    f = Forest.build(x, metric="euclidean", n_trees=1, leaf_size=1)
    assert f.query(q, 2, include_distances=True)[1].tolist() == [0.0, 5.0]
    f = Forest.build(x, metric="manhattan", n_trees=1, leaf_size=1)
    assert f.query(q, 2, include_distances=True)[1].tolist() == [0.0, 7.0]
    f = Forest.build(x, metric="dot", n_trees=1, leaf_size=1)
    ids, d = f.query(np.array([1, 1], np.float32), 2, include_distances=True)
    assert ids.tolist() == [0, 1] and d.tolist() == [-7.0, 0.0]
    f = Forest.build(np.array([[1, 0], [0, 0], [-2, 0]], np.float32), metric="angular", n_trees=1, leaf_size=1)
    ids, d = f.query(np.array([5, 0], np.float32), 3, include_distances=True)
    assert ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(d, [0.0, np.sqrt(2.0), 2.0], atol=1e-6)


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("split_dim", [None, 5])
def test_same_seed_identical_arrays_for_1_and_2_threads(split_dim):
    x = seeded_data(1500)
    kw = dict(metric="euclidean", n_trees=6, leaf_size=16, split_dim=split_dim)
    a = Forest.build(x, seed=3, n_threads=1, **kw).arrays()
    b = Forest.build(x, seed=3, n_threads=2, **kw).arrays()
    c = Forest.build(x, seed=4, n_threads=2, **kw).arrays()
    assert a["split_basis"].shape[0] == (5 if split_dim else 0)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert a["leaf_items"].tobytes() != c["leaf_items"].tobytes()  # the seed matters


@pytest.mark.parametrize("metric", METRICS)
def test_build_does_not_modify_the_input(metric):
    x = seeded_data(300)
    before = x.copy()
    f = Forest.build(x, metric=metric, n_trees=2, leaf_size=8)
    assert np.array_equal(x, before) and x.flags.writeable
    assert not f.arrays()["vectors"].flags.writeable
    if metric in ("angular", "dot"):  # transformed copies: later changes to x do not reach the index
        x[:] = 0
        assert np.abs(f.arrays()["vectors"]).sum() > 0


# ------------------------------------------------------------------------------ quality


@pytest.mark.parametrize("split_dim", [None, 8])
@pytest.mark.parametrize("metric", METRICS)
def test_recall_against_exact_search(metric, split_dim):
    x = seeded_data(2000)
    rng = np.random.default_rng(11)
    queries = np.concatenate([x[rng.integers(0, len(x), 40)] + rng.normal(0, 0.3, (40, x.shape[1])), x[[10, 500]]])
    queries = queries.astype(np.float32)
    k = 10
    forest = Forest.build(x, metric=metric, n_trees=10, leaf_size=24, seed=5, split_dim=split_dim)
    ids, dists = forest.query_batch(queries, k=k, search_k=600, include_distances=True)
    _, true_d = exact_neighbors(x, queries, k, metric)
    found_d = true_distances(x, queries, ids, metric)
    np.testing.assert_allclose(dists, found_d, rtol=1e-4, atol=1e-4)
    assert recall_at_k(found_d, true_d, k) >= 0.9
    # every returned id is distinct and in range
    assert all(len(set(row)) == k for row in ids.tolist())
    assert ids.min() >= 0 and ids.max() < len(x)
    # more search, more recall: the exhaustive search is exact
    ids_all, d_all = forest.query_batch(queries, k=k, search_k=exhaustive(forest, k), include_distances=True)
    assert recall_at_k(true_distances(x, queries, ids_all, metric), true_d, k) == 1.0


@pytest.mark.parametrize("metric", METRICS)
def test_lower_bound_skips_never_change_the_answer(metric):
    """The item-code lower bound only skips candidates that cannot enter the top k: the same index
    with its codes removed (every candidate ranked) gives identical ids and distances."""
    x = seeded_data(1500, dim=40, seed=3)
    rng = np.random.default_rng(1)
    q = np.concatenate([x[rng.integers(0, len(x), 30)] + rng.normal(0, 0.5, (30, 40)), x[[10, 500]],
                        np.zeros((1, 40))]).astype(np.float32)
    forest = Forest.build(x, metric=metric, n_trees=6, leaf_size=20, seed=2, split_dim=6)
    arrays = forest.arrays()
    assert arrays["split_basis"].shape == (6, x.shape[1] + (metric == "dot"))
    assert arrays["item_codes"].shape == (len(x), 6)
    plain = dict(arrays, item_codes=np.zeros((0, 0), np.uint8), code_coefs=np.zeros((2, 0), np.float32))
    unbounded = Forest(plain, dim=40, metric=metric, n_trees=6, leaf_size=20, seed=2)
    for search_k in (50, 400, exhaustive(forest, 10)):
        a_ids, a_d = forest.query_batch(q, 10, search_k, include_distances=True)
        b_ids, b_d = unbounded.query_batch(q, 10, search_k, include_distances=True)
        assert a_ids.tolist() == b_ids.tolist() and a_d.tobytes() == b_d.tobytes()
    _, truth_d = exact_neighbors(x, q, 10, metric)
    found_d = true_distances(x, q, a_ids, metric)
    assert recall_at_k(found_d, truth_d, 10) == 1.0  # exhaustive search with bounds is exact


def test_default_split_space():
    from pipeline.forest import default_split_dim

    assert default_split_dim(20) == 20 and default_split_dim(50) == 32 and default_split_dim(784) == 64
    wide = Forest.build(seeded_data(400, dim=70), metric="angular", n_trees=2)
    assert wide.arrays()["split_basis"].shape == (32, 70)
    basis = np.asarray(wide.arrays()["split_basis"], np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(32), atol=1e-5)  # orthonormal rows
    narrow = Forest.build(seeded_data(400, dim=12), metric="angular", n_trees=2)
    assert narrow.arrays()["split_basis"].shape == (0, 12) and narrow.arrays()["planes"].shape[1] == 12
    with pytest.raises(ConfigError, match="split_dim"):
        Forest.build(seeded_data(50), split_dim=0)


def test_more_trees_or_search_k_do_not_lower_recall():
    x = seeded_data(3000, dim=24, seed=2)
    q = x[:60] + np.float32(0.5)
    _, true_d = exact_neighbors(x, q, 10, "euclidean")
    few = Forest.build(x, metric="euclidean", n_trees=2, leaf_size=32, seed=0)
    r_small = recall_at_k(true_distances(x, q, few.query_batch(q, 10, search_k=20), "euclidean"), true_d, 10)
    r_big = recall_at_k(true_distances(x, q, few.query_batch(q, 10, search_k=2000), "euclidean"), true_d, 10)
    assert r_big > r_small


# ------------------------------------------------------------------------------ query API


@pytest.mark.parametrize("split_dim", [None, 4])
@pytest.mark.parametrize("metric", METRICS)
def test_query_and_query_batch_identical(metric, split_dim):
    x = seeded_data(1200)
    forest = Forest.build(x, metric=metric, n_trees=5, leaf_size=20, seed=9, split_dim=split_dim)
    q = np.concatenate([x[:25] * 1.1, np.zeros((1, x.shape[1]), np.float32)])
    for n_threads in (1, 2, 0):
        bi, bd = forest.query_batch(q, k=7, search_k=150, n_threads=n_threads, include_distances=True)
        assert bi.shape == (len(q), 7) and bi.dtype == np.int64 and bd.dtype == np.float32
        for row in range(len(q)):
            oi, od = forest.query(q[row], k=7, search_k=150, include_distances=True)
            assert oi.tolist() == bi[row].tolist()
            assert od.tobytes() == bd[row].tobytes()
    assert forest.query_batch(q, k=7, search_k=150).tolist() == bi.tolist()


def test_concurrent_python_threads_get_the_same_answers():
    from concurrent.futures import ThreadPoolExecutor

    x = seeded_data(1500)
    forest = Forest.build(x, metric="euclidean", n_trees=5, leaf_size=16, seed=4)
    q = x[:200] + np.float32(0.2)
    expected = [forest.query(row, 10, 300).tolist() for row in q]
    with ThreadPoolExecutor(max_workers=4) as pool:  # query_one releases the GIL
        got = list(pool.map(lambda row: forest.query(row, 10, 300).tolist(), q))
    assert got == expected


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_query_item(metric):
    x = seeded_data(800)
    forest = Forest.build(x, metric=metric, n_trees=4, leaf_size=16, seed=1)
    i = 700  # not a duplicate
    ids = forest.query_item(i, k=5)
    assert ids.tolist() == forest.query(x[i], k=5).tolist()
    if metric == "euclidean":
        assert ids[0] == i
    ids_d, d = forest.query_item(i, k=5, include_distances=True)
    assert ids_d.tolist() == ids.tolist() and d.shape == (5,)
    with pytest.raises(ConfigError):
        forest.query_item(800)


def test_default_search_k_and_k_clipping():
    x = seeded_data(50)
    forest = Forest.build(x, metric="euclidean", n_trees=3, leaf_size=4)
    assert forest.query(x[0], k=100).shape == (50,)  # k is clipped to n_items
    assert sorted(forest.query(x[0], k=50).tolist()) == list(range(50))
    assert forest.query_batch(x[:3], k=100).shape == (3, 50)
    assert len(forest.query(x[0], k=5, search_k=0)) == 5  # always k answers when n >= k


def test_attributes_and_argument_errors():
    x = seeded_data(200, dim=6)
    forest = Forest.build(x, metric="manhattan", n_trees=3, leaf_size=None, seed=2)
    assert (forest.dim, forest.metric, forest.n_trees, forest.seed, forest.n_items) == (6, "manhattan", 3, 2, 200)
    assert forest.leaf_size >= 1
    with pytest.raises(AttributeError):
        forest.dim = 7
    with pytest.raises(IndexMismatchError):
        forest.query(np.zeros(5, np.float32))
    with pytest.raises(IndexMismatchError):
        forest.query_batch(np.zeros((2, 5), np.float32))
    for bad in [dict(metric="cosine"), dict(n_trees=0), dict(leaf_size=0), dict(seed=-1), dict(n_threads=-1)]:
        with pytest.raises(ConfigError):
            Forest.build(x, **bad)
    with pytest.raises(ConfigError):
        forest.query(x[0], k=0)
    with pytest.raises(ValueError):  # the typed errors are also ValueErrors
        Forest.build(x[:, :0])
    y = x.copy()
    y[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Forest.build(y)


# ------------------------------------------------------------------------------ files


@pytest.mark.parametrize("split_dim", [None, 4])
def test_save_load_round_trip(tmp_path, split_dim):
    x = seeded_data(900)
    forest = Forest.build(x, metric="angular", n_trees=5, leaf_size=16, seed=8, split_dim=split_dim)
    forest.save(tmp_path / "idx")
    header = json.loads((tmp_path / "idx" / "header.json").read_text())
    assert {"dim", "metric", "n_trees", "leaf_size", "seed", "n_items", "format_version", "grove_version"} <= header.keys()
    loaded = Forest.load(tmp_path / "idx", metric="angular", dim=12, verify=True)
    assert repr(loaded) == repr(forest)
    for name, a in forest.arrays().items():
        b = loaded.arrays()[name]
        assert isinstance(b, np.memmap), name  # memory-mapped, not copied
        assert a.tobytes() == np.asarray(b).tobytes(), name
    q = x[:30] + np.float32(0.1)
    assert loaded.query_batch(q, 10).tolist() == forest.query_batch(q, 10).tolist()
    assert loaded.query(q[0], 10).tolist() == forest.query(q[0], 10).tolist()


def make_golden(directory: Path) -> None:
    """Write the golden index and its expected answers (expected.json) into ``directory``."""
    rng = np.random.default_rng(20240601)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    x[7] = 0.0
    x[8] = x[9]
    q = rng.normal(size=(6, 5)).astype(np.float32)
    forest = Forest.build(x, metric="euclidean", n_trees=4, leaf_size=8, seed=42, split_dim=3)
    forest.save(directory)
    ids, dists = forest.query_batch(q, k=5, search_k=40, include_distances=True)
    expected = {"queries": q.tolist(), "k": 5, "search_k": 40, "ids": ids.tolist(), "dists": dists.tolist()}
    (directory / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


@pytest.mark.parametrize("golden", [GOLDEN_V1, GOLDEN], ids=["format-v1", "format-v2"])
def test_golden_index_keeps_its_answers(golden):
    expected = json.loads((golden / "expected.json").read_text())
    forest = Forest.load(golden, metric="euclidean", dim=5, verify=True)
    q = np.array(expected["queries"], dtype=np.float32)
    ids, dists = forest.query_batch(q, k=expected["k"], search_k=expected["search_k"], include_distances=True)
    assert ids.tolist() == expected["ids"]
    np.testing.assert_allclose(dists, np.array(expected["dists"]), rtol=1e-6)
    for row in range(len(q)):
        assert forest.query(q[row], expected["k"], expected["search_k"]).tolist() == expected["ids"][row]


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "idx"
    shutil.copytree(GOLDEN, directory)
    return directory


def test_truncated_array_raises(saved):
    path = saved / "leaf_items.npy"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(IndexFormatError, match="leaf_items.npy"):
        Forest.load(saved)


def test_corrupt_npy_header_raises(saved):
    path = saved / "vectors.npy"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # the .npy magic
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="vectors.npy"):
        Forest.load(saved)


def test_flipped_header_raises(saved):
    path = saved / "header.json"
    raw = bytearray(path.read_bytes())
    raw[0] = ord("]")
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="header.json"):
        Forest.load(saved)


def test_header_shape_disagreeing_with_file_raises(saved):
    header = json.loads((saved / "header.json").read_text())
    header["n_items"] += 1
    (saved / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="expected"):
        Forest.load(saved)


def test_replaced_array_of_wrong_shape_raises(saved):
    header = json.loads((saved / "header.json").read_text())
    children = np.load(saved / "children.npy")
    np.save(saved / "children.npy", children[:-1])
    header["arrays"]["children"]["shape"] = list(children[:-1].shape)
    (saved / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="children.npy"):
        Forest.load(saved)


def test_out_of_range_node_codes_raise(saved):
    children = np.load(saved / "children.npy")
    children[0, 0] = 10_000
    np.save(saved / "children.npy", children)
    with pytest.raises(IndexFormatError, match="children.npy"):
        Forest.load(saved)


def test_node_with_two_parents_raises(saved):
    children = np.load(saved / "children.npy")
    children[1, 0] = children[0, 0]  # the same subtree hung under two nodes (and one left orphaned)
    np.save(saved / "children.npy", children)
    with pytest.raises(IndexFormatError, match="do not form 4 trees"):
        Forest.load(saved)


def test_unknown_format_version_raises(saved):
    header = json.loads((saved / "header.json").read_text())
    header["format_version"] = 99
    (saved / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="format version 99"):
        Forest.load(saved)


def test_missing_file_raises(saved):
    (saved / "planes.npy").unlink()
    with pytest.raises(IndexFormatError, match="planes.npy"):
        Forest.load(saved)
    (saved / "header.json").unlink()
    with pytest.raises(IndexFormatError, match="header.json"):
        Forest.load(saved)


def test_flipped_data_byte_caught_by_verify(saved):
    path = saved / "vectors.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    Forest.load(saved)  # same size, plausible header: only the checksum can tell
    with pytest.raises(IndexFormatError, match="sha256"):
        Forest.load(saved, verify=True)


def test_mismatched_metric_or_dim_raises(saved):
    with pytest.raises(IndexMismatchError, match="'angular'"):
        Forest.load(saved, metric="angular")
    with pytest.raises(IndexMismatchError, match="dimension is 5, expected 6"):
        Forest.load(saved, dim=6)
    Forest.load(saved, metric="euclidean", dim=5)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-golden"]:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        make_golden(GOLDEN)
    else:
        sys.exit("usage: python tests/test_forest.py --write-golden")
