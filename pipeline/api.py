"""grove inside an application: open the index that serves a dataset and query it.

    from pipeline import open_index

    index = open_index("glove")                    # what serves, under GROVE_ARTIFACTS / luigi.cfg's root
    index = open_index("mnist", root="s3://bucket/grove", version="latest")
    hits = index.query(vector, k=10)               # Neighbors(keys, ids, distances, version)
    hits = index.query_key("test/3", k=5)          # an item's neighbours, itself left out
    hits = index.query_text("chinese river")       # word datasets: a word or a phrase
    index.refresh()                                # follow `grove promote` / `grove rebuild`

Everything comes from the artifacts (the manifests and the index header): the metric, the dimension,
the item keys and the dataset's kind; no dataset config is read. What serves is the evaluate version
the ``<dataset>/serving`` pointer names (``pipeline.layout``), and its split and its forest with the
most trees, as for ``grove query``. The split and the forest are checked with
``artifacts.verify_once`` before they are used; on an object store they are verified copies in this
machine's cache (``pipeline.cache``). Their arrays are memory-mapped: opening is cheap and processes
share the page cache.

A handle is safe to use from many threads. ``refresh()`` reads the pointer it follows and, when it
names another version, opens that one and swaps it in atomically: a query in flight finishes on the
version it started on, and the old version's files are unmapped once no query uses them.

Errors are grove's typed errors, defined in ``pipeline.errors`` and importable from here too:
UnknownDatasetError and UnknownKeyError (the name is not there; ConfigError), NotServingError
(nothing serves the dataset; ArtifactError), QueryError (a bad k, search_k, vector or text;
ConfigError) and IndexMismatchError (a vector of the wrong dimension).

``compiled=False`` (``open_index``, ``Index.from_refs``, or the ``compiled`` attribute) answers with
numpy twins of the compiled kernels (``pipeline._numpy_kernels``): the same ids and distances, bit
for bit, without importing numba. A process that answers one query (``grove query``) starts about
0.5 s of CPU sooner; each query then costs milliseconds instead of tenths of one, so anything that
answers many queries keeps the default.
"""

from __future__ import annotations

import configparser
import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import artifacts, layout
from .errors import (ArtifactError, ConfigError, IndexMismatchError, NotServingError, QueryError,  # noqa: F401
                     UnknownDatasetError, UnknownKeyError)
from .paths import check_name, grove_section, locate_luigi_cfg

log = logging.getLogger(__name__)

WORDS_KIND = "word2vec"  # the dataset kind whose items are words: query_text reads phrases
SERVING = "serving"  # what a handle follows: the dataset's serving pointer...
LATEST = "latest"  # ...or the evaluate stage's latest pointer (a named version follows nothing)


@dataclass(frozen=True, eq=False)
class Neighbors:
    """The nearest base items of one query, nearest first.

    keys: the items' keys (list of str); ids: their row numbers in the index, int64 (k,);
    distances: float32 (k,) as ``pipeline.exact`` defines them, None when not asked for;
    version: the evaluate version that answered (None for an index opened from loose versions).
    Fewer than k entries when the index holds fewer items (or the query's own were left out).
    """

    keys: list[str]
    ids: np.ndarray
    distances: np.ndarray | None
    version: str | None

    def __len__(self) -> int:
        return len(self.keys)

    def to_dict(self) -> dict:
        """Plain JSON-ready values: ``{"keys": [...], "ids": [...], "distances": [...] or None}``."""
        return {"keys": list(self.keys), "ids": [int(i) for i in self.ids],
                "distances": None if self.distances is None else [float(d) for d in self.distances]}


# --- the artifact root when none is given --------------------------------------------------------


