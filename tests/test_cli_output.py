"""What a person sees from `grove`: quiet output, one line per failure, exit codes, settings lookup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from tasks.cli import main as grove

GROVE = [sys.executable, "-m", "tasks.cli"]


def _break_decode(config: Path) -> None:
    """Point decode.train_images at the labels source: the bytes pass their checksum, decoding fails."""
    text = config.read_text()
    config.write_text(text.replace('train_images = "train_images"', 'train_images = "train_labels"', 1))


def test_failure_is_one_line_with_reason_and_log(tiny_mnist, capsys):
    _break_decode(tiny_mnist["config"])
    assert grove(["run", "tinymnist"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1, captured.err
    assert failed[0].startswith("FAILED Decode(dataset=tinymnist): FormatError: ")
    log_path = Path(failed[0].rsplit("(full log: ", 1)[1].rstrip(")"))
    assert log_path.is_file() and "Traceback" in log_path.read_text()
    # The terminal has no traceback and none of Luigi's chatter, and one summary.
    assert "Traceback" not in captured.err and "DEBUG" not in captured.err
    assert "Informed scheduler" not in captured.err
    assert (captured.out + captured.err).count("Scheduled ") == 1
    assert "running  Fetch(dataset=tinymnist)" in captured.err
    # The mirror's flat layout misses (the files are under <mirror>/tinymnist/): a note, not a warning.
    assert "; trying the next URL" in captured.err and "warning" not in captured.err.lower()


def test_verbose_brings_back_tracebacks(tiny_mnist, capsys):
    _break_decode(tiny_mnist["config"])
    assert grove(["--verbose", "run", "tinymnist"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "Informed scheduler" in err


def test_luigi_module_is_quiet_too(tiny_mnist):
    _break_decode(tiny_mnist["config"])
    luigi_bin = Path(sys.executable).with_name("luigi")
    out = subprocess.run([str(luigi_bin), "--module", "tasks", "Decode", "--dataset", "tinymnist",
                          "--local-scheduler"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LUIGI_CONFIG_PATH": str(REPO / "luigi.cfg")})
    assert out.returncode == 30, out.stderr  # luigi.cfg [retcode] task_failed
    assert "FAILED Decode(dataset=tinymnist): FormatError" in out.stderr
    assert "Traceback" not in out.stderr and "DEBUG" not in out.stderr
    assert out.stderr.count("Scheduled ") == 1


def test_bad_date_is_usage_error(capsys):
    assert_exit(["rebuild", "--date", "2026-02-30"], 2)
    assert "'2026-02-30' is not a date" in capsys.readouterr().err


def assert_exit(argv, code):
    with pytest.raises(SystemExit) as info:
        grove(argv)
    assert info.value.code == code


def test_unreachable_luigid_is_4_within_seconds(tiny_mnist, capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    assert grove(["run", "tinymnist", "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)]) == 4
    assert time.monotonic() - started < 10
    assert f"no luigid answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not tiny_mnist["root"].exists()


def test_versions_of_unknown_dataset_is_2(tiny_mnist, capsys):
    assert grove(["versions", "nosuch"]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err


def test_versions_table(tiny_mnist, capsys):
    assert grove(["versions", "tinymnist"]) == 0
    assert f"no published versions under {tiny_mnist['root']}" in capsys.readouterr().err
    assert grove(["run", "tinymnist"]) == 0
    evaluate = next((tiny_mnist["root"] / "tinymnist" / "evaluate").glob("v*")).name
    assert grove(["promote", "tinymnist", evaluate]) == 0
    capsys.readouterr()
    assert grove(["versions", "tinymnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["stage", "version", "created"]
    forests = [line for line in lines if line.startswith("forest")]
    assert sorted(line.split("n_trees=")[1].split()[0] for line in forests) == ["2", "4"]
    assert any(evaluate in line and "SERVING" in line for line in lines)
    shown = [field.split("=")[1] for line in lines[1:] for field in line.split() if "=" in field]
    assert shown and all(len(value.partition(".")[2]) <= 4 for value in shown)  # rounded


def test_show_into_a_closed_pipe_is_quiet(tiny_mnist):
    assert grove(["run", "tinymnist"]) == 0
    exact = tiny_mnist["root"] / "tinymnist" / "exact" / "latest"
    proc = subprocess.Popen([*GROVE, "show", str(exact)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "BrokenPipeError" not in err and "Traceback" not in err


def test_unsupported_or_unreachable_object_store_root(tiny_mnist, monkeypatch, capsys, tmp_path):
    """A scheme grove does not take is a config error (2); an s3:// root whose endpoint does not
    answer is an artifact-root error (8) naming the root and the cause, before any task runs; neither
    leaves a local folder named after the URL."""
    import socket
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GROVE_ARTIFACTS", "ftp://host/grove")
    assert grove(["run", "tinymnist"]) == 2
    err = capsys.readouterr().err
    assert "ftp:// is not supported" in err and "s3://bucket/prefix" in err

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "key"),
                        ("AWS_SECRET_ACCESS_KEY", "secret"), ("AWS_REGION", "us-east-1"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GROVE_ARTIFACTS", "s3://bucket/grove")
    started = time.monotonic()
    assert grove(["run", "tinymnist"]) == 8
    out, err = capsys.readouterr()
    assert time.monotonic() - started < 60
    assert "grove: artifact root error:" in err and "s3://bucket/grove" in err and f"127.0.0.1:{port}" in err
    assert "Luigi Execution Summary" not in out  # nothing was scheduled
    assert grove(["versions", "tinymnist"]) == 8
    assert "s3://bucket/grove" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ftp:").exists()


def test_settings_found_from_any_directory(tiny_mnist, monkeypatch, tmp_path):
    """A luigi.cfg in a parent directory is found, and its relative root is relative to it."""
    project = tmp_path / "project"
    (project / "deep" / "er").mkdir(parents=True)
    (project / "luigi.cfg").write_text(f"[grove]\nartifacts = store\nconfigs = {tiny_mnist['configs']}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GROVE_ARTIFACTS", "GROVE_CONFIGS", "LUIGI_CONFIG_PATH")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([*GROVE, "run", "tinymnist"], cwd=project / "deep", env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (project / "store" / "tinymnist" / "evaluate").is_dir()
    listing = subprocess.run([*GROVE, "versions", "tinymnist"], cwd=project / "deep" / "er", env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "evaluate" in listing.stdout
    # With nothing at the root it uses, grove says which root and which settings it looked at.
    (project / "luigi.cfg").write_text(f"[grove]\nartifacts = empty\nconfigs = {tiny_mnist['configs']}\n")
    listing = subprocess.run([*GROVE, "versions", "tinymnist"], cwd=project / "deep", env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    assert f"no published versions under {project / 'empty'}" in listing.stderr
    assert f"settings from {project / 'luigi.cfg'}" in listing.stderr


@pytest.mark.parametrize("code,name", [(errno.ENOSPC, "ENOSPC"), (errno.EROFS, "EROFS")])
def test_report_on_a_full_or_read_only_disk(tiny_mnist, monkeypatch, capsys, tmp_path, code, name):
    import pipeline.paths

    assert grove(["run", "tinymnist"]) == 0
    out = tmp_path / "site" / "index.html"
    assert grove(["report", "--out", str(out)]) == 0
    before = out.read_bytes()

    def broken(fd):
        raise OSError(code, os.strerror(code), str(out))

    monkeypatch.setattr(pipeline.paths.os, "fsync", broken)
    capsys.readouterr()
    assert grove(["report", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"grove: cannot use {out}: {os.strerror(code)} ({name})"]
    assert out.read_bytes() == before  # the old page is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # no temporary left


def test_rebuild_prints_what_ran_the_gate_and_what_serves(tiny_mnist, monkeypatch, capsys):
    monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    out = capsys.readouterr().out
    assert "tinymnist: ran " in out and "Evaluate" in out
    assert "gate at n_trees=4 search_k=2000: recall " in out and ": passed" in out
    assert "serving: v" in out and "(promoted; before: nothing)" in out
    assert grove(["rebuild", "--date", "2026-11-02"]) == 0
    out = capsys.readouterr().out
    assert "tinymnist: ran DatedRecord" in out and "(unchanged)" in out
