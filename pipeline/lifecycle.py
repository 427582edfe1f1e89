"""What happens to versions after they are built: the quality gate, promotion to serving, rollback,
dated records, garbage collection, and repair.

Repair: a chain (the DAG of version directories its tasks read and write) is checked with
``artifacts.verify_once``; a damaged version and every version built from it are removed, so that
building the chain again makes them anew (a stage whose parent is missing is not complete).

``<root>/<dataset>/serving`` is a symlink to ``evaluate/<version>``: the evaluation whose forests and
split answer queries. Promotion replaces it atomically; every promotion is appended to
``<root>/<dataset>/serving.log`` (JSON lines) so a rollback knows what served before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from . import artifacts, snapshot
from .errors import ArtifactError, ConfigError
from .paths import scratch_dir

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
    if gate["min_qps"] and row.get("qps") is None:
        reasons.append(f"QPS was not measured at n_trees={row['n_trees']}, search_k={row['search_k']} "
                       f"(gate.min_qps {gate['min_qps']:.0f})")
    elif gate["min_qps"] and row["qps"] < gate["min_qps"]:
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
    if not (evaluate / artifacts.MANIFEST).is_file():
        raise ArtifactError(f"{dataset}: the serving version evaluate/{version} is missing under the artifact root "
                            f"{Path(root).absolute()} (removed as damaged, or deleted); run `grove run {dataset} "
                            f"--rebuild` to build it again, or `grove rollback {dataset}`")
    parents = artifacts.read_manifest(evaluate)["parents"]
    forests = {name: key for name, key in parents.items() if name.startswith("forest_")}
    best = max(forests, key=lambda name: int(name.split("_")[1]))
    return {"evaluate": evaluate, "split": Path(root) / parents["split"], "forest": Path(root) / forests[best]}


def verified_serving_paths(root: Path, dataset: str) -> dict[str, Path]:
    """``serving_paths``, after checking the files a query reads (the split and the forest) with
    ``artifacts.verify_once``: a file changed since it was last verified raises ArtifactError before
    anything answers from it."""
    paths = serving_paths(root, dataset)
    for name in ("split", "forest"):
        artifacts.verify_once(paths[name])
    return paths


def judge(root: Path, dataset: str, evaluate: artifacts.ArtifactRef, results: dict, gate: dict, date: str) -> dict:
    """Gate an evaluation and promote it if it passes; returns the dated record of the decision.

    Only a whole chain is promoted: the evaluation and every version it was built from are checked
    with ``artifacts.verify_once`` first (ArtifactError if any is missing or damaged; the caller
    repairs the chain before judging it)."""
    problems = check_versions(ancestry(root, evaluate.key))
    if problems:
        raise ArtifactError(f"{dataset}: not promoting {evaluate.key}: {problems[0][1]}")
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


def ancestry(root: Path, key: str) -> list[Path]:
    """The directory of version ``key`` and of every version it was built from, as its manifests
    name them, missing ones included (their own parents are unknown), ``key`` first."""
    out: list[Path] = []
    seen: set[str] = set()
    stack = [key]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        path = Path(root) / current
        out.append(path)
        if (path / artifacts.MANIFEST).is_file():
            stack.extend(sorted(artifacts.read_manifest(path, verify="none").get("parents", {}).values()))
    return out


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
    like a complete version. A ``latest`` pointer that named it is moved (see ``fix_latest``)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)
    log.debug("deleted %s", path)
    fix_latest(path.parent)


def fix_latest(stage_dir: Path) -> str | None:
    """Make ``stage_dir/latest`` name a published version again when its target is gone: the newest
    remaining one, or no pointer at all when none remains. Returns where it points now."""
    stage_dir = Path(stage_dir)
    latest = artifacts.read_pointer(stage_dir)
    if latest is None or (stage_dir / latest / artifacts.MANIFEST).is_file():
        return latest
    versions = artifacts.list_versions(stage_dir.parent.parent, stage_dir.parent.name, stage_dir.name)
    if versions:
        artifacts.set_pointer(stage_dir, artifacts.LATEST, versions[-1]["version"])
        log.debug("%s/latest: %s is gone; now %s", stage_dir, latest, versions[-1]["version"])
        return versions[-1]["version"]
    (stage_dir / artifacts.LATEST).unlink(missing_ok=True)
    log.debug("%s/latest: %s is gone and no other version remains; pointer removed", stage_dir, latest)
    return None


# --- repair --------------------------------------------------------------------------------------


def version_key(path: Path) -> str:
    """``dataset/stage/version`` of a version directory (its root-relative name)."""
    path = Path(path)
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


def _parents_first(graph: Mapping[Path, Sequence[Path]]) -> list[Path]:
    order: list[Path] = []
    done: set[Path] = set()

    def visit(node: Path) -> None:
        stack = [(node, iter(graph.get(node, ())))]
        while stack:
            current, parents = stack[-1]
            parent = next((p for p in parents if p not in done), None)
            if parent is not None:
                done.add(parent)  # marked on entry: the chain is a DAG, so no cycle can be missed
                stack.append((parent, iter(graph.get(parent, ()))))
                continue
            stack.pop()
            order.append(current)

    for node in graph:
        if node not in done:
            done.add(node)
            visit(node)
    return order


class Removal(NamedTuple):
    """One version a repair removes: its directory, whether it is damaged itself (else it was built
    from a damaged or missing version) and why."""

    path: Path
    damaged: bool
    reason: str

    @property
    def key(self) -> str:
        return version_key(self.path)


def plan_repair(graph: Mapping[Path, Sequence[Path]], force: bool = False) -> list[Removal]:
    """What repairing a chain removes, parents first.

    ``graph`` maps every version directory of the chain to its parents' directories (the stages' DAG
    as the tasks know it, so it holds even where a directory is gone). A published version is removed
    when ``artifacts.verify_once`` finds it damaged, or when any version it was built from (at any
    depth) is damaged or missing: its bytes were computed from bytes that are no longer there, so it
    is built again after its parents. ``force`` hashes every file even where a verified-stamp matches.
    """
    cause: dict[Path, tuple[str, str]] = {}  # version -> (key, state) of what makes it untrustworthy
    plan: list[Removal] = []
    for node in _parents_first(graph):
        if not (node / artifacts.MANIFEST).is_file():
            cause[node] = (version_key(node), "missing")
            continue
        bad_parent = next((p for p in graph.get(node, ()) if p in cause), None)
        if bad_parent is not None:
            cause[node] = cause[bad_parent]
            plan.append(Removal(node, False, "built from {}, which is {}".format(*cause[bad_parent])))
            continue
        try:
            artifacts.verify_once(node, force=force)
        except ArtifactError as exc:
            cause[node] = (version_key(node), "damaged")
            plan.append(Removal(node, True, str(exc)))
    return plan


def repair(graph: Mapping[Path, Sequence[Path]], force: bool = False, ledger: Path | None = None) -> list[Removal]:
    """Remove what ``plan_repair`` lists, so that building the chain again rebuilds exactly that;
    returns the list, parents first. Children are removed before their parents: a repair cut short
    leaves the damaged parent in place, to be found again.

    ``ledger`` (a JSON file, see ``repair_ledger``) makes a repair that runs again after the rebuild
    (Luigi restarts a task's run() once its dynamic dependencies are built) end instead of looping:
    a version it removed as damaged that was rebuilt since and is damaged again raises ArtifactError.
    """
    plan = plan_repair(graph, force=force)
    if ledger is not None:
        earlier = read_ledger(ledger)
        for r in plan:
            removed_ns = earlier.get(r.key, {}).get("removed_ns")
            if r.damaged and removed_ns and (r.path / artifacts.MANIFEST).stat().st_mtime_ns > removed_ns:
                raise ArtifactError(f"{r.key} was removed as damaged and rebuilt, and the rebuilt version is damaged "
                                    f"again: {r.reason} The repair cannot fix this: check the disk (dmesg, free space) "
                                    "and what else writes under the artifact root.")
        if plan:
            now = time.time_ns()
            artifacts.write_json_atomic(ledger, {**earlier, **{r.key: {"removed_ns": now, "damaged": r.damaged,
                                                                       "reason": r.reason} for r in plan}})
    for removal in reversed(plan):
        remove_version(removal.path)
    return plan


def repair_ledger(root: Path, dataset: str, run: str) -> Path:
    """Where one run's repairs are remembered (in the scratch directory: per machine, safe to lose)."""
    root_id = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16]
    return scratch_dir() / "repairs" / f"{root_id}-{dataset}-{run}.json"


