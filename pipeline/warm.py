"""Compile every numba kernel a build and a query use, once, into numba's cache: ``python -m pipeline.warm``.

grove's kernels (``pipeline/_forest_kernels.py``, ``pipeline/_exact_kernels.py``) are compiled with
``cache=True``: the first process that calls a kernel with a new combination of argument types
compiles it (the query kernel alone takes several seconds) and stores the machine code; later
processes load it in milliseconds. Without warming, the first ``grove query`` after an installation
pays that compilation (about 10 s of CPU on 2 cores, 2026-11-30); warmed, it does not. Run it once after installing or upgrading
grove, or after changing a kernel (``make venv`` and ``make demo`` do).

The cache is the kernels' ``__pycache__`` when it can be written, else grove's scratch directory
(``<scratch>/numba``; see ``pipeline/__init__.py``), or ``NUMBA_CACHE_DIR`` when set. numba keys each
entry by the kernel's source, the argument types and the CPU: a cache warmed on one machine is
not used on a machine with another CPU (it is compiled there again, and stored).

Argument types include whether an array is writable, so the kernels are called here the way the
pipeline calls them: on vectors read back from an Arrow file (read-only memory maps) and on
writable copies, for every metric, with and without a split basis, on a built index and on one
saved and loaded again (memory-mapped), one query at a time and in batches, with exact search beside.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Narrow vectors are split on their own columns (no split basis); wide ones get a basis and item codes,
# and above 64 columns (one block) euclidean/manhattan distances are summed in blocks by variance.
_WIDTHS = (8, 130)
_ROWS = 300
_SEED = 20240601


def _kernels() -> list:
    """Every numba dispatcher of grove's kernel modules."""
    from numba.core.dispatcher import Dispatcher

    from . import _exact_kernels, _forest_kernels

    return [obj for module in (_forest_kernels, _exact_kernels) for obj in vars(module).values()
            if isinstance(obj, Dispatcher)]


def _tables(tmp: Path) -> list:
    """Vector tables as the stages read them (read-only memory maps of Arrow files), float32 and uint8."""
    from .vectors import read_vectors, write_vectors

    rng = np.random.default_rng(_SEED)
    tables = []
    for dim in _WIDTHS:
        x = rng.standard_normal((_ROWS, dim)).astype(np.float32)
        x[1] = x[0]  # a duplicate and an all-zero row, as real data has
        x[2] = 0.0
        for dtype, values in ((np.float32, x), (np.uint8, (np.abs(x) * 40).astype(np.uint8))):
            path = tmp / f"t{dim}-{np.dtype(dtype).name}.arrow"
            write_vectors(path, values, [f"k{i}" for i in range(_ROWS)])
            tables.append(read_vectors(path))
    return tables


def _exercise(base: np.ndarray, metric: str, tmp: Path) -> None:
    """Build, query, save, load and query again one small index over ``base``, with exact search."""
    from .exact import exact_neighbors, normalize_rows, rerank
    from .forest import Forest

    writable = np.array(base[:4], dtype=np.float32)  # e.g. a phrase's normalised sum
    read_only = np.asarray(base[:4], dtype=np.float32)  # e.g. a row of the queries table
    for threads in (1, 2):  # one thread, and the thread pool (the same kernels; both are cheap)
        forest = Forest.build(base, metric=metric, n_trees=2, leaf_size=16, seed=0, n_threads=threads)
    directory = forest.save(tmp / f"forest-{metric}-{base.shape[1]}-{base.dtype.name}")
    for index in (forest, Forest.load(directory)):
        for queries in (writable, read_only):
            index.query(queries[0], k=3, include_distances=True)
            index.query_batch(queries, k=3, n_threads=1)
        index.query_item(0, k=3)
    for queries in (writable, read_only, writable[:1], read_only[:1]):
        exact_neighbors(base, queries, 3, metric)
    unit = normalize_rows(base)
    exact_neighbors(unit, read_only, 3, metric, base_normalized=True)
    for row in (writable[0], read_only[0]):
        rerank(row, unit, np.arange(3, dtype=np.int64), metric)
        normalize_rows(row[None, :])
    normalize_rows(read_only)


def warm() -> dict:
    """Call every kernel as the pipeline does, compiling what the cache does not hold yet.

    Returns ``{"compiled": int, "loaded": int, "seconds": float, "cache": [str]}``: kernel
    signatures compiled (and stored) and loaded from the cache by this call, and the cache directories.
    """
    from .exact import METRICS

    started = time.perf_counter()
    kernels = _kernels()
    before = {id(k): (k.stats.cache_hits.copy(), k.stats.cache_misses.copy()) for k in kernels}
    with tempfile.TemporaryDirectory(prefix="grove-warm-") as tmp:
        for table in _tables(Path(tmp)):
            for metric in METRICS:
                _exercise(table.vectors, metric, Path(tmp))
    compiled = loaded = 0
    for k in kernels:
        hits, misses = before[id(k)]
        loaded += sum(k.stats.cache_hits.values()) - sum(hits.values())
        compiled += sum(k.stats.cache_misses.values()) - sum(misses.values())
    caches = sorted({k.stats.cache_path for k in kernels if k.stats.cache_path})
    return {"compiled": compiled, "loaded": loaded, "seconds": time.perf_counter() - started, "cache": caches}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline.forest").setLevel(logging.WARNING)  # not a line per tiny index built here
    log.info("compiling grove's numba kernels (only what the cache does not hold yet)...")
    result = warm()
    log.info("numba kernels: %d compiled, %d loaded from the cache in %.1f s; cache: %s",
             result["compiled"], result["loaded"], result["seconds"], ", ".join(result["cache"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
