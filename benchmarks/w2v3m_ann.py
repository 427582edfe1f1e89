"""grove's forest against Annoy on a built word chain (issue 14: the 3M x 300 GoogleNews shape), in one run.

    GROVE_CONFIGS=/work/data-w2v3m/configs GROVE_ARTIFACTS=/work/art-3m GROVE_SCRATCH=/work/scratch-3m \\
        /usr/bin/time -v .venv/bin/python benchmarks/w2v3m_ann.py --out /tmp/w2v3m_ann.md

    # a small root to try it on
    GROVE_ARTIFACTS=/tmp/ann-small GROVE_MIRROR=file:///work/shared/data .venv/bin/grove run glove100k
    GROVE_ARTIFACTS=/tmp/ann-small .venv/bin/python benchmarks/w2v3m_ann.py --dataset glove100k --text "chinese river"

Everything is read through the artifacts of the dataset's newest evaluation (``evaluate/latest``): its
split (base and held-out queries, memory-mapped), its exact stage (neighbors/distances, the ground
truth of the split's queries) and its forests (one per n_trees, whose manifest params give the
leaf_size and split_dim the rebuild here uses). Everything below runs on ONE thread (numba, BLAS,
grove ``n_threads=1``, Annoy ``n_jobs=1``), in this order, one n_trees at a time:

1. builds over the same memory-mapped base rows: grove ``Forest.build(base, "angular", T,
   leaf_size, seed=0, n_threads=1, split_dim)`` (the result is compared with the forest version's
   arrays: same parameters and seed give the same bytes), then Annoy (``add_item`` of every row,
   timed apart, then ``build(T, n_jobs=1)``; saved to the scratch directory for its size). Index
   bytes: the forest version's ``index_bytes`` and the Annoy file. The 50-tree Annoy build is run
   only when 5x the 10-tree one's tree-building time (plus its add_item time) stays under
   ``--annoy-max-minutes``; otherwise that extrapolation is reported, labelled as one.
2. queries, interleaved: for every search_k of the sweep, grove answers the queries one at a time,
   then Annoy the same ones (each after an untimed warm-up of ``--warmup`` queries at that
   search_k). grove answers from the forest version (memory-mapped; the bytes just rebuilt), Annoy
   from the file it saved (memory-mapped); both files are read through once before the sweep so
   neither pays the disk. A pass stops after ``--max-pass-seconds`` (at least 100 queries): the
   table says how many queries each point timed, and its recall is over those. recall@10 is
   ``pipeline.evaluate.recall_at_k`` (ann-benchmarks' definition, RECALL_EPSILON tie tolerance)
   against the exact stage's first 10 distances, with both systems' answers re-measured by one
   formula (``pipeline.exact.pairwise_distances`` on normalised rows). A system's sweep ends when
   its recall reaches 0.995.
3. "chinese river" (``--text``): (a) ``grove query DATASET TEXT --approx-only`` and ``--exact`` from
   fresh processes (the environment this script was started with, so GROVE_CONFIGS and
   GROVE_ARTIFACTS must name the chain), timed from outside (wall, CPU and peak RSS through
   ``os.wait4``), one untimed run each first, then ``--cold-runs`` alternating runs; (b) the warm
   ``open_index(...).query_text(TEXT, k=10)`` in this process, median of ``--warm-runs``; (c)
   ``query_text(TEXT, k=10, exact=True)`` (exhaustive search of every base row, one BLAS thread
   here), median of ``--exact-runs``.

Prints markdown tables (and writes them to ``--out``); progress goes to stderr. The load average is
printed at the start and at the end.
"""

from __future__ import annotations

import os

_USER_ENV = dict(os.environ)  # what the `grove query` child processes get: the user's own settings
# before numpy/numba are imported: one thread everywhere (the comparison is single-threaded)
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

K = 10
TARGETS = (0.90, 0.95, 0.99)
SEARCH_KS = (500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
STOP_RECALL = 0.995
MIN_TIMED = 100  # queries a pass times at least, however slow


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    import importlib.metadata as md

    import numba

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, numpy "
            f"{np.__version__}, numba {numba.__version__}, annoy {md.version('annoy')}")


