"""Dated snapshots of mutable sources: files a publisher updates in place, with no pinned checksum.

Each date's run downloads every ``mutable = true`` source of a dataset again and writes the record
``layout.snapshot_key(dataset, date)`` (``<dataset>/snapshots/<date>.json``) in the artifact root: per
source the sha256 it saw, its size, where it came from and whether it differs from the newest earlier
snapshot. Those digests are the "pins" that ``config.apply_pins`` fills into the config, so the fetch
stage's parameters (and the digest of every stage below it) are the same as yesterday's when the
bytes are, and the chain is rebuilt only when they changed.

The downloaded bytes are kept content-addressed in the artifact root,
``layout.snapshot_bytes_key`` (``<dataset>/snapshots/by-sha256/<sha256>/<filename>``), where the fetch
stage on any machine finds them without downloading them a second time. A later snapshot never
overwrites them, so a date whose chain has not run yet still finds the bytes it pinned even if the
publisher has changed the file since. The download itself goes to this machine's scratch directory
first (``layout.snapshot_scratch``), so nothing half-downloaded ever lands in the root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import download, layout
from .artifacts import location, store_of
from .config import mutable_sources
from .errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from .config import DatasetConfig

log = logging.getLogger(__name__)

SNAPSHOTS = layout.SNAPSHOTS
BY_SHA256 = layout.BY_SHA256

Report = Callable[[float, str], None]


def _quiet(fraction: float, message: str) -> None:
    pass


def content_path(cache_dir: Path, sha256: str, filename: str) -> Path:
    """Where a local download cache (this machine's scratch) keeps the bytes of a source with this sha256."""
    return Path(cache_dir) / BY_SHA256 / sha256 / filename


def _check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("pins"), dict):
        raise ArtifactError(f"the snapshot record {where} has no pins; delete it to take it again")
    return record


