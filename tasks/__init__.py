"""Thin Luigi tasks over ``pipeline``: ``luigi --module tasks Chain --dataset mnist --local-scheduler``."""

from .base import ArtifactTarget, GroveTask, grove
from .chain import Chain, Decode, Embed, Evaluate, Exact, Fetch, Forest, Split

__all__ = ["ArtifactTarget", "Chain", "Decode", "Embed", "Evaluate", "Exact", "Fetch", "Forest", "GroveTask",
           "Split", "grove"]
