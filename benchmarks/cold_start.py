"""The cold start of `grove query`: fresh processes, timed from outside.

    GROVE_ARTIFACTS=/tmp/cold-art GROVE_MIRROR=file:///work/shared/data .venv/bin/grove run mnist glove
    .venv/bin/python benchmarks/cold_start.py --root /tmp/cold-art
    .venv/bin/python benchmarks/cold_start.py --root /tmp/cold-art --runs 15 --cold-runs 3 --out /tmp/cold.md

Every timed run is a new process started by ``subprocess.run`` (the interpreter, every import, numba
loading or compiling the kernels, opening the index, the query and its printing, the exit), timed
with a process timer (``time.perf_counter``) around it; its CPU time (user + system) comes from
``resource.getrusage(RUSAGE_CHILDREN)``. The commands are run in turn (bare, mnist, glove, bare, ...)
so that a busy neighbour slows each of them alike. Each row gives the median and the range of the
wall and the CPU time, and the medians' ratios to the bare ``python -c "import numpy, pyarrow"``
(the floor of any Python program that reads Arrow vectors). On a shared, loaded machine the CPU
ratio is the steadier one.

Rows:

- ``warm``: numba's cache holds the kernels (one untimed query first fills it, and the verified-stamps
  and the page cache, if needed). What every query but the very first one pays.
- ``cold numba cache``: ``NUMBA_CACHE_DIR`` is a new empty directory for each run, so every kernel
  the query calls is compiled: the first query after installing grove without warming it. (At the
  default search_k `grove query` answers with the numpy twins of the kernels and loads none, so
  this row is the warm one; ``--compare`` with an older checkout shows the difference.)
- ``after warm-up``: a new empty ``NUMBA_CACHE_DIR``, then ``python -m pipeline.warm`` (its time is
  a row too), then the first query.

The artifacts come from ``--root`` (a built MNIST and GloVe: ``grove run mnist glove``); whether a
dataset serves (``grove promote``) or not, the query uses what ``grove query`` uses. The page cache
is not dropped: "cold" here is a new process, not a cold disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = "bare: python -c 'import numpy, pyarrow'"
# Children run in an empty directory, so that the checkout they import is the one PYTHONPATH (or the
# installation) names, not the working directory's (luigi.cfg is then the checkout's own, as from /tmp).
_CWD = tempfile.mkdtemp(prefix="grove-cold-start-")
QUERIES = {"mnist": ["query", "mnist", "test/0"], "glove": ["query", "glove", "chinese river"]}


def grove_command() -> list[str]:
    """The installed `grove` script beside this interpreter (what a user runs), else `python -m tasks.cli`."""
    script = Path(sys.executable).parent / "grove"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tasks.cli"]


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``command`` in a fresh process; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(command, cwd=_CWD, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {run.returncode}:\n{(run.stdout + run.stderr)[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {"n": len(samples), "wall": statistics.median(walls), "lo": min(walls), "hi": max(walls),
            "cpu": statistics.median(cpus), "cpu_lo": min(cpus), "cpu_hi": max(cpus)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("GROVE_ARTIFACTS"),
                        help="artifact root with MNIST and GloVe built (default GROVE_ARTIFACTS)")
    parser.add_argument("--datasets", nargs="+", default=list(QUERIES), choices=list(QUERIES))
    parser.add_argument("--runs", type=int, default=11, help="timed runs per command with a warm cache (default 11)")
    parser.add_argument("--cold-runs", type=int, default=2,
                        help="runs per dataset with an empty numba cache, and after warm-up (default 2; 0 skips)")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="also time the queries of another checkout (its pipeline/ and tasks/, run with "
                             "PYTHONPATH=DIR and this interpreter), e.g. an unchanged copy: before and after")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if not args.root:
        parser.error("give --root (or GROVE_ARTIFACTS): an artifact root with mnist and glove built")
    env = {**os.environ, "GROVE_ARTIFACTS": str(args.root)}
    grove = grove_command()
    # name -> (command, its environment)
    commands = {BARE: ([sys.executable, "-c", "import numpy, pyarrow"], env)}
    queries = {"grove " + " ".join(shlex.quote(a) for a in QUERIES[d]): grove + QUERIES[d] for d in args.datasets}
    commands.update({name: (argv, env) for name, argv in queries.items()})
    if args.compare:
        other = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [args.compare, env.get("PYTHONPATH")]))}
        commands.update({f"{name} ({args.compare})": (argv, other) for name, argv in queries.items()})
    names = list(commands)
    load_before = os.getloadavg()

    for name in names[1:]:  # untimed: numba's cache, the verified-stamps and the page cache
        timed(*commands[name])
    samples: dict[str, list] = {name: [] for name in names}
    for _ in range(args.runs):
        for name in names:
            samples[name].append(timed(*commands[name]))
    rows = [(name, "warm", summary(samples[name])) for name in names]

    if args.cold_runs:
        for name in names[1:]:
            argv, run_env = commands[name]
            cold, first, warm_up = [], [], []
            for _ in range(args.cold_runs):
                with tempfile.TemporaryDirectory(prefix="grove-numba-cold-") as cache:
                    cold.append(timed(argv, {**run_env, "NUMBA_CACHE_DIR": cache}))
                if name.endswith(")"):
                    continue  # another checkout: only its cold query (it may have no pipeline.warm)
                with tempfile.TemporaryDirectory(prefix="grove-numba-warmed-") as cache:
                    warm_env = {**run_env, "NUMBA_CACHE_DIR": cache}
                    warm_up.append(timed([sys.executable, "-m", "pipeline.warm"], warm_env))
                    first.append(timed(argv, warm_env))
            rows.append((name, "cold numba cache", summary(cold)))
            if warm_up:
                rows += [("python -m pipeline.warm", "empty numba cache", summary(warm_up)),
                         (name, "first after warm-up", summary(first))]
    load_after = os.getloadavg()

    bare, bare_cpu = rows[0][2]["wall"], rows[0][2]["cpu"]
    lines = [
        f"cold start, fresh processes ({platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})",
        "",
        "| command | numba cache | runs | wall median (s) | wall min-max (s) | wall x bare | CPU median (s) "
        "| CPU min-max (s) | CPU x bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, case, s in rows:
        lines.append(f"| {name} | {case} | {s['n']} | {s['wall']:.3f} | {s['lo']:.3f}-{s['hi']:.3f} | "
                     f"{s['wall'] / bare:.1f} | {s['cpu']:.3f} | {s['cpu_lo']:.3f}-{s['cpu_hi']:.3f} | "
                     f"{s['cpu'] / bare_cpu:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
