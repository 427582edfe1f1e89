"""`grove serve`: a real uvicorn server in its own process on a free loopback port, queried with the
standard library's HTTP client: health, single and batch queries, every kind of bad request (a 4xx,
and the server keeps answering), and `grove promote` during a stream of queries from several client
threads (no failed request, the answers switch, the old version is unmapped)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_api import DATASET, _forest_dir, two_versions
from tasks.cli import main as grove

GROVE = [sys.executable, "-m", "tasks.cli"]


class Server:
    """``grove serve`` in a subprocess; ``url``, ``port`` and ``pid`` once it listens; its stderr in ``lines``."""

    def __init__(self, env: dict, *datasets: str, poll: float = 0.2):
        self.proc = subprocess.Popen([*GROVE, "serve", *datasets, "--port", "0", "--poll", str(poll)], cwd=REPO,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(120):
            self.stop()
            pytest.fail("grove serve did not start:\n" + "".join(self.lines))
        found = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", "".join(self.lines))
        if found is None:
            self.stop()
            pytest.fail("grove serve did not start:\n" + "".join(self.lines))
        self.url, self.port = found.group(1), int(found.group(2))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()  # it ended

    def maps(self) -> str:
        return Path(f"/proc/{self.pid}/maps").read_text()

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)


def request(port: int, method: str, path: str, body=None, raw: bytes | str | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request (on ``connection`` when given: keep-alive)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if connection is None:
            conn.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return two_versions(tmp_path_factory)


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    env = {**os.environ, **built["env"], "GROVE_SCRATCH": str(tmp_path_factory.mktemp("serve-scratch"))}
    server = Server(env, DATASET)
    yield server
    server.stop()


def _health(server: Server) -> dict:
    status, answer = request(server.port, "GET", "/health")
    assert status == 200, answer
    return answer["datasets"][DATASET]


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- answers --------------------------------------------------------------------------------------


def test_health_names_the_version_that_serves(server, built):
    assert _wait_for(lambda: _health(server)["version"] == built["first"])
    health = _health(server)
    assert (health["metric"], health["dim"], health["count"], health["n_trees"], health["kind"]) == \
        ("euclidean", 784, 400, 4, "idx")
    assert health["mapped_versions"] == 1 and health["refresh_error"] is None


def test_single_and_batch_queries(server, built):
    status, answer = request(server.port, "POST", "/query", {"dataset": DATASET, "key": "train/4", "k": 3,
                                                            "search_k": 5000})
    assert status == 200, answer
    assert answer["dataset"] == DATASET and answer["version"] == built["first"]
    # train/4 is a copy of train/1 (see tiny_digits): itself left out, its twin first, at distance 0
    assert answer["keys"][0] == "train/1" and answer["ids"][0] == 1 and answer["distances"][0] == 0.0
    assert len(answer["keys"]) == len(answer["ids"]) == len(answer["distances"]) == 3

    image = built["train"][0][1].reshape(-1).astype(float).tolist()  # train/1's pixels (the embedding is the pixels)
    status, single = request(server.port, "POST", "/query", {"dataset": DATASET, "vector": image, "k": 2,
                                                            "distances": False})
    assert status == 200 and single["keys"][0] in ("train/1", "train/4") and single["distances"] is None
    status, batch = request(server.port, "POST", "/query", {"dataset": DATASET, "vector": [image, image], "k": 2})
    assert status == 200 and batch["version"] == built["first"] and len(batch["results"]) == 2
    assert [r["keys"] for r in batch["results"]] == [single["keys"]] * 2
    assert batch["results"][0]["distances"][0] == 0.0


LIMIT = 1_000_000


@pytest.mark.parametrize("body, status, shown", [
    ({"dataset": "nosuch", "key": "train/1"}, 404, "unknown dataset 'nosuch'; this service answers for 'tinymnist'"),
    ({"dataset": DATASET, "key": "train/99999"}, 404, "no item with key 'train/99999'"),
    ({"dataset": DATASET, "vector": [0.5] * 783}, 400, "must have dimension 784, got shape (783,)"),
    ({"dataset": DATASET, "vector": [[0.5] * 784, [0.5] * 10]}, 400, "'vector'[1] must have dimension 784, got 10"),
    ('{"dataset": "tinymnist", "vector": [NaN' + ", 0.5" * 783 + "]}", 400, "NaN at 0"),
    ('{"dataset": "tinymnist", "vector": [[0.5' + ", 0.5" * 782 + ", -Infinity]]}", 400, "infinity"),
    ({"dataset": DATASET, "vector": [1e39] * 784}, 400, "beyond float32"),
    ({"dataset": DATASET, "key": "train/1", "k": 0}, 400, "'k' must be an integer from 1 to 1000, got 0"),
    ({"dataset": DATASET, "key": "train/1", "k": 1001}, 400, "got 1001"),
    ({"dataset": DATASET, "key": "train/1", "k": "3"}, 400, 'got "3"'),
    ({"dataset": DATASET, "key": "train/1", "k": True}, 400, "got true"),
    ({"dataset": DATASET, "key": "train/1", "k": 2.5}, 400, "got 2.5"),
    ({"dataset": DATASET, "key": "train/1", "search_k": -5}, 400, "'search_k' must be an integer >= 0"),
    ({"dataset": DATASET, "key": "train/1", "distances": "yes"}, 400, "'distances' must be true or false"),
    ('{"dataset": "tinymnist", "key": ', 400, "not valid JSON"),
    (b'\xff\xfe{}', 400, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, 400, "not valid JSON"),
    ([1, 2, 3], 400, "must be a JSON object, not a list"),
    ({"key": "train/1"}, 400, "'dataset' must be a string"),
    ({"dataset": DATASET}, 400, "give exactly one of 'vector', 'key' or 'text'"),
    ({"dataset": DATASET, "key": "train/1", "vector": [0.5] * 784}, 400, "(got vector, key)"),
    ({"dataset": DATASET, "key": 3}, 400, "'key' must be a string, got a number"),
    ({"dataset": DATASET, "vector": "train/1"}, 400, "'vector' must be a non-empty list"),
    ({"dataset": DATASET, "vector": []}, 400, "'vector' must be a non-empty list"),
    ({"dataset": DATASET, "vector": [[0.5]] * 1001}, 400, "a batch holds at most 1000 vectors"),
    ({"dataset": DATASET, "vector": ["a"] * 784}, 400, "entry 0 is a string"),
    ({"dataset": DATASET, "vector": [True] * 784}, 400, "entry 0 is a boolean"),
    ({"dataset": DATASET, "text": "seven"}, 400, "not a word dataset"),
    ({"dataset": DATASET, "key": "train/1", "search-k": 10}, 400, "unknown field(s) 'search-k'"),
    ("x" * (LIMIT + 1), 413, f"has {LIMIT + 1} bytes; the limit is {LIMIT}"),
])
def test_a_bad_request_is_a_4xx_and_the_service_keeps_serving(server, body, status, shown):
    raw = body if isinstance(body, (str, bytes)) else None
    got, answer = request(server.port, "POST", "/query", body=None if raw is not None else body, raw=raw)
    assert (got, answer["status"]) == (status, status), answer
    assert shown in answer["error"]
    assert request(server.port, "POST", "/query", {"dataset": DATASET, "key": "train/4", "k": 1})[0] == 200


def test_wrong_method_and_path(server):
    assert request(server.port, "GET", "/query")[0] == 405
    status, answer = request(server.port, "GET", "/nothing")
    assert status == 404 and "use GET /health or POST /query" in answer["error"]
    assert request(server.port, "POST", "/health", {})[0] == 405


def _raw_exchange(port: int, head: bytes, body: bytes) -> bytes:
    """Send a request head and part of its body, then read what comes back (at most 64 KB)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 40:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_body_too_large_is_refused_without_reading_it(server):
    # Content-Length says 50 MB; 64 KB of it are sent and the answer comes at once, not after 50 MB
    head = (b"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    started = time.monotonic()
    answer = _raw_exchange(server.port, head, b"[" * 65536)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"the limit is 1000000" in answer
    assert time.monotonic() - started < 5
    # no Content-Length (chunked): refused as soon as the limit is passed
    chunk = b"[" * 200_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6))  # 1.2 MB, unterminated
    head = b"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = _raw_exchange(server.port, head, body)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"over the limit of 1000000 bytes" in answer
    assert request(server.port, "GET", "/health")[0] == 200


