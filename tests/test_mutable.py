"""Mutable sources: no pinned checksum, downloaded again for every date, the chain rebuilt only when
the bytes changed. Served over real HTTP from a loopback server whose file the test replaces."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil

import luigi
import pytest

from pipeline import artifacts, download, layout, lifecycle, snapshot
from pipeline.config import apply_pins, load_config, load_config_file
from pipeline.errors import ArtifactError, ChecksumError, ConfigError
from pipeline.formats.idx import write_idx
from pipeline.stages import stage_params, write_fetch
from tasks.cli import main as grove

from conftest import make_mutable, tiny_digits, write_tiny_config
from httpserver import LoopbackServer

IMAGES = "/tinymnist/tiny-train-images.gz"


def _ran(summary: str) -> set[str]:
    """Task families Luigi's execution summary lists under "ran successfully"."""
    match = re.search(r"ran successfully:\n(.*?)(?:\n\*|\n\nThis progress)", summary, re.S)
    return set(re.findall(r"- \d+ (\w+)\(", match.group(1))) if match else set()


@pytest.fixture
def served(tiny_mnist, monkeypatch):
    """tinymnist's four files over HTTP (no mirror), train_images marked mutable, rebuilt by cron."""
    files = {f"/tinymnist/{p.name}": p.read_bytes() for p in tiny_mnist["files"].values()}
    with LoopbackServer(files) as server:
        monkeypatch.delenv("GROVE_MIRROR")
        # Every task in the run summary (luigi.cfg says so too; the tests must not depend on the cwd).
        luigi.configuration.get_config().set("execution_summary", "summary_length", "0")
        monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
        write_tiny_config(tiny_mnist["configs"], "tinymnist", tiny_mnist["files"],
                          urls=[server.url("/tinymnist")])
        make_mutable(tiny_mnist["config"])
        yield {**tiny_mnist, "server": server}


def _new_images(tmp_path, seed):
    images, _ = tiny_digits(400, seed=seed)
    return write_idx(tmp_path / f"images-{seed}.gz", images, compress=True).read_bytes()


