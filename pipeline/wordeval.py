"""Intrinsic quality of a word embedding: word-similarity correlation and analogy accuracy.

The test sets are those gensim ships (``gensim.test.utils.datapath(name)``):

- ``wordsim353.tsv`` (WordSim-353) and ``simlex999.txt`` (SimLex-999): ``word1<TAB>word2<TAB>score``
  lines, ``#`` comments;
- ``questions-words.txt``: Mikolov's Google analogy set, ``: section`` headers then ``a b c d``
  lines meaning "a is to b as c is to d" (19,544 questions in 14 sections; the five first are
  semantic, the ``gram*`` ones syntactic).

The results match gensim's ``KeyedVectors.evaluate_word_pairs`` and ``evaluate_word_analogies``
(same parsing, same case folding, same restriction to the most frequent words, 3CosAdd over unit
vectors with the three question words excluded), but the analogies are answered with batched
matrix products instead of one ``most_similar`` call per question, which makes the whole set a
matter of seconds on two cores. Unlike gensim, ``oov_ratio`` is a fraction, not a percentage.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, FormatError
from .exact import normalize_rows, rerank

log = logging.getLogger(__name__)

WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
GOOGLE_ANALOGIES = "questions-words.txt"

# Rows of the score matrix computed at once: bounds the working memory to ~128 MiB of float32.
_SCORE_BUDGET = 1 << 25


def gensim_test_file(name: str) -> Path:
    """Path of one of the evaluation files gensim ships (``WORDSIM353``, ``SIMLEX999``, ``GOOGLE_ANALOGIES``)."""
    from gensim.test.utils import datapath

    path = Path(datapath(name))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gensim's test data file {name!r} is missing; reinstall gensim")
    return path


def _folder(case_insensitive: bool):
    """gensim's case folding of a word (upper case), or the word as it is."""
    return str.upper if case_insensitive else (lambda w: w)


