"""Learned embeddings inside the chain: frozen-backbone features, CNN training, bottleneck embedding.

Inputs come from the decode stage's items table: uint8 rows reshaped by its ``image_shape``
metadata ((h, w) for MNIST, (h, w, 3) for photos). The train split trains; the test split measures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .vectors import VectorTable, read_vectors

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]


def images_of(items: VectorTable) -> np.ndarray:
    """uint8 (n, h, w) or (n, h, w, 3) images from an items table with ``image_shape`` metadata."""
    shape = json.loads(items.meta["image_shape"])
    return np.asarray(items.vectors).reshape(len(items), *shape)


def pretrained(cfg: dict) -> bool:
    return cfg["train"]["backbone"] != "small"


def write_features(cfg: dict, decoded: Path, out: Path, threads: int, report: Report) -> dict:
    """Run the frozen pretrained backbone once over every image: ``features.npy`` float32 (n, feature_dim)."""
    from .cnn_models import extract_backbone_features

    t = cfg["train"]
    items = read_vectors(decoded / "items.arrow")
    features = extract_backbone_features(
        images_of(items), 32, lambda f, m: report(f, m), backbone=t["backbone"],
        image_size=t["input_size"] or None, weights_path=t["weights_path"] or None, threads=threads)
    np.save(out / "features.npy", features)
    return {"rows": {"items": int(features.shape[0])}, "dim": int(features.shape[1])}


def _inputs(cfg: dict, items: VectorTable, features: Path | None) -> np.ndarray:
    return np.load(features / "features.npy", mmap_mode="r") if features is not None else images_of(items)


def write_train(cfg: dict, decoded: Path, features: Path | None, out: Path, checkpoints: Path, threads: int,
                report: Report) -> dict:
    """Train the CNN with a 128-d bottleneck on the train split; ``model/`` (safetensors + JSON).

    Checkpoints go to ``checkpoints`` (outside the temporary directory) so a killed run resumes.
    Metrics: test accuracy of the softmax classifier and the per-epoch history.
    """
    from . import cnn

    t = cfg["train"]
    items = read_vectors(decoded / "items.arrow")
    inputs = _inputs(cfg, items, features)
    train_rows = np.flatnonzero(items.splits == "train")
    test_rows = np.flatnonzero(items.splits == "test")
    n_classes = int(items.labels.max()) + 1
    result = cnn.train(
        t["backbone"], np.asarray(inputs[train_rows]), items.labels[train_rows], n_classes=n_classes,
        epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], seed=t["seed"], checkpoint_dir=checkpoints,
        progress=lambda f, m: report(f, m), bottleneck=t["bottleneck"], input_size=t["input_size"] or None,
        dropout=t["dropout"], weight_decay=t["weight_decay"], threads=threads)
    accuracy = cnn.evaluate_classifier(result.model, np.asarray(inputs[test_rows]), items.labels[test_rows],
                                       threads=threads) if len(test_rows) else float("nan")
    log.info("%s: test accuracy %.4f after %d epochs", cfg["dataset"]["name"], accuracy, t["epochs"])
    cnn.save_model(result.model, out / "model", meta={"classes": items.meta.get("classes")})
    return {"rows": {"train": int(len(train_rows)), "test": int(len(test_rows))},
            "metrics": {"test_accuracy": round(accuracy, 4), "history": result.history}}


def embed_with_model(cfg: dict, items: VectorTable, model_dir: Path, features: Path | None, threads: int,
                     report: Report) -> np.ndarray:
    """float32 (n, bottleneck) unit vectors: the trained model's bottleneck for every item."""
    from . import cnn

    model = cnn.load_model(model_dir)
    return cnn.embed(model, np.asarray(_inputs(cfg, items, features)), progress=lambda f, m: report(f, m),
                     weights_path=cfg["train"]["weights_path"] or None, threads=threads)
