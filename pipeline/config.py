"""Dataset configs: one TOML file per dataset, validated before any work starts.

A config says what a dataset is (its sources with checksums) and every hyperparameter of every
stage. Users add a dataset by adding a file to ``configs/`` or to a directory of their own named by
``GROVE_CONFIGS`` (several directories separated by ``os.pathsep``; earlier ones win).

Validation is strict: an unknown section or key, a value of the wrong type, or a source without a
checksum is a ``ConfigError`` naming the file and the key, raised before anything is downloaded.

A source the publisher updates in place is marked ``mutable = true`` instead of pinning a checksum:
each dated run downloads it again into a snapshot that records the sha256 it saw, and
``apply_pins`` fills those digests in, so the chain below it is rebuilt only when the bytes changed.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .exact import METRICS

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_REQUIRED = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")

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
        "scale": (float, 1.0),
    },
    # The CNN of embed.model = "cnn": a 128-d bottleneck before a softmax over the labels.
    "train": {
        "backbone": (str, "small"),  # small (from scratch) or a frozen pretrained backbone + trained head
        "weights_path": (str, ""),  # local weights file for resnet18 / mobilenet_v3_small
        "bottleneck": (int, 128),
        "epochs": (int, 2),
        "batch_size": (int, 128),
        "lr": (float, 2e-3),
        "dropout": (float, 0.2),
        "weight_decay": (float, 1e-4),
        "input_size": (int, 0),  # 0 = the images' own size (small) or the backbone's default
        "seed": (int, 0),
    },
    "split": {
        "method": (str, "column"),
        "n_queries": (int, 0),
        "seed": (int, 0),
    },
    "exact": {
        "k": (int, 100),
    },
    "forest": {
        "n_trees": (("list", int), [10, 50]),
        "leaf_size": (int, 0),
        "seed": (int, 0),
    },
    "evaluate": {
        "k": (int, 10),
        "search_k": (("list", int), [100, 1000, 10000]),
        "n_queries": (int, 1000),
    },
    # An evaluated index is promoted to serving only if it meets these (0 = no requirement).
    "gate": {
        "min_recall": (float, 0.0),
        "min_qps": (float, 0.0),
        "n_trees": (int, 0),  # which index the gate judges (0 = the one with most trees)
        "search_k": (int, 0),  # at which search_k (0 = the largest evaluated)
    },
}

# [decode] depends on the dataset's kind; values naming sources are checked against [sources].
_DECODE_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "idx": {
        "train_images": (str, _REQUIRED),
        "train_labels": (str, _REQUIRED),
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
        "image_size": (int, 128),  # photos are resized (shorter side) and centre-cropped to this
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
    names = set()
    for d in config_dirs(extra):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def find_config(dataset: str, extra: str | os.PathLike | None = None) -> Path:
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
    return out


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
    if not cfg["forest"]["n_trees"] or min(cfg["forest"]["n_trees"]) < 1:
        raise ConfigError(f"{path}: forest.n_trees must list at least one positive number")
    if not cfg["evaluate"]["search_k"]:
        raise ConfigError(f"{path}: evaluate.search_k must list at least one value")
    if cfg["embed"]["model"] == "cnn":
        if cfg["dataset"]["kind"] == "word2vec":
            raise ConfigError(f"{path}: embed.model = 'cnn' needs images; a word2vec dataset has none")
        if cfg["embed"]["metric"] != "angular":
            raise ConfigError(f"{path}: embed.model = 'cnn' gives unit vectors: set embed.metric = 'angular'")
    gate = cfg["gate"]
    if gate["n_trees"] and gate["n_trees"] not in cfg["forest"]["n_trees"]:
        raise ConfigError(f"{path}: gate.n_trees = {gate['n_trees']} is not one of forest.n_trees")
    if gate["search_k"] and gate["search_k"] not in cfg["evaluate"]["search_k"]:
        raise ConfigError(f"{path}: gate.search_k = {gate['search_k']} is not one of evaluate.search_k")
    cfg["_path"] = str(path)
    return cfg


def _check_kind(cfg: dict, path: Path) -> None:
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
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return validate(raw, path)
