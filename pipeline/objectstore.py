"""An artifact root on an object store: ``s3://bucket/prefix`` through ``pyarrow.fs.S3FileSystem``.

Where the endpoint and credentials come from (the standard AWS way; keyword arguments win):

- ``endpoint``: the argument, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (an S3-compatible
  store such as SeaweedFS or MinIO; ``http://`` or ``https://`` decides the scheme), else AWS S3.
- ``region``: the argument, else ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the ``region`` of the AWS
  profile (``AWS_PROFILE``, else ``default``) in ``AWS_CONFIG_FILE`` or ``~/.aws/config``, else us-east-1.
- credentials: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``); when
  they are not set, the AWS SDK's own chain inside pyarrow: the profile in ``~/.aws/credentials`` /
  ``~/.aws/config`` (``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE``), then an instance role.

Timeouts are short and retries bounded (connect 3 s, a stalled request 5 s, 3 attempts), so an
unreachable endpoint fails in seconds. Once a request has failed for the network (every attempt
spent), the store is taken for down for ``DOWN_SECONDS``: requests make one attempt each meanwhile,
so a run whose server went away (or a network cut that drops packets, where each attempt waits for
its timeout) ends in seconds instead of retrying every cleanup and lookup on its way out. Every pyarrow ``OSError`` is turned into a ``StoreError``
that names the root and the cause (endpoint unreachable, credentials refused, bucket missing, no
write permission, connection lost while uploading).

What one write is: an object up to ``SINGLE_PUT_MAX`` bytes is one PUT. A larger one is a multipart
upload that is created when the stream opens and completed only by a successful close, so an upload
cut in the middle leaves nothing under its key (S3 and SeaweedFS keep the orphaned parts until the
upload is aborted or expires: on AWS, a lifecycle rule "abort incomplete multipart uploads" clears
them). pyarrow offers no abort from Python and a dropped stream completes what it has, so grove never
runs Python code between the parts of one object: a file is memory-mapped and handed over in one
``write`` call (pyarrow then holds up to the whole object in part buffers while they upload).

A bucket is never created here (SeaweedFS would create one on the first PUT): its existence is
checked once per store before the first request.
"""

from __future__ import annotations

import collections
import configparser
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from . import layout
from .errors import ArtifactError, ConfigError, GroveError, StoreError
from .store import ATTEMPTS, PROBE_PREFIX, Store, complete_manifest, version_files

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # seconds to open a connection
REQUEST_TIMEOUT = 5.0  # seconds a request may stall (curl's low-speed limit on Linux)
MAX_ATTEMPTS = 3  # tries per request (the AWS standard retry strategy, with backoff)
DOWN_SECONDS = 60.0  # after a network failure, requests make one attempt each for this long
SINGLE_PUT_MAX = 8 << 20  # objects up to this size are one PUT (pyarrow's parts are 10 MiB)
CHUNK = 8 << 20  # bytes per read when downloading
UPLOAD_THREADS = 4  # files of one version uploaded at once
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation:?\s*(.*)", re.S)
_CREDENTIAL_CODES = ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_CLIENT_TOKEN_ID",
                     "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT", "INVALID_SIGNATURE", "MISSING_AUTHENTICATION_TOKEN",
                     "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken")
_WRITE_OPS = frozenset({"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload",
                        "CopyObject", "DeleteObject", "DeleteObjects", "AbortMultipartUpload"})
_ATTEMPT_TIME = "%Y%m%dT%H%M%SZ"


