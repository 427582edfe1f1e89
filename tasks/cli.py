"""The ``grove`` command line.

Exit codes: 0 success; 1 a task failed; 2 bad usage or a bad config (nothing was run; also an
artifact root whose scheme grove does not support, e.g. ``ftp://``); 3 a damaged or missing artifact;
4 the scheduler could not schedule the tasks; 5 tasks were not run (for example another process holds
them); 6 an external dependency is missing; 7 ``grove rebuild``: an index failed its quality gate (the
previous version keeps serving); 8 the artifact root cannot be used (a ``StoreError``: an object store
whose endpoint does not answer, that refuses the credentials, has no such bucket or no write
permission, or a connection lost in the middle of a transfer): nothing half-published, run again once
it answers. ``grove run`` and ``grove rebuild`` probe an object-store root (list, write and delete one
small object) before any task runs; a store that fails in the middle of a task fails that task, and
the run exits 8 when every failed task failed that way (1 otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import argparse
import json
import sys
from pathlib import Path

from pipeline import artifacts, layout
from pipeline.errors import ArtifactError, ConfigError, GroveError, StoreError

from . import logs
from . import settings as grove_settings

if TYPE_CHECKING:
    from pipeline.config import DatasetConfig

(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ARTIFACT, EXIT_SCHEDULING, EXIT_NOT_RUN, EXIT_MISSING, EXIT_GATE,
 EXIT_STORE) = range(9)
_LAST_RUN: dict = {"completed": set()}


class _StageNames:
    """The registry's stage names, in its order (``pipeline.stages.STAGE_NAMES``), looked up when
    first needed: importing the registry brings every stage's imports, which `grove query` skips."""

    def _names(self) -> tuple[str, ...]:
        from pipeline import stages

        return stages.STAGE_NAMES

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


STAGES = _StageNames()


def load_config(dataset: str, config_dir: str | None):
    """``pipeline.config.load_config``, imported when a command needs a config (not for a query
    of what serves)."""
    from pipeline.config import load_config as load

    return load(dataset, config_dir)


def _settings():
    from .base import grove

    return grove()


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import lifecycle
    from pipeline.evaluate import read_results
    from pipeline.stages import format_results

    from .chain import Chain, chain_graph

    settings = _settings()
    for dataset in args.datasets:  # every config is checked before any work starts
        _check_sources(load_config(dataset, settings.config_dir()), settings)
    settings.shard_count()  # a bad GROVE_SHARDS is a config error (exit 2) before any work
    _check_root(settings.artifact_root())
    chains = [Chain(dataset=d) for d in args.datasets]
    removed, outside = [], []
    if args.rebuild:
        # Every version of the chain is hashed (no verified-stamp is trusted: the user asks for a
        # repair); the damaged ones and every version built from them go, and the build below makes
        # them again.
        graph = chain_graph(chains)
        removed = lifecycle.repair(graph, force=True)
        for r in removed:
            print(f"removed damaged {r.key}: {r.reason}" if r.damaged else f"removed {r.key}: {r.reason}",
                  file=sys.stderr)
        if not removed:
            print(f"checked {len(graph)} version(s): none damaged", file=sys.stderr)
        # What serves but the current config does not build cannot be rebuilt here: only reported.
        root = settings.artifact_root()
        serving = [p for d in args.datasets for p in lifecycle.serving_closure(root, d) if p not in graph]
        outside = lifecycle.check_versions(serving, force=True)
    code = _build(chains, args)
    for chain in chains:
        dataset, evaluate = chain.dataset, chain.evaluate()
        target = evaluate.output() if evaluate is not None else None
        if target is not None and target.exists():
            summary = read_results(artifacts.local_dir(target.ref))
            print(f"\n{dataset}: {target.ref.key}\n{format_results(summary['rows'], summary['k'])}")
    if args.rebuild:
        for r in removed:
            print(f"{'rebuilt' if r.ref.exists() else 'NOT rebuilt'} {r.key}", file=sys.stderr)
        for ref, problem in outside:
            print(f"grove: the serving version uses {ref.key}, which the current config does "
                  f"not build, so --rebuild cannot repair it: {problem}\n  serve a whole version instead: "
                  f"`grove rollback {ref.dataset}` or `grove promote {ref.dataset} VERSION`",
                  file=sys.stderr)
        if code == EXIT_OK and outside:
            return EXIT_ARTIFACT
    return code


