"""Dated rebuilds for cron: ``luigi --module tasks RangeDailyBase --of Rebuild --start 2026-11-01``."""

from __future__ import annotations

import logging

import luigi

from pipeline import artifacts, lifecycle, snapshot
from pipeline.errors import GroveError
from pipeline.evaluate import read_results

from .base import GroveTask, grove
from .chain import Snapshot, chain_graph, dated_evaluate, dated_requires

log = logging.getLogger("luigi-interface")
repair_log = logging.getLogger(__name__)  # grove's own lines: shown on the terminal by default


class QualityGateError(GroveError, RuntimeError):
    """An evaluated index did not meet its config's [gate]; the previous serving version stays."""


class DatedRecord(GroveTask):
    """The dataset evaluated for one date: gate checked, promoted if it passed, a record written."""

    date = luigi.DateParameter(description="the day this record is for")

    def requires(self):
        # Not the evaluation: its chain is checked (and repaired) before Luigi is told about it. A task
        # Luigi has seen complete cannot be scheduled again for a while ([scheduler]
        # stable_done_cooldown_secs), so a repair after `yield` would not be rebuilt.
        needed = dated_requires(self.dataset, self.date)
        return needed if isinstance(needed, Snapshot) else []

    def record_path(self, suffix: str = ".json"):
        return grove().artifact_root() / self.dataset / "records" / f"{self.date.isoformat()}{suffix}"

    def output(self):
        return luigi.LocalTarget(str(self.record_path()))

    def run(self):
        task = dated_evaluate(self.dataset, self.date)  # for mutable sources, known once the snapshot is taken
        root = grove().artifact_root()
        # The chain about to be promoted is verified (each file's sha256, once per change); what is damaged
        # goes, with everything built from it, and the dynamic dependency below builds it again.
        ledger = lifecycle.repair_ledger(root, self.dataset, self.date.isoformat())
        for r in lifecycle.repair(chain_graph([task]), ledger=ledger):
            repair_log.warning("%s: removed %s%s (%s); it is built again", self.dataset, "damaged " * r.damaged,
                               r.key, r.reason)
        yield task
        repaired = lifecycle.close_ledger(ledger)
        evaluate = task.output().ref
        results = read_results(evaluate.path)
        record = lifecycle.judge(root, self.dataset, evaluate, results, self.cfg["gate"], str(self.date))
        record["repaired"] = repaired
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
