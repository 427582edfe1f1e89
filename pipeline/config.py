"""Dataset configs: one TOML file per dataset, validated before any work starts.

A config says what a dataset is (its sources with checksums) and every hyperparameter of every
stage. Users add a dataset by adding a file to ``configs/`` or to a directory of their own named by
``GROVE_CONFIGS`` (several directories separated by ``os.pathsep``; earlier ones win).

Validation is strict: an unknown section or key, a value of the wrong type or out of its range (every
number has a rule in ``_RULES``), a source without a checksum, a malformed checksum, a URL with an
unsupported scheme or a ``filename`` that is not a plain file name is a ``ConfigError`` naming the file,
the key, the value given and what is allowed, raised before anything is downloaded. Dataset names (and
so config file names) are limited to ``paths.NAME_RULE``. ``check_sources_reachable`` and
``check_mirror`` check what needs the run's settings (the mirror) before any work starts.

A source the publisher updates in place is marked ``mutable = true`` instead of pinning a checksum:
each dated run downloads it again into a snapshot that records the sha256 it saw, and
``apply_pins`` fills those digests in, so the chain below it is rebuilt only when the bytes changed.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .download import SCHEMES
from .errors import ConfigError
from .exact import METRICS
from .paths import NAME_RULE, check_filename, check_name, is_safe_name

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGEST_LENGTH = {"sha256": 64, "md5": 32}
_HEX_DIGESTS = {name: re.compile(f"[0-9a-fA-F]{{{n}}}") for name, n in _DIGEST_LENGTH.items()}
URL_FORMS = "https://<host>/..., http://<host>/..., file:///<absolute path>, package://<distribution>/<file>"
MIRROR_SETTING = "GROVE_MIRROR or luigi.cfg [grove] mirror"

KINDS = ("idx", "word2vec", "food101", "vectors")
_REQUIRED = MISSING


def key(default: Any = MISSING, doc: str = "", *, rule: Callable[[Any], bool] | None = None, allowed: str = "",
        choices: tuple[str, ...] | None = None) -> Any:
    """One config key: its default (none: required), what it means, and what values it takes.

    ``rule(value) -> bool`` with ``allowed`` (the words an error uses) limits a number (each item of
    a list); ``choices`` limits a string. Floats must also be finite, whatever their rule.
    """
    meta = {"doc": doc, "rule": rule, "allowed": allowed, "choices": choices}
    return field(default=default, metadata=meta)


def _at_least(low: float) -> dict:
    return {"rule": lambda v: v >= low, "allowed": f"a number >= {low}"}


class Section:
    """A table of a config file; subclasses are frozen dataclasses whose fields are the table's keys."""

    def as_dict(self) -> dict[str, Any]:
        """The keys and values as plain JSON types (lists, not tuples): what a digest hashes."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def __getitem__(self, name: str) -> Any:  # cfg.embed["metric"]: for code that picks a key by name
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class DatasetSection(Section):
    name: str = key(doc="the dataset's name; must equal the file name without .toml")
    kind: str = key(doc="what the sources hold and so how [decode] reads them", choices=KINDS)
    description: str = key("", "one line shown by `grove datasets`")
    mirror_subdir: str | None = key(None, "the folder of a mirror (GROVE_MIRROR) holding the files (default: the name)")


@dataclass(frozen=True, kw_only=True)
class Source(Section):
    filename: str = key(doc="the local file name (a plain name: no /, \\ or ..)")
    urls: tuple[str, ...] = key((), "where to download it, tried in order after the mirror (https, http, file, "
                                     "package); [] when only a mirror has it")
    sha256: str | None = key(None, "the file's sha256 (64 hex characters)")
    md5: str | None = key(None, "the file's md5 where that is what the publisher gives (32 hex characters)")
    mutable: bool = key(False, "the publisher updates the file in place: no checksum; each dated run downloads it "
                               "and pins the sha256 it saw")


@dataclass(frozen=True, kw_only=True)
class IdxDecode(Section):
    # Both train sources may be left out: the test files are then the whole dataset (a holdout split).
    train_images: str | None = key(None, "source with the training images (IDX)")
    train_labels: str | None = key(None, "source with the training labels (IDX)")
    test_images: str = key(doc="source with the test images (IDX)")
    test_labels: str = key(doc="source with the test labels (IDX)")


@dataclass(frozen=True, kw_only=True)
class Word2vecDecode(Section):
    vectors: str = key(doc="source with the vectors")
    words: str | None = key(None, "source with the words, for the npy format (a Parquet table)")
    format: str = key("auto", "the vectors' format; auto detects binary or text",
                      choices=("auto", "binary", "text", "npy"))
    words_column: str | None = key(None, "the column of the words table holding the words (npy format)")
    limit: int = key(0, "read at most this many words, the first ones (0 = all)",
                     rule=lambda v: v >= 0, allowed="a number >= 0 (0 = every word)")


@dataclass(frozen=True, kw_only=True)
class Food101Decode(Section):
    archive: str = key(doc="source with the tar archive in Food-101's layout")
    classes: tuple[str, ...] = key((), "a subset of meta/classes.txt ([] = every class)")
    image_size: int = key(128, "photos are resized (shorter side) and centre-cropped to this many pixels",
                          rule=lambda v: 8 <= v <= 1024, allowed="8..1024 pixels")


@dataclass(frozen=True, kw_only=True)
class VectorsDecode(Section):
    """Your own vectors: a Parquet or Arrow IPC file with a key column and a vector column (and an
    optional label column), or a ``.npy`` matrix beside an ids file. The format is read from the
    file's first bytes; a source whose filename ends in ``.npy`` is a NumPy matrix and needs ``ids``."""

    vectors: str = key(doc="source with the vectors: a Parquet or Arrow IPC file, or a .npy (n, dim) float "
                           "matrix (its filename ends in .npy; then ids is required)")
    ids: str | None = key(None, "source with the keys of a .npy vectors source, row by row: a UTF-8 text file "
                                "with one key per line, or a Parquet/Arrow table with one column (or key_column, "
                                "and label_column)")
    queries: str | None = key(None, "source with your own query vectors, in the same form as vectors (unset: "
                                    "queries are held out of the vectors, split.method = \"holdout\")")
    query_ids: str | None = key(None, "source with the keys of a .npy queries source (as ids)")
    key_column: str = key("key", "the column with each item's key: integers or strings, stored as strings; "
                                 "unique across vectors and queries")
    vector_column: str = key("vector", "the column with the vectors: a list or fixed-size list of numbers "
                                       "(float16/32/64 or integers), one length; read as float32")
    label_column: str | None = key(None, "an optional column of labels: integers >= 0, or strings (numbered in "
                                         "sorted order, listed as `classes` in the metadata); null = no label")


