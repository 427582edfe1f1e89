"""Where grove writes: the artifact root, the per-machine scratch directory, and safe names.

Names that come from configs, data or the command line (dataset names, source file names) are
checked by ``check_name`` / ``check_filename`` before they become paths; every key under the
artifact root is then built by ``Store.key`` (pipeline/store.py), which refuses ``..`` and absolute
parts, from the names ``pipeline/layout.py`` owns.

The scratch directory is per machine and safe to lose (verified-stamps, caches): ``GROVE_SCRATCH``,
else ``$XDG_CACHE_HOME/grove``, else ``~/.cache/grove``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

# Dataset and config names: letters, digits, '.', '_' and '-', starting with a letter or digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "1-100 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"


def is_safe_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def check_name(name: str, what: str = "dataset name") -> str:
    """``name`` if it is a safe dataset/config name, else a ConfigError saying what is allowed."""
    if not is_safe_name(name):
        raise ConfigError(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


def filename_problem(name: object) -> str | None:
    """Why ``name`` is not a plain file name (None if it is one)."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if "\x00" in name:
        return "it contains a NUL character"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if name in (".", "..") or ".." in name:
        return "it contains '..'"
    if os.path.isabs(name):
        return "it is an absolute path"
    return None


def check_filename(name: str, where: str) -> str:
    """``name`` if it is a plain file name; else a ConfigError naming ``where`` (file and key)."""
    problem = filename_problem(name)
    if problem:
        raise ConfigError(f"{where} = {name!r} is not a plain file name: {problem}. "
                          "Give a bare file name such as 'train-images.gz'")
    return name


def scratch_dir() -> Path:
    """This machine's scratch directory (created on demand by its users; safe to delete)."""
    env = os.environ.get("GROVE_SCRATCH")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "grove"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: a reader (or a full or
    read-only disk) leaves the old file or the new one, never half of one. Creates the parent."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it is renamed onto ``path`` (readers
    see the old file or the new one, never half of one), on any error it is removed. Creates the parent."""
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` through a temporary sibling (fsynced) and a rename; creates the parent."""
    with _replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary sibling and a rename (a hard link when possible)."""
    import shutil

    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, streamed (hex)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


LUIGI_CFG = "luigi.cfg"
_CHECKOUT_LUIGI_CFG = Path(__file__).resolve().parents[1] / LUIGI_CFG
_ENV_REF = re.compile(r"\$\{([^}]+)\}")


def locate_luigi_cfg(cwd: Path | None = None) -> Path | None:
    """The luigi.cfg grove uses, first match wins: ``LUIGI_CONFIG_PATH``; ``luigi.cfg`` in the working
    directory or the nearest parent that has one; the checkout's (``pip install -e``). None if none."""
    env = os.environ.get("LUIGI_CONFIG_PATH")
    if env:
        return Path(env).resolve()
    here = (cwd or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / LUIGI_CFG).is_file():
            return directory / LUIGI_CFG
    return _CHECKOUT_LUIGI_CFG if _CHECKOUT_LUIGI_CFG.is_file() else None


def grove_section(path: Path | None) -> dict[str, str]:
    """``[grove]`` of the luigi.cfg at ``path``, read without importing Luigi, ``${VAR}`` expanded from
    the environment as Luigi does ({} when there is no file or section). configparser.Error when the
    file cannot be parsed."""
    import configparser

    if path is None or not Path(path).is_file():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    if not parser.has_section("grove"):
        return {}
    return {k: _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), v) for k, v in parser.items("grove")}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
