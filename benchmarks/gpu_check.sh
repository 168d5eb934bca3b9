#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run on one H200 (no network, no Ray/Hydra/open_clip):
#
#   1. step_bench --size 7b --batch 8           eager: plain / MedAlign / original (batch 1, eager, all attentions)
#   2. step_bench --size 7b --batch 8 --compile  torch.compile (inductor): plain / MedAlign
#   3. loop_bench --size 7b --batch 8           the full loop (DataLoader pipeline, logging) vs the bare step
#
# Each writes its JSON into "$OUT" (env.json, step_eager.json, step_compile.json, loop.json, summary.json:
# five files); a compact summary (ratios, tokens/s against the original, MFU, loop/step) is printed at the
# end. About 6-8 minutes on an H200; every bench has its own time limit, so one that hangs or runs out of
# memory costs its limit, not the rest.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh                   # on the GPU host (PYTHON=python3)
#   SIZE=tiny OUT=$(mktemp -d) bash benchmarks/gpu_check.sh    # the same script on a CPU
#
# PYTHON: the interpreter; by default the first of $VIRTUAL_ENV/bin/python, <repo>/.venv/bin/python and
# python3 that imports torch.
#
# SIZE=tiny runs the tiny CPU model with small step counts and the dynamo-only "eager" compile backend
# (inductor needs minutes per graph on a small CPU), to check the script end to end.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-7b}
if [ -z "${PYTHON:-}" ]; then  # the first interpreter that has torch: an active venv, the repo's, python3
  for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} "$ROOT/.venv/bin/python" python3; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
  if [ -z "${PYTHON:-}" ]; then
    echo "gpu_check.sh: no Python with torch found (tried \$VIRTUAL_ENV, $ROOT/.venv, python3); set PYTHON=/path/to/python" >&2
    exit 2
  fi
fi
OUT=${OUT:?set OUT to the folder for the JSON results}
export PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
LOGS=$(mktemp -d)

if [ "$SIZE" = tiny ]; then
  STEP_ARGS=(--size tiny --batch 2 --seq-text 24 --steps 2 --warmup 1)
  COMPILE_ARGS=(--compile-backend "${COMPILE_BACKEND:-eager}")
  LOOP_ARGS=(--size tiny --batch 2 --seq-text 24 --steps 2 --warmup 1 --items 12 --eval-items 2 --max-new-tokens 2 --rounds 1)
  LIMIT_STEP=${LIMIT_STEP:-400}; LIMIT_COMPILE=${LIMIT_COMPILE:-600}; LIMIT_LOOP=${LIMIT_LOOP:-400}
else
  STEP_ARGS=(--size 7b --batch 8 --steps 10 --warmup 3)
  COMPILE_ARGS=(--compile-backend "${COMPILE_BACKEND:-inductor}")
  LOOP_ARGS=(--size 7b --batch 8 --steps 10 --warmup 3)
  LIMIT_STEP=${LIMIT_STEP:-150}; LIMIT_COMPILE=${LIMIT_COMPILE:-240}; LIMIT_LOOP=${LIMIT_LOOP:-180}
fi

"$PYTHON" - "$OUT/env.json" "$SIZE" <<'EOF'
import json, platform, subprocess, sys, torch, transformers
info = {"size": sys.argv[2], "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as error:
    info["nvidia_smi"] = f"unavailable: {error}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("env:", json.dumps(info))
EOF

run_bench() {  # name limit script args...
  local name=$1 limit=$2 script=$3; shift 3
  local start=$SECONDS
  echo "== $name: $script $* (limit ${limit}s)"
  timeout --kill-after=20 "$limit" "$PYTHON" "$ROOT/benchmarks/$script" "$@" --json "$OUT/$name.json" \
    > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/status"
  grep -v -e Warning -e "warnings.warn" "$LOGS/$name.log" | tail -n 25
}

run_bench step_eager "$LIMIT_STEP" step_bench.py "${STEP_ARGS[@]}"
run_bench step_compile "$LIMIT_COMPILE" step_bench.py "${STEP_ARGS[@]}" --compile "${COMPILE_ARGS[@]}" --skip-original
run_bench loop "$LIMIT_LOOP" loop_bench.py "${LOOP_ARGS[@]}"

"$PYTHON" - "$OUT" "$LOGS" <<'EOF'
"""summary.json and the compact table; the targets are issue 12's (GPU, 7B shape, batch 8)."""
import json, sys
from pathlib import Path

out, logs = Path(sys.argv[1]), Path(sys.argv[2])

def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None

def tail(name, lines=6):
    path = logs / f"{name}.log"
    return path.read_text().splitlines()[-lines:] if path.is_file() else []

def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)

