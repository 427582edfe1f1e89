"""Evaluation reports a person can open: one self-contained ``report.html`` per evaluation, and an index page.

The pages are filled from ``pipeline/templates/*.html`` with ``string.Template``. A template file holds the
page and, after it, named fragments between ``<!--BEGIN name-->`` and ``<!--END name-->`` for the optional
sections. Plots are drawn with matplotlib's Agg canvas (no pyplot, no display) and embedded as base64 PNG
``data:`` URIs, so a report opens from disk, from an artifact copied elsewhere, or from an e-mail.

Besides ``report.html``, ``write_evaluation_report`` writes ``report.json`` (the curse-of-dimensionality
numbers and the quality metrics), which the index page reads to put every dataset on one curse plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any, Mapping, Sequence

import numpy as np

from . import __version__, layout
from .artifacts import (LATEST, MANIFEST, list_versions, location, read_manifest, ref_from_key, store_of,
                        version_dir)
from .curse import DatasetContrast
from .errors import ArtifactError, IndexFormatError, IndexMismatchError
from .evaluate import RESULTS_JSON, read_results
from .evaluate import finite_or_none, spread_percent
from .paths import write_text_atomic

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
REPORT = layout.REPORT_HTML
REPORT_JSON = layout.REPORT_JSON
QPS_RECALL_TARGET = 0.9
_BLOCK = re.compile(r"<!--BEGIN (\w+)-->\n?(.*?)<!--END \1-->\n?", re.S)


# --- templates and small HTML helpers --------------------------------------------------------------


def load_templates(name: str) -> dict[str, Template]:
    """``{"page": ..., <fragment name>: ...}`` from ``templates/<name>``."""
    text = (TEMPLATES / name).read_text(encoding="utf-8")
    blocks = {m.group(1): Template(m.group(2)) for m in _BLOCK.finditer(text)}
    blocks["page"] = Template(_BLOCK.sub("", text))
    return blocks


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if not isinstance(x, bool) else str(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            return "—"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"
    return str(x)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None,
           row_classes: Sequence[str] | None = None, cls: str = "") -> str:
    """An HTML table; cells are escaped unless given as ``("html", markup)``."""
    num = num or [False] * len(headers)

    def cell(tag: str, value: Any, is_num: bool) -> str:
        body = value[1] if isinstance(value, tuple) and value[:1] == ("html",) else _esc(_fmt(value))
        attr = ' class="num"' if is_num else ""
        return f"<{tag}{attr}>{body}</{tag}>"

    head = "".join(cell("th", h, n) for h, n in zip(headers, num))
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{rc}>" + "".join(cell("td", v, n) for v, n in zip(row, num)) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v[1] if isinstance(v, tuple) else _esc(_fmt(v))}</td></tr>"
                   for k, v in pairs)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- plots -------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas; pyplot (and its backends) never loaded

    return Figure(figsize=(width, height), dpi=100)


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _measured(value: Any) -> float:
    """A QPS figure as a float; nan when it was not measured (None in strict JSON, NaN in older results)."""
    return float(value) if isinstance(value, (int, float, np.integer, np.floating)) else float("nan")


def _spread_text(row: Mapping, key: str = "qps") -> str | None:
    """``"±3.1%"``: half the min-max range of a row's timed passes over their median; None without them."""
    p = spread_percent(row, key)
    return None if p is None else f"±{p:.1f}%"


def _qps_text(row: Mapping, digits: int = 0) -> str:
    """``"23,629 QPS ±3.1%"``."""
    spread = _spread_text(row)
    return f"{_measured(row.get('qps')):,.{digits}f} QPS" + (f" {spread}" if spread else "")


def pareto_frontier(rows: Sequence[Mapping]) -> list[int]:
    """Indices of the rows no other row beats on both recall and qps (ties kept), by rising recall."""
    pts = [(float(r["recall"]), _measured(r.get("qps"))) for r in rows]  # not measured: nan, never on the front
    keep = [i for i, (rc, q) in enumerate(pts) if math.isfinite(q)
            and not any((r2 >= rc and q2 >= q) and (r2 > rc or q2 > q) for r2, q2 in pts)]
    return sorted(keep, key=lambda i: pts[i])


def plot_recall_qps(rows: Sequence[Mapping], k: int = 10, title: str = "") -> str:
    """Recall@k (x) against single-query QPS (log y): a curve per n_trees, exact search as a star."""
    fig = _figure(9.5, 5.6)
    ax = fig.add_subplot()
    forest = [r for r in rows if r.get("method", "forest") != "exact" and r["n_trees"]]
    for n_trees in sorted({r["n_trees"] for r in forest}):
        g = sorted((r for r in forest if r["n_trees"] == n_trees), key=lambda r: r["search_k"])
        line, = ax.plot([r["recall"] for r in g], [_measured(r["qps"]) for r in g], marker="o", ms=5, lw=1.8,
                        label=f"forest, n_trees = {n_trees}")
        spread = [r for r in g if r.get("qps_min") is not None and r.get("qps_max") is not None]
        if spread:  # the min-max range of the timed passes, as a bar through each point
            ax.vlines([r["recall"] for r in spread], [r["qps_min"] for r in spread], [r["qps_max"] for r in spread],
                      color=line.get_color(), lw=1.2, alpha=0.8)
        for r in g:
            ax.annotate(f"{r['search_k']:,}", (r["recall"], _measured(r["qps"])), textcoords="offset points",
                        xytext=(4, 5), fontsize=7, color=line.get_color())
    for r in rows:
        if (r.get("method") == "exact" or not r["n_trees"]) and math.isfinite(_measured(r["qps"])):
            ax.scatter([r["recall"]], [r["qps"]], marker="*", s=220, color="black", zorder=5,
                       label="exact search (brute force)")
    front = [rows[i] for i in pareto_frontier(rows)]
    ax.plot([r["recall"] for r in front], [r["qps"] for r in front], color="0.55", lw=7, alpha=0.35,
            solid_capstyle="round", zorder=0, label="Pareto frontier")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{k}  (fraction of the true {k} nearest neighbours returned)")
    ax.set_ylabel("queries per second  (one thread, log scale)")
    ax.set_title(title or f"Recall@{k} against speed; point labels: search_k", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9, framealpha=0.9)
    return _png_uri(fig)


