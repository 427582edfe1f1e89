import json
import os
import subprocess
import sys

import pytest

from pipeline import artifacts
from pipeline.errors import ArtifactError


def _write(files):
    def write(tmp):
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        return {"rows": {"things": len(files)}}

    return write


def test_digest_is_stable_and_sensitive(tmp_path):
    a = artifacts.make_ref(tmp_path, "ds", "embed", 1, {"scale": 1.0, "model": "pixels"}, {})
    b = artifacts.make_ref(tmp_path, "ds", "embed", 1, {"model": "pixels", "scale": 1.0}, {})
    assert a == b  # key order does not matter
    assert a.path == tmp_path / "ds" / "embed" / f"v1-{a.digest}"
    assert artifacts.make_ref(tmp_path, "ds", "embed", 1, {"scale": 2.0, "model": "pixels"}, {}) != a
    assert artifacts.make_ref(tmp_path, "ds", "embed", 2, {"scale": 1.0, "model": "pixels"}, {}) != a
    # a changed parent changes every child (Merkle chain)
    p1 = artifacts.make_ref(tmp_path, "ds", "fetch", 1, {"x": 1}, {})
    p2 = artifacts.make_ref(tmp_path, "ds", "fetch", 1, {"x": 2}, {})
    c1 = artifacts.make_ref(tmp_path, "ds", "decode", 1, {}, {"fetch": p1})
    c2 = artifacts.make_ref(tmp_path, "ds", "decode", 1, {}, {"fetch": p2})
    assert c1 != c2


def test_publish_writes_manifest_and_latest(tmp_path):
    parent = artifacts.make_ref(tmp_path, "ds", "fetch", 1, {}, {})
    artifacts.publish(parent, _write({"raw.bin": b"abc"}), {}, {})
    ref = artifacts.make_ref(tmp_path, "ds", "decode", 1, {"p": 1}, {"fetch": parent})
    manifest = artifacts.publish(ref, _write({"a.bin": b"hello", "sub/b.bin": b"x" * 10}), {"p": 1}, {"fetch": parent})
    assert ref.exists()
    on_disk = json.loads((ref.path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["files"]["a.bin"] == {"bytes": 5, "sha256": artifacts.file_digest(ref.path / "a.bin"),
                                          "measured": False}
    assert manifest["files"]["sub/b.bin"]["bytes"] == 10
    assert manifest["parents"] == {"fetch": parent.key}
    assert manifest["params"] == {"p": 1} and manifest["rows"] == {"things": 2}
    assert {"numpy", "python", "grove"} <= set(manifest["packages"])
    assert os.readlink(ref.stage_dir / "latest") == ref.version
    assert [m["version"] for m in artifacts.list_versions(tmp_path, "ds", "decode")] == [ref.version]


def test_failed_write_leaves_nothing(tmp_path):
    ref = artifacts.make_ref(tmp_path, "ds", "embed", 1, {}, {})

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        artifacts.publish(ref, boom, {}, {})
    assert not ref.exists()
    assert list(ref.stage_dir.iterdir()) == []


def test_second_publish_is_a_no_op(tmp_path):
    ref = artifacts.make_ref(tmp_path, "ds", "embed", 1, {}, {})
    first = artifacts.publish(ref, _write({"a": b"1"}), {}, {})
    second = artifacts.publish(ref, _write({"a": b"2"}), {}, {})
    assert second["created_utc"] == first["created_utc"]
    assert (ref.path / "a").read_bytes() == b"1"


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path):
    ref = artifacts.make_ref(tmp_path, "ds", "embed", 1, {}, {})
    ref.stage_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ref.stage_dir / f".tmp-{ref.version}-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"partial")
    alive = ref.stage_dir / f".tmp-{ref.version}-{os.getpid()}-abcd1234"  # ours: still running
    alive.mkdir()
    artifacts.publish(ref, _write({"a": b"1"}), {}, {})
    assert not stale.exists()
    assert alive.exists()
    assert ref.exists()


def test_reader_rejects_incomplete_and_damaged(tmp_path):
    ref = artifacts.make_ref(tmp_path, "ds", "embed", 1, {}, {})
    artifacts.publish(ref, _write({"vectors.bin": b"0123456789"}), {}, {})
    target = ref.path / "vectors.bin"
    target.write_bytes(b"0123456789"[:-1])
    with pytest.raises(ArtifactError, match=r"vectors\.bin: 9 bytes, the manifest says 10"):
        artifacts.read_manifest(ref.path)
    target.write_bytes(b"0123456780")  # same size, one byte flipped
    artifacts.read_manifest(ref.path)  # a size check cannot see it...
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        artifacts.read_manifest(ref.path, verify="sha256")  # ...a checksum does
    (ref.path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        artifacts.read_manifest(ref.path)


def test_measured_files_are_marked_and_must_exist(tmp_path):
    ref = artifacts.make_ref(tmp_path, "ds", "evaluate", 1, {}, {})

    def write(out):
        (out / "results.json").write_text("{}")
        (out / "timings.json").write_text("{}")
        return {"measured": ["timings.json"]}

    manifest = artifacts.publish(ref, write, {}, {})
    assert {rel: info["measured"] for rel, info in manifest["files"].items()} == {"results.json": False,
                                                                                  "timings.json": True}
    assert "measured" not in manifest  # only per file
    other = artifacts.make_ref(tmp_path, "ds", "evaluate", 1, {"x": 1}, {})
    with pytest.raises(ArtifactError, match="marked nope.json as measured but did not write"):
        artifacts.publish(other, lambda out: {"measured": ["nope.json"]}, {"x": 1}, {})
    assert not other.exists()