def test_concurrent_requests_are_answered_together(server):
    """Queries run off the event loop: many clients at once all get their answers."""
    results, errors = [], []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for i in range(20):
                results.append(request(server.port, "POST", "/query",
                                       {"dataset": DATASET, "key": f"test/{i}", "k": 5}, connection=conn)[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [200] * 160


# --- the command ----------------------------------------------------------------------------------


def test_serve_command_errors(server, built, tmp_path, monkeypatch, capsys):
    for name, value in built["env"].items():
        monkeypatch.setenv(name, value)
    assert grove(["serve", DATASET, "--port", str(server.port)]) == 2  # the running server has it
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"grove serve: cannot listen on 127.0.0.1:{server.port}: Address already in use; another "
                   "process listens there (another grove serve?); choose another --port"]
    assert grove(["serve", DATASET, "--port", "70000"]) == 2
    assert "--port must be from 0 (any free port) to 65535, got 70000" in capsys.readouterr().err
    assert grove(["serve", DATASET, "--poll", "0"]) == 2
    assert grove(["serve", DATASET, "--host", "no.such.host.invalid", "--port", "0"]) == 2
    assert "cannot listen on no.such.host.invalid:0: unknown host" in capsys.readouterr().err
    assert grove(["serve", "nosuch", "--port", "0"]) == 2
    assert "no dataset 'nosuch' under the artifact root" in capsys.readouterr().err
    (tmp_path / "root" / DATASET / "evaluate").mkdir(parents=True)
    monkeypatch.setenv("GROVE_ARTIFACTS", str(tmp_path / "root"))
    assert grove(["serve", DATASET, "--port", "0"]) == 3
    assert "tinymnist: nothing is serving yet" in capsys.readouterr().err


def test_ctrl_c_stops_it_cleanly(built, tmp_path):
    env = {**os.environ, **built["env"], "GROVE_SCRATCH": str(tmp_path / "scratch")}
    server = Server(env, DATASET)
    assert request(server.port, "GET", "/health")[0] == 200
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in "".join(server.lines)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


# --- following promotions --------------------------------------------------------------------------


def test_a_damaged_version_is_refused_and_the_serving_one_keeps_answering(server, built):
    from pipeline import lifecycle

    root, first, second = built["root"], built["first"], built["second"]
    assert _wait_for(lambda: _health(server)["version"] == first)
    vectors = _forest_dir(root, second) / "index" / "vectors.npy"
    data = vectors.read_bytes()
    mark = len(server.lines)
    try:
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        vectors.write_bytes(bytes(damaged))
        lifecycle.promote(root, DATASET, second)
        assert _wait_for(lambda: _health(server)["refresh_error"] is not None)
        health = _health(server)
        assert health["version"] == first and "vectors.npy: sha256" in health["refresh_error"]
        status, answer = request(server.port, "POST", "/query", {"dataset": DATASET, "key": "test/3"})
        assert status == 200 and answer["version"] == first
        time.sleep(1.0)  # several polls: the damage is reported once, and not hashed again each time
    finally:
        vectors.write_bytes(data)
        lifecycle.promote(root, DATASET, first)
    assert _wait_for(lambda: _health(server)["refresh_error"] is None)
    warned = [line for line in server.lines[mark:] if "cannot be opened" in line]
    assert len(warned) == 1 and f"tinymnist: keeps answering from {first}" in warned[0]


# --- following a promotion under load -------------------------------------------------------------


def test_a_promotion_under_load_switches_versions_without_a_failed_request(server, built):
    first, second = built["first"], built["second"]
    old_forest, new_forest = _forest_dir(built["root"], first), _forest_dir(built["root"], second)
    assert _wait_for(lambda: _health(server)["version"] == first)
    assert str(old_forest) in server.maps() and str(new_forest) not in server.maps()
    mark = len(server.lines)
    image = built["test"][0][3].reshape(-1).astype(float).tolist()
    bodies = [{"dataset": DATASET, "key": "test/3", "k": 5}, {"dataset": DATASET, "vector": image, "k": 5},
              {"dataset": DATASET, "vector": [image] * 3, "k": 5}]
    answers: list[list[tuple[int, str | None]]] = [[] for _ in range(4)]
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # keep-alive
        i = 0
        while not stop.is_set():
            try:
                status, answer = request(server.port, "POST", "/query", bodies[(i + n) % 3], connection=conn)
                answers[n].append((status, answer.get("version")))
                if status != 200:
                    failures.append(f"{status}: {answer}")
            except Exception as exc:  # noqa: BLE001 - a failed request is what this test counts
                failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        promoted = subprocess.run([*GROVE, "promote", DATASET, second], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, **built["env"]}, timeout=120)
        assert promoted.returncode == 0, promoted.stderr
        switched = _wait_for(lambda: all(sum(v == second for _, v in a) >= 10 for a in answers), 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert switched, [a[-3:] for a in answers]
    assert failures == []
    total = sum(len(a) for a in answers)
    assert total >= 80 and all(status == 200 for a in answers for status, _ in a)
    for a in answers:  # each client: the old version until the switch, then only the new one
        versions = [v for _, v in a]
        assert versions[0] == first and versions[-1] == second
        assert first not in versions[versions.index(second):]
    assert _wait_for(lambda: _health(server)["mapped_versions"] == 1)
    assert _health(server)["version"] == second and _health(server)["swaps"] >= 1
    assert _wait_for(lambda: str(old_forest) not in server.maps()), "the old version's files are still mapped"
    assert str(new_forest) in server.maps()
    assert any(f"switched to {second}" in line for line in server.lines[mark:])
    assert not [line for line in server.lines[mark:] if "warning" in line.lower() or "error" in line.lower()]