def median_range(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


# ---------------------------------------------------------------------------------- the chain


class Chain:
    """The versions of a dataset's newest evaluation: split (base, queries), exact, forests."""

    def __init__(self, dataset: str, root: str):
        from pipeline import api, artifacts, layout
        from pipeline.vectors import read_vectors

        t0 = time.perf_counter()
        self.index = api.open_index(dataset, root=root, version="latest")  # verified (sha256 once per change)
        self.open_seconds = time.perf_counter() - t0
        self.root, self.dataset = root, dataset
        ev_ref = artifacts.ref_from_key(root, layout.version_key(dataset, layout.SERVED_STAGE, self.index.version))
        self.evaluate = artifacts.read_manifest(ev_ref, verify="none")
        parents = self.evaluate["parents"]
        split = artifacts.ref_from_key(root, parents["split"])
        exact = artifacts.ref_from_key(root, parents["exact"])
        self.versions = {"evaluate": self.index.version, "split": split.version, "exact": exact.version}
        split_dir, exact_dir = artifacts.local_dir(split), artifacts.local_dir(exact)
        base = read_vectors(split_dir / layout.BASE)
        self.base, self.meta = base.vectors, base.meta
        self.queries = np.ascontiguousarray(read_vectors(split_dir / layout.QUERIES).vectors, dtype=np.float32)
        self.true_ids = np.load(exact_dir / layout.NEIGHBORS, mmap_mode="r")
        self.true_d = np.asarray(np.load(exact_dir / layout.DISTANCES, mmap_mode="r")[:, :K], dtype=np.float64)
        if self.true_d.shape[0] != len(self.queries):
            raise SystemExit(f"{exact_dir}: ground truth for {self.true_d.shape[0]} queries, the split has "
                             f"{len(self.queries)}")
        self.metric = self.index.metric
        self.forests = {}  # n_trees -> {"ref", "dir", "params", "metrics"}
        for name, key in parents.items():
            if name.startswith("forest_"):
                ref = artifacts.ref_from_key(root, key)
                m = artifacts.read_manifest(ref, verify="none")
                self.forests[int(m["params"]["n_trees"])] = {
                    "version": ref.version, "dir": artifacts.local_dir(ref) / layout.INDEX_DIR,
                    "params": m["params"], "metrics": m.get("metrics", {})}


def normalized(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def recall10(chain: Chain, answers: list, n: int) -> float:
    """Mean recall@10 of the first n answers (lists of base ids), their distances re-measured here."""
    from pipeline.evaluate import recall_at_k
    from pipeline.exact import pairwise_distances

    found = np.full((n, K), np.inf)
    for i in range(n):
        ids = np.asarray(answers[i][:K], dtype=np.int64)
        if len(ids):
            rows = np.asarray(chain.base[ids], dtype=np.float32)
            q = chain.queries[i : i + 1]
            if chain.metric == "angular":
                rows, q = normalized(rows), normalized(q)
            found[i, : len(ids)] = pairwise_distances(q, rows, chain.metric)[0]
    return float(recall_at_k(found, chain.true_d[:n], K).mean())


def page_in(paths: list[Path]) -> float:
    """Read files through once (into the page cache); seconds taken."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t0


def dir_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


# -------------------------------------------------------------------------------------- builds


def warm_kernels(chain: Chain, leaf_size: int, split_dim: int) -> float:
    """Compile (or load from numba's cache) every kernel a build and a query call, on a small forest."""
    from pipeline.exact import exact_neighbors
    from pipeline.forest import Forest

    t0 = time.perf_counter()
    sample = np.asarray(chain.base[:5000], dtype=np.float32)
    f = Forest.build(sample, metric=chain.metric, n_trees=2, leaf_size=leaf_size, seed=0, n_threads=1,
                     split_dim=split_dim)
    for q in chain.queries[:5]:
        f.query(q, k=K, search_k=1000)
    exact_neighbors(sample, chain.queries[:2], K, chain.metric)
    return time.perf_counter() - t0


def build_grove(chain: Chain, n_trees: int) -> dict:
    from pipeline.forest import Forest

    info = chain.forests[n_trees]
    params = info["params"]
    gc.collect()
    la = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    forest = Forest.build(chain.base, metric=params["metric"], n_trees=n_trees, leaf_size=params["leaf_size"],
                          seed=params["seed"], n_threads=1, split_dim=params["split_dim"] or None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # same parameters and seed: the arrays must be the forest version's (checked, so that the sweep
    # below, which answers from that version, measures the index whose build was timed)
    stored = Forest.load(info["dir"])
    same = all(np.array_equal(np.asarray(a), np.asarray(stored.arrays()[name]))
               for name, a in forest.arrays().items())
    array_bytes = sum(np.asarray(a).nbytes for a in forest.arrays().values())
    del forest, stored
    gc.collect()
    disk = sum(p.stat().st_size for p in dir_files(info["dir"]))
    row = {"system": "grove", "n_trees": n_trees, "wall": wall, "cpu": cpu, "add": None,
           "bytes": info["metrics"].get("index_bytes", disk), "disk_bytes": disk, "array_bytes": array_bytes,
           "same_as_version": same, "load": la, "measured": True,
           "note": f"leaf_size {params['leaf_size']}, split_dim {params['split_dim']}; "
                   f"{'identical to' if same else 'DIFFERENT from'} forest {info['version']}"}
    log(f"grove build n_trees={n_trees}: {wall:.1f}s wall, {cpu:.1f}s CPU; identical to version: {same}")
    return row


def build_annoy(chain: Chain, n_trees: int, path: Path) -> dict:
    import annoy

    gc.collect()
    la = os.getloadavg()[0]
    n, dim = chain.base.shape
    index = annoy.AnnoyIndex(dim, chain.metric)
    t0 = time.perf_counter()
    step = max(1, n // 10)
    for i in range(n):
        index.add_item(i, chain.base[i].tolist())
        if (i + 1) % step == 0:
            log(f"  annoy add_item {i + 1:,}/{n:,} ({time.perf_counter() - t0:.0f}s)")
    add = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    index.build(n_trees, n_jobs=1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    index.save(str(path))
    index.unload()
    del index
    gc.collect()
    size = path.stat().st_size
    log(f"annoy build n_trees={n_trees}: add_item {add:.1f}s, build {wall:.1f}s wall, {cpu:.1f}s CPU, "
        f"{size / 1e9:.2f} GB")
    return {"system": "Annoy", "n_trees": n_trees, "wall": wall, "cpu": cpu, "add": add, "bytes": size,
            "load": la, "measured": True, "note": "add_item timed apart (rows passed as lists)"}


def annoy_extrapolated(ten: dict, n_trees: int, n: int, dim: int) -> dict:
    """Annoy's n_trees build from its 10-tree one: tree time x n_trees/10; file = items + trees x n_trees/10."""
    item_bytes = n * (12 + 4 * dim)  # angular node: n_descendants, two children, dim floats
    scale = n_trees / ten["n_trees"]
    return {"system": "Annoy", "n_trees": n_trees, "wall": ten["wall"] * scale, "cpu": ten["cpu"] * scale,
            "add": ten["add"], "bytes": int(item_bytes + (ten["bytes"] - item_bytes) * scale), "load": None,
            "measured": False,
            "note": f"EXTRAPOLATED from the 10-tree build (x{scale:g} its tree time and tree bytes), not run"}


# ------------------------------------------------------------------------------------- queries


def timed_pass(fn, qs, warmup: int, max_seconds: float) -> tuple[int, float, float, list]:
    """(queries timed, wall s, CPU s of this process, answers): one query at a time in order, after
    an untimed warm-up; stops once max_seconds have passed (at least MIN_TIMED queries)."""
    for q in qs[:warmup]:
        fn(q)
    gc.collect()
    answers = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, q in enumerate(qs):
        answers.append(fn(q))
        if i + 1 >= MIN_TIMED and time.perf_counter() - t0 > max_seconds:
            break
    return len(answers), time.perf_counter() - t0, time.process_time() - c0, answers


def sweep(chain: Chain, n_trees: int, annoy_path: Path | None, args) -> dict:
    """{"grove": [points], "Annoy": [points]}; a point is {search_k, recall, qps, n}."""
    import annoy

    from pipeline.forest import Forest

    info = chain.forests[n_trees]
    forest = Forest.load(info["dir"])
    files = dir_files(info["dir"]) + ([annoy_path] if annoy_path else [])
    log(f"  paged in the indexes in {page_in(files):.1f}s")
    qs = chain.queries[: args.queries]
    qlists = [q.tolist() for q in qs]
    systems = {"grove": (lambda q, sk: forest.query(q, k=K, search_k=sk), qs)}
    index = None
    if annoy_path is not None:
        index = annoy.AnnoyIndex(chain.base.shape[1], chain.metric)
        index.load(str(annoy_path))
        systems["Annoy"] = (lambda q, sk: index.get_nns_by_vector(q, K, search_k=sk), qlists)
    for fn, q in systems.values():  # first calls: scratch arrays, the kernels
        for x in q[:5]:
            fn(x, 1000)
    out = {name: [] for name in systems}
    active = set(systems)
    for sk in args.search_k:
        for name, (fn, q) in systems.items():
            if name not in active:
                continue
            n, wall, cpu, answers = timed_pass(lambda x: fn(x, sk), q, args.warmup, args.max_pass_seconds)
            pt = {"search_k": sk, "recall": recall10(chain, answers, n), "qps": n / wall,
                  "cpu_qps": n / max(cpu, 1e-9), "n": n,
                  "load": os.getloadavg()[0]}
            out[name].append(pt)
            log(f"  n_trees={n_trees} {name:5s} search_k={sk:7d} recall@10={pt['recall']:.4f} "
                f"qps={pt['qps']:9.1f} cpu-qps={pt['cpu_qps']:9.1f} ({n} queries, load {pt['load']:.2f})")
            if pt["recall"] >= STOP_RECALL:
                active.discard(name)
        if not active:
            break
    if index is not None:
        index.unload()
    return out


def smallest_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in sorted(points, key=lambda p: p["search_k"]) if p["recall"] >= target), None)


# ---------------------------------------------------------------------------------- the phrase


def grove_command() -> list[str]:
    script = Path(sys.executable).parent / "grove"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tasks.cli"]


TIME = Path("/usr/bin/time")


def run_child(cmd: list[str], env: dict) -> dict:
    """One fresh process: wall s (perf_counter around it), CPU s (os.wait4), peak RSS and its output.

    Peak RSS comes from GNU time wrapped around the command when /usr/bin/time exists (its own
    start-up, about a millisecond, is then inside the wall time): os.wait4's ru_maxrss of a child
    of this process is useless, because Linux carries the RSS of the memory image a process had
    before exec into its maxrss, and Python starts children with vfork, sharing this process's
    image (gigabytes of mapped index here). "rss" is None without /usr/bin/time."""
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        wrapped = [str(TIME), "-f", "%M", "-o", rss_file.name, *cmd] if TIME.is_file() else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
        rss_text = rss_file.read().strip().splitlines() if TIME.is_file() else []
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{text[-3000:]}")
    rss = int(rss_text[-1]) * 1024 if rss_text and rss_text[-1].isdigit() else None
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": rss, "out": text}


def phrase(chain: Chain, args, grove_s90: int | None) -> tuple[list[dict], dict]:
    """Rows of the phrase table and the answers shown with it."""
    env = dict(_USER_ENV, GROVE_ARTIFACTS=str(chain.root))
    base_cmd = grove_command() + ["query", chain.dataset, args.text]
    commands = {"approx": base_cmd + ["--approx-only"], "exact": base_cmd + ["--exact"]}
    if grove_s90 is not None:
        commands["approx90"] = base_cmd + ["--approx-only", "--search-k", str(grove_s90)]
    runs = {name: [] for name in commands}
    first = {}
    for name, cmd in commands.items():  # untimed in the medians: numba cache, verified-stamps, page cache
        first[name] = run_child(cmd, env)
        log(f"  cold {name} first run: {first[name]['wall']:.2f}s")
    for r in range(args.cold_runs):
        for name, cmd in commands.items():
            runs[name].append(run_child(cmd, env))
            log(f"  cold {name} run {r + 1}: {runs[name][-1]['wall']:.2f}s")
    rows = []
    labels = {"approx": f"cold process: `grove query {chain.dataset} \"{args.text}\" --approx-only` (default search_k)",
              "approx90": f"cold process: same with `--search-k {grove_s90}` (grove's recall-0.90 setting, "
                          f"{max(chain.forests)} trees)",
              "exact": f"cold process: `grove query {chain.dataset} \"{args.text}\" --exact`"}
    for name in commands:
        rr = runs[name]
        rss = [r["rss"] for r in rr if r["rss"] is not None]
        rows.append({"what": labels[name], "n": len(rr), "median": median_range([r["wall"] for r in rr]) + " s",
                     "extra": f"CPU {statistics.median(r['cpu'] for r in rr):.2f} s, peak RSS "
                              f"{f'{max(rss) / 2**20:,.0f} MiB' if rss else 'n/a'}; first (untimed) run "
                              f"{first[name]['wall']:.2f} s"})

    index = chain.index
    n_trees = index.n_trees
    t0 = time.perf_counter()
    vec, exclude = index.text_vector(args.text)
    lookup = time.perf_counter() - t0

    def warm(search_k, exact=False, runs=args.warm_runs, call=None):
        call = call or (lambda: index.query_text(args.text, k=K, search_k=search_k, exact=exact))
        first = []
        for _ in range(3):  # untimed in the median
            t0 = time.perf_counter()
            call()
            first.append(time.perf_counter() - t0)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            hits = call()
            times.append(time.perf_counter() - t0)
        log(f"  warm search_k={search_k} exact={exact}: " + " ".join(f"{t * 1e3:.2f}" for t in times) + " ms")
        slow = int(np.argmax(times))
        note = (f"warm-up calls {', '.join(f'{t * 1e3:.2f}' for t in first)} ms; slowest timed call #{slow + 1} "
                f"{times[slow] * 1e3:.2f} ms")
        return times, hits, note

    t_def, approx, note = warm(None)
    rows.append({"what": f"warm, in process: `query_text(\"{args.text}\", k=10)` ({n_trees} trees, default "
                         f"search_k = (k + {len(exclude)} own words) x n_trees)", "n": len(t_def),
                 "median": median_range(t_def, 1e3, "{:.2f}") + " ms", "extra": note})
    t_vec, _, note = warm(None, call=lambda: index.query(vec, k=K, exclude=exclude))
    rows.append({"what": "warm, in process: `query(vector, k=10, exclude=its words)`, the phrase's vector looked "
                         "up once (the search alone)", "n": len(t_vec),
                 "median": median_range(t_vec, 1e3, "{:.2f}") + " ms", "extra": note})
    if grove_s90 is not None:
        t90, approx90, note = warm(grove_s90)
        rows.append({"what": f"warm, in process: `query_text` with search_k={grove_s90}", "n": len(t90),
                     "median": median_range(t90, 1e3, "{:.2f}") + " ms", "extra": note})
    t_ex, truth, note = warm(None, exact=True, runs=args.exact_runs)
    rows.append({"what": f"exhaustive, in process: `query_text(\"{args.text}\", k=10, exact=True)` "
                         f"(every one of {index.count:,} rows; 1 BLAS thread)", "n": len(t_ex),
                 "median": median_range(t_ex, 1.0, "{:.3f}") + " s",
                 "extra": f"base rows normalised beforehand: {chain.meta.get('model') == 'normalized'}; {note}"})
    answers = {"exact": truth.keys, "approx (default search_k)": approx.keys,
               "lookup_ms": lookup * 1e3, "cold_output": runs["approx"][-1]["out"] if runs["approx"] else "",
               "cold_exact_output": runs["exact"][-1]["out"] if runs["exact"] else ""}
    if grove_s90 is not None:
        answers[f"approx (search_k={grove_s90})"] = approx90.keys
    return rows, answers


# --------------------------------------------------------------------------------------- report


def report(chain: Chain, builds: list[dict], sweeps: dict, phrase_rows: list[dict], answers: dict, args,
           started: str, load_start: str) -> str:
    n, dim = chain.base.shape
    L = [f"# grove vs Annoy on {chain.dataset} ({n:,} x {dim}, {chain.metric}), one thread", "",
         f"Machine: {machine()}.", f"Artifacts: {chain.root}; evaluate {chain.versions['evaluate']}, split "
         f"{chain.versions['split']}, exact {chain.versions['exact']}, forests "
         + ", ".join(f"{t}: {f['version']}" for t, f in sorted(chain.forests.items())) + ".",
         f"Started {started}; load average at start {load_start}. Opening the index (with verification when "
         f"not yet stamped) took {chain.open_seconds:.1f} s.", "",
         "## Build (single thread, same memory-mapped base rows)", "",
         *(["(not run: --phrase-only)", ""] if not builds else []),
         "| n_trees | system | build s (wall) | build s (CPU) | Annoy add_item s | index bytes | load avg | note |",
         "|---:|---|---:|---:|---:|---:|---:|---|"]
    for b in builds:
        est = "" if b["measured"] else "~"
        add = "-" if b["add"] is None else f"{b['add']:.1f}"
        la = "-" if b["load"] is None else f"{b['load']:.2f}"
        L.append(f"| {b['n_trees']} | {b['system']} | {est}{b['wall']:.1f} | {est}{b['cpu']:.1f} | {add} | "
                 f"{est}{b['bytes'] / 1e9:.2f} GB | {la} | {b['note']} |")
    L += ["", f"## recall@10 and single-thread QPS along the sweep (up to {args.queries} queries per point, "
              f"{args.warmup} untimed warm-up queries first; a pass stops after {args.max_pass_seconds:g} s)", "",
          "QPS is queries / wall seconds; CPU-QPS is queries / CPU seconds of this process (what a busy "
          "neighbour does not take away).", "",
          "| n_trees | search_k | grove recall@10 | grove QPS | grove CPU-QPS | grove queries | Annoy recall@10 | "
          "Annoy QPS | Annoy CPU-QPS | Annoy queries |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nt, res in sweeps.items():
        ks = sorted({p["search_k"] for pts in res.values() for p in pts})
        for sk in ks:
            cells = []
            for name in ("grove", "Annoy"):
                p = next((p for p in res.get(name, []) if p["search_k"] == sk), None)
                cells += ["-"] * 4 if p is None else [f"{p['recall']:.4f}", f"{p['qps']:,.0f}",
                                                      f"{p['cpu_qps']:,.0f}", str(p["n"])]
            L.append(f"| {nt} | {sk:,} | " + " | ".join(cells) + " |")
    L += ["", "## Smallest search_k of the sweep reaching each recall, and the QPS there", "",
          "| n_trees | target recall@10 | grove search_k | grove recall | grove QPS | Annoy search_k | "
          "Annoy recall | Annoy QPS | grove / Annoy QPS | grove / Annoy CPU-QPS |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nt, res in sweeps.items():
        for tgt in TARGETS:
            cells, qps, cqps = [], [], []
            for name in ("grove", "Annoy"):
                if name not in res:
                    cells += ["not run"] * 3
                    qps.append(None)
                    cqps.append(None)
                    continue
                p = smallest_reaching(res[name], tgt)
                cells += ["not reached", "-", "-"] if p is None else [f"{p['search_k']:,}", f"{p['recall']:.4f}",
                                                                      f"{p['qps']:,.0f}"]
                qps.append(None if p is None else p["qps"])
                cqps.append(None if p is None else p["cpu_qps"])
            ratio = "-" if None in qps else f"{qps[0] / qps[1]:.2f}x"
            cratio = "-" if None in cqps else f"{cqps[0] / cqps[1]:.2f}x"
            L.append(f"| {nt} | {tgt:.2f} | " + " | ".join(cells) + f" | {ratio} | {cratio} |")
    L += ["", f"## \"{args.text}\"", "", "| measurement | runs | median (range) | notes |", "|---|---:|---:|---|"]
    for r in phrase_rows:
        L.append(f"| {r['what']} | {r['n']} | {r['median']} | {r['extra']} |")
    L += ["", f"First `text_vector` of the phrase on this handle (its words found in the key column, before any dict): {answers['lookup_ms']:.0f} ms."]
    truth = answers["exact"]
    for name, keys in answers.items():
        if name in ("lookup_ms", "cold_output", "cold_exact_output"):
            continue
        overlap = len(set(keys) & set(truth))
        L.append(f"- {name}: {', '.join(keys)}" + ("" if name == "exact" else f" ({overlap}/{len(truth)} of exact)"))
    L += ["", "Output of the last cold `--approx-only` run:", "", "```", answers["cold_output"].rstrip(), "```", ""]
    L.append(f"Load average at end: {load_avg()}.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="word2vec-google-news-300")
    p.add_argument("--root", default=None, help="artifact root (default: GROVE_ARTIFACTS / luigi.cfg, as grove's)")
    p.add_argument("--n-trees", nargs="+", type=int, default=[10, 50])
    p.add_argument("--search-k", nargs="+", type=int, default=list(SEARCH_KS))
    p.add_argument("--queries", type=int, default=1000, help="queries per pass (the split's first ones)")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries before every timed pass")
    p.add_argument("--max-pass-seconds", type=float, default=60.0)
    p.add_argument("--annoy-max-minutes", type=float, default=25.0,
                   help="run an Annoy build only if its extrapolated time (from the first) stays below this")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where Annoy's index files go (default GROVE_SCRATCH, else a temporary directory)")
    p.add_argument("--keep-annoy", action="store_true", help="keep Annoy's index files")
    p.add_argument("--text", default="chinese river")
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--warm-runs", type=int, default=20)
    p.add_argument("--exact-runs", type=int, default=5)
    p.add_argument("--phrase-only", action="store_true", help="only part 3 (the phrase), no builds or sweeps")
    p.add_argument("--phrase-search-k", type=int, default=None,
                   help="with --phrase-only: the search_k of the extra phrase rows (what the sweep found for "
                        "recall 0.90 at the most trees)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from pipeline import api

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = load_avg()
    print(f"load average at start: {load_start}", flush=True)
    root = str(args.root or api.default_root())
    chain = Chain(args.dataset, root)
    missing = [t for t in args.n_trees if t not in chain.forests]
    if missing:
        raise SystemExit(f"{args.dataset}: the evaluation {chain.versions['evaluate']} has no forest with "
                         f"n_trees {missing} (it has {sorted(chain.forests)})")
    log(f"{args.dataset}: {chain.base.shape[0]:,} x {chain.base.shape[1]} base, {len(chain.queries)} queries; "
        f"opened in {chain.open_seconds:.1f}s")
    scratch = Path(args.scratch or os.environ.get("GROVE_SCRATCH") or tempfile.gettempdir()) / "w2v3m_ann"
    scratch.mkdir(parents=True, exist_ok=True)
    first = chain.forests[args.n_trees[0]]["params"]
    log(f"warmed the kernels in {warm_kernels(chain, first['leaf_size'], first['split_dim'] or None):.1f}s")

    builds, sweeps, annoy_ten = [], {}, None
    for nt in ([] if args.phrase_only else args.n_trees):
        builds.append(build_grove(chain, nt))
        path = scratch / f"{args.dataset}-{nt}.ann"
        estimate = None
        if annoy_ten is not None:
            estimate = annoy_extrapolated(annoy_ten, nt, *chain.base.shape)
        if estimate is not None and (estimate["wall"] + estimate["add"]) / 60 > args.annoy_max_minutes:
            log(f"annoy n_trees={nt}: extrapolated {(estimate['wall'] + estimate['add']) / 60:.1f} min > "
                f"{args.annoy_max_minutes:g}: not run")
            builds.append(estimate)
            path = None
        else:
            row = build_annoy(chain, nt, path)
            builds.append(row)
            if annoy_ten is None:
                annoy_ten = row
        sweeps[nt] = sweep(chain, nt, path, args)
        if path is not None and not args.keep_annoy:
            path.unlink()

    if args.phrase_only:
        s90 = args.phrase_search_k
    else:
        p90 = smallest_reaching(sweeps[max(args.n_trees)]["grove"], 0.90)
        s90 = p90["search_k"] if p90 else None
    log("the phrase")
    phrase_rows, answers = phrase(chain, args, s90)
    text = report(chain, builds, sweeps, phrase_rows, answers, args, started, load_start)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
