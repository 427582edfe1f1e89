"""The food chain on a tiny Food-101 archive made here: decode (with a corrupt photo), embed, evaluate."""

from __future__ import annotations

import hashlib
import json
import textwrap

import luigi
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline.vectors import read_vectors
from test_food import food_members, make_tar


@pytest.fixture
def tiny_food(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "food"
    mirror.mkdir(parents=True)
    members = food_members(corrupt={"food-101/images/sushi/103.jpg": b"not a jpeg at all"})
    archive = make_tar(mirror / "tiny-food.tar.gz", members)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tinyfood.toml").write_text(textwrap.dedent(f"""\
        [dataset]
        name = "tinyfood"
        kind = "food101"
        mirror_subdir = "food"

        [sources.archive]
        filename = "tiny-food.tar.gz"
        sha256 = "{hashlib.sha256(archive.read_bytes()).hexdigest()}"

        [decode]
        archive = "archive"
        classes = ["apple_pie", "sushi"]
        image_size = 16

        [exact]
        k = 3

        [forest]
        n_trees = [2]
        leaf_size = 2

        [evaluate]
        k = 3
        search_k = [100]
        n_queries = 4
        """))
    monkeypatch.setenv("GROVE_MIRROR", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    monkeypatch.setenv("GROVE_ARTIFACTS", str(tmp_path / "artifacts"))
    luigi.task_register.Register.clear_instance_cache()
    yield tmp_path / "artifacts" / "tinyfood"
    luigi.task_register.Register.clear_instance_cache()


def test_food_chain_skips_corrupt_photo_and_keeps_class_subset(tiny_food):
    import tasks

    result = luigi.build([tasks.Chain(dataset="tinyfood")], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    items = read_vectors(tiny_food / "decode" / "latest" / "items.arrow")
    # 2 classes x (3 train + 2 test) photos, less the corrupt sushi test photo
    assert len(items) == 9 and items.dim == 16 * 16 * 3
    assert "images/sushi/103.jpg" not in items.keys and "images/apple_pie/100.jpg" in items.keys
    assert json.loads(items.meta["classes"]) == ["apple_pie", "sushi"]
    assert [b["path"] for b in json.loads(items.meta["bad_files"])] == ["images/sushi/103.jpg"]
    assert sorted(set(items.labels.tolist())) == [0, 1]
    # nothing of the extraction is left inside the published artifact
    assert sorted(p.name for p in (tiny_food / "decode" / "latest").iterdir()) == ["items.arrow", "manifest.json"]
    results = json.loads((tiny_food / "evaluate" / "latest" / "results.json").read_text())
    # flat-colour photos: every neighbour of a photo is of its own class
    assert results["quality"]["label_precision_at_10"] == 1.0
    assert (tiny_food / "evaluate" / "latest" / "report.html").is_file()