def default_root() -> Path | str:
    """The artifact root grove's commands use: GROVE_ARTIFACTS (relative to the working directory),
    else ``[grove] artifacts`` of luigi.cfg (relative to that file's directory), else ``artifacts``
    beside luigi.cfg. For an ``s3://`` root, luigi.cfg's ``[grove] s3_endpoint`` and ``s3_region``
    are applied as the commands apply them (the AWS environment variables win)."""
    from .store import configure_store

    path = locate_luigi_cfg()
    try:
        section = grove_section(path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); fix it or set GROVE_ARTIFACTS") from exc
    env = os.environ.get("GROVE_ARTIFACTS")
    value = env or section.get("artifacts", "").strip() or "artifacts"
    configure_store(section.get("s3_endpoint", ""), section.get("s3_region", ""))
    if "://" in value:
        return artifacts.store_of(value).uri
    root = Path(value).expanduser()
    if root.is_absolute() or env:
        return root
    return (path.parent if path is not None else Path.cwd()) / root


# --- one opened version ---------------------------------------------------------------------------


def _root_text(root: str) -> str:
    store = artifacts.store_of(root)
    return str(Path(root).absolute()) if store.is_local else store.uri


def _dataset_kind(root: str, split_manifest: dict) -> str | None:
    """The dataset's kind (``idx``, ``word2vec``...) as its decode stage recorded it, found through
    the split's ancestry (split -> embed -> decode); None when that cannot be read."""
    from .cache import cached_manifest

    store = artifacts.store_of(root)
    try:
        embed = cached_manifest(store, split_manifest["parents"]["embed"])  # this machine's copy once read
        decode = cached_manifest(store, embed["parents"]["decode"])
        return str(decode["params"]["kind"])
    except (ArtifactError, KeyError, TypeError, ValueError) as exc:
        log.debug("the kind of %s is unknown (%s)", split_manifest.get("dataset"), exc)
        return None


class _Version:
    """The split and forest of one version, memory-mapped; ``users`` counts the queries using it."""

    def __init__(self, dataset: str, version: str | None, split: artifacts.ArtifactRef,
                 forest: artifacts.ArtifactRef):
        from .forest import Forest
        from .vectors import read_vectors

        from .cache import open_version

        # checked (verify_once's stamps; on an object store this machine's copy, without a request when
        # intact): missing or damaged, ArtifactError before any answer
        split_dir, split_manifest = open_version(split.store, split.key)
        forest_dir, _ = open_version(forest.store, forest.key)
        self.dataset, self.version = dataset, version
        self.split_version, self.forest_version = split.version, forest.version
        self.forest = Forest.load(forest_dir / layout.INDEX_DIR)
        self.base = read_vectors(split_dir / layout.BASE)
        self.queries = read_vectors(split_dir / layout.QUERIES)
        if self.base.dim != self.forest.dim or len(self.base) != self.forest.n_items:
            raise ArtifactError(f"{forest.location}: the index holds {self.forest.n_items} vectors of dimension "
                                f"{self.forest.dim}, its split {split.location} {len(self.base)} of dimension "
                                f"{self.base.dim}; they were not built together. Rebuild the forest")
        f = self.forest  # what the handle's properties read: kept after close(), unlike the mapped arrays
        self.metric, self.dim, self.count, self.n_trees = f.metric, f.dim, f.n_items, f.n_trees
        self.kind = _dataset_kind(split.root, split_manifest)
        self.normalized = self.base.meta.get("model") == "normalized"
        self.users = 0
        self.retired = False

    def lookup(self, key: str) -> np.ndarray | None:
        """The vector of item ``key``, float32 (dim,) (a copy), or None when there is none.

        Searches the mapped key columns (about 0.1 ms per 100,000 keys): no dict of every key is
        built, which at 3M keys would cost seconds of one query and hundreds of MB. A base key wins
        over a held-out one."""
        row = self.base.find(key)
        if row is None:
            held_out = self.queries.find(key)
            row = None if held_out is None else -1 - held_out
        if row is None:
            return None
        return np.array(self.base.vectors[row] if row >= 0 else self.queries.vectors[-1 - row], dtype=np.float32)

    def close(self) -> None:
        """Drop every reference into the mapped files, so that they are unmapped."""
        self.forest = self.base = self.queries = None