class ObjectStore(Store):
    """``s3://bucket/prefix``; keys are relative to the prefix."""

    is_local = False

    def __init__(self, uri: str, *, endpoint: str | None = None, region: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, request_timeout: float = REQUEST_TIMEOUT,
                 max_attempts: int = MAX_ATTEMPTS):
        self.bucket, self.prefix = _parse_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = _endpoint(endpoint)
        self.region = region or _default_region()
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.max_attempts = int(max_attempts)
        access = os.environ.get("AWS_ACCESS_KEY_ID") or None
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access) != bool(secret):
            given, missing = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if access else \
                ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
            raise ConfigError(f"artifact root {self.uri}: {given} is set but {missing} is not; set both, or "
                              "neither to use the AWS profile (~/.aws/credentials)")
        self._credentials = (access, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        self._fs_cache: dict[tuple[bool, int], object] = {}
        self._down_since: float | None = None  # when a request last failed for the network (monotonic)
        self._lock = threading.Lock()
        self._bucket_ok = False
        # what went over the wire, for benchmarks and tests: downloads/uploads count download() and
        # upload() calls, reads/writes count read_bytes() and write_bytes(), bytes_in/out all bytes
        self.stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()

    def _count(self, **amounts: int) -> None:
        with self._stats_lock:  # uploads and downloads run in threads
            self.stats.update(amounts)

    # --- description ---------------------------------------------------------------------------
    @property
    def credentials_source(self) -> str:
        access = self._credentials[0]
        if access:
            return f"access key {access!r} from AWS_ACCESS_KEY_ID"
        profile = os.environ.get("AWS_PROFILE") or "default"
        files = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
        return f"the AWS profile {profile!r} ({files}, ~/.aws/config) or the instance role"

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 (region {self.region})"

    def describe(self) -> str:
        where = f"endpoint {self.endpoint_url}" if self.endpoint_url else "AWS S3"
        return f"{self.uri} ({where}, region {self.region}, {self.credentials_source})"

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r}, endpoint={self.endpoint_url!r}, region={self.region!r})"

    # --- the pyarrow filesystems ---------------------------------------------------------------
    def _fs(self, multipart: bool = False):
        """The S3 filesystem. ``multipart=False``: writes are buffered and sent as one PUT at close
        (small objects only); ``multipart=True``: the multipart upload is created when the stream
        opens, so a failure there raises before any stream exists. While the store is taken for
        down (a network failure less than ``DOWN_SECONDS`` ago), one that makes a single attempt."""
        down = self._down_since is not None and time.monotonic() - self._down_since < DOWN_SECONDS
        attempts = 1 if down else self.max_attempts
        with self._lock:
            fs = self._fs_cache.get((multipart, attempts))
            if fs is None:
                from pyarrow import fs as pafs

                access, secret, token = self._credentials
                options = dict(region=self.region, connect_timeout=self.connect_timeout,
                               request_timeout=self.request_timeout,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                               allow_delayed_open=not multipart, allow_bucket_creation=False,
                               allow_bucket_deletion=False)
                if access:
                    options.update(access_key=access, secret_key=secret, session_token=token)
                if self.endpoint_url:
                    parts = urlsplit(self.endpoint_url)
                    options.update(scheme=parts.scheme, endpoint_override=parts.netloc + parts.path.rstrip("/"))
                try:
                    fs = pafs.S3FileSystem(**options)
                except (OSError, ValueError) as exc:
                    raise StoreError(f"cannot open the artifact root {self.describe()}: {exc}") from exc
                self._fs_cache[(multipart, attempts)] = fs
            return fs

    def _path(self, key: str = "") -> str:
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    # --- errors --------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, action: str, key: str = ""):
        """Turn pyarrow's OSError (not FileNotFoundError, which callers handle) into a StoreError."""
        try:
            yield
        except (FileNotFoundError, GroveError):
            raise
        except OSError as exc:
            raise self._error(exc, action, key) from exc

    def _error(self, exc: OSError, action: str, key: str = "") -> StoreError:
        kind, code, op, detail = _classify(exc)
        text = str(exc)
        where = self.where(key)
        if kind == "network":
            self._down_since = time.monotonic()
            cause = _network_cause(text, self.request_timeout)
            if op in _WRITE_OPS and op not in ("DeleteObject", "DeleteObjects"):
                return StoreError(
                    f"lost the connection to the S3 endpoint {self.endpoint_name} while {action} {where}: "
                    f"{cause}. The object was not published (an upload that does not complete leaves "
                    f"nothing under its key); run again once {self.endpoint_name} answers")
            return StoreError(
                f"cannot reach the S3 endpoint {self.endpoint_name} for {self.uri}: {cause} (while {action} "
                f"{where}); check AWS_ENDPOINT_URL (or [grove] s3_endpoint) and that the server is running")
        if kind == "no-bucket":
            return self._no_bucket()
        if kind == "credentials":
            return StoreError(
                f"the credentials for {self.uri} ({self.credentials_source}) were refused by "
                f"{self.endpoint_name}: {code or 'refused'} during {op or action}. Check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the AWS profile) and that the clock of this machine is right")
        if kind == "denied":
            if op in _WRITE_OPS:
                return StoreError(
                    f"no write permission on {self.uri}: {self.endpoint_name} denied {op} of {where} to "
                    f"{self.credentials_source}. Use credentials that may write (s3:PutObject, "
                    "s3:DeleteObject) under the prefix, or only run commands that read")
            return StoreError(
                f"access denied while {action} {where}: the credentials ({self.credentials_source}) were "
                f"refused by {self.endpoint_name} or may not read this bucket ({op or 'request'}). Check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy")
        return StoreError(f"{action} {where} failed on {self.endpoint_name}: {detail or text}")

    def _no_bucket(self) -> StoreError:
        return StoreError(
            f"bucket {self.bucket!r} does not exist on {self.endpoint_name} (artifact root {self.uri}); "
            f"create it first (e.g. `aws s3 mb s3://{self.bucket}`, with --endpoint-url for an S3-compatible "
            "store) or fix the bucket in GROVE_ARTIFACTS / [grove] artifacts. grove never creates buckets")

    def _ensure_bucket(self) -> None:
        """Once per store: the bucket exists (HeadBucket). A refused HeadBucket is let through (a key
        may be allowed its prefix and not the bucket); the request that follows says what is wrong.

        Writes ask first (SeaweedFS would create a missing bucket on the first PUT). Reads ask only
        when they find nothing: a missing bucket looks like a missing key to a GET, HEAD or LIST, so
        "nothing there" is told apart from "no such bucket" then, and a read that finds its object
        costs one request (a later ``grove query`` reads one pointer and nothing else)."""
        if self._bucket_ok:
            return
        from pyarrow import fs as pafs

        try:
            info = self._fs().get_file_info(self.bucket)
        except OSError as exc:
            if _classify(exc)[0] in ("denied", "credentials"):
                return
            raise self._error(exc, "opening", "") from exc
        if info.type == pafs.FileType.NotFound:
            raise self._no_bucket()
        self._bucket_ok = True

    def _not_found(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, f"no object {key!r} under the artifact root {self.uri}",
                                 self.where(key))

    # --- objects -------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        from pyarrow import fs as pafs

        key = self.key(key)
        with self._errors("looking up", key):
            found = self._fs().get_file_info(self._path(key)).type == pafs.FileType.File
        if not found:
            self._ensure_bucket()
        return found

    def read_bytes(self, key: str) -> bytes:
        key = self.key(key)
        with self._errors("reading", key):
            try:
                with self._fs().open_input_stream(self._path(key)) as f:
                    data = f.read()
            except FileNotFoundError:
                data = None
        if data is None:
            self._ensure_bucket()
            raise self._not_found(key)
        self._count(reads=1, bytes_in=len(data))
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        self._put(self.key(key), bytes(data))
        self._count(writes=1, bytes_out=len(data))

    def _put(self, key: str, data) -> None:
        """Write ``data`` (bytes or a pyarrow Buffer) as the object ``key``, all or nothing.

        Small: write() only buffers and close() sends the one PUT. Large: open creates the multipart
        upload (a refusal raises before any stream exists), the ONE write() call hands every part to
        pyarrow's background uploads, and close() completes the upload only when all parts arrived,
        else raises. Nothing in Python runs between parts, so an interrupt cannot leave a stream
        whose destructor would complete a partial object. (Not ``pyarrow.fs.copy_files``: it
        reports success when a part upload failed; seen with pyarrow 26 against a stopped server.)
        """
        if not key:
            raise ConfigError(f"refusing to write the artifact root {self.uri} itself as an object")
        self._ensure_bucket()
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.size
        large = size > SINGLE_PUT_MAX
        with self._errors("writing", key):
            stream = self._fs(multipart=large).open_output_stream(self._path(key))
            stream.write(data)
            stream.close()
            if large:  # belt and braces: the object that now exists has every byte
                stored = self._fs().get_file_info(self._path(key)).size
                # SeaweedFS lists a multipart object whose bytes look gzip-compressed with another size
                # (the MNIST .gz files: 9,915,465 listed for 9,912,422 stored, and a plain GET returns
                # them exactly); then the object itself is read back and compared.
                if stored != size and self._read_back(key) != hashlib.sha256(memoryview(data)).digest():
                    raise StoreError(f"writing {self.where(key)}: the upload ended with {stored} bytes stored "
                                     f"instead of {size}; run again")

    def _read_back(self, key: str) -> bytes:
        """The sha256 (raw digest) of the object ``key`` as a plain GET returns it."""
        digest = hashlib.sha256()
        with self._fs().open_input_stream(self._path(key)) as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
        return digest.digest()

    def list(self, prefix: str) -> list[str]:
        from pyarrow import fs as pafs

        prefix = self.key(prefix)
        with self._errors("listing", prefix):
            try:
                infos = self._fs().get_file_info(pafs.FileSelector(self._path(prefix), recursive=False,
                                                                   allow_not_found=True))
            except (FileNotFoundError, NotADirectoryError):
                infos = []
        if not infos:
            self._ensure_bucket()
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def files(self, prefix: str) -> dict[str, int]:
        return {rel: info.size for rel, info in self._file_infos(prefix).items()}

    def _file_infos(self, prefix: str) -> dict:
        from pyarrow import fs as pafs

        prefix = self.key(prefix)
        base = self._path(prefix)
        with self._errors("listing", prefix):
            try:
                infos = self._fs().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            except (FileNotFoundError, NotADirectoryError):
                infos = []
        if not infos:
            self._ensure_bucket()
        return {i.path[len(base) + 1:]: i for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File}

    def delete(self, key: str) -> None:
        key = self.key(key)
        self._ensure_bucket()
        with self._errors("deleting", key):
            try:
                self._fs().delete_file(self._path(key))
            except FileNotFoundError:
                pass

    def delete_tree(self, prefix: str) -> None:
        prefix = self.key(prefix)
        if not prefix and not self.prefix:
            raise ConfigError(f"refusing to delete everything in the bucket {self.bucket!r}; give a prefix")
        if not layout.is_attempt_key(prefix):  # an attempt's files have no manifest beside them
            # the manifest first: a version stops being visible before any of its files go
            self.delete(self.key(prefix, layout.MANIFEST))
        with self._errors("deleting", prefix):
            try:
                self._fs().delete_dir(self._path(prefix))
            except FileNotFoundError:
                pass

    def upload(self, local: Path, key: str) -> None:
        key = self.key(key)
        local = Path(local)
        size = local.stat().st_size
        if size <= SINGLE_PUT_MAX:
            self._put(key, local.read_bytes())
        else:
            import pyarrow as pa

            with pa.memory_map(str(local)) as source:  # the file's pages, not a copy in memory
                self._put(key, source.read_buffer())
        self._count(uploads=1, bytes_out=size)

    def download(self, key: str, local: Path) -> str:
        key = self.key(key)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        received = 0
        digest = hashlib.sha256()
        try:
            with self._errors("downloading", key):
                # One plain GET (a stream), not ranged reads: SeaweedFS lists and range-reads an object
                # whose bytes look gzip-compressed with other sizes and bytes than were stored, while a
                # plain GET returns them as stored. Callers check the sha256 and size against the
                # manifest (pipeline/cache.py), so a short read cannot pass for a file.
                try:
                    src = self._fs().open_input_stream(self._path(key))
                except FileNotFoundError:
                    src = None
                if src is None:
                    self._ensure_bucket()
                    raise self._not_found(key)
                with src, open(tmp, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)  # hashed on the way in: no second pass over the file
                        received += len(chunk)
            os.replace(tmp, local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._count(downloads=1, bytes_in=received)
        return digest.hexdigest()

    # --- pointers ------------------------------------------------------------------------------
    def set_pointer(self, prefix: str, name: str, target: str) -> None:
        self.key(target)  # a target that would leave the root is refused like any key
        self.write_bytes(self.key(prefix, name), json.dumps({"target": target}).encode() + b"\n")

    def get_pointer(self, prefix: str, name: str) -> str | None:
        key = self.key(prefix, name)
        try:
            data = self.read_bytes(key)
        except FileNotFoundError:
            return None
        try:
            target = json.loads(data.decode("utf-8"))["target"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            target = None
        if not isinstance(target, str):
            raise ArtifactError(f"{self.where(key)}: not a grove pointer (expected {{\"target\": \"...\"}}, found "
                                f"{data[:80]!r}); delete it or set it again (grove promote)")
        return target

    def remove_pointer(self, prefix: str, name: str) -> None:
        self.delete(self.key(prefix, name))

    # --- a quick look before any work ----------------------------------------------------------
    def check(self, write: bool = True) -> None:
        from pyarrow import fs as pafs

        started = time.monotonic()
        self._bucket_ok = False
        self._ensure_bucket()
        with self._errors("listing", ""):
            self._fs().get_file_info(pafs.FileSelector(self._path(), recursive=False, allow_not_found=True))
        if write:
            probe = self.key(f"{PROBE_PREFIX}{secrets.token_hex(6)}")
            self.write_bytes(probe, b"grove probe\n")
            self.delete(probe)
        log.debug("%s answers (%.2f s)", self.describe(), time.monotonic() - started)

    # --- versions ------------------------------------------------------------------------------
    def publish_version(self, prefix: str, local_dir: Path, manifest: dict) -> dict:
        prefix = self.key(prefix)
        manifest_key = self.key(prefix, layout.MANIFEST)
        if self.exists(manifest_key):
            log.info("%s is already published; keeping it", self.where(prefix))
            return self._read_manifest(prefix)
        files = version_files(local_dir)
        manifest = complete_manifest(manifest, files, local_dir)
        attempt = new_attempt_id()
        base = self.key(prefix, ATTEMPTS, attempt)
        started = time.monotonic()
        try:
            self._upload_all({self.key(base, rel): path for rel, path in files.items()})
        except BaseException:
            try:
                self.delete_tree(base)
            except OSError as exc:  # the cause comes with the error raised below; its first part is enough here
                log.warning("could not remove the unfinished attempt %s (%s); `grove gc` will", self.where(base),
                            str(exc).split("; ")[0])
            raise
        manifest["attempt"] = attempt
        self.write_json(manifest_key, manifest)  # last: the version is visible from here on
        size = sum(p.stat().st_size for p in files.values())
        log.info("published %s (attempt %s, %d files, %.1f MB, %.1f s)", self.where(prefix), attempt, len(files),
                 size / 1e6, time.monotonic() - started)
        return manifest

    def _upload_all(self, uploads: dict[str, Path]) -> None:
        if not uploads:
            return
        pool = ThreadPoolExecutor(max_workers=min(UPLOAD_THREADS, len(uploads)), thread_name_prefix="grove-upload")
        try:
            futures = [pool.submit(self.upload, path, key) for key, path in uploads.items()]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future in done and future.exception() is not None:
                    raise future.exception()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stale_attempts(self, prefix: str, grace_seconds: float = 3600) -> list[str]:
        prefix = self.key(prefix)
        attempts = self.list(self.key(prefix, ATTEMPTS))
        if not attempts:
            return []
        named = None
        if self.exists(self.key(prefix, layout.MANIFEST)):
            named = self._read_manifest(prefix).get("attempt")
        now = time.time()
        stale = []
        for attempt in attempts:
            if attempt == named:
                continue
            key = self.key(prefix, ATTEMPTS, attempt)
            started = attempt_time(attempt)
            if started is None:  # not a name grove makes: judge by its newest object
                infos = self._file_infos(key).values()
                started = max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=0.0)
            if now - started >= grace_seconds:
                stale.append(key)
        return stale


# --- names and settings ---------------------------------------------------------------------------


def new_attempt_id() -> str:
    """``<UTC time>-<random token>``, e.g. ``20250101T120000Z-3f9a1c2b7d4e``: unique, and its age readable."""
    return f"{datetime.now(timezone.utc).strftime(_ATTEMPT_TIME)}-{secrets.token_hex(6)}"


def attempt_time(attempt: str) -> float | None:
    """When an attempt started (epoch seconds), from its name; None for a name grove does not make."""
    try:
        when = datetime.strptime(attempt.split("-", 1)[0], _ATTEMPT_TIME)
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()


def _parse_uri(uri: str) -> tuple[str, str]:
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ConfigError(f"artifact root {text!r} is not an s3:// URI; write s3://bucket/prefix")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"artifact root {text!r}: options in the URI are not supported; set the endpoint "
                          "with AWS_ENDPOINT_URL (or [grove] s3_endpoint)")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"artifact root {text!r}: {bucket!r} is not a valid bucket name (3-63 characters: "
                          "lower-case letters, digits, '.' and '-')")
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    if any(p == ".." or "\\" in p or "\x00" in p for p in parts):
        raise ConfigError(f"artifact root {text!r}: the prefix {prefix!r} may not contain '..', '\\' or NUL")
    return bucket, "/".join(parts)


