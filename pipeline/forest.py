"""The tree-forest nearest-neighbour index (Annoy's algorithm family, compiled with numba).

Each tree splits space recursively by a hyperplane between two centroids found by two-means on
sampled items (through the origin for ``angular``/``dot``, a bisecting plane with an offset for
``euclidean``/``manhattan``), retrying lopsided splits and falling back to a random split; a leaf
holds at most ``leaf_size`` items. For wide vectors the planes live in a low-dimensional split
space (the top principal directions of the rows), so a plane costs ``split_dim`` bytes, and each item
keeps one byte per split dimension that bounds its distance from below. A query walks all trees
with ONE priority queue ordered by the smallest margin on the path until ``search_k`` leaf entries
have been seen, skips duplicates with a stamp array, skips candidates whose lower bound is already
past the current k-th distance, and ranks the rest by exact distance (ties by the smaller item id). Distances are
those of ``pipeline.exact``: euclidean ``||q-x||``, manhattan ``sum|q-x|``, angular
``sqrt(2 - 2 cos)``, dot ``-<q, x>``.

    forest = Forest.build(vectors, metric="angular", n_trees=50)
    ids = forest.query(vector, k=10)
    forest.save(directory); forest = Forest.load(directory)   # memory-mapped

On disk an index is a directory of flat ``.npy`` arrays and ``header.json``; see ``Forest.save``.
The kernels are in ``pipeline/_forest_kernels.py``. Everything stored, and everything that decides
a split or an answer, is computed there in a fixed order (no BLAS, no ``fastmath``): the same
vectors, parameters and seed give the same bytes on any CPU, BLAS and thread count.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from . import _numpy_kernels
from .errors import ConfigError, FormatError, IndexFormatError, IndexMismatchError
from .exact import METRICS
from .paths import file_sha256

log = logging.getLogger(__name__)


class _Kernels:
    """``pipeline._forest_kernels``, imported on first use: importing numba and loading its type
    registries costs about 0.5 s of CPU, which a process that only opens an index and answers one
    query with the numpy twins (``Forest.query(..., compiled=False)``) does not pay."""

    def __getattr__(self, name: str):
        from . import _forest_kernels

        value = getattr(_forest_kernels, name)
        setattr(self, name, value)  # later lookups are plain attribute reads
        return value


_k = _Kernels()

FORMAT_NAME = "grove-forest"
FORMAT_VERSION = 2
# Versions Forest.load reads. Version 1 (grove 0.1) had no split basis: its planes span every
# column, and it is read with an empty basis and no item codes.
READ_VERSIONS = (1, 2)
HEADER_FILE = "header.json"
# Distinguishes the split basis's random stream from the trees' (both derive from ``seed``).
_BASIS_STREAM = 0xB5
# (name, dtype) of every array file, in the order the kernels take them.
_ARRAYS = (
    ("vectors", "<f4"),
    ("split_basis", "<f4"),
    ("item_codes", "|u1"),
    ("code_coefs", "<f4"),
    ("planes", "|i1"),
    ("plane_coefs", "<f4"),
    ("children", "<i4"),
    ("roots", "<i4"),
    ("leaf_offsets", "<i8"),
    ("leaf_items", "<i4"),
    ("block_order", "<i4"),
)


def default_leaf_size(dim: int) -> int:
    """The leaf size used when ``leaf_size=None``: 192 up to 128 dimensions, 96 above.

    Measured (benchmarks/RESULTS.md, leaf sweep and development runs against Annoy in one process):
    on GloVe-50 192 was a little faster than 96 at recall 0.90/0.95; on MNIST-784 48, 64 and 96
    gave the same QPS within noise at 10-100 trees, and 96 keeps the index smallest.
    """
    return 192 if dim <= 128 else 96


def default_split_dim(dv: int) -> int:
    """Columns of the split space when ``split_dim=None``: none (the planes use every column) up to
    32 dimensions, 32 up to 128, else 64.

    The item codes the query's lower bound reads are one byte per split dimension, so 32 and 64
    keep each item's codes within one cache line. Measured on GloVe-50 (10 trees, recall ~0.90):
    32 was about 3x faster than the full 50 columns, 24/40/48 were slower than 32; on MNIST-784 64
    gave higher recall per search_k than 32 or 48 at the same speed.
    """
    if dv <= 32:
        return dv
    return 32 if dv <= 128 else 64


def resolved_build_params(dim: int, metric: str, leaf_size: int | None = None,
                          split_dim: int | None = None) -> dict[str, int]:
    """The leaf size and split dimension ``Forest.build`` uses for vectors of width ``dim``:
    ``{"leaf_size": int, "split_dim": int}``, defaults filled in; split_dim is the number of
    columns of the split space, 0 when the planes use every column. Artifact digests hash these
    (``pipeline.stages.stage_params``), so a default written out and left implicit name one index.
    """
    dv = dim + 1 if metric == "dot" else dim
    leaf = default_leaf_size(dim) if leaf_size is None else int(leaf_size)
    split = default_split_dim(dv) if split_dim is None else int(split_dim)
    return {"leaf_size": leaf, "split_dim": 0 if split >= dv else split}


def _split_basis(data: np.ndarray, split_dim: int, seed: int) -> np.ndarray | None:
    """(P, dv) float32 orthonormal rows: the top principal directions (about the origin) of a
    seeded sample of at most ``_k.BASIS_SAMPLE_ROWS`` rows of data (n, dv) float32; None when the
    planes use every column (split_dim >= dv).

    Every step is a fixed-order kernel (no BLAS, no LAPACK): the float64 second-moment matrix of
    the sample, then its leading eigenvectors by Jacobi (narrow) or orthogonal iteration with
    Rayleigh-Ritz (wide), so the basis is the same bits on every machine and thread count.
    """
    n, dv = data.shape
    if split_dim >= dv:
        return None
    sample_seed, start_seed = np.random.SeedSequence([int(seed), _BASIS_STREAM]).generate_state(2, np.uint64)
    rows = _k.sample_rows(n, _k.BASIS_SAMPLE_ROWS, sample_seed)
    directions = _k.top_directions(_k.second_moments(data, rows), int(split_dim), start_seed)
    return np.ascontiguousarray(directions, dtype=np.float32)


def _no_split(dv: int) -> dict:
    """The split arrays of an index whose planes use every column: an empty basis and no item codes
    (what version 1 indexes are read with)."""
    return {"split_basis": np.zeros((0, dv), np.float32), "item_codes": np.zeros((0, 0), np.uint8),
            "code_coefs": np.zeros((2, 0), np.float32)}


def _all_cores() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _thread_count(n_threads: int, what: str) -> int:
    if not isinstance(n_threads, (int, np.integer)) or n_threads < 0:
        raise ConfigError(f"{what}: n_threads must be an integer >= 0 (0 = all cores); got {n_threads!r}")
    return _all_cores() if n_threads == 0 else min(int(n_threads), _all_cores())



def _by_row_blocks(kernel: Callable[[int, int], None], n: int, threads: int) -> None:
    """kernel(start, stop) over row blocks that tile range(n), on ``threads`` threads (the kernels
    release the GIL and compute each row the same way whichever block it is in)."""
    if threads == 1 or n < 4096:
        kernel(0, n)
        return
    bounds = np.linspace(0, n, 4 * threads + 1).astype(np.int64)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(kernel, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
            future.result()


def _project(data: np.ndarray, basis: np.ndarray, threads: int) -> np.ndarray:
    """The rows of data (n, dv) float32 in the split basis (P, dv) float32: (n, P) float32,
    C-contiguous (fixed order; see ``_k.project_rows``)."""
    n, dv = data.shape
    p = basis.shape[0]
    pp = -(-p // _k.LANES32) * _k.LANES32
    bt = np.zeros((dv, pp), np.float32)
    bt[:, :p] = basis.T
    out = np.empty((n, pp), np.float32)
    _by_row_blocks(lambda a, b: _k.project_rows(data, bt, out, a, b), n, threads)
    return out if pp == p else np.ascontiguousarray(out[:, :p])


def _build_trees(one: Callable[[int], tuple], n_trees: int, threads: int,
                 progress: Callable[[int, int], None] | None) -> list:
    """[one(0), ..., one(n_trees - 1)], on ``threads`` threads; ``progress(done, n_trees)`` is
    called from this thread as each tree finishes."""
    if threads == 1:
        trees = []
        for t in range(n_trees):
            trees.append(one(t))
            if progress is not None:
                progress(t + 1, n_trees)
        return trees
    trees = [None] * n_trees
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(one, t): t for t in range(n_trees)}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                trees[futures[future]] = future.result()
                if progress is not None:
                    progress(done, n_trees)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return trees


def _prepare_vectors(x: np.ndarray, metric: str, threads: int = 1) -> np.ndarray:
    """The rows as the kernels read them (see _forest_kernels), made from x (n, d) float32,
    C-contiguous, which may be modified: (n, dv) float32, C-contiguous. Norms are fixed-order
    kernel sums (numpy's einsum picks its SIMD loop by CPU)."""
    if metric == "angular":
        _by_row_blocks(lambda a, b: _k.normalize_rows(x, a, b), x.shape[0], threads)
        return x
    if metric == "dot":
        sq = _k.squared_norms64(x)
        extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.concatenate([x, extra[:, None]], axis=1))
    return x


