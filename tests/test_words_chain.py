"""The word-vector chain on a tiny word2vec C binary file: decode, holdout split, quality, query."""

from __future__ import annotations

import hashlib
import json
import textwrap

import luigi
import numpy as np
import pytest
from luigi.execution_summary import LuigiStatusCode

from pipeline.wordeval import WORDSIM353, gensim_test_file
from tasks.cli import main as grove


def _write_word2vec_binary(path, words, vectors):
    with open(path, "wb") as f:
        f.write(f"{len(words)} {vectors.shape[1]}\n".encode())
        for word, vector in zip(words, vectors):
            f.write(word.encode() + b" " + vector.astype("<f4").tobytes() + b"\n")


@pytest.fixture
def tiny_words(tmp_path, monkeypatch):
    """600 words (those of WordSim-353 first, so similarity can be measured) with seeded 16-d vectors.

    "river" and "chinese" get vectors whose normalised sum is closest to "yangtze".
    """
    pairs = [line.split("\t")[:2] for line in gensim_test_file(WORDSIM353).read_text().splitlines()
             if not line.startswith("#")]
    words = list(dict.fromkeys(w.lower() for pair in pairs for w in pair))
    words = [w for w in words if w not in ("chinese", "river")] + ["chinese", "river"]
    words += [f"filler{i}" for i in range(600 - len(words) - 1)] + ["yangtze"]
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(len(words), 16)).astype(np.float32)
    index = {w: i for i, w in enumerate(words)}
    vectors[index["yangtze"]] = vectors[index["river"]] / np.linalg.norm(vectors[index["river"]]) + \
        vectors[index["chinese"]] / np.linalg.norm(vectors[index["chinese"]])
    mirror = tmp_path / "mirror" / "words"
    mirror.mkdir(parents=True)
    path = mirror / "tiny.w2v.bin"
    _write_word2vec_binary(path, words, vectors)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tinywords.toml").write_text(textwrap.dedent(f"""\
        [dataset]
        name = "tinywords"
        kind = "word2vec"
        mirror_subdir = "words"

        [sources.vectors]
        filename = "tiny.w2v.bin"
        sha256 = "{hashlib.sha256(path.read_bytes()).hexdigest()}"

        [decode]
        vectors = "vectors"
        format = "binary"

        [embed]
        model = "normalized"
        metric = "angular"

        [split]
        method = "holdout"
        n_queries = 50
        seed = 3

        [exact]
        k = 20

        [forest]
        n_trees = [3]
        leaf_size = 8

        [evaluate]
        search_k = [10, 100, 2000]
        n_queries = 20
        """))
    monkeypatch.setenv("GROVE_MIRROR", str(tmp_path / "mirror"))  # a bare path is a mirror too
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    monkeypatch.setenv("GROVE_ARTIFACTS", str(tmp_path / "artifacts"))
    luigi.task_register.Register.clear_instance_cache()
    yield {"root": tmp_path / "artifacts", "words": words, "vectors": vectors}
    luigi.task_register.Register.clear_instance_cache()


def test_word_chain_evaluates_index_and_embedding(tiny_words):
    import tasks

    result = luigi.build([tasks.Chain(dataset="tinywords")], local_scheduler=True, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    root = tiny_words["root"] / "tinywords"
    from pipeline.vectors import read_vectors

    embedded = read_vectors(root / "embed" / "latest" / "vectors.arrow")
    assert embedded.keys == tiny_words["words"]  # file order kept: analogies use the most frequent words
    np.testing.assert_allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, rtol=1e-5)
    base = read_vectors(root / "split" / "latest" / "base.arrow")
    queries = read_vectors(root / "split" / "latest" / "queries.arrow")
    assert len(base) == 550 and len(queries) == 50
    assert not set(base.keys) & set(queries.keys)  # held-out queries are not in the base

    results = json.loads((root / "evaluate" / "latest" / "results.json").read_text())
    assert results["metric"] == "angular"
    assert [r["recall"] for r in results["rows"] if r["search_k"] == 2000] == [1.0]
    ws = results["quality"]["wordsim353"]
    assert ws["n_pairs"] > 300 and -1.0 <= ws["spearman"] <= 1.0
    assert "accuracy" in results["quality"]["analogy"]


def test_phrase_query_prints_both_answers(tiny_words, capsys):
    assert grove(["run", "tinywords"]) == 0
    capsys.readouterr()
    assert grove(["query", "tinywords", "chinese river", "-k", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "approximate (" in lines[1] and "exact (" in lines[1] and "ms)" in lines[1]
    first = lines[2].split()
    assert first[0] == "1" and first[1] == "yangtze" and first[3] == "yangtze"
    assert "river" not in out.split("\n", 1)[1].split()  # the query's own words are left out
    assert len(lines) == 2 + 3


def test_unknown_word_is_a_usage_error(tiny_words, capsys):
    assert grove(["run", "tinywords"]) == 0
    assert grove(["query", "tinywords", "chinese xyzzy"]) == 2
    assert "not in the vocabulary: xyzzy" in capsys.readouterr().err
