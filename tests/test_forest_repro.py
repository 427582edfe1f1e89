"""Same digest, same bytes: a forest is byte-identical whatever the threads, BLAS and CPU.

Each setting builds the same forests in a fresh subprocess (environment variables such as
OPENBLAS_CORETYPE and NUMBA_CPU_NAME only take effect when the libraries load) and reports the
sha256 of every file ``Forest.save`` writes, plus what the process actually ran with (OpenBLAS's
core and thread count, numba's target CPU, the build's thread count), so a setting that silently
did not apply fails the test instead of passing it. The child side is this file run as a script:
``python tests/test_forest_repro.py --child OUT_DIR N_THREADS``.

Also here: the forest digest hashes resolved parameters (``leaf_size = 0`` and the default
written out are one digest), and ``Forest.build`` / ``write_forest`` report progress per tree.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the child runs this file as a script
    sys.path.insert(0, str(REPO))

# name: (metric, n_items, dim, n_trees, leaf_size). Wide rows (dim 300: a 64-column split basis by
# orthogonal iteration), narrow rows (dim 40: a 32-column basis by Jacobi on the full matrix, and
# dot's extra column), leaf sizes that split thousands of times (default 96 and 12).
CASES = {
    "euclidean-300": ("euclidean", 4000, 300, 6, None),
    "angular-300": ("angular", 4000, 300, 6, 12),
    "dot-40": ("dot", 3000, 40, 4, 12),
}


def repro_data(n: int, dim: int, seed: int = 12) -> np.ndarray:
    """(n, dim) float32: clustered rows on very different scales, with an exact duplicate block
    larger than a leaf, scattered duplicates and all-zero rows."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(30, dim)) * rng.uniform(0.1, 10, size=(30, 1))
    x = centers[rng.integers(0, 30, n)] + rng.normal(0, 1, size=(n, dim)) * rng.uniform(0.2, 2, size=dim)
    x[100:250] = x[7]
    x[300:340] = x[rng.integers(400, n, 40)]
    x[500:530] = 0.0
    return x.astype(np.float32)


# ------------------------------------------------------------------------------ child process


