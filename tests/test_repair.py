"""`--rebuild` repairs, a damaged serving index never answers, and the nightly rebuild repairs the
chain it promotes: what a user sees from `grove run/query/rebuild/show` on a tiny chain."""

from __future__ import annotations

import json
import os

import luigi
import pytest

from pipeline import artifacts, lifecycle
from tasks.cli import main as grove

STAGES = ("fetch", "decode", "embed", "split", "exact", "forest", "evaluate")


@pytest.fixture
def chain(tiny_mnist, tmp_path, monkeypatch):
    """tinymnist built and serving (through `grove rebuild`), with a scratch directory of its own."""
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("GROVE_REBUILD_DATASETS", "tinymnist")
    # Files written within RACY_NS of a check are verified but not stamped; the test's files are
    # seconds old at most, and a test that waits for that would be slow.
    monkeypatch.setattr(artifacts, "RACY_NS", 0)
    assert grove(["rebuild", "--date", "2026-11-01"]) == 0
    luigi.task_register.Register.clear_instance_cache()
    return tiny_mnist


def _flip_byte(path, offset=None):
    """One flipped bit in the middle of ``path`` (same size, same inode)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def _versions(root):
    return sorted(p for p in (root / "tinymnist").glob("*/v[0-9]*-*") if p.is_dir())


def _assert_chain_whole(root, capsys):
    """Every version verifies through `grove show --verify`, and every latest pointer names one."""
    for version in _versions(root):
        assert grove(["show", str(version), "--verify"]) == 0, capsys.readouterr().err
    for stage in STAGES:
        latest = artifacts.read_pointer(root / "tinymnist" / stage)
        assert latest is not None and (root / "tinymnist" / stage / latest / artifacts.MANIFEST).is_file(), stage
    capsys.readouterr()


def _serving(root):
    return lifecycle.serving_paths(root, "tinymnist")


def test_rebuild_removes_a_damaged_inner_version_and_what_was_built_from_it(chain, capsys):
    root = chain["root"]
    split = _serving(root)["split"]
    before = set(_versions(root))
    for version in before:  # a mark that only the old directories carry (inode numbers get reused)
        (version / ".old-directory").touch()
    _flip_byte(split / "base.arrow")
    capsys.readouterr()

    assert grove(["run", "tinymnist", "--rebuild"]) == 0
    err = capsys.readouterr().err
    key = lifecycle.version_key(split)
    assert f"removed damaged {key}: " in err and "base.arrow: sha256" in err
    # Everything built from the split went too, and came back.
    for stage in ("exact", "forest", "evaluate"):
        assert f"removed tinymnist/{stage}/" in err and f"built from {key}, which is damaged" in err
    assert f"rebuilt {key}" in err and "NOT rebuilt" not in err
    after = set(_versions(root))
    assert after == before  # the same versions (same digests), built again
    rebuilt = {p for p in after if not (p / ".old-directory").exists()}
    assert {p.parent.name for p in rebuilt} == {"split", "exact", "forest", "evaluate"}
    assert {p.parent.name for p in set(after) - rebuilt} == {"fetch", "decode", "embed"}  # left alone
    _assert_chain_whole(root, capsys)
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0
    assert "serving" in capsys.readouterr().out


def test_a_stage_whose_parent_is_missing_is_not_complete(chain, capsys):
    """A version deleted by hand below a complete evaluation: a plain run builds it again (it
    used to report success and build nothing), and no latest pointer dangles meanwhile."""
    root = chain["root"]
    embed = _serving(root)["evaluate"].parent.parent / "embed"
    (version,) = [p for p in embed.iterdir() if p.name.startswith("v")]
    lifecycle.remove_version(version)
    assert artifacts.read_pointer(embed) is None  # no other version: the pointer went with it
    capsys.readouterr()
    assert grove(["run", "tinymnist"]) == 0
    assert "Embed(dataset=tinymnist)" in capsys.readouterr().out
    assert (version / artifacts.MANIFEST).is_file()
    _assert_chain_whole(root, capsys)


def test_latest_moves_to_the_newest_remaining_version(chain):
    root = chain["root"]
    forest_dir = root / "tinymnist" / "forest"
    versions = sorted(artifacts.list_versions(root, "tinymnist", "forest"), key=lambda m: m["created_utc"])
    latest = artifacts.read_pointer(forest_dir)
    lifecycle.remove_version(forest_dir / latest)
    now = artifacts.read_pointer(forest_dir)
    assert now != latest and now in {m["version"] for m in versions}
    assert (forest_dir / now / artifacts.MANIFEST).is_file()


def test_a_flipped_byte_in_the_serving_index_is_refused_then_repaired(chain, capsys):
    root = chain["root"]
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0  # verified and stamped
    vectors = _serving(root)["forest"] / "index" / "vectors.npy"
    size = vectors.stat().st_size
    _flip_byte(vectors)
    assert vectors.stat().st_size == size
    capsys.readouterr()

    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""  # no answer from a damaged index
    assert f"{vectors}: sha256" in captured.err and "grove run tinymnist --rebuild" in captured.err
    assert grove(["query", "tinymnist", "test/3", "--exact"]) == 3  # the next try is refused too

    assert grove(["run", "tinymnist", "--rebuild"]) == 0
    assert f"removed damaged {lifecycle.version_key(vectors.parent.parent)}" in capsys.readouterr().err
    assert grove(["query", "tinymnist", "test/3", "-k", "3"]) == 0
    assert "test/3" in capsys.readouterr().out
    _assert_chain_whole(root, capsys)


def test_a_stamp_hit_does_not_hash_and_a_change_does(chain, capsys, monkeypatch, tmp_path):
    root = chain["root"]
    hashed = []
    real = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda path, *a: hashed.append(path) or real(path, *a))
    stamps = tmp_path / "scratch" / artifacts.VERIFIED_DIR
    assert len(list(stamps.glob("*.json"))) == 8  # the nightly run verified the 8 versions it promoted
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert hashed == []  # so the query hashes nothing

    for stamp in stamps.glob("*.json"):
        stamp.unlink()  # the scratch directory is safe to lose
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert {p.parent.name if p.parent.name != "index" else "index" for p in hashed} >= {"index"}
    assert any(p.name == "base.arrow" for p in hashed)  # the split and the forest are verified...
    assert len(list(stamps.glob("*.json"))) == 2  # ...and that is remembered outside the artifact root
    assert not list(root.rglob("*verified*"))

    hashed.clear()
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert hashed == []  # unchanged files are trusted

    items = _serving(root)["forest"] / "items.arrow"
    os.utime(items)  # touched: same bytes, but it must be looked at again
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert items in hashed and not any(p.parent.name == "split" or "split" in p.parts for p in hashed)

    hashed.clear()
    for stamp in (tmp_path / "scratch" / artifacts.VERIFIED_DIR).glob("*.json"):
        stamp.write_text("{ not json")  # a damaged stamp only means: verify again
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert any(p.name == "base.arrow" for p in hashed) and any(p.name == "vectors.npy" for p in hashed)
    hashed.clear()
    assert grove(["query", "tinymnist", "test/3"]) == 0
    assert hashed == []  # and it was written again


def test_nightly_rebuild_repairs_the_chain_before_promoting(chain, capsys):
    root = chain["root"]
    serving = _serving(root)
    embed = root / artifacts.read_manifest(serving["evaluate"])["parents"]["embed"]
    _flip_byte(embed / "vectors.arrow")
    capsys.readouterr()

    assert grove(["rebuild", "--date", "2026-11-02"]) == 0
    record = json.loads((root / "tinymnist" / "records" / "2026-11-02.json").read_text())
    repaired = {r["key"]: r for r in record["repaired"]}
    key = lifecycle.version_key(embed)
    assert repaired[key]["damaged"] and "vectors.arrow: sha256" in repaired[key]["reason"]
    assert {k.split("/")[1] for k, r in repaired.items() if not r["damaged"]} == \
        {"split", "exact", "forest", "evaluate"}
    assert record["promoted"] and record["serving"] == serving["evaluate"].name
    _assert_chain_whole(root, capsys)
    assert grove(["query", "tinymnist", "test/3"]) == 0

    # The next night finds the chain whole: nothing is repaired.
    assert grove(["rebuild", "--date", "2026-11-03"]) == 0
    record = json.loads((root / "tinymnist" / "records" / "2026-11-03.json").read_text())
    assert record["repaired"] == [] and record["promoted"]


def test_nightly_rebuild_fails_clearly_when_the_rebuilt_chain_is_damaged_again(chain, capsys, monkeypatch):
    """A disk that damages what is written: the repair is tried once, then the run fails and says so."""
    root = chain["root"]
    evaluate = _serving(root)["evaluate"]
    publish = artifacts.publish

    def publish_then_damage(ref, *args, **kwargs):
        manifest = publish(ref, *args, **kwargs)
        if ref.stage == "evaluate":
            _flip_byte(ref.path / "report.html")
        return manifest

    monkeypatch.setattr(artifacts, "publish", publish_then_damage)
    _flip_byte(evaluate / "report.html")
    capsys.readouterr()
    assert grove(["rebuild", "--date", "2026-11-02"]) == 1
    err = capsys.readouterr().err
    assert "is damaged again" in err and "report.html" in err
    assert not (root / "tinymnist" / "records" / "2026-11-02.json").exists()


@pytest.mark.parametrize("argv, shown", [
    (["-k", "0"], "-k must be at least 1, got 0"),
    (["-k", "-1"], "got -1"),
    (["-k", "-1", "--exact"], "got -1"),
    (["--search-k", "-2"], "got -2"),
    (["--search-k", "-7", "--exact"], "got -7"),
])
def test_query_argument_errors_exit_2_showing_the_value(tiny_mnist, capsys, argv, shown):
    assert grove(["query", "tinymnist", "test/3", *argv]) == 2
    assert shown in capsys.readouterr().err


@pytest.mark.parametrize("item", ["²", "٣", "1٣"])
def test_query_number_in_other_digits_exits_2(tiny_mnist, capsys, item):
    assert grove(["query", "tinymnist", item]) == 2
    err = capsys.readouterr().err
    assert repr(item) in err and "0-9" in err


def test_query_search_k_minus_one_is_the_default(chain, capsys):
    assert grove(["query", "tinymnist", "3", "--search-k", "-1", "-k", "2"]) == 0
    assert "search_k=default" in capsys.readouterr().out


def test_query_with_nothing_built_names_the_root(tiny_mnist, capsys):
    assert grove(["query", "tinymnist", "test/3"]) == 3
    err = capsys.readouterr().err
    assert str(tiny_mnist["root"].absolute()) in err and "grove run tinymnist" in err


def test_query_when_the_serving_version_was_removed_says_how_to_repair(chain, capsys):
    lifecycle.remove_version(_serving(chain["root"])["evaluate"])
    assert grove(["query", "tinymnist", "test/3"]) == 3
    err = capsys.readouterr().err
    assert "serving version evaluate/" in err and "grove run tinymnist --rebuild" in err


def test_rebuild_reports_damage_in_a_serving_version_the_config_no_longer_builds(chain, capsys):
    """Serving: n_trees [2, 4]; the config now says [2, 5]. A damaged forest_4 cannot be rebuilt by
    `run --rebuild` (no task of the current config makes it): it says so, exits 3, deletes nothing."""
    root, path = chain["root"], chain["config"]
    forest = _serving(root)["forest"]
    path.write_text(path.read_text().replace("n_trees = [2, 4]", "n_trees = [2, 5]"))
    luigi.task_register.Register.clear_instance_cache()
    assert grove(["run", "tinymnist"]) == 0
    _flip_byte(forest / "index" / "vectors.npy")
    capsys.readouterr()
    assert grove(["run", "tinymnist", "--rebuild"]) == 3
    err = capsys.readouterr().err
    assert f"uses {lifecycle.version_key(forest)}, which the current config does not build" in err
    assert "grove rollback tinymnist" in err and "removed" not in err
    assert (forest / artifacts.MANIFEST).is_file()
    assert grove(["query", "tinymnist", "test/3"]) == 3  # and it still does not answer from it