def _counts(root):
    return {s: len(artifacts.list_versions(root, "tinymnist", s))
            for s in ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")}


def test_cron_refetches_mutable_source_and_rebuilds_only_when_it_changed(served, tmp_path, capsys):
    root, server = served["root"], served["server"]
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    first = capsys.readouterr().out
    assert {"Snapshot", "Fetch", "Decode", "Embed", "Evaluate", "DatedRecord"} <= _ran(first)
    assert len(server.requests_for(IMAGES)) == 1  # the snapshot's download is the one Fetch uses
    serving = lifecycle.serving_version(root, "tinymnist")
    snap = json.loads((root / "tinymnist" / "snapshots" / "2026-11-01.json").read_text())
    assert snap["sources"]["train_images"]["changed"] and snap["previous"] is None
    assert set(snap["pins"]) == {"train_images"}
    assert snap["pins"]["train_images"] == download.file_digest(served["files"]["train_images"])
    record = json.loads((root / "tinymnist" / "records" / "2026-11-01.json").read_text())
    assert record["snapshot"]["train_images"]["sha256"] == snap["pins"]["train_images"]

    # Next night, same bytes: downloaded again, nothing below the snapshot runs.
    before = _counts(root)
    assert grove(["rebuild", "--date", "2026-11-02"]) == 0
    assert _ran(capsys.readouterr().out) == {"Snapshot", "DatedRecord", "Rebuild"}
    assert len(server.requests_for(IMAGES)) == 2
    assert all(len(server.requests_for(p)) == 1 for p in server.files if p != IMAGES)  # pinned: fetched once
    assert _counts(root) == before
    snap = json.loads((root / "tinymnist" / "snapshots" / "2026-11-02.json").read_text())
    assert not snap["sources"]["train_images"]["changed"] and snap["previous"] == "2026-11-01"
    assert lifecycle.serving_version(root, "tinymnist") == serving

    # The publisher replaces the file: the chain below it is rebuilt and the new index serves.
    server.files[IMAGES] = _new_images(tmp_path, seed=7)
    assert grove(["rebuild", "--date", "2026-11-03"]) == 0
    assert {"Snapshot", "Fetch", "Decode", "Embed", "Split", "Forest", "Evaluate"} <= _ran(capsys.readouterr().out)
    after = _counts(root)
    assert all(after[s] == before[s] + (2 if s == "forest" else 1) for s in before)
    snap = json.loads((root / "tinymnist" / "snapshots" / "2026-11-03.json").read_text())
    assert snap["sources"]["train_images"]["changed"]
    assert snap["pins"]["train_images"] == hashlib.sha256(server.files[IMAGES]).hexdigest()
    assert lifecycle.serving_version(root, "tinymnist") != serving
    fetched = artifacts.list_versions(root, "tinymnist", "fetch")[-1]
    assert fetched["params"]["train_images"]["sha256"] == snap["pins"]["train_images"]

    # The content switches back: the first chain's versions are reused, nothing is rebuilt.
    server.files[IMAGES] = served["files"]["train_images"].read_bytes()
    assert grove(["rebuild", "--date", "2026-11-04"]) == 0
    assert _ran(capsys.readouterr().out) == {"Snapshot", "DatedRecord", "Rebuild"}
    assert _counts(root) == after
    assert lifecycle.serving_version(root, "tinymnist") == serving


def test_failed_snapshot_writes_nothing_and_keeps_serving(served, capsys):
    root, server = served["root"], served["server"]
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    serving = lifecycle.serving_version(root, "tinymnist")
    server.status[IMAGES] = 404
    assert grove(["rebuild", "--date", "2026-11-02"]) == 1
    assert "Snapshot" in capsys.readouterr().out.split("failed:")[1]
    assert not (root / "tinymnist" / "snapshots" / "2026-11-02.json").exists()
    assert not (root / "tinymnist" / "records" / "2026-11-02.json").exists()
    assert not list(layout.snapshot_scratch("tinymnist").glob("*/*"))  # no partial file left
    assert lifecycle.serving_version(root, "tinymnist") == serving
    del server.status[IMAGES]
    assert grove(["rebuild", "--date", "2026-11-02"]) == 0  # the rerun takes the snapshot


def test_grove_run_query_and_gc_with_a_mutable_source(served, tmp_path, capsys):
    root, server = served["root"], served["server"]
    assert grove(["run", "tinymnist"]) == 0  # today's snapshot
    out = capsys.readouterr().out
    assert "Snapshot" in _ran(out) and "recall" in out
    assert grove(["run", "tinymnist"]) == 0  # same day: the snapshot is taken once
    assert len(server.requests_for(IMAGES)) == 1
    # once the day's snapshot is taken, the pinned evaluation is a static requirement of the chain,
    # which luigid can hand out piece by piece to any worker (not a dynamic one, for one worker only)
    import tasks

    needed = luigi.task.flatten(tasks.Chain(dataset="tinymnist").requires())
    assert [type(t).__name__ for t in needed] == ["Snapshot", "Evaluate"] and needed[1].pins
    assert grove(["query", "tinymnist", "test/0", "-k", "3"]) == 0  # nothing serves: the newest snapshot's
    assert "current config" in capsys.readouterr().out

    # Two more dates with new bytes each; gc --keep 1 drops the cached bytes older snapshots pinned.
    killed = layout.snapshot_scratch("tinymnist", dt.date(2099, 1, 1))  # a snapshot killed on this machine
    for day, seed in ((2, 11), (3, 12)):
        server.files[IMAGES] = _new_images(tmp_path, seed)
        assert grove(["rebuild", "--date", f"2099-01-0{day}"]) == 0
        if day == 2:
            killed.mkdir(parents=True)
            (killed / "tiny-train-images.gz.part").write_bytes(b"partial")
    assert not killed.exists()  # the next snapshot of the dataset on this machine removed its scratch
    cached = root / layout.snapshot_bytes_prefix("tinymnist")  # the pinned bytes live in the artifact root
    assert len(list(cached.iterdir())) == 3
    assert grove(["gc", "--keep", "1", "--dry-run"]) == 0
    assert "and 2 cached download(s)" in capsys.readouterr().out  # the bytes of the two older snapshots
    assert len(list(cached.iterdir())) == 3
    assert grove(["gc", "--keep", "1"]) == 0
    newest = snapshot.latest_snapshot(root, "tinymnist")["pins"]["train_images"]
    assert [p.name for p in cached.iterdir()] == [newest]


def test_mutable_config_errors(tiny_mnist):
    path = tiny_mnist["config"]
    text = path.read_text()
    path.write_text(text.replace('filename = "tiny-train-images.gz"',
                                 'filename = "tiny-train-images.gz"\nmutable = true', 1))
    with pytest.raises(ConfigError, match=r"tinymnist\.toml: sources\.train_images is mutable = true but also pins"):
        load_config_file(path)
    path.write_text(text.replace('filename = "tiny-train-images.gz"',
                                 'filename = "tiny-train-images.gz"\nmutable = "yes"', 1))
    with pytest.raises(ConfigError, match=r"key sources\.train_images\.mutable must be bool"):
        load_config_file(path)
    path.write_text(text)
    make_mutable(path)
    cfg = load_config("tinymnist")
    assert cfg.sources["train_images"].mutable and cfg.sources["train_images"].sha256 is None
    with pytest.raises(ConfigError, match=r"sources train_images are mutable and this run has no snapshot"):
        stage_params(cfg, "fetch")
    with pytest.raises(ConfigError, match=r"sources\.test_images, which is not a mutable source"):
        apply_pins(cfg, {"test_images": "0" * 64})
    with pytest.raises(ConfigError, match=r"pinned sha256 of sources\.train_images is not a sha256"):
        apply_pins(cfg, {"train_images": "abc"})
    pinned = apply_pins(cfg, {"train_images": "a" * 64})
    assert stage_params(pinned, "fetch")["train_images"]["sha256"] == "a" * 64
    assert cfg.sources["train_images"].sha256 is None  # the loaded config is not changed
    with pytest.raises(ConfigError, match=r"no snapshot of them exists yet"):
        snapshot.latest_pins(tiny_mnist["root"], cfg)


def test_fetch_unpinned_redownloads_and_never_resumes(tmp_path):
    with LoopbackServer({"/f.bin": b"new bytes " * 1000}) as server:
        dest = tmp_path / "f.bin"
        dest.write_bytes(b"old")  # yesterday's copy is not trusted
        dest.with_name("f.bin.part").write_bytes(b"new bytes ")  # nor a partial file
        server.status["/f.bin"] = [503]
        got, sha = download.fetch_unpinned([server.url("/f.bin")], dest, backoff=0)
        assert got == dest and dest.read_bytes() == b"new bytes " * 1000
        assert sha == download.file_digest(dest)
        assert not dest.with_name("f.bin.part").exists()
        assert all("Range" not in r.headers for r in server.requests_for("/f.bin"))
        assert len(server.requests_for("/f.bin")) == 2  # the 503, then a whole download


def test_pinned_bytes_gone_and_changed_upstream_says_so(served, tmp_path):
    """The cached copy of a snapshot's bytes was deleted and the publisher has moved on: Fetch cannot
    rebuild that date's version, and says which snapshot pin it could not get back."""
    root, server = served["root"], served["server"]
    cfg = load_config("tinymnist")
    record = snapshot.take_snapshot(cfg, root, dt.date(2026, 11, 1))
    shutil.rmtree(root / layout.snapshot_bytes_prefix("tinymnist"))
    server.files[IMAGES] = _new_images(tmp_path, seed=9)
    pinned = apply_pins(cfg, record["pins"])
    out = tmp_path / "fetch-out"
    out.mkdir()
    with pytest.raises(ChecksumError, match=r"mutable source train_images: the snapshot pinned sha256 "
                                            + record["pins"]["train_images"] + r".*run a newer date"):
        write_fetch(pinned, out, layout.download_cache("tinymnist"), root=root)


def test_damaged_snapshot_record_is_reported(served, capsys):
    root = served["root"]
    path = root / "tinymnist" / "snapshots" / "2026-11-01.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"pins": ')
    with pytest.raises(ArtifactError, match=r"cannot read the snapshot record .*2026-11-01\.json.*delete it"):
        snapshot.read_snapshot(path)
    assert grove(["query", "tinymnist", "test/0"]) == 3  # nothing serves: the newest snapshot is read
    assert "cannot read the snapshot record" in capsys.readouterr().err
    path.write_text('{"date": "2026-11-01"}')
    with pytest.raises(ArtifactError, match=r"has no pins; delete it"):
        snapshot.read_snapshot(path)
