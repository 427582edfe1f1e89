"""The curse-of-dimensionality measures, the evaluation report and the index page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.artifacts import make_ref, publish, set_pointer
from pipeline.curse import (
    contrast_ratio,
    contrast_ratios,
    curve_position,
    dataset_contrast,
    equivalent_dimension,
    normal_curve,
)
from pipeline.errors import ConfigError
from pipeline.exact import exact_neighbors
from pipeline.report import (
    build_evaluation_report,
    lineage_from_manifests,
    pareto_frontier,
    scan_evaluations,
    write_evaluation_report,
    write_index_page,
)
from pipeline.vectors import write_vectors

# --- curse of dimensionality -------------------------------------------------------------------------


def test_contrast_ratio_of_hand_placed_points_ignores_exact_duplicates():
    base = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], dtype=np.float32)
    # nearest distinct point at 1, farthest at 10; the duplicate at distance 0 is not the nearest
    assert contrast_ratio(base, np.zeros((1, 2), np.float32)) == pytest.approx(9.0)
    assert contrast_ratio(base, np.zeros((1, 2), np.float32), "manhattan") == pytest.approx(13.0)
    # a query at (0, 1): nearest distinct (0, 0) at 1, farthest (6, 8) at sqrt(85)
    assert contrast_ratio(base, np.array([[0.0, 1.0]])) == pytest.approx(np.sqrt(85.0) - 1.0)


def test_tiny_distances_in_one_dimension_are_exact():
    # 200 points 2^-10 apart next to norms of 1e3: ||q||^2 + ||b||^2 - 2<q, b> in float32 cannot even
    # rank them (it gives a ratio of 1); exact in float32 input, so the true ratio is (200 - 1) / 1.
    gap = 2.0**-10
    base = (1000.0 + gap * np.arange(1, 201)).astype(np.float32)[:, None]
    assert contrast_ratios(base, np.array([[1000.0]], dtype=np.float32))[0] == pytest.approx(199.0)


def test_a_query_with_only_duplicates_is_skipped_not_infinite():
    base = np.ones((5, 3), dtype=np.float32)
    base[4] = 2.0
    ratios = contrast_ratios(base[:4], np.ones((1, 3)))
    assert np.isnan(ratios).all()
    assert np.isfinite(contrast_ratio(base, np.ones((2, 3))))


def test_dot_is_refused_and_angular_ignores_scale():
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with pytest.raises(ConfigError):
        contrast_ratio(x, x[:3], "dot")
    a = dataset_contrast(x, sample=200, n_queries=20, metric="angular", curve=[(1, 100.0), (64, 0.1)])
    b = dataset_contrast(7.0 * x, sample=200, n_queries=20, metric="angular", curve=[(1, 100.0), (64, 0.1)])
    assert a.ratio == pytest.approx(b.ratio, rel=1e-5)


def test_normal_curve_falls_with_dimension():
    curve = normal_curve(dims=(1, 2, 4, 8, 16, 32, 64, 128), n_points=2000, n_queries=50)
    ratios = [r for _, r in curve]
    assert [d for d, _ in curve] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] < 1.0 < ratios[3]


def test_ratio_falls_with_dimension_for_uniform_data_too():
    rng = np.random.default_rng(3)
    ratios = [contrast_ratio(rng.uniform(size=(2000, d)), rng.uniform(size=(50, d))) for d in (2, 8, 32, 128)]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios


@pytest.mark.parametrize("dim", [4, 8, 16, 32])
def test_normal_data_has_its_own_dimension_as_equivalent_dimension(dim):
    # Measured over 6 seeds each: equivalent dimensions within 9% of d (e.g. 7.9..8.7 for d=8);
    # 20% still tells d from its neighbours d/2 and 2d on the curve's grid.
    curve = normal_curve(dims=(1, 2, 4, 8, 16, 32, 64), n_points=2000, n_queries=100, seed=5)
    x = np.random.default_rng(100 + dim).standard_normal((2100, dim)).astype(np.float32)
    result = dataset_contrast(x, sample=2000, n_queries=100, seed=11, curve=curve)
    assert result.clamped is None
    assert result.equivalent_dimension == pytest.approx(dim, rel=0.2)


def test_equivalent_dimension_interpolates_in_log_space_and_clamps():
    curve = [(1, 100.0), (4, 10.0), (16, 1.0)]
    assert equivalent_dimension(10.0, curve) == pytest.approx(4.0)
    assert equivalent_dimension(10.0**0.5, curve) == pytest.approx(8.0)
    assert equivalent_dimension(1000.0, curve) == 1.0 and curve_position(1000.0, curve) == "below_range"
    assert equivalent_dimension(0.1, curve) == 16.0 and curve_position(0.1, curve) == "above_range"
    assert curve_position(5.0, curve) is None


# --- a tiny evaluated run on disk ----------------------------------------------------------------------

DIGITS = np.array([
    [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0],  # a ring: "0"
    [0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0],  # a bar: "1"
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1],  # "2"
], dtype=np.float32) * 255.0


def _results(n_trees_list=(2, 4), scale=1.0) -> dict:
    rows = []
    for n_trees in n_trees_list:
        for search_k, recall in ((10, 0.5), (40, 0.8), (160, 0.97)):
            rows.append({"method": "forest", "n_trees": n_trees, "search_k": search_k,
                         "recall": min(1.0, recall + 0.01 * n_trees), "qps": scale * 4000.0 / search_k * n_trees,
                         "batch_qps": 9000.0 / search_k, "build_seconds": 0.1 * n_trees, "index_bytes": 20000})
    rows.append({"method": "exact", "n_trees": 0, "search_k": 0, "recall": 1.0, "qps": 12.0,
                 "batch_qps": float("nan"), "build_seconds": 0.0, "index_bytes": 9600})
    return {"k": 10, "n_queries": 20, "n_timed": 20, "metric": "euclidean", "rows": rows}


def make_run(root: Path, dataset: str = "tiny", n_trees_list=(2, 4), scale: float = 1.0) -> Path:
    """Publish split/exact/forest/evaluate artifacts of a 16-pixel, 3-class image dataset; return the
    evaluate directory."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=170)
    vectors = np.clip(DIGITS[labels] + rng.normal(0, 40, size=(170, 16)), 0, 255).astype(np.float32)
    meta = {"image_shape": "[4, 4]", "metric": "euclidean"}

    def write_split(out: Path):
        write_vectors(out / "base.arrow", vectors[:150], [f"train/{i}" for i in range(150)], labels[:150], meta=meta)
        write_vectors(out / "queries.arrow", vectors[150:], [f"test/{i}" for i in range(20)], labels[150:], meta=meta)
        return {"rows": {"base": 150, "queries": 20}}

    split = make_ref(root, dataset, "split", 1, {"seed": 0}, {})
    publish(split, write_split, {"seed": 0}, {})

    def write_exact(out: Path):
        ids, dists = exact_neighbors(vectors[:150], vectors[150:], 20)
        np.save(out / "neighbors.npy", ids)
        np.save(out / "distances.npy", dists)

    exact = make_ref(root, dataset, "exact", 1, {"k": 20}, {"split": split})
    publish(exact, write_exact, {"k": 20}, {"split": split})
    parents = {"split": split, "exact": exact}
    for n_trees in n_trees_list:
        ref = make_ref(root, dataset, "forest", 1, {"n_trees": n_trees}, {"split": split})
        publish(ref, lambda out: {"metrics": {"build_seconds": 0.1}}, {"n_trees": n_trees}, {"split": split})
        parents[f"forest_{n_trees}"] = ref
    params = {"k": 10, "search_k": [10, 40, 160], "n_trees": list(n_trees_list)}
    ev = make_ref(root, dataset, "evaluate", 1, params, parents)
    publish(ev, lambda out: (out / "results.json").write_text(json.dumps(_results(n_trees_list, scale))) and None,
            params, parents)
    return ev.path


