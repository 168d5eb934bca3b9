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
