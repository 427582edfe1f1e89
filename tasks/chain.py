"""The stages of one dataset's chain, fetch -> decode -> embed -> split -> exact / forest -> evaluate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import luigi

from pipeline import learned, snapshot, stages
from pipeline.config import load_config, mutable_sources

from .base import GroveTask, grove


class Snapshot(GroveTask):
    """Today's bytes of a dataset's mutable sources, downloaded again and their sha256 recorded.

    Its output is ``<dataset>/snapshots/<date>.json``; the pins in it name the fetch version (and so
    every version below it) for that date: unchanged bytes mean unchanged digests and no rebuild.
    """

    stage = "snapshot"
    date = luigi.DateParameter(description="the day of this snapshot")
    resources = {"downloads": 1}

    def output(self):
        return luigi.LocalTarget(str(snapshot.snapshot_path(grove().artifact_root(), self.dataset, self.date)))

    def recorded_pins(self) -> dict[str, str] | None:
        """The pins of this date's record for the config's mutable sources; None if there is no record
        or it does not cover them all (taken before a source was marked mutable: take it again)."""
        path = Path(self.output().path)
        if not path.is_file():
            return None
        pins = snapshot.read_snapshot(path)["pins"]
        names = mutable_sources(self.cfg)
        return {name: pins[name] for name in names} if set(names) <= set(pins) else None

    def complete(self):
        return self.recorded_pins() is not None

    def run(self):
        snapshot.take_snapshot(self.cfg, grove().artifact_root(), self.date, grove().mirror_prefix(), self.report)


def dated_evaluate(dataset: str, date: dt.date) -> "Evaluate | None":
    """The Evaluate task of ``dataset`` for ``date``: pinned to that date's snapshot when the dataset
    has mutable sources (None while that snapshot is not taken yet), plain otherwise."""
    cfg = load_config(dataset, grove().config_dir())
    if not mutable_sources(cfg):
        return Evaluate(dataset=dataset)
    pins = Snapshot(dataset=dataset, date=date).recorded_pins()
    return None if pins is None else Evaluate(dataset=dataset, pins=pins)


def current_evaluate(dataset: str) -> "Evaluate":
    """The Evaluate task of the current config and the newest snapshot (for commands without a date)."""
    cfg = load_config(dataset, grove().config_dir())
    return Evaluate(dataset=dataset, pins=snapshot.latest_pins(grove().artifact_root(), cfg))


def dated_requires(dataset: str, date: dt.date) -> luigi.Task:
    """What a dated task needs before it can name its Evaluate: the snapshot, or Evaluate itself."""
    cfg = load_config(dataset, grove().config_dir())
    if mutable_sources(cfg):
        return Snapshot(dataset=dataset, date=date)
    return Evaluate(dataset=dataset)


class Fetch(GroveTask):
    stage = "fetch"
    resources = {"downloads": 1}  # luigi.cfg [resources] caps concurrent downloads across workers

    def write(self, tmp: Path):
        cache = grove().artifact_root() / self.dataset / ".downloads"
        return stages.write_fetch(self.cfg, tmp, cache, grove().mirror_prefix(), self.report)


class Decode(GroveTask):
    stage = "decode"

    def parent_tasks(self):
        return {"fetch": self.clone(Fetch)}

    def write(self, tmp: Path):
        return stages.write_decode(self.cfg, self.parent_path("fetch"), tmp, self.report)


class Features(GroveTask):
    """A frozen pretrained backbone run once over every image; its features are cached here."""

    stage = "features"

    def parent_tasks(self):
        return {"decode": self.clone(Decode)}

    def write(self, tmp: Path):
        return learned.write_features(self.cfg, self.parent_path("decode"), tmp, grove().thread_count(), self.report)


class Train(GroveTask):
    """The CNN with a bottleneck, trained on the train split (on cached features for a pretrained backbone)."""

    stage = "train"
    resources = {"cnn_training": 1}  # luigi.cfg [resources]: one training at a time across workers

    def parent_tasks(self):
        parents = {"decode": self.clone(Decode)}
        if learned.pretrained(self.cfg):
            parents["features"] = self.clone(Features)
        return parents

    def write(self, tmp: Path):
        checkpoints = grove().artifact_root() / self.dataset / ".checkpoints" / self.output().ref.version
        features = self.parent_path("features") if "features" in self.parent_refs() else None
        return learned.write_train(self.cfg, self.parent_path("decode"), features, tmp, checkpoints,
                                   grove().thread_count(), self.report)


class Embed(GroveTask):
    stage = "embed"

    def parent_tasks(self):
        parents = {"decode": self.clone(Decode)}
        if self.cfg["embed"]["model"] == "cnn":
            parents["train"] = self.clone(Train)
            if learned.pretrained(self.cfg):
                parents["features"] = self.clone(Features)
        return parents

    def write(self, tmp: Path):
        refs = self.parent_refs()
        return stages.write_embed(self.cfg, refs["decode"].path, tmp, self.report,
                                  trained=refs["train"].path if "train" in refs else None,
                                  features=refs["features"].path if "features" in refs else None,
                                  threads=grove().thread_count())


class Split(GroveTask):
    stage = "split"

    def parent_tasks(self):
        return {"embed": self.clone(Embed)}

    def write(self, tmp: Path):
        return stages.write_split(self.cfg, self.parent_path("embed"), tmp, self.report)


class Exact(GroveTask):
    stage = "exact"

    def parent_tasks(self):
        return {"split": self.clone(Split)}

    def write(self, tmp: Path):
        return stages.write_exact(self.cfg, self.parent_path("split"), tmp, self.report)


class Forest(GroveTask):
    stage = "forest"
    n_trees = luigi.IntParameter(description="number of trees of this index")

    def stage_params(self):
        return stages.stage_params(self.cfg, self.stage, n_trees=self.n_trees)

    def parent_tasks(self):
        return {"split": self.clone(Split)}

    def write(self, tmp: Path):
        return stages.write_forest(self.cfg, self.parent_path("split"), tmp, self.n_trees,
                                   grove().thread_count(), self.report)


class Evaluate(GroveTask):
    stage = "evaluate"

    def parent_tasks(self):
        forests = {f"forest_{n}": self.clone(Forest, n_trees=n) for n in self.cfg["forest"]["n_trees"]}
        return {"embed": self.clone(Embed), "split": self.clone(Split), "exact": self.clone(Exact), **forests}

    def write(self, tmp: Path):
        forests = {task.n_trees: self.parent_path(name) for name, task in self.parent_tasks().items()
                   if isinstance(task, Forest)}
        out = stages.write_evaluate(self.cfg, self.parent_path("embed"), self.parent_path("split"),
                                    self.parent_path("exact"), forests, tmp, self.report)
        ref = self.output().ref
        stub = {"dataset": self.dataset, "stage": self.stage, "version": ref.version, "params": self.stage_params(),
                "parents": {name: parent.key for name, parent in self.parent_refs().items()},
                "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        stages.write_report(grove().artifact_root(), tmp, stub, self.report)
        return out


class Chain(luigi.Task):
    """Everything for one dataset: fetched, embedded, indexed and evaluated.

    A dataset with mutable sources first takes the snapshot of ``date``; the evaluation it then
    needs (a dynamic dependency) is the one pinned to what that snapshot saw.
    """

    dataset = luigi.Parameter(description="dataset name: a configs/<dataset>.toml")
    date = luigi.DateParameter(default=dt.date.today(),
                               description="the day whose snapshot of mutable sources is used (default today)")

    def requires(self):
        return dated_requires(self.dataset, self.date)

    def evaluate(self) -> Evaluate | None:
        return dated_evaluate(self.dataset, self.date)

    def complete(self):
        evaluate = self.evaluate()
        return evaluate is not None and evaluate.complete()

    def run(self):
        yield self.evaluate()