def embedded_images(page: str) -> list[bytes]:
    """Every <img>'s PNG bytes; fails if an image is not an embedded PNG data URI."""
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs and len(srcs) == page.count("<img")
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def assert_decodes_as_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 100 and im.height > 100
        return im.size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    return root, make_run(root)


@pytest.fixture(scope="module")
def curve():
    return normal_curve(dims=(1, 2, 4, 8, 16, 32, 64), n_points=150, n_queries=50)


def test_report_of_a_tiny_run_has_every_section_and_only_embedded_pngs(run, curve, tmp_path):
    root, ev = run
    path = build_evaluation_report(root, ev, tmp_path, curve=curve)
    page = path.read_text(encoding="utf-8")
    for section in ("summary", "recall", "neighbours", "curse", "lineage"):
        assert f'<section id="{section}">' in page and f'href="#{section}"' in page, section
    assert "$" not in re.sub(r"data:[^\"]*", "", page), "an unfilled template placeholder"
    images = embedded_images(page)
    assert len(images) == 3  # recall/QPS, neighbours, curse
    for data in images:
        assert_decodes_as_png(data)
    # the results table has one row per result; the Pareto frontier is marked
    results = json.loads((ev / "results.json").read_text())
    table = page.split('<section id="recall">')[1].split("</section>")[0]
    assert table.count("<tr") == len(results["rows"]) + 1
    assert table.count('class="pareto"') == len(pareto_frontier(results["rows"])) > 0
    # neighbours: the caption counts the shown neighbours that share the query's label
    m = re.search(r"(\d+) of (\d+) neighbours shown share the query's label", page)
    assert m and int(m.group(2)) == 8 * 10 and 0 < int(m.group(1)) <= 80
    # curse: the dataset's equivalent normal dimension is in the table and in report.json
    sidecar = json.loads((tmp_path / "report.json").read_text())
    eq = sidecar["curse"]["equivalent_dimension"]
    assert f"<strong>{eq:.3g}</strong>" in page and 1.0 <= eq <= 64.0
    # lineage: every stage version, parents before the evaluation
    lineage = lineage_from_manifests(root, ev)
    assert [e["stage"] for e in lineage][-1] == "evaluate"
    assert {e["stage"] for e in lineage} == {"split", "exact", "forest", "evaluate"}
    for e in lineage:
        assert e["version"] in page


