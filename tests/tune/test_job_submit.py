"""``ray job submit`` of a sweep to a real local Ray cluster, with token authentication on.

The cluster is this test's own: ``ray start --head --block`` in a new session, with its
own temp dir, ports and token (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``), so
neither ``~/.ray/auth_token`` nor other Ray instances on the machine are touched. It is
stopped by SIGTERM to that ``ray start`` process (which drains and stops its children),
then anything left in its session or temp dir is killed. ``ray stop`` is never used: it
selects processes by name and would kill every Ray instance on the machine.
"""

from __future__ import annotations

import json
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
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Trials of a few seconds: two steps, one evaluation on 8 images, 4 new tokens.
TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.val_size=8", "trainer.test_size=8",
        "trainer.batch_size=4", "trainer.log_every=1", "trainer.max_new_tokens=4", "sweep.asha.grace_period=2"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Head:
    """A local single-node Ray cluster started with ``ray start --head --block``."""

    def __init__(self, root: Path, env: dict, token: str, ports: tuple[int, int], process: subprocess.Popen):
        self.root, self.env, self.token, self.process = root, env, token, process
        self.gcs_address = f"127.0.0.1:{ports[0]}"
        self.url = f"http://127.0.0.1:{ports[1]}"

    def api(self, path: str, *, auth: bool = True):
        """GET a Ray dashboard REST endpoint (JSON), with the cluster's bearer token."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this cluster, in the repository root, with the token in its env."""
        return subprocess.run([RAY, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def processes(self) -> set[psutil.Process]:
        """Every process of this cluster: its session (ray start's setsid), or its temp dir in the
        command line or working dir (job drivers run in their own session inside the temp dir)."""
        found = set()
        root = str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                mine = os.getsid(proc.pid) == self.process.pid
                mine = mine or root in " ".join(proc.info["cmdline"] or []) or (proc.info["cwd"] or "").startswith(root)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
            if mine and proc.pid != os.getpid():
                found.add(proc)
        return found

    def stop(self) -> None:
        left = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start --block drains, then stops its children
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        left |= self.processes()
        _, alive = psutil.wait_procs(left, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def _wait_for_dashboard(head: Head, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            head.api("/api/jobs/")
            return
        except (OSError, ValueError):
            time.sleep(0.5)  # poll interval
    pytest.fail(f"the Ray dashboard did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    # A short root: Ray's unix socket paths live under it and must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="mj", dir="/tmp"))
    token = secrets.token_hex(32)
    (root / "token").write_text(token)
    gcs, dashboard, agent, client = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MEDALIGN_CACHE")}
    env.update({
        "RAY_AUTH_MODE": "token",                       # keeps token auth on, whatever ~/.ray holds
        "RAY_AUTH_TOKEN_PATH": str(root / "token"),     # this cluster's token, read by ray start and the CLI
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
        "HF_HUB_OFFLINE": "1",
    })
    log = root / "head.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
             "--num-cpus", "2", "--temp-dir", str(root / "ray"), "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    cluster = Head(root, env, token, (gcs, dashboard), process)
    try:
        _wait_for_dashboard(cluster, log)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """Submits a 2-trial sweep as a job with experiments/runtime_env.yaml and waits for it to end."""
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    work = tmp_path_factory.mktemp("job")
    prepare_mini_synthmed(work / "cache")
    out = work / "sweeps"
    entrypoint = [f"MEDALIGN_CACHE={work / 'cache'}", "python", "-m", "medalign_platform", "sweep",
                  "experiment=synthmed_vqa", "search=smoke", "sweep.num_samples=2", f"sweep.output_dir={out}",
                  "sweep.name=job", *TINY]
    started = time.monotonic()
    result = head.ray("job", "submit", "--address", head.url, "--runtime-env", "experiments/runtime_env.yaml",
                      "--submission-id", "medalign-job-test", "--no-wait", "--", *entrypoint)
    assert result.returncode == 0, result.stdout + result.stderr
    info = wait_for_job(head, "medalign-job-test")
    logs = head.ray("job", "logs", "medalign-job-test", "--address", head.url)
    (work / "job.log").write_text(logs.stdout)  # kept with pytest's tmp dirs, for a failure's details
    print(f"\njob {info.get('status')} after {time.monotonic() - started:.0f}s")
    return info, logs, out / "job"


def _tracebacks(log: str) -> list[str]:
    """The traceback header lines of ``log``, except Python's "Exception ignored in" reports.

    Those are unraisable exceptions, not errors: when Tune stops a finished trial's actor,
    Ray's SIGTERM handler raises SystemExit, and if that lands inside a garbage-collector
    callback Python prints it as ignored while the actor exits anyway.
    """
    rows = log.splitlines()
    return [row for i, row in enumerate(rows)
            if "Traceback (most recent call last)" in row and not (i and "Exception ignored in" in rows[i - 1])]


def _around(text: str, needle: str, lines: int = 30) -> str:
    """The lines around the first ``needle`` (for a readable failure message)."""
    rows = text.splitlines()
    at = next((i for i, row in enumerate(rows) if needle in row), len(rows))
    return "\n".join(rows[max(0, at - 5):at + lines])


def wait_for_job(head: Head, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Polls the job API until the job reaches a terminal status (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = head.api(f"/api/jobs/{submission_id}")
        if info["status"] in TERMINAL:
            break
        time.sleep(1.0)  # poll interval
    return info


def test_token_authentication_is_on(head):
    with pytest.raises(urllib.error.HTTPError) as refused:
        head.api("/api/jobs/", auth=False)
    assert refused.value.code == 401
    unauthenticated = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run([RAY, "job", "list", "--address", head.url], env=unauthenticated,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "Authentication required" in result.stdout + result.stderr


def test_sweep_job_succeeds_without_a_traceback(submitted):
    info, logs, experiment = submitted
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs.stdout[-5000:]}"
    assert logs.returncode == 0, logs.stderr
    assert str(experiment) in logs.stdout  # the sweep's closing summary names its folder
    real = _tracebacks(logs.stdout)
    assert not real, "\n\n".join(_around(logs.stdout, line) for line in real[:3])


def test_job_ran_the_uploaded_working_dir_with_the_runtime_env(submitted):
    info, _, _ = submitted
    runtime_env = info["runtime_env"]
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_")  # the repository, zipped and uploaded
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert {".venv/", "sweeps/", "runs/", ".git/", "*.pt"} <= set(runtime_env["excludes"])


def test_results_land_in_the_absolute_output_dir(submitted):
    import optuna

    info, _, experiment = submitted
    assert info["status"] == "SUCCEEDED"
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"TERMINATED": 2}
    assert [r["status"] for r in summary["records"]] == ["TERMINATED", "TERMINATED"]
    study = optuna.load_study(study_name="job", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    finals = sorted(experiment.glob("trial_*/final.json"))
    assert len(finals) == 2
    for final in finals:
        assert json.loads(final.read_text())["metrics"]["step"] == 2


def test_dashboard_finds_the_cluster_and_the_sweep(submitted, head):
    """``medalign dashboard`` on the job's experiment: the sweep-level TensorBoard folder is built,
    and the Ray probe joins this cluster (token from the environment) and prints its dashboard."""
    import re

    _, _, experiment = submitted
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    result = subprocess.run([sys.executable, "-m", "medalign_platform", "dashboard", str(experiment), "port=0",
                             "optuna_port=0", "wait=false"], env=env, capture_output=True, text=True, timeout=180,
                            check=False)
    pids = re.search(r"stop them with: kill ([\d ]+)", result.stdout)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"(logdir {experiment / 'tensorboard'})" in result.stdout
        ray_line = re.search(r"Ray dashboard\s+(\S+)", result.stdout).group(1)
        assert ray_line == head.url
    finally:
        for pid in pids.group(1).split() if pids else []:
            os.killpg(int(pid), signal.SIGTERM)
        logs = re.search(r"logs in ([^)]+)\)", result.stdout)
        if logs:
            shutil.rmtree(logs.group(1), ignore_errors=True)


STORAGE_CHECK = ("import json; from medalign_platform.run.storage import detect_job_working_dir, storage_warnings; "
                 "print('STORAGE', json.dumps([detect_job_working_dir(), "
                 "storage_warnings('sweeps', ray_address=None, setting='sweep.output_dir')]))")


def test_storage_check_sees_that_a_relative_path_lands_in_the_job_copy(head):
    """Inside a real job the working dir copy is detected and a relative output dir is flagged."""
    result = head.ray("job", "submit", "--address", head.url, "--runtime-env", "experiments/runtime_env.yaml",
                      "--submission-id", "medalign-storage-check", "--no-wait", "--", "python", "-c", STORAGE_CHECK)
    assert result.returncode == 0, result.stdout + result.stderr
    info = wait_for_job(head, "medalign-storage-check")
    logs = head.ray("job", "logs", "medalign-storage-check", "--address", head.url).stdout
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    line = next(row for row in logs.splitlines() if row.startswith("STORAGE "))
    job_dir, warnings = json.loads(line.split(" ", 1)[1])
    assert job_dir.startswith(str(head.root / "ray")) and "/runtime_resources/working_dir_files/" in job_dir
    (warning,) = warnings
    assert f"results go to {job_dir}/sweeps" in warning and "sweep.output_dir=sweeps" in warning
