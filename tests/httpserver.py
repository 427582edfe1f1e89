"""A real HTTP server on a loopback port for tests, with switches to misbehave.

    with LoopbackServer({"/mnist/a.gz": b"..."}) as server:
        server.url("/mnist/a.gz")         # http://127.0.0.1:<port>/mnist/a.gz
        server.cut["/mnist/a.gz"] = 1000  # the next response stops after 1000 bytes and drops the connection
        server.status["/mnist/a.gz"] = [500]  # the next response is a 500 (a list is consumed; an int is forever)
        server.ignore_range = True        # answer Range requests with the whole file (200)
        server.requests                   # [Request(path, headers), ...] in arrival order

Serves GET and HEAD with ``Range: bytes=N-`` / ``bytes=N-M`` support (206, or 416 with
``Content-Range: bytes */size`` past the end). Unknown paths are 404. Runs a
``ThreadingHTTPServer`` on 127.0.0.1 port 0 in a daemon thread.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class Request:
    """One request the server received: its method, path and headers (a plain dict, original case)."""

    method: str
    path: str
    headers: dict[str, str]


class LoopbackServer:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes); use as a context manager."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.cut: dict[str, int | list[int]] = {}
        self.status: dict[str, int | list[int]] = {}
        self.ignore_range = False
        # path -> bytes after which the response hangs (a client stuck mid-download, to be killed)
        self.stall: dict[str, int | list[int]] = {}
        self.stalling = threading.Event()  # set once a response has started hanging
        self._closing = threading.Event()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        """Return the absolute http:// URL of ``path`` (which starts with "/") on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_for(self, path: str) -> list[Request]:
        """Return the requests received for ``path`` so far."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> LoopbackServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _take(self, switches: dict[str, int | list[int]], path: str) -> int | None:
        """Return the switch for ``path``: an int stays, a list yields its next item once."""
        with self._lock:
            value = switches.get(path)
            if isinstance(value, list):
                if not value:
                    return None
                return value.pop(0)
            return value


def free_port() -> int:
    """Return a loopback port that nothing listens on (bound, then closed): connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _handler_for(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet; the requests are recorded in ``server.requests``."""

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            with server._lock:
                server.requests.append(Request(self.command, path, dict(self.headers.items())))
            status = server._take(server.status, path)
            if status is not None:
                self._reply_empty(status)
                return
            data = server.files.get(path)
            if data is None:
                self._reply_empty(404)
                return
            start, end, code = 0, len(data) - 1, 200
            match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            if match and not server.ignore_range:
                start = int(match.group(1))
                end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
                if start >= len(data) or start > end:
                    self._reply_empty(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
                code = 206
            chunk = data[start:end + 1]
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if not body:
                return
            stall = server._take(server.stall, path)
            if stall is not None and stall < len(chunk):
                self.wfile.write(chunk[:stall])
                self.wfile.flush()
                server.stalling.set()
                server._closing.wait(30)
                self.close_connection = True
                return
            cut = server._take(server.cut, path)
            if cut is not None and cut < len(chunk):
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(chunk)

        def _reply_empty(self, code: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
