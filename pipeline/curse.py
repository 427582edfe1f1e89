"""The curse of dimensionality, measured: how much nearer is the nearest point than the farthest?

For a query ``q`` and a base sample ``B`` the *contrast ratio* is ``(max_b d(q, b) - min_b d(q, b)) /
min_b d(q, b)``. In low dimensions the nearest point is much nearer than the farthest (a large ratio);
as the dimension grows every distance approaches the same value and the ratio falls towards 0, which
is what makes nearest-neighbour search hard.

``normal_curve`` measures the mean ratio for standard-normal points in d = 1, 2, 4, ..., 1024
dimensions. A real dataset's own ratio, measured the same way (same sample size, same number of
queries) by ``dataset_contrast``, crosses that curve at its *equivalent normal dimension*
(``equivalent_dimension``): the dimension in which normal data is as hard to search as the dataset.

Zero nearest distances: a query that coincides with base points (an exact duplicate, or the query
drawn from the base itself) would give an infinite ratio. Those zero distances are ignored and the
nearest *distinct* point counts as the minimum; a query whose every base point is a duplicate of it
(nothing distinct within its shortlist) is skipped, and the number skipped is logged.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .errors import ConfigError
from .exact import check_metric, normalize_rows

log = logging.getLogger(__name__)

DEFAULT_DIMS = tuple(2**i for i in range(11))  # 1, 2, 4, ..., 1024

# Distances are screened with float32 matrix products and the nearest few are recomputed exactly in
# float64: ||q||^2 + ||b||^2 - 2<q, b> loses the small distances to cancellation in float32.
_SHORTLIST = 16
# At or below this dimension the whole distance matrix is computed in float64: the nearest distance
# is then so small relative to the norms that float32 cannot even rank the shortlist correctly.
_FLOAT64_MAX_DIM = 16
_QUERY_BLOCK = 256


@dataclass
class DatasetContrast:
    """A dataset's contrast ratio and where it sits on the standard-normal curve.

    ``clamped`` is None when the ratio lies within the curve, ``"below_range"`` when the data is
    easier than normal data in the smallest dimension measured (equivalent_dimension is that
    dimension), ``"above_range"`` when it is harder than the largest one.
    """

    ratio: float
    equivalent_dimension: float
    clamped: str | None
    metric: str
    dim: int
    n_points: int
    n_queries: int
    n_skipped: int
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curve"] = [[int(x), float(y)] for x, y in self.curve]
        return d


def _exact_rows(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """float64 distances of one query (d,) to rows b (m, d), computed from the differences."""
    diff = b.astype(np.float64) - q.astype(np.float64)
    if metric == "manhattan":
        return np.abs(diff).sum(axis=1)
    return np.sqrt((diff * diff).sum(axis=1))


def _min_max_distances(base: np.ndarray, queries: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Nearest non-zero and farthest distance of each query: float64 (nq,), (nq,); NaN when skipped.

    base: (n, d), queries: (nq, d), already normalised for angular. Returns also how many queries
    were skipped because every shortlisted distance was zero.
    """
    n, dim = base.shape
    nq = queries.shape[0]
    mins = np.full(nq, np.nan)
    maxs = np.full(nq, np.nan)
    skipped = 0
    dtype = np.float64 if dim <= _FLOAT64_MAX_DIM else np.float32
    b = np.ascontiguousarray(base, dtype=dtype)
    b_sq = (b * b).sum(axis=1)
    m = min(_SHORTLIST, n)
    for q0 in range(0, nq, _QUERY_BLOCK):
        q = np.ascontiguousarray(queries[q0 : q0 + _QUERY_BLOCK], dtype=dtype)
        if metric == "manhattan":
            scores = np.stack([np.abs(b - row).sum(axis=1) for row in q])
        else:
            scores = (q * q).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (q @ b.T)
        near = np.argpartition(scores, m - 1, axis=1)[:, :m]
        far = scores.argmax(axis=1)
        for i in range(q.shape[0]):
            d_near = _exact_rows(q[i], base[near[i]], metric)
            d_near = d_near[d_near > 0.0]
            if d_near.size == 0:
                skipped += 1
                continue
            mins[q0 + i] = d_near.min()
            maxs[q0 + i] = _exact_rows(q[i], base[far[i] : far[i] + 1], metric)[0]
    return mins, maxs, skipped


def _prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    check_metric(metric)
    if metric == "dot":
        raise ConfigError("the contrast ratio needs a distance (euclidean, angular, manhattan); "
                          "'dot' scores can be negative, so (max - min) / min means nothing for them")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    return normalize_rows(x) if metric == "angular" else x


