"""What happens to versions after they are built: the quality gate, promotion to serving, rollback,
dated records, garbage collection, and repair. Everything goes through the root's store
(``pipeline.store``: a local directory or an object store); ``pipeline.layout`` names it.

Repair: a chain (the DAG of versions its tasks read and write) is checked with
``artifacts.verify_once``; a damaged version and every version built from it are removed, so that
building the chain again makes them anew (a stage whose parent is missing is not complete).

``<dataset>/serving`` is a pointer to ``evaluate/<version>`` (a symlink on a local root, a small
object on an object store): the evaluation whose forests and split answer queries. Promotion replaces
it atomically and keeps a history so a rollback knows what served before: ``<dataset>/serving.log``
(JSON lines) on a local root, one object per promotion under ``<dataset>/serving-history/`` on an
object store (which cannot append).

Versions are ``artifacts.ArtifactRef``; the functions that take one also take a local version
directory (``<root>/<dataset>/<stage>/<version>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence, Union

from . import artifacts, layout, snapshot
from .artifacts import ArtifactRef, as_ref, ref_from_key, store_of
from .errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

SERVING = layout.SERVING
SERVING_LOG = layout.SERVING_LOG
# An upload attempt no manifest names is left alone this long (its writer may still be uploading).
ATTEMPT_GRACE_SECONDS = 6 * 3600

Root = Union[str, os.PathLike]
Version = Union[ArtifactRef, str, os.PathLike]  # a reference, or a local version directory


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


def serving_version(root: Root, dataset: str) -> str | None:
    """The evaluate version that serves ``dataset`` (``v1-...``), or None."""
    return layout.served_version(store_of(root).get_pointer(layout.dataset_key(dataset), SERVING))


def _serving_ref(root: Root, dataset: str, version: str) -> ArtifactRef:
    return ref_from_key(root, layout.version_key(dataset, layout.SERVED_STAGE, version))


def promote(root: Root, dataset: str, version: str, reason: str = "promote") -> None:
    """Make evaluate/``version`` the serving one (an atomic pointer swap) and log it."""
    artifacts.read_manifest(_serving_ref(root, dataset, version))  # only a complete, intact evaluation can serve
    store = store_of(root)
    store.set_pointer(layout.dataset_key(dataset), SERVING, layout.serving_target(version))
    now = datetime.now(timezone.utc)
    entry = {"time_utc": now.isoformat(timespec="seconds"), "version": version, "reason": reason}
    if store.is_local:
        with open(store.local_path(layout.serving_log_key(dataset)), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    else:  # an object store cannot append: one object per promotion, named to sort by time
        store.write_json(f"{layout.serving_history_prefix(dataset)}/"
                         f"{layout.serving_event_name(now, secrets.token_hex(4))}", entry)
    log.info("%s: serving %s (%s)", dataset, version, reason)


def serving_history(root: Root, dataset: str) -> list[dict]:
    """Every promotion of ``dataset``, oldest first: ``{"time_utc", "version", "reason"}``."""
    store = store_of(root)
    if store.is_local:
        path = store.local_path(layout.serving_log_key(dataset))
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prefix = layout.serving_history_prefix(dataset)
    return [store.read_json(f"{prefix}/{name}") for name in store.list(prefix) if name.endswith(".json")]


def rollback(root: Root, dataset: str) -> str:
    """Serve the version that served before the current one; returns it."""
    current = serving_version(root, dataset)
    previous = [e["version"] for e in serving_history(root, dataset) if e["version"] != current]
    if not previous:
        raise ConfigError(f"{dataset}: no earlier serving version to roll back to (serving: {current})")
    promote(root, dataset, previous[-1], reason=f"rollback from {current}")
    return previous[-1]


def serving_refs(root: Root, dataset: str) -> dict[str, ArtifactRef]:
    """What serves: ``evaluate``, ``split`` and ``forest`` (the one with most trees)."""
    version = serving_version(root, dataset)
    if version is None:
        raise ArtifactError(f"{dataset}: nothing is serving yet; run `grove rebuild` or `grove promote`")
    evaluate = _serving_ref(root, dataset, version)
    if not evaluate.exists():
        raise ArtifactError(f"{dataset}: the serving version {layout.serving_target(version)} is missing under the "
                            f"artifact root {_root_text(root)} (removed as damaged, or deleted); run `grove run "
                            f"{dataset} --rebuild` to build it again, or `grove rollback {dataset}`")
    parents = artifacts.read_manifest(evaluate)["parents"]
    forests = {name: key for name, key in parents.items() if name.startswith("forest_")}
    best = max(forests, key=lambda name: int(name.split("_")[1]))
    return {"evaluate": evaluate, "split": ref_from_key(root, parents["split"]),
            "forest": ref_from_key(root, forests[best])}


def serving_paths(root: Root, dataset: str) -> dict[str, Path]:
    """The directories of ``serving_refs`` (local roots)."""
    return {name: ref.path for name, ref in serving_refs(root, dataset).items()}


def verified_serving_refs(root: Root, dataset: str) -> dict[str, ArtifactRef]:
    """``serving_refs``, after checking the files a query reads (the split and the forest) with
    ``artifacts.verify_once``: a file changed since it was last verified raises ArtifactError before
    anything answers from it."""
    refs = serving_refs(root, dataset)
    for name in ("split", "forest"):
        artifacts.verify_once(refs[name])
    return refs


def _root_text(root: Root) -> str:
    store = store_of(root)
    return str(Path(root).absolute()) if store.is_local else store.uri


def judge(root: Root, dataset: str, evaluate: ArtifactRef, results: dict, gate: dict, date: str) -> dict:
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


def _parents_of(root: Root, key: str) -> dict[str, str] | None:
    """The parents a version's manifest names; None when it has no (readable) manifest."""
    try:
        return artifacts.read_manifest(ref_from_key(root, key), verify="none").get("parents", {})
    except ArtifactError:
        return None


