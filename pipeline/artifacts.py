"""The versioned artifact store.

Every stage writes one directory ``<root>/<dataset>/<stage>/v<FORMAT>-<digest>/``. The digest is a
hash of the canonical JSON of the stage name, its format version, its resolved parameters and the
versions of its parents (a Merkle chain), so the same inputs give the same directory and a changed
parameter gives new directories for exactly the stages below it. Source code is never hashed.

The root is a local directory or an object store (``pipeline.store``); ``pipeline.layout`` names
everything inside it. Publishing is atomic on both:

- a local root: the stage writes into a temporary sibling ``.tmp-<version>-<pid>-<token>``;
  ``manifest.json`` is written last, then the directory is renamed into place and the stage's
  ``latest`` pointer (a symlink) is swapped atomically. A crash leaves at most a temporary directory,
  which the next publish of that stage removes once its process is gone.
- an object store: the stage writes into a temporary directory in this machine's scratch, which
  ``Store.publish_version`` uploads (files first, the manifest last); ``latest`` is a pointer object.

Stage code always reads LOCAL directories: ``local_dir(ref)`` is the version's own directory on a
local root and a verified copy in this machine's cache (``pipeline.cache.localize``) for a remote one.

Whatever serves or is promoted is checked with ``verify_once``: every file's sha256 against the
manifest, once per change, remembered by a verified-stamp in the per-machine scratch directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__, layout
from .download import file_digest
from .errors import ArtifactError, ChecksumError
from .paths import fsync_dir, pid_alive, write_text_atomic
from .store import LocalStore, Store, open_store

log = logging.getLogger(__name__)

MANIFEST = layout.MANIFEST  # re-exported: callers and tests name them through here or layout
LATEST = layout.LATEST
TMP_PREFIX = layout.TMP_PREFIX
VERIFIED_DIR = layout.VERIFIED
DIGEST_CHARS = 16
_PACKAGES = ("numpy", "pyarrow", "numba", "luigi", "gensim", "torch", "torchvision")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# What an object store's client is made from besides its URI (pipeline.objectstore): a changed
# setting gives a new client.
_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE")


@functools.lru_cache(maxsize=32)
def _open_store(root: str, env: tuple) -> Store:
    return open_store(root)


def store_of(root: str | os.PathLike) -> Store:
    """The store of an artifact root (a path or ``s3://bucket/prefix``), opened once per root (and,
    for an object store, per endpoint and credentials)."""
    text = str(root)
    from .store import store_settings

    env = (*(os.environ.get(name) for name in _STORE_ENV), repr(store_settings())) if "://" in text else ()
    return _open_store(text, env)


def location(root: str | os.PathLike, key: str) -> str:
    """How messages name ``key`` under ``root``: a local path, or the object's URI."""
    return store_of(root).where(key)


def default_root() -> Path:
    """The artifact root when none is configured: ``GROVE_ARTIFACTS`` or ``./artifacts``."""
    return Path(os.environ.get("GROVE_ARTIFACTS") or "artifacts")


@dataclass(frozen=True)
class ArtifactRef:
    """The address of one version of one stage of one dataset. ``root`` is the artifact root as given
    (a local path or ``s3://bucket/prefix``), kept as a string."""

    root: str
    dataset: str
    stage: str
    format_version: int
    digest: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root))

    @property
    def store(self) -> Store:
        return store_of(self.root)

    @property
    def version(self) -> str:
        return layout.version_name(self.format_version, self.digest)

    @property
    def key(self) -> str:
        """Root-relative name recorded in children's manifests: ``dataset/stage/version``."""
        return layout.version_key(self.dataset, self.stage, self.version)

    @property
    def stage_key(self) -> str:
        return layout.stage_key(self.dataset, self.stage)

    @property
    def location(self) -> str:
        """Where the version is, for messages: its directory, or its URI on an object store."""
        return location(self.root, self.key)

    def _local(self, key: str) -> Path:
        store = self.store
        if not store.is_local:
            raise ArtifactError(f"{location(self.root, key)} is on an object store and has no local path; read a "
                                "version through pipeline.artifacts.local_dir(ref) (pipeline.cache.localize)")
        return Path(self.root) / key

    @property
    def stage_dir(self) -> Path:
        """The stage's directory (local roots only)."""
        return self._local(self.stage_key)

    @property
    def path(self) -> Path:
        """The version's directory (local roots only; ``local_dir`` works for every root)."""
        return self._local(self.key)

    def exists(self) -> bool:
        """True only for a published (complete) version: its manifest is there."""
        return self.store.exists(layout.manifest_key(self.key))


