"""One `grove query` in a fresh process, timed from outside, in several variants: the seed's
"chinese river" on the 3M word2vec chain (or any dataset and text).

Each run is a new process (`subprocess.run`) timed with `time.perf_counter` around it; its CPU time
(user + system) comes from `resource.getrusage(RUSAGE_CHILDREN)`. The variants run in turn, so a busy
neighbour slows each alike; the first round is not counted (it fills the verified stamps and the page
cache). Prints, per variant, the median and range of wall and CPU time, then the answer of each
variant's first run.

    GROVE_CONFIGS=/data/w2v/configs GROVE_ARTIFACTS=/data/w2v-art \\
        .venv/bin/python benchmarks/fresh_query.py [--dataset word2vec-google-news-300] \\
        [--text "chinese river"] [--runs 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROVE = str(Path(sys.executable).with_name("grove"))

VARIANTS = {
    "python -c 'import numpy, pyarrow'": None,
    "default": [],
    "--approx-only": ["--approx-only"],
    "--approx-only --search-k 10000": ["--approx-only", "--search-k", "10000"],
    "--search-k 10000 (with the exact answer)": ["--search-k", "10000"],
    "--exact": ["--exact"],
}


def run(argv: list[str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {out.returncode}\n{out.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="word2vec-google-news-300")
    p.add_argument("--text", default="chinese river")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant (after one untimed round)")
    args = p.parse_args()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    answers = {}
    for r in range(args.runs + 1):
        for name, extra in VARIANTS.items():
            argv = ([sys.executable, "-c", "import numpy, pyarrow"] if extra is None
                    else [GROVE, "query", args.dataset, args.text, *extra])
            wall, cpu, stdout = run(argv)
            if r == 0:
                answers[name] = stdout
            else:
                times[name].append((wall, cpu))
    print("| variant | wall median (range) | CPU median (range) |")
    print("|---|---|---|")
    for name, values in times.items():
        w, c = sorted(v[0] for v in values), sorted(v[1] for v in values)
        print(f"| {name} | {statistics.median(w):.2f} s ({w[0]:.2f}-{w[-1]:.2f}) | "
              f"{statistics.median(c):.2f} s ({c[0]:.2f}-{c[-1]:.2f}) |")
    for name, text in answers.items():
        if text:
            print(f"\n{name}:\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
