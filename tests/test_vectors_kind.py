"""The `vectors` dataset kind: a user's own vectors as Parquet, Arrow IPC or .npy plus ids, with or
without their own queries and labels, built end to end by `grove run`, queried by key through
`grove query` and `pipeline.open_index`, and every bad input the user can give shown as they see it:
a config error (exit 2, before any work) or a FormatError of the Decode task naming the file (exit 1).
The input files are written here with pyarrow and numpy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import luigi.task_register
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import api, artifacts, layout
from pipeline.config import load_config_file
from pipeline.errors import FormatError
from pipeline.formats.vectors_file import open_vector_file
from pipeline.vectors import read_vectors
from tasks.cli import main as grove

DIM = 8
CLASSES = ("cat", "dog", "eel")


def clusters(n: int, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float64 points around three well-separated centres, and their (n,) cluster numbers."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 10, size=(3, dim))
    labels = rng.integers(0, 3, size=n)
    return centres[labels] + rng.normal(0, 1, size=(n, dim)), labels


def write_parquet(path: Path, columns: dict, row_group_size: int = 64) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_arrow(path: Path, columns: dict, chunk: int = 50) -> Path:
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return path


def vector_list(vectors: np.ndarray, value_type=pa.float64()) -> pa.Array:
    return pa.array([list(map(float, row)) for row in vectors], type=pa.list_(value_type))


def fixed_list(vectors: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), vectors.shape[1])


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A configs directory (GROVE_CONFIGS), a data directory the configs point at with file:// URLs,
    and a fresh artifact root (GROVE_ARTIFACTS); no mirror."""
    configs, data, root = tmp_path / "configs", tmp_path / "data", tmp_path / "artifacts"
    configs.mkdir()
    data.mkdir()
    monkeypatch.delenv("GROVE_MIRROR", raising=False)
    monkeypatch.setenv("GROVE_CONFIGS", str(configs))
    monkeypatch.setenv("GROVE_ARTIFACTS", str(root))
    monkeypatch.setenv("GROVE_THREADS", "2")
    luigi.task_register.Register.clear_instance_cache()
    yield {"configs": configs, "data": data, "root": root}
    luigi.task_register.Register.clear_instance_cache()


