"""Progress a person sees: tqdm bars on a terminal, periodic log lines in cron logs, and the messages the
long steps send (CNN training: epoch, batch, loss, rate, ETA)."""

from __future__ import annotations

import io
import logging
import re
import threading

import numpy as np
import pytest

from pipeline import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(autouse=True)
def _restore_default_sink():
    yield
    progress.configure("off")


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "grove.progress"]


def test_log_mode_writes_a_line_at_most_every_interval_and_one_at_completion(caplog, clock):
    caplog.set_level(logging.INFO, logger="grove.progress")
    progress.configure("log", interval=10, clock=clock)
    for t, fraction, message in [(0, 0.0, "fetch train: 0.0 MB"), (4, 0.2, "fetch train: 2.0 MB"),
                                 (10, 0.4, "fetch train: 4.0 MB"), (15, 0.5, "fetch train: 5.0 MB"),
                                 (21, 0.8, "fetch train: 8.0 MB"), (23, 1.0, "fetched 4 files"),
                                 (24, 1.0, "fetched 4 files, linked")]:  # a second "done" is not said twice
        clock.now = 100.0 + t
        progress.update("Fetch_tiny_123", "Fetch(tiny)", fraction, message)
    assert _lines(caplog) == ["Fetch(tiny) 40% after 10s: fetch train: 4.0 MB",
                              "Fetch(tiny) 80% after 21s: fetch train: 8.0 MB",
                              "Fetch(tiny) done in 23s: fetched 4 files"]
    assert progress.sink().running() == []
    # work shorter than the interval says nothing (the task's own start and end lines are enough)
    for t, fraction in [(30, 0.0), (33, 0.5), (36, 1.0)]:
        clock.now = 100.0 + t
        progress.update("Split_tiny_123", "Split(tiny)", fraction, "wrote base")
    assert len(_lines(caplog)) == 3 and progress.sink().running() == []


