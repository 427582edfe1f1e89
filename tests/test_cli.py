"""The grove command line: exit codes and what a user reads."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa

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


# --- what TEXT|ID stands for ------------------------------------------------------------------------


from test_vectors_kind import clusters, env, fixed_list, write_arrow, write_config  # noqa: E402,F401 - env: fixture


def _answer_keys(out: str) -> tuple[str, list[str], list[str]]:
    """(header, approximate keys, exact keys) of what `grove query` printed."""
    lines = out.splitlines()
    rows = [line.split() for line in lines[2:]]
    return lines[0], [r[1] for r in rows], [r[3] for r in rows]


def test_an_all_digit_key_is_the_item_and_other_digits_a_query_number(env, capsys):
    """On a dataset whose keys are integers, `grove query DATASET 4` is the item "4" (left out of its
    own answer), also where 4 is a valid query number; digits that no item has as its key are a query
    number."""
    from pipeline import api

    base, _ = clusters(200, seed=3)
    keys = np.arange(0, 400, 2)  # the even numbers: "3" is no item's key
    items = write_arrow(env["data"] / "items.arrow", {"key": pa.array(keys), "vector": fixed_list(base)})
    write_config(env, "numbered", {"items": items}, {"vectors": "items"},
                 split={"method": "holdout", "n_queries": 20, "seed": 0})
    assert grove(["run", "numbered"]) == 0
    capsys.readouterr()
    with api.open_index("numbered", root=env["root"], version="latest") as index:
        held_out = index.held_out_keys()
        indexed = next(key for key in index.keys() if int(key) < len(held_out))  # a key and a query number
        asked = (indexed, held_out[int(indexed)], held_out[0], held_out[3])
        by_key = {key: index.query_key(key, k=3, exact=True).keys for key in asked}
        assert "3" not in index and indexed in index and held_out[0] in index
    assert by_key[indexed] != by_key[held_out[int(indexed)]]

    assert grove(["query", "numbered", indexed, "-k", "3"]) == 0  # the item, not query number int(indexed)
    header, _, exact = _answer_keys(capsys.readouterr().out)
    assert header.startswith(f"numbered: {indexed!r}  (") and exact == by_key[indexed] and indexed not in exact
    assert grove(["query", "numbered", held_out[0], "-k", "3"]) == 0  # a held-out item, by its key
    assert _answer_keys(capsys.readouterr().out)[2] == by_key[held_out[0]]
    assert grove(["query", "numbered", "3", "-k", "3"]) == 0  # no item "3": query number 3
    header, _, exact = _answer_keys(capsys.readouterr().out)
    assert header.startswith(f"numbered: query 3 ({held_out[3]!r})") and exact == by_key[held_out[3]]
    assert grove(["query", "numbered", "21"]) == 2  # neither a key nor a query number
    assert "no item with key '21', and query number 21 is out of range: there are 20 queries" in \
        capsys.readouterr().err


def test_query_help_says_how_digits_are_read():
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "query", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    text = " ".join(out.stdout.split())
    assert "a key made only of the digits 0-9 that no item has is a query number" in text
    assert "An item whose key is all digits wins over the query number" in text


def test_api_errors_are_groves_typed_errors_with_their_exit_codes(tiny_mnist, capsys):
    """The API's error classes live in pipeline.errors (and are importable from pipeline.api), below
    grove's ConfigError and ArtifactError: `grove` maps them to exit 2 and 3."""
    from pipeline import api, errors

    for name, parent in (("UnknownDatasetError", errors.ConfigError), ("UnknownKeyError", errors.ConfigError),
                         ("QueryError", errors.ConfigError), ("NotServingError", errors.ArtifactError)):
        kind = getattr(errors, name)
        assert getattr(api, name) is kind and kind.__module__ == "pipeline.errors"
        assert issubclass(kind, parent) and issubclass(kind, errors.GroveError)
    assert issubclass(errors.UnknownKeyError, LookupError) and issubclass(errors.QueryError, ValueError)

    assert grove(["run", "tinymnist"]) == 0
    capsys.readouterr()
    assert grove(["query", "tinymnist", "train/9999"]) == 2  # UnknownKeyError
    assert "grove: config error: tinymnist: no item with key 'train/9999'" in capsys.readouterr().err
    assert grove(["query", "tinymnist", "3", "-k", "2"]) == 0  # nothing serves: the current config's index
    assert capsys.readouterr().out.startswith("tinymnist: query 3 ('test/3')")
