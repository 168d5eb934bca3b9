"""``medalign dashboard EXP_DIR``: TensorBoard, optuna-dashboard and the Ray dashboard, side by side.

``medalign dashboard sweeps/synthmed_vqa-smoke [port=6006] [optuna_port=8080] [host=127.0.0.1]
[wait=true] [refresh=0] [timeout=90]``

* TensorBoard (always): ``--logdir EXP_DIR/tensorboard`` when that folder holds event files
  (the sweep-level folder that :func:`medalign_platform.tune.results.write_results` builds,
  or a ``medalign train`` run's own), else ``EXP_DIR`` itself, whose ``trial_*/tensorboard``
  folders TensorBoard lists as runs.
* optuna-dashboard: on ``EXP_DIR/optuna.db`` when the optional ``optuna_dashboard``
  package is importable (``pip install optuna-dashboard``); otherwise the command says how
  to install it.
* Ray dashboard: only looked up, never started. A short-lived probe process joins a
  running cluster (``RAY_ADDRESS`` or a local one) with ``ray.init(address="auto")``, which
  fails instead of starting a cluster, and reports its dashboard URL.

The URLs are printed once TensorBoard answers. The command then stays in the foreground
until Ctrl-C or SIGTERM and stops its servers; with ``wait=false`` it returns at once and
leaves them running (their PIDs are printed). A busy port is replaced by a free one.
``EXP_DIR/tensorboard`` is a snapshot of the trials' curves: ``refresh=60`` rebuilds it every
60 s while the command waits (for a running sweep).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..common.errors import ConfigError, MedAlignError
from ..common.overrides import as_tree, parse_overrides
from ..common.settings import Settings, setting
from ..run.filesystems import StoragePath, is_uri, mirror
from ..run.network import exposure_warning, local_url, public_url
from .layout import SWEEP_SPEC_FILE, study_storage
from .study_storage import SQLITE_FILE

EVENT_PREFIX = "events.out.tfevents."
OPTUNA_HINT = "pip install optuna-dashboard   (or: pip install 'medalign-platform[dashboard]')"
RAY_HINT = "ray start --head --dashboard-host 127.0.0.1   (then rerun this command)"
PROBE_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 10.0
# Event files sit a few levels down (EXP_DIR/trial_x/tensorboard/...); the search for them
# stops there instead of walking every checkpoint folder of a large sweep.
MAX_LOGDIR_DEPTH = 6

# Runs in a separate process so that joining a cluster can be cut off by a timeout and
# leaves no Ray driver in this process. address="auto" never starts a cluster: with no
# RAY_ADDRESS and no local cluster it raises ConnectionError at once.
RAY_PROBE = """
import json, logging, sys
try:
    import ray
    context = ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    info = {"dashboard_url": context.dashboard_url or "", "address": context.address_info.get("gcs_address", "")}
    ray.shutdown()
except Exception as error:  # noqa: BLE001 - any failure means: no reachable cluster
    # The first sentence is enough: "Could not find any running Ray instance."
    info = {"error": (str(error).split(". ")[0].strip() or type(error).__name__).rstrip(".")}
