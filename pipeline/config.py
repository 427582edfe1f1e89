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
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .download import SCHEMES
from .errors import ConfigError
from .exact import METRICS
from .paths import NAME_RULE, check_filename, check_name, is_safe_name

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_REQUIRED = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGEST_LENGTH = {"sha256": 64, "md5": 32}
_HEX_DIGESTS = {name: re.compile(f"[0-9a-fA-F]{{{n}}}") for name, n in _DIGEST_LENGTH.items()}
URL_FORMS = "https://<host>/..., http://<host>/..., file:///<absolute path>, package://<distribution>/<file>"
MIRROR_SETTING = "GROVE_MIRROR or luigi.cfg [grove] mirror"

KINDS = ("idx", "word2vec", "food101")

# section -> key -> (accepted types, default). Lists are written as ("list", item type).
_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "dataset": {
        "name": (str, _REQUIRED),
        "kind": (str, _REQUIRED),
        "description": (str, ""),
        "mirror_subdir": (str, None),
    },
    "embed": {
        "model": (str, "pixels"),
        "metric": (str, "euclidean"),
        "scale": (float, 1.0),  # vectors are multiplied by this (> 0)
    },
    # The CNN of embed.model = "cnn": a 128-d bottleneck before a softmax over the labels.
    "train": {
        "backbone": (str, "small"),  # small (from scratch) or a frozen pretrained backbone + trained head
        "weights_path": (str, ""),  # local weights file for resnet18 / mobilenet_v3_small
        "bottleneck": (int, 128),  # width of the embedding layer
        "epochs": (int, 2),
        "batch_size": (int, 128),
        "lr": (float, 2e-3),
        "dropout": (float, 0.2),
        "weight_decay": (float, 1e-4),
        "input_size": (int, 0),  # 0 = the images' own size (small) or the backbone's default
        "seed": (int, 0),  # model initialisation, shuffling and augmentation
        # torch's threads for feature extraction, training and the CNN embedding. Part of the digest
        # (unlike GROVE_THREADS, which never changes a byte): torch splits work and sums per thread,
        # so another count gives other weights and vectors.
        "threads": (int, 2),
    },
    "split": {
        "method": (str, "column"),
        "n_queries": (int, 0),  # column: 0 = every test row; holdout: how many rows to hold out (>= 1)
        "seed": (int, 0),
    },
    "exact": {
        "k": (int, 100),  # ground-truth depth, at least evaluate.k
    },
    "forest": {
        "n_trees": (("list", int), [10, 50]),  # one index per value, each >= 1, no repeats
        "leaf_size": (int, 0),  # most items a leaf holds; 0 = the index's default (forest.default_leaf_size)
        "seed": (int, 0),
    },
    "evaluate": {
        "k": (int, 10),
        # candidates a query inspects, each >= 1, or -1 for the index's default (k * n_trees); no repeats
        "search_k": (("list", int), [100, 1000, 10000]),
        "n_queries": (int, 1000),  # queries timed one at a time per search_k (0 = all of them)
    },
    # An evaluated index is promoted to serving only if it meets these (0 = no requirement).
    "gate": {
        "min_recall": (float, 0.0),  # in [0, 1]
        "min_qps": (float, 0.0),
        "n_trees": (int, 0),  # which index the gate judges (0 = the one with most trees)
        "search_k": (int, 0),  # at which search_k (0 = the largest evaluated)
    },
}

