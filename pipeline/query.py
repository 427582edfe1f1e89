"""What `grove query` prints: the approximate and the exact answer side by side (the query itself is
``pipeline.api``'s; ``tasks/cli.py`` decides what TEXT|ID stands for)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Answer:
    """The k nearest base items of one query: their keys (k str), dists float32 (k,), seconds of the search."""

    keys: list[str]
    dists: np.ndarray
    seconds: float


def format_answers(approx: Answer | None, truth: Answer | None) -> str:
    """The two answers side by side, with the time each took."""
    columns = [(name, a) for name, a in (("approximate", approx), ("exact", truth)) if a is not None]
    rows = max(len(a.keys) for _, a in columns)
    width = max(12, *(len(key) for _, a in columns for key in a.keys))
    head = "  ".join(f"{f'{name} ({a.seconds * 1e3:.2f} ms)':<{width + 10}}" for name, a in columns)
    lines = [f"{'#':>3}  {head}"]
    for i in range(rows):
        cells = []
        for _, a in columns:
            cells.append(f"{a.keys[i]:<{width}} {a.dists[i]:8.4f}" if i < len(a.keys) else " " * (width + 9))
        lines.append(f"{i + 1:>3}  " + "  ".join(f"{c:<{width + 10}}" for c in cells))
    return "\n".join(lines)
