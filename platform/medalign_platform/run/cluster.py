"""Which Ray cluster a driver uses, and whether it can ever run what is asked.

``ray.init(address=None)`` joins whatever cluster ``RAY_ADDRESS`` or Ray's
``ray_current_cluster`` file names, and a cluster that was stopped leaves that file
behind: the next run then retries "Failed to connect to GCS" for minutes. So the platform
decides the address itself (:func:`ray_init_address`):

* ``ray.address: null`` starts a new local cluster of its own (``address="local"``),
  unless ``RAY_ADDRESS`` is set in the environment (a submitted Ray job's entrypoint, or a
  user who exported it), which is then joined;
* ``ray.address: auto`` joins the cluster that ``RAY_ADDRESS`` or ``ray_current_cluster``
  names; ``host:port`` / ``ray://host:port`` join that one.

Before ``ray.init`` the address is probed (:func:`check_reachable`, a TCP connect with a
few seconds' timeout), so a stale or dead address fails at once with an error naming it.
Once Ray is up, :func:`check_fits` refuses resources that no node can ever offer
(``sweep.trial_resources={GPU: 1}`` on a CPU-only cluster), which Ray would otherwise wait
for forever.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence

from ..common.errors import ClusterError

PROBE_TIMEOUT_S = 3.0
ADDRESS_ENV = "RAY_ADDRESS"


def current_cluster_file() -> str:
    """Ray's ``ray_current_cluster`` file (written by ``ray start``), under ``$RAY_TMPDIR/ray``."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def ray_init_address(address: str | None) -> tuple[str, str]:
    """The address to hand ``ray.init`` for ``ray.address``, and where it came from (for messages).

    Raises:
        ClusterError: ``ray.address=auto`` and no cluster is named anywhere.
    """
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if not address:
        if env:
            return env, f"{ADDRESS_ENV}={env} (ray.address is null, so the environment's cluster is joined)"
        return "local", "a new local cluster"
    if address == "auto":
        if env:
            return env, f"ray.address=auto ({ADDRESS_ENV}={env})"
        path = current_cluster_file()
        try:
            with open(path) as handle:
                found = handle.read().strip()
        except OSError:
            found = ""
        if not found:
            raise ClusterError(f"ray.address=auto: no running cluster is named ({ADDRESS_ENV} is unset and {path} "
                               f"does not exist); start one with `ray start --head`, pass its address, or set "
                               f"ray.address=null to run on a new local cluster")
        return found, f"ray.address=auto (the last `ray start`, recorded in {path}: {found})"
    return address, f"ray.address={address}"


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a GCS (``host:port``) or Ray Client (``ray://host:port``) address; None for ``local``.

    Raises:
        ClusterError: a job-API URL (``http://...``) or an address without a port.
    """
    if address == "local":
        return None
    text = address
    if text.startswith(("http://", "https://")):
        raise ClusterError(f"ray.address={address} is the dashboard / job API URL; give the cluster's GCS address "
                           f"(host:6379) or its Ray Client address (ray://host:10001), or submit the command with "
                           f"`ray job submit --address {address} -- ...` (docs/jobs.md)")
    text = text.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"ray.address={address}: expected host:port (e.g. 10.0.0.5:6379), ray://host:port, "
                           f"auto, or null for a new local cluster")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, origin: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fails within ``timeout_s`` when nothing listens at ``address`` (``ray.init`` would retry for minutes).

    Raises:
        ClusterError: naming the address, where it came from and the fix.
    """
    target = host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ClusterError(f"no Ray cluster answers at {target[0]}:{target[1]} ({reason}); the address comes from "
                           f"{origin}. Start that cluster (`ray start --head`), fix the address, or set "
                           f"ray.address=null to run on a new local cluster") from None


def worker_resources(resources: Mapping[str, float], use_gpu: bool = False) -> dict[str, float]:
    """What one worker asks for: ``resources`` plus one GPU when ``use_gpu`` and none is named."""
    wanted = {str(k): float(v) for k, v in resources.items() if float(v) > 0}
    if use_gpu and "GPU" not in wanted:
        wanted["GPU"] = 1.0
    return wanted


def fits(nodes: Sequence[Mapping[str, float]], resources: Mapping[str, float], num_workers: int = 1) -> bool:
    """Whether ``num_workers`` workers, each holding ``resources``, can all be placed on ``nodes`` at once.

    Args:
        nodes: each alive node's total resources (``ray.nodes()[i]["Resources"]``).
        resources: one worker's request.
        num_workers: workers that must run together (a DDP run's gang).
    """
    wanted = {k: v for k, v in resources.items() if v > 0}
    placed = 0
    for node in nodes:
        per_node = min((int(node.get(key, 0.0) / amount + 1e-9) for key, amount in wanted.items()), default=num_workers)
        placed += per_node
    return placed >= num_workers


def check_fits(resources: Mapping[str, float], num_workers: int, setting: str) -> None:
    """Refuses a request that no combination of this cluster's alive nodes can ever satisfy.

    Raises:
        ClusterError: naming ``setting``, the request and what the largest node has.
    """
    import ray

    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    if fits(nodes, resources, num_workers):
        return
    keys = sorted(set(resources) | {"CPU", "GPU"})
    have = "; ".join(", ".join(f"{k} {node.get(k, 0):g}" for k in keys) for node in nodes) or "no alive node"
    gpu = " (this cluster has no GPU: use a GPU node, or drop GPU from the request)" \
        if resources.get("GPU", 0) > 0 and not any(node.get("GPU", 0) for node in nodes) else ""
    raise ClusterError(f"{setting}={dict(resources)} x {num_workers} worker(s) can never be scheduled on this "
                       f"cluster (nodes: {have}){gpu}; lower the request")
