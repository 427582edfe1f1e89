"""The grove command line: exit codes and what a user reads."""

from __future__ import annotations

import shutil
import subprocess
import sys


from conftest import REPO
from pipeline import artifacts
from tasks.cli import main as grove


def test_help_on_every_command():
    for command in ([], ["run"], ["query"], ["versions"], ["show"], ["datasets"]):
        out = subprocess.run([sys.executable, "-m", "tasks.cli", *command, "--help"], cwd=REPO,
                             capture_output=True, text=True)
        assert out.returncode == 0 and "usage: grove" in out.stdout


def test_unknown_dataset_exits_2_before_any_work(tiny_mnist, capsys):
    assert grove(["run", "tinymnist", "nosuchset"]) == 2
    assert "unknown dataset 'nosuchset'" in capsys.readouterr().err
    assert not tiny_mnist["root"].exists()  # the valid dataset did not start either


def test_bad_config_exits_2_naming_file_and_key(tiny_mnist, capsys):
    path = tiny_mnist["config"]
    path.write_text(path.read_text().replace("k = 20", "k = 20\nkay = 3"))
    assert grove(["run", "tinymnist"]) == 2
    assert "tinymnist.toml: unknown key exact.kay" in capsys.readouterr().err
    assert not tiny_mnist["root"].exists()


def test_run_versions_show_and_damage(tiny_mnist, capsys):
    assert grove(["run", "tinymnist"]) == 0
    out = capsys.readouterr().out
    assert "recall@10" in out and "tinymnist/evaluate/v" in out

    assert grove(["versions", "tinymnist"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("forest") for line in listing) == 2
    assert all("latest" in line for line in listing if line.startswith("evaluate"))

    exact = tiny_mnist["root"] / "tinymnist" / "exact" / "latest"
    assert grove(["show", str(exact), "--verify"]) == 0
    assert '"stage": "exact"' in capsys.readouterr().out
    data = bytearray((exact / "neighbors.npy").read_bytes())
    data[-1] ^= 0xFF
    (exact / "neighbors.npy").write_bytes(bytes(data))
    assert grove(["show", str(exact), "--verify"]) == 3
    assert "neighbors.npy: sha256" in capsys.readouterr().err


def test_query_before_the_index_is_built_exits_3(tiny_mnist, capsys):
    assert grove(["query", "tinymnist", "test/3"]) == 3
    assert "Run the stage again" in capsys.readouterr().err


def test_query_an_image_by_key(tiny_mnist, capsys):
    assert grove(["run", "tinymnist"]) == 0
    capsys.readouterr()
    assert grove(["query", "tinymnist", "train/4", "-k", "2", "--search-k", "5000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # train/4 is in the base; its own key is left out, so its twin train/1 comes first (see tiny_digits)
    assert lines[2].split()[1] == "train/1" and lines[2].split()[3] == "train/1"


def test_damaged_embedding_is_caught_and_rebuild_repairs_it(tiny_mnist, capsys):
    assert grove(["run", "tinymnist"]) == 0
    embed = next((tiny_mnist["root"] / "tinymnist" / "embed").glob("v*-*"))
    data = bytearray((embed / "vectors.arrow").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the vectors, same size
    (embed / "vectors.arrow").write_bytes(bytes(data))
    for stage in ("split", "evaluate"):  # make the children run again, so they read the damaged parent
        for version in (tiny_mnist["root"] / "tinymnist" / stage).glob("v*-*"):
            shutil.rmtree(version)
    capsys.readouterr()
    assert grove(["run", "tinymnist"]) == 1  # Split refuses to read the damaged vectors
    assert "Split(dataset=tinymnist)" in capsys.readouterr().out.split("failed:")[1]
    assert not list((tiny_mnist["root"] / "tinymnist" / "split").glob("v*-*"))
    assert grove(["run", "tinymnist", "--rebuild"]) == 0
    assert "removed damaged" in capsys.readouterr().err
    artifacts.read_manifest(embed, verify="sha256")
