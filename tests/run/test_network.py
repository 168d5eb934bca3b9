"""What the platform exposes: the dashboard's warning and reachable URL for a wildcard bind.

That a cluster the platform starts for itself listens on loopback only is checked on a real
sweep's cluster: ``tests/tune/test_shared_storage.py::test_the_sweep_cluster_listens_on_loopback_only``."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_only_a_loopback_address_that_the_outward_address_does_not_answer_is_kept_on_loopback():
    import socket

    from medalign_platform.run.network import joins_loopback_only_cluster

    with socket.create_server(("127.0.0.1", 0)) as loopback, socket.create_server(("0.0.0.0", 0)) as everywhere:
        assert joins_loopback_only_cluster(f"127.0.0.1:{loopback.getsockname()[1]}")
        assert joins_loopback_only_cluster(f"localhost:{loopback.getsockname()[1]}")
        assert not joins_loopback_only_cluster(f"127.0.0.1:{everywhere.getsockname()[1]}")  # Ray's own case
    for address in (None, "", "local", "auto", "10.0.0.5:6379", "ray://127.0.0.1:10001", "127.0.0.1"):
        assert not joins_loopback_only_cluster(address), address


CLUSTER = """
import sys, ray
from medalign_platform.run.network import loopback_cluster
with loopback_cluster(None):
    ray.init(num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""
JOIN = """
import sys, types, ray
from medalign_platform.run.driver import ensure_ray
from medalign_platform.run.settings import RaySettings
ensure_ray(types.SimpleNamespace(ray=RaySettings.from_dict({"address": sys.argv[1]})))  # all ensure_ray reads
print(ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"], flush=True)
"""


def test_a_second_driver_joins_a_loopback_cluster_of_this_machine_at_once(tmp_path):
    """``ray.address=127.0.0.1:PORT`` of a cluster a ``medalign`` run started: Ray used to swap in
    the machine's outward address, where that cluster does not listen, and retry for minutes."""
    import secrets
    import tempfile

    (tmp_path / "token").write_text(secrets.token_hex(32))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"),
           "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=(tmp_path / "cluster.log").open("w"), text=True,
                               start_new_session=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), (tmp_path / "cluster.log").read_text()[-3000:]
        joined = subprocess.run([sys.executable, "-c", JOIN, address], env=env, capture_output=True, text=True,
                                timeout=90)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert joined.stdout.split()[-2:] == [address, "1.0"]
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=60)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