@dataclass(frozen=True, kw_only=True)
class Embed(Section):
    model: str = key("pixels", "how items become vectors: raw pixels, the vectors as given (raw: a vectors "
                               "dataset), vectors scaled to unit length, or the CNN of [train]",
                     choices=("pixels", "raw", "normalized", "cnn"))
    metric: str = key("euclidean", "the distance the index and the ground truth use", choices=METRICS)
    scale: float = key(1.0, "vectors are multiplied by this", rule=lambda v: v > 0, allowed="a finite number > 0")


@dataclass(frozen=True, kw_only=True)
class Train(Section):
    """The CNN of embed.model = "cnn": a bottleneck layer before a softmax over the labels."""

    backbone: str = key("small", "small (trained from scratch) or a frozen pretrained backbone with a trained head",
                        choices=("small", "efficientnet_lite0", "resnet18", "mobilenet_v3_small"))
    weights_path: str = key("", "a local weights file for resnet18 / mobilenet_v3_small")
    bottleneck: int = key(128, "width of the embedding layer", **_at_least(1))
    epochs: int = key(2, "training epochs", **_at_least(1))
    batch_size: int = key(128, "training batch size", **_at_least(1))
    lr: float = key(2e-3, "learning rate", rule=lambda v: v > 0, allowed="a finite number > 0")
    dropout: float = key(0.2, "dropout before the bottleneck", rule=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")
    weight_decay: float = key(1e-4, "weight decay", **_at_least(0))
    input_size: int = key(0, "input pixels (0 = the images' own size, or the backbone's default)",
                          rule=lambda v: v == 0 or 8 <= v <= 1024,
                          allowed="0 (the images' own size or the backbone's default) or 8..1024 pixels")
    seed: int = key(0, "model initialisation, shuffling and augmentation", **_at_least(0))
    # Part of the digest (unlike GROVE_THREADS, which never changes a byte): torch splits work and
    # sums per thread, so another count gives other weights and vectors.
    threads: int = key(2, "torch threads for features, training and the CNN embedding (changes the bytes, so it is "
                          "part of the digest)", **_at_least(1))


@dataclass(frozen=True, kw_only=True)
class Split(Section):
    method: str = key("column", "column: queries are the rows the source marks test; holdout: rows held out of the "
                                "base", choices=("column", "holdout"))
    n_queries: int = key(0, "column: how many test rows to keep (0 = all); holdout: how many rows to hold out (>= 1)",
                         rule=lambda v: v >= 0, allowed="a number >= 0 (0 = every test row of a column split)")
    seed: int = key(0, "which rows are kept or held out", **_at_least(0))


@dataclass(frozen=True, kw_only=True)
class Exact(Section):
    k: int = key(100, "ground-truth depth: neighbours found by exhaustive search per query (>= evaluate.k)",
                 **_at_least(1))


@dataclass(frozen=True, kw_only=True)
class ForestSection(Section):
    n_trees: tuple[int, ...] = key((10, 50), "one index per value (each >= 1, no repeats)", **_at_least(1))
    leaf_size: int = key(0, "most items a leaf holds (0 = the index's default, from the dimension)",
                         rule=lambda v: v >= 0, allowed="a number >= 1, or 0 for the index's default")
    seed: int = key(0, "the seed of the trees' random splits", **_at_least(0))


@dataclass(frozen=True, kw_only=True)
class Evaluate(Section):
    k: int = key(10, "recall@k is measured at this k", **_at_least(1))
    search_k: tuple[int, ...] = key((100, 1000, 10000), "candidates a query inspects, one sweep point each (each >= "
                                                        "1, or -1 for the index's default k * n_trees; no repeats)",
                                    rule=lambda v: v == -1 or v >= 1,
                                    allowed=">= 1, or -1 for the index's default (k * n_trees)")
    n_queries: int = key(1000, "queries timed one at a time per search_k (0 = all of them)",
                         rule=lambda v: v >= 0, allowed="a number >= 0 (0 = every query)")


@dataclass(frozen=True, kw_only=True)
class Gate(Section):
    """An evaluated index is promoted to serving only if it meets these (0 = no requirement)."""

    min_recall: float = key(0.0, "least recall@k", rule=lambda v: 0 <= v <= 1,
                            allowed="a number in [0, 1] (0 = no requirement)")
    min_qps: float = key(0.0, "least queries per second", rule=lambda v: v >= 0,
                         allowed="a number >= 0 (0 = no requirement)")
    n_trees: int = key(0, "which index the gate judges (0 = the one with most trees)", rule=lambda v: v >= 0,
                       allowed="0 (the index with most trees) or one of forest.n_trees")
    search_k: int = key(0, "at which search_k (0 = the largest evaluated)", rule=lambda v: v >= -1,
                        allowed="0 (the largest evaluated) or one of evaluate.search_k")


# The tables of a config file, in the order a reference lists them. [decode] depends on the kind.
SECTIONS: dict[str, type[Section]] = {
    "dataset": DatasetSection, "embed": Embed, "train": Train, "split": Split, "exact": Exact,
    "forest": ForestSection, "evaluate": Evaluate, "gate": Gate,
}
DECODE_SECTIONS: dict[str, type[Section]] = {"idx": IdxDecode, "word2vec": Word2vecDecode, "food101": Food101Decode,
                                             "vectors": VectorsDecode}
_SOURCE_REFS = {"idx": ("train_images", "train_labels", "test_images", "test_labels"),
                "word2vec": ("vectors", "words"), "food101": ("archive",),
                "vectors": ("vectors", "ids", "queries", "query_ids")}


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """A dataset's validated config: every table typed, every default filled in, checked once.

    Immutable: a changed value (``with_values``) or a pinned mutable source (``with_pins``) is a new
    object, validated again. ``path`` is the file it came from (errors name it).
    """

    path: str
    dataset: DatasetSection
    sources: Mapping[str, Source]
    decode: Section
    embed: Embed
    train: Train
    split: Split
    exact: Exact
    forest: ForestSection
    evaluate: Evaluate
    gate: Gate
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)  # the TOML document as read

    @property
    def name(self) -> str:
        return self.dataset.name

    def __deepcopy__(self, memo: dict) -> "DatasetConfig":
        return self  # immutable: a copy is the object itself

    @property
    def kind(self) -> str:
        return self.dataset.kind

    def with_values(self, changes: Mapping[str, Any]) -> "DatasetConfig":
        """This config with ``{"section.key": value}`` changed (None: the key left out, so its default
        applies), validated as if the file said so. Pins (``apply_pins``) are not carried over."""
        raw = copy.deepcopy(dict(self.raw))
        for dotted, value in changes.items():
            *tables, name = dotted.split(".")
            table = raw
            for part in tables:
                table = table.setdefault(part, {})
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        return validate(raw, Path(self.path))