def _toml(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_config(env: dict, name: str, sources: dict[str, Path], decode: dict, **tables: dict) -> Path:
    """configs/<name>.toml of kind vectors: each source a file:// URL with its sha256; ``tables``
    (``embed={...}``...) override the small defaults below."""
    defaults = {"embed": {"model": "raw", "metric": "euclidean"}, "split": {"method": "column"},
                "exact": {"k": 20}, "forest": {"n_trees": [2, 4], "leaf_size": 16, "seed": 0},
                "evaluate": {"k": 10, "search_k": [10, 50, 2000], "n_queries": 20}}
    lines = ["[dataset]", f'name = "{name}"', 'kind = "vectors"', ""]
    for source, path in sources.items():
        lines += [f"[sources.{source}]", f'filename = "{path.name}"',
                  f'sha256 = "{hashlib.sha256(path.read_bytes()).hexdigest()}"', f'urls = ["{path.as_uri()}"]', ""]
    for table, values in [("decode", decode), *{**defaults, **tables}.items()]:
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    path = env["configs"] / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def evaluation(env: dict, name: str) -> Path:
    version = artifacts.read_pointer(env["root"] / name / "evaluate")
    return artifacts.version_dir(env["root"], f"{name}/evaluate/{version}")


def split_of(env: dict, name: str) -> tuple:
    manifest = json.loads((evaluation(env, name) / "manifest.json").read_text())
    split = artifacts.version_dir(env["root"], manifest["parents"]["split"])
    return read_vectors(split / layout.BASE), read_vectors(split / layout.QUERIES)


def brute_force(base: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    d = ((base.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    return list(np.argsort(d, kind="stable")[:k])


# --- end to end ----------------------------------------------------------------------------------


def test_parquet_with_own_queries_and_string_labels(env, capsys):
    base, base_labels = clusters(240, seed=1)
    queries, query_labels = clusters(30, seed=2)
    items = write_parquet(env["data"] / "items.parquet", {
        "id": pa.array([f"item-{i}" for i in range(240)]), "embedding": vector_list(base),
        "category": pa.array([CLASSES[c] for c in base_labels])})
    q = write_parquet(env["data"] / "q.parquet", {
        "id": pa.array([f"q-{i}" for i in range(30)]), "embedding": vector_list(queries, pa.float32()),
        "category": pa.array([CLASSES[c] for c in query_labels])})
    write_config(env, "my-items", {"items": items, "q": q},
                 {"vectors": "items", "queries": "q", "key_column": "id", "vector_column": "embedding",
                  "label_column": "category"}, embed={"model": "raw", "metric": "euclidean", "scale": 2.0})
    assert grove(["run", "my-items"]) == 0
    capsys.readouterr()

    split_base, split_queries = split_of(env, "my-items")
    # the user's query file is the queries, every one of them, and the vectors are the base (times scale)
    assert split_queries.keys == [f"q-{i}" for i in range(30)]
    assert split_base.keys == [f"item-{i}" for i in range(240)]
    np.testing.assert_array_equal(split_base.vectors, base.astype(np.float32) * np.float32(2.0))
    assert list(split_base.labels) == list(base_labels)  # cat, dog, eel numbered in sorted order
    assert json.loads(split_base.meta["classes"]) == list(CLASSES)
    results = json.loads((evaluation(env, "my-items") / "results.json").read_text())
    assert results["n_queries"] == 30
    assert set(results["quality"]) == {"label_precision_at_10"} and results["quality"]["label_precision_at_10"] > 0.9
    html = (evaluation(env, "my-items") / "report.html").read_text()
    assert '<section id="quality">' in html and "label precision at 10" in html

    # grove query by key: the neighbours of item-5, itself left out, approximate and exact
    assert grove(["query", "my-items", "item-5", "-k", "3", "--search-k", "5000"]) == 0
    out = capsys.readouterr().out
    want = [f"item-{i}" for i in brute_force(base, base[5], 4)[1:]]
    assert [line.split()[1] for line in out.splitlines()[2:5]] == want, out
    # the Python API: an indexed key and one of the user's queries
    with api.open_index("my-items", root=env["root"], version="latest") as index:
        assert index.kind == "vectors" and index.dim == DIM and index.count == 240
        assert index.query_key("item-5", k=3, search_k=5000).keys == want
        hits = index.query_key("q-7", k=5, exact=True)
        assert hits.keys == [f"item-{i}" for i in brute_force(base, queries[7], 5)]
        assert index.held_out_keys()[7] == "q-7"


def test_arrow_without_queries_or_labels_holds_out_and_has_no_quality_section(env, capsys):
    base, _ = clusters(200, seed=3)
    items = write_arrow(env["data"] / "items.arrow", {"key": pa.array(np.arange(1000, 1200)),
                                                      "vector": fixed_list(base)})
    write_config(env, "plain", {"items": items}, {"vectors": "items"},
                 split={"method": "holdout", "n_queries": 20, "seed": 0})
    assert grove(["run", "plain"]) == 0
    capsys.readouterr()
    split_base, split_queries = split_of(env, "plain")
    assert len(split_base) == 180 and len(split_queries) == 20
    assert (split_base.labels == -1).all() and set(split_base.keys) | set(split_queries.keys) == {
        str(k) for k in range(1000, 1200)}  # integer keys, stored as strings
    ev = evaluation(env, "plain")
    assert json.loads((ev / "results.json").read_text())["quality"] == {}
    assert json.loads((ev / "report.json").read_text())["quality"] is None
    html = (ev / "report.html").read_text()
    assert "Embedding quality" not in html and 'href="#quality"' not in html
    with api.open_index("plain", root=env["root"], version="latest") as index:
        key = split_base.keys[10]
        row = int(key) - 1000
        hits = index.query_key(key, k=4, exact=True)
        keys = [str(1000 + i) for i in brute_force(base, base[row], 5) if 1000 + i != int(key)]
        assert hits.keys == [k for k in keys if k in set(split_base.keys)][:4]
        assert split_queries.keys[0] in index.held_out_keys()


def test_npy_with_ids_normalized_and_queries_without_labels(env, capsys):
    base, labels = clusters(150, seed=4)
    queries, _ = clusters(25, seed=5)
    np.save(env["data"] / "items.npy", base.astype(np.float16))
    ids = write_parquet(env["data"] / "items-ids.parquet", {"name": pa.array([f"w{i}" for i in range(150)]),
                                                            "label": pa.array(labels)})
    np.save(env["data"] / "q.npy", queries)
    (env["data"] / "q-ids.txt").write_text("".join(f"query {i}\r\n" for i in range(25)), encoding="utf-8")
    write_config(env, "npy-items", {"items": env["data"] / "items.npy", "ids": ids, "q": env["data"] / "q.npy",
                                    "qids": env["data"] / "q-ids.txt"},
                 {"vectors": "items", "ids": "ids", "queries": "q", "query_ids": "qids", "key_column": "name",
                  "label_column": "label"}, embed={"model": "normalized", "metric": "angular"})
    assert grove(["run", "npy-items"]) == 0
    capsys.readouterr()
    split_base, split_queries = split_of(env, "npy-items")
    assert split_queries.keys[:2] == ["query 0", "query 1"] and list(split_base.labels) == list(labels)
    np.testing.assert_allclose(np.linalg.norm(split_base.vectors, axis=1), 1.0, rtol=1e-5)
    # the base is labelled but the queries are not: label precision does not apply, and is left out
    assert json.loads((evaluation(env, "npy-items") / "results.json").read_text())["quality"] == {}
    assert grove(["query", "npy-items", "query 3", "-k", "2"]) == 0
    assert "query 3" in capsys.readouterr().out
    with api.open_index("npy-items", root=env["root"], version="latest") as index:
        assert index.metric == "angular" and len(index.query_key("w3", k=5)) == 5


# --- errors the user sees --------------------------------------------------------------------------


def _items(env, n=40, name="items.parquet", **columns) -> Path:
    base, _ = clusters(n, seed=7)
    default = {"key": pa.array([f"k{i}" for i in range(n)]), "vector": vector_list(base)}
    return write_parquet(env["data"] / name, {**default, **columns})


def _config_errors(env):
    items = _items(env)
    q = _items(env, 10, "q.parquet", key=pa.array([f"q{i}" for i in range(10)]))
    np.save(env["data"] / "m.npy", np.zeros((3, 2), np.float32))
    npy = env["data"] / "m.npy"
    holdout = {"split": {"method": "holdout", "n_queries": 5}}
    return {
        "queries need a column split": ({"items": items, "q": q}, {"vectors": "items", "queries": "q"}, holdout,
                                        "decode.queries = 'q' gives the queries, but split.method = 'holdout'"),
        "no queries need a holdout split": ({"items": items}, {"vectors": "items"}, {},
                                            "split.method = 'column' needs queries, and decode.queries is not set"),
        "no cnn": ({"items": items}, {"vectors": "items"}, {**holdout, "embed": {"model": "cnn", "metric": "angular"}},
                   "embed.model = 'cnn' is not allowed for a vectors dataset"),
        "no pixels": ({"items": items}, {"vectors": "items"}, {**holdout, "embed": {"metric": "euclidean"}},
                      "embed.model = 'pixels' is not allowed for a vectors dataset (it needs images; it is the "
                      "default)"),
        "vectors source exists": ({"items": items}, {"vectors": "itemz"}, holdout,
                                  "decode.vectors = 'itemz' is not a source; sources: items"),
        "queries source exists": ({"items": items}, {"vectors": "items", "queries": "qq"}, {},
                                  "decode.queries = 'qq' is not a source"),
        "npy needs ids": ({"m": npy}, {"vectors": "m"}, holdout,
                          "decode.vectors = 'm' is a .npy matrix (m.npy), which holds no keys: name a source with "
                          "its keys in decode.ids"),
        "ids only for npy": ({"items": items, "q": q}, {"vectors": "items", "ids": "q"}, holdout,
                             "decode.ids = 'q' is only for a .npy vectors source"),
        "distinct columns": ({"items": items}, {"vectors": "items", "key_column": "vector"}, holdout,
                             "decode.key_column and decode.vector_column are both 'vector'"),
        "unknown decode key": ({"items": items}, {"vectors": "items", "words": "items"}, holdout,
                               "unknown key decode.words"),
    }


CONFIG_CASES = ["queries need a column split", "no queries need a holdout split", "no cnn", "no pixels",
                "vectors source exists", "queries source exists", "npy needs ids", "ids only for npy",
                "distinct columns", "unknown decode key"]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_errors_exit_2_before_any_work(env, capsys, case):
    sources, decode, tables, message = _config_errors(env)[case]
    path = write_config(env, "bad", sources, decode, **tables)
    assert grove(["run", "bad"]) == 2
    err = capsys.readouterr().err
    assert f"grove: config error: {path}: {message}" in err, err
    assert not env["root"].exists()


def _bad_input(env, case: str) -> tuple:
    """The files and config of one bad input: (sources, decode, split table, what the FAILED line says)."""
    base, _ = clusters(40, seed=7)
    holdout = {"method": "holdout", "n_queries": 5}
    ragged = [list(map(float, row)) for row in base]
    ragged[17] = ragged[17][:5]
    nulls = [list(map(float, row)) for row in base]
    nulls[9] = None
    nan = base.copy()
    nan[[4, 30], 2] = np.nan
    nan[33, 0] = np.inf
    dup = [f"k{i}" for i in range(40)]
    dup[25] = "k3"
    data = env["data"]
    npy = {"v": data / "v.npy", "ids": data / "ids.txt"}
    if case in ("non-utf8 ids line", "ids do not match"):
        np.save(data / "v.npy", base.astype(np.float32))
        (data / "ids.txt").write_bytes(b"".join(b"w%d\n" % i for i in range(39)) + b"caf\xe9\n"
                                       if case == "non-utf8 ids line" else b"".join(b"w%d\n" % i for i in range(39)))
    cases = {
        "missing column": lambda: (_items(env), {"vectors": "items", "vector_column": "embedding"},
                                   "items.parquet: no column 'embedding' (the vectors); its columns are 'key', "
                                   "'vector': name the right one in decode.vector_column"),
        "ragged": lambda: (_items(env, vector=pa.array(ragged, type=pa.list_(pa.float64()))), {"vectors": "items"},
                           "the vectors in column 'vector' are ragged: key 'k17' has 5 values, the first vector 8"),
        "null vector": lambda: (_items(env, vector=pa.array(nulls, type=pa.list_(pa.float64()))),
                                {"vectors": "items"}, "the vector of key 'k9' in column 'vector' is null"),
        "not numeric": lambda: (_items(env, vector=pa.array([["a", "b"]] * 40)), {"vectors": "items"},
                                "the vector column 'vector' holds string values, which are not numeric"),
        "not a list": lambda: (_items(env, vector=pa.array(np.arange(40.0))), {"vectors": "items"},
                               "the vector column 'vector' has type double, expected a list or fixed-size list"),
        "nan and inf": lambda: (_items(env, vector=vector_list(nan)), {"vectors": "items"},
                                "3 vector(s) in column 'vector' hold NaN or infinity (the first: key 'k4')"),
        "duplicate key": lambda: (_items(env, key=pa.array(dup)), {"vectors": "items"},
                                  "the key 'k3' occurs twice in column 'key' (the first repeated key)"),
        "empty file": lambda: (_items(env, 0, key=pa.array([], pa.string()),
                                      vector=pa.array([], pa.list_(pa.float32()))),
                               {"vectors": "items"}, "items.parquet: holds no rows; expected at least one vector"),
        "null key": lambda: (_items(env, key=pa.array([None] + [f"k{i}" for i in range(1, 40)])), {"vectors": "items"},
                             "the key column 'key' is null at row 0"),
        "non-utf8 key": lambda: (_items(env, key=pa.array([b"k%d" % i for i in range(39)] + [b"\xff\xfe"])),
                                 {"vectors": "items"},
                                 "the key at row 39 of column 'key' (b'\\xff\\xfe') is not valid UTF-8"),
        "non-utf8 ids line": lambda: (npy, {"vectors": "v", "ids": "ids"},
                                      "ids.txt: the key on line 40 (b'caf\\xe9') is not valid UTF-8"),
        "ids do not match": lambda: (npy, {"vectors": "v", "ids": "ids"}, "ids.txt holds 39 keys but"),
        "bad label": lambda: (_items(env, label=pa.array([-3] + [0] * 39)),
                              {"vectors": "items", "label_column": "label"},
                              "the label of key 'k0' in column 'label' is -3"),
    }
    if case == "query dimension":
        q = write_parquet(data / "q.parquet", {"key": pa.array(["q0", "q1"]),
                                               "vector": vector_list(np.zeros((2, DIM + 1)))})
        return ({"items": _items(env), "q": q}, {"vectors": "items", "queries": "q"}, {"method": "column"},
                "q.parquet: the query vectors have dimension 9 but the vectors (items.parquet) have 8")
    if case == "query key also a base key":
        q = write_parquet(data / "q2.parquet", {"key": pa.array(["q0", "k5"]), "vector": vector_list(base[:2])})
        return ({"items": _items(env), "q": q}, {"vectors": "items", "queries": "q"}, {"method": "column"},
                "q2.parquet: the key 'k5' in column 'key' is also a key of items.parquet")
    src, decode, message = cases[case]()
    return (src if isinstance(src, dict) else {"items": src}), decode, holdout, message


BAD_INPUTS = ["missing column", "ragged", "null vector", "not numeric", "not a list", "nan and inf", "duplicate key",
              "empty file", "null key", "non-utf8 key", "non-utf8 ids line", "ids do not match", "bad label",
              "query dimension", "query key also a base key"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_decode_naming_file_column_and_fix(env, capsys, case):
    sources, decode, split, message = _bad_input(env, case)
    path = write_config(env, "bad", sources, decode, split=split)
    assert grove(["run", "bad"]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1 and failed[0].startswith("FAILED Decode(dataset=bad): FormatError: "), err
    assert message in failed[0], failed[0]
    key = "queries" if "queries" in decode and case.startswith("query") else "vectors"
    # where the file comes from in the config, and that its checksum must follow the fixed file
    assert f"decode.{key} = {decode[key]!r}: sources.{decode[key]}" in failed[0] and str(path) in failed[0]
    assert "put its new sha256 in sources." in failed[0]
    assert not list((env["root"] / "bad" / "decode").glob("v*-*"))  # nothing half-written is published


# --- the reader on its own -------------------------------------------------------------------------


def test_reader_formats_agree_and_stream_in_batches(tmp_path):
    base, labels = clusters(100, seed=8)
    keys = [f"k{i}" for i in range(100)]
    string_labels = pa.array([CLASSES[c] for c in labels]).dictionary_encode()
    write_parquet(tmp_path / "a.parquet", {"key": pa.array(keys), "vector": vector_list(base), "label": string_labels},
                  row_group_size=7)
    write_arrow(tmp_path / "b.arrow", {"key": pa.array(keys), "vector": fixed_list(base), "label": string_labels})
    table = pa.table({"key": pa.array(keys), "vector": vector_list(base.astype(np.float16), pa.float16()),
                      "label": string_labels})
    with pa.OSFile(str(tmp_path / "c.arrows"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=30)
    np.save(tmp_path / "d.npy", base)
    write_arrow(tmp_path / "d-ids.arrow", {"key": pa.array(keys), "label": string_labels})
    for name, ids, tolerance in (("a.parquet", None, 0), ("b.arrow", None, 0), ("c.arrows", None, 1e-2),
                                 ("d.npy", "d-ids.arrow", 0)):
        f = open_vector_file(tmp_path / name, label_column="label",
                             ids_path=None if ids is None else tmp_path / ids)
        assert f.dim == DIM and f.n_rows == (None if name == "c.arrows" else 100), name
        classes = sorted(f.string_labels())
        assert classes == list(CLASSES)
        batches = list(f.batches(classes, batch_rows=16))
        assert max(len(b[1]) for b in batches) <= 16 and len(batches) >= 7
        vectors = np.concatenate([b[0] for b in batches])
        assert vectors.dtype == np.float32 and [k for b in batches for k in b[1]] == keys
        np.testing.assert_allclose(vectors, base.astype(np.float32), rtol=tolerance, atol=tolerance)
        assert list(np.concatenate([b[2] for b in batches])) == list(labels)


def test_reader_integer_labels_nulls_and_text_ids(tmp_path):
    base, _ = clusters(5, seed=9)
    write_parquet(tmp_path / "a.parquet", {"key": pa.array([10, 11, 12, 13, 14], pa.uint32()),
                                           "vector": vector_list(base), "label": pa.array([3, None, 0, 7, 1])})
    f = open_vector_file(tmp_path / "a.parquet", label_column="label")
    assert f.label_kind == "int" and f.string_labels() == set()
    ((vectors, keys, labels),) = list(f.batches())
    assert keys == ["10", "11", "12", "13", "14"] and list(labels) == [3, -1, 0, 7, 1]
    np.save(tmp_path / "v.npy", base)
    (tmp_path / "ids.txt").write_bytes("\ufeffa\nb\n\u00e9t\u00e9\nd\ne".encode())  # BOM, no final newline
    ((_, keys, labels),) = list(open_vector_file(tmp_path / "v.npy", ids_path=tmp_path / "ids.txt").batches())
    assert keys == ["a", "b", "été", "d", "e"] and labels is None
    (tmp_path / "blank.txt").write_text("a\n\nc\nd\ne\n")
    with pytest.raises(FormatError, match=r"blank.txt: line 2 is blank"):
        open_vector_file(tmp_path / "v.npy", ids_path=tmp_path / "blank.txt")
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(FormatError, match="is not a Parquet, Arrow IPC or .npy file"):
        open_vector_file(tmp_path / "junk.bin")
    with pytest.raises(FormatError, match=r"is a \.npy matrix, which holds no keys"):
        open_vector_file(tmp_path / "v.npy")
    # a query file without the label column reads as unlabelled; the base file must have it
    write_parquet(tmp_path / "q.parquet", {"key": pa.array(["q"]), "vector": vector_list(base[:1])})
    assert open_vector_file(tmp_path / "q.parquet", label_column="label", need_labels=False).label_kind is None
    with pytest.raises(FormatError, match=r"no column 'label' \(the labels\)"):
        open_vector_file(tmp_path / "q.parquet", label_column="label")


def test_example_config_validates():
    cfg = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "example-vectors.toml")
    assert cfg.kind == "vectors" and cfg.decode.ids and cfg.split.method == "holdout"