def _check_scheduler(host: str, port: int, timeout: float = 3.0) -> None:
    """Fail fast (exit 4) when no luigid answers at host:port, instead of Luigi's minutes of retries."""
    import urllib.error
    import urllib.request

    url = f"http://{host}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # something answers HTTP there; Luigi's own RPC says whether it is a luigid
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SchedulerUnreachable(
            f"no luigid answers at {host}:{port} ({reason}); start it (see the README, `luigid --address "
            f"127.0.0.1 --port {port}`) or run without --scheduler-host to use the local scheduler") from exc


class SchedulerUnreachable(GroveError, ConnectionError):
    """The central scheduler named by --scheduler-host does not answer."""


def _build(tasks: list, args: argparse.Namespace) -> int:
    """luigi.build with the command's scheduler options; prints the summary and one line per failed
    task; returns our exit code."""
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    kwargs = {"workers": args.workers, "detailed_summary": True}
    if args.scheduler_host:
        _check_scheduler(args.scheduler_host, args.scheduler_port)
        kwargs.update(scheduler_host=args.scheduler_host, scheduler_port=args.scheduler_port)
    else:
        kwargs["local_scheduler"] = True
        # luigi.cfg keeps workers alive to retry failed tasks, which is what luigid is for; a run on
        # the local scheduler reports a failure at once instead of waiting out retry_delay.
        luigi.configuration.get_config().set("worker", "keep_alive", "false")
    result = luigi.build(tasks, **kwargs)
    try:
        from luigi.execution_summary import _summary_dict  # what ran, for the per-dataset lines

        _LAST_RUN["completed"] = set(_summary_dict(result.worker).get("completed", ()))
    except (ImportError, AttributeError, KeyError, TypeError):  # a private helper of Luigi's: only a detail is lost
        _LAST_RUN["completed"] = set()
    print(result.summary_text)
    for line in logs.failure_lines():
        print(line, file=sys.stderr)
    codes = {
        LuigiStatusCode.SUCCESS: EXIT_OK,
        LuigiStatusCode.SUCCESS_WITH_RETRY: EXIT_OK,
        LuigiStatusCode.FAILED: EXIT_FAILED,
        LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED: EXIT_FAILED,
        LuigiStatusCode.SCHEDULING_FAILED: EXIT_SCHEDULING,
        LuigiStatusCode.NOT_RUN: EXIT_NOT_RUN,
        LuigiStatusCode.MISSING_EXT: EXIT_MISSING,
    }
    code = codes.get(result.status, EXIT_FAILED)
    reasons = [failure["reason"] for failure in logs.failures()]
    if code == EXIT_FAILED and reasons and all(r.startswith(f"{StoreError.__name__}:") for r in reasons):
        # every task that failed, failed because the artifact root could not be used (the store went
        # away mid-run): exit 8, as for a root found unusable before the run; nothing was half-published
        return EXIT_STORE
    if code == EXIT_NOT_RUN and all(task.complete() for task in tasks):
        # Under luigid another worker may have run tasks this one was waiting for; what was asked
        # for exists, so the run succeeded (two cron jobs on one chain must both report success).
        return EXIT_OK
    return code


def _current_config_index(dataset: str):
    """(index, origin) over the current config's split and its forest with the most trees, for a
    dataset that nothing serves yet; verified by ``pipeline.api`` (ArtifactError, exit 3, when missing
    or damaged). On an object store, verified copies in this machine's cache."""
    from pipeline import api

    from .chain import Forest as ForestTask, current_evaluate

    root = _settings().artifact_root()
    parents = current_evaluate(dataset).parent_tasks()
    forest_task = max((t for t in parents.values() if isinstance(t, ForestTask)), key=lambda t: t.n_trees)
    refs = {"split": parents["split"].output().ref, "forest": forest_task.output().ref}
    for ref in refs.values():
        if not ref.exists():
            raise ArtifactError(f"{dataset}: nothing serves and {ref.key} is not built under the artifact root "
                                f"{_root_text(root)}. Run the stage again: `grove run {dataset}` (or point "
                                "GROVE_ARTIFACTS at the root that holds it)")
    return api.Index.from_refs(refs["split"], refs["forest"], compiled=False), "current config (nothing serving)"


