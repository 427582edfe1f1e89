"""Tests for pipeline.wordeval: constructed vocabularies with known answers, gensim as an oracle, real GloVe."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, FormatError
from pipeline.wordeval import (
    GOOGLE_ANALOGIES,
    WORDSIM353,
    analogy_accuracy,
    evaluate_word_embedding,
    gensim_test_file,
    word_similarity,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _angles_vocab():
    """Words on the unit circle at known angles: cos(w_i, w_j) = cos(theta_i - theta_j)."""
    angles = {"cat": 0.0, "dog": 0.3, "wolf": 0.5, "car": 1.4, "rock": 2.5, "sky": 2.8}
    words = list(angles)
    # scaled by different lengths: the similarity must be cosine, not dot product
    vectors = np.array([[math.cos(a), math.sin(a)] for a in angles.values()], np.float32)
    vectors *= np.arange(1, len(words) + 1, dtype=np.float32)[:, None]
    return words, vectors, angles


def _write_pairs(path: Path, rows: list[tuple[str, str, float]], header=True) -> Path:
    lines = ["# a comment line", "# Word 1\tWord 2\tHuman (mean)"] if header else []
    lines += [f"{a}\t{b}\t{s}" for a, b, s in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_word_similarity_known_correlations(tmp_path):
    words, vectors, angles = _angles_vocab()
    pairs = [("cat", "dog"), ("cat", "wolf"), ("dog", "car"), ("cat", "rock"), ("wolf", "sky"), ("car", "sky")]
    cosines = [math.cos(angles[a] - angles[b]) for a, b in pairs]

    # gold scores that are an affine function of the cosine: both correlations are exactly 1
    path = _write_pairs(tmp_path / "exact.tsv", [(a, b, 5 + 3 * c) for (a, b), c in zip(pairs, cosines)])
    r = word_similarity(words, vectors, path)
    assert r["n_pairs"] == 6 and r["n_oov"] == 0 and r["oov_ratio"] == 0
    assert r["spearman"] == pytest.approx(1.0) and r["pearson"] == pytest.approx(1.0, abs=1e-6)

    # reversed ranks and a monotone but non-linear gold: Spearman -1, |Pearson| < 1
    path = _write_pairs(tmp_path / "rev.tsv", [(a, b, math.exp(-5 * c)) for (a, b), c in zip(pairs, cosines)])
    r = word_similarity(words, vectors, path)
    assert r["spearman"] == pytest.approx(-1.0)
    assert -1.0 < r["pearson"] < -0.5


def test_word_similarity_oov_case_and_invalid_lines(tmp_path, caplog):
    words, vectors, angles = _angles_vocab()
    rows = [("CAT", "Dog", 9.0), ("cat", "wolf", 8.0), ("dog", "rock", 2.0), ("sky", "cat", 1.0),
            ("cat", "unicorn", 5.0)]
    path = _write_pairs(tmp_path / "p.tsv", rows)
    with path.open("a") as f:
        f.write("broken line without tabs\n")
    r = word_similarity(words, vectors, path)
    assert r["n_pairs"] == 4 and r["n_oov"] == 1 and r["oov_ratio"] == pytest.approx(1 / 5)
    assert r["spearman"] == pytest.approx(1.0)
    assert "skipped 1 lines" in caplog.text
    # case-sensitive: "CAT"/"Dog" are unknown now
    r = word_similarity(words, vectors, path, case_insensitive=False)
    assert r["n_pairs"] == 3 and r["n_oov"] == 2
    # restricting the vocabulary to the first 3 words makes "rock" and "sky" unknown
    r = word_similarity(words, vectors, path, restrict_vocab=3)
    assert r["n_pairs"] == 2 and math.isnan(r["spearman"])


def _country_vocab(n_pairs=6, dim_extra=3, seed=0):
    """city_i = (u_i + t_city)/sqrt2, country_i = (u_i + t_country)/sqrt2 with orthonormal u, t.

    Then country_i - city_i + city_j = country_j exactly (score 1), every other word scores <= 1/2.
    """
    dim = n_pairs + 2 + dim_extra
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))[0]
    u, t_city, t_country = basis[:n_pairs], basis[n_pairs], basis[n_pairs + 1]
    words, vectors = [], []
    for i in range(n_pairs):
        words += [f"city{i}", f"country{i}"]
        vectors += [(u[i] + t_city) / np.sqrt(2), (u[i] + t_country) / np.sqrt(2)]
    return words, np.array(vectors, np.float32)


def test_analogy_known_accuracy(tmp_path):
    words, vectors = _country_vocab()
    lines = [": capitals"]
    lines += [f"city{i} country{i} city{j} country{j}" for i in range(3) for j in range(3) if i != j]  # 6 right
    lines += ["city0 country0 city1 country2", "city2 country2 city0 country1"]  # 2 wrong answers
    lines += ["city0 country0 atlantis country1"]  # OOV
    lines += [": gram-inverse"]
    lines += [f"country{i} city{i} country{j} city{j}" for i, j in [(3, 4), (4, 5), (5, 3)]]  # 3 right
    lines += ["country3 city3 country4 city5"]  # wrong
    lines += ["not an analogy"]  # invalid, skipped
    path = tmp_path / "q.txt"
    path.write_text("\n".join(lines) + "\n")

    r = analogy_accuracy(words, vectors, path)
    assert r["n_questions"] == 12 and r["n_correct"] == 9 and r["n_oov"] == 1
    assert r["accuracy"] == pytest.approx(9 / 12)
    assert r["per_section"] == {
        "capitals": {"accuracy": pytest.approx(6 / 8), "correct": 6, "total": 8},
        "gram-inverse": {"accuracy": pytest.approx(3 / 4), "correct": 3, "total": 4},
    }
    assert r["semantic_accuracy"] == pytest.approx(6 / 8) and r["syntactic_accuracy"] == pytest.approx(3 / 4)

    # restricting the vocabulary to the first 8 words (pairs 0-3) turns every question of the
    # second section into OOV
    r = analogy_accuracy(words, vectors, path, restrict_vocab=8)
    assert r["n_questions"] == 8 and r["n_oov"] == 5 and r["n_correct"] == 6
    assert r["per_section"]["gram-inverse"]["total"] == 0 and math.isnan(r["syntactic_accuracy"])


def test_analogy_file_without_section(tmp_path):
    words, vectors = _country_vocab()
    path = tmp_path / "q.txt"
    path.write_text("city0 country0 city1 country1\n")
    with pytest.raises(FormatError, match="section"):
        analogy_accuracy(words, vectors, path)


def test_bad_arguments(tmp_path):
    words, vectors = _country_vocab()
    path = gensim_test_file(WORDSIM353)
    with pytest.raises(ConfigError, match="shape"):
        word_similarity(words[:-1], vectors, path)
    with pytest.raises(ConfigError, match="restrict_vocab"):
        analogy_accuracy(words, vectors, gensim_test_file(GOOGLE_ANALOGIES), restrict_vocab=0)
    with pytest.raises(FileNotFoundError):
        word_similarity(words, vectors, tmp_path / "missing.tsv")


def test_matches_gensim_on_a_random_vocabulary(tmp_path):
    """Same answers as gensim's evaluate_word_analogies / evaluate_word_pairs, including case variants
    and the exclusion of the question words."""
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(7)
    words, vectors = _country_vocab(n_pairs=40, dim_extra=4)
    # noise makes some answers wrong; upper-case variants (less frequent, close to their lower-case
    # forms) test gensim's case folding: the first spelling's vector is used, and every spelling
    # of a question word is excluded from the answers
    vectors = vectors + rng.normal(0, 0.12, vectors.shape).astype(np.float32)
    words += ["CITY3", "Country5", "COUNTRY7"]
    variants = vectors[[6, 11, 15]] + rng.normal(0, 0.02, (3, vectors.shape[1])).astype(np.float32)
    vectors = np.vstack([vectors, variants])
    lines = []
    for s in range(3):
        lines.append(f": {'gram' if s == 2 else 'sem'}-section{s}")
        # degenerate questions whose best non-excluded answer would be the other spelling of b and c
        lines += [f"country{k} city{k} city{k} city{k}" for k in (3, 5, 7)]
        lines += [f"city{k} country{k} country{k} country{k}" for k in (3, 5, 7)]
        for _ in range(150):
            i, j = rng.integers(0, 42, size=2)  # pairs 40 and 41 do not exist: OOV questions
            q = [f"city{i}", f"country{i}", f"city{j}", f"country{j}"]
            if s == 1:
                q = [q[1], q[0], q[3], q[2]]
            lines.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in q))
    qpath = tmp_path / "q.txt"
    qpath.write_text("\n".join(lines) + "\n")
    ppath = _write_pairs(tmp_path / "p.tsv", [(words[a], words[b], float(rng.random()))
                                              for a, b in rng.choice(len(words), size=(80, 2))])
    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(words, vectors)

    for restrict in (None, 60):
        ours = analogy_accuracy(words, vectors, qpath, restrict_vocab=restrict)
        score, sections = kv.evaluate_word_analogies(str(qpath), restrict_vocab=restrict or len(words))
        assert ours["accuracy"] == pytest.approx(score)
        for s in sections[:-1]:  # the last one is gensim's "Total accuracy"
            assert ours["per_section"][s["section"]]["correct"] == len(s["correct"])
            assert ours["per_section"][s["section"]]["total"] == len(s["correct"]) + len(s["incorrect"])
    assert 0 < ours["n_correct"] < ours["n_questions"] and ours["n_oov"] > 0

    pearson, spearman, oov_percent = kv.evaluate_word_pairs(str(ppath))
    ours = word_similarity(words, vectors, ppath)
    assert ours["spearman"] == pytest.approx(spearman.statistic)
    assert ours["pearson"] == pytest.approx(pearson.statistic, abs=1e-6)
    assert ours["oov_ratio"] == pytest.approx(oov_percent / 100)


@pytest.mark.skipif(not (DATA / "words").is_dir(), reason=f"real word vectors not present at {DATA / 'words'}")
def test_real_glove_10k():
    from pipeline.formats.word2vec import read_word2vec

    words, vectors = read_word2vec(DATA / "words" / "glove-6B-50d-top10k.w2v.bin")
    started = time.perf_counter()
    r = evaluate_word_embedding(words, vectors)
    elapsed = time.perf_counter() - started
    # measured with this code and cross-checked against gensim 4.4: 0.5269, 0.2770, 0.5853
    assert r["wordsim353"]["spearman"] == pytest.approx(0.5269, abs=1e-3)
    assert r["wordsim353"]["n_pairs"] == 269
    assert r["simlex999"]["spearman"] == pytest.approx(0.2770, abs=1e-3)
    assert r["analogy"]["accuracy"] == pytest.approx(0.5853, abs=1e-3)
    assert r["analogy"]["n_questions"] == 6762
    assert len(r["analogy"]["per_section"]) == 14
    assert elapsed < 20, f"evaluation took {elapsed:.1f}s; the batched analogy search should take about 1s"


_REPRO_SCRIPT = """
import json, sys
import numpy as np
from pipeline.wordeval import GOOGLE_ANALOGIES, WORDSIM353, analogy_accuracy, gensim_test_file, word_similarity
rng = np.random.default_rng(3)
pairs = [line.split("\\t") for line in gensim_test_file(WORDSIM353).read_text().splitlines() if line and line[0] != "#"]
words = sorted({w for p in pairs for w in p[:2]})
words += [f"w{i}" for i in range(3000)]
vectors = rng.normal(size=(len(words), 300)).astype(np.float32)
print(json.dumps({"sim": word_similarity(words, vectors, gensim_test_file(WORDSIM353))}, sort_keys=True))
"""


def test_stored_scores_do_not_depend_on_blas(tmp_path):
    """Word-similarity correlations are stored in results.json: the same bits with OpenBLAS on 1 or
    2 threads and its Prescott kernel (whose float products differ from this CPU's in the last bits)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    def run(**env):
        out = subprocess.run([sys.executable, "-c", _REPRO_SCRIPT], env={**os.environ, "PYTHONPATH": str(REPO), **env},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert run(OPENBLAS_NUM_THREADS="1") == run(OPENBLAS_NUM_THREADS="2", OPENBLAS_CORETYPE="Prescott")


def test_word_similarity_normalises_only_the_pairs_words(tmp_path):
    """A large vocabulary is not copied whole: the pairs' words are looked up and only their rows
    normalised, with the same bits as normalising every row (each row is scaled alone)."""
    from pipeline import wordeval
    from pipeline.exact import normalize_rows

    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(5000)] + ["W3"]  # a second spelling folds to the first's key
    vectors = rng.normal(size=(len(words), 16)).astype(np.float32)
    vocab = wordeval._Vocab(words, vectors, None, True, wanted={"W3", "W4999", "NOPE"})
    assert vocab.index == {"W3": 0, "W4999": 1} and vocab.vectors.shape == (2, 16)
    assert vocab.vectors.tobytes() == normalize_rows(vectors)[[3, 4999]].tobytes()
    full = wordeval._Vocab(words, vectors, None, True)
    pairs = _write_pairs(tmp_path / "p.tsv", [("w1", "w2", 1.0), ("w3", "w40", 2.0), ("w5", "w9", 3.0),
                                               ("w7", "nope", 4.0)])
    result = word_similarity(words, vectors, pairs)
    expected = [wordeval._cosine(full.vectors, full.index[a.upper()], full.index[b.upper()])
                for a, b in (("w1", "w2"), ("w3", "w40"), ("w5", "w9"))]
    from scipy import stats

    assert result["n_pairs"] == 3 and result["n_oov"] == 1
    assert result["spearman"] == float(stats.spearmanr([1.0, 2.0, 3.0], expected).statistic)
    assert result["pearson"] == float(stats.pearsonr([1.0, 2.0, 3.0], expected).statistic)
