"""Dated rebuilds for cron: ``luigi --module tasks RangeDailyBase --of Rebuild --start 2026-11-01``."""

from __future__ import annotations

import json
import logging

import luigi

from pipeline import artifacts, lifecycle, snapshot
from pipeline.errors import GroveError

from .base import GroveTask, grove
from .chain import dated_evaluate, dated_requires

log = logging.getLogger("luigi-interface")


class QualityGateError(GroveError, RuntimeError):
    """An evaluated index did not meet its config's [gate]; the previous serving version stays."""


class DatedRecord(GroveTask):
    """The dataset evaluated for one date: gate checked, promoted if it passed, a record written."""

    date = luigi.DateParameter(description="the day this record is for")

    def requires(self):
        return dated_requires(self.dataset, self.date)

    def record_path(self, suffix: str = ".json"):
        return grove().artifact_root() / self.dataset / "records" / f"{self.date.isoformat()}{suffix}"

    def output(self):
        return luigi.LocalTarget(str(self.record_path()))

    def run(self):
        task = dated_evaluate(self.dataset, self.date)
        yield task  # a dynamic dependency: for mutable sources it is known only once the snapshot is taken
        evaluate = task.output().ref
        root = grove().artifact_root()
        results = json.loads((evaluate.path / "results.json").read_text())
        record = lifecycle.judge(root, self.dataset, evaluate, results, self.cfg["gate"], str(self.date))
        if task.pins:
            record["snapshot"] = snapshot.read_snapshot(
                snapshot.snapshot_path(root, self.dataset, self.date))["sources"]
        if not record["promoted"]:
            artifacts.write_json_atomic(self.record_path(".rejected.json"), record)
            raise QualityGateError(f"{self.dataset}: {evaluate.key} failed the quality gate: "
                                   f"{'; '.join(record['reasons'])}; still serving {record['serving']}")
        artifacts.write_json_atomic(self.record_path(), record)


class Rebuild(luigi.WrapperTask):
    """Every dataset of ``[grove] rebuild_datasets`` fetched, embedded, indexed, evaluated, gated."""

    date = luigi.DateParameter(description="the day of this rebuild (cron passes today)")

    def requires(self):
        return [DatedRecord(dataset=d, date=self.date) for d in grove().rebuild_list()]
