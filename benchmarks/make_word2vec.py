"""Write a synthetic stand-in for word2vec's GoogleNews vectors, and a grove config that reads all of it.

    .venv/bin/python benchmarks/make_word2vec.py --out /work/data-w2v3m/GoogleNews-synthetic-3M-300.bin.gz
    GROVE_CONFIGS=/work/data-w2v3m/configs grove run word2vec-google-news-300

The file is in the word2vec C binary format as gensim's ``save_word2vec_format(binary=True)`` writes
it (and as GoogleNews-vectors-negative300.bin is laid out): a header ``"<n> <dim>\\n"``, then per word
its UTF-8 bytes, one space and ``dim`` little-endian float32, with no newline between records.
Default 3,000,000 words x 300 dims (3.6 GB of vectors), gzip level 1 like the published ``.gz``.

What the data looks like (so an index has realistic work to do):

- words: GoogleNews' most frequent tokens first (``</s>``, ``in``, ``for``, ``The`` ... without ``a``,
  ``and``, ``of``, ``to``, which GoogleNews lacks), a few hundred common English words in topic groups
  (rivers, China, people, countries and capitals, food, animals, computers) and English phrases
  (``chinese_river``, ``Yangtze_River``, ``Hong_Kong``, ``New_York``); then made-up words built from
  syllables (longer further down the list, a quarter of them capitalised) and, after the first few
  thousand, phrases of two or three of them joined with ``_``. Every word is distinct by construction.
- vectors: a few thousand cluster centres (``n / 1000``, at most 3,000), grouped under super-centres,
  with long-tailed (log-normal) cluster sizes; a word is its cluster's centre plus Gaussian noise of a
  per-cluster spread, plus a small direction common to all words; a phrase leans towards the clusters
  of its other words too. The English groups are clusters of their own, with directions for gender,
  royalty, plurals, capitals and nations, so ``chinese river`` finds ``chinese_river`` and king - man +
  woman lands among queen, princess and empress. Each vector is then scaled to a long-tailed norm (about log-normal: median
  2, 99th percentile 4.6, at most 13), as word2vec's norms are.

Memory stays bounded whatever ``--n``: a chunk of rows at a time (peak RSS ~250 MB plain, ~360 MB with
gzip for 3M x 300). On 2 shared cores 3M x 300 takes about 45 s plain and 2-5 min with gzip (which
spends ~90 s of CPU to save 7%: float noise hardly compresses); see ``--no-gzip``.
The file is written under a temporary name and renamed when complete; a line of progress every few
seconds goes to stderr. The output is a function of (``--n``, ``--dim``, ``--seed``, gzip or not):
rows are generated from per-row hashes and a random stream per fixed block of rows, and the
compressor is fed fixed-size pieces, so ``--chunk-rows`` does not change a byte. The uncompressed
bytes use no BLAS and no vectorised transcendental function; the gzip bytes also depend on the zlib
build (the config records the sha256 of the file actually written).

Beside the data, ``<config-dir>/word2vec-google-news-300.toml`` (default ``<out dir>/configs``) is
the packaged config with every hyperparameter unchanged, but its source is the generated file
(``file://`` URL, its sha256) and ``decode.limit = 0`` (every word). ``GROVE_CONFIGS`` directories win
over the packaged configs, so ``GROVE_CONFIGS=<config-dir> grove run word2vec-google-news-300`` runs
the word chain on it. Small sizes for tests: ``--n 2000 --dim 16``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASET = "word2vec-google-news-300"
PACKAGED_CONFIG = ROOT / "configs" / f"{DATASET}.toml"

log = logging.getLogger("make_word2vec")

# ---------------------------------------------------------------- the vocabulary

# GoogleNews' most frequent tokens, in its order (it has no "a", "and", "of", "to").
FUNCTION_WORDS = (
    "</s> in for that is on ## The with said was the at not as it be from by are I have will has #### an this "
    "or their who they but $ had year were we more ### up been you its one about would which out"
).split()

# Topic groups: each is a cluster of its own. A word's recipe adds named directions to its group's
# centre: gender (+ male, - female), royal, plural, capital (a capital city: its nation + capital),
# nation:<x>, demonym, case (a capitalised form).
_GROUPS = ("function", "water", "china", "people", "places", "food", "animals", "tech")


def _english() -> list[tuple[str, dict[str, float]]]:
    """The English words and phrases at the top of the list, with their recipes."""
    rows: list[tuple[str, dict[str, float]]] = [(w, {"g:function": 1.0}) for w in FUNCTION_WORDS]

    def add(group: str, words: str, **extra: float) -> None:
        for w in words.split():
            recipe = {f"g:{group}": 1.0, **{k.replace("__", ":"): v for k, v in extra.items()}}
            if w[0].isupper() and "_" not in w:
                recipe["case"] = 0.3
            rows.append((w, recipe))

    add("water", "river lake stream creek valley canal delta flood riverbank tributary waterfall bridge dam "
                 "water shore basin")
    add("water", "rivers lakes streams creeks valleys canals floods bridges dams", plural=0.8)
    add("china", "chinese Chinese", demonym=0.7, nation__china=0.8)
    add("china", "china China beijing Beijing", nation__china=0.8)
    add("china", "shanghai Shanghai mandarin Mandarin taiwan Taiwan yangtze Yangtze guangzhou")
    add("people", "man boy father son brother he his husband uncle", gender=0.8)
    add("people", "woman girl mother daughter sister she her wife aunt", gender=-0.8)
    add("people", "men boys fathers sons brothers", gender=0.8, plural=0.8)
    add("people", "women girls mothers daughters sisters", gender=-0.8, plural=0.8)
    add("people", "king prince emperor", gender=0.8, royal=0.9)
    add("people", "queen princess empress", gender=-0.8, royal=0.9)
    add("people", "people person child children family friend")
    for nation, capital in (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("japan", "tokyo"),
                            ("spain", "madrid"), ("russia", "moscow"), ("greece", "athens"), ("egypt", "cairo")):
        add("places", nation, **{f"nation__{nation}": 0.8})
        add("places", capital, **{f"nation__{nation}": 0.8, "capital": 0.7})
    add("places", "country city capital town village")
    add("food", "food pizza pasta sushi noodles rice tea coffee bread restaurant chef soup cheese")
    add("animals", "dog cat puppy horse bird fish cow pig sheep")
    add("animals", "dogs cats puppies horses birds cows pigs", plural=0.8)
    add("tech", "computer software internet google Google microsoft Microsoft phone data online")
    # English phrases: the head (last word) gives the group, the other words lean the vector
    rows += [
        ("chinese_river", {"g:water": 1.0, "g:china": 0.6, "nation:china": 0.5, "demonym": 0.3}),
        ("Yangtze_River", {"g:water": 1.0, "g:china": 0.7, "nation:china": 0.4, "case": 0.3}),
        ("Yellow_River", {"g:water": 1.0, "g:china": 0.6, "nation:china": 0.4, "case": 0.3}),
        ("Pearl_River", {"g:water": 1.0, "g:china": 0.5, "nation:china": 0.3, "case": 0.3}),
        ("river_basin", {"g:water": 1.0}),
        ("river_bank", {"g:water": 1.0}),
        ("Hong_Kong", {"g:china": 1.0, "nation:china": 0.6, "case": 0.3}),
        ("New_York", {"g:places": 1.0, "capital": 0.3, "case": 0.3}),
        ("hot_dog", {"g:food": 1.0, "g:animals": 0.4}),
        ("chinese_food", {"g:food": 1.0, "g:china": 0.6, "nation:china": 0.4, "demonym": 0.3}),
    ]
    return rows


ENGLISH = _english()
if len({w for w, _ in ENGLISH}) != len(ENGLISH):
    raise AssertionError("an English word is listed twice")
# Made-up words never equal an English word or a part of an English phrase, in any case.
_RESERVED = {part.lower() for w, _ in ENGLISH for part in w.split("_")}

# Syllables: one consonant, one vowel, optionally one closing consonant. Every syllable starts with a
# consonant and a closing consonant is never followed by a vowel, so a word splits into syllables in
# exactly one way: distinct syllable sequences are distinct words. "q" is in no syllable; it marks
# the few made-up words that would spell an English word ("river" = ri + ver becomes "riverq").
_ONSETS, _VOWELS, _CODAS = "bcdfghjklmnprstvz", "aeiou", "nrslt"
SYLLABLES = [c + v for c in _ONSETS for v in _VOWELS] + [c + v + k for c in _ONSETS for v in _VOWELS for k in _CODAS]
_B = len(SYLLABLES)  # 510
_MASK32, _MASK48 = (1 << 32) - 1, (1 << 48) - 1
_PHRASE_PARTS = 1 << 16  # phrases are made of the made-up words numbered below this (the frequent ones)


def _u64(x: int) -> np.uint64:
    return np.uint64(x & 0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs."""
    x = x + _u64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _u64(27))) * _u64(0x94D049BB133111EB)
    return x ^ (x >> _u64(31))


