"""A worker killed in the middle of a download: the rerun resumes the file (or, for a mutable
source, starts it over) and completes. A repair killed halfway: the damage is still found."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest

from conftest import REPO, make_mutable, write_tiny_config
from httpserver import LoopbackServer
from pipeline import artifacts, layout
from tasks.cli import main as grove


@contextlib.contextmanager
def _served_tiny_mnist(tiny_mnist, monkeypatch):
    """tinymnist's files over HTTP only (no mirror); the first response for train_images hangs after
    4000 bytes. Yields (server, path of train_images on the server)."""
    files = tiny_mnist["files"]
    with LoopbackServer({f"/tinymnist/{p.name}": p.read_bytes() for p in files.values()}) as server:
        big = f"/tinymnist/{files['train_images'].name}"
        server.stall[big] = [4000]
        write_tiny_config(tiny_mnist["configs"], "tinymnist", files, urls=[server.url("/tinymnist")])
        monkeypatch.delenv("GROVE_MIRROR")
        yield server, big


def _kill_at_4000_bytes(args: list[str], server: LoopbackServer, part: Path) -> None:
    """Run ``grove ARGS`` in a child process and SIGKILL it once ``part`` holds 4000 bytes."""
    child = subprocess.Popen([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.stalling.wait(60), "the download never started"
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == 4000):
            assert time.monotonic() < deadline, "the partial file never reached 4000 bytes"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    luigi.task_register.Register.clear_instance_cache()


@pytest.mark.slow
def test_sigkill_during_download_then_rerun_resumes(tiny_mnist, monkeypatch):
    files = tiny_mnist["files"]
    part = layout.download_cache("tinymnist") / f"{files['train_images'].name}.part"  # this machine's scratch
    with _served_tiny_mnist(tiny_mnist, monkeypatch) as (server, big):
        _kill_at_4000_bytes(["run", "tinymnist"], server, part)
        assert artifacts.list_versions(tiny_mnist["root"], "tinymnist", "fetch") == []
        assert grove(["run", "tinymnist"]) == 0
        second = server.requests_for(big)[1]
        assert second.headers.get("Range") == "bytes=4000-"  # resumed, not restarted
    fetch = tiny_mnist["root"] / "tinymnist" / "fetch" / "latest"
    manifest = artifacts.read_manifest(fetch, verify="sha256")
    assert manifest["files"][files["train_images"].name]["bytes"] == files["train_images"].stat().st_size
    assert not part.exists()


@pytest.mark.slow
def test_sigkill_during_snapshot_of_a_mutable_source_then_rerun_starts_over(tiny_mnist, monkeypatch):
    files, root = tiny_mnist["files"], tiny_mnist["root"] / "tinymnist"
    monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
    scratch = layout.snapshot_scratch("tinymnist", dt.date(2026, 11, 1))
    with _served_tiny_mnist(tiny_mnist, monkeypatch) as (server, big):
        make_mutable(tiny_mnist["config"])
        _kill_at_4000_bytes(["rebuild", "--date", "2026-11-01"], server, scratch / f"{files['train_images'].name}.part")
        assert not (root / "snapshots" / "2026-11-01.json").exists()  # no record of a half download
        assert not (tiny_mnist["root"] / layout.snapshot_bytes_prefix("tinymnist")).exists()
        assert grove(["rebuild", "--date", "2026-11-01"]) == 0
        assert "Range" not in server.requests_for(big)[1].headers  # started over: nothing to check a join by
    assert not scratch.exists()
    manifest = artifacts.read_manifest(root / "fetch" / "latest", verify="sha256")
    assert manifest["files"][files["train_images"].name]["bytes"] == files["train_images"].stat().st_size


def test_a_repair_cut_short_leaves_the_damage_found_and_refused(tiny_mnist, monkeypatch, capsys):
    """Children are removed before the damaged version: a repair killed halfway leaves the damage in
    place, so a plain run refuses it (exit 1) and `--rebuild` finds it again and completes the repair."""
    from pipeline import lifecycle
    from tasks.chain import Chain, chain_graph

    assert grove(["run", "tinymnist"]) == 0
    root = tiny_mnist["root"] / "tinymnist"
    split = next((root / "split").glob("v[0-9]*-*"))
    data = bytearray((split / "base.arrow").read_bytes())
    data[len(data) // 2] ^= 0x01
    (split / "base.arrow").write_bytes(bytes(data))

    removed = []
    remove_version = lifecycle.remove_version

    def killed_after_two(path):
        if len(removed) == 2:
            raise KeyboardInterrupt  # the process dies here
        removed.append(path)
        remove_version(path)

    monkeypatch.setattr(lifecycle, "remove_version", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.repair(chain_graph([Chain(dataset="tinymnist")]), force=True)
    monkeypatch.setattr(lifecycle, "remove_version", remove_version)
    luigi.task_register.Register.clear_instance_cache()
    assert [artifacts.as_ref(p).stage for p in removed] == ["evaluate", "forest"] and split.is_dir()

    capsys.readouterr()
    assert grove(["run", "tinymnist"]) == 1  # the missing forest is built from the split: refused
    assert "base.arrow" in capsys.readouterr().err
    assert grove(["run", "tinymnist", "--rebuild"]) == 0
    assert f"removed damaged tinymnist/split/{split.name}" in capsys.readouterr().err
    for version in root.glob("*/v[0-9]*-*"):
        artifacts.read_manifest(version, verify="sha256")
