"""What the platform exposes: a local cluster's ports on loopback only, the dashboard's warning
and reachable URL for a wildcard bind."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from medalign_platform.run.network import exposure_warning, local_url, machine_address, public_url


def test_wildcard_binds_are_warned_about_and_shown_with_a_reachable_address():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    warning = exposure_warning("0.0.0.0")
    assert "every network interface" in warning and "without authentication" in warning
    assert "ssh -L 6006:127.0.0.1:6006" in warning
    address = machine_address()
    assert not address.startswith("127.")
    assert public_url("0.0.0.0", 6006) == f"http://{address}:6006/"
    assert local_url("0.0.0.0", 6006) == "http://127.0.0.1:6006/"
    assert public_url("10.1.2.3", 80) == "http://10.1.2.3:80/" and exposure_warning("10.1.2.3")


CLUSTER = """
import os, sys
from medalign_platform.run.driver import ensure_ray
from medalign_platform.run.settings import RunSettings
ensure_ray(RunSettings.from_config({}))
import ray
print("NODE", ray.util.get_node_ip_address(), flush=True)
sys.stdin.read()  # stays up until the test closes stdin
"""


def _listeners(root: psutil.Process) -> dict[tuple[str, int], str]:
    """``{(ip, port): process name}`` of every listening TCP socket of ``root``'s descendants."""
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


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_a_cluster_of_our_own_listens_on_loopback_only():
    """``ray.address: null``: GCS, raylet, dashboard, dashboard agent, runtime-env agent and the
    metrics exporters all bind 127.0.0.1 (Ray's default is every interface)."""
    # A cluster of this test only, in a short folder (Ray's socket paths must stay short).
    root = tempfile.mkdtemp(prefix="nw", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = root
    log = open(os.path.join(root, "driver.log"), "w")  # noqa: SIM115 - closed in finally
    driver = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = driver.stdout.readline()
        assert line.startswith("NODE "), \
            f"the driver did not start Ray (exit {driver.poll()}):\n{open(log.name).read()[-3000:]}"
        assert line.split()[1] == "127.0.0.1"
        root = psutil.Process(driver.pid)
        deadline = time.monotonic() + 90
        listeners: dict = {}
        while time.monotonic() < deadline:  # the agents open their ports after ray.init returns
            listeners = _listeners(root)
            names = " ".join(listeners.values())
            if all(part in names for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")):
                break
            time.sleep(0.5)  # poll interval
        names = " ".join(listeners.values())
        for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert part in names, f"no listening socket of {part} yet: {listeners}"
        exposed = {key: name for key, name in listeners.items() if not _loopback(key[0])}
        assert exposed == {}, f"listening beyond loopback: {exposed}"
        assert len(listeners) >= 6
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_dashboard_on_every_interface_warns_and_prints_a_reachable_url(tmp_path):
    """``medalign dashboard ... host=0.0.0.0``: a warning on stderr, and URLs with this machine's
    address (127.0.0.1 would not work from elsewhere); the servers answer on loopback too."""
    import re
    import signal
    import urllib.request

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    writer.add_scalar("val/closed_accuracy", 0.5, 1)
    writer.close()
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}  # the Ray look-up: a closed port
    result = subprocess.run([sys.executable, "-m", "medalign_platform", "dashboard", str(tmp_path / "run"),
                             "host=0.0.0.0", "port=0", "optuna_port=0", "wait=false"], env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    pids = re.search(r"stop them with: kill ([\d ]+)", result.stdout)
    try:
        assert result.returncode == 0 and pids, result.stdout + result.stderr
        assert "WARNING: host=0.0.0.0 serves TensorBoard and optuna-dashboard on every network interface" \
            in result.stderr
        url = re.search(r"TensorBoard\s+(http://\S+)", result.stdout).group(1)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert url == f"http://{machine_address()}:{port}/" and "127.0.0.1" not in url
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10) as response:
            assert response.status == 200
    finally:
        for pid in (pids.group(1).split() if pids else []):
            try:
                os.killpg(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
