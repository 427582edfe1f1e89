"""The ``grove`` command line.

Exit codes: 0 success; 1 a task failed; 2 bad usage or a bad config (nothing was run);
3 a damaged or missing artifact; 4 the scheduler could not schedule the tasks; 5 tasks were not run
(for example another process holds them); 6 an external dependency is missing; 7 ``grove rebuild``:
an index failed its quality gate (the previous version keeps serving).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import artifacts
from pipeline.config import available_datasets, load_config
from pipeline.errors import ArtifactError, ConfigError, GroveError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ARTIFACT, EXIT_SCHEDULING, EXIT_NOT_RUN, EXIT_MISSING, EXIT_GATE = range(8)
STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")


def _settings():
    from .base import grove

    return grove()


def _chain_outputs(tasks: list) -> list[Path]:
    """The version directories every task below ``tasks`` reads or writes."""
    from luigi.task import flatten

    from .base import GroveTask
    from .chain import Chain, current_evaluate

    seen, paths, stack = set(), [], list(tasks)
    while stack:
        task = stack.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        if isinstance(task, GroveTask) and task.stage != "snapshot":
            paths.append(task.output().path)
        stack.extend(flatten(task.requires()))
        if isinstance(task, Chain):  # below a snapshot: the chain of the date's (else the newest) snapshot
            try:
                stack.append(task.evaluate() or current_evaluate(task.dataset))
            except ConfigError:  # mutable sources never snapshotted: nothing built yet to check
                pass
    return paths


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import lifecycle
    from pipeline.stages import format_results

    from .chain import Chain

    settings = _settings()
    for dataset in args.datasets:  # every config is checked before any work starts
        load_config(dataset, settings.config_dir())
    chains = [Chain(dataset=d) for d in args.datasets]
    if args.rebuild:
        for path, why in lifecycle.remove_damaged(_chain_outputs(chains)):
            print(f"removed damaged {path.name}: {why}", file=sys.stderr)
    code = _build(chains, args)
    for chain in chains:
        dataset, evaluate = chain.dataset, chain.evaluate()
        target = evaluate.output() if evaluate is not None else None
        if target is not None and target.exists():
            summary = json.loads((target.path / "results.json").read_text())
            print(f"\n{dataset}: {target.ref.key}\n{format_results(summary['rows'], summary['k'])}")
    return code


def _build(tasks: list, args: argparse.Namespace) -> int:
    """luigi.build with the command's scheduler options; prints Luigi's summary; returns our exit code."""
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    kwargs = {"workers": args.workers, "detailed_summary": True}
    if args.scheduler_host:
        kwargs.update(scheduler_host=args.scheduler_host, scheduler_port=args.scheduler_port)
    else:
        kwargs["local_scheduler"] = True
        # luigi.cfg keeps workers alive to retry failed tasks, which is what luigid is for; a run on
        # the local scheduler reports a failure at once instead of waiting out retry_delay.
        luigi.configuration.get_config().set("worker", "keep_alive", "false")
    result = luigi.build(tasks, **kwargs)
    print(result.summary_text)
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
    if code == EXIT_NOT_RUN and all(task.complete() for task in tasks):
        # Under luigid another worker may have run tasks this one was waiting for; what was asked
        # for exists, so the run succeeded (two cron jobs on one chain must both report success).
        return EXIT_OK
    return code


def _query_paths(dataset: str) -> tuple[Path, Path, str]:
    """(split dir, forest dir, where they come from): the serving version, else the current config's."""
    from pipeline import lifecycle

    from .chain import Forest as ForestTask, current_evaluate

    root = _settings().artifact_root()
    if lifecycle.serving_version(root, dataset):
        paths = lifecycle.serving_paths(root, dataset)
        return paths["split"], paths["forest"], f"serving {paths['evaluate'].name}"
    parents = current_evaluate(dataset).parent_tasks()
    forest_task = max((t for t in parents.values() if isinstance(t, ForestTask)), key=lambda t: t.n_trees)
    return parents["split"].output().ref.path, forest_task.output().ref.path, "current config (nothing serving)"


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline import query
    from pipeline.forest import Forest

    settings = _settings()
    cfg = load_config(args.dataset, settings.config_dir())
    split_dir, index_dir, origin = _query_paths(args.dataset)
    for path in (split_dir, index_dir):
        artifacts.read_manifest(path)  # missing or damaged: a clear error, exit 3
    base, queries = query.open_split(split_dir)
    vector, exclude = query.query_vector(args.text, cfg["dataset"]["kind"], base, queries)
    forest = None if args.exact else Forest.load(index_dir / "index", metric=cfg["embed"]["metric"], dim=base.dim)
    if forest is not None:
        forest.query(vector, k=1)  # compile/warm once so the timing below is the query alone
    approx, truth = query.search(forest, base, vector, args.k, args.search_k, exclude, cfg["embed"]["metric"],
                                 exact=args.exact or not args.approx_only)
    n_trees = forest.n_trees if forest is not None else "-"
    print(f"{args.dataset}: {args.text!r}  (index {index_dir.name}, {origin}, n_trees={n_trees}, "
          f"search_k={args.search_k or 'default'})")
    print(query.format_answers(approx, truth))
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace) -> int:
    import datetime
    import logging

    from .rebuild import Rebuild

    settings = _settings()
    for dataset in settings.rebuild_list():
        load_config(dataset, settings.config_dir())
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    date = datetime.date.fromisoformat(args.date) if args.date else datetime.date.today()
    code = _build([Rebuild(date=date)], args)
    rejected = [d for d in settings.rebuild_list()
                if (settings.artifact_root() / d / "records" / f"{date.isoformat()}.rejected.json").is_file()]
    if code == EXIT_FAILED and rejected:
        print(f"quality gate rejected: {', '.join(rejected)} (see records/{date.isoformat()}.rejected.json)",
              file=sys.stderr)
        return EXIT_GATE
    return code


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
    for path in doomed:
        print(f"{verb} {path.relative_to(root)}")
    cached = sum(1 for path in doomed if ".downloads" in path.parts)
    print(f"{verb} {len(doomed) - cached} version(s)" + (f" and {cached} cached download(s)" if cached else ""))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_index_page

    root = _settings().artifact_root()
    out = Path(args.out) if args.out else root / "index.html"
    write_index_page(root, out)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    settings = _settings()
    for name in available_datasets(settings.config_dir()):
        cfg = load_config(name, settings.config_dir())
        print(f"{name:<16} {cfg['dataset']['kind']:<10} {cfg['dataset']['description']}")
    return EXIT_OK


