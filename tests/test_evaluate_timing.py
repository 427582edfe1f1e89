"""Honest numbers in the evaluation: warm-up before timing, the median and spread of repeated passes, strict
JSON (null, never NaN) in results.json, results.parquet and report.json, and evaluate.n_queries = 0."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import evaluate, progress


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as strict parsers (JavaScript's, jq's) do."""
    def refuse(name: str):
        raise ValueError(f"not strict JSON: bare {name}")

    return json.loads(text, parse_constant=refuse)


class SlowFirstCallForest:
    """A forest whose first call of each kind (single, batch) for each search_k takes 0.3 s, as a kernel
    compiled on first use does; later calls are instant. It answers with the true neighbours."""

    n_trees = 2

    def __init__(self, true_dists: np.ndarray):
        self.true_dists = true_dists
        self.compiled: set[tuple[str, int]] = set()
        self.calls = 0

    def _first_call_is_slow(self, kind: str, search_k: int) -> None:
        self.calls += 1
        if (kind, search_k) not in self.compiled:
            self.compiled.add((kind, search_k))
            time.sleep(0.3)

    def query(self, q, k=10, search_k=None):
        self._first_call_is_slow("one", search_k)
        return np.arange(k)

    def query_batch(self, qs, k=10, search_k=None, include_distances=False):
        self._first_call_is_slow("batch", search_k)
        ids = np.tile(np.arange(k), (len(qs), 1))
        return (ids, self.true_dists[: len(qs), :k]) if include_distances else ids


def test_a_slow_first_call_does_not_drag_qps_down_and_rows_carry_the_spread():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(30, 4)).astype(np.float32)
    true_dists = np.sort(rng.random((30, 5)), axis=1).astype(np.float32)
    forest = SlowFirstCallForest(true_dists)
    seen = []
    rows = evaluate.sweep_forest(forest, queries, true_dists, k=5, search_ks=[10, 50], n_timed=20,
                                 progress=lambda d, t, m: seen.append((d, t, m)))
    assert forest.compiled == {(kind, sk) for kind in ("one", "batch") for sk in (10, 50)}  # each one warmed up
    assert [(r["n_trees"], r["search_k"]) for r in rows] == [(2, 10), (2, 50)]
    for r in rows:
        assert r["recall"] == 1.0 and r["repeats"] == evaluate.REPEATS == 5
        assert r["qps_min"] <= r["qps"] <= r["qps_max"]
        assert r["batch_qps_min"] <= r["batch_qps"] <= r["batch_qps_max"]
        # One pass of 20 queries that paid the 0.3 s "compilation" would be at most 67 QPS; no pass did.
        assert r["qps_min"] > 1000 and r["batch_qps_min"] > 1000, r
    assert seen[-1][:2] == (2, 2) and "search_k=50" in seen[-1][2] and "QPS" in seen[-1][2]


def test_the_exact_baseline_is_repeated_and_has_no_batch_figure():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 8)).astype(np.float32)
    queries = rng.normal(size=(12, 8)).astype(np.float32)
    row = evaluate.exact_baseline(base, queries, k=3, metric="angular", n_timed=10, repeats=3)
    assert row["recall"] == 1.0 and row["repeats"] == 3 and row["n_trees"] == 0
    assert 0 < row["qps_min"] <= row["qps"] <= row["qps_max"]
    assert row["batch_qps"] is None and row["batch_qps_min"] is None and row["batch_qps_max"] is None


def test_an_angular_base_of_unit_rows_is_searched_where_it_lies(monkeypatch):
    from pipeline.exact import normalize_rows

    calls = []
    monkeypatch.setattr(evaluate, "normalize_rows", lambda x: calls.append(x.shape) or normalize_rows(x))
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(300, 8)).astype(np.float32)
    raw[7] = 0.0  # a zero row stays zero and counts as normalised
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    evaluate.exact_baseline(normalize_rows(raw), queries, k=3, metric="angular", n_timed=5, repeats=1)
    assert calls == []  # no copy of a base that already has unit rows (3.6 GB at 3M x 300)
    evaluate.exact_baseline(raw, queries, k=3, metric="angular", n_timed=5, repeats=1)
    assert calls == [(300, 8)]  # any other base is normalised once


def test_exact_search_is_timed_on_fewer_queries_over_a_large_base():
    from pipeline import stages
    from pipeline.config import load_config

    assert evaluate.exact_timed_count(1000, 59_000) == 200  # MNIST, GloVe: the cap, as before
    assert evaluate.exact_timed_count(1000, 399_000) == 200
    assert evaluate.exact_timed_count(1000, 2_999_000) == 26  # 80M rows scanned per pass
    assert evaluate.exact_timed_count(1000, 10**9) == evaluate.EXACT_TIMED_MIN
    assert evaluate.exact_timed_count(5, 10**9) == 5 and evaluate.exact_timed_count(60, None) == 60
    cfg = load_config("mnist")
    small = stages.stage_params(cfg, "evaluate", n_queries_available=1000, n_base=59_000)
    assert small == stages.stage_params(cfg, "evaluate", n_queries_available=1000)  # digests kept
    assert stages.stage_params(cfg, "evaluate", n_queries_available=1000, n_base=2_999_000)["n_timed_exact"] == 26


