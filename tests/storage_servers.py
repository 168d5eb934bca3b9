"""Real storage servers on 127.0.0.1 for tests: an S3 server (moto's server mode) and PostgreSQL.

Both run as child processes of the test session with their own port and data, and are
stopped by their PID; nothing outside loopback is contacted.

* :func:`s3_server`: ``python -m moto.server`` (the ``moto[server]`` test extra), a bucket
  created through the S3 API, and the ``AWS_*`` variables that make pyarrow (and so Ray
  and the platform) talk to it: ``AWS_ENDPOINT_URL`` is the standard AWS SDK variable.
* :func:`postgres_server`: the machine's PostgreSQL binaries (``initdb`` + ``pg_ctl``; Debian
  keeps them in ``/usr/lib/postgresql/<version>/bin``, ``make system-deps`` installs them).
  ``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user
  (``runuser``) with its data folder handed to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]   # AWS_* variables for every process that reads or writes the bucket

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@contextlib.contextmanager
def s3_server(bucket: str = "medalign-test") -> Iterator[S3Server]:
    """An S3 server on 127.0.0.1 with one empty bucket; the ``AWS_*`` variables are set in this
    process for the block (and returned in ``env`` for child processes)."""
    import pyarrow.fs as pafs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="medalign-s3-")) / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "medalign-test",
           "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the S3 server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not answer within {START_TIMEOUT_S}s") from None
                time.sleep(0.2)  # poll interval while it starts
        pafs.S3FileSystem(endpoint_override=endpoint, access_key=env["AWS_ACCESS_KEY_ID"],
                          secret_key=env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                          allow_bucket_creation=True).create_dir(bucket)
        yield S3Server(endpoint, bucket, env)
    finally:
        _stop(process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(log.parent, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL server binaries (``initdb``), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


@dataclass
class PostgresServer:
    url: str       # SQLAlchemy URL of the test database (no password: trust authentication on loopback)
    port: int
    data_dir: Path
    pid: int


@contextlib.contextmanager
def postgres_server(database: str = "medalign") -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 with an empty ``database``, stopped (fast shutdown) at the end.

    Raises:
        RuntimeError: the binaries are missing or the server did not start (with its log).
    """
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb); install them with `make system-deps`")
    as_root = os.geteuid() == 0
    if as_root:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, the PostgreSQL server must run as the unprivileged `postgres` "
                               "user (initdb refuses root), and there is none: `make system-deps` (apt-get install "
                               "postgresql) creates it") from None
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="medalign-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if as_root:  # initdb refuses root; the postgres user owns the server's folders
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    user = "postgres" if as_root else os.environ.get("USER") or "postgres"
    port = free_port()
    pid = None
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        started = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                  "-w", "-t", str(START_TIMEOUT_S), "start"], capture_output=True, text=True,
                                 timeout=START_TIMEOUT_S + 30)
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}\n"
                               f"{log.read_text()[-2000:] if log.exists() else ''}")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        subprocess.run([*prefix, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database],
                       check=True, capture_output=True, timeout=60)
        yield PostgresServer(f"postgresql://{user}@127.0.0.1:{port}/{database}", port, data, pid)
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)  # waiting for the postmaster to exit
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
