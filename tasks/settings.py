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

import configparser
import os
import sys
from pathlib import Path

from pipeline.paths import LUIGI_CFG as CONFIG_NAME, grove_section, locate_luigi_cfg

_state: dict = {"path": None, "installed": False, "pending": False}


def locate_config(cwd: Path | None = None) -> Path | None:
    """The luigi.cfg grove uses (see the module docstring), or None when there is none."""
    return locate_luigi_cfg(cwd)


def install() -> Path | None:
    """Make Luigi read the located luigi.cfg (located once per process); returns its path.

    Without Luigi imported yet, only locates it: the next call once Luigi is imported adds it (the
    task modules call this through ``base_dir`` and at this module's import), so a command that runs
    no task does not import Luigi for its settings."""
    if not _state["installed"]:
        path = locate_config()
        _state["path"] = path
        _state["installed"] = True
        # Luigi reads ./luigi.cfg and LUIGI_CONFIG_PATH by itself; a file found elsewhere is added.
        _state["pending"] = (path is not None and path != (Path.cwd() / CONFIG_NAME).resolve()
                             and not os.environ.get("LUIGI_CONFIG_PATH"))
    if _state["pending"] and "luigi" in sys.modules:
        import luigi.configuration  # here, not above: importing this module must not import Luigi

        luigi.configuration.add_config_path(str(_state["path"]))
        _state["pending"] = False
    return _state["path"]


def grove_option(name: str) -> str | None:
    """``[grove] <name>`` of the located luigi.cfg, read without importing Luigi (``${VAR}`` expanded
    from the environment, as Luigi does); None when it is not set. Once Luigi is imported (a command
    that runs tasks), Luigi's own view of its configuration answers, with every file it reads."""
    if "luigi" in sys.modules:
        import luigi.configuration

        install()
        value = luigi.configuration.get_config().get("grove", name, None)
        return None if value is None else str(value)
    try:
        return grove_section(install()).get(name)
    except configparser.Error:
        return None  # Luigi reports a broken file when a task needs it


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


if "luigi" in sys.modules:
    # Imported by a task module (tasks/base.py imports Luigi first): luigi.cfg is found before any task
    # reads its parameters, also when a task module is imported directly (`from tasks.chain import Chain`).
    install()
