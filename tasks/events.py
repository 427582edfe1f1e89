"""Luigi's task events as grove reports them: what runs and finishes, and one line per failed task
(``tasks.logs`` holds the terminal and log-file side). Imported with the task modules, so that
commands that run no task do not import Luigi."""

from __future__ import annotations

import logging
import time

import luigi

from pipeline import progress

from . import logs

log = logging.getLogger("grove")


@luigi.Task.event_handler(luigi.Event.START)
def _on_start(task: luigi.Task) -> None:
    task.__dict__["_grove_started"] = time.monotonic()
    log.info("running  %r", task)


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _on_success(task: luigi.Task) -> None:
    started = task.__dict__.get("_grove_started")
    took = f" in {time.monotonic() - started:.1f} s" if started else ""
    progress.finish(task.task_id, ok=True)
    log.info("done     %r%s", task, took)


@luigi.Task.event_handler(luigi.Event.FAILURE)
def _on_failure(task: luigi.Task, exc: BaseException) -> None:
    progress.finish(task.task_id, ok=False, message=logs.reason(exc).splitlines()[0])
    logs.record_failure(task, logs.reason(exc))


@luigi.Task.event_handler(luigi.Event.BROKEN_TASK)
def _on_broken(task: luigi.Task, exc: BaseException) -> None:
    logs.record_failure(task, logs.reason(exc))


@luigi.Task.event_handler(luigi.Event.PROCESS_FAILURE)
def _on_process_failure(task: luigi.Task, message: str) -> None:
    logs.record_failure(task, f"the worker process died: {message.strip().splitlines()[0] if message else ''}")


@luigi.Task.event_handler(luigi.Event.TIMEOUT)
def _on_timeout(task: luigi.Task, message: str) -> None:
    logs.record_failure(task, f"timed out ([worker] timeout in luigi.cfg): {message.strip()}")
