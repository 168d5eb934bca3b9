"""What the platform exposes on the network, and where it can be kept to loopback.

* A local Ray cluster (``ray.address`` null: the cluster ``medalign train`` / ``sweep``
  starts for itself) serves nothing to other machines: :func:`loopback_cluster` makes Ray give
  its node the address 127.0.0.1, and Ray then binds its GCS, raylet, object manager,
  dashboard, dashboard agent, metrics export and autoscaler metrics ports on loopback (by
  default they listen on every interface, the metrics ports without authentication).
* ``medalign dashboard host=0.0.0.0`` serves TensorBoard and optuna-dashboard on every
  interface; :func:`exposure_warning` says so, and :func:`public_url` is the URL that works
  from elsewhere (the machine's address, not 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOCAL_ADDRESSES = (None, "", "local")  # ray.address values that start a cluster of this process
# Ray's own switch: with it off, a node started by ray.init takes 127.0.0.1 as its address
# (Ray uses this on macOS and Windows, where it supports single-machine clusters only).
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_cluster(address: str | None) -> Iterator[None]:
    """Around ``ray.init``: a cluster it starts gets node address 127.0.0.1, so every port it
    opens listens on loopback only; a driver joining such a cluster (another ``medalign`` run on
    this machine, ``ray.address=127.0.0.1:PORT``) keeps 127.0.0.1 too
    (:func:`joins_loopback_only_cluster`). Does nothing when ``ray.init`` joins any other cluster.

    Ray resolves an explicit ``_node_ip_address="127.0.0.1"`` to the machine's outward
    address, so the node address is chosen through Ray's single-machine switch instead: the
    module constant it reads when it starts a node, and the environment variable its child
    processes read. Both are restored afterwards.
    """
    if not (starts_local_cluster(address) or joins_loopback_only_cluster(address)):
        yield
        return
    import ray._private.ray_constants as constants

    saved_env, saved_flag = os.environ.get(RAY_CLUSTER_ENV), getattr(constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[RAY_CLUSTER_ENV] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env


def starts_local_cluster(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a new cluster rather than joining one: Ray
    joins ``RAY_ADDRESS`` (set inside a submitted job) or, for ``auto``/None, a cluster it finds
    recorded on this machine. (A joining driver must keep the node's real address, or Ray finds
    no raylet of its own.)"""
    if address not in LOCAL_ADDRESSES and address != "auto":
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # noqa: BLE001 - an address Ray cannot parse: ray.init reports it, nothing to patch
        return False


def joins_loopback_only_cluster(address: str | None, timeout_s: float = 1.0) -> bool:
    """Whether ``ray.init(address=address)`` joins a cluster on this machine that listens on loopback only.

    Ray replaces a 127.0.0.1 address with the machine's outward one before it connects (a
    cluster started by ``ray start`` listens there); a cluster started with node address
    127.0.0.1 (:func:`loopback_cluster`) does not, and ``ray.init`` then retried "Failed to
    connect to GCS" for minutes. So: a loopback ``host:port`` whose port does not answer on the
    outward address.
    """
    from ..common.errors import ClusterError
    from .cluster import host_port

    if address in LOCAL_ADDRESSES or address == "auto" or "://" in address:  # ray:// is Ray Client's
        return False
    try:
        target = host_port(address)
    except ClusterError:  # not host:port: ray.init reports it
        return False
    if target is None or target[0] not in LOOPBACK_HOSTS:
        return False
    import ray

    try:
        socket.create_connection((ray.util.get_node_ip_address(), target[1]), timeout=timeout_s).close()
    except OSError:
        return True
    return False


def machine_address(ipv6: bool = False) -> str:
    """An address other machines can use to reach this one: the first non-loopback, non-link-local
    address of an interface that is up (IPv4 unless ``ipv6``), else the host name."""
    import psutil

    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    stats = psutil.net_if_stats()
    for name, addresses in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for address in addresses:
            ip = address.address.split("%", 1)[0]
            if address.family == family and not ip.startswith(("127.", "fe80:")) and ip != "::1":
                return ip
    return socket.gethostname()


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def public_url(host: str, port: int) -> str:
    """The URL of a server bound to ``host``: for a wildcard bind, with this machine's address
    (which is what binding every interface is for; 127.0.0.1 would only work here)."""
    return _format_url(machine_address(ipv6=host == "::") if host in WILDCARD_HOSTS else host, port)


def local_url(host: str, port: int) -> str:
    """The URL this machine uses to reach a server bound to ``host`` (loopback for a wildcard bind)."""
    return _format_url({"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


def exposure_warning(host: str) -> str | None:
    """The warning for a dashboard bind that other machines can reach (None for loopback)."""
    if host in LOOPBACK_HOSTS:
        return None
    where = "every network interface of this machine" if host in WILDCARD_HOSTS else host
    return (f"host={host} serves TensorBoard and optuna-dashboard on {where}, without authentication: anyone who "
            f"can reach it reads the sweep's results, and optuna-dashboard also lets them edit or delete the study. "
            f"Prefer host=127.0.0.1 and an SSH tunnel: ssh -L 6006:127.0.0.1:6006 -L 8080:127.0.0.1:8080 "
            f"{socket.gethostname()}")
