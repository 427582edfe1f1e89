"""The S3 artifact root against the local one (issue 13, "Measure"): each dataset's whole chain run once on a
fresh local root and once on a fresh prefix of a real S3 server (SeaweedFS, tests/s3server.py, started here),
each run a fresh process with a fresh GROVE_SCRATCH (nothing cached) and GROVE_THREADS=2; then `grove query`
on both roots, all fresh processes timed from outside: the first query with an empty scratch (on S3 it
downloads the split and the forest) and the median of the later ones (same scratch; local and S3 alternate, so
that both meet the same load on a shared machine). Both twice: while nothing serves (`grove query` then
answers from the current config's split and forest, whose digests it computes from the config and the store)
and after `grove promote DATASET <the evaluation>` (what serves: the pointer, the evaluation's manifest, its
split and forest). "requests" counts the object-store client's calls in a later query (pyarrow.fs calls:
GET, HEAD, LIST; each one request, or more when retried).

Per stage (summed over a stage's versions, e.g. several forests):
  stage s   the manifests' "seconds" (the stage's own work as the task measured it; publishing excluded)
  task s    the `done Task(...) in S s` lines of the run's output: the task's run() from outside, reading
            the parents (downloads on S3) and publishing (uploads on S3) included
  upload s  the `published ... (attempt ..., N files, X MB, S s)` lines: uploading the version's files
  written   the bytes of the files the stage's manifests list (what it put in the store)
  read      the bytes of the files its parents' manifests list (what it reads from the store; on S3 a
            parent already fetched into this process's scratch by an earlier stage is not fetched again,
            so the process's wire total, bytes_in, can be smaller than the column's sum)
  overhead  (S3 task s - local task s) / local task s
The process wall time is the whole `run` from outside (interpreter start, luigi scheduling, uploads of the
manifests, ...). The wire totals (bytes_out / bytes_in) are the object-store client's own counters
(pipeline.objectstore.ObjectStore.stats), dumped at exit with the count of pyarrow.fs calls by a thin wrapper
that is otherwise `python -m tasks.cli ARGS`.

    .venv/bin/python benchmarks/s3_vs_local.py [--datasets glove,mnist] [--later 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from s3server import SeaweedS3  # noqa: E402

STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")
QUERIES = {"mnist": "test/0", "glove": "chinese river", "tinymnist": "test/0"}
MIRRORS = {"mnist": "file:///work/shared/data"}

# `python -m tasks.cli ARGS`, plus the object-store client's byte counters and its number of pyarrow.fs calls
# ("requests") written to $BENCH_STATS at exit
WRAPPER = r"""
import atexit, collections, json, os, runpy, sys
from pipeline import objectstore
total = collections.Counter()
_count = objectstore.ObjectStore._count
def counting(self, **amounts):
    total.update(amounts)
    return _count(self, **amounts)
objectstore.ObjectStore._count = counting
class CountingFs:
    def __init__(self, fs):
        self._fs = fs
    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr
        def call(*args, **kwargs):
            total.update(requests=1)
            return attr(*args, **kwargs)
        return call
_fs = objectstore.ObjectStore._fs
objectstore.ObjectStore._fs = lambda self, multipart=False: CountingFs(_fs(self, multipart))
def dump():
    with open(os.environ["BENCH_STATS"], "w") as f:
        json.dump(dict(total), f)
