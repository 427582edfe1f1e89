"""Thin Luigi tasks over ``pipeline``: ``luigi --module tasks Chain --dataset mnist --local-scheduler``."""

import sys

import luigi.configuration

from .base import ArtifactTarget, GroveTask, grove
from .chain import Chain, Decode, Embed, Evaluate, Exact, Features, Fetch, Forest, Snapshot, Split, Train
from .rebuild import DatedRecord, QualityGateError, Rebuild

__all__ = ["ArtifactTarget", "Chain", "DatedRecord", "Decode", "Embed", "Evaluate", "Exact", "Features", "Fetch", "Forest",
           "GroveTask", "QualityGateError", "Rebuild", "Snapshot", "Split", "Train", "grove"]

if "--local-scheduler" in sys.argv[1:]:
    # `luigi --module tasks ... --local-scheduler`: luigi.cfg keeps workers alive so that under luigid
    # they wait for each other and for retries; on the local scheduler that would make a failed run
    # wait out [scheduler] retry_delay (several times) instead of exiting with [retcode] task_failed.
    # (`grove run/rebuild` make the same choice from their --scheduler-host option.)
    luigi.configuration.get_config().set("worker", "keep_alive", "false")
