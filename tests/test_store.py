"""The artifact store on both backends: a local directory and a real S3 server (SeaweedFS, on loopback).

Every Store method, pointers, the publish protocol (concurrent publishers, a killed writer, gc of its
attempt), this machine's cache of remote versions, and the bad inputs a user meets: an unreachable
endpoint, a wrong secret, a missing bucket, a read-only user, the server going away mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import cache, layout
from pipeline.errors import ArtifactError, ConfigError, StoreError
from pipeline.objectstore import SINGLE_PUT_MAX, ObjectStore, new_attempt_id
from pipeline.store import ATTEMPTS, LocalStore, Store, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    return open_store(request.getfixturevalue("s3_root"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_version(directory: Path, seed: int, big: int = 0) -> Path:
    """A version's files: reproducible ones (same for every seed) and a measured ``timings.json``."""
    (directory / "index").mkdir(parents=True)
    (directory / "index" / "header.json").write_text('{"dim": 4}\n')
    (directory / "index" / "nodes.npy").write_bytes(bytes(range(256)) * 40)
    (directory / "timings.json").write_text(json.dumps({"seed": seed, "seconds": 1.5 + seed}))
    if big:
        (directory / "index" / "big.bin").write_bytes(os.urandom(big))
    return directory


def assert_manifest_matches_bytes(store: Store, prefix: str, manifest: dict | None = None) -> dict:
    """Every file the manifest lists has the bytes (sha256, size) it records; returns the manifest."""
    current, keys = store.version_file_keys(prefix)
    manifest = manifest or current
    base = f"{prefix}/{ATTEMPTS}/{manifest['attempt']}" if manifest.get("attempt") else prefix
    assert set(keys) == set(manifest["files"])
    for rel, info in manifest["files"].items():
        data = store.read_bytes(f"{base}/{rel}")
        assert (sha256(data), len(data)) == (info["sha256"], info["bytes"]), rel
    return manifest


# --- every method, both backends ------------------------------------------------------------------


def test_objects_round_trip(store):
    assert store.list("") == [] and store.files("") == {}
    store.write_bytes("a/b.txt", b"one")
    store.write_bytes("a/c/d.bin", b"\x00" * 1000)
    store.write_json("e.json", {"x": 1})
    store.write_bytes("a/b.txt", b"two")  # overwritten whole
    assert store.read_bytes("a/b.txt") == b"two"
    assert store.read_json("e.json") == {"x": 1}
    assert store.exists("a/b.txt") and not store.exists("a") and not store.exists("nope")
    assert store.list("") == ["a", "e.json"]
    assert store.list("a") == ["b.txt", "c"]
    assert store.list("missing") == []
    assert store.files("a") == {"b.txt": 3, "c/d.bin": 1000}
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read_bytes("a/nope")
    with pytest.raises(ConfigError, match="leave the artifact root"):
        store.read_bytes("../outside")
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # no error when missing
    assert not store.exists("a/b.txt")
    store.delete_tree("a")
    store.delete_tree("a")
    assert store.files("a") == {} and not store.exists("a/c/d.bin")
    assert store.files("") == {"e.json": len(store.read_bytes("e.json"))}


def test_upload_and_download(store, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(SINGLE_PUT_MAX + (1 << 20)))  # a multipart upload on S3
    store.upload(small, "up/small.bin")
    store.upload(big, "up/big.bin")
    assert store.files("up") == {"small.bin": 1000, "big.bin": big.stat().st_size}
    out = tmp_path / "out"
    store.download("up/big.bin", out / "big.bin")
    store.download("up/small.bin", out / "small.bin")
    assert (out / "big.bin").read_bytes() == big.read_bytes()
    assert (out / "small.bin").read_bytes() == small.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.download("up/missing.bin", out / "missing.bin")
    assert sorted(p.name for p in out.iterdir()) == ["big.bin", "small.bin"]  # no temporaries left behind


