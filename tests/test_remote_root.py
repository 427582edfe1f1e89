"""An artifact root on an object store (a real SeaweedFS S3 server, tests/s3server.py): the tiny MNIST
chain built, listed, verified, promoted, rolled back, queried, collected and reported through the
`grove` command with GROVE_ARTIFACTS=s3://..., and the same reproducible bytes as a local run; and a
`grove run` whose server is killed in the middle of an upload, then started again."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest

from conftest import make_mutable, write_tiny_config
from httpserver import LoopbackServer
from pipeline import artifacts, layout, lifecycle, snapshot
from pipeline.errors import ArtifactError
from tasks.cli import main as grove

REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")


def _fresh_tasks() -> None:
    luigi.task_register.Register.clear_instance_cache()


def _reproducible(root, dataset: str) -> dict[str, dict[str, str]]:
    """``{stage/version: {file: sha256}}`` of every file the manifests do not mark measured."""
    out = {}
    for stage in STAGES:
        for m in artifacts.list_versions(root, dataset, stage):
            out[f"{stage}/{m['version']}"] = {rel: f["sha256"] for rel, f in m["files"].items() if not f["measured"]}
    return out


def _downloads(root) -> int:
    return artifacts.store_of(root).stats["downloads"]


def test_tiny_chain_on_an_object_store(tiny_mnist, s3_root, monkeypatch, capsys, tmp_path):
    root = s3_root
    monkeypatch.setenv("GROVE_ARTIFACTS", root)
    monkeypatch.chdir(tmp_path)
    store = artifacts.store_of(root)
    assert not store.is_local

    # --- run: every stage published to the store, nothing under a local folder named after the URL
    assert grove(["run", "tinymnist"]) == 0
    out = capsys.readouterr().out
    assert "recall" in out and "tinymnist: tinymnist/evaluate/" in out
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))
    for stage in STAGES:
        versions = artifacts.list_versions(root, "tinymnist", stage)
        assert len(versions) == (2 if stage == "forest" else 1)  # n_trees = [2, 4]
        latest = store.get_pointer(layout.stage_key("tinymnist", stage), layout.LATEST)
        assert [m["version"] for m in versions if m["latest"]] == [latest]
        for m in versions:
            assert m["attempt"] and m["path"] == f"{root}/tinymnist/{stage}/{m['version']}"
            # the bytes of each file are under the attempt its manifest names
            _, keys = store.version_file_keys(layout.version_key("tinymnist", stage, m["version"]))
            assert set(keys) == set(m["files"])
            assert all(f"/{layout.ATTEMPTS}/{m['attempt']}/" in k for k in keys.values())
    assert not store.list("tinymnist/.downloads") and not store.list("tinymnist/.checkpoints")
    assert (layout.download_cache("tinymnist") / "tiny-train-images.gz").is_file()  # this machine's scratch
    first = artifacts.list_versions(root, "tinymnist", "evaluate")[0]["version"]

    # a second run is a no-op
    _fresh_tasks()
    assert grove(["run", "tinymnist"]) == 0
    assert "ran successfully" not in capsys.readouterr().out

    # --- versions, show --verify
    assert grove(["versions", "tinymnist"]) == 0
    listing = capsys.readouterr().out
    assert all(re.search(rf"^{stage}\s+v\d+-[0-9a-f]+\s.*latest", listing, re.M) for stage in STAGES), listing
    assert "nothing serves tinymnist yet" in listing
    assert grove(["show", f"tinymnist/evaluate/{first}", "--verify"]) == 0
    assert f'"version": "{first}"' in capsys.readouterr().out
    assert grove(["show", f"{root}/tinymnist/split/latest"]) == 0
    assert '"stage": "split"' in capsys.readouterr().out
    assert grove(["show", "tinymnist/evaluate/v2-0000000000000000"]) == 3
    assert f"no version 'tinymnist/evaluate/v2-0000000000000000' under the artifact root {root}" in \
        capsys.readouterr().err

    # --- promote: the pointer object and one history object per promotion
    assert grove(["promote", "tinymnist", first]) == 0
    assert lifecycle.serving_version(root, "tinymnist") == first
    assert store.get_pointer("tinymnist", layout.SERVING) == layout.serving_target(first)
    assert len(store.list(layout.serving_history_prefix("tinymnist"))) == 1
    assert not store.exists(layout.serving_log_key("tinymnist"))  # no appending on an object store
    capsys.readouterr()

    # --- query from another machine: the first query fetches split and forest, the second nothing
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "another-machine"))
    before = _downloads(root)
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0
    answer = capsys.readouterr().out
    assert f"serving {first}" in answer and "test/3" in answer
    fetched = _downloads(root) - before
    split_and_forest = lifecycle.serving_refs(root, "tinymnist")
    n_files = sum(len(artifacts.read_manifest(split_and_forest[n], verify="none")["files"]) for n in ("split", "forest"))
    assert fetched == n_files
    before = _downloads(root)
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0

    def untimed(text: str) -> str:  # the timings and the column widths they set left out
        return re.sub(r"[ \t]+", " ", re.sub(r"\([0-9.]+ ms\)", "", text))

    assert untimed(capsys.readouterr().out) == untimed(answer)  # the same neighbours
    assert _downloads(root) == before  # memory-mapped from this machine's cache

    # --- a second evaluation, promoted by hand; rollback serves the first again
    config = tiny_mnist["config"]
    config.write_text(config.read_text().replace("n_trees = [2, 4]", "n_trees = [2, 5]"))
    _fresh_tasks()
    assert grove(["run", "tinymnist"]) == 0
    second = [m["version"] for m in artifacts.list_versions(root, "tinymnist", "evaluate") if m["version"] != first]
    assert len(second) == 1
    assert grove(["promote", "tinymnist", second[0]]) == 0
    assert grove(["rollback", "tinymnist"]) == 0
    assert f"serving evaluate/{first}" in capsys.readouterr().out
    assert lifecycle.serving_version(root, "tinymnist") == first
    history = lifecycle.serving_history(root, "tinymnist")
    assert [e["version"] for e in history] == [first, second[0], first]
    assert history[-1]["reason"] == f"rollback from {second[0]}"

    # --- report: the index page is stored beside the datasets it links to
    assert grove(["report"]) == 0
    assert f"wrote {root}/index.html" in capsys.readouterr().out
    page = store.read_bytes(layout.index_page_key()).decode()
    assert "tinymnist" in page and f"{first} (serving)" in page
    links = re.findall(r'href="(tinymnist/evaluate/[^"]+/report\.html)"', page)
    assert links and all(store.exists(link) for link in links)

    # --- gc: an abandoned upload (a writer killed mid-upload) and the versions nothing needs go
    forest = artifacts.list_versions(root, "tinymnist", "forest")[0]
    abandoned = (f"{layout.version_key('tinymnist', 'forest', forest['version'])}/{layout.ATTEMPTS}/"
                 "20000101T000000Z-0123456789ab")
    store.write_bytes(f"{abandoned}/index/vectors.npy", b"half an upload")
    serving_closure = {ref.key for ref in lifecycle.serving_closure(root, "tinymnist")}
    assert grove(["gc", "--keep", "1", "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert f"would delete {abandoned}" in planned and "and 1 abandoned upload(s)" in planned
    assert store.exists(f"{abandoned}/index/vectors.npy")
    assert grove(["gc", "--keep", "1"]) == 0
    deleted = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("deleted ")
               and "/" in line]
    assert abandoned in deleted and not store.files(abandoned)
    for key in deleted:
        assert key not in serving_closure
    remaining = {f"tinymnist/{s}/{m['version']}" for s in STAGES for m in artifacts.list_versions(root, "tinymnist", s)}
    assert serving_closure <= remaining
    for stage in STAGES:  # every latest pointer still names a published version
        latest = store.get_pointer(layout.stage_key("tinymnist", stage), layout.LATEST)
        assert latest and artifacts.ref_from_key(root, layout.version_key("tinymnist", stage, latest)).exists()
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0  # what serves survived gc
    capsys.readouterr()

    # --- the same chain on a local root: the same reproducible bytes, version by version
    config.write_text(config.read_text().replace("n_trees = [2, 5]", "n_trees = [2, 4]"))
    local = tmp_path / "local-root"
    monkeypatch.setenv("GROVE_ARTIFACTS", str(local))
    _fresh_tasks()
    assert grove(["run", "tinymnist"]) == 0
    capsys.readouterr()
    here = _reproducible(local, "tinymnist")
    there = {k: v for k, v in _reproducible(root, "tinymnist").items() if k in here}
    assert len(here) == len(STAGES) + 1  # two forests
    assert there == here


def test_a_damaged_remote_object_is_refused_and_rebuilt(tiny_mnist, s3_root, monkeypatch, capsys, tmp_path):
    """An object changed on the store after it was published: a machine that fetches it refuses it
    (exit 3, naming the object), and `grove run --rebuild` removes it and what was built from it."""
    root = s3_root
    monkeypatch.setenv("GROVE_ARTIFACTS", root)
    monkeypatch.chdir(tmp_path)
    store = artifacts.store_of(root)
    assert grove(["run", "tinymnist"]) == 0
    (split,) = artifacts.list_versions(root, "tinymnist", "split")
    _, keys = store.version_file_keys(layout.version_key("tinymnist", "split", split["version"]))
    data = bytearray(store.read_bytes(keys["base.arrow"]))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(keys["base.arrow"], bytes(data))
    capsys.readouterr()

    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "another-machine"))  # nothing cached there
    assert grove(["show", f"tinymnist/split/{split['version']}", "--verify"]) == 3
    assert f"{root}/{keys['base.arrow']}" in capsys.readouterr().err
    _fresh_tasks()
    assert grove(["run", "tinymnist", "--rebuild"]) == 0
    err = capsys.readouterr().err
    assert f"removed damaged tinymnist/split/{split['version']}" in err and "NOT rebuilt" not in err
    assert f"rebuilt tinymnist/split/{split['version']}" in err
    assert grove(["show", f"tinymnist/split/{split['version']}", "--verify"]) == 0


def test_snapshots_of_a_mutable_source_on_an_object_store(tiny_mnist, s3_root, monkeypatch, capsys, tmp_path):
    """The snapshot record and the bytes it pins live in the store: a Fetch on another machine finds
    the pinned bytes there after the publisher has changed the file."""
    root = s3_root
    files = {f"/tinymnist/{p.name}": p.read_bytes() for p in tiny_mnist["files"].values()}
    images = f"/tinymnist/{tiny_mnist['files']['train_images'].name}"
    with LoopbackServer(files) as server:
        monkeypatch.delenv("GROVE_MIRROR")
        config = write_tiny_config(tiny_mnist["configs"], "tinymnist", tiny_mnist["files"],
                                   urls=[server.url("/tinymnist")])
        make_mutable(config)
        monkeypatch.setenv("GROVE_ARTIFACTS", root)
        monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
        monkeypatch.chdir(tmp_path)
        store = artifacts.store_of(root)
        day = dt.date(2026, 11, 1)
        assert grove(["rebuild", "--date", day.isoformat()]) == 0
        record = snapshot.load_snapshot(root, "tinymnist", day)
        pin = record["pins"]["train_images"]
        assert store.exists(layout.snapshot_bytes_key("tinymnist", pin, "tiny-train-images.gz"))
        assert store.exists(layout.record_key("tinymnist", day))
        assert snapshot.snapshot_dates(root, "tinymnist") == [day]
        served = lifecycle.serving_version(root, "tinymnist")
        assert served is not None
        assert len(server.requests_for(images)) == 1

        # Another machine; the publisher has moved on; everything built is gone from the store.
        server.files[images] = b"other bytes"
        monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "another-machine"))
        for stage in STAGES:
            store.delete_tree(layout.stage_key("tinymnist", stage))
        _fresh_tasks()
        from tasks.chain import Chain

        result = luigi.build([Chain(dataset="tinymnist", date=day)], local_scheduler=True, detailed_summary=True)
        assert result.status == luigi.execution_summary.LuigiStatusCode.SUCCESS, result.summary_text
        assert len(server.requests_for(images)) == 1  # the pinned bytes came from the store
        (fetch,) = artifacts.list_versions(root, "tinymnist", "fetch")
        assert fetch["files"]["tiny-train-images.gz"]["sha256"] == pin

        # gc keeps the bytes the newest snapshot pins
        capsys.readouterr()
        assert grove(["gc", "--keep", "1"]) == 0
        assert store.exists(layout.snapshot_bytes_key("tinymnist", pin, "tiny-train-images.gz"))


def test_a_remote_ref_has_no_local_path(s3_root):
    ref = artifacts.make_ref(s3_root, "ds", "embed", 1, {}, {})
    assert ref.root == s3_root and not ref.exists()
    with pytest.raises(ArtifactError, match=r"is on an object store and has no local path; .*local_dir"):
        ref.path
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        artifacts.local_dir(ref)



# --- the server goes away in the middle of a `grove run` -------------------------------------------

# `python -m tasks.cli ARGS`, except that the first upload of a version stops half-way: one file of the
# version reaches the store, then the process writes the file's key to $CUT_DIR/uploading and waits for
# $CUT_DIR/go before it uploads the rest (the test stops the server meanwhile). Nothing else is changed.
_CUT_WRAPPER = r"""
import os, runpy, sys, time
from pathlib import Path
from pipeline import objectstore

