"""Dated snapshots of mutable sources: files a publisher updates in place, with no pinned checksum.

Each date's run downloads every ``mutable = true`` source of a dataset again and writes
``<root>/<dataset>/snapshots/<date>.json``: per source the sha256 it saw, its size, where it came
from and whether it differs from the newest earlier snapshot. Those digests are the "pins" that
``config.apply_pins`` fills into the config, so the fetch stage's parameters (and the digest of
every stage below it) are the same as yesterday's when the bytes are, and the chain is rebuilt only
when they changed.

The downloaded file is kept content-addressed in the dataset's download cache,
``.downloads/by-sha256/<sha256>/<filename>``, where the fetch stage finds it without downloading
it a second time. A later snapshot never overwrites it, so a date whose chain has not run yet still
finds the bytes it pinned even if the publisher has changed the file since.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import download
from .artifacts import write_json_atomic
from .config import mutable_sources
from .errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
BY_SHA256 = "by-sha256"

Report = Callable[[float, str], None]


def _quiet(fraction: float, message: str) -> None:
    pass


def content_path(cache_dir: Path, sha256: str, filename: str) -> Path:
    """Where the download cache keeps the bytes of a mutable source with this sha256."""
    return Path(cache_dir) / BY_SHA256 / sha256 / filename


def snapshot_path(root: Path, dataset: str, date: dt.date) -> Path:
    return Path(root) / dataset / SNAPSHOTS / f"{date.isoformat()}.json"


def read_snapshot(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the snapshot record {path}: {exc}; delete it to take it again") from exc
    if not isinstance(record, dict) or not isinstance(record.get("pins"), dict):
        raise ArtifactError(f"the snapshot record {path} has no pins; delete it to take it again")
    return record


def snapshot_dates(root: Path, dataset: str) -> list[dt.date]:
    """Dates with a snapshot record, oldest first."""
    found = []
    for path in (Path(root) / dataset / SNAPSHOTS).glob("*.json"):
        try:
            found.append(dt.date.fromisoformat(path.stem))
        except ValueError:
            continue
    return sorted(found)


def latest_snapshot(root: Path, dataset: str, before: dt.date | None = None) -> dict | None:
    """The newest snapshot record (strictly before ``before`` if given), or None."""
    dates = [d for d in snapshot_dates(root, dataset) if before is None or d < before]
    return read_snapshot(snapshot_path(root, dataset, dates[-1])) if dates else None


def latest_pins(root: Path, cfg: dict) -> dict[str, str]:
    """The pins of the newest snapshot of ``cfg``'s dataset ({} if it has no mutable source).

    Used where no date is given (``grove query`` before anything serves, ``grove run --rebuild``);
    a dataset with mutable sources and no snapshot yet is a ConfigError saying how to take one.
    """
    names = mutable_sources(cfg)
    if not names:
        return {}
    record = latest_snapshot(root, cfg["dataset"]["name"])
    if record is None:
        raise ConfigError(f"{cfg['_path']}: sources {', '.join(names)} are mutable and no snapshot of them exists "
                          f"yet; run `grove run {cfg['dataset']['name']}` or `grove rebuild` to take one")
    return {name: record["pins"][name] for name in names if name in record["pins"]}


def take_snapshot(cfg: dict, root: Path, date: dt.date, mirror: str | None = None,
                  report: Report = _quiet) -> dict:
    """Download every mutable source of ``cfg`` for ``date``; write and return the snapshot record.

    Each file goes to a per-date scratch directory first, is hashed, and then moves to its
    content-addressed place in the cache (replacing a copy of the same bytes: fetch versions keep
    their own hard links). The
    record is written last and atomically: a run killed half way leaves no record, so the next run
    takes the snapshot again.
    """
    dataset = cfg["dataset"]["name"]
    cache = Path(root) / dataset / ".downloads"
    scratch = cache / ".snapshot" / date.isoformat()
    previous = latest_snapshot(root, dataset, before=date)
    names = mutable_sources(cfg)
    sources = {}
    for i, name in enumerate(names):
        src = cfg["sources"][name]
        urls = download.candidate_urls(src["filename"], src["urls"], mirror, subdir=cfg["dataset"]["mirror_subdir"])

        def progress(done: int, total: int | None, i=i, name=name) -> None:
            report((i + (done / total if total else 0.0)) / len(names), f"snapshot {name}: {done / 1e6:.1f} MB")

        got, sha256 = download.fetch_unpinned(urls, scratch / src["filename"], progress=progress)
        size = got.stat().st_size
        kept = content_path(cache, sha256, src["filename"])
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, kept)  # bytes just hashed: replacing an older copy also repairs a damaged one
        before = (previous or {}).get("sources", {}).get(name)
        changed = before is None or before["sha256"] != sha256
        log.info("%s: mutable source %s is %s (sha256 %s, %d bytes)", dataset, name,
                 "new" if before is None else ("changed since " + previous["date"]) if changed
                 else "unchanged since " + previous["date"], sha256, size)
        sources[name] = {"filename": src["filename"], "sha256": sha256, "bytes": size, "urls": urls,
                         "changed": changed, "previous_sha256": before["sha256"] if before else None}
    try:
        scratch.rmdir()
    except OSError:
        pass
    record = {"dataset": dataset, "date": date.isoformat(), "pins": {n: s["sha256"] for n, s in sources.items()},
              "sources": sources, "previous": previous["date"] if previous else None,
              "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(snapshot_path(root, dataset, date), record)
    report(1.0, f"snapshot of {len(names)} mutable source(s)")
    return record


def plan_cache_gc(root: Path, keep: int) -> list[Path]:
    """Cached bytes of mutable sources that no snapshot among each dataset's newest ``keep`` pins, and
    the scratch directories of killed snapshots whose date is done or older than the newest snapshot."""
    doomed = []
    for dataset_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        dates = snapshot_dates(root, dataset_dir.name)
        by_sha = dataset_dir / ".downloads" / BY_SHA256
        if by_sha.is_dir():
            kept: set[str] = set()
            for date in dates[-keep:]:
                kept.update(read_snapshot(snapshot_path(root, dataset_dir.name, date))["pins"].values())
            doomed.extend(p for p in sorted(by_sha.iterdir()) if p.name not in kept)
        scratch = dataset_dir / ".downloads" / ".snapshot"
        if scratch.is_dir() and dates:
            doomed.extend(p for p in sorted(scratch.iterdir()) if p.name <= dates[-1].isoformat())
    return doomed