def read_ledger(ledger: Path) -> dict:
    """``{version key: {"removed_ns", "damaged", "reason"}}`` of a repair ledger ({} if none or unreadable)."""
    try:
        data = json.loads(Path(ledger).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("repair ledger %s is unreadable (%s); starting a new one", ledger, exc)
        return {}
    return data if isinstance(data, dict) else {}


def close_ledger(ledger: Path) -> list[dict]:
    """The repairs a ledger remembers (``key``, ``damaged``, ``reason``), and the ledger removed: the
    chain checked whole after them."""
    entries = [{"key": key, "damaged": bool(v.get("damaged")), "reason": str(v.get("reason", ""))}
               for key, v in sorted(read_ledger(ledger).items())]
    Path(ledger).unlink(missing_ok=True)
    return entries


def check_versions(paths: Sequence[Path], force: bool = False) -> list[tuple[Path, str]]:
    """``(version directory, what is wrong)`` for each given version that is missing or damaged."""
    problems = []
    for path in paths:
        try:
            artifacts.verify_once(path, force=force)
        except ArtifactError as exc:
            problems.append((Path(path), str(exc)))
    return problems


def serving_closure(root: Path, dataset: str) -> list[Path]:
    """The serving evaluation's directory and every version it was built from (see ``ancestry``)."""
    version = serving_version(root, dataset)
    return [] if version is None else ancestry(root, f"{dataset}/evaluate/{version}")