# [decode] depends on the dataset's kind; values naming sources are checked against [sources].
_DECODE_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "idx": {
        # Both train sources may be left out: the test files are then the whole dataset (a holdout split).
        "train_images": (str, None),
        "train_labels": (str, None),
        "test_images": (str, _REQUIRED),
        "test_labels": (str, _REQUIRED),
    },
    "word2vec": {
        "vectors": (str, _REQUIRED),  # source with the vectors
        "words": (str, None),  # source with the words, for the npy format (a Parquet table)
        "format": (str, "auto"),
        "words_column": (str, None),
        "limit": (int, 0),  # read at most this many words (0 = all)
    },
    "food101": {
        "archive": (str, _REQUIRED),  # source with the tar archive in Food-101's layout
        "classes": (("list", str), []),  # a subset of meta/classes.txt ([] = every class)
        "image_size": (int, 128),  # photos are resized (shorter side) and centre-cropped to this (8..1024)
    },
}
_SOURCE_REFS = {"idx": ("train_images", "train_labels", "test_images", "test_labels"),
                "word2vec": ("vectors", "words"), "food101": ("archive",)}

_SOURCE_SCHEMA: dict[str, tuple[Any, Any]] = {
    "filename": (str, _REQUIRED),
    "urls": (("list", str), []),
    "sha256": (str, None),
    "md5": (str, None),
    "mutable": (bool, False),  # no pinned checksum: re-fetched per date, its sha256 comes from the snapshot
}

# Every number of the schema has a rule: (section, key) -> (accepts the value, what is allowed).
# Sections are named as in the schema (sources and decode by their kind); a list's rule applies to
# each item. Floats must also be finite (no nan or inf), whatever their rule.
def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v >= low), f"a number >= {low}"


_RULES: dict[tuple[str, str], tuple[Any, str]] = {
    ("embed", "scale"): (lambda v: v > 0, "a finite number > 0"),
    ("train", "bottleneck"): _at_least(1),
    ("train", "epochs"): _at_least(1),
    ("train", "batch_size"): _at_least(1),
    ("train", "lr"): (lambda v: v > 0, "a finite number > 0"),
    ("train", "dropout"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("train", "weight_decay"): _at_least(0),
    ("train", "input_size"): (lambda v: v == 0 or 8 <= v <= 1024,
                              "0 (the images' own size or the backbone's default) or 8..1024 pixels"),
    ("train", "seed"): _at_least(0),
    ("train", "threads"): _at_least(1),
    ("split", "n_queries"): (lambda v: v >= 0, "a number >= 0 (0 = every test row of a column split)"),
    ("split", "seed"): _at_least(0),
    ("exact", "k"): _at_least(1),
    ("forest", "n_trees"): _at_least(1),
    ("forest", "leaf_size"): (lambda v: v >= 0, "a number >= 1, or 0 for the index's default"),
    ("forest", "seed"): _at_least(0),
    ("evaluate", "k"): _at_least(1),
    ("evaluate", "search_k"): (lambda v: v == -1 or v >= 1,
                               ">= 1, or -1 for the index's default (k * n_trees)"),
    ("evaluate", "n_queries"): (lambda v: v >= 0, "a number >= 0 (0 = every query)"),
    ("gate", "min_recall"): (lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = no requirement)"),
    ("gate", "min_qps"): (lambda v: v >= 0, "a number >= 0 (0 = no requirement)"),
    ("gate", "n_trees"): (lambda v: v >= 0, "0 (the index with most trees) or one of forest.n_trees"),
    ("gate", "search_k"): (lambda v: v >= -1, "0 (the largest evaluated) or one of evaluate.search_k"),
    ("decode", "limit"): (lambda v: v >= 0, "a number >= 0 (0 = every word)"),
    ("decode", "image_size"): (lambda v: 8 <= v <= 1024, "8..1024 pixels"),
}

_CHOICES = {
    ("dataset", "kind"): KINDS,
    ("embed", "model"): ("pixels", "normalized", "cnn"),
    ("train", "backbone"): ("small", "efficientnet_lite0", "resnet18", "mobilenet_v3_small"),
    ("decode", "format"): ("auto", "binary", "text", "npy"),
    ("embed", "metric"): METRICS,
    ("split", "method"): ("column", "holdout"),
}


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


def _type_name(t: Any) -> str:
    if isinstance(t, tuple) and t and t[0] == "list":
        return f"a list of {t[1].__name__}"
    return t.__name__


def _check_value(path: Path, key: str, value: Any, expected: Any) -> Any:
    if isinstance(expected, tuple) and expected and expected[0] == "list":
        item_type = expected[1]
        if not isinstance(value, list) or not all(_is_type(v, item_type) for v in value):
            raise ConfigError(f"{path}: key {key} must be {_type_name(expected)}, got {value!r}")
        return [_coerce(v, item_type) for v in value]
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


def _fill_section(path: Path, section: str, raw: Any, schema: dict[str, tuple[Any, Any]]) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{section}] must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {section}.{unknown[0]}; known keys of [{section}]: {', '.join(sorted(schema))}"
        )
    out = {}
    for key, (expected, default) in schema.items():
        if key in raw:
            out[key] = _check_value(path, f"{section}.{key}", raw[key], expected)
        elif default is _REQUIRED:
            raise ConfigError(f"{path}: missing required key {section}.{key}")
        else:
            out[key] = copy.deepcopy(default)
        choices = _CHOICES.get((section.split(".")[0], key))
        if choices and out[key] not in choices:
            raise ConfigError(f"{path}: {section}.{key} = {out[key]!r} is not one of {', '.join(choices)}")
        if key in raw:
            _check_range(path, section, key, out[key], expected)
    return out


