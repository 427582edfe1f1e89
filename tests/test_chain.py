"""The whole chain through Luigi on tiny IDX data: statuses, no-op reruns, partial rebuilds, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import luigi
import numpy as np
import pytest
from luigi.execution_summary import LuigiStatusCode

from conftest import REPO
from pipeline import artifacts, stages
from pipeline.errors import ArtifactError
from pipeline.vectors import read_vectors

STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")


def _build(dataset="tinymnist"):
    import tasks

    ran = []

    @tasks.GroveTask.event_handler(luigi.Event.SUCCESS)
    def record(task):
        ran.append(task.stage if not isinstance(task, tasks.Forest) else f"forest_{task.n_trees}")

    try:
        result = luigi.build([tasks.Chain(dataset=dataset)], local_scheduler=True, workers=1, detailed_summary=True)
    finally:
        tasks.GroveTask._event_callbacks[tasks.GroveTask][luigi.Event.SUCCESS].discard(record)
    luigi.task_register.Register.clear_instance_cache()
    return result, ran


def _versions(root, stage):
    return [m["version"] for m in artifacts.list_versions(root, "tinymnist", stage)]


def test_chain_runs_then_is_a_no_op(tiny_mnist):
    result, ran = _build()
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert sorted(ran) == sorted(["fetch", "decode", "embed", "split", "exact", "forest_2", "forest_4", "evaluate"])
    root = tiny_mnist["root"]
    for stage in STAGES:
        latest = root / "tinymnist" / stage / "latest"
        assert latest.is_symlink(), stage
        artifacts.read_manifest(latest, verify="sha256")

    split = root / "tinymnist" / "split" / "latest"
    base, queries = read_vectors(split / "base.arrow"), read_vectors(split / "queries.arrow")
    assert len(base) == 400 and len(queries) == 60 and base.dim == 784
    np.testing.assert_array_equal(base.vectors[7], tiny_mnist["train"][0][7].reshape(-1).astype(np.float32))
    assert base.keys[7] == "train/7" and queries.keys[5] == "test/5"
    assert base.meta["metric"] == "euclidean"

    results = stages.read_results(root / "tinymnist" / "evaluate" / "latest")
    forest_rows = [r for r in results["rows"] if r["n_trees"] > 0]
    assert {(r["n_trees"], r["search_k"]) for r in forest_rows} == {(n, s) for n in (2, 4) for s in (10, 50, 2000)}
    assert all(0.0 <= r["recall"] <= 1.0 and r["qps"] > 0 for r in forest_rows)
    # search_k >= n_trees * n visits every leaf of every tree: the answer is exact.
    assert all(r["recall"] == 1.0 for r in forest_rows if r["search_k"] == 2000)
    assert [r for r in results["rows"] if r["n_trees"] == 0][0]["recall"] == 1.0

    result, ran = _build()
    assert result.status == LuigiStatusCode.SUCCESS
    assert ran == []  # everything was already complete
    assert {s: len(_versions(root, s)) for s in STAGES} == {**{s: 1 for s in STAGES}, "forest": 2}


def test_changed_n_trees_rebuilds_only_forest_and_evaluation(tiny_mnist):
    assert _build()[0].status == LuigiStatusCode.SUCCESS
    root = tiny_mnist["root"]
    before = {s: _versions(root, s) for s in STAGES}
    path = tiny_mnist["config"]
    path.write_text(path.read_text().replace("n_trees = [2, 4]", "n_trees = [2, 3]"))
    result, ran = _build()
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert sorted(ran) == ["evaluate", "forest_3"]  # forest_2 is reused: same parameters, same parents
    after = {s: _versions(root, s) for s in STAGES}
    for stage in ("fetch", "decode", "embed", "split", "exact"):
        assert after[stage] == before[stage]
    assert len(after["forest"]) == 3 and len(after["evaluate"]) == 2


def test_changed_embedding_rebuilds_everything_below(tiny_mnist):
    assert _build()[0].status == LuigiStatusCode.SUCCESS
    path = tiny_mnist["config"]
    path.write_text(path.read_text().replace('metric = "euclidean"', 'metric = "euclidean"\nscale = 0.5'))
    result, ran = _build()
    assert result.status == LuigiStatusCode.SUCCESS
    assert sorted(ran) == sorted(["embed", "split", "exact", "forest_2", "forest_4", "evaluate"])


def test_checksum_failure_fails_the_run_with_nothing_published(tiny_mnist):
    path = tiny_mnist["config"]
    text = path.read_text()
    first_sha = text.split('sha256 = "')[1].split('"')[0]
    path.write_text(text.replace(first_sha, "0" * 64))
    result, ran = _build()
    assert result.status == LuigiStatusCode.FAILED
    assert ran == []
    assert _versions(tiny_mnist["root"], "fetch") == []


def test_damaged_parent_is_reported_not_read(tiny_mnist):
    import tasks

    assert luigi.build([tasks.Split(dataset="tinymnist")], local_scheduler=True)
    luigi.task_register.Register.clear_instance_cache()
    split = tiny_mnist["root"] / "tinymnist" / "split" / "latest"
    data = (split / "base.arrow").read_bytes()
    (split / "base.arrow").write_bytes(data[: len(data) // 2])
    task = tasks.Exact(dataset="tinymnist")
    with pytest.raises(ArtifactError, match=r"base\.arrow: \d+ bytes, the manifest says \d+"):
        task.run()


_KILL_DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import luigi
    from pipeline import stages
    import tasks

    stage, ready = sys.argv[1], Path(sys.argv[2])
    original = getattr(stages, "write_" + stage)

    def stalled(*args, **kwargs):
        out = original(*args, **kwargs)  # the files are written into the temporary directory...
        ready.write_text("stalled")
        time.sleep(600)  # ...and the process is killed before it can publish them
        return out

    setattr(stages, "write_" + stage, stalled)
    luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, workers=1)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_in_a_stage_then_rerun_completes(tiny_mnist, tmp_path, stage):
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, stage, str(ready)], cwd=REPO, env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None, f"driver exited early with {child.returncode}"
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    root = tiny_mnist["root"]
    stage_dir = root / "tinymnist" / stage
    assert _versions(root, stage) == []  # the half-done stage is not visible as complete
    assert any(p.name.startswith(".tmp-") for p in stage_dir.iterdir())  # only its temporary is left

    result, ran = _build()
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert stage in {r.split("_")[0] for r in ran}
    for s in STAGES:
        leftovers = [p.name for p in (root / "tinymnist" / s).iterdir() if p.name.startswith(".tmp-")]
        assert leftovers == [], (s, leftovers)
        artifacts.read_manifest(root / "tinymnist" / s / "latest", verify="sha256")


def test_reproducible_files_are_identical_across_runs_and_measured_ones_are_marked(tiny_mnist, tmp_path, monkeypatch):
    """Two runs into two roots: the same versions; every file the manifest does not mark as measured
    is byte-identical; the measured ones are exactly the timings, the full table and the report."""
    import tasks

    roots = []
    for name in ("one", "two"):
        root = tmp_path / name
        monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
        luigi.task_register.Register.clear_instance_cache()
        result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, detailed_summary=True)
        assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
        roots.append(root / "tinymnist")
    for stage_dir in sorted(p for p in roots[0].iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted(p.name for p in stage_dir.glob("v*-*"))
        assert versions == sorted(p.name for p in (roots[1] / stage_dir.name).glob("v*-*"))
        for version in versions:
            one = artifacts.read_manifest(stage_dir / version)
            two = artifacts.read_manifest(roots[1] / stage_dir.name / version)
            measured = sorted(rel for rel, info in one["files"].items() if info["measured"])
            if stage_dir.name == "evaluate":
                assert measured == ["report.html", "report.json", "results.parquet", "timings.json"]
            else:
                assert measured == []
            for rel, info in one["files"].items():
                if not info["measured"]:
                    assert info["sha256"] == two["files"][rel]["sha256"], f"{stage_dir.name}/{version}/{rel}"