cut = Path(os.environ["CUT_DIR"])
upload_all = objectstore.ObjectStore._upload_all

def first_upload_waits(self, uploads):
    if uploads and not (cut / "uploading").exists():
        first = sorted(uploads)[0]
        self.upload(uploads[first], first)
        (cut / "uploading").write_text(first)
        deadline = time.monotonic() + 120
        while not (cut / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("the test never said go")
            time.sleep(0.01)
        uploads = {k: v for k, v in uploads.items() if k != first}
    return upload_all(self, uploads)

objectstore.ObjectStore._upload_all = first_upload_waits
sys.argv = ["grove", *sys.argv[1:]]
runpy.run_module("tasks.cli", run_name="__main__", alter_sys=True)
"""


def _grove_command(args: list[str], cut: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``grove ARGS`` in a fresh process (the environment as the
    test set it); with ``cut``, the first upload of a version waits half-way (``_CUT_WRAPPER``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cut is None:
        return [sys.executable, "-m", "tasks.cli", *args], env
    env["CUT_DIR"] = str(cut)
    return [sys.executable, "-c", _CUT_WRAPPER, *args], env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"grove ended ({proc.returncode}) before {path.name}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} within {timeout:.0f} s")
        time.sleep(0.01)
    return path.read_text()


def test_server_gone_in_the_middle_of_a_run(tiny_mnist, s3_server, s3_root, monkeypatch, capsys, tmp_path):
    """`grove run` on an S3 root whose server dies while the first version is being uploaded (one of
    its files has arrived): the run ends within seconds with exit 8 and one line naming the root and
    the cause; no version without a complete manifest is visible (`grove versions`, the store's own
    listing); once the server is back on the same ports and data, the rerun completes and every
    version passes `grove show --verify`."""
    root = s3_root
    monkeypatch.setenv("GROVE_ARTIFACTS", root)
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "scratch"))
    cut = tmp_path / "cut"
    cut.mkdir()
    command, env = _grove_command(["run", "tinymnist"], cut=cut)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        arrived = _wait_for(cut / "uploading", proc, timeout=120)
        # one file of the version's attempt is on the server; the rest is not
        assert f"/{layout.ATTEMPTS}/" in arrived and arrived.startswith("tinymnist/fetch/v")
        s3_server.stop()
        (cut / "go").write_text("")
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - stopped
    s3_server.start()  # the same ports and data: the store as the outage left it
    assert took < 30, f"the run took {took:.0f} s to give up on a server that had gone:\n{err}"

    # exit 8, and lines that name the root, the endpoint and the cause
    assert proc.returncode == 8, (out, err)
    lines = err.strip().splitlines()
    endpoint = s3_server.endpoint
    failed = [line for line in lines if line.startswith("FAILED ")]
    assert len(failed) == 1 and failed[0].startswith(
        f"FAILED Fetch(dataset=tinymnist): StoreError: lost the connection to the S3 endpoint {endpoint} while "
        f"writing {root}/tinymnist/fetch/v"), err
    assert "connection refused (nothing listens there). The object was not published" in failed[0]
    assert lines[-1].startswith(f"grove: artifact root error: cannot reach the S3 endpoint {endpoint} for {root}: "
                                "connection refused (nothing listens there)"), err
    assert "Traceback" not in err

    # nothing half-published: the fetch version has one file of an attempt and no manifest
    store = artifacts.store_of(root)
    (version,) = store.list("tinymnist/fetch")
    prefix = layout.version_key("tinymnist", "fetch", version)
    left = store.files(prefix)
    assert [f"{prefix}/{k}" for k in left] == [arrived]  # the one file that arrived, under its attempt
    with pytest.raises(ArtifactError, match="never completed"):
        store.version_file_keys(prefix)
    assert all(store.list(layout.stage_key("tinymnist", s)) == [] for s in STAGES if s != "fetch")
    assert store.get_pointer("tinymnist/fetch", layout.LATEST) is None
    capsys.readouterr()
    assert grove(["versions", "tinymnist"]) == 0
    listed = capsys.readouterr()
    assert listed.out == "" and "tinymnist: no published versions under" in listed.err, listed

    # the rerun after the server is back completes, and every version is intact
    code, out, err = _grove(["run", "tinymnist"])
    assert code == 0, (out, err)
    assert "tinymnist: tinymnist/evaluate/" in out
    for stage in STAGES:
        for m in artifacts.list_versions(root, "tinymnist", stage):
            assert grove(["show", f"tinymnist/{stage}/{m['version']}", "--verify"]) == 0, stage
            assert f'"version": "{m["version"]}"' in capsys.readouterr().out
    (fetch,) = artifacts.list_versions(root, "tinymnist", "fetch")
    assert fetch["version"] == version
    # the attempt the cut left is not the one the manifest names; gc removes it (after its grace period)
    (abandoned,) = store.stale_attempts(prefix, grace_seconds=0)
    assert arrived.startswith(abandoned + "/") and fetch["attempt"] not in abandoned


def _grove(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``grove ARGS`` in a fresh process."""
    command, env = _grove_command(args)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr
