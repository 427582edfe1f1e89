"""Stages split into tasks (``[grove] shards`` / GROVE_SHARDS): the embedding by rows, exact search by
queries and each forest by groups of trees, assembled into versions that are the same bytes as the
ones built in one task."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline import stages
from pipeline.forest import Forest, load_trees, save_trees

METRICS = ("euclidean", "angular", "dot", "manhattan")


def test_shard_ranges_cover_everything_in_order_and_start_on_blocks():
    assert stages.shard_ranges(10, 1) == [(0, 10)]
    assert stages.shard_ranges(50, 4) == [(0, 12), (12, 25), (25, 37), (37, 50)]
    assert stages.shard_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]  # no more parts than units
    assert stages.shard_ranges(1000, 3, align=512) == [(0, 512), (512, 1000)]
    assert stages.shard_ranges(0, 3) == []
    for n, shards, align in [(10_000, 3, 512), (99, 7, 8), (3_000_000, 5, 8192)]:
        ranges = stages.shard_ranges(n, shards, align)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a % align == 0 and a < b for a, b in ranges)
        assert all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))


def test_the_first_trees_do_not_depend_on_the_forest_size():
    """Tree t's seed is a prefix of one stream, so a part's trees serve a forest of any size."""
    x = np.random.default_rng(4).normal(size=(800, 16)).astype(np.float32)
    small = Forest.build(x, metric="euclidean", n_trees=3, leaf_size=10, seed=5).arrays()
    big = Forest.build(x, metric="euclidean", n_trees=6, leaf_size=10, seed=5).arrays()
    n_small = small["roots"].shape[0]
    assert np.array_equal(small["roots"], big["roots"][:n_small])
    assert np.array_equal(small["planes"], big["planes"][: small["planes"].shape[0]])


@pytest.mark.parametrize("metric", METRICS)
def test_a_forest_assembled_from_parts_is_byte_identical(tmp_path, metric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2500, 40)).astype(np.float32)
    x[:10] = x[10:20]  # duplicates
    x[30] = 0  # an all-zero row
    whole = Forest.build(x, metric=metric, n_trees=7, leaf_size=12, seed=3, n_threads=2)
    trees = []
    for i, (first, last) in enumerate(stages.shard_ranges(7, 3)):
        save_trees(Forest.build_trees(x, first, last, metric=metric, leaf_size=12, seed=3), tmp_path / str(i))
        trees += load_trees(tmp_path / str(i))
    assembled = Forest.build(x, metric=metric, n_trees=7, leaf_size=12, seed=3, trees=trees)
    whole.save(tmp_path / "whole")
    assembled.save(tmp_path / "assembled")
    for path in sorted((tmp_path / "whole").iterdir()):
        assert path.read_bytes() == (tmp_path / "assembled" / path.name).read_bytes(), path.name
    with pytest.raises(Exception, match="7 .*|prebuilt"):
        Forest.build(x, metric=metric, n_trees=7, leaf_size=12, seed=3, trees=trees[:5])


def _build_chain(root, shards, monkeypatch) -> None:
    import tasks

    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.setenv("GROVE_SHARDS", str(shards))
    luigi.task_register.Register.clear_instance_cache()
    result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, workers=1,
                         detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text


def _versions(root, stage) -> dict[str, dict]:
    """version -> {file: sha256} of the reproducible files of each version of ``stage``."""
    out = {}
    for manifest in sorted((root / "tinymnist" / stage).glob("v*/manifest.json")):
        files = json.loads(manifest.read_text())["files"]
        out[manifest.parent.name] = {name: f["sha256"] for name, f in files.items() if not f["measured"]}
    return out


def test_a_sharded_chain_publishes_the_same_versions_and_bytes(tiny_mnist, tmp_path, monkeypatch):
    """The tiny chain built in one task per stage and with GROVE_SHARDS=3 (blocks made small so that
    the 400 rows and 60 queries split too): every stage's versions have the same names and the same
    reproducible bytes; the sharded run really ran parts of each kind."""
    monkeypatch.setattr(stages, "EMBED_BLOCK_ROWS", 64)
    monkeypatch.setattr(stages, "EXACT_QUERY_BLOCK", 16)
    _build_chain(tmp_path / "one", 1, monkeypatch)
    _build_chain(tmp_path / "sharded", 3, monkeypatch)
    for stage in ("decode", "embed", "split", "exact", "forest", "evaluate"):
        one, sharded = _versions(tmp_path / "one", stage), _versions(tmp_path / "sharded", stage)
        assert one and one == sharded, stage
    assert not (tmp_path / "one" / "tinymnist" / "forest-part").exists()
    parts = {stage: len(list((tmp_path / "sharded" / "tinymnist" / stage).glob("v*/manifest.json")))
             for stage in ("embed-part", "exact-part", "forest-part")}
    # embed: 460 rows in 3 parts; exact: 60 queries in blocks of 16 -> 3 parts; forests of 2 and 4
    # trees -> (0,1), (1,2) and (0,1), (1,2), (2,4): the first two parts are shared
    assert parts == {"embed-part": 3, "exact-part": 3, "forest-part": 3}

    # The parts are static requirements, known to every worker that schedules the chain (luigid hands
    # a dynamic dependency only to the worker that yielded it); a shard past the ranges is empty.
    from tasks import chain as tasks

    monkeypatch.setenv("GROVE_SHARDS", "8")
    luigi.task_register.Register.clear_instance_cache()
    for whole, part in ((tasks.Embed, tasks.EmbedPart), (tasks.Exact, tasks.ExactPart)):
        required = luigi.task.flatten(whole(dataset="tinymnist").requires())
        assert [t.shard for t in required if isinstance(t, part)] == list(range(8)), whole
    forest_parts = [t for t in luigi.task.flatten(tasks.Forest(dataset="tinymnist", n_trees=4).requires())
                    if isinstance(t, tasks.ForestPart)]
    assert [(t.first, t.last) for t in forest_parts] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # 60 queries in blocks of 16: 4 ranges, so shards 4..7 have nothing to do and are complete at once
    assert [tasks.ExactPart(dataset="tinymnist", shard=i, shards=8).empty() for i in range(8)] == [False] * 4 + [True] * 4
    assert tasks.ExactPart(dataset="tinymnist", shard=7, shards=8).complete()
    assert tasks.ExactPart(dataset="tinymnist", shard=1, shards=8).part_range() == (16, 32)


@pytest.mark.parametrize("value", ["zero", "0", "-2"])
def test_bad_shard_setting_is_a_config_error_before_any_work(tiny_mnist, monkeypatch, capsys, value):
    from pipeline.errors import ConfigError
    from tasks.base import grove
    from tasks.cli import main

    monkeypatch.setenv("GROVE_SHARDS", value)
    with pytest.raises(ConfigError, match="GROVE_SHARDS"):
        grove().shard_count()
    assert main(["run", "tinymnist"]) == 2
    err = capsys.readouterr().err
    assert f"GROVE_SHARDS / luigi.cfg [grove] shards = {value!r}: it must be a whole number >= 1" in err
    assert not tiny_mnist["root"].exists()  # nothing fetched, nothing built


@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_a_forest_built_over_its_own_private_rows_is_the_same(tmp_path, metric):
    """write_forest reads an angular/dot base into private memory (read_vectors(private=True)) and
    lets the index normalise it in place (overwrite=True) instead of copying a mapped array: the
    index is the same bytes."""
    from pipeline.vectors import read_vectors, write_vectors

    x = np.random.default_rng(7).normal(size=(1200, 24)).astype(np.float32)
    write_vectors(tmp_path / "base.arrow", x, [f"k{i}" for i in range(len(x))])
    mapped = read_vectors(tmp_path / "base.arrow")
    private = read_vectors(tmp_path / "base.arrow", private=True)
    assert not mapped.vectors.flags.writeable and private.vectors.flags.writeable
    assert np.array_equal(mapped.vectors, private.vectors)
    copied = Forest.build(mapped.vectors, metric=metric, n_trees=3, leaf_size=10, seed=1).arrays()
    in_place = Forest.build(private.vectors, metric=metric, n_trees=3, leaf_size=10, seed=1, overwrite=True).arrays()
    assert all(np.array_equal(copied[k], in_place[k]) for k in copied)
    if metric == "angular":  # normalised where they lie: the index holds the caller's rows, not a copy
        assert np.shares_memory(in_place["vectors"], private.vectors)
        assert not np.shares_memory(copied["vectors"], mapped.vectors)
