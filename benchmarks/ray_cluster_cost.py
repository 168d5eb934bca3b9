"""CPU cost of a local Ray cluster with and without Ray's dashboard and prestarted workers.

Each variant runs in a fresh Python process: ``ray.init`` of a new local cluster (its own
temp dir), two actors answering one call, ``--idle`` seconds of waiting, ``ray.shutdown``.
The CPU is that of the whole machine (``/proc/stat``: user + nice + system over all cores),
so the figures hold only on an otherwise idle machine; each variant runs ``--repeats`` times,
interleaved, and the script prints mean and spread side by side, and the ratio to the default.

    .venv/bin/python benchmarks/ray_cluster_cost.py --repeats 2 --idle 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time, ray
ray.init(log_to_driver=False, **({} if sys.argv[1] == "1" else {"include_dashboard": False}))
@ray.remote
class Echo:
    def ping(self):
        return 1
actors = [Echo.remote() for _ in range(2)]
assert ray.get([a.ping.remote() for a in actors]) == [1, 1]
time.sleep(float(sys.argv[2]))
ray.shutdown()
"""
NO_PRESTART = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
VARIANTS = {  # name: (dashboard on, extra environment)
    "default": (True, {}),
    "no prestarted workers": (True, NO_PRESTART),
    "no dashboard": (False, {}),
    "neither": (False, NO_PRESTART),
}


def machine_cpu_s() -> float:
    with open("/proc/stat") as stat:
        user, nice, system = (int(v) for v in stat.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def measure(dashboard: bool, extra: dict, idle: float) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one start / two actors / idle / shutdown."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="rcc", dir="/tmp") as ray_tmp:  # short: socket paths
        env.update(extra, RAY_TMPDIR=ray_tmp)
        cpu, wall = machine_cpu_s(), time.monotonic()
        subprocess.run([sys.executable, "-c", CHILD, "1" if dashboard else "0", str(idle)], env=env, check=True,
                       capture_output=True)
        return machine_cpu_s() - cpu, time.monotonic() - wall


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the cluster waits before shutdown")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {name: {"start": [], "idle": []} for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (dashboard, extra) in VARIANTS.items():
            start, _ = measure(dashboard, extra, 0.0)
            with_idle, _ = measure(dashboard, extra, args.idle)
            results[name]["start"].append(start)
            results[name]["idle"].append((with_idle - start) / args.idle)
    base = statistics.mean(results["default"]["start"])
    print(f"{'variant':24s} {'start+shutdown CPU s':>22s} {'x default':>10s} {'idle cores':>12s}")
    for name, row in results.items():
        start, idle = row["start"], row["idle"]
        print(f"{name:24s} {statistics.mean(start):14.1f} ± {spread(start):4.1f} {statistics.mean(start) / base:10.2f} "
              f"{statistics.mean(idle):8.3f} ± {spread(idle):.3f}")


if __name__ == "__main__":
    main()