class _Vocab:
    """The first ``restrict_vocab`` words, unit-normalised, with gensim's case folding.

    ``index[key]`` is the row of the first (most frequent) word folding to ``key``; ``vectors`` is
    ``(n, dim)`` float32 with unit rows (all-zero rows stay zero).

    With ``wanted`` (a set of folded keys), only those keys are indexed and only their rows are
    normalised: ``vectors`` then holds one unit row per found key, ``index`` points into it, and
    ``keys``/``groups`` are empty. Word similarity needs a few hundred rows of a vocabulary that may
    have millions (3M x 300 is 3.6 GB: normalising all of it would copy all of it). Each row is
    normalised alone (``normalize_rows`` is row by row), so the rows have the same bits either way.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray, restrict_vocab: int | None, case_insensitive: bool,
                 wanted: set[str] | None = None):
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(words) != vectors.shape[0]:
            raise ConfigError(
                f"expected {len(words)} words and an (n_words, dim) vector array, got vectors of shape {vectors.shape}"
            )
        if restrict_vocab is not None and (
            isinstance(restrict_vocab, bool) or not isinstance(restrict_vocab, (int, np.integer)) or restrict_vocab < 1
        ):
            raise ConfigError(f"restrict_vocab must be a positive integer or None, got {restrict_vocab!r}")
        n = len(words) if restrict_vocab is None else min(int(restrict_vocab), len(words))
        self.fold = _folder(case_insensitive)
        self.index: dict[str, int] = {}
        self.groups: dict[str, list[int]] = {}  # keys shared by several rows ("Apple", "apple")
        if wanted is not None:
            self.keys: list[str] = []
            rows: list[int] = []
            for i, w in enumerate(words[:n]):
                k = self.fold(w)
                if k in wanted and k not in self.index:
                    self.index[k] = len(rows)
                    rows.append(i)
            self.vectors = normalize_rows(np.asarray(vectors[np.array(rows, dtype=np.int64)], dtype=np.float32)
                                          .reshape(len(rows), vectors.shape[1]))
            return
        self.keys = [self.fold(w) for w in words[:n]]
        for i, k in enumerate(self.keys):
            if k in self.index:
                self.groups.setdefault(k, [self.index[k]]).append(i)
            else:
                self.index[k] = i
        # A fixed-order kernel, not np.linalg.norm: the scores below are stored (results.json).
        self.vectors = normalize_rows(np.asarray(vectors[:n], dtype=np.float32))


def _cosine(unit: np.ndarray, i: int, j: int) -> float:
    """<unit[i], unit[j]> summed in float64 in a fixed order (the same bits on every CPU and BLAS)."""
    return -float(rerank(unit[i], unit, np.array([j], dtype=np.int64), "dot")[0])


_SHORTLIST = 8  # candidates BLAS scores pick; a fixed-order re-score decides among them


def _best_exactly(scores: np.ndarray, unit: np.ndarray, abc: np.ndarray) -> np.ndarray:
    """Per row, the column of the highest score, decided reproducibly: BLAS's float32 ``scores``
    (n, n_words) only choose a shortlist; each candidate is re-scored as <b - a + c, x> in float64 in
    a fixed order (ties: the smaller row), so the stored accuracy does not depend on the BLAS build.
    Excluded columns carry -inf in ``scores`` and are never chosen."""
    m = min(_SHORTLIST, scores.shape[1])
    short = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    out = np.empty(scores.shape[0], dtype=np.int64)
    for i in range(scores.shape[0]):
        cand = short[i][np.isfinite(scores[i, short[i]])]
        a, b, c = (unit[j].astype(np.float64) for j in abc[i])
        target = (b - a + c).astype(np.float32)
        exact = -rerank(target, unit, cand.astype(np.int64), "dot")
        best = np.lexsort((cand, -exact))[0]
        out[i] = cand[best]
    return out


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such evaluation file")
    return path


def word_similarity(
    words: Sequence[str],
    vectors: np.ndarray,
    pairs_path: str | Path,
    *,
    restrict_vocab: int | None = None,
    case_insensitive: bool = True,
    delimiter: str = "\t",
) -> dict:
    """Correlation of the embedding's cosine similarities with human similarity judgements.

    Args:
        words: ``n`` words, most frequent first.
        vectors: ``(n, dim)`` float array, row ``i`` the vector of ``words[i]``.
        pairs_path: ``word1<delimiter>word2<delimiter>score`` lines; ``#`` lines are comments.
        restrict_vocab: only the first ``restrict_vocab`` words count as known; None: all.
        case_insensitive: fold case as gensim does (the most frequent spelling wins).

    Returns:
        ``{"spearman", "pearson", "spearman_pvalue", "pearson_pvalue", "oov_ratio", "n_pairs",
        "n_oov"}``: ``n_pairs`` pairs with both words known were scored, ``n_oov`` skipped,
        ``oov_ratio = n_oov / (n_pairs + n_oov)``. With fewer than 3 scored pairs the correlations
        are NaN (logged as a warning).
    """
    from scipy import stats

    path = _check_file(pairs_path)
    fold = _folder(case_insensitive)
    pairs = []
    n_invalid = 0
    with open(path, encoding="utf-8") as fin:
        for line in fin:
            if not line or line.startswith("#"):
                continue
            try:
                a, b, score = (fold(x) for x in line.split(delimiter))
                pairs.append((a, b, float(score)))
            except ValueError:
                n_invalid += 1
    # only the pairs' words are looked up and normalised, not the whole vocabulary
    vocab = _Vocab(words, vectors, restrict_vocab, case_insensitive, wanted={w for a, b, _ in pairs for w in (a, b)})
    model, gold = [], []
    n_oov = 0
    for a, b, score in pairs:
        if a not in vocab.index or b not in vocab.index:
            n_oov += 1
            continue
        model.append(_cosine(vocab.vectors, vocab.index[a], vocab.index[b]))
        gold.append(score)
    if n_invalid:
        log.warning("%s: skipped %d lines that are not 'word1%sword2%sscore'", path, n_invalid, delimiter, delimiter)
    n_pairs = len(gold)
    result = {
        "n_pairs": n_pairs,
        "n_oov": n_oov,
        "oov_ratio": n_oov / (n_pairs + n_oov) if n_pairs + n_oov else math.nan,
    }
    if n_pairs < 3:
        log.warning("%s: only %d pairs have both words in the vocabulary; correlations are undefined", path, n_pairs)
        result.update(spearman=math.nan, pearson=math.nan, spearman_pvalue=math.nan, pearson_pvalue=math.nan)
        return result
    spearman = stats.spearmanr(gold, model)
    pearson = stats.pearsonr(gold, model)
    result.update(
        spearman=float(spearman.statistic),
        spearman_pvalue=float(spearman.pvalue),
        pearson=float(pearson.statistic),
        pearson_pvalue=float(pearson.pvalue),
    )
    log.info("%s: Spearman %.4f, Pearson %.4f on %d pairs (%.1f%% OOV)",
             path.name, result["spearman"], result["pearson"], n_pairs, 100 * result["oov_ratio"])
    return result


def _read_analogies(path: Path, fold) -> tuple[list[str], list[tuple[int, str, str, str, str]], int]:
    """Sections and ``(section_no, a, b, c, expected)`` questions, case-folded; and the invalid-line count."""
    sections: list[str] = []
    questions = []
    n_invalid = 0
    with open(path, encoding="utf-8") as fin:
        for line_no, line in enumerate(fin, start=1):
            if line.startswith(": "):
                sections.append(line[2:].strip())
                continue
            if not sections:
                raise FormatError(
                    f"{path}: line {line_no} comes before any ': section' header; expected the Google "
                    f"analogy format (': section' lines, then 'a b c d' lines)"
                )
            parts = line.split()
            if len(parts) != 4:
                n_invalid += 1
                continue
            a, b, c, d = (fold(p) for p in parts)
            questions.append((len(sections) - 1, a, b, c, d))
    return sections, questions, n_invalid


def analogy_accuracy(
    words: Sequence[str],
    vectors: np.ndarray,
    questions_path: str | Path,
    restrict_vocab: int | None = 30000,
    *,
    case_insensitive: bool = True,
) -> dict:
    """Accuracy on "a is to b as c is to ?" questions by 3CosAdd, as gensim's ``evaluate_word_analogies``.

    The answer is the word among the first ``restrict_vocab`` whose unit vector has the largest
    dot product with ``unit(b) - unit(a) + unit(c)``, the three question words excluded. Questions
    with a word outside the first ``restrict_vocab`` words are skipped and counted in ``n_oov``.

    Args:
        words: ``n`` words, most frequent first.
        vectors: ``(n, dim)`` float array, row ``i`` the vector of ``words[i]``.
        questions_path: the analogy file (``: section`` headers, ``a b c d`` lines).
        restrict_vocab: the candidate and known words are the first ``restrict_vocab``; None: all.
        case_insensitive: fold case as gensim does.

    Returns:
        ``{"accuracy", "n_questions", "n_correct", "n_oov", "oov_ratio", "semantic_accuracy",
        "syntactic_accuracy", "per_section"}`` where ``n_questions`` counts the questions answered,
        ``per_section`` maps each section name to ``{"accuracy", "correct", "total"}``, and the
        syntactic sections are the ``gram*`` ones. Accuracies with no question answered are NaN.
    """
    path = _check_file(questions_path)
    vocab = _Vocab(words, vectors, restrict_vocab, case_insensitive)
    sections, questions, n_invalid = _read_analogies(path, vocab.fold)
    if n_invalid:
        log.warning("%s: skipped %d lines that are not 'a b c d'", path, n_invalid)

    idx = vocab.index
    known = [q for q in questions if all(w in idx for w in q[1:])]
    n_oov = len(questions) - len(known)
    section_of = np.array([q[0] for q in known], dtype=np.int64)
    abcd = np.array([[idx[w] for w in q[1:]] for q in known], dtype=np.int64).reshape(-1, 4)
    correct = np.zeros(len(known), dtype=bool)

    V = vocab.vectors
    batch = max(1, min(2048, _SCORE_BUDGET // max(1, V.shape[0])))
    log.info("answering %d analogy questions (%d skipped as OOV) over %d words, %d at a time",
             len(known), n_oov, V.shape[0], batch)
    for start in range(0, len(known), batch):
        a, b, c, d = abcd[start:start + batch].T
        scores = (V[b] - V[a] + V[c]) @ V.T
        rows = np.arange(len(a))
        for cols in (a, b, c):
            scores[rows, cols] = -np.inf
        for i in range(len(a)):  # other spellings of a question word (only with case folding)
            for col in (a[i], b[i], c[i]):
                extra = vocab.groups.get(vocab.keys[col])
                if extra:
                    scores[i, extra] = -np.inf
        predicted = _best_exactly(scores, V, np.stack([a, b, c], axis=1))
        correct[start:start + len(a)] = [vocab.keys[p] == vocab.keys[e] for p, e in zip(predicted, d)]

    def acc(mask: np.ndarray) -> float:
        n = int(mask.sum())
        return float(correct[mask].sum() / n) if n else math.nan

    per_section = {}
    for s, name in enumerate(sections):
        mask = section_of == s
        per_section[name] = {"accuracy": acc(mask), "correct": int(correct[mask].sum()), "total": int(mask.sum())}
    syntactic = np.isin(section_of, [s for s, name in enumerate(sections) if name.startswith("gram")])
    everything = np.ones(len(known), dtype=bool)
    result = {
        "accuracy": acc(everything),
        "n_questions": len(known),
        "n_correct": int(correct.sum()),
        "n_oov": n_oov,
        "oov_ratio": n_oov / len(questions) if questions else math.nan,
        "semantic_accuracy": acc(~syntactic),
        "syntactic_accuracy": acc(syntactic),
        "per_section": per_section,
    }
    log.info("%s: analogy accuracy %.4f on %d questions (semantic %.4f, syntactic %.4f; %d OOV)",
             path.name, result["accuracy"], len(known), result["semantic_accuracy"],
             result["syntactic_accuracy"], n_oov)
    return result


def evaluate_word_embedding(
    words: Sequence[str], vectors: np.ndarray, *, restrict_vocab: int | None = 30000
) -> dict:
    """WordSim-353 and SimLex-999 correlations and Google analogy accuracy, with gensim's test files.

    Returns ``{"wordsim353": word_similarity(...), "simlex999": ..., "analogy": analogy_accuracy(...)}``;
    the similarity sets use the whole vocabulary, the analogies the first ``restrict_vocab`` words.
    """
    return {
        "wordsim353": word_similarity(words, vectors, gensim_test_file(WORDSIM353)),
        "simlex999": word_similarity(words, vectors, gensim_test_file(SIMLEX999)),
        "analogy": analogy_accuracy(words, vectors, gensim_test_file(GOOGLE_ANALOGIES), restrict_vocab),
    }
