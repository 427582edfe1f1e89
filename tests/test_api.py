"""The Python API (pipeline.api): open what serves, query it every way, typed errors, and following
a promotion while queries run, on a tiny chain built twice (two forest seeds, two evaluations)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import luigi.task_register
import numpy as np
import pytest

from conftest import REPO, tiny_digits, write_tiny_config
from pipeline import api, artifacts, layout, lifecycle
from pipeline.errors import ArtifactError, ConfigError, IndexMismatchError
from pipeline.formats.idx import write_idx
from tasks.cli import main as grove

DATASET = "tinymnist"
_BUILT: dict = {}  # built once per test session (tests/test_service.py uses it too)


def two_versions(tmp_path_factory) -> dict:
    """tinymnist built twice under one artifact root: forest seed 0 (``first``) and seed 1 (``second``),
    two evaluate versions over the same split; ``first`` is promoted. Built once per session."""
    if _BUILT:
        lifecycle.promote(_BUILT["root"], DATASET, _BUILT["first"], reason="test set-up")
        return _BUILT
    base = tmp_path_factory.mktemp("two-versions")
    mirror = base / "mirror"
    (mirror / DATASET).mkdir(parents=True)
    train_x, train_y = tiny_digits(400, seed=1)
    test_x, test_y = tiny_digits(60, seed=2)
    files = {
        "train_images": write_idx(mirror / DATASET / "tiny-train-images.gz", train_x, compress=True),
        "train_labels": write_idx(mirror / DATASET / "tiny-train-labels.gz", train_y, compress=True),
        "test_images": write_idx(mirror / DATASET / "tiny-test-images.gz", test_x, compress=True),
        "test_labels": write_idx(mirror / DATASET / "tiny-test-labels.gz", test_y, compress=True),
    }
    configs = base / "configs"
    configs.mkdir()
    config = write_tiny_config(configs, DATASET, files)
    root = base / "artifacts"
    env = {"GROVE_MIRROR": mirror.as_uri(), "GROVE_CONFIGS": str(configs), "GROVE_ARTIFACTS": str(root),
           "GROVE_THREADS": "2", "GROVE_SCRATCH": str(base / "scratch")}
    versions = []
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for seed in (0, 1):
            config.write_text(config.read_text().replace("seed = 0", f"seed = {seed}"))
            luigi.task_register.Register.clear_instance_cache()
            assert grove(["run", DATASET]) == 0
            versions.append(artifacts.read_pointer(root / DATASET / "evaluate"))
    luigi.task_register.Register.clear_instance_cache()
    assert versions[0] != versions[1]
    lifecycle.promote(root, DATASET, versions[0], reason="test set-up")
    _BUILT.update(root=root, configs=configs, mirror=mirror, config=config, env=env, first=versions[0],
                  second=versions[1], train=(train_x, train_y), test=(test_x, test_y))
    return _BUILT


@pytest.fixture
def built(tmp_path_factory):
    return two_versions(tmp_path_factory)


def _forest_dir(root: Path, version: str) -> Path:
    """The directory of the forest that answers for the evaluate ``version`` (the most trees)."""
    manifest = artifacts.read_manifest(root / DATASET / "evaluate" / version, verify="none")
    return root / api._forest_of(str(root), manifest).key


def _mapped(path: Path) -> bool:
    gc.collect()
    return str(path) in Path("/proc/self/maps").read_text()


# --- opening and querying -------------------------------------------------------------------------


def test_open_what_serves_and_query_it_every_way(built):
    root = built["root"]
    with api.open_index(DATASET, root=root) as index:
        assert (index.dataset, index.version, index.follows) == (DATASET, built["first"], "serving")
        assert (index.metric, index.dim, index.count, index.n_trees, index.kind) == ("euclidean", 784, 400, 4, "idx")
        assert len(index) == 400 and index.keys()[:2] == ["train/0", "train/1"] and len(index.keys()) == 400
        np.testing.assert_array_equal(index.labels(), built["train"][1].astype(np.int32))
        assert index.held_out_keys()[:2] == ["test/0", "test/1"]

        # train/4 is a copy of train/1 (see tiny_digits): its own key is left out, so its twin comes first
        hits = index.query_key("train/4", k=3, search_k=5000)
        assert hits.keys[0] == "train/1" and hits.distances[0] == 0.0 and "train/4" not in hits.keys
        assert list(hits.ids) == [int(key.split("/")[1]) for key in hits.keys] and hits.version == built["first"]
        assert index.query_key("train/4", k=3, exact=True).keys == hits.keys

        vector = index.vector("test/3")
        assert vector.dtype == np.float32 and vector.shape == (784,)
        by_vector = index.query(vector, k=5, search_k=5000)
        assert by_vector.keys == index.query_key("test/3", k=5, search_k=5000).keys  # a held-out key: not indexed
        exact = index.query(list(map(float, vector)), k=5, exact=True)  # a plain list works too
        assert exact.keys == by_vector.keys
        np.testing.assert_allclose(exact.distances, by_vector.distances, rtol=1e-5)
        assert index.query(vector, k=5, distances=False).distances is None

        rows = np.stack([index.vector(f"test/{i}") for i in range(6)])
        batch = index.query_batch(rows, k=4)
        assert [b.keys for b in batch] == [index.query(row, k=4).keys for row in rows]
        assert [b.keys for b in index.query_batch(rows, k=4, n_threads=2)] == [b.keys for b in batch]
        assert [b.keys for b in index.query_batch(rows, k=4, exact=True)] == \
            [index.query(row, k=4, exact=True).keys for row in rows]
        assert index.query_batch(np.zeros((0, 784)), k=4) == []
        assert index.query(vector, k=1000).ids.shape == (400,)  # k is clipped to the items
        assert hits.to_dict()["keys"] == hits.keys


def test_a_handle_without_numba_answers_the_same(built):
    """compiled=False (what `grove query` opens): the numpy twins give the same keys, ids and
    distance bits as the compiled kernels, approximate and exact, one by one and in a batch; the
    attribute switches a handle either way."""
    root = built["root"]
    with api.open_index(DATASET, root=root) as compiled, api.open_index(DATASET, root=root, compiled=False) as twin:
        assert compiled.compiled and not twin.compiled
        keys = compiled.held_out_keys()[:12] + ["train/4", "train/0", "train/399"]
        for key in keys:
            for kwargs in ({"k": 5}, {"k": 3, "search_k": 0}, {"k": 10, "search_k": 5000}, {"k": 4, "exact": True}):
                a, b = compiled.query_key(key, **kwargs), twin.query_key(key, **kwargs)
                assert a.keys == b.keys and a.ids.tolist() == b.ids.tolist(), (key, kwargs)
                assert a.distances.tobytes() == b.distances.tobytes(), (key, kwargs)
        rows = np.stack([compiled.vector(key) for key in keys])
        for exact in (False, True):
            a = compiled.query_batch(rows, k=4, n_threads=2, exact=exact)
            b = twin.query_batch(rows, k=4, n_threads=2, exact=exact)
            assert [h.keys for h in a] == [h.keys for h in b]
            assert [h.distances.tobytes() for h in a] == [h.distances.tobytes() for h in b]
        assert "train/4" in twin and "test/0" in twin and "train/400" not in twin and 3 not in twin
        twin.compiled = True
        assert twin.query_key("train/4", k=3).keys == compiled.query_key("train/4", k=3).keys


def test_open_a_named_or_the_latest_version(built):
    root = built["root"]
    with api.open_index(DATASET, root=str(root), version=built["second"]) as index:
        assert index.version == built["second"] and index.follows is None
        assert index.refresh() is False  # a named version follows nothing
    with api.open_index(DATASET, root=root, version="latest") as index:
        assert index.version == built["second"] and index.follows == "latest"  # built last


@pytest.mark.parametrize("call, error, shown", [
    (lambda i: i.query_key("train/9999"), api.UnknownKeyError, "no item with key 'train/9999'"),
    (lambda i: i.query(np.zeros(783)), IndexMismatchError, "dimension 784, got shape (783,)"),
    (lambda i: i.query([float("nan")] + [0.0] * 783), api.QueryError, "NaN at 0"),
    (lambda i: i.query([0.0] * 783 + [float("inf")]), api.QueryError, "infinity"),
    (lambda i: i.query([0.0] * 783 + [1e39]), api.QueryError, "beyond float32"),
    (lambda i: i.query(["a"] * 784), api.QueryError, "numbers only"),
    (lambda i: i.query(np.zeros(784), k=0), api.QueryError, "k must be an integer >= 1, got 0"),
    (lambda i: i.query(np.zeros(784), k=True), api.QueryError, "got True"),
    (lambda i: i.query(np.zeros(784), search_k=-1), api.QueryError, "search_k must be an integer >= 0"),
    (lambda i: i.query_batch(np.zeros((2, 10))), IndexMismatchError, "shape (n, 784)"),
    (lambda i: i.query_batch(np.full((2, 784), np.nan)), api.QueryError, "NaN at 0/0"),
    (lambda i: i.query_text("seven"), api.QueryError, "not a word dataset (kind idx)"),
    (lambda i: i.query_key(3), api.QueryError, "key must be a string"),
])
def test_bad_queries_are_typed_errors_and_the_index_keeps_answering(built, call, error, shown):
    with api.open_index(DATASET, root=built["root"]) as index:
        with pytest.raises(error) as caught:
            call(index)
        assert shown in str(caught.value)
        assert isinstance(caught.value, (ConfigError, IndexMismatchError))  # grove's, and ValueErrors
        assert index.query_key("train/4", k=1).keys


def test_what_cannot_be_opened_says_why(built, tmp_path):
    root = built["root"]
    with pytest.raises(api.UnknownDatasetError, match=r"no dataset 'nosuch' under the artifact root .*; it holds "
                                                      r"tinymnist"):
        api.open_index("nosuch", root=root)
    with pytest.raises(api.UnknownDatasetError, match="it holds none"):
        api.open_index(DATASET, root=tmp_path / "empty")
    with pytest.raises(api.UnknownDatasetError, match="is not allowed"):
        api.open_index("../etc", root=root)
    with pytest.raises(api.QueryError, match="not an evaluate version"):
        api.open_index(DATASET, root=root, version="newest")
    with pytest.raises(ArtifactError, match="no version evaluate/v2-0000000000000000 .* `grove versions"):
        api.open_index(DATASET, root=root, version="v2-0000000000000000")
    (tmp_path / "half" / DATASET / "evaluate").mkdir(parents=True)
    with pytest.raises(api.NotServingError, match="nothing is serving yet .* `grove promote tinymnist VERSION`"):
        api.open_index(DATASET, root=tmp_path / "half")
    with pytest.raises(api.NotServingError, match="no evaluation is built"):
        api.open_index(DATASET, root=tmp_path / "half", version="latest")


def test_a_damaged_serving_index_is_refused_before_any_answer(built, tmp_path, monkeypatch):
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "scratch"))  # no verified-stamp: hash everything
    vectors = _forest_dir(built["root"], built["first"]) / "index" / "vectors.npy"
    data = vectors.read_bytes()
    try:
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        vectors.write_bytes(bytes(damaged))
        with pytest.raises(ArtifactError, match=r"vectors.npy: sha256 .* `grove run tinymnist --rebuild`"):
            api.open_index(DATASET, root=built["root"])
    finally:
        vectors.write_bytes(data)


# --- following promotions -------------------------------------------------------------------------


def test_refresh_follows_a_promotion_and_unmaps_the_old_version(built):
    root = built["root"]
    old_forest = _forest_dir(root, built["first"])
    new_forest = _forest_dir(root, built["second"])
    assert old_forest != new_forest
    index = api.open_index(DATASET, root=root)
    try:
        assert index.refresh() is False  # nothing changed: one pointer read
        before = index.query_key("test/3", k=5)
        assert _mapped(old_forest) and not _mapped(new_forest)

        with index._use() as in_flight:  # a query that started before the promotion...
            lifecycle.promote(root, DATASET, built["second"])
            assert index.pointer() == built["second"]
            assert index.refresh() is True
            assert index.version == built["second"] and index.swaps == 1
            assert index.mapped_versions == 2  # ...keeps its version mapped until it is done
            assert in_flight.forest.query(index.vector("test/3"), k=5).shape == (5,)
        assert index.mapped_versions == 1 and index.released == 1
        assert not _mapped(old_forest) and _mapped(new_forest)

        after = index.query_key("test/3", k=5)
        assert after.version == built["second"] and before.version == built["first"]
        assert index.forest_version == new_forest.name
        assert index.refresh() is False

        store = artifacts.store_of(root)
        store.remove_pointer(layout.dataset_key(DATASET), layout.SERVING)
        with pytest.raises(api.NotServingError):
            index.refresh()  # nothing serves now: said so, and the last version keeps answering
        assert index.query_key("test/3", k=5).version == built["second"]
    finally:
        lifecycle.promote(root, DATASET, built["first"], reason="test tear-down")
        index.close()
    assert index.mapped_versions == 0 and not _mapped(new_forest)
    with pytest.raises(ArtifactError, match="closed"):
        index.query_key("test/3")


def test_queries_from_many_threads_during_promotions_all_succeed(built):
    root = built["root"]
    index = api.open_index(DATASET, root=root)
    vectors = np.stack([index.vector(f"test/{i}") for i in range(20)])
    seen: list[set] = [set() for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                if i % 3 == 0:
                    answers = index.query_batch(vectors[:5], k=3)
                    assert len({a.version for a in answers}) == 1  # a batch is answered by one version
                    seen[n].add(answers[0].version)
                else:
                    seen[n].add(index.query(vectors[i % 20], k=3).version)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for version in [built["second"], built["first"]] * 3:
            lifecycle.promote(root, DATASET, version)
            assert index.refresh() is True
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert all(s == {built["first"], built["second"]} for s in seen), seen
    assert index.swaps == 6 and index.mapped_versions == 1 and index.released == 6
    index.close()


# --- the root grove's commands use, without luigi -------------------------------------------------


def _python(code: str, cwd: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_default_root_is_the_commands_root_and_the_api_needs_no_luigi(built, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GROVE_ARTIFACTS", "LUIGI_CONFIG_PATH")}
    env["PYTHONPATH"] = str(REPO)
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (tmp_path / "project" / "luigi.cfg").write_text("[grove]\nartifacts = ${GROVE_TEST_PLACE}/arts\n")
    env["GROVE_TEST_PLACE"] = "place"
    commands = "import luigi; from tasks import settings; settings.install(); from tasks.base import grove; " \
               "print(grove().artifact_root())"  # as `grove` finds its settings
    library = "from pipeline import default_root; print(default_root())"
    expected = str(tmp_path / "project" / "place" / "arts")
    assert _python(commands, work, env) == expected == _python(library, work, env)
    env["GROVE_ARTIFACTS"] = "relative/root"
    assert _python(commands, work, env) == "relative/root" == _python(library, work, env)

    env["GROVE_ARTIFACTS"] = str(built["root"])
    code = ("import sys, pipeline; index = pipeline.open_index('tinymnist'); "
            "print(index.query_key('train/4', k=1).keys[0], index.version, 'luigi' in sys.modules)")
    assert _python(code, work, env) == f"train/1 {built['first']} False"


# --- word datasets and remote roots ---------------------------------------------------------------


from test_words_chain import tiny_words  # noqa: E402,F401 - the fixture


def test_query_text_on_a_word_dataset(tiny_words):
    assert grove(["run", "tinywords"]) == 0
    root = tiny_words["root"]
    with pytest.raises(api.NotServingError):
        api.open_index("tinywords", root=root)  # built but not promoted
    with api.open_index("tinywords", root=root, version="latest") as index:
        assert (index.kind, index.metric, index.dim) == ("word2vec", "angular", 16)
        hits = index.query_text("chinese river", k=3)
        assert hits.keys[0] == "yangtze" and not {"chinese", "river"} & set(hits.keys)
        assert index.query_text("Chinese RIVER", k=3).keys == hits.keys  # looked up lower-cased too
        vector, exclude = index.text_vector("chinese river")
        assert np.isclose(np.linalg.norm(vector), 1.0) and exclude == {"chinese", "river"}
        assert index.query(vector, k=3, exclude=exclude).keys == hits.keys
        assert index.query_text("chinese river", k=3, exact=True).keys[0] == "yangtze"
        index.compiled = False  # the numpy twins: the same phrase vector and answer
        twin_vector, _ = index.text_vector("chinese river")
        assert twin_vector.tobytes() == vector.tobytes()
        assert index.query_text("chinese river", k=3).distances.tobytes() == hits.distances.tobytes()
        assert index.query_text("chinese river", k=3, exact=True).keys[0] == "yangtze"
        index.compiled = True
        with pytest.raises(api.UnknownKeyError, match="not in the vocabulary: xyzzy"):
            index.query_text("chinese xyzzy")
        assert index.query_key("yangtze", k=1).keys[0] != "yangtze"


@pytest.mark.slow
def test_an_object_store_root(built, s3_root, monkeypatch, tmp_path):
    """The same chain on an S3 root: opened through this machine's verified cache, same answers."""
    for name, value in built["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GROVE_ARTIFACTS", s3_root)
    monkeypatch.setenv("GROVE_SCRATCH", str(tmp_path / "scratch"))
    built["config"].write_text(built["config"].read_text().replace("seed = 1", "seed = 0"))
    luigi.task_register.Register.clear_instance_cache()
    try:
        assert grove(["run", DATASET]) == 0
    finally:
        built["config"].write_text(built["config"].read_text().replace("seed = 0", "seed = 1"))
        luigi.task_register.Register.clear_instance_cache()
    assert grove(["promote", DATASET, built["first"]]) == 0  # same parameters, same digests as the local root
    with api.open_index(DATASET, root=s3_root) as remote, api.open_index(DATASET, root=built["root"]) as local:
        assert remote.version == local.version == built["first"]
        assert remote.query_key("test/3", k=5).keys == local.query_key("test/3", k=5).keys
        assert remote.refresh() is False
        cached = (tmp_path / "scratch").resolve()
        assert any(str(cached) in line for line in Path("/proc/self/maps").read_text().splitlines())
