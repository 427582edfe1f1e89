"""Nightly rebuilds simulated on real MNIST with a mutable source served over HTTP.

    .venv/bin/python benchmarks/cron_sim.py                   # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/cron_sim.py --work /tmp/sim   # keep the artifacts to look at

A loopback HTTP server publishes the four MNIST files (from ../shared/data/mnist, or --data). The
config ``mnist-live`` is configs/mnist.toml with those URLs and ``train_images`` marked
``mutable = true`` (no checksum). Then ``grove rebuild --date D`` runs in a fresh process per day:

    day 1  cold: snapshot, whole chain, gate, promote
    day 2  same bytes: snapshot again, nothing else
    day 3  the publisher changes the file (1,000 training images inverted): the chain is rebuilt
    day 4  same bytes as day 3: nothing rebuilt
    day 5  the config's gate is raised to recall 0.999: rejected (exit 7), day 3's index keeps serving

Prints one row per day: exit code, wall time (process start to exit), the tasks Luigi ran, whether
the snapshot saw a change, and the serving version.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.formats.idx import read_idx, write_idx  # noqa: E402

SHARED = Path(os.environ.get("GROVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


class _Counting(SimpleHTTPRequestHandler):
    """Serves the directory, counts GET requests per path, logs nothing."""

    gets: dict[str, int] = {}

    def do_GET(self):
        self.gets[self.path] = self.gets.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args):
        pass


def live_config(base_url: str, min_recall: float) -> str:
    """configs/mnist.toml renamed mnist-live, its URLs on the local server, train_images mutable."""
    text = (ROOT / "configs" / "mnist.toml").read_text()
    text = text.replace('name = "mnist"', 'name = "mnist-live"')
    text = re.sub(r"urls = \[.*?\]", lambda m: "URLS", text, flags=re.S)
    for name, filename in FILES.items():
        section = f"[sources.{name}]"
        head, tail = text.split(section, 1)
        body, rest = tail.split("URLS", 1)
        if name == "train_images":
            body = re.sub(r"(md5|sha256) = \"[0-9a-f]+\"\n", "", body) + "mutable = true\n"
        text = head + section + body + f'urls = ["{base_url}/{filename}"]' + rest
    return re.sub(r"min_recall = [0-9.]+", f"min_recall = {min_recall}", text)


def summary_tasks(summary: str, heading: str) -> list[str]:
    """Task families listed under ``heading`` ("ran successfully", "failed") in Luigi's summary."""
    match = re.search(heading + r":\n(.*?)(?:\n\*|\n\nThis progress)", summary, re.S)
    return sorted(set(re.findall(r"- \d+ (\w+)\(", match.group(1)))) if match else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "mnist", help="directory with the four MNIST files")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="grove-cron-sim-"))
    served, configs, artifacts = work / "served", work / "configs", work / "artifacts"
    for d in (served, configs):
        d.mkdir(parents=True, exist_ok=True)
    for filename in FILES.values():
        shutil.copyfile(args.data / filename, served / filename)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Counting, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    env = {**os.environ, "GROVE_ARTIFACTS": str(artifacts), "GROVE_CONFIGS": str(configs),
           "GROVE_REBUILD_DATASETS": "mnist-live"}
    env.pop("GROVE_MIRROR", None)

    def change_file():
        images = read_idx(served / FILES["train_images"]).copy()
        images[:1000] = 255 - images[:1000]
        write_idx(served / FILES["train_images"], images, compress=True)

    days = [("2026-11-23", "cold start", None, 0.90), ("2026-11-24", "same bytes", None, 0.90),
            ("2026-11-25", "file changed", change_file, 0.90), ("2026-11-26", "same bytes", None, 0.90),
            ("2026-11-27", "gate raised to 0.999", None, 0.999)]
    rows = []
    for date, event, action, min_recall in days:
        if action:
            action()
        (configs / "mnist-live.toml").write_text(live_config(base_url, min_recall))
        gets_before = dict(_Counting.gets)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "tasks.cli", "rebuild", "--date", date], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        snap = json.loads((artifacts / "mnist-live" / "snapshots" / f"{date}.json").read_text())
        serving = (artifacts / "mnist-live" / "serving").resolve().name
        downloads = {path.rsplit("/", 1)[1]: n - gets_before.get(path, 0) for path, n in _Counting.gets.items()
                     if n > gets_before.get(path, 0)}
        tasks = summary_tasks(run.stdout, "ran successfully")
        failed = summary_tasks(run.stdout, "failed")
        rows.append((date, event, run.returncode, wall, snap["sources"]["train_images"]["changed"], serving, tasks,
                     failed, downloads))
        if run.returncode not in (0, 7):
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
        if run.returncode == 7:
            rejected = json.loads((artifacts / "mnist-live" / "records" / f"{date}.rejected.json").read_text())
            print(f"{date}: gate rejection: {'; '.join(rejected['reasons'])}; still serving {rejected['serving']}")
    httpd.shutdown()

    print("\n| date | event | exit | wall s | downloaded | snapshot changed | serving after | tasks that ran | failed |")
    print("| --- | --- | ---: | ---: | --- | --- | --- | --- | --- |")
    for date, event, code, wall, changed, serving, tasks, failed, downloads in rows:
        got = ", ".join(f"{name} x{n}" for name, n in sorted(downloads.items())) or "-"
        print(f"| {date} | {event} | {code} | {wall:.1f} | {got} | {changed} | {serving} | {', '.join(tasks)} | "
              f"{', '.join(failed) or '-'} |")
    print(f"\nartifacts in {artifacts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
