"""grove's forest vs Annoy, interleaved: both measured in alternation in one process, several rounds.

    .venv/bin/python benchmarks/ann_interleaved.py                        # MNIST + GloVe-400k, n_trees 10 50
    .venv/bin/python benchmarks/ann_interleaved.py --dataset mnist --n-trees 10 --queries 300 --rounds 2

On a shared machine the speed drifts within minutes, so a ratio between two systems measured minutes
apart (as benchmarks/ann.py measures them: every grove point, then every Annoy point) can be off by
the drift. Here every measurement of one system is paired with the same measurement of the other
taken right after it, and each pair is repeated in several rounds; the tables give the median and
the range of the paired ratios.

For every dataset and n_trees, everything on one thread (NUMBA_NUM_THREADS=1, ``n_threads=1``,
Annoy ``n_jobs=1``; BLAS also on one thread):

* builds, in this process: grove, Annoy, grove, Annoy, ... (``--rounds`` each); grove's time is
  ``Forest.build`` (as benchmarks/ann.py times it), Annoy's is ``index.build`` after ``add_item``.
  ``Forest.build`` neither logs nor returns the time it spends choosing the split basis, so after
  each grove build the same internal steps (``_prepare_vectors``, ``_split_basis``, ``_project``,
  ``byte_codes``) are timed again on their own and reported as "split space";
* queries: ``--rounds`` rounds; in each, for every search_k of one sweep shared by both systems,
  grove then Annoy answer the same queries one at a time (a warm-up of ``--warmup`` queries at that
  search_k first, untimed). grove via ``Forest.query(q, 10, search_k)``, Annoy via
  ``get_nns_by_vector(list, 10, search_k)`` as ann-benchmarks calls it. A system's sweep stops once
  its recall reaches 0.995 or a pass takes longer than ``--max-pass-seconds`` (decided in round 1; the
  later rounds repeat the same settings). recall@10 is ann-benchmarks' (benchmarks/ann.py's
  ``recall``) against exact ground truth computed once; QPS at recall 0.90/0.95/0.99 is
  interpolated per round along each system's sweep (benchmarks/ann.py's ``qps_at``), and the ratio
  grove/Annoy is taken within the round.

Prints markdown tables on stdout (and writes them to ``--out`` if given); progress goes to stderr.
"""

from __future__ import annotations

import os

# before numpy/numba are imported: one thread everywhere (the comparison is single-threaded)
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ann  # noqa: E402  (benchmarks/ann.py: loaders, recall, qps_at, machine description)

K = ann.K
TARGETS = ann.TARGETS
SEARCH_KS = (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 102400, 204800)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- builds


def split_space_seconds(base: np.ndarray, metric: str) -> dict | None:
    """Wall seconds of the steps ``Forest.build`` takes before its trees, timed on their own:
    {"prepare", "basis", "project_codes"} (None if grove's internals no longer have these names)."""
    from pipeline import _forest_kernels as k
    from pipeline import forest as fm

    steps = ("_prepare_vectors", "_split_basis", "_project", "resolved_build_params")
    if not all(hasattr(fm, s) for s in steps) or not hasattr(k, "byte_codes"):
        return None
    x32 = np.array(base, dtype=np.float32, order="C", copy=True)
    t0 = time.perf_counter()
    data = fm._prepare_vectors(x32, metric, 1)
    t1 = time.perf_counter()
    split_dim = fm.resolved_build_params(base.shape[1], metric)["split_dim"]
    if not split_dim:
        return {"prepare": t1 - t0, "basis": 0.0, "project_codes": 0.0}
    basis = fm._split_basis(data, split_dim, 0)
    t2 = time.perf_counter()
    k.byte_codes(fm._project(data, basis, 1))
    t3 = time.perf_counter()
    return {"prepare": t1 - t0, "basis": t2 - t1, "project_codes": t3 - t2}


def interleaved_builds(base: np.ndarray, metric: str, n_trees: int, rounds: int):
    """grove, Annoy, grove, Annoy, ...: per-round timings and the last round's two indexes."""
    import annoy
    from pipeline.forest import Forest

    out, forest, index = [], None, None
    for r in range(rounds):
        forest = index = None
        gc.collect()
        la = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        forest = Forest.build(base, metric=metric, n_trees=n_trees, seed=0, n_threads=1)
        g_wall, g_cpu = time.perf_counter() - t0, time.process_time() - c0
        split = split_space_seconds(base, metric)
        index = annoy.AnnoyIndex(base.shape[1], metric)
        t0 = time.perf_counter()
        for i, row in enumerate(base):
            index.add_item(i, row)
        add_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        index.build(n_trees, n_jobs=1)
        a_wall, a_cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"grove": g_wall, "grove_cpu": g_cpu, "annoy": a_wall, "annoy_cpu": a_cpu, "annoy_add": add_s,
               "split": split, "load": la}
        out.append(row)
        log(f"    build round {r + 1}: grove {g_wall:.2f}s (split space "
            f"{'n/a' if split is None else f'{sum(split.values()):.2f}s'}), annoy {a_wall:.2f}s "
            f"(add_item {add_s:.1f}s), ratio {g_wall / a_wall:.2f}, load {la:.2f}")
    return out, forest, index