def config_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    """Where configs are looked up, first match wins: ``extra``, ``GROVE_CONFIGS``, the packaged ones."""
    dirs: list[Path] = []
    if extra:
        dirs.append(Path(extra))
    for part in os.environ.get("GROVE_CONFIGS", "").split(os.pathsep):
        if part:
            dirs.append(Path(part))
    dirs.append(PACKAGED_CONFIGS)
    return dirs


def available_datasets(extra: str | os.PathLike | None = None) -> list[str]:
    """Names of the configs in ``config_dirs(extra)``; a ``*.toml`` whose stem is not a safe name is ignored."""
    names = set()
    for d in config_dirs(extra):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml") if is_safe_name(p.stem))
    return sorted(names)


def find_config(dataset: str, extra: str | os.PathLike | None = None) -> Path:
    """The config file of ``dataset``; a name outside ``paths.NAME_RULE`` is refused before any lookup."""
    check_name(dataset)
    for d in config_dirs(extra):
        candidate = d / f"{dataset}.toml"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in config_dirs(extra))
    known = ", ".join(available_datasets(extra)) or "none"
    raise ConfigError(
        f"unknown dataset {dataset!r}: no {dataset}.toml in {searched}; known datasets: {known}. "
        "Add a config file or set GROVE_CONFIGS to a directory that has one."
    )