def _openblas_state() -> dict:
    """The core kernel and thread count of the OpenBLAS that numpy loaded (through its own
    exported functions: numpy ships scipy-openblas with prefixed symbols)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so"))
    if not libs:
        return {"core": None, "threads": None}
    lib = ctypes.CDLL(libs[0])
    names = {"core": ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename"),
             "threads": ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")}
    out = {}
    for key, candidates in names.items():
        fn = next((getattr(lib, n) for n in candidates if hasattr(lib, n)), None)
        if fn is None:
            out[key] = None
            continue
        if key == "core":
            fn.restype = ctypes.c_char_p
            out[key] = fn().decode()
        else:
            out[key] = int(fn())
    return out


def _kernel_values() -> str:
    """sha256 of the fixed-order reductions (distances, dots, the lower bound) on seeded vectors
    of many lengths: each must be the same bits on every CPU, not only where it moved a split."""
    from pipeline import _forest_kernels as k

    rng = np.random.default_rng(5)
    out = []
    for n in (1, 5, 15, 16, 17, 31, 32, 33, 50, 64, 100, 300, 785):
        a, b, c = (rng.normal(0, 10, n).astype(np.float32) for _ in range(3))
        rows = np.stack([b, c])
        codes = rng.integers(0, 256, (2, n)).astype(np.uint8)
        half = np.abs(c) * np.float32(0.01)
        out += [k._dot(a, b), k._dot(codes[1].view(np.int8), b), k._dot_row(a, rows, 1), k._dot_row(a, codes, 1),
                k._dot_row(a, codes.view(np.int8), 0), k._sqdist_row(a, rows, 1, 0, n),
                k._sqdist_row(a, rows, 0, n // 3, n), k._l1dist_row(a, rows, 1, n // 2, n),
                k._angular_sq_row(a, rows, 1, False), k._lower_bound(a, codes, 1, c, half),
                k._dot64(a.astype(np.float64), b.astype(np.float64))]
        v = a.copy()
        k._normalize_inplace(v)
        out.append(v)
    return hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in out)).hexdigest()


def child(out_dir: Path, n_threads: int) -> dict:
    import numba

    from pipeline.forest import Forest, _thread_count

    # make BLAS work in this process (a matrix product large enough to use its threads), so that
    # its state is real; the forest itself must not depend on it
    a = np.random.default_rng(0).normal(size=(400, 400))
    blas_probe = hashlib.sha256(np.linalg.eigh(a.T @ a)[1].tobytes()).hexdigest()
    files = {}
    for name, (metric, n, dim, n_trees, leaf_size) in CASES.items():
        forest = Forest.build(repro_data(n, dim), metric=metric, n_trees=n_trees, leaf_size=leaf_size, seed=3,
                              n_threads=n_threads)
        path = forest.save(out_dir / name)
        files[name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}
        files[name]["_n_splits"] = int(forest.arrays()["planes"].shape[0])
        files[name]["_split_dim"] = int(forest.arrays()["split_basis"].shape[0])
        # which neighbours queries return (and their distances) is part of what evaluate stores
        queries = repro_data(n, dim, seed=99)[:60] * np.float32(1.01)
        ids, dists = forest.query_batch(queries, k=10, search_k=300, n_threads=n_threads, include_distances=True)
        files[name]["_answers"] = hashlib.sha256(ids.tobytes() + dists.tobytes()).hexdigest()
    return {"files": files, "kernels": _kernel_values(), "openblas": _openblas_state(),
            "numba_cpu": numba.config.CPU_NAME or "host", "build_threads": _thread_count(n_threads, "test"),
            "blas_probe": blas_probe}


# ------------------------------------------------------------------------------ parent side


def _run_child(tmp: Path, name: str, n_threads: int = 1, **env) -> dict:
    out = tmp / name
    out.mkdir()
    full_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2", **env}
    for key in ("OPENBLAS_CORETYPE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.Popen([sys.executable, __file__, "--child", str(out), str(n_threads)], cwd=str(tmp),
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The reference build (OpenBLAS 1 thread, host CPU, 1 build thread) and one build per
    setting that differs from it in one way."""
    tmp = tmp_path_factory.mktemp("repro")
    # the reference runs first, alone: it compiles into (or loads) the normal numba cache, which
    # the host-CPU settings then read at the same time
    ref = _result(_run_child(tmp, "reference"))
    forced = "Sandybridge" if ref["openblas"]["core"] != "Sandybridge" else "Haswell"
    procs = {
        "openblas-2-threads": _run_child(tmp, "openblas2", OPENBLAS_NUM_THREADS="2"),
        "openblas-coretype": _run_child(tmp, "coretype", OPENBLAS_CORETYPE=forced),
        "numba-generic-cpu": _run_child(tmp, "generic", NUMBA_CPU_NAME="generic",
                                        NUMBA_CACHE_DIR=str(tmp / "numba-generic-cache")),
        "2-build-threads": _run_child(tmp, "threads2", n_threads=2),
    }
    return ref, forced, {name: _result(proc) for name, proc in procs.items()}


@pytest.mark.slow
def test_reference_build_splits_many_times(builds):
    ref, _, _ = builds
    for name, (_, n, _, n_trees, _) in CASES.items():
        assert ref["files"][name]["_n_splits"] >= 20 * n_trees, name
    assert ref["files"]["euclidean-300"]["_split_dim"] == 64 and ref["files"]["dot-40"]["_split_dim"] == 32


@pytest.mark.slow  # five fresh processes, one compiling every kernel for a generic CPU: about 40 s
@pytest.mark.parametrize("setting", ["openblas-2-threads", "openblas-coretype", "numba-generic-cpu",
                                     "2-build-threads"])
def test_every_saved_file_is_byte_identical(builds, setting):
    ref, forced, results = builds
    got = results[setting]
    # the setting really applied (otherwise the comparison below proves nothing)
    if setting == "openblas-2-threads":
        assert got["openblas"]["threads"] == 2 and ref["openblas"]["threads"] == 1
    elif setting == "openblas-coretype":
        assert got["openblas"]["core"] == forced != ref["openblas"]["core"]
    elif setting == "numba-generic-cpu":
        assert got["numba_cpu"] == "generic" and ref["numba_cpu"] == "host"
    else:
        assert got["build_threads"] == 2 and ref["build_threads"] == 1
    assert got["kernels"] == ref["kernels"], f"{setting}: the fixed-order reductions give other bits"
    for case, files in ref["files"].items():
        assert set(got["files"][case]) == set(files)
        differ = sorted(f for f in files if got["files"][case][f] != files[f])
        assert not differ, f"{setting}: {case}: files (or _answers: query results) differ from the reference: {differ}"