def test_non_finite_numbers_become_null():
    value = {"a": float("nan"), "b": [1.5, float("inf"), np.float32("-inf"), np.float64(2.0)], "c": (np.int64(3),),
             "d": "NaN"}
    clean = evaluate.finite_or_none(value)
    assert clean == {"a": None, "b": [1.5, None, None, 2.0], "c": [3], "d": "NaN"}
    assert strict_json(json.dumps(clean, allow_nan=False)) == clean
    assert evaluate.spread_percent({"qps": 100.0, "qps_min": 90.0, "qps_max": 110.0}) == pytest.approx(10.0)
    assert evaluate.spread_percent({"qps": 100.0}) is None  # results written before spreads were stored
    assert evaluate.spread_percent({"batch_qps": None, "batch_qps_min": None, "batch_qps_max": None},
                                   "batch_qps") is None


def test_a_tiny_chain_writes_strict_results_shows_the_spread_and_progress(tiny_mnist, caplog, tmp_path,
                                                                           monkeypatch):
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    import tasks
    from pipeline import stages
    from pipeline.config import load_config

    caplog.set_level(logging.INFO, logger="grove.progress")
    progress.configure("log", interval=0)
    try:
        result = luigi.build([tasks.Chain(dataset="tinymnist")], local_scheduler=True, workers=1,
                             detailed_summary=True)
    finally:
        progress.configure("off")
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text

    # progress from every long step reached the (non-terminal) log
    lines = [r.getMessage() for r in caplog.records if r.name == "grove.progress"]
    for name in ("Fetch(tinymnist)", "Embed(tinymnist)", "Split(tinymnist)", "Exact(tinymnist)"):
        assert any(line.startswith(f"{name} done in ") for line in lines), (name, lines)
    assert any(line.startswith("Fetch(tinymnist) ") and " MB" in line for line in lines)
    assert any(line.startswith("Exact(tinymnist) ") and "queries/s, ETA" in line for line in lines)
    assert any(line.startswith("Evaluate(tinymnist) ") and "n_trees=4 search_k=2000" in line and "settings done, ETA"
               in line for line in lines)

    root = tiny_mnist["root"] / "tinymnist"
    evaluated = root / "evaluate" / "latest"
    strict_json((evaluated / "results.json").read_text())
    strict_json((evaluated / "timings.json").read_text())
    results = stages.read_results(evaluated)
    assert results["n_timed"] == 20 and results["repeats"] == 5 and results["n_timed_exact"] == 20
    forest_rows = [r for r in results["rows"] if r["method"] == "forest"]
    exact_row = next(r for r in results["rows"] if r["method"] == "exact")
    assert len(forest_rows) == 6
    for r in forest_rows + [exact_row]:
        assert r["qps_min"] <= r["qps"] <= r["qps_max"] and r["repeats"] == 5
    assert all(r["batch_qps_min"] <= r["batch_qps"] <= r["batch_qps_max"] for r in forest_rows)
    assert exact_row["batch_qps"] is None and exact_row["batch_qps_max"] is None
    table = pq.read_table(evaluated / "results.parquet")
    assert table.column("batch_qps").null_count == 1  # the exact row: null, not NaN
    assert not np.isnan(table.column("batch_qps").to_numpy(zero_copy_only=False).astype(float)[:-1]).any()
    strict_json((evaluated / "report.json").read_text())
    page = (evaluated / "report.html").read_text()
    assert "QPS spread" in page and "±" in page

    text = stages.format_results(results["rows"], results["k"])
    assert text.splitlines()[0].split() == ["method", "n_trees", "search_k", "recall@10", "QPS", "spread", "batch",
                                            "QPS", "spread"]
    exact_line = text.splitlines()[-1].split()
    assert exact_line[0] == "exact" and exact_line[-2:] == ["-", "-"] and exact_line[5].startswith("±")

    # evaluate.n_queries = 0 times every query
    cfg = load_config("tinymnist", str(tiny_mnist["configs"])).with_values({"evaluate.n_queries": 0})
    out = tmp_path / "evaluate0"
    out.mkdir()
    forest = sorted((root / "forest").glob("v*"))[0]
    n_trees = json.loads((forest / "manifest.json").read_text())["params"]["n_trees"]
    stages.write_evaluate(cfg, root / "embed" / "latest", root / "split" / "latest", root / "exact" / "latest",
                          {n_trees: forest}, out)
    strict_json((out / "timings.json").read_text())
    again = stages.read_results(out)
    assert again["n_queries"] == 60 and again["n_timed"] == 60 and again["n_timed_exact"] == 60

    # each index is unmapped before the next is opened: at most one is in memory at a time
    import gc
    import weakref

    from pipeline.forest import Forest

    opened, alive_at_open = [], []
    real_load = Forest.load.__func__

    def load(cls, *args, **kwargs):
        gc.collect()
        alive_at_open.append(sum(ref() is not None for ref in opened))
        forest = real_load(cls, *args, **kwargs)
        opened.append(weakref.ref(forest))
        return forest

    monkeypatch.setattr(Forest, "load", classmethod(load))
    forests = {json.loads((f / "manifest.json").read_text())["params"]["n_trees"]: f
               for f in sorted((root / "forest").glob("v*"))}
    assert len(forests) >= 2
    out2 = tmp_path / "evaluate-released"
    out2.mkdir()
    stages.write_evaluate(cfg, root / "embed" / "latest", root / "split" / "latest", root / "exact" / "latest",
                          forests, out2)
    assert len(opened) == len(forests) and alive_at_open == [0] * len(forests)
