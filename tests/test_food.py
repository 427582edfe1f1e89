"""Tests for pipeline.formats.food: Food-101 tarballs built here from real JPEGs written by Pillow."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError, FormatError
from pipeline.formats.food import (
    decode_image,
    extract_archive,
    food101_root,
    iter_images,
    load_images,
    read_classes,
    read_food101,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ["apple_pie", "baklava", "sushi"]
# A distinct flat colour per class, so a decoded image shows which file it came from.
COLOURS = {"apple_pie": (200, 30, 30), "baklava": (30, 200, 30), "sushi": (30, 30, 200)}


def jpeg_bytes(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def food_members(corrupt: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Name -> bytes of a tiny Food-101 tree: 3 classes, 3 train + 2 test images each."""
    members: dict[str, bytes] = {}
    train, test = {}, {}
    for c in CLASSES:
        ids = [f"{c}/{100 + i}" for i in range(5)]
        train[c], test[c] = ids[:3], ids[3:]
        for i, image_id in enumerate(ids):
            members[f"food-101/images/{image_id}.jpg"] = jpeg_bytes(COLOURS[c], size=(40 + i, 30))
    members["food-101/meta/classes.txt"] = ("\n".join(CLASSES) + "\n").encode()
    members["food-101/meta/train.json"] = json.dumps(train).encode()
    members["food-101/meta/test.json"] = json.dumps(test).encode()
    members.update(corrupt or {})
    return members


