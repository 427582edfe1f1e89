"""An artifact root on an object store (a real SeaweedFS S3 server, tests/s3server.py): the tiny MNIST
chain built, listed, verified, promoted, rolled back, queried, collected and reported through the
`grove` command with GROVE_ARTIFACTS=s3://..., and the same reproducible bytes as a local run."""

from __future__ import annotations

import datetime as dt
import re

import luigi
import pytest

from conftest import make_mutable, write_tiny_config
from httpserver import LoopbackServer
from pipeline import artifacts, layout, lifecycle, snapshot
from pipeline.errors import ArtifactError
from tasks.cli import main as grove

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
    untimed = re.compile(r"\([0-9.]+ ms\)")
    assert untimed.sub("", capsys.readouterr().out) == untimed.sub("", answer)  # the same neighbours
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
