"""The stage registry (pipeline.stages.STAGES): one record per stage that the digests, the tasks and the
commands read; and the luigi.cfg settings of an object-store root (s3_endpoint, s3_region)."""

from __future__ import annotations

from pathlib import Path

import luigi
import luigi.configuration
import pytest
from luigi.execution_summary import LuigiStatusCode

from conftest import REPO
from pipeline import artifacts, stages, store
from pipeline.config import load_config_file

PARENT = {"p": artifacts.ArtifactRef(Path("/r"), "x", "decode", 1, "0" * 16)}
# The context each stage's parameters take, as the tasks pass it once the parents are built.
CONTEXT = {"train": dict(image_shape=(28, 28)), "split": dict(test_rows=10000), "forest": dict(n_trees=10, dim=64),
           "evaluate": dict(n_queries_available=1000)}

# Digests computed before the registry replaced the if/elif table: a refactoring must not move them
# (a moved digest rebuilds every stored version). "provisional": the context a task passes while the
# parent that resolves it is not built (None, except a forest's own n_trees).
PINNED = {
    'glove/decode/provisional': 'f4541fa769b6bcb5',
    'glove/decode/resolved': 'f4541fa769b6bcb5',
    'glove/embed/provisional': '3528e150a7d78307',
    'glove/embed/resolved': '3528e150a7d78307',
    'glove/evaluate/provisional': '064bde3f0edd1705',
    'glove/evaluate/resolved': '00a8594c3855c5d8',
    'glove/exact/provisional': '4908071f1fbe6b14',
    'glove/exact/resolved': '4908071f1fbe6b14',
    'glove/fetch/provisional': '4b33eff0276dd153',
    'glove/fetch/resolved': '4b33eff0276dd153',
    'glove/forest/provisional': 'dbd24e36b41c0a35',
    'glove/forest/resolved': 'b6035560b9886852',
    'glove/split/provisional': '5dd59b2613e50a4d',
    'glove/split/resolved': '5dd59b2613e50a4d',
    'glove/train/provisional': 'd9b191c91d471961',
    'glove/train/resolved': '5a7a9d6993f44d06',
    'mnist-cnn/decode/provisional': 'a55a1c87dfb2d40c',
    'mnist-cnn/decode/resolved': 'a55a1c87dfb2d40c',
    'mnist-cnn/embed/provisional': '17778fd490fbc71d',
    'mnist-cnn/embed/resolved': '17778fd490fbc71d',
    'mnist-cnn/evaluate/provisional': '5201019bc31385df',
    'mnist-cnn/evaluate/resolved': '9ecfa137dc6f48c5',
    'mnist-cnn/exact/provisional': '4908071f1fbe6b14',
    'mnist-cnn/exact/resolved': '4908071f1fbe6b14',
    'mnist-cnn/fetch/provisional': '9e1199c3f4ddd74b',
    'mnist-cnn/fetch/resolved': '9e1199c3f4ddd74b',
    'mnist-cnn/forest/provisional': 'dbd24e36b41c0a35',
    'mnist-cnn/forest/resolved': 'b6035560b9886852',
    'mnist-cnn/split/provisional': '6683daef48ba8bd4',
    'mnist-cnn/split/resolved': 'a7c6e44a1b345237',
    'mnist-cnn/train/provisional': 'd9b191c91d471961',
    'mnist-cnn/train/resolved': '5a7a9d6993f44d06',
    'mnist/decode/provisional': 'a55a1c87dfb2d40c',
    'mnist/decode/resolved': 'a55a1c87dfb2d40c',
    'mnist/embed/provisional': '2c7beaee5a35385d',
    'mnist/embed/resolved': '2c7beaee5a35385d',
    'mnist/evaluate/provisional': '064bde3f0edd1705',
    'mnist/evaluate/resolved': '00a8594c3855c5d8',
    'mnist/exact/provisional': 'd40fa9cf7e37e596',
    'mnist/exact/resolved': 'd40fa9cf7e37e596',
    'mnist/fetch/provisional': '9e1199c3f4ddd74b',
    'mnist/fetch/resolved': '9e1199c3f4ddd74b',
    'mnist/forest/provisional': 'ea615069e11a7de8',
    'mnist/forest/resolved': '8af6e58b5044bf9e',
    'mnist/split/provisional': '6683daef48ba8bd4',
    'mnist/split/resolved': 'a7c6e44a1b345237',
    'mnist/train/provisional': 'd9b191c91d471961',
    'mnist/train/resolved': '5a7a9d6993f44d06',
}


def _digest(cfg: dict, stage: str, **context) -> str:
    params = stages.stage_params(cfg, stage, **context)
    return artifacts.make_ref("/r", "x", stage, stages.FORMATS[stage], params, PARENT).digest


@pytest.mark.parametrize("key", sorted(PINNED))
def test_digests_are_unchanged(key):
    name, stage, kind = key.split("/")
    cfg = load_config_file(REPO / "configs" / f"{name}.toml")
    context = CONTEXT.get(stage, {})
    if kind == "provisional":
        context = {k: (v if k == "n_trees" else None) for k, v in context.items()}
    assert _digest(cfg, stage, **context) == PINNED[key]
    # the registry's record gives the same parameters as the compatibility view
    assert stages.STAGES[stage].params(cfg, **context) == stages.stage_params(cfg, stage, **context)