# ------------------------------------------------------------------------------------ queries


def timed_pass(query_one, queries, sk: int, warmup: int) -> tuple[float, float, list]:
    """(wall s, CPU s, answers) of one query at a time over all queries, after an untimed warm-up."""
    for q in queries[:warmup]:
        query_one(q, sk)
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    ids = [query_one(q, sk) for q in queries]
    return time.perf_counter() - t0, time.process_time() - c0, ids


def interleaved_queries(forest, index, base, queries, true_d, metric, args) -> list[dict]:
    """rounds x {"grove": [points], "annoy": [points]}; a point is {search_k, recall, qps, cpu_qps}."""
    qlists = [q.tolist() for q in queries]  # Annoy takes lists, as ann-benchmarks passes them
    systems = {
        "grove": (lambda q, sk: forest.query(q, K, sk), queries),
        "annoy": (lambda q, sk: index.get_nns_by_vector(q, K, sk), qlists),
    }
    for name, (fn, qs) in systems.items():  # first calls: kernels, scratch, pages of the index
        for q in qs[: args.warmup]:
            fn(q, 100)
    plan = {name: [] for name in systems}  # the settings each system runs, fixed by round 1
    nq = len(queries)
    rounds = []
    for r in range(args.rounds):
        res = {name: [] for name in systems}
        active = set(systems)
        la = os.getloadavg()[0]
        for sk in SEARCH_KS:
            for name, (fn, qs) in systems.items():  # grove, then Annoy, at this setting
                if (r == 0 and name not in active) or (r > 0 and sk not in plan[name]):
                    continue
                wall, cpu, ids = timed_pass(fn, qs, sk, args.warmup)
                pt = {"search_k": sk, "recall": ann.recall(ids, base, queries, true_d, metric),
                      "qps": nq / wall, "cpu_qps": nq / max(cpu, 1e-9)}
                res[name].append(pt)
                log(f"    round {r + 1} {name:5s} search_k={sk:7d} recall={pt['recall']:.4f} qps={pt['qps']:9.1f}")
                if r == 0:
                    plan[name].append(sk)
                    if pt["recall"] >= 0.995 or wall > args.max_pass_seconds:
                        active.discard(name)
            if r == 0 and not active:
                break
        res["load"] = la
        rounds.append(res)
    return rounds


# ------------------------------------------------------------------------------------- report


def med_range(values, fmt="{:.2f}") -> str:
    vals = [v for v in values if v is not None]
    if len(vals) < len(values) or not vals:
        return "n/r"
    return f"{fmt.format(float(np.median(vals)))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