def _closure(root: Root, keys: set[str]) -> set[str]:
    """The given version keys and every ancestor they depend on."""
    seen: set[str] = set()
    stack = list(keys)
    while stack:
        key = stack.pop()
        if key in seen or not ref_from_key(root, key).exists():
            continue
        seen.add(key)
        stack.extend((_parents_of(root, key) or {}).values())
    return seen


def ancestry(root: Root, key: str) -> list[ArtifactRef]:
    """Version ``key`` and every version it was built from, as its manifests name them, missing ones
    included (their own parents are unknown), ``key`` first."""
    out: list[ArtifactRef] = []
    seen: set[str] = set()
    stack = [key]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        ref = ref_from_key(root, current)
        out.append(ref)
        if ref.exists():
            stack.extend(sorted((_parents_of(root, current) or {}).values()))
    return out


def _datasets(root: Root) -> list[str]:
    store = store_of(root)
    return [name for name in store.list("") if layout.is_dataset(name)
            and (not store.is_local or store.local_path(name).is_dir())]


def _stages(root: Root, dataset: str) -> list[str]:
    store = store_of(root)
    out = []
    for name in store.list(layout.dataset_key(dataset)):
        if not layout.is_stage(name):
            continue
        if store.is_local:
            path = store.local_path(layout.stage_key(dataset, name))
            if not path.is_dir() or path.is_symlink():
                continue
        out.append(name)
    return out


def plan_gc(root: Root, keep: int) -> list[str]:
    """Keys of what ``gc`` would delete: versions, all but the newest ``keep`` per stage, sparing
    whatever ``latest`` or ``serving`` points at and everything those depend on; then the stored bytes
    of mutable sources that none of the newest ``keep`` snapshots pins; on an object store, upload
    attempts that no manifest names and that are older than ``ATTEMPT_GRACE_SECONDS`` (a writer
    killed mid-upload)."""
    if keep < 1:
        raise ConfigError(f"gc --keep must be at least 1, got {keep}")
    store = store_of(root)
    pinned: set[str] = set()
    every: list[str] = []
    stale: list[str] = []
    for dataset in _datasets(root):
        serving = serving_version(root, dataset)
        if serving:
            pinned.add(layout.version_key(dataset, layout.SERVED_STAGE, serving))
        for stage in _stages(root, dataset):
            versions = artifacts.list_versions(root, dataset, stage)
            keys = [layout.version_key(dataset, stage, m["version"]) for m in versions]
            every.extend(keys)
            pinned.update(keys[-keep:])
            latest = store.get_pointer(layout.stage_key(dataset, stage), layout.LATEST)
            if latest:
                pinned.add(layout.version_key(dataset, stage, latest))
            if not store.is_local:  # killed or outrun uploads, in published versions and unfinished ones
                for name in store.list(layout.stage_key(dataset, stage)):
                    if layout.is_version(name):
                        stale.extend(store.stale_attempts(layout.version_key(dataset, stage, name),
                                                          ATTEMPT_GRACE_SECONDS))
    kept = _closure(root, pinned)
    # Stored bytes of mutable sources go with their snapshots (fetch versions hold their own copies).
    return [*(k for k in every if k not in kept), *snapshot.plan_cache_gc(root, keep), *stale]


