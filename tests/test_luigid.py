"""Runs against a real luigid on a loopback port, and two runs of one chain at the same time."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, make_mutable
from httpserver import free_port
from pipeline import artifacts

STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")
GROVE = [sys.executable, "-m", "tasks.cli"]


@pytest.fixture
def luigid(tmp_path):
    """A real luigid on 127.0.0.1 with task history in a SQLite file; yields (port, history path)."""
    port = free_port()
    history = tmp_path / "history.sqlite"
    cfg = tmp_path / "luigid.cfg"
    cfg.write_text(f"[scheduler]\nrecord_task_history = true\nremove_delay = 600\n"
                   f"[task_history]\ndb_connection = sqlite:///{history}\n")
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg)}
    (tmp_path / "logs").mkdir()
    luigid_bin = Path(sys.executable).with_name("luigid")
    proc = subprocess.Popen([str(luigid_bin), "--address", "127.0.0.1", "--port", str(port),
                             "--state-path", str(tmp_path / "state.pickle"), "--logdir", str(tmp_path / "logs")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={{}}", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, "luigid exited"
            assert time.monotonic() < deadline, "luigid did not start"
            time.sleep(0.2)
    yield port, history
    proc.terminate()
    proc.wait(timeout=10)


def _api(port, method, data=None):
    url = f"http://127.0.0.1:{port}/api/{method}?data={urllib.parse.quote(json.dumps(data or {}))}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["response"]


def _start_two(args, env):
    return [subprocess.Popen(GROVE + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]


def _running_counts(history: Path) -> dict[str, list[int]]:
    """Task family -> how often each of its tasks started (RUNNING events in luigid's SQLite history)."""
    with sqlite3.connect(history) as db:
        rows = db.execute(
            "SELECT t.name, COUNT(*) FROM task_events e JOIN tasks t ON e.task_id = t.id "
            "WHERE e.event_name = 'RUNNING' GROUP BY t.task_id").fetchall()
    counts: dict[str, list[int]] = {}
    for name, n in rows:
        counts.setdefault(name, []).append(n)
    return counts


def _check_store(root):
    for stage in STAGES:
        versions = artifacts.list_versions(root, "tinymnist", stage)
        assert len(versions) == (2 if stage == "forest" else 1), stage
        for m in versions:
            artifacts.read_manifest(m["path"], verify="sha256")
        leftovers = [p.name for p in (root / "tinymnist" / stage).iterdir() if p.name.startswith(".tmp-")]
        assert leftovers == [], leftovers


@pytest.mark.slow
def test_two_workers_under_luigid_run_each_task_once(tiny_mnist, luigid):
    port, history = luigid
    runs = _start_two(["run", "tinymnist", "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)],
                      os.environ.copy())
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs

    done = _api(port, "task_list", {"status": "DONE"})
    names = {task["name"] for task in done.values()}
    assert {"Fetch", "Decode", "Embed", "Split", "Exact", "Forest", "Evaluate", "Chain"} <= names

    counts = _running_counts(history)
    assert counts and all(n == 1 for ns in counts.values() for n in ns), counts
    assert len(counts["Forest"]) == 2  # n_trees 2 and 4, each run once
    _check_store(tiny_mnist["root"])


@pytest.mark.slow
def test_two_overlapping_local_runs_do_not_corrupt_the_store(tiny_mnist):
    runs = _start_two(["run", "tinymnist"], os.environ.copy())
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    _check_store(tiny_mnist["root"])


@pytest.mark.slow
def test_two_dated_rebuilds_with_a_mutable_source_under_luigid(tiny_mnist, luigid):
    """The snapshot is a dynamic dependency: two cron runs at once still take it once and build once."""
    port, history = luigid
    make_mutable(tiny_mnist["config"])
    env = {**os.environ, "GROVE_REBUILD_DATASETS": "tinymnist"}
    scheduler = ["--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)]
    runs = _start_two(["rebuild", "--date", "2026-11-01", *scheduler], env)
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    _check_store(tiny_mnist["root"])
    assert (tiny_mnist["root"] / "tinymnist" / "snapshots" / "2026-11-01.json").is_file()

    # Next date, same bytes: a new snapshot and record, no stage of the chain runs again.
    run = subprocess.run(GROVE + ["rebuild", "--date", "2026-11-02", *scheduler], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    _check_store(tiny_mnist["root"])
    counts = _running_counts(history)
    # DatedRecord of the first date starts twice by design: it yields the chain as a dynamic
    # dependency, is suspended until that is built, and is run again. Every other task runs once.
    assert sorted(counts.pop("DatedRecord")) == [1, 2], counts
    assert all(n == 1 for ns in counts.values() for n in ns), counts
    assert len(counts["Snapshot"]) == 2 and len(counts["Rebuild"]) == 2
    assert len(counts["Fetch"]) == 1 and len(counts["Evaluate"]) == 1