class Vocabulary:
    """The word of every row, a pure function of (row, seed): rows can be made in any order and chunks.

    Row ``i < len(ENGLISH)`` is an English word; row ``i = len(ENGLISH) + t`` is made-up word number
    ``t`` (``made_up``) or, from ``t >= phrase_start`` on and for about 40% of the rows, a phrase of
    two (80%) or three made-up words below number 65,536, chosen by a bijection of ``t`` (so no two
    rows get the same phrase).
    """

    def __init__(self, n: int, seed: int):
        self.seed = seed
        salts = np.random.SeedSequence([seed, 0x766F6361]).generate_state(8, np.uint64)
        self._salt = {name: salts[i] for i, name in enumerate(("kind", "cap", "cluster", "p2", "p3"))}
        # made-up word numbering: bijective base-_B numerals, scrambled within each length
        self._offsets = [0]
        for length in range(1, 6):
            self._offsets.append(self._offsets[-1] + _B ** length)
        self._scramble = [int(a) | 1 for a in salts[5:8]]  # odd: _coprime then only steps over 3, 5, 17
        self.phrase_start = min(2000, max(0, n - len(ENGLISH)) // 10)

    def hash(self, ids: np.ndarray, stream: str) -> np.ndarray:
        return _mix(_mix(ids.astype(np.uint64) ^ self._salt[stream]))

    def uniform(self, ids: np.ndarray, stream: str) -> np.ndarray:
        """Uniform [0, 1) float64 per id, exact (53 bits of the hash)."""
        return (self.hash(ids, stream) >> _u64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def kinds(self, t: np.ndarray) -> np.ndarray:
        """0 made-up word, 2 or 3: a phrase of that many made-up words."""
        u = self.uniform(t, "kind")
        kind = np.where(u < 0.32, 2, np.where(u < 0.40, 3, 0))
        return np.where(t >= self.phrase_start, kind, 0)

    def made_up(self, js: np.ndarray) -> list[str]:
        """Made-up word number ``j`` for each j: syllables, a quarter capitalised, "q" after English spellings."""
        js = np.asarray(js, dtype=np.int64)
        out: list[str] = [""] * len(js)
        caps = self.uniform(js, "cap") < 0.25
        for length in range(1, len(self._offsets)):
            lo, hi = self._offsets[length - 1], self._offsets[length]
            sel = np.flatnonzero((js >= lo) & (js < hi))
            if not sel.size:
                continue
            size = _B ** length
            # an affine map mod _B**length is a bijection when the multiplier is coprime to _B (2*3*5*17)
            a = self._coprime(length)
            r = [(a * (int(j) - lo) + 7919 * length) % size for j in js[sel]]
            for i, value in zip(sel, r):
                parts = []
                for _ in range(length):
                    value, d = divmod(value, _B)
                    parts.append(SYLLABLES[d])
                word = "".join(parts)
                if word in _RESERVED:
                    word += "q"
                out[i] = word.capitalize() if caps[i] else word
        return out

    def _coprime(self, length: int) -> int:
        a = self._scramble[length % 3] % (_B ** length)
        while np.gcd(a, _B) != 1:
            a += 2
        return a

    def phrase_parts(self, t: np.ndarray, kind: np.ndarray) -> list[tuple[int, ...]]:
        """The made-up word numbers of each phrase row (head last)."""
        t = t.astype(np.uint64)
        x2 = (t * _u64(0x9E3779B1) + self._salt["p2"]) & _u64(_MASK32)  # bijective mod 2^32 (odd multiplier)
        x2 ^= x2 >> _u64(16)
        x2 = (x2 * _u64(0x85EBCA6B)) & _u64(_MASK32)
        x2 ^= x2 >> _u64(13)
        x3 = (t * _u64(0xC2B2AE3D27D4EB4F) + self._salt["p3"]) & _u64(_MASK48)  # bijective mod 2^48
        x3 ^= x3 >> _u64(23)
        x3 = (x3 * _u64(0x165667B19E3779F9)) & _u64(_MASK48)
        x3 ^= x3 >> _u64(21)
        parts = []
        for k, a, b in zip(kind.tolist(), x2.tolist(), x3.tolist()):
            if k == 2:
                parts.append((a >> 16, a & 0xFFFF))
            else:
                parts.append((b >> 32, (b >> 16) & 0xFFFF, b & 0xFFFF))
        return parts


# ---------------------------------------------------------------- the vectors

_RNG_BLOCK = 4096  # rows per random stream: the unit that makes output independent of chunk size


@dataclass
class Model:
    """Everything drawn once from the seed: cluster centres (K, dim), their spreads and sizes, the
    English words' vectors (E, dim) and a direction common to every word."""

    centres: np.ndarray  # float32 (K, dim), unit rows
    spread: np.ndarray  # float32 (K,): noise norm relative to the centre
    cdf: np.ndarray  # float64 (K,): cumulative cluster weights (long-tailed sizes)
    common: np.ndarray  # float32 (dim,)
    english: np.ndarray  # float32 (E, dim), final vectors


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def make_model(n: int, dim: int, seed: int) -> Model:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x6D6F64])))
    k = max(len(_GROUPS) + 8, min(3000, n // 1000))
    n_super = max(2, k // 30)
    supers = _unit_rows(rng.standard_normal((n_super, dim)))
    centres = _unit_rows(supers[rng.integers(0, n_super, k)] + 0.9 * _unit_rows(rng.standard_normal((k, dim))))
    spread = rng.uniform(0.6, 1.3, k)
    weights = rng.lognormal(0.0, 1.3, k)
    cdf = np.cumsum(weights) / weights.sum()
    common = _unit_rows(rng.standard_normal((1, dim)))[0] * 0.3

    # English: named directions, then each word = its recipe + a little noise, scaled like the rest
    names = sorted({c for _, recipe in ENGLISH for c in recipe if not c.startswith("g:")})
    axes = dict(zip(names, _unit_rows(rng.standard_normal((len(names), dim)))))
    for i, g in enumerate(_GROUPS):
        axes[f"g:{g}"] = centres[i]
    english = np.empty((len(ENGLISH), dim))
    noise = rng.standard_normal((len(ENGLISH), dim)) * (0.35 / np.sqrt(dim))
    norms = _norms(rng.standard_normal(len(ENGLISH)))
    for i, (word, recipe) in enumerate(ENGLISH):
        v = sum(weight * axes[c] for c, weight in recipe.items()) + noise[i] + common
        scale = norms[i] * (0.6 if "g:function" in recipe else 1.0)
        english[i] = v * (scale / np.sqrt((v * v).sum()))
    return Model(centres.astype(np.float32), spread.astype(np.float32), cdf, common.astype(np.float32),
                 english.astype(np.float32))


def _norms(z: np.ndarray) -> np.ndarray:
    """Long-tailed norms from standard normals: 2 * (1 + 0.1 z)^4, about log-normal (sigma 0.4)."""
    r = 1.0 + 0.1 * np.clip(z, -6.0, 6.0)
    r2 = r * r
    return 2.0 * r2 * r2


def _block_randoms(seed: int, block: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x626C6B, block])))
    z = rng.standard_normal((_RNG_BLOCK, dim), dtype=np.float32)
    zn = rng.standard_normal(_RNG_BLOCK)
    return z, zn


