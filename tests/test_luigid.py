"""Runs against a real luigid on a loopback port, started as the README starts it, and two runs of
one chain at the same time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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
LAUNCHER = REPO / "tasks" / "cron" / "grove-luigid.sh"


def _launcher_env(home: Path, port: int, **settings: str) -> dict[str, str]:
    """The environment of a user whose home is ``home``: no grove or luigi settings but ``settings``;
    this Python's luigid first on PATH (the launcher falls back to it without a .venv)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GROVE_LUIGID_", "LUIGI_CONFIG")) and k != "XDG_STATE_HOME"}
    env.update(HOME=str(home), GROVE_LUIGID_PORT=str(port), **settings)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start(args: list[str], env: dict[str, str], log: Path, launcher: Path = LAUNCHER) -> subprocess.Popen:
    """Run the launcher from ``log``'s directory (its output, luigid's log in the foreground, goes to ``log``)."""
    with open(log, "w") as out:
        return subprocess.Popen([str(launcher), *args], cwd=log.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for_api(port: int, proc: subprocess.Popen | None, log: Path, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{host}:{port}/api/task_list?data={{}}", timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"luigid exited with {proc.returncode}:\n{log.read_text()}")
            assert time.monotonic() < deadline, f"luigid did not start:\n{log.read_text()}"
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM (luigid then saves its state); its exit code. A luigid that will not stop is killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def luigid(tmp_path):
    """A real luigid started by tasks/cron/grove-luigid.sh (loopback, state in GROVE_LUIGID_STATE),
    with the checkout's luigi.cfg; yields (port, task history path)."""
    port = free_port()
    state = tmp_path / "luigid-state"
    log = tmp_path / "luigid.log"
    proc = _start([], _launcher_env(tmp_path, port, GROVE_LUIGID_STATE=str(state)), log)
    _wait_for_api(port, proc, log)
    yield port, state / "task-history.sqlite"
    _stop(proc)


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


# --- luigid as the README starts it ---------------------------------------------------------------

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="reads /proc/net/tcp and uses 127.0.0.2, which only Linux routes by default")


def _listening(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


def _refused(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
    return False


def _fresh_checkout(tmp_path: Path) -> Path:
    """What luigid uses of a fresh checkout: luigi.cfg, the launcher, and .venv/bin/luigid."""
    checkout = tmp_path / "grove"
    (checkout / "tasks" / "cron").mkdir(parents=True)
    shutil.copy2(REPO / "luigi.cfg", checkout / "luigi.cfg")
    shutil.copy2(LAUNCHER, checkout / "tasks" / "cron" / LAUNCHER.name)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "luigid").symlink_to(Path(sys.executable).with_name("luigid"))
    return checkout


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@needs_linux
def test_luigid_from_a_fresh_checkout_listens_on_loopback_and_keeps_its_files_outside(tmp_path):
    """The README's `tasks/cron/grove-luigid.sh`: the state directory does not exist yet (luigid used to
    crash on the missing SQLite directory); it listens on 127.0.0.1 only; its task history and saved
    state land in ~/.local/state/grove/luigid, nothing in the checkout or its artifact root."""
    checkout = _fresh_checkout(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    state = home / ".local" / "state" / "grove" / "luigid"
    port = free_port()
    before = _files(checkout)
    log = tmp_path / "luigid.log"
    proc = _start([], _launcher_env(home, port), log, launcher=checkout / "tasks" / "cron" / LAUNCHER.name)
    try:
        _wait_for_api(port, proc, log)
        assert _listening(port) == {"127.0.0.1"}
        assert _refused("127.0.0.2", port)  # another local address: not served
        _api(port, "add_task", {"worker": "test-worker", "task_id": "Probe_1", "family": "Probe",
                                "status": "PENDING", "params": {}})
        assert proc.poll() is None, log.read_text()
        with sqlite3.connect(state / "task-history.sqlite") as db:
            assert [row[0] for row in db.execute("SELECT name FROM tasks")] == ["Probe"]
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()
    assert sorted(p.name for p in state.iterdir()) == ["state.pickle", "task-history.sqlite"]
    assert _files(checkout) == before  # no artifacts/, no history, no state in the checkout


@needs_linux
def test_luigid_address_and_state_directory_are_the_users_choice(tmp_path):
    port = free_port()
    env = _launcher_env(tmp_path, port, GROVE_LUIGID_ADDRESS="127.0.0.2", GROVE_LUIGID_STATE="mine/luigid")
    log = tmp_path / "luigid.log"
    proc = _start([], env, log)
    try:
        _wait_for_api(port, proc, log, host="127.0.0.2")
        assert _listening(port) == {"127.0.0.2"}
        assert _refused("127.0.0.1", port)
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()
    state = tmp_path / "mine" / "luigid"  # relative to where the launcher was started
    assert (state / "task-history.sqlite").is_file() and (state / "state.pickle").is_file()


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie nobody reaped: it has stopped


@needs_linux
def test_background_luigid_keeps_pid_and_logs_in_the_state_directory_and_starts_once(tmp_path):
    """crontab.example runs `grove-luigid.sh --background` at boot and every ten minutes; without
    GROVE_LUIGID_STATE its directory follows XDG_STATE_HOME."""
    port = free_port()
    state = tmp_path / "xdg-state" / "grove" / "luigid"
    env = _launcher_env(tmp_path, port, XDG_STATE_HOME=str(tmp_path / "xdg-state"))
    command = [str(LAUNCHER), "--background"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr
    pid = None
    try:
        _wait_for_api(port, None, state / "logs" / "luigi-server.log")
        pid = int((state / "luigid.pid").read_text())
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        time.sleep(1)
        assert int((state / "luigid.pid").read_text()) == pid and not _gone(pid)
        assert _listening(port) == {"127.0.0.1"}
        assert "Server already running (pid=%d)" % pid in (state / "logs" / "luigi-server.log").read_text()
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
    assert _gone(pid)
    assert (state / "state.pickle").is_file() and (state / "task-history.sqlite").is_file()


def test_plain_luigid_in_the_checkout_names_the_missing_state_setting(tmp_path):
    """luigi.cfg's task history lives in ${GROVE_LUIGID_STATE}: a luigid started without the launcher
    stops at once and says which variable is missing, instead of writing into the artifact root."""
    checkout = _fresh_checkout(tmp_path)
    env = _launcher_env(tmp_path, free_port())
    run = subprocess.run([str(checkout / ".venv" / "bin" / "luigid"), "--address", "127.0.0.1", "--port",
                          env["GROVE_LUIGID_PORT"], "--state-path", str(tmp_path / "state.pickle")],
                         cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "nonexisting environment variable GROVE_LUIGID_STATE" in run.stderr
    assert _files(checkout) == _files(_fresh_checkout(tmp_path / "again"))