def _forest_of(root: str, evaluate_manifest: dict) -> artifacts.ArtifactRef:
    """The forest with the most trees among an evaluation's parents (``forest_<n_trees>``)."""
    forests = {name: key for name, key in evaluate_manifest["parents"].items() if name.startswith("forest_")}
    if not forests:
        raise ArtifactError(f"{evaluate_manifest.get('dataset')}/{layout.SERVED_STAGE}/"
                            f"{evaluate_manifest.get('version')}: its manifest names no forest; rebuild it")
    best = max(forests, key=lambda name: int(name.split("_")[1]))
    return artifacts.ref_from_key(root, forests[best])


def _open_evaluation(root: str, dataset: str, version: str, serving: bool) -> _Version:
    from .cache import cached_manifest

    ref = artifacts.ref_from_key(root, layout.version_key(dataset, layout.SERVED_STAGE, version))
    try:
        manifest = cached_manifest(ref.store, ref.key)  # a published version does not change: read once per machine
    except ArtifactError:
        if serving:
            raise ArtifactError(f"{dataset}: the serving version {layout.serving_target(version)} is missing under "
                                f"the artifact root {_root_text(root)} (removed as damaged, or deleted); run `grove "
                                f"run {dataset} --rebuild` to build it again, or `grove rollback {dataset}`")
        raise ArtifactError(f"{dataset}: no version {layout.serving_target(version)} under the artifact root "
                            f"{_root_text(root)}; `grove versions {dataset} evaluate` lists them")
    split = artifacts.ref_from_key(root, manifest["parents"]["split"])
    return _Version(dataset, version, split, _forest_of(root, manifest))


# --- the handle -----------------------------------------------------------------------------------


def open_index(dataset: str, root: str | os.PathLike | None = None, version: str | None = None, *,
               compiled: bool = True) -> "Index":
    """Open what serves ``dataset`` under the artifact ``root`` (default: ``default_root()``).

    ``version``: None for the serving version (``refresh()`` follows promotions), ``"latest"`` for
    the newest evaluation (``refresh()`` follows new builds), or an evaluate version ``v2-...``
    (fixed). ``compiled``: see the module's docstring (the handle's ``compiled`` attribute).
    Raises UnknownDatasetError, NotServingError, or ArtifactError for a missing or damaged
    version (``grove run DATASET --rebuild`` repairs it); StoreError when the root cannot be read.
    """
    if not isinstance(dataset, str) or not dataset:
        raise UnknownDatasetError(f"dataset must be a non-empty name, got {dataset!r}")
    try:
        check_name(dataset)
    except ConfigError as exc:
        raise UnknownDatasetError(str(exc)) from None
    root = str(default_root() if root is None else root)
    if version in (None, SERVING):
        follow = SERVING
    elif version == LATEST:
        follow = LATEST
    elif isinstance(version, str) and layout.is_version(version):
        follow = None
    else:
        raise QueryError(f"version {version!r} is not an evaluate version (v<FORMAT>-<digest>), 'latest' or None "
                         "(what serves); `grove versions DATASET evaluate` lists them")
    index = Index(root, dataset, follow, compiled=compiled)
    target = index._read_pointer() if follow else version
    if target is None:
        raise index._nothing_there()
    index._install(_open_evaluation(root, dataset, target, serving=follow == SERVING), target)
    return index


