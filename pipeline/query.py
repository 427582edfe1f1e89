"""Answering one query from the command line: a word, a phrase, or an item key, against a built index."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .errors import ConfigError
from .exact import exact_neighbors, normalize_rows
from .vectors import VectorTable, read_vectors


@dataclass
class Answer:
    """The k nearest base items of one query. ids int64 (k,), dists float32 (k,), seconds of the search."""

    keys: list[str]
    dists: np.ndarray
    seconds: float


class _Lookup:
    """Key -> vector over several tables, first table first."""

    def __init__(self, tables: list[VectorTable]):
        self.tables = [(table, {k: i for i, k in enumerate(table.keys)}) for table in tables]

    def __call__(self, key: str) -> np.ndarray | None:
        for table, index in self.tables:
            if key in index:
                return np.asarray(table.vectors[index[key]], dtype=np.float32)
        return None


def query_vector(text: str, kind: str, base: VectorTable, queries: VectorTable) -> tuple[np.ndarray, set[str]]:
    """The vector a query text stands for, and the keys to leave out of its answer.

    Words: each whitespace-separated word is looked up (as given, then lower-cased) in the base and the
    held-out queries; a phrase is the normalised sum of its words ("chinese river"), and its own
    words are left out of the answer. Other datasets: an item key (``test/5``) or a bare number, taken
    as a row of the queries table.
    """
    lookup = _Lookup([base, queries])
    if kind == "word2vec":
        vectors, missing = [], []
        for word in text.split():
            v = lookup(word)
            v = v if v is not None else lookup(word.lower())
            (missing.append(word) if v is None else vectors.append(v))
        if missing or not vectors:
            raise ConfigError(f"not in the vocabulary: {', '.join(missing) or repr(text)}; try other words")
        total = normalize_rows(np.sum(vectors, axis=0, keepdims=True))[0]
        return total, {w for w in text.split()} | {w.lower() for w in text.split()}
    if text.isascii() and text.isdigit():  # '²' and '٣' are digits to str.isdigit, not numbers
        if int(text) >= len(queries):
            raise ConfigError(f"query number {text} is out of range: there are {len(queries)} queries")
        return np.asarray(queries.vectors[int(text)], dtype=np.float32), set()
    v = lookup(text)
    if v is None:
        raise ConfigError(f"no item with key {text!r}; keys look like {base.keys[0]!r} or {queries.keys[0]!r}")
    return v, {text}


def _keep(ids: np.ndarray, dists: np.ndarray, keys: list[str], exclude: set[str], k: int) -> tuple[list[str], np.ndarray]:
    kept = [(keys[i], d) for i, d in zip(ids, dists) if i >= 0 and keys[i] not in exclude][:k]
    return [key for key, _ in kept], np.array([d for _, d in kept], dtype=np.float32)


def search(forest, base: VectorTable, vector: np.ndarray, k: int, search_k: int | None, exclude: set[str],
           metric: str, exact: bool) -> tuple[Answer | None, Answer | None]:
    """Approximate answer from ``forest`` (None if forest is None) and, with ``exact``, the exact one."""
    extra = k + len(exclude)
    approx = None
    if forest is not None:
        started = time.perf_counter()
        ids, dists = forest.query(vector, k=extra, search_k=search_k, include_distances=True)
        seconds = time.perf_counter() - started
        approx = Answer(*_keep(ids, dists, base.keys, exclude, k), seconds)
    truth = None
    if exact:
        started = time.perf_counter()
        ids, dists = exact_neighbors(base.vectors, vector[None, :], extra, metric,
                                     base_normalized=base.meta.get("model") == "normalized")
        seconds = time.perf_counter() - started
        truth = Answer(*_keep(ids[0], dists[0], base.keys, exclude, k), seconds)
    return approx, truth


def open_split(split_dir: Path) -> tuple[VectorTable, VectorTable]:
    return read_vectors(split_dir / layout.BASE), read_vectors(split_dir / layout.QUERIES)


def format_answers(approx: Answer | None, truth: Answer | None) -> str:
    """The two answers side by side, with the time each took."""
    columns = [(name, a) for name, a in (("approximate", approx), ("exact", truth)) if a is not None]
    rows = max(len(a.keys) for _, a in columns)
    width = max(12, *(len(key) for _, a in columns for key in a.keys))
    head = "  ".join(f"{f'{name} ({a.seconds * 1e3:.2f} ms)':<{width + 10}}" for name, a in columns)
    lines = [f"{'#':>3}  {head}"]
    for i in range(rows):
        cells = []
        for _, a in columns:
            cells.append(f"{a.keys[i]:<{width}} {a.dists[i]:8.4f}" if i < len(a.keys) else " " * (width + 9))
        lines.append(f"{i + 1:>3}  " + "  ".join(f"{c:<{width + 10}}" for c in cells))
    return "\n".join(lines)