def ref_from_key(root: str | os.PathLike, key: str) -> ArtifactRef:
    """The reference of the version ``dataset/stage/version`` under ``root``; ArtifactError if ``key``
    is not a version key."""
    try:
        dataset, stage, version = layout.split_version_key(key)
    except ValueError as exc:
        raise ArtifactError(f"{location(root, key)}: {exc}") from None
    format_version, digest = layout.parse_version(version)
    return ArtifactRef(str(root), dataset, stage, format_version, digest)


def as_ref(version: "ArtifactRef | str | os.PathLike") -> ArtifactRef:
    """A reference from a reference or a local version directory (``<root>/<dataset>/<stage>/<version>``)."""
    if isinstance(version, ArtifactRef):
        return version
    path = Path(version)
    return ref_from_key(path.parent.parent.parent, layout.version_key(path.parent.parent.name, path.parent.name,
                                                                      path.name))


def local_dir(ref: ArtifactRef) -> Path:
    """A local directory holding the files of the published version ``ref``: its own directory on a
    local root; on an object store, a copy in this machine's cache, each file checked against the
    manifest's sha256 on the way in (``pipeline.cache.localize``)."""
    if ref.store.is_local:
        return ref.path
    from .cache import localize

    try:
        return Path(localize(ref.store, ref.key))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{ref.location}: no {MANIFEST}; this artifact is missing or was never completed. "
                            "Run the stage again to rebuild it.") from exc


def version_dir(root: str | os.PathLike, key: str) -> Path:
    """``local_dir`` of the version ``key`` under ``root`` (``root / key`` on a local root)."""
    if store_of(root).is_local:
        return Path(root) / key
    return local_dir(ref_from_key(root, key))


def make_ref(
    root: str | os.PathLike,
    dataset: str,
    stage: str,
    format_version: int,
    params: Mapping[str, Any],
    parents: Mapping[str, ArtifactRef],
) -> ArtifactRef:
    """The reference a stage with these parameters and parents publishes to."""
    payload = {
        "stage": stage,
        "format": format_version,
        "params": params,
        "parents": {name: ref.key for name, ref in sorted(parents.items())},
    }
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:DIGEST_CHARS]
    return ArtifactRef(str(root), dataset, stage, int(format_version), digest)


def package_versions() -> dict[str, str]:
    import importlib.metadata  # only a publish needs it; a query imports this module too

    out = {"python": platform.python_version(), "grove": __version__}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out