def _check_range(path: Path, section: str, key: str, value: Any, expected: Any) -> None:
    """ConfigError unless ``value`` (or each item of a list) keeps the rule of ``section.key``."""
    is_list = isinstance(expected, tuple) and expected and expected[0] == "list"
    item_type = expected[1] if is_list else expected
    rule = _RULES.get((section.split(".")[0], key))
    if item_type is not float and rule is None:
        return
    for item in value if is_list else [value]:
        if item_type is float and not math.isfinite(item):
            allowed = rule[1] if rule else "a finite number"
            raise ConfigError(f"{path}: {section}.{key} = {value!r} is not allowed: it must be {allowed}, "
                              "not nan or infinity")
        if rule is not None and not rule[0](item):
            if is_list:
                raise ConfigError(f"{path}: {section}.{key} = {value!r} is not allowed: it has {item!r}, "
                                  f"and each value must be {rule[1]}")
            raise ConfigError(f"{path}: {section}.{key} = {value!r} is not allowed: it must be {rule[1]}")


def _check_unique(path: Path, key: str, values: list) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ConfigError(f"{path}: {key} = {values!r} repeats {', '.join(map(repr, repeated))}: "
                          "list each value once")


def _check_source(path: Path, name: str, entry: dict) -> None:
    """The file name, checksums and URLs of ``sources.<name>``; checksums are lower-cased in place."""
    key = f"sources.{name}"
    check_filename(entry["filename"], f"{path}: {key}.filename")
    for algorithm, pattern in _HEX_DIGESTS.items():
        digest = entry[algorithm]
        if digest is None:
            continue
        if not pattern.fullmatch(digest):
            n = _DIGEST_LENGTH[algorithm]
            why = f"it has {len(digest)} characters" if len(digest) != n else "it has characters other than 0-9, a-f"
            raise ConfigError(f"{path}: {key}.{algorithm} = {digest!r} is not a valid {algorithm} digest: {why}; it must be "
                              f"exactly {n} hexadecimal characters (0-9, a-f, either case)")
        entry[algorithm] = digest.lower()
    for url in entry["urls"]:
        problem = url_problem(url)
        if problem:
            raise ConfigError(f"{path}: {key}.urls has {url!r}: {problem}. Allowed: {URL_FORMS}")
    _check_unique(path, f"{key}.urls", entry["urls"])


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


