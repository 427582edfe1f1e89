"""``grove serve``: the serving indexes of some datasets over HTTP with JSON (Starlette on uvicorn).

    GET  /health   200 {"status": "ok", "datasets": {"mnist": {"version": "v2-...", "dim": 784, ...}}}
    POST /query    {"dataset": "mnist", "key": "test/3", "k": 5}
                   {"dataset": "mnist", "vector": [0.0, ...], "k": 10, "search_k": 500}
                   {"dataset": "glove", "text": "chinese river"}
                   {"dataset": "mnist", "vector": [[...], [...]]}          a batch: one answer per row
              ->   200 {"dataset", "version", "keys", "ids", "distances"}     (a batch: "results": [...])

Optional fields: ``k`` (default 10, 1..``MAX_K``), ``search_k`` (default k * n_trees), ``distances``
(default true). A bad request gets a JSON ``{"error": message, "status": code}``: 400 for malformed
JSON, wrong types, a wrong dimension, NaN or infinity, k or search_k out of range; 404 for an unknown
dataset or key; 413 for a body over ``MAX_BODY_BYTES`` (refused from its Content-Length, or as soon as
that many bytes have come); 405 for another method. The service keeps serving.

Each dataset's handle (``pipeline.api.Index``) follows its serving pointer: a background task calls
``refresh()`` every ``poll_seconds``, so ``grove promote``, ``grove rollback`` and ``grove rebuild``
take effect without a restart; requests in flight finish on the version they started on and the old
version is unmapped after them. A version that cannot be opened (damaged, missing) is logged and the
current one keeps answering. Queries run in a thread pool (the index kernels release the GIL), so
concurrent requests use every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import api
from .errors import ConfigError, GroveError, IndexMismatchError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused (413)
MAX_K = 1000  # the most neighbours one query may ask for
MAX_BATCH = 1000  # the most vectors one batch may hold
POLL_SECONDS = 1.0  # how often the serving pointers are read
RETRY_SECONDS = 30.0  # a version that failed to open is tried again after this long (or when the pointer moves)
_FIELDS = ("dataset", "vector", "key", "text", "k", "search_k", "distances")


class ListenError(GroveError, OSError):
    """The service cannot listen on the host and port it was given (in use, not allowed, unknown host)."""


class BadRequest(Exception):
    """A request the service refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- opening and listening ------------------------------------------------------------------------


def open_indexes(datasets: list[str], root: str | os.PathLike | None = None) -> dict[str, api.Index]:
    """The serving index of each dataset (each once), opened and verified; on any error the ones
    opened so far are closed and the error (UnknownDatasetError, NotServingError, ArtifactError,
    StoreError) is raised."""
    indexes: dict[str, api.Index] = {}
    try:
        for name in dict.fromkeys(datasets):
            indexes[name] = api.open_index(name, root=root)
    except BaseException:
        for index in indexes.values():
            index.close()
        raise
    return indexes


def listen(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port); ListenError in one line when the
    address is in use, not allowed or unknown."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {host}:{port}: unknown host ({exc}); give an address such as "
                          "127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = {errno.EADDRINUSE: "another process listens there (another grove serve?); choose another --port",
                errno.EACCES: "not allowed for this user (ports below 1024 need privileges); choose a port above 1023",
                errno.EADDRNOTAVAIL: "this machine has no such address; use 127.0.0.1 or one of its addresses"}
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          f"{hint.get(exc.errno, 'choose another --host or --port')}") from None
    return sock