eager, compiled, loop = load("step_eager"), load("step_compile"), load("loop")
summary = {"status": (logs / "status").read_text().splitlines() if (logs / "status").is_file() else []}
original = (eager or {}).get("variants", {}).get("original", {}).get("tokens_per_s")
for name, result in (("eager", eager), ("compile", compiled)):
    if result is None:
        summary[name] = {"error": tail(f"step_{name}")}
        continue
    plain, medalign = result["variants"]["plain"], result["variants"]["medalign"]
    summary[name] = {
        "plain_ms": plain["ms_per_step"], "medalign_ms": medalign["ms_per_step"],
        "plain_peak_gib": plain["peak_gib"], "medalign_peak_gib": medalign["peak_gib"],
        "time_ratio": result["ratios"]["time_medalign_over_plain"],
        "memory_ratio": result["ratios"]["memory_medalign_over_plain"],
        "medalign_tokens_per_s": medalign["tokens_per_s"], "plain_tokens_per_s": plain["tokens_per_s"],
        "original_tokens_per_s": original,
        "medalign_over_original": medalign["tokens_per_s"] / original if original and medalign["tokens_per_s"] else None,
        "medalign_mfu": medalign.get("mfu"), "plain_mfu": plain.get("mfu"),
        "errors": {k: v["error"] for k, v in result["variants"].items() if v["error"]},
    }
if loop is None:
    summary["loop"] = {"error": tail("loop")}
else:
    summary["loop"] = {"step_samples_per_s": loop["step"]["samples_per_s"],
                       "loop_samples_per_s": loop["loop"]["samples_per_s"], "ratio": loop["ratio_loop_over_step"],
                       "step_mfu": loop["step"]["mfu"], "loop_mfu": loop["loop"]["mfu"],
                       "data_workers": loop["meta"]["data_workers"], "data_wait_share": loop["loop"]["data_wait_share"],
                       "eval_share": loop["evaluation"]["share_of_run"], "eval_s_per_item": loop["evaluation"]["seconds_per_item"]}
targets = {"time_ratio": 1.03, "memory_ratio": 1.03, "compiled_over_original": 4.0, "loop_over_step": 0.95}
summary["targets"] = targets
(out / "summary.json").write_text(json.dumps(summary, indent=1))

print("\n== summary (issue 12 targets: MedAlign/plain time and memory <= 1.03x, compiled >= 4x the original's "
      "tokens/s, loop/step >= 0.95)")
for name in ("eager", "compile"):
    row = summary[name]
    if "error" in row:
        print(f"{name:<8} FAILED: {' | '.join(row['error'])}")
        continue
    print(f"{name:<8} plain {fmt(row['plain_ms'], '.1f')} ms {fmt(row['plain_peak_gib'], '.2f')} GiB | MedAlign "
          f"{fmt(row['medalign_ms'], '.1f')} ms {fmt(row['medalign_peak_gib'], '.2f')} GiB | time x{fmt(row['time_ratio'], '.3f')} "
          f"mem x{fmt(row['memory_ratio'], '.3f')} | MedAlign {fmt(row['medalign_tokens_per_s'], ',.0f')} tok/s = "
          f"x{fmt(row['medalign_over_original'], '.2f')} original ({fmt(original, ',.0f')} tok/s, b1 eager) | "
          f"MFU {fmt(row['medalign_mfu'], '.1%')} (plain {fmt(row['plain_mfu'], '.1%')})"
          + (f" | errors {row['errors']}" if row["errors"] else ""))
row = summary["loop"]
if "error" in row:
    print(f"loop     FAILED: {' | '.join(row['error'])}")
else:
    print(f"loop     step {row['step_samples_per_s']:.2f} samples/s, loop {row['loop_samples_per_s']:.2f} samples/s: "
          f"loop/step {row['ratio']:.3f} | MFU step {fmt(row['step_mfu'], '.1%')} loop {fmt(row['loop_mfu'], '.1%')} | "
          f"{row['data_workers']} data workers, data wait {fmt(row['data_wait_share'], '.1%')} | evaluation "
          f"{row['eval_share']:.1%} of a run at the preset")
print("status:", "; ".join(summary["status"]))
EOF
rm -rf "$LOGS"