def plot_curse(curve: Sequence[tuple[int, float]], datasets: Sequence[tuple[str, float, float]]) -> str:
    """The normal curve (log-log) and a dashed line per ``(name, ratio, equivalent_dimension)``."""
    fig = _figure(9.5, 5.2)
    ax = fig.add_subplot()
    d, r = zip(*curve)
    ax.plot(d, r, marker="o", color="#1f4e9c", lw=2, label="standard normal data")
    colors = ["#d1495b", "#edae49", "#00798c", "#66a182", "#8d6cab", "#2e4057"]
    # the highest line labelled above itself, the others below theirs, so neighbouring labels part
    highest = max((r for _, r, _ in datasets), default=None)
    for i, (name, ratio, eq) in enumerate(datasets):
        c = colors[i % len(colors)]
        ax.axhline(ratio, color=c, ls="--", lw=1.6, label=f"{name}: ratio {ratio:.3g}")
        ax.plot([eq], [ratio], marker="o", ms=9, mfc="white", mec=c, mew=2, zorder=5)
        ax.annotate(f"{name}: ≈ {eq:.1f} dims", (eq, ratio), textcoords="offset points",
                    xytext=(10, 8) if ratio == highest else (10, -17),
                    fontsize=10, color=c, fontweight="bold")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(d))
    ax.set_xticklabels([str(x) for x in d])
    ax.set_xlabel("dimension d of the normal data")
    ax.set_ylabel("(max distance − min distance) / min distance\n(mean over queries, log scale)")
    ax.set_title("Contrast between the farthest and the nearest point", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _png_uri(fig)


def _tile_rgb(img: np.ndarray) -> np.ndarray:
    """One image as RGB floats in [0, 1]; grey digits dark on white, as the user's articles show them."""
    img = np.asarray(img, dtype=np.float32)
    scale = 255.0 if img.max() > 1.0 else 1.0
    if img.ndim == 3:
        return np.clip(img / scale, 0.0, 1.0)
    grey = 1.0 - np.clip(img / scale, 0.0, 1.0)
    return np.repeat(grey[:, :, None], 3, axis=2)


_QUERY_FRAME, _WRONG_FRAME, _PLAIN_FRAME = (0.12, 0.31, 0.61), (0.84, 0.15, 0.16), (0.8, 0.8, 0.8)


def plot_neighbours(ex: "NeighbourExamples") -> str:
    """A grid: one row per query, the query then its neighbours; wrong-label neighbours framed red.

    Drawn as one mosaic image (one ``imshow``) with text under each tile: a grid of ~90 axes costs
    seconds in matplotlib, the mosaic a fraction of one.
    """
    nq, k = ex.neighbour_images.shape[:2]
    h, w = np.asarray(ex.query_images[0]).shape[:2]
    frame = max(1, h // 14)
    gap_x, gap_y = max(2, w // 4), max(6, h // 2)  # room between tiles; below each for its caption
    cell_w, cell_h = w + 2 * frame + gap_x, h + 2 * frame + gap_y
    mosaic = np.ones((nq * cell_h, (k + 1) * cell_w, 3), dtype=np.float32)
    captions = []
    for i in range(nq):
        ql = None if ex.query_labels is None else int(ex.query_labels[i])
        for j in range(k + 1):
            if j == 0:
                img, colour, text = ex.query_images[i], _QUERY_FRAME, ex.label_name(ql)
            else:
                img = ex.neighbour_images[i, j - 1]
                nl = None if ex.neighbour_labels is None else int(ex.neighbour_labels[i, j - 1])
                wrong = ql is not None and nl is not None and ql >= 0 and nl != ql
                colour = _WRONG_FRAME if wrong else _PLAIN_FRAME
                text = ex.label_name(nl)
                if ex.neighbour_distances is not None:
                    dist = float(ex.neighbour_distances[i, j - 1])
                    text += f" · {dist:.0f}" if dist >= 100 else f" · {dist:.3g}"
            y0, x0 = i * cell_h, j * cell_w
            mosaic[y0 : y0 + h + 2 * frame, x0 : x0 + w + 2 * frame] = colour
            mosaic[y0 + frame : y0 + frame + h, x0 + frame : x0 + frame + w] = _tile_rgb(img)
            captions.append((x0 + frame + w / 2, y0 + h + 2 * frame + 1, text, j == 0))
    fig = _figure(1.0 * (k + 1) + 0.4, 1.15 * nq + 0.4)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.93))
    ax.imshow(mosaic, interpolation="nearest")
    for x, y, text, is_query in captions:
        ax.text(x, y, text, ha="center", va="top", fontsize=7, fontweight="bold" if is_query else "normal")
    for j in range(k + 1):
        ax.text(j * cell_w + frame + w / 2, -2, "query" if j == 0 else f"#{j}", ha="center", va="bottom", fontsize=9)
    ax.set_axis_off()
    return _png_uri(fig)


def _trend_plot(evaluations: Sequence[Mapping], target: float) -> str:
    import matplotlib.dates as mdates
    from datetime import timedelta

    fig = _figure(10.5, 2.7)
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(wspace=0.35)
    when = [datetime.fromisoformat(e["created_utc"]) for e in evaluations]
    panels = [("best_recall", "best recall@k", "recall"), ("qps_at_target", f"QPS at recall ≥ {target}", "queries / s"),
              ("build_seconds", "build time, largest forest", "seconds")]
    for ax, (key, title, unit) in zip(axes, panels):
        ys = [float(e[key]) if e.get(key) is not None else float("nan") for e in evaluations]
        ax.plot(when, ys, marker="o", color="#1f4e9c")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        locator = mdates.AutoDateLocator(minticks=3, maxticks=7)  # every span has a tick interval
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        if max(when) - min(when) < timedelta(days=1):
            # one date, or builds minutes apart: a day either side, so the points sit in the middle
            # (over a span of seconds the date locator finds no tick interval and warns)
            middle = min(when) + (max(when) - min(when)) / 2
            ax.set_xlim(middle - timedelta(days=1), middle + timedelta(days=1))
        finite = [y for y in ys if math.isfinite(y)]
        if key == "best_recall" and finite:
            ax.set_ylim(max(0.0, min(finite) - 0.05), 1.005)
        elif finite:
            ax.set_ylim(0.0, max(finite) * 1.15)
    return _png_uri(fig)


# --- neighbours and words ----------------------------------------------------------------------------


@dataclass
class NeighbourExamples:
    """Pictures of a few queries and their nearest neighbours.

    query_images: (nq, h, w) grey or (nq, h, w, 3) RGB, uint8 or float (0..255, or 0..1);
    neighbour_images: (nq, k, h, w[, 3]); query_labels: int (nq,) and neighbour_labels: int (nq, k),
    -1 for none; neighbour_distances: float (nq, k) or None; class_names maps a label to a name.
    """

    query_images: np.ndarray
    neighbour_images: np.ndarray
    query_labels: np.ndarray | None = None
    neighbour_labels: np.ndarray | None = None
    neighbour_distances: np.ndarray | None = None
    class_names: Sequence[str] | None = None
    source: str = "exact search"
    seed: int = 0

    def label_name(self, label: int | None) -> str:
        if label is None or label < 0:
            return ""
        if self.class_names is not None and label < len(self.class_names):
            return str(self.class_names[label])
        return str(label)


def image_shape_from_meta(meta: Mapping[str, str]) -> tuple[int, ...] | None:
    """The ``image_shape`` a vector table's metadata declares (JSON, e.g. ``"[28, 28]"``), or None."""
    raw = meta.get("image_shape")
    return tuple(int(x) for x in json.loads(raw)) if raw else None


def sample_neighbour_examples(
    query_images, base_images, neighbor_ids: np.ndarray, *, query_labels=None, base_labels=None,
    neighbor_dists: np.ndarray | None = None, image_shape: Sequence[int] | None = None, n_queries: int = 8,
    k: int = 10, seed: int = 0, class_names: Sequence[str] | None = None, source: str = "exact search",
) -> NeighbourExamples:
    """Pick ``n_queries`` queries with ``seed`` and gather their images and their ``k`` neighbours'.

    query_images / base_images: anything indexable by an int64 row array: (n, h*w) vectors (give
    ``image_shape``) or (n, h, w[, 3]) images, memory-mapped is fine. neighbor_ids: (nq_total, >=k)
    int base rows, nearest first (e.g. the exact stage's neighbors.npy); neighbor_dists alike.
    """
    neighbor_ids = np.asarray(neighbor_ids)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(neighbor_ids.shape[0], size=min(n_queries, neighbor_ids.shape[0]), replace=False))
    ids = np.asarray(neighbor_ids[rows, :k], dtype=np.int64)

    def shaped(a: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
        a = np.asarray(a)
        return a.reshape(lead + tuple(image_shape)) if image_shape else a

    q_img = shaped(np.asarray(query_images[rows]), (len(rows),))
    n_img = shaped(np.asarray(base_images[ids.reshape(-1)]), (len(rows), ids.shape[1]))
    return NeighbourExamples(
        query_images=q_img,
        neighbour_images=n_img,
        query_labels=None if query_labels is None else np.asarray(query_labels)[rows],
        neighbour_labels=None if base_labels is None else np.asarray(base_labels)[ids],
        neighbour_distances=None if neighbor_dists is None else np.asarray(neighbor_dists[rows, :k]),
        class_names=class_names,
        source=source,
        seed=seed,
    )


def sample_word_neighbours(
    query_words: Sequence[str], base_words: Sequence[str], exact_ids: np.ndarray, exact_dists: np.ndarray,
    approx_ids: np.ndarray | None, approx_dists: np.ndarray | None, *, n_queries: int = 12, k: int = 10,
    seed: int = 0,
) -> list[dict]:
    """``[{"query": word, "approximate": [(word, dist), ...] or None, "exact": [(word, dist), ...]}]`` for a
    seeded sample of queries. *_ids: (nq_total, >=k) int base rows, nearest first (-1 = none); *_dists
    alike; approx_ids None when no index answer is available."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(query_words), size=min(n_queries, len(query_words)), replace=False))

    def pairs(ids, dists, r):
        return [(base_words[int(i)], float(d)) for i, d in zip(ids[r, :k], dists[r, :k]) if int(i) >= 0]

    return [{"query": query_words[r],
             "approximate": None if approx_ids is None else pairs(approx_ids, approx_dists, r),
             "exact": pairs(exact_ids, exact_dists, r)} for r in rows]


def _words_table(words: Sequence[Mapping]) -> str:
    def cell(pairs, exact_set=None):
        if pairs is None:
            return ("html", '<span class="note">no index answer</span>')
        spans = []
        for w, d in pairs:
            cls = "w miss" if exact_set is not None and w not in exact_set else "w"
            spans.append(f'<span class="{cls}">{_esc(w)}<span class="d">{d:.3f}</span></span>')
        return ("html", "".join(spans))

    rows = []
    for item in words:
        exact_set = {w for w, _ in item["exact"]}
        rows.append([("html", f"<strong>{_esc(item['query'])}</strong>"), cell(item["approximate"], exact_set),
                     cell(item["exact"])])
    return _table(["query", "forest index (approximate)", "exact search"], rows, cls="words")


# --- lineage -----------------------------------------------------------------------------------------


def lineage_from_manifests(root: str | os.PathLike, evaluate_dir: str | os.PathLike,
                           manifest: dict | None = None) -> list[dict]:
    """Every stage version behind an evaluation, parents first, the evaluation last.

    Walks ``parents`` ("dataset/stage/version" keys under ``root``) recursively from
    ``evaluate_dir/manifest.json``. Each entry: ``name`` (the role its child gave it, e.g. "forest_10"),
    ``key``, ``dataset``, ``stage``, ``version``, ``params``, ``seconds``, ``created_utc``, ``rows``,
    ``metrics``, ``parents`` (keys), ``path`` and ``missing`` (True when the parent's manifest is gone:
    the entry then only has its name and key, and a warning is logged).
    ``manifest``: the evaluation's own manifest when it is not on disk yet (a report written while
    the evaluation is being published).
    """
    out: list[dict] = []
    seen: set[str] = set()

    def visit(key: str, name: str, m: dict | None = None, path: str | None = None) -> None:
        if key in seen:
            return
        seen.add(key)
        path = path or location(root, key)
        if m is None:
            try:
                m = read_manifest(ref_from_key(root, key), verify="none")
            except ArtifactError:
                log.warning("lineage: %s has no %s; it was deleted or never completed", path, MANIFEST)
                out.append({"name": name, "key": key, "path": path, "missing": True, "parents": []})
                return
        parents = m.get("parents", {})
        for pname, pkey in sorted(parents.items()):
            visit(pkey, pname)
        out.append({
            "name": name, "key": key, "dataset": m.get("dataset"), "stage": m.get("stage"),
            "version": m.get("version"), "params": m.get("params", {}), "seconds": m.get("seconds"),
            "created_utc": m.get("created_utc"), "rows": m.get("rows", {}), "metrics": m.get("metrics", {}),
            "parents": sorted(parents.values()), "path": path, "missing": False,
        })

    where = str(evaluate_dir) if "://" in str(evaluate_dir) else str(Path(evaluate_dir).resolve())
    if manifest is None:
        manifest = json.loads((Path(where) / MANIFEST).read_text(encoding="utf-8"))
    m = manifest
    visit(layout.version_key(m.get("dataset"), m.get("stage"), m.get("version")), m.get("stage", "evaluate"), m,
          where)
    return out


def _short(value: Any, limit: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lineage_table(lineage: Sequence[Mapping]) -> str:
    rows, classes = [], []
    for e in lineage:
        if e.get("missing"):
            rows.append([e["name"], e["key"], "manifest missing", None, None, "", ""])
            classes.append("missing")
            continue
        params = "<br>".join(f"{_esc(k)}={_esc(_short(v))}" for k, v in sorted(e["params"].items()))
        extra = {**e.get("rows", {}), **e.get("metrics", {})}
        facts = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(extra.items()))
        rows.append([e["name"], e["version"], (e.get("created_utc") or "").replace("T", " ").replace("+00:00", " UTC"),
                     e.get("seconds"), ("html", f'<span class="params">{params}</span>'), facts])
        classes.append("")
    return _table(["stage", "version", "created", "seconds", "parameters", "rows and metrics"],
                  [r[:6] for r in rows], num=[False, False, False, True, False, False], row_classes=classes,
                  cls="lineage")


# --- the evaluation report -----------------------------------------------------------------------------


def _forest_rows(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("method", "forest") != "exact" and r["n_trees"]]


def summarize_results(results: Mapping) -> dict:
    """Headline numbers of one results.json: best recall, QPS at the target recall, build time, exact QPS."""
    rows = results.get("rows", [])
    forest = _forest_rows(rows)
    good = [r for r in forest if r["recall"] >= QPS_RECALL_TARGET]
    best = max(forest, key=lambda r: (r["recall"], _measured(r["qps"])), default=None)
    fast = max((r for r in good if math.isfinite(_measured(r["qps"]))), key=lambda r: r["qps"], default=None)
    largest = max(forest, key=lambda r: r["n_trees"], default=None)
    exact = next((r for r in rows if r.get("method") == "exact" or not r["n_trees"]), None)
    return {
        "best_recall": best["recall"] if best else None,
        "best": best,
        "qps_at_target": fast["qps"] if fast else None,
        "fast": fast,
        "build_seconds": largest["build_seconds"] if largest else None,
        "exact_qps": exact["qps"] if exact else None,
        "exact": exact,
    }


def _flatten_quality(quality: Mapping, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Scalar metrics, nested names joined by " · "; tables nested deeper than two levels are left out."""
    out = []
    for key, value in quality.items():
        name = f"{prefix} · {key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if depth < 1:
                out.extend(_flatten_quality(value, name, depth + 1))
        elif isinstance(value, (int, float, str, np.floating, np.integer)) and not isinstance(value, bool):
            out.append((name.replace("_", " "), value))
    return out


