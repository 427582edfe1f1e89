"""`grove serve` under load (issue 15, "Measure"): a bounded load generator on loopback.

For each dataset, `grove serve DATASET --port 0` runs in its own process on an artifact root that holds at
least two evaluate versions of it. N client threads of this process (each with one keep-alive
http.client connection) send POST /query for a fixed time, and every request's latency is recorded
from the client's side (send to last byte read). Three phases per dataset:

  single     one held-out query vector per request ({"vector": [...], "k": 10})
  batch      B held-out query vectors per request ({"vector": [[...], ...], "k": 10}); QPS counts
             requests, vec/s vectors
  promotion  as `single`, and half-way through `grove promote DATASET OTHER` (a separate process, as a
             user runs it) swaps the serving version; the server follows it within its --poll interval.
             "failed" counts requests that did not get a 200 (connection errors included): the target is
             zero. "promote s" is how long the `grove promote` process took (interpreter start included);
             "switch s" is from its end (the pointer was swapped by then) to the first answer from the new
             version: the server's --poll interval plus opening and verifying the new version (negative: it
             switched before the promote process had exited).

The queries are the split's held-out vectors (read through pipeline.api in this process), so every
request does real work; search_k is the index default (k * n_trees) unless --search-k is given. The
server and the load generator share the machine's cores: on a 2-core machine the figures are the
service's throughput with a Python client beside it, not the index's alone (see `grove run`'s QPS).

    GROVE_ARTIFACTS=/tmp/api-art .venv/bin/python benchmarks/service_load.py --datasets mnist glove \\
        [--clients 4] [--seconds 10] [--batch 10] [--out FILE]

The root must hold two evaluate versions per dataset (e.g. `grove run` twice with different
[forest] seed values in a GROVE_CONFIGS directory); the serving one (or the newest) is promoted first
and served again at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import api, artifacts, lifecycle  # noqa: E402

GROVE = [sys.executable, "-m", "tasks.cli"]


def start_server(dataset: str, env: dict, poll: float) -> tuple[subprocess.Popen, int, list[str]]:
    proc = subprocess.Popen([*GROVE, "serve", dataset, "--port", "0", "--poll", str(poll)], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(600) or proc.poll() is not None:
        raise SystemExit(f"grove serve {dataset} did not start:\n{''.join(lines)}")
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
    return proc, port, lines


def run_phase(port: int, bodies: list[bytes], clients: int, seconds: float,
              during: "callable | None" = None) -> dict:
    """N clients for ``seconds``; ``during()`` is called half-way (in this thread). Per request:
    (start time, latency s, status, version)."""
    records: list[list[tuple[float, float, int, str | None]]] = [[] for _ in range(clients)]
    stop = threading.Event()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = n
        while not stop.is_set():
            body = bodies[i % len(bodies)]
            i += clients
            started = time.perf_counter()
            try:
                conn.request("POST", "/query", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                status = response.status
                version = json.loads(data).get("version") if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                status, version = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            records[n].append((started, time.perf_counter() - started, status, version))
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    event = None
    if during is not None:
        time.sleep(seconds / 2)
        called = time.perf_counter()
        new_version = during()
        event = (called, time.perf_counter(), new_version)
        time.sleep(max(0.0, began + seconds - time.perf_counter()))
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    flat = sorted((r for rs in records for r in rs), key=lambda r: r[0])
    ok = [r for r in flat if r[2] == 200]
    latencies = sorted(r[1] for r in ok)

    def pct(p: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    out = {"requests": len(flat), "failed": len(flat) - len(ok), "qps": len(ok) / elapsed,
           "p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": 1e3 * statistics.fmean(latencies) if latencies else
           float("nan"), "versions": sorted({r[3] for r in ok})}
    if event is not None:
        called, returned, new_version = event
        first_new = next((r[0] + r[1] for r in ok if r[3] == new_version), None)
        out["promote_s"] = returned - called
        out["switch_s"] = None if first_new is None else first_new - returned
        out["old_after_switch"] = sum(1 for r in ok if first_new is not None and r[0] > first_new and
                                      r[3] != new_version)
    return out


def bench_dataset(dataset: str, root: str, env: dict, args) -> list[dict]:
    from pipeline.stages import FORMATS

    versions = [m["version"] for m in artifacts.list_versions(root, dataset, "evaluate")
                if m.get("format") == FORMATS["evaluate"]]  # versions this grove reads
    serving = lifecycle.serving_version(root, dataset)
    start = serving if serving in versions else versions[-1]
    others = [v for v in versions if v != start and _forest_of(root, dataset, v) != _forest_of(root, dataset, start)]
    others = others or [v for v in versions if v != start]
    if not others:
        raise SystemExit(f"{dataset}: the root {root} holds one evaluate version; build a second one (see --help)")
    other = others[-1]
    lifecycle.promote(root, dataset, start, reason="service_load: start")
    with api.open_index(dataset, root=root) as index:
        keys = index.held_out_keys()[: args.queries]
        vectors = [index.vector(key).astype(float).round(6).tolist() for key in keys]
        n_trees, dim, count = index.n_trees, index.dim, index.count
    extra = {} if args.search_k is None else {"search_k": args.search_k}
    singles = [json.dumps({"dataset": dataset, "vector": v, "k": args.k, **extra}).encode() for v in vectors]
    batches = [json.dumps({"dataset": dataset, "vector": vectors[i: i + args.batch], "k": args.k, **extra}).encode()
               for i in range(0, len(vectors) - args.batch + 1, args.batch)]
    proc, port, lines = start_server(dataset, env, args.poll)
    rows = []
    try:
        run_phase(port, singles[:50], args.clients, 2.0)  # warm: compile, page cache, key tables
        common = {"dataset": dataset, "count": count, "dim": dim, "n_trees": n_trees,
                  "search_k": args.search_k or args.k * n_trees, "clients": args.clients, "seconds": args.seconds}
        rows.append({**common, "phase": "single", "vectors": 1, **run_phase(port, singles, args.clients, args.seconds)})
        rows.append({**common, "phase": "batch", "vectors": args.batch,
                     **run_phase(port, batches, args.clients, args.seconds)})

        def promote() -> str:
            done = subprocess.run([*GROVE, "promote", dataset, other], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=300)
            if done.returncode:
                raise SystemExit(f"grove promote failed: {done.stderr}")
            return other

        rows.append({**common, "phase": "promotion", "vectors": 1,
                     **run_phase(port, singles, args.clients, args.seconds, during=promote)})
        health = json.loads(_get(port, "/health"))["datasets"][dataset]
        rows[-1]["mapped_after"] = health["mapped_versions"]
        old_forest = str(Path(root) / dataset / "forest" / _forest_of(root, dataset, start)) + "/"
        rows[-1]["old_mapped"] = old_forest in Path(f"/proc/{proc.pid}/maps").read_text() \
            if _forest_of(root, dataset, start) != _forest_of(root, dataset, other) else None
    finally:
        proc.terminate()
        proc.wait(60)
        lifecycle.promote(root, dataset, start, reason="service_load: end")
    warnings = [line.strip() for line in lines if "warning" in line.lower() or "error" in line.lower()]
    if warnings:
        print("\n".join(warnings), file=sys.stderr)
    return rows


def _forest_of(root: str, dataset: str, version: str) -> str:
    manifest = artifacts.read_manifest(artifacts.ref_from_key(root, f"{dataset}/evaluate/{version}"), verify="none")
    return api._forest_of(root, manifest).version


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def table(rows: list[dict]) -> str:
    head = ("| dataset | phase | clients | vectors/request | requests | QPS | vec/s | p50 ms | p95 ms | p99 ms "
            "| failed | promote s | switch s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        switch = " | " if r["phase"] != "promotion" else f"{r['promote_s']:.2f} | " + (
            f"{r['switch_s']:.2f}" if r.get("switch_s") is not None else "no switch")
        lines.append(f"| {r['dataset']} ({r['count']:,} x {r['dim']}, {r['n_trees']} trees, search_k {r['search_k']}) "
                     f"| {r['phase']} | {r['clients']} | {r['vectors']} | {r['requests']:,} | {r['qps']:,.0f} "
                     f"| {r['qps'] * r['vectors']:,.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
                     f"| {r['failed']} | {switch} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "glove"])
    p.add_argument("--root", default=None, help="artifact root (default: GROVE_ARTIFACTS / luigi.cfg, as grove)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    p.add_argument("--batch", type=int, default=10, help="vectors per batch request (default 10)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--search-k", type=int, default=None)
    p.add_argument("--queries", type=int, default=1000, help="distinct held-out query vectors (default 1000)")
    p.add_argument("--poll", type=float, default=1.0, help="the server's --poll (default 1 s)")
    p.add_argument("--out", default=None, help="also write the table (markdown) and the raw rows (.json) here")
    args = p.parse_args()
    root = str(args.root or api.default_root())
    env = {**os.environ, "GROVE_ARTIFACTS": root}
    rows = []
    for dataset in args.datasets:
        rows += bench_dataset(dataset, root, env, args)
        print(table(rows[-3:]), flush=True)
    text = table(rows)
    notes = [f"- {r['dataset']} promotion: versions answered {', '.join(r['versions'])}; answers from the old version "
             f"after the first new one: {r['old_after_switch']}; versions mapped afterwards: {r['mapped_after']}; "
             f"old forest still in /proc/PID/maps: {r['old_mapped']}" for r in rows if r["phase"] == "promotion"]
    print("\n" + text + "\n" + "\n".join(notes))
    if args.out:
        Path(args.out).write_text(text + "\n\n" + "\n".join(notes) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