def build_tables(results: dict) -> list[str]:
    lines = ["| dataset | n_trees | grove build (s) | Annoy build (s) | grove/Annoy per round | "
             "grove/Annoy median (range) | grove split space (s, median): basis + projection & codes | "
             "grove without split space / Annoy, median (range) |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for (ds, nt), res in results.items():
        b = res["builds"]
        ratios = [x["grove"] / x["annoy"] for x in b]
        have_split = all(x["split"] is not None for x in b)
        if have_split:
            basis = [x["split"]["basis"] for x in b]
            pc = [x["split"]["project_codes"] for x in b]
            split_cell = f"{np.median(basis):.2f} + {np.median(pc):.2f}"
            rest = [(x["grove"] - x["split"]["basis"] - x["split"]["project_codes"]) / x["annoy"] for x in b]
            rest_cell = med_range(rest)
        else:
            split_cell = rest_cell = "n/a"
        lines.append(
            f"| {ds} | {nt} | {med_range([x['grove'] for x in b])} | {med_range([x['annoy'] for x in b])} | "
            f"{', '.join(f'{v:.2f}' for v in ratios)} | {med_range(ratios)} | {split_cell} | {rest_cell} |")
    return lines


def query_tables(results: dict) -> list[str]:
    lines = ["| dataset | n_trees | recall | grove QPS median (range) | Annoy QPS median (range) | "
             "grove/Annoy per round | grove/Annoy median (range) | CPU-time ratio median (range) |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for (ds, nt), res in results.items():
        for tgt in TARGETS:
            g = [ann.qps_at(r["grove"], tgt) for r in res["queries"]]
            a = [ann.qps_at(r["annoy"], tgt) for r in res["queries"]]
            ratios = [None if x is None or y is None else x / y for x, y in zip(g, a)]
            gc_ = [ann.qps_at(r["grove"], tgt, "cpu_qps") for r in res["queries"]]
            ac_ = [ann.qps_at(r["annoy"], tgt, "cpu_qps") for r in res["queries"]]
            cratios = [None if x is None or y is None else x / y for x, y in zip(gc_, ac_)]
            lines.append(
                f"| {ds} | {nt} | {tgt:.2f} | {med_range(g, '{:,.0f}')} | {med_range(a, '{:,.0f}')} | "
                f"{', '.join('n/r' if v is None else f'{v:.2f}' for v in ratios)} | {med_range(ratios)} | "
                f"{med_range(cratios)} |")
    return lines


def sweep_table(results: dict) -> list[str]:
    lines = ["| dataset | n_trees | search_k | grove recall@10 | grove QPS per round | Annoy recall@10 | "
             "Annoy QPS per round |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (ds, nt), res in results.items():
        ks = sorted({p["search_k"] for r in res["queries"] for s in ("grove", "annoy") for p in r[s]})
        for sk in ks:
            cells = []
            for s in ("grove", "annoy"):
                pts = [next((p for p in r[s] if p["search_k"] == sk), None) for r in res["queries"]]
                if any(p is None for p in pts):
                    cells += ["-", "-"]
                    continue
                recalls = sorted({f"{p['recall']:.4f}" for p in pts})
                cells += ["/".join(recalls), " / ".join(f"{p['qps']:,.0f}" for p in pts)]
            lines.append(f"| {ds} | {nt} | {sk} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", default=["mnist", "glove"], choices=["mnist", "glove", "glove100k"])
    p.add_argument("--n-trees", nargs="+", type=int, default=[10, 50])
    p.add_argument("--queries", type=int, default=1000, help="queries per pass (the same ones in every pass)")
    p.add_argument("--rounds", type=int, default=3, help="build rounds and query rounds")
    p.add_argument("--warmup", type=int, default=50, help="untimed queries before every timed pass")
    p.add_argument("--max-pass-seconds", type=float, default=15.0, help="stop a system's sweep after a slower pass")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)

    from pipeline.exact import exact_neighbors
    from pipeline.forest import Forest

    command = " ".join(["python benchmarks/ann_interleaved.py", *(sys.argv[1:] if argv is None else argv)])
    resolved = (f"--dataset {' '.join(args.dataset)} --n-trees {' '.join(map(str, args.n_trees))} "
                f"--queries {args.queries} --rounds {args.rounds} --warmup {args.warmup} "
                f"--max-pass-seconds {args.max_pass_seconds:g}")
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start = time.perf_counter()
    results, descriptions = {}, {}
    for ds in args.dataset:
        base, queries, metric, desc = ann.load_dataset(ds, args.queries)
        descriptions[ds] = desc
        log(f"== {ds}: base {base.shape}, queries {queries.shape}, {metric}")
        _, true_d = exact_neighbors(base, queries, K, metric)
        Forest.build(base[:500], metric=metric, n_trees=2, n_threads=1)  # load the compiled kernels
        for nt in args.n_trees:
            log(f"  n_trees={nt}")
            builds, forest, index = interleaved_builds(base, metric, nt, args.rounds)
            rounds = interleaved_queries(forest, index, base, queries, true_d, metric, args)
            results[(ds, nt)] = {"builds": builds, "queries": rounds}
            index.unload()
            del forest, index
            gc.collect()
    minutes = (time.perf_counter() - t_start) / 60
    load_end = os.getloadavg()

    lines = [f"Command: `{command}` (options in effect: `{resolved}`; {started}, {minutes:.1f} min).", "",
             f"Machine: {ann.machine()}. Load average (1/5/15 min) at start "
             f"{load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at end "
             f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}.", ""]
    for d in descriptions.values():
        lines += [f"Data: {d}.", ""]
    lines += [f"Everything on one thread; {args.rounds} rounds; {args.queries} queries per pass, one at a time, "
              f"after {args.warmup} untimed warm-up queries at the same search_k. search_k sweep: "
              f"{', '.join(map(str, SEARCH_KS))}, shared by both systems; a system stops at recall@10 >= 0.995 or "
              f"after a pass over {args.max_pass_seconds:g} s. Median over the rounds, range in parentheses; every "
              "ratio is grove/Annoy within one round.", ""]
    lines += ["Builds (grove, Annoy, grove, Annoy, ... in one process; grove: `Forest.build`, Annoy: "
              "`build(n_trees, n_jobs=1)` after `add_item`). \"Split space\" is grove's choice of the split basis "
              "plus projecting the rows into it and coding them, timed separately right after each grove build "
              "(`Forest.build` does not report it); the last column subtracts it from grove's build:", ""]
    lines += build_tables(results) + [""]
    lines += ["QPS at equal recall@10 (interpolated per round along each system's sweep; grove and Annoy "
              "alternate setting by setting). The CPU-time column uses process CPU seconds instead of wall "
              "seconds:", ""]
    lines += query_tables(results) + [""]
    loads = {f"{ds} {nt}": [f"{r['load']:.2f}" for r in res["queries"]] for (ds, nt), res in results.items()}
    lines += ["Load average (1 min) at the start of each query round: "
              + "; ".join(f"{k}: {', '.join(v)}" for k, v in loads.items()) + ".", ""]
    lines += ["<details><summary>Every sweep point (QPS per round, wall time)</summary>", ""]
    lines += sweep_table(results) + ["", "</details>", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    log(f"done in {minutes:.1f} min")


if __name__ == "__main__":
    main()
