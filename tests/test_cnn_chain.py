"""The CNN in the chain: train on the train split, embed with the 128-d bottleneck, evaluate."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import artifacts
from pipeline.vectors import read_vectors

pytest.importorskip("torch", reason="the cnn extra (torch, torchvision) is not installed")


def test_mnist_like_cnn_chain(tiny_mnist):
    import tasks

    path = tiny_mnist["config"]
    text = path.read_text().replace('[embed]\nmetric = "euclidean"', '[embed]\nmodel = "cnn"\nmetric = "angular"')
    path.write_text(text + "\n[train]\nepochs = 2\nbatch_size = 64\nbottleneck = 16\n")
    result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    root = tiny_mnist["root"] / "tinymnist"
    train = artifacts.read_manifest(root / "train" / "latest", verify="sha256")
    assert train["metrics"]["test_accuracy"] > 0.5  # ten well-separated templates: far above chance (0.1)
    assert [h["epoch"] for h in train["metrics"]["history"]] == [1, 2]
    assert (root / "train" / "latest" / "model" / "model.safetensors").is_file()
    embedded = read_vectors(root / "embed" / "latest" / "vectors.arrow")
    assert embedded.dim == 16 and embedded.meta["model"] == "cnn"
    np.testing.assert_allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, rtol=1e-5)
    embed_manifest = artifacts.read_manifest(root / "embed" / "latest")
    assert set(embed_manifest["parents"]) == {"decode", "train"}
    results = json.loads((root / "evaluate" / "latest" / "results.json").read_text())
    assert results["metric"] == "angular" and results["quality"]["label_precision_at_10"] > 0.5
    assert results["quality"]["classifier_test_accuracy"] == train["metrics"]["test_accuracy"]
    assert "classifier test accuracy" in (root / "evaluate" / "latest" / "report.html").read_text()
