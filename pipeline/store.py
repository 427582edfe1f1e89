"""Where artifacts live: a local directory or an object store (``s3://bucket/prefix``) behind one interface.

Keys are ``/``-separated paths relative to the root (``mnist/forest/v3-abc/index/header.json``);
``key()`` builds and checks them, so nothing outside the root is ever named. The object-store
backend goes through ``pyarrow.fs`` (S3 here; GCS, HDFS and Azure are the same interface).

What each backend guarantees:

- ``write_bytes`` is atomic: a reader sees the old object or the new one, never part of one
  (local: a temporary sibling and a rename; S3: one PUT).
- A version is visible only through its ``manifest.json``, written last (``publish_dir``). On a
  store without rename the files of one publishing attempt go under ``<version>/.attempts/<id>/``
  and the manifest names that attempt, so two workers publishing the same version at once each
  leave a manifest that agrees with the bytes it names; an attempt no manifest names is garbage
  for ``gc`` (after a grace period, so a writer still uploading is not robbed).
- Pointers (``latest``, ``serving``) are symlinks on a local root and small objects on a remote
  one; events (the serving history) are one object each, ordered by name.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from . import layout
from .errors import ArtifactError, ConfigError, StoreError
from .paths import file_sha256, fsync_dir, pid_alive

log = logging.getLogger(__name__)

SCHEMES = ("s3",)  # remote roots grove accepts; pyarrow.fs would also take gs://, hdfs://, abfs:// (untested)
_KEY_PART = re.compile(r"[^/\\\x00]+")
# Names the store protocol gives inside a version and the root (see pipeline.layout for the rest).
ATTEMPTS = layout.ATTEMPTS  # names inside the root belong to pipeline/layout.py
PROBE_PREFIX = layout.PROBE_PREFIX


class Store(abc.ABC):
    """An artifact root. ``uri`` is what the user gave (a path or ``s3://bucket/prefix``)."""

    uri: str
    is_local: bool

    def key(self, *parts: str) -> str:
        """A checked key under the root: each part non-empty, no ``..``, no absolute part."""
        out = []
        for part in parts:
            for piece in str(part).split("/"):
                if piece in ("", "."):
                    continue
                if piece == ".." or not _KEY_PART.fullmatch(piece):
                    raise ConfigError(f"refusing the path {'/'.join(map(str, parts))!r}: it would leave the "
                                      f"artifact root {self.uri}")
                out.append(piece)
        return "/".join(out)

    # --- objects ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` is a file (object)."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The bytes of ``key``; FileNotFoundError when it is missing."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` atomically (old or new, never half)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names of the immediate children (files and directories) of ``prefix``, sorted; [] if none."""

    @abc.abstractmethod
    def files(self, prefix: str) -> dict[str, int]:
        """Every file under ``prefix``, recursively: relative key -> size in bytes."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one file (no error when missing)."""

    @abc.abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (no error when missing)."""

    @abc.abstractmethod
    def upload(self, local: Path, key: str) -> None:
        """Copy a local file to ``key`` (atomic like write_bytes)."""

    @abc.abstractmethod
    def download(self, key: str, local: Path) -> str:
        """Copy ``key`` to a local file (written through a temporary sibling); returns the sha256
        (hex) of the bytes written, for the caller to compare with a manifest."""

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())

    # --- pointers and events ---------------------------------------------------------------------
    @abc.abstractmethod
    def set_pointer(self, prefix: str, name: str, target: str) -> None:
        """Point ``prefix/name`` at ``target`` (a key relative to ``prefix``), atomically."""

    @abc.abstractmethod
    def get_pointer(self, prefix: str, name: str) -> str | None:
        """The target of ``prefix/name``, or None."""

    @abc.abstractmethod
    def remove_pointer(self, prefix: str, name: str) -> None:
        """Remove ``prefix/name`` (no error when missing)."""

    def local_path(self, key: str = "") -> Path:
        """The local path of ``key`` (local roots only)."""
        raise NotImplementedError(f"{self.uri} is not a local directory")

    def describe(self) -> str:
        return self.uri

    def where(self, key: str = "") -> str:
        """How messages name ``key``: a local path, or ``s3://bucket/prefix/key``."""
        if self.is_local:
            return str(self.local_path(key))
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    # --- a quick look before any work ------------------------------------------------------------
    @abc.abstractmethod
    def check(self, write: bool = True) -> None:
        """Probe the root in a second or two: it can be listed and (``write=True``) a small object
        ``<root>/.grove-probe-<token>`` can be written and deleted. StoreError saying what is wrong."""

    # --- versions: complete or invisible, without relying on rename -------------------------------
    @abc.abstractmethod
    def publish_version(self, prefix: str, local_dir: Path, manifest: dict) -> dict:
        """Publish the files of ``local_dir`` (relative paths kept) as the version ``prefix``; the
        ``<prefix>/manifest.json`` goes LAST, so the version is visible only once complete.

        ``manifest["files"]`` ({rel: {"sha256", "bytes", "measured"}}) must list exactly the files of
        ``local_dir`` (a ``manifest.json`` at its top is ignored); when absent it is computed (files
        named in ``manifest["measured"]`` are marked measured). Returns the manifest now published:

        - local root: written into a temporary sibling and renamed into place; when another process
          published the version first, its manifest is returned and ours dropped.
        - object store: the files go under ``<prefix>/.attempts/<attempt-id>/`` and the manifest
          gets ``"attempt": <attempt-id>``; concurrent publishers each leave a manifest that names
          their own bytes (the last manifest written wins). An already published version is not
          uploaded again (its manifest is returned).
        """

    def version_file_keys(self, prefix: str) -> tuple[dict, dict[str, str]]:
        """``(manifest, {rel: key})`` of a published version: where the bytes of each listed file
        are (under the attempt the manifest names, if any). ArtifactError when there is no readable
        manifest (a missing or unfinished version)."""
        manifest = self._read_manifest(prefix)
        base = self.key(prefix, ATTEMPTS, manifest["attempt"]) if manifest.get("attempt") else self.key(prefix)
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ArtifactError(f"{self.where(self.key(prefix, layout.MANIFEST))}: no 'files' table; "
                                f"this manifest was not written by grove. Delete {self.where(prefix)} and rebuild")
        return manifest, {rel: self.key(base, rel) for rel in sorted(files)}

    @abc.abstractmethod
    def stale_attempts(self, prefix: str, grace_seconds: float = 3600) -> list[str]:
        """Keys (each a tree for ``delete_tree``) of the publishing attempts of version ``prefix``
        that no manifest names and that started more than ``grace_seconds`` ago: what a killed or
        outrun writer left. The grace keeps a writer that is still uploading from being robbed."""

    def _read_manifest(self, prefix: str) -> dict:
        key = self.key(prefix, layout.MANIFEST)
        try:
            manifest = json.loads(self.read_bytes(key).decode("utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{self.where(prefix)}: no {layout.MANIFEST}; this version is missing or was "
                                "never completed. Run the stage again to rebuild it") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{self.where(key)}: unreadable manifest ({exc}); delete {self.where(prefix)} "
                                "and rebuild") from exc
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{self.where(key)}: expected a JSON object, found {type(manifest).__name__}; "
                                f"delete {self.where(prefix)} and rebuild")
        return manifest


