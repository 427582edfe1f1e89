"""Every config error a user can make is found by ``grove run`` before any work: exit 2, and one
message naming the config file, the key, the value given and what is allowed. Nothing is written
under the artifact root. The configs are tiny TOML files written here, shaped like configs/mnist.toml.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from tasks.cli import main

SHA = "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
MD5 = "9fb629c4189551a2d022fa330f9573f3"


def _source(filename: str) -> dict:
    # file:// URLs of files that do not exist: if a bad config slipped through, the run would fail
    # at once with exit 1 (no network wait), and the test would see that instead of exit 2.
    return {"filename": filename, "sha256": SHA, "md5": MD5, "urls": [f"file:///nonexistent/grove/{filename}"]}


BASE = {
    "idx": {
        "dataset": {"name": "NAME", "kind": "idx", "description": "like mnist", "mirror_subdir": "mnist"},
        "sources.train_images": _source("train-images-idx3-ubyte.gz"),
        "sources.train_labels": _source("train-labels-idx1-ubyte.gz"),
        "sources.test_images": _source("t10k-images-idx3-ubyte.gz"),
        "sources.test_labels": _source("t10k-labels-idx1-ubyte.gz"),
        "decode": {"train_images": "train_images", "train_labels": "train_labels",
                   "test_images": "test_images", "test_labels": "test_labels"},
        "embed": {"model": "pixels", "metric": "euclidean", "scale": 1.0},
        "split": {"method": "column", "n_queries": 0, "seed": 0},
        "exact": {"k": 100},
        "forest": {"n_trees": [10, 50], "leaf_size": 0, "seed": 0},
        "evaluate": {"k": 10, "search_k": [100, 1000], "n_queries": 1000},
        "gate": {"min_recall": 0.9, "n_trees": 50, "search_k": 1000},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.002, "seed": 0},
    },
    "word2vec": {
        "dataset": {"name": "NAME", "kind": "word2vec", "mirror_subdir": "words"},
        "sources.vectors": _source("vectors.w2v.bin"),
        "decode": {"vectors": "vectors", "format": "binary", "limit": 0},
        "embed": {"model": "normalized", "metric": "angular"},
        "split": {"method": "holdout", "n_queries": 100},
    },
    "food101": {
        "dataset": {"name": "NAME", "kind": "food101", "mirror_subdir": "food"},
        "sources.archive": _source("food.tar.gz"),
        "decode": {"archive": "archive", "image_size": 64},
    },
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes (\\, \", \u0000) are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(directory, name: str, kind: str = "idx", **changes) -> "Path":  # noqa: F821
    """``<directory>/<name>.toml`` from BASE[kind] with ``changes`` ({"section__key": value}) applied."""
    tables = copy.deepcopy(BASE[kind])
    tables["dataset"]["name"] = name
    for dotted, value in changes.items():
        section, key = dotted.replace("__", ".").rsplit(".", 1)
        tables.setdefault(section, {})[key] = value
    text = "".join(f"[{section}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()) + "\n"
                   for section, table in tables.items())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """GROVE_CONFIGS, GROVE_ARTIFACTS and GROVE_SCRATCH under tmp_path, and no mirror."""
    configs, root = tmp_path / "configs", tmp_path / "art"
    configs.mkdir()
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.delenv("GROVE_MIRROR", raising=False)
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "scratch"))
    return {"configs": configs, "root": root}


def _nothing_written(root) -> bool:
    return not root.exists() or not any(root.iterdir())


# (id, kind, changes, key the message must name, value as the message shows it, words of what is allowed)
BAD = [
    ("leaf_size", "idx", {"forest.leaf_size": -5}, "forest.leaf_size", "-5", "0 for the index's default"),
    ("forest_seed", "idx", {"forest.seed": -1}, "forest.seed", "-1", ">= 0"),
    ("n_trees_zero", "idx", {"forest.n_trees": [0, 10]}, "forest.n_trees", "[0, 10]", ">= 1"),
    ("n_trees_repeat", "idx", {"forest.n_trees": [10, 10]}, "forest.n_trees", "[10, 10]", "each value once"),
    ("n_trees_empty", "idx", {"forest.n_trees": []}, "forest.n_trees", "[]", "at least one"),
    ("evaluate_k_zero", "idx", {"evaluate.k": 0}, "evaluate.k", "0", ">= 1"),
    ("exact_k_zero", "idx", {"exact.k": 0, "evaluate.k": 1}, "exact.k", "0", ">= 1"),
    ("exact_k_below_evaluate_k", "idx", {"exact.k": 5}, "exact.k", "5", "at least evaluate.k = 10"),
    ("search_k_below_minus_1", "idx", {"evaluate.search_k": [100, -2]}, "evaluate.search_k", "-2", "-1 for"),
    ("search_k_zero", "idx", {"evaluate.search_k": [0, 1000]}, "evaluate.search_k", "0", ">= 1, or -1"),
    ("search_k_repeat", "idx", {"evaluate.search_k": [100, 1000, 100]}, "evaluate.search_k", "100",
     "each value once"),
    ("search_k_empty", "idx", {"evaluate.search_k": [], "gate.search_k": 0}, "evaluate.search_k", "[]",
     "at least one"),
    ("evaluate_n_queries", "idx", {"evaluate.n_queries": -3}, "evaluate.n_queries", "-3", "0 = every query"),
    ("split_n_queries", "idx", {"split.n_queries": -1}, "split.n_queries", "-1", ">= 0"),
    ("split_seed", "idx", {"split.seed": -7}, "split.seed", "-7", ">= 0"),
    ("holdout_without_queries", "word2vec", {"split.n_queries": 0}, "split.n_queries", "0", ">= 1"),
    ("scale_zero", "idx", {"embed.scale": 0.0}, "embed.scale", "0.0", "> 0"),
    ("scale_negative", "idx", {"embed.scale": -2.0}, "embed.scale", "-2.0", "> 0"),
    ("scale_nan", "idx", {"embed.scale": math.nan}, "embed.scale", "nan", "finite"),
    ("scale_inf", "idx", {"embed.scale": math.inf}, "embed.scale", "inf", "finite"),
    ("train_epochs", "idx", {"train.epochs": 0}, "train.epochs", "0", ">= 1"),
    ("train_batch_size", "idx", {"train.batch_size": 0}, "train.batch_size", "0", ">= 1"),
    ("train_lr_zero", "idx", {"train.lr": 0.0}, "train.lr", "0.0", "> 0"),
    ("train_lr_inf", "idx", {"train.lr": math.inf}, "train.lr", "inf", "finite"),
    ("train_dropout_one", "idx", {"train.dropout": 1.0}, "train.dropout", "1.0", "[0, 1)"),
    ("train_dropout_negative", "idx", {"train.dropout": -0.1}, "train.dropout", "-0.1", "[0, 1)"),
    ("train_weight_decay", "idx", {"train.weight_decay": -0.01}, "train.weight_decay", "-0.01", ">= 0"),
    ("train_bottleneck", "idx", {"train.bottleneck": 0}, "train.bottleneck", "0", ">= 1"),
    ("train_input_size", "idx", {"train.input_size": -1}, "train.input_size", "-1", "8..1024"),
    ("train_seed", "idx", {"train.seed": -1}, "train.seed", "-1", ">= 0"),
    ("image_size", "food101", {"decode.image_size": 4}, "decode.image_size", "4", "8..1024"),
    ("word2vec_limit", "word2vec", {"decode.limit": -1}, "decode.limit", "-1", "0 = every word"),
    ("gate_min_recall_high", "idx", {"gate.min_recall": 1.5}, "gate.min_recall", "1.5", "[0, 1]"),
    ("gate_min_recall_low", "idx", {"gate.min_recall": -0.1}, "gate.min_recall", "-0.1", "[0, 1]"),
    ("gate_min_qps", "idx", {"gate.min_qps": -1.0}, "gate.min_qps", "-1.0", ">= 0"),
    ("gate_n_trees", "idx", {"gate.n_trees": -1}, "gate.n_trees", "-1", "one of forest.n_trees"),
    ("gate_search_k", "idx", {"gate.search_k": -2}, "gate.search_k", "-2", "one of evaluate.search_k"),
    ("sha256_short", "idx", {"sources.test_images.sha256": "abc123"}, "sources.test_images.sha256",
     "'abc123'", "64 hexadecimal"),
    ("sha256_not_hex", "idx", {"sources.test_images.sha256": "g" * 64}, "sources.test_images.sha256",
     repr("g" * 64), "64 hexadecimal"),
    ("md5_short", "idx", {"sources.test_labels.md5": "9fb629c4"}, "sources.test_labels.md5", "'9fb629c4'",
     "32 hexadecimal"),
    ("md5_sha256_length", "idx", {"sources.test_labels.md5": SHA}, "sources.test_labels.md5", repr(SHA),
     "32 hexadecimal"),
    ("ftp_url", "idx", {"sources.train_labels.urls": ["ftp://example.org/train-labels-idx1-ubyte.gz"]},
     "sources.train_labels.urls", "'ftp://example.org/train-labels-idx1-ubyte.gz'", "package://"),
    ("url_without_scheme", "idx", {"sources.train_labels.urls": ["example.org/t.gz"]},
     "sources.train_labels.urls", "'example.org/t.gz'", "https://"),
    ("url_empty", "idx", {"sources.train_labels.urls": [""]}, "sources.train_labels.urls", "''", "file://"),
    ("http_url_without_host", "idx", {"sources.train_labels.urls": ["https:///t.gz"]},
     "sources.train_labels.urls", "'https:///t.gz'", "needs a host"),
    ("filename_dotdot", "idx", {"sources.train_images.filename": "../x"}, "sources.train_images.filename",
     "'../x'", "bare file name"),
    ("filename_absolute", "idx", {"sources.train_images.filename": "/etc/passwd"},
     "sources.train_images.filename", "'/etc/passwd'", "bare file name"),
    ("filename_slash", "idx", {"sources.train_images.filename": "a/b"}, "sources.train_images.filename",
     "'a/b'", "bare file name"),
    ("filename_backslash", "idx", {"sources.train_images.filename": "a\\b"}, "sources.train_images.filename",
     repr("a\\b"), "bare file name"),
    ("filename_empty", "idx", {"sources.train_images.filename": ""}, "sources.train_images.filename", "''",
     "bare file name"),
    ("filename_nul", "idx", {"sources.train_images.filename": "a\x00b"}, "sources.train_images.filename",
     repr("a\x00b"), "bare file name"),
    ("filename_dots", "idx", {"sources.train_images.filename": ".."}, "sources.train_images.filename",
     "'..'", "bare file name"),
]


@pytest.mark.parametrize(("kind", "changes", "key", "shown", "allowed"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_value_exits_2_before_any_work(env, capsys, kind, changes, key, shown, allowed):
    path = write_config(env["configs"], "cfgtest", kind, **changes)
    assert main(["run", "cfgtest"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    assert f"{key} " in err and shown in err, err
    assert allowed in err, err
    assert _nothing_written(env["root"])


def test_a_good_config_of_each_kind_validates(env):
    """The base configs the bad cases start from are valid: each bad case fails for its one change."""
    for kind in BASE:
        cfg = config.load_config_file(write_config(env["configs"], f"good-{kind}", kind))
        assert cfg.kind == kind


@pytest.mark.parametrize("changes", [
    {"forest.leaf_size": 0}, {"forest.leaf_size": 1}, {"evaluate.search_k": [-1, 1, 1000], "gate.search_k": -1},
    {"evaluate.n_queries": 0}, {"split.n_queries": 0}, {"exact.k": 10}, {"evaluate.k": 1, "exact.k": 1},
    {"train.dropout": 0.0}, {"train.weight_decay": 0.0}, {"train.input_size": 0}, {"train.input_size": 224},
    {"gate.min_recall": 1.0, "gate.min_qps": 0.0, "gate.n_trees": 0, "gate.search_k": 0},
    {"embed.scale": 1e-3}, {"sources.test_images.urls": ["package://grove/mnist/t10k-images-idx3-ubyte.gz",
                                                        "http://example.org/a.gz", "file:///srv/m/a.gz"]},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_boundary_values_are_accepted(env, changes):
    cfg = config.load_config_file(write_config(env["configs"], "edge", **changes))
    for dotted, value in changes.items():
        section, key = dotted.rsplit(".", 1)
        table = cfg.sources[section.split(".")[1]] if section.startswith("sources.") else getattr(cfg, section)
        assert table.as_dict()[key] == value


def test_upper_case_checksums_are_normalised(env):
    path = write_config(env["configs"], "upper", **{"sources.test_images.sha256": SHA.upper(),
                                                    "sources.test_images.md5": MD5.upper()})
    src = config.load_config_file(path).sources["test_images"]
    assert (src.sha256, src.md5) == (SHA, MD5)


# --- urls = [] and mirrors ----------------------------------------------------------------------


def test_check_sources_reachable(env):
    path = write_config(env["configs"], "nourl", **{"sources.test_labels.urls": [], "sources.train_images.urls": []})
    cfg = config.load_config_file(path)  # valid in the file: a mirror may supply the bytes
    for mirror in (None, "", "  "):
        with pytest.raises(ConfigError) as err:
            config.check_sources_reachable(cfg, mirror)
        message = str(err.value)
        for key in ("sources.test_labels.urls", "sources.train_images.urls"):
            assert f"{path}: {key} = []" in message
        assert "GROVE_MIRROR" in message and "luigi.cfg [grove] mirror" in message
        assert "sources.test_images.urls" not in message
    config.check_sources_reachable(cfg, "file:///srv/mirror")
    config.check_sources_reachable(cfg, "/srv/mirror")  # a plain directory is a file:// mirror
    with pytest.raises(ConfigError, match=r"the mirror 'ftp://m\.example/data' .* is not usable"):
        config.check_sources_reachable(cfg, "ftp://m.example/data")
    config.check_sources_reachable(config.load_config_file(write_config(env["configs"], "allurls")), None)


@pytest.mark.parametrize("mirror", ["ftp://host/data", "s3://bucket/data", "https://", "file://otherhost/data"])
def test_check_mirror_refuses_unsupported_prefixes(mirror):
    with pytest.raises(ConfigError) as err:
        config.check_mirror(mirror)
    assert repr(mirror) in str(err.value) and "https://" in str(err.value) and "package://" in str(err.value)


@pytest.mark.parametrize("mirror", ["https://mirror.example/data", "http://m/x", "file:///srv/data", "/srv/data",
                                    "package://grove-data/files", ""])
def test_check_mirror_accepts_supported_prefixes(mirror):
    config.check_mirror(mirror)


# The two tests below need `grove run` to call config.check_sources_reachable(cfg, mirror) (and so
# check_mirror) before it builds anything; until the CLI does, the run fails late with exit 1.
def test_no_urls_and_no_mirror_exits_2_before_any_work(env, capsys):
    path = write_config(env["configs"], "nourl", **{"sources.test_labels.urls": []})
    assert main(["run", "nourl"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: sources.test_labels.urls = []" in err and "GROVE_MIRROR" in err, err
    assert _nothing_written(env["root"])


def test_unsupported_mirror_exits_2_before_any_work(env, capsys, monkeypatch):
    write_config(env["configs"], "mirrored")
    monkeypatch.setenv("GROVE_MIRROR", "ftp://mirror.example/data")
    assert main(["run", "mirrored"]) == 2
    err = capsys.readouterr().err
    assert "'ftp://mirror.example/data'" in err and "GROVE_MIRROR" in err and "https://" in err, err
    assert _nothing_written(env["root"])


# --- dataset names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", "/abs", "x\x00", "a..b", ".hidden"])
def test_unsafe_dataset_name_exits_2(env, capsys, tmp_path, name):
    # A config that "../x" would reach from GROVE_CONFIGS if names were joined unchecked.
    write_config(tmp_path, "x")
    assert main(["run", name]) == 2
    err = capsys.readouterr().err
    assert repr(name) in err and "letters, digits, '.', '_' and '-'" in err, err
    assert _nothing_written(env["root"])


def test_unsafe_names_are_refused_before_the_filesystem(env, tmp_path):
    write_config(tmp_path, "x")  # tmp_path/x.toml is configs/../x.toml
    with pytest.raises(ConfigError, match=r"dataset name '\.\./x' is not allowed: use .*letters, digits"):
        config.find_config("../x")
    with pytest.raises(ConfigError, match="is not allowed"):
        config.load_config("../x")


def test_config_files_with_unsafe_names_are_ignored_and_refused(env):
    good = write_config(env["configs"], "fine")
    bad = env["configs"] / "bad name.toml"
    bad.write_text(good.read_text().replace('name = "fine"', 'name = "bad name"'))
    (env["configs"] / "-dash.toml").write_text(good.read_text().replace('name = "fine"', 'name = "-dash"'))
    names = config.available_datasets()
    assert "fine" in names and "bad name" not in names and "-dash" not in names
    with pytest.raises(ConfigError, match=r"bad name\.toml: the config file name 'bad name' is not allowed"):
        config.load_config_file(bad)


def test_idx_without_train_files_needs_both_left_out_and_a_holdout_split(env):
    """configs/mnist-small.toml: the test files alone are the dataset, queries held out of them."""
    path = write_config(env["configs"], "testonly", **{"split.method": "holdout", "split.n_queries": 100})
    text = path.read_text()
    for table in ("sources.train_images", "sources.train_labels"):  # remove the train sources and the decode keys naming them
        start = text.index(f"[{table}]")
        text = text[:start] + text[text.index("\n\n", start) + 2:]
    both_gone = text.replace('train_images = "train_images"\n', "").replace('train_labels = "train_labels"\n', "")
    path.write_text(both_gone)
    cfg = config.load_config_file(path)
    assert cfg.decode.train_images is None and set(cfg.sources) == {"test_images", "test_labels"}
    path.write_text(both_gone.replace('method = "holdout"', 'method = "column"'))
    with pytest.raises(ConfigError, match=r"testonly\.toml: split\.method = 'column' needs train rows"):
        config.load_config_file(path)
    path.write_text(text.replace('train_labels = "train_labels"\n', "").replace("[sources.test_images]",
                    '[sources.train_images]\nfilename = "a.gz"\nsha256 = "' + SHA + '"\n\n[sources.test_images]'))
    with pytest.raises(ConfigError, match=r"decode\.train_images = 'train_images' but decode\.train_labels is not set"):
        config.load_config_file(path)
