"""pipeline.download against a real HTTP server on loopback, real files and an installed package."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

from httpserver import LoopbackServer, free_port
from pipeline.download import candidate_urls, fetch, file_digest
from pipeline.errors import ChecksumError, ConfigError, DownloadError

DATA = random.Random(20240501).randbytes(300_000)
SHA256 = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()
PATH = "/mnist/train-images-idx3-ubyte.gz"
FAST = {"backoff": 0.001, "timeout": 5.0}


@pytest.fixture(autouse=True)
def _no_proxy_no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback requests must not go through a proxy, and a developer's GROVE_MIRROR must not leak in."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GROVE_MIRROR", raising=False)


@pytest.fixture
def server():
    with LoopbackServer({PATH: DATA}) as running:
        yield running


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_plain_download_verifies_sha256(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "train-images-idx3-ubyte.gz"
    result = fetch([server.url(PATH)], dest, sha256=SHA256, **FAST)
    assert result == dest
    assert dest.read_bytes() == DATA
    assert _leftovers(dest) == [dest.name]
    [request] = server.requests_for(PATH)
    assert "Range" not in request.headers


def test_md5_alone_and_together_with_sha256(server: LoopbackServer, tmp_path: Path) -> None:
    assert fetch([server.url(PATH)], tmp_path / "a.gz", md5=MD5.upper(), **FAST).read_bytes() == DATA
    assert fetch([server.url(PATH)], tmp_path / "b.gz", sha256=SHA256, md5=MD5, **FAST).read_bytes() == DATA

    wrong_md5 = "0" * 32
    with pytest.raises(ChecksumError) as caught:
        fetch([server.url(PATH)], tmp_path / "c.gz", sha256=SHA256, md5=wrong_md5, **FAST)
    assert f"expected md5 {wrong_md5}, actual {MD5}" in str(caught.value)
    assert not (tmp_path / "c.gz").exists() and not (tmp_path / "c.gz.part").exists()


def test_resume_after_cut_connection(server: LoopbackServer, tmp_path: Path) -> None:
    server.cut[PATH] = [100_000]  # only the first response is cut
    dest = tmp_path / "train.gz"
    fetch([server.url(PATH)], dest, sha256=SHA256, retries=3, **FAST)
    first, second = server.requests_for(PATH)
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    assert dest.read_bytes() == DATA
    assert _leftovers(dest) == [dest.name]


def test_resume_partial_file_from_an_earlier_run(server: LoopbackServer, tmp_path: Path) -> None:
    server.cut[PATH] = [123_456]
    dest = tmp_path / "train.gz"
    with pytest.raises(DownloadError, match="connection closed after 123456 of 300000 bytes"):
        fetch([server.url(PATH)], dest, sha256=SHA256, retries=1, **FAST)
    assert not dest.exists()
    assert (tmp_path / "train.gz.part").stat().st_size == 123_456

    fetch([server.url(PATH)], dest, sha256=SHA256, retries=1, **FAST)
    assert server.requests_for(PATH)[-1].headers["Range"] == "bytes=123456-"
    assert dest.read_bytes() == DATA
    assert _leftovers(dest) == [dest.name]


def test_server_ignoring_range_restarts_from_zero(server: LoopbackServer, tmp_path: Path) -> None:
    server.ignore_range = True
    dest = tmp_path / "train.gz"
    (tmp_path / "train.gz.part").write_bytes(DATA[:50_000])
    fetch([server.url(PATH)], dest, sha256=SHA256, **FAST)
    [request] = server.requests_for(PATH)
    assert request.headers["Range"] == "bytes=50000-"  # asked, got a 200 with everything
    assert dest.read_bytes() == DATA


def test_complete_part_answered_416_is_published(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    (tmp_path / "train.gz.part").write_bytes(DATA)
    fetch([server.url(PATH)], dest, sha256=SHA256, **FAST)
    assert len(server.requests_for(PATH)) == 1
    assert dest.read_bytes() == DATA and _leftovers(dest) == [dest.name]


def test_stale_oversized_part_answered_416_restarts(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    (tmp_path / "train.gz.part").write_bytes(DATA + b"junk from another version")
    fetch([server.url(PATH)], dest, sha256=SHA256, **FAST)
    ranged, fresh = server.requests_for(PATH)
    assert ranged.headers["Range"] == f"bytes={len(DATA) + 25}-" and "Range" not in fresh.headers
    assert dest.read_bytes() == DATA


def test_corrupt_part_is_discarded_and_downloaded_again(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    (tmp_path / "train.gz.part").write_bytes(b"\0" * 1000)  # right length, wrong bytes
    fetch([server.url(PATH)], dest, sha256=SHA256, retries=2, **FAST)
    ranged, fresh = server.requests_for(PATH)
    assert ranged.headers["Range"] == "bytes=1000-" and "Range" not in fresh.headers
    assert dest.read_bytes() == DATA


def test_checksum_mismatch_names_file_url_and_digests(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train-images-idx3-ubyte.gz"
    wrong = "ab" * 32
    url = server.url(PATH)
    with pytest.raises(ChecksumError) as caught:
        fetch([url], dest, sha256=wrong, **FAST)
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message and url in message
    assert wrong in message and SHA256 in message
    assert isinstance(caught.value, DownloadError) and isinstance(caught.value, OSError)
    assert _leftovers(dest) == []
    assert len(server.requests_for(PATH)) == 1  # a complete download with a wrong digest is not retried


def test_bad_mirror_then_good_one(server: LoopbackServer, tmp_path: Path) -> None:
    server.files["/bad/train.gz"] = b"not the file"
    dest = tmp_path / "train.gz"
    fetch([server.url("/bad/train.gz"), server.url(PATH)], dest, sha256=SHA256, **FAST)
    assert dest.read_bytes() == DATA


def test_dead_first_mirror_then_good_one(server: LoopbackServer, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}{PATH}"
    dest = tmp_path / "train.gz"
    fetch([dead, server.url(PATH)], dest, sha256=SHA256, retries=2, **FAST)
    assert dest.read_bytes() == DATA
    assert len(server.requests_for(PATH)) == 1


def test_404_on_every_mirror_lists_each_attempt(tmp_path: Path) -> None:
    with LoopbackServer() as one, LoopbackServer() as two:
        urls = [one.url("/a/train.gz"), two.url("/b/train.gz")]
        with pytest.raises(DownloadError) as caught:
            fetch(urls, tmp_path / "train.gz", sha256=SHA256, retries=3, **FAST)
        assert len(one.requests) == 1 and len(two.requests) == 1  # a 404 is not retried
    message = str(caught.value)
    for url in urls:
        assert f"{url} (attempt 1/3): HTTP 404" in message
    assert not isinstance(caught.value, ChecksumError)
    assert _leftovers(tmp_path / "train.gz") == []


def test_5xx_is_retried_with_backoff(server: LoopbackServer, tmp_path: Path) -> None:
    server.status[PATH] = [500, 503]
    dest = tmp_path / "train.gz"
    fetch([server.url(PATH)], dest, sha256=SHA256, retries=3, **FAST)
    assert len(server.requests_for(PATH)) == 3
    assert dest.read_bytes() == DATA


def test_retries_are_bounded(server: LoopbackServer, tmp_path: Path) -> None:
    server.status[PATH] = 500
    with pytest.raises(DownloadError) as caught:
        fetch([server.url(PATH)], tmp_path / "train.gz", sha256=SHA256, retries=2, **FAST)
    assert len(server.requests_for(PATH)) == 2
    assert "(attempt 1/2): HTTP 500" in str(caught.value) and "(attempt 2/2): HTTP 500" in str(caught.value)


def test_candidate_urls_puts_the_mirror_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = ["https://example.org/mnist/a.gz", "https://backup.example.org/a.gz", "https://example.org/mnist/a.gz"]
    assert candidate_urls("a.gz", config) == config[:2]
    assert candidate_urls("a.gz", config, mirror="https://m.example/data/") == [
        "https://m.example/data/a.gz", *config[:2]]
    assert candidate_urls("a.gz", config, mirror="https://m.example/data", subdir="mnist")[:2] == [
        "https://m.example/data/a.gz", "https://m.example/data/mnist/a.gz"]
    assert candidate_urls("a.gz", config, mirror="https://example.org/mnist") == config[:2]  # deduped

    monkeypatch.setenv("GROVE_MIRROR", str(tmp_path))
    assert candidate_urls("a b.gz", [])[0] == f"file://{tmp_path}/a%20b.gz"
    assert candidate_urls("a.gz", [], mirror="https://explicit.example")[0] == "https://explicit.example/a.gz"
    monkeypatch.setenv("GROVE_MIRROR", "")
    assert candidate_urls("a.gz", config) == config[:2]


@pytest.mark.parametrize("layout", ["flat", "subdir"])
@pytest.mark.parametrize("as_url", [True, False])
def test_file_mirror_from_environment(server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      layout: str, as_url: bool) -> None:
    mirror = tmp_path / "mirror"
    folder = mirror / "mnist" if layout == "subdir" else mirror
    folder.mkdir(parents=True)
    (folder / "train.gz").write_bytes(DATA)
    monkeypatch.setenv("GROVE_MIRROR", mirror.as_uri() if as_url else str(mirror))

    urls = candidate_urls("train.gz", [server.url(PATH)], subdir="mnist")
    seen: list[tuple[int, int | None]] = []
    dest = fetch(urls, tmp_path / "out" / "train.gz", sha256=SHA256, progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == DATA
    assert server.requests == []  # the mirror delivered; the config's URL was never asked
    assert seen[-1] == (len(DATA), len(DATA))


def test_package_url_resolves_a_file_in_an_installed_distribution(tmp_path: Path) -> None:
    dist = importlib.metadata.distribution("pytest")
    source = Path(dist.locate_file("pytest/__init__.py"))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = fetch(["package://pytest/pytest/__init__.py"], tmp_path / "init.py", sha256=expected)
    assert dest.read_bytes() == source.read_bytes()


def test_package_url_failures_are_explained(server: LoopbackServer, tmp_path: Path) -> None:
    urls = ["package://no-such-distribution-xyz/a.npy", "package://pytest/pytest/no_such_file.npy"]
    with pytest.raises(DownloadError) as caught:
        fetch(urls, tmp_path / "a.npy", sha256=SHA256)
    message = str(caught.value)
    assert "'no-such-distribution-xyz' is not installed" in message
    assert "does not ship 'pytest/no_such_file.npy'" in message

    # A failing package:// source falls through to the next URL.
    dest = fetch([*urls, server.url(PATH)], tmp_path / "a.npy", sha256=SHA256, **FAST)
    assert dest.read_bytes() == DATA


def _mnist_test_sources() -> dict[str, dict]:
    """configs/mnist.toml's sources for the two MNIST test files (filename, md5, sha256, urls)."""
    import tomllib

    from conftest import REPO

    sources = tomllib.loads((REPO / "configs" / "mnist.toml").read_text())["sources"]
    return {name: sources[name] for name in ("test_images", "test_labels")}