def _endpoint(endpoint: str | None) -> str | None:
    """The endpoint URL (scheme://host[:port]), from the argument or the AWS variables; None for AWS."""
    value = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not value:
        return None
    source = "the s3 endpoint setting" if endpoint else \
        ("AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL")
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = "https://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{source} = {value!r} is not an endpoint URL; write http://host:port or "
                          "https://host[:port]")
    return value


def _default_region() -> str:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    profile = os.environ.get("AWS_PROFILE") or "default"
    path = Path(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config").expanduser()
    config = configparser.ConfigParser()
    try:
        config.read(path)
    except (OSError, configparser.Error):
        return "us-east-1"
    section = profile if profile == "default" else f"profile {profile}"
    return config.get(section, "region", fallback=None) or "us-east-1"


def _classify(exc: OSError) -> tuple[str, str, str, str]:
    """``(kind, code, operation, detail)`` of a pyarrow S3 error; kind is one of network, no-bucket,
    credentials, denied, other."""
    text = str(exc)
    m = _AWS_ERROR.search(text)
    code, op, detail = (m.group(1), m.group(2), m.group(3).strip()) if m else ("", "", text)
    if code == "NETWORK_CONNECTION" or "curlCode" in text:
        kind = "network"
    elif code == "NO_SUCH_BUCKET" or "NoSuchBucket" in text:
        kind = "no-bucket"
    elif code in _CREDENTIAL_CODES or any(c in text for c in _CREDENTIAL_CODES):
        kind = "credentials"
    elif code == "ACCESS_DENIED" or "AccessDenied" in text:
        kind = "denied"
    else:
        kind = "other"
    return kind, code, op, detail


def _network_cause(text: str, request_timeout: float) -> str:
    m = re.search(r"curlCode:\s*(\d+)", text)
    curl = int(m.group(1)) if m else None
    if curl == 7 or "Connection refused" in text or "Could not connect" in text:
        return "connection refused (nothing listens there)"
    if curl == 6 or "resolve host" in text:
        return "the host name does not resolve"
    if curl == 28 or "Timeout" in text or "timed out" in text:
        return f"no answer within {request_timeout:g} s (timed out)"
    if curl in (35, 51, 58, 60, 77, 83, 90, 91):
        return "the TLS handshake failed (an http:// server given as https://, or an untrusted certificate?)"
    if curl in (52, 55, 56):
        return "the connection was cut (the server closed it or went away)"
    detail = text.split("Details:", 1)[-1].strip() if "Details:" in text else text
    return detail.splitlines()[0] if detail else "network error"