def clean_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Remove temporaries whose writing process no longer runs. Returns what was removed.

    The artifact root is assumed to be written from one host (a local disk), as the pid check says.
    """
    removed = []
    if not stage_dir.is_dir():
        return removed
    for tmp in stage_dir.glob(f"{TMP_PREFIX}*"):
        pid = layout.parse_temporary(tmp.name)
        if pid is None or pid_alive(pid):
            continue
        log.info("removing stale temporary %s (its process %s is gone)", tmp, pid)
        shutil.rmtree(tmp)
        removed.append(tmp)
    return removed


def _list_files(directory: Path, measured: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Every file under ``directory`` with its sha256, size and whether it is a measurement."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"sha256": file_digest(path), "bytes": path.stat().st_size, "measured": rel in measured}
    unknown = sorted(measured - set(files))
    if unknown:
        raise ArtifactError(f"{directory}: the stage marked {', '.join(unknown)} as measured but did not write them")
    return files


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON through a temporary sibling and a rename, so a
    reader sees the old file or the new one, never half of one. Creates the parent directory."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())




def set_pointer(stage_dir: Path, name: str, version: str) -> None:
    """Point ``stage_dir/name`` (a symlink) at ``version``, replacing any old pointer atomically."""
    LocalStore(stage_dir).set_pointer("", name, version)


def read_pointer(stage_dir: Path, name: str = LATEST) -> str | None:
    return LocalStore(stage_dir).get_pointer("", name)


def publish(
    ref: ArtifactRef,
    write: Callable[[Path], Mapping[str, Any] | None],
    params: Mapping[str, Any],
    parents: Mapping[str, ArtifactRef],
) -> dict:
    """Run ``write(tmp_dir)`` and publish what it wrote as ``ref``; return the manifest.

    ``write`` fills the directory and may return extra manifest fields (``rows``, ``metrics``...), and
    ``measured``: the files (relative paths) holding measurements that never repeat (timings, QPS,
    timestamps). The manifest marks each file ``"measured": true`` or ``false``; every file marked
    false must come out byte-identical on any machine, thread count and BLAS build for this version
    (see benchmarks/repro_check.py). The manifest itself is metadata (times, package versions).
    If another process published the same version meanwhile, its copy is kept and ours dropped.

    ``tmp_dir`` is a local directory on every root: a sibling of the version on a local root, a
    directory in this machine's scratch for an object store (uploaded by ``Store.publish_version``).
    """
    if not ref.store.is_local:
        return _publish_remote(ref, write, params, parents)
    ref.stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(ref.stage_dir)
    if ref.exists():
        return read_manifest(ref.path)
    tmp = ref.stage_dir / layout.temporary_name(ref.version, os.getpid(), secrets.token_hex(4))
    tmp.mkdir()
    try:
        manifest = _write_version(ref, write, tmp, params, parents)
        _write_json_durably(tmp / MANIFEST, manifest)
        try:
            os.rename(tmp, ref.path)
        except OSError:
            if not ref.exists():
                raise
            log.info("%s was published by another process meanwhile; keeping that copy", ref.key)
            shutil.rmtree(tmp)
            return read_manifest(ref.path)
        fsync_dir(ref.stage_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_pointer(ref.stage_dir, LATEST, ref.version)
    log.info("published %s (%.1f s)", ref.key, manifest["seconds"])
    return manifest


def _publish_remote(ref: ArtifactRef, write: Callable[[Path], Mapping[str, Any] | None],
                    params: Mapping[str, Any], parents: Mapping[str, ArtifactRef]) -> dict:
    store = ref.store
    if ref.exists():
        return read_manifest(ref, verify="none")
    scratch = layout.publish_scratch()
    scratch.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(scratch)
    tmp = scratch / layout.temporary_name(ref.version, os.getpid(), secrets.token_hex(4))
    tmp.mkdir()
    try:
        manifest = _write_version(ref, write, tmp, params, parents)
        # Files first, the manifest last; a version another worker published meanwhile wins (its
        # manifest comes back) and ours is dropped: same digest, same reproducible bytes.
        published = store.publish_version(ref.key, tmp, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store.set_pointer(ref.stage_key, LATEST, ref.version)
    log.info("published %s (%.1f s)", ref.location, manifest["seconds"])
    return published


def _write_version(ref: ArtifactRef, write: Callable[[Path], Mapping[str, Any] | None], tmp: Path,
                   params: Mapping[str, Any], parents: Mapping[str, ArtifactRef]) -> dict:
    """Run ``write(tmp)``; the manifest of what it wrote (not written to ``tmp``)."""
    started = time.perf_counter()
    extra = dict(write(tmp) or {})
    manifest = {
        "dataset": ref.dataset,
        "stage": ref.stage,
        "format": ref.format_version,
        "version": ref.version,
        "digest": ref.digest,
        "params": params,
        "parents": {name: p.key for name, p in sorted(parents.items())},
        "seconds": round(time.perf_counter() - started, 3),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        **extra,
    }
    manifest["files"] = _list_files(tmp, set(manifest.pop("measured", ())))
    return manifest


def read_manifest(version: "ArtifactRef | str | os.PathLike", verify: str = "size") -> dict:
    """The manifest of a version (a reference, or a local version directory), after checking the
    files it lists.

    verify: ``"none"``, ``"size"`` (every file exists with its recorded size) or ``"sha256"``
    (also recompute every digest; on an object store, of the copies ``local_dir`` fetched and
    checked). Raises ArtifactError naming the file and what differs.
    """
    if isinstance(version, ArtifactRef):
        if version.store.is_local:
            return read_manifest(version.path, verify)
        return _read_remote_manifest(version, verify)
    path = Path(version)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{path}: no {MANIFEST}; this artifact is missing or was never completed. "
            "Run the stage again to rebuild it."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc}); delete {path} and rebuild") from exc
    if verify == "none":
        return manifest
    for rel, info in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing; delete {path} and rebuild")
        _check_file(f, info, path, verify)
    return manifest


def _check_file(f: Path, info: Mapping[str, Any], where: str | Path, verify: str) -> None:
    size = f.stat().st_size
    if size != info["bytes"]:
        raise ArtifactError(
            f"{f}: {size} bytes, the manifest says {info['bytes']}; the file is truncated or changed. "
            f"Delete {where} and rebuild."
        )
    if verify == "sha256":
        actual = file_digest(f)
        if actual != info["sha256"]:
            raise ArtifactError(
                f"{f}: sha256 {actual} does not match the manifest's {info['sha256']}; the file is corrupt. "
                f"Delete {where} and rebuild."
            )


def _remote_manifest(ref: ArtifactRef) -> tuple[dict, dict[str, str]]:
    """(manifest, {relative file name: key}) of a version on an object store."""
    try:
        return ref.store.version_file_keys(ref.key)
    except FileNotFoundError:
        raise ArtifactError(f"{ref.location}: no {MANIFEST}; this artifact is missing or was never completed. "
                            "Run the stage again to rebuild it.") from None
    except ValueError as exc:
        raise ArtifactError(f"{location(ref.root, layout.manifest_key(ref.key))}: unreadable manifest ({exc}); "
                            f"delete {ref.location} and rebuild") from exc


def _read_remote_manifest(ref: ArtifactRef, verify: str) -> dict:
    """``read_manifest`` on an object store. ``"size"``: every listed object is there (one listing;
    sizes are compared on the downloaded copies, since a store may list the size it stores, e.g.
    SeaweedFS for gzip content); ``"sha256"``: this machine's copies (``pipeline.cache.localize``),
    each checked against the manifest on its way in, are hashed again."""
    manifest, keys = _remote_manifest(ref)
    if verify == "none":
        return manifest
    stored = ref.store.files(ref.key)
    for rel in manifest.get("files", {}):
        key = keys.get(rel, f"{ref.key}/{rel}")
        if not key.startswith(ref.key + "/") or key[len(ref.key) + 1:] not in stored:
            raise ArtifactError(f"{location(ref.root, key)}: listed in the manifest but missing; delete "
                                f"{ref.location} and rebuild")
    if verify == "sha256":
        from .cache import localize

        localize(ref.store, ref.key, verify=True)
    return manifest


def list_versions(root: str | os.PathLike, dataset: str, stage: str) -> list[dict]:
    """Manifests of every published version of a stage, oldest first; ``latest`` is marked, ``path``
    is where the version is (a directory, or its URI on an object store)."""
    store = store_of(root)
    stage_key = layout.stage_key(dataset, stage)
    names = store.list(stage_key)
    if not names:
        return []
    latest = store.get_pointer(stage_key, LATEST)
    out = []
    for name in names:
        key = layout.version_key(dataset, stage, name)
        if not layout.is_version(name) or (store.is_local and store.local_path(key).is_symlink()):
            continue
        try:
            m = store.read_json(layout.manifest_key(key))
        except FileNotFoundError:
            continue  # not published (yet): no version
        except ValueError as exc:
            raise ArtifactError(f"{location(root, layout.manifest_key(key))}: unreadable manifest ({exc}); delete "
                                f"{location(root, key)} and rebuild") from exc
        m["path"] = location(root, key)
        m["latest"] = name == latest
        out.append(m)
    return sorted(out, key=lambda m: (m.get("created_utc", ""), m["version"]))


# --- verified once per change --------------------------------------------------------------------

_STAMP_FORMAT = 1
# A file changed within this many nanoseconds of being stamped could change again inside the same
# timestamp tick without its mtime moving (git's "racy clean" problem); such a version is verified
# but not stamped, so the next use hashes it again. (Local file systems tick every few ms.)
RACY_NS = 1_000_000_000


def stamp_path(path: str | os.PathLike) -> Path:
    """Where the verified-stamp of the version at ``path`` lives: in this machine's scratch directory
    (``<scratch>/verified/<sha256 of the resolved path>.json``), never inside the artifact."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return layout.verified_dir() / f"{key}.json"