@pytest.mark.parametrize("source", ["test_images", "test_labels"])
def test_grove_ships_the_mnist_test_files_with_the_published_checksums(tmp_path: Path, source: str) -> None:
    """package://grove/pipeline/data/... is a file installed with grove (found beside pipeline/, so an
    editable install works too); it is copied and checked like any other download."""
    src = _mnist_test_sources()[source]
    url = f"package://grove/pipeline/data/mnist/{src['filename']}"
    dest = fetch([url], tmp_path / src["filename"], sha256=src["sha256"], md5=src["md5"])
    assert file_digest(dest) == src["sha256"] and file_digest(dest, "md5") == src["md5"]


@pytest.mark.parametrize("inner, reason", [
    ("pipeline/data/../download.py", "invalid path"),
    ("pipeline/data/mnist/../../../setup.cfg", "invalid path"),
    ("pipeline/download.py", "invalid path"),  # grove's own code is not data
    ("/etc/passwd", "invalid path"),
    ("pipeline/data", "invalid path"),
    ("pipeline/data/mnist/no-such-file.gz", "does not ship 'pipeline/data/mnist/no-such-file.gz'"),
])
def test_grove_package_urls_outside_its_data_are_refused(server: LoopbackServer, tmp_path: Path, inner: str,
                                                         reason: str) -> None:
    url = f"package://grove/{inner}"
    with pytest.raises(DownloadError) as caught:
        fetch([url], tmp_path / "a.gz", sha256=SHA256)
    assert reason in str(caught.value)
    assert _leftovers(tmp_path / "a.gz") == []
    # ...and the next URL is tried.
    assert fetch([url, server.url(PATH)], tmp_path / "a.gz", sha256=SHA256, **FAST).read_bytes() == DATA