def _root_text(root) -> str:
    """The artifact root for messages: an absolute directory, or the object store's URI."""
    store = artifacts.store_of(root)
    return str(Path(root).absolute()) if store.is_local else store.uri


def _skip_numba_blas_probe() -> None:
    """When numba loads its array functions it probes for BLAS by importing scipy.linalg (about 0.3 s
    of CPU) to learn whether a compiled ``np.dot`` may call it. grove's kernels never call BLAS (no
    ``np.dot``, ``@`` or ``np.linalg``: their results must not depend on it), so in a one-query
    process that does load them (a large search_k) the probe is told there is none. Only here: a
    program that imports grove as a library keeps scipy as it is."""
    if "numba" not in sys.modules and "scipy.linalg" not in sys.modules:
        sys.modules.setdefault("scipy.linalg.cython_blas", None)  # `import` of it raises ImportError


# Above this many leaf entries (--search-k, or its default k * n_trees) `grove query` answers with the
# compiled kernels: their start (numba's import and registries, about 0.5 s of CPU) costs less than
# the numpy twins' walk, which grows with search_k (about 8 ms at GloVe's and MNIST's default of 500
# to 600, 50 ms at 20,000; 2026-11-30, 2 cores). Both give the same answer, bit for bit.
NUMPY_QUERY_MAX_SEARCH_K = 100_000


def _ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _other_digits(text: str) -> bool:
    """str.isdigit() holds for "²" and "٣" too; a query number is written in ASCII digits."""
    return text.isdigit() and not text.isascii()


def _query_item(index, text: str) -> tuple:
    """(vector, keys to leave out, what it is) for TEXT on a dataset of items: the item whose key is
    TEXT when there is one (an indexed or a held-out item, left out of its own answer), else, for
    TEXT made of the digits 0-9, that row of the held-out queries."""
    from pipeline.errors import UnknownKeyError

    if text in index or not _ascii_number(text):
        return index.vector(text), {text}, repr(text)  # no such key: UnknownKeyError, exit 2
    held_out = index.held_out_keys()
    if int(text) >= len(held_out):
        raise UnknownKeyError(f"{index.dataset}: no item with key {text!r}, and query number {text} is out of "
                              f"range: there are {len(held_out)} queries (0-{len(held_out) - 1})")
    key = held_out[int(text)]
    return index.vector(key), set(), f"query {int(text)} ({key!r})"


