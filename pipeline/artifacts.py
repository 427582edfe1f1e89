"""The versioned artifact store.

Every stage writes one directory ``<root>/<dataset>/<stage>/v<FORMAT>-<digest>/``. The digest is a
hash of the canonical JSON of the stage name, its format version, its resolved parameters and the
versions of its parents (a Merkle chain), so the same inputs give the same directory and a changed
parameter gives new directories for exactly the stages below it. Source code is never hashed.

Publishing is atomic: the stage writes into a temporary sibling ``.tmp-<version>-<pid>-<token>``;
``manifest.json`` is written last, then the directory is renamed into place and the stage's
``latest`` pointer (a symlink) is swapped atomically. A crash leaves at most a temporary directory,
which the next publish of that stage removes once its process is gone.

Whatever serves or is promoted is checked with ``verify_once``: every file's sha256 against the
manifest, once per change, remembered by a verified-stamp in the per-machine scratch directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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

from . import __version__
from .download import file_digest
from .errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
DIGEST_CHARS = 16
_PACKAGES = ("numpy", "pyarrow", "numba", "luigi", "gensim", "torch", "torchvision")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def default_root() -> Path:
    """The artifact root when none is configured: ``GROVE_ARTIFACTS`` or ``./artifacts``."""
    return Path(os.environ.get("GROVE_ARTIFACTS") or "artifacts")


@dataclass(frozen=True)
class ArtifactRef:
    """The address of one version of one stage of one dataset."""

    root: Path
    dataset: str
    stage: str
    format_version: int
    digest: str

    @property
    def version(self) -> str:
        return f"v{self.format_version}-{self.digest}"

    @property
    def stage_dir(self) -> Path:
        return Path(self.root) / self.dataset / self.stage

    @property
    def path(self) -> Path:
        return self.stage_dir / self.version

    @property
    def key(self) -> str:
        """Root-relative name recorded in children's manifests: ``dataset/stage/version``."""
        return f"{self.dataset}/{self.stage}/{self.version}"

    def exists(self) -> bool:
        """True only for a published (complete) version: its manifest is there."""
        return (self.path / MANIFEST).is_file()


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
    return ArtifactRef(Path(root), dataset, stage, int(format_version), digest)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "grove": __version__}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Remove temporaries whose writing process no longer runs. Returns what was removed.

    The artifact root is assumed to be written from one host (a local disk), as the pid check says.
    """
    removed = []
    if not stage_dir.is_dir():
        return removed
    for tmp in stage_dir.glob(f"{TMP_PREFIX}*"):
        parts = tmp.name[len(TMP_PREFIX) :].rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        log.info("removing stale temporary %s (its process %s is gone)", tmp, parts[1])
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_pointer(stage_dir: Path, name: str, version: str) -> None:
    """Point ``stage_dir/name`` (a symlink) at ``version``, replacing any old pointer atomically."""
    tmp = stage_dir / f".{name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    os.replace(tmp, stage_dir / name)


def read_pointer(stage_dir: Path, name: str = LATEST) -> str | None:
    link = stage_dir / name
    return os.readlink(link) if link.is_symlink() else None


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
    """
    ref.stage_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(ref.stage_dir)
    if ref.exists():
        return read_manifest(ref.path)
    tmp = ref.stage_dir / f"{TMP_PREFIX}{ref.version}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
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
        _write_json_durably(tmp / MANIFEST, manifest)
        try:
            os.rename(tmp, ref.path)
        except OSError:
            if not ref.exists():
                raise
            log.info("%s was published by another process meanwhile; keeping that copy", ref.key)
            shutil.rmtree(tmp)
            return read_manifest(ref.path)
        _fsync_dir(ref.stage_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_pointer(ref.stage_dir, LATEST, ref.version)
    log.info("published %s (%.1f s)", ref.key, manifest["seconds"])
    return manifest


def read_manifest(path: str | os.PathLike, verify: str = "size") -> dict:
    """The manifest of the artifact at ``path``, after checking the files it lists.

    verify: ``"none"``, ``"size"`` (every file exists with its recorded size) or ``"sha256"``
    (also recompute every digest). Raises ArtifactError naming the file and what differs.
    """
    path = Path(path)
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
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(
                f"{f}: {size} bytes, the manifest says {info['bytes']}; the file is truncated or changed. "
                f"Delete {path} and rebuild."
            )
        if verify == "sha256":
            actual = file_digest(f)
            if actual != info["sha256"]:
                raise ArtifactError(
                    f"{f}: sha256 {actual} does not match the manifest's {info['sha256']}; the file is corrupt. "
                    f"Delete {path} and rebuild."
                )
    return manifest


def list_versions(root: str | os.PathLike, dataset: str, stage: str) -> list[dict]:
    """Manifests of every published version of a stage, oldest first; ``latest`` is marked."""
    stage_dir = Path(root) / dataset / stage
    if not stage_dir.is_dir():
        return []
    latest = read_pointer(stage_dir)
    out = []
    for d in stage_dir.iterdir():
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and (d / MANIFEST).is_file():
            m = read_manifest(d, verify="none")
            m["path"] = str(d)
            m["latest"] = d.name == latest
            out.append(m)
    return sorted(out, key=lambda m: (m.get("created_utc", ""), m["version"]))


# --- verified once per change --------------------------------------------------------------------

VERIFIED_DIR = "verified"
_STAMP_FORMAT = 1
# A file changed within this many nanoseconds of being stamped could change again inside the same
# timestamp tick without its mtime moving (git's "racy clean" problem); such a version is verified
# but not stamped, so the next use hashes it again. (Local file systems tick every few ms.)
RACY_NS = 1_000_000_000


def stamp_path(path: str | os.PathLike) -> Path:
    """Where the verified-stamp of the version at ``path`` lives: in this machine's scratch directory
    (``<scratch>/verified/<sha256 of the resolved path>.json``), never inside the artifact."""
    from .paths import scratch_dir

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return scratch_dir() / VERIFIED_DIR / f"{key}.json"


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


def _damage(path: Path, manifest: dict, f: Path, problem: str) -> ArtifactError:
    dataset = manifest.get("dataset") or path.parent.parent.name
    return ArtifactError(f"{f}: {problem}; the version {path.name} is damaged. "
                         f"Run `grove run {dataset} --rebuild` to remove and rebuild it.")


def verify_once(path: str | os.PathLike, force: bool = False) -> dict:
    """The manifest of the version at ``path``, after checking every file's sha256 once per change.

    A stamp in the scratch directory remembers each file's (size, mtime_ns, ctime_ns, inode) as they
    were when their digests last matched the manifest; when they all still match, the files are
    trusted without reading them. Otherwise (or with ``force``) every file is hashed again and, if all
    match, the stamp is rewritten (atomically). Raises ArtifactError naming the missing, truncated or
    changed file and telling the user to run ``grove run DATASET --rebuild``.
    """
    path = Path(path)
    manifest = read_manifest(path, verify="none")
    files = {MANIFEST: path / MANIFEST, **{rel: path / rel for rel in manifest.get("files", {})}}
    state = {}
    for rel, f in files.items():
        try:
            state[rel] = _file_state(f)
        except FileNotFoundError:
            raise _damage(path, manifest, f, "listed in the manifest but missing") from None
    stamp = stamp_path(path)
    if not force:
        known = _read_stamp(stamp)
        if known and known.get("path") == str(path.resolve()) and known.get("files") == state:
            return manifest
    for rel, info in manifest.get("files", {}).items():
        f = files[rel]
        if state[rel][0] != info["bytes"]:
            raise _damage(path, manifest, f, f"{state[rel][0]} bytes, the manifest says {info['bytes']}")
        actual = file_digest(f)
        if actual != info["sha256"]:
            raise _damage(path, manifest, f, f"sha256 {actual} does not match the manifest's {info['sha256']}")
    if any(_file_state(f) != state[rel] for rel, f in files.items()):
        # Changed while it was being read: what was hashed may not be what is there now.
        raise _damage(path, manifest, path, "its files changed while they were being verified")
    if max(max(s[1], s[2]) for s in state.values()) > time.time_ns() - RACY_NS:
        log.debug("%s: written moments ago; verified but not stamped", path)
        return manifest
    try:
        write_json_atomic(stamp, {"format": _STAMP_FORMAT, "path": str(path.resolve()), "files": state,
                                  "verified_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except OSError as exc:  # a scratch directory we cannot write only costs a re-hash next time
        log.warning("could not write the verified-stamp %s (%s); %s will be hashed again next time",
                    stamp, exc, path)
    return manifest