def _clusters(model: Model, vocab: Vocabulary, made_up: np.ndarray | list[int]) -> np.ndarray:
    """The cluster of each made-up word number: drawn by its hash from the long-tailed cluster sizes."""
    u = vocab.uniform(np.asarray(made_up, dtype=np.int64), "cluster")
    return np.minimum(np.searchsorted(model.cdf, u, side="right"), len(model.cdf) - 1)


def rows(model: Model, vocab: Vocabulary, start: int, stop: int, dim: int) -> tuple[list[str], np.ndarray]:
    """Words and float32 vectors (stop - start, dim) of rows [start, stop)."""
    n_rows = stop - start
    z = np.empty((n_rows, dim), dtype=np.float32)
    zn = np.empty(n_rows)
    for block in range(start // _RNG_BLOCK, (stop - 1) // _RNG_BLOCK + 1):
        bz, bn = _block_randoms(vocab.seed, block, dim)
        lo, hi = max(start, block * _RNG_BLOCK), min(stop, (block + 1) * _RNG_BLOCK)
        z[lo - start : hi - start] = bz[lo - block * _RNG_BLOCK : hi - block * _RNG_BLOCK]
        zn[lo - start : hi - start] = bn[lo - block * _RNG_BLOCK : hi - block * _RNG_BLOCK]

    n_english = len(ENGLISH)
    idx = np.arange(start, stop, dtype=np.int64)
    t = idx - n_english
    gen = t >= 0
    tg = t[gen]
    kind = vocab.kinds(tg)
    words = [w for w, _ in ENGLISH[start : min(stop, n_english)]]

    # the made-up word numbers each row uses: its own (a word) or its parts (a phrase, head last)
    head = tg.copy()
    mods: list[tuple[int, ...]] = [()] * len(tg)
    is_phrase = kind > 0
    if is_phrase.any():
        sel = np.flatnonzero(is_phrase)
        parts = vocab.phrase_parts(tg[sel], kind[sel])
        head[sel] = [p[-1] for p in parts]
        for i, p in zip(sel.tolist(), parts):
            mods[i] = p[:-1]
        needed = np.unique(np.concatenate([np.fromiter((j for p in parts for j in p), dtype=np.int64),
                                           tg[~is_phrase]]))
    else:
        needed = tg
    spelled = dict(zip(needed.tolist(), vocab.made_up(needed)))
    for i, tt in enumerate(tg.tolist()):
        words.append("_".join(spelled[j] for j in mods[i]) + "_" + spelled[head[i]] if mods[i] else spelled[tt])

    # vectors: centre of the head's cluster (+ the other parts' centres) + spread * noise + common
    vectors = np.empty((n_rows, dim), dtype=np.float32)
    vectors[~gen] = model.english[start : min(stop, n_english)]
    if len(tg):
        k = _clusters(model, vocab, head)
        g = model.centres[k]
        g += (model.spread[k] * np.float32(1.0 / np.sqrt(dim)))[:, None] * z[gen]
        g += model.common
        lean = np.zeros(len(tg), dtype=np.float32)
        for slot, weight in ((0, 0.6), (1, 0.4)):
            has = np.array([len(m) > slot for m in mods], dtype=bool)
            if has.any():
                km = _clusters(model, vocab, [m[slot] for m in mods if len(m) > slot])
                g[has] += np.float32(weight) * model.centres[km]
                lean[has] += np.float32(weight * weight)
        # the length of centre + noise + common is about sqrt(1 + spread^2 + lean + 0.09): divide it out
        # (a per-row scalar, no reduction over the dims) and scale to a long-tailed norm
        approx = np.sqrt(1.0 + model.spread[k].astype(np.float64) ** 2 + lean + 0.09)
        g *= (_norms(zn[gen]) / approx).astype(np.float32)[:, None]
        vectors[gen] = g
    return words, vectors


# ---------------------------------------------------------------- writing

_PIECE = 1 << 22  # the compressor always gets pieces of this size: its output cannot depend on chunking


class _Sink:
    """Writes pieces of the uncompressed stream on a thread (gzip and sha256 release the GIL), so
    compressing overlaps generating."""

    def __init__(self, path: Path, level: int | None):
        self.path = path
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes_in = 0
        self.bytes_out = 0
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 31) if level is not None else None  # 31: gzip, mtime 0
        self._pending = bytearray()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="make_word2vec-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview) -> None:
        self._pending += data
        self.bytes_in += len(data)
        if len(self._pending) >= _PIECE:
            cut = len(self._pending) - len(self._pending) % _PIECE
            with memoryview(self._pending) as view:
                self._put(bytes(view[:cut]))
            del self._pending[:cut]

    def _put(self, item: bytes | None) -> None:
        while True:
            if self._error is not None:
                raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    self._emit(self._zip.flush() if self._zip else b"")
                    return
                for start in range(0, len(item), _PIECE):
                    piece = item[start : start + _PIECE]
                    self._emit(self._zip.compress(piece) if self._zip else piece)
        except BaseException as exc:  # handed to the main thread by _put / close
            self._error = exc
            while True:  # keep draining so the producer never blocks forever
                if self._queue.get() is None:
                    return

    def _emit(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.sha256.update(data)
            self.bytes_out += len(data)

    def close(self) -> str:
        if self._pending:
            self._put(bytes(self._pending))
            self._pending.clear()
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.sha256.hexdigest()

    def abort(self) -> None:
        try:
            self._put(None)
            self._thread.join(timeout=30)
        except RuntimeError:
            pass
        self.file.close()


@dataclass
class Result:
    path: Path
    config: Path
    sha256: str
    n: int
    dim: int
    bytes_written: int
    bytes_uncompressed: int
    seconds: float


def generate(out: Path, *, n: int = 3_000_000, dim: int = 300, seed: int = 0, gzip_level: int | None = 1,
             chunk_rows: int = 16384, config_dir: Path | None = None, progress_every: float = 5.0) -> Result:
    """Write the word2vec binary file ``out`` and its grove config; return what was written."""
    out = Path(out).absolute()
    if n < len(ENGLISH) or dim < 2 or chunk_rows < 1:
        raise ValueError(f"--n must be >= {len(ENGLISH)} (the English words), --dim >= 2 and --chunk-rows >= 1, "
                         f"got {n}, {dim}, {chunk_rows}")
    if (out.suffix == ".gz") != (gzip_level is not None):
        raise ValueError(f"{out}: a gzip file's name must end in .gz and only then (the readers go by the "
                         f"suffix); pass --gzip with a .gz name or --no-gzip without")
    config_dir = Path(config_dir).absolute() if config_dir is not None else out.parent / "configs"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = make_model(n, dim, seed)
    vocab = Vocabulary(n, seed)
    log.info("writing %s: %d words x %d dims (seed %d, %d clusters, %s)", out, n, dim, seed, len(model.cdf),
             f"gzip level {gzip_level}" if gzip_level is not None else "uncompressed")

    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    sink = _Sink(tmp, gzip_level)
    try:
        sink.write(f"{n} {dim}\n".encode())
        last = started
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            words, vectors = rows(model, vocab, start, stop, dim)
            raw = memoryview(np.ascontiguousarray(vectors, dtype="<f4")).cast("B")
            rb = 4 * dim
            sink.write(b"".join(b for i, w in enumerate(words)
                                for b in ((w + " ").encode("utf-8"), raw[i * rb : (i + 1) * rb])))
            now = time.monotonic()
            if now - last >= progress_every or stop == n:
                last = now
                rate = stop / max(now - started, 1e-9)
                log.info("%5.1f%%  %d/%d words, %.0f MB in, %.0f MB out, %.0f words/s, ETA %.0f s", 100 * stop / n,
                         stop, n, sink.bytes_in / 1e6, sink.bytes_out / 1e6, rate, (n - stop) / rate)
        digest = sink.close()
        os.replace(tmp, out)
    except BaseException:
        sink.abort()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    config = write_config(config_dir, out, digest, n=n, dim=dim, seed=seed, gzipped=gzip_level is not None)
    return Result(out, config, digest, n, dim, sink.bytes_out, sink.bytes_in, seconds)


# ---------------------------------------------------------------- the config


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as a TOML value")


def _toml(doc: dict, prefix: str = "") -> list[str]:
    lines = []
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    if prefix and scalars:
        lines.append("")
    for k, v in tables.items():
        lines += _toml(v, f"{prefix}.{k}" if prefix else k)
    return lines


def config_text(path: Path, digest: str, config_dir: Path, *, n: int, dim: int, seed: int, gzipped: bool) -> str:
    """The packaged word2vec-google-news-300 config, reading ``path`` (its sha256 ``digest``) whole."""
    raw = tomllib.loads(PACKAGED_CONFIG.read_text(encoding="utf-8"))
    raw["dataset"]["description"] = (f"synthetic stand-in for word2vec GoogleNews 300d: {n:,} words x {dim} "
                                     f"(benchmarks/make_word2vec.py, seed {seed}), every word read")
    raw["sources"] = {"vectors": {"filename": path.name, "sha256": digest, "urls": [path.as_uri()]}}
    raw["decode"]["limit"] = 0
    header = [
        f"# Written by benchmarks/make_word2vec.py --n {n} --dim {dim} --seed {seed} "
        f"--{'' if gzipped else 'no-'}gzip --out {path}",
        f"# {PACKAGED_CONFIG.name} with every hyperparameter unchanged, but the source is the generated",
        "# file and decode.limit = 0 reads every word. Use it with",
        f"#   GROVE_CONFIGS={config_dir} grove run {DATASET}",
        "",
    ]
    return "\n".join(header + _toml(raw)).rstrip("\n") + "\n"


def write_config(config_dir: Path, path: Path, digest: str, **kw) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    target = config_dir / f"{DATASET}.toml"
    text = config_text(path, digest, config_dir, **kw)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    check_config(target)
    return target


def check_config(path: Path) -> None:
    """The written config validates and equals the packaged one in every hyperparameter."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config_file

    ours, packaged = load_config_file(path), load_config_file(PACKAGED_CONFIG)
    for section in ("embed", "train", "split", "exact", "forest", "evaluate", "gate"):
        if getattr(ours, section).as_dict() != getattr(packaged, section).as_dict():
            raise RuntimeError(f"{path}: [{section}] differs from {PACKAGED_CONFIG}")
    if {**ours.decode.as_dict(), "limit": None} != {**packaged.decode.as_dict(), "limit": None} \
            or ours.decode.limit != 0:
        raise RuntimeError(f"{path}: [decode] differs from {PACKAGED_CONFIG} in more than limit = 0")


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3_000_000, help="words (default 3,000,000)")
    p.add_argument("--dim", type=int, default=300, help="dimensions (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gzip", action=argparse.BooleanOptionalAction, default=True,
                   help="gzip level 1, like GoogleNews' .gz (default); --no-gzip writes a plain .bin")
    p.add_argument("--out", type=Path, default=None,
                   help="the file to write (default ./GoogleNews-synthetic-<n>-<dim>.bin[.gz])")
    p.add_argument("--config-dir", type=Path, default=None,
                   help=f"where to write {DATASET}.toml (default <out dir>/configs)")
    p.add_argument("--chunk-rows", type=int, default=16384, help="rows generated at a time (changes no byte)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out or Path(f"GoogleNews-synthetic-{args.n}-{args.dim}.bin{'.gz' if args.gzip else ''}")
    try:
        res = generate(out, n=args.n, dim=args.dim, seed=args.seed, gzip_level=1 if args.gzip else None,
                       chunk_rows=args.chunk_rows, config_dir=args.config_dir)
    except ValueError as exc:
        p.error(str(exc))
    mb = res.bytes_written / 1e6
    print(f"wrote {res.path} ({mb:,.1f} MB, {res.bytes_uncompressed / 1e6:,.1f} MB uncompressed) in "
          f"{res.seconds:.1f} s\n  sha256 {res.sha256}\nwrote {res.config}\n\nrun the word chain on it:\n"
          f"  GROVE_CONFIGS={res.config.parent} grove run {DATASET}\n"
          f"  GROVE_CONFIGS={res.config.parent} grove query {DATASET} \"chinese river\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
