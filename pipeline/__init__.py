"""grove's library: plain functions and classes; no luigi import anywhere below this package."""

import os as _os

__version__ = "0.1.0"

# numba's compiled kernels (pipeline/_forest_kernels.py, _exact_kernels.py; ``cache=True``) are cached
# in __pycache__ beside them. Where that cannot be written (grove installed into a read-only
# site-packages, a shared installation), they go to grove's per-machine scratch directory instead
# (pipeline.paths.scratch_dir: GROVE_SCRATCH, else $XDG_CACHE_HOME/grove, else ~/.cache/grove), under
# numba/. Left alone, numba would fall back to ~/.cache/numba and, where that cannot be written
# either (a service account without a home), refuse to import the kernels at all. NUMBA_CACHE_DIR,
# when set, wins. This runs before any kernel module is imported: numba picks the directory when a
# kernel is defined. `python -m pipeline.warm` fills the cache (see pipeline/warm.py).
NUMBA_CACHE_SUBDIR = "numba"


def _writable_dir(path: str) -> bool:
    try:
        _os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return _os.access(path, _os.W_OK | _os.X_OK)


def _choose_numba_cache() -> None:
    """Set NUMBA_CACHE_DIR to the scratch directory when the kernels' own __pycache__ cannot be
    written and NUMBA_CACHE_DIR is not set (see above)."""
    if _os.environ.get("NUMBA_CACHE_DIR"):
        return
    if _writable_dir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "__pycache__")):
        return
    from .paths import scratch_dir

    scratch = _os.path.abspath(scratch_dir() / NUMBA_CACHE_SUBDIR)
    if not _writable_dir(scratch):
        return  # numba's own fallback decides (its per-user directory, else an error)
    _os.environ["NUMBA_CACHE_DIR"] = scratch
    import sys

    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba was imported before grove: it read the variable already
        config.CACHE_DIR = scratch


_choose_numba_cache()

# The application API (pipeline/api.py), imported on first use so that `import pipeline` stays cheap.
_API = ("open_index", "Index", "Neighbors", "default_root")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
