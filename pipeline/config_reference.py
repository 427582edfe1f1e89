"""The configuration reference (CONFIG.md), generated from the validator's own schema.

Every key of every table of a dataset config, with its type, default, allowed values and meaning,
read from the section classes of ``pipeline.config`` (the same field records the validator checks),
so the reference cannot drift from what is accepted. Regenerate it with::

    python -m pipeline.config_reference > CONFIG.md

``tests/test_config_reference.py`` fails when CONFIG.md differs from what this prints.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING
from typing import Any

from .config import DECODE_SECTIONS, KINDS, SECTIONS, Section, Source, key_specs

_INTRO = """# Dataset configuration reference

A dataset is one TOML file, `configs/<name>.toml` (or in a directory named by `GROVE_CONFIGS`;
earlier directories win over the packaged ones). Every table and key is listed below with its type,
its default (keys without one are required) and what it accepts; an unknown table or key, a value of
the wrong type or out of range is an error (exit 2) that names the file, the key and the value, found
before any work starts. `grove datasets` lists the configs found.

This file is generated from the validator (`python -m pipeline.config_reference > CONFIG.md`); a test
checks that the two agree.
"""

_ACROSS = """## Rules across keys

- `dataset.name` equals the file name without `.toml`, and is made of `A-Z a-z 0-9 . _ -`, starting
  with a letter or digit.
- Every source has `sha256` or `md5`, or is `mutable = true` (then it has neither).
- `[decode]` keys that name sources (`test_images`, `vectors`, `archive`, ...) name a `[sources.<name>]` table.
- `exact.k >= evaluate.k`.
- `forest.n_trees` and `evaluate.search_k` are not empty and list each value once.
- `split.method = "holdout"` needs `split.n_queries >= 1`; an `idx` dataset without train sources needs a
  holdout split, and names both train sources or neither.
- `gate.n_trees` is 0 or one of `forest.n_trees`; `gate.search_k` is 0 or one of `evaluate.search_k`.
- `embed.model = "cnn"` needs images (not `word2vec`) and `embed.metric = "angular"`.
- `decode.format = "npy"` (word2vec) needs `decode.words`.
- A `vectors` dataset: `embed.model` is `"raw"` or `"normalized"`; `decode.queries` set needs
  `split.method = "column"` (the queries file is the queries), unset needs `split.method = "holdout"`;
  `decode.queries` names another source than `decode.vectors`; a `.npy` source (its `filename` ends in
  `.npy`) needs its ids (`decode.ids`, `decode.query_ids`), and only a `.npy` source takes them;
  `key_column`, `vector_column` and `label_column` are non-empty and name different columns.
"""


def _type(expected: Any) -> str:
    if isinstance(expected, tuple):
        return f"list of {expected[1].__name__}"
    return expected.__name__


def _value(value: Any) -> str:
    if value is MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _table(cls: type[Section]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, (expected, default, meta) in key_specs(cls).items():
        allowed = (", ".join(f'`"{c}"`' for c in meta["choices"]) if meta["choices"]
                   else meta["allowed"] or ("finite" if expected is float else ""))
        lines.append(f"| `{name}` | {_type(expected)} | {_value(default)} | {allowed} | {meta['doc']} |")
    return lines


def _doc(cls: type[Section]) -> list[str]:
    """The section's docstring as a paragraph (none for the one a dataclass makes up)."""
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        return [" ".join(cls.__doc__.split()).replace("``", "`") + "\n"]
    return []


def reference() -> str:
    """CONFIG.md's text."""
    parts = [_INTRO]
    for name, cls in SECTIONS.items():
        parts.append(f"## [{name}]\n")
        parts.extend(_doc(cls))
        parts.append("\n".join(_table(cls)) + "\n")
        if name == "dataset":
            parts.append("## [sources.<name>]\n")
            parts.append("One table per file the dataset is made of; `[decode]` refers to them by name.\n")
            parts.append("\n".join(_table(Source)) + "\n")
            for kind in KINDS:
                parts.append(f'## [decode] of kind = "{kind}"\n')
                parts.extend(_doc(DECODE_SECTIONS[kind]))
                parts.append("\n".join(_table(DECODE_SECTIONS[kind])) + "\n")
    parts.append(_ACROSS)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(reference())
