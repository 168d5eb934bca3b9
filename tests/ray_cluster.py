"""A multi-node Ray cluster on this machine for tests: ``ray start`` processes on loopback.

The head and every extra node are ``ray start --block`` processes in their own sessions, with
the test's own temp dir, ports and token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``),
each node with its own CPUs and its own loopback address (127.0.0.2, 127.0.0.3, ...: Ray
replaces 127.0.0.1 given as ``--node-ip-address`` by the machine's outward address), so the
scheduler sees separate machines that only this one can reach. The cluster is stopped by SIGTERM to
its own ``ray start`` processes, then anything left in their sessions or temp dir is killed;
``ray stop`` is never used (it would stop every Ray instance on the machine).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
START_TIMEOUT_S = 120


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalCluster:
    """A head node and extra nodes, started and stopped by this object.

    Args:
        env: extra environment of every node (and so of every worker and job driver).
    """

    def __init__(self, env: dict[str, str] | None = None):
        # A short root: Ray's unix socket paths live under it and must stay under ~107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
        self.token = secrets.token_hex(32)
        (self.root / "token").write_text(self.token)
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MEDALIGN_CACHE")}
        base.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "token"),
            "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        })
        self.env = base
        self.processes: list[subprocess.Popen] = []
        self.gcs_address = ""
        self.url = ""

    # ----------------------------------------------------------------- start
    def _start(self, args: list[str], log: Path, env: dict) -> subprocess.Popen:
        with log.open("w") as out:
            process = subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def start_head(self, num_cpus: int, node_ip: str = "127.0.0.2") -> None:
        """The head node at ``node_ip`` (a loopback address other than 127.0.0.1, which Ray would
        replace by the machine's outward address)."""
        gcs, dashboard, agent, client = _free_ports(4)
        self.gcs_address, self.url = f"{node_ip}:{gcs}", f"http://127.0.0.1:{dashboard}"
        log = self.root / "head.log"
        process = self._start(
            ["--head", "--node-ip-address", node_ip, "--port", str(gcs), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
             "--ray-client-server-port", str(client), "--num-cpus", str(num_cpus),
             "--object-store-memory", str(100 * 2**20), "--temp-dir", str(self.root / "ray"),
             "--disable-usage-stats"], log, self.env)
        self._wait(lambda: len(self.alive_nodes()) == 1, process, log, "the head node")

    def add_node(self, num_cpus: int, node_ip: str) -> None:
        """One more node at ``node_ip`` (another loopback address), joining the head."""
        index = len(self.processes)
        log = self.root / f"node{index}.log"
        before = set(self.alive_nodes())
        # Its own temp dir, as on a separate machine: nodes sharing one would share (and delete)
        # each other's unpacked job working dirs.
        process = self._start(["--address", self.gcs_address, "--node-ip-address", node_ip,
                               "--num-cpus", str(num_cpus), "--object-store-memory", str(100 * 2**20),
                               "--temp-dir", str(self.root / f"ray{index}"), "--disable-usage-stats"], log, self.env)
        self._wait(lambda: set(self.alive_nodes()) - before, process, log, f"node {index}")

    def _wait(self, ready, process: subprocess.Popen, log: Path, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"ray start ({what}) exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)  # poll interval while Ray starts
        raise RuntimeError(f"{what} was not up within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")

    # ----------------------------------------------------------------- use
    def api(self, path: str):
        """GET a dashboard REST endpoint (JSON) with the cluster's token."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> dict[str, dict]:
        """``{node id: node record}`` of the alive nodes (Ray's state API)."""
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {node["node_id"]: node for node in nodes if node["state"] == "ALIVE"}

    def ray(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this cluster, with its token in the environment."""
        return subprocess.run([RAY, *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    # ----------------------------------------------------------------- stop
    def own_processes(self) -> set[psutil.Process]:
        """Every process of this cluster: the sessions of its ``ray start`` processes, or its temp
        dir in the command line or working directory."""
        sessions = {p.pid for p in self.processes}
        root = str(self.root)
        found = set()
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                mine = os.getsid(proc.pid) in sessions
                mine = mine or root in " ".join(proc.info["cmdline"] or []) or (proc.info["cwd"] or "").startswith(root)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
            if mine and proc.pid != os.getpid():
                found.add(proc)
        return found

    def stop(self) -> None:
        left = self.own_processes()
        for process in reversed(self.processes):  # extra nodes first, the head last
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # ray start --block stops its children
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        left |= self.own_processes()
        _, alive = psutil.wait_procs(left, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- what a cluster exposes


def listening_sockets(root: psutil.Process) -> dict[tuple[str, int], str]:
    """``{(ip, port): process}`` of every listening TCP socket of ``root`` and its descendants
    (a driver and the Ray cluster it started: GCS, raylet, dashboard, agents, workers)."""
    found = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            command = process.cmdline()
            name = command[0] if command else process.name()  # Ray's agents retitle themselves: ray::DashboardAgent
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    found[(connection.laddr.ip, connection.laddr.port)] = name
        except psutil.Error:
            continue
    return found


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 or an IPv4-mapped loopback address."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs a driver's process group, then any of its descendants that left the group.

    Ray's workers may live in other process groups: they are killed at once too, or a trial
    keeps training (and checkpointing) while the test waits, and is no longer "killed mid-run".
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    os.killpg(proc.pid, signal.SIGKILL)
    for process in descendants:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(descendants, timeout=30)


def trial_pids(records: list[dict]) -> set[int]:
    """The processes the trials of a sweep ran in (Tune's ``pid`` in each trial's first result row),
    from the summary's records; fewer than trials means trial actors were reused."""
    from medalign_platform.tune.result_log import RESULT_FILE

    return {json.loads((Path(r["path"]) / RESULT_FILE).read_text().splitlines()[0])["pid"] for r in records}