def test_log_mode_is_the_default_when_stderr_is_not_a_terminal_and_tasks_are_kept_apart(caplog, clock):
    caplog.set_level(logging.INFO, logger="grove.progress")
    sink = progress.configure(stream=io.StringIO(), interval=0, clock=clock)
    assert sink.mode == "log"
    progress.update("a", "Exact(tiny)", 0.5, "exact search 256/512 queries")
    progress.update("b", "Forest(tiny, n_trees=2)", 0.5, "tree 1/2")
    assert sorted(sink.running()) == ["Exact(tiny)", "Forest(tiny, n_trees=2)"]
    progress.update("b", "Forest(tiny, n_trees=2)", 1.0, "built 2 trees")
    assert sink.running() == ["Exact(tiny)"]
    assert _lines(caplog) == ["Exact(tiny) 50% after 0s: exact search 256/512 queries",
                              "Forest(tiny, n_trees=2) 50% after 0s: tree 1/2",
                              "Forest(tiny, n_trees=2) done in 0s: built 2 trees"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_mode_draws_a_bar_per_task_and_closes_it_at_completion(caplog):
    caplog.set_level(logging.INFO, logger="grove.progress")
    term = _Terminal()
    sink = progress.configure(stream=term)
    assert sink.mode == "bar"
    progress.update("t1", "Train(mnist-cnn)", 0.3, "epoch 1/3: batch 5/10, loss 0.5000")
    drawn = term.getvalue()
    assert "Train(mnist-cnn)" in drawn and " 30%|" in drawn and "epoch 1/3: batch 5/10, loss 0.5000" in drawn
    assert not drawn.endswith("\n")  # still running: the bar stays on its line
    assert sink.running() == ["Train(mnist-cnn)"]
    progress.update("t1", "Train(mnist-cnn)", 1.0, "epoch 3/3: loss 0.1000, accuracy 0.9500")
    final = term.getvalue().rsplit("\r", 1)[-1]
    assert final.startswith("Train(mnist-cnn) 100%|") and "accuracy 0.9500" in final and final.endswith("\n")
    assert sink.running() == []
    assert _lines(caplog) == []  # a terminal gets bars, not log lines


def test_a_bar_that_never_reaches_the_end_is_closed_by_finish():
    term = io.StringIO()
    progress.configure("bar", stream=term)
    progress.update("t1", "Fetch(tiny)", 0.25, "fetch train: 1.0 MB")
    progress.finish("t1", ok=False, message="no URL could deliver train.gz")
    final = term.getvalue().rsplit("\r", 1)[-1]
    assert "FAILED" in final and "no URL could deliver train.gz" in final and final.endswith("\n")
    assert progress.sink().running() == []


def test_a_log_line_on_a_terminal_gets_its_own_line_and_the_bar_comes_back():
    term = io.StringIO()
    progress.configure("bar", stream=term)
    handler = progress.BarSafeHandler(term)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("grove.test.barsafe")
    logger.addHandler(handler)
    try:
        progress.update("t1", "Fetch(tiny)", 0.3, "fetch train: 3.0 MB")
        logger.warning("a mirror miss; trying the next URL")
    finally:
        logger.removeHandler(handler)
    out = term.getvalue()
    assert "\rWARNING a mirror miss; trying the next URL\n" in out  # the bar's line was cleared first
    assert out.rsplit("\n", 1)[-1].lstrip("\r").startswith("Fetch(tiny)  30%|")  # and drawn again below it


def test_off_mode_and_the_environment_variable(monkeypatch, capsys):
    monkeypatch.setenv("GROVE_PROGRESS", "off")
    monkeypatch.setattr(progress, "_default", None)
    assert progress.sink().mode == "off"
    progress.update("t1", "Fetch(tiny)", 0.5, "half")
    assert progress.sink().running() == [] and capsys.readouterr().err == ""
    monkeypatch.setenv("GROVE_PROGRESS_INTERVAL", "2.5")
    assert progress.ProgressSink("log").interval == 2.5


def test_many_threads_report_at_once(caplog):
    caplog.set_level(logging.INFO, logger="grove.progress")
    progress.configure("log", interval=0)

    def work(i: int) -> None:
        for step in range(1, 51):
            progress.update(f"task{i}", f"Task({i})", step / 50, f"step {step}/50")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sorted(line for line in _lines(caplog) if " done in " in line)
    assert done == sorted(f"Task({i}) done in 0s: step 50/50" for i in range(8))
    assert progress.sink().running() == []


def test_rate_and_duration_texts():
    clock = FakeClock()
    rate = progress.Rate(1000, "queries", clock=clock)
    assert rate.message(0) == "0/1,000 queries, ? queries/s, ETA ?"
    clock.now += 2.0
    assert rate.message(250) == "250/1,000 queries, 125 queries/s, ETA 6s"
    assert [progress.format_duration(s) for s in (0.4, 59, 302, 7380, None)] == ["0s", "59s", "5m02s", "2h03m", "?"]


def test_grove_task_report_names_the_task_and_reaches_the_terminal(caplog):
    import tasks

    caplog.set_level(logging.INFO, logger="grove.progress")
    progress.configure("log", interval=0)
    task = tasks.Forest(dataset="tiny", n_trees=3)
    sent = []
    task.set_progress_percentage = lambda p: sent.append(p)
    task.set_status_message = lambda m: sent.append(m)
    task.report(0.5, "tree 2/3")
    task.report(1.0, "built 3 trees")
    assert _lines(caplog)[0].startswith("Forest(tiny, n_trees=3) 50% after ")
    assert _lines(caplog)[-1].startswith("Forest(tiny, n_trees=3) done in ")
    assert sent == [50, "tree 2/3", 100, "built 3 trees"]  # and to Luigi too


# --- what a long step says ---------------------------------------------------------------------------


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.normal(40, 20, size=(n, 8, 8))
    images[labels == 1, :4] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels


TRAIN_BATCH = re.compile(r"^epoch (\d+)/2: batch (\d+)/(\d+), loss \d+\.\d{4}, [\d,]+ samples/s, ETA (\d+m)?\d+s$")


@pytest.mark.parametrize("every_seconds", [1e9, 0.0])
def test_cnn_training_reports_epoch_batch_loss_rate_and_eta(monkeypatch, every_seconds):
    from pipeline import cnn

    monkeypatch.setattr(cnn, "_PROGRESS_SECONDS", every_seconds)
    x, y = _digits(160, seed=0)  # 20 batches of 8 an epoch
    calls: list[tuple[float, str]] = []
    cnn.train("small", x, y, n_classes=2, epochs=2, seed=0, batch_size=8, width=4, bottleneck=4, threads=1,
              progress=lambda f, m: calls.append((f, m)))
    batches = [m for _, m in calls if "batch" in m]
    assert batches and all(TRAIN_BATCH.match(m) for m in batches), batches[:3]
    # ten reports an epoch by count; with a report due every 0 s, every batch but the epoch's last
    assert len(batches) == (2 * 9 if every_seconds else 2 * 19)
    ends = [m for _, m in calls if "batch" not in m]
    assert ends[0].startswith("epoch 1/2: loss ") and ", ETA " in ends[0]
    assert ends[1].startswith("epoch 2/2: loss ") and "ETA" not in ends[1]
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