def gc(root: Root, keep: int, dry_run: bool = False) -> list[str]:
    """Delete what ``plan_gc`` lists (nothing with ``dry_run``); returns the keys."""
    doomed = plan_gc(root, keep)
    for key in doomed:
        if dry_run:
            log.info("would delete %s", artifacts.location(root, key))
        elif _is_version_key(key):
            remove_version(ref_from_key(root, key))
        else:
            _remove_tree(root, key)
    return doomed


def _is_version_key(key: str) -> bool:
    try:
        layout.split_version_key(key)
    except ValueError:
        return False
    return True


def _remove_tree(root: Root, key: str) -> None:
    store = store_of(root)
    if store.is_local:
        path = store.local_path(key)
        trash = path.with_name(layout.trash_name(path.name, os.getpid()))
        os.rename(path, trash)
        shutil.rmtree(trash)
    else:
        store.delete_tree(key)
    log.debug("deleted %s", artifacts.location(root, key))


def remove_version(version: Version) -> None:
    """Delete one version. Its manifest goes first (an object store) or the directory is renamed first
    (a local root), so a half-deleted version never looks like a complete one. A ``latest`` pointer that
    named it is moved (see ``fix_latest``)."""
    ref = as_ref(version)
    store = ref.store
    if store.is_local:
        _remove_tree(ref.root, ref.key)
    else:
        store.delete(layout.manifest_key(ref.key))
        store.delete_tree(ref.key)
        log.debug("deleted %s", ref.location)
    fix_latest(ref.root, ref.dataset, ref.stage)


def fix_latest(root: Root, dataset: str, stage: str) -> str | None:
    """Make the stage's ``latest`` pointer name a published version again when its target is gone: the
    newest remaining one, or no pointer at all when none remains. Returns where it points now."""
    store = store_of(root)
    stage_key = layout.stage_key(dataset, stage)
    latest = store.get_pointer(stage_key, layout.LATEST)
    if latest is None or store.exists(layout.manifest_key(layout.version_key(dataset, stage, latest))):
        return latest
    versions = artifacts.list_versions(root, dataset, stage)
    if versions:
        store.set_pointer(stage_key, layout.LATEST, versions[-1]["version"])
        log.debug("%s/latest: %s is gone; now %s", stage_key, latest, versions[-1]["version"])
        return versions[-1]["version"]
    store.remove_pointer(stage_key, layout.LATEST)
    log.debug("%s/latest: %s is gone and no other version remains; pointer removed", stage_key, latest)
    return None


# --- repair --------------------------------------------------------------------------------------


def version_key(version: Version) -> str:
    """``dataset/stage/version`` of a version (its root-relative name)."""
    return as_ref(version).key


def _parents_first(graph: Mapping[ArtifactRef, Sequence[ArtifactRef]]) -> list[ArtifactRef]:
    order: list[ArtifactRef] = []
    done: set[ArtifactRef] = set()

    def visit(node: ArtifactRef) -> None:
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
    """One version a repair removes: its reference, whether it is damaged itself (else it was built
    from a damaged or missing version) and why."""

    ref: ArtifactRef
    damaged: bool
    reason: str

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def path(self) -> Path:
        """Its directory (local roots)."""
        return self.ref.path


def _as_graph(graph: Mapping[Version, Sequence[Version]]) -> dict[ArtifactRef, list[ArtifactRef]]:
    return {as_ref(node): [as_ref(p) for p in parents] for node, parents in graph.items()}