def validate(raw: dict, path: Path) -> dict:
    """Check a parsed TOML document against the schema; return it with every default filled in."""
    unknown = sorted(set(raw) - set(_SCHEMA) - {"sources", "decode"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown section [{unknown[0]}]; known sections: "
            f"{', '.join(sorted([*_SCHEMA, 'sources', 'decode']))}"
        )
    cfg = {section: _fill_section(path, section, raw.get(section, {}), schema) for section, schema in _SCHEMA.items()}
    cfg["decode"] = _fill_section(path, "decode", raw.get("decode", {}), _DECODE_SCHEMA[cfg["dataset"]["kind"]])
    if cfg["dataset"]["name"] != path.stem:
        raise ConfigError(f"{path}: dataset.name is {cfg['dataset']['name']!r} but the file is named {path.name}")
    cfg["dataset"]["mirror_subdir"] = cfg["dataset"]["mirror_subdir"] or cfg["dataset"]["name"]
    sources = raw.get("sources", {})
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"{path}: needs at least one [sources.<name>] table")
    cfg["sources"] = {}
    for name, src in sources.items():
        entry = _fill_section(path, f"sources.{name}", src, _SOURCE_SCHEMA)
        _check_source(path, name, entry)
        pinned = entry["sha256"] or entry["md5"]
        if entry["mutable"] and pinned:
            raise ConfigError(
                f"{path}: sources.{name} is mutable = true but also pins a checksum: a mutable source's sha256 "
                "is read from each dated download; remove the checksum or the mutable key"
            )
        if not entry["mutable"] and not pinned:
            raise ConfigError(
                f"{path}: sources.{name} has no checksum: add sha256 (or md5 where that is what the publisher "
                "gives), or set mutable = true if the publisher updates the file in place"
            )
        cfg["sources"][name] = entry
    _check_kind(cfg, path)
    _check_across_keys(cfg, path)
    if cfg["embed"]["model"] == "cnn":
        if cfg["dataset"]["kind"] == "word2vec":
            raise ConfigError(f"{path}: embed.model = 'cnn' needs images; a word2vec dataset has none")
        if cfg["embed"]["metric"] != "angular":
            raise ConfigError(f"{path}: embed.model = 'cnn' gives unit vectors: set embed.metric = 'angular'")
    cfg["_path"] = str(path)
    return cfg


def _check_across_keys(cfg: dict, path: Path) -> None:
    """Rules that tie one key to another (each key's own range is checked by ``_check_range``)."""
    forest, ev, gate, split = cfg["forest"], cfg["evaluate"], cfg["gate"], cfg["split"]
    if not forest["n_trees"]:
        raise ConfigError(f"{path}: forest.n_trees = [] is not allowed: list at least one number of trees >= 1")
    _check_unique(path, "forest.n_trees", forest["n_trees"])
    if not ev["search_k"]:
        raise ConfigError(f"{path}: evaluate.search_k = [] is not allowed: list at least one value "
                          "(each >= 1, or -1 for the index's default)")
    _check_unique(path, "evaluate.search_k", ev["search_k"])
    if cfg["exact"]["k"] < ev["k"]:
        raise ConfigError(f"{path}: exact.k = {cfg['exact']['k']} is not allowed: it must be at least "
                          f"evaluate.k = {ev['k']} (the ground truth must be as deep as the recall it measures)")
    if split["method"] == "holdout" and split["n_queries"] < 1:
        raise ConfigError(f"{path}: split.n_queries = {split['n_queries']} is not allowed with split.method = "
                          "'holdout': it must be >= 1 (how many rows are held out as queries)")
    if gate["n_trees"] and gate["n_trees"] not in forest["n_trees"]:
        raise ConfigError(f"{path}: gate.n_trees = {gate['n_trees']} is not one of forest.n_trees "
                          f"{forest['n_trees']}: use one of them, or 0 for the index with most trees")
    if gate["search_k"] and gate["search_k"] not in ev["search_k"]:
        raise ConfigError(f"{path}: gate.search_k = {gate['search_k']} is not one of evaluate.search_k "
                          f"{ev['search_k']}: use one of them, or 0 for the largest evaluated")


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