print("MEDALIGN_RAY_PROBE " + json.dumps(info), flush=True)
"""


class DashboardError(MedAlignError):
    """A problem the user can fix (bad path, bad override); the command prints it and returns 2."""


@dataclass
class Server:
    """One child server process and where it answers."""

    name: str
    process: subprocess.Popen
    port: int
    url: str                # what the user opens (the machine's address when bound to every interface)
    log: Path
    note: str = ""
    poll_url: str = ""      # what this command polls (loopback for a wildcard bind); default: url


# --------------------------------------------------------------------------- settings and paths


@dataclass
class DashboardSettings(Settings):
    """The ``key=value`` options of ``medalign dashboard EXP_DIR``."""

    section: ClassVar[str] = ""

    port: int = setting(6006, "TensorBoard's port (0: any free port; taken ports move to a free one).")
    optuna_port: int = setting(8080, "optuna-dashboard's port (0: any free port).")
    host: str = setting("127.0.0.1", "Interface both servers bind.")
    wait: bool = setting(True, "Stay in the foreground until Ctrl-C / SIGTERM; false prints the PIDs and returns.")
    timeout: float = setting(90.0, "Seconds to wait for each server to answer.", gt=0)
    refresh: float = setting(0, "Rebuild the sweep-level TensorBoard every N seconds while waiting (0: only at start).",
                             ge=0)

    def check(self) -> None:
        for key in ("port", "optuna_port"):
            if not 0 <= getattr(self, key) <= 65535:
                self.fail(key, f"must be a port number 0..65535 (0: any free port), got {getattr(self, key)}")


def parse_settings(overrides: list[str]) -> dict:
    """The dashboard options from ``key=value`` overrides, as a dict.

    Raises:
        ConfigError: an unknown key, or a bad value (a port outside 0..65535, ...).
    """
    return DashboardSettings.from_dict(as_tree(parse_overrides(overrides))).to_dict()


def has_events(folder: Path, max_depth: int = MAX_LOGDIR_DEPTH) -> bool:
    """Whether ``folder`` holds a TensorBoard event file within ``max_depth`` levels.

    Follows symlinks: a sweep-level ``tensorboard/`` folder may link to the trials' folders.
    """
    root_depth = len(folder.parts)
    for current, dirs, files in os.walk(folder, followlinks=True):
        if any(name.startswith(EVENT_PREFIX) for name in files):
            return True
        if len(Path(current).parts) - root_depth >= max_depth:
            dirs.clear()
    return False


def _build_sweep_tensorboard(exp_dir: Path | str) -> None:
    """Lets ``results.write_results`` (re)build ``EXP_DIR/tensorboard`` for a sweep, if it exists.

    Optional on purpose: without it TensorBoard reads the trials' folders directly.
    """
    try:
        from .results import write_results
    except (ImportError, AttributeError):
        return
    try:
        write_results(exp_dir)
    except Exception as error:  # noqa: BLE001 - the dashboard still works from the trial folders
        print(f"medalign dashboard: could not build {exp_dir}/tensorboard ({type(error).__name__}: {error}); "
              "showing the trial folders instead", file=sys.stderr)


def _remote_folder(uri: str):
    """A remote sweep or run folder: its local mirror and the callable that refreshes it.

    A sweep is mirrored (and its results and sweep-level TensorBoard rebuilt and uploaded) by
    ``write_results``; a ``medalign train`` run folder is mirrored without its checkpoints.

    Raises:
        DashboardError: nothing at that location.
    """
    location = StoragePath(uri)
    if (location / SWEEP_SPEC_FILE).is_file():
        from .layout import mirror_experiment

        # write_results mirrors it again (incrementally) and uploads what it builds
        return mirror_experiment(location), lambda: _build_sweep_tensorboard(uri)
    if not location.is_dir():
        raise DashboardError(f"{uri}: nothing there (no sweep.json, no run folder)")
    return mirror(location, skip=_is_checkpoint), lambda: mirror(location, skip=_is_checkpoint)


def _is_checkpoint(relative: str) -> bool:
    """Files of a run folder that its dashboard does not need: the checkpoints (its
    ``tensorboard/`` is what TensorBoard shows)."""
    return any(part.startswith("checkpoint_") for part in relative.split("/"))


def find_logdir(exp_dir: Path) -> Path:
    """The folder to give TensorBoard as ``--logdir``.

    Raises:
        DashboardError: no event files under ``exp_dir``.
    """
    sweep_level = exp_dir / "tensorboard"
    if sweep_level.is_dir() and has_events(sweep_level):
        return sweep_level
    if has_events(exp_dir):
        return exp_dir
    raise DashboardError(
        f"no TensorBoard data under {exp_dir} (no {EVENT_PREFIX}* files in it or its tensorboard/ and "
        "trial_*/tensorboard folders); point it at a folder written by medalign sweep or medalign train")


# --------------------------------------------------------------------------- ports and processes


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _any_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def choose_port(host: str, wanted: int, taken: set[int], name: str) -> int:
    """``wanted`` if it is free (and not used by another server of ours), else a free port (said so)."""
    if wanted and wanted not in taken and _port_is_free(host, wanted):
        return wanted
    port = _any_free_port(host)
    while port in taken:
        port = _any_free_port(host)
    if wanted:
        print(f"medalign dashboard: port {wanted} is busy; {name} uses port {port} instead", file=sys.stderr)
    return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL (no orphans)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _spawn(command: list[str], log: Path, *, tied: bool) -> subprocess.Popen:
    """Starts a server in its own process group (a terminal's Ctrl-C reaches only us, and we stop
    it in order); ``tied`` children also die with this process on Linux."""
    hook = _die_with_parent if tied and sys.platform.startswith("linux") else None
    with log.open("wb") as out:
        # preexec_fn is unsafe only with threads running; this command starts none.
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=hook)  # noqa: PLW1509


def _url(host: str, port: int) -> str:
    """The URL to open: a wildcard bind is shown with this machine's address (where it is reachable
    from elsewhere, which is what binding every interface is for)."""
    return public_url(host, port)


def _poll_url(host: str, port: int) -> str:
    """The URL this command polls: a wildcard bind answers on loopback too."""
    return local_url(host, port)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (OSError, ValueError):
        return False


def wait_until_answering(server: Server, deadline: float) -> str | None:
    """Polls ``server.url`` until it answers (None) or the process exits or time runs out (why)."""
    delay = 0.05
    while True:
        if server.process.poll() is not None:
            return f"exited with code {server.process.returncode}"
        if _answers(server.poll_url or server.url):
            return None
        if time.monotonic() > deadline:
            return "did not answer in time"
        time.sleep(delay)  # back-off between polls, not a fixed wait
        delay = min(delay * 2, 0.5)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(servers: list[Server]) -> None:
    """SIGTERM to each server's process group, then SIGKILL what is left after a grace period."""
    for server in servers:
        if server.process.poll() is None:
            try:
                os.killpg(server.process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                server.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for server in servers:
        try:
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # The group may hold helpers (TensorBoard's data server) that outlive the leader.
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if server.process.poll() is None:
            server.process.wait()


# --------------------------------------------------------------------------- the three servers


def start_tensorboard(logdir: Path, settings: dict, taken: set[int], logs: Path, tied: bool) -> Server:
    """Starts TensorBoard on ``logdir`` and waits until it answers.

    A port taken between our check and TensorBoard's bind is retried on a new free port.

    Raises:
        DashboardError: TensorBoard exited or did not answer within ``timeout``.
    """
    host = settings["host"]
    deadline = time.monotonic() + float(settings["timeout"])
    wanted = settings["port"]
    for attempt in range(3):
        port = choose_port(host, wanted, taken, "TensorBoard")
        log = logs / f"tensorboard-{attempt}.log"
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host,
                   "--port", str(port)]
        server = Server("TensorBoard", _spawn(command, log, tied=tied), port, _url(host, port), log,
                        note=f"logdir {logdir}", poll_url=_poll_url(host, port))
        try:
            problem = wait_until_answering(server, deadline)
        except BaseException:  # Ctrl-C / SIGTERM while it starts: do not leave it behind
            stop([server])
            raise
        if problem is None:
            taken.add(port)
            return server
        stop([server])
        tail = _log_tail(log)
        if "already in use" not in tail or time.monotonic() > deadline:
            raise DashboardError(f"TensorBoard {problem}:\n{tail}")
        wanted = 0
    raise DashboardError(f"TensorBoard could not bind a port on {host}:\n{_log_tail(log)}")


