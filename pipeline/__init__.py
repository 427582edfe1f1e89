"""grove's library: plain functions and classes; no luigi import anywhere below this package."""

__version__ = "0.1.0"