def serve(datasets: list[str], root: str | os.PathLike | None = None, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, poll_seconds: float = POLL_SECONDS,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Answer queries on ``host``:``port`` until SIGINT or SIGTERM (requests in flight finish first).

    The port is taken first (ListenError when it cannot be), then every dataset's serving index is
    opened and verified (its errors are raised before anything is served). ``on_ready(url)`` is
    called once the socket listens and the indexes are open."""
    import uvicorn

    sock = listen(host, port)
    try:
        indexes = open_indexes(datasets, root)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    if not _is_loopback(bound_host):
        log.warning("listening on %s: other machines can query it (the API has no authentication)", bound_host)
    service = Service(indexes, poll_seconds=poll_seconds)
    config = uvicorn.Config(service.app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10, server_header=False)
    served = ", ".join(f"{name} {index.version}" for name, index in indexes.items())
    log.info("grove serve: listening on %s (%s); Ctrl-C stops it", url, served)
    if on_ready is not None:
        on_ready(url)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down for
        pass
    finally:
        sock.close()
        for index in indexes.values():
            index.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the application ------------------------------------------------------------------------------


class Service:
    """The ASGI application (``.app``) over some opened indexes, and the task that refreshes them."""

    def __init__(self, indexes: dict[str, api.Index], poll_seconds: float = POLL_SECONDS,
                 max_body: int = MAX_BODY_BYTES, max_k: int = MAX_K, max_batch: int = MAX_BATCH):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.indexes = dict(indexes)
        self.poll_seconds = float(poll_seconds)
        self.max_body, self.max_k, self.max_batch = int(max_body), int(max_k), int(max_batch)
        self.refresh_errors: dict[str, str] = {}
        self._retry: dict[str, tuple[str | None, float]] = {}  # dataset -> (pointer that failed, when to retry)
        # refreshes get their own thread: they may hash a new version for seconds, and must not
        # wait behind the requests' thread pool (nor hold a thread it needs)
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grove-refresh")
        self.app = Starlette(routes=[Route("/health", self.health, methods=["GET"]),
                                     Route("/query", self.query, methods=["POST"])],
                             exception_handlers={BadRequest: _bad_request, 404: _not_found, 405: _not_allowed},
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        task = asyncio.create_task(self._poll())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._refresher.shutdown(wait=False, cancel_futures=True)

    # --- following promotions -------------------------------------------------------------------

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_seconds)
            for name, index in self.indexes.items():
                try:
                    await loop.run_in_executor(self._refresher, self._refresh, name, index)
                except Exception:  # noqa: BLE001 - the poller must outlive anything one refresh does
                    log.exception("%s: refreshing the serving version failed", name)

    def _refresh(self, name: str, index: api.Index) -> None:
        """One dataset's refresh. A version that fails to open (damaged, missing) is logged once and
        tried again after RETRY_SECONDS, or at once when the pointer moves on; meanwhile the current
        version keeps answering."""
        pointer, read = None, False
        try:
            pointer, read = index.pointer(), True  # one read
            failed = self._retry.get(name)
            if failed is not None and failed[0] == pointer and time.monotonic() < failed[1]:
                return
            changed = index.refresh()
        except (GroveError, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            if self.refresh_errors.get(name) != message:
                log.warning("%s: keeps answering from %s; the serving version cannot be opened: %s",
                            name, index.version, message)
            self.refresh_errors[name] = message
            if read:  # what the pointer names failed to open; a pointer that cannot be read is read again
                self._retry[name] = (pointer, time.monotonic() + RETRY_SECONDS)
            return
        self._retry.pop(name, None)
        if self.refresh_errors.pop(name, None) is not None and not changed:
            log.info("%s: the serving version is readable again (%s)", name, index.version)
        if changed:
            log.info("%s: switched to %s", name, index.version)

    # --- endpoints ------------------------------------------------------------------------------

    async def health(self, request):
        from starlette.responses import JSONResponse

        datasets = {}
        for name, index in self.indexes.items():
            datasets[name] = {"version": index.version, "forest_version": index.forest_version,
                              "metric": index.metric, "dim": index.dim, "count": index.count,
                              "n_trees": index.n_trees, "kind": index.kind,
                              "mapped_versions": index.mapped_versions, "swaps": index.swaps,
                              "refresh_error": self.refresh_errors.get(name)}
        return JSONResponse({"status": "ok", "datasets": datasets})

    async def query(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        body = await self._read_body(request)
        name, ask = self._parse(body)
        try:
            answer = await run_in_threadpool(ask)
        except api.UnknownKeyError as exc:
            raise BadRequest(404, str(exc)) from None
        except (ConfigError, IndexMismatchError) as exc:  # QueryError included: k, search_k, NaN, text
            raise BadRequest(400, str(exc)) from None
        if isinstance(answer, list):
            version = answer[0].version if answer else self.indexes[name].version
            return JSONResponse({"dataset": name, "version": version, "results": [a.to_dict() for a in answer]})
        return JSONResponse({"dataset": name, "version": answer.version, **answer.to_dict()})

    async def _read_body(self, request) -> bytes:
        """The body, refused with 413 past ``max_body`` bytes: from its Content-Length before reading
        anything, else as soon as that many bytes have come."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise BadRequest(400, f"Content-Length {length!r} is not a number")
            if int(length) > self.max_body:
                raise BadRequest(413, f"the request body has {int(length)} bytes; the limit is {self.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise BadRequest(413, f"the request body is over the limit of {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, body: bytes) -> tuple[str, Callable[[], Any]]:
        """(dataset, the call that answers) of a /query body; BadRequest saying what is wrong."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise BadRequest(400, f"the body is not valid JSON ({exc}); send an object such as "
                                  '{"dataset": "mnist", "key": "test/3", "k": 10}') from None
        if not isinstance(payload, dict):
            raise BadRequest(400, f"the body must be a JSON object, not {_json_type(payload)}")
        unknown = sorted(set(payload) - set(_FIELDS))
        if unknown:
            raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                                  f"{', '.join(_FIELDS)}")
        name = payload.get("dataset")
        if not isinstance(name, str):
            raise BadRequest(400, f"'dataset' must be a string naming a dataset, got {_json_type(name)}")
        index = self.indexes.get(name)
        if index is None:
            raise BadRequest(404, f"unknown dataset {name!r}; this service answers for "
                                  f"{', '.join(map(repr, self.indexes))}")
        given = [field for field in ("vector", "key", "text") if field in payload]
        if len(given) != 1:
            raise BadRequest(400, "give exactly one of 'vector', 'key' or 'text'" +
                             (f" (got {', '.join(given)})" if given else ""))
        k = payload.get("k", 10)
        if not _is_int(k) or not 1 <= k <= self.max_k:
            raise BadRequest(400, f"'k' must be an integer from 1 to {self.max_k}, got {_shown(k)}")
        search_k = payload.get("search_k")
        if search_k is not None and (not _is_int(search_k) or search_k < 0):
            raise BadRequest(400, f"'search_k' must be an integer >= 0 (or null: k * n_trees), got {_shown(search_k)}")
        distances = payload.get("distances", True)
        if not isinstance(distances, bool):
            raise BadRequest(400, f"'distances' must be true or false, got {_shown(distances)}")
        options = {"k": k, "search_k": search_k, "distances": distances}
        field = given[0]
        value = payload[field]
        if field == "vector":
            return name, self._vector_call(index, value, options)
        if not isinstance(value, str):
            raise BadRequest(400, f"'{field}' must be a string, got {_json_type(value)}")
        if field == "key":
            return name, lambda: index.query_key(value, **options)
        return name, lambda: index.query_text(value, **options)

    def _vector_call(self, index: api.Index, value: Any, options: dict) -> Callable[[], Any]:
        if not isinstance(value, list) or not value:
            raise BadRequest(400, "'vector' must be a non-empty list of numbers, or a list of such lists (a batch); "
                                  f"got {_json_type(value)}")
        if all(isinstance(row, list) for row in value):
            if len(value) > self.max_batch:
                raise BadRequest(400, f"a batch holds at most {self.max_batch} vectors, got {len(value)}")
            dim = index.dim
            for i, row in enumerate(value):
                if len(row) != dim:
                    raise BadRequest(400, f"'vector'[{i}] must have dimension {dim}, got {len(row)} values")
                _check_numbers(row, f"'vector'[{i}]")
            return lambda: index.query_batch(value, **options)
        _check_numbers(value, "'vector'")
        return lambda: index.query(value, **options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(row: list, what: str) -> None:
    """Every entry a JSON number (not a string, a boolean, null or a list). NaN and infinity (which
    Python's JSON reader takes) are left to the index's own check, which names them."""
    for i, x in enumerate(row):
        if type(x) is not float and type(x) is not int:
            raise BadRequest(400, f"{what} must hold numbers only; entry {i} is {_json_type(x)}")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else _json_type(value)
    return text if len(text) <= 40 else text[:37] + "..."


async def _bad_request(request, exc: BadRequest):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(exc), "status": exc.status}, status_code=exc.status)


async def _not_found(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"no such endpoint {request.url.path!r}; use GET /health or POST /query",
                         "status": 404}, status_code=404)


async def _not_allowed(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}; use GET /health or "
                                  "POST /query", "status": 405}, status_code=405,
                        headers=getattr(exc, "headers", None))
