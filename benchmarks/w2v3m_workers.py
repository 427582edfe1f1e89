"""The word chain (word2vec, 3M x 300) built under a real luigid by one and by two worker processes:
wall time, and for each worker its busy time, CPU time, peak RSS and the tasks it ran; a per-task
timeline shows how long both workers were busy at once.

For each N of --workers: a fresh luigid (tests/test_multiworker.py's start_luigid), a fresh local
artifact root under --root-base, and N worker processes started together, each
`python -m tasks.cli run DATASET --scheduler-host 127.0.0.1 --scheduler-port P` (one Luigi worker
each, as benchmarks/multiworker.py runs them: own working directory, HOME, TMPDIR and grove scratch,
tests/test_multiworker.py's Machine), with GROVE_SHARDS=--shards so that Embed (row ranges), Exact
(query blocks) and each Forest (groups of trees) are split into part tasks (tasks/chain.py,
Sharded / Part; shards change no byte). Fetch, Decode, Split and Evaluate (and
the assembly step of each sharded stage, which runs after its parts) are single tasks.

Which worker may run a part: the parts are static requirements of their stage (tasks/chain.py), so
every worker that schedules the chain knows them and luigid hands each to whichever worker asks
first. (Before 2026-11-30 they were dynamic dependencies, yielded by the stage's run, and luigid
hands those only to the worker that yielded them: the second worker sat idle.) `--workers 2a` runs
two workers that are Luigi assistants (`[core] assistant = true`), which may run any runnable task
luigid knows, for comparison; an assistant never leaves on its own, so once luigid has the Chain as
done the workers get SIGUSR1 (Luigi: stop asking for work) and exit.

Summary table, one row per entry of --workers:
  workers               N, or Na: N workers that are Luigi assistants
  threads each          GROVE_THREADS of each worker
  wall (s)              from starting the workers to the end of the Chain task's run (the chain is
                        built; luigid's start and the workers' exit afterwards are not counted; the
                        timeline's heading gives each worker's exit)
  tasks                 tasks completed (Luigi's `done` lines of all workers; a part is a task)
  busy (s) per worker   sum of the worker's task run times: each interval from Luigi's `running` line
                        of a task to its `done`, `new requirements` or `failed` line, from the
                        worker's own log (<scratch>/logs, millisecond timestamps). The Chain
                        runs twice: once until it yields its evaluation (short), once to finish.
  busy / wall           that sum over the wall time: 100 % = never idle
  CPU (s) per worker    user + system CPU of the worker process and what it waited for (os.wait4)
  peak RSS per worker   ru_maxrss of the worker process (os.wait4; pages of memory-mapped files the
                        worker touched count)
  all busy / any busy   share of the wall time during which every worker / at least one worker was
                        running a task (the intervals above); for N = 1 the two are the same
  what each ran         tasks completed per family by each worker

Then per N a timeline: each task's run (start and end in seconds since the workers started, the
worker, seconds), and a text chart (one line per worker, one column per wall / --columns seconds,
the initial of the family running there: F fetch, D decode, e embed part, E embed, S split, x exact
part, X exact, t forest part, T forest, V evaluate, C chain, `.` idle).

Checks printed below the tables: every task was completed by exactly one worker, and the
reproducible bytes of every stage (the manifests' sha256 of files not marked measured) are the same
in every N's root.

Threads: GROVE_THREADS per worker is --threads, default 0 = cores // N (on 2 cores: 2 for one
worker, 1 each for two), so both runs may use every core. BLAS thread variables are left as they
are in the environment.

Disk: each N builds the whole chain into its own root; at 3M x 300 that is about 25 GB (decode,
embed parts, embed, split: 3.7 GB each; the 10- and 50-tree forests 4.0 and 4.7 GB, each holding
the vectors; the forest parts' trees about 1 GB) plus the 3.4 GB source copy in the fetching
worker's download cache, which the fetch version hard-links (none with --reuse-fetch). Each root
and each worker's download cache is deleted once its run is measured unless --keep, so the runs
need the space of one chain at a time. The free space of --root-base is printed at the start.

--reuse-fetch DIR: a directory holding the config's source files (a fetch version of another root,
e.g. OLD_ROOT/word2vec-google-news-300/fetch/latest, or the generated file's own directory), on
the same filesystem as --root-base. Each worker's download cache (<scratch>/downloads/<dataset>/)
gets a hard link to each file before the run, so Fetch finds its source already there: it checks
the file's sha256 (every byte is read: about 10-20 s for 3.4 GB) and hard-links it into the new
fetch version instead of copying 3.4 GB. Safe because nothing grove does writes into an existing
file: a download goes to `<file>.part` and is renamed over the name, publishing renames a
temporary directory, and a file whose sha256 is wrong is never used. Without it, the fetching
worker copies the source from its file:// URL into its cache (about 25 s at 3M) as a cold run does.

At 3M (20-40 min per entry of --workers, about 25 GB free needed), with the config and the file
written by make_word2vec.py (--reuse-fetch: the file's own directory, on the same filesystem):

    GROVE_CONFIGS=/work/data-w2v3m/configs .venv/bin/python benchmarks/w2v3m_workers.py \\
        --root-base /work/w2v3m-workers --workers 1,2 --shards 2 \\
        --reuse-fetch /work/data-w2v3m --out /work/w2v3m-workers.md > /work/w2v3m-workers.log 2>&1

Each worker's full log stays in
<root-base>/<entry>w/worker-<i>/ (worker.log, scratch/logs/).

On small data (50,000 words, about a minute per entry of --workers):

    .venv/bin/python benchmarks/make_word2vec.py --n 50000 --out /tmp/w2vsmall/GoogleNews-synthetic-50k-300.bin.gz
    GROVE_CONFIGS=/tmp/w2vsmall/configs .venv/bin/python benchmarks/w2v3m_workers.py \\
        --root-base /tmp/w2vsmall-art --columns 60

Ctrl-C (or SIGTERM, SIGHUP) stops the workers (each its whole process group) and luigid, and leaves
the roots for a look; a worker that exits non-zero stops the benchmark in the same way, naming its log.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_multiworker import STAGES, Luigid, Machine, reproducible, start_luigid  # noqa: E402

# Luigi's own lines in a worker's log file: "<date> <time>,<ms> <pid> INFO luigi-interface: [pid P]
# Worker Worker(salt=..., ...) running   Embed(dataset=...)"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ \w+ luigi-interface: \[pid \d+\] "
                      r"Worker Worker\(.*?\) (running|done|new requirements|failed)\s+(\w+)\((.*)\)\s*$", re.M)
INITIAL = {"Fetch": "F", "Decode": "D", "EmbedPart": "e", "Embed": "E", "Split": "S", "ExactPart": "x",
           "Exact": "X", "ForestPart": "t", "Forest": "T", "Evaluate": "V", "Chain": "C"}


class Worker(Machine):
    """A Machine (own work dir, HOME, TMPDIR, scratch) that runs `grove run` of one dataset with the
    benchmark's settings, and is reaped with os.wait4 for its CPU time and peak RSS."""

    rusage = None
    assistant = False

    def make_assistant(self) -> None:
        """A Luigi assistant (``[core] assistant = true``): it may run any runnable task luigid knows,
        also the parts another worker yielded, and it never leaves on its own (keep_alive)."""
        self.assistant = True
        with open(self.base / "worker.cfg", "a") as cfg:
            cfg.write("\n[core]\nassistant = true\n")

    def start_run(self, luigid: Luigid, root: Path, dataset: str, configs: Path, mirror: str | None,
                  shards: int, threads: int) -> None:
        env = self.env(str(root), {"configs": configs, "mirror": Path("/")}, threads=threads)
        env.pop("GROVE_MIRROR")
        if mirror:
            env["GROVE_MIRROR"] = mirror
        env.update(GROVE_SHARDS=str(shards), GROVE_PROGRESS="log", GROVE_PROGRESS_INTERVAL="60",
                   PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "tasks.cli", "run", dataset, "--scheduler-host", "127.0.0.1",
                   "--scheduler-port", str(luigid.port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=self.base / "work", env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def reap(self) -> bool:
        """Collect the exit status and resource use if the process has ended (without blocking)."""
        if self.proc.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rusage = usage
        self.ended = time.monotonic()
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s, to the worker's whole process group."""
        if self.proc is None or self.reap():
            return
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.reap():
                    return
                time.sleep(0.1)

    def luigi_log(self) -> Path | None:
        logs = sorted((self.base / "scratch" / "logs").glob("*.log"))
        return logs[-1] if logs else None

    def runs(self, t0: float) -> list[dict]:
        """Every run of a task on this worker: family, parameters, start and end (seconds since t0,
        wall clock), and how it ended (done, new requirements, failed; None if the log stops)."""
        path = self.luigi_log()
        if path is None:
            return []
        out, open_runs = [], {}
        for stamp, event, family, params in LOG_LINE.findall(path.read_text(errors="replace")):
            when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0
            key = (family, params)
            if event == "running":
                open_runs[key] = {"worker": self.name, "family": family, "params": params, "start": when,
                                  "end": None, "event": None}
                out.append(open_runs[key])
            elif key in open_runs:
                run = open_runs.pop(key)
                run["end"], run["event"] = when, event
        return out


# --- one N -----------------------------------------------------------------------------------------


def _busy_shares(intervals: dict[str, list[tuple[float, float]]], wall: float) -> list[float]:
    """Share of [0, wall] during which exactly k workers were running a task, for k = 0 .. N."""
    edges = []
    for spans in intervals.values():
        for a, b in spans:
            a, b = max(0.0, a), min(wall, b)
            if b > a:
                edges += [(a, 1), (b, -1)]
    edges.sort()
    shares = [0.0] * (len(intervals) + 1)
    level, last = 0, 0.0
    for when, step in edges:
        shares[level] += max(0.0, when - last)
        last = max(last, when)
        level += step
    shares[level] += max(0.0, wall - last)
    return [s / wall for s in shares] if wall > 0 else shares


def _link_sources(source_dir: Path, dataset: str, configs: Path, scratch: Path) -> list[str]:
    from pipeline.config import load_config

    cfg = load_config(dataset, str(configs))
    cache = scratch / "downloads" / dataset
    cache.mkdir(parents=True, exist_ok=True)
    linked = []
    for src in cfg.sources.values():
        there = source_dir / src.filename
        if not there.is_file():
            raise SystemExit(f"--reuse-fetch: {there} is not there (the config's source {src.filename})")
        try:
            os.link(there, cache / src.filename)
        except OSError as exc:  # another filesystem: no copy, that is what the option avoids
            raise SystemExit(f"--reuse-fetch: cannot hard-link {there} into {cache}: {exc}") from None
        linked.append(src.filename)
    return linked


def _chain_done(daemon: Luigid) -> bool:
    """luigid has the dataset's Chain task as DONE."""
    try:
        done = daemon.api("task_list", {"status": "DONE"})
    except (OSError, ValueError, KeyError):
        return False
    return any(task_id.startswith("Chain_") for task_id in done)


def run_once(spec: str, args, configs: Path, state: dict) -> dict:
    n, assist = int(spec.rstrip("a")), spec.endswith("a")
    base = args.root_base / f"{spec}w"
    if base.exists():
        shutil.rmtree(base)
    root = base / "artifacts"
    threads = args.threads if args.threads > 0 else max(1, (os.cpu_count() or 1) // n)
    daemon = start_luigid(base / "luigid")
    state["daemon"] = daemon
    workers = [Worker(f"w{i}", base / f"worker-{i}") for i in range(n)]
    if assist:
        for w in workers:
            w.make_assistant()
    state["workers"] = workers
    if args.reuse_fetch:
        for w in workers:
            _link_sources(args.reuse_fetch, args.dataset, configs, w.base / "scratch")
    t0_wall, t0 = time.time(), time.monotonic()
    for w in workers:
        w.start_run(daemon, root, args.dataset, configs, args.mirror, args.shards, threads)
    print(f"{spec}: {n} worker(s){' (Luigi assistants)' if assist else ''} started (root {root}, "
          f"GROVE_SHARDS={args.shards}, GROVE_THREADS={threads})", flush=True)
    deadline = t0 + args.timeout
    signalled = not assist
    while not all(w.reap() for w in workers):
        if not signalled and _chain_done(daemon):
            # assistants never leave on their own: on SIGUSR1 one stops asking for work and exits
            # after its current task (there is none left: the Chain is done)
            for w in workers:
                if not w.reap():
                    os.kill(w.proc.pid, signal.SIGUSR1)
            signalled = True
        failed = [w for w in workers if w.proc.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            why = (f"{failed[0].name} exited {failed[0].proc.returncode}" if failed
                   else f"not done after {args.timeout:.0f} s")
            raise SystemExit(f"{spec}: {why}; logs: " + ", ".join(str(w.log) for w in workers)
                             + "\n" + "\n".join(f"--- {w.name}\n{w.output()[-2500:]}" for w in workers))
        time.sleep(0.2)
    daemon.stop()
    state["daemon"] = None
    codes = [w.proc.returncode for w in workers]
    if codes != [0] * n:
        raise SystemExit(f"{spec}: exit codes {codes}; logs: " + ", ".join(str(w.log) for w in workers))

    runs = [r for w in workers for r in w.runs(t0_wall)]
    last_exit = max(w.ended for w in workers) - t0
    chain_end = [r["end"] for r in runs if r["family"] == "Chain" and r["event"] == "done"]
    wall = chain_end[0] if chain_end else last_exit  # the Chain's run ends when the chain is built
    for r in runs:
        if r["end"] is None:  # cannot happen after exit 0; keep the numbers sane if it does
            r["end"] = last_exit
    intervals = {w.name: [(r["start"], r["end"]) for r in runs if r["worker"] == w.name] for w in workers}
    done = collections.Counter((r["family"], r["params"]) for r in runs if r["event"] == "done")
    twice = [f"{f}({p})" for (f, p), k in done.items() if k > 1]
    per_worker = {w.name: collections.Counter(r["family"] for r in runs if r["worker"] == w.name and r["event"] == "done")
                  for w in workers}
    result = {
        "n": n, "spec": spec, "assistants": sum(w.assistant for w in workers), "threads": threads, "wall": wall,
        "tasks": len(done), "twice": twice, "runs": runs,
        "busy": {name: sum(b - a for a, b in spans) for name, spans in intervals.items()},
        "cpu": {w.name: w.rusage.ru_utime + w.rusage.ru_stime for w in workers},
        "rss": {w.name: w.rusage.ru_maxrss * 1024 for w in workers},
        "exits": {w.name: w.ended - t0 for w in workers},
        "shares": _busy_shares(intervals, wall), "per_worker": per_worker,
        "bytes": reproducible(root, args.dataset), "root": root, "logs": [w.log for w in workers],
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        for w in workers:
            shutil.rmtree(w.base / "scratch" / "downloads", ignore_errors=True)
            shutil.rmtree(w.base / "scratch" / "cache", ignore_errors=True)
    return result


# --- output ----------------------------------------------------------------------------------------


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{family} {k}" for family, k in sorted(counter.items())) or "nothing"


def _chart(r: dict, columns: int) -> list[str]:
    step = r["wall"] / columns if r["wall"] > 0 else 1.0
    lines = [f"    one column = {step:.1f} s"]
    for name in r["busy"]:
        row = ["."] * columns
        for run in (x for x in r["runs"] if x["worker"] == name):
            first, last = int(run["start"] / step), int(max(run["start"], run["end"] - 1e-9) / step)
            for c in range(max(0, first), min(columns - 1, last) + 1):
                row[c] = INITIAL.get(run["family"], "?")
        lines.append(f"    {name} |{''.join(row)}|")
    return lines


def _short(params: str) -> str:
    """A task's parameters without the dataset (the same for every task here)."""
    parts = [p for p in params.split(", ") if p and not p.startswith("dataset=")]
    return ", ".join(parts)


def render(results: list[dict], args, configs: Path) -> str:
    cores = os.cpu_count()
    out = [f"Chain: {args.dataset} (configs {configs}); local artifact root; luigid on loopback; {cores} cores; "
           f"GROVE_SHARDS={args.shards}; started {dt.datetime.now().isoformat(timespec='seconds')}"
           f"{'; sources hard-linked into the download caches (--reuse-fetch)' if args.reuse_fetch else ''}.", ""]
    out += ["| workers | threads each | wall (s) | tasks | busy (s) per worker | busy / wall | CPU (s) per worker "
            "| peak RSS (GiB) per worker | all busy | any busy | what each ran |",
            "|---:|---:|---:|---:|---|---|---|---|---:|---:|---|"]
    for r in results:
        names = list(r["busy"])
        out.append(
            f"| {r['spec']} | {r['threads']} | {r['wall']:.1f} | {r['tasks']} | "
            + ", ".join(f"{r['busy'][w]:.1f}" for w in names) + " | "
            + ", ".join(f"{100 * r['busy'][w] / r['wall']:.0f} %" for w in names) + " | "
            + ", ".join(f"{r['cpu'][w]:.1f}" for w in names) + " | "
            + ", ".join(f"{r['rss'][w] / 2**30:.2f}" for w in names) + " | "
            + f"{100 * r['shares'][-1]:.0f} % | {100 * (1 - r['shares'][0]):.0f} % | "
            + "; ".join(f"{w}: {_counts(r['per_worker'][w])}" for w in names) + " |")
    for r in results:
        who = f"{r['n']} worker(s)" + (", Luigi assistants" if r["assistants"] else "")
        out += ["", f"Timeline, {who} (seconds since the workers started; wall {r['wall']:.1f} s; "
                f"each exited at {', '.join(f'{e:.1f}' for e in r['exits'].values())}):", "",
                "| start | end | s | worker | task | ended with |", "|---:|---:|---:|---|---|---|"]
        for run in sorted(r["runs"], key=lambda x: (x["start"], x["worker"])):
            out.append(f"| {run['start']:.1f} | {run['end']:.1f} | {run['end'] - run['start']:.1f} | {run['worker']} | "
                       f"{run['family']}({_short(run['params'])}) | {run['event'] or '-'} |")
        out += ["", *_chart(r, args.columns)]
    out.append("")
    twice = [t for r in results for t in r["twice"]]
    out.append("Each task completed by exactly one worker: " + ("yes" if not twice else f"NO: {twice}"))
    first = results[0]["bytes"]
    same = all(r["bytes"] == first for r in results)
    out.append(f"Reproducible bytes of {len(first)} versions ({', '.join(STAGES)}) the same in every root: "
               + ("yes" if same else "NO") + ("" if args.keep else " (roots deleted after measuring; --keep keeps them)"))
    return "\n".join(out) + "\n"


# --- main ------------------------------------------------------------------------------------------


def _free_gb(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.free / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="word2vec-google-news-300")
    p.add_argument("--workers", default="1,2",
                   help="worker counts, comma-separated: N, or Na for N Luigi assistants (default 1,2)")
    p.add_argument("--shards", type=int, default=2, help="GROVE_SHARDS for every worker (default 2)")
    p.add_argument("--threads", type=int, default=0, help="GROVE_THREADS per worker (default 0 = cores // N)")
    p.add_argument("--root-base", type=Path, required=True,
                   help="local directory for each N's root, luigid state and worker directories (<base>/<N>w/)")
    p.add_argument("--configs", type=Path, default=None, help="dataset configs directory (default GROVE_CONFIGS)")
    p.add_argument("--mirror", default=None, help="GROVE_MIRROR for the workers (default none)")
    p.add_argument("--reuse-fetch", type=Path, default=None, metavar="DIR",
                   help="hard-link the config's source files from DIR into each worker's download cache")
    p.add_argument("--keep", action="store_true", help="keep each root and download cache after its run")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per N before giving up (default 4 h)")
    p.add_argument("--columns", type=int, default=100, help="width of the text timeline (default 100)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    configs = args.configs or (Path(os.environ["GROVE_CONFIGS"]) if os.environ.get("GROVE_CONFIGS") else None)
    if configs is None or not configs.is_dir():
        p.error("name the configs directory: --configs DIR or GROVE_CONFIGS")
    configs = configs.resolve()
    args.root_base = args.root_base.resolve()
    args.root_base.mkdir(parents=True, exist_ok=True)
    if args.reuse_fetch:
        args.reuse_fetch = args.reuse_fetch.resolve()
    specs = [k.strip() for k in args.workers.split(",") if k.strip()]
    if not specs or not all(re.fullmatch(r"[1-9][0-9]*a?", k) for k in specs):
        p.error("--workers: comma-separated worker counts, each N or Na, e.g. 1,2,2a")
    print(f"{_free_gb(args.root_base):.1f} GB free under {args.root_base}", flush=True)

    state: dict = {"daemon": None, "workers": []}

    def on_term(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too when started with it ignored (&)
        signal.signal(sig, on_term)
    results = []
    try:
        for spec in specs:
            results.append(run_once(spec, args, configs, state))
            r = results[-1]
            print(f"{spec}: wall {r['wall']:.1f} s, busy "
                  + ", ".join(f"{w} {s:.1f} s" for w, s in r["busy"].items()), flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the workers and luigid", file=sys.stderr)
        return 130
    finally:
        for w in state["workers"]:
            w.stop()
        if state["daemon"] is not None:
            state["daemon"].stop()
    text = render(results, args, configs)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