def _one_blas_thread() -> None:
    """One OpenBLAS thread for a one-query process, unless OPENBLAS_NUM_THREADS says otherwise: its
    BLAS work is one matrix-vector product over the base (the exact answer's shortlist; memory-bound,
    a second thread gains little), while starting OpenBLAS's thread pool costs about 0.07 s of CPU
    (2 cores, 2026-11-30). Read when numpy loads, so only before that. The answers do not depend on
    it: BLAS only picks the shortlist, which fixed-order sums re-rank."""
    if "numpy" not in sys.modules:
        import os

        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def cmd_query(args: argparse.Namespace) -> int:
    """Answers from what serves (``pipeline.api.open_index``, verified; no config needed), else from
    the current config's split and forest. One query in a fresh process: the numpy twins of the
    compiled kernels answer it (the same answer, without numba's start), unless search_k is large."""
    import time

    _one_blas_thread()
    from pipeline import api, query

    def usage(message: str) -> int:
        print(f"grove query: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.k < 1:
        return usage(f"-k must be at least 1, got {args.k}")
    if args.search_k is not None and args.search_k < -1:
        return usage(f"--search-k must be -1 (the default, k * n_trees) or at least 0, got {args.search_k}")
    search_k = None if args.search_k in (None, -1) else args.search_k
    text = args.text
    not_a_number = (f"query number {text!r} is not written with the digits 0-9; give a number such as 3 "
                    "or an item key such as test/3")
    try:
        # the root as the other commands find it, without Luigi (api.default_root reads luigi.cfg itself)
        index = api.open_index(args.dataset, root=api.default_root(), compiled=False)  # missing or damaged: exit 3
        origin = f"serving {index.version}"
        kind = index.kind
    except (api.NotServingError, api.UnknownDatasetError):
        index = None
        kind = load_config(args.dataset, _settings().config_dir()).kind  # an unknown dataset: exit 2
        if kind != api.WORDS_KIND and _other_digits(text):
            return usage(not_a_number)  # a bad argument: exit 2 before any file is opened
        index, origin = _current_config_index(args.dataset)
    with index:
        if kind == api.WORDS_KIND:
            vector, exclude = index.text_vector(text)  # a word or a phrase; its own words left out
            shown = repr(text)
        elif _other_digits(text) and text not in index:
            return usage(not_a_number)
        else:
            vector, exclude, shown = _query_item(index, text)
        walked = search_k if search_k is not None else (args.k + len(exclude)) * index.n_trees
        if not args.exact and walked > NUMPY_QUERY_MAX_SEARCH_K:
            _skip_numba_blas_probe()
            index.compiled = True

        def timed(exact: bool) -> query.Answer:
            started = time.perf_counter()
            hits = index.query(vector, k=args.k, search_k=search_k, exclude=exclude, exact=exact)
            return query.Answer(hits.keys, hits.distances, time.perf_counter() - started)

        approx = truth = None
        if not args.exact:
            if index.compiled:
                index.query(vector, k=1)  # load the kernels once, so that the timing below is the query alone
            approx = timed(exact=False)
        if args.exact or not args.approx_only:
            truth = timed(exact=True)
        print(f"{args.dataset}: {shown}  (index {index.forest_version}, {origin}, "
              f"n_trees={'-' if args.exact else index.n_trees}, "
              f"search_k={'default' if search_k is None else search_k}, "
              f"{'compiled' if index.compiled else 'numpy'} kernels)")
    print(query.format_answers(approx, truth))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """``grove serve DATASET...``: the HTTP query service (``pipeline.service``) until Ctrl-C or SIGTERM.

    Exit codes: 0 after Ctrl-C (SIGTERM ends it as that signal does); 2 bad arguments, an unknown
    dataset, or a host and port it cannot listen on (in use: one line saying so); 3 a dataset that
    nothing serves, or whose serving version is missing or damaged; 8 the artifact root cannot be used.
    """
    from pipeline import service

    if not 0 <= args.port <= 65535:
        print(f"grove serve: --port must be from 0 (any free port) to 65535, got {args.port}", file=sys.stderr)
        return EXIT_USAGE
    if not args.poll > 0:
        print(f"grove serve: --poll must be a number of seconds above 0, got {args.poll}", file=sys.stderr)
        return EXIT_USAGE
    try:
        service.serve(args.datasets, root=_settings().artifact_root(), host=args.host, port=args.port,
                      poll_seconds=args.poll)
    except service.ListenError as exc:
        print(f"grove serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace) -> int:
    import datetime
    import logging

    from .rebuild import Rebuild

    settings = _settings()
    root = settings.artifact_root()
    for dataset in settings.rebuild_list():
        cfg = load_config(dataset, settings.config_dir())
        _check_sources(cfg, settings)
    settings.shard_count()  # a bad GROVE_SHARDS is a config error (exit 2) before any work
    _check_root(root)
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(args.log)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    date = args.date or datetime.date.today()
    code = _build([Rebuild(date=date)], args)
    rejected = []
    for dataset in settings.rebuild_list():
        print(_rebuild_summary(root, dataset, date.isoformat()))
        if artifacts.store_of(root).exists(layout.record_key(dataset, date, rejected=True)):
            rejected.append(dataset)
    if code == EXIT_FAILED and rejected:
        where = ", ".join(artifacts.location(root, layout.record_key(d, date, rejected=True)) for d in rejected)
        print(f"quality gate rejected: {', '.join(rejected)} (see {where})", file=sys.stderr)
        return EXIT_GATE
    return code


def _rebuild_summary(root: Path, dataset: str, date: str) -> str:
    """Per dataset, after a rebuild: what ran, the gate's verdict with its numbers, what serves now."""
    from pipeline import lifecycle

    ran = sorted({repr(t).split("(")[0] for t in _LAST_RUN["completed"] if getattr(t, "dataset", None) == dataset})
    lines = [f"{dataset}: " + (f"ran {', '.join(ran)}" if ran else "nothing new to run")]
    record = None
    store = artifacts.store_of(root)
    for rejected in (False, True):
        key = layout.record_key(dataset, date, rejected=rejected)
        if store.exists(key):
            record = store.read_json(key)
    if record is None:
        lines.append("  gate: not judged (the chain did not complete; see the failures above)")
    else:
        point = record.get("gate_point") or {}
        gate = record.get("gate", {})
        where = f"n_trees={point.get('n_trees')} search_k={point.get('search_k')}" if point else "no gate row"
        numbers = (f"recall {point['recall']:.4f} (min {gate.get('min_recall', 0)})" if point else "")
        if point and gate.get("min_qps"):
            numbers += f", QPS {point['qps']:.0f} (min {gate['min_qps']:.0f})"
        verdict = "passed" if record.get("passed") else "REJECTED: " + "; ".join(record.get("reasons", []))
        lines.append(f"  gate at {where}: {numbers}: {verdict}")
    serving = lifecycle.serving_version(root, dataset)
    changed = record is not None and record.get("serving_before") != serving
    lines.append(f"  serving: {serving or 'nothing'}" + (
        f" (promoted; before: {record.get('serving_before') or 'nothing'})" if changed else " (unchanged)"))
    return "\n".join(lines)


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import lifecycle

    lifecycle.promote(_settings().artifact_root(), args.dataset, args.version, reason="grove promote")
    print(f"{args.dataset}: serving evaluate/{args.version}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline import lifecycle

    version = lifecycle.rollback(_settings().artifact_root(), args.dataset)
    print(f"{args.dataset}: serving evaluate/{version}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline import lifecycle

    root = _settings().artifact_root()
    doomed = lifecycle.gc(root, args.keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for key in doomed:
        print(f"{verb} {key}")
    cached = sum(1 for key in doomed if layout.BY_SHA256 in key.split("/"))
    attempts = sum(1 for key in doomed if layout.is_attempt_key(key))
    versions = len(doomed) - cached - attempts
    print(f"{verb} {versions} version(s)" + (f" and {cached} cached download(s)" if cached else "")
          + (f" and {attempts} abandoned upload(s)" if attempts else ""))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.report import write_index_page

    root = _settings().artifact_root()
    store = artifacts.store_of(root)
    if args.out or store.is_local:
        out = Path(args.out) if args.out else root / layout.INDEX_PAGE
        write_index_page(root, out)
        print(f"wrote {out}")
        return EXIT_OK
    # An object store: the page is written here, then stored beside the datasets it links to.
    with tempfile.TemporaryDirectory(prefix="grove-report-") as tmp:
        page = write_index_page(root, Path(tmp) / layout.INDEX_PAGE, links_base=store.uri)
        store.upload(page, layout.index_page_key())
    print(f"wrote {artifacts.location(root, layout.index_page_key())}")
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    settings = _settings()
    from pipeline.config import available_datasets

    for name in available_datasets(settings.config_dir()):
        cfg = load_config(name, settings.config_dir())
        print(f"{name:<16} {cfg.kind:<10} {cfg.dataset.description}")
    return EXIT_OK


def _check_root(root) -> None:
    """An object-store root answers, takes the credentials and can be written (StoreError, exit 8,
    before any task runs). A local root is left to the tasks, as always (a full or read-only disk
    fails the task that writes: exit 1, one line)."""
    store = artifacts.store_of(root)
    if not store.is_local:
        store.check(write=True)


def _check_sources(cfg: DatasetConfig, settings) -> None:
    """Every source can be fetched from somewhere: its URLs or the mirror (exit 2 before any work)."""
    from pipeline import config as config_module

    mirror = settings.mirror_prefix()
    if mirror:
        config_module.check_mirror(mirror)
    config_module.check_sources_reachable(cfg, mirror)


def _short_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def cmd_versions(args: argparse.Namespace) -> int:
    from pipeline import lifecycle

    load_config(args.dataset, _settings().config_dir())  # an unknown dataset is exit 2, not an empty list
    root = _settings().artifact_root()
    serving = lifecycle.serving_version(root, args.dataset)
    rows = []
    for stage in [args.stage] if args.stage else STAGES:
        for m in artifacts.list_versions(root, args.dataset, stage):
            size = sum(f["bytes"] for f in m.get("files", {}).values())
            flags = [f for f, on in (("latest", m["latest"]),
                                     ("SERVING", stage == "evaluate" and m["version"] == serving)) if on]
            metrics = dict(m.get("metrics", {}))
            if stage == "forest":
                metrics = {"n_trees": m.get("params", {}).get("n_trees"), **metrics}
            shown = " ".join(f"{k}={_short_number(v)}" for k, v in metrics.items())
            rows.append((stage, m["version"], m.get("created_utc", "")[:19].replace("T", " "),
                         f"{size / 1e6:,.1f}", ",".join(flags), shown))
    if not rows:
        print(f"{args.dataset}: no published versions under {root} ({grove_settings.describe()}); "
              f"`grove run {args.dataset}` builds them", file=sys.stderr)
        return EXIT_OK
    header = ("stage", "version", "created (UTC)", "MB", "flags", "metrics")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                         row[3].rjust(widths[3]), row[4].ljust(widths[4]), row[5]]).rstrip())
    if serving is None:
        print(f"(nothing serves {args.dataset} yet: `grove rebuild` or `grove promote`)")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    root = _settings().artifact_root()
    store = artifacts.store_of(root)
    path = Path(args.version)
    if "://" not in args.version and path.is_dir():
        version = path  # a local version directory (or a stage's latest)
    elif store.is_local:
        version = root / args.version
        if not version.is_dir():
            raise ArtifactError(f"no version {args.version!r} under the artifact root {root} "
                                f"({grove_settings.describe()}); `grove versions DATASET` lists them")
    else:
        version = _remote_version(root, store, args.version)
    manifest = artifacts.read_manifest(version, verify="sha256" if args.verify else "size")
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return EXIT_OK


def _remote_version(root, store, text: str):
    """The version ``text`` names on an object-store root: ``dataset/stage/version`` (or ``.../latest``),
    or its whole URI."""
    key = text.strip("/")
    base = store.uri.rstrip("/") + "/"
    if key.startswith(base):
        key = key[len(base):]
    parts = key.split("/")
    if len(parts) == 3 and parts[2] == layout.LATEST:
        parts[2] = store.get_pointer(layout.stage_key(parts[0], parts[1]), layout.LATEST) or layout.LATEST
    try:
        ref = artifacts.ref_from_key(root, "/".join(parts))
    except ArtifactError:
        ref = None
    if ref is None or not ref.exists():
        raise ArtifactError(f"no version {text!r} under the artifact root {store.uri} "
                            f"({grove_settings.describe()}); `grove versions DATASET` lists them")
    return ref


def _date(text: str):
    """argparse type for --date: a bad date is a usage error (exit 2) that shows the value."""
    import datetime

    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-30") from None


def _scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="Luigi workers (default 1)")
    p.add_argument("--scheduler-host", default=None, help="use the luigid at this host (default: local scheduler)")
    p.add_argument("--scheduler-port", type=int, default=8082, help="luigid port (default 8082)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grove",
        description="Build, version and evaluate tree-forest nearest-neighbour indexes with Luigi.",
        epilog="Settings: luigi.cfg [grove] (artifacts, mirror, configs, threads) or the environment variables "
        "GROVE_ARTIFACTS, GROVE_MIRROR, GROVE_CONFIGS, GROVE_THREADS.",
    )
    parser.add_argument("--verbose", action="store_true", default=False,
                        help="also print Luigi's log and tracebacks (luigi.cfg [grove] verbose, GROVE_VERBOSE)")
    common = argparse.ArgumentParser(add_help=False)  # --verbose also after the command
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="run the whole chain of one or more datasets")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="dataset names (configs/<name>.toml)")
    p.add_argument("--rebuild", action="store_true",
                   help="first check every existing version of the chain against its manifest's sha256, delete "
                        "the damaged ones and every version built from them, and build them all again")
    _scheduler_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "query", parents=[common], help="nearest neighbours of a word, a phrase or an item, approximate and exact",
        description="Nearest neighbours of a word, a phrase or an item, from the serving index (else the current "
                    "config's), approximate and exact side by side.",
        epilog="TEXT|ID on a word dataset is a word or a phrase (the normalised sum of its words). On other datasets "
               "it is an item key (test/3, train/7; an indexed or a held-out item, left out of its own answer); a key "
               "made only of the digits 0-9 that no item has is a query number: that row of the held-out queries "
               "(3 is the fourth query). An item whose key is all digits wins over the query number: on a dataset "
               "with integer ids, 123 is the item 123; reach the held-out queries there by their keys. "
               "One query is answered by numpy twins of the compiled kernels (the same answer, without numba's "
               "start); above a search_k of %d, by the compiled kernels." % NUMPY_QUERY_MAX_SEARCH_K)
    p.add_argument("dataset")
    p.add_argument("text", metavar="TEXT|ID", help="a word or phrase (word datasets), an item key, or a query number "
                                                    "(digits 0-9; an item with that key wins)")
    p.add_argument("-k", type=int, default=10, help="neighbours to show (default 10)")
    p.add_argument("--search-k", type=int, default=None, help="candidates to inspect (default or -1: k * n_trees)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true", help="exact search only")
    mode.add_argument("--approx-only", action="store_true", help="the index only, no exact search beside it")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("serve", parents=[common], help="answer queries over HTTP (JSON) from what serves; follows "
                                                      "promotions without a restart")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="datasets to answer for (each must be serving)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="how often the serving pointers are read (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rebuild", parents=[common], help="the dated rebuild cron runs: every rebuild dataset, gated and promoted")
    p.add_argument("--date", type=_date, default=None, help="YYYY-MM-DD (default today)")
    p.add_argument("--log", default=None, help="also append the log to this file")
    _scheduler_options(p)
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("promote", parents=[common], help="make an evaluated version serve a dataset (atomic pointer swap)")
    p.add_argument("dataset")
    p.add_argument("version", help="an evaluate version, v1-... (see grove versions DATASET evaluate)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", parents=[common], help="serve the version that served before the current one")
    p.add_argument("dataset")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("gc", parents=[common], help="delete old versions, keeping the newest N per stage and all that serves "
                                  "(and cached downloads of mutable sources the newest N snapshots do not pin)")
    p.add_argument("--keep", type=int, default=3, help="versions to keep per stage (default 3)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("report", parents=[common], help="write the index page over every dataset's evaluations and reports")
    p.add_argument("--out", default=None, help="where to write it (default <artifact root>/index.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", parents=[common], help="list the configured datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("versions", parents=[common], help="list the published versions of a dataset's stages")
    p.add_argument("dataset")
    p.add_argument("stage", nargs="?", choices=STAGES, metavar="STAGE", help="one stage (default: all; see `grove versions DATASET`)")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("show", parents=[common], help="print the manifest of one version")
    p.add_argument("version", help="a path, or dataset/stage/version under the artifact root")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=cmd_show)
    return parser


def _os_error_message(exc: OSError) -> str:
    """``cannot write /x/index.html: No space left on device (ENOSPC)``: one line, the path and the cause."""
    import errno

    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    where = exc.filename or "a file"
    cause = exc.strerror or str(exc)
    return f"cannot use {where}: {cause}" + (f" ({name})" if name else "")


_ERROR_EXITS = ((ConfigError, "config error: ", EXIT_USAGE), (ArtifactError, "artifact error: ", EXIT_ARTIFACT),
                (SchedulerUnreachable, "", EXIT_SCHEDULING), (StoreError, "artifact root error: ", EXIT_STORE),
                (GroveError, "", EXIT_FAILED))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grove_settings.install()
    logs.setup(verbose=args.verbose or logs.verbose_setting(), luigi_summary=False)
    try:
        try:
            code = args.func(args)
            sys.stdout.flush()
            return code
        except GroveError as exc:
            # The first kind that matches decides the message's prefix and the exit code.
            prefix, code = next((p, c) for kind, p, c in _ERROR_EXITS if isinstance(exc, kind))
            print(f"grove: {prefix}{exc}", file=sys.stderr)
            return code
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            if args.verbose:
                import traceback

                traceback.print_exc()
            print(f"grove: {_os_error_message(exc)}", file=sys.stderr)
            return EXIT_FAILED
    except BrokenPipeError:
        # `grove show ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and end quietly.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