def test_registry_shape():
    names = stages.STAGE_NAMES
    assert names == ("fetch", "decode", "features", "train", "embed", "embed-part", "split", "exact-part", "exact",
                     "forest-part", "forest", "evaluate")
    assert dict(stages.FORMATS) == {name: stages.STAGES[name].format for name in names}
    for i, name in enumerate(names):
        spec = stages.stage_of(name)
        assert spec.name == name and callable(spec.params) and callable(spec.write)
        assert set(spec.parents) <= set(names[:i]), name  # parents come first: the order is the chain's
        assert set(spec.measured) <= set(spec.files), name
    assert stages.STAGES["evaluate"].measured == ("timings.json", "results.parquet", "report.html", "report.json")
    with pytest.raises(KeyError, match="no stage 'nope'"):
        stages.stage_of("nope")
    with pytest.raises(TypeError):
        stages.FORMATS["fetch"] = 9  # a read-only view of the registry
    with pytest.raises(ValueError, match="registered twice"):
        stages.register(stages.STAGES["fetch"])


def test_cli_stage_names_come_from_the_registry():
    from tasks import cli

    assert tuple(cli.STAGES) == stages.STAGE_NAMES and "forest-part" in cli.STAGES and "nope" not in cli.STAGES
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["versions", "mnist", "nope"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("name, parents", [
    ("mnist", {"embed": ("decode",), "train": ("decode",)}),
    ("mnist-cnn", {"embed": ("decode", "train"), "train": ("decode",)}),
    ("food101-small-effnet", {"embed": ("decode", "train", "features"), "train": ("decode", "features")}),
])
def test_parents_follow_the_config(name, parents):
    cfg = load_config_file(REPO / "configs" / f"{name}.toml")
    for stage, expected in parents.items():
        assert stages.STAGES[stage].parents_for(cfg) == expected
    assert stages.STAGES["evaluate"].parents_for(cfg) == ("embed", "split", "exact", "forest")


def test_tasks_read_the_registry_and_write_the_declared_files(tiny_mnist):
    import tasks

    evaluate = tasks.Evaluate(dataset="tinymnist")
    assert list(evaluate.parent_tasks()) == ["embed", "split", "exact", "forest_2", "forest_4"]
    assert list(tasks.Embed(dataset="tinymnist").parent_tasks()) == ["decode"]
    assert list(tasks.Fetch(dataset="tinymnist").parent_tasks()) == []
    result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, workers=1, detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    root = tiny_mnist["root"]
    for stage in ("decode", "embed", "split", "exact", "forest", "evaluate"):
        for m in artifacts.list_versions(root, "tinymnist", stage):
            spec = stages.STAGES[stage]
            assert m["version"].startswith(f"v{spec.format}-")
            files = m["files"]
            assert {name.split("/")[0] for name in files} == set(spec.files), stage
            measured = {name.split("/")[0] for name, f in files.items() if f["measured"]}
            assert measured == set(spec.measured), stage


@pytest.fixture
def grove_section(monkeypatch):
    """Sets keys of luigi.cfg's [grove] section for one test; no AWS endpoint or region variables."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = luigi.configuration.get_config()
    if not config.has_section("grove"):
        config.add_section("grove")
    saved = dict(config.items("grove")) if config.has_section("grove") else {}
    set_keys = []

    def set_(**values):
        for key, value in values.items():
            config.set("grove", key, value)
            set_keys.append(key)
        luigi.task_register.Register.clear_instance_cache()  # luigi.Config instances are cached too
        from tasks.base import grove

        return grove()

    yield set_
    for key in set_keys:
        if key in saved:
            config.set("grove", key, saved[key])
        else:
            config.remove_option("grove", key)
    luigi.task_register.Register.clear_instance_cache()
    store.configure_store(None, None)
    artifacts._open_store.cache_clear()


def test_luigi_cfg_s3_endpoint_and_region_reach_the_object_store(grove_section, monkeypatch):
    monkeypatch.setenv("GROVE_ARTIFACTS", "s3://grove-test/prefix")
    settings = grove_section(s3_endpoint="http://127.0.0.1:9", s3_region="eu-north-1")
    root = settings.artifact_root()  # no request is made: nothing listens on port 9
    s3 = artifacts.store_of(root)
    assert (s3.endpoint_url, s3.region) == ("http://127.0.0.1:9", "eu-north-1")
    assert "endpoint http://127.0.0.1:9, region eu-north-1" in s3.describe()

    # the environment wins, as for every other grove setting
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    s3 = artifacts.store_of(settings.artifact_root())
    assert (s3.endpoint_url, s3.region) == ("http://127.0.0.1:10", "ap-south-1")

    # a changed setting gives a new store, not the one opened with the old setting
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    s3 = artifacts.store_of(grove_section(s3_endpoint="http://127.0.0.1:11").artifact_root())
    assert s3.endpoint_url == "http://127.0.0.1:11"


def test_empty_s3_settings_leave_aws_s3(grove_section, monkeypatch):
    monkeypatch.setenv("GROVE_ARTIFACTS", "s3://grove-test/prefix")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3 = artifacts.store_of(grove_section(s3_endpoint="", s3_region="").artifact_root())
    assert s3.endpoint_url is None and s3.region == "us-east-1"
    assert "AWS S3" in s3.describe()


def test_only_the_layout_module_spells_the_names_inside_the_root():
    """Every file and directory name grove gives inside the artifact root is a constant of
    pipeline/layout.py; no other module of pipeline/ or tasks/ writes it out as a string literal (so a
    renamed file cannot be missed by one reader)."""
    import ast

    from pipeline import layout

    # file names (words such as "serving" or "evaluate" are also stage names, keys and commands)
    names = {value for name, value in vars(layout).items() if name.isupper() and isinstance(value, str)
             and "." in value.strip(".")}
    assert {"items.arrow", "results.json", "manifest.json", "serving.log", "index.html"} <= names
    spelled = []
    for path in sorted([*(REPO / "pipeline").glob("*.py"), *(REPO / "tasks").glob("*.py")]):
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not spelled, "\n".join(spelled)
