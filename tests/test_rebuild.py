"""Dated rebuilds: quality gate, promotion, rollback, records, gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import luigi
import pytest

from conftest import REPO, make_mutable

from pipeline import artifacts, lifecycle
from pipeline.errors import ConfigError
from tasks.cli import main as grove


def _set_gate(tiny_mnist, min_recall, min_qps=0):
    path = tiny_mnist["config"]
    text = path.read_text().split("\n[gate]")[0]
    path.write_text(text + f"\n[gate]\nmin_recall = {min_recall}\nmin_qps = {min_qps}\nn_trees = 4\nsearch_k = 2000\n")
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture
def rebuild_env(tiny_mnist, monkeypatch):
    monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
    return tiny_mnist


def test_rebuild_promotes_then_gate_rejects_and_old_version_keeps_serving(rebuild_env, capsys):
    root = rebuild_env["root"]
    _set_gate(rebuild_env, 0.99)
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    first = lifecycle.serving_version(root, "tinymnist")
    assert first is not None
    record = json.loads((root / "tinymnist" / "records" / "2026-11-01.json").read_text())
    assert record["promoted"] and record["serving"] == first and record["gate_point"]["recall"] == 1.0

    # Next night: nothing changed, so only the dated record is written.
    assert grove(["rebuild", "--date", "2026-11-02"]) == 0
    assert "DatedRecord" in capsys.readouterr().out
    assert {s: len(artifacts.list_versions(root, "tinymnist", s)) for s in ("evaluate", "forest")} == \
        {"evaluate": 1, "forest": 2}

    # A config change that ruins recall at the gate point: search_k 2000 -> 10 and a gate at 10.
    path = rebuild_env["config"]
    path.write_text(path.read_text().replace("search_k = [10, 50, 2000]", "search_k = [10, 50]")
                    .replace("search_k = 2000", "search_k = 10"))
    luigi.task_register.Register.clear_instance_cache()
    code = grove(["rebuild", "--date", "2026-11-03"])
    assert code == 7
    assert "quality gate rejected: tinymnist" in capsys.readouterr().err
    assert lifecycle.serving_version(root, "tinymnist") == first  # the old version still serves
    rejected = json.loads((root / "tinymnist" / "records" / "2026-11-03.rejected.json").read_text())
    assert not rejected["promoted"] and "< gate.min_recall 0.99" in rejected["reasons"][0]
    assert not (root / "tinymnist" / "records" / "2026-11-03.json").exists()


def test_promote_rollback_and_query_uses_serving(rebuild_env, capsys):
    root = rebuild_env["root"]
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    first = lifecycle.serving_version(root, "tinymnist")
    path = rebuild_env["config"]
    path.write_text(path.read_text().replace("n_trees = [2, 4]", "n_trees = [2, 5]"))
    luigi.task_register.Register.clear_instance_cache()
    assert grove(["rebuild", "--date", "2026-11-02"]) == 0
    second = lifecycle.serving_version(root, "tinymnist")
    assert second != first
    capsys.readouterr()
    assert grove(["query", "tinymnist", "test/0", "-k", "3"]) == 0
    assert f"serving {second}" in capsys.readouterr().out
    assert grove(["rollback", "tinymnist"]) == 0
    assert lifecycle.serving_version(root, "tinymnist") == first
    assert grove(["promote", "tinymnist", "v1-0000000000000000"]) == 3  # no such evaluation
    assert lifecycle.serving_version(root, "tinymnist") == first
    assert grove(["versions", "tinymnist", "evaluate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(first in line and "serving" in line for line in lines)


def test_gc_keeps_what_serves_and_its_parents(rebuild_env, capsys):
    root = rebuild_env["root"]
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    serving = lifecycle.serving_paths(root, "tinymnist")
    path = rebuild_env["config"]
    for n in (5, 6):  # two more generations of forests and evaluations
        path.write_text(path.read_text().replace("n_trees = [2, 4]", f"n_trees = [2, {n}]")
                        .replace("n_trees = [2, 5]", f"n_trees = [2, {n}]"))
        luigi.task_register.Register.clear_instance_cache()
        assert grove(["run", "tinymnist"]) == 0
    before = {p for p in root.glob("tinymnist/*/v[0-9]*-*")}
    planned = lifecycle.plan_gc(root, keep=1)
    assert grove(["gc", "--keep", "1", "--dry-run"]) == 0
    assert f"would delete {len(planned)} version(s)" in capsys.readouterr().out
    assert {p for p in root.glob("tinymnist/*/v[0-9]*-*")} == before  # a dry run deletes nothing
    assert grove(["gc", "--keep", "1"]) == 0
    after = {p for p in root.glob("tinymnist/*/v[0-9]*-*")}
    assert after == before - {root / key for key in planned} and planned
    for kept in serving.values():  # what serves, and everything it was built from, survives
        assert kept in after
        for parent in artifacts.read_manifest(kept)["parents"].values():
            assert root / parent in after
    for stage_dir in root.glob("tinymnist/*"):
        latest = artifacts.read_pointer(stage_dir)
        assert latest is None or (stage_dir / latest).is_dir()
    with pytest.raises(ConfigError):
        lifecycle.plan_gc(root, keep=0)


@pytest.mark.slow
def test_range_daily_base_backfills_rebuild_through_the_luigi_command(rebuild_env):
    """The cron form from the README, through Luigi's own command line and luigi.cfg's [retcode]."""
    root = rebuild_env["root"]
    make_mutable(rebuild_env["config"])
    luigi_bin = Path(sys.executable).with_name("luigi")
    command = [str(luigi_bin), "--module", "tasks", "RangeDailyBase", "--of", "Rebuild",
               "--start", "2026-11-01", "--stop", "2026-11-04", "--local-scheduler"]
    run = subprocess.run(command, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    days = ("2026-11-01", "2026-11-02", "2026-11-03")
    assert sorted(p.stem for p in (root / "tinymnist" / "records").glob("*.json")) == list(days)
    assert sorted(p.stem for p in (root / "tinymnist" / "snapshots").glob("*.json")) == list(days)
    assert len(artifacts.list_versions(root, "tinymnist", "evaluate")) == 1  # same bytes every day: built once
    # Every day done: a rerun finds nothing to do; a broken config exits with [retcode] task_failed (30).
    assert subprocess.run(command, cwd=REPO, env=os.environ.copy(), capture_output=True, timeout=120).returncode == 0
    _set_gate(rebuild_env, 1.0, min_qps=1e12)  # a gate no index meets
    command[command.index("2026-11-04")] = "2026-11-05"
    run = subprocess.run(command, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 30, run.stdout[-3000:] + run.stderr[-3000:]
    assert (root / "tinymnist" / "records" / "2026-11-04.rejected.json").is_file()
