"""What happens to versions after they are built: the quality gate, promotion to serving, rollback,
dated records, and garbage collection.

``<root>/<dataset>/serving`` is a symlink to ``evaluate/<version>``: the evaluation whose forests and
split answer queries. Promotion replaces it atomically; every promotion is appended to
``<root>/<dataset>/serving.log`` (JSON lines) so a rollback knows what served before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import artifacts, snapshot
from .errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

SERVING = "serving"
SERVING_LOG = "serving.log"


# --- quality gate --------------------------------------------------------------------------------


def gate_point(results: dict, gate: dict) -> dict | None:
    """The evaluation row the gate judges: at gate.n_trees and gate.search_k (0 = the largest of each)."""
    rows = [r for r in results["rows"] if r["n_trees"] > 0]
    n_trees = gate["n_trees"] or max(r["n_trees"] for r in rows)
    rows = [r for r in rows if r["n_trees"] == n_trees]
    if not rows:
        return None
    search_k = gate["search_k"] or max(r["search_k"] for r in rows)
    return next((r for r in rows if r["search_k"] == search_k), None)


def check_gate(results: dict, gate: dict) -> tuple[bool, list[str]]:
    """Whether an evaluation meets the config's ``[gate]``; the reasons when it does not."""
    row = gate_point(results, gate)
    if row is None:
        return False, [f"the evaluation has no row for n_trees={gate['n_trees']} search_k={gate['search_k']}; "
                       "add them to forest.n_trees / evaluate.search_k"]
    reasons = []
    if row["recall"] < gate["min_recall"]:
        reasons.append(f"recall@{results['k']} {row['recall']:.4f} < gate.min_recall {gate['min_recall']} "
                       f"(n_trees={row['n_trees']}, search_k={row['search_k']})")
    if gate["min_qps"] and row["qps"] < gate["min_qps"]:
        reasons.append(f"QPS {row['qps']:.0f} < gate.min_qps {gate['min_qps']:.0f} "
                       f"(n_trees={row['n_trees']}, search_k={row['search_k']})")
    return not reasons, reasons


# --- serving pointer -----------------------------------------------------------------------------


def serving_version(root: Path, dataset: str) -> str | None:
    """The evaluate version that serves ``dataset`` (``v1-...``), or None."""
    target = artifacts.read_pointer(Path(root) / dataset, SERVING)
    return target.split("/", 1)[1] if target else None