def contrast_ratios(base: np.ndarray, queries: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Per-query ``(max - min) / min`` distance to the base; float64 (nq,), NaN for a skipped query.

    base: (n, d), queries: (nq, d), any float or integer dtype. ``angular`` normalises both first
    (the distance is then the Euclidean distance of the unit vectors). See the module docstring for
    how zero distances are treated.
    """
    base, queries = _prepare(base, metric), _prepare(queries, metric)
    if base.shape[1] != queries.shape[1] or base.shape[0] < 2:
        raise ValueError(f"need a base of at least 2 rows of the queries' dimension; "
                         f"got base {base.shape}, queries {queries.shape}")
    mins, maxs, skipped = _min_max_distances(base, queries, metric if metric == "manhattan" else "euclidean")
    if skipped:
        log.warning("contrast ratio: skipped %d of %d queries that only have duplicates in the base shortlist",
                    skipped, len(queries))
    return (maxs - mins) / mins


def contrast_ratio(base: np.ndarray, queries: np.ndarray, metric: str = "euclidean") -> float:
    """Mean over the queries of ``(max - min) / min`` distance to the base rows (see ``contrast_ratios``)."""
    ratios = contrast_ratios(base, queries, metric)
    if np.isnan(ratios).all():
        raise ValueError("every query coincides with all its nearest base rows; the contrast ratio is undefined")
    return float(np.nanmean(ratios))


def normal_curve(
    dims: Sequence[int] = DEFAULT_DIMS, n_points: int = 10_000, n_queries: int = 100, seed: int = 0
) -> list[tuple[int, float]]:
    """``[(d, mean contrast ratio)]`` for standard-normal base points and queries in each dimension d.

    Each dimension draws its own points from ``default_rng([seed, d])``, so a value does not depend
    on which other dimensions are measured. A few seconds for d up to 1024 on 2 cores; the curve is
    a pure function of its arguments, so a process computes each one once.
    """
    return list(_normal_curve(tuple(int(d) for d in dims), int(n_points), int(n_queries), int(seed)))


@functools.lru_cache(maxsize=8)
def _normal_curve(dims: tuple[int, ...], n_points: int, n_queries: int, seed: int) -> tuple[tuple[int, float], ...]:
    out = []
    for d in dims:
        rng = np.random.default_rng([seed, int(d)])
        base = rng.standard_normal((n_points, int(d)), dtype=np.float32)
        queries = rng.standard_normal((n_queries, int(d)), dtype=np.float32)
        out.append((int(d), contrast_ratio(base, queries)))
        log.debug("normal curve: d=%d ratio=%.4g", d, out[-1][1])
    return tuple(out)


def _curve_arrays(curve: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(d), float(r)) for d, r in curve)
    if len(pts) < 2 or any(d <= 0 or not r > 0 for d, r in pts):
        raise ValueError(f"a curve needs at least two (d > 0, ratio > 0) points; got {list(curve)}")
    return np.log([p[0] for p in pts]), np.log([p[1] for p in pts])


def curve_position(ratio: float, curve: Sequence[tuple[int, float]]) -> str | None:
    """None when ``ratio`` lies within the curve's range, else ``"below_range"`` (a ratio larger than
    at the smallest d: easier than any dimension measured) or ``"above_range"`` (harder than the largest)."""
    _, log_r = _curve_arrays(curve)
    if not ratio >= 0:
        raise ValueError(f"ratio must be zero or positive, got {ratio}")
    if ratio == 0:  # every distance equal: no contrast at all, beyond any dimension measured
        return "above_range"
    if math.log(ratio) > log_r.max():
        return "below_range"
    if math.log(ratio) < log_r.min():
        return "above_range"
    return None


def equivalent_dimension(ratio: float, curve: Sequence[tuple[int, float]]) -> float:
    """The dimension d at which the curve, interpolated linearly in (log d, log ratio), equals ``ratio``.

    The curve falls with d; the first crossing from small d is used. Outside the curve's range the
    result is clamped to the smallest or largest d measured (a warning is logged; ``curve_position``
    says which side).
    """
    log_d, log_r = _curve_arrays(curve)
    position = curve_position(ratio, curve)
    if position is not None:
        dims = sorted(float(d) for d, _ in curve)
        clamp = dims[0] if position == "below_range" else dims[-1]
        log.warning("ratio %.4g lies outside the curve (%.4g..%.4g): equivalent dimension clamped to %g",
                    ratio, math.exp(log_r.min()), math.exp(log_r.max()), clamp)
        return clamp
    target = math.log(ratio)
    for i in range(len(log_d) - 1):
        r0, r1 = log_r[i], log_r[i + 1]
        if min(r0, r1) <= target <= max(r0, r1):
            t = 0.0 if r0 == r1 else (target - r0) / (r1 - r0)
            return float(np.exp(log_d[i] + t * (log_d[i + 1] - log_d[i])))
    # Unreachable: a value between the curve's min and max is crossed by some segment.
    raise AssertionError("no crossing found")


def dataset_contrast(
    vectors: np.ndarray,
    sample: int = 10_000,
    n_queries: int = 100,
    seed: int = 0,
    metric: str = "euclidean",
    curve: Sequence[tuple[int, float]] | None = None,
) -> DatasetContrast:
    """A dataset's contrast ratio and equivalent normal dimension.

    vectors: (n, d) float32 or uint8, may be memory-mapped (only the sampled rows are read). Draws
    ``n_queries`` query rows and a disjoint base sample of ``sample`` rows (fewer if the dataset is
    small) with ``seed``. The curve defaults to ``normal_curve`` with the same sample size and query
    count, as the ratio depends on both. For ``angular`` the rows are normalised and compared with
    the normal curve's Euclidean distances.
    """
    n = vectors.shape[0]
    if n < n_queries + 2:
        raise ValueError(f"need at least {n_queries + 2} vectors for {n_queries} queries, got {n}")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(n)[: min(n, sample + n_queries)]
    q_rows, b_rows = np.sort(rows[:n_queries]), np.sort(rows[n_queries:])
    ratios = contrast_ratios(np.asarray(vectors[b_rows]), np.asarray(vectors[q_rows]), metric)
    ratio = float(np.nanmean(ratios))
    if curve is None:
        curve = normal_curve(n_points=len(b_rows), n_queries=n_queries, seed=seed)
    position = curve_position(ratio, curve)
    return DatasetContrast(
        ratio=ratio,
        equivalent_dimension=equivalent_dimension(ratio, curve),
        clamped=position,
        metric=metric,
        dim=int(vectors.shape[1]),
        n_points=len(b_rows),
        n_queries=n_queries,
        n_skipped=int(np.isnan(ratios).sum()),
        curve=[(int(d), float(r)) for d, r in curve],
    )