def test_pointers(store):
    assert store.get_pointer("ds/forest", "latest") is None
    store.set_pointer("ds/forest", "latest", "v1-aaa")
    assert store.get_pointer("ds/forest", "latest") == "v1-aaa"
    store.set_pointer("ds/forest", "latest", "v1-bbb")
    assert store.get_pointer("ds/forest", "latest") == "v1-bbb"
    assert "latest" in store.list("ds/forest")
    if not store.is_local:  # a small object holding what it names
        assert json.loads(store.read_bytes("ds/forest/latest")) == {"target": "v1-bbb"}
    store.remove_pointer("ds/forest", "latest")
    store.remove_pointer("ds/forest", "latest")
    assert store.get_pointer("ds/forest", "latest") is None


def test_object_pointer_that_is_not_a_pointer_is_an_error(s3_root):
    store = open_store(s3_root)
    store.write_bytes("ds/serving", b"garbage")
    with pytest.raises(ArtifactError, match=r"ds/serving: not a grove pointer"):
        store.get_pointer("ds", "serving")


def test_check_and_describe(store, tmp_path):
    store.check(write=False)
    store.check()
    assert not [n for n in store.list("") if n.startswith(".grove-probe-")]  # the probe is gone
    text = store.describe()
    assert store.uri in text
    if not store.is_local:
        assert "grove-admin" in text and "http://127.0.0.1:" in text and "us-east-1" in text
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        LocalStore(afile).check()


# --- publishing ------------------------------------------------------------------------------------


def test_publish_version(store, tmp_path):
    files = make_version(tmp_path / "v", seed=0)
    (files / layout.MANIFEST).write_text("{}")  # ignored: the store writes the manifest
    manifest = store.publish_version("ds/forest/v1-abc", files, {"stage": "forest", "measured": ["timings.json"]})
    assert set(manifest["files"]) == {"index/header.json", "index/nodes.npy", "timings.json"}
    assert manifest["files"]["timings.json"]["measured"] and not manifest["files"]["index/nodes.npy"]["measured"]
    assert ("attempt" in manifest) == (not store.is_local)
    assert store.exists("ds/forest/v1-abc/manifest.json")
    assert store.read_json("ds/forest/v1-abc/manifest.json") == manifest
    assert assert_manifest_matches_bytes(store, "ds/forest/v1-abc") == manifest

    # publishing it again is a no-op that returns what is there
    again = store.publish_version("ds/forest/v1-abc", make_version(tmp_path / "w", seed=1), {"stage": "forest"})
    assert again == manifest

    # a manifest that does not describe the directory is refused, naming what differs
    listed = dict(manifest["files"])
    listed["ghost.bin"] = {"sha256": "0" * 64, "bytes": 1, "measured": False}
    with pytest.raises(ArtifactError, match="ghost.bin"):
        store.publish_version("ds/forest/v1-def", files, {"files": listed})
    with pytest.raises(ArtifactError, match="no manifest.json"):
        store.version_file_keys("ds/forest/v1-def")


@pytest.mark.parametrize("big", [0, SINGLE_PUT_MAX + 1024])
def test_two_publishers_of_one_version(store, tmp_path, monkeypatch, big):
    """Both pass the "not yet published" check, both upload, then both write their manifest: whoever
    wins, the manifest left agrees with the bytes it names (their measured files differ)."""
    barrier = threading.Barrier(2, timeout=30)
    if store.is_local:
        import pipeline.paths

        real = pipeline.paths.write_bytes_atomic

        def at_the_manifest(path, data):
            barrier.wait()
            return real(path, data)

        monkeypatch.setattr(pipeline.paths, "write_bytes_atomic", at_the_manifest)
    else:
        real_write_json = store.write_json

        def at_the_manifest(key, obj):
            barrier.wait()
            return real_write_json(key, obj)

        monkeypatch.setattr(store, "write_json", at_the_manifest)
    results, errors = {}, []

    def publish(seed):
        try:
            local = make_version(tmp_path / f"writer{seed}", seed=seed, big=big)
            results[seed] = store.publish_version("ds/evaluate/v2-xyz", local,
                                                  {"stage": "evaluate", "measured": ["timings.json"]})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    one, two = results[1], results[2]
    assert one["files"]["timings.json"]["sha256"] != two["files"]["timings.json"]["sha256"] or store.is_local
    final = assert_manifest_matches_bytes(store, "ds/evaluate/v2-xyz")
    assert final in (one, two)
    if store.is_local:
        assert one == two == final  # the loser's copy was dropped; it returns the winner's manifest
    else:
        assert one["attempt"] != two["attempt"]
        for manifest in (one, two):  # each names its own bytes
            assert_manifest_matches_bytes(store, "ds/evaluate/v2-xyz", manifest)
        loser = one if final == two else two
        assert store.stale_attempts("ds/evaluate/v2-xyz", grace_seconds=0) == \
            [f"ds/evaluate/v2-xyz/{ATTEMPTS}/{loser['attempt']}"]


