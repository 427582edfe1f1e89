"""What a person sees on the terminal, for `grove` and for `luigi --module tasks`.

Quiet by default: which task runs, grove's own INFO and WARNING lines, progress, one summary and,
on failure, one line per failed task with the reason and the path of the full log. Everything
(Luigi's DEBUG chatter, tracebacks) goes to that log file in the scratch directory
(``<scratch>/logs/``). ``--verbose`` (``grove``) or ``[grove] verbose = true`` / ``GROVE_VERBOSE=1``
(both) prints everything on the terminal too, as Luigi does by itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import progress
from pipeline.paths import scratch_dir

log = logging.getLogger("grove")

_OWN = ("grove", "pipeline", "tasks")
_SUMMARY_MARK = "===== Luigi Execution Summary ====="
_KEEP_LOGS = 30
_state: dict = {"log_file": None, "failures": None, "console": None, "file": None, "immediate": False}


class _QuietFilter(logging.Filter):
    """Lets through grove's own INFO+ lines, other libraries' WARNING+ lines (first line only, no
    traceback) and, if asked, Luigi's execution summary."""

    def __init__(self, luigi_summary: bool):
        super().__init__()
        self.luigi_summary = luigi_summary

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name.split(".")[0] in _OWN:
            return record.levelno >= logging.INFO
        if name.startswith("luigi"):
            message = record.getMessage()
            if _SUMMARY_MARK in message:
                return self.luigi_summary
            # A task's failure is reported by grove's own line; its traceback is in the log file.
            if record.exc_info or " failed    " in message:
                return False
        return record.levelno >= logging.WARNING


class _FirstLine(logging.Formatter):
    """One line per record (multi-line messages other than the summary are cut), no tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if _SUMMARY_MARK not in message:
            first = message.strip().splitlines()[0] if message.strip() else ""
            if first != message.strip():
                first += f"  (more in {_state['log_file']})"
            message = first
        if record.levelno >= logging.WARNING and record.name.split(".")[0] not in _OWN:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno >= logging.WARNING:
            return f"grove: {record.levelname.lower()}: {message}"
        return message


def _new_log_file() -> Path:
    directory = scratch_dir() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    old = sorted(directory.glob("grove-*.log"))
    for path in old[:-_KEEP_LOGS]:  # keep the newest few runs' logs
        for p in (path, path.with_suffix(".failures.jsonl")):
            try:
                p.unlink()
            except OSError:
                pass
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return directory / f"grove-{stamp}-{os.getpid()}.log"


def verbose_setting() -> bool:
    """``GROVE_VERBOSE`` (1/true/yes) or luigi.cfg ``[grove] verbose``."""
    env = os.environ.get("GROVE_VERBOSE")
    if env is not None and env != "":
        return env.strip().lower() in ("1", "true", "yes", "on")
    from .settings import grove_option  # luigi.cfg read without importing Luigi

    return (grove_option("verbose") or "").strip().lower() in ("1", "true", "yes", "on")


def setup(verbose: bool, luigi_summary: bool, log_file: str | os.PathLike | None = None,
          immediate_failures: bool = False) -> Path | None:
    """Install grove's handlers on the root logger; returns the full log's path (None if it could
    not be created, in which case only the terminal gets the log).

    Luigi's own logging set-up is turned off (``[core] no_configure_logging``) so nothing is printed twice.
    ``immediate_failures``: print each failure's line when it happens (``luigi --module tasks``, where
    grove does not print after Luigi's summary); otherwise ``failure_lines()`` gives them at the end.
    """
    _state["immediate"] = immediate_failures
    root = logging.getLogger()
    for key in ("console", "file"):
        if _state[key] is not None:
            root.removeHandler(_state[key])
            _state[key] = None
    path = None
    try:
        path = Path(log_file) if log_file else _new_log_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
        _state["file"] = file_handler
    except OSError as exc:  # a read-only or full scratch disk must not stop the run
        path = None
        print(f"grove: warning: cannot write the log file ({exc}); logging to the terminal only", file=sys.stderr)
    _state["log_file"] = path
    _state["failures"] = path.with_suffix(".failures.jsonl") if path else None
    console = progress.BarSafeHandler(sys.stderr)  # log lines above the progress bars, not on them
    if verbose:
        console.setLevel(logging.DEBUG)
        if not luigi_summary:  # the caller prints the summary itself
            console.addFilter(lambda record: _SUMMARY_MARK not in record.getMessage())
        console.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    else:
        console.setLevel(logging.INFO)
        console.addFilter(_QuietFilter(luigi_summary))
        console.setFormatter(_FirstLine())
    root.addHandler(console)
    _state["console"] = console
    root.setLevel(logging.DEBUG)
    for noisy in ("numba", "matplotlib", "PIL", "urllib3", "gensim", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state["luigi_quiet"] = True
    quiet_luigi()
    return path


def quiet_luigi() -> None:
    """Turn Luigi's own logging set-up off (``[core] no_configure_logging``) once grove's handlers
    are installed and Luigi is imported (tasks/base.py calls this on import): nothing is printed
    twice. Commands that run no task never import Luigi."""
    if _state.get("luigi_quiet") and "luigi" in sys.modules:
        import luigi.configuration

        luigi.configuration.get_config().set("core", "no_configure_logging", "true")


def log_file() -> Path | None:
    return _state["log_file"]


def record_failure(task: Any, reason: str) -> None:
    where = _state["log_file"]
    if _state["immediate"] or _state["failures"] is None:
        log.error("FAILED %r: %s (full log: %s)", task, reason.splitlines()[0] if reason else "", where)
    else:
        log.debug("task %r failed: %s", task, reason)
    path = _state["failures"]
    if path is None:
        return
    line = json.dumps({"task": repr(task), "reason": reason, "dataset": getattr(task, "dataset", None)})
    try:
        with open(path, "a", encoding="utf-8") as f:  # also from forked worker processes
            f.write(line + "\n")
    except OSError:
        log.error("FAILED %r: %s (full log: %s)", task, reason, where)


def reason(exc: BaseException) -> str:
    text = str(exc).strip() or "(no message)"
    return f"{type(exc).__name__}: {text}"


def failures() -> list[dict]:
    """The failures recorded since ``setup`` (by this process and its forked workers), each once."""
    path = _state["failures"]
    if path is None or not path.is_file():
        return []
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (entry["task"], entry["reason"])
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def failure_lines() -> list[str]:
    """One line per failed task: what failed, why, and where the full log is."""
    where = _state["log_file"]
    tail = f" (full log: {where})" if where else ""
    return [f"FAILED {f['task']}: {f['reason'].splitlines()[0] if f['reason'] else ''}{tail}" for f in failures()]
