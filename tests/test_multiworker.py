"""Workers on many machines: a real luigid on a loopback port and three worker processes, each standing
in for its own machine (its own working directory, HOME, TMPDIR and GROVE_SCRATCH; no shared local disk),
that share only the scheduler and an artifact root on a real S3 server (SeaweedFS, tests/s3server.py).

They build one chain together: every task runs once (luigid's task history says so) and the
reproducible bytes are those of a single local run. A worker killed with SIGKILL in the middle of a
stage loses its task to another worker after luigid's disconnect delay, the chain completes, and the
store holds no partial version.

The helpers here are also used by benchmarks/multiworker.py."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, tiny_digits, write_tiny_config
from httpserver import free_port
from pipeline.formats.idx import write_idx

STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")
LAUNCHER = REPO / "tasks" / "cron" / "grove-luigid.sh"
RUNNING = re.compile(r"^running  (\w+)\((.*)\)\s*$", re.M)
DONE = re.compile(r"^done     (\w+)\((.*)\) in ([0-9.]+) s\s*$", re.M)

# luigid: a dead worker's task goes back to the others after ~5 s; `prune_on_get_work` makes luigid
# notice the dead worker on the next get_work instead of in its pruning pass every 60 s.
SCHEDULER_CFG = """\
[scheduler]
record_task_history = true
worker_disconnect_delay = 5
retry_delay = 1
prune_on_get_work = true
"""
# workers: stay while others run what they wait for, and ask for work every second.
WORKER_CFG = """\
[worker]
keep_alive = true
ping_interval = 1
wait_interval = 1
"""


# --- data ------------------------------------------------------------------------------------------


def make_dataset(base: Path, n_train: int, n_test: int, n_trees: tuple[int, ...], name: str = "tinymnist") -> dict:
    """A mirror and a config dir for a tiny MNIST-like dataset ``name`` (read-only inputs every machine
    may share, as a mirror URL and a config checkout would be)."""
    mirror = base / "mirror"
    (mirror / name).mkdir(parents=True, exist_ok=True)
    train_x, train_y = tiny_digits(n_train, seed=1)
    test_x, test_y = tiny_digits(n_test, seed=2)
    d = mirror / name
    files = {
        "train_images": write_idx(d / "tiny-train-images.gz", train_x, compress=True),
        "train_labels": write_idx(d / "tiny-train-labels.gz", train_y, compress=True),
        "test_images": write_idx(d / "tiny-test-images.gz", test_x, compress=True),
        "test_labels": write_idx(d / "tiny-test-labels.gz", test_y, compress=True),
    }
    configs = base / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config = write_tiny_config(configs, name, files, n_trees=n_trees)
    return {"mirror": mirror, "configs": configs, "config": config, "name": name}


# --- luigid ----------------------------------------------------------------------------------------


@dataclass
class Luigid:
    port: int
    state: Path
    log: Path
    proc: subprocess.Popen

    @property
    def history(self) -> Path:
        return self.state / "task-history.sqlite"

    def api(self, method: str, data: dict | None = None):
        url = f"http://127.0.0.1:{self.port}/api/{method}?data={urllib.parse.quote(json.dumps(data or {}))}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["response"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_luigid(base: Path) -> Luigid:
    """luigid as tasks/cron/grove-luigid.sh starts it (loopback, state in its own directory, the
    checkout's luigi.cfg), with SCHEDULER_CFG on top through LUIGI_CONFIG_PATH."""
    base.mkdir(parents=True, exist_ok=True)
    cfg = base / "luigid.cfg"
    cfg.write_text(SCHEDULER_CFG)
    port = free_port()
    state = base / "state"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GROVE_", "LUIGI_CONFIG", "AWS_")) and k != "XDG_STATE_HOME"}
    env.update(HOME=str(base), GROVE_LUIGID_PORT=str(port), GROVE_LUIGID_STATE=str(state),
               LUIGI_CONFIG_PATH=str(cfg))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = base / "luigid.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LAUNCHER)], cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    daemon = Luigid(port, state, log, proc)
    deadline = time.monotonic() + 30
    while True:
        try:
            daemon.api("task_list")
            return daemon
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                daemon.stop()
                raise RuntimeError(f"luigid did not start:\n{log.read_text()}") from None
            time.sleep(0.2)


def history_runs(history: Path) -> dict[str, list[int]]:
    """Task id -> [family, how often it started] from luigid's SQLite task history."""
    with sqlite3.connect(history) as db:
        rows = db.execute(
            "SELECT t.task_id, t.name, SUM(e.event_name = 'RUNNING') FROM tasks t "
            "JOIN task_events e ON e.task_id = t.id GROUP BY t.task_id").fetchall()
    return {task_id: [name, int(n)] for task_id, name, n in rows}


def history_durations(history: Path) -> dict[str, float]:
    """Task id -> seconds from its last RUNNING to its DONE event (luigid's clock)."""
    with sqlite3.connect(history) as db:
        rows = db.execute(
            "SELECT t.task_id, e.event_name, e.ts FROM task_events e JOIN tasks t ON e.task_id = t.id "
            "ORDER BY e.ts").fetchall()
    started, took = {}, {}
    for task_id, event, ts in rows:
        when = _timestamp(ts)
        if event == "RUNNING":
            started[task_id] = when
        elif event == "DONE" and task_id in started:
            took[task_id] = when - started[task_id]
    return took


def _timestamp(ts) -> float:
    import datetime as dt

    if isinstance(ts, (int, float)):
        return float(ts)
    return dt.datetime.fromisoformat(str(ts)).timestamp()


# --- machines --------------------------------------------------------------------------------------


@dataclass
class Machine:
    """One worker host: its own working directory (with the checkout's luigi.cfg, as its own checkout
    would have), HOME, TMPDIR and grove scratch. Nothing of it is seen by another machine."""
    name: str
    base: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    log: Path = field(init=False)

    def __post_init__(self):
        for sub in ("work", "home", "tmp", "scratch"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "work" / "luigi.cfg").write_text((REPO / "luigi.cfg").read_text())
        (self.base / "worker.cfg").write_text(WORKER_CFG)
        self.log = self.base / "worker.log"

    def env(self, root: str, data: dict, threads: int = 1) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GROVE_", "LUIGI_CONFIG", "XDG_")) and k not in ("TMPDIR", "PYTHONPATH")}
        env.update(HOME=str(self.base / "home"), TMPDIR=str(self.base / "tmp"),
                   GROVE_SCRATCH=str(self.base / "scratch"), GROVE_ARTIFACTS=root,
                   GROVE_CONFIGS=str(data["configs"]), GROVE_MIRROR=data["mirror"].as_uri(),
                   GROVE_THREADS=str(threads), LUIGI_CONFIG_PATH=str(self.base / "worker.cfg"))
        return env

    def start(self, luigid: Luigid, root: str, data: dict) -> None:
        command = [sys.executable, "-m", "tasks.cli", "run", data["name"], "--scheduler-host", "127.0.0.1",
                   "--scheduler-port", str(luigid.port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=self.base / "work", env=self.env(root, data), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ran(self) -> list[tuple[str, str]]:
        """(family, parameters) of every task this worker started."""
        return RUNNING.findall(self.output())

    def done(self) -> list[tuple[str, str, float]]:
        return [(f, p, float(s)) for f, p, s in DONE.findall(self.output())]

    def kill(self) -> None:
        """SIGKILL to the worker's whole process group: the machine is gone."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.ended = time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.ended = self.ended or time.monotonic()
        return code


def wait_all(machines: list[Machine], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while any(m.proc.poll() is None for m in machines) and time.monotonic() < deadline:
        for m in machines:
            if m.proc.poll() is not None and m.ended is None:
                m.ended = time.monotonic()
        time.sleep(0.1)
    for m in machines:
        if m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait()
            m.ended = time.monotonic()
        elif m.ended is None:
            m.ended = time.monotonic()
    return [m.proc.returncode for m in machines]


# --- the store -------------------------------------------------------------------------------------


def reproducible(root: str, dataset: str) -> dict[str, dict[str, str]]:
    """``{stage/version: {file: sha256}}`` of every file the manifests do not mark measured."""
    from pipeline import artifacts

    out = {}
    for stage in STAGES:
        for m in artifacts.list_versions(root, dataset, stage):
            out[f"{stage}/{m['version']}"] = {rel: f["sha256"] for rel, f in m["files"].items() if not f["measured"]}
    return out


def partial_versions(root: str, dataset: str) -> list[str]:
    """Version prefixes holding something a reader could take for a version without a manifest that
    names it: files outside ``.attempts/`` and no manifest. (An attempt no manifest names is what a
    killed writer leaves and `grove gc` clears; nothing reads it.)"""
    from pipeline import artifacts, layout

    store = artifacts.store_of(root)
    bad = []
    for stage in STAGES:
        for version in store.list(layout.stage_key(dataset, stage)):
            if not layout.is_version(version):
                continue
            key = layout.version_key(dataset, stage, version)
            files = store.files(key)
            if layout.MANIFEST in files:
                continue
            outside = [rel for rel in files if not rel.startswith(layout.ATTEMPTS + "/")]
            if outside:
                bad.append(f"{key}: {outside}")
    return bad


def check_store(root: str, dataset: str, n_forests: int) -> None:
    """Every stage published (one version, a forest per n_trees) and verified against its manifest."""
    from pipeline import artifacts, layout

    for stage in STAGES:
        versions = artifacts.list_versions(root, dataset, stage)
        assert len(versions) == (n_forests if stage == "forest" else 1), (stage, versions)
        for m in versions:
            ref = artifacts.ref_from_key(root, layout.version_key(dataset, stage, m["version"]))
            artifacts.read_manifest(ref, verify="sha256")
    assert partial_versions(root, dataset) == []


def local_reference(tmp_path: Path, data: dict, monkeypatch) -> dict[str, dict[str, str]]:
    """The same chain built once, in this process, with the local scheduler on a local root."""
    import luigi.task_register

    from tasks.cli import main as grove

    root = tmp_path / "local-root"
    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.setenv("GROVE_CONFIGS", str(data["configs"]))
    monkeypatch.setenv("GROVE_MIRROR", data["mirror"].as_uri())
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "local-scratch"))
    luigi.task_register.Register.clear_instance_cache()
    try:
        assert grove(["run", data["name"]]) == 0
    finally:
        luigi.task_register.Register.clear_instance_cache()
    return reproducible(root, data["name"])


def _report(machines: list[Machine], daemon: Luigid) -> str:
    parts = [f"--- {m.name} (exit {m.proc.returncode if m.proc else None})\n{m.output()[-4000:]}" for m in machines]
    parts.append(f"--- luigid\n{daemon.log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


@pytest.fixture
def luigid(tmp_path):
    daemon = start_luigid(tmp_path / "luigid")
    yield daemon
    assert daemon.stop() == 0, daemon.log.read_text()


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_machines_build_one_chain_each_task_once_same_bytes(s3_root, luigid, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "inputs", n_train=1000, n_test=100, n_trees=(2, 4, 6))
    machines = [Machine(f"machine-{i}", tmp_path / f"machine-{i}") for i in range(3)]
    for m in machines:
        m.start(luigid, s3_root, data)
    codes = wait_all(machines, timeout=150)
    assert codes == [0, 0, 0], _report(machines, luigid)

    # every task of the chain started exactly once across the three workers, says luigid's history
    runs = history_runs(luigid.history)
    families = sorted(name for name, _ in runs.values())
    assert families == sorted(["Fetch", "Decode", "Embed", "Split", "Exact", "Forest", "Forest", "Forest",
                               "Evaluate", "Chain"]), runs
    assert all(n == 1 for _, n in runs.values()), runs
    # ... and the workers' own logs agree: each task in exactly one worker's log
    ran = [task for m in machines for task in m.ran()]
    assert len(ran) == len(set(ran)) == len(runs), {m.name: m.ran() for m in machines}

    # no machine's private directories leaked into another's, and nothing landed in a local "s3:" folder
    for m in machines:
        assert not list((m.base / "work").glob("s3*")) and not (m.base / "work" / "artifacts").exists()

    check_store(s3_root, data["name"], n_forests=3)

    # the reproducible bytes are those of a single local run, version by version
    there = reproducible(s3_root, data["name"])
    here = local_reference(tmp_path, data, monkeypatch)
    assert len(here) == len(STAGES) + 2
    assert there == here


@pytest.mark.slow
def test_a_worker_killed_mid_stage_loses_its_task_to_another(s3_root, luigid, tmp_path):
    # Evaluate times queries over several passes: long enough (seconds) to be killed in the middle of.
    data = make_dataset(tmp_path / "inputs", n_train=6000, n_test=200, n_trees=(20, 40))
    machines = [Machine(f"machine-{i}", tmp_path / f"machine-{i}") for i in range(3)]
    for m in machines:
        m.start(luigid, s3_root, data)

    victim = None
    deadline = time.monotonic() + 90
    while victim is None and time.monotonic() < deadline:
        for m in machines:
            if any(family == "Evaluate" for family, _ in m.ran()):
                victim = m
                break
        if all(m.proc.poll() is not None for m in machines):
            break
        time.sleep(0.05)
    assert victim is not None, _report(machines, luigid)
    time.sleep(1.0)  # in the middle of it
    assert victim.proc.poll() is None, "the Evaluate finished before it could be killed:\n" + victim.output()
    assert not any(f == "Evaluate" for f, _, _ in victim.done())
    victim.kill()
    killed_at = time.monotonic()

    others = [m for m in machines if m is not victim]
    codes = wait_all(others, timeout=120)
    assert codes == [0, 0], _report(machines, luigid)

    # another worker took the Evaluate over, after luigid's disconnect delay
    takers = [m for m in others if any(f == "Evaluate" for f, _ in m.ran())]
    assert len(takers) == 1, _report(machines, luigid)
    assert any(f == "Evaluate" for f, _, _ in takers[0].done())
    runs = history_runs(luigid.history)
    evaluate = [n for name, n in runs.values() if name == "Evaluate"]
    assert evaluate == [2], runs  # started by the victim, then by the taker
    assert all(n == 1 for name, n in runs.values() if name != "Evaluate"), runs
    assert max(m.ended for m in others) - killed_at < 80

    # the chain is complete and the store holds no partial version
    check_store(s3_root, data["name"], n_forests=2)
