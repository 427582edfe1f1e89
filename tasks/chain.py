"""The stages of one dataset's chain, fetch -> decode -> embed -> split -> exact / forest -> evaluate.

Each task is one stage of ``pipeline.stages.STAGES``: its FORMAT, parameters and parents come from
there (``GroveTask``); a task adds only the context its parameters need and the call of its write."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import luigi
from luigi.task import flatten

from pipeline import artifacts, layout, learned, snapshot, stages
from pipeline.artifacts import ArtifactRef
from pipeline.config import mutable_sources
from pipeline.errors import ArtifactError, ConfigError

from .base import ArtifactTarget, GroveTask, StoreTarget, dataset_config, fixed_outputs, grove

log = logging.getLogger(__name__)


class Snapshot(GroveTask):
    """Today's bytes of a dataset's mutable sources, downloaded again and their sha256 recorded.

    Its output is ``<dataset>/snapshots/<date>.json``; the pins in it name the fetch version (and so
    every version below it) for that date: unchanged bytes mean unchanged digests and no rebuild.
    """

    stage = "snapshot"
    date = luigi.DateParameter(description="the day of this snapshot")
    resources = {"downloads": 1}

    def output(self):
        return StoreTarget(grove().artifact_root(), layout.snapshot_key(self.dataset, self.date))

    def recorded_pins(self) -> dict[str, str] | None:
        """The pins of this date's record for the config's mutable sources; None if there is no record
        or it does not cover them all (taken before a source was marked mutable: take it again)."""
        record = snapshot.load_snapshot(grove().artifact_root(), self.dataset, self.date)
        if record is None:
            return None
        pins = record["pins"]
        names = mutable_sources(self.cfg)
        return {name: pins[name] for name in names} if set(names) <= set(pins) else None

    def complete(self):
        return self.recorded_pins() is not None

    def run(self):
        snapshot.take_snapshot(self.cfg, grove().artifact_root(), self.date, grove().mirror_prefix(), self.report)


def dated_evaluate(dataset: str, date: dt.date) -> "Evaluate | None":
    """The Evaluate task of ``dataset`` for ``date``: pinned to that date's snapshot when the dataset
    has mutable sources (None while that snapshot is not taken yet), plain otherwise."""
    cfg = dataset_config(dataset)
    if not mutable_sources(cfg):
        return Evaluate(dataset=dataset)
    pins = Snapshot(dataset=dataset, date=date).recorded_pins()
    return None if pins is None else Evaluate(dataset=dataset, pins=pins)


def current_evaluate(dataset: str) -> "Evaluate":
    """The Evaluate task of the current config and the newest snapshot (for commands without a date)."""
    cfg = dataset_config(dataset)
    return Evaluate(dataset=dataset, pins=snapshot.latest_pins(grove().artifact_root(), cfg))


def dated_requires(dataset: str, date: dt.date) -> luigi.Task:
    """What a dated task needs before it can name its Evaluate: the snapshot, or Evaluate itself."""
    cfg = dataset_config(dataset)
    if mutable_sources(cfg):
        return Snapshot(dataset=dataset, date=date)
    return Evaluate(dataset=dataset)


class Fetch(GroveTask):
    stage = "fetch"
    resources = {"downloads": 1}  # luigi.cfg [resources] caps concurrent downloads across workers

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, tmp, layout.download_cache(self.dataset), grove().mirror_prefix(),
                                  self.report, root=grove().artifact_root())


class Decode(GroveTask):
    stage = "decode"

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("fetch"), tmp, self.report)


class Features(GroveTask):
    """A frozen pretrained backbone run once over every image; its features are cached here."""

    stage = "features"

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("decode"), tmp, self.report)


class Train(GroveTask):
    """The CNN with a bottleneck, trained on the train split (on cached features for a pretrained backbone)."""

    stage = "train"
    resources = {"cnn_training": 1}  # luigi.cfg [resources]: one training at a time across workers

    def stage_context(self):
        return {"image_shape": self.image_shape()}

    def image_shape(self) -> tuple[int, ...] | None:
        """The decoded images' (h, w[, c]), which resolve the small CNN's defaults; None while they are
        not decoded (the digest is then provisional, see pipeline.stages) or not needed."""
        decode = self.clone(Decode).output().ref
        if learned.pretrained(self.cfg) or not decode.exists():
            return None
        return learned.image_shape(artifacts.local_dir(decode))

    def write(self, tmp: Path):
        checkpoints = layout.checkpoints_dir(self.dataset, self.output().ref.version)
        features = self.parent_path("features") if "features" in self.parent_refs() else None
        return self.spec.write(self.cfg, self.parent_path("decode"), features, tmp, checkpoints, self.report)


class Sharded(GroveTask):
    """A stage whose work ``[grove] shards`` (GROVE_SHARDS) splits into part tasks over ranges (rows,
    queries or trees); the stage then assembles its version from the parts' versions, the bytes it
    would compute in one piece.

    The parts are static requirements (``requires``), so every worker that schedules the chain knows
    them and luigid can hand them to any of its workers. (Parts yielded from ``run`` as dynamic
    dependencies would run only on the worker that yielded them.) A part is named by its shard
    number; the rows or queries it covers need the size of what the parents built, so its range
    (and its digest, which hashes the range) resolves once they are built, like any provisional
    digest (see pipeline.stages)."""

    part_class: type[GroveTask]

    def ranges(self, shards: int) -> list[tuple[int, int]] | None:
        """The parts' ``(first, last)`` for ``shards`` > 1; None while the parents that decide them are
        not built."""
        raise NotImplementedError

    def part_tasks(self) -> list[GroveTask]:
        shards = grove().shard_count()
        return [] if shards == 1 else [self.clone(self.part_class, shard=i, shards=shards) for i in range(shards)]

    def requires(self):
        return {**self.parent_tasks(), **{f"part_{i}": task for i, task in enumerate(self.part_tasks())}}

    def part_dirs(self) -> list[Path] | None:
        """The published parts' directories in order, or None to build in one piece: no shards, or a
        part that is not published (a worker whose shard count differs from the scheduler's)."""
        parts = [task for task in self.part_tasks() if not task.empty()]
        if not parts:
            return None
        missing = [task for task in parts if not task.output().exists()]
        if missing:
            log.warning("%s: %d of %d parts are not published (shards changed?); building in one piece",
                        self, len(missing), len(parts))
            return None
        return [artifacts.local_dir(task.output().ref) for task in parts]


class Part(GroveTask):
    """Shard ``shard`` of ``shards`` of a sharded stage's work (see ``Sharded``): the range of rows or
    queries it covers comes from ``whole_class.ranges``. A shard past the ranges there are (too little
    to split) is empty: complete at once, nothing published."""

    shard = luigi.IntParameter(description="this part's number, 0 .. shards - 1")
    shards = luigi.IntParameter(description="how many parts the stage is split into")
    whole_class: type[Sharded]

    def part_range(self) -> tuple[int, int] | None:
        """``(first, last)``; None while the parents are not built; ``(0, 0)`` for an empty shard."""
        ranges = self.clone(self.whole_class).ranges(self.shards)
        if ranges is None:
            return None
        return ranges[self.shard] if self.shard < len(ranges) else (0, 0)

    def empty(self) -> bool:
        r = self.part_range()
        return r is not None and r[0] >= r[1]

    def stage_context(self):
        r = self.part_range()
        return {"first": None, "last": None} if r is None else {"first": r[0], "last": r[1]}

    @property
    def first(self) -> int:
        return self.part_range()[0]

    @property
    def last(self) -> int:
        return self.part_range()[1]

    def complete(self) -> bool:
        return self.empty() or super().complete()

    def run(self):
        if not self.empty():
            super().run()


def _embed_inputs(task: GroveTask) -> dict:
    """What an embedding reads besides the decoded items: the trained CNN and cached features when
    the config has them, and torch's thread count (significant: its results depend on it)."""
    refs = task.parent_refs()
    return {"trained": task.parent_path("train") if "train" in refs else None,
            "features": task.parent_path("features") if "features" in refs else None,
            "threads": task.cfg.train.threads}


class EmbedPart(Part):
    stage = "embed-part"

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("decode"), tmp, self.first, self.last, self.report,
                               **_embed_inputs(self))