# ------------------------------------------------------------------------------ digests


def test_leaf_size_zero_and_the_resolved_default_are_one_digest():
    from pipeline.artifacts import make_ref
    from pipeline.config import load_config
    from pipeline.forest import default_leaf_size, default_split_dim
    from pipeline.stages import FORMATS, stage_params

    cfg = load_config("mnist")
    assert cfg.forest.leaf_size == 0

    def digest(leaf_size, dim=784, metric="euclidean"):
        c = cfg.with_values({"forest.leaf_size": leaf_size, "embed.metric": metric})
        params = stage_params(c, "forest", n_trees=50, dim=dim)
        return params, make_ref("/r", "mnist", "forest", FORMATS["forest"], params, {}).digest

    implicit, d0 = digest(0)
    explicit, d96 = digest(default_leaf_size(784))
    assert implicit == explicit == {"leaf_size": 96, "split_dim": 64, "seed": 0, "metric": "euclidean",
                                    "n_trees": 50}
    assert d0 == d96
    assert digest(48)[1] != d0  # a different leaf size is a different index
    # the split dimension is resolved from the width (dot: one extra column) and hashed
    assert digest(0, dim=50)[0]["split_dim"] == default_split_dim(50) == 32
    assert digest(0, dim=20)[0]["split_dim"] == 0  # narrow rows: planes over every column
    assert digest(0, dim=32, metric="dot")[0]["split_dim"] == 32 and digest(0, dim=32)[0]["split_dim"] == 0
    assert digest(0, dim=784)[1] != digest(0, dim=100)[1]
    # before the vectors exist the width is unknown: a provisional digest that no resolved one equals
    provisional = stage_params(cfg, "forest", n_trees=50, dim=None)
    assert "split_dim" not in provisional and provisional["leaf_size"] == 0


def test_write_forest_builds_what_the_digest_names_and_reports_each_tree(tmp_path):
    from pipeline.config import load_config
    from pipeline.forest import Forest
    from pipeline.stages import stage_params, write_forest
    from pipeline.vectors import write_vectors

    cfg = load_config("mnist")  # euclidean, leaf_size = 0
    split = tmp_path / "split"
    split.mkdir()
    x = repro_data(1500, 150)
    write_vectors(split / "base.arrow", x, [f"k{i}" for i in range(len(x))], np.zeros(len(x), np.int64),
                  ["train"] * len(x), meta={"metric": "euclidean"})
    out = tmp_path / "forest"
    out.mkdir()
    calls = []
    write_forest(cfg, split, out, n_trees=4, n_threads=2, report=lambda f, m: calls.append((f, m)))
    trees = [c for c in calls if c[1].startswith("built ") and "/" in c[1]]
    assert trees == [(i / 4, f"built {i}/4 trees") for i in range(1, 5)]
    assert calls[-1][0] == 1.0
    params = stage_params(cfg, "forest", n_trees=4, dim=150)
    header = json.loads((out / "index" / "header.json").read_text())
    assert (header["leaf_size"], header["split_dim"]) == (params["leaf_size"], params["split_dim"]) == (96, 64)
    Forest.load(out / "index", metric="euclidean", dim=150, verify=True)


# ------------------------------------------------------------------------------ progress


@pytest.mark.parametrize("n_threads", [1, 2])
def test_build_progress_counts_trees_from_the_calling_thread(n_threads):
    from pipeline.forest import Forest

    x = repro_data(800, 20)
    seen = []
    main = threading.get_ident()
    forest = Forest.build(x, metric="euclidean", n_trees=5, leaf_size=16, n_threads=n_threads,
                          progress=lambda done, total: seen.append((done, total, threading.get_ident())))
    assert [(d, t) for d, t, _ in seen] == [(i, 5) for i in range(1, 6)]
    assert {tid for _, _, tid in seen} == {main}
    plain = Forest.build(x, metric="euclidean", n_trees=5, leaf_size=16, n_threads=n_threads)
    assert all(forest.arrays()[k].tobytes() == plain.arrays()[k].tobytes() for k in plain.arrays())


def test_a_failing_progress_callback_stops_the_build():
    from pipeline.forest import Forest

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        Forest.build(repro_data(800, 20), metric="euclidean", n_trees=40, leaf_size=16, n_threads=2, progress=stop)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        sys.exit("usage: python tests/test_forest_repro.py --child OUT_DIR N_THREADS")
