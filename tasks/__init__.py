"""Thin Luigi tasks over ``pipeline``: ``luigi --module tasks Chain --dataset mnist --local-scheduler``."""

from .base import ArtifactTarget, GroveTask, grove
from .chain import Chain, Decode, Embed, Evaluate, Exact, Features, Fetch, Forest, Split, Train
from .rebuild import DatedRecord, QualityGateError, Rebuild

__all__ = ["ArtifactTarget", "Chain", "DatedRecord", "Decode", "Embed", "Evaluate", "Exact", "Features", "Fetch", "Forest",
           "GroveTask", "QualityGateError", "Rebuild", "Split", "Train", "grove"]
