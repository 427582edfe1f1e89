"""CONFIG.md is the validator's schema written out: regenerated, it is unchanged; every key the
validator accepts is in it with the default the validator fills in."""

from __future__ import annotations

import re

from conftest import REPO
from pipeline import config
from pipeline.config_reference import reference


def test_config_md_is_what_the_validator_generates():
    text = (REPO / "CONFIG.md").read_text(encoding="utf-8")
    assert text == reference(), "CONFIG.md is stale: run `python -m pipeline.config_reference > CONFIG.md`"


def test_every_key_is_listed_with_the_default_validation_fills_in():
    text = reference()
    cfg = config.load_config("mnist")  # every optional key left out falls back to its default
    for name, cls in config.SECTIONS.items():
        section = text.split(f"## [{name}]\n", 1)[1].split("\n## ", 1)[0]
        for key in config.key_specs(cls):
            row = re.search(rf"^\| `{key}` \| [^|]+ \| ([^|]+) \|", section, re.M)
            assert row, f"{name}.{key} is not in the reference"
            if name in ("dataset",) or f"{key} =" in (REPO / "configs" / "mnist.toml").read_text():
                continue  # set by mnist.toml: not a default
            shown = row.group(1).strip().strip("`")
            value = getattr(cfg, name).as_dict()[key]
            expected = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
            assert shown == (f'"{expected}"' if isinstance(expected, str) else str(expected)), (name, key, shown)


def test_the_readme_links_the_reference():
    assert "(CONFIG.md)" in (REPO / "README.md").read_text(encoding="utf-8")