atexit.register(dump)
sys.argv = ["tasks.cli", *sys.argv[1:]]
runpy.run_module("tasks.cli", run_name="__main__", alter_sys=True)
"""

_AWS_KEEP_OUT = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")


def env_for(root: str, scratch: Path, dataset: str, server: SeaweedS3 | None, base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_KEEP_OUT and not k.startswith("GROVE_")}
    env.update(GROVE_ARTIFACTS=root, GROVE_SCRATCH=str(scratch), GROVE_THREADS="2", PYTHONUNBUFFERED="1",
               AWS_CONFIG_FILE=str(base / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(base / "no-aws-creds"),
               AWS_EC2_METADATA_DISABLED="true")
    if dataset in MIRRORS:
        env["GROVE_MIRROR"] = MIRRORS[dataset]
    if server is not None:
        env.update(server.env("admin"))
    return env


# `done     Forest(dataset=glove, n_trees=50) in 5.0 s`: a task's run() from outside, downloads and publishing included
DONE = re.compile(r"^done     (\w+)\((.*)\) in ([0-9.]+) s\s*$", re.M)
# `published s3://.../glove/forest/v3-... (attempt ..., 2 files, 91.0 MB, 0.5 s)`: the upload of a version's files
UPLOADED = re.compile(r"^published \S+/(\w+)/v[^/\s]+ \(attempt [^,]+, \d+ files, [0-9.]+ [kMG]?B, ([0-9.]+) s\)", re.M)


def timed(args: list[str], env: dict, base: Path, log: Path, timeout: float) -> tuple[float, dict, int, str]:
    """(wall seconds, wire counters, exit code, output) of one fresh `python -m tasks.cli ARGS` process."""
    stats = base / f"stats-{secrets.token_hex(4)}.json"
    env = {**env, "BENCH_STATS": str(stats)}
    cmd = [sys.executable, "-c", WRAPPER, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.monotonic() - t0
    output = proc.stdout.decode(errors="replace")
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}  (GROVE_ARTIFACTS={env['GROVE_ARTIFACTS']}) -> {proc.returncode}, "
                  f"{wall:.2f} s\n{output}")
    counters = json.loads(stats.read_text()) if stats.is_file() else {}
    return wall, counters, proc.returncode, output


def stage_table(root: str, dataset: str, env: dict) -> dict:
    """{stage: {"seconds", "written", "read", "versions"}} from the manifests under ``root``."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        from pipeline import artifacts

        manifests = {s: artifacts.list_versions(root, dataset, s) for s in STAGES}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    size = {f"{dataset}/{s}/{m['version']}": sum(f["bytes"] for f in m["files"].values())
            for s, ms in manifests.items() for m in ms}
    out = {}
    for s, ms in manifests.items():
        if not ms:
            continue
        out[s] = {"versions": len(ms), "seconds": sum(m["seconds"] for m in ms),
                  "written": sum(size[f"{dataset}/{s}/{m['version']}"] for m in ms),
                  "read": sum(size.get(p, 0) for m in ms for p in m.get("parents", {}).values())}
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def pct(s3: float, local: float) -> str:
    return f"{(s3 - local) / local * 100:+.0f} %" if local > 0 else "n/a"


def run_chain(dataset: str, where: str, server: SeaweedS3 | None, base: Path, log: Path) -> dict:
    tag = f"{dataset}-{where}-{secrets.token_hex(3)}"
    root = f"s3://{server.bucket}/bench-{tag}" if server else str(base / f"root-{tag}")
    scratch = base / f"scratch-run-{tag}"
    env = env_for(root, scratch, dataset, server, base)
    wall, wire, code, output = timed(["run", dataset], env, base, log, timeout=1800)
    if code != 0:
        raise RuntimeError(f"{dataset} on {where}: `run` exited {code}; see {log}")
    shutil.rmtree(scratch, ignore_errors=True)
    stages = stage_table(root, dataset, env)
    for family, _, seconds in DONE.findall(output):
        if family.lower() in stages:
            stages[family.lower()]["task"] = stages[family.lower()].get("task", 0.0) + float(seconds)
    for stage, seconds in UPLOADED.findall(output):
        if stage in stages:
            stages[stage]["upload"] = stages[stage].get("upload", 0.0) + float(seconds)
    return {"root": root, "wall": wall, "wire": wire, "stages": stages}


def query_run(dataset: str, env: dict, base: Path, log: Path) -> tuple[float, dict]:
    """(wall seconds, counters) of one `grove query` process; RuntimeError when it fails."""
    wall, counters, code, _ = timed(["query", dataset, QUERIES[dataset]], env, base, log, timeout=600)
    if code != 0:
        raise RuntimeError(f"{dataset}: `query` on {env['GROVE_ARTIFACTS']} exited {code}; see {log}")
    return wall, counters


def run_queries(dataset: str, roots: dict[str, str], server: SeaweedS3, base: Path, log: Path, later: int) -> dict:
    """``{path: {side: {"first", "first_in", "later", "all", "requests"}}}`` for the sides ``local`` and
    ``S3`` (``roots``), while nothing serves and then after promoting the chain's evaluation (``path``).
    Each side's first query has an empty scratch; the later ones (same scratch) alternate between the
    sides, so that both meet the same load on a shared machine (and the same writeback of what the
    first queries downloaded)."""
    servers = {"local": None, "S3": server}
    out = {}
    for path in ("nothing serving", "serving"):
        if path == "serving":
            for side, root in roots.items():
                env = env_for(root, base / f"scratch-promote-{secrets.token_hex(3)}", dataset, servers[side], base)
                version = evaluate_versions(root, dataset, env)[-1]
                _, _, code, _ = timed(["promote", dataset, version], env, base, log, timeout=600)
                if code != 0:
                    raise RuntimeError(f"{dataset}: `promote` on {root} exited {code}; see {log}")
        envs = {side: env_for(root, base / f"scratch-query-{secrets.token_hex(3)}", dataset, servers[side], base)
                for side, root in roots.items()}
        results = {}
        for side, env in envs.items():
            first, wire = query_run(dataset, env, base, log)
            results[side] = {"first": first, "first_in": wire.get("bytes_in", 0), "all": [], "requests": 0}
        for i in range(later):
            for side in (list(envs) if i % 2 == 0 else list(envs)[::-1]):
                wall, counters = query_run(dataset, envs[side], base, log)
                results[side]["all"].append(wall)
                results[side]["requests"] = max(results[side]["requests"], counters.get("requests", 0))
        for side, env in envs.items():
            results[side]["later"] = statistics.median(results[side]["all"])
            shutil.rmtree(env["GROVE_SCRATCH"], ignore_errors=True)
        out[path] = results
    return out


