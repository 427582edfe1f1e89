"""Every name grove gives a file or directory: inside the artifact root, and in this machine's scratch.

The artifact root (a local directory or an object store, see ``pipeline.store``) holds, per dataset::

    <dataset>/<stage>/v<FORMAT>-<digest>/manifest.json   one version of one stage (manifest written last)
    <dataset>/<stage>/latest                            pointer to the newest published version
    <dataset>/<stage>/.tmp-<version>-<pid>-<token>/     a version being written (local roots)
    <dataset>/<stage>/<version>/.attempts/<id>/         one upload attempt's files (object stores)
    <dataset>/serving                                   pointer to ``evaluate/<version>``, what answers queries
    <dataset>/serving.log                               every promotion, one JSON line each (local roots)
    <dataset>/serving-history/<time>-<token>.json       every promotion, one object each (object stores)
    <dataset>/records/<date>.json, <date>.rejected.json the nightly rebuild's verdict for a date
    <dataset>/snapshots/<date>.json                     a dated snapshot of the mutable sources
    <dataset>/snapshots/by-sha256/<sha256>/<filename>   the bytes a snapshot pinned (any machine's Fetch finds them)
    index.html                                          the index page of ``grove report``

Inside a version, each stage writes the files named below (``ITEMS`` ... ``REPORT_JSON``; the registry
in ``pipeline.stages`` lists them per stage and says which are measured). The directories ``index/``
and ``model/`` are formats of their own, whose inner names belong to ``pipeline.forest`` and
``pipeline.cnn`` (as a file format's inner layout belongs to its reader).

Keys are ``/``-separated and relative to the root; ``pipeline.store.Store.key`` checks them. Nothing
else in grove spells these names.

The scratch directory (``pipeline.paths.scratch_dir()``: per machine, safe to lose) holds what must
not be shared between machines: partial downloads, CNN training checkpoints, a snapshot's download
in progress, the temporaries of a version being published to an object store, verified-stamps and
repair ledgers.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from .paths import check_name, scratch_dir

MANIFEST = "manifest.json"
LATEST = "latest"
SERVING = "serving"
SERVING_LOG = "serving.log"
SERVING_HISTORY = "serving-history"
RECORDS = "records"
SNAPSHOTS = "snapshots"
BY_SHA256 = "by-sha256"
INDEX_PAGE = "index.html"
ATTEMPTS = ".attempts"  # object stores: <version>/.attempts/<id>/ holds one publishing attempt's files
PROBE_PREFIX = ".grove-probe-"  # <root>/.grove-probe-<token>: Store.check(write=True) writes and deletes it
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
SERVED_STAGE = "evaluate"  # what ``serving`` points into
VERIFIED = "verified"  # scratch: verified-stamps
REPAIRS = "repairs"  # scratch: repair ledgers

# Files inside a version, by the stage that writes them.
ITEMS = "items.arrow"  # decode: the decoded items; forest: its item ids with their keys
FEATURES = "features.npy"  # features: a frozen backbone's features, float32 (n, feature_dim)
MODEL_DIR = "model"  # train: the trained CNN (pipeline.cnn's format)
VECTORS = "vectors.arrow"  # embed: every item's vector
BASE = "base.arrow"  # split: the vectors the index holds
QUERIES = "queries.arrow"  # split: the query vectors
NEIGHBORS = "neighbors.npy"  # exact: int64 (n_queries, k) ground-truth ids
DISTANCES = "distances.npy"  # exact: float32 (n_queries, k) their distances
INDEX_DIR = "index"  # forest: the index (pipeline.forest's format)
TREES_DIR = "trees"  # forest-part: a share of a forest's trees (pipeline.forest.save_trees)
PART_VECTORS = "vectors.npy"  # embed-part: float32 (rows, dim), the vectors of a range of items
RESULTS_JSON = "results.json"  # evaluate: recall and quality (reproducible; pipeline.evaluate.read_results)
TIMINGS_JSON = "timings.json"  # evaluate: QPS and seconds (measured)
RESULTS_PARQUET = "results.parquet"  # evaluate: every result column, for analysis (measured)
REPORT_HTML = "report.html"  # evaluate: the report page (measured: it shows QPS and when it was made)
REPORT_JSON = "report.json"  # evaluate: the report's data (measured)

# Children of a dataset directory that are not stages.
NOT_STAGES = frozenset({RECORDS, SNAPSHOTS, SERVING, SERVING_LOG, SERVING_HISTORY})
_VERSION = re.compile(r"v(\d+)-([0-9a-f]+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- versions -------------------------------------------------------------------------------------


def version_name(format_version: int, digest: str) -> str:
    """``v<FORMAT>-<digest>``: the directory name of one version of a stage."""
    return f"v{int(format_version)}-{digest}"


def parse_version(name: str) -> tuple[int, str] | None:
    """``(format, digest)`` of a version name, None when ``name`` is not one."""
    m = _VERSION.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def is_version(name: str) -> bool:
    return parse_version(name) is not None


def is_dataset(name: str) -> bool:
    """A child of the root that can be a dataset directory (not index.html, not a dot-name)."""
    return not name.startswith(".") and name != INDEX_PAGE


def is_stage(name: str) -> bool:
    """A child of a dataset directory that holds versions of a stage."""
    return not name.startswith(".") and name not in NOT_STAGES


def dataset_key(dataset: str) -> str:
    return dataset


def stage_key(dataset: str, stage: str) -> str:
    return f"{dataset}/{stage}"


def version_key(dataset: str, stage: str, version: str) -> str:
    """``dataset/stage/version``: a version's name relative to the root, as children's manifests record it."""
    return f"{dataset}/{stage}/{version}"


def split_version_key(key: str) -> tuple[str, str, str]:
    """``(dataset, stage, version)`` of a version key; ValueError when ``key`` is not one."""
    parts = key.strip("/").split("/")
    if len(parts) != 3 or not is_version(parts[2]):
        raise ValueError(f"{key!r} is not a version key (dataset/stage/v<FORMAT>-<digest>)")
    return parts[0], parts[1], parts[2]


def manifest_key(version_key_: str) -> str:
    return f"{version_key_}/{MANIFEST}"


def is_attempt_key(key: str) -> bool:
    """A key inside one publishing attempt (``<version>/.attempts/<id>/...``) of an object store."""
    return ATTEMPTS in key.split("/")


def temporary_name(version: str, pid: int, token: str) -> str:
    """A version being written beside its stage's versions (local roots)."""
    return f"{TMP_PREFIX}{version}-{pid}-{token}"


