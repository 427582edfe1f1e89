"""The multi-worker run: one chain built by 1, 2 and 3 workers under a real luigid, on an artifact root on
a real S3 server (SeaweedFS), each worker standing in for its own machine (own working directory, HOME,
TMPDIR and grove scratch; tests/test_multiworker.py has the machinery).

Prints a markdown table: wall time, what each worker ran (task counts per family), the sum of the task
run times (from the workers' `done X in S s` lines), and the per-task overhead:
  (N * wall - sum of task times) / tasks   worker-seconds per task not spent inside a task's run()
                                           (process start, scheduling, waiting for luigid, idling on
                                           dependencies; for N = 1 it is (wall - sum) / tasks)
and a simple model for N real machines:
  T(N) ~ serial path + max(longest parallel task, parallel sum / N) + overhead * tasks / N
where the serial path is fetch -> decode -> embed -> split -> evaluate -> chain and the parallel part is
exact and the forests (which only need split), all measured in the 1-worker run.

    .venv/bin/python benchmarks/multiworker.py [--train 4000] [--trees 10,20,30,40] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from s3server import SeaweedS3  # noqa: E402
from test_multiworker import (Machine, check_store, history_runs, make_dataset, start_luigid,  # noqa: E402
                              wait_all)

SERIAL = ("Fetch", "Decode", "Embed", "Split", "Evaluate", "Chain")
PARALLEL = ("Exact", "Forest")


def run_once(base: Path, server: SeaweedS3, data: dict, n_workers: int, n_forests: int) -> dict:
    root = f"s3://{server.bucket}/bench-{n_workers}w-{secrets.token_hex(3)}"
    daemon = start_luigid(base / "luigid")
    try:
        machines = [Machine(f"w{i}", base / f"machine-{i}") for i in range(n_workers)]
        started = time.monotonic()
        for m in machines:
            m.start(daemon, root, data)
        codes = wait_all(machines, timeout=900)
        wall = max(m.ended for m in machines) - started
        if codes != [0] * n_workers:
            raise SystemExit(f"{n_workers} workers: exit codes {codes}\n" + "\n".join(m.output()[-3000:] for m in machines))
        runs = history_runs(daemon.history)
    finally:
        daemon.stop()
    assert all(n == 1 for _, n in runs.values()), runs  # every task ran once, says luigid's history
    check_store(root, data["name"], n_forests=n_forests)
    done = [(f, p, s) for m in machines for f, p, s in m.done()]
    per_worker = {m.name: collections.Counter(f for f, _ in m.ran()) for m in machines}
    exits = [m.ended - started for m in machines]
    return {"n": n_workers, "wall": wall, "exits": exits, "tasks": len(runs), "done": done, "per_worker": per_worker,
            "task_sum": sum(s for _, _, s in done)}


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{family} {n}" for family, n in sorted(counter.items())) or "nothing"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--trees", default="10,20,30,40")
    p.add_argument("--workers", default="1,2,3")
    args = p.parse_args(argv)
    trees = tuple(int(t) for t in args.trees.split(","))
    counts = [int(n) for n in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="grove-multiworker-") as tmp:
        tmp = Path(tmp)
        server = SeaweedS3(tmp / "seaweedfs").start()
        saved = dict(os.environ)
        try:
            os.environ.update(server.env("admin"))
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
                os.environ.pop(name, None)
            os.environ.update(AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
                              AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
                              AWS_EC2_METADATA_DISABLED="true")
            data = make_dataset(tmp / "inputs", n_train=args.train, n_test=args.test, n_trees=trees)
            results = [run_once(tmp / f"run-{n}", server, data, n, len(trees)) for n in counts]
        finally:
            os.environ.clear()
            os.environ.update(saved)
            server.close()

    print(f"\nChain: tiny MNIST-like, {args.train} train / {args.test} test images, forests of "
          f"{', '.join(map(str, trees))} trees; artifact root on SeaweedFS S3 (loopback); luigid; "
          f"{os.cpu_count()} cores; GROVE_THREADS=1 per worker.\n")
    print("| workers | wall (s) | tasks | sum of task run times (s) | overhead per task (s) | each worker exited at (s) | what each worker ran |")
    print("|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        overhead = (r["n"] * r["wall"] - r["task_sum"]) / r["tasks"]
        ran = "; ".join(f"{name}: {_counts(c)}" for name, c in r["per_worker"].items())
        print(f"| {r['n']} | {r['wall']:.1f} | {r['tasks']} | {r['task_sum']:.1f} | {overhead:.2f} | {', '.join(f'{e:.1f}' for e in r['exits'])} | {ran} |")

    base = next((r for r in results if r["n"] == 1), results[0])
    by_family = collections.defaultdict(list)
    for family, _, seconds in base["done"]:
        by_family[family].append(seconds)
    serial = sum(sum(by_family[f]) for f in SERIAL)
    parallel_times = [s for f in PARALLEL for s in by_family[f]]
    parallel = sum(parallel_times)
    longest = max(parallel_times, default=0.0)
    overhead = (base["n"] * base["wall"] - base["task_sum"]) / base["tasks"]
    tasks = base["tasks"]

    def model(n: int) -> float:
        return serial + max(longest, parallel / n) + overhead * tasks / n

    print(f"\nModel (from the {base['n']}-worker run): T(N) ~ serial {serial:.1f} s + max(longest parallel "
          f"{longest:.1f} s, parallel {parallel:.1f} s / N) + overhead {overhead:.2f} s x {tasks} tasks / N")
    print("| N | model (s) | measured here (s) |")
    print("|---:|---:|---:|")
    measured = {r["n"]: r["wall"] for r in results}
    for n in sorted(set(counts) | {5, 8}):
        here = f"{measured[n]:.1f}" if n in measured else "-"
        print(f"| {n} | {model(n):.1f} | {here} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