def test_killed_writer_leaves_no_version_and_gc_finds_it(store, tmp_path):
    prefix = "ds/forest/v1-dead"
    files = make_version(tmp_path / "v", seed=0)
    if store.is_local:  # a temporary sibling whose process is gone
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        tmp_key = f"ds/forest/{layout.temporary_name('v1-dead', dead.pid, 'abcd1234')}"
        for rel in ("index/header.json", "timings.json"):
            store.upload(files / rel, f"{tmp_key}/{rel}")
    else:  # the files of an attempt, uploaded; the manifest never written
        tmp_key = f"{prefix}/{ATTEMPTS}/{new_attempt_id()}"
        for rel in ("index/header.json", "timings.json"):
            store.upload(files / rel, f"{tmp_key}/{rel}")
    with pytest.raises(ArtifactError, match="never completed"):
        store.version_file_keys(prefix)
    with pytest.raises(ArtifactError, match="never completed"):
        cache.localize(store, prefix)
    assert not store.exists(f"{prefix}/manifest.json")
    assert store.stale_attempts(prefix) == []  # within the grace period: maybe still uploading
    assert store.stale_attempts(prefix, grace_seconds=0) == [tmp_key]
    for key in store.stale_attempts(prefix, grace_seconds=0):
        store.delete_tree(key)
    assert store.files(tmp_key) == {}
    assert store.stale_attempts(prefix, grace_seconds=0) in ([], [tmp_key])  # SeaweedFS: an empty folder lingers
    # the rerun publishes; the attempt it names is not garbage
    store.publish_version(prefix, files, {"stage": "forest"})
    assert_manifest_matches_bytes(store, prefix)
    assert all(store.files(k) == {} for k in store.stale_attempts(prefix, grace_seconds=0))


# --- this machine's cache -------------------------------------------------------------------------