def _expected(hint: Any) -> Any:
    """The type a key takes, from its annotation: a type, or ("list", item type) for a tuple[T, ...]."""
    if typing.get_origin(hint) is tuple:
        return ("list", typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | None: None only as a default
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


@functools.cache
def key_specs(cls: type[Section]) -> dict[str, tuple[Any, Any, dict]]:
    """``{key: (expected type, default or MISSING, metadata)}`` of a section class, in file order."""
    hints = typing.get_type_hints(cls)
    return {f.name: (_expected(hints[f.name]), f.default, dict(f.metadata)) for f in fields(cls)}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple) and t and t[0] == "list":
        return f"a list of {t[1].__name__}"
    return t.__name__


def _check_value(path: Path, key: str, value: Any, expected: Any) -> Any:
    if isinstance(expected, tuple) and expected and expected[0] == "list":
        item_type = expected[1]
        if not isinstance(value, list) or not all(_is_type(v, item_type) for v in value):
            raise ConfigError(f"{path}: key {key} must be {_type_name(expected)}, got {value!r}")
        return tuple(_coerce(v, item_type) for v in value)
    if not _is_type(value, expected):
        raise ConfigError(
            f"{path}: key {key} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )
    return _coerce(value, expected)


def _is_type(value: Any, expected: type) -> bool:
    if isinstance(value, bool):  # TOML booleans are not numbers
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _coerce(value: Any, expected: type) -> Any:
    return float(value) if expected is float else value


def _fill_section(path: Path, section: str, raw: Any, cls: type[Section], **override: Any) -> Any:
    """The table ``raw`` of ``section`` checked key by key and typed as ``cls`` (defaults filled in)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{section}] must be a table, got {type(raw).__name__}")
    specs = key_specs(cls)
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {section}.{unknown[0]}; known keys of [{section}]: {', '.join(sorted(specs))}"
        )
    out = {}
    for key, (expected, default, meta) in specs.items():
        if key in raw:
            out[key] = _check_value(path, f"{section}.{key}", raw[key], expected)
        elif default is MISSING:
            raise ConfigError(f"{path}: missing required key {section}.{key}")
        else:
            out[key] = default
        if meta["choices"] and out[key] not in meta["choices"]:
            raise ConfigError(f"{path}: {section}.{key} = {out[key]!r} is not one of {', '.join(meta['choices'])}")
        if key in raw:
            _check_range(path, section, key, out[key], expected, meta)
    out.update(override)
    return cls(**out)


def _check_range(path: Path, section: str, key: str, value: Any, expected: Any, meta: dict) -> None:
    """ConfigError unless ``value`` (or each item of a list) keeps the rule of ``section.key``."""
    is_list = isinstance(expected, tuple) and expected and expected[0] == "list"
    item_type = expected[1] if is_list else expected
    rule = meta["rule"]
    if item_type is not float and rule is None:
        return
    shown = list(value) if is_list else value
    for item in value if is_list else [value]:
        if item_type is float and not math.isfinite(item):
            allowed = meta["allowed"] if rule else "a finite number"
            raise ConfigError(f"{path}: {section}.{key} = {shown!r} is not allowed: it must be {allowed}, "
                              "not nan or infinity")
        if rule is not None and not rule(item):
            if is_list:
                raise ConfigError(f"{path}: {section}.{key} = {shown!r} is not allowed: it has {item!r}, "
                                  f"and each value must be {meta['allowed']}")
            raise ConfigError(f"{path}: {section}.{key} = {shown!r} is not allowed: it must be {meta['allowed']}")


def _check_unique(path: Path, key: str, values: tuple) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ConfigError(f"{path}: {key} = {list(values)!r} repeats {', '.join(map(repr, repeated))}: "
                          "list each value once")


def _check_source(path: Path, name: str, raw: Any) -> Source:
    """``sources.<name>`` typed, with its file name, checksums (lower-cased) and URLs checked."""
    key = f"sources.{name}"
    entry = _fill_section(path, key, raw, Source)
    check_filename(entry.filename, f"{path}: {key}.filename")
    digests = {}
    for algorithm, pattern in _HEX_DIGESTS.items():
        digest = getattr(entry, algorithm)
        if digest is None:
            continue
        if not pattern.fullmatch(digest):
            n = _DIGEST_LENGTH[algorithm]
            why = f"it has {len(digest)} characters" if len(digest) != n else "it has characters other than 0-9, a-f"
            raise ConfigError(f"{path}: {key}.{algorithm} = {digest!r} is not a valid {algorithm} digest: {why}; it must be "
                              f"exactly {n} hexadecimal characters (0-9, a-f, either case)")
        digests[algorithm] = digest.lower()
    for url in entry.urls:
        problem = url_problem(url)
        if problem:
            raise ConfigError(f"{path}: {key}.urls has {url!r}: {problem}. Allowed: {URL_FORMS}")
    _check_unique(path, f"{key}.urls", entry.urls)
    pinned = entry.sha256 or entry.md5
    if entry.mutable and pinned:
        raise ConfigError(
            f"{path}: {key} is mutable = true but also pins a checksum: a mutable source's sha256 "
            "is read from each dated download; remove the checksum or the mutable key"
        )
    if not entry.mutable and not pinned:
        raise ConfigError(
            f"{path}: {key} has no checksum: add sha256 (or md5 where that is what the publisher "
            "gives), or set mutable = true if the publisher updates the file in place"
        )
    return replace(entry, **digests)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a source URL (None if it can): the scheme must be one of ``download.SCHEMES``."""
    if not url.strip():
        return "it is empty"
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        given = f"the scheme {parts.scheme + '://'!r}" if parts.scheme else "no scheme"
        return f"{given} is not supported"
    if scheme in ("http", "https") and not parts.netloc:
        return f"a {scheme}:// URL needs a host"
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        return f"a file:// URL names a local file, not the host {parts.netloc!r} (use file:///absolute/path)"
    if scheme == "file" and not parts.path.strip("/"):
        return "a file:// URL needs a path"
    if scheme == "package" and (not parts.netloc or not parts.path.strip("/")):
        return "a package:// URL needs a distribution and a file inside it"
    return None


def validate(raw: dict, path: Path) -> DatasetConfig:
    """Check a parsed TOML document against the schema; return it typed, with every default filled in."""
    path = Path(path)
    unknown = sorted(set(raw) - set(SECTIONS) - {"sources", "decode"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown section [{unknown[0]}]; known sections: "
            f"{', '.join(sorted([*SECTIONS, 'sources', 'decode']))}"
        )
    tables = {name: _fill_section(path, name, raw.get(name, {}), cls) for name, cls in SECTIONS.items()}
    dataset = tables["dataset"]
    if dataset.name != path.stem:
        raise ConfigError(f"{path}: dataset.name is {dataset.name!r} but the file is named {path.name}")
    tables["dataset"] = replace(dataset, mirror_subdir=dataset.mirror_subdir or dataset.name)
    decode = _fill_section(path, "decode", raw.get("decode", {}), DECODE_SECTIONS[dataset.kind])
    sources = raw.get("sources", {})
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"{path}: needs at least one [sources.<name>] table")
    typed = {name: _check_source(path, name, src) for name, src in sources.items()}
    cfg = DatasetConfig(path=str(path), sources=types.MappingProxyType(typed), decode=decode,
                        raw=copy.deepcopy(raw), **tables)
    _check_kind(cfg)
    _check_across_keys(cfg)
    if cfg.embed.model == "cnn":
        if cfg.kind == "word2vec":
            raise ConfigError(f"{path}: embed.model = 'cnn' needs images; a word2vec dataset has none")
        if cfg.embed.metric != "angular":
            raise ConfigError(f"{path}: embed.model = 'cnn' gives unit vectors: set embed.metric = 'angular'")
    return cfg


def _check_across_keys(cfg: DatasetConfig) -> None:
    """Rules that tie one key to another (each key's own range is checked by ``_check_range``)."""
    path, forest, ev, gate, split = cfg.path, cfg.forest, cfg.evaluate, cfg.gate, cfg.split
    if not forest.n_trees:
        raise ConfigError(f"{path}: forest.n_trees = [] is not allowed: list at least one number of trees >= 1")
    _check_unique(path, "forest.n_trees", forest.n_trees)
    if not ev.search_k:
        raise ConfigError(f"{path}: evaluate.search_k = [] is not allowed: list at least one value "
                          "(each >= 1, or -1 for the index's default)")
    _check_unique(path, "evaluate.search_k", ev.search_k)
    if cfg.exact.k < ev.k:
        raise ConfigError(f"{path}: exact.k = {cfg.exact.k} is not allowed: it must be at least "
                          f"evaluate.k = {ev.k} (the ground truth must be as deep as the recall it measures)")
    if split.method == "holdout" and split.n_queries < 1:
        raise ConfigError(f"{path}: split.n_queries = {split.n_queries} is not allowed with split.method = "
                          "'holdout': it must be >= 1 (how many rows are held out as queries)")
    if gate.n_trees and gate.n_trees not in forest.n_trees:
        raise ConfigError(f"{path}: gate.n_trees = {gate.n_trees} is not one of forest.n_trees "
                          f"{list(forest.n_trees)}: use one of them, or 0 for the index with most trees")
    if gate.search_k and gate.search_k not in ev.search_k:
        raise ConfigError(f"{path}: gate.search_k = {gate.search_k} is not one of evaluate.search_k "
                          f"{list(ev.search_k)}: use one of them, or 0 for the largest evaluated")


def check_mirror(mirror: str) -> None:
    """ConfigError unless ``mirror`` (the run's mirror setting) is a usable prefix.

    A mirror is a URL prefix whose scheme is one of ``download.SCHEMES``, or a plain local directory
    (no ``://``; ``download.candidate_urls`` makes it a ``file://`` URL). Empty means no mirror.
    """
    if not isinstance(mirror, str):
        raise ConfigError(f"the mirror ({MIRROR_SETTING}) must be a string, got {type(mirror).__name__}")
    mirror = mirror.strip()
    if not mirror or "://" not in mirror:
        if "\x00" in mirror:
            raise ConfigError(f"the mirror {mirror!r} ({MIRROR_SETTING}) contains a NUL character")
        return
    problem = url_problem(mirror)
    if problem:
        raise ConfigError(f"the mirror {mirror!r} ({MIRROR_SETTING}) is not usable: {problem}. "
                          f"Allowed: {URL_FORMS}, or a local directory")


def check_sources_reachable(cfg: DatasetConfig, mirror: str | None) -> None:
    """ConfigError when a source lists no URL and there is no mirror to supply its bytes.

    ``urls = []`` is valid in a config file only because a mirror can supply the file: call this
    with the run's mirror (``None`` or empty: none) before any work starts. A mirror given is also
    checked (``check_mirror``).
    """
    if mirror and mirror.strip():
        check_mirror(mirror)
        return
    missing = sorted(name for name, src in cfg.sources.items() if not src.urls)
    if missing:
        raise ConfigError("\n".join(
            f"{cfg.path}: sources.{name}.urls = [] and no mirror is set: nothing can supply "
            f"{cfg.sources[name].filename}. Add URLs to sources.{name}.urls, or set {MIRROR_SETTING} "
            "to a copy of the files"
            for name in missing))


def _check_kind(cfg: DatasetConfig) -> None:
    path, d = cfg.path, cfg.decode
    if cfg.kind == "idx" and (d.train_images is None) != (d.train_labels is None):
        given, missing = ("train_images", "train_labels") if d.train_labels is None else ("train_labels",
                                                                                         "train_images")
        raise ConfigError(f"{path}: decode.{given} = {d[given]!r} but decode.{missing} is not set: name both "
                          "train sources, or neither (the test files are then the whole dataset)")
    if cfg.kind == "idx" and d.train_images is None and cfg.split.method != "holdout":
        raise ConfigError(f"{path}: split.method = {cfg.split.method!r} needs train rows, and decode names no "
                          "train_images/train_labels: set split.method = 'holdout' (queries are held out of the "
                          "test files) or name the train sources")
    for key in _SOURCE_REFS[cfg.kind]:
        name = d[key]
        if name is not None and name not in cfg.sources:
            raise ConfigError(f"{path}: decode.{key} = {name!r} is not a source; sources: {', '.join(cfg.sources)}")
    if cfg.kind == "word2vec" and d.format == "npy" and not d.words:
        raise ConfigError(f"{path}: decode.format = 'npy' needs decode.words naming the source with the words")
    if cfg.kind == "vectors":
        _check_vectors_kind(cfg)


def is_npy_filename(filename: str) -> bool:
    """Whether a vectors source is a NumPy matrix (its filename ends in .npy, any case)."""
    return filename.lower().endswith(".npy")


def _check_vectors_kind(cfg: DatasetConfig) -> None:
    """The rules of a ``vectors`` dataset (the sources named are known to exist)."""
    path, d, model, method = cfg.path, cfg.decode, cfg.embed.model, cfg.split.method
    if model not in ("raw", "normalized"):
        why = "images for a CNN" if model == "cnn" else "images"
        raise ConfigError(f"{path}: embed.model = {model!r} is not allowed for a vectors dataset (it needs {why}"
                          f"{'; it is the default' if 'model' not in cfg.raw.get('embed', {}) else ''}): set "
                          "embed.model = 'raw' (the vectors as given, times embed.scale) or 'normalized' "
                          "(scaled to unit length)")
    if d.queries is not None and method != "column":
        raise ConfigError(f"{path}: decode.queries = {d.queries!r} gives the queries, but split.method = "
                          f"{method!r}: set split.method = 'column' (the queries file is the queries; "
                          "split.n_queries = 0 keeps them all), or remove decode.queries to hold queries out")
    if d.queries is None and method != "holdout":
        raise ConfigError(f"{path}: split.method = {method!r} needs queries, and decode.queries is not set: "
                          "set split.method = 'holdout' and split.n_queries (how many vectors are held out as "
                          "queries), or name a source with your query vectors in decode.queries")
    if d.queries is not None and d.queries == d.vectors:
        raise ConfigError(f"{path}: decode.queries = {d.queries!r} is also decode.vectors: the queries must be "
                          "another source (or leave decode.queries out to hold queries out of the vectors)")
    for vectors_key, ids_key in (("vectors", "ids"), ("queries", "query_ids")):
        name, ids = d[vectors_key], d[ids_key]
        if name is None:
            if ids is not None:
                raise ConfigError(f"{path}: decode.{ids_key} = {ids!r} but decode.{vectors_key} is not set: "
                                  f"name the .npy source in decode.{vectors_key}, or remove decode.{ids_key}")
            continue
        filename = cfg.sources[name].filename
        if is_npy_filename(filename) and ids is None:
            raise ConfigError(f"{path}: decode.{vectors_key} = {name!r} is a .npy matrix ({filename}), which holds "
                              f"no keys: name a source with its keys in decode.{ids_key} (a text file with one key "
                              "per line, or a one-column Parquet/Arrow table)")
        if not is_npy_filename(filename) and ids is not None:
            raise ConfigError(f"{path}: decode.{ids_key} = {ids!r} is only for a .npy {vectors_key} source, but "
                              f"sources.{name}.filename = {filename!r} is not .npy (a Parquet or Arrow file holds "
                              f"its keys in decode.key_column): remove decode.{ids_key}")
    columns = {"key_column": d.key_column, "vector_column": d.vector_column, "label_column": d.label_column}
    for name, column in columns.items():
        if column is not None and not column.strip():
            raise ConfigError(f"{path}: decode.{name} = {column!r} is not allowed: name a column")
    given = [(name, column) for name, column in columns.items() if column is not None]
    for i, (name, column) in enumerate(given):
        for other, other_column in given[i + 1:]:
            if column == other_column:
                raise ConfigError(f"{path}: decode.{name} and decode.{other} are both {column!r}: each names "
                                  "another column")


def mutable_sources(cfg: DatasetConfig) -> list[str]:
    """Names of the sources marked ``mutable = true``, sorted."""
    return sorted(name for name, src in cfg.sources.items() if src.mutable)


def apply_pins(cfg: DatasetConfig, pins: Mapping[str, str]) -> DatasetConfig:
    """``cfg`` with the sha256 a dated snapshot observed filled into its mutable sources.

    ``pins`` maps source names to sha256 digests. A name that is not a mutable source, or a value that
    is not a sha256, is a ConfigError. Mutable sources left without a pin keep ``sha256 = None``;
    ``stages.stage_params`` refuses to digest a fetch in that state.
    """
    if not pins:
        return cfg
    sources = dict(cfg.sources)
    for name, digest in pins.items():
        src = sources.get(name)
        if src is None or not src.mutable:
            raise ConfigError(f"{cfg.path}: a snapshot pins sources.{name}, which is not a mutable source of this "
                              f"config (mutable sources: {', '.join(mutable_sources(cfg)) or 'none'})")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(f"{cfg.path}: the pinned sha256 of sources.{name} is not a sha256 digest: {digest!r}")
        sources[name] = replace(src, sha256=digest)
    return replace(cfg, sources=types.MappingProxyType(sources))


def load_config(dataset: str, config_dir: str | os.PathLike | None = None) -> DatasetConfig:
    """The validated config of ``dataset`` (see ``find_config`` for the lookup order)."""
    return load_config_file(find_config(dataset, config_dir))


def load_config_file(path: str | os.PathLike) -> DatasetConfig:
    """The validated config in the TOML file ``path``, whose stem (the dataset name) must be a safe name.

    A file is validated once per process while its text is unchanged: every task and layer that asks
    for the dataset gets the same immutable object.
    """
    path = Path(path)
    if not is_safe_name(path.stem):
        raise ConfigError(f"{path}: the config file name {path.stem!r} is not allowed as a dataset name: "
                          f"use {NAME_RULE} (then .toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    return _load_validated(str(path), text)


@functools.lru_cache(maxsize=64)
def _load_validated(path: str, text: str) -> DatasetConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return validate(raw, Path(path))