def promote(root: Path, dataset: str, version: str, reason: str = "promote") -> None:
    """Make evaluate/``version`` the serving one (an atomic pointer swap) and log it."""
    path = Path(root) / dataset / "evaluate" / version
    artifacts.read_manifest(path)  # only a complete, intact evaluation can serve
    artifacts.set_pointer(Path(root) / dataset, SERVING, f"evaluate/{version}")
    entry = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": version,
             "reason": reason}
    with open(Path(root) / dataset / SERVING_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    log.info("%s: serving %s (%s)", dataset, version, reason)


def serving_history(root: Path, dataset: str) -> list[dict]:
    path = Path(root) / dataset / SERVING_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rollback(root: Path, dataset: str) -> str:
    """Serve the version that served before the current one; returns it."""
    current = serving_version(root, dataset)
    previous = [e["version"] for e in serving_history(root, dataset) if e["version"] != current]
    if not previous:
        raise ConfigError(f"{dataset}: no earlier serving version to roll back to (serving: {current})")
    promote(root, dataset, previous[-1], reason=f"rollback from {current}")
    return previous[-1]


def serving_paths(root: Path, dataset: str) -> dict[str, Path]:
    """Directories of what serves: ``evaluate``, ``split`` and ``forest`` (the one with most trees)."""
    version = serving_version(root, dataset)
    if version is None:
        raise ArtifactError(f"{dataset}: nothing is serving yet; run `grove rebuild` or `grove promote`")
    evaluate = Path(root) / dataset / "evaluate" / version
    parents = artifacts.read_manifest(evaluate)["parents"]
    forests = {name: key for name, key in parents.items() if name.startswith("forest_")}
    best = max(forests, key=lambda name: int(name.split("_")[1]))
    return {"evaluate": evaluate, "split": Path(root) / parents["split"], "forest": Path(root) / forests[best]}


def judge(root: Path, dataset: str, evaluate: artifacts.ArtifactRef, results: dict, gate: dict, date: str) -> dict:
    """Gate an evaluation and promote it if it passes; returns the dated record of the decision."""
    passed, reasons = check_gate(results, gate)
    before = serving_version(root, dataset)
    if passed and before != evaluate.version:
        promote(root, dataset, evaluate.version, reason=f"rebuild {date}")
    elif not passed:
        log.error("%s: %s rejected by the quality gate: %s", dataset, evaluate.key, "; ".join(reasons))
    return {"dataset": dataset, "date": date, "evaluate": evaluate.key, "gate": gate,
            "gate_point": gate_point(results, gate), "passed": passed, "reasons": reasons,
            "promoted": passed, "serving": serving_version(root, dataset), "serving_before": before,
            "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rows": results["rows"], "quality": results.get("quality", {})}


# --- garbage collection --------------------------------------------------------------------------


def _closure(root: Path, keys: set[str]) -> set[str]:
    """The given version keys and every ancestor they depend on."""
    seen: set[str] = set()
    stack = list(keys)
    while stack:
        key = stack.pop()
        if key in seen or not (Path(root) / key / artifacts.MANIFEST).is_file():
            continue
        seen.add(key)
        stack.extend(artifacts.read_manifest(Path(root) / key, verify="none").get("parents", {}).values())
    return seen


def plan_gc(root: Path, keep: int) -> list[Path]:
    """Version directories that ``gc`` would delete: all but the newest ``keep`` per stage, sparing
    whatever ``latest`` or ``serving`` points at and everything those depend on; then the cached
    downloads of mutable sources that none of the newest ``keep`` snapshots pins."""
    if keep < 1:
        raise ConfigError(f"gc --keep must be at least 1, got {keep}")
    root = Path(root)
    pinned: set[str] = set()
    every: list[str] = []
    for dataset_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        dataset = dataset_dir.name
        serving = artifacts.read_pointer(dataset_dir, SERVING)
        if serving:
            pinned.add(f"{dataset}/{serving}")
        for stage_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            versions = artifacts.list_versions(root, dataset, stage_dir.name)
            keys = [f"{dataset}/{stage_dir.name}/{m['version']}" for m in versions]
            every.extend(keys)
            pinned.update(keys[-keep:])
            latest = artifacts.read_pointer(stage_dir)
            if latest:
                pinned.add(f"{dataset}/{stage_dir.name}/{latest}")
    kept = _closure(root, pinned)
    # Cached bytes of mutable sources go with their snapshots (fetch versions hold their own links).
    return [root / key for key in every if key not in kept] + snapshot.plan_cache_gc(root, keep)


def gc(root: Path, keep: int, dry_run: bool = False) -> list[Path]:
    """Delete what ``plan_gc`` lists (nothing with ``dry_run``); returns the list."""
    doomed = plan_gc(root, keep)
    for path in doomed:
        if dry_run:
            log.info("would delete %s", path)
        else:
            remove_version(path)
    return doomed


def remove_version(path: Path) -> None:
    """Delete one version directory. It is renamed first, so a half-deleted directory never looks
    like a complete version."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)
    log.info("deleted %s", path)


def remove_damaged(paths: list[Path]) -> list[tuple[Path, str]]:
    """Check every given version against its manifest (sha256); delete the damaged ones so the next
    run rebuilds them. Returns ``(path, what was wrong)`` for each deleted version."""
    removed = []
    for path in paths:
        if not (path / artifacts.MANIFEST).is_file():
            continue
        try:
            artifacts.read_manifest(path, verify="sha256")
        except ArtifactError as exc:
            remove_version(path)
            removed.append((path, str(exc)))
    return removed
