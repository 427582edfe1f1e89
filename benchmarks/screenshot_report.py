"""Render a report page with Debian's headless chromium and save a PNG to look at.

    python benchmarks/screenshot_report.py REPORT.html [--out PNG] [--width 1280] [--height 3000]
    python benchmarks/screenshot_report.py --build ROOT DATASET --out-dir /tmp/grove-report

The second form first writes the report of ``ROOT/DATASET/evaluate/latest`` into ``--out-dir`` (not into the
artifact) plus an index page of ROOT beside it, then screenshots both. Chromium is found on PATH as
``chromium`` or ``chromium-browser``; without it the script says so and exits with status 2. Running as root
needs ``--no-sandbox``, which is passed. Look at the PNG yourself: that is the point of the check.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("screenshot_report")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 3000, timeout: float = 120.0) -> Path:
    """Render ``html`` (a file) to ``png`` with headless chromium; raises RuntimeError if it fails."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed: apt-get install -y chromium")
    png = png.resolve()
    with tempfile.TemporaryDirectory(prefix="grove-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium exited with {proc.returncode} and no {png}:\n{proc.stderr[-2000:]}")
    log.info("%s -> %s (%.1f s)", html, png, time.perf_counter() - started)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", nargs="?", type=Path, help="a report.html or index.html to render")
    p.add_argument("--build", nargs=2, metavar=("ROOT", "DATASET"), help="first build the report from artifacts")
    p.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "grove-report")
    p.add_argument("--out", type=Path, help="the PNG (default: beside the page, .png)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=3000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if find_chromium() is None:
        print("SKIPPED: chromium is not installed (apt-get install -y chromium); nothing was rendered",
              file=sys.stderr)
        return 2
    pages = []
    if args.build:
        from pipeline.report import build_evaluation_report, write_index_page

        root, dataset = Path(args.build[0]), args.build[1]
        started = time.perf_counter()
        report = build_evaluation_report(root, (root / dataset / "evaluate" / "latest").resolve(),
                                         args.out_dir / dataset)
        log.info("built %s in %.1f s", report, time.perf_counter() - started)
        pages += [report, write_index_page(root, args.out_dir / "index.html")]
    elif args.html:
        pages.append(args.html)
    else:
        p.error("give a page to render or --build ROOT DATASET")
    for page in pages:
        out = args.out if args.out and len(pages) == 1 else page.with_suffix(".png")
        print(screenshot(page, out, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
