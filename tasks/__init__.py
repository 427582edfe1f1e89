"""Thin Luigi tasks over ``pipeline``: ``luigi --module tasks Chain --dataset mnist --local-scheduler``.

The task modules (and Luigi with them) are imported when a task is first asked for (``tasks.Chain``,
``from tasks import Chain``), or at once when Luigi is already imported: ``luigi --module tasks``
imports Luigi first and then looks the tasks up by name in its registry. A plain ``import tasks``
(what ``grove``, ``tasks.cli:main``, does first) stays cheap, so a command that runs no task does not
pay for Luigi and every stage's imports.
"""

import importlib
import os
import sys

# name -> the module of this package that defines it
_EXPORTS = {
    "ArtifactTarget": "base", "GroveTask": "base", "grove": "base",
    "Chain": "chain", "Decode": "chain", "Embed": "chain", "Evaluate": "chain", "Exact": "chain",
    "Features": "chain", "Fetch": "chain", "Forest": "chain", "Snapshot": "chain", "Split": "chain", "Train": "chain",
    "DatedRecord": "rebuild", "QualityGateError": "rebuild", "Rebuild": "rebuild",
}
__all__ = sorted(_EXPORTS, key=str.lower)
_loaded = False


def _load_tasks() -> None:
    """Import every task module (registering the tasks with Luigi), once, after luigi.cfg is found."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import luigi.configuration

    from . import settings

    settings.install()  # the nearest luigi.cfg, from any working directory (tasks/settings.py)

    from . import base, chain, logs, rebuild  # noqa: F401  (base brings tasks.events: what runs, what failed)

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


def __getattr__(name: str):
    if name in _EXPORTS:
        _load_tasks()
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if "luigi" in sys.modules:
    _load_tasks()
