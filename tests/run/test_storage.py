"""``storage_warnings``: output paths that a Ray job or a multi-node cluster would lose or scatter."""

from __future__ import annotations

import json
import logging

import pytest
from medalign_platform.run.storage import (
    JOB_CONFIG_ENV,
    detect_job_working_dir,
    is_uri,
    storage_warnings,
    warn_storage,
)


@pytest.fixture
def mounts(tmp_path):
    """A mount table: / on ext4, /mnt/shared on NFS (the format of /proc/mounts)."""
    table = tmp_path / "mounts"
    table.write_text("/dev/sda1 / ext4 rw,relatime 0 0\n"
                     "server:/export /mnt/shared nfs4 rw,relatime 0 0\n"
                     "tmpfs /dev/shm tmpfs rw 0 0\n")
    return str(table)


@pytest.fixture
def outside_job(monkeypatch, tmp_path):
    """A plain process: no job env var, cwd outside any Ray working dir."""
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("path, expected", [
    ("s3://bucket/sweeps", True), ("gs://b/x", True), ("abfss://c@acct/x", True),
    ("file:///data/sweeps", False), ("/data/sweeps", False), ("sweeps", False), ("C:/x", False),
])
def test_uris_are_recognised(path, expected):
    assert is_uri(path) is expected


def test_single_node_local_run_has_no_warnings(outside_job, mounts):
    for path in ("sweeps", "/tmp/sweeps", "/home/me/sweeps"):
        for nodes in (None, 1):
            assert storage_warnings(path, ray_address=None, num_nodes=nodes, mounts_file=mounts) == []


def test_relative_path_inside_a_job_lands_in_the_working_dir_copy(outside_job, mounts):
    job_dir = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    (warning,) = storage_warnings("sweeps", ray_address=None, num_nodes=1, job_working_dir=job_dir,
                                  setting="sweep.output_dir", mounts_file=mounts)
    assert f"results go to {job_dir}/sweeps" in warning
    assert "sweep.output_dir=sweeps" in warning and "set sweep.output_dir to an absolute path" in warning


def test_absolute_path_already_resolved_inside_the_job_copy_is_flagged(outside_job, mounts):
    """``medalign train`` and ``sweep`` resolve output dirs before the check: still caught."""
    job_dir = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    (warning,) = storage_warnings(f"{job_dir}/runs", ray_address=None, num_nodes=1, job_working_dir=job_dir,
                                  setting="run.output_dir", mounts_file=mounts)
    assert "run.output_dir=" in warning and "temporary folder" in warning


def test_absolute_path_outside_the_job_copy_is_fine_on_one_node(outside_job, mounts):
    job_dir = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    assert storage_warnings("/data/sweeps", ray_address=None, num_nodes=1, job_working_dir=job_dir,
                            mounts_file=mounts) == []


def test_local_path_on_a_multi_node_cluster_is_not_shared(outside_job, mounts):
    (warning,) = storage_warnings("/home/me/sweeps", ray_address="10.0.0.1:6379", num_nodes=3,
                                  setting="sweep.output_dir", mounts_file=mounts)
    assert "not shared between nodes unless it is on a shared filesystem" in warning
    assert "3 alive nodes, 10.0.0.1:6379" in warning
    assert "set sweep.output_dir to a path on a shared filesystem mounted at the same place on every node" in warning


def test_tmp_on_a_multi_node_cluster_is_node_local(outside_job, mounts):
    for path, root in (("/tmp/sweeps", "/tmp"), ("/dev/shm/x", "/dev/shm")):
        (warning,) = storage_warnings(path, ray_address="auto", num_nodes=2, mounts_file=mounts)
        assert f"is under {root}" in warning and "local to each node" in warning


def test_nfs_mount_and_uris_are_fine_on_a_multi_node_cluster(outside_job, mounts):
    assert storage_warnings("/mnt/shared/sweeps/new", ray_address="auto", num_nodes=4, mounts_file=mounts) == []
    assert storage_warnings("s3://bucket/sweeps", ray_address="auto", num_nodes=4, mounts_file=mounts) == []


def test_relative_path_in_a_job_on_a_multi_node_cluster_gets_both_warnings(outside_job, mounts):
    job_dir = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    warnings = storage_warnings("sweeps", ray_address=None, num_nodes=2, job_working_dir=job_dir,
                                mounts_file=mounts)
    assert len(warnings) == 2
    assert "working dir" in warnings[0] and "local to each node" in warnings[1]


def test_job_working_dir_is_detected_from_the_job_env_and_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert detect_job_working_dir() is None
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert detect_job_working_dir() == str(tmp_path)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))  # a job without working_dir
    assert detect_job_working_dir() is None
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    monkeypatch.delenv(JOB_CONFIG_ENV)
    monkeypatch.chdir(copy)
    assert detect_job_working_dir() == str(copy)
    # Detected automatically when job_working_dir is not given.
    (warning,) = storage_warnings("runs", ray_address=None, num_nodes=1, setting="run.output_dir")
    assert f"results go to {copy}/runs" in warning


def test_warn_storage_logs_each_warning_once(monkeypatch, tmp_path, caplog, capsys):
    """Without Ray initialised the node count is unknown: only the job check applies."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_y"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with caplog.at_level(logging.WARNING, logger="medalign_platform.run.storage"):
        warnings = warn_storage("sweeps", None, setting="sweep.output_dir")
    assert len(warnings) == 1
    assert [r.getMessage() for r in caplog.records] == warnings
    # pytest's capture handler is not stderr, so the warning is printed there as well.
    assert capsys.readouterr().err == f"medalign: warning: {warnings[0]}\n"
    monkeypatch.chdir(tmp_path)
    assert warn_storage("sweeps", None) == []


def test_driver_leaves_the_variables_a_submitted_job_sets_to_the_job(monkeypatch):
    """Inside ``ray job submit`` the job's env vars win; Ray refuses to merge the same key twice."""
    import json

    from medalign_platform.run.driver import _job_env_vars
    from medalign_platform.run.storage import JOB_CONFIG_ENV

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert _job_env_vars() == {}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": "platform"}}}))
    assert _job_env_vars() == {"HF_HUB_OFFLINE": "1", "PYTHONPATH": "platform"}
    monkeypatch.setenv(JOB_CONFIG_ENV, "not json")
    assert _job_env_vars() == {}