class Embed(Sharded):
    stage = "embed"
    part_class = EmbedPart

    def ranges(self, shards):
        rows = _manifest_rows(self.clone(Decode), "items")
        return None if rows is None else stages.shard_ranges(rows, shards, stages.EMBED_BLOCK_ROWS)

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("decode"), tmp, self.report, **_embed_inputs(self),
                               parts=self.part_dirs())


EmbedPart.whole_class = Embed


class Split(GroveTask):
    stage = "split"

    def stage_context(self):
        return {"test_rows": self.test_rows()}

    def test_rows(self) -> int | None:
        """The embedded rows marked test (a column split's queries); None for a holdout split or while
        they are not embedded (the digest is then provisional, see pipeline.stages)."""
        embed = self.clone(Embed).output().ref
        column = self.cfg.split.method == "column"
        return stages.count_test_rows(artifacts.local_dir(embed)) if column and embed.exists() else None

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("embed"), tmp, self.report)


class ExactPart(Part):
    stage = "exact-part"

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("split"), tmp, self.first, self.last, self.report)


class Exact(Sharded):
    stage = "exact"
    part_class = ExactPart

    def ranges(self, shards):
        queries = _manifest_rows(self.clone(Split), "queries")
        return None if queries is None else stages.shard_ranges(queries, shards, stages.EXACT_QUERY_BLOCK)

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("split"), tmp, self.report, parts=self.part_dirs())


