"""What a fresh `grove query` process pays before it answers: imports, numba's cache, the warm-up.

Each test runs a new Python process (``subprocess``), as a command-line query does: what a module
imports, or where numba caches, can only be seen from a process that has not imported it yet.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Modules a query never needs: downloads (ssl, urllib.request, http.client), Luigi and the task
# modules, and the heavy optional libraries of other stages.
NOT_FOR_QUERIES = ("ssl", "urllib.request", "http.client", "luigi", "tasks", "torch", "gensim")


def run_python(code: str, cwd: Path = REPO, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON value on its last line, returned here."""
    full_env = {**os.environ, **env}
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved_forest(tmp_path_factory) -> Path:
    """A small saved index (angular, 40-d: with a split basis) and its vectors as an Arrow table."""
    from pipeline.forest import Forest
    from pipeline.vectors import write_vectors

    out = tmp_path_factory.mktemp("saved")
    x = np.random.default_rng(7).standard_normal((500, 40)).astype(np.float32)
    write_vectors(out / "base.arrow", x, [f"item/{i}" for i in range(len(x))])
    Forest.build(x, metric="angular", n_trees=3, seed=1).save(out / "index")
    return out


def test_a_query_imports_no_download_luigi_or_other_stages_code(saved_forest):
    """Opening an index and answering a query (what pipeline.api and `grove query` do) leaves the
    download stack, Luigi, the task modules, torch and gensim unimported."""
    seen = run_python(f"""
        import json, sys
        import numpy as np
        from pipeline import api, artifacts, config, query  # noqa: F401
        from pipeline.exact import exact_neighbors
        from pipeline.forest import Forest
        from pipeline.vectors import read_vectors
        base = read_vectors({str(saved_forest / "base.arrow")!r})
        forest = Forest.load({str(saved_forest / "index")!r}, metric="angular", dim=40)
        row = np.asarray(base.vectors[3], dtype=np.float32)
        forest.query(row, k=5)
        exact_neighbors(base.vectors, row[None, :], 5, "angular")
        print(json.dumps(sorted(m for m in {NOT_FOR_QUERIES!r} if m in sys.modules)))
    """)
    assert seen == []


def test_loading_an_index_loads_no_compiled_kernel(saved_forest):
    """Forest.load checks the trees' structure with numpy: a fresh process that only loads an index
    has not loaded (or compiled) any numba kernel, which costs a query about 0.15 s each."""
    loaded = run_python(f"""
        import json
        from numba.core.dispatcher import Dispatcher
        from pipeline import _forest_kernels
        from pipeline.forest import Forest
        Forest.load({str(saved_forest / "index")!r})
        print(json.dumps([name for name, obj in vars(_forest_kernels).items()
                          if isinstance(obj, Dispatcher) and obj.signatures]))
    """)
    assert loaded == []


def test_import_tasks_leaves_luigi_until_a_task_is_asked_for():
    """`import tasks` (what the `grove` script does first) imports no task module and no Luigi; asking
    for a task imports them, and Luigi then knows the task by name."""
    seen = run_python("""
        import json, sys
        import tasks
        before = sorted(m for m in ("luigi", "tasks.base", "tasks.chain", "tasks.rebuild") if m in sys.modules)
        chain = tasks.Chain
        import luigi
        print(json.dumps({"before": before, "chain": chain.__module__,
                          "registered": luigi.task_register.Register.get_task_cls("Chain") is chain}))
    """)
    assert seen == {"before": [], "chain": "tasks.chain", "registered": True}


def test_luigi_module_tasks_finds_every_task_by_name():
    """`luigi --module tasks Chain ...` imports Luigi, then the package, then looks the task up by
    name: with Luigi imported first, the package registers every task at once."""
    seen = run_python("""
        import json, sys
        import luigi
        import importlib
        importlib.import_module("tasks")  # what luigi's --module does
        names = ["Chain", "Evaluate", "Forest", "Rebuild", "DatedRecord", "Snapshot"]
        print(json.dumps({n: luigi.task_register.Register.get_task_cls(n).__module__ for n in names}))
    """)
    assert seen == {"Chain": "tasks.chain", "Evaluate": "tasks.chain", "Forest": "tasks.chain",
                    "Rebuild": "tasks.rebuild", "DatedRecord": "tasks.rebuild", "Snapshot": "tasks.chain"}


