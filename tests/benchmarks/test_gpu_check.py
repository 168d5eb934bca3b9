"""benchmarks/gpu_check.sh end to end at SIZE=tiny, with the packages the GPU host lacks hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_HOST = Path(__file__).resolve().parent / "gpu_host"  # sitecustomize hiding open_clip, ray, hydra, ...


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(GPU_HOST), OUT=str(tmp_path / "out"), SIZE="tiny", PYTHON=sys.executable,
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def test_the_gpu_host_lacks_what_the_blocker_hides(tmp_path):
    script = ("import importlib.util as u; print([m for m in ('open_clip', 'ray', 'hydra', 'omegaconf', 'optuna', "
              "'sacrebleu', 'rouge_score', 'ftfy') if u.find_spec(m) is not None], u.find_spec('torch') is not None)")
    done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[] True"


def test_the_benches_import_and_score_without_the_hidden_packages(tmp_path):
    """The quick guard of the slow test below: what loop_bench imports and its evaluation's scoring
    (closed answers: no BLEU, so no sacrebleu) work on the bare GPU host."""
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; import loop_bench, step_bench; "
              "from medalign_platform.run.loop import train; from medalign_platform.run.evaluation import evaluate_split; "
              "from medalign_platform.data.metrics import evaluation_metrics; "
              "m = evaluation_metrics([{'prediction': 'w7 w9', 'reference': 'w7  W9', 'answer_type': 'closed'}, "
              "{'prediction': 'w1', 'reference': 'w2', 'answer_type': 'closed'}]); "
              "print(m['closed_accuracy'], m['n_closed'], m['n_open'], sorted(sys.modules.keys() & "
              "{'open_clip', 'ray', 'hydra', 'omegaconf', 'optuna', 'sacrebleu', 'rouge_score', 'ftfy'}))")
    env = {**_env(tmp_path), "PYTHONPATH": f"{GPU_HOST}:{ROOT / 'platform'}"}
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0.5 2 0 []"


@pytest.mark.slow
def test_the_script_runs_every_bench_and_writes_its_json(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    printed = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["env.json", "loop.json", "step_compile.json", "step_eager.json", "summary.json"]  # <= 8 files
    summary = json.loads((out / "summary.json").read_text())
    status = summary["status"]
    assert [line.split(":")[0] for line in status] == ["step_eager", "step_compile", "loop"]
    assert all(": exit 0 after " in line for line in status), status
    for name in ("eager", "compile"):
        row = summary[name]
        assert "error" not in row and not row["errors"], row
        assert row["time_ratio"] > 0 and row["medalign_over_original"] > 0
        assert row["memory_ratio"] is None and row["medalign_mfu"] is None  # CPU: no allocator peak, no peak FLOP/s
    eager = json.loads((out / "step_eager.json").read_text())
    compiled = json.loads((out / "step_compile.json").read_text())
    assert set(eager["variants"]) == {"plain", "medalign", "original"} and set(compiled["variants"]) == {"plain", "medalign"}
    assert compiled["meta"]["compile"] is True and compiled["meta"]["compile_backend"] == "eager"
    for result in (eager, compiled):  # the MedAlign step really trained on all its terms
        assert result["variants"]["medalign"]["terms"]["attention"] > 0
    assert summary["compile"]["medalign_over_original"] == pytest.approx(
        compiled["variants"]["medalign"]["tokens_per_s"] / eager["variants"]["original"]["tokens_per_s"])
    loop = summary["loop"]
    assert "error" not in loop and 0 < loop["ratio"] < 3 and 0 < loop["eval_share"] < 1  # one timed step: noisy
    assert json.loads((out / "env.json").read_text())["size"] == "tiny"
    assert "== summary" in printed and "loop/step" in printed and "FAILED" not in printed