def _block_order(data: np.ndarray, metric: str) -> np.ndarray:
    """(ceil(dv / 64),) int32: blocks of dimensions by decreasing variance (euclidean/manhattan)."""
    n_blocks = -(-data.shape[1] // _k.BLOCK)
    if metric not in ("euclidean", "manhattan") or n_blocks == 1:
        return np.arange(n_blocks, dtype=np.int32)
    return np.argsort(-_k.block_variances(data), kind="stable").astype(np.int32)


class Forest:
    """A built or loaded forest. Attributes ``dim``, ``metric``, ``n_trees``, ``leaf_size``,
    ``seed`` and ``n_items`` are read-only; items are numbered 0..n_items-1 in build order."""

    def __init__(self, arrays: dict, *, dim: int, metric: str, n_trees: int, leaf_size: int, seed: int):
        self._arrays = arrays
        self._dim = int(dim)
        self._metric = metric
        self._code = _numpy_kernels.METRIC_CODES[metric]
        self._n_trees = int(n_trees)
        self._leaf_size = int(leaf_size)
        self._seed = int(seed)
        self._n_items = int(arrays["vectors"].shape[0])
        self._kargs = tuple(np.asarray(arrays[name]) for name, _ in _ARRAYS)
        # working memory of the single-query kernel (_k.new_scratch), one per Python thread (the
        # kernel releases the GIL, so threads may query one forest at the same time)
        self._local = threading.local()

    dim = property(lambda self: self._dim, doc="Dimension of the vectors (int).")
    metric = property(lambda self: self._metric, doc="'angular', 'euclidean', 'manhattan' or 'dot'.")
    n_trees = property(lambda self: self._n_trees, doc="Number of trees (int).")
    leaf_size = property(lambda self: self._leaf_size, doc="Most items a leaf holds (int).")
    seed = property(lambda self: self._seed, doc="The seed the trees were built from (int).")
    n_items = property(lambda self: self._n_items, doc="Number of indexed vectors (int).")

    def __repr__(self) -> str:
        return (
            f"Forest(n_items={self._n_items}, dim={self._dim}, metric={self._metric!r}, "
            f"n_trees={self._n_trees}, leaf_size={self._leaf_size}, seed={self._seed})"
        )

    def arrays(self) -> dict:
        """The index arrays by name (read-only views); what ``save`` writes."""
        return dict(self._arrays)

    # ----------------------------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        metric: str = "angular",
        n_trees: int = 50,
        leaf_size: int | None = None,
        seed: int = 0,
        n_threads: int = 1,
        split_dim: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        trees: list | None = None,
        overwrite: bool = False,
    ) -> "Forest":
        """Build a forest over ``vectors`` (n, dim), any real dtype (used as float32).

        For ``euclidean``/``manhattan``, float32 C-contiguous ``vectors`` are referenced, not
        copied (the index views them read-only): do not modify them while the forest is in use.
        ``leaf_size=None`` picks ``default_leaf_size(dim)``. Trees are built on ``n_threads``
        threads (0 = all cores); tree t uses its own seed derived from ``seed``, so the arrays are
        byte-identical for any thread count.

        The split planes live in a ``split_dim``-dimensional space spanned by the top principal
        directions of a sample of the rows (``split_dim=None`` picks ``default_split_dim``; a
        value >= the vector width keeps every column). Each item then also carries one byte per
        split dimension, from which a query bounds its distance from below and skips the rows that
        cannot enter the top k (exact: the answers are those of ranking every candidate).

        Every stored array is computed in a fixed order (no BLAS, no fastmath; see
        ``_forest_kernels``), so it is byte-identical for any ``n_threads``, BLAS and CPU.
        ``progress(trees_built, n_trees)``, when given, is called from the calling thread as trees
        finish.

        ``trees``: the n_trees trees already built, in order (the lists ``build_trees`` returns for
        consecutive ranges, concatenated; ``load_trees`` reads them back): they are assembled
        instead of built, into the arrays a build in one piece gives (tree t depends only on the
        data and its own seed, so a forest is the same bytes however its trees were shared out).

        ``overwrite=True``: ``vectors`` (float32, C-contiguous, writable) may be modified and kept
        by the index (angular rows are normalised in place) instead of copied: for a caller that
        read them for the index alone (``read_vectors(..., private=True)``), one copy of the rows
        in memory instead of two.
        """
        prep = cls._prepare(vectors, metric, n_trees, leaf_size, seed, n_threads, split_dim, overwrite)
        t0 = time.perf_counter()
        if trees is None:
            trees = cls._trees_of(prep, 0, int(n_trees), progress)
        elif len(trees) != n_trees:
            raise ConfigError(f"Forest.build: {len(trees)} prebuilt trees given for n_trees={n_trees}")
        return cls._finish(prep, trees, t0)

    @classmethod
    def build_trees(
        cls,
        vectors: np.ndarray,
        first: int,
        last: int,
        metric: str = "angular",
        leaf_size: int | None = None,
        seed: int = 0,
        n_threads: int = 1,
        split_dim: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list:
        """Trees ``first`` .. ``last - 1`` of any forest over ``vectors`` with these parameters (the
        first ``n_trees`` trees of a forest do not depend on ``n_trees``): one share of a build that
        several tasks or machines split among them. ``save_trees``/``load_trees`` store them;
        ``build(..., trees=...)`` assembles them. ``progress(done, last - first)``."""
        if not (isinstance(first, (int, np.integer)) and isinstance(last, (int, np.integer)) and 0 <= first < last):
            raise ConfigError(f"Forest.build_trees needs 0 <= first < last; got first={first!r}, last={last!r}")
        prep = cls._prepare(vectors, metric, int(last), leaf_size, seed, n_threads, split_dim)
        return cls._trees_of(prep, int(first), int(last), progress)

    @staticmethod
    def _prepare(vectors, metric, n_trees, leaf_size, seed, n_threads, split_dim, overwrite=False) -> dict:
        """Checks the arguments and computes what every tree reads (the rows as the kernels read
        them, the split basis, the projected rows and their byte codes) and the first ``n_trees``
        tree seeds."""
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ConfigError(f"Forest.build needs a non-empty 2-d array (n, dim); got shape {x.shape}")
        if not isinstance(n_trees, (int, np.integer)) or n_trees < 1:
            raise ConfigError(f"n_trees must be an integer >= 1; got {n_trees!r}")
        if leaf_size is None:
            leaf_size = default_leaf_size(x.shape[1])
        if not isinstance(leaf_size, (int, np.integer)) or leaf_size < 1:
            raise ConfigError(f"leaf_size must be an integer >= 1 or None; got {leaf_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0; got {seed!r}")
        if x.shape[0] >= 2**31 - 1:
            raise ConfigError(f"at most 2**31 - 2 items fit an index; got {x.shape[0]}")
        if split_dim is not None and (not isinstance(split_dim, (int, np.integer)) or split_dim < 1):
            raise ConfigError(f"split_dim must be an integer >= 1 or None; got {split_dim!r}")
        threads = _thread_count(n_threads, "Forest.build")
        if metric in ("euclidean", "manhattan") or (overwrite and x.dtype == np.float32 and x.flags.writeable
                                                    and x.flags.c_contiguous):
            # read the caller's rows in place when they are already float32 and contiguous (like a
            # memory-mapped Arrow column), or may be overwritten: no copy, no extra memory
            x32 = np.ascontiguousarray(x, dtype=np.float32)
        else:
            x32 = np.array(x, dtype=np.float32, order="C", copy=True)  # normalised/augmented below
        bad = _k.nonfinite_rows(x32)
        if len(bad):
            raise FormatError(
                f"Forest.build: {len(bad)} vector rows contain NaN or infinity (or overflow float32; first: row "
                f"{bad[0]}); clean or drop those rows first"
            )
        data = _prepare_vectors(x32, metric, threads)
        # The seeds of trees 0..n_trees-1: a prefix of one stream, so tree t's seed (and so the tree)
        # is the same in a forest of any size (tests/test_shards.py checks it).
        tree_seeds = np.random.SeedSequence(int(seed)).generate_state(int(n_trees), dtype=np.uint64)
        split_dim = resolved_build_params(x.shape[1], metric, leaf_size, split_dim)["split_dim"]
        basis = _split_basis(data, split_dim, int(seed)) if split_dim else None
        split_data = data if basis is None else _project(data, basis, threads)
        codes, code_scale, code_min = _k.byte_codes(split_data)
        return {"dim": x.shape[1], "metric": metric, "n_trees": int(n_trees), "leaf_size": int(leaf_size),
                "seed": int(seed), "threads": threads, "data": data, "basis": basis, "split_data": split_data,
                "codes": codes, "code_scale": code_scale, "code_min": code_min, "tree_seeds": tree_seeds}

    @staticmethod
    def _trees_of(prep: dict, first: int, last: int, progress: Callable[[int, int], None] | None) -> list:
        code = _k.METRIC_CODES[prep["metric"]]

        def one(i):
            return _k.build_tree(prep["split_data"], prep["codes"], prep["code_scale"], prep["code_min"], code,
                                 prep["leaf_size"], prep["tree_seeds"][first + i], _k.TWO_MEANS_ITERATIONS)

        return _build_trees(one, last - first, prep["threads"], progress)

    @classmethod
    def _finish(cls, prep: dict, trees: list, t0: float) -> "Forest":
        data, basis, n = prep["data"], prep["basis"], prep["data"].shape[0]
        arrays = cls._assemble(data, trees, n)
        if basis is None:
            arrays.update(_no_split(data.shape[1]))
        else:  # item codes: the projected rows as the query's lower bound reads them
            arrays.update(split_basis=basis, item_codes=prep["codes"],
                          code_coefs=np.stack([prep["code_scale"], prep["code_min"]]).astype(np.float32))
        for name in ("split_basis", "item_codes", "code_coefs"):
            arrays[name].flags.writeable = False
        arrays["block_order"] = _block_order(data, prep["metric"])
        arrays["block_order"].flags.writeable = False
        log.info(
            "built %d trees over %d x %d (%s, leaf_size %d) in %.2fs on %d threads: %d splits, %d leaves",
            prep["n_trees"], n, prep["dim"], prep["metric"], prep["leaf_size"], time.perf_counter() - t0,
            prep["threads"], arrays["planes"].shape[0], arrays["leaf_offsets"].shape[0] - 1,
        )
        return cls(arrays, dim=prep["dim"], metric=prep["metric"], n_trees=prep["n_trees"],
                   leaf_size=prep["leaf_size"], seed=prep["seed"])

    @staticmethod
    def _assemble(data: np.ndarray, trees: list, n: int) -> dict:
        """Concatenate per-tree arrays (tree-local numbering) into the global layout."""
        dv = trees[0][1].shape[1]  # plane width: the split space's
        n_split = np.array([t[1].shape[0] for t in trees], dtype=np.int64)
        n_leaf = np.array([t[4].shape[0] - 1 for t in trees], dtype=np.int64)
        split_base = np.concatenate([[0], np.cumsum(n_split)[:-1]])
        leaf_base = np.concatenate([[0], np.cumsum(n_leaf)[:-1]])

        def relabel(codes, t):
            codes = np.asarray(codes, dtype=np.int64)
            return np.where(codes >= 0, codes + split_base[t], codes - leaf_base[t])

        arrays = {
            "vectors": data,
            "planes": np.concatenate([t[1] for t in trees]).astype(np.int8).reshape(-1, dv),
            "plane_coefs": np.concatenate([t[2] for t in trees]).astype(np.float32).reshape(-1, 2),
            "children": np.concatenate(
                [relabel(tr[3], t).reshape(-1, 2) for t, tr in enumerate(trees)]
            ).astype(np.int32).reshape(-1, 2),
            "roots": np.array([relabel([tr[5]], t)[0] for t, tr in enumerate(trees)], dtype=np.int32),
            "leaf_offsets": np.concatenate(
                [tr[4][:-1] + t * n for t, tr in enumerate(trees)] + [np.array([len(trees) * n])]
            ).astype(np.int64),
            "leaf_items": np.concatenate([t[0] for t in trees]).astype(np.int32),
        }
        for name in arrays:
            arrays[name] = arrays[name].view()  # read-only views; the caller's flags stay as they were
            arrays[name].flags.writeable = False
        return arrays

    # ----------------------------------------------------------------------------------- query

    def _check_k(self, k: int, search_k: int | None) -> tuple[int, int]:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be an integer >= 1; got {k!r}")
        k = min(int(k), self._n_items)
        if search_k is None:
            search_k = k * self._n_trees
        elif not isinstance(search_k, (int, np.integer)) or search_k < 0:
            raise ConfigError(f"search_k must be an integer >= 0 or None; got {search_k!r}")
        return k, int(search_k)

    def query(self, vector: np.ndarray, k: int = 10, search_k: int | None = None, include_distances: bool = False,
              compiled: bool = True):
        """The k (at most n_items) nearest items of ``vector`` (dim,).

        Returns ids (k,) int64 nearest first, or ``(ids, dists)`` with dists (k,) float32.
        ``search_k`` (default ``k * n_trees``) is how many leaf entries to inspect; more is slower
        and more accurate.

        ``compiled=False`` answers with the numpy twin of the compiled kernel
        (``pipeline._numpy_kernels.query_one``): the same ids and distances, bit for bit, without
        importing numba (about 0.5 s of CPU in a fresh process), at a few milliseconds per query
        (about 8 ms at the default search_k on GloVe and MNIST, 50 ms at 20,000) instead of tenths
        of one: for a process that answers one query.
        """
        q = np.asarray(vector, dtype=np.float32)
        if q.shape != (self._dim,):
            raise IndexMismatchError(
                f"query vector has shape {q.shape}, expected ({self._dim},) for this {self._metric} index"
            )
        k, search_k = self._check_k(k, search_k)
        if not compiled:
            ids, dists = _numpy_kernels.query_one(q, *self._kargs, self._code, k, search_k)
            return (ids, dists) if include_distances else ids
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            a = dict(zip((name for name, _ in _ARRAYS), self._kargs))
            scratch = self._local.scratch = _k.new_scratch(a["vectors"], a["split_basis"], a["planes"],
                                                           a["leaf_offsets"])
        ids, dists = _k.query_one(q, *self._kargs, self._code, k, search_k, scratch)
        return (ids, dists) if include_distances else ids

    def query_item(self, i: int, k: int = 10, search_k: int | None = None, include_distances: bool = False):
        """Like ``query`` with the indexed vector of item ``i`` (which is normally its own nearest)."""
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self._n_items:
            raise ConfigError(f"item id must be an integer in [0, {self._n_items}); got {i!r}")
        row = np.asarray(self._kargs[0][int(i)][: self._dim])
        return self.query(row, k, search_k, include_distances)

    def query_batch(
        self,
        queries: np.ndarray,
        k: int = 10,
        search_k: int | None = None,
        n_threads: int = 0,
        include_distances: bool = False,
    ):
        """Answers for queries (nq, dim) on ``n_threads`` cores (0 = all), without the GIL.

        Returns ids (nq, k) int64, or ``(ids, dists)`` with dists (nq, k) float32; row i equals
        ``query(queries[i], ...)`` exactly. k is clipped to n_items.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise IndexMismatchError(
                f"queries have shape {q.shape}, expected (n_queries, {self._dim}) for this {self._metric} index"
            )
        k, search_k = self._check_k(k, search_k)
        threads = _thread_count(n_threads, "query_batch")
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            ids, dists, _found = _k.query_batch(q, *self._kargs, self._code, k, search_k, threads)
        finally:
            numba.set_num_threads(before)
        return (ids, dists) if include_distances else ids

    # ----------------------------------------------------------------------------------- files

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index into ``directory`` (created if needed): one ``<name>.npy`` per array and
        ``header.json`` (written last) with dim, metric, n_trees, leaf_size, seed, n_items, the
        format and grove versions, and each array's file, shape, dtype and sha256.
        Publishing the directory atomically is the caller's job."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, dtype in _ARRAYS:
            a = np.ascontiguousarray(self._arrays[name], dtype=np.dtype(dtype))
            path = out / f"{name}.npy"
            np.save(path, a, allow_pickle=False)
            files[name] = {"file": path.name, "shape": list(a.shape), "dtype": dtype, "sha256": file_sha256(path)}
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "grove_version": __version__,
            "dim": self._dim,
            "metric": self._metric,
            "n_trees": self._n_trees,
            "leaf_size": self._leaf_size,
            "seed": self._seed,
            "n_items": self._n_items,
            "split_dim": int(self._arrays["split_basis"].shape[0]),
            "arrays": files,
        }
        (out / HEADER_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        metric: str | None = None,
        dim: int | None = None,
        verify: bool = False,
    ) -> "Forest":
        """Open a saved index memory-mapped (nothing is copied; processes share the page cache).

        ``metric``/``dim``, when given, must match the header (else IndexMismatchError).
        ``verify=True`` also checks every file's sha256 (reads everything; off by default).
        Missing, truncated or inconsistent files and unknown format versions raise IndexFormatError.
        """
        root = Path(directory)
        header = _read_header(root)
        if metric is not None and metric != header["metric"]:
            raise IndexMismatchError(
                f"{root / HEADER_FILE}: index metric is {header['metric']!r}, expected {metric!r}; "
                "open the index built for that metric or rebuild it"
            )
        if dim is not None and int(dim) != header["dim"]:
            raise IndexMismatchError(
                f"{root / HEADER_FILE}: index dimension is {header['dim']}, expected {dim}; "
                "the vectors and the index come from different embeddings: rebuild the index"
            )
        arrays = {}
        if header["format_version"] == 1:  # no split basis: the planes span every column
            arrays.update(_no_split(header["dim"] + 1 if header["metric"] == "dot" else header["dim"]))
        for name, dtype in _ARRAYS:
            if name in arrays:
                continue
            spec = header["arrays"].get(name)
            if not isinstance(spec, dict) or not {"file", "shape", "dtype"} <= spec.keys():
                raise IndexFormatError(f"{root / HEADER_FILE}: no valid entry for array {name!r}; rebuild the index")
            path = root / Path(spec["file"]).name
            if not path.is_file():
                raise IndexFormatError(f"{path}: file missing from the index directory; rebuild the index")
            if verify:
                digest = file_sha256(path)
                if digest != spec.get("sha256"):
                    raise IndexFormatError(
                        f"{path}: sha256 is {digest}, header records {spec.get('sha256')}; "
                        "the file is corrupt: rebuild the index"
                    )
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise IndexFormatError(f"{path}: not a readable .npy array ({exc}); the file is truncated or corrupt: "
                                       "rebuild the index") from exc
            if a.dtype != np.dtype(dtype) or list(a.shape) != list(spec["shape"]) or spec["dtype"] != dtype:
                raise IndexFormatError(
                    f"{path}: array is {a.dtype.str} {list(a.shape)}, header says {spec['dtype']} {spec['shape']} "
                    f"(expected dtype {dtype}); the file is corrupt or from another index: rebuild the index"
                )
            arrays[name] = a
        _check_structure(root, header, arrays)
        return cls(
            arrays, dim=header["dim"], metric=header["metric"], n_trees=header["n_trees"],
            leaf_size=header["leaf_size"], seed=header["seed"],
        )


def _read_header(root: Path) -> dict:
    path = root / HEADER_FILE
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing; {root} is not a saved grove forest (or is half-written): rebuild it")
    try:
        header = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc}); the header is corrupt: rebuild the index") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: format is {header.get('format') if isinstance(header, dict) else None!r}, "
                               f"expected {FORMAT_NAME!r}; this is not a grove forest index")
    if header.get("format_version") not in READ_VERSIONS:
        raise IndexFormatError(
            f"{path}: format version {header.get('format_version')!r}, this grove ({__version__}) reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}; rebuild the index with this grove or use the grove that wrote it "
            f"({header.get('grove_version')!r})"
        )
    ints = ("dim", "n_trees", "leaf_size", "seed", "n_items") + (("split_dim",) if header["format_version"] >= 2 else ())
    for key in ints:
        if not isinstance(header.get(key), int) or isinstance(header.get(key), bool) or header[key] < 0:
            raise IndexFormatError(f"{path}: {key} is {header.get(key)!r}, expected a non-negative integer; "
                                   "the header is corrupt: rebuild the index")
    if header.get("metric") not in METRICS:
        raise IndexFormatError(f"{path}: metric is {header.get('metric')!r}, expected one of {', '.join(METRICS)}; "
                               "the header is corrupt: rebuild the index")
    if not isinstance(header.get("arrays"), dict):
        raise IndexFormatError(f"{path}: no 'arrays' table; the header is corrupt: rebuild the index")
    return header


def _check_structure(root: Path, header: dict, arrays: dict) -> None:
    """Shapes agree with the header and with each other; small arrays hold in-range codes.

    leaf_items (n_trees * n) is not scanned here (that would read it all); the query kernel skips
    out-of-range ids instead of reading out of bounds. children and roots are read in full
    (they are small next to the vectors).
    """
    n, d, t = header["n_items"], header["dim"], header["n_trees"]
    dv = d + 1 if header["metric"] == "dot" else d
    p = header.get("split_dim", 0)
    s = arrays["planes"].shape[0]
    n_leaves = arrays["leaf_offsets"].shape[0] - 1
    expected = {
        "vectors": (n, dv), "split_basis": (p, dv), "item_codes": (n, p) if p else (0, 0), "code_coefs": (2, p),
        "planes": (s, p or dv), "plane_coefs": (s, 2), "children": (s, 2), "roots": (t,),
        "leaf_items": (t * n,),
        "block_order": (-(-dv // _numpy_kernels.BLOCK),),
    }
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise IndexFormatError(
                f"{root / (name + '.npy')}: shape {tuple(arrays[name].shape)}, expected {shape} from "
                f"{root / HEADER_FILE} (n_items={n}, dim={d}, n_trees={t}); rebuild the index"
            )
    lo = np.asarray(arrays["leaf_offsets"])
    if n_leaves < 1 or lo[0] != 0 or lo[-1] != t * n or (n_leaves > 1 and np.any(np.diff(lo) < 0)):
        raise IndexFormatError(f"{root / 'leaf_offsets.npy'}: offsets do not tile [0, {t * n}); "
                               "the file is corrupt: rebuild the index")
    order = np.asarray(arrays["block_order"])
    if not np.array_equal(np.sort(order), np.arange(order.shape[0])):
        raise IndexFormatError(f"{root / 'block_order.npy'}: not a permutation of 0..{order.shape[0] - 1}; "
                               "the file is corrupt: rebuild the index")
    # the query kernel relies on this (it reads child codes unchecked and sizes its heap by it)
    if not _forms_trees(np.asarray(arrays["children"]), np.asarray(arrays["roots"]), n_leaves):
        raise IndexFormatError(
            f"{root / 'children.npy'}, {root / 'roots.npy'}: the node codes do not form {t} trees over {s} split "
            f"nodes and {n_leaves} leaves (a code out of range, or a node with no or several parents); "
            "the file is corrupt: rebuild the index")


def _forms_trees(children: np.ndarray, roots: np.ndarray, n_leaves: int) -> bool:
    """Whether every child code in children (S, 2) int32 and roots (n_trees,) int32 is in range
    (split node ``c >= 0`` below S, leaf ``-c - 1`` below n_leaves) and every split node and leaf
    has exactly one parent (the roots being the parents of the tree tops).

    numpy, not a compiled kernel: it runs on every ``Forest.load``, so in every command-line query,
    where loading one more kernel from numba's cache cost about 45 ms of CPU (2 cores, 2026-11-30);
    numpy's bincount over the n_trees + 2 S codes takes about 1 ms for GloVe's 50 trees (S = 30k).
    """
    n_splits = children.shape[0]
    codes = np.concatenate([roots.reshape(-1), children.reshape(-1)]).astype(np.int64)
    if codes.shape[0] != n_splits + n_leaves:  # one parent each needs exactly one code per node
        return False
    if codes.shape[0] and (codes.max() >= n_splits or codes.min() < -n_leaves):
        return False
    slots = np.where(codes >= 0, codes, n_splits - 1 - codes)  # leaf l = -c - 1 is slot n_splits + l
    return bool(np.all(np.bincount(slots, minlength=n_splits + n_leaves) == 1))


# --- trees built apart (one share of a build), stored between tasks --------------------------------

# Per-tree arrays, concatenated over the trees of a share: (name, dtype, rows per tree from counts).
_TREE_FIELDS = (("leaf_items", "int32"), ("planes", "int8"), ("plane_coefs", "float32"), ("children", "int32"),
                ("leaf_offsets", "int64"))
TREES_HEADER = "trees.json"


def save_trees(trees: list, directory: str | os.PathLike) -> Path:
    """Store trees ``Forest.build_trees`` returned in ``directory``: one .npy per field, the trees
    concatenated, with ``counts.npy`` (rows of each field per tree) and ``roots.npy``; exact bits,
    no pickle. ``load_trees`` reads them back."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.array([[tree[i].shape[0] for i in range(len(_TREE_FIELDS))] for tree in trees], dtype=np.int64)
    for i, (name, dtype) in enumerate(_TREE_FIELDS):
        parts = [np.asarray(tree[i], dtype=dtype) for tree in trees]
        np.save(out / f"{name}.npy", np.concatenate(parts) if parts else np.empty(0, dtype), allow_pickle=False)
    np.save(out / "counts.npy", counts, allow_pickle=False)
    np.save(out / "roots.npy", np.array([tree[5] for tree in trees], dtype=np.int64), allow_pickle=False)
    (out / TREES_HEADER).write_text(json.dumps({"format": FORMAT_NAME + "-trees", "n_trees": len(trees)}) + "\n")
    return out


def load_trees(directory: str | os.PathLike) -> list:
    """The trees ``save_trees`` stored, as ``Forest.build_trees`` returned them. IndexFormatError
    when the directory does not hold them whole."""
    root = Path(directory)
    try:
        header = json.loads((root / TREES_HEADER).read_text())
        counts = np.load(root / "counts.npy", allow_pickle=False)
        roots = np.load(root / "roots.npy", allow_pickle=False)
        fields = [np.load(root / f"{name}.npy", allow_pickle=False) for name, _ in _TREE_FIELDS]
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{root}: not a directory of saved trees ({exc}); build that share again") from exc
    n = int(header.get("n_trees", -1))
    if counts.shape != (n, len(_TREE_FIELDS)) or roots.shape != (n,) or any(
            f.shape[0] != int(counts[:, i].sum()) for i, f in enumerate(fields)):
        raise IndexFormatError(f"{root}: the saved trees' arrays do not agree with counts.npy; build that share again")
    ends = np.cumsum(counts, axis=0)
    starts = ends - counts
    return [tuple(fields[i][starts[t, i]:ends[t, i]] for i in range(len(_TREE_FIELDS))) + (int(roots[t]),)
            for t in range(n)]