def test_settings_found_from_another_directory_reach_luigi(tmp_path):
    """The luigi.cfg found in a parent directory is what the tasks read, also when a task module is
    imported directly, before Luigi (tasks/settings.py adds it once Luigi is there)."""
    (tmp_path / "luigi.cfg").write_text("[grove]\nartifacts = /somewhere/else\nthreads = 3\n")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    seen = run_python("""
        import json
        from tasks.base import grove
        print(json.dumps({"artifacts": grove().artifacts, "threads": grove().threads}))
    """, cwd=below, LUIGI_CONFIG_PATH=None, PYTHONPATH=str(REPO))
    assert seen == {"artifacts": "/somewhere/else", "threads": 3}


def test_grove_cli_imports_no_luigi():
    """`grove` itself, its parser and its logging set-up import neither Luigi nor the stage registry
    (with every stage's imports): a query does not pay for them."""
    seen = run_python("""
        import json, sys
        import tasks.cli
        from tasks import logs
        tasks.cli.build_parser().parse_args(["query", "glove", "chinese river"])
        logs.setup(verbose=logs.verbose_setting(), luigi_summary=False)
        print(json.dumps(sorted(m for m in ("luigi", "tasks.base", "tasks.chain", "pipeline.stages",
                                            "pipeline.config") if m in sys.modules)))
    """)
    assert seen == []


def test_numba_cache_dir_from_the_environment_wins(tmp_path):
    cache = tmp_path / "numba-cache"
    seen = run_python("""
        import json
        from pipeline import _exact_kernels, _forest_kernels
        print(json.dumps([_forest_kernels.query_one.stats.cache_path, _exact_kernels.normalize_rows.stats.cache_path]))
    """, NUMBA_CACHE_DIR=str(cache))
    assert all(Path(p).is_relative_to(cache) for p in seen), seen