ExactPart.whole_class = Exact


def _published_manifest(task: GroveTask) -> dict | None:
    """The manifest of ``task``'s published version; None while it is not built (the digests that
    depend on it are then provisional, see pipeline.stages)."""
    ref = task.output().ref
    return artifacts.read_manifest(ref, verify="none") if ref.exists() else None


def _manifest_rows(task: GroveTask, name: str) -> int | None:
    """A row count the published version of ``task`` records (``rows[name]``); None while it is not built."""
    manifest = _published_manifest(task)
    return None if manifest is None else manifest["rows"][name]


def _vector_dim(task: GroveTask) -> int | None:
    """The width of the vectors an index is built over (the embed stage's manifest records it), None
    while they are not built: a forest's digest is then provisional (see stages.stage_params)."""
    manifest = _published_manifest(task.clone(Embed))
    return None if manifest is None else manifest.get("dim")


class ForestPart(GroveTask):
    """Trees ``first`` .. ``last - 1`` of a forest (a tree depends only on the data and its own seed,
    so one part serves every forest that has those trees in that grouping)."""

    stage = "forest-part"
    first = luigi.IntParameter(description="first tree of this part")
    last = luigi.IntParameter(description="one past the last")

    def empty(self) -> bool:
        return False

    def stage_context(self):
        return {"first": self.first, "last": self.last, "dim": _vector_dim(self)}

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("split"), tmp, self.first, self.last,
                               grove().thread_count(), self.report)


class Forest(Sharded):
    stage = "forest"
    n_trees = luigi.IntParameter(description="number of trees of this index")
    part_class = ForestPart

    def stage_context(self):
        return {"n_trees": self.n_trees, "dim": _vector_dim(self)}

    def part_tasks(self):
        # a part names trees, not forests: n_trees is not one of its parameters; the ranges are known
        # before anything is built
        shards = grove().shard_count()
        return [] if shards == 1 else [ForestPart(dataset=self.dataset, pins=self.pins, first=a, last=b)
                                       for a, b in stages.shard_ranges(self.n_trees, shards)]

    def write(self, tmp: Path):
        return self.spec.write(self.cfg, self.parent_path("split"), tmp, self.n_trees,
                               grove().thread_count(), self.report, parts=self.part_dirs())