class LocalStore(Store):
    """A directory on this machine's disk: files, renames and symlinks, as grove always did."""

    is_local = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.uri = str(root)

    def local_path(self, key: str = "") -> Path:
        return self.root / self.key(key) if key else self.root

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        from .paths import write_bytes_atomic

        write_bytes_atomic(self.local_path(key), data)

    def list(self, prefix: str) -> list[str]:
        path = self.local_path(prefix)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def files(self, prefix: str) -> dict[str, int]:
        path = self.local_path(prefix)
        if not path.is_dir():
            return {}
        return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        import shutil

        path = self.local_path(prefix)
        if path.is_dir() and not path.is_symlink():
            trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
            os.rename(path, trash)  # a half-deleted directory never looks like a complete one
            shutil.rmtree(trash)

    def upload(self, local: Path, key: str) -> None:
        from .paths import copy_file_atomic

        copy_file_atomic(Path(local), self.local_path(key))

    def download(self, key: str, local: Path) -> str:
        from .paths import copy_file_atomic

        copy_file_atomic(self.local_path(key), Path(local))
        return file_sha256(Path(local))

    def set_pointer(self, prefix: str, name: str, target: str) -> None:
        import secrets

        directory = self.local_path(prefix)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(target, tmp)
        os.replace(tmp, directory / name)

    def get_pointer(self, prefix: str, name: str) -> str | None:
        link = self.local_path(prefix) / name
        return os.readlink(link) if link.is_symlink() else None

    def remove_pointer(self, prefix: str, name: str) -> None:
        link = self.local_path(prefix) / name
        if link.is_symlink():
            link.unlink()

    def check(self, write: bool = True) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"the artifact root {root} is a file, not a directory; point GROVE_ARTIFACTS "
                             "(or [grove] artifacts) at a directory")
        if not write:
            return
        probe = root / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"grove probe\n")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write to the artifact root {root}: {exc.strerror or exc}; make it writable "
                             "for this user or choose another root (GROVE_ARTIFACTS)") from exc

    def publish_version(self, prefix: str, local_dir: Path, manifest: dict) -> dict:
        import shutil

        prefix = self.key(prefix)
        path = self.local_path(prefix)
        if (path / layout.MANIFEST).is_file():
            return self._read_manifest(prefix)
        files = version_files(local_dir)
        manifest = complete_manifest(manifest, files, local_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / layout.temporary_name(path.name, os.getpid(), secrets.token_hex(4))
        tmp.mkdir()
        try:
            for rel, src in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)  # same disk: no copy (the caller's directory is its own to delete)
                except OSError:
                    shutil.copyfile(src, dst)
            from .paths import write_bytes_atomic

            write_bytes_atomic(tmp / layout.MANIFEST, _manifest_bytes(manifest))  # last, and fsynced
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / layout.MANIFEST).is_file():
                    if path.is_dir() and any(path.iterdir()):
                        raise ArtifactError(f"{path} exists without a {layout.MANIFEST} (an unfinished version "
                                            "from an older grove?); delete it and run again") from None
                    raise
                log.info("%s was published by another process meanwhile; keeping that copy", path)
                shutil.rmtree(tmp, ignore_errors=True)
                return self._read_manifest(prefix)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def stale_attempts(self, prefix: str, grace_seconds: float = 3600) -> list[str]:
        """Temporaries ``.tmp-<version>-<pid>-<token>`` beside the version: older than the grace
        period and their writer (on this machine: a local root is not shared) no longer running."""
        prefix = self.key(prefix)
        path = self.local_path(prefix)
        parent_key, _, version = prefix.rpartition("/")
        if not path.parent.is_dir():
            return []
        start = layout.TMP_PREFIX + version + "-"
        now = time.time()
        stale = []
        for tmp in sorted(path.parent.iterdir()):
            if not tmp.name.startswith(start) or not tmp.is_dir():
                continue
            pid = layout.parse_temporary(tmp.name)
            if pid is not None and pid_alive(pid):
                continue
            if now - tmp.stat().st_mtime >= grace_seconds:
                stale.append(self.key(parent_key, tmp.name))
        return stale