def make_tar(path: Path, members: dict[str, bytes], extra=(), mode="w:gz") -> Path:
    """Write a tar archive; ``extra`` holds ready-made TarInfo objects (links, devices...)."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


@pytest.fixture
def food_tree(tmp_path):
    return extract_archive(make_tar(tmp_path / "food.tar.gz", food_members()), tmp_path / "out")


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_extract_good_archive(tmp_path, mode):
    members = food_members()
    archive = make_tar(tmp_path / "food.tar", members, mode=mode)
    out = extract_archive(archive, tmp_path / "out")
    assert out == tmp_path / "out"
    for name, data in members.items():
        assert (out / name).read_bytes() == data
    # nothing left beside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["food.tar", "out"]


def _hostile(name=None, kind=tarfile.SYMTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


HOSTILE = {
    "dotdot": ({"../evil.txt": b"x"}, [], "'..'"),
    "nested-dotdot": ({"food-101/../../evil.txt": b"x"}, [], "'..'"),
    "absolute": ({"/tmp/evil.txt": b"x"}, [], "absolute"),
    "symlink": ({}, [_hostile("food-101/images/link.jpg", tarfile.SYMTYPE, "/etc/passwd")], "symbolic link"),
    "inner-symlink": ({}, [_hostile("food-101/meta/x", tarfile.SYMTYPE, "classes.txt")], "symbolic link"),
    "hardlink": ({}, [_hostile("food-101/hard", tarfile.LNKTYPE, "food-101/meta/classes.txt")], "hard link"),
    "chardev": ({}, [_hostile("food-101/dev", tarfile.CHRTYPE)], "character device"),
    "fifo": ({}, [_hostile("food-101/fifo", tarfile.FIFOTYPE)], "fifo"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_is_left(tmp_path, case):
    files, extra, message = HOSTILE[case]
    members = food_members()
    members.update(files)
    archive = make_tar(tmp_path / "evil.tar.gz", members, extra)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FormatError, match=message) as info:
        extract_archive(archive, work / "out")
    assert "evil.tar.gz" in str(info.value)
    assert list(work.iterdir()) == []  # no target, no temporary directory
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


@pytest.mark.parametrize("cut", [1, 8, 300, 0.6])
def test_truncated_gzip_archive_leaves_nothing(tmp_path, cut):
    data = make_tar(tmp_path / "good.tar.gz", food_members()).read_bytes()
    cut = cut if isinstance(cut, int) else int(len(data) * cut)
    assert 0 < cut < len(data) - 20
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[:-cut])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FormatError, match="truncated") as info:
        extract_archive(archive, work / "out")
    assert "cut.tar.gz" in str(info.value)
    assert list(work.iterdir()) == []


def test_truncated_plain_tar_at_a_member_boundary(tmp_path):
    # cut right after the last member's data: tarfile alone reads this as a complete archive
    data = make_tar(tmp_path / "good.tar", {"a.txt": b"a" * 512, "b.txt": b"b" * 512}, mode="w").read_bytes()
    archive = tmp_path / "cut.tar"
    archive.write_bytes(data[: 4 * 512])
    with pytest.raises(FormatError, match="end-of-archive"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    archive.write_bytes(data[: 3 * 512 + 100])  # cut inside a member
    with pytest.raises(FormatError, match="truncated"):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar", "good.tar"]


def test_read_only_directory_member_stays_writable(tmp_path):
    ro = tarfile.TarInfo("food-101/images/apple_pie")
    ro.type, ro.mode = tarfile.DIRTYPE, 0o555
    archive = tmp_path / "ro.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(ro)
        info = tarfile.TarInfo("food-101/images/apple_pie/1.jpg")
        data = jpeg_bytes((1, 2, 3))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "food-101" / "images" / "apple_pie" / "1.jpg").read_bytes() == data
    # the extracted tree must stay removable by its owner (a task rebuilding it, pytest's tmp_path)
    assert (out / "food-101" / "images" / "apple_pie").stat().st_mode & 0o200


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(b"this is not a tar file" * 100))
    with pytest.raises(FormatError, match="junk.tar.gz"):
        extract_archive(junk, tmp_path / "out")
    assert list(p.name for p in tmp_path.iterdir()) == ["junk.tar.gz"]


def test_extract_target_rules(tmp_path):
    archive = make_tar(tmp_path / "food.tar.gz", food_members())
    (tmp_path / "empty").mkdir()
    assert (extract_archive(archive, tmp_path / "empty") / "food-101" / "meta" / "classes.txt").is_file()
    with pytest.raises(ConfigError, match="not an empty directory"):
        extract_archive(archive, tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        extract_archive(tmp_path / "missing.tar.gz", tmp_path / "x")


# ---------------------------------------------------------------- layout


def test_read_food101_splits_and_order(food_tree):
    assert food101_root(food_tree) == food_tree / "food-101"
    assert food101_root(food_tree / "food-101") == food_tree / "food-101"
    assert read_classes(food_tree) == CLASSES
    train = read_food101(food_tree, split="train")
    test = read_food101(food_tree, split="test")
    assert len(train) == 9 and len(test) == 6
    assert train[:3] == [(f"images/apple_pie/{i}.jpg", "apple_pie") for i in (100, 101, 102)]
    assert [c for _, c in test] == ["apple_pie"] * 2 + ["baklava"] * 2 + ["sushi"] * 2
    assert not set(train) & set(test)
    for rel, _ in train + test:
        assert (food_tree / "food-101" / rel).is_file()


def test_classes_subset(food_tree):
    # labels follow classes.txt order whatever order the caller gives
    items = read_food101(food_tree, classes=["sushi", "apple_pie"], split="test")
    assert [c for _, c in items] == ["apple_pie", "apple_pie", "sushi", "sushi"]
    assert read_food101(food_tree, classes="sushi,apple_pie", split="test") == items
    with pytest.raises(ConfigError, match="pizza") as info:
        read_food101(food_tree, classes=["pizza", "sushi"])
    assert "apple_pie, baklava, sushi" in str(info.value)  # the available ones are listed
    with pytest.raises(ConfigError, match="empty"):
        read_food101(food_tree, classes=[])
    with pytest.raises(ConfigError, match="split"):
        read_food101(food_tree, split="validation")


def test_malformed_meta(tmp_path, food_tree):
    meta = food_tree / "food-101" / "meta"
    (meta / "test.json").write_text("{not json")
    with pytest.raises(FormatError, match="test.json"):
        read_food101(food_tree, split="test")
    (meta / "test.json").write_text(json.dumps({"apple_pie": ["baklava/1"]}))
    with pytest.raises(FormatError, match="baklava/1"):
        read_food101(food_tree, split="test")
    (meta / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/.."]}))
    with pytest.raises(FormatError, match="apple_pie/.."):
        read_food101(food_tree, split="test")
    (meta / "test.json").write_text(json.dumps({"pizza": ["pizza/1"]}))
    with pytest.raises(FormatError, match="pizza"):
        read_food101(food_tree, split="test")
    (meta / "test.json").unlink()
    with pytest.raises(FormatError, match="missing"):
        read_food101(food_tree, split="test")
    with pytest.raises(FormatError, match="classes.txt"):
        read_food101(tmp_path / "nowhere")


# ---------------------------------------------------------------- images


def test_load_images_decodes_in_item_order(food_tree):
    items = read_food101(food_tree, split="train")
    images, kept, bad = load_images(food_tree, items, 16)
    assert images.shape == (9, 16, 16, 3) and images.dtype == np.uint8
    assert kept == items and bad == []
    for image, (_, cls) in zip(images, kept):
        np.testing.assert_allclose(image.reshape(-1, 3).mean(axis=0), COLOURS[cls], atol=4)


def test_corrupt_and_non_image_files_are_reported_and_skipped(tmp_path, caplog):
    good = jpeg_bytes(COLOURS["baklava"])
    corrupt = {
        "food-101/images/baklava/101.jpg": good[: len(good) // 2],  # truncated JPEG
        "food-101/images/baklava/102.jpg": b"<html>not a picture</html>",
        "food-101/images/sushi/100.jpg": b"",
    }
    tree = extract_archive(make_tar(tmp_path / "f.tar.gz", food_members(corrupt)), tmp_path / "out")
    os.remove(tree / "food-101" / "images" / "sushi" / "101.jpg")  # listed but missing
    items = read_food101(tree, split="train")
    with caplog.at_level(logging.WARNING):
        images, kept, bad = load_images(tree, items, 12)
    bad_paths = [p for p, _ in bad]
    assert bad_paths == [
        "images/baklava/101.jpg", "images/baklava/102.jpg", "images/sushi/100.jpg", "images/sushi/101.jpg",
    ]
    assert images.shape == (5, 12, 12, 3)
    assert kept == [it for it in items if it[0] not in bad_paths]
    assert "skipped 4 of 9 images" in caplog.text and "images/baklava/102.jpg" in caplog.text
    # streaming gives the same
    streamed_bad: list = []
    streamed = list(iter_images(tree, items, 12, streamed_bad))
    assert [it for it, _ in streamed] == kept and streamed_bad == bad
    with pytest.raises(FormatError, match="102.jpg"):
        decode_image(tree / "food-101" / "images" / "baklava" / "102.jpg", 12)


def test_decode_image_resizes_and_centre_crops(tmp_path):
    # a wide image: left third red, middle third green, right third blue
    img = Image.new("RGB", (90, 30))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img.paste(colour, (30 * i, 0, 30 * (i + 1), 30))
    img.save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert tuple(out[5, 5]) == (0, 255, 0)  # the centre survives, the sides are cropped away
    with pytest.raises(ConfigError, match="size"):
        load_images(tmp_path, [], 0)


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (DATA / "food" / "food-101-tiny.tar.gz").is_file(),
    reason=f"real Food-101 subset not present at {DATA / 'food'}",
)
def test_real_food101_tiny(tmp_path):
    root = extract_archive(DATA / "food" / "food-101-tiny.tar.gz", tmp_path / "tiny")
    classes = read_classes(root)
    train = read_food101(root, split="train")
    test = read_food101(root, split="test")
    assert len(classes) == 10 and len(train) + len(test) == 80
    images, kept, bad = load_images(root, train, 32)
    assert bad == [] and images.shape == (len(train), 32, 32, 3)
    assert images.std() > 10  # real photos, not blank frames