class Evaluate(GroveTask):
    stage = "evaluate"

    def stage_context(self):
        rows = self.split_rows()
        return {"n_queries_available": rows.get("queries"), "n_base": rows.get("base")}

    def split_rows(self) -> dict:
        """The split's row counts, ``{"base": n, "queries": n}`` (its manifest records them); {} while it
        is not built (the digest is then provisional, see pipeline.stages)."""
        try:
            manifest = _published_manifest(self.clone(Split))
            return {} if manifest is None else dict(manifest["rows"])
        except (ArtifactError, KeyError, TypeError, ValueError):
            return {}  # a damaged manifest: this stage's run reports it when it verifies its parents

    def parent_tasks(self):
        # One forest parent per n_trees of the config, named forest_<n_trees>.
        parents = {}
        for name in self.spec.parents_for(self.cfg):
            if name == "forest":
                parents.update({f"forest_{n}": self.clone(Forest, n_trees=n) for n in self.cfg.forest.n_trees})
            else:
                parents[name] = self.clone(GroveTask._by_stage[name])
        return parents

    def write(self, tmp: Path):
        forests = {task.n_trees: self.parent_path(name) for name, task in self.parent_tasks().items()
                   if isinstance(task, Forest)}
        root = grove().artifact_root()
        out = self.spec.write(self.cfg, self.parent_path("embed"), self.parent_path("split"),
                                    self.parent_path("exact"), forests, tmp, self.report, root=root)
        ref = self.output().ref
        stub = {"dataset": self.dataset, "stage": self.stage, "version": ref.version, "params": self.stage_params(),
                "parents": {name: parent.key for name, parent in self.parent_refs().items()},
                "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        out["measured"] = [*out.get("measured", []), *stages.write_report(root, tmp, stub, self.report)]
        return out


class Chain(luigi.Task):
    """Everything for one dataset: fetched, embedded, indexed and evaluated.

    A dataset with mutable sources first takes the snapshot of ``date``; the evaluation it then
    needs is the one pinned to what that snapshot saw: a static requirement when the snapshot is
    already taken, else a dynamic dependency. (luigid hands a dynamic dependency, and the tasks below
    it, only to the worker that yielded it; a static one, to any worker that asks.)
    """

    dataset = luigi.Parameter(description="dataset name: a configs/<dataset>.toml")
    date = luigi.DateParameter(default=dt.date.today(),
                               description="the day whose snapshot of mutable sources is used (default today)")

    def requires(self):
        needed = dated_requires(self.dataset, self.date)
        evaluate = self.evaluate() if isinstance(needed, Snapshot) else None
        return needed if evaluate is None else [needed, evaluate]

    def evaluate(self) -> Evaluate | None:
        return dated_evaluate(self.dataset, self.date)

    def complete(self):
        evaluate = self.evaluate()
        return evaluate is not None and evaluate.complete()

    def run(self):
        yield self.evaluate()


def chain_graph(tasks: list[luigi.Task]) -> dict[ArtifactRef, list[ArtifactRef]]:
    """Every version that the stages below ``tasks`` read or write, mapped to its parents: the DAG
    ``lifecycle.repair`` works on (it holds where a version is gone, as the tasks know their parents). Below a Chain: the evaluation of the date's snapshot, else
    of the newest one; a dataset whose mutable sources were never snapshotted has nothing built yet."""
    with fixed_outputs():
        return _chain_graph(tasks)


def _chain_graph(tasks: list[luigi.Task]) -> dict[ArtifactRef, list[ArtifactRef]]:
    graph: dict[ArtifactRef, list[ArtifactRef]] = {}
    seen: set[str] = set()
    stack = list(tasks)
    while stack:
        task = stack.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        if isinstance(task, GroveTask) and isinstance(task.output(), ArtifactTarget):
            parents = list(task.parent_tasks().values())
            graph[task.output().ref] = [parent.output().ref for parent in parents]
            stack.extend(parents)
            continue
        stack.extend(flatten(task.requires()))
        if isinstance(task, Chain):
            try:
                stack.append(task.evaluate() or current_evaluate(task.dataset))
            except ConfigError:
                pass
    return graph