def parse_temporary(name: str) -> int | None:
    """The writer's pid of a temporary name, None when ``name`` is not a temporary."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name[len(TMP_PREFIX):].rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def trash_name(name: str, pid: int) -> str:
    return f"{TRASH_PREFIX}{name}-{pid}"


# --- pointers and history -------------------------------------------------------------------------


def serving_target(version: str) -> str:
    """What the ``serving`` pointer holds: the evaluate version, relative to the dataset directory."""
    return f"{SERVED_STAGE}/{version}"


def served_version(target: str | None) -> str | None:
    """The evaluate version a ``serving`` pointer names (None for none or a malformed pointer)."""
    if not target or "/" not in target:
        return None
    return target.split("/", 1)[1]


def serving_log_key(dataset: str) -> str:
    return f"{dataset}/{SERVING_LOG}"


def serving_history_prefix(dataset: str) -> str:
    return f"{dataset}/{SERVING_HISTORY}"


def serving_event_name(when: dt.datetime, token: str) -> str:
    """One promotion's object: named by its time (microseconds, UTC) so that names sort in order."""
    return f"{when.astimezone(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{token}.json"


# --- records and snapshots ------------------------------------------------------------------------


def records_prefix(dataset: str) -> str:
    return f"{dataset}/{RECORDS}"


def record_key(dataset: str, date: dt.date | str, rejected: bool = False) -> str:
    """The nightly rebuild's record of ``date`` (``.rejected.json`` when the gate refused it)."""
    day = date if isinstance(date, str) else date.isoformat()
    return f"{records_prefix(dataset)}/{day}{'.rejected' if rejected else ''}.json"


def snapshots_prefix(dataset: str) -> str:
    return f"{dataset}/{SNAPSHOTS}"


def snapshot_key(dataset: str, date: dt.date) -> str:
    return f"{snapshots_prefix(dataset)}/{date.isoformat()}.json"


def snapshot_date(name: str) -> dt.date | None:
    """The date of a snapshot record's file name, None when ``name`` is not one."""
    if not name.endswith(".json"):
        return None
    try:
        return dt.date.fromisoformat(name[: -len(".json")])
    except ValueError:
        return None


def snapshot_bytes_prefix(dataset: str) -> str:
    return f"{snapshots_prefix(dataset)}/{BY_SHA256}"


def snapshot_bytes_key(dataset: str, sha256: str, filename: str) -> str:
    """Where the root keeps the bytes of a mutable source that a snapshot pinned."""
    if not _SHA256.fullmatch(sha256 or ""):
        raise ValueError(f"{sha256!r} is not a sha256")
    return f"{snapshot_bytes_prefix(dataset)}/{sha256}/{filename}"


def index_page_key() -> str:
    return INDEX_PAGE


# --- this machine's scratch directory -------------------------------------------------------------


def download_cache(dataset: str) -> Path:
    """Fetch's download cache of ``dataset`` on this machine (a cut download resumes from it)."""
    return scratch_dir() / "downloads" / check_name(dataset)


def snapshot_scratch(dataset: str, date: dt.date | None = None) -> Path:
    """Where a snapshot of ``dataset`` downloads its files before they are hashed (per date)."""
    base = scratch_dir() / "snapshot-downloads" / check_name(dataset)
    return base / date.isoformat() if date is not None else base


def checkpoints_dir(dataset: str, version: str) -> Path:
    """CNN training checkpoints of one train version on this machine (a killed training resumes)."""
    return scratch_dir() / "checkpoints" / check_name(dataset) / check_name(version, "version")


def publish_scratch() -> Path:
    """Where versions for an object-store root are written before they are uploaded."""
    return scratch_dir() / "publish"


def verified_dir() -> Path:
    """Verified-stamps (see ``pipeline.artifacts.verify_once``)."""
    return scratch_dir() / VERIFIED


def repairs_dir() -> Path:
    """Repair ledgers (see ``pipeline.lifecycle.repair``)."""
    return scratch_dir() / REPAIRS