def optuna_dashboard_command() -> list[str] | None:
    """The optuna-dashboard command of this Python environment, or None if it is not installed."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        return None
    script = Path(sys.executable).parent / "optuna-dashboard"
    if script.is_file():
        return [str(script)]
    found = shutil.which("optuna-dashboard")
    if found:
        return [found]
    # Importable (e.g. on PYTHONPATH) without its console script: call the script's entry point.
    entry = "import sys; from optuna_dashboard._cli import main; sys.argv[0] = 'optuna-dashboard'; sys.exit(main())"
    return [sys.executable, "-c", entry]


def start_optuna_dashboard(study: str, settings: dict, taken: set[int], logs: Path, tied: bool) -> Server | None:
    """Starts optuna-dashboard on the study (an RDB URL or a journal file path), or returns None
    if the package is missing."""
    command = optuna_dashboard_command()
    if command is None:
        return None
    host = settings["host"]
    port = choose_port(host, settings["optuna_port"], taken, "optuna-dashboard")
    taken.add(port)
    log = logs / "optuna-dashboard.log"
    storage = study
    process = _spawn([*command, storage, "--host", host, "--port", str(port)], log, tied=tied)
    server = Server("optuna-dashboard", process, port, _url(host, port), log, note=f"study {storage}",
                    poll_url=_poll_url(host, port))
    try:
        problem = wait_until_answering(server, time.monotonic() + float(settings["timeout"]))
    except BaseException:
        stop([server])
        raise
    if problem is not None:
        stop([server])
        server.note = f"failed: it {problem}: {_log_tail(log, 3)}"
    return server


def _study_argument(exp_dir: Path) -> str | None:
    """What optuna-dashboard takes for the sweep's study (``sweep.storage``): a database URL, a
    SQLite URL or a journal file path; None when the folder has no study (a train run, or a
    file study not written yet)."""
    if not (exp_dir / SWEEP_SPEC_FILE).is_file():  # not a sweep: a bare optuna.db is still offered
        return f"sqlite:///{exp_dir / SQLITE_FILE}" if (exp_dir / SQLITE_FILE).is_file() else None
    try:
        storage = study_storage(exp_dir)
    except (ConfigError, ValueError, OSError):
        return None
    if storage.kind != "rdb" and not Path(storage.target).is_file():
        return None
    return storage.url


def start_ray_probe(logs: Path) -> subprocess.Popen:
    """Starts the Ray cluster look-up (see :data:`RAY_PROBE`) in the background."""
    log = logs / "ray-probe.log"
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", RAY_PROBE], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def ray_dashboard_from_env() -> str | None:
    """The Ray dashboard line when ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS`` is already its URL.

    ``ray job`` users often set ``RAY_ADDRESS=http://head:8265``; ``ray.init`` cannot join
    through that, but it is the dashboard itself. None when neither is an http(s) URL.
    """
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        url = os.environ.get(name, "")
        if url.startswith(("http://", "https://")):
            if _answers(url):  # a 401 (token authentication) still means it is up
                return f"{url}   (from {name})"
            return f"{name}={url} does not answer; start a cluster with: {RAY_HINT}"
    return None


def ray_dashboard_line(probe: subprocess.Popen, deadline: float) -> str:
    """The Ray dashboard URL from the probe, or why there is none and how to start one."""
    try:
        out, _ = probe.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(probe.pid, signal.SIGKILL)
        probe.wait()
        return f"no answer from a Ray cluster within {PROBE_TIMEOUT_S:.0f} s (is RAY_ADDRESS right?)"
    lines = [line for line in (out or "").splitlines() if line.startswith("MEDALIGN_RAY_PROBE ")]
    info = json.loads(lines[-1].split(" ", 1)[1]) if lines else {"error": "the probe printed nothing"}
    if "error" in info:
        where = f"at RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "locally"
        return f"no Ray cluster running {where} ({info['error']}); start one with: {RAY_HINT}"
    if not info["dashboard_url"]:
        return f"the Ray cluster at {info['address']} runs without a dashboard (started with --include-dashboard=false)"
    url = info["dashboard_url"]
    return f"{url if '://' in url else 'http://' + url}   (cluster {info['address']})"


# --------------------------------------------------------------------------- the command


def _print_table(exp_dir: Path, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"medalign dashboard: {exp_dir}")
    for name, text in rows:
        print(f"  {name.ljust(width)}  {text}")
    sys.stdout.flush()


class _Stop(BaseException):
    """Raised by the SIGTERM handler; like KeyboardInterrupt, no ``except Exception`` swallows it."""


def _on_sigterm(signum, frame):
    raise _Stop()


def wait_in_foreground(servers: list[Server], rebuild=None, refresh: float = 0) -> int:
    """Blocks until Ctrl-C / SIGTERM (0) or until TensorBoard dies on its own (1).

    Args:
        servers: TensorBoard first.
        rebuild: called every ``refresh`` seconds (the sweep-level TensorBoard folder is a
            snapshot of the trials' curves; a running sweep needs it rebuilt to show progress).
        refresh: seconds between rebuilds; 0: never.
    """
    print("Press Ctrl-C to stop.", flush=True)
    due = time.monotonic() + refresh if rebuild and refresh else None
    while True:
        try:
            servers[0].process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if due is not None and time.monotonic() >= due:
                rebuild()
                due = time.monotonic() + refresh
            continue
        print(f"medalign dashboard: TensorBoard exited with code {servers[0].process.returncode}:\n"
              f"{_log_tail(servers[0].log)}", file=sys.stderr)
        return 1


def start_servers(exp_dir: Path, logdir: Path, settings: dict, logs: Path,
                  servers: list[Server]) -> list[tuple[str, str]]:
    """Starts TensorBoard (and optuna-dashboard), looks up Ray; appends to ``servers`` as they start.

    Returns:
        the rows to print: (name, URL or why there is none).

    Raises:
        DashboardError: TensorBoard did not start.
    """
    tied = settings["wait"]
    ray_line = ray_dashboard_from_env()
    # Otherwise the probe joins a cluster in parallel with TensorBoard's start-up.
    probe = start_ray_probe(logs) if ray_line is None else None
    probe_deadline = time.monotonic() + PROBE_TIMEOUT_S
    taken: set[int] = set()
    try:
        tensorboard = start_tensorboard(logdir, settings, taken, logs, tied)
        servers.append(tensorboard)
        rows = [("TensorBoard", f"{tensorboard.url}   ({tensorboard.note})")]
        study = _study_argument(exp_dir)
        if study is None:
            rows.append(("optuna-dashboard", f"no Optuna study in {exp_dir} (only sweeps have one)"))
        else:
            optuna = start_optuna_dashboard(study, settings, taken, logs, tied)
            if optuna is None:
                rows.append(("optuna-dashboard", f"not installed; to browse {study}: {OPTUNA_HINT}"))
            elif optuna.process.poll() is None:
                servers.append(optuna)
                rows.append(("optuna-dashboard", f"{optuna.url}   ({optuna.note})"))
            else:
                rows.append(("optuna-dashboard", optuna.note))
        rows.append(("Ray dashboard", ray_line or ray_dashboard_line(probe, probe_deadline)))
        return rows
    finally:
        if probe is not None and probe.poll() is None:
            os.killpg(probe.pid, signal.SIGKILL)
            probe.wait()


def dashboard_command(path: str, overrides: list[str]) -> int:
    """``medalign dashboard EXP_DIR [port=6006] [optuna_port=8080] [host=127.0.0.1] [wait=true]``.

    Args:
        path: a sweep experiment folder (``sweeps/NAME``) or a ``medalign train`` run folder.
        overrides: ``port``, ``optuna_port``, ``host``, ``wait`` (false: return after printing
            and leave the servers running), ``timeout`` (seconds for TensorBoard to answer) and
            ``refresh`` (seconds between rebuilds of a sweep's ``tensorboard/`` folder while
            waiting; 0: only at start).

    Returns:
        0 after a clean stop (Ctrl-C / SIGTERM; at once with ``wait=false``), 1 when
        TensorBoard died on its own, 2 for a missing folder, a folder without TensorBoard
        data or a bad setting.
    """
    try:
        settings = parse_settings(list(overrides))
        if is_uri(path):  # remote storage: served from a local mirror, refreshed by `refresh`
            exp_dir, rebuild = _remote_folder(path)
        else:
            exp_dir = Path(path).expanduser().resolve()
            if not exp_dir.is_dir():
                raise DashboardError(f"{path}: no such directory" if not exp_dir.exists()
                                     else f"{path}: not a directory")
            rebuild = (lambda: _build_sweep_tensorboard(exp_dir)) if (exp_dir / SWEEP_SPEC_FILE).is_file() else None
        if rebuild is not None:
            rebuild()
        logdir = find_logdir(exp_dir)
    except (DashboardError, ConfigError) as error:
        print(f"medalign dashboard: {error}", file=sys.stderr)
        return 2
    warning = exposure_warning(settings["host"])
    if warning:
        print(f"medalign dashboard: WARNING: {warning}", file=sys.stderr, flush=True)
    logs = Path(tempfile.mkdtemp(prefix="medalign-dashboard-"))
    servers: list[Server] = []
    # SIGTERM behaves like Ctrl-C from here on, so every exit path goes through the cleanup.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    keep = False
    try:
        _print_table(exp_dir, start_servers(exp_dir, logdir, settings, logs, servers))
        if not settings["wait"]:
            keep = True
            pids = ", ".join(f"{s.name} pid {s.process.pid}" for s in servers)
            print(f"wait=false: the servers keep running ({pids}; logs in {logs}); "
                  f"stop them with: kill {' '.join(str(s.process.pid) for s in servers)}", flush=True)
            return 0
        sweep_level = (exp_dir / SWEEP_SPEC_FILE).is_file() and logdir == exp_dir / "tensorboard"
        return wait_in_foreground(servers, rebuild if sweep_level or is_uri(path) else None,
                                  float(settings["refresh"]))
    except DashboardError as error:
        print(f"medalign dashboard: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        print("medalign dashboard: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        if not keep:
            stop(servers)
            shutil.rmtree(logs, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
