"""``medalign dashboard``: a real TensorBoard on real event files, found, served and stopped."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from medalign_platform.cli import main

START_TIMEOUT_S = 120  # TensorBoard's start-up on a busy 2-core machine
OPTUNA_DASHBOARD = importlib.util.find_spec("optuna_dashboard") is not None
# RAY_ADDRESS pointing at a closed port keeps the Ray look-up away from any other cluster on
# this machine (tests/tune/test_multinode.py checks it against a real one).
NO_RAY = "http://127.0.0.1:9"
ISOLATED = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": NO_RAY}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_events(folder: Path, losses: list[float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, loss in enumerate(losses):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("val/closed_accuracy", 1 - loss, step)
    writer.close()


@pytest.fixture
def sweep_dir(tmp_path):
    """An experiment folder shaped like a sweep's: two trials, each with its own event files."""
    exp = tmp_path / "exp"
    write_events(exp / "trial_a" / "tensorboard", [0.9, 0.5])
    write_events(exp / "trial_b" / "tensorboard", [0.8, 0.3])
    return exp


class Dashboard:
    """``python -m medalign_platform dashboard ...`` as a subprocess whose stdout is read line by line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "medalign_platform", "dashboard", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ISOLATED)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line_matching(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        """The first stdout line matching ``pattern`` (fails on exit or deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"dashboard exited ({self.process.wait()}): {self.seen}\n{self.process.stderr.read()}")
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"no line matching {pattern!r} within {timeout}s: {self.seen}")

    def tensorboard_processes(self) -> list[psutil.Process]:
        """TensorBoard and its helpers (the data server): the dashboard's descendants."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        return [p for p in children if "tensorboard" in " ".join(p.cmdline())]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for_runs(base_url: str, expected: set[str], timeout: float = START_TIMEOUT_S) -> list[str]:
    """Polls TensorBoard's ``/data/runs`` until the expected runs are loaded (first scan of the logdir)."""
    deadline = time.monotonic() + timeout
    runs: list[str] = []
    while time.monotonic() < deadline:
        runs = get_json(base_url.rstrip("/") + "/data/runs")
        if expected <= set(runs):
            return runs
        time.sleep(0.2)  # poll interval
    pytest.fail(f"TensorBoard listed {runs}, expected {expected}")


def gone(processes: list[psutil.Process], timeout: float = 30) -> bool:
    """Whether every process exited (a zombie waiting for a reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)  # poll interval
    return False


def test_serves_every_trial_run_and_stops_its_children_on_sigterm(sweep_dir):
    port = _free_port()
    dashboard = Dashboard(str(sweep_dir), f"port={port}", f"optuna_port={_free_port()}")
    try:
        url = dashboard.line_matching(r"TensorBoard\s+(http://\S+)").group(1)
        assert url == f"http://127.0.0.1:{port}/"
        ray_line = dashboard.line_matching(r"Ray dashboard\s+(.+)").group(1)
        assert ray_line.startswith(f"RAY_ADDRESS={NO_RAY} does not answer; start a cluster with: ray start --head")
        dashboard.line_matching(r"Press Ctrl-C to stop")
        runs = wait_for_runs(url, {"trial_a/tensorboard", "trial_b/tensorboard"})
        assert sorted(runs) == ["trial_a/tensorboard", "trial_b/tensorboard"]
        tags = get_json(f"{url}data/plugin/scalars/tags")
        assert set(tags["trial_a/tensorboard"]) == {"train/loss", "val/closed_accuracy"}
        children = dashboard.tensorboard_processes()
        assert children, "TensorBoard is not a child of the dashboard"
        dashboard.process.send_signal(signal.SIGTERM)
        assert dashboard.process.wait(timeout=60) == 0
        assert gone(children), [p.cmdline() for p in children if p.is_running()]
        with pytest.raises(OSError):  # nobody answers on the port any more
            urllib.request.urlopen(url, timeout=5)
    finally:
        dashboard.kill()


def test_busy_port_is_replaced_and_wait_false_leaves_the_servers_running(tmp_path):
    """A run folder (tensorboard/ inside) with a study: logdir is tensorboard/, the study is offered."""
    import optuna

    run = tmp_path / "run"
    write_events(run / "tensorboard", [0.7, 0.2])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{run / 'optuna.db'}")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "medalign_platform", "dashboard", str(run), f"port={taken}",
             f"optuna_port={_free_port()}", "wait=false"], capture_output=True, text=True, timeout=START_TIMEOUT_S,
            check=False, env=ISOLATED)
    assert result.returncode == 0, result.stderr
    assert f"port {taken} is busy; TensorBoard uses port" in result.stderr
    url = re.search(r"TensorBoard\s+(http://\S+)\s+\(logdir (\S+)\)", result.stdout)
    assert url and f":{taken}/" not in url.group(1) and url.group(2) == str(run / "tensorboard")
    pids = [int(p) for p in re.search(r"stop them with: kill ([\d ]+)", result.stdout).group(1).split()]
    servers = [psutil.Process(pid) for pid in pids]
    try:
        assert wait_for_runs(url.group(1), {"."}) == ["."]  # the logdir itself is the one run
        optuna_line = re.search(r"optuna-dashboard\s+(.+)", result.stdout).group(1)
        if OPTUNA_DASHBOARD:
            studies = get_json(optuna_line.split()[0] + "api/studies")
            assert [s["study_name"] for s in studies["study_summaries"]] == ["demo"]
        else:
            assert "not installed" in optuna_line and "pip install optuna-dashboard" in optuna_line
            assert len(pids) == 1
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its helpers: its own process group
        shutil.rmtree(re.search(r"logs in ([^)]+)\)", result.stdout).group(1), ignore_errors=True)
        assert gone(servers)


def test_optuna_dashboard_install_hint_when_missing(sweep_dir):
    """Without the optional package the command still works and says how to get it."""
    if OPTUNA_DASHBOARD:
        pytest.skip("optuna-dashboard is installed here (covered by the wait=false test)")
    from medalign_platform.tune.dashboard import OPTUNA_HINT, optuna_dashboard_command

    assert optuna_dashboard_command() is None
    assert "pip install optuna-dashboard" in OPTUNA_HINT


@pytest.mark.parametrize("make, args, message", [
    (lambda tmp: tmp / "missing", [], "no such directory"),
    (lambda tmp: tmp, [], "no TensorBoard data under"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", [], "not a directory"),
    (lambda tmp: tmp, ["prot=1"], "unknown key prot; did you mean port?"),
    (lambda tmp: tmp, ["port=70000"], "port must be a port number 0..65535"),
    (lambda tmp: tmp, ["wait=maybe"], "wait must be true or false"),
])
def test_bad_paths_and_settings_exit_2_with_a_clear_message(tmp_path, capsys, make, args, message):
    (tmp_path / "trial_x" / "tensorboard").mkdir(parents=True)  # folders but no event files
    path = make(tmp_path)
    assert main(["dashboard", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("medalign dashboard: ")


def test_logdir_prefers_the_sweep_level_folder_when_it_has_events(sweep_dir):
    from medalign_platform.tune.dashboard import find_logdir

    assert find_logdir(sweep_dir) == sweep_dir
    (sweep_dir / "tensorboard").mkdir()
    assert find_logdir(sweep_dir) == sweep_dir  # empty: the trial folders are used
    (sweep_dir / "tensorboard" / "trial_a").symlink_to(sweep_dir / "trial_a" / "tensorboard")
    assert find_logdir(sweep_dir) == sweep_dir / "tensorboard"  # links to trial folders count