def read_snapshot(path: str | os.PathLike) -> dict:
    """The snapshot record in the local file ``path``."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the snapshot record {path}: {exc}; delete it to take it again") from exc
    return _check_record(record, str(path))


def load_snapshot(root: str | os.PathLike, dataset: str, date: dt.date) -> dict | None:
    """The snapshot record of ``date`` in the artifact root (local or object store); None if there is none."""
    store = store_of(root)
    key = layout.snapshot_key(dataset, date)
    where = location(root, key)
    try:
        record = store.read_json(key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the snapshot record {where}: {exc}; delete it to take it again") from exc
    return _check_record(record, where)


def snapshot_dates(root: str | os.PathLike, dataset: str) -> list[dt.date]:
    """Dates with a snapshot record, oldest first."""
    names = store_of(root).list(layout.snapshots_prefix(dataset))
    return sorted(d for d in map(layout.snapshot_date, names) if d is not None)


def latest_snapshot(root: str | os.PathLike, dataset: str, before: dt.date | None = None) -> dict | None:
    """The newest snapshot record (strictly before ``before`` if given), or None."""
    dates = [d for d in snapshot_dates(root, dataset) if before is None or d < before]
    return load_snapshot(root, dataset, dates[-1]) if dates else None


def latest_pins(root: str | os.PathLike, cfg: DatasetConfig) -> dict[str, str]:
    """The pins of the newest snapshot of ``cfg``'s dataset ({} if it has no mutable source).

    Used where no date is given (``grove query`` before anything serves, ``grove run --rebuild``);
    a dataset with mutable sources and no snapshot yet is a ConfigError saying how to take one.
    """
    names = mutable_sources(cfg)
    if not names:
        return {}
    record = latest_snapshot(root, cfg.name)
    if record is None:
        raise ConfigError(f"{cfg.path}: sources {', '.join(names)} are mutable and no snapshot of them exists "
                          f"yet; run `grove run {cfg.name}` or `grove rebuild` to take one")
    return {name: record["pins"][name] for name in names if name in record["pins"]}


def take_snapshot(cfg: DatasetConfig, root: str | os.PathLike, date: dt.date, mirror: str | None = None,
                  report: Report = _quiet) -> dict:
    """Download every mutable source of ``cfg`` for ``date``; write and return the snapshot record.

    Each file goes to this machine's per-date scratch directory first, is hashed, and is then stored
    content-addressed in the artifact root (replacing a copy of the same bytes: fetch versions keep
    their own copies). The record is written last and atomically: a run killed half way leaves no
    record, so the next run takes the snapshot again; its scratch is removed by the next snapshot of
    the dataset on this machine.
    """
    dataset = cfg.name
    store = store_of(root)
    _clean_scratch(root, dataset)
    scratch = layout.snapshot_scratch(dataset, date)
    previous = latest_snapshot(root, dataset, before=date)
    names = mutable_sources(cfg)
    sources = {}
    for i, name in enumerate(names):
        src = cfg.sources[name]
        urls = download.candidate_urls(src.filename, src.urls, mirror, subdir=cfg.dataset.mirror_subdir)

        def progress(done: int, total: int | None, i=i, name=name) -> None:
            report((i + (done / total if total else 0.0)) / len(names), f"snapshot {name}: {done / 1e6:.1f} MB")

        got, sha256 = download.fetch_unpinned(urls, scratch / src.filename, progress=progress)
        size = got.stat().st_size
        # Bytes just hashed: replacing an older copy also repairs a damaged one.
        store.upload(got, layout.snapshot_bytes_key(dataset, sha256, src.filename))
        got.unlink()
        before = (previous or {}).get("sources", {}).get(name)
        changed = before is None or before["sha256"] != sha256
        log.info("%s: mutable source %s is %s (sha256 %s, %d bytes)", dataset, name,
                 "new" if before is None else ("changed since " + previous["date"]) if changed
                 else "unchanged since " + previous["date"], sha256, size)
        sources[name] = {"filename": src.filename, "sha256": sha256, "bytes": size, "urls": urls,
                         "changed": changed, "previous_sha256": before["sha256"] if before else None}
    try:
        scratch.rmdir()
    except OSError:
        pass
    record = {"dataset": dataset, "date": date.isoformat(), "pins": {n: s["sha256"] for n, s in sources.items()},
              "sources": sources, "previous": previous["date"] if previous else None,
              "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    store.write_json(layout.snapshot_key(dataset, date), record)
    report(1.0, f"snapshot of {len(names)} mutable source(s)")
    return record


def _clean_scratch(root: str | os.PathLike, dataset: str) -> None:
    """Remove this machine's scratch of killed snapshots of ``dataset`` whose date is done (it has a
    record) or older than the newest snapshot: nobody resumes them (a snapshot never resumes)."""
    import shutil

    base = layout.snapshot_scratch(dataset)
    if not base.is_dir():
        return
    dates = snapshot_dates(root, dataset)
    for path in sorted(base.iterdir()):
        if dates and path.name <= dates[-1].isoformat():
            log.debug("removing the scratch of an interrupted snapshot %s", path)
            shutil.rmtree(path, ignore_errors=True)


def plan_cache_gc(root: str | os.PathLike, keep: int) -> list[str]:
    """Keys (``<dataset>/snapshots/by-sha256/<sha256>``) of stored bytes of mutable sources that no
    snapshot among each dataset's newest ``keep`` pins."""
    store = store_of(root)
    doomed = []
    for dataset in (name for name in store.list("") if layout.is_dataset(name)):
        prefix = layout.snapshot_bytes_prefix(dataset)
        stored = store.list(prefix)
        if not stored:
            continue
        kept: set[str] = set()
        for date in snapshot_dates(root, dataset)[-keep:]:
            kept.update((load_snapshot(root, dataset, date) or {"pins": {}})["pins"].values())
        doomed.extend(f"{prefix}/{sha}" for sha in stored if sha not in kept)
    return doomed