class Index:
    """A dataset's index, opened by ``open_index`` (or ``Index.from_refs``). Thread-safe."""

    def __init__(self, root: str, dataset: str, follow: str | None, compiled: bool = True):
        self._root, self._dataset, self._follow = root, dataset, follow
        # numba's compiled kernels (True), or their numpy twins: the same answers without numba
        self.compiled = bool(compiled)
        self._lock = threading.Lock()  # guards _current, the users counts and _mapped
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._current: _Version | None = None
        self._pointer: str | None = None
        self._mapped: set[int] = set()  # ids of the versions whose files this handle still maps
        self._closed = False
        self.swaps = 0  # versions swapped in by refresh()
        self.released = 0  # versions whose files were let go since (unmapped once no one holds them)

    @classmethod
    def from_refs(cls, split: artifacts.ArtifactRef, forest: artifacts.ArtifactRef, *,
                  compiled: bool = True) -> "Index":
        """An index over one split version and one forest version (what ``grove query`` reads when
        nothing serves): verified like any other; ``version`` is None and ``refresh()`` follows nothing."""
        index = cls(split.root, split.dataset, None, compiled=compiled)
        index._install(_Version(split.dataset, None, split, forest), None)
        return index

    # --- what it is ---------------------------------------------------------------------------

    def _peek(self) -> _Version:
        current = self._current
        if current is None:
            raise ArtifactError(f"{self._dataset}: this index was closed; open it again with open_index()")
        return current

    dataset = property(lambda self: self._dataset, doc="The dataset's name (str).")
    root = property(lambda self: self._root, doc="The artifact root (a path or an s3:// URI, str).")
    follows = property(lambda self: self._follow, doc="'serving', 'latest' or None: what refresh() follows.")
    version = property(lambda self: self._peek().version,
                       doc="The evaluate version answering now (str; None when opened with from_refs).")
    forest_version = property(lambda self: self._peek().forest_version, doc="The forest version answering now.")
    split_version = property(lambda self: self._peek().split_version, doc="The split version answering now.")
    metric = property(lambda self: self._peek().metric,
                      doc="'euclidean', 'angular', 'manhattan' or 'dot' (from the index header).")
    dim = property(lambda self: self._peek().dim, doc="The vectors' dimension (int).")
    count = property(lambda self: self._peek().count, doc="How many items the index holds (int).")
    n_trees = property(lambda self: self._peek().n_trees, doc="The forest's number of trees (int).")
    kind = property(lambda self: self._peek().kind,
                    doc="The dataset's kind as its decode stage recorded it ('idx', 'word2vec'...; None if unknown).")

    def __len__(self) -> int:
        return self.count

    def __contains__(self, key: object) -> bool:
        """Whether an item (indexed or held out) has the key ``key`` (``key in index``)."""
        if not isinstance(key, str):
            return False
        with self._use() as v:
            return v.base.find(key) is not None or v.queries.find(key) is not None

    def __repr__(self) -> str:
        if self._current is None:
            return f"Index({self._dataset!r}, closed)"
        return (f"Index({self._dataset!r}, version={self.version!r}, metric={self.metric!r}, dim={self.dim}, "
                f"count={self.count}, n_trees={self.n_trees})")

    def keys(self) -> list[str]:
        """The items' keys, in id order (a new list of ``count`` str)."""
        with self._use() as v:
            return list(v.base.keys)

    def labels(self) -> np.ndarray:
        """The items' labels, int32 (count,), -1 where an item has none (a copy)."""
        with self._use() as v:
            return np.array(v.base.labels, dtype=np.int32)

    def held_out_keys(self) -> list[str]:
        """The keys of the split's held-out query items (not in the index; ``query_key`` takes them)."""
        with self._use() as v:
            return list(v.queries.keys)

    def vector(self, key: str) -> np.ndarray:
        """The vector of item ``key`` (an indexed or a held-out item), float32 (dim,), a copy."""
        with self._use() as v:
            return self._vector_of(v, key)

    @property
    def mapped_versions(self) -> int:
        """How many versions this handle still maps: 1, or 2 while queries finish on a replaced one."""
        with self._lock:
            return len(self._mapped)

    # --- queries --------------------------------------------------------------------------------

    def query(self, vector: Sequence[float] | np.ndarray, k: int = 10, search_k: int | None = None,
              distances: bool = True, exclude: Iterable[str] = (), exact: bool = False) -> Neighbors:
        """The k nearest items of ``vector`` (dim,). ``search_k`` (default k * n_trees) is how many
        leaf entries the forest inspects; ``exact=True`` searches every item instead (slow; the
        truth to compare with). ``exclude``: keys to leave out of the answer."""
        k, search_k = _check_k(k, search_k)
        exclude = set(exclude)
        with self._use() as v:
            q = _check_vector(vector, v.forest.dim)
            return self._search(v, q, k, search_k, distances, exclude, exact)

    def query_batch(self, vectors: Sequence[Sequence[float]] | np.ndarray, k: int = 10, search_k: int | None = None,
                    distances: bool = True, exact: bool = False, n_threads: int = 1) -> list[Neighbors]:
        """``query`` for each row of ``vectors`` (n, dim), all answered by one version. ``n_threads``:
        1 answers the rows one by one in this thread (the right choice under concurrent callers);
        0 (all cores) or more runs the forest's parallel batch kernel (same answers; with
        ``compiled=False`` the rows are answered one by one)."""
        k, search_k = _check_k(k, search_k)
        with self._use() as v:
            q = _check_vectors(vectors, v.forest.dim)
            if len(q) == 0:
                return []
            if exact and self.compiled:
                from .exact import exact_neighbors

                ids, dists = exact_neighbors(v.base.vectors, q, k, v.forest.metric, base_normalized=v.normalized)
            elif not exact and self.compiled and n_threads != 1:
                ids, dists = v.forest.query_batch(q, k=k, search_k=search_k, n_threads=n_threads,
                                                  include_distances=True)
            else:  # row by row: in this thread, or with the numpy twins
                pairs = [_exact_one(v, row, k, False) if exact else
                         v.forest.query(row, k=k, search_k=search_k, include_distances=True, compiled=self.compiled)
                         for row in q]
                ids, dists = [p[0] for p in pairs], [p[1] for p in pairs]
            return [_answer(v, i, d, k, set(), distances) for i, d in zip(ids, dists)]

    def query_key(self, key: str, k: int = 10, search_k: int | None = None, distances: bool = True,
                  exact: bool = False) -> Neighbors:
        """The k nearest items of item ``key`` (an indexed or a held-out item), itself left out."""
        k, search_k = _check_k(k, search_k)
        with self._use() as v:
            return self._search(v, self._vector_of(v, key), k, search_k, distances, {key}, exact)

    def query_text(self, text: str, k: int = 10, search_k: int | None = None, distances: bool = True,
                   exact: bool = False) -> Neighbors:
        """Word datasets: the k nearest words of a word or a phrase (see ``text_vector``), its own
        words left out of the answer (as ``grove query`` does)."""
        k, search_k = _check_k(k, search_k)
        with self._use() as v:
            q, exclude = self._text_vector(v, text)
            return self._search(v, q, k, search_k, distances, exclude, exact)

    def text_vector(self, text: str) -> tuple[np.ndarray, set[str]]:
        """Word datasets: the vector a word or a phrase stands for, float32 (dim,), and the words to
        leave out of its answer. Each whitespace-separated word is looked up as given, then
        lower-cased; a phrase is the normalised sum of its words' vectors ("chinese river")."""
        with self._use() as v:
            return self._text_vector(v, text)

    def _text_vector(self, v: _Version, text: str) -> tuple[np.ndarray, set[str]]:
        if not isinstance(text, str):
            raise QueryError(f"text must be a string, got {type(text).__name__}")
        if v.kind != WORDS_KIND:
            raise QueryError(f"{self._dataset} is not a word dataset (kind {v.kind or 'unknown'}); query it by "
                             "key or by vector")
        if self.compiled:
            from .exact import normalize_rows
        else:
            from ._numpy_kernels import normalize_rows

        words, missing = [], []
        for word in text.split():
            vec = v.lookup(word)
            vec = vec if vec is not None else v.lookup(word.lower())
            (missing.append(word) if vec is None else words.append(vec))
        if missing or not words:
            raise UnknownKeyError(f"not in the vocabulary: {', '.join(missing) or repr(text)}; try other words")
        q = normalize_rows(np.sum(words, axis=0, keepdims=True))[0]
        return q, set(text.split()) | {w.lower() for w in text.split()}

    def _vector_of(self, v: _Version, key: str) -> np.ndarray:
        if not isinstance(key, str):
            raise QueryError(f"key must be a string, got {type(key).__name__}")
        vec = v.lookup(key)
        if vec is None:
            examples = " or ".join(repr(t.keys[0]) for t in (v.base, v.queries) if len(t))
            raise UnknownKeyError(f"{self._dataset}: no item with key {key!r}" +
                                  (f"; keys look like {examples}" if examples else ""))
        return vec

    def _search(self, v: _Version, q: np.ndarray, k: int, search_k: int | None, distances: bool,
                exclude: set[str], exact: bool) -> Neighbors:
        extra = k + len(exclude)
        if exact:
            ids, dists = _exact_one(v, q, extra, self.compiled)
        else:
            ids, dists = v.forest.query(q, k=extra, search_k=search_k, include_distances=True, compiled=self.compiled)
        return _answer(v, ids, dists, k, exclude, distances)

    # --- following promotions -------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read the pointer this handle follows; when it names another version, open that one
        (verified) and swap it in. Returns whether the version changed. Cheap when nothing changed
        (one pointer read). Queries in flight finish on the old version, whose files are unmapped
        once the last of them is done. On any error the current version keeps answering and the
        error is raised (NotServingError when the pointer was removed)."""
        if self._follow is None:
            return False
        with self._refresh_lock:
            if self._closed:
                raise ArtifactError(f"{self._dataset}: this index was closed; open it again with open_index()")
            target = self._read_pointer()
            if target == self._pointer:
                return False
            if target is None:
                raise self._nothing_there()
            new = _open_evaluation(self._root, self._dataset, target, serving=self._follow == SERVING)
            old = self._install(new, target)
            log.info("%s: now answering from %s (was %s)", self._dataset, target, old.version if old else None)
            return True

    def pointer(self) -> str | None:
        """The version the followed pointer names now (one read; None when it names none); for a
        handle that follows nothing, the version it answers from."""
        if self._follow is None:
            return self._pointer
        return self._read_pointer()

    def close(self) -> None:
        """Let go of the files (after the queries in flight); later queries raise ArtifactError."""
        with self._refresh_lock:
            self._closed = True
            self._install(None, None)

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------

    def _read_pointer(self) -> str | None:
        store = artifacts.store_of(self._root)
        if self._follow == SERVING:
            return layout.served_version(store.get_pointer(layout.dataset_key(self._dataset), layout.SERVING))
        return store.get_pointer(layout.stage_key(self._dataset, layout.SERVED_STAGE), layout.LATEST)

    def _nothing_there(self) -> Exception:
        store = artifacts.store_of(self._root)
        where = _root_text(self._root)
        if not store.list(layout.dataset_key(self._dataset)):
            present = [name for name in store.list("") if layout.is_dataset(name)]
            return UnknownDatasetError(f"no dataset {self._dataset!r} under the artifact root {where}" + (
                f"; it holds {', '.join(present)}" if present else "; it holds none (`grove run DATASET` builds one)"))
        if self._follow == LATEST:
            return NotServingError(f"{self._dataset}: no evaluation is built under the artifact root {where}; "
                                   f"`grove run {self._dataset}` builds one")
        return NotServingError(f"{self._dataset}: nothing is serving yet under the artifact root {where}; run "
                               f"`grove rebuild` or `grove promote {self._dataset} VERSION` (or open a version: "
                               "open_index(dataset, version='latest'))")

    def _install(self, new: _Version | None, pointer: str | None) -> _Version | None:
        """Make ``new`` the answering version; the old one is closed now or by its last query."""
        with self._lock:
            old, self._current, self._pointer = self._current, new, pointer
            if new is not None:
                self._mapped.add(id(new))
            if old is not None:
                old.retired = True
                if new is not None:
                    self.swaps += 1
                close_now = old.users == 0
        if old is not None and close_now:
            self._release(old)
        return old

    def _release(self, v: _Version) -> None:
        with self._lock:
            if id(v) not in self._mapped:
                return
            self._mapped.discard(id(v))
            self.released += 1
        v.close()
        log.debug("%s: released %s (forest %s)", self._dataset, v.version, v.forest_version)

    @contextlib.contextmanager
    def _use(self) -> Iterator[_Version]:
        with self._lock:
            v = self._current
            if v is None:
                raise ArtifactError(f"{self._dataset}: this index was closed; open it again with open_index()")
            v.users += 1
        try:
            yield v
        finally:
            with self._lock:
                v.users -= 1
                last = v.retired and v.users == 0
            if last:
                self._release(v)


# --- checks and answers ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_k(k, search_k) -> tuple[int, int | None]:
    if not _is_int(k) or k < 1:
        raise QueryError(f"k must be an integer >= 1, got {k!r}")
    if search_k is not None and (not _is_int(search_k) or search_k < 0):
        raise QueryError(f"search_k must be an integer >= 0, or None for k * n_trees; got {search_k!r}")
    return int(k), None if search_k is None else int(search_k)


def _as_float32(values, what: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise QueryError(f"{what} must hold numbers only, each within float32's range ({exc})") from None


def _check_finite(q: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(q)
    if bad.any():
        where = np.argwhere(bad)[0]
        value = "NaN" if np.isnan(q[tuple(where)]) else "infinity (or a value beyond float32)"
        raise QueryError(f"{what} holds {value} at {'/'.join(map(str, where))}; every value must be a finite number")


def _check_vector(vector, dim: int) -> np.ndarray:
    q = _as_float32(vector, "a query vector")
    if q.shape != (dim,):
        raise IndexMismatchError(f"a query vector must have dimension {dim}, got shape {q.shape}")
    _check_finite(q, "the query vector")
    return q


def _check_vectors(vectors, dim: int) -> np.ndarray:
    q = _as_float32(vectors, "query vectors")
    if q.ndim == 2 and q.shape[0] == 0:
        return q.reshape(0, dim)
    if q.ndim != 2 or q.shape[1] != dim:
        raise IndexMismatchError(f"query vectors must have shape (n, {dim}), got {q.shape}")
    _check_finite(q, "the query vectors")
    return np.ascontiguousarray(q)


def _exact_one(v: _Version, q: np.ndarray, k: int, compiled: bool) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest of q (dim,): (ids (k,) int64, dists (k,) float32), from
    ``exact.exact_neighbors`` or, not compiled, its numpy twin for one query (the same answer)."""
    if compiled:
        from .exact import exact_neighbors

        ids, dists = exact_neighbors(v.base.vectors, q[None, :], k, v.forest.metric, base_normalized=v.normalized)
        return ids[0], dists[0]
    from ._numpy_kernels import exact_neighbors_one

    return exact_neighbors_one(v.base.vectors, q, k, v.forest.metric, base_normalized=v.normalized)


def _answer(v: _Version, ids: np.ndarray, dists: np.ndarray, k: int, exclude: set[str],
            distances: bool) -> Neighbors:
    n = len(v.base)
    kept = []  # (id, key, distance), the k nearest whose key is not excluded
    for i, d in zip(ids, dists):
        if len(kept) == k:
            break
        if 0 <= i < n and (key := v.base.key_of(int(i))) not in exclude:
            kept.append((int(i), key, float(d)))
    return Neighbors(keys=[key for _, key, _ in kept], ids=np.array([i for i, _, _ in kept], dtype=np.int64),
                     distances=np.array([d for _, _, d in kept], dtype=np.float32) if distances else None,
                     version=v.version)
