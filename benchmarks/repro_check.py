"""Same digest, same bytes: build a chain twice in fresh processes under different settings and
compare every reproducible file by sha256.

    .venv/bin/python benchmarks/repro_check.py mnist mnist-cnn glove [--mirror file://../shared/data]

Run A and run B differ in everything that must not change a stored byte:

| setting | A | B |
| --- | --- | --- |
| OpenBLAS threads (`OPENBLAS_NUM_THREADS`) | 1 | 2 |
| OpenBLAS kernel (`OPENBLAS_CORETYPE`) | the host's | forced (default Prescott) |
| numba target (`NUMBA_CPU_NAME`) | the host CPU | `generic` (own `NUMBA_CACHE_DIR`) |
| `GROVE_THREADS` | 1 | 2 |
| artifact root and working directory | one temp dir | another |

Each run is one `grove run DATASET` process. Both runs must publish the same versions (the digests
do not depend on any of these settings) and, inside each version, every file the manifest does not
mark as measured must have the same sha256. ``--separate`` runs B once per setting instead (to find
which one breaks a file). Prints one table row per dataset and stage; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GROVE = [sys.executable, "-m", "tasks.cli"]


def settings(which: str, work: Path, coretype: str) -> dict[str, str]:
    """Environment of run ``which``: "A", "B" (all of B's settings), or "B:<name>" (just one)."""
    base = {"OPENBLAS_NUM_THREADS": "1", "GROVE_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    changes = {
        "blas_threads": {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
        "blas_kernel": {"OPENBLAS_CORETYPE": coretype},
        "numba_cpu": {"NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(work / "numba-generic")},
        "grove_threads": {"GROVE_THREADS": "2"},
    }
    if which == "A":
        return base
    if which == "B":
        for extra in changes.values():
            base.update(extra)
        return base
    base.update(changes[which.split(":", 1)[1]])
    return base


def run_chain(dataset: str, env_extra: dict[str, str], work: Path, mirror: str | None) -> float:
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "NUMBA_CPU", "GROVE_"))}
    env.update(env_extra, GROVE_ARTIFACTS=str(work / "artifacts"), GROVE_SCRATCH=str(work / "scratch"),
               PYTHONPATH=str(REPO))
    if mirror:
        env["GROVE_MIRROR"] = mirror
    started = time.perf_counter()
    proc = subprocess.run([*GROVE, "run", dataset], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"grove run {dataset} failed in {work} (exit {proc.returncode})")
    return time.perf_counter() - started


def reproducible_files(version_dir: Path) -> dict[str, str]:
    """rel path -> sha256 of every file the manifest lists and does not mark as measured."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    out = {}
    for rel, info in manifest["files"].items():
        if info.get("measured"):
            continue
        out[rel] = hashlib.sha256((version_dir / rel).read_bytes()).hexdigest()
    return out


def compare(dataset: str, root_a: Path, root_b: Path) -> list[dict]:
    rows = []
    for stage_dir in sorted(p for p in (root_a / dataset).iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions_a = {p.name for p in stage_dir.glob("v*-*") if (p / "manifest.json").is_file()}
        if not versions_a:
            continue
        stage_b = root_b / dataset / stage_dir.name
        versions_b = {p.name for p in stage_b.glob("v*-*") if (p / "manifest.json").is_file()}
        row = {"stage": stage_dir.name, "versions": len(versions_a), "same_versions": versions_a == versions_b,
               "files": 0, "identical": 0, "measured": 0, "differ": []}
        for version in sorted(versions_a & versions_b):
            a, b = stage_dir / version, stage_b / version
            files_a, files_b = reproducible_files(a), reproducible_files(b)
            listed = json.loads((a / "manifest.json").read_text())["files"]
            row["measured"] += sum(1 for info in listed.values() if info.get("measured"))
            for rel in sorted(set(files_a) | set(files_b)):
                row["files"] += 1
                if files_a.get(rel) == files_b.get(rel):
                    row["identical"] += 1
                else:
                    row["differ"].append(f"{version}/{rel}")
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", default=["mnist", "mnist-cnn", "glove"])
    parser.add_argument("--mirror", default=SHARED.as_uri() if SHARED.is_dir() else None)
    parser.add_argument("--coretype", default="Prescott", help="OPENBLAS_CORETYPE of run B")
    parser.add_argument("--separate", action="store_true", help="one B run per setting instead of all at once")
    parser.add_argument("--keep", default=None, help="keep the runs' directories here")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="grove-repro-"))
    variants = (["B:blas_threads", "B:blas_kernel", "B:numba_cpu", "B:grove_threads"] if args.separate else ["B"])
    failed = False
    print("| dataset | run B differs in | stage | versions | same digests | files compared | identical | "
          "measured (not compared) | differing |")
    print("|---|---|---|---:|---|---:|---:|---:|---|")
    for dataset in args.datasets:
        dir_a = work / dataset / "A"
        seconds_a = run_chain(dataset, settings("A", work, args.coretype), dir_a, args.mirror)
        for variant in variants:
            dir_b = work / dataset / variant.replace(":", "-")
            seconds_b = run_chain(dataset, settings(variant, work, args.coretype), dir_b, args.mirror)
            label = "everything" if variant == "B" else variant.split(":", 1)[1]
            for row in compare(dataset, dir_a / "artifacts", dir_b / "artifacts"):
                bad = row["differ"] or not row["same_versions"]
                failed |= bool(bad)
                print(f"| {dataset} | {label} | {row['stage']} | {row['versions']} | "
                      f"{'yes' if row['same_versions'] else 'NO'} | {row['files']} | {row['identical']} | "
                      f"{row['measured']} | {', '.join(row['differ']) or '-'} |")
            sys.stdout.flush()
            print(f"<!-- {dataset}: run A {seconds_a:.0f} s, run B ({label}) {seconds_b:.0f} s -->")
    print(f"\nruns kept in {work}" if args.keep else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
