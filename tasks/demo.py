"""Which MNIST ``make demo`` runs: the full ``mnist`` when its files can be fetched, else ``mnist-small``.

``python -m tasks.demo`` prints the dataset name on stdout (the Makefile runs it) and, when it falls
back, says why on stderr. ``mnist`` can be fetched when every one of its sources has a URL that answers:
a file in the mirror (``GROVE_MIRROR`` or luigi.cfg ``[grove] mirror``, as ``grove run`` uses it), or
the first of the config's public URLs that answers a HEAD request. All probes share one deadline of
a few seconds, so an offline machine decides quickly. ``mnist-small`` needs nothing: its files are
installed with grove (``package://``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from pipeline.config import load_config
from pipeline.download import candidate_urls, probe

FULL, SMALL = "mnist", "mnist-small"


def unreachable(dataset: str, mirror: str | None, config_dir: str | None = None, timeout: float = 5.0) -> str | None:
    """Why some source of ``dataset`` cannot be fetched now (None when every one can).

    Each source's URLs are tried in the order ``fetch`` tries them (the mirror first); a source is
    available when one of them answers. Every probe ends within ``timeout`` seconds in all, name
    resolution included (a probe still running then counts as failed).
    """
    cfg = load_config(dataset, config_dir)
    deadline = time.monotonic() + timeout
    for name, src in cfg.sources.items():
        urls = candidate_urls(src.filename, src.urls, mirror or "", cfg.dataset.mirror_subdir)
        reasons = []
        for url in urls:
            left = deadline - time.monotonic()
            reason = _probe_within(url, left) if left > 0 else "no time left"
            if reason is None:
                break
            reasons.append(f"{url}: {reason}")
        else:
            tried = reasons[0] if reasons else "no URL and no mirror"
            more = f" (and {len(reasons) - 1} more URL(s) failed)" if len(reasons) > 1 else ""
            where = "" if mirror else "no mirror is set (GROVE_MIRROR), and "
            return f"{where}nothing delivers {src.filename} (sources.{name}): {tried}{more}"
    return None


def _probe_within(url: str, seconds: float) -> str | None:
    """``probe(url)``, given up after ``seconds`` (the DNS lookup it may block in has no timeout)."""
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(probe(url, timeout=seconds)), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else f"no answer within {seconds:.1f} s"


def choose(mirror: str | None, config_dir: str | None = None, timeout: float = 5.0) -> tuple[str, str | None]:
    """(the MNIST dataset to run, why the full one cannot be fetched or None)."""
    why = unreachable(FULL, mirror, config_dir, timeout)
    return (FULL, None) if why is None else (SMALL, why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for all probes together (default 5)")
    args = parser.parse_args(argv)
    from .base import grove

    settings = grove()
    dataset, why = choose(settings.mirror_prefix(), settings.config_dir(), args.timeout)
    if why is not None:
        print(f"MNIST cannot be fetched: {why}.\nRunning {SMALL} instead: the 10,000 MNIST test images "
              f"installed with grove (9,000 indexed, 1,000 queries). Set GROVE_MIRROR to a copy of the MNIST "
              f"files for the full 60,000-image {FULL}.", file=sys.stderr)
    print(dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