def test_lineage_lists_parents_first_once_and_flags_a_deleted_parent(tmp_path):
    ev = make_run(tmp_path, "gone")
    lineage = lineage_from_manifests(tmp_path, ev)
    keys = [e["key"] for e in lineage]
    assert len(keys) == len(set(keys)) == 5  # split is the parent of three stages but listed once
    for i, e in enumerate(lineage):
        assert all(keys.index(p) < i for p in e["parents"])
    exact = next(e for e in lineage if e["stage"] == "exact")
    (Path(exact["path"]) / "manifest.json").unlink()
    flagged = [e for e in lineage_from_manifests(tmp_path, ev) if e.get("missing")]
    assert [e["key"] for e in flagged] == [exact["key"]]


def test_quality_and_words_sections_escape_and_mark_index_misses(run, tmp_path):
    root, ev = run
    words = [{"query": "king", "approximate": [("queen", 0.31), ("<unk>", 0.4)],
              "exact": [("queen", 0.31), ("prince", 0.35)]}]
    quality = {"label_precision_at_10": 0.93, "wordsim353": {"spearman": 0.5, "per_section": {"x": {"a": 1}}}}
    page = write_evaluation_report(tmp_path, dataset="words<&>", results=_results(), lineage=lineage_from_manifests(
        root, ev), words=words, quality=quality).read_text()
    assert '<section id="words">' in page and '<section id="quality">' in page
    assert '<section id="neighbours">' not in page and '<section id="curse">' not in page
    assert '<span class="w miss">&lt;unk&gt;' in page and '<span class="w">queen' in page
    assert "words&lt;&amp;&gt;" in page and "words<&>" not in page
    assert "label precision at 10" in page and "wordsim353 · spearman" in page and "per_section" not in page
    for data in embedded_images(page):
        assert_decodes_as_png(data)


