"""Thin Luigi tasks over ``pipeline``: ``luigi --module tasks Chain --dataset mnist --local-scheduler``."""

import os
import sys

import luigi.configuration

from . import settings

settings.install()  # the nearest luigi.cfg, from any working directory (tasks/settings.py)

from . import logs  # noqa: E402  (event handlers: what runs, what failed)
from .base import ArtifactTarget, GroveTask, grove  # noqa: E402
from .chain import Chain, Decode, Embed, Evaluate, Exact, Features, Fetch, Forest, Snapshot, Split, Train  # noqa: E402
from .rebuild import DatedRecord, QualityGateError, Rebuild  # noqa: E402

__all__ = ["ArtifactTarget", "Chain", "DatedRecord", "Decode", "Embed", "Evaluate", "Exact", "Features", "Fetch", "Forest",
           "GroveTask", "QualityGateError", "Rebuild", "Snapshot", "Split", "Train", "grove"]

if os.path.basename(sys.argv[0]) == "luigi" and "--module" in sys.argv[1:]:
    # `luigi --module tasks ...`: the same quiet terminal as `grove` (Luigi's summary kept, failures as
    # one line each as they happen), unless luigi.cfg [grove] verbose or GROVE_VERBOSE asks for all.
    logs.setup(verbose=logs.verbose_setting(), luigi_summary=True, immediate_failures=True)

if "--local-scheduler" in sys.argv[1:]:
    # `luigi --module tasks ... --local-scheduler`: luigi.cfg keeps workers alive so that under luigid
    # they wait for each other and for retries; on the local scheduler that would make a failed run
    # wait out [scheduler] retry_delay (several times) instead of exiting with [retcode] task_failed.
    # (`grove run/rebuild` make the same choice from their --scheduler-host option.)
    luigi.configuration.get_config().set("worker", "keep_alive", "false")