def test_grove_package_url_through_a_symlink_out_of_the_data_directory_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.download as download

    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(DATA)
    (data / "link.gz").symlink_to(secret)
    monkeypatch.setattr(download, "PACKAGE_DATA", data)
    with pytest.raises(DownloadError, match="outside grove's data directory"):
        fetch(["package://grove/pipeline/data/link.gz"], tmp_path / "out" / "a.gz", sha256=SHA256)
    assert not (tmp_path / "out" / "a.gz").exists()


def test_probe_says_whether_a_url_can_deliver_without_downloading(server: LoopbackServer, tmp_path: Path) -> None:
    from pipeline.download import probe

    local = tmp_path / "here.gz"
    local.write_bytes(b"x")
    assert probe(local.as_uri()) is None
    assert "no file" in probe((tmp_path / "gone.gz").as_uri())
    assert probe("package://grove/pipeline/data/mnist/t10k-labels-idx1-ubyte.gz") is None
    assert "does not ship" in probe("package://grove/pipeline/data/mnist/nothing.gz")
    assert probe(server.url(PATH)) is None
    assert [r.method for r in server.requests] == ["HEAD"]  # asked, not downloaded
    assert probe(server.url("/missing.gz")) == "HTTP 404 Not Found"
    assert probe(f"http://127.0.0.1:{free_port()}/a.gz").startswith("cannot connect")
    with pytest.raises(ConfigError, match="unsupported URL"):
        probe("ftp://example.org/a.gz")