def test_pareto_frontier_keeps_only_undominated_settings():
    rows = [{"recall": 0.5, "qps": 100}, {"recall": 0.6, "qps": 90}, {"recall": 0.55, "qps": 80},
            {"recall": 0.9, "qps": 10}, {"recall": 0.9, "qps": 5}, {"recall": 1.0, "qps": 1}]
    assert pareto_frontier(rows) == [0, 1, 3, 5]


def test_index_page_links_every_report_and_shows_versions(tmp_path, curve):
    root = tmp_path / "art"
    first = make_run(root, "digits", (2,))
    second = make_run(root, "digits", (2, 4), scale=2.0)
    words = make_run(root, "words", (3,))
    reports = [build_evaluation_report(root, ev, curve=curve) for ev in (first, second)]
    set_pointer(root / "digits", "serving", f"evaluate/{first.name}")  # as lifecycle.promote does
    info = scan_evaluations(root)
    assert [d["dataset"] for d in info] == ["digits", "words"]
    assert len(info[0]["evaluations"]) == 2 and info[1]["evaluations"][0]["report"] is None
    out = write_index_page(root, tmp_path / "site" / "index.html")
    page = out.read_text()
    links = re.findall(r'<a href="([^"#][^"]*)"', page)
    assert all(not os.path.isabs(link) for link in links)
    linked = {(out.parent / link).resolve() for link in links}
    assert {r.resolve() for r in reports} <= linked
    assert "no report yet" in page and words.name in page
    assert info[0]["serving"] == first.name and [e["serving"] for e in info[0]["evaluations"]].count(True) == 1
    serving = {s["stage"]: s["serving"] for s in info[0]["stages"]}
    forest_2 = lineage_from_manifests(root, first)[2]
    assert forest_2["stage"] == "forest" and serving["forest"] == forest_2["version"]  # only n_trees=2 serves
    assert f"<td>{serving['forest']}</td>" in page and f"{first.name} (serving)" in page
    for data in embedded_images(page):
        assert_decodes_as_png(data)
    assert page.count("<img") == 3  # a trend chart per evaluated dataset and the shared curse plot


def _red_pixels(uri: str) -> int:
    data = base64.b64decode(uri.split(",", 1)[1])
    assert_decodes_as_png(data)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array([214, 39, 40])).max(axis=2) < 10).sum())


def test_wrong_label_neighbours_are_framed_red():
    from pipeline.report import NeighbourExamples, plot_neighbours

    rng = np.random.default_rng(0)
    ex = NeighbourExamples(rng.uniform(0, 255, (2, 8, 8)), rng.uniform(0, 255, (2, 10, 8, 8)),
                           np.array([1, 2]), np.array([[1] * 9 + [3], [2] * 10]))
    assert _red_pixels(plot_neighbours(ex)) > 100
    ex.neighbour_labels[0, 9] = 1
    assert _red_pixels(plot_neighbours(ex)) == 0


@pytest.mark.parametrize("seconds", [0, 5, 3600, 86400, 3 * 86400, 40 * 86400, 400 * 86400])
def test_the_trend_plot_of_evaluations_seconds_or_days_apart_draws_without_warnings(seconds):
    """Builds a few seconds apart (tests, a rebuild right after a run) left matplotlib's date locator
    with no tick interval, and it warned; the axis now spans a day either side of them."""
    import warnings

    from pipeline import report

    evaluations = [{"created_utc": "2026-11-30T10:00:00+00:00", "best_recall": 0.9, "qps_at_target": 100.0,
                    "build_seconds": 2.0}]
    later = datetime.fromisoformat("2026-11-30T10:00:00+00:00") + timedelta(seconds=seconds)
    evaluations.append({"created_utc": later.isoformat(), "best_recall": 0.95, "qps_at_target": None,
                        "build_seconds": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uri = report._trend_plot(evaluations, 0.9)
    assert uri.startswith("data:image/png;base64,")
