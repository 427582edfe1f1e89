"""Dated rebuilds for cron: ``luigi --module tasks RangeDailyBase --of Rebuild --start 2026-11-01``."""

from __future__ import annotations

import logging

import luigi

from pipeline import artifacts, layout, lifecycle, snapshot
from pipeline.errors import GroveError
from pipeline.evaluate import read_results

from .base import GroveTask, StoreTarget, grove
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

    def record_key(self, rejected: bool = False) -> str:
        return layout.record_key(self.dataset, self.date, rejected=rejected)

    def output(self):
        return StoreTarget(grove().artifact_root(), self.record_key())

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
        results = read_results(artifacts.local_dir(evaluate))
        record = lifecycle.judge(root, self.dataset, evaluate, results, self.cfg.gate.as_dict(), str(self.date))
        record["repaired"] = repaired
        if task.pins:
            record["snapshot"] = snapshot.load_snapshot(root, self.dataset, self.date)["sources"]
        store = artifacts.store_of(root)
        if not record["promoted"]:
            store.write_json(self.record_key(rejected=True), record)
            raise QualityGateError(f"{self.dataset}: {evaluate.key} failed the quality gate: "
                                   f"{'; '.join(record['reasons'])}; still serving {record['serving']}")
        store.write_json(self.record_key(), record)


class Rebuild(luigi.WrapperTask):
    """Every dataset of ``[grove] rebuild_datasets`` fetched, embedded, indexed, evaluated, gated."""

    date = luigi.DateParameter(description="the day of this rebuild (cron passes today)")

    def requires(self):
        return [DatedRecord(dataset=d, date=self.date) for d in grove().rebuild_list()]