def test_missing_local_file_moves_on(server: LoopbackServer, tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere" / "train.gz").as_uri()
    dest = fetch([missing, server.url(PATH)], tmp_path / "train.gz", sha256=SHA256, **FAST)
    assert dest.read_bytes() == DATA


def test_verified_dest_does_no_network(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    dest.write_bytes(DATA)
    before = dest.stat().st_mtime_ns
    assert fetch([server.url(PATH)], dest, sha256=SHA256, md5=MD5) == dest
    assert server.requests == []
    assert dest.stat().st_mtime_ns == before


def test_waits_for_another_process_downloading_into_the_same_folder(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    fd = os.open(tmp_path, os.O_RDONLY)  # what a concurrent fetch holds while it downloads
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        worker = threading.Thread(target=fetch, args=([server.url(PATH)], dest), kwargs={"sha256": SHA256})
        worker.start()
        time.sleep(0.2)
        assert worker.is_alive() and server.requests == []
        dest.write_bytes(DATA)  # the other process finishes the file
    finally:
        os.close(fd)
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert server.requests == []  # it saw the finished file and did not download again
    assert dest.read_bytes() == DATA


def test_dest_with_wrong_digest_is_replaced(server: LoopbackServer, tmp_path: Path) -> None:
    dest = tmp_path / "train.gz"
    dest.write_bytes(b"an older, different file")
    fetch([server.url(PATH)], dest, sha256=SHA256, **FAST)
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("kwargs, match", [
    ({}, "no checksum given for train.gz"),
    ({"sha256": "abc"}, "not a valid sha256 digest \\(expected 64 hex"),
    ({"md5": SHA256}, "not a valid md5 digest \\(expected 32 hex"),
    ({"sha256": SHA256, "retries": 0}, "retries must be an integer >= 1"),
])
def test_bad_arguments_are_config_errors(server: LoopbackServer, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fetch([server.url(PATH)], tmp_path / "train.gz", **kwargs)
    assert server.requests == []


@pytest.mark.parametrize("urls, match", [
    ([], "no URL given"),
    ("http://example.org/train.gz", "must be a list of URLs"),
    (["ftp://example.org/train.gz"], "unsupported URL 'ftp://example.org/train.gz'"),
])
def test_bad_url_lists_are_config_errors(tmp_path: Path, urls: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fetch(urls, tmp_path / "train.gz", sha256=SHA256)


def test_progress_increases_to_total_and_is_logged(server: LoopbackServer, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    server.files["/big.bin"] = big = DATA * 4  # 1.2 MB: about 19 chunks of 64 KiB
    seen: list[tuple[int, int | None]] = []
    with caplog.at_level(logging.DEBUG, logger="pipeline.download"):
        fetch([server.url("/big.bin")], tmp_path / "big.bin", sha256=hashlib.sha256(big).hexdigest(),
              progress=lambda done, total: seen.append((done, total)), **FAST)
    done = [d for d, _ in seen]
    assert len(seen) > 10
    assert done == sorted(done) and len(set(done)) == len(done)
    assert {t for _, t in seen} == {len(big)}
    assert seen[0][0] == 0 and seen[-1] == (len(big), len(big))
    percents = [r.getMessage() for r in caplog.records if r.getMessage().endswith("%)")]
    assert percents[-1] == "big.bin: 1.1 MiB of 1.1 MiB (100%)"
    assert 3 <= len(percents) <= 25  # at most about every 5 %, not every chunk


def test_file_digest_streams(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA * 5)  # larger than one 1 MiB read
    assert file_digest(path) == hashlib.sha256(DATA * 5).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(DATA * 5).hexdigest()