def cmd_versions(args: argparse.Namespace) -> int:
    from pipeline import lifecycle

    root = _settings().artifact_root()
    serving = lifecycle.serving_version(root, args.dataset)
    for stage in [args.stage] if args.stage else STAGES:
        for m in artifacts.list_versions(root, args.dataset, stage):
            size = sum(f["bytes"] for f in m.get("files", {}).values())
            flag = ",".join(f for f, on in (("latest", m["latest"]),
                                            ("serving", stage == "evaluate" and m["version"] == serving)) if on)
            metrics = m.get("metrics", {})
            shown = " ".join(f"{k}={v}" for k, v in sorted(metrics.items()))
            print(f"{stage:<9} {m['version']:<22} {m['created_utc']:<26} {size / 1e6:>9.1f} MB {flag:<14} {shown}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.version)
    if not path.is_dir():
        path = _settings().artifact_root() / args.version
    manifest = artifacts.read_manifest(path, verify="sha256" if args.verify else "size")
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return EXIT_OK


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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole chain of one or more datasets")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="dataset names (configs/<name>.toml)")
    p.add_argument("--rebuild", action="store_true",
                   help="first check every existing version of the chain against its manifest's sha256 and "
                        "delete the damaged ones, so they are built again")
    _scheduler_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("query", help="nearest neighbours of a word, a phrase or an item, approximate and exact")
    p.add_argument("dataset")
    p.add_argument("text", metavar="TEXT|ID", help="a word or phrase (word datasets), an item key or a query number")
    p.add_argument("-k", type=int, default=10, help="neighbours to show (default 10)")
    p.add_argument("--search-k", type=int, default=None, help="candidates to inspect (default k * n_trees)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true", help="exact search only")
    mode.add_argument("--approx-only", action="store_true", help="the index only, no exact search beside it")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("rebuild", help="the dated rebuild cron runs: every rebuild dataset, gated and promoted")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default today)")
    p.add_argument("--log", default=None, help="also append the log to this file")
    _scheduler_options(p)
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("promote", help="make an evaluated version serve a dataset (atomic pointer swap)")
    p.add_argument("dataset")
    p.add_argument("version", help="an evaluate version, v1-... (see grove versions DATASET evaluate)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="serve the version that served before the current one")
    p.add_argument("dataset")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("gc", help="delete old versions, keeping the newest N per stage and all that serves "
                                  "(and cached downloads of mutable sources the newest N snapshots do not pin)")
    p.add_argument("--keep", type=int, default=3, help="versions to keep per stage (default 3)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("report", help="write the index page over every dataset's evaluations and reports")
    p.add_argument("--out", default=None, help="where to write it (default <artifact root>/index.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", help="list the configured datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("versions", help="list the published versions of a dataset's stages")
    p.add_argument("dataset")
    p.add_argument("stage", nargs="?", choices=STAGES, help="one stage (default: all)")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("show", help="print the manifest of one version")
    p.add_argument("version", help="a path, or dataset/stage/version under the artifact root")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"grove: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ArtifactError as exc:
        print(f"grove: artifact error: {exc}", file=sys.stderr)
        return EXIT_ARTIFACT
    except GroveError as exc:
        print(f"grove: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
