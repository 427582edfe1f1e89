"""Training a CNN with a bottleneck layer, and using that layer as an embedding.

- ``train``: supervised softmax training, seeded, on a fixed torch thread count with deterministic
  algorithms (the same arguments give the same weights bit for bit, see ``deterministic_torch``),
  with torchvision augmentation for images; a checkpoint each epoch (weights, optimizer, epoch, RNG
  states; read back with ``torch.load(weights_only=True)``) and resumption from the newest one after
  an interruption, which gives the same final weights as an uninterrupted run.
- ``save_model`` / ``load_model``: ``model.safetensors`` plus ``model.json`` (the architecture as a
  ``ModelSpec``, the weights' sha256, the caller's metadata): rebuilt with no pickle.
- ``embed``: the bottleneck activations, L2-normalised for the angular metric.
- ``evaluate_classifier`` and ``label_precision_at_k``: the quality numbers.

The networks themselves are in ``cnn_models``. Models that sit on a frozen pretrained backbone are
trained on that backbone's cached features (``extract_backbone_features``), not on images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .cnn_models import (
    BACKBONES,
    MODEL_NAMES,
    SMALL,
    GroveNet,
    ModelSpec,
    ProgressFn,
    build_model,
    deterministic_torch,
    extract_backbone_features,
    images_to_tensor,
    make_spec,
    resize_center_crop,
)
from .artifacts import write_json_atomic
from .download import file_digest
from .errors import ArtifactError, ConfigError, FormatError
from .exact import exact_neighbors, normalize_rows
from . import learned
from .learned import EMBED_BATCH_SIZE, FEATURE_BATCH_SIZE, resolve_augment
from .progress import Rate, format_duration, scaled, with_rate

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAMES", "ModelSpec", "GroveNet", "TrainResult", "make_spec", "build_model", "extract_backbone_features",
    "train", "save_model", "load_model", "embed", "evaluate_classifier", "label_precision_at_k",
]

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_JSON = "model.json"
_CHECKPOINT_RE = re.compile(r"^epoch-(\d{4,})\.pt$")
# Training reports at least this often (besides ten times an epoch): an epoch of a large model can take minutes.
_PROGRESS_SECONDS = 2.0


@dataclass
class TrainResult:
    """A trained model and how it got there.

    history: one dict per epoch ``{"epoch", "loss", "accuracy", "seconds"}`` (training-set loss and
    accuracy, with augmentation and dropout on). resumed_from: the epoch of the checkpoint training
    resumed from (0 for a fresh start).
    """

    model: GroveNet
    spec: ModelSpec
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


# ---------------------------------------------------------------- inputs


def _check_labels(labels: np.ndarray, n: int, n_classes: int) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(f"labels must be an integer array of shape ({n},); got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise FormatError(f"labels must lie in [0, {n_classes}); got [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(labels.astype(np.int64))


def _check_features(features: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != spec.feature_dim or not np.issubdtype(features.dtype, np.floating):
        raise FormatError(
            f"model {spec.name} takes float features (n, {spec.feature_dim}) from extract_backbone_features; "
            f"got {features.dtype} {features.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


def _model_inputs(
    model: GroveNet, inputs: np.ndarray, batch_size: int, weights_path: str | Path | None, progress: ProgressFn | None
) -> torch.Tensor:
    """What the model's forward takes: for a backbone head, features (extracted here when given
    uint8 (n, h, w, 3) images); for ``small``, uint8 (n, c, s, s) images resized to the input size."""
    spec = model.spec
    if spec.frozen_backbone:
        inputs = np.asarray(inputs)
        if inputs.dtype == np.uint8 and inputs.ndim == 4:
            inputs = extract_backbone_features(
                # At most FEATURE_BATCH_SIZE images a batch: the backbone's activations are large.
                inputs, min(batch_size, FEATURE_BATCH_SIZE), progress, backbone=spec.name, image_size=spec.input_size,
                weights_path=weights_path, threads=torch.get_num_threads(),
            )
        return _check_features(inputs, spec)
    x = images_to_tensor(inputs, spec.in_channels)
    if x.shape[-2:] != (spec.input_size, spec.input_size):
        x = torch.cat([resize_center_crop(x[i : i + 1024], spec.input_size) for i in range(0, x.shape[0], 1024)])
    return x


def _train_transform(spec: ModelSpec, augment: str) -> tuple[str, Any]:
    """The resolved augmentation mode and its per-image transform (uint8 (c, h, w) -> uint8 (c, h', w'))."""
    from torchvision.transforms import v2

    augment = resolve_augment(augment, spec.name, spec.in_channels)
    if augment == "none":
        return "none", None
    if augment == "digits":
        # Small shifts, turns and scalings of the resized image; never flips (a mirrored 2 is not a 2).
        return augment, v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    return augment, v2.Compose([
        v2.RandomResizedCrop(spec.input_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's, numpy's and Python's global RNGs seeded from ``seed`` inside the block (augmentation
    draws from torch's); the caller's RNG states are restored afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _seed_worker(worker_id: int) -> None:
    """A DataLoader worker's numpy and Python RNGs, seeded from the torch seed the loader's seeded
    generator gave that worker (training uses no workers today; this keeps it so if it ever does)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        x = self.x[i]
        return (x if self.transform is None else self.transform(x)), self.y[i]