def evaluate_versions(root: str, dataset: str, env: dict) -> list[str]:
    """The evaluate versions under ``root``, oldest first."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        from pipeline import artifacts

        return [m["version"] for m in artifacts.list_versions(root, dataset, "evaluate")]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def print_dataset(dataset: str, local: dict, s3: dict) -> None:
    print(f"\n### {dataset}: `run` per stage (local root vs S3 root)\n")
    print("| stage | versions | local: stage s | S3: stage s | local: task s | S3: task s | of which S3 upload s "
          "| overhead (task) | written MB | read MB (parents) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(name, lo, hi, versions=""):
        ls, ss = lo.get("seconds", 0.0), hi.get("seconds", 0.0)
        lt, st = lo.get("task", 0.0), hi.get("task", 0.0)
        print(f"| {name} | {versions} | {ls:.2f} | {ss:.2f} | {lt:.2f} | {st:.2f} | {hi.get('upload', 0.0):.2f} "
              f"| {pct(st, lt)} | {mb(hi.get('written', lo.get('written', 0)))} | {mb(hi.get('read', lo.get('read', 0)))} |")

    for s in STAGES:
        if s in local["stages"] or s in s3["stages"]:
            lo, hi = local["stages"].get(s, {}), s3["stages"].get(s, {})
            row(s, lo, hi, hi.get("versions", lo.get("versions", 0)))
    total = {}
    for side, d in (("lo", local), ("hi", s3)):
        total[side] = {k: sum(v.get(k, 0.0) for v in d["stages"].values())
                       for k in ("seconds", "task", "upload", "written", "read")}
    row("**all stages**", total["lo"], total["hi"])
    print(f"| **process wall** | | | | {local['wall']:.2f} | {s3['wall']:.2f} | | {pct(s3['wall'], local['wall'])} | | |")
    w = s3["wire"]
    print(f"\nS3 client's wire totals for the `run`: {mb(w.get('bytes_out', 0))} MB out in {w.get('uploads', 0)} uploads"
          f" + {w.get('writes', 0)} small writes, {mb(w.get('bytes_in', 0))} MB in in {w.get('downloads', 0)} downloads"
          f" + {w.get('reads', 0)} small reads.")
    sys.stdout.flush()


def print_queries(dataset: str, q: dict, later: int) -> None:
    print(f"\n### {dataset}: `grove query {dataset} \"{QUERIES[dataset]}\"` (fresh processes, wall time)\n")
    print(f"| path | root | first (empty scratch) s | MB downloaded by the first | later s (median of {later}, "
          "alternating local and S3) | requests of a later one |")
    print("|---|---|---:|---:|---:|---:|")
    for path, sides in q.items():
        lo, hi = sides["local"], sides["S3"]
        print(f"| {path} | local | {lo['first']:.2f} | 0 | {lo['later']:.2f} | - |")
        print(f"| {path} | S3 | {hi['first']:.2f} | {mb(hi['first_in'])} | {hi['later']:.2f} | {hi['requests']} |")
        print(f"| {path} | overhead | {pct(hi['first'], lo['first'])} | | {pct(hi['later'], lo['later'])} | |")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="glove,mnist")
    p.add_argument("--later", type=int, default=3, help="later queries (the median is reported)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]

    # SIGTERM: stop the running grove process and the server (subprocess.run kills its child on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="grove-s3-vs-local-"))
    log = base / "runs.log"
    print(f"## S3 root vs local root\n\n`{' '.join([Path(sys.executable).name, *sys.argv])}` on "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} cores, GROVE_THREADS=2, "
          f"SeaweedFS (`weed server -s3`) on loopback; logs in {log}")
    sys.stdout.flush()
    server = SeaweedS3(base / "seaweedfs").start()
    failed = []
    t_all = time.monotonic()
    try:
        for dataset in datasets:
            try:
                t0 = time.monotonic()
                local = run_chain(dataset, "local", None, base, log)
                s3 = run_chain(dataset, "s3", server, base, log)
                print_dataset(dataset, local, s3)
                queries = run_queries(dataset, {"local": local["root"], "S3": s3["root"]}, server, base, log,
                                      args.later)
                print_queries(dataset, queries, args.later)
                print(f"\n({dataset}: {time.monotonic() - t0:.0f} s for both chains and the queries)")
                sys.stdout.flush()
            except Exception as exc:  # report it and go on with the next dataset
                failed.append(dataset)
                print(f"\n**{dataset} failed**: {exc}")
                sys.stdout.flush()
    finally:
        server.close()
        if not args.keep:
            for d in base.iterdir():
                if d.name != "runs.log":
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    print(f"\n(total {time.monotonic() - t_all:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
