"""This machine's cache of remote versions: fetched once, verified on the way in, then memory-mapped.

Layout, under ``<scratch>/cache/`` (per machine, safe to delete at any time)::

    sha256/<sha256>                  one file's bytes, named by their digest (read-only)
    versions/<digest>/<rel>          a version's files: hard links to the blobs above
    versions/<digest>/manifest.json  the version's manifest, as published
    versions/<digest>/.grove-cache.json  what this directory was built from (and each file's stat state)

``<digest>`` names the store and the version (sha256 of the endpoint, the root URI and the prefix).
A blob is downloaded to a temporary name, its sha256 compared with the manifest, made read-only and
renamed into place: two processes filling the same blob at once each rename a complete, verified copy.
A version directory is assembled in a temporary sibling and renamed into place the same way.

A later ``localize`` reads only the remote manifest: when it is the one the directory was built from
and every file still has the size, mtime and inode recorded when it was verified, nothing is
downloaded. A file that changed on this disk is hashed again and, if damaged, fetched again (logged).
``verify=True`` hashes every file regardless.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import layout
from .errors import ArtifactError
from .paths import file_sha256, scratch_dir
from .store import Store

log = logging.getLogger(__name__)

CACHE = "cache"
BLOBS = "sha256"
VERSIONS = "versions"
STATE = ".grove-cache.json"
_STATE_FORMAT = 1
FETCH_THREADS = 4  # files of one version downloaded at once
_STALE_TEMP_SECONDS = 3600  # temporaries of a process that died are removed after this long


def cache_dir() -> Path:
    return scratch_dir() / CACHE


def version_dir(store: Store, prefix: str) -> Path:
    """Where ``localize`` puts the version ``prefix`` of ``store`` on this machine."""
    identity = "\n".join((getattr(store, "endpoint_url", None) or "", store.uri.rstrip("/"), store.key(prefix)))
    return cache_dir() / VERSIONS / hashlib.sha256(identity.encode()).hexdigest()[:32]


def localize(store: Store, prefix: str, verify: bool = False) -> Path:
    """A local directory holding the files of the published version ``prefix``, ready to memory-map.

    A local root returns the version's own directory (no copy). A remote one returns
    ``<scratch>/cache/versions/<digest>/``, downloading only what this machine does not hold yet.
    ArtifactError when the version has no manifest, or when a downloaded file does not have the
    sha256 its manifest records (naming the key); StoreError when the store cannot be read.
    """
    if store.is_local:
        path = store.local_path(store.key(prefix))
        if not (path / layout.MANIFEST).is_file():
            raise ArtifactError(f"{path}: no {layout.MANIFEST}; this version is missing or was never completed. "
                                "Run the stage again to rebuild it")
        return path
    manifest, keys = store.version_file_keys(prefix)  # one read; ArtifactError when there is no manifest
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    target = version_dir(store, prefix)
    files = manifest["files"]
    if _intact(target, manifest_sha, files, verify):
        log.debug("%s: cached in %s", store.where(prefix), target)
        return target
    judged = _dir_id(target)  # an existing directory found stale or damaged: to be replaced

    started = time.monotonic()
    _remove_stale_temporaries(cache_dir() / BLOBS)
    with ThreadPoolExecutor(max_workers=max(1, min(FETCH_THREADS, len(keys))),
                            thread_name_prefix="grove-fetch") as pool:
        futures = {rel: pool.submit(_blob, store, key, files[rel], prefix, verify) for rel, key in keys.items()}
        results = {rel: future.result() for rel, future in futures.items()}
    blobs = {rel: blob for rel, (blob, _) in results.items()}
    fetched = sum(files[rel]["bytes"] for rel, (_, was_fetched) in results.items() if was_fetched)
    _install(target, blobs, manifest_bytes, manifest_sha, files, judged)
    log.info("%s: %.1f MB fetched into this machine's cache (%d files, %.1f s)", store.where(prefix), fetched / 1e6,
             len(blobs), time.monotonic() - started)
    return target


def cached_file(store: Store, key: str, sha256: str, size: int) -> Path:
    """One object of ``store`` in the cache (read-only, by its sha256), downloaded and verified if needed."""
    blob, _ = _blob(store, store.key(key), {"sha256": sha256, "bytes": size}, key, verify=False)
    return blob


# --- blobs ----------------------------------------------------------------------------------------


def _blob(store: Store, key: str, info: dict, prefix: str, verify: bool) -> tuple[Path, bool]:
    """The blob of one file: ``(path, downloaded now)``."""
    try:
        sha, size = str(info["sha256"]), int(info["bytes"])
    except (KeyError, TypeError, ValueError):
        sha, size = "", -1
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or size < 0:
        raise ArtifactError(f"{store.where(prefix)}: the manifest records {info!r} for {key}; expected "
                            "{\"sha256\": <64 hex digits>, \"bytes\": <size>}. Rebuild the version")
    blobs = cache_dir() / BLOBS
    blob = blobs / sha
    if blob.is_file():
        if blob.stat().st_size == size and (not verify or file_sha256(blob) == sha):
            return blob, False
        log.warning("the cached copy %s of %s is damaged; fetching it again", blob, store.where(key))
        blob.unlink(missing_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".{sha}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        store.download(key, tmp)
        actual_size = tmp.stat().st_size
        actual = file_sha256(tmp)
        if actual != sha or actual_size != size:
            raise ArtifactError(
                f"{store.where(key)}: {actual_size} bytes with sha256 {actual}, but the manifest of "
                f"{store.where(prefix)} says {size} bytes with sha256 {sha}; the object was changed or damaged "
                "after it was published. Delete the version and run its stage again")
        os.chmod(tmp, 0o444)  # the version directory links to it: nobody should write through those links
        os.replace(tmp, blob)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return blob, True


# --- version directories --------------------------------------------------------------------------


def _state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _intact(target: Path, manifest_sha: str, files: dict, verify: bool) -> bool:
    """True when ``target`` was built from this manifest and every file is as it was verified."""
    try:
        state = json.loads((target / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if state.get("format") != _STATE_FORMAT or state.get("manifest_sha256") != manifest_sha:
        return False
    recorded = state.get("files", {})
    if set(recorded) != set(files):
        return False
    for rel, info in files.items():
        path = target / rel
        try:
            now = _state(path)
        except OSError:
            return False
        if now != recorded[rel] or verify:
            if file_sha256(path) != info["sha256"]:
                log.warning("the cached file %s does not have the sha256 its manifest records; fetching it again",
                            path)
                blob = cache_dir() / BLOBS / info["sha256"]
                try:
                    if blob.stat().st_ino == now[2]:  # the blob is that damaged file (not a fresh copy)
                        blob.unlink()
                except FileNotFoundError:
                    pass
                return False
            if now != recorded[rel]:
                return False  # touched but intact: rebuilt below from the same blob, nothing downloaded
    return True


def _install(target: Path, blobs: dict[str, Path], manifest_bytes: bytes, manifest_sha: str, files: dict,
             judged: int | None) -> None:
    """Assemble the version directory in a temporary sibling and rename it into place. ``judged`` is
    the inode of the directory found stale or damaged before (replaced); another one in its place was
    just built by another process and is kept when intact."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp = parent / layout.temporary_name(target.name, os.getpid(), secrets.token_hex(4))
    tmp.mkdir()
    try:
        states = {}
        for rel, blob in blobs.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob, dst)
            states[rel] = _state(dst)
        (tmp / layout.MANIFEST).write_bytes(manifest_bytes)
        (tmp / STATE).write_text(json.dumps({"format": _STATE_FORMAT, "manifest_sha256": manifest_sha,
                                             "files": states}, indent=1, sort_keys=True), encoding="utf-8")
        for _ in range(5):
            try:
                os.rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            current = _dir_id(target)
            if current is None:
                continue
            if current != judged and _intact(target, manifest_sha, files, verify=False):
                return  # another process just built the same directory: keep it (it may be in use)
            # an older build (the version's manifest changed): swap it out
            trash = parent / f"{layout.trash_name(target.name, os.getpid())}-{secrets.token_hex(4)}"
            try:
                os.rename(target, trash)  # readers that hold the old files keep them (open files, mmaps)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        raise ArtifactError(f"could not put {target} in place: other processes keep replacing it")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dir_id(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporaries (``.tmp-*``, ``.trash-*``, ``.*.tmp``) that a dead process left over an hour ago."""
    now = time.time()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith((layout.TMP_PREFIX, layout.TRASH_PREFIX)) or (name.startswith(".") and
                                                                               name.endswith(".tmp"))):
            continue
        try:
            if now - entry.lstat().st_mtime < _STALE_TEMP_SECONDS:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue

