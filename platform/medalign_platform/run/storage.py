"""Where results land: warnings for output paths that other nodes or later runs cannot see.

Ray Train and Ray Tune write checkpoints and results straight to ``storage_path`` from
whichever node a worker runs on; they do not copy files between nodes. So on a cluster
with more than one node, ``run.output_dir`` / ``sweep.output_dir`` must be storage that
every node mounts at the same path (NFS, Lustre, ...), or a URI of an object store that
every node reaches (``s3://bucket/prefix``, :mod:`medalign_platform.run.filesystems`); a URI
gets no warning.
Inside a submitted Ray job a relative path resolves inside the job's copy of its
working directory, which Ray unpacks under the session directory and may delete later.

:func:`storage_warnings` returns those problems as sentences; :func:`warn_storage` prints
and logs them (``medalign train`` and ``medalign sweep`` call it once Ray is up).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .filesystems import is_uri  # noqa: F401 - also this module's public name

logger = logging.getLogger(__name__)

# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Set in every Ray worker process (stripped from a job's driver).
JOB_ID_ENV = "RAY_JOB_ID"
# Ray unpacks a runtime env's working_dir under <session>/runtime_resources/working_dir_files/.
WORKING_DIR_MARKER = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep
# Filesystems that several machines can mount: a path on one of them may well be shared.
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                   "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "9p", "efs",
                   "fuse.sshfs", "fuse.mountpoint-s3", "fuse.blobfuse", "fuse.rclone", "wekafs", "panfs", "virtiofs")
LOCAL_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


def _local_path(path: str) -> str:
    return str(path)[len("file://"):] if str(path).lower().startswith("file://") else str(path)


def detect_job_working_dir() -> str | None:
    """The working-dir copy this process runs in when it is part of a submitted Ray job, else None.

    A job's entrypoint runs with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` set and its current directory
    at the unpacked ``working_dir``; Ray's own workers carry ``RAY_JOB_ID`` instead. A current
    directory under ``runtime_resources/working_dir_files/`` identifies the copy either way.
    """
    cwd = os.getcwd()
    if WORKING_DIR_MARKER in cwd + os.sep:
        return cwd
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw:
        try:
            runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
        except ValueError:
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return cwd
    return None


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _mount_fstype(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount that holds ``path`` (its deepest existing ancestor)."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:  # not Linux, or /proc not mounted: unknown
        return None
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces in mount points as \040.
        point = fields[1].replace("\\040", " ")
        if _under(path, Path(point)) and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _is_shared_fs(path: Path, mounts_file: str = "/proc/mounts") -> bool:
    fstype = (_mount_fstype(path, mounts_file) or "").lower()
    return fstype in SHARED_FS_TYPES or fstype.startswith(("nfs", "fuse.nfs"))


def storage_warnings(path: str, *, ray_address: str | None, num_nodes: int | None = None,
                     job_working_dir: str | None = None, setting: str = "the output directory",
                     mounts_file: str = "/proc/mounts") -> list[str]:
    """Human-readable problems with ``path`` as the place where runs write their results.

    Args:
        path: the configured output directory (as given, relative or absolute) or a URI.
        ray_address: ``ray.address`` of the config (None: a local cluster of this process);
            only used to word the advice.
        num_nodes: alive nodes of the cluster; None: unknown (no multi-node checks).
        job_working_dir: the unpacked working dir when running as a Ray job; None: detect it
            with :func:`detect_job_working_dir`.
        setting: the config key to name in the messages, e.g. ``sweep.output_dir``.
        mounts_file: the mount table consulted to recognise shared filesystems.

    Returns:
        one sentence per problem; empty for a URI, or a local path of a single-node run
        outside a job's working dir.
    """
    if is_uri(path):
        return []
    job_dir = job_working_dir if job_working_dir is not None else detect_job_working_dir()
    local = Path(_local_path(path)).expanduser()
    base = Path(job_dir) if job_dir else Path.cwd()
    resolved = Path(os.path.normpath(local if local.is_absolute() else base / local))
    warnings: list[str] = []
    if job_dir and _under(resolved, Path(os.path.normpath(job_dir))):
        warnings.append(
            f"{setting}={path} lies inside this Ray job's copy of its working dir ({job_dir}): results go to "
            f"{resolved}, a temporary folder that Ray may delete after the job ends and that no other node sees; "
            f"set {setting} to an absolute path (on a multi-node cluster: on a shared filesystem such as an NFS "
            f"mount seen by every node)")
    if num_nodes is None or num_nodes <= 1:
        return warnings
    cluster = f"this Ray cluster ({num_nodes} alive nodes{', ' + ray_address if ray_address else ''})"
    scratch = next((root for root in LOCAL_SCRATCH if _under(resolved, Path(root))), None)
    if scratch:
        warnings.append(
            f"{setting}={path} is under {scratch} on {cluster}: that folder is "
            f"local to each node, so checkpoints and results written by workers on other nodes end up scattered "
            f"(or lost); set {setting} to a path on a shared filesystem mounted on every node (e.g. NFS)")
    elif not _is_shared_fs(resolved, mounts_file):
        warnings.append(
            f"{setting}={path} is a local path on {cluster}: it is not shared between nodes unless it is on a "
            f"shared filesystem (it is not on an NFS/network mount here); set {setting} to a path on a shared "
            f"filesystem mounted at the same place on every node (e.g. NFS)")
    return warnings


def alive_nodes() -> int | None:
    """Alive nodes of the Ray cluster this process is connected to; None when not connected."""
    import ray

    if not ray.is_initialized():
        return None
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _logs_reach_stderr(log: logging.Logger) -> bool:
    """Whether a WARNING on ``log`` is already written to stderr (so printing would repeat it)."""
    handlers = []
    current: logging.Logger | None = log
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if not handlers:  # logging's last-resort handler writes to stderr
        return logging.lastResort is not None
    return any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
               and h.level <= logging.WARNING for h in handlers)


def warn_storage(path: str, ray_address: str | None, *, setting: str = "the output directory") -> list[str]:
    """Logs and prints (stderr) the :func:`storage_warnings` of ``path`` for the connected cluster.

    Call it after Ray is initialised so that the node count is known.

    Returns:
        the warnings, as :func:`storage_warnings` returned them.
    """
    warnings = storage_warnings(path, ray_address=ray_address, num_nodes=alive_nodes(), setting=setting)
    echo = not _logs_reach_stderr(logger)
    for message in warnings:
        logger.warning(message)
        if echo:
            print(f"medalign: warning: {message}", file=sys.stderr, flush=True)
    return warnings
