"""`make demo` on a machine with no network and no mirror: it decides in a few seconds that MNIST
cannot be fetched, says so, and runs mnist-small from the MNIST test files installed with grove."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from httpserver import LoopbackServer, free_port
from tasks import demo

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No mirror and no proxy from the developer's environment."""
    for name in ("GROVE_MIRROR", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _mnist_config_with_urls(tmp_path: Path, monkeypatch, base: str) -> Path:
    """A copy of configs/mnist.toml in GROVE_CONFIGS whose three public mirrors become ``base``/0, /1, /2."""
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    text = (REPO / "configs" / "mnist.toml").read_text()
    public = ("https://ossci-datasets.s3.amazonaws.com/mnist", "https://storage.googleapis.com/cvdf-datasets/mnist",
              "http://yann.lecun.com/exdb/mnist")
    for i, prefix in enumerate(public):
        assert prefix in text
        text = text.replace(prefix, f"{base}/{i}")
    (configs / "mnist.toml").write_text(text)
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    return configs


def test_no_mirror_and_no_network_chooses_mnist_small_quickly(tmp_path, monkeypatch):
    _mnist_config_with_urls(tmp_path, monkeypatch, f"http://127.0.0.1:{free_port()}/mnist")  # nothing listens
    started = time.monotonic()
    dataset, why = demo.choose(mirror=None)
    assert time.monotonic() - started < 5
    assert dataset == "mnist-small"
    assert why.startswith("no mirror is set (GROVE_MIRROR), and nothing delivers train-images-idx3-ubyte.gz")
    assert "cannot connect" in why


def test_the_demo_says_on_the_terminal_that_it_runs_mnist_small(tmp_path, monkeypatch):
    """What `make demo` runs: stdout is the dataset for the Makefile, stderr tells the user why."""
    configs = _mnist_config_with_urls(tmp_path, monkeypatch, f"http://127.0.0.1:{free_port()}/mnist")
    env = {**os.environ, "GROVE_CONFIGS": str(configs)}
    run = subprocess.run([sys.executable, "-m", "tasks.demo"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "mnist-small\n"
    assert "MNIST cannot be fetched: no mirror is set (GROVE_MIRROR)" in run.stderr
    assert "Running mnist-small instead: the 10,000 MNIST test images installed with grove" in run.stderr


def test_a_server_that_never_answers_costs_only_the_timeout(tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        _mnist_config_with_urls(tmp_path, monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}/mnist")
        started = time.monotonic()
        dataset, why = demo.choose(mirror=None, timeout=1.0)
        assert time.monotonic() - started < 3
    assert dataset == "mnist-small" and "train-images-idx3-ubyte.gz" in why


def test_a_mirror_with_the_mnist_files_chooses_the_full_mnist(tmp_path, monkeypatch):
    _mnist_config_with_urls(tmp_path, monkeypatch, f"http://127.0.0.1:{free_port()}/mnist")
    mirror = tmp_path / "mirror" / "mnist"  # laid out like ../shared/data: <mirror>/mnist/<file>
    mirror.mkdir(parents=True)
    for name in MNIST_FILES[:-1]:
        (mirror / name).write_bytes(b"stand-in")
    dataset, why = demo.choose(mirror=(tmp_path / "mirror").as_uri())
    assert dataset == "mnist-small"  # one file missing: the full chain could not be fetched
    assert "nothing delivers t10k-labels-idx1-ubyte.gz (sources.test_labels)" in why
    (mirror / MNIST_FILES[-1]).write_bytes(b"stand-in")
    assert demo.choose(mirror=(tmp_path / "mirror").as_uri()) == ("mnist", None)


def test_reachable_public_urls_choose_the_full_mnist(tmp_path, monkeypatch):
    with LoopbackServer({f"/mnist/0/{name}": b"stand-in" for name in MNIST_FILES}) as server:
        _mnist_config_with_urls(tmp_path, monkeypatch, server.url("/mnist"))
        assert demo.choose(mirror=None) == ("mnist", None)
        assert {r.method for r in server.requests} == {"HEAD"}  # nothing was downloaded to decide


def test_mnist_small_uses_the_mnist_test_files_and_their_published_checksums():
    full = tomllib.loads((REPO / "configs" / "mnist.toml").read_text())["sources"]
    small = tomllib.loads((REPO / "configs" / "mnist-small.toml").read_text())
    assert set(small["sources"]) == {"test_images", "test_labels"}
    for name, source in small["sources"].items():
        for key in ("filename", "md5", "sha256"):
            assert source[key] == full[name][key]
        assert source["urls"][0] == f"package://grove/pipeline/data/mnist/{source['filename']}"
        shipped = REPO / "pipeline" / "data" / "mnist" / source["filename"]
        assert hashlib.sha256(shipped.read_bytes()).hexdigest() == source["sha256"]


@pytest.mark.slow
def test_mnist_small_builds_and_answers_with_no_network_and_no_mirror(tmp_path, monkeypatch, capsys):
    """The shipped config, end to end: fetched from package://, 9,000 base + 1,000 queries, two forests
    (10 and 50 trees), evaluated, gated and promoted; `grove query mnist-small test/0` shows pixel neighbours."""
    import luigi.task_register

    from pipeline import lifecycle
    from tasks.cli import main

    root = tmp_path / "artifacts"
    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.setenv("GROVE_THREADS", "2")
    monkeypatch.delenv("GROVE_CONFIGS", raising=False)
    # Any http(s) request would go to this dead proxy and fail: the run must not need one.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{free_port()}")
    luigi.task_register.Register.clear_instance_cache()

    assert main(["run", "mnist-small"]) == 0
    out = capsys.readouterr()
    shown = out.out + out.err
    assert "from package://grove/pipeline/data/mnist/t10k-images-idx3-ubyte.gz" in shown
    assert "trying the next URL" not in shown  # nothing was tried before the shipped copy
    split = json.loads((root / "mnist-small" / "split" / "latest" / "manifest.json").read_text())
    assert split["rows"] == {"base": 9000, "queries": 1000}
    fetched = root / "mnist-small" / "fetch" / "latest"
    assert sorted(p.name for p in fetched.iterdir() if p.suffix == ".gz") == ["t10k-images-idx3-ubyte.gz",
                                                                               "t10k-labels-idx1-ubyte.gz"]

    # The nightly job's view: the config's gate (recall@10 >= 0.95 with 50 trees at search_k 1000) passes.
    monkeypatch.setenv("GROVE_REBUILD_DATASETS", "mnist-small")
    assert main(["rebuild", "--date", "2026-11-01"]) == 0
    assert lifecycle.serving_version(root, "mnist-small") is not None
    capsys.readouterr()

    assert main(["query", "mnist-small", "test/0", "-k", "5"]) == 0
    answer = capsys.readouterr().out
    assert "mnist-small: 'test/0'" in answer
    rows = [line.split() for line in answer.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and all(row[1].startswith("test/") and row[3].startswith("test/") for row in rows)
    assert [row[1] for row in rows] == [row[3] for row in rows]  # the index finds the exact neighbours here

    # The Makefile's MNIST step on this machine with no mirror (no ../shared/data) and public mirrors
    # that do not answer: it says so, runs mnist-small (built above: nothing to do) and queries it.
    if shutil.which("make") is None:
        pytest.skip("make is not installed: the Makefile's demo-mnist step was not run")
    configs = _mnist_config_with_urls(tmp_path, monkeypatch, f"http://127.0.0.1:{free_port()}/mnist")
    env = {**os.environ, "GROVE_CONFIGS": str(configs)}
    make = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed",
                           f"BIN={Path(sys.executable).parent}", f"SHARED_DATA={tmp_path / 'no-shared-data'}",
                           "demo-mnist"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert make.returncode == 0, make.stdout + make.stderr
    assert "MNIST cannot be fetched: no mirror is set (GROVE_MIRROR)" in make.stderr
    assert "grove run mnist-small\n" in make.stdout and "grove query mnist-small test/0\n" in make.stdout
    assert "mnist-small: 'test/0'" in make.stdout


def _wheel_sources(tmp_path: Path) -> Path:
    """What a wheel is built from: the checkout's project files, without caches or artifacts."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("pipeline", "tasks"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def test_a_wheel_ships_the_mnist_test_files_and_package_urls_find_them(tmp_path):
    """A non-editable install (a wheel) has pipeline/data/mnist/ and package://grove/... resolves there."""
    src = _wheel_sources(tmp_path)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("grove-*.whl")
    small = tomllib.loads((REPO / "configs" / "mnist-small.toml").read_text())["sources"]
    with zipfile.ZipFile(wheel) as archive:
        for source in small.values():
            data = archive.read(f"pipeline/data/mnist/{source['filename']}")
            assert hashlib.sha256(data).hexdigest() == source["sha256"]
        archive.extractall(tmp_path / "site")
    check = ("import sys, pipeline\n"
             "from pipeline.download import fetch\n"
             f"assert pipeline.__file__.startswith({str(tmp_path / 'site')!r}), pipeline.__file__\n"
             f"fetch([{small['test_labels']['urls'][0]!r}], sys.argv[1], sha256={small['test_labels']['sha256']!r})\n")
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path / "labels.gz")], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "labels.gz").read_bytes() == (REPO / "pipeline" / "data" / "mnist" /
                                                     small["test_labels"]["filename"]).read_bytes()