def plan_repair(graph: Mapping[Version, Sequence[Version]], force: bool = False) -> list[Removal]:
    """What repairing a chain removes, parents first.

    ``graph`` maps every version of the chain to its parents (the stages' DAG as the tasks know it,
    so it holds even where a version is gone). A published version is removed when
    ``artifacts.verify_once`` finds it damaged, or when any version it was built from (at any depth)
    is damaged or missing: its bytes were computed from bytes that are no longer there, so it is
    built again after its parents. ``force`` hashes every file even where a verified-stamp matches.
    """
    graph = _as_graph(graph)
    cause: dict[ArtifactRef, tuple[str, str]] = {}  # version -> (key, state) of what makes it untrustworthy
    plan: list[Removal] = []
    for node in _parents_first(graph):
        if not node.exists():
            cause[node] = (node.key, "missing")
            continue
        bad_parent = next((p for p in graph.get(node, ()) if p in cause), None)
        if bad_parent is not None:
            cause[node] = cause[bad_parent]
            plan.append(Removal(node, False, "built from {}, which is {}".format(*cause[bad_parent])))
            continue
        try:
            artifacts.verify_once(node, force=force)
        except ArtifactError as exc:
            cause[node] = (node.key, "damaged")
            plan.append(Removal(node, True, str(exc)))
    return plan


def _manifest_digest(ref: ArtifactRef) -> str | None:
    """The sha256 of a version's manifest bytes: a version built again has another manifest (its
    time, its duration), so this tells a rebuilt version from the one a repair saw."""
    try:
        return hashlib.sha256(ref.store.read_bytes(layout.manifest_key(ref.key))).hexdigest()
    except FileNotFoundError:
        return None


def _rebuilt_since(ref: ArtifactRef, removed: Mapping) -> bool:
    """Whether the version a ledger entry removed was published again since: on a local root its
    manifest is newer than the removal; on an object store (no modification times here) its manifest
    differs from the one removed."""
    if ref.store.is_local:
        removed_ns = removed.get("removed_ns")
        return bool(removed_ns) and (ref.path / layout.MANIFEST).stat().st_mtime_ns > removed_ns
    digest = removed.get("manifest_sha256")
    return bool(digest) and _manifest_digest(ref) != digest


def repair(graph: Mapping[Version, Sequence[Version]], force: bool = False,
           ledger: Path | None = None) -> list[Removal]:
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
            if r.damaged and _rebuilt_since(r.ref, earlier.get(r.key, {})):
                raise ArtifactError(f"{r.key} was removed as damaged and rebuilt, and the rebuilt version is damaged "
                                    f"again: {r.reason} The repair cannot fix this: check the disk (dmesg, free space) "
                                    "and what else writes under the artifact root.")
        if plan:
            now = time.time_ns()
            artifacts.write_json_atomic(ledger, {**earlier, **{
                r.key: {"removed_ns": now, "manifest_sha256": _manifest_digest(r.ref), "damaged": r.damaged,
                        "reason": r.reason} for r in plan}})
    for removal in reversed(plan):
        remove_version(removal.ref)
    return plan


def repair_ledger(root: Root, dataset: str, run: str) -> Path:
    """Where one run's repairs are remembered (in the scratch directory: per machine, safe to lose)."""
    root_id = hashlib.sha256(_root_text(root).encode()).hexdigest()[:16]
    return layout.repairs_dir() / f"{root_id}-{dataset}-{run}.json"


def read_ledger(ledger: Path) -> dict:
    """``{version key: {"removed_ns", "manifest_sha256", "damaged", "reason"}}`` of a repair ledger ({} if none or unreadable)."""
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


def check_versions(versions: Sequence[Version], force: bool = False) -> list[tuple[ArtifactRef, str]]:
    """``(version, what is wrong)`` for each given version that is missing or damaged."""
    problems = []
    for version in versions:
        ref = as_ref(version)
        try:
            artifacts.verify_once(ref, force=force)
        except ArtifactError as exc:
            problems.append((ref, str(exc)))
    return problems


def serving_closure(root: Root, dataset: str) -> list[ArtifactRef]:
    """The serving evaluation and every version it was built from (see ``ancestry``)."""
    version = serving_version(root, dataset)
    return [] if version is None else ancestry(root, layout.version_key(dataset, layout.SERVED_STAGE, version))