def _as_contrast_dict(curse: DatasetContrast | Mapping) -> dict:
    return curse.to_dict() if isinstance(curse, DatasetContrast) else dict(curse)


def _curse_table(entries: Sequence[tuple[str, Mapping]]) -> str:
    rows = [[name, c.get("dim"), c.get("metric"), c.get("ratio"),
             ("html", f"<strong>{_fmt(c['equivalent_dimension'], 3)}</strong>"
              + {"below_range": " (at or below the smallest d measured)",
                 "above_range": " (at or above the largest d measured)"}.get(c.get("clamped"), "")),
             f"{c.get('n_queries')} queries × {c.get('n_points'):,} points"] for name, c in entries]
    return _table(["dataset", "dim", "metric", "contrast ratio", "equivalent normal dimension", "sample"], rows,
                  num=[False, True, False, True, True, False])


def write_evaluation_report(
    out_dir: str | os.PathLike, *, dataset: str, results: Mapping, lineage: Sequence[Mapping],
    neighbours: NeighbourExamples | None = None, words: Sequence[Mapping] | None = None,
    quality: Mapping | None = None, curse: DatasetContrast | Mapping | None = None,
    words_source: str = "forest index",
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.json``; return the html path.

    results: a results.json as the evaluate stage writes it; lineage: ``lineage_from_manifests(...)``;
    neighbours: ``sample_neighbour_examples(...)`` for image datasets; words: ``sample_word_neighbours(...)``
    with ``words_source`` naming the approximate setting (e.g. "n_trees 10, search_k 1,000");
    quality: flat or nested metrics (default: ``results["quality"]``); curse: ``curse.dataset_contrast(...)``.
    Sections without data are left out.
    """
    out_dir = Path(out_dir)
    t = load_templates(REPORT)
    k = int(results.get("k", 10))
    rows = list(results.get("rows", []))
    quality = quality if quality is not None else results.get("quality") or None
    head = next((e for e in reversed(lineage) if not e.get("missing")), {})
    version = head.get("version", "")
    s = summarize_results(results)
    front = set(pareto_frontier(rows))

    table_rows = [[r.get("method", "forest"), r["n_trees"] or "", r["search_k"] or "", r["recall"], r["qps"],
                   _spread_text(r, "qps"), r.get("batch_qps"), _spread_text(r, "batch_qps"), r.get("build_seconds"),
                   r.get("index_bytes", 0) / 1e6, "✓" if i in front else ""]
                  for i, r in enumerate(rows)]
    results_table = _table(["method", "n_trees", "search_k", f"recall@{k}", "QPS", "QPS spread", "batch QPS",
                            "batch spread", "build (s)", "index (MB)", "Pareto"], table_rows,
                           num=[False] + [True] * 9 + [False],
                           row_classes=["pareto" if i in front else "" for i in range(len(rows))])

    sections: dict[str, str] = {"neighbours": "", "words": "", "curse": "", "quality": ""}
    if neighbours is not None:
        n_match = n_total = 0
        if neighbours.query_labels is not None and neighbours.neighbour_labels is not None:
            n_total = int(neighbours.neighbour_labels.size)
            n_match = int((neighbours.neighbour_labels == neighbours.query_labels[:, None]).sum())
        sections["neighbours"] = t["neighbours"].substitute(
            image=plot_neighbours(neighbours), k=neighbours.neighbour_images.shape[1], source=_esc(neighbours.source),
            n_match=n_match, n_total=n_total, seed=neighbours.seed)
    if words:
        sections["words"] = t["words"].substitute(k=k, approx_source=_esc(words_source),
                                                  table=_words_table(words))
    curse_d = _as_contrast_dict(curse) if curse is not None else None
    if curse_d is not None:
        sections["curse"] = t["curse"].substitute(
            image=plot_curse(curse_d["curve"], [(dataset, curse_d["ratio"], curse_d["equivalent_dimension"])]),
            n_queries=curse_d["n_queries"], n_points=f"{curse_d['n_points']:,}",
            table=_curse_table([(dataset, curse_d)]))
    if quality:
        sections["quality"] = t["quality"].substitute(
            table=_table(["measure", "value"], _flatten_quality(quality), num=[False, True]))

    summary = [("dataset", dataset), ("evaluation version", version), ("metric", results.get("metric")),
               ("queries", results.get("n_queries"))]
    if s["best"]:
        b = s["best"]
        summary.append((f"best recall@{k}", f"{b['recall']:.4f} (n_trees {b['n_trees']}, search_k {b['search_k']:,}, "
                                            f"{_qps_text(b)})"))
    if s["fast"]:
        f = s["fast"]
        summary.append((f"fastest at recall@{k} ≥ {QPS_RECALL_TARGET}",
                        f"{_qps_text(f)} (n_trees {f['n_trees']}, search_k {f['search_k']:,}, recall {f['recall']:.4f})"))
    if s["exact_qps"] is not None:
        summary.append(("exact search", _qps_text(s["exact"], digits=1)))
    if results.get("repeats"):
        exact_n = results.get("n_timed_exact")
        summary.append(("QPS measured as", f"the median of {results['repeats']} warmed-up passes over "
                                           f"{results.get('n_timed', '?')} queries"
                                           + (f" ({exact_n} for exact search)" if exact_n is not None else "")
                                           + "; spread: ± half the min–max range of the passes"))
    if curse_d is not None:
        summary.append(("equivalent normal dimension", f"{curse_d['equivalent_dimension']:.1f} "
                                                       f"(of {curse_d['dim']} actual dimensions)"))

    present = [("summary", "Summary"), ("recall", "Recall vs speed")] + [
        (key, label) for key, label in [("neighbours", "Neighbours"), ("words", "Words"),
                                        ("curse", "Curse of dimensionality"), ("quality", "Quality")]
        if sections[key]] + [("lineage", "Lineage")]
    total = sum(e.get("seconds") or 0.0 for e in lineage)
    page = t["page"].substitute(
        title=_esc(f"{dataset}: evaluation {version}"), heading=_esc(f"{dataset} — evaluation {version}"),
        meta=_esc(f"created {head.get('created_utc', '?')} · metric {results.get('metric')} · k = {k} · "
                  f"{results.get('n_queries')} queries"),
        nav="".join(f'<a href="#{a}">{_esc(label)}</a>' for a, label in present),
        summary_table=_kv_table(summary), k=k, recall_plot=plot_recall_qps(rows, k), results_table=results_table,
        neighbours_section=sections["neighbours"], words_section=sections["words"], curse_section=sections["curse"],
        quality_section=sections["quality"], lineage_table=_lineage_table(lineage),
        total_seconds=_esc(f"{total:,.1f} s"), grove_version=__version__, generated=_now())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT
    path.write_text(page, encoding="utf-8")
    sidecar = {"dataset": dataset, "version": version, "generated_utc": _now(), "curse": curse_d,
               "quality": dict(_flatten_quality(quality)) if quality else None}
    # Strict JSON: a non-finite number (a contrast ratio or a correlation that could not be measured) is null.
    sidecar = finite_or_none(json.loads(json.dumps(sidecar, default=float)))
    (out_dir / REPORT_JSON).write_text(json.dumps(sidecar, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path


# --- the index page ------------------------------------------------------------------------------------


def scan_evaluations(root: str | os.PathLike) -> list[dict]:
    """What the index page shows, found under ``root``: one entry per dataset directory, by name.

    Each: ``{"dataset", "serving" (the serving evaluate version or None), "stages": [{"stage", "latest",
    "serving" (the versions of that stage behind the serving evaluation, comma-separated, or None)}],
    "evaluations": [...]}``, evaluations oldest first, each ``{"version", "created_utc", "path", "report"
    (path or None), "serving" (bool), "k", "metric", "n_queries", "best_recall", "qps_at_target",
    "build_seconds", "exact_qps", "curse" (dict or None)}``.
    """
    store = store_of(root)
    out = []
    datasets = [name for name in store.list("") if layout.is_dataset(name)
                and (not store.is_local or store.local_path(name).is_dir())]
    for dataset in datasets:
        serving = layout.served_version(store.get_pointer(layout.dataset_key(dataset), layout.SERVING))
        behind: dict[str, list[str]] = {}
        served = ref_from_key(root, layout.version_key(dataset, layout.SERVED_STAGE, serving)) if serving else None
        if served is not None and served.exists():
            for e in lineage_from_manifests(root, served.location, read_manifest(served, verify="none")):
                if not e.get("missing"):
                    behind.setdefault(e["stage"], []).append(e["version"])
        stage_names = [name for name in store.list(layout.dataset_key(dataset)) if layout.is_stage(name) and (
            not store.is_local or (store.local_path(layout.stage_key(dataset, name)).is_dir()
                                   and not store.local_path(layout.stage_key(dataset, name)).is_symlink()))]
        stages = [{"stage": name, "latest": store.get_pointer(layout.stage_key(dataset, name), LATEST),
                   "serving": ", ".join(behind[name]) if name in behind else None} for name in stage_names]
        if not stages:
            continue
        evaluations = []
        for m in list_versions(root, dataset, layout.SERVED_STAGE):
            key = layout.version_key(dataset, layout.SERVED_STAGE, m["version"])
            path = version_dir(root, key)  # on an object store: a verified copy in this machine's cache
            if not (path / RESULTS_JSON).is_file():
                log.warning("%s has no %s; left out of the index", m["path"], RESULTS_JSON)
                continue
            results = read_results(path)
            s = summarize_results(results)
            sidecar = path / REPORT_JSON
            extra = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
            evaluations.append({
                "version": m["version"], "created_utc": m.get("created_utc", ""), "path": m["path"],
                "report": _report_location(root, key, path),
                "serving": m["version"] == serving, "k": results.get("k", 10),
                "metric": results.get("metric"), "n_queries": results.get("n_queries"),
                "best_recall": s["best_recall"], "qps_at_target": s["qps_at_target"],
                "build_seconds": s["build_seconds"], "exact_qps": s["exact_qps"], "curse": extra.get("curse"),
            })
        out.append({"dataset": dataset, "serving": serving, "stages": stages, "evaluations": evaluations})
    return out


def _report_location(root: str | os.PathLike, key: str, local: Path) -> str | None:
    """Where an evaluation's report.html is: its path on a local root, its object's URI on a store."""
    if not (local / REPORT).is_file():
        return None
    store = store_of(root)
    if store.is_local:
        return str(local / REPORT)
    _, keys = store.version_file_keys(key)
    return location(root, keys.get(REPORT, f"{key}/{REPORT}"))


def _link(target: str | None, base: Path | str, text: str) -> tuple[str, str] | str:
    """A link to ``target`` relative to ``base`` (a local directory, or the URI the page is stored under)."""
    if not target:
        return "no report yet"
    if "://" in target or "://" in str(base):
        prefix = str(base).rstrip("/") + "/"
        rel = target[len(prefix):] if target.startswith(prefix) else target
    else:
        rel = os.path.relpath(target, base).replace(os.sep, "/")
    return ("html", f'<a href="{_esc(rel)}">{_esc(text)}</a>')


def write_index_page(root: str | os.PathLike, out_path: str | os.PathLike,
                     datasets_info: Sequence[Mapping] | None = None, links_base: str | None = None) -> Path:
    """Write the index of all datasets (default: ``scan_evaluations(root)``) to ``out_path``; return it.

    Links to each evaluation's report.html are relative to ``out_path``'s directory, so the root and
    the page can move together.
    """
    out_path = Path(out_path)
    base = out_path.parent.resolve() if links_base is None else links_base
    info = list(scan_evaluations(root) if datasets_info is None else datasets_info)
    t = load_templates(layout.INDEX_PAGE)  # the template is named after the page it renders
    blocks, overview, curse_entries = [], [], []
    for d in info:
        name, evals = d["dataset"], d["evaluations"]
        anchor = "ds-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)
        last = evals[-1] if evals else None
        versions = _table(["stage", "latest", "serving"],
                          [[s["stage"], s["latest"] or "—", s["serving"] or "—"] for s in d["stages"]])
        trend = (t["trend"].substitute(image=_trend_plot(evals, QPS_RECALL_TARGET), dataset=_esc(name),
                                       target=QPS_RECALL_TARGET)
                 if evals else '<p class="note">No evaluation yet.</p>')
        ev_rows = [[(e["created_utc"] or "").replace("T", " ").replace("+00:00", " UTC"),
                    e["version"] + (" (serving)" if e.get("serving") else ""),
                    e["best_recall"], e["qps_at_target"], e["build_seconds"],
                    _link(e["report"], base, "report")] for e in reversed(evals)]
        ev_table = _table(["date", "evaluation", "best recall@k", f"QPS at recall ≥ {QPS_RECALL_TARGET}",
                           "build (s)", "report"], ev_rows, num=[False, False, True, True, True, False]) if evals else ""
        blocks.append(t["dataset"].substitute(anchor=anchor, dataset=_esc(name), versions_table=versions,
                                              trend=trend, evaluations_table=ev_table))
        curse = next((e["curse"] for e in reversed(evals) if e.get("curse")), None)
        if curse:
            curse_entries.append((name, curse))
        overview.append([("html", f'<a href="#{anchor}">{_esc(name)}</a>'), len(evals),
                         last["created_utc"].replace("T", " ").replace("+00:00", " UTC") if last else "—",
                         last["best_recall"] if last else None, last["qps_at_target"] if last else None,
                         round(curse["equivalent_dimension"], 1) if curse else None,
                         _link(last["report"], base, "latest report") if last else "—"])
    curse_section = ""
    if curse_entries:
        curve = curse_entries[0][1]["curve"]
        curse_section = t["curse"].substitute(
            image=plot_curse(curve, [(n, c["ratio"], c["equivalent_dimension"]) for n, c in curse_entries]),
            table=_curse_table(curse_entries))
    page = t["page"].substitute(
        root=_esc(location(root, "") if "://" in str(root) else Path(root).resolve()), n_datasets=len(info),
        n_evaluations=sum(len(d["evaluations"]) for d in info),
        nav="".join(f'<a href="#ds-{_esc(re.sub(r"[^A-Za-z0-9_-]", "-", d["dataset"]))}">{_esc(d["dataset"])}</a>'
                    for d in info) + ('<a href="#curse">Curse of dimensionality</a>' if curse_section else ""),
        overview_table=_table(["dataset", "evaluations", "latest evaluation", "best recall@k",
                               f"QPS at recall ≥ {QPS_RECALL_TARGET}", "equivalent normal dimension", "report"],
                              overview, num=[False, True, False, True, True, True, False]),
        curse_section=curse_section, datasets="".join(blocks), grove_version=__version__, generated=_now())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_path, page)  # a full disk leaves the old page, not half a new one
    log.info("wrote %s (%d datasets)", out_path, len(info))
    return out_path


# --- from artifacts to a report ------------------------------------------------------------------------


def build_evaluation_report(
    root: str | os.PathLike, evaluate_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
    seed: int = 0, n_examples: int = 8, curve: Sequence[tuple[int, float]] | None = None,
    images: tuple[Any, Any, Sequence[int] | None] | None = None, class_names: Sequence[str] | None = None,
    manifest: dict | None = None,
) -> Path:
    """Gather everything an evaluation's report shows from its artifacts and write it (default: into
    ``evaluate_dir``). Reads results.json, the lineage, the split and exact parents; for a table whose
    metadata has ``image_shape`` the neighbours are drawn from the vectors themselves, or from
    ``images = (query_images, base_images, image_shape or None)`` when given (food photos, or MNIST
    pixels for a CNN embedding); for tables without images and without labels (words), approximate
    neighbours come from the largest forest at its fastest setting of recall >= QPS_RECALL_TARGET.
    ``curve``: a precomputed ``curse.normal_curve`` (10,000 points, 100 queries) to save a second or two.
    ``manifest``: the evaluation's manifest when it is not written yet (the evaluate stage builds its
    report before it publishes; it then passes stage, dataset, version and parents).
    """
    from .curse import dataset_contrast
    from .vectors import read_vectors

    evaluate_dir = Path(evaluate_dir)
    if manifest is None:
        manifest = json.loads((evaluate_dir / MANIFEST).read_text(encoding="utf-8"))
    results = read_results(evaluate_dir)
    parents = manifest.get("parents", {})
    split_dir, exact_dir = version_dir(root, parents["split"]), version_dir(root, parents["exact"])
    base = read_vectors(split_dir / layout.BASE)
    queries = read_vectors(split_dir / layout.QUERIES)
    k = int(results.get("k", 10))
    exact_ids = np.load(exact_dir / layout.NEIGHBORS, mmap_mode="r")
    exact_dists = np.load(exact_dir / layout.DISTANCES, mmap_mode="r")
    metric = results.get("metric", "euclidean")

    neighbours = words = None
    words_source = "forest index"
    shape = image_shape_from_meta(base.meta)
    if images is not None or shape is not None:
        q_img, b_img, shape = images if images is not None else (queries.vectors, base.vectors, shape)
        labelled = bool((base.labels >= 0).any())
        neighbours = sample_neighbour_examples(
            q_img, b_img, exact_ids, query_labels=queries.labels if labelled else None,
            base_labels=base.labels if labelled else None, neighbor_dists=exact_dists, image_shape=shape,
            n_queries=n_examples, k=k, seed=seed, class_names=class_names)
    elif not (base.labels >= 0).any():
        words, words_source = _word_examples(root, parents, results, base, queries, exact_ids, exact_dists, k, seed)
    # The contrast needs a few points besides its queries, and is not defined for inner products.
    n_contrast = min(100, len(base) // 2)
    curse = None
    if metric != "dot" and n_contrast >= 1 and len(base) - n_contrast >= 2:
        curse = dataset_contrast(base.vectors, metric=metric, seed=seed, curve=curve, n_queries=n_contrast)
    else:
        log.info("report: no curse-of-dimensionality section (%d vectors, metric %s)", len(base), metric)
    return write_evaluation_report(
        out_dir if out_dir is not None else evaluate_dir, dataset=manifest.get("dataset", "?"), results=results,
        lineage=lineage_from_manifests(root, evaluate_dir, manifest), neighbours=neighbours, words=words, curse=curse,
        words_source=words_source)


def _word_examples(root, parents, results, base, queries, exact_ids, exact_dists, k, seed) -> tuple[list | None, str]:
    from .forest import Forest

    s = summarize_results(results)
    setting = s["fast"] or s["best"]
    forests = {int(name.split("_")[-1]): key for name, key in parents.items() if name.startswith("forest")}
    if setting is None or setting["n_trees"] not in forests:
        return None, ""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(queries), size=min(12, len(queries)), replace=False))
    source = f"n_trees {setting['n_trees']}, search_k {setting['search_k']:,}, recall@{k} {setting['recall']:.3f}"
    try:
        forest = Forest.load(version_dir(root, forests[setting["n_trees"]]) / layout.INDEX_DIR, metric=results.get("metric"),
                             dim=queries.dim)
        approx_ids, approx_dists = forest.query_batch(
            np.ascontiguousarray(queries.vectors[rows], dtype=np.float32), k=k, search_k=setting["search_k"],
            include_distances=True)
    except (IndexFormatError, IndexMismatchError, ArtifactError) as exc:
        # The report still shows the exact neighbours; the page says why the index column is empty.
        log.warning("report: cannot query the forest for the word table: %s", exc)
        approx_ids = approx_dists = None
        source = f"unavailable: {exc}"
    sub_keys = [queries.keys[int(r)] for r in rows]
    words = sample_word_neighbours(sub_keys, base.keys, np.asarray(exact_ids[rows]), np.asarray(exact_dists[rows]),
                                   approx_ids, approx_dists, n_queries=len(rows), k=k, seed=seed)
    return words, source
