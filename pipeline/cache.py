"""This machine's cache of remote versions: fetched once, verified on the way in, then memory-mapped.

Layout, under ``<scratch>/cache/`` (per machine, safe to delete at any time)::

    sha256/<sha256>                  one file's bytes, named by their digest (read-only)
    versions/<id>/<rel>              a version's files: hard links to the blobs above
    versions/<id>/manifest.json      the version's manifest, as published
    versions/<id>/.grove-cache.json  what this directory was built from (and each file's stat state)
    manifests/<id>.json              a version's manifest read through ``cached_manifest``, with its sha256

``<id>`` names the store and the version (sha256 of the endpoint, the root URI and the prefix).
A blob is downloaded to a temporary name, hashed on the way in, compared with the manifest, made
read-only and renamed into place: two processes filling the same blob at once each rename a
complete, verified copy. A version directory is assembled in a temporary sibling and renamed into
place the same way.

A version does not change once its manifest exists: its name is the digest of what built it, and
its manifest lists every file with its sha256 (a second publisher of the same version may replace
the manifest, naming its own upload: the same reproducible bytes, other measurements). So what this
machine fetched and verified once is trusted without asking the store again: a later ``localize``
makes no request when the directory is intact, that is when every file still has the size, mtime,
ctime and inode recorded when it was verified (the rule of ``artifacts.verify_once``; a write moves
mtime and ctime, a replaced file has a new inode, ``touch -d`` cannot put ctime back). A file whose
state changed is hashed again: intact, its new state is recorded; damaged, it is logged and fetched
again. ``verify=True`` reads the store's manifest and hashes every file regardless.

What can change is read from the store every time: ``open_serving`` reads the ``serving`` pointer
(one GET) and follows a promotion or a rollback at once; everything under it comes from here.
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
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .errors import ArtifactError
from .paths import file_sha256, scratch_dir
from .store import Store

log = logging.getLogger(__name__)

CACHE = "cache"
BLOBS = "sha256"
VERSIONS = "versions"
MANIFESTS = "manifests"
STATE = ".grove-cache.json"
_STATE_FORMAT = 2  # 2: a file's state is [size, mtime_ns, ctime_ns, inode]
_MANIFEST_FORMAT = 1
FETCH_THREADS = 4  # files of one version downloaded at once
_STALE_TEMP_SECONDS = 3600  # temporaries of a process that died are removed after this long


def cache_dir() -> Path:
    return scratch_dir() / CACHE


def _identity(store: Store, prefix: str) -> str:
    """The name of version ``prefix`` of ``store`` in this cache: endpoint, root and prefix hashed."""
    identity = "\n".join((getattr(store, "endpoint_url", None) or "", store.uri.rstrip("/"), store.key(prefix)))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def version_dir(store: Store, prefix: str) -> Path:
    """Where ``localize`` puts the version ``prefix`` of ``store`` on this machine."""
    return cache_dir() / VERSIONS / _identity(store, prefix)


def manifest_path(store: Store, prefix: str) -> Path:
    """Where ``cached_manifest`` keeps the manifest of the version ``prefix`` of ``store``."""
    return cache_dir() / MANIFESTS / f"{_identity(store, prefix)}.json"


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def localize(store: Store, prefix: str, verify: bool = False) -> Path:
    """A local directory holding the files of the published version ``prefix``, ready to memory-map.

    A local root returns the version's own directory (no copy). A remote one returns
    ``<scratch>/cache/versions/<id>/``: when this machine holds an intact copy, without any request
    to the store; otherwise the store's manifest is read and only what this machine does not hold
    yet is downloaded. ``verify=True`` always reads the store's manifest and hashes every file.
    ArtifactError when the version has no manifest, or when a downloaded file does not have the
    sha256 its manifest records (naming the key); StoreError when the store cannot be read.
    """
    if store.is_local:
        path = store.local_path(store.key(prefix))
        if not (path / layout.MANIFEST).is_file():
            raise ArtifactError(f"{path}: no {layout.MANIFEST}; this version is missing or was never completed. "
                                "Run the stage again to rebuild it")
        return path
    target = version_dir(store, prefix)
    if not verify and _trusted(target) is not None:
        log.debug("%s: cached in %s", store.where(prefix), target)
        return target
    manifest, keys = store.version_file_keys(prefix)  # one read; ArtifactError when there is no manifest
    manifest_bytes = _manifest_bytes(manifest)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    files = manifest["files"]
    if verify and _intact(target, manifest_sha, files, verify):  # without verify, _trusted judged it above
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


def cached_manifest(store: Store, prefix: str) -> dict:
    """The manifest of the published version ``prefix``.

    A local root reads it from the version's directory. An object store reads it once (one GET) and
    keeps it in this machine's cache with its sha256; later calls read that copy and ask the store
    nothing (a version does not change once published; see the module's docstring). A copy that no
    longer matches its sha256 is read from the store again. ArtifactError when the version has no
    readable manifest; StoreError when the store cannot be read.
    """
    if store.is_local:
        manifest, _ = store.version_file_keys(prefix)
        return manifest
    path = manifest_path(store, prefix)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        manifest = kept["manifest"]
        if kept.get("format") == _MANIFEST_FORMAT and \
                hashlib.sha256(_manifest_bytes(manifest)).hexdigest() == kept["sha256"]:
            return manifest
        log.warning("the cached manifest %s of %s is damaged; reading it again", path, store.where(prefix))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the cached manifest %s of %s is unreadable (%s); reading it again", path, store.where(prefix), exc)
    manifest, _ = store.version_file_keys(prefix)  # ArtifactError when there is no manifest
    kept = {"format": _MANIFEST_FORMAT, "version": store.where(prefix), "manifest": manifest,
            "sha256": hashlib.sha256(_manifest_bytes(manifest)).hexdigest()}
    try:
        _write_file(path, json.dumps(kept, sort_keys=True).encode())
    except OSError as exc:  # a scratch directory we cannot write only costs a read next time
        log.warning("could not keep the manifest of %s in %s (%s)", store.where(prefix), path, exc)
    return manifest


def open_version(store: Store, prefix: str) -> tuple[Path, dict]:
    """``(directory, manifest)`` of the published version ``prefix``, its files checked, ready to
    memory-map: what a query opens, at the least cost its guarantees allow.

    Local root: the version's own directory, checked with ``artifacts.verify_once`` (every file's
    sha256 once per change of its stat). Object store: this machine's copy (``localize``: no request
    to the store when an intact copy is here) and the manifest it was built from. ArtifactError
    naming the file and ``grove run DATASET --rebuild`` when the version is missing or damaged.
    """
    from .artifacts import verify_once

    key = store.key(prefix)
    if store.is_local:
        path = store.local_path(key)
        return path, verify_once(path)
    try:
        path = localize(store, key)
    except FileNotFoundError as exc:  # an object its manifest lists is gone from the store
        dataset, _, version = layout.split_version_key(key)
        raise ArtifactError(f"{exc.filename or store.where(key)}: listed in the manifest but missing; the version "
                            f"{version} is damaged. Run `grove run {dataset} --rebuild` to remove and rebuild "
                            "it.") from exc
    return path, json.loads((path / layout.MANIFEST).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Serving:
    """What serves a dataset, opened (``open_serving``): the evaluate ``version`` (``v2-...``) and its
    ``manifest``; its split and its forest with the most trees as version keys, local directories
    (checked, ready to memory-map) and manifests."""

    dataset: str
    version: str
    manifest: dict
    split: str
    forest: str
    split_dir: Path
    forest_dir: Path
    split_manifest: dict
    forest_manifest: dict


def served_parts(manifest: dict) -> tuple[str, str]:
    """``(split, forest)`` version keys of an evaluation's manifest: its split, and its forest with
    the most trees (parents ``forest_<n_trees>``). ArtifactError when it names none."""
    parents = manifest.get("parents") or {}
    forests = {name: key for name, key in parents.items() if name.startswith("forest_")}
    if "split" not in parents or not forests:
        raise ArtifactError(f"{manifest.get('dataset')}/{layout.SERVED_STAGE}/{manifest.get('version')}: its "
                            "manifest names no split or no forest; rebuild it")
    best = max(forests, key=lambda name: int(name.split("_")[1]))
    return parents["split"], forests[best]


def open_serving(store: Store, dataset: str) -> Serving | None:
    """What serves ``dataset`` (``grove query``, an application's index): the ``serving`` pointer ->
    the evaluation's manifest -> its split and forest, opened with ``open_version``. None when
    nothing serves.

    On an object store a later call costs one request (the pointer: a promotion or a rollback is
    followed at once); the manifests and the files come from this machine's cache, the files checked
    by their stat (``localize``). ArtifactError when the version the pointer names is missing or
    damaged; StoreError when the store cannot be read.
    """
    version = layout.served_version(store.get_pointer(layout.dataset_key(dataset), layout.SERVING))
    if version is None:
        return None
    key = layout.version_key(dataset, layout.SERVED_STAGE, version)
    try:
        manifest = cached_manifest(store, key)
    except ArtifactError:
        where = str(Path(store.where()).absolute()) if store.is_local else store.uri
        raise ArtifactError(f"{dataset}: the serving version {layout.serving_target(version)} is missing under the "
                            f"artifact root {where} (removed as damaged, or deleted); run `grove run {dataset} "
                            f"--rebuild` to build it again, or `grove rollback {dataset}`") from None
    split, forest = served_parts(manifest)
    split_dir, split_manifest = open_version(store, split)
    forest_dir, forest_manifest = open_version(store, forest)
    return Serving(dataset, version, manifest, split, forest, split_dir, forest_dir, split_manifest, forest_manifest)


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
        actual = store.download(key, tmp)  # the sha256 of the bytes written, hashed on the way in
        actual_size = tmp.stat().st_size
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
    """What the cache remembers of a verified file: size, mtime_ns, ctime_ns and inode (as
    ``artifacts.verify_once`` does)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _trusted(target: Path) -> dict | None:
    """The manifest of the copy in ``target`` when it is complete and intact (checked without the
    store: the manifest it was built from, and every file as it was verified), else None."""
    try:
        manifest_bytes = (target / layout.MANIFEST).read_bytes()
        manifest = json.loads(manifest_bytes.decode("utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    return manifest if _intact(target, hashlib.sha256(manifest_bytes).hexdigest(), files, False) else None


def _intact(target: Path, manifest_sha: str, files: dict, verify: bool) -> bool:
    """True when ``target`` was built from this manifest and every file is as it was verified. A
    file whose state changed (or every file, with ``verify``) is hashed: when it still matches, its
    new state is recorded; when not, it is logged (and its blob dropped) and False returned."""
    try:
        state = json.loads((target / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or \
            state.get("manifest_sha256") != manifest_sha:
        return False
    recorded = state.get("files", {})
    if not isinstance(recorded, dict) or set(recorded) != set(files):
        return False
    changed = {}
    for rel, info in files.items():
        path = target / rel
        try:
            now = _state(path)
        except OSError:
            return False
        if now == recorded[rel] and not verify:
            continue
        if now[0] != info.get("bytes") or file_sha256(path) != info["sha256"]:
            log.warning("the cached file %s does not have the sha256 its manifest records; fetching it again", path)
            blob = cache_dir() / BLOBS / info["sha256"]
            try:
                if blob.stat().st_ino == now[3]:  # the blob is that damaged file (not a fresh copy)
                    blob.unlink()
            except FileNotFoundError:
                pass
            return False
        if _state(path) != now:
            return False  # it changed while it was hashed: judge it again from scratch
        if now != recorded[rel]:
            changed[rel] = now  # touched (a link, a chmod) but intact
    if changed:
        try:
            _write_file(target / STATE, json.dumps({**state, "files": {**recorded, **changed}}, indent=1,
                                                   sort_keys=True).encode())
        except OSError as exc:  # only costs hashing these files again next time
            log.debug("could not record the new state of %s in %s: %s", sorted(changed), target, exc)
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
        for rel, blob in blobs.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob, dst)
        (tmp / layout.MANIFEST).write_bytes(manifest_bytes)
        for _ in range(5):
            # Recorded last, before each try: a link or an unlink changes the ctime of its blob (this
            # directory's links above, the removal of the directory it replaces below).
            states = {rel: _state(tmp / rel) for rel in blobs}
            _write_file(tmp / STATE, json.dumps({"format": _STATE_FORMAT, "manifest_sha256": manifest_sha,
                                                 "files": states}, indent=1, sort_keys=True).encode())
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


def _write_file(path: Path, data: bytes) -> None:
    """Write a small file of the cache through a temporary sibling and a rename (not fsynced: the
    cache is safe to lose, and a torn file reads as unreadable, so it is built again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
