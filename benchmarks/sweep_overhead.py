"""Ray overhead of a sweep trial: Train-in-Tune with Ray's defaults vs ours vs inline trials.

Each variant runs the same small sweep (mini SynthMed, ``search=smoke``, the same trial
count, concurrency and steps) in its own process, so each gets a fresh Ray cluster and its
own environment; the variants run one after the other in one invocation and the table
compares them side by side:

* ``train-naive``: each trial a Ray Train run with Ray Train's default control loop
  (2 s controller polling, a preemption-watcher actor per run) -- the ~20 s baseline;
* ``train``: the same Ray Train trials with the platform's defaults
  (``ray.controller_poll_s=0.2``, no preemption watcher on a local cluster);
* ``inline``: ``sweep.executor=inline``, the training loop inside the Tune trial actor.

Per trial, *overhead* = trial wall time - time inside the training loop (the loop time is
samples / ``perf/samples_per_s``); it covers Ray actor and process-group start-up, model
loading, evaluation and shutdown. *Ray part* = trial wall time - the run's own wall time
(``perf/outside_loop_share``), i.e. what Ray itself adds. ``wall / sum(loop)`` is the
sweep's wall time divided by the sum of all trials' in-loop seconds (with 2 concurrent
trials, 0.5 would be perfect overlap and no overhead).

Example::

    .venv/bin/python benchmarks/sweep_overhead.py                 # all three variants
    .venv/bin/python benchmarks/sweep_overhead.py --variants train inline --trials 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "train-naive": ["sweep.executor=train", "ray.controller_poll_s=2.0", "ray.preemption_watcher=true"],
    "train": ["sweep.executor=train"],
    "inline": ["sweep.executor=inline"],
}


def sweep_overrides(output_dir: Path, name: str, trials: int, steps: int) -> list[str]:
    """The same small sweep for every variant: no early stopping, so every trial does equal work."""
    return ["experiment=synthmed_vqa", "search=smoke", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
            "trainer.val_size=12", "trainer.test_size=0", "trainer.batch_size=4", "trainer.log_every=5",
            "trainer.max_new_tokens=4", f"sweep.num_samples={trials}", "sweep.max_concurrent=2", "sweep.seed=0",
            "sweep.asha.enabled=false", "sweep.verbose=0", f"sweep.name={name}", f"sweep.output_dir={output_dir}"]


def run_variant(variant: str, output_dir: Path, trials: int, steps: int) -> dict:
    """One sweep in this process; returns its timings (called in a child process)."""
    from medalign_platform.tune.driver import run_sweep

    started = time.perf_counter()
    summary = run_sweep(sweep_overrides(output_dir, variant, trials, steps) + VARIANTS[variant])
    wall = time.perf_counter() - started
    records = json.loads((Path(summary["experiment_dir"]) / "summary.json").read_text())["records"]
    loops = []
    for record in records:
        metrics = record["metrics"]
        samples = metrics["step"] * record["config"]["trainer"]["batch_size"]
        loops.append(samples / metrics["perf/samples_per_s"])
    overhead = summary["overhead"]
    return {"variant": variant, "trials": summary["trials"], "sweep_wall_s": wall, "sum_loop_s": sum(loops),
            "mean_trial_wall_s": overhead["mean_trial_wall_s"], "mean_loop_s": overhead["mean_training_loop_s"],
            "mean_overhead_s": overhead["mean_outside_loop_s"], "mean_ray_part_s": overhead["mean_ray_overhead_s"],
            "mean_setup_s": overhead["mean_setup_s"], "wall_over_loop": wall / sum(loops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.out, args.trials, args.steps)), flush=True)
        return

    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    work = Path(tempfile.mkdtemp(prefix="medalign-overhead-"))
    prepare_mini_synthmed(work / "cache", n_train=96, n_val=12, n_test=12)
    env = {**os.environ, "MEDALIGN_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "platform"),
                                          os.environ.get("PYTHONPATH", "")])}
    rows = []
    for variant in args.variants:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--out", str(work / "sweeps"),
                               "--trials", str(args.trials), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{variant} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"  {variant}: done in {rows[-1]['sweep_wall_s']:.0f} s", file=sys.stderr, flush=True)

    print(f"\n{args.trials} trials x {args.steps} steps, 2 concurrent, mini SynthMed, {os.cpu_count()} CPUs")
    header = ("variant", "trial wall s", "in-loop s", "overhead s", "Ray part s", "setup s", "sweep wall s",
              "wall/sum(loop)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['variant']} | {r['mean_trial_wall_s']:.1f} | {r['mean_loop_s']:.1f} | {r['mean_overhead_s']:.1f} "
              f"| {r['mean_ray_part_s']:.1f} | {r['mean_setup_s']:.1f} | {r['sweep_wall_s']:.0f} "
              f"| {r['wall_over_loop']:.1f} |")
    by = {r["variant"]: r for r in rows}
    if "train-naive" in by:
        for other in ("train", "inline"):
            if other in by:
                print(f"overhead per trial, {other} vs train-naive: "
                      f"{by[other]['mean_overhead_s'] / by['train-naive']['mean_overhead_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
