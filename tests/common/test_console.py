"""A quiet console: a trial's output, warnings and Ray's INFO lines go to its log file; outside
that file Tune's and Train's INFO lines are dropped and warnings still reach the console."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# What a Ray worker process does: Ray's handler on stderr, the platform's setup hook, then a trial.
WORKER = textwrap.dedent("""
    import logging, sys, warnings
    from medalign_platform.common.console import output_to_file, quiet_ray_worker

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
    quiet_ray_worker()
    storage = logging.getLogger("ray.train._internal.storage")
    storage.info("Restored on 10.0.0.1 from checkpoint")  # before the trial: dropped
    with output_to_file(sys.argv[1]):
        storage.info("Checkpoint successfully created at /x/checkpoint_000000")
        print("Loading weights: 100%", flush=True)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
        logging.getLogger("open_clip").info("Loaded ViT-B-16 model config.")
    storage.info("Restored again")  # after the trial: dropped again
    storage.warning("a real warning reaches the console")
    print("back on the console")
""")


def test_a_trial_s_chatter_goes_to_its_log_file_and_only_warnings_reach_the_console(tmp_path):
    log = tmp_path / "trial.log"
    done = subprocess.run([sys.executable, "-c", WORKER, str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["back on the console"]
    assert done.stderr.splitlines() == ["ray.train._internal.storage a real warning reaches the console"]
    text = log.read_text()
    for line in ("Checkpoint successfully created at /x/checkpoint_000000", "Loading weights: 100%",
                 "FutureWarning: `is_gradient_checkpointing` is deprecated", "Loaded ViT-B-16 model config."):
        assert line in text, line
    assert "Restored" not in text