def test_localize_a_local_root_is_the_version_itself(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.publish_version("ds/forest/v1-abc", make_version(tmp_path / "v", seed=0), {})
    assert cache.localize(store, "ds/forest/v1-abc") == tmp_path / "root" / "ds" / "forest" / "v1-abc"


def test_localize_fetches_once_and_verifies(s3_root, tmp_path, caplog):
    store = open_store(s3_root)
    local = make_version(tmp_path / "v", seed=0, big=SINGLE_PUT_MAX + 4096)
    manifest = store.publish_version("ds/forest/v1-abc", local, {"measured": ["timings.json"]})
    store.stats.clear()
    path = cache.localize(store, "ds/forest/v1-abc")
    assert store.stats["downloads"] == 4
    assert path.is_relative_to(Path(os.environ["GROVE_SCRATCH"]) / "cache" / "versions")
    for rel, info in manifest["files"].items():
        assert sha256((path / rel).read_bytes()) == info["sha256"]
        assert (path / rel).read_bytes() == (local / rel).read_bytes()
        assert not os.access(path / rel, os.W_OK) or os.geteuid() == 0  # read-only blobs
    assert json.loads((path / "manifest.json").read_text()) == manifest

    # a version does not change once published: an intact copy is used without asking the store
    store.stats.clear()
    assert cache.localize(store, "ds/forest/v1-abc") == path
    assert sum(store.stats.values()) == 0

    # a cached blob damaged on this disk is noticed (its mtime moved), logged and fetched again
    nodes = path / "index" / "nodes.npy"
    os.chmod(nodes, 0o644)
    nodes.write_bytes(b"\xff" * nodes.stat().st_size)
    store.stats.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert cache.localize(store, "ds/forest/v1-abc") == path
    assert caplog.text.count("does not have the sha256") == 1
    assert store.stats["downloads"] == 1
    assert nodes.read_bytes() == (local / "index" / "nodes.npy").read_bytes()

    # damage that keeps size and mtime is noticed too (its ctime moved, as for artifacts.verify_once)
    st = nodes.stat()
    os.chmod(nodes, 0o644)
    with open(nodes, "r+b") as f:
        f.write(b"\xff\xfe")
    os.utime(nodes, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (nodes.stat().st_size, nodes.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    store.stats.clear()
    cache.localize(store, "ds/forest/v1-abc")
    assert store.stats["downloads"] == 1
    assert nodes.read_bytes() == (local / "index" / "nodes.npy").read_bytes()

    # touched but intact (a chmod moves ctime): hashed once, its new state recorded, nothing fetched
    os.chmod(nodes, 0o444)
    store.stats.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert cache.localize(store, "ds/forest/v1-abc") == path
    assert sum(store.stats.values()) == 0 and "sha256" not in caplog.text
    state = json.loads((path / cache.STATE).read_text())
    assert state["files"]["index/nodes.npy"] == list(cache._state(nodes))

    # verify=True reads the store's manifest and hashes every file
    store.stats.clear()
    cache.localize(store, "ds/forest/v1-abc", verify=True)
    assert store.stats["reads"] == 1 and store.stats["downloads"] == 0


def test_localize_refuses_a_tampered_object(s3_root, tmp_path, monkeypatch):
    store = open_store(s3_root)
    manifest = store.publish_version("ds/forest/v1-abc", make_version(tmp_path / "v", seed=0), {})
    key = f"ds/forest/v1-abc/{ATTEMPTS}/{manifest['attempt']}/index/nodes.npy"
    store.write_bytes(key, b"\x00" * manifest["files"]["index/nodes.npy"]["bytes"])  # same size, other bytes
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "fresh-scratch"))
    with pytest.raises(ArtifactError) as err:
        cache.localize(store, "ds/forest/v1-abc")
    assert f"{s3_root}/{key}: " in str(err.value)
    assert f"says {manifest['files']['index/nodes.npy']['bytes']} bytes with sha256 " \
           f"{manifest['files']['index/nodes.npy']['sha256']}" in str(err.value)
    blobs = tmp_path / "fresh-scratch" / "cache" / "sha256"
    assert manifest["files"]["index/nodes.npy"]["sha256"] not in os.listdir(blobs)
    assert not [n for n in os.listdir(blobs) if n.endswith(".tmp")]


class _CountingFs:
    """A pyarrow filesystem that records the name of every call (one call is one request or more)."""

    def __init__(self, fs, calls: list):
        self._fs, self._calls = fs, calls

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._calls.append(name)
            return attr(*args, **kwargs)

        return call


def _publish_chain(store: Store, tmp_path: Path, evaluate: str) -> dict[str, str]:
    """A split, forests of 2 and 4 trees and an evaluation ``ds/evaluate/<evaluate>`` naming them."""
    keys = {"split": "ds/split/v1-5a", "forest_2": "ds/forest/v1-f2", "forest_4": "ds/forest/v1-f4"}
    for name, key in keys.items():
        if not store.exists(f"{key}/manifest.json"):
            store.publish_version(key, make_version(tmp_path / name, seed=int(name[-1]) if "_" in name else 0),
                                  {"stage": key.split("/")[1]})
    store.publish_version(f"ds/evaluate/{evaluate}", make_version(tmp_path / evaluate, seed=1),
                          {"stage": "evaluate", "dataset": "ds", "version": evaluate, "parents": keys})
    return keys


def test_open_serving_reads_one_pointer_and_follows_it(store, tmp_path, monkeypatch, caplog):
    """What serves, opened: the pointer -> the evaluation's manifest -> its split and its forest with
    the most trees, checked. On an object store a later open costs one request (the pointer), a
    promotion is followed at once, and a damaged cached file or manifest is still caught."""
    keys = _publish_chain(store, tmp_path / "one", "v1-e1")
    assert cache.open_serving(store, "ds") is None  # nothing serves yet
    store.set_pointer("ds", layout.SERVING, "evaluate/v1-e1")
    served = cache.open_serving(store, "ds")
    assert (served.version, served.split, served.forest) == ("v1-e1", keys["split"], keys["forest_4"])
    assert served.manifest["parents"] == keys
    for directory, manifest in ((served.split_dir, served.split_manifest), (served.forest_dir, served.forest_manifest)):
        for rel, info in manifest["files"].items():
            assert sha256((directory / rel).read_bytes()) == info["sha256"]

    calls: list[str] = []
    if not store.is_local:
        real = store._fs
        monkeypatch.setattr(store, "_fs", lambda multipart=False: _CountingFs(real(multipart), calls))
        monkeypatch.setattr(store, "_bucket_ok", False)  # a new process: the bucket was not checked yet
    again = cache.open_serving(store, "ds")
    assert (again.split_dir, again.forest_dir) == (served.split_dir, served.forest_dir)
    if not store.is_local:
        assert calls == ["open_input_stream"]  # the serving pointer, and nothing else

    # a promotion is followed at once
    _publish_chain(store, tmp_path / "two", "v1-e2")
    store.set_pointer("ds", layout.SERVING, "evaluate/v1-e2")
    assert cache.open_serving(store, "ds").version == "v1-e2"

    # a damaged file of the forest: a local root refuses it; an object store's cached copy is fetched again
    nodes = served.forest_dir / "index" / "nodes.npy"
    os.chmod(nodes, 0o644)
    nodes.write_bytes(b"\xff" * nodes.stat().st_size)
    if store.is_local:
        with pytest.raises(ArtifactError, match=r"nodes\.npy: sha256 .* does not match .*grove run ds --rebuild"):
            cache.open_serving(store, "ds")
    else:
        with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
            fixed = cache.open_serving(store, "ds")
        assert "does not have the sha256" in caplog.text
        assert sha256(nodes.read_bytes()) == fixed.forest_manifest["files"]["index/nodes.npy"]["sha256"]
        # a damaged cached manifest is read from the store again
        kept = cache.manifest_path(store, "ds/evaluate/v1-e2")
        assert kept.is_relative_to(Path(os.environ["GROVE_SCRATCH"]) / "cache")
        kept.write_text(kept.read_text().replace('"forest_4"', '"forest_3"'))
        calls.clear()
        assert cache.open_serving(store, "ds").forest == keys["forest_4"]
        assert calls.count("open_input_stream") == 2  # the pointer and the manifest

    # the pointer names a version that is not there
    store.set_pointer("ds", layout.SERVING, "evaluate/v1-e9")
    with pytest.raises(ArtifactError, match=r"ds: the serving version evaluate/v1-e9 is missing under the "
                                            r"artifact root .*`grove rollback ds`"):
        cache.open_serving(store, "ds")


def test_two_processes_fill_the_cache_at_once(s3_root, tmp_path):
    store = open_store(s3_root)
    manifest = store.publish_version("ds/forest/v1-abc", make_version(tmp_path / "v", seed=0, big=3 << 20), {})
    code = ("import json, sys; from pipeline.store import open_store; from pipeline.cache import localize; "
            "p = localize(open_store(sys.argv[1]), 'ds/forest/v1-abc'); "
            "import hashlib; print(json.dumps({'path': str(p), 'sha': {r: hashlib.sha256((p / r).read_bytes())"
            ".hexdigest() for r in sys.argv[2:]}}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, s3_root, *manifest["files"]], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0]["path"] == results[1]["path"]
    for result in results:
        assert result["sha"] == {rel: info["sha256"] for rel, info in manifest["files"].items()}
    blobs = Path(os.environ["GROVE_SCRATCH"]) / "cache" / "sha256"
    assert sorted(os.listdir(blobs)) == sorted({info["sha256"] for info in manifest["files"].values()})


# --- bad inputs -----------------------------------------------------------------------------------


def test_uri_and_settings_are_checked(monkeypatch):
    for uri, problem in [("s3://Bad_Bucket/x", "not a valid bucket name"), ("s3://bucket/a/../b", "'..'"),
                         ("s3://bucket/x?endpoint=y", "options in the URI")]:
        with pytest.raises(ConfigError, match=problem):
            ObjectStore(uri)
    with pytest.raises(ConfigError, match="'ftp://host' is not an endpoint URL"):
        ObjectStore("s3://bucket/x", endpoint="ftp://host")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
        ObjectStore("s3://bucket/x")
    with pytest.raises(ConfigError, match="gs:// is not supported"):
        open_store("gs://bucket/x")


def test_credentials_and_region_from_the_aws_files(s3_server, s3_root, tmp_path, monkeypatch):
    """No keys in the environment: pyarrow's AWS SDK reads the profile files, as the AWS CLI does."""
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_REGION")
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[grove]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    config = tmp_path / "config"
    config.write_text("[profile grove]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "grove")
    store = open_store(s3_root)
    assert store.region == "eu-west-3" and "profile 'grove'" in store.describe()
    store.check()
    store.write_bytes("x", b"1")
    assert store.read_bytes("x") == b"1"
    # and the keyword arguments (what luigi.cfg's [grove] s3_endpoint / s3_region set) win
    other = ObjectStore(s3_root, endpoint="http://127.0.0.1:1", region="ap-south-1")
    assert other.endpoint_url == "http://127.0.0.1:1" and other.region == "ap-south-1"


def test_unreachable_endpoint_fails_in_seconds(s3_root, monkeypatch):
    from s3server import free_ports

    port = free_ports(1)[0]  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = open_store(s3_root)
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.check()
    assert time.monotonic() - started < 10
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port} for {s3_root}: connection refused" in str(err.value)
    assert "AWS_ENDPOINT_URL" in str(err.value)
    assert isinstance(err.value, OSError)


def test_wrong_secret(s3_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_root)
    with pytest.raises(StoreError, match=r"the credentials for s3://grove-test/\S+ \(access key 'grove-admin' from "
                                         r"AWS_ACCESS_KEY_ID\) were refused .*SIGNATURE_DOES_NOT_MATCH"):
        store.check()
    with pytest.raises(StoreError, match="credentials .* were refused"):
        store.write_bytes("x", b"1")
    with pytest.raises(StoreError, match="credentials .* were refused"):
        store.read_bytes("x")


def test_missing_bucket_is_not_created(s3_server, s3_root):
    store = open_store("s3://grove-no-such-bucket/x")
    expected = "bucket 'grove-no-such-bucket' does not exist on http://127.0.0.1:"
    for attempt in (store.check, lambda: store.write_bytes("k", b"1"), lambda: store.read_bytes("k"),
                    lambda: store.list("")):
        with pytest.raises(StoreError, match=expected) as err:
            attempt()
        assert "create it first" in str(err.value)
    from pyarrow import fs

    # SeaweedFS creates a bucket on the first PUT into it; grove never sends that PUT
    assert s3_server.filesystem().get_file_info("grove-no-such-bucket").type == fs.FileType.NotFound


def test_read_only_user_reads_but_cannot_publish(s3_server, s3_root, tmp_path, monkeypatch):
    admin = open_store(s3_root)
    admin.write_bytes("ds/note.txt", b"written by admin")
    for name, value in s3_server.env("reader").items():
        monkeypatch.setenv(name, value)
    reader = open_store(s3_root)
    reader.check(write=False)
    assert reader.read_bytes("ds/note.txt") == b"written by admin"
    with pytest.raises(StoreError, match=rf"no write permission on {s3_root}: .* denied PutObject .*'grove-reader'"):
        reader.check()
    with pytest.raises(StoreError, match="no write permission"):
        reader.publish_version("ds/forest/v1-abc", make_version(tmp_path / "v", seed=0, big=SINGLE_PUT_MAX + 1),
                               {})
    assert admin.files("ds/forest") == {}  # nothing half-published


def test_server_gone_in_the_middle_of_an_upload(s3_server, s3_root, tmp_path):
    """The server dies while the 48 MB file of a version is being uploaded: a StoreError says so,
    no version is visible and the big object does not exist after the server is back; the rerun
    publishes."""
    store = open_store(s3_root)
    prefix = "ds/embed/v1-cut"
    local = make_version(tmp_path / "v", seed=0)
    (local / "vectors.arrow").write_bytes(os.urandom(48 << 20))
    errors = []

    def publish():
        try:
            store.publish_version(prefix, local, {"stage": "embed"})
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    before = s3_server.stored_bytes()
    writer = threading.Thread(target=publish)
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while s3_server.stored_bytes() - before < (2 << 20):  # the server has received part of it
            assert writer.is_alive(), f"the upload ended before the server could be stopped: {errors}"
            assert time.monotonic() < deadline, "the upload never reached the server"
            time.sleep(0.005)
        s3_server.stop()
        writer.join(60)
        assert not writer.is_alive()
    finally:
        s3_server.start()
    assert len(errors) == 1 and isinstance(errors[0], StoreError), errors
    message = str(errors[0])
    assert s3_server.endpoint in message
    # the upload of a file of the attempt failed (not, later, the manifest: a version's files must be known
    # to have arrived before its manifest is written)
    assert f"lost the connection to the S3 endpoint {s3_server.endpoint} while writing {s3_root}/{prefix}/" \
           f"{ATTEMPTS}/" in message, message
    assert "was not published" in message, message

    store = open_store(s3_root)  # a new process after the outage
    with pytest.raises(ArtifactError, match="never completed"):
        store.version_file_keys(prefix)
    assert not [k for k in store.files(prefix) if k.endswith("vectors.arrow")]  # the cut object does not exist
    for key in store.stale_attempts(prefix, grace_seconds=0):
        store.delete_tree(key)
    manifest = store.publish_version(prefix, local, {"stage": "embed"})
    assert_manifest_matches_bytes(store, prefix, manifest)
    assert manifest["files"]["vectors.arrow"]["bytes"] == 48 << 20


@pytest.mark.slow  # waits out request timeouts: about 25 s, mostly asleep
def test_a_server_that_stops_answering(s3_server, s3_root):
    """A network cut that drops packets (the server frozen with SIGSTOP: connections open, no answer):
    the first request fails once its attempts have timed out, naming the root and the cause; the
    store is then taken for down and a later request makes one attempt, so a run on its way out
    (cleanups, lookups) ends in seconds; once the server answers again, requests succeed."""
    import signal

    store = open_store(s3_root)
    store.write_bytes("ds/x", b"1")
    os.kill(s3_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"cannot reach the S3 endpoint {s3_server.endpoint} for {s3_root}: no "
                                             r"answer within 5 s \(timed out\) \(while reading"):
            store.read_bytes("ds/x")
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"no answer within 5 s \(timed out\) \(while looking up"):
            store.exists("ds/y")
        later = time.monotonic() - started
    finally:
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    assert 10 < first < 30, first  # three attempts of 5 s, with backoff
    assert later < 9, later  # one attempt
    assert store.read_bytes("ds/x") == b"1"


def test_a_large_gzip_file_round_trips(store, tmp_path):
    """SeaweedFS lists a multipart object whose bytes look gzip-compressed (the MNIST .gz files) with
    another size than was stored; the upload's check reads it back instead of failing, and the bytes
    come back as written."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(5)
    # compressible enough to look like a real .gz, large enough for a multipart upload (> 8 MiB)
    raw = np.repeat(rng.integers(0, 256, size=6 << 20, dtype=np.uint8), 3).tobytes()
    data = gzip.compress(raw, compresslevel=1)[: 10 << 20]
    assert len(data) > 8 << 20
    src = tmp_path / "big-images.gz"
    src.write_bytes(data)
    store.upload(src, "files/big-images.gz")
    out = tmp_path / "back.gz"
    store.download("files/big-images.gz", out)
    assert out.read_bytes() == data
