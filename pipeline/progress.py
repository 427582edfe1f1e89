"""Progress a person can see while grove works: a bar per running task on a terminal, log lines otherwise.

Every long stage calls ``report(fraction, message)``. ``tasks.base.GroveTask.report`` forwards each call to
Luigi (luigid's web page) and to ``update`` here, which shows it where the person is:

- stderr is a terminal: one tqdm bar per running task, its description the task's short name and its
  postfix the latest message::

      Train(mnist-cnn)  42%|██████▋         | 03:51, epoch 5/12: batch 12/46, loss 0.3121, 512 samples/s, ETA 5m02s

  The bar closes (and stays on screen at 100%) when the task reports 1.0.
- otherwise (cron, a pipe, a log file): one INFO line through the ``grove.progress`` logger at most every
  ``interval`` seconds per task (``GROVE_PROGRESS_INTERVAL``, default 10), and one line when it completes
  (work shorter than the interval stays quiet)::

      Train(mnist-cnn) 42% after 3m51s: epoch 5/12: batch 120/469, loss 0.3121, 512 samples/s, ETA 5m02s
      Train(mnist-cnn) done in 9m02s: epoch 12/12: loss 0.0412, accuracy 0.9871

``GROVE_PROGRESS=bar|log|off`` forces a mode; ``configure`` does the same for tests (and can write the bars
to any stream). A terminal's log handler should be a ``BarSafeHandler``, so log lines do not land on a
bar's line. A task that ends without reporting 1.0 (a failure) is closed by ``finish``; bars still open at
exit are closed. The sink is safe to call from several threads (one lock) and from Luigi's forked worker
processes (a child starts with an empty state and never touches its parent's bars).

Helpers for the messages: ``Rate`` (done/total, rate, ETA), ``with_rate``, ``format_duration``, ``scaled``.
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable

log = logging.getLogger("grove.progress")

Report = Callable[[float, str], None]

MODES = ("auto", "bar", "log", "off")
DEFAULT_INTERVAL = 10.0
_BAR_REDRAW_SECONDS = 0.2  # a bar redraws at most this often (a stage may report every batch)
_FINISHED_KEPT = 1024  # completed tasks remembered, to drop a repeated completion
_BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar:16}| {elapsed}{postfix}"


# --- message helpers -----------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``"42s"``, ``"5m02s"``, ``"2h03m"``; ``"?"`` when unknown (None, negative or not finite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


class Rate:
    """Done/total, rate and ETA of one piece of work, measured from when it was made: two seconds after
    ``r = Rate(1000, "queries")``, ``r.message(250)`` is ``"250/1,000 queries, 125 queries/s, ETA 6s"``."""

    def __init__(self, total: int, unit: str, clock: Callable[[], float] = time.monotonic):
        self.total, self.unit, self._clock = int(total), unit, clock
        self.started = clock()

    def elapsed(self) -> float:
        return self._clock() - self.started

    def per_second(self, done: float) -> float | None:
        elapsed = self.elapsed()
        return done / elapsed if done > 0 and elapsed > 0 else None

    def eta(self, done: float) -> float | None:
        """Seconds left at the rate so far; None before anything is done."""
        rate = self.per_second(done)
        return max(0.0, self.total - done) / rate if rate else None

    def message(self, done: float) -> str:
        rate = self.per_second(done)
        speed = f"{_format_rate(rate)} {self.unit}/s" if rate else f"? {self.unit}/s"
        return f"{int(done):,}/{self.total:,} {self.unit}, {speed}, ETA {format_duration(self.eta(done))}"


def with_rate(report: Report, total: int, unit: str) -> Report:
    """``report`` with the rate and ETA appended to each message, counting ``fraction * total`` done (for a
    callee that reports only a fraction and "done/total" in its own words)."""
    rate = Rate(total, unit)

    def wrapped(fraction: float, message: str) -> None:
        done = fraction * rate.total
        speed = rate.per_second(done)
        report(fraction, f"{message}, {_format_rate(speed) if speed else '?'} {unit}/s, "
                         f"ETA {format_duration(rate.eta(done))}")

    return wrapped


def scaled(report: Report, start: float, stop: float) -> Report:
    """``report`` for one step of a stage that covers [start, stop] of the stage's progress, so a step
    reaching 1.0 does not look like the whole stage finishing."""
    return lambda fraction, message: report(start + (stop - start) * max(0.0, min(1.0, fraction)), message)


# --- the sink ------------------------------------------------------------------------------------


@dataclass
class _Running:
    name: str
    started: float
    shown: float  # when the last log line was written, or the bar last redrawn
    lines: int = 0  # periodic log lines written
    bar: Any = None
    fraction: float = 0.0
    message: str = ""


def _env_interval() -> float:
    raw = os.environ.get("GROVE_PROGRESS_INTERVAL", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL
    except ValueError:
        log.warning("GROVE_PROGRESS_INTERVAL=%r is not a number of seconds; using %g", raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


class ProgressSink:
    """Shows ``update(key, name, fraction, message)`` calls as bars or log lines (see the module doc).

    mode: "auto" (a bar when ``stream`` is a terminal, log lines otherwise), "bar", "log" or "off";
    stream: where bars go (default: ``sys.stderr`` at the time of the call); interval: seconds between
    two log lines of one task (default ``GROVE_PROGRESS_INTERVAL`` or 10).
    """

    def __init__(self, mode: str = "auto", stream: IO[str] | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}; got {mode!r}")
        self._mode, self._stream, self._clock = mode, stream, clock
        self.interval = _env_interval() if interval is None else float(interval)
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._finished: dict[str, None] = {}  # keys of tasks that completed, oldest first

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def mode(self) -> str:
        if self._mode != "auto":
            return self._mode
        try:
            return "bar" if self.stream.isatty() else "log"
        except (AttributeError, ValueError):  # no stream, or a closed one
            return "log"

    def update(self, key: str, name: str, fraction: float, message: str) -> None:
        """Progress of the task ``key`` (unique per task; ``name`` is what a person reads)."""
        fraction = max(0.0, min(1.0, float(fraction))) if math.isfinite(fraction) else 0.0
        mode = self.mode
        if mode == "off":
            return
        with self._lock:
            now = self._clock()
            task = self._running.get(key)
            if task is None:
                if fraction >= 1.0 and key in self._finished:
                    return  # a second "done" (a step reached 1.0 before its stage's last word): said already
                self._finished.pop(key, None)
                task = self._running[key] = _Running(name=name, started=now, shown=now)
            task.fraction, task.message = fraction, message
            if mode == "bar":
                try:
                    self._draw(task, now, final=fraction >= 1.0)
                except OSError as exc:  # a closed terminal must not fail hours of work
                    log.warning("progress bars off: cannot write to %s (%s); progress goes to the log",
                                getattr(self.stream, "name", self.stream), exc)
                    self._mode, task.bar = "log", None
            elif fraction < 1.0 and now - task.shown >= self.interval:
                task.shown, task.lines = now, task.lines + 1
                log.info("%s %d%% after %s: %s", name, int(100 * fraction), format_duration(now - task.started),
                         message)
            if fraction >= 1.0:
                self._finish(key, task, now, ok=True)

    def finish(self, key: str, ok: bool = True, message: str | None = None) -> None:
        """The task ``key`` ended (successfully or not) without reporting 1.0: close its bar, log its end."""
        with self._lock:
            task = self._running.get(key)
            if task is not None:
                if message is not None:
                    task.message = message
                self._finish(key, task, self._clock(), ok)

    def close(self) -> None:
        """Close every open bar (at exit); a task still running is not logged as done."""
        with self._lock:
            for task in self._running.values():
                if task.bar is not None:
                    task.bar.close()
            self._running.clear()

    def has_bars(self) -> bool:
        return any(t.bar is not None for t in list(self._running.values()))

    def running(self) -> list[str]:
        with self._lock:
            return [t.name for t in self._running.values()]

    def _forget(self) -> None:
        """In a forked child: the parent's bars and lock are not ours."""
        self._lock = threading.Lock()
        self._running, self._finished = {}, {}

    def _size(self) -> tuple[int, int]:
        """The terminal's (columns, rows); (120, 20) when it has none (a pseudo-terminal of size 0 x 0, as
        ``script`` or an ssh command without -t gives, on which tqdm would draw nothing; a file)."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
            columns, rows = size.columns, size.lines
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            columns = rows = 0
        return (columns if columns > 0 else 120), (rows if rows > 0 else 20)

    def _draw(self, task: _Running, now: float, final: bool) -> None:
        if task.bar is None:
            from tqdm import tqdm

            columns, rows = self._size()
            task.bar = tqdm(total=100, desc=task.name, file=self.stream, bar_format=_BAR_FORMAT,
                            ncols=columns, nrows=rows, leave=True, mininterval=0)
        elif not final and now - task.shown < _BAR_REDRAW_SECONDS:
            return
        task.shown = now
        task.bar.ncols, task.bar.nrows = self._size()  # the terminal may have been resized
        task.bar.n = round(100 * task.fraction, 1)
        task.bar.set_postfix_str(task.message, refresh=False)
        task.bar.refresh()

    def _finish(self, key: str, task: _Running, now: float, ok: bool) -> None:
        del self._running[key]
        if ok:  # a failed task may be retried in this process: its next reports start a new bar
            self._finished[key] = None
            while len(self._finished) > _FINISHED_KEPT:
                del self._finished[next(iter(self._finished))]
        took = format_duration(now - task.started)
        if task.bar is not None:
            if not ok:
                task.bar.set_postfix_str(f"FAILED after {took}: {task.message}", refresh=False)
            task.bar.close()  # draws the last state and moves to a new line
        elif ok:
            # Work shorter than the interval is quiet: the task's own start and end lines say enough.
            if task.lines or now - task.started >= self.interval:
                log.info("%s done in %s: %s", task.name, took, task.message)
        else:
            log.info("%s stopped at %d%% after %s: %s", task.name, int(100 * task.fraction), took, task.message)


_default: ProgressSink | None = None
_default_lock = threading.Lock()


def sink() -> ProgressSink:
    """The process-wide sink (mode from ``GROVE_PROGRESS``, default auto)."""
    global _default
    with _default_lock:
        if _default is None:
            mode = os.environ.get("GROVE_PROGRESS", "").strip().lower() or "auto"
            if mode not in MODES:
                log.warning("GROVE_PROGRESS=%r is not one of %s; using auto", mode, ", ".join(MODES))
                mode = "auto"
            _default = ProgressSink(mode)
        return _default


def configure(mode: str = "auto", stream: IO[str] | None = None, interval: float | None = None,
              clock: Callable[[], float] = time.monotonic) -> ProgressSink:
    """Replace the process-wide sink (closing the old one's bars); returns the new one. For tests and
    for a command line that knows better than ``isatty`` (e.g. ``--no-progress``)."""
    global _default
    with _default_lock:
        old, _default = _default, ProgressSink(mode, stream, interval, clock)
    if old is not None:
        old.close()
    return _default


def update(key: str, name: str, fraction: float, message: str) -> None:
    """Send one progress report to the process-wide sink."""
    sink().update(key, name, fraction, message)


def finish(key: str, ok: bool = True, message: str | None = None) -> None:
    """Tell the process-wide sink that task ``key`` ended (closes a bar that never reached 1.0)."""
    if _default is not None:
        _default.finish(key, ok, message)


class BarSafeHandler(logging.StreamHandler):
    """A StreamHandler for the terminal that moves the progress bars out of the way of each record
    (``tqdm.write``: clear the bars, write the line, draw them again), so log lines and bars do not
    share a line. Without open bars it is a plain StreamHandler."""

    def emit(self, record: logging.LogRecord) -> None:
        if _default is None or not _default.has_bars():
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except (OSError, ValueError):
            self.handleError(record)  # logging's own report of a handler that cannot write


def _close_default() -> None:
    if _default is not None:
        _default.close()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_default)  # a bar still open at exit (a task that never said 1.0) ends its line