def _file_state(f: Path) -> list[int]:
    """What a verified-stamp remembers of one file: size, mtime_ns, ctime_ns and inode. A write changes
    mtime and ctime; a replaced file has a new inode; ``touch -d`` can put mtime back, but not ctime."""
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamp(stamp: Path) -> dict | None:
    """A stamp's content, or None when there is none or it cannot be read: that only means verify again."""
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.info("verified-stamp %s is unreadable (%s); verifying again", stamp, exc)
        return None
    return data if isinstance(data, dict) and data.get("format") == _STAMP_FORMAT else None


def _damage(where: str, version: str, dataset: str, f: Path | str, problem: str) -> ArtifactError:
    return ArtifactError(f"{f}: {problem}; the version {version} is damaged. "
                         f"Run `grove run {dataset} --rebuild` to remove and rebuild it.")


def verify_once(version: "ArtifactRef | str | os.PathLike", force: bool = False) -> dict:
    """The manifest of a version (a reference, or a local version directory), after checking every
    file's sha256 once per change.

    A stamp in the scratch directory remembers each file's (size, mtime_ns, ctime_ns, inode) as they
    were when their digests last matched the manifest; when they all still match, the files are
    trusted without reading them. Otherwise (or with ``force``) every file is hashed again and, if all
    match, the stamp is rewritten (atomically). Raises ArtifactError naming the missing, truncated or
    changed file and telling the user to run ``grove run DATASET --rebuild``.

    On an object store the files checked are this machine's copies (``pipeline.cache.localize``: each
    file is checked against the manifest's sha256 on its way into the cache, and a copy whose size,
    mtime or inode changed since is hashed again; ``force`` hashes every one): an object that is
    missing or does not match its manifest is damage as well.
    """
    if isinstance(version, ArtifactRef) and not version.store.is_local:
        return _verify_remote(version, force)
    path = version.path if isinstance(version, ArtifactRef) else Path(version)
    manifest = read_manifest(path, verify="none")
    files = {MANIFEST: path / MANIFEST, **{rel: path / rel for rel in manifest.get("files", {})}}
    where, name = str(path), path.name
    dataset = manifest.get("dataset") or path.parent.parent.name
    state = {}
    for rel, f in files.items():
        try:
            state[rel] = _file_state(f)
        except FileNotFoundError:
            raise _damage(where, name, dataset, f, "listed in the manifest but missing") from None
    stamp = stamp_path(path)
    if not force:
        known = _read_stamp(stamp)
        if known and known.get("path") == str(path.resolve()) and known.get("files") == state:
            return manifest
    for rel, info in manifest.get("files", {}).items():
        f = files[rel]
        if state[rel][0] != info["bytes"]:
            raise _damage(where, name, dataset, f, f"{state[rel][0]} bytes, the manifest says {info['bytes']}")
        actual = file_digest(f)
        if actual != info["sha256"]:
            raise _damage(where, name, dataset, f, f"sha256 {actual} does not match the manifest's {info['sha256']}")
    if any(_file_state(f) != state[rel] for rel, f in files.items()):
        # Changed while it was being read: what was hashed may not be what is there now.
        raise _damage(where, name, dataset, where, "its files changed while they were being verified")
    if state and max(max(s[1], s[2]) for s in state.values()) > time.time_ns() - RACY_NS:
        log.debug("%s: written moments ago; verified but not stamped", where)
        return manifest
    try:
        write_json_atomic(stamp, {"format": _STAMP_FORMAT, "path": str(path.resolve()), "files": state,
                                  "verified_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except OSError as exc:  # a scratch directory we cannot write only costs a re-hash next time
        log.warning("could not write the verified-stamp %s (%s); %s will be hashed again next time",
                    stamp, exc, where)
    return manifest


def _verify_remote(ref: ArtifactRef, force: bool) -> dict:
    from .cache import localize

    manifest = read_manifest(ref, verify="none")  # a missing version: ArtifactError "no manifest.json"
    try:
        localize(ref.store, ref.key, verify=force)
    except FileNotFoundError as exc:
        raise _damage(ref.location, ref.version, ref.dataset, exc.filename or ref.location,
                      "listed in the manifest but missing") from exc
    except (ArtifactError, ChecksumError) as exc:
        raise _damage(ref.location, ref.version, ref.dataset, ref.location, str(exc)) from exc
    return manifest
