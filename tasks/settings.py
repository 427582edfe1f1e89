"""How grove finds its settings, the same way from any working directory.

The luigi.cfg that grove uses is, first match wins:

1. ``LUIGI_CONFIG_PATH`` (Luigi's own variable), when set;
2. ``luigi.cfg`` in the working directory or the nearest parent directory that has one;
3. the ``luigi.cfg`` of the checkout grove was installed from (``pip install -e``), when there is one.

Relative paths in it (``[grove] artifacts``, ``configs``) are relative to that file's directory, so
``grove versions glove`` run from a subdirectory or from ``/tmp`` sees the same artifacts as from the
checkout. Environment variables still win (``GROVE_ARTIFACTS``, ``GROVE_CONFIGS``, ...), relative to
the working directory as a shell user expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import luigi.configuration

CONFIG_NAME = "luigi.cfg"
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[1] / CONFIG_NAME
_state: dict = {"path": None, "installed": False}


def locate_config(cwd: Path | None = None) -> Path | None:
    """The luigi.cfg grove uses (see the module docstring), or None when there is none."""
    env = os.environ.get("LUIGI_CONFIG_PATH")
    if env:
        return Path(env).resolve()
    here = (cwd or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return _CHECKOUT_CONFIG if _CHECKOUT_CONFIG.is_file() else None


def install() -> Path | None:
    """Make Luigi read the located luigi.cfg (once per process); returns its path."""
    if not _state["installed"]:
        path = locate_config()
        _state["path"] = path
        _state["installed"] = True
        # Luigi reads ./luigi.cfg and LUIGI_CONFIG_PATH by itself; a file found elsewhere is added.
        if path is not None and path != (Path.cwd() / CONFIG_NAME).resolve() and not os.environ.get("LUIGI_CONFIG_PATH"):
            luigi.configuration.add_config_path(str(path))
    return _state["path"]


def config_path() -> Path | None:
    return install()


def base_dir() -> Path:
    """The directory that relative paths in luigi.cfg are relative to (the working directory if none)."""
    path = install()
    return path.parent if path is not None else Path.cwd()


def describe() -> str:
    """Where the settings come from, for messages: ``settings from /x/luigi.cfg`` or ``no luigi.cfg found``."""
    path = install()
    return f"settings from {path}" if path else "no luigi.cfg found; built-in defaults"