# --- helpers of the publish protocol (both backends) -------------------------------------------------


def version_files(local_dir: str | os.PathLike) -> dict[str, Path]:
    """Every file under ``local_dir`` by relative ``/`` path, sorted; a top-level manifest.json is left
    out (the store writes the manifest itself). ArtifactError when ``local_dir`` is not a directory."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ArtifactError(f"cannot publish {local_dir}: it is not a directory")
    out = {}
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir).as_posix()
        if p.is_file() and rel != layout.MANIFEST:
            out[rel] = p
    return out


def complete_manifest(manifest: dict, files: dict[str, Path], local_dir: str | os.PathLike) -> dict:
    """A copy of ``manifest`` whose ``files`` table lists exactly ``files`` (computed when absent,
    checked by name and size when given); ArtifactError naming what differs."""
    out = {k: v for k, v in dict(manifest).items() if k != "attempt"}
    measured = set(out.pop("measured", ()) or ())
    if "files" not in out:
        unknown = sorted(measured - set(files))
        if unknown:
            raise ArtifactError(f"{local_dir}: {', '.join(unknown)} marked as measured but not written")
        out["files"] = {rel: {"sha256": file_sha256(p), "bytes": p.stat().st_size, "measured": rel in measured}
                        for rel, p in files.items()}
        return out
    listed = out["files"]
    if not isinstance(listed, dict):
        raise ArtifactError(f"cannot publish {local_dir}: manifest['files'] must map relative paths to "
                            f"{{sha256, bytes}}, got {type(listed).__name__}")
    missing = sorted(set(listed) - set(files))
    extra = sorted(set(files) - set(listed))
    if missing or extra:
        raise ArtifactError(f"cannot publish {local_dir}: the manifest lists files that are not there "
                            f"({', '.join(missing) or 'none'}) and leaves out files that are "
                            f"({', '.join(extra) or 'none'}); list exactly the files written")
    for rel, info in listed.items():
        size = files[rel].stat().st_size
        if int(info.get("bytes", -1)) != size:
            raise ArtifactError(f"cannot publish {files[rel]}: the manifest says {info.get('bytes')} bytes, "
                                f"the file has {size}; it changed after the manifest was made")
    return out


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()








# Settings for object-store roots from grove's own configuration (luigi.cfg ``[grove] s3_endpoint``,
# ``s3_region``), set by ``configure_store``; the AWS environment variables win over them.
_SETTINGS: dict[str, str | None] = {"endpoint": None, "region": None}
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


def configure_store(endpoint: str | None = None, region: str | None = None) -> bool:
    """Set the endpoint URL and region that object-store roots opened from now on fall back to (empty
    or None: none). Returns True when they changed (stores opened before keep the old ones)."""
    new = {"endpoint": (endpoint or "").strip() or None, "region": (region or "").strip() or None}
    if new == _SETTINGS:
        return False
    _SETTINGS.update(new)
    return True


def store_settings() -> dict[str, str | None]:
    """The endpoint and region set by ``configure_store`` (None where unset)."""
    return dict(_SETTINGS)


def open_store(uri: str | os.PathLike, *, endpoint: str | None = None, region: str | None = None) -> Store:
    """The store of an artifact root: ``s3://bucket/prefix`` or a local path.

    For an object store, ``endpoint`` and ``region`` (default: those of ``configure_store``) are used
    only where the environment gives none: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` win over the
    endpoint, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` over the region, as the environment wins over
    every grove setting; a region set here wins over the AWS profile's (see pipeline.objectstore)."""
    text = str(uri)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"artifact root {text!r}: {scheme}:// is not supported; use a local directory or "
                              f"{', '.join(s + '://bucket/prefix' for s in SCHEMES)}")
        from .objectstore import ObjectStore  # pyarrow.fs and its S3 client only when needed

        endpoint = endpoint or _SETTINGS["endpoint"]
        region = region or _SETTINGS["region"]
        if any(os.environ.get(name) for name in _ENDPOINT_ENV):
            endpoint = None
        if any(os.environ.get(name) for name in _REGION_ENV):
            region = None
        return ObjectStore(text, endpoint=endpoint, region=region)
    return LocalStore(text)