def read_only_copy(tmp_path: Path) -> Path:
    """A copy of the pipeline package whose own directory cannot be written: its __pycache__ is a
    file (so even root cannot create it) and, for other users, no file in it is writable."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "pipeline", site / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for package in [site / "pipeline", *(p for p in (site / "pipeline").rglob("*") if p.is_dir())]:
        (package / "__pycache__").write_text("not a directory\n")
    for path in site.rglob("*"):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return site


@pytest.mark.slow  # compiles every kernel once into an empty cache: a minute or two on 2 cores
def test_warm_fills_the_scratch_cache_of_a_read_only_install_and_a_query_then_compiles_nothing(tmp_path):
    """An installation whose package directory cannot be written caches its kernels in grove's
    scratch directory (numba alone would fall back to ~/.cache/numba, and fail without a writable
    home); `python -m pipeline.warm` fills it; a later process builds, saves, loads and queries an
    index and searches exactly without compiling anything."""
    site = read_only_copy(tmp_path)
    scratch = tmp_path / "scratch"
    no_home = tmp_path / "not-a-directory"
    no_home.write_text("")
    env = {"PYTHONPATH": str(site), "GROVE_SCRATCH": str(scratch), "NUMBA_CACHE_DIR": None,
           "XDG_CACHE_HOME": str(no_home / "cache"), "HOME": str(no_home)}
    warm = subprocess.run([sys.executable, "-m", "pipeline.warm"], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None}, timeout=1800)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert str(scratch / "numba") in warm.stderr  # the summary line names the cache
    assert list((scratch / "numba").rglob("*.nbi")), "warm-up stored nothing in the scratch cache"

    seen = run_python("""
        import json, tempfile
        import numpy as np
        import pipeline
        from numba.core.dispatcher import Dispatcher
        from pipeline import _exact_kernels, _forest_kernels
        from pipeline.exact import exact_neighbors, normalize_rows
        from pipeline.forest import Forest
        from pipeline.vectors import read_vectors, write_vectors
        tmp = tempfile.mkdtemp(dir=".")  # inside the test's tmp_path (the working directory)
        x = np.random.default_rng(3).standard_normal((700, 50)).astype(np.float32)
        write_vectors(tmp + "/base.arrow", x, [str(i) for i in range(len(x))])
        base = read_vectors(tmp + "/base.arrow")
        Forest.build(base.vectors, metric="angular", n_trees=4, seed=2).save(tmp + "/index")
        forest = Forest.load(tmp + "/index", metric="angular", dim=50)
        phrase = normalize_rows(np.sum(base.vectors[:2], axis=0, keepdims=True))[0]  # "chinese river"
        for q in (phrase, np.asarray(base.vectors[5], dtype=np.float32)):  # a word, an item key
            forest.query(q, k=10, include_distances=True)
            exact_neighbors(base.vectors, q[None, :], 10, "angular")
        kernels = [o for m in (_forest_kernels, _exact_kernels) for o in vars(m).values() if isinstance(o, Dispatcher)]
        print(json.dumps({"package": pipeline.__file__,
                          "compiled": sum(sum(k.stats.cache_misses.values()) for k in kernels),
                          "loaded": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                          "caches": sorted({k.stats.cache_path for k in kernels})}))
    """, cwd=tmp_path, **env)
    assert Path(seen["package"]).is_relative_to(site)
    assert seen["compiled"] == 0 and seen["loaded"] > 0, seen
    assert all(Path(p).is_relative_to(scratch / "numba") for p in seen["caches"]), seen["caches"]


def test_an_index_answers_without_numba_when_asked(saved_forest):
    """Forest.query(compiled=False) and the one-query exact search of pipeline._numpy_kernels run in a
    process that never imports numba (nor scipy, whose BLAS probe numba would start)."""
    seen = run_python(f"""
        import json, sys
        import numpy as np
        from pipeline import _numpy_kernels
        from pipeline.forest import Forest
        from pipeline.vectors import read_vectors
        base = read_vectors({str(saved_forest / "base.arrow")!r})
        forest = Forest.load({str(saved_forest / "index")!r}, metric="angular", dim=40)
        row = np.asarray(base.vectors[3], dtype=np.float32)
        ids, dists = forest.query(row, k=5, include_distances=True, compiled=False)
        exact_ids, _ = _numpy_kernels.exact_neighbors_one(base.vectors, row, 5, "angular")
        print(json.dumps({{"ids": ids.tolist(), "exact": exact_ids.tolist(),
                          "loaded": sorted(m for m in ("numba", "llvmlite", "scipy") if m in sys.modules)}}))
    """)
    assert seen["loaded"] == [] and seen["ids"][0] == 3 == seen["exact"][0]


from test_api import two_versions  # noqa: E402 - tinymnist built and serving, once per session


def test_grove_query_answers_without_numba_and_as_the_compiled_kernels_do(tmp_path_factory, tmp_path):
    """`grove query` in a fresh process: the numpy twins answer (numba is never imported) with the
    same keys and distances as the compiled kernels; a search_k above NUMPY_QUERY_MAX_SEARCH_K loads
    the compiled kernels instead, and they answer the same again."""
    from pipeline import api
    from tasks.cli import NUMPY_QUERY_MAX_SEARCH_K

    built = two_versions(tmp_path_factory)
    env = {**built["env"], "GROVE_SCRATCH": str(tmp_path / "scratch")}
    runs = {}
    for name, extra in (("numpy", []), ("compiled", ["--search-k", str(NUMPY_QUERY_MAX_SEARCH_K + 1)])):
        runs[name] = run_python(f"""
            import contextlib, io, json, sys
            import tasks.cli
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = tasks.cli.main(["query", "tinymnist", "test/3", "-k", "4", *{extra!r}])
            print(json.dumps({{"code": code, "lines": out.getvalue().splitlines(),
                              "numba": "numba" in sys.modules, "scipy": "scipy" in sys.modules,
                              "blas_probe": "scipy.linalg" in sys.modules}}))
        """, cwd=tmp_path, PYTHONPATH=str(REPO), **env)
    assert runs["numpy"]["code"] == 0 == runs["compiled"]["code"]
    assert (runs["numpy"]["numba"], runs["numpy"]["scipy"]) == (False, False)
    assert runs["compiled"]["numba"] and not runs["compiled"]["blas_probe"]  # numba's BLAS probe is skipped there
    assert runs["numpy"]["lines"][0].endswith("numpy kernels)")
    assert runs["compiled"]["lines"][0].endswith("compiled kernels)")
    with api.open_index("tinymnist", root=built["root"]) as index:
        approx = index.query_key("test/3", k=4)
        exact = index.query_key("test/3", k=4, exact=True)
        big = index.query_key("test/3", k=4, search_k=NUMPY_QUERY_MAX_SEARCH_K + 1)
    for name, hits in (("numpy", approx), ("compiled", big)):
        rows = [line.split() for line in runs[name]["lines"][2:]]
        assert [r[1] for r in rows] == approx.keys if name == "numpy" else big.keys
        assert [r[3] for r in rows] == exact.keys
        assert [r[2] for r in rows] == [f"{d:.4f}" for d in hits.distances]
        assert [r[4] for r in rows] == [f"{d:.4f}" for d in exact.distances]