# ---------------------------------------------------------------- checkpoints


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir() if directory.is_dir() else ():
        m = _CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(directory: Path, state: dict[str, Any], keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{state['epoch']:04d}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash leaves the previous checkpoint intact
    for _, old in _checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ArtifactError(
            f"checkpoint {path} is damaged ({exc}); delete it to resume from an earlier one or start over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"checkpoint {path} is not a grove checkpoint of format {CHECKPOINT_FORMAT}")
    return state


# ---------------------------------------------------------------- training


def train(
    model_name: str,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    bottleneck: int = 128,
    input_size: int | None = None,
    width: int = learned.SMALL_WIDTH,
    dropout: float = 0.2,
    weight_decay: float = 1e-4,
    augment: str = "auto",
    threads: int | None = None,
    keep_checkpoints: int = 2,
) -> TrainResult:
    """Train ``model_name`` with softmax cross-entropy (AdamW, constant ``lr``).

    inputs: for ``small``, uint8 images (n, h, w) or (n, h, w, c), trained at ``input_size`` (default
    the images' side) with augmentation (``augment``: "auto" = "digits" (small affine) for 1 channel,
    "photos" (random resized crop + flip) for 3; "none"); for a backbone name, float32 (n, feature_dim)
    features from ``extract_backbone_features`` (then ``input_size`` is the side they were extracted
    at). labels: int (n,) in [0, n_classes).

    With ``checkpoint_dir``, a checkpoint is written after each epoch and training resumes from the
    newest one found there; the result equals an uninterrupted run. A checkpoint from different data
    or hyperparameters raises ``ArtifactError``. ``progress(fraction, message)`` is called during each
    epoch and after it (once the checkpoint is safe).

    Reproducible bit for bit: torch runs on ``threads`` threads (None: the CPUs this process may use)
    with deterministic algorithms, and model initialisation, shuffling and augmentation draw from RNGs
    seeded with ``seed``. Torch's results depend on the thread count, so a caller that stores the
    model passes a fixed one (the chain: ``train.threads``, part of the digest).
    """
    # Torch on a fixed thread count with deterministic kernels, every RNG seeded from ``seed``: the
    # weights depend on the data and these arguments alone (see deterministic_torch).
    with deterministic_torch(threads) as n_threads:
        if epochs < 1 or batch_size < 1 or not lr > 0 or keep_checkpoints < 1:
            raise ConfigError(
                f"epochs, batch_size, keep_checkpoints must be >= 1 and lr > 0; got epochs={epochs}, "
                f"batch_size={batch_size}, keep_checkpoints={keep_checkpoints}, lr={lr}"
            )
        if model_name in BACKBONES:
            spec = make_spec(model_name, n_classes, bottleneck=bottleneck, input_size=input_size, width=width,
                             dropout=dropout)
            x = _check_features(inputs, spec)
        elif model_name == SMALL:
            x = images_to_tensor(inputs)
            side = input_size or x.shape[-1]
            spec = make_spec(SMALL, n_classes, bottleneck=bottleneck, in_channels=x.shape[1], input_size=side,
                             width=width, dropout=dropout)
        else:
            raise ConfigError(f"unknown model {model_name!r}: expected one of {', '.join(MODEL_NAMES)}")
        y = _check_labels(labels, x.shape[0], spec.n_classes)
        mode, transform = _train_transform(spec, augment)
        if not spec.frozen_backbone and mode != "photos":
            x = resize_center_crop(x, spec.input_size)  # once, deterministically, not per epoch
        n = x.shape[0]
        hparams = {
            "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed), "weight_decay": float(weight_decay),
            "augment": augment, "threads": n_threads, "inputs_shape": list(np.shape(inputs)),
            "inputs_sha256": hashlib.sha256(np.ascontiguousarray(inputs).data).hexdigest(),
            "labels_sha256": hashlib.sha256(y.numpy().tobytes()).hexdigest(),
        }
        ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None

        with _seeded(seed):  # leaves the caller's global RNGs alone
            model = GroveNet(spec)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            generator = torch.Generator().manual_seed(seed)
            loader = torch.utils.data.DataLoader(
                _Examples(x, y, transform),
                batch_size=batch_size, shuffle=True, generator=generator, num_workers=0, worker_init_fn=_seed_worker,
                drop_last=(n % batch_size == 1),  # BatchNorm cannot train on a batch of one
            )
            history: list[dict[str, float]] = []
            start = 0
            found = _checkpoints(ckdir) if ckdir is not None else []
            if found:
                epoch, path = found[-1]
                state = _load_checkpoint(path)
                then, now = {**state["spec"], **state["hparams"]}, {**spec.to_dict(), **hparams}
                changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
                if changed:
                    raise ArtifactError(
                        f"checkpoint {path} was written for other data or parameters: "
                        + "; ".join(f"{k} was {then.get(k)!r}, now {now.get(k)!r}" for k in changed)
                        + f". Remove {ckdir} to start over"
                    )
                if epoch > epochs:
                    raise ArtifactError(f"checkpoint {path} is at epoch {epoch}, beyond the {epochs} asked for")
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["torch_rng"])
                generator.set_state(state["loader_rng"])
                history, start = list(state["history"]), epoch
                log.info("resuming %s training from %s (epoch %d of %d)", spec.name, path, epoch, epochs)
            n_batches = len(loader)
            per_epoch = n - (1 if n % batch_size == 1 else 0)  # examples an epoch trains on (see drop_last)
            run_started, run_seen = time.perf_counter(), 0  # this run's rate, without the resumed epochs
            last_report = run_started
            for epoch in range(start, epochs):
                model.train()
                t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
                for b, (xb, yb) in enumerate(loader):
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * len(yb)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(yb)
                    run_seen += len(yb)
                    now = time.perf_counter()
                    if progress is not None and b + 1 < n_batches and (
                            (b + 1) % max(1, n_batches // 10) == 0 or now - last_report >= _PROGRESS_SECONDS):
                        last_report = now
                        rate = run_seen / max(now - run_started, 1e-9)
                        left = (epochs - epoch - 1) * per_epoch + max(per_epoch - seen, 0)
                        progress((epoch + (b + 1) / n_batches) / epochs,
                                 f"epoch {epoch + 1}/{epochs}: batch {b + 1}/{n_batches}, loss {loss_sum / seen:.4f}, "
                                 f"{rate:,.0f} samples/s, ETA {format_duration(left / rate)}")
                if not math.isfinite(loss_sum):
                    raise ArtifactError(f"training {spec.name} diverged in epoch {epoch + 1} (loss {loss_sum}); "
                                        f"lower lr={lr}")
                row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                       "seconds": time.perf_counter() - t0}
                history.append(row)
                message = f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, accuracy {row['accuracy']:.4f}"
                log.info("%s %s (%.1f s)", spec.name, message, row["seconds"])
                if epoch + 1 < epochs:
                    rate = run_seen / max(time.perf_counter() - run_started, 1e-9)
                    message += f", ETA {format_duration((epochs - epoch - 1) * per_epoch / rate)}"
                if ckdir is not None:
                    _save_checkpoint(ckdir, {
                        "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "spec": spec.to_dict(), "hparams": hparams,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(), "loader_rng": generator.get_state(), "history": history,
                    }, keep_checkpoints)
                if progress is not None:
                    progress((epoch + 1) / epochs, message)
            _recalibrate_batchnorm(model, x, spec, batch_size, seed)
        model.eval()
        return TrainResult(model=model, spec=spec, history=history, resumed_from=start)


@torch.no_grad()
def _recalibrate_batchnorm(
    model: GroveNet, x: torch.Tensor, spec: ModelSpec, batch_size: int, seed: int, limit: int | None = None
) -> None:
    """Set every BatchNorm's running mean/variance to the average over (at most ``limit``, in a
    seeded random order) unaugmented, center-cropped training inputs under the final weights.

    The running averages kept during training (momentum 0.1) lag the weights and, after a few
    hundred batches or fewer, can be far from the statistics the trained layers produce, which ruins
    eval-mode predictions and embeddings. The order is shuffled because a batch of one class (data
    sorted by label) would skew the batch statistics the deeper layers see. Deterministic.
    """
    limit = learned.RECALIBRATION_LIMIT if limit is None else limit
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    try:
        for start in range(0, order.shape[0], batch_size):
            xb = x[order[start : start + batch_size]]
            if xb.shape[0] < 2:
                continue
            if not spec.frozen_backbone:
                xb = resize_center_crop(xb, spec.input_size)
            model.embedding(xb)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


# ---------------------------------------------------------------- saving



def save_model(model: GroveNet, directory: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (the state dict) and ``model.json`` (``{"spec", "weights",
    "sha256", "size", "meta"}``, written last) into ``directory``; returns the JSON's path.
    ``meta`` must be JSON-serialisable (training parameters, metrics...)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    doc = {"spec": model.spec.to_dict(), "weights": WEIGHTS_FILE, "sha256": file_digest(weights),
           "size": weights.stat().st_size, "meta": dict(meta or {})}
    path = directory / MODEL_JSON
    write_json_atomic(path, doc)
    return path


def load_model(directory: str | Path) -> GroveNet:
    """The model saved by ``save_model`` in ``directory``, in eval mode, its ``meta`` dict attached
    as ``model.meta``. A missing, altered or truncated file raises ``ArtifactError``."""
    from .cnn_models import load_weights_file

    directory = Path(directory)
    path = directory / MODEL_JSON
    try:
        doc = json.loads(path.read_text())
        spec = ModelSpec.from_dict(doc["spec"])
        weights = directory / doc["weights"]
        expected = doc["sha256"]
    except FileNotFoundError as exc:
        raise ArtifactError(f"no saved model in {directory}: {path.name} is missing") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid model description ({exc!r}); rebuild the model") from exc
    if not weights.is_file():
        raise ArtifactError(f"model weights {weights} are missing; rebuild the model")
    actual = file_digest(weights)
    if actual != expected:
        raise ArtifactError(
            f"model weights {weights} were altered or truncated: sha256 {actual}, expected {expected}; rebuild the model"
        )
    model = GroveNet(spec)
    state = load_weights_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"weights {weights} do not fit the model described in {path}: {exc}") from exc
    model.meta = doc.get("meta", {})
    return model.eval()


# ---------------------------------------------------------------- using a model


@torch.inference_mode()
def _run(model: GroveNet, x: torch.Tensor, batch_size: int, head: str, progress: ProgressFn | None) -> np.ndarray:
    model.eval()
    out = []
    n = x.shape[0]
    rate = Rate(n, "items")
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        out.append((model.embedding(xb) if head == "embedding" else model(xb)).numpy())
        if progress is not None:
            progress(min(start + batch_size, n) / n, f"{head}: {rate.message(min(start + batch_size, n))}")
    return np.concatenate(out).astype(np.float32, copy=False)


def embed(
    model: GroveNet,
    inputs: np.ndarray,
    batch_size: int = EMBED_BATCH_SIZE,
    progress: ProgressFn | None = None,
    *,
    weights_path: str | Path | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """The L2-normalised bottleneck activations: float32 (n, bottleneck), for the angular metric.

    inputs: uint8 images (n, h, w[, c]) (deterministically resized and center-cropped to the model's
    input size), or, for a backbone head, either its float32 (n, feature_dim) features or uint8
    (n, h, w, 3) images (the backbone then runs here; ``weights_path`` as in ``build_backbone``).
    A row whose activations are all zero stays zero.

    The same inputs, ``batch_size`` and ``threads`` (torch threads, None: the CPUs this process may
    use; see ``deterministic_torch``) give the same bytes: kernels block their work by batch and thread.
    """
    with deterministic_torch(threads):
        if progress is not None and model.spec.frozen_backbone and np.ndim(inputs) == 4:
            # The backbone's pass over the images is most of the work; the head's is quick.
            n = np.shape(inputs)[0]
            x = _model_inputs(model, inputs, batch_size, weights_path,
                              with_rate(scaled(progress, 0.0, 0.9), n, "images"))
            return normalize_rows(_run(model, x, batch_size, "embedding", scaled(progress, 0.9, 1.0)))
        x = _model_inputs(model, inputs, batch_size, weights_path, progress)
        return normalize_rows(_run(model, x, batch_size, "embedding", progress))


def evaluate_classifier(
    model: GroveNet, inputs: np.ndarray, labels: np.ndarray, batch_size: int = EMBED_BATCH_SIZE, *,
    threads: int | None = None
) -> float:
    """Top-1 accuracy in [0, 1] of the softmax classifier on ``inputs`` (as for ``embed``) with int
    ``labels`` (n,), on ``threads`` torch threads."""
    with deterministic_torch(threads):
        x = _model_inputs(model, inputs, batch_size, None, None)
        y = _check_labels(labels, x.shape[0], model.spec.n_classes).numpy()
        logits = _run(model, x, batch_size, "classify", None)
    return float((logits.argmax(1) == y).mean())


def label_precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = 10, metric: str = "angular") -> float:
    """Mean over items of the fraction of its ``k`` nearest other items (exact search, ``metric``)
    that share its label. vectors: float (n, d); labels: (n,) of any comparable dtype; n > k."""
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels)
    n = vectors.shape[0] if vectors.ndim == 2 else -1
    if labels.shape != (n,) or not 1 <= k < n:
        raise FormatError(
            f"label precision needs vectors (n, d), labels (n,) and 1 <= k < n; got {vectors.shape}, {labels.shape}, k={k}"
        )
    ids, _ = exact_neighbors(vectors, vectors, k + 1, metric)
    # An item is normally its own nearest neighbour, but an exact duplicate with a smaller id can come
    # first: drop the item itself wherever it is, else the farthest of the k + 1.
    own = ids == np.arange(n)[:, None]
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    neighbours = ids[keep].reshape(n, k)
    return float((labels[neighbours] == labels[:, None]).mean())