def check_sources_reachable(cfg: dict, mirror: str | None) -> None:
    """ConfigError when a source lists no URL and there is no mirror to supply its bytes.

    ``urls = []`` is valid in a config file only because a mirror can supply the file: call this
    with the run's mirror (``None`` or empty: none) before any work starts. A mirror given is also
    checked (``check_mirror``).
    """
    if mirror and mirror.strip():
        check_mirror(mirror)
        return
    path = cfg.get("_path", cfg["dataset"]["name"])
    missing = sorted(name for name, src in cfg["sources"].items() if not src["urls"])
    if missing:
        raise ConfigError("\n".join(
            f"{path}: sources.{name}.urls = [] and no mirror is set: nothing can supply "
            f"{cfg['sources'][name]['filename']}. Add URLs to sources.{name}.urls, or set {MIRROR_SETTING} "
            "to a copy of the files"
            for name in missing))


def _check_kind(cfg: dict, path: Path) -> None:
    d = cfg["decode"]
    if cfg["dataset"]["kind"] == "idx" and (d["train_images"] is None) != (d["train_labels"] is None):
        given, missing = ("train_images", "train_labels") if d["train_labels"] is None else ("train_labels",
                                                                                           "train_images")
        raise ConfigError(f"{path}: decode.{given} = {d[given]!r} but decode.{missing} is not set: name both "
                          "train sources, or neither (the test files are then the whole dataset)")
    if cfg["dataset"]["kind"] == "idx" and d["train_images"] is None and cfg["split"]["method"] != "holdout":
        raise ConfigError(f"{path}: split.method = {cfg['split']['method']!r} needs train rows, and decode names no "
                          "train_images/train_labels: set split.method = 'holdout' (queries are held out of the "
                          "test files) or name the train sources")
    for key in _SOURCE_REFS[cfg["dataset"]["kind"]]:
        name = cfg["decode"][key]
        if name is not None and name not in cfg["sources"]:
            raise ConfigError(f"{path}: decode.{key} = {name!r} is not a source; sources: {', '.join(cfg['sources'])}")
    if cfg["decode"].get("format") == "npy" and not cfg["decode"]["words"]:
        raise ConfigError(f"{path}: decode.format = 'npy' needs decode.words naming the source with the words")


def mutable_sources(cfg: dict) -> list[str]:
    """Names of the sources marked ``mutable = true``, sorted."""
    return sorted(name for name, src in cfg["sources"].items() if src["mutable"])


def apply_pins(cfg: dict, pins: Mapping[str, str]) -> dict:
    """``cfg`` with the sha256 a dated snapshot observed filled into its mutable sources.

    ``pins`` maps source names to sha256 digests. A name that is not a mutable source, or a value that
    is not a sha256, is a ConfigError. Mutable sources left without a pin keep ``sha256 = None``;
    ``stages.stage_params`` refuses to digest a fetch in that state.
    """
    if not pins:
        return cfg
    path = cfg.get("_path", cfg["dataset"]["name"])
    out = copy.deepcopy(cfg)
    for name, digest in pins.items():
        src = out["sources"].get(name)
        if src is None or not src["mutable"]:
            raise ConfigError(f"{path}: a snapshot pins sources.{name}, which is not a mutable source of this "
                              f"config (mutable sources: {', '.join(mutable_sources(cfg)) or 'none'})")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(f"{path}: the pinned sha256 of sources.{name} is not a sha256 digest: {digest!r}")
        src["sha256"] = digest
    return out


def load_config(dataset: str, config_dir: str | os.PathLike | None = None) -> dict:
    """The validated config of ``dataset`` (see ``find_config`` for the lookup order)."""
    path = find_config(dataset, config_dir)
    return load_config_file(path)


def load_config_file(path: str | os.PathLike) -> dict:
    """The validated config in the TOML file ``path``, whose stem (the dataset name) must be a safe name."""
    path = Path(path)
    if not is_safe_name(path.stem):
        raise ConfigError(f"{path}: the config file name {path.stem!r} is not allowed as a dataset name: "
                          f"use {NAME_RULE} (then .toml)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return validate(raw, path)
