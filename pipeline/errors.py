"""The error types grove raises.

Every error is also a built-in type, so callers that only know Python's own hierarchy
(``except ValueError``, ``except OSError``) still catch it. Messages name the file or key,
the expected and the actual value, and what to do about it.
"""

from __future__ import annotations


class GroveError(Exception):
    """Base of every error grove raises on purpose."""


class ConfigError(GroveError, ValueError):
    """A dataset config or a setting is invalid (unknown key, wrong type, missing checksum...)."""


class DownloadError(GroveError, OSError):
    """No URL in a source list could deliver a file."""


class ChecksumError(DownloadError):
    """A downloaded or stored file does not have the published digest."""


class FormatError(GroveError, ValueError):
    """An input file is malformed or truncated (IDX, word2vec, archive...)."""


class ArtifactError(GroveError, RuntimeError):
    """An artifact is missing, incomplete, or does not match its manifest."""


class IndexFormatError(FormatError):
    """An index file on disk is corrupt, truncated, or of an unknown format version."""


class IndexMismatchError(GroveError, ValueError):
    """An index was opened or queried with the wrong metric or dimension."""


class StoreError(GroveError, OSError):
    """An artifact root cannot be used: endpoint unreachable, credentials refused, bucket missing,
    no write permission, a connection lost in the middle of a transfer."""


# --- what pipeline.api raises (importable from there too) -----------------------------------------


class UnknownDatasetError(ConfigError):
    """No dataset of that name under the artifact root (or the name is not a dataset name)."""


class NotServingError(ArtifactError):
    """Nothing serves the dataset (no ``grove rebuild`` or ``grove promote`` yet)."""


class UnknownKeyError(ConfigError, LookupError):
    """No item with that key, or a word that is not in the vocabulary."""


class QueryError(ConfigError):
    """A query that cannot be answered as asked: k < 1, a bad search_k, NaN or infinity in a vector,
    text on a dataset that has no words."""
